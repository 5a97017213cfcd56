"""Resume: opening a 10,000-event session, over HTTP and over the WebSocket.

    python bench/resume.py [--events 10000] [--repeat 5]

The session is written straight into a fresh database (user message, two
deltas, assistant message, tool call, tool result, done: realistic sizes),
then the real server starts on it and we time:
  - GET /agent/chat for all events (two pages of 5,000, the route's maximum)
    and GET ?tail=200 (what the page asks for first): time and bytes;
  - subscribe with after=0 until the last replayed event has arrived, i.e.
    until the client is live.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import httpx  # noqa: E402
import websockets  # noqa: E402
from test_agent_web import TOKEN, ServerProcess, seed_session  # noqa: E402

SHAPES = [
    {"type": "message", "role": "user", "content": "Please look at the build script and fix "
     "the failing step; explain what you changed."},
    {"type": "delta", "channel": "text", "content": "Let me look at the build script first. "},
    {"type": "delta", "channel": "text", "content": "I will run the tests to see the failure."},
    {"type": "message", "role": "assistant", "content": "Let me look at the build script first. "
     "I will run the tests to see the failure."},
    {"type": "tool_call", "tool": "bash", "input": {"command": "python -m pytest -q tests/"}},
    {"type": "tool_result", "tool": "bash", "is_error": False, "duration_ms": 812,
     "output": "....F....\nFAILED tests/test_build.py::test_step - AssertionError\n" * 4},
    {"type": "done", "status": "done", "summary": "fixed", "steps": 2,
     "usage": {"input_tokens": 1200, "output_tokens": 80}},
]


def seed(db_path: Path, n: int) -> str:
    events = []
    for seq in range(1, n + 1):
        ev = dict(SHAPES[(seq - 1) % len(SHAPES)])
        ev.update(message_id=f"m{seq // 7}", call_id=f"c{seq // 7}")
        events.append(ev)
    return seed_session(db_path, "s_resume_bench", "bench", events)


async def replay(url: str, sid: str, last: int) -> float:
    async with websockets.connect(url, max_size=None, max_queue=None) as ws:
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": 0}))
        while True:
            frame = await ws.recv()
            if frame.startswith('{"seq":') and json.loads(frame)["seq"] == last:
                return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sid = seed(Path(tmp) / "agent.db", args.events)
        server = ServerProcess(Path(tmp), None)
        h = {"authorization": f"Bearer {TOKEN}"}
        full, tail, ws = [], [], []
        try:
            with httpx.Client(headers=h, timeout=30) as c:
                c.get(server.base + "/healthz")
                for _ in range(args.repeat):
                    t0, size, after = time.perf_counter(), 0, 0
                    while after < args.events:
                        r = c.get(server.base + f"/agent/chat?session_id={sid}&after={after}"
                                  "&limit=5000")
                        size += len(r.content)
                        after += len(r.json()["events"])
                    full.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    r = c.get(server.base + f"/agent/chat?session_id={sid}&tail=200")
                    tail.append(time.perf_counter() - t0)
                    tail_size = len(r.content)
                    ws.append(asyncio.run(replay(server.ws_url(), sid, args.events)))
        finally:
            server.stop()
    ms = lambda xs: f"{statistics.median(xs) * 1000:8.1f} ms"  # noqa: E731
    print(f"Resume a session of {args.events:,} events (median of {args.repeat})")
    print(f"  GET /agent/chat, all events (2 pages)  {ms(full)}   {size / 1e6:.2f} MB")
    print(f"  GET /agent/chat?tail=200 (page load)   {ms(tail)}   {tail_size / 1e6:.2f} MB")
    print(f"  subscribe after=0 until live           {ms(ws)}   {args.events:,} frames")


if __name__ == "__main__":
    main()
