"""The session search: what one search costs the reader thread.

    python bench/search.py [--sessions 5000] [--events 400] [--against DIR]

A database of SESSIONS sessions of EVENTS events each, as streaming makes
them: one `message` (a user's or an answer's, ~60 words) in twenty events,
the rest streamed deltas (~12 words).  It is opened by the server's own
Store (which makes whatever index its schema.sql names: the first start on a
database made before it, timed), then `GET /agent/sessions?q=TEXT&limit=100`'s
query runs on the reader thread for texts:

  rare      a word in no message: every session is looked at
  sparse    a word in one session in a hundred
  common    a word in nearly every message: the first page fills at once
  short     two letters, in many messages

Each figure is the best of five, in ms, and beside it (after "+") what
saying where the text is in each session found costs (`Store.found_in`, a
second read the route makes), where the code has it.  --against DIR runs the same on
another checkout's code (say `git worktree add ../before HEAD~1`), on a copy
of the same database.  --postgres: the same rows in PostgreSQL instead (the
tests' throwaway cluster, a database for each code; "open" is then making
the tables, before the rows are copied in).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a model file agent run tool list read write python server page token "
         "stream build test fix error output value class method return import").split()
TEXTS = {"rare": "xylophone", "sparse": "quasar", "common": "model", "short": "ab"}


def build(path: Path, web, sessions: int, events: int) -> None:
    """Rows written straight to SQLite, in the shape Store.append gives them."""
    db = sqlite3.connect(path)
    db.executescript(web.schema("sqlite"))
    rng = random.Random(20261205)
    for s in range(sessions):
        sid = f"s{s:06d}"
        db.execute("INSERT INTO sessions (id, title, created_at, updated_at) VALUES (?,?,?,?)",
                   (sid, f"session {s}", s, s))
        rows = []
        for seq in range(1, events + 1):
            if seq % 20 == 1:
                words = [rng.choice(WORDS) for _ in range(60)]
                if s % 100 == 7 and seq == 1:
                    words[5] = "quasar"
                if rng.random() < 0.3:
                    words[9] = "abc"
                ev = {"type": "message", "role": "user" if seq % 40 == 1 else "assistant",
                      "content": " ".join(words)}
            else:
                ev = {"type": "delta", "message_id": f"m{seq // 20}", "channel": "text",
                      "content": " ".join(rng.choice(WORDS) for _ in range(12))}
            rows.append((sid, seq, ev["type"],
                         json.dumps({"seq": seq, "session_id": sid, **ev, "ts": 1.0})))
        db.executemany("INSERT INTO events VALUES (?,?,?,?)", rows)
    db.execute("DROP INDEX IF EXISTS events_message_text")   # a database made before it
    db.commit()
    db.close()


async def _timed(awaitable) -> float:
    started = time.perf_counter()
    await awaitable
    return time.perf_counter() - started


def copy_to_postgres(base: Path, dsn: str) -> None:
    import psycopg
    src = sqlite3.connect(base)
    with psycopg.connect(dsn, autocommit=True) as pg, pg.cursor() as cur:
        for table, columns in (("sessions", "id, title, status, approve_mode, created_at, "
                                            "updated_at"),
                               ("events", "session_id, seq, type, data")):
            with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in src.execute(f"SELECT {columns} FROM {table}"):
                    copy.write_row(row)
        cur.execute("ANALYZE")


def measure(folder: Path, path: Path, label: str, dsn: str | None = None) -> None:
    sys.path.insert(0, str(folder))
    for name in ("agent_core", "agent_web"):
        sys.modules.pop(name, None)
    web = importlib.import_module("agent_web")
    sys.path.pop(0)

    async def go():
        store = web.PgStore(dsn, "bench") if dsn else web.Store(path)
        started = time.perf_counter()
        await store.open()
        opened = time.perf_counter() - started
        if dsn:
            copy_to_postgres(path, dsn)
        times = {}
        for name, text in TEXTS.items():
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                found = await store.read(web.Store.list_sessions, text, 101)
                best = min(best, time.perf_counter() - started)
            where = float("nan")
            if hasattr(web.Store, "found_in"):
                ids = [s["session_id"] for s in found]
                where = min([await _timed(store.read(web.Store.found_in, ids, text))
                             for _ in range(5)])
            times[name] = (best * 1000, where * 1000, len(found))
        store.close()
        return opened, times
    opened, times = asyncio.run(go())
    print(f"{label:8} {opened * 1000:9.0f}  " + "  ".join(
        f"{ms:6.1f} +{where:5.1f} ({n:3})" for ms, where, n in times.values()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=5000)
    ap.add_argument("--events", type=int, default=400)
    ap.add_argument("--against", type=Path)
    ap.add_argument("--postgres", action="store_true")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.db"
        sys.path.insert(0, str(here))
        import agent_web as web
        sys.path.pop(0)
        started = time.perf_counter()
        build(base, web, args.sessions, args.events)
        print(f"{args.sessions:,} sessions x {args.events} events built in "
              f"{time.perf_counter() - started:.0f} s; best of 5, ms (sessions found)")
        print(f"{'code':8} {'open ms':>9}  " + "  ".join(
            f"{name + ' ' + repr(text):>20}" for name, text in TEXTS.items()))
        cluster = None
        if args.postgres:
            sys.path.insert(0, str(here))
            from test_agent_web import PostgresCluster
            sys.path.pop(0)
            cluster = PostgresCluster()
        try:
            for folder, label in [(here, "this")] + (
                    [(args.against.resolve(), "against")] if args.against else []):
                if cluster:
                    measure(folder, base, label, cluster.database())
                    continue
                copy = Path(tmp) / f"{label}.db"
                shutil.copy(base, copy)
                measure(folder, copy, label)
                copy.unlink()
        finally:
            if cluster:
                cluster.close()


if __name__ == "__main__":
    main()
