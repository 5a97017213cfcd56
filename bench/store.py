"""The store: events per second committed, and what SQLite costs the event loop.

    python bench/store.py [--events 20000]

In process, no HTTP: the server's own Store (WAL, one writer thread) and
EventLog (group commit, deltas merged per session), fed the way runs feed it.

  deltas    SESSIONS sessions each emit EVENTS/SESSIONS streamed deltas
            without waiting (emit_nowait, as a streaming run does), with a
            `message` awaited every 50 deltas (as when an answer ends).
  awaited   every event awaited before the next (as tool calls and results
            are): one commit per event per session, so this is the floor.

For each: events offered per second (what the runs produced), rows committed
per second, commits, rows per commit, wall time spent in SQLite calls (on the
writer thread), and how many SQLite calls ran on the event-loop thread itself
(the design says none; the figure is counted, not assumed).  The loop's lag
(a 1 ms timer, how late it fires) is printed beside it, then the largest size
the WAL file reached (it restarts after each checkpoint; see Store) and the
number of checkpoints.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import agent_web  # noqa: E402
from agent_web import EventLog, LagProbe, PushRegistry, Store  # noqa: E402


class CountingStore(Store):
    """Store that counts its SQLite calls by the thread they ran on, and
    keeps the largest size its WAL file reached."""

    def __init__(self, path):
        super().__init__(path)
        self.on_loop_thread = self.calls = self.wal_max = 0
        self.loop_thread = threading.get_ident()

    def _write_and_checkpoint(self, conn, fn, *args):
        result = super()._write_and_checkpoint(conn, fn, *args)
        self.wal_max = max(self.wal_max, self._wal_bytes())
        return result

    def _conn(self):
        self.calls += 1
        if threading.get_ident() == self.loop_thread:
            self.on_loop_thread += 1
        return super()._conn()


async def scenario(name: str, sessions: int, events: int, awaited: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = CountingStore(Path(tmp) / "bench.db")
        await store.open()
        registry = PushRegistry()
        log = EventLog(store, registry)
        log.start()
        sids = [f"s_bench{i}" for i in range(sessions)]
        for sid in sids:
            await store.write(Store.create_session, sid, "auto")
        subs = [registry.subscribe(sid) for sid in sids]     # somebody listens, as usual

        async def drain(sub):
            while True:
                await sub.queue.get()
        drains = [asyncio.create_task(drain(s)) for s in subs]
        per = events // sessions
        in_sqlite0, calls0, commits0 = store.seconds_in_sqlite["write"], store.calls, log.commits

        async def run(sid: str) -> None:
            for i in range(per):
                if awaited:
                    await log.emit(sid, {"type": "tool_result", "call_id": f"c{i}", "tool": "bash",
                                         "output": "ok\n", "is_error": False, "duration_ms": 3})
                elif i % 50 == 49:
                    await log.emit(sid, {"type": "message", "role": "assistant",
                                         "message_id": f"m{i}", "content": "x" * 200})
                else:
                    log.emit_nowait(sid, {"type": "delta", "message_id": f"m{i // 50 * 50 + 49}",
                                          "channel": "text", "content": f"tok{i} "})
                    if i % 5 == 4:
                        await asyncio.sleep(0)     # let other runs in, as network reads do

        probe = LagProbe(interval=0.001)
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*[run(sid) for sid in sids])
        await log.flush()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        lag = probe.percentiles()
        await probe.stop()
        rows = sum(s["last_seq"] for s in await store.read(Store.list_sessions))
        commits = log.commits - commits0
        print(f"{name:<8} {sessions:>8} {sessions * per / wall:>14,.0f} {rows / wall:>12,.0f} "
              f"{commits:>8,} {rows / max(1, commits):>9.1f} "
              f"{(store.seconds_in_sqlite['write'] - in_sqlite0) / wall:>10.0%} {cpu / wall:>8.2f} "
              f"{store.calls - calls0:>7,} {store.on_loop_thread:>8} "
              f"{lag['p50']:>7.2f} {lag['p99']:>7.2f} {store.wal_max / 1e6:>7.1f} "
              f"{store.checkpoints:>6}")
        for t in drains:
            t.cancel()
        await log.stop()
        store.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20_000)
    args = p.parse_args()
    print(f"{args.events:,} events per scenario; sqlite {agent_web.sqlite3.sqlite_version}, "
          f"WAL, synchronous=NORMAL\n")
    print(f"{'scenario':<8} {'sessions':>8} {'offered ev/s':>14} {'rows/s':>12} {'commits':>8} "
          f"{'rows/cmt':>9} {'in SQLite':>10} {'CPU':>8} {'calls':>7} {'on loop':>8} "
          f"{'lag p50':>7} {'lag p99':>7} {'WAL MB':>7} {'ckpts':>6}")
    for sessions in (1, 10, 100):
        await scenario("deltas", sessions, args.events, awaited=False)
    for sessions in (1, 10, 100):
        await scenario("awaited", sessions, args.events // 4, awaited=True)
    print("\nin SQLite: wall time the writer thread spent inside sqlite3 calls, "
          "as a share of the scenario's wall time.\nCPU: process CPU seconds per wall "
          "second (all its threads).  on loop: SQLite calls made on the event-loop thread.\n"
          "WAL MB: the largest the WAL file grew.  ckpts: checkpoints the checkpoint thread ran.")


if __name__ == "__main__":
    asyncio.run(main())
