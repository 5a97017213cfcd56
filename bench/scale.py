"""Scale: 1,000 idle subscribed WebSockets, then 100 sessions streaming at once.

    python bench/scale.py [--sockets 1000] [--sessions 100] [--tokens 250] [--rate 50]

Memory: the server's resident size (GET /agent/stats, VmRSS) before and after
opening SOCKETS WebSockets, each subscribed to a session, divided by SOCKETS.
Lag: the server's own event-loop lag probe (a 10 ms timer; how late it fires)
while SESSIONS sessions stream RATE text events a second each with one subscriber
apiece, on top of the idle sockets.  The fake LLM runs in its own process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import httpx  # noqa: E402
import websockets  # noqa: E402
from test_agent_web import TOKEN, FakeLLMProcess, ServerProcess  # noqa: E402


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def proc_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--tokens", type=int, default=250, help="SSE text events per answer")
    p.add_argument("--rate", type=float, default=50, help="SSE events a second per answer")
    args = p.parse_args()
    fake = FakeLLMProcess()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp), fake, extra_env={"AGENT_WEB_LAG_PROBE": "1"})
        h = {"authorization": f"Bearer {TOKEN}"}
        try:
            async with httpx.AsyncClient(headers=h, timeout=60) as c:
                stats = lambda: c.get(server.base + "/agent/stats")  # noqa: E731
                # Sessions that stay idle (for the idle sockets) and sessions
                # that will stream; each first gets one short exchange.
                sids = [(await c.post(server.base + "/agent/chat", json={"message": "say: hi"})
                         ).json()["session_id"] for _ in range(2 * args.sessions)]
                idle_sids, sids = sids[:args.sessions], sids[args.sessions:]
                await asyncio.sleep(1.0)
                # Subscribe after each session's last seq: live events only.
                sessions = (await c.get(server.base + "/agent/sessions")).json()["sessions"]
                last = {s["session_id"]: s["last_seq"] for s in sessions}
                await stats()
                await asyncio.sleep(2.0)
                idle_lag = (await stats()).json()["loop_lag_ms"]
                before = (await stats()).json()["rss_kb"]
                socks = []
                for i in range(args.sockets):
                    ws = await websockets.connect(server.ws_url())
                    sid = idle_sids[i % len(idle_sids)]
                    await ws.send(json.dumps({"type": "subscribe", "session_id": sid,
                                              "after": last[sid]}))
                    await ws.recv()
                    socks.append(ws)
                await asyncio.sleep(1.0)
                after = (await stats()).json()["rss_kb"]
                per_socket = (after - before) * 1024 / args.sockets
                print(f"{args.sockets} idle subscribed WebSockets: server RSS {before / 1024:.1f} MB"
                      f" -> {after / 1024:.1f} MB, {per_socket / 1024:.1f} KB per socket")
                print(f"event-loop lag, idle: p50 {idle_lag['p50']:.2f} ms, p99 {idle_lag['p99']:.2f} ms")

                watchers = []
                for sid in sids:
                    ws = await websockets.connect(server.ws_url())
                    await ws.send(json.dumps({"type": "subscribe", "session_id": sid,
                                              "after": last[sid]}))
                    await ws.recv()
                    watchers.append(ws)

                async def until_done(ws):
                    n = 0
                    while json.loads(await ws.recv())["type"] != "done":
                        n += 1
                    return n

                async def post(sid: str, at: float) -> None:
                    await asyncio.sleep(at)
                    r = await c.post(server.base + "/agent/chat", json={
                        "session_id": sid, "message": f"stream {args.tokens} {args.rate}"})
                    assert r.status_code == 202, r.text

                for name, spread in (("starts spread over 1 s", 1.0),
                                     ("all start at the same instant", 0.0)):
                    s0 = (await stats()).json()         # also resets the probe
                    m0, f0, c0 = machine_busy(), proc_seconds(fake.pid), time.process_time()
                    t0 = time.perf_counter()
                    counts = asyncio.gather(*[until_done(ws) for ws in watchers])
                    await asyncio.gather(*[post(sid, random.uniform(0, spread)) for sid in sids])
                    # Until every run has started plus a moment (new LLM
                    # connections, history reads) and then the steady
                    # streaming are reported apart.
                    await asyncio.sleep(max(0.0, 1.2 - (time.perf_counter() - t0)))
                    s1 = (await stats()).json()
                    frames = sum(await counts)
                    wall = time.perf_counter() - t0
                    m1, f1, c1 = machine_busy(), proc_seconds(fake.pid), time.process_time()
                    s = (await stats()).json()
                    busy = s["process_seconds"] - s0["process_seconds"]
                    print(f"{args.sessions} sessions streaming, {name}: {frames:,} frames in "
                          f"{wall:.1f} s ({frames / wall:,.0f} frames/s)")
                    print(f"  CPU in cores: server {busy / wall:.2f}, fake LLM "
                          f"{(f1 - f0) / wall:.2f}, this client {(c1 - c0) / wall:.2f}; machine "
                          f"{(m1[0] - m0[0]) / max(1, m1[1] - m0[1]):.0%} busy of {os.cpu_count()} cores")
                    for part, lag in (("first 1.2 s", s1["loop_lag_ms"]),
                                      ("after that ", s["loop_lag_ms"])):
                        if not lag["n"]:             # the runs ended within the first part
                            print(f"  event-loop lag, {part}: no samples")
                            continue
                        print(f"  event-loop lag, {part}: p50 {lag['p50']:5.2f} ms, "
                              f"p99 {lag['p99']:6.2f} ms, max {lag['max']:6.2f} ms "
                              f"({lag['n']} samples)")
                print(f"server RSS at the end {s['rss_kb'] / 1024:.1f} MB; tasks {s['tasks']}")
                for ws in socks + watchers:
                    await ws.close()
        finally:
            server.stop()
            fake.close()


if __name__ == "__main__":
    asyncio.run(main())
