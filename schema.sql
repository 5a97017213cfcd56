-- schema.sql — the only place Mini Agent Web defines its tables.
-- Loaded by agent_web.py at start-up; every statement is idempotent.
--
-- The event log is the truth: everything a page shows is a row in `events`,
-- written before it is pushed to any browser.  `sessions` is a small index
-- over it (title, status) kept in the same transaction as the events, so the
-- two never disagree.  A session's last seq is not stored: it is the seq of
-- its newest event, one step down the primary key of `events`.

PRAGMA journal_mode = WAL;          -- readers never block the one writer
PRAGMA synchronous = NORMAL;        -- safe against a process crash; see README

CREATE TABLE IF NOT EXISTS sessions (
    id            TEXT PRIMARY KEY,
    title         TEXT NOT NULL DEFAULT '',
    -- idle | running | awaiting_approval, derived from the events appended
    status        TEXT NOT NULL DEFAULT 'idle',
    -- auto | ask | ask-all: which tool calls wait for the user
    approve_mode  TEXT NOT NULL DEFAULT 'ask',
    created_at    REAL NOT NULL,
    -- the last event other than a `delta`: streamed text never rewrites
    -- this row, which keeps each commit of a streamed answer small
    updated_at    REAL NOT NULL
    -- (databases made before 2026-11-26 also have `last_seq`, now unused)
);

CREATE INDEX IF NOT EXISTS sessions_by_update ON sessions (updated_at DESC);

CREATE TABLE IF NOT EXISTS events (
    session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,        -- 1, 2, 3 ... per session, no gaps
    type        TEXT NOT NULL,
    -- the whole event exactly as it goes on the wire (seq, ts and all), so a
    -- replay sends stored text without decoding and encoding it again
    data        TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;

-- The session search's index: each message's text under its session, so a
-- search reads the messages alone instead of every event, deltas and all
-- (Store.MESSAGES_HOLDING names it: SQLite's planner does not pick it itself).
-- Partial: the streamed deltas, most rows by far, are not in it.
CREATE INDEX IF NOT EXISTS events_message_text
    ON events (session_id, json_extract(data, '$.content')) WHERE type = 'message';

-- ===========================================================================
-- @postgresql — the same tables for PostgreSQL (agent_web.py reads the part
-- of this file above this line for SQLite, the part below for PostgreSQL).
-- Column for column as above; what differs is spelled in a comment.  Two
-- more tables hold what one process used to keep in memory: which worker is
-- alive (`workers`, a lease it renews) and which worker runs which session
-- (`runs`); a third carries workers' answers to each other (`answers`).
-- See "Many workers: PostgreSQL" in agent_web.py.
-- ===========================================================================

CREATE TABLE IF NOT EXISTS sessions (
    id            TEXT PRIMARY KEY,
    title         TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL DEFAULT 'idle',
    approve_mode  TEXT NOT NULL DEFAULT 'ask',
    created_at    DOUBLE PRECISION NOT NULL,   -- SQLite's REAL is 8 bytes; PG's is 4
    updated_at    DOUBLE PRECISION NOT NULL
);

CREATE INDEX IF NOT EXISTS sessions_by_update ON sessions (updated_at DESC);

CREATE TABLE IF NOT EXISTS events (
    session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    type        TEXT NOT NULL,
    data        TEXT NOT NULL,                 -- TEXT, not jsonb: sent byte for byte
    PRIMARY KEY (session_id, seq)
);

-- A worker is alive while its lease is in the future; it renews it every
-- few seconds.  Time is the database's clock, the one all workers share.
CREATE TABLE IF NOT EXISTS workers (
    id           TEXT PRIMARY KEY,
    lease_until  TIMESTAMPTZ NOT NULL
);

-- At most one run per session, anywhere: the row is the claim.  It goes in
-- the transaction that stores the run's `done`.
CREATE TABLE IF NOT EXISTS runs (
    session_id  TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    owner       TEXT NOT NULL
);

-- What the other workers answered one worker's question (a background
-- command lives in the process that started it, so its output is asked of
-- every worker): a row per answering worker.  The asker reads and deletes
-- them; rows it never read are swept after a minute.
CREATE TABLE IF NOT EXISTS answers (
    ask         TEXT NOT NULL,
    worker      TEXT NOT NULL,
    body        TEXT NOT NULL,                 -- JSON
    at          TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (ask, worker)
);
