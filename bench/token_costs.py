"""Two pieces of a streamed token's cost, in process, without the noise of a
whole server: what limits "Capacity on one core" (bench/RESULTS.md).

    python bench/token_costs.py [--tokens 20000] [--commits 2000]

client  The LLM client's side of a token: httpx (h11, httpcore), our SSE
        split, `json.loads` and the Anthropic client's handling, fed from
        memory by a network backend that hands over prepared reads (no
        socket, no wake-up, one core's thread time).  Per framing (the
        providers' chunked, a chunk a token; a body sent until the
        connection closes) and per tokens a read carries.  The difference
        between the two framings at 2-3 tokens a read is what each chunk's
        own pass through h11 and httpx costs.

writer  The SQLite writer thread's side: one commit of K deltas through the
        server's own `Store.append`, on a database holding 200 sessions,
        the K deltas from K sessions or all from one.  Each session's newest
        rows sit in a leaf page of their own, and every page a commit
        touches is written whole to the WAL: the cost is per session in the
        commit, not per byte.

Printed: µs of CPU a token (client) or a commit (writer); medians of 3.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import httpcore  # noqa: E402
import httpx  # noqa: E402
import agent_core as core  # noqa: E402
import agent_web  # noqa: E402
from test_agent_web import Reply, anthropic_sse  # noqa: E402


# -- client ---------------------------------------------------------------------

class _Reads(httpcore.AsyncNetworkStream):
    def __init__(self, reads: list[bytes]):
        self.reads = reads

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.reads.pop(0) if self.reads else b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def get_extra_info(self, info: str):
        return None


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self, reads: list[bytes]):
        self.reads = reads

    async def connect_tcp(self, *args, **kwargs) -> _Reads:
        return _Reads(self.reads)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def prepared_reads(tokens: int, per_read: int, chunked: bool) -> list[bytes]:
    events = anthropic_sse(Reply(" tok" * tokens))
    if chunked:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" \
               b"transfer-encoding: chunked\r\n\r\n"
        events = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
        end = [b"0\r\n\r\n"]
    else:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        end = []
    return [head] + [b"".join(events[i:i + per_read])
                     for i in range(0, len(events), per_read)] + end


async def client_cost(tokens: int, per_read: int, chunked: bool) -> float:
    """µs of this thread's CPU per text token streamed."""
    cfg = core.LLMConfig("anthropic", "m", "k", "http://127.0.0.1:9")
    async with httpx.AsyncClient() as http:
        http._transport._pool._network_backend = _Backend(
            prepared_reads(tokens, per_read, chunked))
        llm = core.AnthropicClient(cfg, http)
        started, n = time.thread_time(), 0
        async for kind, _ in llm.stream([{"role": "user", "content": "hi"}], []):
            n += kind == "text"
        return (time.thread_time() - started) / n * 1e6


# -- writer ---------------------------------------------------------------------

def writer_cost(k: int, one_session: bool, commits: int) -> float:
    """µs of CPU per commit of k deltas, through Store.append and its
    checkpoints, on a fresh database of 200 sessions."""
    with tempfile.TemporaryDirectory() as tmp:
        store = agent_web.Store(os.path.join(tmp, "agent.db"))
        conn = store._conn()
        sids = [f"s{i:04d}" + "x" * 16 for i in range(200)]
        for sid in sids:
            agent_web.Store.create_session(conn, sid, "auto")

        def delta() -> dict:
            return {"type": "delta", "ts": time.time(), "message_id": "msg_0123456789abcdef",
                    "channel": "text", "content": " tok"}
        for _ in range(20):                    # every session some rows deep
            agent_web.Store.append(conn, [(sid, delta()) for sid in sids])
        started = time.thread_time()
        for _ in range(commits):
            chosen = [sids[0]] * k if one_session else random.sample(sids, k)
            store._write_and_checkpoint(conn, agent_web.Store.append,
                                        [(sid, delta()) for sid in chosen])
        spent = time.thread_time() - started
        store.close()
    return spent / commits * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--commits", type=int, default=2_000)
    args = ap.parse_args()

    print("client: µs of CPU a token, by tokens a read")
    print(f"{'framing':>10} " + " ".join(f"{n:>7}" for n in (1, 2, 3, 5)))
    for chunked in (True, False):
        row = [statistics.median(asyncio.run(client_cost(args.tokens, n, chunked))
                                 for _ in range(3)) for n in (1, 2, 3, 5)]
        print(f"{'chunked' if chunked else 'close':>10} " + " ".join(f"{x:7.1f}" for x in row))

    print("\nwriter: µs of CPU a commit of K deltas (200 sessions in the database)")
    print(f"{'K':>4} {'K sessions':>11} {'one session':>12} {'per extra session':>18}")
    for k in (1, 13, 50):
        spread = statistics.median(writer_cost(k, False, args.commits) for _ in range(3))
        one = statistics.median(writer_cost(k, True, args.commits) for _ in range(3))
        extra = (spread - one) / (k - 1) if k > 1 else float("nan")
        print(f"{k:>4} {spread:11.0f} {one:12.0f} {extra:18.1f}")


if __name__ == "__main__":
    main()
