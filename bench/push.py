"""The push path: fan-out throughput against the bare stack, and added latency.

    python bench/push.py [--tokens 20000] [--quick]
    python bench/push.py --latency-only --rounds 14 --against ../before
    python bench/push.py --fan-out-only

Fan-out.  One run streams TOKENS events as fast as the fake LLM can send them
(an OpenAI stream alternating reasoning and content fragments, so no two
deltas can be merged: every token is its own event, committed to SQLite
before it is pushed) to 1, 10 and 100 subscribers.  Beside it, the bare
uvicorn + wsproto app (bench/bare_stack.py) pushes the same number of frames
of the same size to the same number of clients, in turn with ours, three
times; each row gives the medians.  ratio = ours / bare.  The first row,
with no subscriber, is what producing and storing events costs on its own.

Latency.  1 and then 50 sessions stream 200 tokens, 50 a second each (the
pace of a fast model); the 50 runs start at random moments within 1 s (as
users would), then all in the same instant.  For every token a subscriber
receives: its arrival time minus the time the fake LLM wrote it to its socket
(stamped into the token's text at that moment), so the server's whole path
counts: reading the SSE, the agent, the commit, the push.  Same clock: both
ends are on this machine.

One latency run says little on a shared machine.  --rounds N repeats the
50-session runs N times and sums up their p99s; --against DIR runs another
checkout's server (say `git worktree add ../before HEAD~1`) in turn with
this one's, round after round, so both see the same moments of the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import httpx  # noqa: E402
import websockets  # noqa: E402
from test_agent_web import (TOKEN, FakeLLM, FakeLLMProcess, Reply, ServerProcess,  # noqa: E402
                            free_port)
from paced import ready_sessions  # noqa: E402


SENT = re.compile(r"@(\d+\.\d+)")          # test_agent_web.SENT_AT, filled in
TRIES = 3                                   # fan-out: each row is the median of as many


def alternating_openai_stream(tokens: int) -> bytes:
    out = []
    for i in range(tokens):
        key = "reasoning_content" if i % 2 else "content"
        out.append("data: " + json.dumps({"id": "c", "object": "chat.completion.chunk",
                                          "created": 1, "model": "m", "choices": [
                                              {"index": 0, "delta": {key: f"tok{i} "},
                                               "finish_reason": None}]}) + "\n\n")
    out.append('data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
               '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    out.append("data: [DONE]\n\n")
    return "".join(out).encode()


async def subscribers(url: str, sid: str, after: int, n: int) -> list:
    socks = []
    for _ in range(n):
        ws = await websockets.connect(url, max_size=None, max_queue=None)
        await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": after}))
        await ws.recv()                                 # "subscribed"
        socks.append(ws)
    return socks


async def drain_until_done(ws) -> tuple[int, int, float]:
    frames = size = 0
    while True:
        text = await ws.recv()
        frames += 1
        size += len(text)
        if '"type":"done"' in text:
            return frames, size, time.perf_counter()


async def idle_session(c: httpx.AsyncClient, server: ServerProcess, poll: float = 0.05
                       ) -> tuple[str, str, int]:
    """A new session whose first run is over: (id, its tail URL, last seq)."""
    sid = (await c.post(server.base + "/agent/chat", json={"message": "say: ready"})).json()[
        "session_id"]
    url = server.base + f"/agent/chat?session_id={sid}&tail=1"
    while (state := (await c.get(url)).json())["status"] != "idle":
        await asyncio.sleep(poll)
    return sid, url, state["last_seq"]


async def ours(server: ServerProcess, llm: FakeLLM, n: int, tokens: int) -> dict:
    h = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(headers=h, timeout=60) as c:
        sid, _, last = await idle_session(c, server)
        socks = await subscribers(server.ws_url(), sid, last, n)
        llm.script.append(Reply(raw=[alternating_openai_stream(tokens)]))
        t0 = time.perf_counter()
        await c.post(server.base + "/agent/chat", json={"session_id": sid, "message": "go"})
        results = await asyncio.gather(*[drain_until_done(ws) for ws in socks])
    for ws in socks:
        await ws.close()
    frames = results[0][0]
    return {"frames": frames, "avg_size": results[0][1] // frames,
            "seconds": max(r[2] for r in results) - t0}


async def store_only(server: ServerProcess, llm: FakeLLM, tokens: int) -> float:
    """Seconds for one run to store `tokens` events with no subscriber: what
    producing events costs on its own.  Polled every 10 ms: each poll costs
    the server ~0.15 ms, which polling every 2 ms took from the run itself."""
    h = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(headers=h, timeout=60) as c:
        sid, url, _ = await idle_session(c, server)
        llm.script.append(Reply(raw=[alternating_openai_stream(tokens)]))
        t0 = time.perf_counter()
        await c.post(server.base + "/agent/chat", json={"session_id": sid, "message": "go"})
        while (await c.get(url)).json()["status"] != "idle":
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0


async def bare(port: int, n: int, frames: int, size: int) -> float:
    socks = [await websockets.connect(f"ws://127.0.0.1:{port}/", max_size=None, max_queue=None)
             for _ in range(n)]

    async def one(ws):
        await ws.send(f"{frames} {size}")
        while await ws.recv() != "end":
            pass
    t0 = time.perf_counter()
    await asyncio.gather(*[one(ws) for ws in socks])
    seconds = time.perf_counter() - t0
    for ws in socks:
        await ws.close()
    return seconds


async def latency(server: ServerProcess, sessions: int, tokens: int, spread: float) -> dict:
    """Runs start at random moments within `spread` seconds (0: all at once)."""
    h = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(headers=h, timeout=60) as c:
        sids = await ready_sessions(c, [server], sessions)
        socks = []
        for sid in sids:
            last = (await c.get(server.base + f"/agent/chat?session_id={sid}&tail=1")).json()["last_seq"]
            socks += await subscribers(server.ws_url(), sid, last, 1)
        samples: list[tuple[float, float]] = []              # (arrival, latency ms)
        await c.get(server.base + "/agent/stats")          # resets the server's lag probe

        async def watch(ws):
            while True:
                text = await ws.recv()
                now = time.time()
                ev = json.loads(text)
                if ev.get("type") == "delta":      # a frame may carry several tokens
                    for sent in SENT.findall(ev["content"]):
                        samples.append((now, (now - float(sent)) * 1000))
                if ev.get("type") == "done":
                    return

        async def start(sid):
            await asyncio.sleep(random.uniform(0, spread))
            await c.post(server.base + "/agent/chat",
                         json={"session_id": sid, "message": f"stream {tokens}"})
        # This process's own full garbage collections (15-35 ms here, with
        # the samples and 50 sockets held) would count as the server's
        # latency: none while we measure.
        gc.collect()
        gc.disable()
        try:
            watchers = [asyncio.ensure_future(watch(ws)) for ws in socks]
            await asyncio.gather(*[start(sid) for sid in sids])
            all_started = time.time() + 0.2           # and their first request is out
            await asyncio.gather(*watchers)
        finally:
            gc.enable()
        lag = (await c.get(server.base + "/agent/stats")).json()["loop_lag_ms"]
    for ws in socks:
        await ws.close()

    def pct(values, q):
        return values[min(len(values) - 1, int(len(values) * q))]
    every = sorted(ms for _, ms in samples)
    steady = sorted(ms for at, ms in samples if at >= all_started)
    return {"n": len(every), "p50": pct(every, 0.5), "p99": pct(every, 0.99), "max": every[-1],
            "steady_p99": pct(steady, 0.99) if steady else float("nan"), "lag_p99": lag["p99"]}


async def fan_out(tmp: Path, tokens: int, fanouts: list[int]) -> None:
    llm = FakeLLM()
    # A queue deep enough for the whole torture run: here we measure the
    # push path's speed, not the slow-consumer cut-off (4008).
    # AGENT_MAX_TOKENS: one answer of this bench is 8 x TOKENS fragments, past
    # the per-token caps of a default step (agent_core.STEP_CHARS_PER_TOKEN).
    server = ServerProcess(tmp, llm, protocol="openai", extra_env={
        "AGENT_WEB_QUEUE_SIZE": str(tokens * 2 + 100), "AGENT_MAX_TOKENS": str(tokens * 8)})
    port = free_port()
    bare_proc = subprocess.Popen([sys.executable, str(HERE / "bare_stack.py"), str(port)],
                                 stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        print(f"Fan-out: one run of {tokens} events, each committed before it is pushed")
        print(f"{'subscribers':>11} {'frames/s ours':>14} {'frames/s bare':>14} {'ratio':>6}"
              f" {'tokens/s':>9} {'frame B':>8}")
        seconds = await store_only(server, llm, tokens * 8)
        print(f"{'0':>11} {tokens * 8 / seconds:>14,.0f} {'-':>14} {'-':>6}"
              f"   (no subscriber: producing and storing {tokens * 8} events)")
        for n in fanouts:
            # Ours and the bare stack in turn, three times: with one client
            # the bare stack's rate alone moves by half from one try to the
            # next here.  The medians of the three.
            rates_o, rates_b = [], []
            for _ in range(TRIES):
                o = await ours(server, llm, n, tokens)
                b = await bare(port, n, o["frames"], o["avg_size"])
                rates_o.append(o["frames"] * n / o["seconds"])
                rates_b.append(o["frames"] * n / b)
            rate_o, rate_b = statistics.median(rates_o), statistics.median(rates_b)
            ratio = statistics.median(ro / rb for ro, rb in zip(rates_o, rates_b))
            print(f"{n:>11} {rate_o:>14,.0f} {rate_b:>14,.0f} {ratio:>6.2f}"
                  f" {rate_o / n:>9,.0f} {o['avg_size']:>8}")
        print()
    finally:
        bare_proc.terminate()
        server.stop()
        llm.close()


async def added_latency(tmp: Path, rounds: int, against: Path | None) -> None:
    """The latency table; with `rounds` > 1 the 50-session rows again and
    again, and with `against` another checkout's server in turn with ours,
    then each one's p99s summed up.  One run says little on a shared
    machine: the same code gives p99s 2x apart from one minute to the next."""
    # The fake LLM runs in a process of its own, so its 50 streaming threads
    # do not hold this process's GIL while we time frames.
    fake_proc = FakeLLMProcess()
    codes = {"this checkout": HERE.parent / "agent_web.py"}
    if against is not None:
        codes[str(against)] = against / "agent_web.py"
    servers = {}
    p99s: dict[str, list[float]] = {name: [] for name in codes}
    try:
        for k, (name, script) in enumerate(codes.items()):
            (tmp / f"lat{k}").mkdir()
            servers[name] = ServerProcess(tmp / f"lat{k}", fake_proc, script=script,
                                          extra_env={"AGENT_WEB_LAG_PROBE": "1"})
        print("Added latency: token written by the LLM -> its frame at a WebSocket client (ms)")
        print("('p99 steady': tokens that arrived once every run had started)")
        print(f"{'sessions':>8} {'runs start':>15} {'tokens':>7} {'p50':>7} {'p99':>7}"
              f" {'max':>7} {'p99 steady':>11} {'loop lag p99':>13}"
              + ("  code" if against else ""))
        for round_ in range(rounds):
            for name, server in servers.items():
                rows = [(50, 1.0, "spread over 1 s"), (50, 0.0, "same instant")]
                if round_ == 0:
                    rows.insert(0, (1, 0.0, "-"))
                for sessions, spread, how in rows:
                    r = await latency(server, sessions, 200, spread)
                    if sessions == 50:
                        p99s[name].append(r["p99"])
                    print(f"{sessions:>8} {how:>15} {r['n']:>7} {r['p50']:>7.2f} {r['p99']:>7.2f}"
                          f" {r['max']:>7.2f} {r['steady_p99']:>11.2f} {r['lag_p99']:>13.2f}"
                          + (f"  {name}" if against else ""), flush=True)
        if rounds > 1 or against:
            print()
            print("p99 at 50 sessions, both ways of starting (min - median - max):")
            for name, values in p99s.items():
                print(f"  {name:>20}: {min(values):.2f} - {statistics.median(values):.2f} - "
                      f"{max(values):.2f} ms, under 5 ms in {sum(v < 5 for v in values)}"
                      f" of {len(values)}")
    finally:
        fake_proc.close()
        for server in servers.values():
            server.stop()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=20000,
                   help="events in the fan-out run (fewer: start-up weighs more)")
    p.add_argument("--quick", action="store_true", help="1 and 10 subscribers only")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the 50-session latency this many times (and sum up the p99s)")
    p.add_argument("--against", type=Path, metavar="CHECKOUT",
                   help="another checkout of this project: its server's latency, in turn "
                        "with ours (e.g. a `git worktree` of the commit before)")
    p.add_argument("--latency-only", action="store_true", help="skip the fan-out")
    p.add_argument("--fan-out-only", action="store_true", help="skip the latency")
    args = p.parse_args()
    if args.latency_only and args.fan_out_only:
        p.error("--latency-only and --fan-out-only leave nothing to run")
    if args.against is not None and not (args.against / "agent_web.py").is_file():
        p.error(f"no agent_web.py in {args.against}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.latency_only:
            await fan_out(Path(tmp), args.tokens, [1, 10] if args.quick else [1, 10, 100])
        if not args.fan_out_only:
            await added_latency(Path(tmp), args.rounds, args.against)


if __name__ == "__main__":
    asyncio.run(main())
