"""What a token costs at a real model's pace (issue 21).

    python bench/paced.py [--seconds 4] [--rates 20,50,100] [--sessions 1,10,50,200]
    python bench/paced.py --against ../before        # another checkout, in turn
    python bench/paced.py --windows 0,12              # this code, per pacing window
    python bench/paced.py --pin                       # the server alone on CPU 1

Each configuration: SESSIONS sessions at once, each streaming for SECONDS at
RATE tokens a second (the fake LLM of the tests, in a process of its own,
writes one SSE event per token and stamps the moment it writes it), one
WebSocket subscriber per session.  Printed per row:

- server CPU per token: the server process's CPU time (all its threads:
  the loop, the SQLite writer, the executor) over the run, divided by the
  tokens delivered to the subscribers;
- added latency p50 / p99: token written by the fake LLM -> its frame at
  the subscriber (both on this machine, one clock);
- with --lag, the server's event-loop lag p99 (a 10 ms timer,
  AGENT_WEB_LAG_PROBE); its 100 wake-ups a second then count in the CPU
  figure, so CPU and lag are best read from two runs.

The client (this process) reads 200 sessions x 100 tokens/s = 20,000 frames
a second at the top row; where it cannot keep up, the latency is partly its
own.  Runs start at random moments within 1 s, as users would.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import httpx  # noqa: E402
import websockets  # noqa: E402
from test_agent_web import TOKEN, FakeLLMProcess, ServerProcess  # noqa: E402

SENT = re.compile(r"@(\d+\.\d+)")


async def subscribe(c: httpx.AsyncClient, server: ServerProcess, sid: str):
    """A WebSocket on `server`, subscribed to `sid` from its newest event."""
    last = (await c.get(server.base + f"/agent/chat?session_id={sid}&tail=1")).json()["last_seq"]
    ws = await websockets.connect(server.ws_url(), max_size=None, max_queue=None)
    await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": last}))
    await ws.recv()
    return ws


async def watch(ws, latencies: list[float]) -> None:
    """Until the run's `done`: each token's latency, from the moment the fake
    LLM stamped in it to its frame here, in ms."""
    while True:
        ev = json.loads(await ws.recv())
        if ev.get("type") == "delta":
            now = time.time()
            latencies.extend((now - float(s)) * 1000 for s in SENT.findall(ev["content"]))
        elif ev.get("type") == "done":
            return


def percentile(data: list[float], q: float) -> float:
    """Of sorted `data`."""
    return data[min(len(data) - 1, int(len(data) * q))] if data else float("nan")


async def run(server: ServerProcess, sessions: int, rate: float, seconds: float) -> dict:
    tokens = max(1, int(rate * seconds))
    h = {"authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(headers=h, timeout=120, limits=limits) as c:
        sids = []
        for _ in range(sessions):
            r = await c.post(server.base + "/agent/chat", json={"message": "say: ready"})
            sids.append(r.json()["session_id"])
        await asyncio.sleep(0.5 + sessions / 200)
        socks = [await subscribe(c, server, sid) for sid in sids]
        latencies: list[float] = []

        async def start(sid):
            await asyncio.sleep(random.uniform(0, 1.0))
            await c.post(server.base + "/agent/chat",
                         json={"session_id": sid, "message": f"stream {tokens} {rate}"})
        before = (await c.get(server.base + "/agent/stats")).json()   # resets the lag probe
        gc.collect()
        gc.disable()
        try:
            watchers = [asyncio.ensure_future(watch(ws, latencies)) for ws in socks]
            await asyncio.gather(*[start(sid) for sid in sids])
            await asyncio.gather(*watchers)
        finally:
            gc.enable()
        after = (await c.get(server.base + "/agent/stats")).json()
    for ws in socks:
        await ws.close()
    data = sorted(latencies)
    cpu = after["process_seconds"] - before["process_seconds"]
    return {"tokens": len(data), "cpu_ms_per_token": cpu * 1000 / max(1, len(data)),
            "p50": percentile(data, 0.5), "p99": percentile(data, 0.99), "lag_p99": (after["loop_lag_ms"] or {}).get("p99", float("nan"))}


def pin(pid: int, cpus: list[int]) -> None:
    """Every thread of a process onto `cpus` (threads it starts later
    inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rates", default="20,50,100")
    ap.add_argument("--sessions", default="1,10,50,200")
    ap.add_argument("--against", type=Path, help="another checkout, run in turn with this one")
    ap.add_argument("--windows", help="pacing windows in ms (AGENT_WEB_COALESCE_MS) to run "
                    "this checkout with, in turn; default: its own default")
    ap.add_argument("--pin", action="store_true", help="the server (all its threads) on "
                    "the last CPU, this client and the fake LLM on the others: one core's "
                    "capacity, not shared with its own load")
    ap.add_argument("--lag", action="store_true", help="run the server's loop-lag probe (it "
                    "wakes the loop 100 times a second, which the CPU figure then includes)")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    counts = [int(n) for n in args.sessions.split(",")]
    lag = {"AGENT_WEB_LAG_PROBE": "1"} if args.lag else {}
    codes = {"this": (HERE.parent / "agent_web.py", lag)}
    if args.windows:
        codes = {f"this@{w}ms": (HERE.parent / "agent_web.py",
                                 {**lag, "AGENT_WEB_COALESCE_MS": w})
                 for w in args.windows.split(",")}
    if args.against:
        codes["against"] = (args.against.resolve() / "agent_web.py", lag)
    cpus = sorted(os.sched_getaffinity(0))
    fake = FakeLLMProcess()
    if args.pin:
        pin(os.getpid(), cpus[:-1])
        pin(fake.pid, cpus[:-1])
    servers = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, (script, env) in codes.items():
                (Path(tmp) / name).mkdir()
                servers[name] = ServerProcess(Path(tmp) / name, fake, script=script,
                                              extra_env=env)
                if args.pin:
                    pin(servers[name].proc.pid, cpus[-1:])
            print(f"{'tok/s':>6} {'sessions':>8} {'tokens':>7} {'CPU ms/token':>13} "
                  f"{'p50 ms':>7} {'p99 ms':>7} {'lag p99':>8}  code", flush=True)
            for rate in rates:
                for n in counts:
                    for name, server in servers.items():
                        r = await run(server, n, rate, args.seconds)
                        print(f"{rate:>6g} {n:>8} {r['tokens']:>7} {r['cpu_ms_per_token']:>13.3f}"
                              f" {r['p50']:>7.2f} {r['p99']:>7.2f} {r['lag_p99']:>8.2f}  {name}",
                              flush=True)
        finally:
            fake.close()
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    asyncio.run(main())
