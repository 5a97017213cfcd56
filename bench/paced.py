"""What a token costs at a real model's pace (issue 21).

    python bench/paced.py [--seconds 4] [--rates 20,50,100] [--sessions 1,10,50,200]
    python bench/paced.py --against ../before        # another checkout, in turn
    python bench/paced.py --windows 0,12              # this code, per pacing window
    python bench/paced.py --paces 0,30                # this code, per read pacing window
    python bench/paced.py --pin                       # the server alone on CPU 1
    python bench/paced.py --identity                  # the fake's old framing (see below)

Each configuration: SESSIONS sessions at once, each streaming for SECONDS at
RATE tokens a second (a fake LLM in a process of its own, below, writes one
SSE event per token on its schedule and stamps the moment it writes it), one
WebSocket subscriber per session.  Printed per row:

- server CPU per token: the server process's CPU time (all its threads:
  the loop, the SQLite writer, the executor) over the run, divided by the
  tokens delivered to the subscribers;
- added latency p50 / p99: token written by the fake LLM -> its frame at
  the subscriber (both on this machine, one clock);
- p99 steady: of the tokens sent while every session was streaming (the
  runs all started, none ended yet);
- with --lag, the server's event-loop lag p99 (a 10 ms timer,
  AGENT_WEB_LAG_PROBE); its 100 wake-ups a second then count in the CPU
  figure, so CPU and lag are best read from two runs;
- busy: the server's CPU time over the run's wall time, in cores (with
  --pin, 1.00 is its one core full: past that point it is the bottleneck);
  client: this process's and the fake LLM's together, likewise (with --pin
  they share the other cores: near 1.00 per core, the bench is the limit);
- tok/commit: tokens delivered per transaction of the event log.

The client (this process) reads 200 sessions x 100 tokens/s = 20,000 frames
a second at the top row; where it cannot keep up, the latency is partly its
own.  Runs start at random moments within 1 s, as users would.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
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
from test_agent_web import (TOKEN, FakeLLMProcess, ServerProcess, anthropic_sse,  # noqa: E402
                            default_reply, SENT_AT)

SENT = re.compile(r"@(\d+\.\d+)")


# -- A fake LLM that keeps its pace ---------------------------------------------
#
# The tests' FakeLLM is a thread per stream sleeping between tokens: past ~100
# streams at 50 tokens/s its threads fall behind (5,000 tokens/s in all, at
# any number of streams), so the server was offered less than the row says.
# This one is one asyncio loop in a process of its own: the same replies in
# the same Anthropic SSE bytes (the tests' default_reply and anthropic_sse),
# each token written on its schedule (start + i / rate, so a late wake-up is
# caught up, as a real model's server does), stamped as it leaves.  Since
# 2026-12-05 it frames them as the providers' HTTP/1.1 streams are framed
# (Anthropic's, OpenAI's, llama.cpp's and vLLM's servers alike): chunked, a
# chunk a token, on a connection kept alive.  Before, it sent the body until
# it closed the connection, which the client's HTTP layer (h11) hands over
# as one piece per read however many tokens the read carries, a chunk per
# token costing each its own pass through httpcore's and httpx's layers:
# the figures before that date were measured so (`--identity`).

async def _serve_llm_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            identity: bool = False) -> None:
    """Answer requests on one connection, kept alive as a provider's is, each
    answer in chunked transfer encoding, a chunk a token, as the providers'
    HTTP/1.1 streams come (`identity`, the old way: the body until the
    connection closes, which costs the client's HTTP layer less a token)."""
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return                                  # the client closed: done
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            body = json.loads(await reader.readexactly(length))
            reply = default_reply(body, "anthropic")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"cache-control: no-cache\r\n"
                         + (b"connection: close\r\n\r\n" if identity
                            else b"transfer-encoding: chunked\r\n\r\n"))
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i, chunk in enumerate(anthropic_sse(reply)):
                if reply.delay:
                    await asyncio.sleep(start + i * reply.delay - loop.time())
                if SENT_AT in chunk:
                    chunk = chunk.replace(SENT_AT, b"%.6f" % time.time())
                writer.write(chunk if identity else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if identity:
                await writer.drain()
                return
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve_llm(identity: bool) -> None:
    server = await asyncio.start_server(
        functools.partial(_serve_llm_stream, identity=identity), "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def paced_llm(identity: bool = False) -> FakeLLMProcess:
    """`python bench/paced.py --serve-llm` as ServerProcess's `llm`."""
    return FakeLLMProcess([sys.executable, __file__, "--serve-llm"]
                          + (["--identity"] if identity else []))


async def ready_sessions(c: httpx.AsyncClient, servers: list[ServerProcess],
                         n: int) -> list[str]:
    """N new sessions (the i-th on servers[i % len]), each with its first
    answer done, so a bench's runs start on a quiet server."""
    sids = []
    for i in range(n):
        r = await c.post(servers[i % len(servers)].base + "/agent/chat",
                         json={"message": "say: ready"})
        sids.append(r.json()["session_id"])
    for server in servers:
        while (await c.get(server.base + "/agent/stats")).json()["runs"]:
            await asyncio.sleep(0.05)
    return sids


async def subscribe(c: httpx.AsyncClient, server: ServerProcess, sid: str):
    """A WebSocket on `server`, subscribed to `sid` from its newest event."""
    last = (await c.get(server.base + f"/agent/chat?session_id={sid}&tail=1")).json()["last_seq"]
    ws = await websockets.connect(server.ws_url(), max_size=None, max_queue=None)
    await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": last}))
    await ws.recv()
    return ws


async def watch(ws, latencies: list[float], sent: list[float] | None = None) -> None:
    """Until the run's `done`: each token's latency, from the moment the fake
    LLM stamped in it to its frame here, in ms (and in `sent`, that moment)."""
    while True:
        ev = json.loads(await ws.recv())
        if ev.get("type") == "delta":
            now = time.time()
            stamps = [float(s) for s in SENT.findall(ev["content"])]
            latencies.extend((now - s) * 1000 for s in stamps)
            if sent is not None:
                sent.extend(stamps)
        elif ev.get("type") == "done":
            return


def percentile(data: list[float], q: float) -> float:
    """Of sorted `data`."""
    return data[min(len(data) - 1, int(len(data) * q))] if data else float("nan")


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(server: ServerProcess, sessions: int, rate: float, seconds: float,
              fake_pid: int) -> dict:
    tokens = max(1, int(rate * seconds))
    h = {"authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(headers=h, timeout=120, limits=limits) as c:
        sids = await ready_sessions(c, [server], sessions)
        socks = [await subscribe(c, server, sid) for sid in sids]
        latencies = [[] for _ in socks]
        sent = [[] for _ in socks]

        async def start(sid):
            await asyncio.sleep(random.uniform(0, 1.0))
            await c.post(server.base + "/agent/chat",
                         json={"session_id": sid, "message": f"stream {tokens} {rate}"})
        before = (await c.get(server.base + "/agent/stats")).json()   # resets the lag probe
        gc.collect()
        gc.disable()
        began, mine, fakes = time.monotonic(), time.process_time(), cpu_seconds(fake_pid)
        try:
            watchers = [asyncio.ensure_future(watch(ws, latencies[i], sent[i]))
                        for i, ws in enumerate(socks)]
            await asyncio.gather(*[start(sid) for sid in sids])
            await asyncio.gather(*watchers)
        finally:
            gc.enable()
        wall = time.monotonic() - began
        mine, fakes = time.process_time() - mine, cpu_seconds(fake_pid) - fakes
        after = (await c.get(server.base + "/agent/stats")).json()
    for ws in socks:
        await ws.close()
    data = sorted(x for one in latencies for x in one)
    # Steady: tokens sent while every session streamed (all started, none
    # ended): without the first second, when the runs start.
    first, last = max(s[0] for s in sent if s), min(s[-1] for s in sent if s)
    steady = sorted(x for one, when in zip(latencies, sent)
                    for x, t in zip(one, when) if first <= t <= last)
    cpu = after["process_seconds"] - before["process_seconds"]
    return {"tokens": len(data), "cpu_ms_per_token": cpu * 1000 / max(1, len(data)),
            "busy": cpu / wall, "per_commit": len(data) / max(1, after["commits"] - before["commits"]), "client": (mine + fakes) / wall,
            "p50": percentile(data, 0.5), "p99": percentile(data, 0.99),
            "steady": percentile(steady, 0.99), "lag_p99": (after["loop_lag_ms"] or {}).get("p99", float("nan"))}


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
    per_setting = ap.add_mutually_exclusive_group()
    per_setting.add_argument("--windows", help="pacing windows in ms (AGENT_WEB_COALESCE_MS) "
                             "to run this checkout with, in turn; default: its own default")
    per_setting.add_argument("--paces", help="read pacing windows in ms "
                             "(AGENT_WEB_READ_PACE_MS; 0 is off) to run this checkout with, "
                             "in turn; default: its own default")
    ap.add_argument("--pin", action="store_true", help="the server (all its threads) on "
                    "the last CPU, this client and the fake LLM on the others: one core's "
                    "capacity, not shared with its own load")
    ap.add_argument("--threaded-llm", action="store_true", help="the tests' FakeLLM "
                    "(a thread per stream) instead of the paced asyncio one")
    ap.add_argument("--serve-llm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--identity", action="store_true", help="the fake LLM sends each body "
                    "until it closes the connection, not chunked (the figures before "
                    "2026-12-05 were measured so)")
    ap.add_argument("--lag", action="store_true", help="run the server's loop-lag probe (it "
                    "wakes the loop 100 times a second, which the CPU figure then includes)")
    args = ap.parse_args()
    if args.serve_llm:
        return await serve_llm(args.identity)
    rates = [float(r) for r in args.rates.split(",")]
    counts = [int(n) for n in args.sessions.split(",")]
    lag = {"AGENT_WEB_LAG_PROBE": "1"} if args.lag else {}
    codes = {"this": (HERE.parent / "agent_web.py", lag)}
    if args.windows:
        codes = {f"this@{w}ms": (HERE.parent / "agent_web.py",
                                 {**lag, "AGENT_WEB_COALESCE_MS": w})
                 for w in args.windows.split(",")}
    if args.paces:
        codes = {f"this@read{p}ms": (HERE.parent / "agent_web.py",
                                     {**lag, "AGENT_WEB_READ_PACE_MS": p})
                 for p in args.paces.split(",")}
    if args.against:
        codes["against"] = (args.against.resolve() / "agent_web.py", lag)
    cpus = sorted(os.sched_getaffinity(0))
    fake = FakeLLMProcess() if args.threaded_llm else paced_llm(args.identity)
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
                  f"{'p50 ms':>7} {'p99 ms':>7} {'steady':>7} {'lag p99':>8} {'busy':>5} {'client':>6} {'tok/commit':>10}  code", flush=True)
            for rate in rates:
                for n in counts:
                    for name, server in servers.items():
                        r = await run(server, n, rate, args.seconds, fake.pid)
                        print(f"{rate:>6g} {n:>8} {r['tokens']:>7} {r['cpu_ms_per_token']:>13.3f}"
                              f" {r['p50']:>7.2f} {r['p99']:>7.2f} {r['steady']:>7.2f} {r['lag_p99']:>8.2f} {r['busy']:>5.2f} {r['client']:>6.2f} {r['per_commit']:>10.1f}  {name}",
                              flush=True)
        finally:
            fake.close()
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    asyncio.run(main())
