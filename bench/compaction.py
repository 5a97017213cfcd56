"""Long sessions: the request size over a 300-turn session, and what a
compaction costs (issue 18).

    python bench/compaction.py [--turns 300] [--limit 80000] [--words 500]

One session of TURNS user messages of about WORDS words each (plus the fake
model's echo of it, so ~2×WORDS×1.3 tokens a turn), run through the real
agent loop against the fake LLM server of the tests, which counts each
request's tokens (bytes / 4) in its usage as a real provider would.  Printed:
the request sent at every 25th turn, in tokens and bytes, beside what it
would have been with no compaction (everything resent); the number of
compactions; and for each, the time it took (wall, which is mostly the fake
model writing its summary) and the CPU time our side spent on it (picking
the cut, writing the transcript, rebuilding the history).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

import agent_core as core          # noqa: E402
import test_agent_web as t         # noqa: E402  (the fake LLM server)


class TimedAgent(core.Agent):
    timings: list[tuple[float, float]] = []

    async def _compact(self, history, usage, reason):
        wall, cpu = time.perf_counter(), time.process_time()
        async for ev in super()._compact(history, usage, reason):
            if ev["type"] == "compaction":
                self.timings.append((time.perf_counter() - wall, time.process_time() - cpu))
            yield ev


async def session(args, workspace: Path) -> None:
    llm = t.FakeLLM()
    llm.count_tokens = True
    cfg = t.cfg_for(llm, token_limit=args.limit)
    history: list[dict] = []
    measured = None
    grown = 0                       # bytes of every message so far: no compaction
    compactions = []
    print(f"{'turn':>5} {'request tokens':>15} {'request KiB':>12} {'without compaction':>19}")
    async with core.make_http_client(cfg) as http:
        client = core.make_llm(cfg, http)
        toolbox = core.Toolbox(workspace)
        for turn in range(1, args.turns + 1):
            prompt = f"say: turn {turn}: " + " ".join(f"word{turn}x{i}" for i in range(args.words))
            history.append({"role": "user", "content": prompt})
            agent = TimedAgent(client, cfg, toolbox, measured=measured)
            async for ev in agent.run(history):
                if ev["type"] == "compaction":
                    compactions.append(ev)
            measured = agent.measured
            body = llm.requests[-1]
            size = len(json.dumps(body))
            grown += 2 * len(prompt) + 40
            if turn == 1 or turn % 25 == 0:
                print(f"{turn:5} {size // 4:15,} {size / 1024:12,.0f} {grown // 4:19,}")
    llm.close()
    sizes = [len(json.dumps(b)) // 4 for b in llm.requests if not t.is_summary_request(b)]
    print(f"\nlimit {args.limit:,} tokens; largest request {max(sizes):,} tokens; "
          f"{len(compactions)} compactions over {args.turns} turns "
          f"({len(llm.requests) - len(sizes)} summary requests)")
    if TimedAgent.timings:
        walls = [w * 1000 for w, _ in TimedAgent.timings]
        cpus = [c * 1000 for _, c in TimedAgent.timings]
        print(f"a compaction: wall median {statistics.median(walls):.0f} ms (max "
              f"{max(walls):.0f}), CPU of this process (ours and the fake model's) median {statistics.median(cpus):.1f} ms "
              f"(max {max(cpus):.1f}); tokens before → after, median "
              f"{statistics.median(c['tokens_before'] for c in compactions):,.0f} → "
              f"{statistics.median(c['tokens_after'] for c in compactions):,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--limit", type=int, default=core.DEFAULT_TOKEN_LIMIT)
    ap.add_argument("--words", type=int, default=500)
    args = ap.parse_args()
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(session(args, Path(tmp)))


if __name__ == "__main__":
    main()
