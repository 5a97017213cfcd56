"""agent_web.py — Mini Agent in the browser: an ASGI app, a SQLite event log, WebSocket push.

What this is
    A hand-written ASGI application (no web framework) that runs the agent of
    `agent_core.py` on the server and lets any number of browser tabs watch and
    steer it.  Runs belong to the server, not to a request or a socket: close
    every tab, refresh, open a second one, restart the server — not one step
    is lost, because every event is committed to SQLite before anyone sees it.

How to run it
    python agent_web.py                   # prints http://127.0.0.1:8765/?token=...
    uvicorn agent_web:app --ws wsproto    # the module-level app, configured from env
    # or mount it in your own Starlette/FastAPI app:
    #   Mount("/agent-ui", app=agent_web.create_app(db_path="agent.db"))

How one message flows through this file
    1. `POST /agent/chat` → `AgentWebApp.post_chat` checks the body, reserves the
       session's one run slot in `RunManager` (409 if taken) and hands the
       user's text to `RunManager.begin`, which stores it as the session's
       next event, reads the conversation back (`read_conversation`) and
       starts the run (`RunManager.start`).
    2. The run is an asyncio task (`RunManager._drive`) iterating
       `agent_core.Agent.run()`.  Each event it yields goes to `EventLog`.
    3. `EventLog` is the only writer: it batches pending events (a streamed
       `delta` joins its session's pending delta of the same message, a
       command's `tool_output` its pending output of the same call), commits
       them in one SQLite transaction on the store's writer thread
       (`Store.append`), which assigns `seq`, and only then publishes each
       stored event to `PushRegistry`.
    4. `PushRegistry` puts the event's JSON text on a bounded `asyncio.Queue`
       per subscribed WebSocket; that socket's writer task sends it.  A queue
       that overflows is closed with 4008; the page resubscribes from its last
       `seq` and catches up from the store.
    5. A subscriber registers its queue first, then replays the store after
       its `after`, then drains the queue skipping what it already sent: every
       event exactly once, stored and live joined with no gap.

What this is not
    A multi-user service.  One token guards one user's agent, which runs shell
    commands on this machine.  Keep it on loopback (the default).

Sections, in reading order: configuration → errors → store → event log →
push registry → runs → many workers (PostgreSQL) → HTTP helpers → security
→ the app (handlers, WebSocket) → route table → create_app → main.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import functools
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import sqlite3
import sys
import threading
import time
import traceback
import urllib.parse
import webbrowser
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

try:
    import fcntl                      # POSIX: the one-server-per-database lock
except ImportError:                   # pragma: no cover (Windows: no lock)
    fcntl = None

import agent_core as core

log = logging.getLogger("agent_web")

# Compact UTF-8 JSON, the wire format of every event and response.  One encoder
# built once: json.dumps() with options builds a new one on every call, which
# showed up in profiles of the store's writer thread.
to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_json_str = json.encoder.encode_basestring       # one str as JSON, as to_json writes it
# The keys of a streamed delta as the event log stores it, in order.
DELTA_KEYS = ("type", "ts", "message_id", "channel", "content")


def event_json(seq: int, session_id: str, event: dict) -> str:
    """An event as stored and pushed: to_json({"seq", "session_id", **event}).

    Streamed deltas, most events by far, are written from a template: 0.9
    instead of 2.4 us each, out of the ~11 us it takes to produce an event
    (see bench/RESULTS.md).  The text is the same, byte for byte (a test
    compares them).
    """
    if event["type"] == "delta" and tuple(event) == DELTA_KEYS:
        text = ('{"seq":%d,"session_id":%s,"type":"delta","ts":%r,"message_id":%s,'
                '"channel":%s,"content":%s}' % (
                    seq, _json_str(session_id), event["ts"], _json_str(event["message_id"]),
                    _json_str(event["channel"]), _json_str(event["content"])))
    else:
        text = to_json({"seq": seq, "session_id": session_id, **event})
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Text that slipped past core.storable(): escaped, so this one
            # event still stores and never fails the batch it is in.
            text = json.dumps({"seq": seq, "session_id": session_id, **event},
                              separators=(",", ":"))
    return text

# =============================================================================
# Configuration
# =============================================================================

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
SCHEMA_PATH = HERE / "schema.sql"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_DB = "agent_web.db"
DEFAULT_WORKSPACE = "workspace"

MAX_BODY_BYTES = 1 << 20            # any HTTP body; more is 413
BODY_TIMEOUT = 30.0                 # seconds for a whole body to arrive; slower is 408
MAX_UPLOAD_BYTES = 25 << 20         # PUT /agent/files/raw
UPLOAD_TIMEOUT = 300                # seconds for a whole upload to arrive
DOWNLOAD_PIECE = 256 << 10          # bytes read and sent at a time
MAX_TITLE_CHARS = 200               # a session's title, and a search's text
MAX_SESSION_PAGE = 1_000           # GET /agent/sessions?limit=, at most
FILES_LISTED = 1_000               # GET /agent/files: entries of a folder, at most
MAX_CONNECTIONS = 1_000             # python agent_web.py: uvicorn answers 503 past this
                                    # (AGENT_WEB_MAX_CONNECTIONS)
MAX_MESSAGE_CHARS = 100_000         # one user message; more is 413
MAX_WS_FRAME_BYTES = 64 * 1024      # one client WebSocket frame; more closes 1009
SUBSCRIBER_QUEUE_SIZE = 2_000       # events a socket may fall behind before 4008
REPLAY_CHUNK = 1_000                # events read from the store per replay query
FAN_OUT_CHUNK = 256                 # ... per read for all of a session's subscribers
WAL_CHECKPOINT_BYTES = 8_000_000    # a WAL this big is copied back (see checkpoints)
HISTORY_LIMIT_DEFAULT = 1_000       # GET /agent/chat page size when none is given
HISTORY_LIMIT_MAX = 5_000
SHUTDOWN_GRACE = 5.0                # seconds runs get to write `interrupted`

TOKEN_COOKIE = "agent_web_token"    # + "_<port>", so two servers on one host coexist
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
DECISIONS = ("allow", "deny", "allow_always")   # allow_always: the rest of the session

# WebSocket close codes we use (4000-4999 are the application's own).
CLOSE_TOO_BIG = 1009                # a client frame over MAX_WS_FRAME_BYTES
CLOSE_SLOW_CONSUMER = 4008          # the subscriber's queue overflowed: resubscribe
CLOSE_SESSION_DELETED = 4004        # the subscribed session was deleted (after a frame saying so)

# The page may only load our own files; model output never becomes HTML, and
# no inline script exists, so a strict policy costs nothing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store")]
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png",
                ".svg": "image/svg+xml", ".ico": "image/x-icon", ".json": "application/json"}

# Which events move a session between idle / running / awaiting_approval.
STATUS_AFTER = {"approval_request": "awaiting_approval", "approval": "running",
                "done": "idle"}            # and a user `message`: running
# Fragments of a stream, superseded by a later event (a `message`, a
# `tool_result`).  They are not awaited and merge while a commit is in
# flight; they change nothing in the session's row and are not needed to
# rebuild the conversation.
STREAMED = frozenset({"delta", "tool_output"})
# How a background command's start reads in its tool_result (agent_core's BackgroundJobs).
BACKGROUND_STARTED = re.compile(re.escape(core.BACKGROUND_STARTED) + r"(bash_\w+)")


# =============================================================================
# Errors
# =============================================================================

class HTTPError(Exception):
    """Raised anywhere in a handler; turned into a JSON error response in one place."""

    def __init__(self, status: int, code: str, message: str, headers: list | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or []


# =============================================================================
# Store: SQLite, WAL, a writer thread, a reader thread, a checkpoint thread
# =============================================================================
#
# sqlite3 calls block, so none runs on the event loop.  All writes go through
# one thread with one connection (SQLite allows one writer anyway; a single
# thread makes "seq = the session's last + 1" atomic without retries, and
# lets its connection remember each session's last seq instead of asking).
# Reads use a second connection on its own thread: in WAL mode a reader never
# waits for the writer, and a big history read never delays a commit.  A
# third copies the WAL back into the database file, beside the writer (see
# checkpoints).

def schema(store: str) -> str:
    """schema.sql's part for a store: "sqlite" (above the `-- @postgresql`
    line) or "postgresql" (below it)."""
    lines = SCHEMA_PATH.read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith("-- @postgresql"))
    return "".join(lines[:cut] if store == "sqlite" else lines[cut + 1:])


def _chunks(seq: list, size: int):
    """`seq` in slices of `size`: one SQL statement takes only so many values."""
    return (seq[k:k + size] for k in range(0, len(seq), size))


class _Connection(sqlite3.Connection):
    """A connection that remembers the last seq of each session whose run
    it is writing (it forgets a session at its run's `done`).

    Only the writer's connection uses it: as it is the only one that adds
    events, what it wrote last is each session's last seq, with no query.
    (Should another process write the same file, `Store.append` finds out.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_seq: dict[str, int] = {}


class StoreUnavailable(HTTPError):
    """SQLite could not write: the disk is full, the file is locked past the
    busy timeout, an I/O error.  Not the request's fault and not for ever:
    503 with Retry-After, and the server carries on once the store does."""

    RETRY_AFTER = 5

    def __init__(self, exc: sqlite3.Error):
        text = str(exc)
        # Full or locked: every write fails alike, so none is tried alone.
        self.whole_store = any(word in text for word in ("full", "locked", "busy"))
        if "full" in text:
            why = "the disk is full (or the database reached its size limit)"
        elif "locked" in text or "busy" in text:
            why = "the database is locked by another program"
        else:
            why = f"the database failed ({text})"
        super().__init__(503, "store_unavailable", f"cannot store events: {why}; "
                         "nothing was lost that was shown, try again shortly",
                         [("retry-after", str(self.RETRY_AFTER))])


class DatabaseInUse(HTTPError):
    """Another live process serves this SQLite database (see DatabaseLock).
    A 503 for a mounted app's request; a one-line start-up failure otherwise."""

    def __init__(self, message: str, code: str = "database_in_use"):
        super().__init__(503, code, message)


class DatabaseUnreachable(DatabaseInUse):
    """The PostgreSQL database named cannot be reached at start-up: told in
    one line, as above (a mounted app's request: 503 database_unreachable)."""

    def __init__(self, dsn: str, exc: BaseException):
        super().__init__(f"cannot reach the database {db_label(dsn)}: "
                         f"{str(exc).splitlines()[0]}", "database_unreachable")


class DatabaseLock:
    """One server process per SQLite database.

    A second process on the same file would take the first one's live runs
    for leftovers of a crash: its start-up recovery writes `interrupted` into
    sessions still streaming, and both then write the same runs.  So a
    server holds an exclusive flock on `<db>.lock` from before its first
    write to its exit, with its pid and command line in it for the message
    the next one prints.  The kernel drops a flock when its process dies, so
    a crash (even SIGKILL) never leaves a stale lock behind.  (Many processes
    on one database are PostgreSQL's job, not SQLite's.)"""

    def __init__(self, db_path: str | Path):
        self.db_path = str(db_path)
        self.path = self.db_path + ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        if (self.fd is not None or self.db_path == ":memory:" or fcntl is None
                or is_postgres(self.db_path)):
            return            # held already; nothing shared; not POSIX; many workers
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 500, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseInUse(
                f"the database {Path(self.db_path).resolve()} is in use by process {holder}; "
                "one server per SQLite database: stop that one, or give this one --db "
                "ANOTHER.db") from None
        cmdline = " ".join([Path(sys.executable).name, *sys.argv])[:300]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} ({cmdline})\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        # The file stays: removing it could let a third process lock a new
        # file while a second one still waits on the old.
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def excerpt(content: str, text: str, before: int = 40, after: int = 80) -> dict:
    """The words around `text` in `content`, found as LIKE finds it (case-
    blind for ASCII only, so lowering keeps every index in place):
    {"before", "text", "after"}, each plain text, cut with "…", white space
    run together.  Not found that way (PostgreSQL's ILIKE is case-blind
    beyond ASCII): the message's start, with no text marked."""
    at = content.translate(_ASCII_LOWER).find(text.translate(_ASCII_LOWER))
    size = len(text) if at >= 0 else 0
    at = max(at, 0)
    start, end = max(0, at - before), at + size + after
    squeeze = functools.partial(re.sub, r"\s+", " ")
    return {"before": ("…" if start > 0 else "") + squeeze(content[start:at]).lstrip(),
            "text": content[at:at + size],
            "after": squeeze(content[at + size:end]).rstrip()
            + ("…" if end < len(content) else "")}


def _like_escaped(text: str) -> str:
    """`text` as a LIKE pattern that matches only itself (with ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Store:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="agent-web-db-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="agent-web-db-read")
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="agent-web-db-checkpoint")
        self._pools = {"write": self._writer, "read": self._reader}      # by _run's kind
        self._local = threading.local()
        # Set by the checkpoint thread, read by the writer (see checkpoints).
        self._checkpointing = self._catch_up = False
        self.checkpoints = 0
        # For bench/ and GET /agent/stats: seconds inside sqlite3 calls, per
        # thread.  One counter each, only ever added to by its own thread.
        self.seconds_in_sqlite = {"write": 0.0, "read": 0.0, "checkpoint": 0.0}

    # -- plumbing -------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   factory=_Connection)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.executescript(schema("sqlite"))
            # No checkpoint inside a commit: SQLite's own runs in the commit
            # that takes the WAL past 1,000 pages, copies the WAL into the
            # database and syncs the disk, which made that commit (and the
            # frames waiting on it) several ms late.  The checkpoint thread
            # does it instead (see checkpoints).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            # A restarted WAL is written over from the top, and its file is
            # cut back to this size only: writing over a file's blocks costs
            # less than growing it again (cutting 30 MB of them once took
            # 10 ms inside a commit).
            conn.execute(f"PRAGMA journal_size_limit = {WAL_CHECKPOINT_BYTES}")
            self._local.conn = conn
        return conn

    async def _run(self, kind: str, fn: Callable, *args) -> Any:
        def timed():
            started = time.perf_counter()
            try:
                return fn(self._conn(), *args)
            finally:
                self.seconds_in_sqlite[kind] += time.perf_counter() - started
        return await asyncio.get_running_loop().run_in_executor(self._pools[kind], timed)

    async def write(self, fn: Callable, *args) -> Any:
        try:
            return await self._run("write", self._write_and_checkpoint, fn, *args)
        except sqlite3.IntegrityError:
            raise                           # a bug or a race of ours, not the store's state
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
            raise StoreUnavailable(exc) from exc

    # -- checkpoints ------------------------------------------------------------
    # A WAL only grows until a checkpoint has copied *all* of it back into the
    # database: the next write transaction then starts it again from the top.
    # A checkpoint beside a busy writer never copies all of it, since commits
    # land while it works, so on its own the WAL would grow without end.
    # Hence two steps, once the WAL file grows past WAL_CHECKPOINT_BYTES
    # (which, as the file is kept at that size, is when the WAL itself does):
    #   1. the checkpoint thread copies the bulk and syncs the disk, beside the
    #      writer (the slow part, which SQLite's own did inside a commit);
    #   2. the writer, before its next write, copies the few pages committed
    #      meanwhile, so that write restarts the WAL.
    # Step 2 and the restart sync the disk on the writer thread (~3 ms here,
    # all of it fsync): the bigger the WAL, the rarer they are.
    def _write_and_checkpoint(self, conn, fn: Callable, *args) -> Any:
        """On the writer thread."""
        if self._catch_up:
            self._catch_up = False
            try:
                Store.checkpoint(conn)                                   # step 2
            except sqlite3.Error as exc:    # the write itself may still succeed
                log.error("WAL checkpoint failed: %s", exc)
        result = fn(conn, *args)
        if (not (self._checkpointing or self._catch_up)
                and self._wal_bytes() > WAL_CHECKPOINT_BYTES):
            self._checkpointing = True
            try:
                self._checkpointer.submit(self._checkpoint_beside)         # step 1
            except RuntimeError:             # closing: the last close checkpoints
                pass
        return result

    def _checkpoint_beside(self) -> None:
        """On the checkpoint thread."""
        started = time.perf_counter()
        try:
            # Twice: the first pass copies the bulk, and what was committed
            # while it ran (~10 ms) is left for the second, not for step 2.
            conn = self._conn()
            Store.checkpoint(conn)
            Store.checkpoint(conn)
            self.checkpoints += 1
        except sqlite3.Error as exc:        # step 2 copies it all anyway
            log.error("WAL checkpoint failed: %s", exc)
        finally:
            self.seconds_in_sqlite["checkpoint"] += time.perf_counter() - started
            # In this order: the writer never sees both False before step 2,
            # so it cannot start another step 1 first.
            self._catch_up = True
            self._checkpointing = False

    def _wal_bytes(self) -> int:
        try:
            return os.stat(self.path + "-wal").st_size
        except OSError:
            return 0

    def read(self, fn: Callable, *args) -> Awaitable:
        return self._run("read", fn, *args)

    async def open(self) -> None:
        await self.write(lambda conn: None)      # creates the file and the tables
        await self.read(lambda conn: None)

    def close(self) -> None:
        # The writer's connection goes last: closing the last connection
        # checkpoints the whole WAL into the database file.
        for pool in (self._checkpointer, self._reader, self._writer):
            pool.submit(self._close_thread_conn).result()
            pool.shutdown(wait=True)

    def _close_thread_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @staticmethod
    def checkpoint(conn) -> None:
        # PASSIVE: never waits for the writer or a reader, nor makes them wait.
        # fetchall() runs the statement to its end at once: one left open holds
        # a read snapshot, and a snapshot held keeps the WAL from restarting.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # -- writes (run on the writer thread) -------------------------------------
    @staticmethod
    def create_session(conn, session_id: str, approve_mode: str) -> None:
        now = time.time()
        conn.execute("INSERT INTO sessions (id, approve_mode, created_at, updated_at) "
                     "VALUES (?, ?, ?, ?)", (session_id, approve_mode, now, now))

    @staticmethod
    def fork_session(conn, source: str, new_id: str, before_seq: int, title: str) -> bool:
        """A new session holding `source`'s events before `before_seq`, in
        one transaction (their seqs stay as they were: 1..before_seq-1)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT approve_mode FROM sessions WHERE id = ?",
                               (source,)).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                return False
            now = time.time()
            conn.execute("INSERT INTO sessions (id, approve_mode, title, created_at, updated_at)"
                         " VALUES (?, ?, ?, ?, ?)", (new_id, row[0], title, now, now))
            conn.execute("INSERT INTO events (session_id, seq, type, data) "
                         "SELECT ?, seq, type, json_set(data, '$.session_id', ?) FROM events "
                         "WHERE session_id = ? AND seq < ? ORDER BY seq",
                         (new_id, new_id, source, before_seq))
            conn.execute("COMMIT")
            return True
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def append(conn, items: list[tuple[str, dict]]) -> list[tuple[int, str] | None]:
        """Store events in one transaction; returns (seq, wire JSON) for each.

        `None` for an event whose session no longer exists (deleted mid-run).
        """
        try:
            return Store._append(conn, items)
        except sqlite3.IntegrityError:
            # A seq already taken: another connection added events behind
            # the writer's back (a second process, a hand-made fix), so what
            # it remembers is stale.  Forget it and ask the database.
            conn.last_seq.clear()
            return Store._append(conn, items)

    @staticmethod
    def _effects(items: list[tuple[str, dict]]) -> tuple[dict, list, list]:
        """What a batch does: each session's events in their order (seq is
        per session; the order between sessions means nothing), the changes
        to session rows, and the sessions whose run ends here."""
        by_session: dict[str, list[int]] = {}
        for i, (session_id, _) in enumerate(items):
            by_session.setdefault(session_id, []).append(i)
        # Only events other than streamed fragments touch the session's row:
        # a commit of streamed text (most commits) then writes no page but its
        # events' own, a third fewer bytes into the WAL (see Performance).
        changes = []                        # (id, new status or None, title)
        ended = []                          # sessions whose run ends here
        for session_id, indexes in by_session.items():
            status, title, touched = None, "", False
            for i in indexes:
                ev = items[i][1]
                if ev["type"] in STREAMED:
                    continue
                touched = True
                if ev["type"] == "message" and ev.get("role") == "user":
                    status = "running"
                    title = title or " ".join(ev["content"].split())[:80]
                elif ev["type"] in STATUS_AFTER:
                    status = STATUS_AFTER[ev["type"]]
                if ev["type"] == "done":
                    ended.append(session_id)
            if touched:
                changes.append((session_id, status, title))
        return by_session, changes, ended

    @staticmethod
    def _append(conn, items: list[tuple[str, dict]]) -> list[tuple[int, str] | None]:
        by_session, changes, ended = Store._effects(items)
        # As few sqlite3 calls as possible: each one lets go of the GIL and
        # must win it back from the busy event-loop thread (~0.1 ms each
        # under load).  The usual commit, streamed text of sessions this
        # connection wrote to before, is one INSERT, which SQLite commits on
        # its own: one call.  Otherwise one transaction: one SELECT for the
        # sessions it does not know yet, one UPDATE unless all are streamed
        # fragments, one multi-row INSERT.
        known: dict[str, int] = conn.last_seq
        last_seq = {sid: known[sid] for sid in by_session if sid in known}
        results: list[tuple[int, str] | None] = [None] * len(items)
        if (len(last_seq) == len(by_session) and not changes
                and len(items) <= Store.ROWS_PER_STATEMENT):
            Store._insert(conn, Store._rows(items, by_session, last_seq, results))
        else:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Read inside this write transaction, so no other writer can
                # take the same numbers; a deleted session has no row and so
                # no entry.
                unknown = [sid for sid in by_session if sid not in last_seq]
                for chunk in _chunks(unknown, Store.IDS_PER_STATEMENT):
                    last_seq.update(conn.execute(
                        f"SELECT id, {Store.LAST_SEQ} FROM sessions WHERE id IN "
                        "(" + ",".join("?" * len(chunk)) + ")", chunk))
                for chunk in _chunks(changes, Store.ROWS_PER_STATEMENT):
                    conn.execute(
                        "UPDATE sessions SET updated_at = ?, "
                        "status = COALESCE(v.column2, status), "
                        "title = CASE WHEN title = '' THEN v.column3 ELSE title END "
                        "FROM (VALUES " + ",".join(["(?,?,?)"] * len(chunk)) + ") AS v "
                        "WHERE sessions.id = v.column1",
                        [time.time(), *(value for change in chunk for value in change)])
                Store._insert(conn, Store._rows(items, by_session, last_seq, results))
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk does):
                # a second ROLLBACK would hide the error that matters.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        # Only once committed: a transaction rolled back numbered nothing.
        for session_id, seq in last_seq.items():
            known[session_id] = seq + len(by_session[session_id])
        # A run's `done` is its session's last event until the next message,
        # which commits as a transaction and reads the seq anyway: remember
        # only sessions with a run going, not every session since start-up.
        for session_id in ended:
            known.pop(session_id, None)
        return results

    @staticmethod
    def _rows(items, by_session, last_seq, results) -> list[tuple]:
        """Number each live session's events on from its last seq; fills
        `results` with (seq, wire JSON) and returns the rows to insert."""
        rows = []
        for session_id, indexes in by_session.items():
            if session_id not in last_seq:
                continue                # deleted while its run was still going
            seq = last_seq[session_id]
            for i in indexes:
                seq += 1
                ev = items[i][1]
                text = event_json(seq, session_id, ev)
                rows.append((session_id, seq, ev["type"], text))
                results[i] = (seq, text)
        return rows

    @staticmethod
    def _insert(conn, rows: list[tuple]) -> None:
        for chunk in _chunks(rows, Store.ROWS_PER_STATEMENT):
            conn.execute("INSERT INTO events (session_id, seq, type, data) VALUES "
                         + ",".join(["(?,?,?,?)"] * len(chunk)),
                         [value for row in chunk for value in row])

    # A session's last seq is not stored: it is its newest event's, found by
    # one step down the events' primary key.  Storing it meant rewriting the
    # session's row, and its `updated_at` index entry, on every commit.
    LAST_SEQ = ("(SELECT coalesce(max(seq), 0) FROM events "
                "WHERE events.session_id = sessions.id)")
    # Values per statement, under SQLite's oldest limit of 999: ids one
    # each; rows up to 4 each (800), session changes 3 each plus the time.
    IDS_PER_STATEMENT = 900
    ROWS_PER_STATEMENT = 200

    @staticmethod
    def set_approve_mode(conn, session_id: str, mode: str) -> bool:
        return conn.execute("UPDATE sessions SET approve_mode = ? WHERE id = ?",
                            (mode, session_id)).rowcount == 1

    @staticmethod
    def delete_session(conn, session_id: str) -> bool:
        conn.last_seq.pop(session_id, None)     # a run still going finds it gone
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM events WHERE session_id = ?", (session_id,))
        gone = conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount
        conn.execute("COMMIT")
        return gone == 1

    # -- reads (run on the reader thread) --------------------------------------
    # A session's messages holding a LIKE pattern (ESCAPE '\\'), for the
    # search: through the messages' own index, which SQLite's planner does
    # not pick itself (schema.sql).  {} is the session: "?" or a column.
    MESSAGES_HOLDING = ("FROM events INDEXED BY events_message_text "
                        "WHERE session_id = {} AND type = 'message' "
                        "AND json_extract(data, '$.content') LIKE ? ESCAPE '\\'")

    SESSION_COLUMNS = f"id, title, status, approve_mode, created_at, updated_at, {LAST_SEQ}"

    @staticmethod
    def _session_row(row) -> dict | None:
        if row is None:
            return None
        keys = ("session_id", "title", "status", "approve_mode", "created_at",
                "updated_at", "last_seq")
        return dict(zip(keys, row))

    @staticmethod
    def get_session(conn, session_id: str) -> dict | None:
        return Store._session_row(conn.execute(
            f"SELECT {Store.SESSION_COLUMNS} FROM sessions WHERE id = ?",
            (session_id,)).fetchone())

    @staticmethod
    def list_sessions(conn, text: str = "", limit: int | None = None,
                      after: tuple[float, str] | None = None) -> list[dict]:
        """Sessions newest first (by `updated_at`, then id); with `text`, those
        whose title or any message holds it (case-blind for ASCII); at most
        `limit` of them, from just after `after` (a session's updated_at and
        id) in that order."""
        where, params = [], []
        if text:
            # EXISTS, not IN: walking the sessions newest first, each one's
            # messages are looked at until `limit` match (a common word: 0.6
            # ms for 20,000 sessions, against 113 ms to gather every matching
            # session first).  Through the messages' own index: a text in no
            # message reads every message, but no delta (5,000 sessions of 400
            # events: 342 ms through the key, 128 ms so; bench/search.py).
            like = f"%{_like_escaped(text)}%"
            where.append("(title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 "
                         + Store.MESSAGES_HOLDING.format("sessions.id") + "))")
            params += [like, like]
        if after is not None:
            # (the first part lets SQLite walk the updated_at index from there)
            where.append("updated_at <= ? AND (updated_at < ? OR id > ?)")
            params += [after[0], after[0], after[1]]
        rows = conn.execute(
            f"SELECT {Store.SESSION_COLUMNS} FROM sessions"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY updated_at DESC, id" + (" LIMIT ?" if limit is not None else ""),
            params + ([limit] if limit is not None else [])).fetchall()
        return [Store._session_row(r) for r in rows]

    @staticmethod
    def found_in(conn, session_ids: list[str], text: str) -> dict[str, dict]:
        """Where a search's text is in each session: its newest message that
        holds it (one probe of the messages' index a session), with the
        words around it (see `excerpt`).  A session found by its title alone
        has none."""
        like = f"%{_like_escaped(text)}%"
        found = {}
        for session_id in session_ids:
            row = conn.execute(
                "SELECT seq, data " + Store.MESSAGES_HOLDING.format("?")
                + " ORDER BY seq DESC LIMIT 1", (session_id, like)).fetchone()
            if row is not None:
                ev = json.loads(row[1])
                found[session_id] = {"seq": row[0], "role": ev.get("role"),
                                     "message_id": ev.get("message_id"),
                                     **excerpt(str(ev.get("content") or ""), text)}
        return found

    @staticmethod
    def background_starts(conn, session_id: str) -> list[dict]:
        """The session's background commands as its events name them, found
        by SQLite (json_extract) rather than by decoding every event here: a
        long session's page asks for this whenever it opens."""
        rows = conn.execute(
            "SELECT json_extract(r.data, '$.output'), json_extract(r.data, '$.ts'), "
            "json_extract(c.data, '$.input.command') FROM events r JOIN events c "
            "ON c.session_id = r.session_id AND c.type = 'tool_call' "
            "AND json_extract(c.data, '$.call_id') = json_extract(r.data, '$.call_id') "
            "WHERE r.session_id = ? AND r.type = 'tool_result' "
            "AND json_extract(r.data, '$.output') LIKE ? ESCAPE '\\' ORDER BY r.seq",
            (session_id, _like_escaped(core.BACKGROUND_STARTED) + "%")).fetchall()
        # float(): PostgreSQL's JSON path gives text
        return [{"output": out, "ts": ts if ts is None else float(ts), "command": cmd or ""}
                for out, ts, cmd in rows]

    @staticmethod
    def queue_events(conn, session_id: str) -> list[dict]:
        """What `pending_queue` needs of a session, and no more: its `queued`
        and `unqueued` events and the messages that delivered one (a POST
        asks for this on every message; decoding the whole session each time
        would cost a long session dearly)."""
        rows = conn.execute(
            "SELECT data FROM events WHERE session_id = ? AND (type IN ('queued', 'unqueued') "
            "OR (type = 'message' AND json_extract(data, '$.queued_id') IS NOT NULL)) "
            "ORDER BY seq", (session_id,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    @staticmethod
    def set_title(conn, session_id: str, title: str) -> bool:
        return conn.execute("UPDATE sessions SET title = ? WHERE id = ?",
                            (title, session_id)).rowcount == 1

    @staticmethod
    def sessions_with_status(conn, statuses: tuple[str, ...]) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        rows = conn.execute(f"SELECT {Store.SESSION_COLUMNS} FROM sessions "
                            f"WHERE status IN ({marks})", statuses).fetchall()
        return [Store._session_row(r) for r in rows]

    @staticmethod
    def history(conn, session_id: str, after: int, limit: int) -> tuple[dict | None, list[str]]:
        """The session row and the wire JSON of up to `limit` events after `after`,
        read in one transaction so `last_seq` and the events agree."""
        conn.execute("BEGIN")
        try:
            session = Store.get_session(conn, session_id)
            rows = [] if session is None else conn.execute(
                "SELECT data FROM events WHERE session_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (session_id, after, limit)).fetchall()
        finally:
            conn.execute("COMMIT")
        return session, [r[0] for r in rows]

    @staticmethod
    def events_after(conn, session_id: str, after: int, limit: int) -> list[str]:
        """The wire JSON of up to `limit` events after `after`: one statement
        (a subscriber catching up asks for this whenever another worker
        stored events)."""
        return [r[0] for r in conn.execute(
            "SELECT data FROM events WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (session_id, after, limit))]

    @staticmethod
    def output_so_far(conn, session_id: str) -> dict[str, str]:
        """call id -> what its command printed live (its `tool_output`s)."""
        printed: dict[str, list[str]] = {}
        for (data,) in conn.execute("SELECT data FROM events WHERE session_id = ? "
                                    "AND type = 'tool_output' ORDER BY seq", (session_id,)):
            ev = json.loads(data)
            printed.setdefault(ev["call_id"], []).append(ev["content"])
        return {call_id: "".join(parts) for call_id, parts in printed.items()}

    @staticmethod
    def seq_before(conn, session_id: str, message_id: str | None) -> int:
        """The seq before a message's first event (before nothing: the last)."""
        row = conn.execute(
            "SELECT min(seq) FROM events WHERE session_id = ? AND type IN "
            "('thinking', 'message', 'tool_call') AND json_extract(data, '$.message_id') = ?",
            (session_id, message_id)).fetchone() if message_id else None
        if row and row[0]:
            return row[0] - 1
        return conn.execute("SELECT coalesce(max(seq), 0) FROM events WHERE session_id = ?",
                            (session_id,)).fetchone()[0]

    @staticmethod
    def conversation(conn, session_id: str) -> list[dict]:
        """Every event but the streamed fragments, decoded: enough to rebuild
        the history."""
        rows = conn.execute("SELECT data FROM events WHERE session_id = ? AND type NOT IN ("
                            + ",".join("?" * len(STREAMED)) + ") ORDER BY seq",
                            (session_id, *sorted(STREAMED))).fetchall()
        return [json.loads(r[0]) for r in rows]


# =============================================================================
# Event log: store first, push second
# =============================================================================
#
# Every event of every session passes through `EventLog`.  One task writes:
# while a commit is in flight, new events pile up in `_pending` and go in the
# next transaction together (group commit), and a `delta` is merged into the
# session's last pending event when that is a delta of the same message (a
# `tool_output`, when that is output of the same call; other sessions' events
# in between do not matter: order is per session).
# So deltas reach the store and the browsers within one commit time (well
# under the 50 ms the contract allows), and a model that streams faster than
# SQLite commits makes bigger deltas, not a longer queue.
#
# Pacing (AGENT_WEB_COALESCE_MS, off by default).  A model streams 20-100
# tokens a second; a token committed alone costs a transaction, a hand-off
# to the writer thread and back, and a frame: ~1 ms of CPU, whatever the
# token (bench/paced.py).  With a window, streamed fragments wait for the
# next commit slot, at most the window after the last commit began: the
# first token after a pause goes at once, and the rest of a stream goes in
# commits at most the window apart, each carrying every session's tokens so
# far (a session's tokens joined into one delta).  Events a run waits on
# (`emit`: messages, tool calls, status) never wait for the slot; they take
# the fragments queued before them along.  Measured, it saves 10-30 % of
# the CPU at light load and 5-8 % under load, where group commit batches
# anyway, while it adds its latency: hence off (bench/RESULTS.md).

@dataclass
class _Pending:
    session_id: str
    event: dict
    future: asyncio.Future | None        # set for events the run waits on
    # A streamed fragment's later pieces, joined once when the batch is taken:
    # `content += piece` would copy the whole text for every token.
    more: list[str] | None = None


COALESCE_S = 0.0        # seconds; AGENT_WEB_COALESCE_MS
# The model's streams are read at most this often while the event loop is
# busy, and as they come otherwise (agent_core's ReadPacer); 0 turns it off.
READ_PACE_S = 0.03      # seconds; AGENT_WEB_READ_PACE_MS


class EventLog:
    def __init__(self, store: Store, registry: "PushRegistry",
                 coalesce: float = COALESCE_S):
        self.store, self.registry = store, registry
        self._pending: list[_Pending] = []
        self._last: dict[str, _Pending] = {}    # session -> its last item in _pending
        self._wake = asyncio.Event()
        self.coalesce = coalesce
        self._slot = 0.0                         # loop time the next commit may begin
        self._timer: asyncio.TimerHandle | None = None  # wakes the writer at _slot
        self._task: asyncio.Task | None = None
        self._committing = False                 # a batch is with the store now
        self.commits = 0
        self.lost: dict[str, int] = {}          # session -> streamed fragments not stored
        self.failed_commits = 0                 # in a row, since the last that worked

    def start(self) -> None:
        self._task = asyncio.create_task(self._writer(), name="agent-web-event-log")

    async def stop(self) -> None:
        await self.flush()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def emit_nowait(self, session_id: str, event: dict) -> None:
        """Queue a streamed fragment (`delta`, `tool_output`) without waiting
        for its commit; it joins the session's pending fragment of the same
        stream if there is one."""
        last = self._last.get(session_id)
        # Spelled out rather than looked up: this runs for every token.
        if (last is not None and last.future is None
                and last.event["type"] == event["type"]
                and (last.event["message_id"] == event["message_id"]
                     and last.event["channel"] == event["channel"]
                     if event["type"] == "delta"
                     else last.event["call_id"] == event["call_id"])):
            if last.more is None:
                last.more = [last.event["content"]]
            last.more.append(event["content"])
            return
        self._queue(_Pending(session_id, {"type": event["type"], "ts": time.time(), **event},
                             None))

    async def emit(self, session_id: str, event: dict) -> dict:
        """Store one event, publish it, and return it with its `seq`.

        The event joins the queue *before* the first await, so events emitted
        one after another keep their order even across runs.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue(_Pending(session_id, {"type": event["type"], "ts": time.time(), **event},
                             future))
        return await future

    def _queue(self, item: _Pending) -> None:
        self._pending.append(item)
        self._last[item.session_id] = item
        if item.future is not None or not self.coalesce or self._wake.is_set():
            self._wake.set()
            return
        if self._timer is None:                 # a fragment: wait for the slot
            loop = asyncio.get_running_loop()
            delay = self._slot - loop.time()
            if delay <= 0:
                self._wake.set()
            else:
                self._timer = loop.call_at(self._slot, self._wake.set)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (the batch being
        committed now included)."""
        if self._pending or self._committing or (self._task and self._wake.is_set()):
            await self.emit("", {"type": "_flush"})

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self.coalesce:
                self._slot = asyncio.get_running_loop().time() + self.coalesce
            batch, self._pending = self._pending, []
            self._last.clear()
            for p in batch:
                if p.more is not None:
                    p.event["content"], p.more = "".join(p.more), None
            self._committing = True
            try:
                await self._commit(batch)
            except Exception as exc:
                # One session's events must not cost another's: each
                # session's share of the batch is tried again on its own.
                sessions: dict[str, list[_Pending]] = {}
                for p in batch:
                    if p.session_id:              # not flush()'s marker
                        sessions.setdefault(p.session_id, []).append(p)
                failure = None
                for group in sessions.values():
                    try:
                        if len(sessions) < 2:
                            raise exc               # this session's share failed already
                        await self._commit(group)
                    except Exception as err:
                        failure = await self._one_by_one(group, err) or failure
                # flush() waits for all of them: it hears of any failure.
                for p in batch:
                    if not p.session_id and not p.future.done():
                        if failure is None:
                            p.future.set_result(p.event)
                        else:
                            p.future.set_exception(failure)
            self._committing = False

    async def _one_by_one(self, group: list[_Pending], exc: Exception) -> Exception | None:
        """A session's share of a batch failed: each of its events is tried
        alone, in order, so only an event that cannot be written is lost
        (its waiter hears why; a fragment is counted).  A store that refuses
        everything (full, locked) is not asked once per event."""
        if len(group) < 2 or getattr(exc, "whole_store", False):
            self._failed(group, exc)
            return exc
        failure = None
        for p in group:
            try:
                await self._commit([p])
            except Exception as one:
                self._failed([p], one)
                failure = one
        return failure

    async def _commit(self, batch: list[_Pending]) -> None:
        real = [p for p in batch if p.session_id]
        stored = await self.store.write(Store.append, [(p.session_id, p.event) for p in real])
        self.commits += 1
        if self.failed_commits:
            log.warning("events are stored again, after %d failed commits", self.failed_commits)
            self.failed_commits = 0
        results = iter(stored)
        for p in batch:
            item = next(results) if p.session_id else None
            if item is not None:
                self.registry.publish(p.session_id, item[0], item[1])
                p.event["seq"] = item[0]
            if p.future and not p.future.done():
                p.future.set_result(p.event)

    def _failed(self, batch: list[_Pending], exc: Exception) -> None:
        """Events that could not be stored: never shown (stored before seen).
        Who waits is told; a streamed fragment nobody waits for is counted,
        and its run says so (`RunManager._drive`): its message's final text,
        stored later, is whole all the same."""
        if not self.failed_commits:         # once per outage, not once per token
            log.error("could not store %d events of session(s) %s: %s", len(batch),
                      ", ".join(sorted({p.session_id for p in batch if p.session_id})), exc,
                      exc_info=not isinstance(exc, StoreUnavailable))
        self.failed_commits += 1
        for p in batch:
            if p.future and not p.future.done():
                p.future.set_exception(exc)
            elif p.future is None:
                self.lost[p.session_id] = self.lost.get(p.session_id, 0) + 1


# =============================================================================
# Push registry: a bounded queue per subscribed socket
# =============================================================================

OVERFLOWED = None     # the item a writer finds on its queue after an overflow
DELETED = object()    # ... and after its session was deleted
WAKE = object()       # ... and when another worker stored events: read them


class Subscriber:
    def __init__(self, session_id: str, maxsize: int):
        self.session_id = session_id
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)
        self.overflowed = False
        self.last = 0               # the seq its socket was sent last (its writer keeps it)


class PushRegistry:
    """Who listens to which session.  `publish` never blocks and never grows
    memory without bound: a full queue is emptied and ends with OVERFLOWED,
    and its socket is closed with 4008 by its own writer."""

    def __init__(self, queue_size: int = SUBSCRIBER_QUEUE_SIZE):
        self.queue_size = queue_size
        self._subs: dict[str, set[Subscriber]] = {}

    def subscribe(self, session_id: str) -> Subscriber:
        sub = Subscriber(session_id, self.queue_size)
        self._subs.setdefault(session_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self._subs.get(sub.session_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.session_id]

    def publish(self, session_id: str, seq: int, text: str) -> None:
        self._put(session_id, (seq, text))

    def wake(self, session_id: str) -> None:
        """Events of the session were stored elsewhere (another worker): each
        subscriber reads them from the store, after the last it sent."""
        self._put(session_id, WAKE)

    def behind(self, session_id: str) -> int | None:
        """The least seq any subscriber of the session was sent; None if it
        has none here."""
        subs = self._subs.get(session_id)
        return min(sub.last for sub in subs) if subs else None

    def wake_behind(self, newest: dict[str, int]) -> None:
        """Like wake, only for the subscribers sent less than `newest`
        (session -> its last stored seq): the others have nothing to read."""
        for session_id, seq in newest.items():
            for sub in list(self._subs.get(session_id, ()) if seq is not None else ()):
                if sub.last < seq:
                    self._put_one(sub, WAKE)

    def listened(self) -> set[str]:
        return set(self._subs)

    def _put(self, session_id: str, item) -> None:
        for sub in list(self._subs.get(session_id, ())):
            self._put_one(sub, item)

    def _put_one(self, sub: Subscriber, item) -> None:
        try:
            sub.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.unsubscribe(sub)
            sub.overflowed = True
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.queue.put_nowait(OVERFLOWED)

    def end(self, session_id: str) -> None:
        """The session is gone: each subscriber's writer finds DELETED next,
        tells its client so and closes with 4004 (they would wait for ever)."""
        for sub in list(self._subs.get(session_id, ())):
            self.unsubscribe(sub)
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.queue.put_nowait(DELETED)

    def count(self) -> int:
        return sum(len(s) for s in self._subs.values())


# =============================================================================
# Runs: server-owned tasks, one per session at most
# =============================================================================

@dataclass
class Run:
    session_id: str
    agent: core.Agent
    task: asyncio.Task | None = None
    # call_id -> future the agent awaits; created when the approval_request is
    # stored, so an answer that arrives at once already finds it
    approvals: dict[str, asyncio.Future] = field(default_factory=dict)
    # set while its end waits for a store that refused its events
    failed_store: "StoreUnavailable | None" = None
    # queued messages the agent has not read yet (see "Queued messages")
    inbox: list[dict] = field(default_factory=list)


def user_message(text: str, queued_id: str | None = None) -> dict:
    ev = {"type": "message", "role": "user", "content": text, "message_id": core.new_id("msg")}
    if queued_id:
        ev["queued_id"] = queued_id
    return ev


def decides(event: dict) -> str | None:
    """The queued message an event decides: read (a user `message` with its
    `queued_id`) or dropped (`unqueued`); None for any other event."""
    if event["type"] == "message":
        return event.get("queued_id")
    return event.get("message_id") if event["type"] == "unqueued" else None


def pending_queue(events: list[dict]) -> list[dict]:
    """The `queued` events no `message` (queued_id) delivered and no
    `unqueued` took back, oldest first."""
    gone = {decides(e) for e in events}
    return [e for e in events if e["type"] == "queued" and e["message_id"] not in gone]


# Queued messages (steering).  A message sent with `queue: true` while a run
# goes is stored at once as a `queued` event (every tab shows it, and it
# survives a reload and a restart) and put in the run's inbox.  The agent
# takes its inbox at its next step, after the tool results (Agent.inbox):
# each message is then stored as a user `message` with `queued_id`, where it
# entered the conversation.  A run that ends first (done, error, max_steps)
# starts the next run with what is still queued; after a Stop or a restart
# it stays queued until the next message, which delivers it first, or until
# the user drops it (an `unqueued` event).  With many workers only the one
# that runs the session drops a queued message (its agent may be reading
# it); another worker asked to waits this long for its answer in the store.
DROP_ANSWER_WAIT = 3.0      # seconds

class Owners:
    """Which process runs which session.  With SQLite there is one process,
    and its `RunManager.runs` is the whole truth: every run is ours, and
    nothing is forwarded.  With PostgreSQL (see "Many workers") the claim is
    a row, and a run's cancel or approve may arrive at another worker."""

    async def claim(self, session_id: str) -> bool:
        return True                     # `reserve` already refused a second run

    async def unclaim(self, session_id: str) -> None:
        """A claimed run that stored nothing gives its claim back (one that
        ran loses it with its `done`)."""

    async def elsewhere(self, session_id: str) -> str | None:
        """The worker running the session, when that is not this one."""
        return None

    async def forward(self, session_id: str, op: dict) -> bool:
        """Hand `op` to the worker whose run it is; False: none runs it
        (or this one does)."""
        return False

    async def orphans(self, store: Store) -> list[dict]:
        """Sessions left running or waiting by a process that is gone."""
        return await store.read(Store.sessions_with_status, ("running", "awaiting_approval"))


@dataclass
class Conversation:
    """A session's stored conversation and what a run starts from: the
    model's view of it, the messages still queued, the tools allowed for the
    session.  Each is a pass over every event, ~10 ms for a session of
    10,000, so `read_conversation` works them out on the reader thread, not
    on the loop, where every other session's stream would wait for them."""
    events: list[dict]
    history: list[dict]
    measured: dict               # history_from_events' counts (the context meter)
    queued: list[dict]
    allowed_tools: set[str]


def read_conversation(conn, session_id: str) -> Conversation:
    """On the reader thread: Store.conversation, and what a run needs of it."""
    events = Store.conversation(conn, session_id)
    measured: dict = {}
    history = core.history_from_events(events, measured)
    return Conversation(events, history, measured, pending_queue(events),
                        allowed_tools_from(events))


class RunManager:
    def __init__(self, events: EventLog, store: Store, llm, cfg: core.LLMConfig,
                 toolbox: core.Toolbox, max_steps: int, owners: Owners | None = None):
        self.events, self.store = events, store
        self.llm, self.cfg, self.toolbox, self.max_steps = llm, cfg, toolbox, max_steps
        self.runs: dict[str, Run] = {}
        self.owners = owners or Owners()

    def reserve(self, session_id: str) -> Run:
        """Claim the session's run slot.  Synchronous on purpose: there is no
        await between the check and the claim, so two racing POSTs cannot both
        pass (the loser gets 409)."""
        if session_id in self.runs:
            if self.runs[session_id].failed_store is not None:
                raise self.runs[session_id].failed_store          # 503, Retry-After
            raise HTTPError(409, "run_in_progress", "a run is already going in this session; "
                            "wait for its done or cancel it")
        run = Run(session_id, None)  # type: ignore[arg-type]
        self.runs[session_id] = run
        return run

    def release(self, run: Run) -> None:
        if self.runs.get(run.session_id) is run:
            del self.runs[run.session_id]

    def start(self, run: Run, approve_mode: str, prior: Conversation,
              asked: set[str] = frozenset()) -> None:
        """Build the agent for a reserved run and start its task.  `prior` is
        the session's stored conversation, the user's message included."""
        async def approver(call: dict) -> str:
            future = run.approvals.setdefault(
                call["id"], asyncio.get_running_loop().create_future())
            try:
                return await future
            finally:
                run.approvals.pop(call["id"], None)

        run.inbox = prior.queued
        run.agent = core.Agent(self.llm, self.cfg, self.toolbox, max_steps=self.max_steps,
                               approval_mode=approve_mode, approver=approver, asked=asked,
                               allowed_tools=prior.allowed_tools, measured=prior.measured,
                               owner=run.session_id, inbox=lambda: self._take_inbox(run))
        for call_id in asked:       # answers may come before the agent gets there
            run.approvals[call_id] = asyncio.get_running_loop().create_future()
        run.task = asyncio.create_task(self._drive(run, prior.history),
                                       name=f"run-{run.session_id}")

    async def running(self, sid: str) -> bool:
        """A run goes in the session, here or on another worker."""
        return sid in self.runs or await self.owners.elsewhere(sid) is not None

    async def enqueue(self, sid: str, text: str) -> dict:
        stored = await self.events.emit(sid, {"type": "queued", "content": text,
                                              "message_id": core.new_id("q")})
        if sid in self.runs or not await self.owners.forward(
                sid, {"op": "queued", "event": stored}):
            await self._take_queued(sid, stored)
        return stored

    async def _take_queued(self, sid: str, stored: dict) -> None:
        """A queued message for a run of this process: into its inbox, or,
        if the run ended meanwhile, the message starts the next."""
        run = self.runs.get(sid)
        if run is not None:
            run.inbox.append(stored)
        else:
            await self._start_queued(sid)

    async def drop_queued(self, sid: str, message_id: str) -> bool:
        """Take back a queued message the agent has not read; False if it
        has (or the message is not queued).  The worker that runs the
        session decides, as its agent may be taking its inbox this moment:
        asked elsewhere, the drop is handed to it, and the store tells which
        came first, its `unqueued` or the agent's message that read it."""
        run = self.runs.get(sid)
        if run is not None:
            if not self._drop_from_inbox(run, message_id):
                return False
        else:
            queued = pending_queue(await self.store.read(Store.queue_events, sid))
            if not any(q["message_id"] == message_id for q in queued):
                return False
            if await self.owners.forward(sid, {"op": "unqueued", "message_id": message_id}):
                return await self._dropped_elsewhere(sid, message_id)
            if sid in self.runs:
                # A run began here while we looked: its start delivers what
                # is queued (begin), so it decides.  (From here to the emit
                # below nothing waits: a run reserved later finds this
                # `unqueued` queued, and begin waits for its commit.)
                return await self.drop_queued(sid, message_id)
        dropped = await self.events.emit(sid, {"type": "unqueued", "message_id": message_id})
        return "seq" in dropped       # not stored: a run on another worker read it first

    async def _dropped_elsewhere(self, sid: str, message_id: str) -> bool:
        """The answer of the worker a drop was handed to, as the store has it."""
        deadline = asyncio.get_running_loop().time() + DROP_ANSWER_WAIT
        while True:
            for e in await self.store.read(Store.queue_events, sid):
                if decides(e) == message_id:
                    return e["type"] == "unqueued"
            if asyncio.get_running_loop().time() > deadline:
                raise HTTPError(504, "no_answer", "the worker running this session did not "
                                "answer in time; the message may still be queued")
            await asyncio.sleep(0.05)

    @staticmethod
    def _drop_from_inbox(run: Run, message_id: str) -> bool:
        kept = [q for q in run.inbox if q["message_id"] != message_id]
        dropped, run.inbox = len(kept) < len(run.inbox), kept
        return dropped

    @staticmethod
    def _take_inbox(run: Run) -> list[dict]:
        taken, run.inbox = run.inbox, []
        return [user_message(q["content"], q["message_id"]) for q in taken]

    async def begin(self, run: Run, mode: str, text: str | None = None) -> dict | None:
        """Start a reserved run: the messages still queued (left by a Stop, a
        restart, or a run that ended first) are delivered first, then
        `text`.  Returns the last user message stored, or None (and frees the
        slot) when there is nothing to send."""
        sid, stored = run.session_id, None
        if not await self.owners.claim(sid):
            self.release(run)
            raise HTTPError(409, "run_in_progress", "a run is already going in this session "
                            "(on another worker); wait for its done or cancel it")
        try:
            queued = pending_queue(await self.store.read(Store.queue_events, sid))
            if queued:
                # A drop may have queued its `unqueued` just before this run
                # was reserved: once that is committed, the store is the truth.
                await self.events.flush()
                queued = pending_queue(await self.store.read(Store.queue_events, sid))
            for q in queued:
                delivered = await self.events.emit(sid, user_message(q["content"],
                                                                     q["message_id"]))
                # Not stored: dropped meanwhile through another worker (or the
                # session is gone): the conversation read below goes without it.
                stored = delivered if "seq" in delivered else stored
            if text is not None:
                stored = await self.events.emit(sid, user_message(text))
                if "seq" not in stored:
                    raise HTTPError(404, "unknown_session", "the session was deleted")
            prior = await self.store.read(read_conversation, sid) if stored else None
        except BaseException:
            self.release(run)
            await self.owners.unclaim(sid)
            raise
        if stored is None:
            self.release(run)
            await self.owners.unclaim(sid)
            return None
        self.start(run, mode, prior)
        return stored

    async def _start_queued(self, sid: str) -> None:
        """A run ended with messages still queued: they start the next one."""
        session = await self.store.read(Store.get_session, sid)
        if session is not None and sid not in self.runs:
            await self.begin(self.reserve(sid), session["approve_mode"])

    async def _drive(self, run: Run, history: list[dict]) -> None:
        sid = run.session_id
        ended = None
        try:
            # aclosing: a run that stops here (the store failed) closes its
            # agent at once, killing a command it was running.
            async with contextlib.aclosing(run.agent.run(history)) as agent_events:
                async for ev in agent_events:
                    kind = ev["type"]
                    if kind in STREAMED:
                        self.events.emit_nowait(sid, ev)
                        continue
                    if kind == "approval_request":
                        run.approvals.setdefault(ev["call_id"],
                                                 asyncio.get_running_loop().create_future())
                    if kind == "done":
                        # Free the slot first: a client that sees `done` may POST at once.
                        self.release(run)
                        ended = ev["status"]
                    if kind == "compaction":
                        ev["through_seq"] = await self._through_seq(sid, ev.pop("keep_from"))
                    await self.events.emit(sid, ev)
                    if self.events.lost.get(sid):
                        await self.events.emit(sid, {
                            "type": "error", "retrying": False, "message":
                            f"{self.events.lost.pop(sid)} streamed fragment(s) could not be "
                            "stored, so they were never shown; the message's whole text is "
                            "stored all the same"})
        except asyncio.CancelledError:
            raise          # a hard stop at shutdown: the store keeps what it has
        except StoreUnavailable as exc:
            await self._end_when_storable(run, exc)
        except Exception as exc:   # a bug, not an LLM failure (those are events)
            log.exception("run %s crashed", sid)
            self.release(run)
            try:
                await self.write_end(sid, "error", "internal error", "the run failed",
                                     f"internal error: {type(exc).__name__}")
            except StoreUnavailable as exc:
                await self._end_when_storable(run, exc)
        finally:
            self.release(run)
        if ended in ("done", "error", "max_steps") and run.inbox:
            # Queued after the agent's last look: they start the next run.
            try:
                await self._start_queued(sid)
            except (HTTPError, StoreUnavailable):
                log.warning("the queued messages of %s wait for the next message", sid)

    async def _through_seq(self, sid: str, keep_from: dict) -> int:
        """The last seq a compaction's summary stands for: the one before the
        first event of the first turn it keeps (by seq if that turn came from
        the store, by message_id if this run made it)."""
        if "seq" in keep_from:
            return keep_from["seq"] - 1
        await self.events.flush()             # the turn's events are in the store
        return await self.store.read(Store.seq_before, sid, keep_from.get("message_id"))

    async def write_end(self, sid: str, status: str, summary: str, reason: str,
                        error: str | None = None) -> None:
        """End a run that could not end itself (a crash, a failed store, a
        bug): every tool call left open gets a result that says so (with
        what its command printed, from its stored `tool_output`), then an
        `error` if one is given, then `done`."""
        pending = core.pending_tool_calls((await self.store.read(read_conversation, sid)).history)
        printed = await self.store.read(Store.output_so_far, sid) if pending else {}
        for call in pending:
            await self.events.emit(sid, {
                "type": "tool_result", "call_id": call["id"], "tool": call["name"],
                "output": core.unfinished_result(reason, printed.get(call["id"], "")),
                "is_error": True, "duration_ms": 0})
        if error:
            await self.events.emit(sid, {"type": "error", "retrying": False, "message": error})
        await self.events.emit(sid, {"type": "done", "status": status, "summary": summary,
                                     "steps": 0,
                                     "usage": {"input_tokens": 0, "output_tokens": 0}})

    async def _end_when_storable(self, run: Run, exc: StoreUnavailable) -> None:
        """The store refused this run's events (a full disk, a lock held too
        long): the run cannot go on without its log, so it stops, and its
        end is written as soon as the store takes writes again — the server
        needs no restart.  Until then the session keeps its slot (a POST
        there gets 503, not a second run); if the process stops first, the
        next start recovers the run as `interrupted`."""
        sid, delay = run.session_id, 0.5
        run.failed_store = exc
        self.runs.setdefault(sid, run)        # released already if `done` was refused
        try:
            while True:
                try:
                    lost = self.events.lost.get(sid, 0)
                    await self.write_end(sid, "error", exc.message, "the store failed",
                                         f"The run was stopped: {exc.message}" + (
                                             f" ({lost} streamed fragment(s) were never "
                                             "stored, nor shown)" if lost else ""))
                    self.events.lost.pop(sid, None)
                    return
                except StoreUnavailable:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
        finally:
            run.failed_store = None
            self.release(run)

    async def cancel(self, session_id: str) -> None:
        run = self.runs.get(session_id)
        if run is None and await self.owners.forward(session_id, {"op": "cancel"}):
            return
        if run is None or run.agent is None:
            raise HTTPError(409, "not_running", "nothing is running in this session")
        run.agent.cancel("cancelled")

    async def approve(self, session_id: str, call_id: str, decision: str) -> None:
        run = self.runs.get(session_id)
        if run is None and await self.owners.forward(
                session_id, {"op": "approve", "call_id": call_id, "decision": decision}):
            return
        future = run.approvals.get(call_id) if run else None
        if future is None or future.done():
            raise HTTPError(409, "not_waiting", "nothing waits for an answer on this call "
                            "(answered already, or no such request)")
        future.set_result(decision)

    async def set_mode(self, session_id: str, mode: str) -> None:
        run = self.runs.get(session_id)
        if run and run.agent:
            run.agent.approval_mode = mode
        elif run is None:
            await self.owners.forward(session_id, {"op": "mode", "mode": mode})

    async def control(self, session_id: str, op: dict) -> None:
        """An op another worker forwarded to the run it found ours."""
        try:
            if op["op"] == "cancel":
                await self.cancel(session_id)
            elif op["op"] == "approve":
                await self.approve(session_id, op["call_id"], op["decision"])
            elif op["op"] == "mode":
                await self.set_mode(session_id, op["mode"])
            elif op["op"] == "queued":
                await self._take_queued(session_id, op["event"])
            elif op["op"] == "unqueued":
                await self.drop_queued(session_id, op["message_id"])   # the asker reads the store
        except HTTPError:
            pass          # answered or ended meanwhile, as it could be on one worker

    async def recover(self) -> None:
        """At start-up, and with many workers at every lease renewal: runs a
        process that is gone left behind (with many workers, only those no
        live worker claims; see "Many workers").

        `running` ones died with it: each tool call left without a result gets
        one saying so, then `done` with `interrupted`.  `awaiting_approval` ones
        lost nothing (the run was only waiting), so they are resumed, still
        waiting for the same answer."""
        for s in await self.owners.orphans(self.store):
            sid = s["session_id"]
            if sid in self.runs or not await self.owners.claim(sid):
                continue                      # ours, or another worker took it first
            if s["status"] == "awaiting_approval":
                prior = await self.store.read(read_conversation, sid)
                answered = {e["call_id"] for e in prior.events if e["type"] == "approval"}
                asked = {e["call_id"] for e in prior.events
                         if e["type"] == "approval_request" and e["call_id"] not in answered}
                try:
                    self.start(self.reserve(sid), s["approve_mode"], prior, asked)
                except HTTPError:             # a POST here took the slot meanwhile
                    await self.owners.unclaim(sid)
                continue
            await self.write_end(sid, "interrupted", "the server stopped during this run; "
                                 "send a message to continue", "the server stopped")

    async def shutdown(self) -> None:
        """Runs end as `interrupted`, written to the store; a run that is only
        waiting for approval is stopped without a trace, so the next start
        resumes it still waiting."""
        tasks = []
        for run in list(self.runs.values()):
            if run.task is None:
                continue
            if run.agent.waiting_approval:
                run.task.cancel()
            else:
                run.agent.cancel("interrupted")
            tasks.append(run.task)
        if tasks:
            done, still = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE)
            for task in still:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def allowed_tools_from(events: list[dict]) -> set[str]:
    """Tools the user allowed "for the rest of the session", from stored events."""
    tools = {e["call_id"]: e["tool"] for e in events if e["type"] == "approval_request"}
    return {tools[e["call_id"]] for e in events
            if e["type"] == "approval" and e.get("always") and e["call_id"] in tools}


# =============================================================================
# Many workers: PostgreSQL
# =============================================================================
#
# SQLite is one process's store (see DatabaseLock).  With
# AGENT_WEB_DB=postgresql://... any number of workers, on any number of
# machines, share one database, and any of them serves any request:
#
#   browser --ws--> worker B                       worker A <-- POST /agent/chat
#                      ^  LISTEN agent_web            |  the run: claims its row in
#                      |  (a notice: "A stored        |  `runs`, stores each batch
#                      |   events of session S")      |  and NOTIFYs in the same
#                      +------ PostgreSQL <-----------+  transaction
#
# - Events.  A commit locks its sessions' rows (in id order, so two workers
#   never deadlock), numbers the events on from the session's newest seq
#   and NOTIFYs `agent_web` with the session ids; PostgreSQL delivers a
#   notice only once its transaction commits.  A worker with subscribers on
#   one of them reads the new events once, from the subscriber furthest
#   behind, and publishes them to all (Workers._read_for; one far behind
#   reads on its own, Connection._replay): a notice carries no event, so a
#   lost one costs latency, never an event.  (Notices are lost when the
#   listening connection drops: on reconnecting, and at every renewal, one
#   query asks the newest seq of each session listened to, and the
#   subscribers behind it read: Workers._catch_up.)  The worker
#   that stored a batch publishes it to its own subscribers directly, as
#   with SQLite.
# - Runs.  The row in `runs` is the claim: a second run of a session on any
#   worker finds it and gets 409.  It goes in the transaction that stores
#   the run's `done`.  Cancel, approve, a queued message, its drop and a
#   mode change that reach another worker are NOTIFYed on
#   `agent_web_control` to the owner, which applies them as if they came to
#   it (RunManager.control); a drop's asker then reads the owner's answer
#   from the store (RunManager.drop_queued).  With no owner, a drop and a
#   run starting elsewhere may race: the store keeps a queued message's
#   first decision, dropped or read (PgStore._undecided).
# - Background commands live in the process that started them, while the
#   session's next run may be another worker's: bash_output, bash_kill and
#   the page's list of them are asked of every worker at once, and answered
#   in the `answers` table (Workers.ask).
# - Workers die.  Each renews its row in `workers` every LEASE_S / 4; its lease
#   is LEASE_S on the database's clock.  Every worker, as often, drops
#   the claims of workers whose lease ran out and recovers their sessions
#   as a restart does (RunManager.recover): the first to claim one writes
#   its `interrupted` end, tool calls closed.  A run whose worker is alive
#   is never taken.  A worker that stalled past its lease may wake to find
#   its runs ended by another: so a commit stores a run's events only while
#   its claim is still this worker's (the fence, in PgStore.append), and a
#   worker that finds its own lease lapsed stops its runs and gives their
#   claims back.  A worker of the same machine whose process is gone (a
#   worker uvicorn restarted, a server started again after a crash) is dead
#   at once, without waiting for its lease: its id names host, pid, boot and
#   PID namespace.
#
# Queries: Store's, run by psycopg's connections on Store's threads (one
# writer, PG_READERS readers and one for leases, per worker), through
# `_pg_sql`, which spells the few SQLite words they use the PostgreSQL way.
# Those that differ more (numbering events, delete) are PgStore's own.  The
# listener is psycopg's AsyncConnection on the event loop.

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
LEASE_S = 10.0           # AGENT_WEB_LEASE: a worker not heard of for this long is dead;
                         # it renews (and sweeps) four times as often
PG_READERS = 4           # reader threads (and connections) per worker
NOTIFY_IDS = 300         # session ids per notice (a payload holds < 8,000 bytes)
ASK_WAIT = 3.0           # seconds a worker waits for the others' answers (Workers.ask)


@functools.cache
def _boot_id() -> str:
    """This kernel's boot and PID namespace (Linux), so a worker id says
    whose pids it names (containers on one machine share the boot, and with
    host networking the host name, but not the PID namespace)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        space = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return ""
    return f"{boot}-{space}"


def worker_name() -> str:
    """host:pid:random:boot-pidns — unique among the workers of one database."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}:{_boot_id()}"


def gone_here(worker_id: str) -> bool:
    """A worker of this very machine and boot whose process has exited: dead
    for sure, with no need to wait for its lease (a worker restarted by
    uvicorn, or `python agent_web.py` again after a crash).  Any other
    worker, only its lease can tell."""
    host, pid, _, boot = (worker_id.split(":") + ["", "", "", ""])[:4]
    if not boot or boot != _boot_id() or host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass                      # alive, another user's
    return False


def is_postgres(db: str | Path) -> bool:
    return str(db).startswith(POSTGRES_SCHEMES)


def db_label(db: str | Path) -> str:
    """The database as start-up prints it: a DSN without its password."""
    if is_postgres(db):
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(db))
    return str(Path(db).resolve())


def psycopg_module():
    try:
        import psycopg
    except ImportError:
        raise ValueError("a postgresql:// database needs psycopg 3: "
                         "pip install -r requirements-postgres.txt") from None
    return psycopg


def reach_postgres(dsn: str) -> None:
    """DatabaseUnreachable unless the database answers (main's check, so a
    wrong DSN is one line before uvicorn starts, not a failed start-up)."""
    psycopg = psycopg_module()
    try:
        psycopg.connect(dsn, connect_timeout=10).close()
    except psycopg.Error as exc:
        raise DatabaseUnreachable(dsn, exc) from None


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """A Store query in PostgreSQL's words: `?` -> `%s` (and a literal % -> %%),
    json_extract(x, '$.a.b') -> (x::jsonb #>> '{a,b}'), json_set(x, '$.k', ?)
    -> jsonb_set(...) of a text, LIKE -> ILIKE (SQLite's
    LIKE ignores ASCII case), BEGIN IMMEDIATE -> BEGIN (row locks do its job),
    BEGIN (a read) -> one snapshot for all its statements, and no INDEXED BY
    (SQLite's index names; PostgreSQL's planner picks its own)."""
    if sql == "BEGIN":
        return "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    sql = sql.replace("%", "%%").replace("BEGIN IMMEDIATE", "BEGIN").replace(" LIKE ", " ILIKE ")
    sql = re.sub(r" INDEXED BY \w+", "", sql)
    sql = re.sub(r"json_extract\(([\w.]+), '\$\.([\w.]+)'\)",
                 lambda m: f"({m[1]}::jsonb #>> '{{{m[2].replace('.', ',')}}}')", sql)
    sql = re.sub(r"json_set\((\w+), '\$\.(\w+)', \?\)",
                 r"jsonb_set(\1::jsonb, '{\2}', to_jsonb(?::text))::text", sql)
    return sql.replace("?", "%s")


class _PgConnection:
    """A psycopg connection that takes Store's queries (see `_pg_sql`)."""

    def __init__(self, raw, worker_id: str):
        self.raw, self.worker_id = raw, worker_id

    def execute(self, sql: str, params=()):
        return self.raw.execute(_pg_sql(sql), params)

    def pg(self, sql: str, params=()):
        """A query already in PostgreSQL's words."""
        return self.raw.execute(sql, params)

    def many(self, sql: str, rows: list) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(sql, rows)

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != 0         # 0: IDLE

    def rollback(self) -> None:
        """After a failed statement; a lost connection has nothing to undo
        (and another error here would hide the one that matters)."""
        if not self.raw.broken and self.in_transaction:
            self.raw.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()


class PgStore(Store):
    def __init__(self, dsn: str, worker_id: str):
        super().__init__(dsn)
        self.psycopg = psycopg_module()
        self.worker_id = worker_id
        self._reader = ThreadPoolExecutor(PG_READERS, thread_name_prefix="agent-web-pg-read")
        # Leases on a thread of their own: a renewal queued behind a backlog
        # of commits on the writer could come too late and lose a live lease.
        self._lease = ThreadPoolExecutor(1, thread_name_prefix="agent-web-pg-lease")
        self._pools = {"write": self._writer, "read": self._reader, "lease": self._lease}
        self.seconds_in_sqlite["lease"] = 0.0      # (in PostgreSQL calls, here)
        self._opened: list[_PgConnection] = []     # every thread's, closed by close()

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.raw.broken:    # a lost connection is opened anew
            conn = _PgConnection(self.psycopg.connect(self.path, autocommit=True),
                                 self.worker_id)
            self._local.conn = conn
            self._opened.append(conn)
        return conn

    def _write_and_checkpoint(self, conn, fn: Callable, *args) -> Any:
        return fn(conn, *args)                  # PostgreSQL checkpoints on its own

    def write(self, fn: Callable, *args) -> Awaitable:
        return self._on("write", self.OWN.get(fn, fn), *args)

    def read(self, fn: Callable, *args) -> Awaitable:
        return self._on("read", self.OWN.get(fn, fn), *args)

    def lease(self, fn: Callable, *args) -> Awaitable:
        return self._on("lease", fn, *args)

    async def _on(self, kind: str, fn: Callable, *args) -> Any:
        try:
            return await self._run(kind, fn, *args)
        except self.psycopg.OperationalError as exc:   # down, unreachable, disk full
            raise StoreUnavailable(exc) from exc

    async def open(self) -> None:
        try:
            await self.write(PgStore.create_tables)
        except StoreUnavailable as exc:
            raise DatabaseUnreachable(self.path, exc.__cause__) from None

    def close(self) -> None:
        for pool in (self._reader, self._writer, self._lease, self._checkpointer):
            pool.shutdown(wait=True)
        for conn in self._opened:
            conn.close()

    @staticmethod
    def create_tables(conn) -> None:
        # One worker at a time: CREATE ... IF NOT EXISTS races with itself.
        conn.pg("BEGIN")
        conn.pg("SELECT pg_advisory_xact_lock(7402)")
        conn.pg(schema("postgresql"))
        conn.pg("COMMIT")

    @staticmethod
    def _notify(conn, kind: str, ids: list[str]) -> None:
        for chunk in _chunks(ids, NOTIFY_IDS):
            conn.pg("SELECT pg_notify('agent_web', %s)",
                    (" ".join([conn.worker_id, kind, *chunk]),))

    # Events any worker may add to a session; every other event is a run's,
    # and is stored only while that run's claim is this worker's (below).
    UNFENCED = frozenset({"queued", "unqueued", "forked"})

    @staticmethod
    def append(conn, items: list[tuple[str, dict]]) -> list[tuple[int, str] | None]:
        results: list[tuple[int, str] | None] = [None] * len(items)
        try:
            # Two round trips to the database (a pipeline sends statements
            # without waiting for each answer): the locking read, whose
            # answer numbers the events, then everything else and COMMIT.
            with conn.raw.pipeline():
                conn.pg("BEGIN")
                # Locked, a session's newest seq is ours to number on from,
                # and a second worker's commit to it waits for ours: no gap,
                # no clash.
                found = conn.pg(f"SELECT id, {Store.LAST_SEQ}, (SELECT owner FROM runs WHERE "
                                "session_id = sessions.id) FROM sessions WHERE id = ANY(%s) "
                                "ORDER BY id FOR UPDATE",
                                (sorted({sid for sid, _ in items}),)).fetchall()
                last_seq = {sid: seq for sid, seq, _ in found}
                # The fence: a run's events after its claim was lost (our lease
                # lapsed and another worker ended the run) are not stored.
                ours = {sid for sid, _, owner in found if owner == conn.worker_id}
                keep = [i for i, (sid, ev) in enumerate(items)
                        if sid in ours or ev["type"] in PgStore.UNFENCED]
                if len(keep) < len(items):
                    log.warning("worker %s: %d event(s) not stored: their runs are no "
                                "longer this worker's", conn.worker_id, len(items) - len(keep))
                keep = PgStore._undecided(conn, items, keep)
                kept = [items[i] for i in keep]
                by_session, changes, ended = Store._effects(kept)
                kept_results: list[tuple[int, str] | None] = [None] * len(kept)
                now = time.time()
                conn.many("UPDATE sessions SET updated_at = %s, status = COALESCE(%s, status), "
                          "title = CASE WHEN title = '' THEN %s ELSE title END WHERE id = %s",
                          [(now, status, title, sid) for sid, status, title in changes
                           if sid in last_seq])
                conn.many("INSERT INTO events (session_id, seq, type, data) "
                          "VALUES (%s, %s, %s, %s)",
                          Store._rows(kept, by_session, last_seq, kept_results))
                if ended:
                    conn.pg("DELETE FROM runs WHERE session_id = ANY(%s) AND owner = %s",
                            (ended, conn.worker_id))
                PgStore._notify(conn, "events", list(by_session))
                conn.pg("COMMIT")
            for i, result in zip(keep, kept_results):
                results[i] = result
        except BaseException:
            conn.rollback()
            raise
        return results

    @staticmethod
    def _undecided(conn, items: list[tuple[str, dict]], keep: list[int]) -> list[int]:
        """A queued message is either dropped (`unqueued`) or read (a user
        `message` with its `queued_id`), never both.  Each worker decides
        what it can see, but a drop asked of one worker while a run starts
        on another for the same session could otherwise store both; the
        session's row is locked here, so the second to commit finds the
        first and is not stored (begin and drop_queued then act on that)."""
        asked = {items[i][0] for i in keep if decides(items[i][1])}
        if not asked:
            return keep                         # the usual batch: no query at all
        # Statements of their own, after the lock: they see what a competing
        # commit stored while we waited for the lock.
        decided = {(sid, decides(e)) for sid in sorted(asked)
                   for e in Store.queue_events(conn, sid)}
        undecided = []
        for i in keep:
            sid, ev = items[i]
            if (x := decides(ev)) is not None:
                if (sid, x) in decided:
                    log.info("session %s: queued message %s was decided already; "
                             "this %s is not stored", sid, x, ev["type"])
                    continue
                decided.add((sid, x))
            undecided.append(i)
        return undecided

    @staticmethod
    def delete_session(conn, session_id: str) -> bool:
        conn.pg("BEGIN")
        try:
            gone = conn.pg("DELETE FROM sessions WHERE id = %s", (session_id,)).rowcount
            PgStore._notify(conn, "deleted", [session_id])       # events go by cascade
            conn.pg("COMMIT")
        except BaseException:
            conn.rollback()
            raise
        return gone == 1

    # -- workers and their runs (see the top of this section) -------------------
    @staticmethod
    def renew(conn, worker_id: str, lease: float) -> bool:
        """Extend our lease; False if it had run out (others may have ended
        our runs) or our row is gone.  Either way the row is made anew."""
        alive = conn.pg("UPDATE workers SET lease_until = now() + %s * interval '1 second' "
                        "WHERE id = %s AND lease_until > now()", (lease, worker_id)).rowcount
        if not alive:
            conn.pg("INSERT INTO workers (id, lease_until) VALUES (%s, now() + %s * interval "
                    "'1 second') ON CONFLICT (id) DO UPDATE SET lease_until = "
                    "excluded.lease_until", (worker_id, lease))
        return alive == 1

    @staticmethod
    def claim(conn, session_id: str, worker_id: str) -> bool:
        return conn.pg("INSERT INTO runs (session_id, owner) SELECT %s, %s WHERE EXISTS "
                       "(SELECT 1 FROM sessions WHERE id = %s) ON CONFLICT DO NOTHING",
                       (session_id, worker_id, session_id)).rowcount == 1

    @staticmethod
    def unclaim(conn, session_id: str, worker_id: str) -> None:
        conn.pg("DELETE FROM runs WHERE session_id = %s AND owner = %s", (session_id, worker_id))

    @staticmethod
    def owner(conn, session_id: str) -> str | None:
        row = conn.pg("SELECT owner FROM runs WHERE session_id = %s", (session_id,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def control(conn, payload: str) -> None:
        conn.pg("SELECT pg_notify('agent_web_control', %s)", (payload,))

    @staticmethod
    def orphans(conn) -> list[dict]:
        """Drop the claims of dead workers; the sessions running or waiting
        that nobody claims."""
        conn.pg("DELETE FROM runs WHERE owner NOT IN "
                "(SELECT id FROM workers WHERE lease_until > now())")
        conn.pg("DELETE FROM workers WHERE lease_until < now() - interval '1 day'")
        rows = conn.execute(f"SELECT {Store.SESSION_COLUMNS} FROM sessions WHERE status IN "
                            "('running', 'awaiting_approval') AND id NOT IN "
                            "(SELECT session_id FROM runs)").fetchall()
        return [Store._session_row(r) for r in rows]

    @staticmethod
    def newest(conn, session_ids: list[str]) -> dict[str, int]:
        """Each session's last stored seq (one index probe a session)."""
        return dict(conn.pg("SELECT id, (SELECT max(seq) FROM events WHERE session_id = id) "
                            "FROM unnest(%s::text[]) AS id", (session_ids,)).fetchall())

    @staticmethod
    def answer(conn, ask: str, worker_id: str, body: str) -> None:
        conn.pg("INSERT INTO answers (ask, worker, body) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING", (ask, worker_id, body))

    @staticmethod
    def answers(conn, ask: str) -> dict[str, str]:
        return dict(conn.pg("SELECT worker, body FROM answers WHERE ask = %s", (ask,)).fetchall())

    @staticmethod
    def forget_answers(conn, ask: str) -> None:
        conn.pg("DELETE FROM answers WHERE ask = %s OR at < now() - interval '1 minute'", (ask,))

    @staticmethod
    def live_workers(conn) -> list[str]:
        return [r[0] for r in conn.pg("SELECT id FROM workers WHERE lease_until > now()")]

    @staticmethod
    def expire(conn, worker_ids: list[str]) -> None:
        conn.pg("UPDATE workers SET lease_until = now() - interval '1 second' "
                "WHERE id = ANY(%s)", (worker_ids,))

    @staticmethod
    def give_back(conn, worker_id: str) -> None:
        """Every claim of ours: the next sweep, anyone's, recovers them."""
        conn.pg("DELETE FROM runs WHERE owner = %s", (worker_id,))

    @staticmethod
    def leave(conn, worker_id: str) -> None:
        PgStore.give_back(conn, worker_id)
        conn.pg("DELETE FROM workers WHERE id = %s", (worker_id,))

    OWN: dict[Callable, Callable] = {}      # Store's query -> the one PostgreSQL runs


PgStore.OWN.update({Store.append: PgStore.append, Store.delete_session: PgStore.delete_session})


class Workers(Owners):
    """This worker among the others: its lease, its claims, the notices."""

    def __init__(self, store: PgStore, registry: PushRegistry, lease: float = LEASE_S):
        self.store, self.registry = store, registry
        self.me = store.worker_id
        self.lease = lease
        self.runs: RunManager | None = None
        self._tasks: set[asyncio.Task] = set()
        self._reading: dict[str, bool] = {}    # session -> noticed again while read

    async def start(self, runs: RunManager) -> None:
        self.runs = runs
        runs.toolbox.jobs.elsewhere = self.job_elsewhere     # see "background commands"
        await self.store.lease(PgStore.renew, self.me, self.lease)
        self._spawn(self._listen(), "agent-web-pg-listen")
        self._spawn(self._keep_alive(), "agent-web-pg-lease")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.store.lease(PgStore.leave, self.me)  # others resume our waiting runs
        except StoreUnavailable:
            pass                                  # our lease runs out instead

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- Owners -------------------------------------------------------------------
    async def claim(self, session_id: str) -> bool:
        return await self.store.write(PgStore.claim, session_id, self.me)

    async def unclaim(self, session_id: str) -> None:
        try:
            await self.store.write(PgStore.unclaim, session_id, self.me)
        except StoreUnavailable:
            pass                                  # it goes with our lease

    async def elsewhere(self, session_id: str) -> str | None:
        owner = await self.store.read(PgStore.owner, session_id)
        return None if owner == self.me else owner

    async def forward(self, session_id: str, op: dict) -> bool:
        owner = await self.elsewhere(session_id)
        if owner is not None:
            await self.store.write(PgStore.control, to_json(
                {"to": owner, "session_id": session_id, **op}))
        return owner is not None

    # -- background commands, which live in the worker that started them -------------
    # A session's next run, or its page, may be served by another worker than
    # the one whose process runs its background command.  That worker asks
    # every live worker at once (a notice on agent_web_control, to "*"); each
    # answers in `answers` (the command's output, an error, its list of the
    # session's commands, or {} for "not here"), and the asker reads them
    # until the owner or everyone has answered, or ASK_WAIT has passed.  A
    # deleted session's commands end on every worker (its `deleted` notice).
    async def ask(self, session_id: str, action: str, args: dict) -> tuple[list[dict], bool]:
        """Every other live worker's answer; and whether all of them answered."""
        others = {w for w in await self.store.read(PgStore.live_workers) if w != self.me}
        if not others:
            return [], True
        ask = secrets.token_hex(8)
        await self.store.write(PgStore.control, to_json(
            {"to": "*", "from": self.me, "ask": ask, "session_id": session_id,
             "op": "jobs", "action": action, "args": args}))
        # A kill's answer may wait for TERM's grace to pass, then KILL.
        deadline = asyncio.get_running_loop().time() + ASK_WAIT + (
            core.BACKGROUND_KILL_GRACE if action == "kill" else 0)
        try:
            while True:
                await asyncio.sleep(0.02)
                got = await self.store.read(PgStore.answers, ask)
                bodies = [json.loads(body) for body in got.values()]
                done = others <= set(got)
                if done or (action != "list" and any(bodies)):
                    return bodies, done
                if asyncio.get_running_loop().time() > deadline:
                    return bodies, False
        finally:
            try:
                await self.store.write(PgStore.forget_answers, ask)
            except StoreUnavailable:
                pass                              # swept by age later

    async def job_elsewhere(self, action: str, args: dict) -> str | None:
        """BackgroundJobs.elsewhere: bash_output or bash_kill of a command
        another worker runs (the session is the tool's owner)."""
        if len(to_json(args)) > 4000:            # a notice's payload holds < 8,000 bytes
            raise core.ToolError("the arguments are too long to ask the other server "
                                 "processes about this command")
        answers, everyone = await self.ask(core.TOOL_OWNER.get(), action, args)
        for body in answers:
            if "error" in body:
                raise core.ToolError(body["error"])
            if "text" in body:
                return body["text"]
        if not everyone:
            raise core.ToolError(f"no answer about {args.get('bash_id')!r}: the server process "
                                 "that may run it did not answer in time; try again")
        return None                  # nobody has it: BackgroundJobs says so

    async def jobs_elsewhere(self, session_id: str) -> list[dict]:
        """The session's background commands in the other workers."""
        answers, _ = await self.ask(session_id, "list", {})
        return [job for body in answers for job in body.get("jobs", ())]

    async def _answer(self, op: dict) -> None:
        jobs, sid, args = self.runs.toolbox.jobs, op["session_id"], op["args"]
        body: dict = {}
        if op["action"] == "list":
            body = {"jobs": jobs.of(sid)}
        else:
            job = jobs.jobs.get(args.get("bash_id"))
            if job is not None and job.owner == sid and op["action"] in ("output", "kill"):
                core.TOOL_OWNER.set(sid)           # (this task's own context)
                try:
                    body = {"text": await getattr(jobs, op["action"])(args)}
                except Exception as exc:            # the asker's tool says what went wrong
                    body = {"error": str(exc) if isinstance(exc, core.ToolError)
                            else core.tool_failure("bash_" + op["action"], args, exc)}
        try:
            await self.store.write(PgStore.answer, op["ask"], self.me, to_json(body))
        except StoreUnavailable as exc:                 # the asker hears nothing in time
            log.warning("worker %s: could not answer about a background command: %s",
                        self.me, exc)

    async def orphans(self, store: Store) -> list[dict]:
        gone = [w for w in await self.store.lease(PgStore.live_workers)
                if w != self.me and gone_here(w)]
        if gone:
            await self.store.lease(PgStore.expire, gone)
        return await self.store.lease(PgStore.orphans)

    # -- the two loops --------------------------------------------------------------
    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 4)
            try:
                if not await self.store.lease(PgStore.renew, self.me, self.lease):
                    await self._lapsed()
                await self.runs.recover()
                await self._catch_up()                  # any notice lost meanwhile
            except Exception as exc:          # the database is away: try again
                log.warning("worker %s: lease renewal or sweep failed: %s", self.me, exc)

    async def _lapsed(self) -> None:
        """Our lease ran out before we renewed it: other workers may have
        ended our runs as interrupted already (and the store fences out
        what they would write now), so they stop, and their claims go: the
        next sweep, anyone's, ends the rest as a restart would."""
        log.error("worker %s lost its lease: its runs stop", self.me)
        tasks = [run.task for run in self.runs.runs.values() if run.task is not None]
        self.runs.runs.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.lease(PgStore.give_back, self.me)   # renew made our row anew

    async def _listen(self) -> None:
        psycopg = self.store.psycopg
        delay = 0.2
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.store.path, autocommit=True) as conn:
                    await conn.execute("LISTEN agent_web")
                    await conn.execute("LISTEN agent_web_control")
                    delay = 0.2
                    await self._catch_up()              # what came while we were away
                    async for notice in conn.notifies():
                        self._heard(notice.channel, notice.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("worker %s: notices: %s; listening again", self.me, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.lease / 4)

    async def _catch_up(self) -> None:
        """For notices that may have been lost: one query for the newest seq
        of every session listened to here, and the subscribers behind it
        read (not every subscriber, every time)."""
        listened = list(self.registry.listened())
        if listened:
            self.registry.wake_behind(await self.store.read(PgStore.newest, listened))

    async def _read_for(self, session_id: str) -> None:
        """Another worker stored events of a session listened to here: one
        read, from the subscriber furthest behind, published to them all
        (each skips what it was sent).  Notices that come meanwhile make one
        more read, not one each.  Far behind, or with the store in trouble,
        each subscriber reads at its own pace instead (WAKE)."""
        try:
            while True:
                after = self.registry.behind(session_id)
                if after is None:
                    return
                rows = await self.store.read(Store.events_after, session_id, after,
                                             FAN_OUT_CHUNK)
                if len(rows) == FAN_OUT_CHUNK:
                    self.registry.wake(session_id)
                else:
                    for i, text in enumerate(rows):
                        self.registry.publish(session_id, after + 1 + i, text)
                if not self._reading[session_id]:
                    return
                self._reading[session_id] = False
        except Exception:
            self.registry.wake(session_id)
        finally:
            del self._reading[session_id]

    def _heard(self, channel: str, payload: str) -> None:
        if channel == "agent_web":
            worker, kind, *ids = payload.split(" ")
            if worker == self.me:
                return                     # published to our subscribers already
            for session_id in ids:
                if kind == "deleted":
                    self.registry.end(session_id)
                    self._spawn(self.runs.toolbox.jobs.end(session_id), "agent-web-jobs-end")
                elif session_id in self._reading:
                    self._reading[session_id] = True
                elif self.registry.behind(session_id) is not None:
                    self._reading[session_id] = False
                    self._spawn(self._read_for(session_id), "agent-web-catch-up")
        elif channel == "agent_web_control":
            op = json.loads(payload)
            if "ask" in op:
                if op["from"] != self.me:
                    self._spawn(self._answer(op), "agent-web-answer")
            elif op.pop("to") == self.me:
                self._spawn(self.runs.control(op.pop("session_id"), op),
                            "agent-web-control")


# =============================================================================
# HTTP helpers: one place builds each ASGI message
# =============================================================================

@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list = field(default_factory=list)
    # A body sent piece by piece instead (a download), `length` bytes in all.
    stream: Any = None
    length: int = 0


def json_response(status: int, obj: Any, headers: list | None = None) -> Response:
    body = to_json(obj).encode()
    return Response(status, body, headers=headers or [])


def error_response(err: HTTPError) -> Response:
    return json_response(err.status, {"error": {"code": err.code, "message": err.message}},
                         err.headers)


async def send_response(send, resp: Response) -> None:
    length = resp.length if resp.stream is not None else len(resp.body)
    headers = [(b"content-type", resp.content_type.encode()),
               (b"content-length", str(length).encode()), *SECURITY_HEADERS,
               *[(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v)
                 for k, v in resp.headers]]
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    if resp.stream is None:
        await send({"type": "http.response.body", "body": resp.body})
        return
    async with contextlib.aclosing(resp.stream) as pieces:
        async for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class Request:
    """What a handler needs of an HTTP scope, parsed once."""

    def __init__(self, scope: dict, receive, params: dict[str, str], path: str,
                 body_timeout: float = BODY_TIMEOUT):
        self.scope, self.receive, self.params, self.path = scope, receive, params, path
        self.body_timeout = body_timeout
        self.method = scope["method"]
        self.headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            self.headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        self.root_path = scope.get("root_path", "")

    def query(self, name: str, default: str | None = None) -> str | None:
        values = urllib.parse.parse_qs(self.scope.get("query_string", b"").decode("latin-1"),
                                       keep_blank_values=True).get(name)
        if not values:
            return default
        if len(values) > 1:
            raise HTTPError(400, "bad_query", f"query parameter {name!r} is given more than once")
        return values[0]

    def query_int(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.query(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HTTPError(400, "bad_query", f"{name} must be an integer") from None
        if not low <= value <= high:
            raise HTTPError(400, "bad_query", f"{name} must be between {low} and {high}")
        return value

    async def body(self) -> bytes:
        return b"".join([piece async for piece in self.pieces(MAX_BODY_BYTES, self.body_timeout)])

    async def pieces(self, limit: int, timeout: float) -> AsyncIterator[bytes]:
        """The body as it arrives: at most `limit` bytes (413), all of it
        within `timeout` s (408): a body sent a byte a second would hold its
        connection, and a task, for ever."""
        length = self.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise HTTPError(413, "too_large", f"body over {limit:,} bytes")
        size, deadline = 0, time.monotonic() + timeout
        while True:
            try:
                message = await asyncio.wait_for(self.receive(),
                                                 max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPError(408, "body_timeout", "the request body did not arrive within "
                                f"{timeout:g} s") from None
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "disconnected", "the client went away mid-body")
            piece = message.get("body", b"")
            size += len(piece)
            if size > limit:
                raise HTTPError(413, "too_large", f"body over {limit:,} bytes")
            if piece:
                yield piece
            if not message.get("more_body", False):
                return

    async def json(self) -> dict:
        ctype = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(415, "bad_content_type", "send Content-Type: application/json")
        raw = await self.body()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise HTTPError(400, "bad_json", "the body is not valid UTF-8") from None
        except (ValueError, RecursionError):     # RecursionError: "[[[[...", nested deep
            raise HTTPError(400, "bad_json", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "bad_json", "the body must be a JSON object")
        return data


def field_str(data: dict, name: str, *, required: bool = True, limit: int = 200) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise HTTPError(400, "bad_field", f"{name} must be a string"
                        if name in data else f"{name} is required")
    if len(value) > limit:
        raise HTTPError(413 if name == "message" else 400, "too_large" if name == "message"
                        else "bad_field", f"{name} is longer than {limit} characters")
    return value


def check_session_id(value: Any) -> str:
    if not isinstance(value, str) or not SESSION_ID_RE.fullmatch(value):
        raise HTTPError(400, "bad_session_id",
                        "session_id must be 1-64 letters, digits, '_' or '-'")
    return value


# =============================================================================
# Security: Host, Origin, token
# =============================================================================

def _split_host(host: str) -> str:
    """'example.com:8080' -> 'example.com'; '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass
class Guard:
    token: str
    allowed_hosts: set[str]        # besides loopback names; "*" allows any
    allowed_origins: set[str]      # besides the same origin, e.g. "https://app.example"

    def check_host(self, headers: dict[str, str]) -> None:
        """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends
        Host: evil.example, which we refuse."""
        host = _split_host(headers.get("host", ""))
        if "*" in self.allowed_hosts or host in LOOPBACK_NAMES or host in self.allowed_hosts:
            return
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
        raise HTTPError(403, "bad_host", "this Host is not allowed; add it to "
                        "AGENT_WEB_ALLOWED_HOSTS to serve it")

    def check_origin(self, headers: dict[str, str]) -> None:
        """Browsers send Origin on cross-site requests and WebSockets.  None at
        all is a non-browser client (curl), which still needs the token."""
        origin = headers.get("origin")
        if origin is None:
            return
        if origin in self.allowed_origins:
            return
        parsed = urllib.parse.urlsplit(origin)
        if parsed.scheme in ("http", "https") and parsed.netloc.lower() == \
                headers.get("host", "").lower():
            return
        raise HTTPError(403, "bad_origin", f"requests from origin {origin!r} are refused")

    def check_token(self, headers: dict[str, str], port: int, query_token: str | None = None
                    ) -> None:
        offered = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        cookies = headers.get("cookie", "")
        name = cookie_name(port)
        for part in cookies.split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                offered.append(v)
        if query_token is not None:
            offered.append(query_token)
        if not any(hmac.compare_digest(t.encode(), self.token.encode()) for t in offered):
            raise HTTPError(401, "unauthorized", "a valid token is required: open the URL "
                            "the server printed at start-up")


def rss_kb() -> int:
    """Resident memory of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class LagProbe:
    """How late the event loop runs a timer: the time anything blocked it.
    The server runs one only if AGENT_WEB_LAG_PROBE is set (it wakes the loop
    100 times a second); bench/store.py runs a faster one in process."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.samples: list[float] = []
        self.task = asyncio.create_task(self._run(), name="agent-web-lag-probe")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval)
            self.samples.append((loop.time() - start - self.interval) * 1000)
            del self.samples[:-20_000]

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def percentiles(self, reset: bool = True) -> dict:
        data = sorted(self.samples)
        if reset:
            self.samples.clear()
        if not data:
            return {"n": 0}
        return {"n": len(data), "p50": data[len(data) // 2],
                "p99": data[min(len(data) - 1, int(len(data) * 0.99))], "max": data[-1]}


def session_cursor(text: str) -> tuple[float, str]:
    """A `next` cursor of GET /agent/sessions back into (updated_at, id)."""
    stamp, bar, sid = text.partition("|")
    try:
        when = float(stamp)
    except ValueError:
        when = math.nan
    if not bar or not math.isfinite(when) or not sid:
        raise HTTPError(400, "bad_query", "after must be a `next` cursor from this route")
    return when, sid


def cookie_name(port: int) -> str:
    return f"{TOKEN_COOKIE}_{port}"


def server_port(scope: dict) -> int:
    server = scope.get("server") or ("", 0)
    return int(server[1] or 0)


# =============================================================================
# The app: handlers, WebSocket, route table, dispatch
# =============================================================================

Handler = Callable[["AgentWebApp", Request], Awaitable[Response]]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:                      # os.write may take only part of it
        view = view[os.write(fd, view):]


def markdown_transcript(session: dict, events: list[dict]) -> str:
    """A session as Markdown: what was said, each tool call with its result."""
    def fence(text: str, lang: str = "") -> str:
        ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
        return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"
    out = [f"# {session['title'] or 'Session'}", "",
           f"Session `{session['session_id']}`, exported from Mini Agent Web.", ""]
    for ev in events:
        kind = ev["type"]
        if kind == "message" and ev["role"] == "user":
            out += ["## You", "", ev["content"], ""]
        elif kind == "message" and ev.get("content"):
            out += ["## Agent" + (" (cut off)" if ev.get("incomplete") else ""), "",
                    ev["content"], ""]
        elif kind == "tool_call":
            args = (ev["input"].get("command", "") if ev["tool"] == "bash"
                    else json.dumps(ev["input"], ensure_ascii=False, indent=2))
            out += [f"**Tool `{ev['tool']}`**", "", fence(args, "bash" if ev["tool"] == "bash"
                                                          else "json"), ""]
        elif kind == "tool_result":
            out += [f"Result ({'error' if ev['is_error'] else 'ok'}):", "",
                    fence(core.terminal_text(ev["output"])), ""]
        elif kind == "compaction":
            out += [f"*Context compacted: {ev['tokens_before']:,} → {ev['tokens_after']:,} "
                    "tokens.*", ""]
        elif kind == "error" and not ev.get("retrying"):
            out += [f"> Error: {ev['message']}", ""]
        elif kind == "done" and ev["status"] != "done":
            out += [f"*Run {ev['status']}: {ev['summary']}*", ""]
    return "\n".join(out).rstrip() + "\n"


class AgentWebApp:
    """The ASGI callable.  Holds every piece of state; nothing lives at module
    level, so two apps (two tests, two mounts) never share anything."""

    def __init__(self, *, db_path: str | Path, workspace: str | Path, token: str | None,
                 llm_config: core.LLMConfig | None, allowed_hosts: set[str],
                 allowed_origins: set[str], approve: str, max_steps: int,
                 queue_size: int, body_timeout: float = BODY_TIMEOUT,
                 tools: dict[str, bool] | None = None,
                 mcp_servers: list[core.McpServer] | None = None,
                 skills: core.Skills | None = None, coalesce: float = COALESCE_S,
                 lease: float = LEASE_S, read_pace: float = READ_PACE_S):
        self.db_path, self.workspace = db_path, workspace
        self.lease = lease                    # PostgreSQL: a worker's lease, seconds
        self.coalesce = coalesce              # EventLog's pacing window, seconds
        self.read_pace = read_pace            # ReadPacer's window, seconds
        self.tool_options = tools or {}       # Toolbox(**): config.yaml's tools.enable_*
        self.mcp_servers = mcp_servers or []
        self.skills = skills or core.Skills(None)
        self.token = token
        self.guard = Guard(token or "", allowed_hosts, allowed_origins)
        self.llm_config = llm_config
        self.approve, self.max_steps, self.queue_size = approve, max_steps, queue_size
        self.body_timeout = body_timeout
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self.db_lock = DatabaseLock(db_path)
        # a name for this process among the workers of one PostgreSQL database
        self.worker_id = worker_name()
        self.workers: Workers | None = None
        # set by start():
        self.store: Store
        self.registry: PushRegistry
        self.events: EventLog
        self.runs: RunManager
        self.http = None
        self.lag_probe: LagProbe | None = None

    # -- life cycle --------------------------------------------------------------
    async def start(self) -> None:
        """Open everything.  Called by lifespan, or lazily by the first request
        (a mounted app may never see lifespan)."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            if self.llm_config is None:
                self.llm_config = core.config_from_env()
            if not self.token:
                self.token = self.guard.token = secrets.token_urlsafe(24)
            self.db_lock.acquire()            # before anything is written
            Path(self.workspace).mkdir(parents=True, exist_ok=True)
            self.store = (PgStore(self.db_path, self.worker_id) if is_postgres(self.db_path)
                          else Store(self.db_path))
            await self.store.open()
            self.registry = PushRegistry(self.queue_size)
            self.workers = (Workers(self.store, self.registry, self.lease)
                            if isinstance(self.store, PgStore) else None)
            self.events = EventLog(self.store, self.registry, self.coalesce)
            self.events.start()
            self.http = core.make_http_client(self.llm_config, self.read_pace)
            self.toolbox = core.Toolbox(self.workspace, **self.tool_options)
            self.toolbox.add_skills(self.skills)
            prompt = core.with_skills(self.llm_config.system_prompt, self.skills)
            self.llm_config = dataclasses.replace(
                self.llm_config, system_prompt=core.with_workspace(prompt, self.workspace))
            # MCP servers start side by side, each within its connect_timeout.
            await core.start_mcp(self.mcp_servers, self.toolbox)
            self.runs = RunManager(self.events, self.store,
                                   core.make_llm(self.llm_config, self.http), self.llm_config,
                                   self.toolbox, self.max_steps, self.workers)
            if self.workers:
                await self.workers.start(self.runs)   # our lease before any claim
            await self.runs.recover()
            if os.environ.get("AGENT_WEB_LAG_PROBE"):      # bench/ only: see LagProbe
                self.lag_probe = LagProbe()
            self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.lag_probe:
            await self.lag_probe.stop()
            self.lag_probe = None
        await self.runs.shutdown()
        await self.toolbox.jobs.end()             # no background command outlives us
        await asyncio.gather(*(server.close() for server in self.mcp_servers))
        await self.events.stop()
        if self.workers:
            await self.workers.stop()
        await self.http.aclose()
        await asyncio.get_running_loop().run_in_executor(None, self.store.close)
        self.db_lock.release()

    # -- ASGI entry: the one place scope["type"] is switched on ----------------------
    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle_http(scope, receive, send)
        elif kind == "websocket":
            await self.handle_websocket(scope, receive, send)
        elif kind == "lifespan":
            await self.handle_lifespan(receive, send)

    async def handle_lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except DatabaseInUse as exc:      # one clear line (the server logs it)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    def app_path(scope: dict) -> str:
        """The path inside this app: `root_path` stripped when a host app left
        it on (Starlette's Mount does since 0.33, per the ASGI spec)."""
        path, root = scope.get("path", "/"), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return path or "/"

    async def handle_http(self, scope, receive, send) -> None:
        path = self.app_path(scope)
        try:
            handler, params, needs_token = match_route(scope["method"], path)
            request = Request(scope, receive, params, path, self.body_timeout)
            self.guard.check_host(request.headers)
            await self.start()
            if needs_token:
                if scope["method"] not in ("GET", "HEAD"):
                    self.guard.check_origin(request.headers)
                self.guard.check_token(request.headers, server_port(scope))
            response = await handler(self, request)
        except HTTPError as err:
            response = error_response(err)
        except Exception:
            log.error("500 on %s %s\n%s", scope["method"], path, traceback.format_exc())
            response = json_response(500, {"error": {"code": "internal",
                                                     "message": "internal server error"}})
        await send_response(send, response)

    # -- page and assets ------------------------------------------------------------
    async def page(self, req: Request) -> Response:
        token = req.query("token")
        if token is not None:
            # Trade the token in the URL for a cookie, then drop it from the
            # address bar (and so from history and bookmarks).
            self.guard.check_token({}, 0, token)
            rest = urllib.parse.parse_qsl(req.scope.get("query_string", b"").decode("latin-1"))
            query = urllib.parse.urlencode([(k, v) for k, v in rest if k != "token"])
            root = req.root_path or ""
            cookie = (f"{cookie_name(server_port(req.scope))}={self.token}; HttpOnly; "
                      f"SameSite=Strict; Path={root or '/'}")
            return Response(303, b"", "text/plain",
                            [("location", f"{root}/" + (f"?{query}" if query else "")),
                             ("set-cookie", cookie)])
        if req.root_path and req.scope.get("path", "") == req.root_path:
            # Mounted at /prefix and asked for "/prefix": the page's relative
            # URLs need the trailing slash.
            return Response(307, b"", "text/plain", [("location", f"{req.root_path}/")])
        return self.static_file("index.html", csp=True)

    async def static(self, req: Request) -> Response:
        return self.static_file(req.params["path"])

    @staticmethod
    def static_file(name: str, csp: bool = False) -> Response:
        path = (STATIC_DIR / name).resolve()
        if STATIC_DIR.resolve() not in path.parents or not path.is_file():
            raise HTTPError(404, "not_found", "no such file")
        ctype = STATIC_TYPES.get(path.suffix, "application/octet-stream")
        headers = [("content-security-policy", CSP)] if csp else []
        return Response(200, path.read_bytes(), ctype, headers)

    async def healthz(self, req: Request) -> Response:
        return json_response(200, {"ok": True})

    async def get_config(self, req: Request) -> Response:
        cfg = self.llm_config
        return json_response(200, {"provider": cfg.provider, "model": cfg.model,
                                   "demo": cfg.provider == "demo", "approve": self.approve,
                                   "approve_modes": list(core.APPROVAL_MODES),
                                   "workspace": str(Path(self.workspace).resolve()),
                                   "limits": {"message_chars": MAX_MESSAGE_CHARS,
                                              "body_bytes": MAX_BODY_BYTES,
                                              "ws_frame_bytes": MAX_WS_FRAME_BYTES}})

    async def get_tools(self, req: Request) -> Response:
        """Extension: the tools the model is offered, by source (built-in,
        mcp:<server>), and each MCP server's state and error."""
        return json_response(200, self.toolbox.describe())

    async def get_stats(self, req: Request) -> Response:
        """Extension: what the process holds now, for leak checks and bench/."""
        return json_response(200, {
            "runs": len(self.runs.runs), "subscribers": self.registry.count(),
            "tasks": len(asyncio.all_tasks()), "rss_kb": rss_kb(),
            "commits": self.events.commits, "wal_checkpoints": self.store.checkpoints,
            "seconds_in_sqlite": dict(self.store.seconds_in_sqlite),
            "process_seconds": time.process_time(),
            # which of the workers answered (PostgreSQL; None with SQLite)
            "worker": self.worker_id if self.workers else None,
            "loop_lag_ms": self.lag_probe.percentiles() if self.lag_probe else None})

    # -- sessions and runs --------------------------------------------------------------
    async def session_or_404(self, session_id: str) -> dict:
        session = await self.store.read(Store.get_session, check_session_id(session_id))
        if session is None:
            raise HTTPError(404, "unknown_session", "no such session")
        return session

    async def post_chat(self, req: Request) -> Response:
        data = await req.json()
        text = core.storable(field_str(data, "message", limit=MAX_MESSAGE_CHARS))
        if not text.strip():
            raise HTTPError(400, "empty_message", "message is empty")
        mode = data.get("approve_mode")
        if mode is not None and mode not in core.APPROVAL_MODES:
            raise HTTPError(400, "bad_field", f"approve_mode must be one of {core.APPROVAL_MODES}")
        if data.get("session_id") is None:
            session_id = core.new_id("s")
            mode = mode or self.approve
            await self.store.write(Store.create_session, session_id, mode)
        else:
            session = await self.session_or_404(data["session_id"])
            session_id = session["session_id"]
            if mode is not None and mode != session["approve_mode"]:
                await self.store.write(Store.set_approve_mode, session_id, mode)
            mode = mode or session["approve_mode"]
        queue = data.get("queue", False)
        if not isinstance(queue, bool):
            raise HTTPError(400, "bad_field", "queue must be true or false")
        if queue and await self.runs.running(session_id):
            # Steering: stored at once, the running agent reads it at its next
            # step (see "Queued messages" above RunManager).
            stored = await self.runs.enqueue(session_id, text)
            return json_response(202, {"session_id": session_id, "seq": stored["seq"],
                                       "queued": True, "message_id": stored["message_id"]})
        stored = await self.runs.begin(self.runs.reserve(session_id), mode, text)
        return json_response(202, {"session_id": session_id, "seq": stored["seq"]})

    async def drop_queued(self, req: Request) -> Response:
        """Take back a queued message the agent has not read yet."""
        session = await self.session_or_404(req.params["id"])
        sid, mid = session["session_id"], req.params["message_id"]
        if not await self.runs.drop_queued(sid, mid):
            raise HTTPError(409, "not_queued", "that message is not waiting in the queue "
                            "(the agent has read it, or it was dropped)")
        return Response(204, b"", "text/plain")

    async def get_chat(self, req: Request) -> Response:
        session_id = check_session_id(req.query("session_id"))
        limit = req.query_int("limit", HISTORY_LIMIT_DEFAULT, 1, HISTORY_LIMIT_MAX)
        after = req.query_int("after", 0, 0, 2**62)
        tail = req.query_int("tail", 0, 0, HISTORY_LIMIT_MAX)
        if tail:
            # Extension: the newest `tail` events, for opening a long session.
            session = await self.session_or_404(session_id)
            after, limit = max(after, session["last_seq"] - tail), tail
        session, rows = await self.store.read(Store.history, session_id, after, limit)
        if session is None:
            raise HTTPError(404, "unknown_session", "no such session")
        # Events are stored as their wire JSON: splice them in, no re-encoding.
        head = to_json({"session_id": session_id, "title": session["title"],
                        "status": session["status"], "approve_mode": session["approve_mode"],
                        "last_seq": session["last_seq"],
                        "has_more": bool(rows) and after + len(rows) < session["last_seq"]})
        body = (head[:-1] + ',"events":[' + ",".join(rows) + "]}").encode()
        return Response(200, body)

    async def post_cancel(self, req: Request) -> Response:
        data = await req.json()
        session = await self.session_or_404(data.get("session_id"))
        await self.runs.cancel(session["session_id"])
        return json_response(202, {"session_id": session["session_id"]})

    async def post_approve(self, req: Request) -> Response:
        data = await req.json()
        session = await self.session_or_404(data.get("session_id"))
        call_id = field_str(data, "call_id")
        decision = data.get("decision")
        if decision not in DECISIONS:
            raise HTTPError(400, "bad_field", "decision must be allow, deny or allow_always")
        await self.runs.approve(session["session_id"], call_id, decision)
        return json_response(202, {"session_id": session["session_id"], "call_id": call_id})

    async def list_sessions(self, req: Request) -> Response:
        """`?q=TEXT` keeps the sessions whose title or messages hold it, each
        saying where when a `limit` is given (`found`, see Store.found_in).
        `?limit=N` (1-1000) gives the newest N and, when there are more, a
        `next` cursor: `?limit=N&after=CURSOR` gives the N after them.  Without
        `limit`, every session (and `next` null), as before."""
        text = (req.query("q") or "").strip()
        if len(text) > MAX_TITLE_CHARS:
            raise HTTPError(400, "bad_query", f"q is longer than {MAX_TITLE_CHARS} characters")
        limit = (req.query_int("limit", 0, 1, MAX_SESSION_PAGE)
                 if req.query("limit") is not None else None)
        after = session_cursor(req.query("after")) if req.query("after") is not None else None
        if after is not None and limit is None:
            raise HTTPError(400, "bad_query", "after needs a limit")
        # One row more than asked says whether there is a next page.
        sessions = await self.store.read(Store.list_sessions, core.storable(text),
                                         limit + 1 if limit else None, after)
        more = limit is not None and len(sessions) > limit
        if more:
            del sessions[limit:]
        if text and limit is not None:       # (a page of them: not every session there is)
            found = await self.store.read(Store.found_in,
                                          [s["session_id"] for s in sessions], text)
            for session in sessions:
                session["found"] = found.get(session["session_id"])
        last = sessions[-1] if more else None
        answer = {"sessions": sessions,
                  "next": last and f"{last['updated_at']!r}|{last['session_id']}"}
        if len(sessions) <= MAX_SESSION_PAGE:
            return json_response(200, answer)
        # The whole list of a long-lived server: encoded off the event loop.
        return Response(200, await asyncio.to_thread(lambda: to_json(answer).encode()))

    async def patch_session(self, req: Request) -> Response:
        """`{"approve_mode"}`, `{"title"}`, or both."""
        session = await self.session_or_404(req.params["id"])
        data = await req.json()
        if not {"approve_mode", "title"} & set(data):
            raise HTTPError(400, "bad_field", "give approve_mode or title")
        mode, title = data.get("approve_mode"), data.get("title")
        if "approve_mode" in data and mode not in core.APPROVAL_MODES:
            raise HTTPError(400, "bad_field", f"approve_mode must be one of {core.APPROVAL_MODES}")
        if "title" in data:
            if not isinstance(title, str) or not title.strip():
                raise HTTPError(400, "bad_field", "title must be a non-empty string")
            if len(title) > MAX_TITLE_CHARS:
                raise HTTPError(400, "bad_field",
                                f"title is longer than {MAX_TITLE_CHARS} characters")
            title = " ".join(core.storable(title).split())
            await self.store.write(Store.set_title, session["session_id"], title)
            session = {**session, "title": title}
        if mode is not None:
            await self.store.write(Store.set_approve_mode, session["session_id"], mode)
            await self.runs.set_mode(session["session_id"], mode)
            session = {**session, "approve_mode": mode}
        return json_response(200, session)

    async def fork_session(self, req: Request) -> Response:
        """A new session holding this one's events before `before_seq` (the
        original is untouched), ending with a `forked` event that says where
        it came from: "edit and resend", "regenerate"."""
        session = await self.session_or_404(req.params["id"])
        data = await req.json()
        before = data.get("before_seq")
        if not isinstance(before, int) or isinstance(before, bool) or not (
                1 <= before <= session["last_seq"] + 1):
            raise HTTPError(400, "bad_field", "before_seq must be a seq of this session "
                            f"(1 to {session['last_seq'] + 1})")
        sid = core.new_id("s")
        title = (session["title"] or "Session")[:MAX_TITLE_CHARS - 9] + " (edited)"
        await self.events.flush()             # every event before it is stored
        if not await self.store.write(Store.fork_session, session["session_id"], sid,
                                      before, title):
            raise HTTPError(404, "unknown_session", "no such session")
        await self.events.emit(sid, {"type": "forked", "from_session": session["session_id"],
                                     "before_seq": before, "from_title": session["title"]})
        forked = await self.store.read(Store.get_session, sid)
        return json_response(201, forked)

    # -- workspace files: list, download, upload ---------------------------------
    # The page's file panel.  Paths are the file tools' paths (relative to the
    # workspace), and they are opened the way the file tools open them
    # (Toolbox.resolve, folder descriptors walked down with O_NOFOLLOW), so
    # nothing outside the workspace is listed, read or written, a symlink
    # out included.  A download is read and sent a piece at a time; an
    # upload (at most MAX_UPLOAD_BYTES) is written a piece at a time to a
    # temporary file beside its target, which a rename puts in place once it
    # is whole: never held in memory, never seen half written.  The disk
    # work runs on threads.
    def _file_error(self, exc: Exception, path: str) -> HTTPError:
        if isinstance(exc, core.ToolError):
            text = str(exc)
            return HTTPError(403 if "outside the workspace" in text or "symbolic link" in text
                             else 400, "bad_path", text)
        if isinstance(exc, FileNotFoundError):
            return HTTPError(404, "not_found", f"no such file or folder: {path}")
        if isinstance(exc, (NotADirectoryError, IsADirectoryError)):
            return HTTPError(400, "bad_path", f"{path}: {exc.strerror}")
        if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
            return HTTPError(403, "bad_path", f"{path} is a symbolic link; refused")
        raise exc

    async def list_files(self, req: Request) -> Response:
        """A folder's first FILES_LISTED entries (folders first, then by
        name), and how many `more` it holds: a cache folder of 100,000 files
        would be megabytes of JSON, encoded on the event loop, for a list
        nobody reads."""
        path = req.query("path", "") or ""
        try:
            entries = await core.in_file_thread(self.toolbox.list_folder, path)
        except (core.ToolError, OSError) as exc:
            raise self._file_error(exc, path) from None
        return json_response(200, {"path": path, "entries": entries[:FILES_LISTED],
                                   "more": max(0, len(entries) - FILES_LISTED)})

    async def download_file(self, req: Request) -> Response:
        path = req.query("path") or ""
        try:
            fd = await core.in_file_thread(self.toolbox.open_file, path)
        except (core.ToolError, OSError) as exc:
            raise self._file_error(exc, path) from None
        size = os.fstat(fd).st_size

        async def pieces():
            try:
                left = size
                while left > 0:
                    piece = await core.in_file_thread(os.read, fd, min(DOWNLOAD_PIECE, left))
                    if not piece:
                        break
                    left -= len(piece)
                    yield piece
            finally:
                os.close(fd)
        name = urllib.parse.quote(Path(path).name)
        return Response(200, b"", "application/octet-stream",
                        [("content-disposition", f"attachment; filename*=UTF-8''{name}")],
                        stream=pieces(), length=size)

    async def upload_file(self, req: Request) -> Response:
        path = req.query("path") or ""
        length = req.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_UPLOAD_BYTES:     # before a file is made
            raise HTTPError(413, "too_large", f"an upload may be {MAX_UPLOAD_BYTES >> 20} MiB")
        try:
            folder, fd, temp, name = await core.in_file_thread(self.toolbox.open_new_file, path)
        except (core.ToolError, OSError) as exc:
            raise self._file_error(exc, path) from None
        size, done = 0, False
        try:
            async for piece in req.pieces(MAX_UPLOAD_BYTES, UPLOAD_TIMEOUT):
                await core.in_file_thread(_write_all, fd, piece)
                size += len(piece)
            os.close(fd)
            fd = -1
            await core.in_file_thread(functools.partial(os.replace, temp, name,
                                                        src_dir_fd=folder, dst_dir_fd=folder))
            done = True
        finally:
            if fd >= 0:
                os.close(fd)
            if not done:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=folder)
            os.close(folder)
        return json_response(201, {"path": path, "size": size})

    async def export_session(self, req: Request) -> Response:
        """A download of the session: `?format=md` (a readable transcript) or
        `json` (its stored events, the streamed fragments left out)."""
        session = await self.session_or_404(req.params["id"])
        kind = req.query("format", "md")
        if kind not in ("md", "json"):
            raise HTTPError(400, "bad_query", "format must be md or json")
        events = await self.store.read(Store.conversation, session["session_id"])
        name = re.sub(r"[^\w.-]+", "-", session["title"] or session["session_id"]).strip("-")
        # Written off the event loop: a session of 10,000 events is 20 ms of
        # JSON, 14 of Markdown, that every other session would wait for.
        if kind == "json":
            body = await asyncio.to_thread(
                lambda: to_json({"session": session, "events": events}).encode())
            ctype = "application/json"
        else:
            body = await asyncio.to_thread(
                lambda: markdown_transcript(session, events).encode())
            ctype = "text/markdown; charset=utf-8"
        return Response(200, body, ctype, [
            ("content-disposition", f'attachment; filename="{name[:60] or "session"}.{kind}"')])

    async def delete_session(self, req: Request) -> Response:
        session = await self.session_or_404(req.params["id"])
        sid = session["session_id"]
        run = self.runs.runs.get(sid)
        if run is not None and run.task is not None:
            run.task.cancel()       # nothing of it will be kept: no need for a clean end
            await asyncio.gather(run.task, return_exceptions=True)
        await self.toolbox.jobs.end(sid)     # its background commands go with it
        await self.events.flush()
        await self.store.write(Store.delete_session, sid)
        self.registry.end(sid)
        return Response(204, b"", "text/plain")

    async def get_background(self, req: Request) -> Response:
        """Extension: the session's background commands (bash with
        run_in_background) with their latest output; those its events name
        that no live process knows ended with a restart: `gone`."""
        session = await self.session_or_404(req.params["id"])
        sid = session["session_id"]
        jobs = self.toolbox.jobs.of(sid)
        named = [(found.group(1), started)
                 for started in await self.store.read(Store.background_starts, sid)
                 if (found := BACKGROUND_STARTED.match(started["output"]))]
        known = {j["bash_id"] for j in jobs}
        if self.workers and any(bash_id not in known for bash_id, _ in named):
            jobs += await self.workers.jobs_elsewhere(sid)   # other workers may run them
            known = {j["bash_id"] for j in jobs}
        for bash_id, started in named:
            if bash_id not in known:
                jobs.append({"bash_id": bash_id, "command": started["command"],
                             "started": started["ts"], "running": False, "exit_code": None,
                             "output_tail": "", "gone": True})
        return json_response(200, {"session_id": sid, "jobs": jobs})

    # -- WebSocket -----------------------------------------------------------------------
    async def handle_websocket(self, scope, receive, send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        path = self.app_path(scope)
        try:
            if path != "/agent/ws":
                raise HTTPError(404, "not_found", "no such WebSocket route")
            self.guard.check_host(headers)
            self.guard.check_origin(headers)
            await self.start()
            query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
            self.guard.check_token(headers, server_port(scope), (query.get("token") or [None])[0])
        except HTTPError as err:
            # Refuse the handshake with a real HTTP status where the server
            # supports it (uvicorn does); otherwise a bare 403.
            if "websocket.http.response" in scope.get("extensions", {}):
                resp = error_response(err)
                await send({"type": "websocket.http.response.start", "status": resp.status,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "websocket.http.response.body", "body": resp.body})
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        conn = Connection(self, send)
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                text, data = message.get("text"), message.get("bytes")
                size = len(text.encode()) if text is not None else len(data or b"")
                if size > MAX_WS_FRAME_BYTES:
                    await conn.close(CLOSE_TOO_BIG, "frame too big")
                    break
                if text is None:
                    await conn.error("bad_frame", "binary frames are not supported; send JSON text")
                    continue
                await conn.on_frame(text)
        finally:
            await conn.stop()


class Connection:
    """One accepted WebSocket: frames in from `handle_websocket`, events out
    from the writer task of its current subscription.  `send` is shared, so a
    lock keeps frames whole."""

    def __init__(self, app: AgentWebApp, send):
        self.app, self._send = app, send
        self._lock = asyncio.Lock()
        self.session_id: str | None = None
        self.sub: Subscriber | None = None
        self.writer: asyncio.Task | None = None
        self.closed = False

    async def send_text(self, text: str) -> None:
        async with self._lock:
            if not self.closed:
                await self._send({"type": "websocket.send", "text": text})

    async def control(self, frame: dict) -> None:
        await self.send_text(to_json(frame))

    async def error(self, code: str, message: str) -> None:
        await self.control({"type": "error", "code": code, "message": message})

    async def close(self, code: int, reason: str = "") -> None:
        async with self._lock:
            if not self.closed:
                self.closed = True
                try:
                    await self._send({"type": "websocket.close", "code": code, "reason": reason})
                except Exception:         # the peer is gone already
                    pass

    async def on_frame(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError):
            return await self.error("bad_json", "frames must be JSON objects")
        if not isinstance(frame, dict):
            return await self.error("bad_json", "frames must be JSON objects")
        kind = frame.get("type")
        handler = WS_FRAMES.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return await self.error("unknown_type", f"unknown frame type {kind!r}; "
                                    f"expected one of {sorted(WS_FRAMES)}")
        try:
            await handler(self, frame)
        except HTTPError as err:
            await self.error(err.code, err.message)

    # -- client frames ---------------------------------------------------------------
    async def on_subscribe(self, frame: dict) -> None:
        session_id = check_session_id(frame.get("session_id"))
        after = frame.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise HTTPError(400, "bad_field", "after must be a non-negative integer")
        await self.unsubscribe()     # a second subscribe replaces the first
        # 1. register, so nothing committed from now on can be missed ...
        sub = self.app.registry.subscribe(session_id)
        session, rows = await self.app.store.read(Store.history, session_id, after, REPLAY_CHUNK)
        if session is None:
            self.app.registry.unsubscribe(sub)
            raise HTTPError(404, "unknown_session", "no such session")
        self.session_id, self.sub = session_id, sub
        await self.control({"type": "subscribed", "session_id": session_id,
                            "last_seq": session["last_seq"], "status": session["status"]})
        self.writer = asyncio.create_task(self._pump(sub, session_id, after, rows),
                                          name=f"ws-writer-{session_id}")

    async def _pump(self, sub: Subscriber, session_id: str, after: int, rows: list[str]) -> None:
        """2. replay the store after `after` ... 3. then drain the queue,
        skipping whatever the replay already sent (a WAKE, or a seq past the
        next one, reads the store again: see "Many workers")."""
        sub.last = after        # while it replays, what other workers' events are read from
        try:
            sub.last = last = await self._replay(session_id, after, rows)
            while True:
                item = await sub.queue.get()
                if item is OVERFLOWED:
                    await self.close(CLOSE_SLOW_CONSUMER, "too slow: resubscribe from your last seq")
                    return
                if item is DELETED:
                    await self.control({"type": "session_deleted", "session_id": session_id})
                    await self.close(CLOSE_SESSION_DELETED, "the session was deleted")
                    return
                if item is WAKE or item[0] > last + 1:
                    # Stored by another worker, or after events that were
                    # (their notice comes later): the store has them all.
                    sub.last = last = await self._replay(session_id, last)
                    continue
                seq, text = item
                if seq > last:
                    await self.send_text(text)
                    sub.last = last = seq
        except asyncio.CancelledError:
            raise
        except Exception:                # the socket went away under us
            self.closed = True
        finally:
            self.app.registry.unsubscribe(sub)

    async def _replay(self, session_id: str, last: int, rows: list[str] | None = None) -> int:
        """Send the stored events after `last`; returns the new last seq."""
        while True:
            if rows is None:
                rows = await self.app.store.read(Store.events_after, session_id, last,
                                                 REPLAY_CHUNK)
            for text in rows:
                await self.send_text(text)
            last += len(rows)        # seq has no gaps: the rows were last+1 ..
            if len(rows) < REPLAY_CHUNK:
                return last
            rows = None

    async def on_cancel(self, frame: dict) -> None:
        session_id = self._target(frame)
        await self.app.runs.cancel(session_id)

    async def on_approve(self, frame: dict) -> None:
        session_id = self._target(frame)
        call_id, decision = frame.get("call_id"), frame.get("decision")
        if not isinstance(call_id, str) or decision not in DECISIONS:
            raise HTTPError(400, "bad_field", "approve needs call_id and a decision of "
                            "allow, deny or allow_always")
        await self.app.runs.approve(session_id, call_id, decision)

    async def on_ping(self, frame: dict) -> None:
        await self.control({"type": "pong"})

    def _target(self, frame: dict) -> str:
        if frame.get("session_id") is not None:
            return check_session_id(frame["session_id"])
        if self.session_id is None:
            raise HTTPError(400, "not_subscribed", "subscribe to a session first")
        return self.session_id

    async def unsubscribe(self) -> None:
        if self.writer is not None:
            self.writer.cancel()
            await asyncio.gather(self.writer, return_exceptions=True)
            self.writer = None
        if self.sub is not None:
            self.app.registry.unsubscribe(self.sub)
            self.sub = None

    async def stop(self) -> None:
        await self.unsubscribe()


WS_FRAMES: dict[str, Callable[[Connection, dict], Awaitable[None]]] = {
    "subscribe": Connection.on_subscribe,
    "cancel": Connection.on_cancel,
    "approve": Connection.on_approve,
    "ping": Connection.on_ping,
}


# =============================================================================
# Route table: data, not an if-ladder
# =============================================================================
#
# (method, path pattern, handler, needs token).  `{name}` matches one path
# segment, `{name:path}` the rest.  A path that matches with the wrong method
# is a 405 carrying `Allow`.

ROUTES: list[tuple[str, str, Handler, bool]] = [
    ("GET", "/", AgentWebApp.page, False),
    ("GET", "/static/{path:path}", AgentWebApp.static, False),
    ("GET", "/healthz", AgentWebApp.healthz, False),
    ("GET", "/agent/config", AgentWebApp.get_config, True),
    ("GET", "/agent/stats", AgentWebApp.get_stats, True),
    ("GET", "/agent/tools", AgentWebApp.get_tools, True),
    ("POST", "/agent/chat", AgentWebApp.post_chat, True),
    ("GET", "/agent/chat", AgentWebApp.get_chat, True),
    ("POST", "/agent/cancel", AgentWebApp.post_cancel, True),
    ("POST", "/agent/approve", AgentWebApp.post_approve, True),
    ("GET", "/agent/sessions", AgentWebApp.list_sessions, True),
    ("PATCH", "/agent/sessions/{id}", AgentWebApp.patch_session, True),
    ("DELETE", "/agent/sessions/{id}", AgentWebApp.delete_session, True),
    ("GET", "/agent/sessions/{id}/export", AgentWebApp.export_session, True),
    ("POST", "/agent/sessions/{id}/fork", AgentWebApp.fork_session, True),
    ("DELETE", "/agent/sessions/{id}/queue/{message_id}", AgentWebApp.drop_queued, True),
    ("GET", "/agent/files", AgentWebApp.list_files, True),
    ("GET", "/agent/files/raw", AgentWebApp.download_file, True),
    ("PUT", "/agent/files/raw", AgentWebApp.upload_file, True),
    ("GET", "/agent/sessions/{id}/background", AgentWebApp.get_background, True),
]


def _compile(pattern: str) -> re.Pattern:
    regex = re.sub(r"\{(\w+):path\}", r"(?P<\1>.+)", pattern)
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", regex)
    return re.compile(regex)


COMPILED_ROUTES = [(method, _compile(pattern), handler, auth)
                   for method, pattern, handler, auth in ROUTES]


def match_route(method: str, path: str) -> tuple[Handler, dict, bool]:
    allowed = []
    for route_method, regex, handler, auth in COMPILED_ROUTES:
        m = regex.fullmatch(path)
        if m is None:
            continue
        if route_method == method or (method == "HEAD" and route_method == "GET"):
            return handler, {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}, auth
        allowed.append(route_method)
    if allowed:
        raise HTTPError(405, "method_not_allowed", f"{method} is not allowed here",
                        [("allow", ", ".join(sorted(set(allowed))))])
    raise HTTPError(404, "not_found", f"no route for {path}")


# =============================================================================
# create_app and the module-level app
# =============================================================================

def _env_set(name: str) -> set[str]:
    return {h.strip().lower() for h in os.environ.get(name, "").split(",") if h.strip()}


def create_app(*, db_path: str | Path | None = None, workspace: str | Path | None = None,
               token: str | None = None, llm_config: core.LLMConfig | None = None,
               provider: str | None = None, model: str | None = None,
               allowed_hosts: set[str] | list[str] | None = None,
               allowed_origins: set[str] | list[str] | None = None,
               approve: str | None = None, max_steps: int = core.DEFAULT_MAX_STEPS,
               queue_size: int | None = None, body_timeout: float | None = None,
               tools: dict[str, bool] | None = None, mcp_config: str | Path | None = None,
               skills_dir: str | Path | None = None, config: core.ConfigFile | None = None,
               coalesce_ms: float | None = None, lease: float | None = None,
               read_pace_ms: float | None = None) -> AgentWebApp:
    """The ASGI app.  Every argument defaults from the environment, then from
    the constants above; nothing is opened until the app starts."""
    window_ms = (coalesce_ms if coalesce_ms is not None
                 else core.env_number(os.environ, "AGENT_WEB_COALESCE_MS", float))
    pace_ms = (read_pace_ms if read_pace_ms is not None
               else core.env_number(os.environ, "AGENT_WEB_READ_PACE_MS", float))
    db_path = db_path or os.environ.get("AGENT_WEB_DB", DEFAULT_DB)
    if is_postgres(db_path):
        psycopg_module()                  # a usage error now, not at the first request
    approve = approve or os.environ.get("AGENT_APPROVE", "ask")
    if approve not in core.APPROVAL_MODES:
        raise ValueError(f"approve (AGENT_APPROVE) must be one of {core.APPROVAL_MODES}, "
                         f"not {approve!r}")
    if llm_config is None and (provider or model):
        llm_config = core.config_from_env(provider, model)
    return AgentWebApp(
        db_path=db_path,
        workspace=workspace or os.environ.get("AGENT_WORKSPACE", DEFAULT_WORKSPACE),
        token=token or os.environ.get("AGENT_WEB_TOKEN") or None,
        llm_config=llm_config,
        allowed_hosts={h.lower() for h in allowed_hosts} if allowed_hosts is not None
        else _env_set("AGENT_WEB_ALLOWED_HOSTS"),
        allowed_origins=set(allowed_origins) if allowed_origins is not None
        else _env_set("AGENT_WEB_ALLOWED_ORIGINS"),
        approve=approve, max_steps=max_steps,
        queue_size=queue_size or core.env_number(os.environ, "AGENT_WEB_QUEUE_SIZE")
        or SUBSCRIBER_QUEUE_SIZE,
        body_timeout=body_timeout or core.env_number(os.environ, "AGENT_WEB_BODY_TIMEOUT",
                                                     float) or BODY_TIMEOUT,
        tools=tools if tools is not None else config.toolbox_options() if config else None,
        mcp_servers=core.mcp_servers(str(mcp_config) if mcp_config else None, file=config),
        skills=core.Skills.locate(str(skills_dir) if skills_dir else None, file=config),
        coalesce=COALESCE_S if window_ms is None else window_ms / 1000,
        read_pace=READ_PACE_S if pace_ms is None else pace_ms / 1000,
        lease=lease or core.env_number(os.environ, "AGENT_WEB_LEASE", float) or LEASE_S)


# `uvicorn agent_web:app --ws wsproto`: configured from the environment, opens
# nothing until its first request or lifespan.  Its token is random unless
# AGENT_WEB_TOKEN is set; `python agent_web.py` prints it, uvicorn does not.
# (`python agent_web.py` builds its own in main(), where a bad setting is a
# usage error rather than a traceback at import.)
app = create_app() if __name__ != "__main__" else None


# =============================================================================
# main: python agent_web.py
# =============================================================================

def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket.  IPPROTO_TCP is said outright: asyncio sets
    TCP_NODELAY only on sockets whose proto says TCP, and an accepted socket
    inherits proto 0 from a listener made without it.  Without NODELAY every
    HTTP response (headers, then body: two writes) waited ~40 ms for the
    client's delayed ACK (README, Performance)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    import uvicorn    # only the command line needs it: embedders bring their own server

    env = os.environ
    p = argparse.ArgumentParser(description="Mini Agent Web: the agent in your browser.")
    p.add_argument("--host", default=env.get("AGENT_WEB_HOST", DEFAULT_HOST))
    # A string default goes through `type` too: a bad AGENT_WEB_PORT is a usage error.
    p.add_argument("--port", type=int, default=env.get("AGENT_WEB_PORT", str(DEFAULT_PORT)),
                   help="0 picks a free port")
    p.add_argument("--db", default=env.get("AGENT_WEB_DB", DEFAULT_DB))
    p.add_argument("--workspace")
    p.add_argument("--config", help="Mini-Agent's config.yaml (default: ./mini_agent/config/"
                   "config.yaml, then ~/.mini-agent/config/config.yaml)")
    p.add_argument("--provider", choices=["anthropic", "openai", "minimax", "demo"])
    p.add_argument("--model")
    p.add_argument("--approve", choices=core.APPROVAL_MODES,
                   default=env.get("AGENT_APPROVE", "ask"),
                   help="auto: run every tool; ask: confirm bash and file writes (default); "
                        "ask-all: confirm every tool")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--mcp-config", help="Mini-Agent's mcp.json (AGENT_MCP_CONFIG; default: "
                   "the config's tools.mcp_config_path)")
    p.add_argument("--skills-dir", help="a folder of SKILL.md skills (AGENT_SKILLS_DIR; "
                   "default: the config's tools.skills_dir, else ./skills)")
    p.add_argument("--token-limit", type=int, help="context size in tokens past which older "
                   f"turns are summarised (AGENT_TOKEN_LIMIT; {core.DEFAULT_TOKEN_LIMIT:,})")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--log-level", default=env.get("AGENT_WEB_LOG_LEVEL", "warning"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    token = env.get("AGENT_WEB_TOKEN") or secrets.token_urlsafe(24)
    try:
        max_connections = core.env_number(env, "AGENT_WEB_MAX_CONNECTIONS") or MAX_CONNECTIONS
        file = core.ConfigFile.find(args.config)
        cfg = core.config_from_env(args.provider, args.model, token_limit=args.token_limit,
                                   file=file)
        # flags beat environment variables beat the config file beat defaults
        args.workspace = (args.workspace or env.get("AGENT_WORKSPACE")
                          or (file and file.get("workspace_dir")) or DEFAULT_WORKSPACE)
        max_steps = (args.max_steps or (file and file.get("max_steps"))
                     or core.DEFAULT_MAX_STEPS)
        application = create_app(db_path=args.db, workspace=args.workspace, token=token,
                                 llm_config=cfg, approve=args.approve, max_steps=max_steps,
                                 mcp_config=args.mcp_config, skills_dir=args.skills_dir,
                                 config=file)
    except ValueError as exc:                      # a malformed AGENT_* setting
        p.error(str(exc))

    try:
        application.db_lock.acquire()     # held by this process until it exits
        if is_postgres(args.db):
            reach_postgres(args.db)
    except DatabaseInUse as exc:          # and DatabaseUnreachable
        print(f"agent_web: {exc}", file=sys.stderr)
        return 2

    # Bind the socket ourselves: port 0 then tells us the port it got.
    try:
        sock = listening_socket(args.host, args.port)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    url = f"http://{shown_host}:{port}/?token={urllib.parse.quote(token)}"

    if not _is_loopback(args.host):
        print("\n" + "!" * 78 + f"\n!! WARNING: listening on {args.host}, not loopback. Anyone "
              "who can reach\n!! this port and learns the token can run shell commands as "
              f"{env.get('USER', 'you')}.\n" + "!" * 78 + "\n", file=sys.stderr, flush=True)

    # No per-message deflate: on loopback it only burns CPU (it was 11% of the
    # server's time per pushed frame; see bench/RESULTS.md).
    config = uvicorn.Config(application, ws="wsproto", lifespan="on",
                            log_level=args.log_level, ws_max_size=MAX_WS_FRAME_BYTES,
                            ws_per_message_deflate=False, limit_concurrency=max_connections,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE + 2)
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            if file:
                print(f"Config {file.path}", flush=True)
            if application.skills.found:
                print(f"Skills {application.skills.folder}: "
                      + ", ".join(application.skills.found), flush=True)
            for mcp in application.mcp_servers:
                print(mcp.summary(), flush=True)
            print(f"Mini Agent Web · model {cfg.label} · workspace "
                  f"{Path(args.workspace).resolve()} · db {db_label(args.db)}", flush=True)
            if cfg.provider == "demo":
                print("Offline demo model (no API key set): set ANTHROPIC_API_KEY, "
                      "OPENAI_API_KEY or MINIMAX_API_KEY for a real one.", flush=True)
            print(f"Open {url}", flush=True)
            if not args.no_browser:
                webbrowser.open(url)
        await task

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:      # uvicorn re-raises Ctrl+C after its clean shutdown
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
