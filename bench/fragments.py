"""Work per byte when the model's output arrives in small pieces (issue 17.7).

    python bench/fragments.py [--against DIR]

Linear code costs the same per byte however long the text grows; code that
re-copies what it already has for every piece costs more per byte the longer
it gets.  For each of two paths, the text is fed in 16-byte pieces at two
sizes, and the figure is microseconds per KiB; ratio = big / small per-KiB
cost (about 1 when linear, about the size ratio when quadratic).

- sse: one SSE event that grows to the size before it ends (a long tool call's
  arguments), through `agent_core.sse_events`;
- merge: a burst of deltas that all merge into one pending event while a
  commit is in flight, through `agent_web.EventLog.emit_nowait`.

--against DIR imports the same functions from another checkout (say
`git worktree add ../before HEAD~1`) and prints its rows beside ours.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from pathlib import Path

import httpx

PIECE = 16


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks):
        self.chunks = chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk


def sse_seconds(core, size: int) -> float:
    body = b"data: " + b"x" * size + b"\n\n"
    chunks = [body[i:i + PIECE] for i in range(0, len(body), PIECE)]

    async def go():
        response = httpx.Response(200, stream=_Chunks(chunks))
        started = time.perf_counter()
        got = [e async for e in core.sse_events(response)]
        assert len(got[0][1]) == size
        return time.perf_counter() - started
    return asyncio.run(go())


def merge_seconds(web, size: int) -> float:
    class Log(web.EventLog):
        def __init__(self):
            self._pending, self._last = [], {}
            self._wake = asyncio.Event()

    async def go():
        log = Log()
        started = time.perf_counter()
        for _ in range(size // PIECE):
            log.emit_nowait("s", {"type": "delta", "message_id": "m", "channel": "text",
                                  "content": "y" * PIECE})
        # What the writer does when it takes the batch (join, if it joins).
        for p in log._pending:
            if getattr(p, "more", None) is not None:
                p.event["content"] = "".join(p.more)
        assert len(log._pending[0].event["content"]) == size // PIECE * PIECE
        return time.perf_counter() - started
    return asyncio.run(go())


def rows(folder: Path, label: str) -> None:
    sys.path.insert(0, str(folder))
    for name in ("agent_core", "agent_web"):
        sys.modules.pop(name, None)
    core = importlib.import_module("agent_core")
    web = importlib.import_module("agent_web")
    sys.path.pop(0)
    small, big = 256 * 1024, 2 * 1024 * 1024
    for path, fn, mod in (("sse", sse_seconds, core), ("merge", merge_seconds, web)):
        a = min(fn(mod, small) for _ in range(3)) / (small / 1024) * 1e6
        b = min(fn(mod, big) for _ in range(3)) / (big / 1024) * 1e6
        print(f"{label:8} {path:6} {a:10.1f} {b:10.1f} {b / a:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", type=Path)
    args = ap.parse_args()
    print(f"{'code':8} {'path':6} {'256 KiB':>10} {'2 MiB':>10} {'ratio':>7}   (µs per KiB)")
    rows(Path(__file__).resolve().parent.parent, "this")
    if args.against:
        rows(args.against.resolve(), "against")


if __name__ == "__main__":
    main()
