"""Many workers on PostgreSQL (issue 22): events a second and added latency,
1 and 3 workers on PostgreSQL beside 1 on SQLite.

    python bench/workers.py [--sessions 30] [--tokens 200] [--rate 50] [--watchers 1]
    python bench/workers.py --idle 300 [--against ../before]

Each configuration: SESSIONS sessions at once, each streaming TOKENS tokens
at RATE a second (the tests' fake LLM, in a process of its own, stamps each
token with the moment it writes it), WATCHERS WebSocket subscribers per
session.
With W workers (separate `python agent_web.py` processes on one database,
as on W machines) session i runs on worker i mod W and its subscriber
watches from worker i+1 mod W: with 3 workers every token crosses from
one worker to another through PostgreSQL (commit, NOTIFY, the watcher's
read).  Printed per configuration: tokens delivered a second (wall time of
the whole run), events committed a second (GET /agent/stats of each
worker), added latency p50/p99 (token written by the fake LLM -> its frame
at the subscriber), and CPU seconds of the servers and of PostgreSQL.

PostgreSQL is the tests' throwaway cluster (initdb in a temporary folder,
fsync off, as SQLite's synchronous=NORMAL does not sync a commit either);
its binaries come from Debian's postgresql package.  All on this machine,
so the client, the fake LLM, the servers and PostgreSQL share its cores.

--idle N: what N idle subscribers (one per session, nothing streaming) cost
one worker on PostgreSQL over 10 s: its CPU, PostgreSQL's, and the
database's transactions a second (pg_stat_database) -- the lease renewals'
catch-up checks, which with --against run in turn on another checkout.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import httpx  # noqa: E402
from paced import percentile, ready_sessions, subscribe, watch  # noqa: E402
from test_agent_web import TOKEN, FakeLLMProcess, PostgresCluster, ServerProcess  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def postgres_pids(cluster: PostgresCluster) -> list[int]:
    """The postmaster and its children (a backend per connection)."""
    main = int((cluster.dir / "data" / "postmaster.pid").read_text().split()[0])
    kids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and _ppid(p) == main]
    return [main, *kids]


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


async def run(servers: list[ServerProcess], sessions: int, tokens: int, rate: float,
              cluster: PostgresCluster | None, watchers: int = 1) -> dict:
    h = {"authorization": f"Bearer {TOKEN}"}
    n = len(servers)
    async with httpx.AsyncClient(headers=h, timeout=120) as c:
        sids = await ready_sessions(c, servers, sessions)
        # each session watched from the worker after the one running it
        socks = [await subscribe(c, servers[(i + 1) % n], sid)
                 for i, sid in enumerate(sids) for _ in range(watchers)]
        latencies: list[float] = []

        async def start(i, sid):
            await asyncio.sleep(random.uniform(0, 0.5))
            await c.post(servers[i % n].base + "/agent/chat",
                         json={"session_id": sid, "message": f"stream {tokens} {rate}"})

        async def commits():
            total = 0
            for s in servers:
                total += (await c.get(s.base + "/agent/stats")).json().get("commits", 0)
            return total
        pids = [s.proc.pid for s in servers]
        pg = postgres_pids(cluster) if cluster else []
        before = (cpu_seconds(pids), cpu_seconds(pg), await commits())
        started = time.perf_counter()
        watching = [asyncio.ensure_future(watch(ws, latencies)) for ws in socks]
        await asyncio.gather(*[start(i, sid) for i, sid in enumerate(sids)])
        await asyncio.gather(*watching)
        wall = time.perf_counter() - started
        after = (cpu_seconds(pids), cpu_seconds(postgres_pids(cluster) if cluster else []),
                 await commits())
    for ws in socks:
        await ws.close()
    data = sorted(latencies)
    return {"tokens_s": len(data) / wall / watchers, "commits_s": (after[2] - before[2]) / wall,
            "p50": percentile(data, 0.5), "p99": percentile(data, 0.99), "server_cpu": after[0] - before[0],
            "pg_cpu": after[1] - before[1], "tokens": len(data)}


async def idle(server: ServerProcess, sessions: int, cluster: PostgresCluster) -> dict:
    h = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(headers=h, timeout=120) as c:
        sids = await ready_sessions(c, [server], sessions)
        socks = [await subscribe(c, server, sid) for sid in sids]

    def transactions() -> int:
        rows = server.sql("SELECT xact_commit FROM pg_stat_database "
                          "WHERE datname = current_database()")
        return rows[0][0]
    await asyncio.sleep(2)
    pg = postgres_pids(cluster)
    before = (cpu_seconds([server.proc.pid]), cpu_seconds(pg), transactions(), time.time())
    await asyncio.sleep(10)
    await asyncio.sleep(1.5)         # PostgreSQL's statistics lag by up to a second
    after = (cpu_seconds([server.proc.pid]), cpu_seconds(postgres_pids(cluster)),
             transactions(), time.time() - 1.5)
    for ws in socks:
        await ws.close()
    wall = after[3] - before[3]
    return {"server": (after[0] - before[0]) / wall, "pg": (after[1] - before[1]) / wall,
            "xacts": (after[2] - before[2]) / wall}


async def idle_main(args) -> None:
    cluster = PostgresCluster()
    codes = {"this": HERE.parent / "agent_web.py"}
    if args.against:
        codes["against"] = args.against.resolve() / "agent_web.py"
    print(f"{args.idle} idle subscribers on one worker (lease 10 s, renewed every 2.5 s)")
    print(f"{'code':>8} {'server CPU %':>12} {'PG CPU %':>8} {'PG transactions/s':>17}")
    try:
        for name, script in codes.items():
            with tempfile.TemporaryDirectory() as tmp:
                server = ServerProcess(Path(tmp), None, db=cluster.database(), script=script)
                try:
                    r = await idle(server, args.idle, cluster)
                finally:
                    server.stop()
            print(f"{name:>8} {r['server'] * 100:>12.1f} {r['pg'] * 100:>8.1f} "
                  f"{r['xacts']:>17.1f}", flush=True)
    finally:
        cluster.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--watchers", type=int, default=1, help="subscribers per session")
    ap.add_argument("--idle", type=int, help="N idle subscribers instead (see above)")
    ap.add_argument("--against", type=Path, help="another checkout: with --idle in turn "
                    "with this one, else instead of it")
    args = ap.parse_args()
    if args.idle:
        return await idle_main(args)
    script = (args.against.resolve() if args.against else HERE.parent) / "agent_web.py"
    fake = FakeLLMProcess()
    cluster = PostgresCluster()
    print(f"{args.sessions} sessions x {args.tokens} tokens at {args.rate:g}/s, "
          f"{args.watchers} subscriber(s) each on {os.cpu_count()} CPUs", flush=True)
    print(f"{'store':>10} {'workers':>7} {'tokens/s':>9} {'commits/s':>9} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'server CPU s':>12} {'PG CPU s':>8}", flush=True)
    try:
        for store, workers in (("sqlite", 1), ("postgresql", 1), ("postgresql", 3)):
            with tempfile.TemporaryDirectory() as tmp:
                db = cluster.database() if store == "postgresql" else None
                servers = []
                try:
                    for i in range(workers):
                        (Path(tmp) / f"w{i}").mkdir()
                        servers.append(ServerProcess(Path(tmp) / f"w{i}", fake, db=db,
                                                     script=script))
                    r = await run(servers, args.sessions, args.tokens, args.rate,
                                  cluster if db else None, args.watchers)
                finally:
                    for s in servers:
                        s.stop()
            print(f"{store:>10} {workers:>7} {r['tokens_s']:>9.0f} {r['commits_s']:>9.0f} "
                  f"{r['p50']:>7.2f} {r['p99']:>7.2f} {r['server_cpu']:>12.2f} "
                  f"{r['pg_cpu']:>8.2f}", flush=True)
    finally:
        fake.close()
        cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
