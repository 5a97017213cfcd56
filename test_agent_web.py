"""The test suite of Mini Agent Web: the spec, one behaviour per test.

    python -m pytest -q test_agent_web.py

Everything runs against real sockets on 127.0.0.1: a fake LLM *server* that
writes the providers' exact Server-Sent Events byte for byte (FakeLLM), the
real `python agent_web.py` under uvicorn + wsproto on an ephemeral port
(ServerProcess), a real WebSocket client (`websockets`), and the page in
Debian's headless Chromium via Playwright (the `browser` fixture).

Sections: the fake LLM → helpers → agent core (issue 2) → server (issue 3)
→ approvals (issue 7) → bad input and faults (issue 5) → the page (issue 4).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import websockets

import agent_core as core

HERE = Path(__file__).resolve().parent
TOKEN = "test-token-1234"


def arun(coro):
    """asyncio.run(coro) on a thread of its own.  Playwright's sync API (the
    page tests) leaves its loop marked as running in the main thread for as
    long as the browser lives, and asyncio.run() refuses to start beside it."""
    box: list = []

    def target():
        try:
            box.append((True, asyncio.run(coro)))
        except BaseException as exc:            # re-raised in the test's thread
            box.append((False, exc))
    t = threading.Thread(target=target)
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


# =============================================================================
# The fake LLM server: both providers' wire formats, scriptable
# =============================================================================
#
# A reply is described neutrally (Reply) and encoded per protocol.  Tests push
# replies (or raw HTTP failures) onto `llm.script`; when the script is empty,
# a rule answers: "run: CMD" calls bash, a tool result is summarised, "slow"
# streams slowly, anything else is echoed.


class Reply:
    def __init__(self, text: str = "", *, thinking: str = "", signature: str = "sig-1",
                 tools: list[tuple[str, str]] = (), delay: float = 0.0, cut_after: int | None = None,
                 fragments: int = 3, status: int = 200, headers: dict | None = None,
                 body: bytes = b"", hang: bool = False, raw: list[bytes] | None = None,
                 stop: str = "", stall_after: int | None = None, drop_after: int | None = None):
        self.text, self.thinking, self.signature = text, thinking, signature
        self.stop = stop                    # a stop / finish reason other than the usual
        self.tools = list(tools)            # (name, arguments as raw JSON text)
        self.delay, self.cut_after, self.fragments = delay, cut_after, fragments
        self.status, self.headers, self.body, self.hang, self.raw = (
            status, headers or {}, body, hang, raw)
        self.input_tokens = 11              # what the usage says (see FakeLLM.count_tokens)
        self.stall_after = stall_after      # after this many chunks, send nothing more
        self.drop_after = drop_after        # after this many chunks, drop the connection


def words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text) or [text]


def split(text: str, n: int) -> list[str]:
    size = max(1, -(-len(text) // n))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def anthropic_sse(r: Reply) -> list[bytes]:
    def ev(name: str, data: dict) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    out = [ev("message_start", {"type": "message_start", "message": {
        "id": "msg_fake", "type": "message", "role": "assistant", "content": [],
        "model": "claude-fake", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": r.input_tokens, "output_tokens": 1}}}),
           ev("ping", {"type": "ping"})]
    index = 0
    if r.thinking:
        out.append(ev("content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {"type": "thinking", "thinking": ""}}))
        for w in words(r.thinking):
            out.append(ev("content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "thinking_delta", "thinking": w}}))
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "signature_delta",
                                                        "signature": r.signature}}))
        out.append(ev("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    if r.text:
        out.append(ev("content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {"type": "text", "text": ""}}))
        for w in words(r.text):
            out.append(ev("content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "text_delta", "text": w}}))
        out.append(ev("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    for n, (name, args) in enumerate(r.tools):
        out.append(ev("content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {"type": "tool_use",
                                                                "id": f"toolu_{n}_{time.time_ns()}",
                                                                "name": name, "input": {}}}))
        for part in split(args, r.fragments):
            out.append(ev("content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "input_json_delta",
                                                            "partial_json": part}}))
        out.append(ev("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    out.append(ev("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": r.stop or ("tool_use" if r.tools else "end_turn"), "stop_sequence": None},
        "usage": {"output_tokens": 7}}))
    out.append(ev("message_stop", {"type": "message_stop"}))
    return out


def openai_sse(r: Reply) -> list[bytes]:
    def chunk(delta: dict, finish=None, **extra) -> bytes:
        data = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-fake", "choices": [{"index": 0, "delta": delta,
                                                  "logprobs": None, "finish_reason": finish}]}
        data.update(extra)
        return f"data: {json.dumps(data)}\n\n".encode()
    out = [chunk({"role": "assistant", "content": ""})]
    for w in words(r.thinking) if r.thinking else []:
        out.append(chunk({"reasoning_content": w}))
    for w in words(r.text) if r.text else []:
        out.append(chunk({"content": w}))
    for n, (name, args) in enumerate(r.tools):
        out.append(chunk({"tool_calls": [{"index": n, "id": f"call_{n}_{time.time_ns()}",
                                          "type": "function",
                                          "function": {"name": name, "arguments": ""}}]}))
        for part in split(args, r.fragments):
            out.append(chunk({"tool_calls": [{"index": n, "function": {"arguments": part}}]}))
    out.append(chunk({}, r.stop or ("tool_calls" if r.tools else "stop")))
    out.append(("data: " + json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                       "created": 1, "model": "gpt-fake", "choices": [],
                                       "usage": {"prompt_tokens": r.input_tokens,
                                                 "completion_tokens": 7,
                                                 "total_tokens": r.input_tokens + 7}})
                + "\n\n").encode())
    out.append(b"data: [DONE]\n\n")
    return out


# In the words of a "stream" reply, replaced by the time (time.time()) at which
# the fake server writes that token to the socket: bench/push.py measures the
# latency a token sees from the moment it leaves the LLM.
SENT_AT = b"SENT_AT"


def default_reply(body: dict, protocol: str) -> Reply:
    """What the fake model says when no test scripted otherwise."""
    msgs = body["messages"]
    last = msgs[-1]
    content = last["content"]
    if protocol == "anthropic":
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        results = [b for b in blocks if b.get("type") == "tool_result"]
        texts = [b["text"] for b in blocks if b.get("type") == "text"]
        if results and not texts:
            out = results[-1]["content"]
            return Reply(f"The tool said: {out.strip().splitlines()[0] if out.strip() else ''}")
        prompt = texts[-1] if texts else ""
    else:
        if last["role"] == "tool":
            out = last["content"]
            return Reply(f"The tool said: {out.strip().splitlines()[0] if out.strip() else ''}")
        prompt = content or ""
    if prompt.startswith(core.SUMMARY_PROMPT[:60]):    # a compaction's summary request
        asked = re.findall(r"^## User\n", prompt, re.M)
        return Reply(f"SUMMARY: the user sent {len(asked)} message(s); all is well.")
    if prompt.startswith("run: "):
        return Reply("Running it.", tools=[("bash", json.dumps({"command": prompt[5:]}))])
    if prompt.startswith("stream "):     # bench/: "stream N [R [P]]": N words, R a second,
        asked = prompt.split()             # a new paragraph every P words
        rate = float(asked[2]) if len(asked) > 2 else 50.0
        per = int(asked[3]) if len(asked) > 3 else 0
        return Reply("".join(f"t{i}@" + SENT_AT.decode()
                             + ("\n\n" if per and (i + 1) % per == 0 else " ")
                             for i in range(int(asked[1]))).rstrip(), delay=1 / rate)
    if prompt.startswith("slow"):
        return Reply(" ".join(f"word{i}" for i in range(60)) + " END", delay=0.05)
    if prompt.startswith("say: "):
        return Reply(prompt[5:])
    return Reply(f"You said: {prompt}")


def is_summary_request(body: dict) -> bool:
    """A compaction's request: its last message is the summary prompt."""
    last = body["messages"][-1]["content"]
    text = last if isinstance(last, str) else (last[0].get("text") or "") if last else ""
    return text.startswith(core.SUMMARY_PROMPT[:60])


def too_long_reply(protocol: str, tokens: int, limit: int) -> Reply:
    """The providers' answers to a prompt past the model's context (as their
    docs and issue trackers show them)."""
    if protocol == "anthropic":
        return Reply(status=400, body=json.dumps({"type": "error", "error": {
            "type": "invalid_request_error",
            "message": f"prompt is too long: {tokens} tokens > {limit} maximum"}}).encode())
    return Reply(status=400, body=json.dumps({"error": {
        "message": f"This model's maximum context length is {limit} tokens. However, your "
                   f"messages resulted in {tokens} tokens. Please reduce the length of the "
                   "messages.", "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}}).encode())


class Listener(ThreadingHTTPServer):
    # socketserver's backlog is 5: a hundred sessions asking at once would
    # have their connections dropped and retried after 1-3 s (TCP's SYN
    # retry), which a provider's server never does to us.
    request_queue_size = 512


class FakeLLM:
    """An HTTP server on 127.0.0.1 speaking Anthropic Messages and OpenAI Chat
    Completions streaming.  `requests` records every request body.

    A stream is framed as the providers' servers frame it (Anthropic's,
    OpenAI's, llama.cpp's, vLLM's alike): chunked, a chunk a write, on a
    connection kept for the next request.  `framing="close"` sends the body
    until the connection closes instead, as an HTTP/1.0-minded proxy may."""

    def __init__(self, tls: "ssl.SSLContext | None" = None, framing: str = "chunked"):
        assert framing in ("chunked", "close")
        self.framing = framing
        self.script: list[Reply] = []
        self.requests: list[dict] = []
        # A model's context, for compaction tests: with `count_tokens` the
        # usage counts the request (bytes / 4); past `context_size` tokens it
        # is refused with the provider's own "prompt is too long" answer.
        # `on_summary` answers summary requests before `script` does.
        self.count_tokens = False
        self.context_size: int | None = None
        self.on_summary: list[Reply] = []
        self.refused = 0                    # requests answered "too long"
        self.headers: list[dict] = []
        self.connections = 0                # TCP connections accepted
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with fake.lock:
                    fake.connections += 1

            def handle(self):
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    pass            # the client went away between two requests: it may

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                protocol = "anthropic" if self.path.endswith("/v1/messages") else "openai"
                tokens = length // 4
                summary = is_summary_request(body)
                with fake.lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    if summary and fake.on_summary:
                        reply = fake.on_summary.pop(0)
                    else:
                        reply = fake.script.pop(0) if fake.script else None
                if fake.context_size and tokens > fake.context_size:
                    reply = too_long_reply(protocol, tokens, fake.context_size)
                    fake.refused += 1
                if reply is None:
                    reply = default_reply(body, protocol)
                if fake.count_tokens:
                    reply.input_tokens = tokens
                if reply.hang:
                    time.sleep(30)
                    return
                if reply.status != 200:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    payload = reply.body or json.dumps(
                        {"type": "error", "error": {"type": "api_error", "message": "boom"}}).encode()
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                chunks = reply.raw if reply.raw is not None else (
                    anthropic_sse(reply) if protocol == "anthropic" else openai_sse(reply))
                if reply.cut_after is not None:     # the body ends early, cleanly
                    chunks = chunks[:reply.cut_after]
                chunked = fake.framing == "chunked"
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header(*(("transfer-encoding", "chunked") if chunked
                                   else ("connection", "close")))
                self.end_headers()
                self.close_connection = True        # unless the body ends as it should
                try:
                    for i, c in enumerate(chunks):
                        if i == reply.stall_after:
                            time.sleep(30)
                            return
                        if i == reply.drop_after:
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        if chunked and not c:
                            continue                # an empty chunk would end the body
                        if SENT_AT in c:     # bench/: the moment this token leaves
                            c = c.replace(SENT_AT, b"%.6f" % time.time())
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c) if chunked else c)
                        self.wfile.flush()
                        if reply.delay:
                            time.sleep(reply.delay)
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                        self.close_connection = False
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = Listener(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:            # HTTPS, as the real providers speak
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakeLLMProcess:
    """A FakeLLM (rules only, no script) in a process of its own, for bench/:
    its streaming threads then do not share a GIL with the client being timed.
    Has `url`, so ServerProcess takes it as its `llm`.  `command`: another
    fake server that prints its port first (bench/paced.py's)."""

    def __init__(self, command: list[str] | None = None):
        self.proc = subprocess.Popen(command or [
            sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
            "import test_agent_web as t; f = t.FakeLLM(); print(f.port, flush=True); "
            "time.sleep(1e9)", str(HERE)], stdout=subprocess.PIPE, text=True)
        self.port, self.pid = int(self.proc.stdout.readline()), self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def llm():
    fake = FakeLLM()
    yield fake
    fake.close()


# =============================================================================
# Helpers
# =============================================================================

def cfg_for(fake: FakeLLM, protocol: str = "anthropic", **kw) -> core.LLMConfig:
    base = fake.url if protocol == "anthropic" else fake.url + "/v1"
    kw.setdefault("retry_base_delay", 0.01)
    return core.LLMConfig(protocol, f"{protocol}-fake", "key-123", base, **kw)


async def run_agent(cfg: core.LLMConfig, workspace: Path, prompt: str, **kw) -> list[dict]:
    history = kw.pop("history", [])
    history.append({"role": "user", "content": prompt})
    async with core.make_http_client(cfg) as http:
        agent = core.Agent(core.make_llm(cfg, http), cfg, core.Toolbox(workspace), **kw)
        return [ev async for ev in agent.run(history)]


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


# The programs under test get a home of their own: a developer's
# ~/.mini-agent/config/config.yaml must not change what the tests see.
TEST_HOME = Path(tempfile.mkdtemp(prefix="agent-web-test-home-"))


def free_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "OPENAI_", "MINIMAX_", "AGENT_"))}
    env["HOME"] = str(TEST_HOME)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ServerProcess:
    """`python agent_web.py` on an ephemeral loopback port, as a user runs it.
    (`script`: another checkout's, for bench/push.py --against.)"""

    def __init__(self, tmp: Path, llm: FakeLLM | None, protocol: str = "anthropic",
                 approve: str = "auto", extra_env: dict | None = None, args: list[str] = (),
                 script: Path = HERE / "agent_web.py", db: str | None = None):
        self.tmp, self.db, self.script = tmp, db or tmp / "agent.db", script
        self.workspace = tmp / "ws"
        env = free_env(AGENT_WEB_TOKEN=TOKEN, AGENT_RETRY_BASE_DELAY="0.05",
                       AGENT_LLM_READ_TIMEOUT="5", PYTHONUNBUFFERED="1")
        if llm is not None and protocol == "anthropic":
            env.update(ANTHROPIC_API_KEY="key-123", ANTHROPIC_BASE_URL=llm.url)
        elif llm is not None:
            env.update(OPENAI_API_KEY="key-123", OPENAI_BASE_URL=llm.url + "/v1")
        env.update(extra_env or {})
        self.env, self.args, self.approve = env, list(args), approve
        self.proc = None
        self.start()

    def start(self):
        cmd = [sys.executable, str(self.script), "--port", "0", "--no-browser",
               "--db", str(self.db), "--workspace", str(self.workspace),
               "--approve", self.approve, *self.args]
        self.log = open(self.tmp / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=self.env,
                                     cwd=self.tmp)
        deadline = time.time() + 20
        self.lines = []
        while time.time() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"Open (http://127\.0\.0\.1:(\d+)/\?token=\S+)", line)
            if m:
                self.url, self.port = m.group(1), int(m.group(2))
                self.base = f"http://127.0.0.1:{self.port}"
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
        raise RuntimeError("server did not start: " + "".join(self.lines)
                           + (self.tmp / "server.log").read_text())

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    # -- HTTP and WebSocket clients ---------------------------------------------
    def http(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None,
             token: bool = True) -> httpx.Response:
        h = {"authorization": f"Bearer {TOKEN}"} if token else {}
        h.update(headers or {})
        if body is not None:
            return httpx.request(method, self.base + path, json=body, headers=h, timeout=10)
        return httpx.request(method, self.base + path, content=raw, headers=h, timeout=10)

    def chat(self, message: str, session_id: str | None = None, **extra) -> dict:
        body = {"message": message, **extra}
        if session_id:
            body["session_id"] = session_id
        r = self.http("POST", "/agent/chat", body)
        assert r.status_code == 202, r.text
        return r.json()

    def history(self, session_id: str, after: int = 0) -> dict:
        r = self.http("GET", f"/agent/chat?session_id={session_id}&after={after}&limit=5000")
        assert r.status_code == 200, r.text
        return r.json()

    def all_events(self, session_id: str) -> list[dict]:
        """Every stored event, page after page (one page holds at most 5,000)."""
        events: list[dict] = []
        while True:
            page = self.history(session_id, after=len(events))["events"]
            events += page
            if not page:
                return events

    def wait_status(self, session_id: str, status: str = "idle", timeout: float = 20) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.history(session_id)
            if h["status"] == status and (status != "idle" or of(h["events"], "done")):
                return h
            time.sleep(0.05)
        raise AssertionError(f"session never became {status}: {h['status']}")

    def wait_event(self, session_id: str, kind: str, timeout: float = 20, count: int = 1) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            evs = of(self.history(session_id)["events"], kind)
            if len(evs) >= count:
                return evs[count - 1]
            time.sleep(0.03)
        raise AssertionError(f"no {kind} event")

    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/agent/ws?token={TOKEN}"

    def wait_no_runs(self, timeout: float = 20) -> None:
        """Until no run goes in this process (GET /agent/stats)."""
        deadline = time.time() + timeout
        while self.http("GET", "/agent/stats").json()["runs"]:
            assert time.time() < deadline, "a run is still going"
            time.sleep(0.05)

    def sql(self, query: str, params=()) -> list:
        """One statement on the server's database, SQLite or PostgreSQL
        (in SQLite's words: the server's own translation is used)."""
        import agent_web as web
        if web.is_postgres(self.db):
            import psycopg
            with psycopg.connect(self.db, autocommit=True) as conn:
                cur = conn.execute(web._pg_sql(query), params)
                return cur.fetchall() if cur.description else []
        with contextlib.closing(sqlite3.connect(self.db)) as conn, conn:
            return conn.execute(query, params).fetchall()

    def store(self):
        """The server's store, opened beside it (close() it)."""
        import agent_web as web
        return (web.PgStore(self.db, "test") if web.is_postgres(self.db)
                else web.Store(self.db))


class PostgresCluster:
    """A throwaway PostgreSQL cluster: Debian's binaries (apt-get install
    postgresql), initdb in a temporary folder, run as `postgres` when we are
    root (PostgreSQL refuses root), on a free loopback port.  `database()`
    makes a new empty database and returns its DSN."""

    def __init__(self):
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        bindir = found[-1].parent if found else None
        if bindir is None:
            pytest.fail("PostgreSQL is missing: apt-get install postgresql (see .ci/run)")
        self.dir = Path(tempfile.mkdtemp(prefix="agent-web-pg-"))
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        data = self.dir / "data"
        # cwd: the postgres user may not enter ours (a checkout under /root)
        subprocess.run([*self.as_user, str(bindir / "initdb"), "-D", str(data), "-U",
                        "postgres", "--auth=trust", "-E", "UTF8"], check=True,
                       stdout=subprocess.DEVNULL, cwd=self.dir)
        self.pg_ctl = [*self.as_user, str(bindir / "pg_ctl"), "-D", str(data)]
        # fsync off: a test cluster is thrown away, and fsync is what costs
        subprocess.run([*self.pg_ctl, "-l", str(self.dir / "log"), "-w", "start", "-o",
                        f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off -c max_connections=300"],
                       check=True, stdout=subprocess.DEVNULL, cwd=self.dir)
        self.count = 0

    def dsn(self, name: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def database(self) -> str:
        import psycopg
        self.count += 1
        name = f"t{self.count}_{os.getpid()}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def close(self):
        subprocess.run([*self.pg_ctl, "-m", "immediate", "stop"], stdout=subprocess.DEVNULL,
                       cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    cluster = PostgresCluster()
    yield cluster
    cluster.close()


# The contract tests run on both stores: @both_stores before a test that
# takes `server` runs it once on SQLite and once on PostgreSQL.
both_stores = pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def server(request, tmp_path, llm):
    db = None
    if getattr(request, "param", "sqlite") == "postgresql":
        db = request.getfixturevalue("postgres").database()
    s = ServerProcess(tmp_path, llm, db=db)
    yield s
    s.stop()


async def ws_collect(url: str, session_id: str, after: int = 0, until=lambda e: e["type"] == "done",
                     timeout: float = 20, **kw) -> list[dict]:
    """Subscribe and collect events until `until` holds; returns the event frames."""
    events = []
    async with websockets.connect(url, **kw) as ws:
        await ws.send(json.dumps({"type": "subscribe", "session_id": session_id, "after": after}))
        first = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        assert first["type"] == "subscribed", first
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if "seq" in frame:
                events.append(frame)
                if until(frame):
                    return events


def wire_events(events: list[dict]) -> list[tuple]:
    return [(e["seq"], e["type"]) for e in events]


# =============================================================================
# Agent core (issue 2): both protocols against the fake server
# =============================================================================

PROTOCOLS = ["anthropic", "openai"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_streamed_text_arrives_as_deltas_then_one_message(llm, tmp_path, protocol):
    llm.script.append(Reply("Hello there, streaming world."))
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "hi"))
    deltas = "".join(e["content"] for e in of(events, "delta") if e["channel"] == "text")
    assert deltas == "Hello there, streaming world."
    assert of(events, "message")[0]["content"] == deltas
    done = events[-1]
    assert done["type"] == "done" and done["status"] == "done"
    assert done["usage"] == {"input_tokens": 11, "output_tokens": 7}


def test_anthropic_request_carries_key_version_and_stream(llm, tmp_path):
    arun(run_agent(cfg_for(llm), tmp_path, "hi"))
    h = {k.lower(): v for k, v in llm.headers[0].items()}
    assert h["x-api-key"] == "key-123" and h["anthropic-version"] == "2023-06-01"
    assert llm.requests[0]["stream"] is True
    assert {t["name"] for t in llm.requests[0]["tools"]} == {
        "bash", "bash_output", "bash_kill", "read_file", "write_file", "edit_file",
        "record_note", "recall_notes"}


def test_openai_request_asks_for_usage_and_sends_bearer(llm, tmp_path):
    arun(run_agent(cfg_for(llm, "openai"), tmp_path, "hi"))
    h = {k.lower(): v for k, v in llm.headers[0].items()}
    assert h["authorization"] == "Bearer key-123"
    assert llm.requests[0]["stream_options"] == {"include_usage": True}


def test_anthropic_thinking_and_signature_are_sent_back_next_request(llm, tmp_path):
    llm.script.append(Reply("Let me look.", thinking="I should list files.", signature="SIG42",
                            tools=[("bash", '{"command": "echo hi"}')]))
    events = arun(run_agent(cfg_for(llm), tmp_path, "go"))
    assert of(events, "thinking")[0]["content"] == "I should list files."
    second = llm.requests[1]["messages"]
    assistant = [m for m in second if m["role"] == "assistant"][0]
    assert assistant["content"][0] == {"type": "thinking", "thinking": "I should list files.",
                                       "signature": "SIG42"}


def test_openai_reasoning_content_becomes_thinking(llm, tmp_path):
    llm.script.append(Reply("Answer.", thinking="Because reasons."))
    events = arun(run_agent(cfg_for(llm, "openai"), tmp_path, "why"))
    assert of(events, "thinking")[0]["content"] == "Because reasons."
    assert any(e["channel"] == "thinking" for e in of(events, "delta"))


@pytest.mark.parametrize("protocol,stop,says", [
    ("anthropic", "max_tokens", "output limit (8192 tokens, AGENT_MAX_TOKENS)"),
    ("openai", "length", "output limit (8192 tokens, AGENT_MAX_TOKENS)"),
    ("anthropic", "model_context_window_exceeded", "context window"),
    ("anthropic", "refusal", "declined"),
    ("openai", "content_filter", "content filter")])
def test_an_answer_cut_short_says_why(llm, tmp_path, protocol, stop, says):
    """A provider that stops an answer early (its output limit, a full
    context window, a refusal, a filter) still ends the stream normally: the
    user is told, after the text so far, rather than shown a cut answer as
    if it were whole."""
    llm.script.append(Reply("The first half of a long", stop=stop))
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "write a lot"))
    kinds = [e["type"] for e in events]
    assert of(events, "message")[-1]["content"] == "The first half of a long"
    notes = of(events, "error")
    assert len(notes) == 1 and says in notes[0]["message"] and notes[0]["retrying"] is False
    assert kinds.index("delta") < kinds.index("message") < kinds.index("error")
    assert of(events, "done")[0]["status"] == "done"


def test_a_whole_answer_gets_no_note(llm, tmp_path):
    for protocol in PROTOCOLS:
        llm.script.append(Reply("All of it."))
        events = arun(run_agent(cfg_for(llm, protocol), tmp_path / protocol, "hi"))
        assert not of(events, "error")


def test_an_openai_refusal_is_shown_as_the_answer(llm, tmp_path):
    """A refusal streams in `delta.refusal` with `content: null`: the user
    must read it, not an empty answer."""
    def chunk(delta, finish=None):
        return ("data: " + json.dumps({
            "id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-fake", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}]}) + "\n\n").encode()
    llm.script.append(Reply(raw=[
        chunk({"role": "assistant", "content": None, "refusal": ""}),
        chunk({"content": None, "refusal": "I'm sorry, "}),
        chunk({"content": None, "refusal": "I cannot help with that."}),
        chunk({}, "stop"), b"data: [DONE]\n\n"]))
    events = arun(run_agent(cfg_for(llm, "openai"), tmp_path, "do something bad"))
    assert of(events, "message")[-1]["content"] == "I'm sorry, I cannot help with that."
    assert "".join(e["content"] for e in of(events, "delta")) == \
        "I'm sorry, I cannot help with that."
    assert of(events, "done")[0]["status"] == "done"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tool_call_json_in_fragments_is_assembled_and_run(llm, tmp_path, protocol):
    llm.script.append(Reply("", tools=[("write_file", json.dumps(
        {"path": "a/b.txt", "content": "fragmented hello"}))], fragments=7))
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "write"))
    call = of(events, "tool_call")[0]
    assert call["input"] == {"path": "a/b.txt", "content": "fragmented hello"}
    assert (tmp_path / "a/b.txt").read_text() == "fragmented hello"
    assert of(events, "tool_result")[0]["is_error"] is False


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_two_tool_calls_in_one_step_both_run_in_order(llm, tmp_path, protocol):
    llm.script.append(Reply("Two things.", tools=[("bash", '{"command": "echo one"}'),
                                                  ("bash", '{"command": "echo two"}')]))
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "both"))
    results = of(events, "tool_result")
    assert [r["output"].strip() for r in results] == ["one", "two"]
    assert [c["call_id"] for c in of(events, "tool_call")] == [r["call_id"] for r in results]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_tool_is_an_error_the_model_reads(llm, tmp_path, protocol):
    llm.script.append(Reply("", tools=[("launch_rockets", "{}")]))
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "go"))
    result = of(events, "tool_result")[0]
    assert result["is_error"] and "launch_rockets" in result["output"]
    assert events[-1]["status"] == "done"      # and the run went on


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_non_json_arguments_are_a_tool_error_not_a_crash(llm, tmp_path, protocol):
    llm.script.append(Reply("", tools=[("bash", '{"command": "echo hi"')]))   # truncated
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "go"))
    result = of(events, "tool_result")[0]
    assert result["is_error"] and "JSON" in result["output"]
    assert events[-1]["status"] == "done"


def test_wrong_argument_type_is_a_tool_error(llm, tmp_path):
    llm.script.append(Reply("", tools=[("bash", '{"command": 42}')]))
    events = arun(run_agent(cfg_for(llm), tmp_path, "go"))
    assert of(events, "tool_result")[0]["is_error"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_429_with_retry_after_is_retried_then_succeeds(llm, tmp_path, protocol):
    llm.script.append(Reply(status=429, headers={"retry-after": "0.2"}))
    llm.script.append(Reply("finally"))
    started = time.monotonic()
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "hi"))
    retry = of(events, "error")[0]
    assert retry["retrying"] is True and "429" in retry["message"]
    assert time.monotonic() - started >= 0.2            # Retry-After was honoured
    assert len(llm.requests) == 2 and events[-1]["status"] == "done"


@pytest.mark.parametrize("status", [500, 529])
def test_5xx_and_529_are_retried(llm, tmp_path, status):
    llm.script.append(Reply(status=status))
    events = arun(run_agent(cfg_for(llm), tmp_path, "hi"))
    assert of(events, "error")[0]["retrying"] and events[-1]["status"] == "done"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_401_is_not_retried_and_says_key_rejected(llm, tmp_path, protocol):
    llm.script.append(Reply(status=401, body=b'{"error": {"message": "invalid x-api-key"}}'))
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "hi"))
    assert len(llm.requests) == 1
    errors = of(events, "error")
    assert len(errors) == 1 and not errors[0]["retrying"]
    assert "401" in errors[0]["message"] and llm.url in errors[0]["message"]
    assert events[-1]["status"] == "error"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stream_cut_mid_tool_call_never_runs_the_half_call(llm, tmp_path, protocol):
    marker = tmp_path / "ran.txt"
    args = json.dumps({"command": f"touch {marker}"})
    llm.script.append(Reply("About to", tools=[("bash", args)], cut_after=6 if protocol == "anthropic"
                            else 4))
    llm.script.append(Reply("Recovered without the tool."))
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "go"))
    assert not marker.exists()
    assert not of(events, "tool_call")
    assert of(events, "error")[0]["retrying"]
    assert events[-1]["status"] == "done"


def test_stream_cut_every_time_ends_in_one_error_and_done(llm, tmp_path):
    for _ in range(5):
        llm.script.append(Reply("partial text here", cut_after=4))
    events = arun(run_agent(cfg_for(llm, retry_attempts=3), tmp_path, "go"))
    final = [e for e in of(events, "error") if not e["retrying"]]
    assert len(final) == 1 and "message_stop" in final[0]["message"]
    assert events[-1] == {**events[-1], "type": "done", "status": "error"}
    incomplete = [m for m in of(events, "message") if m.get("incomplete")]
    assert incomplete, "the text streamed before the cut is kept, marked incomplete"


def test_garbage_sse_is_retried_then_reported(llm, tmp_path):
    for _ in range(3):
        llm.script.append(Reply(raw=[b"event: message_start\ndata: {not json\n\n"]))
    events = arun(run_agent(cfg_for(llm, retry_attempts=3), tmp_path, "go"))
    assert "garbled" in of(events, "error")[-1]["message"]
    assert events[-1]["status"] == "error"


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk


def parse_sse(chunks: list[bytes]) -> list[tuple[str, str]]:
    async def go():
        response = httpx.Response(200, stream=_Chunks(chunks))
        return [event async for event in core.sse_events(response)]
    return arun(go())


def test_sse_lines_end_only_at_cr_lf_or_crlf_however_the_bytes_are_cut():
    body = ("\ufeffevent: first\r\n: a comment, then two data lines\r\n"
            "data: {\"text\": \"one\u2028two\x85three\"}\r\ndata:second line\r\n\r\n"
            "retry: 10\nid: 7\ndata: lf only\n\n\n\n"
            "data: cr only\rdata: \u00e9t\u00e9\r\r"
            "event: unfinished\ndata: no blank line after me").encode()
    want = [("first", "{\"text\": \"one\u2028two\x85three\"}\nsecond line"),
            ("message", "lf only"), ("message", "cr only\n\u00e9t\u00e9"),
            ("unfinished", "no blank line after me")]
    assert parse_sse([body]) == want
    # One byte at a time: CRLF, multi-byte characters and the BOM all cut in two.
    assert parse_sse([body[i:i + 1] for i in range(len(body))]) == want
    assert parse_sse([body[:50], body[50:51], body[51:]]) == want


def test_an_sse_streams_id_and_retry_are_kept_and_a_retry_not_in_ascii_digits_is_not():
    """The cursor a cut stream is taken up again from (MCP's resumption):
    the last `id`, and `retry` only in the ASCII digits the SSE standard
    allows ("²" is a digit to Python's isdigit, and int() refuses it)."""
    async def go(body: bytes) -> dict:
        cursor: dict[str, str] = {}
        response = httpx.Response(200, stream=_Chunks([body]))
        _ = [event async for event in core.sse_events(response, cursor=cursor)]
        return cursor
    assert arun(go(b"id: 4\nretry: 250\ndata: x\n\nid: 5\ndata: y\n\n")) == {
        "id": "5", "retry": "250"}
    assert arun(go("retry: \u00b2\nretry: \u0663\nid: 9\ndata: x\n\n".encode())) == {"id": "9"}


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_both_http_framings_stream_whole_and_a_chunked_one_keeps_its_connection(
        tmp_path, framing):
    """The providers' framing (chunked, kept alive) and a body sent until the
    connection closes, through a run of two steps (a tool call, then its
    summary): every token arrives, and with the providers' framing the second
    step reuses the first's connection (a stream that was not read to its
    last chunk had its connection dropped: a new handshake every step)."""
    fake = FakeLLM(framing=framing)
    try:
        call = json.dumps({"command": "echo hi"})
        fake.script += [Reply("Let me look. ", tools=[("bash", call)]),
                        Reply("one two three four five six seven eight")]
        events = arun(run_agent(cfg_for(fake), tmp_path, "go"))
    finally:
        fake.close()
    assert events[-1]["status"] == "done" and len(fake.requests) == 2
    texts = [m["content"] for m in of(events, "message") if m["role"] == "assistant"]
    assert texts == ["Let me look. ", "one two three four five six seven eight"]
    deltas = "".join(d["content"] for d in of(events, "delta") if d["channel"] == "text")
    assert deltas == "".join(texts)
    assert fake.connections == (1 if framing == "chunked" else 2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("drop_after", [1, 4])
def test_a_connection_lost_mid_answer_is_retried_and_said_so(llm, tmp_path, protocol,
                                                             drop_after):
    """The server drops the connection in the middle of a chunked answer (no
    last chunk), after its first event or after some text: the run says the
    connection was lost mid-answer, not that the server could not be
    reached, keeps the text that came as incomplete, and the next try
    answers."""
    llm.script += [Reply("first try words here", drop_after=drop_after), Reply("second try")]
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path, "go"))
    error, = of(events, "error")
    assert error["retrying"] and "lost in the middle of the answer" in error["message"]
    assert "cannot reach" not in error["message"]
    messages = [m for m in of(events, "message") if m["role"] == "assistant"]
    if drop_after > 1:
        assert messages[0]["incomplete"] and messages[0]["content"]
    assert messages[-1]["content"] == "second try" and events[-1]["status"] == "done"


def test_connection_refused_is_retried_then_reported(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = core.LLMConfig("anthropic", "m", "k", f"http://127.0.0.1:{port}",
                         retry_attempts=2, retry_base_delay=0.01)
    events = arun(run_agent(cfg, tmp_path, "hi"))
    errors = of(events, "error")
    assert errors[0]["retrying"] and "cannot reach" in errors[-1]["message"]
    assert events[-1]["status"] == "error"
    # Nothing was streamed: no empty "cut off" message is left behind.
    assert not [e for e in events if e["type"] == "message" and e["role"] == "assistant"]


def test_server_that_never_answers_times_out_and_is_reported(llm, tmp_path):
    llm.script += [Reply(hang=True), Reply(hang=True)]
    cfg = cfg_for(llm, retry_attempts=2, read_timeout=0.5)
    events = arun(run_agent(cfg, tmp_path, "hi"))
    assert events[-1]["status"] == "error" and len(of(events, "error")) == 2
    assert "did not answer in time" in of(events, "error")[-1]["message"]   # not "cannot reach"


def test_read_pacing_holds_a_busy_loops_reads_for_its_window_and_an_idle_ones_not():
    """ReadPacer: while the loop is busy, bytes that come less than the
    window after the last hand-over wait for it, and one read carries them
    all; with pacing off (or an idle loop) each is handed over as it comes."""
    async def second_read(pacer, pause=0.0):
        got = asyncio.get_running_loop().create_future()

        async def serve(reader, writer):
            writer.write(b"first")
            await got                       # the client read "first"
            await asyncio.sleep(pause)
            writer.write(b"second")
            await asyncio.sleep(0.03)
            writer.write(b"third")
            await writer.drain()
            await reader.read()             # until the client closes
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stream = await core.AsyncioBackend(pacer).connect_tcp("127.0.0.1", port)
        assert await stream.read(100, timeout=5) == b"first"
        got.set_result(None)
        started = time.monotonic()
        data = await stream.read(100, timeout=5)
        waited = time.monotonic() - started
        await stream.aclose()
        server.close()
        return data, waited

    busy = core.ReadPacer(0.2)
    busy.BUSY_ON = busy.BUSY_OFF = 0.0           # as if the loop were always busy
    busy.SAMPLE, busy.SUSTAINED = 0.0, 1
    data, waited = arun(second_read(busy))
    assert data == b"secondthird" and waited >= 0.1
    assert busy.engaged
    data, _ = arun(second_read(None))            # off: each write read as it comes
    assert data == b"second"
    idle = core.ReadPacer(0.2)                   # the real measure: this loop idles
    data, _ = arun(second_read(idle, pause=0.15))
    assert data == b"second" and not idle.engaged


def test_a_chunked_stream_kept_alive_is_read_whole_through_our_socket_layer_paced(monkeypatch):
    """The providers' HTTP/1.1 framing: chunked, a chunk a token, on a
    connection kept alive.  Through our socket layer, with read pacing
    holding reads (so chunks are cut anywhere between two reads), every
    token arrives in order, and the second request reuses the connection."""
    words_sent = [f"w{i} " for i in range(40)]
    connections: list[int] = []
    hold = False

    async def serve(reader, writer):
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for i, chunk in enumerate(anthropic_sse(Reply("".join(words_sent)))):
                    # split in two writes mid-chunk now and then, as TCP may
                    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
                    if i % 3 == 0:
                        writer.write(framed[:7])
                        await asyncio.sleep(0.002)
                        framed = framed[7:]
                    writer.write(framed)
                    await asyncio.sleep(0.004)
                if hold:                    # a server that never ends the body
                    await asyncio.sleep(30)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def go():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = core.LLMConfig("anthropic", "m", "k", f"http://127.0.0.1:{port}")
        texts = []
        try:
            async with core.make_http_client(cfg, read_pace=0.02) as http:
                llm = core.AnthropicClient(cfg, http)
                for _ in range(2):
                    parts = []
                    async for kind, value in llm.stream([{"role": "user", "content": "hi"}], []):
                        if kind == "text":
                            parts.append(value)
                        elif kind == "turn":
                            assert value.text == "".join(parts)
                    texts.append("".join(parts))
        finally:
            server.close()
        return texts

    for name, value in (("BUSY_ON", 0.0), ("BUSY_OFF", 0.0), ("SAMPLE", 0.0), ("SUSTAINED", 1)):
        monkeypatch.setattr(core.ReadPacer, name, value)      # always engaged

    texts = arun(go())
    assert texts == ["".join(words_sent).rstrip()] * 2 or texts == ["".join(words_sent)] * 2
    assert len(connections) == 1                     # kept alive, reused
    # A server that holds the body open after the last event is left after
    # END_OF_BODY_WAIT: the answer is whole, the connection is not kept.
    hold = True
    started = time.monotonic()
    texts = arun(go())
    assert texts[0] == texts[1] and time.monotonic() - started < 10
    assert len(connections) == 3


def test_read_pacing_is_on_while_the_loop_thread_is_busy_and_off_once_it_idles():
    """On after SUSTAINED busy looks in a row (a burst of starts is not
    enough), off at the first idle one."""
    pacer = core.ReadPacer(0.05)
    pacer.SAMPLE = 0.05
    now = time.monotonic()
    for look in range(pacer.SUSTAINED):
        end = time.thread_time() + 0.06
        while time.thread_time() < end:         # this thread works flat out ...
            pass
        due = pacer.due(now, now)
        if look < pacer.SUSTAINED - 1:
            assert due is None and not pacer.engaged      # not yet: it may be a burst
    assert due == pytest.approx(now + 0.05) and pacer.engaged
    assert pacer.due(now - 0.06, now) is None    # its window is over: at once
    time.sleep(0.12)                             # ... then does nothing
    assert pacer.due(now, now) is None and not pacer.engaged


def test_a_stream_that_stalls_midway_times_out_by_the_read_time_out(llm, tmp_path):
    """Tokens 0.2 s apart outlast a 0.5 s read time-out many times over and
    never trip it (one timer per connection moves with them); then the
    server goes silent, and that read times out."""
    llm.script.append(Reply("one two three four five six", delay=0.2, stall_after=7))
    cfg = cfg_for(llm, retry_attempts=1, read_timeout=0.5)
    events = arun(run_agent(cfg, tmp_path, "hi"))
    assert "".join(e["content"] for e in of(events, "delta")) == "one two three four "
    assert "ReadTimeout" in of(events, "error")[-1]["message"]
    assert "stopped sending in the middle of the answer" in of(events, "error")[-1]["message"]
    assert events[-1]["status"] == "error"


# A self-signed certificate for 127.0.0.1 (until 2126), made for these tests
# with `openssl req -x509 -newkey ec -subj /CN=127.0.0.1
# -addext subjectAltName=IP:127.0.0.1`: the real providers speak HTTPS.
TEST_CERT = """\
-----BEGIN CERTIFICATE-----
MIIBjzCCATagAwIBAgIUIGuG4khQKfAgHwyZCF5IDB51oSEwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTEyNTIzNDM0M1oYDzIxMjYxMTAx
MjM0MzQzWjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAStW794o+7A4Dx8YaHJf6CQgONKAUDGg9d3Bb2gwjZ0DO4knVbbXi7m
XD6l6/L2fmhIJSDSyYipnsoBcGT1O6xAo2QwYjAdBgNVHQ4EFgQUyf4hBb5zATnx
TW2fNgNfhjKeypcwHwYDVR0jBBgwFoAUyf4hBb5zATnxTW2fNgNfhjKeypcwDwYD
VR0TAQH/BAUwAwEB/zAPBgNVHREECDAGhwR/AAABMAoGCCqGSM49BAMCA0cAMEQC
IGo2XtrgTuTOD9FB0CEPTevNqYJhQs3XRvqU6dHn0sNvAiAHbBmClpraGix9mzz7
jBBjtHWdI9qwETsLZYti6PY8KA==
-----END CERTIFICATE-----
"""
TEST_KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSXjrtRsLx9SVKJ7X
QdZgb3uM3XebOBQVuZ1z0+BIsqGhRANCAAStW794o+7A4Dx8YaHJf6CQgONKAUDG
g9d3Bb2gwjZ0DO4knVbbXi7mXD6l6/L2fmhIJSDSyYipnsoBcGT1O6xA
-----END PRIVATE KEY-----
"""


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_llm_streams_over_https_through_our_socket_layer(tmp_path, monkeypatch, protocol):
    """TLS is set up by httpx on our asyncio socket layer (agent_core's
    AsyncioBackend), and the certificate is checked: trusted through
    SSL_CERT_FILE it streams; untrusted, the run fails with a clear error."""
    (tmp_path / "cert.pem").write_text(TEST_CERT)
    (tmp_path / "key.pem").write_text(TEST_KEY)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    fake = FakeLLM(tls=tls)
    try:
        assert fake.url.startswith("https://")
        fake.script.append(Reply("Over TLS.", tools=[("bash", '{"command": "echo tls-ok"}')]))
        fake.script.append(Reply("Done over TLS."))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
        events = arun(run_agent(cfg_for(fake, protocol), tmp_path / "ws", "go"))
        assert "tls-ok" in of(events, "tool_result")[0]["output"]
        assert events[-1]["status"] == "done" and len(fake.requests) == 2

        monkeypatch.delenv("SSL_CERT_FILE")          # now the certificate is a stranger's
        events = arun(run_agent(cfg_for(fake, protocol), tmp_path / "ws", "go"))
        assert events[-1]["status"] == "error" and len(fake.requests) == 2
        # Not transient: failed at once, no retries, and says what to do.
        error, = of(events, "error")
        assert not error["retrying"] and "certificate" in error["message"].lower()
        assert "SSL_CERT_FILE" in error["message"]
    finally:
        fake.close()


def test_pooled_llm_connections_are_reused_and_a_closed_one_is_replaced():
    """Real providers keep connections open between requests and close idle
    ones: the socket layer must tell httpx's pool which one was closed."""
    ports: list[int] = []

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 0.3                       # the server closes a connection idle this long

        def log_message(self, *args):
            pass

        def do_GET(self):
            ports.append(self.client_address[1])
            body = b'data: {"n": %d}\n\n' % len(ports)
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    async def go():
        got = []
        async with core.make_http_client(core.LLMConfig("openai", "m", "k", url)) as http:
            for pause in (0, 0, 1.0, 0):         # the third comes after the server closed
                await asyncio.sleep(pause)
                async with http.stream("GET", url) as response:
                    got += [data async for _, data in core.sse_events(response)]
        return got

    try:
        assert arun(go()) == ['{"n": 1}', '{"n": 2}', '{"n": 3}', '{"n": 4}']
    finally:
        server.shutdown()
        server.server_close()
    assert ports[0] == ports[1] != ports[2] == ports[3]


def test_every_pool_of_the_llm_client_uses_our_socket_layer(monkeypatch):
    """httpx has no public switch for it: if an httpx upgrade moved the
    attribute, this says so (the client would still work, only slower)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")   # a proxy adds a pool
    client = core.make_http_client(core.LLMConfig("anthropic", "m", "k", "https://x"))
    pools = [client._transport._pool] + [t._pool for t in client._mounts.values() if t]
    assert len(pools) == 2
    assert all(isinstance(p._network_backend, core.AsyncioBackend) for p in pools)
    arun(client.aclose())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cancel_mid_stream_ends_cancelled_with_incomplete_message(llm, tmp_path, protocol):
    llm.script.append(Reply(" ".join(["word"] * 200), delay=0.02))

    async def scenario():
        cfg = cfg_for(llm, protocol)
        async with core.make_http_client(cfg) as http:
            agent = core.Agent(core.make_llm(cfg, http), cfg, core.Toolbox(tmp_path))
            events = []
            async for ev in agent.run([{"role": "user", "content": "talk"}]):
                events.append(ev)
                if len(of(events, "delta")) == 5:
                    agent.cancel()
            return events
    events = arun(scenario())
    assert events[-1]["status"] == "cancelled"
    msg = of(events, "message")[-1]
    assert msg["incomplete"] and msg["content"].startswith("word")


def test_a_cancel_while_the_run_waits_on_the_stream_stops_it_and_is_taken_back(llm, tmp_path):
    """The run's own task reads the stream (no child task): a cancel that
    comes while it waits for the next token cancels that wait, and the
    reader takes the cancellation back, so the run ends `cancelled` and its
    task is not left cancelling (asyncio.timeout and TaskGroup count on it).
    A cancellation that is not the agent's (a shutdown) still goes through."""
    llm.script.append(Reply(" ".join(["word"] * 200), delay=0.05))
    llm.script.append(Reply(" ".join(["word"] * 200), delay=0.05))

    async def scenario(outside: bool):
        cfg = cfg_for(llm)
        async with core.make_http_client(cfg) as http:
            agent = core.Agent(core.make_llm(cfg, http), cfg, core.Toolbox(tmp_path))
            events: list[dict] = []

            async def consume():
                async for ev in agent.run([{"role": "user", "content": "talk"}]):
                    events.append(ev)
                await asyncio.sleep(0)      # still usable: not left cancelling
                return asyncio.current_task().cancelling()

            task = asyncio.ensure_future(consume())
            while len(of(events, "delta")) < 3:
                await asyncio.sleep(0.01)
            # It waits inside the stream now: tokens are 50 ms apart.
            task.cancel() if outside else agent.cancel()
            try:
                return await asyncio.wait_for(task, 10), events
            except asyncio.CancelledError:
                return "cancelled from outside", events

    cancelling, events = arun(scenario(outside=False))
    assert events[-1]["type"] == "done" and events[-1]["status"] == "cancelled"
    assert cancelling == 0
    assert len(of(events, "delta")) < 10                  # cut mid-answer, not at its end
    outcome, events = arun(scenario(outside=True))
    assert outcome == "cancelled from outside" and not of(events, "done")


def test_cancel_mid_bash_kills_the_process(llm, tmp_path):
    pidfile = tmp_path / "pid"
    llm.script.append(Reply("", tools=[("bash", json.dumps(
        {"command": f"echo $$ > {pidfile}; echo started-work; sleep 30"}))]))

    async def scenario():
        cfg = cfg_for(llm)
        async with core.make_http_client(cfg) as http:
            agent = core.Agent(core.make_llm(cfg, http), cfg, core.Toolbox(tmp_path))
            history = [{"role": "user", "content": "sleep"}]
            events = []
            async for ev in agent.run(history):
                events.append(ev)
                if ev["type"] == "tool_output":         # it runs, and has printed
                    agent.cancel()
            return events, history
    started = time.monotonic()
    events, history = arun(scenario())
    assert time.monotonic() - started < 20
    assert events[-1]["status"] == "cancelled"
    result = of(events, "tool_result")[0]
    assert result["is_error"] and "cancel" in result["output"]
    # What it printed before the stop is kept, for the user and the model.
    assert result["output"].endswith("Output so far:\nstarted-work\n")
    pid = int(pidfile.read_text())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert core.pending_tool_calls(history) == []      # the history stays valid


def test_a_running_command_streams_its_output_before_its_result(llm, tmp_path):
    """bash output comes as `tool_output` events while the command runs (each
    one before the command has finished), then the whole `tool_result`."""
    llm.script.append(Reply("", tools=[("bash", json.dumps(
        {"command": "for i in 1 2 3; do echo line$i; sleep 0.3; done; echo é中"}))]))

    async def scenario():
        cfg = cfg_for(llm)
        async with core.make_http_client(cfg) as http:
            agent = core.Agent(core.make_llm(cfg, http), cfg, core.Toolbox(tmp_path))
            return [(time.monotonic(), ev) async for ev in agent.run(
                [{"role": "user", "content": "count"}])]
    timed = arun(scenario())
    events = [ev for _, ev in timed]
    kinds = [ev["type"] for ev in events]
    live = of(events, "tool_output")
    result = of(events, "tool_result")[0]
    assert len(live) >= 3                                  # one per line, at least
    assert kinds.index("tool_call") < kinds.index("tool_output")
    assert max(i for i, k in enumerate(kinds) if k == "tool_output") < kinds.index("tool_result")
    assert "".join(e["content"] for e in live) == result["output"] == "line1\nline2\nline3\né中\n"
    first_at = next(t for t, ev in timed if ev["type"] == "tool_output")
    result_at = next(t for t, ev in timed if ev["type"] == "tool_result")
    assert result_at - first_at > 0.4                      # it came while the command ran
    # The history holds the result only: live output is for people.
    tools = [h for h in core.history_from_events(events) if h["role"] == "tool"]
    assert [h["output"] for h in tools] == [result["output"]]


def test_live_output_is_capped_and_says_the_rest_comes_with_the_result(llm, tmp_path):
    llm.script.append(Reply("", tools=[("bash", json.dumps(
        {"command": "head -c 100000 /dev/zero | tr '\\0' x"}))]))
    events = arun(run_agent(cfg_for(llm), tmp_path, "lots"))
    live = "".join(e["content"] for e in of(events, "tool_output"))
    assert live.startswith("x" * core.LIVE_OUTPUT_CHARS)
    assert live.endswith("… (the rest comes with the result)\n")
    assert len(live) < core.LIVE_OUTPUT_CHARS + 100
    assert "bytes cut" in of(events, "tool_result")[0]["output"]


def test_max_steps_stops_the_loop(llm, tmp_path):
    for _ in range(5):
        llm.script.append(Reply("again", tools=[("bash", '{"command": "true"}')]))
    events = arun(run_agent(cfg_for(llm), tmp_path, "loop", max_steps=2))
    assert events[-1]["status"] == "max_steps" and events[-1]["steps"] == 2
    assert len(llm.requests) == 2


def test_usage_is_summed_across_steps(llm, tmp_path):
    llm.script.append(Reply("step", tools=[("bash", '{"command": "true"}')]))
    events = arun(run_agent(cfg_for(llm), tmp_path, "go"))
    assert events[-1]["usage"] == {"input_tokens": 22, "output_tokens": 14}


def test_workspace_escape_is_refused(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "secret.txt").write_text("top secret")
    (ws / "link").symlink_to(tmp_path / "secret.txt")
    box = core.Toolbox(ws)

    async def attempts():
        return [await box.execute("read_file", {"path": p}) for p in
                ("../secret.txt", str(tmp_path / "secret.txt"), "link")] + \
               [await box.execute("write_file", {"path": "../evil.txt", "content": "x"})]
    for output, is_error in arun(attempts()):
        assert is_error and "outside the workspace" in output
        assert "top secret" not in output
    assert not (tmp_path / "evil.txt").exists()


def test_edit_file_with_two_matches_is_refused_and_says_how_many(tmp_path):
    (tmp_path / "f.txt").write_text("a = 1\na = 1\n")
    box = core.Toolbox(tmp_path)
    output, is_error = arun(box.execute(
        "edit_file", {"path": "f.txt", "old_str": "a = 1", "new_str": "a = 2"}))
    assert is_error and "2" in output
    assert (tmp_path / "f.txt").read_text() == "a = 1\na = 1\n"


def test_edit_file_with_one_match_edits(tmp_path):
    (tmp_path / "f.txt").write_text("x = 1\ny = 2\n")
    output, is_error = arun(core.Toolbox(tmp_path).execute(
        "edit_file", {"path": "f.txt", "old_str": "y = 2", "new_str": "y = 3"}))
    assert not is_error and (tmp_path / "f.txt").read_text() == "x = 1\ny = 3\n"


def test_read_file_numbers_lines_with_offset_and_limit(tmp_path):
    (tmp_path / "f.txt").write_text("".join(f"line {i}\n" for i in range(1, 11)))
    output, is_error = arun(core.Toolbox(tmp_path).execute(
        "read_file", {"path": "f.txt", "offset": 3, "limit": 2}))
    assert not is_error
    assert "line 3" in output and "line 4" in output and "line 5" not in output
    assert re.search(r"\b3\b.*line 3", output)


def test_bash_timeout_kills_the_command(tmp_path):
    started = time.monotonic()
    output, is_error = arun(core.Toolbox(tmp_path).execute(
        "bash", {"command": "sleep 20", "timeout": 1}))
    assert is_error and "timed out" in output.lower()
    assert time.monotonic() - started < 10


def test_bash_output_is_capped_head_and_tail(tmp_path):
    output, is_error = arun(core.Toolbox(tmp_path).execute(
        "bash", {"command": "seq 1 2000000"}))
    assert not is_error and len(output) < 40_000
    assert output.startswith("1\n2\n") and output.rstrip().endswith("2000000")
    assert "cut" in output


def test_history_is_rebuilt_from_stored_events(llm, tmp_path):
    llm.script.append(Reply("Checking.", thinking="hmm", tools=[("bash", '{"command": "echo x"}')]))
    history: list[dict] = []
    events = arun(run_agent(cfg_for(llm), tmp_path, "go", history=history))
    stored = [{"type": "message", "role": "user", "content": "go", "message_id": "u1"}] + events
    assert core.history_from_events(stored) == history


def test_terminal_front_end_runs_a_task_on_the_fake_server(llm, tmp_path):
    llm.script.append(Reply("Running.", tools=[("bash", '{"command": "echo from-terminal"}')]))
    out = subprocess.run(
        [sys.executable, str(HERE / "agent_core.py"), "-w", str(tmp_path), "--approve", "ask"],
        input="do it\ny\n/stats\n/q\n/help\n", capture_output=True, text=True, timeout=60,
        env=free_env(ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL=llm.url, NO_COLOR="1"))
    assert out.returncode == 0, out.stderr
    assert "/exit   quit" not in out.stdout          # /q quit (upstream's alias) before /help
    assert "$ echo from-terminal" in out.stdout
    assert "Allow bash? [y/N/a]" in out.stdout
    assert "from-terminal" in out.stdout.split("$ echo from-terminal", 1)[1]
    assert "■ done" in out.stdout and "runs 1" in out.stdout
    assert re.search(r"■ done · 2 step\(s\) · .* tokens · \d+\.\d s\n", out.stdout)
    assert re.findall(r"⏱ Step (\d) took \d+\.\d s\n", out.stdout) == ["1", "2"]


def test_terminal_front_end_lets_no_escape_sequence_steer_the_terminal(llm, tmp_path):
    """The model's text, a command's output and an error pass without what
    could retitle the terminal, write its clipboard (OSC 52), clear it or
    move its cursor; the command the user is asked to allow shows its
    control characters, so it cannot draw itself as another."""
    hidden = "rm -rf ~/nothing-here \u202e \x1b[2K\r# ls"    # would show as "# ls"
    llm.script += [
        Reply("Hi \x1b]52;c;SGVsbG8=\x07there \x1b[2Jnow \x1b]0;pwned\x07ok",
              tools=[("bash", json.dumps({"command": hidden}))]),
        Reply("Done."),
        Reply("Printing.", tools=[("bash", json.dumps(
            {"command": r"printf 'out\033]52;c;eA==\007put \033[31mred\033[0m\n'"}))]),
        Reply("Done."),
        Reply(status=400, body=b'{"error": {"message": "bad \\u001b[2J thing"}}')]
    out = subprocess.run(
        [sys.executable, str(HERE / "agent_core.py"), "-w", str(tmp_path), "--approve", "ask"],
        input="go\nn\nagain\ny\nthird\n/exit\n", capture_output=True, text=True, timeout=60,
        env=free_env(ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL=llm.url, NO_COLOR="1"))
    assert out.returncode == 0, out.stderr
    assert "Hi there now ok" in out.stdout
    assert "$ rm -rf ~/nothing-here ⟨U+202E⟩ ␛[2K␍# ls" in out.stdout
    assert "\noutput red\n" in out.stdout                    # a command's own output
    assert "bad  thing" in out.stdout                         # the error, its sequence gone
    assert "\x1b" not in out.stdout and "\r" not in out.stdout and "\x07" not in out.stdout


def test_terminal_esc_stops_the_running_task_and_an_approval_still_reads_a_line(llm, tmp_path):
    """In a real terminal (a pty), as in upstream's CLI: Esc stops the task
    that runs and the program goes on; while a task runs the keys come one
    by one, but the approval's question reads a whole line; an arrow key
    (ESC [ A) stops nothing; and the terminal's settings are back after."""
    import pty
    import termios
    llm.script += [Reply("Asking.", tools=[("bash", '{"command": "echo approved-ran"}')]),
                   Reply(" ".join(["slow"] * 400), delay=0.05),
                   Reply("Second task done.")]
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "agent_core.py"), "-w", str(tmp_path), "--approve", "ask"],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
        env=free_env(ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL=llm.url, NO_COLOR="1"))
    os.close(slave)
    seen = b""

    def until(text: str, times: int = 1, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while seen.count(text.encode()) < times:
            assert time.monotonic() < deadline, f"no {text!r} in {seen.decode(errors='replace')}"
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                seen += os.read(master, 65536)
    try:
        until("You ›")
        os.write(master, b"go\n")
        until("Allow bash? [y/N/a]")
        os.write(master, b"y\n")                       # a line, echoed as it is typed
        until("Allow bash? [y/N/a] y")
        until("approved-ran")
        until("slow slow slow")
        os.write(master, b"\x1b[A")                    # an arrow key: nothing stops
        time.sleep(0.3)
        assert b"cancelled" not in seen
        os.write(master, b"\x1b")                      # Esc
        until("■ cancelled")
        until("You ›", times=2)
        # Back in line mode: what is typed now is echoed, and read as a line.
        os.write(master, b"again\n")
        until("Second task done.")
        until("■ done")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=30) == 0
        assert termios.tcgetattr(master) == before          # the terminal as it was
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert seen.count(b"slow") < 400                  # stopped well before the end
    assert b"again" in seen                           # echoed, as a line is
    assert len(llm.requests) == 3


def test_terminal_denied_tool_is_not_run(llm, tmp_path):
    marker = tmp_path / "nope"
    llm.script.append(Reply("", tools=[("bash", json.dumps({"command": f"touch {marker}"}))]))
    out = subprocess.run(
        [sys.executable, str(HERE / "agent_core.py"), "-w", str(tmp_path), "-t", "go"],
        input="n\n", capture_output=True, text=True, timeout=60,
        env=free_env(ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL=llm.url, NO_COLOR="1"))
    assert "denied" in out.stdout and not marker.exists()


def test_demo_model_with_no_key_calls_a_tool(tmp_path):
    cfg = core.config_from_env(env={})
    assert cfg.provider == "demo"
    events = arun(run_agent(cfg, tmp_path, "list the files"))
    assert of(events, "tool_call")[0]["input"] == {"command": "ls -la"}
    assert events[-1]["status"] == "done" and "demo" in of(events, "message")[-1]["content"].lower()


@pytest.mark.parametrize("setting,says", [
    ("AGENT_WEB_PORT=abc", "argument --port: invalid int value: 'abc'"),
    ("AGENT_WEB_QUEUE_SIZE=many", "AGENT_WEB_QUEUE_SIZE must be a whole number, not 'many'"),
    ("AGENT_APPROVE=bogus", "approve (AGENT_APPROVE) must be one of"),
    ("AGENT_MAX_TOKENS=lots", "AGENT_MAX_TOKENS must be a whole number, not 'lots'"),
    ("AGENT_LLM_READ_TIMEOUT=5s", "AGENT_LLM_READ_TIMEOUT must be a number, not '5s'")])
def test_a_bad_setting_is_a_usage_error_naming_it_not_a_traceback(tmp_path, setting, says):
    name, value = setting.split("=")
    proc = subprocess.run([sys.executable, str(HERE / "agent_web.py"), "--no-browser",
                           "--db", str(tmp_path / "a.db"), "--workspace", str(tmp_path / "ws")],
                          env=free_env(**{name: value}), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert says in proc.stderr and "Traceback" not in proc.stderr


def test_config_reads_the_sdk_environment_variables():
    assert core.config_from_env(env={"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://x/v1"}
                                ).base_url == "http://x/v1"
    mm = core.config_from_env(env={"MINIMAX_API_KEY": "k"})
    assert mm.provider == "anthropic" and "minimax" in mm.base_url
    assert mm.model == "MiniMax-M2.5"                 # upstream Mini-Agent's default
    assert core.config_from_env("openai", "m1", env={"ANTHROPIC_API_KEY": "a"}).model == "m1"
    assert core.config_from_env(env={"AGENT_MAX_TOKENS": "1000"}).max_tokens == 1000
    assert core.config_from_env(env={}).max_tokens == core.DEFAULT_MAX_TOKENS
    with pytest.raises(ValueError, match="AGENT_MAX_TOKENS must be a whole number, not 'lots'"):
        core.config_from_env(env={"AGENT_MAX_TOKENS": "lots"})
    with pytest.raises(ValueError, match="AGENT_LLM_READ_TIMEOUT must be a number"):
        core.config_from_env(env={"AGENT_LLM_READ_TIMEOUT": "5s"})


# =============================================================================
# The conversation never breaks, and real servers as they are (issue 16)
# =============================================================================
#
# The providers' documented rules for a request, written as validators: the
# property test below feeds them the bodies built from many random event
# logs, as a crash, a cancel, a deny or an internal error may leave them.

CALL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def anthropic_problems(body: dict) -> list[str]:
    """What the Messages API would refuse in this request body (400)."""
    bad, msgs = [], body.get("messages") or []
    if not msgs:
        return ["no messages"]
    if msgs[0]["role"] != "user":
        bad.append("the first message is not the user's")
    if msgs[-1]["role"] != "user":
        bad.append("the last message is not the user's (a prefill was never meant)")
    seen_ids: set[str] = set()
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if m["role"] not in ("user", "assistant"):
            bad.append(f"{where}: role {m['role']!r}")
        if i and msgs[i - 1]["role"] == m["role"]:
            bad.append(f"{where}: two {m['role']} turns in a row")
        blocks = m["content"]
        if not isinstance(blocks, list) or not blocks:
            bad.append(f"{where}: empty content")
            continue
        allowed = ({"text", "tool_result"} if m["role"] == "user"
                   else {"text", "thinking", "redacted_thinking", "tool_use"})
        for b in blocks:
            if b["type"] not in allowed:
                bad.append(f"{where}: a {b['type']} block in a {m['role']} turn")
            if b["type"] == "text" and not b["text"].strip():
                bad.append(f"{where}: a text block that is empty or only whitespace")
            if b["type"] == "thinking" and not b.get("signature"):
                bad.append(f"{where}: a thinking block without its signature")
            if b["type"] == "tool_use":
                if not re.fullmatch(r"[A-Za-z0-9_-]+", b["id"]) or b["id"] in seen_ids:
                    bad.append(f"{where}: tool_use id {b['id']!r} malformed or not unique")
                seen_ids.add(b["id"])
                if not CALL_NAME.fullmatch(b["name"]) or not isinstance(b["input"], dict):
                    bad.append(f"{where}: tool_use name or input malformed")
        uses = [b["id"] for b in blocks if b["type"] == "tool_use"]
        if m["role"] == "user":
            results = [b for b in blocks if b["type"] == "tool_result"]
            kinds = [b["type"] for b in blocks]
            if results and kinds[:len(results)] != ["tool_result"] * len(results):
                bad.append(f"{where}: tool_result blocks do not come first")
            asked = ([b["id"] for b in msgs[i - 1]["content"] if b["type"] == "tool_use"]
                     if i else [])
            answered = [b["tool_use_id"] for b in results]
            if sorted(answered) != sorted(asked):
                bad.append(f"{where}: results {answered} do not answer the calls {asked}")
            for b in results:
                if not isinstance(b["content"], str) or not b["content"]:
                    bad.append(f"{where}: an empty tool_result")
        elif uses and (i + 1 >= len(msgs) or msgs[i + 1]["role"] != "user"):
            bad.append(f"{where}: tool_use with no user turn of results after it")
    for t in body.get("tools", []):
        if not CALL_NAME.fullmatch(t["name"]):
            bad.append(f"tool name {t['name']!r}")
    return bad


def openai_problems(body: dict) -> list[str]:
    """What Chat Completions (and llama.cpp's stricter server) would refuse."""
    bad, msgs = [], body.get("messages") or []
    waiting: list[str] = []           # tool_call ids still to be answered
    for i, m in enumerate(msgs):
        where, role = f"messages[{i}]", m["role"]
        if role == "tool":
            if m.get("tool_call_id") not in waiting:
                bad.append(f"{where}: a tool message answering no call waiting for it")
            else:
                waiting.remove(m["tool_call_id"])
            if not isinstance(m["content"], str) or not m["content"]:
                bad.append(f"{where}: a tool message with no content")
            continue
        if waiting:
            bad.append(f"{where}: {role} before the calls {waiting} were answered")
            waiting = []
        if role in ("system", "user"):
            if not isinstance(m["content"], str) or not m["content"].strip():
                bad.append(f"{where}: empty {role} content")
        elif role == "assistant":
            if not isinstance(m.get("content"), str):
                bad.append(f"{where}: assistant content is not a string (llama.cpp refuses null)")
            calls = m.get("tool_calls") or []
            if not calls and not (m.get("content") or "").strip():
                bad.append(f"{where}: an empty assistant message")
            ids = [c["id"] for c in calls]
            if len(set(ids)) != len(ids) or not all(ids):
                bad.append(f"{where}: tool call ids missing or repeated")
            for c in calls:
                if c.get("type") != "function" or not CALL_NAME.fullmatch(c["function"]["name"]):
                    bad.append(f"{where}: malformed tool call {c}")
                elif not isinstance(json.loads(c["function"]["arguments"]), dict):
                    bad.append(f"{where}: arguments are not a JSON object")
            waiting = list(ids)
        else:
            bad.append(f"{where}: role {role!r}")
    if waiting:
        bad.append(f"the calls {waiting} are never answered")
    if not msgs or msgs[-1]["role"] not in ("user", "tool"):
        bad.append("the conversation does not end with the user's side")
    return bad


def random_event_log(rng) -> list[dict]:
    """Events as a store may hold them after any mix of mishaps."""
    events: list[dict] = []
    used_ids: list[str] = []

    def text() -> str:
        return rng.choice(["", " ", "\n", "hello", "a longer answer\nwith lines", "ünï ✓"])

    for _run in range(rng.randint(1, 5)):
        events.append({"type": "message", "role": "user", "content": text() or "hi",
                       "message_id": core.new_id("msg")})
        for _step in range(rng.randint(1, 4)):
            mid = core.new_id("msg")
            for _ in range(rng.randint(0, 3)):
                events.append({"type": "delta", "message_id": mid, "channel": "text",
                               "content": "frag"})
            outcome = rng.random()
            if outcome < 0.15:            # a cut stream, a cancel mid-stream
                events.append({"type": "message", "role": "assistant", "message_id": mid,
                               "content": text(), "incomplete": True})
                break
            for _ in range(rng.randint(0, 2)):
                kind = rng.random()
                if kind < 0.4:
                    events.append({"type": "thinking", "message_id": mid, "content": "hmm",
                                   "signature": "sig"})
                elif kind < 0.7:        # another provider's, or the demo's: unsigned
                    events.append({"type": "thinking", "message_id": mid, "content": "hmm",
                                   "signature": ""})
                else:
                    events.append({"type": "thinking", "message_id": mid, "content": "",
                                   "signature": "", "redacted": "opaque"})
            if rng.random() < 0.9:        # else: a crash between thinking and message
                events.append({"type": "message", "role": "assistant", "message_id": mid,
                               "content": text()})
            calls = []
            for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
                cid = (rng.choice(used_ids) if used_ids and rng.random() < 0.1
                       else rng.choice(["toolu_", "call_", "call.x:", ""]) + core.new_id("c"))
                used_ids.append(cid)
                name = rng.choice(["bash", "read_file", "write_file", "bash.bash", "mcp/x"])
                calls.append((cid, name))
                events.append({"type": "tool_call", "message_id": mid, "call_id": cid,
                               "tool": name, "input": rng.choice([{}, {"command": "ls"}])})
            crashed = False
            for cid, name in calls:
                fate = rng.random()
                if fate < 0.15:
                    events.append({"type": "approval_request", "call_id": cid, "tool": name,
                                   "input": {}})
                    events.append({"type": "approval", "call_id": cid, "decision": "deny"})
                if fate < 0.25:           # no result: a crash, an internal error
                    crashed = True
                    continue
                if fate < 0.35:
                    events.append({"type": "tool_output", "call_id": cid, "content": "out"})
                events.append({"type": "tool_result", "call_id": cid, "tool": name,
                               "output": rng.choice(["", "ok", "x" * 50]),
                               "is_error": rng.random() < 0.3, "duration_ms": 1})
                if rng.random() < 0.05:   # twice, as a recovery after a crash might
                    events.append(dict(events[-1]))
            if rng.random() < 0.05:       # a result for a call that never was
                events.append({"type": "tool_result", "call_id": "orphan_" + core.new_id("c"),
                               "tool": "bash", "output": "?", "is_error": True,
                               "duration_ms": 0})
            if crashed or not calls or rng.random() < 0.2:
                break
        end = rng.random()
        if end < 0.3:
            events.append({"type": "error", "message": "internal error: KeyError",
                           "retrying": False})
        if end < 0.85:
            events.append({"type": "done", "status": rng.choice(
                ["done", "cancelled", "error", "max_steps", "interrupted"]),
                "summary": "", "steps": 1, "usage": {}})
    return events


def request_bodies(history: list[dict]) -> tuple[dict, dict]:
    tools = core.Toolbox.__new__(core.Toolbox)
    tools.tools = {"bash": (core.BASH_SCHEMA, None), "read_file": (core.READ_SCHEMA, None)}
    a = core.AnthropicClient(core.LLMConfig("anthropic", "m", "k", "http://x"), None)
    o = core.OpenAIClient(core.LLMConfig("openai", "m", "k", "http://x/v1"), None)
    return a.body(history, tools.specs()), o.body(history, tools.specs())


def test_the_validators_catch_what_the_providers_refuse():
    """The validators are the spec here, so they must fail when they should."""
    call = {"id": "c1", "name": "bash", "input": {}}
    broken = [{"role": "user", "content": "go"},
              {"role": "assistant", "message_id": "m", "text": "", "thinking": [],
               "tool_calls": [call]},
              {"role": "user", "content": "next"}]
    a = {"messages": [{"role": "user", "content": [{"type": "text", "text": "go"}]},
                      {"role": "assistant", "content": [dict(call, type="tool_use")]},
                      {"role": "user", "content": [{"type": "text", "text": "next"}]}]}
    assert any("do not answer" in p for p in anthropic_problems(a))
    o = {"messages": [{"role": "user", "content": "go"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "c1", "type": "function",
                           "function": {"name": "bash", "arguments": "{}"}}]},
                      {"role": "user", "content": "next"}]}
    problems = openai_problems(o)
    assert any("null" in p for p in problems) and any("answered" in p for p in problems)
    # and the same history, repaired, passes both
    a_body, o_body = request_bodies(broken)
    assert anthropic_problems(a_body) == [] and openai_problems(o_body) == []
    assert "Interrupted: the run ended" in a_body["messages"][2]["content"][0]["content"]


def test_any_event_log_makes_requests_both_providers_accept():
    """Property test: 3,000 random logs (streamed and cut messages, signed,
    unsigned and redacted thinking, calls answered or not, denies, repeated
    and odd ids, orphan and duplicate results, crashes, internal errors),
    each with a new user message, rebuilt and sent on both protocols."""
    import random
    for seed in range(3000):
        rng = random.Random(seed)
        events = random_event_log(rng)
        events.append({"type": "message", "role": "user", "content": "and now?",
                       "message_id": "m-last"})
        history = core.history_from_events(events)
        a_body, o_body = request_bodies(history)
        assert anthropic_problems(a_body) == [], (seed, a_body["messages"])
        assert openai_problems(o_body) == [], (seed, o_body["messages"])
        # Nothing the user said is lost on the way.
        said = [e["content"] for e in events if e["type"] == "message" and e["role"] == "user"]
        assert [m["content"] for m in o_body["messages"] if m["role"] == "user"] == [
            s if s.strip() else "(an empty message)" for s in said]


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_a_tool_that_raises_is_an_error_result_and_the_run_goes_on(llm, tmp_path, protocol):
    ws = tmp_path / "ws"
    (ws / "adir").mkdir(parents=True)
    llm.script.append(Reply("Writing.", tools=[
        ("write_file", json.dumps({"path": "adir", "content": "x"}))]))
    llm.script.append(Reply("That was a folder."))
    events = arun(run_agent(cfg_for(llm, protocol), ws, "write it"))
    result = of(events, "tool_result")[0]
    assert result["is_error"] and "write_file: adir is a directory" in result["output"]
    assert events[-1]["status"] == "done" and of(events, "message")[-1]["content"] == \
        "That was a folder."
    # The model was told, in its own protocol's shape.
    sent = json.dumps(llm.requests[1]["messages"])
    assert "adir is a directory" in sent


def test_file_tools_results_carry_a_unified_diff_for_the_page(llm, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "bin.dat").write_bytes(b"\0\1\2")
    llm.script += [Reply("Writing.", tools=[
        ("write_file", json.dumps({"path": "a.py", "content": "x = 1\ny = 2\n"})),
        ("edit_file", json.dumps({"path": "a.py", "old_str": "y = 2", "new_str": "y = 3"})),
        ("write_file", json.dumps({"path": "bin.dat", "content": "text now"})),
        ("write_file", json.dumps({"path": "big.txt", "content": "line\n" * 30000}))]),
        Reply("Done.")]
    events = arun(run_agent(cfg_for(llm), ws, "write"))
    new, edit, binary, big = of(events, "tool_result")
    assert new["diff"] == "--- /dev/null\n+++ b/a.py\n@@ -0,0 +1,2 @@\n+x = 1\n+y = 2\n"
    assert edit["diff"] == ("--- a/a.py\n+++ b/a.py\n@@ -1,2 +1,2 @@\n x = 1\n-y = 2\n+y = 3\n")
    assert "diff" not in binary                             # no lines to compare
    assert len(big["diff"]) < core.DIFF_MAX_CHARS + 100 and "more diff lines" in big["diff"]
    # The model reads the short result only.
    assert "@@" not in json.dumps(llm.requests[-1]["messages"])


def test_every_exception_of_any_tool_becomes_a_short_result(tmp_path):
    box = core.Toolbox(tmp_path)
    (tmp_path / "d").mkdir()

    async def broken(args):
        raise KeyError("surprise")
    box.tools["read_file"] = (core.READ_SCHEMA, broken)

    async def go():
        return [await box.execute("write_file", {"path": "d", "content": "x"}),
                await box.execute("write_file", {"path": "f", "content": "bad \ud800"}),
                await box.execute("read_file", {"path": "x"}),
                await box.execute("edit_file", {"path": "d/../d", "old_str": "a", "new_str": "b"})]
    (dir_out, d_err), (enc_out, e_err), (key_out, k_err), (_, edit_err) = arun(go())
    assert d_err and dir_out == "Error: write_file: d is a directory"
    assert e_err and "write_file" in enc_out
    assert k_err and key_out == "Error: read_file failed: KeyError: 'surprise'"
    assert edit_err


def test_edit_file_keeps_line_ends_and_a_latin1_file_byte_for_byte(tmp_path):
    box = core.Toolbox(tmp_path)
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")
    (tmp_path / "latin.txt").write_bytes("café = 1\nnaïve\n".encode("latin-1"))

    async def go():
        return [await box.execute("edit_file", {"path": "crlf.txt", "old_str": "two",
                                                "new_str": "2"}),
                await box.execute("edit_file", {"path": "latin.txt", "old_str": "= 1",
                                                "new_str": "= 2"}),
                await box.execute("edit_file", {"path": "latin.txt", "old_str": "naïve",
                                                "new_str": "✓"})]
    (_, e1), (out2, e2), (out3, e3) = arun(go())
    assert not e1 and (tmp_path / "crlf.txt").read_bytes() == b"one\r\n2\r\n"
    assert not e2 and "latin-1" in out2
    assert (tmp_path / "latin.txt").read_bytes() == "café = 2\nnaïve\n".encode("latin-1")
    assert e3 and "latin-1" in out3      # ✓ has no latin-1 byte: refused, file untouched
    assert (tmp_path / "latin.txt").read_bytes() == "café = 2\nnaïve\n".encode("latin-1")


@both_stores
def test_a_session_left_with_an_unanswered_call_takes_its_next_message(server, llm):
    """The stored log of a run cut between a tool call and its result (what
    an internal error left before), then a new message: the request is one
    the provider accepts, and the model hears what happened to the call."""
    sid = server.chat("run: sleep 5")["session_id"]
    server.wait_event(sid, "tool_call")
    server.kill()                               # the call never gets its result
    server.sql("DELETE FROM events WHERE session_id = ? AND type IN ('tool_result', "
               "'tool_output', 'done')", (sid,))
    # As an internal error left it: the run over, the call never answered.
    server.sql("UPDATE sessions SET status = 'idle' WHERE id = ?", (sid,))
    server.start()                 # on PostgreSQL it drops the dead process's claim at once
    server.chat("say: again", sid)
    server.wait_status(sid)
    assert anthropic_problems(llm.requests[-1]) == []
    assert of(server.history(sid)["events"], "done")[-1]["status"] == "done"


def llama_cpp_sse(name: str, arguments: list[str], content_null: bool = True) -> list[bytes]:
    """A tool call as llama.cpp's server streams it: the name again in every
    chunk, `content` null, no usage at all."""
    def chunk(delta, finish=None):
        return ("data: " + json.dumps({"id": "chatcmpl-x", "object": "chat.completion.chunk",
                                       "created": 1, "model": "smol", "choices": [
                                           {"index": 0, "delta": delta,
                                            "finish_reason": finish}]}) + "\n\n").encode()
    out = [chunk({"role": "assistant", "content": None})]
    for part in arguments:
        out.append(chunk({"content": None, "tool_calls": [{"index": 0, "id": "call_abc",
                                                           "type": "function", "function": {
                                                               "name": name,
                                                               "arguments": part}}]}))
    out.append(chunk({}, "tool_calls"))
    out.append(b"data: [DONE]\n\n")
    return out


def test_llama_cpp_repeated_names_null_content_and_no_usage(llm, tmp_path):
    llm.script.append(Reply(raw=llama_cpp_sse("bash", ['{"comm', 'and": "echo ', 'smol"}'])))
    llm.script.append(Reply(raw=[
        b'data: {"choices":[{"index":0,"delta":{"content":"It said smol."},'
        b'"finish_reason":null}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n"]))
    events = arun(run_agent(cfg_for(llm, "openai"), tmp_path / "ws", "go"))
    call = of(events, "tool_call")[0]
    assert call["tool"] == "bash" and call["input"] == {"command": "echo smol"}
    assert of(events, "tool_result")[0]["output"].strip() == "smol"
    done = events[-1]
    assert done["status"] == "done" and done["usage"]["reported"] is False
    assert core.usage_line(done["usage"]) == "token usage not reported by the model server"
    # The assistant turn went back with a string content, as llama.cpp wants,
    # and a compatible server is asked for max_tokens.
    assistant = [m for m in llm.requests[1]["messages"] if m["role"] == "assistant"][0]
    assert assistant["content"] == "" and assistant["tool_calls"][0]["function"]["name"] == "bash"
    assert llm.requests[0]["max_tokens"] == 8192 and "max_completion_tokens" not in llm.requests[0]
    assert openai_problems(llm.requests[1]) == []


def test_openai_itself_is_asked_for_max_completion_tokens():
    for base, field_name in (("https://api.openai.com/v1", "max_completion_tokens"),
                             ("https://x.openai.azure.com/openai", "max_completion_tokens"),
                             ("http://localhost:11434/v1", "max_tokens"),
                             ("http://127.0.0.1:8000/v1", "max_tokens")):
        client = core.OpenAIClient(core.LLMConfig("openai", "m", "k", base), None)
        body = client.body([{"role": "user", "content": "hi"}], [])
        assert body[field_name] == 8192 and len([k for k in body if "max" in k]) == 1


def test_calls_without_an_index_and_arguments_as_objects_are_kept_apart(llm, tmp_path):
    """Ollama's shape: whole calls in one chunk each, no `index`."""
    def chunk(delta, finish=None):
        return ("data: " + json.dumps({"choices": [{"index": 0, "delta": delta,
                                                    "finish_reason": finish}]}) + "\n\n").encode()
    llm.script.append(Reply(raw=[
        chunk({"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "function": {"name": "bash", "arguments": {"command": "echo one"}}}]}),
        chunk({"tool_calls": [{"id": "call_2", "function": {
            "name": "bash", "arguments": '{"command": "echo two"}'}}]}),
        chunk({}, "stop"), b"data: [DONE]\n\n"]))
    llm.script.append(Reply("Both ran."))
    events = arun(run_agent(cfg_for(llm, "openai"), tmp_path / "ws", "go"))
    assert [c["input"]["command"] for c in of(events, "tool_call")] == ["echo one", "echo two"]
    assert [r["output"].strip() for r in of(events, "tool_result")] == ["one", "two"]


def test_think_tags_in_the_text_become_thinking_however_they_are_cut(llm, tmp_path):
    pieces = ["<th", "ink>I should ", "greet.</th", "ink>\n\nHel", "lo!"]
    llm.script.append(Reply(raw=[
        ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": p},
                                             "finish_reason": None}]}) + "\n\n").encode()
        for p in pieces] + [b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
                            b"\n\n", b"data: [DONE]\n\n"]))
    events = arun(run_agent(cfg_for(llm, "openai"), tmp_path / "ws", "hi"))
    assert of(events, "thinking")[0]["content"] == "I should greet."
    assert of(events, "message")[-1]["content"] == "Hello!"
    assert "<" not in "".join(d["content"] for d in of(events, "delta") if d["channel"] == "text")
    # A reply that only looks like the start of a tag keeps its text.
    tags = core.ThinkTags()
    assert tags.split("<thin") == [] and tags.split(" no tag") == [("text", "<thin no tag")]
    assert core.ThinkTags().split("<") == [] and core.ThinkTags().flush() == []


def test_minimax_gets_a_bearer_token_and_its_anthropic_suffix(llm, tmp_path):
    events = arun(run_agent(cfg_for(llm), tmp_path / "ws", "hi"))
    assert events[-1]["status"] == "done"
    sent = {k.lower(): v for k, v in llm.headers[0].items()}
    assert sent["x-api-key"] == "key-123" and sent["authorization"] == "Bearer key-123"
    official = core.AnthropicClient(core.LLMConfig("anthropic", "m", "k",
                                                   "https://api.anthropic.com"), None)
    assert "authorization" not in official.headers      # Anthropic reads it as OAuth
    for base in ("https://api.minimax.io", "https://api.minimax.io/anthropic/",
                 "https://api.minimax.io/anthropic/v1"):
        assert core.anthropic_base(base) == "https://api.minimax.io/anthropic"
    assert core.anthropic_base("https://api.minimaxi.com") == "https://api.minimaxi.com/anthropic"
    assert core.anthropic_base("https://proxy.example/v1") == "https://proxy.example"
    cfg = core.config_from_env(env={"MINIMAX_API_KEY": "mm", "MINIMAX_BASE_URL":
                                    "https://api.minimax.io"})
    assert core.AnthropicClient(cfg, None).url == "https://api.minimax.io/anthropic/v1/messages"


def test_ssl_cert_file_adds_roots_to_the_public_ones(tmp_path):
    (tmp_path / "cert.pem").write_text(TEST_CERT)
    public = len(core.tls_context({}).get_ca_certs())
    extra = core.tls_context({"SSL_CERT_FILE": str(tmp_path / "cert.pem")}).get_ca_certs()
    assert public > 10 and len(extra) == public + 1
    with pytest.raises(ValueError, match="SSL_CERT_FILE"):
        core.tls_context({"SSL_CERT_FILE": str(tmp_path / "missing.pem")})


def test_the_terminal_exits_cleanly_after_a_pooled_tls_stream(tmp_path):
    """Against a real provider (TLS, the connection kept alive) the terminal
    printed "Task was destroyed but it is pending!" at exit: its stream's
    generators were left for the garbage collector.  stderr must be empty."""
    (tmp_path / "cert.pem").write_text(TEST_CERT)
    (tmp_path / "key.pem").write_text(TEST_KEY)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    fake = FakeLLM(tls=tls)
    try:
        out = subprocess.run(
            [sys.executable, str(HERE / "agent_core.py"), "-w", str(tmp_path / "ws"),
             "--approve", "auto", "-t", "run: echo pooled"],
            capture_output=True, text=True, timeout=60,
            env=free_env(ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL=fake.url, NO_COLOR="1",
                         SSL_CERT_FILE=str(tmp_path / "cert.pem")))
    finally:
        fake.close()
    assert out.returncode == 0 and "■ done" in out.stdout, out.stdout + out.stderr
    assert len(fake.requests) == 2 and out.stderr == ""


def test_a_second_server_on_one_database_refuses_before_writing(tmp_path, llm):
    first = ServerProcess(tmp_path, llm)
    try:
        sid = first.chat("slow")["session_id"]
        first.wait_event(sid, "delta")
        second = subprocess.run(
            [sys.executable, str(HERE / "agent_web.py"), "--port", "0", "--no-browser",
             "--db", str(first.db), "--workspace", str(tmp_path / "ws2")],
            capture_output=True, text=True, timeout=30, env=first.env, cwd=tmp_path)
        assert second.returncode == 2 and second.stdout == ""
        line, = second.stderr.strip().splitlines()          # one line, no traceback
        assert str(first.db) in line and f"process {first.proc.pid}" in line
        assert not (tmp_path / "ws2").exists()
        done = first.wait_status(sid)["events"]
        assert [e["status"] for e in of(done, "done")] == ["done"]   # one, its own
    finally:
        first.stop()
    # Once the first has exited (even killed), the next one starts.
    again = ServerProcess(tmp_path, llm)
    again.kill()
    ServerProcess(tmp_path, llm).stop()


def test_uvicorn_workers_on_sqlite_fail_at_once(tmp_path):
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "uvicorn", "agent_web:app", "--ws", "wsproto", "--workers", "2",
         "--port", "0"], capture_output=True, text=True, timeout=60, cwd=HERE,
        env=free_env(AGENT_WEB_DB=str(tmp_path / "w.db"), AGENT_WORKSPACE=str(tmp_path / "ws")))
    said = out.stdout + out.stderr
    assert "one server per SQLite database" in said and "failed to start" in said, said
    assert said.count("Started server process") == 2          # no restart loop
    assert time.time() - started < 50


def test_a_lone_surrogate_from_anyone_is_stored_and_costs_no_other_session(server, llm):
    """`{"message": "bad \\ud800"}` is valid JSON but not storable UTF-8: it
    answered 500 and its batch took down another session's run."""
    other = server.chat("slow")["session_id"]
    server.wait_event(other, "delta")
    r = server.http("POST", "/agent/chat", raw=b'{"message": "bad \\ud800 and \\ud83d\\ude00"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 202, r.text
    sid = r.json()["session_id"]
    stored = server.wait_status(sid)["events"]
    assert stored[0]["content"] == "bad \ufffd and \U0001F600"
    assert of(server.wait_status(other)["events"], "done")[-1]["status"] == "done"
    assert of(server.history(other)["events"], "message")[-1]["content"].endswith("END")


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_an_emoji_split_across_chunks_is_joined_not_lost(llm, tmp_path, protocol):
    if protocol == "openai":
        raw = [b'data: {"choices":[{"index":0,"delta":{"content":"hi \\ud83d"}}]}\n\n',
               b'data: {"choices":[{"index":0,"delta":{"content":"\\ude00!"}}]}\n\n',
               b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
               b"data: [DONE]\n\n"]
    else:
        raw = anthropic_sse(Reply("x"))
        text_at = [i for i, c in enumerate(raw) if b"text_delta" in c]
        raw[text_at[0]] = raw[text_at[0]].replace(b'"text": "x"', b'"text": "hi \\ud83d"')
        raw.insert(text_at[0] + 1, raw[text_at[0]].replace(b'hi \\ud83d', b'\\ude00!'))
    llm.script.append(Reply(raw=raw))
    events = arun(run_agent(cfg_for(llm, protocol), tmp_path / "ws", "go"))
    assert of(events, "message")[-1]["content"] == "hi \U0001F600!"
    assert "".join(d["content"] for d in of(events, "delta")) == "hi \U0001F600!"
    for e in events:
        json.dumps(e, ensure_ascii=False).encode("utf-8")     # all storable


def test_file_tools_refuse_a_fifo_instead_of_hanging(tmp_path):
    """write_file onto a FIFO blocked a thread for ever (Stop could not end it)."""
    box = core.Toolbox(tmp_path)
    os.mkfifo(tmp_path / "pipe")

    async def go():
        return await asyncio.wait_for(asyncio.gather(
            box.execute("write_file", {"path": "pipe", "content": "x"}),
            box.execute("read_file", {"path": "pipe"}),
            box.execute("edit_file", {"path": "pipe", "old_str": "a", "new_str": "b"})), 10)
    for output, is_error in arun(go()):
        assert is_error and "not a regular file" in output, output


def test_a_workspace_whose_reads_hang_does_not_stop_the_models_connections(tmp_path, llm):
    """Workspace file I/O has threads of its own: with far more file tool
    calls stuck in the disk than asyncio's default executor has threads, a
    model reached by host name (looked up on that executor) still answers;
    the reads end when the disk does."""
    import dataclasses
    box = core.Toolbox(tmp_path / "ws")
    (tmp_path / "ws" / "f.txt").write_text("hi\n")
    disk = threading.Event()
    opened = box.open_file

    def stalled(*args, **kwargs):            # a stalled network mount, say
        disk.wait(30)
        return opened(*args, **kwargs)
    box.open_file = stalled
    cfg = dataclasses.replace(cfg_for(llm), base_url=llm.url.replace("127.0.0.1", "localhost"))

    async def go():
        reads = [asyncio.create_task(box.execute("read_file", {"path": "f.txt"}))
                 for _ in range(40)]
        await asyncio.sleep(0.2)
        try:
            events = await asyncio.wait_for(run_agent(cfg, tmp_path / "other", "say: still here"),
                                            10)
        finally:
            disk.set()
        return events, await asyncio.gather(*reads)
    events, reads = arun(go())
    assert of(events, "message")[-1]["content"] == "still here"
    assert reads == [("     1\thi", False)] * 40


def test_a_folder_found_to_be_a_symlink_when_opened_is_refused_by_name(tmp_path):
    """The folders of a path are opened one by one, refusing symlinks; one
    found to be a symlink at that moment (it was swapped in after the path
    was checked) is named in the error, on any POSIX system (it was looked up
    through Linux's /proc/self/fd, elsewhere a bare OSError)."""
    ws = tmp_path / "ws"
    (ws / "real").mkdir(parents=True)
    (ws / "link").symlink_to(ws / "real")
    box = core.Toolbox(ws)
    with pytest.raises(core.ToolError, match="became a symbolic link"):
        box._folder_fd(ws.resolve(), ("link",), "link/f.txt", False)
    fd = box._folder_fd(ws.resolve(), ("real",), "real/f.txt", False)
    os.close(fd)


def test_confinement_holds_while_a_folder_is_swapped_for_a_symlink(tmp_path):
    """The path is checked, then opened: swapping a folder for a symlink out
    in between let read_file read, and write_file write, outside."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    (ws / "sub").mkdir(parents=True)
    outside.mkdir()
    (ws / "sub" / "f.txt").write_text("inside\n")
    (outside / "f.txt").write_text("SECRET\n")
    box = core.Toolbox(ws)
    stop = threading.Event()

    def swapper():
        import shutil
        while not stop.is_set():
            os.rename(ws / "sub", ws / "sub_real")
            try:
                os.symlink(outside, ws / "sub")
                time.sleep(0.0002)
                os.unlink(ws / "sub")
            except FileExistsError:      # a write_file made a new "sub" meanwhile
                pass
            while True:                  # put the real one back
                shutil.rmtree(ws / "sub", ignore_errors=True)
                try:
                    os.rename(ws / "sub_real", ws / "sub")
                    break
                except OSError:
                    continue
            time.sleep(0.0002)

    async def go():
        results = []
        for i in range(400):
            results.append(await box.execute("read_file", {"path": "sub/f.txt"}))
            results.append(await box.execute("write_file", {"path": f"sub/w{i}.txt",
                                                            "content": "x"}))
        return results
    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        results = arun(go())
    finally:
        stop.set()
        thread.join()
    assert not any("SECRET" in out for out, _ in results)
    assert sorted(p.name for p in outside.iterdir()) == ["f.txt"]
    assert any(not err and "inside" in out for out, err in results)   # it did work too


def test_a_stopped_call_says_it_ran_and_a_queued_one_that_it_did_not(llm, tmp_path):
    """A command cancelled after it started said "Not run", so the model
    might repeat a command whose effects were already there."""
    marker = tmp_path / "made"
    llm.script.append(Reply("", tools=[
        ("bash", json.dumps({"command": f"touch {marker}; sleep 30"})),
        ("bash", json.dumps({"command": "echo never"}))]))

    async def scenario():
        cfg = cfg_for(llm)
        async with core.make_http_client(cfg) as http:
            agent = core.Agent(core.make_llm(cfg, http), cfg, core.Toolbox(tmp_path))
            events = []
            async for ev in agent.run([{"role": "user", "content": "go"}]):
                events.append(ev)
                if ev["type"] == "tool_call" and len(of(events, "tool_call")) == 2:
                    async def later():
                        while not marker.exists():
                            await asyncio.sleep(0.01)
                        await asyncio.sleep(0.3)
                        agent.cancel()
                    asyncio.ensure_future(later())
            return events
    events = arun(scenario())
    first, second = of(events, "tool_result")
    assert re.match(r"Stopped after \d+\.\d s: the run was cancelled while this ran\. It had "
                    r"started", first["output"]), first["output"]
    assert "Output so far:\n(none)" in first["output"] and marker.exists()
    assert second["output"] == "Not run: the run was cancelled before this tool call started."


def test_a_full_disk_is_reported_and_the_server_carries_on(tmp_path, llm):
    """SQLite's own SQLITE_FULL (the writer may grow the file no more) in the
    middle of a streamed answer: the POST that cannot be stored says 503 with
    Retry-After; the run stops; once there is room again its end is written
    (an error saying why, then done) and the session takes messages again,
    with no restart."""
    import agent_web as web
    llm.script.append(Reply(" ".join(f"word{i}" for i in range(3000)), delay=0.002))

    async def scenario():
        app = web.create_app(db_path=tmp_path / "a.db", workspace=tmp_path / "ws", token=TOKEN,
                             llm_config=cfg_for(llm), approve="auto")
        h = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://127.0.0.1") as client:
            async def events(sid):
                r = await client.get(f"/agent/chat?session_id={sid}&limit=5000", headers=h)
                return r.json()
            sid = (await client.post("/agent/chat", json={"message": "go"}, headers=h)
                   ).json()["session_id"]
            while not of((await events(sid))["events"], "delta"):
                await asyncio.sleep(0.01)
            # The disk is full: not one more page.
            await app.store.write(lambda c: c.execute(
                f"PRAGMA max_page_count = {c.execute('PRAGMA page_count').fetchone()[0]}"))
            while not app.runs.runs.get(sid) or app.runs.runs[sid].failed_store is None:
                await asyncio.sleep(0.02)
            busy = await client.post("/agent/chat", json={"message": "more", "session_id": sid},
                                     headers=h)
            still = (await events(sid))["status"]
            await app.store.write(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
            while (await events(sid))["status"] != "idle":
                await asyncio.sleep(0.05)
            ended = (await events(sid))["events"]
            again = await client.post("/agent/chat", json={"message": "say: back",
                                                            "session_id": sid}, headers=h)
            while (await events(sid))["status"] != "idle":
                await asyncio.sleep(0.05)
            final = (await events(sid))["events"]
            await app.stop()
            return busy, still, ended, again, final
    busy, still, ended, again, final = arun(scenario())
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    assert busy.json()["error"]["code"] == "store_unavailable"
    assert "disk is full" in busy.json()["error"]["message"] and still == "running"
    error, = [e for e in of(ended, "error") if "stopped" in e["message"]]
    assert "disk is full" in error["message"] and "never stored, nor shown" in error["message"]
    assert [d["status"] for d in of(ended, "done")] == ["error"]
    assert [e["seq"] for e in ended] == list(range(1, len(ended) + 1))     # no gap
    assert again.status_code == 202 and of(final, "done")[-1]["status"] == "done"
    assert of(final, "message")[-1]["content"] == "back"


def test_a_pacing_window_joins_a_streams_fragments_and_never_holds_an_awaited_event(tmp_path):
    """AGENT_WEB_COALESCE_MS: the first fragment after a pause is committed at
    once; those that follow wait for the next slot, joined into one delta;
    an event the run waits on is never held for the slot (the window here
    is far longer than the test's time-out) and takes them along, in order."""
    import agent_web as web

    def piece(text):
        return {"type": "delta", "message_id": "m1", "channel": "text", "content": text}

    async def main():
        async with event_log(tmp_path / "w.db", "s1", coalesce=60.0) as (store, log):
            log.emit_nowait("s1", piece("a"))
            while log.commits < 1:
                await asyncio.sleep(0.01)
            for text in "bcd":
                log.emit_nowait("s1", piece(text))
                await asyncio.sleep(0.02)
            assert log.commits == 1                     # b, c, d wait for the slot
            await asyncio.wait_for(log.emit("s1", {"type": "error", "retrying": False,
                                                   "message": "x"}), 10)
            assert log.commits == 2
            _, rows = await store.read(web.Store.history, "s1", 0, 10)
            return [(e["type"], e.get("content"), e["seq"]) for e in map(json.loads, rows)]
    assert arun(main()) == [("delta", "a", 1), ("delta", "bcd", 2), ("error", None, 3)]


def refuse_rows(monkeypatch, refused, message: str) -> None:
    """The store's INSERT fails, as SQLite would, for a batch holding a row
    (session_id, seq, type, data) that `refused` picks."""
    import agent_web as web
    insert = web.Store._insert

    def picky_insert(conn, rows):
        if any(refused(row) for row in rows):
            raise sqlite3.OperationalError(message)
        insert(conn, rows)
    monkeypatch.setattr(web.Store, "_insert", staticmethod(picky_insert))


@contextlib.asynccontextmanager
async def event_log(db: Path, *sessions: str, coalesce: float = 0.0):
    """A store with these sessions and its EventLog, running; both closed after."""
    import agent_web as web
    store = web.Store(db)
    await store.open()
    for sid in sessions:
        await store.write(web.Store.create_session, sid, "auto")
    log = web.EventLog(store, web.PushRegistry(), coalesce)
    log.start()
    try:
        yield store, log
    finally:
        await log.stop()
        store.close()


def test_a_batch_that_fails_is_retried_without_the_session_that_broke_it(tmp_path, monkeypatch):
    """One commit carries every session's pending events: an event that
    cannot be written must cost only its own session."""
    import agent_web as web
    refuse_rows(monkeypatch, lambda row: row[0] == "bad", "no such thing as a bad row")

    async def go():
        async with event_log(tmp_path / "a.db", "good", "bad") as (store, log):
            for n in range(3):           # queued together: one batch
                log.emit_nowait("good", {"type": "delta", "message_id": "g", "channel": "text",
                                         "content": f"g{n}"})
                log.emit_nowait("bad", {"type": "delta", "message_id": "b", "channel": "text",
                                        "content": f"b{n}"})
            results = await asyncio.gather(
                log.emit("good", {"type": "error", "message": "good", "retrying": False}),
                log.emit("bad", {"type": "error", "message": "bad", "retrying": False}),
                return_exceptions=True)
            await log.flush()
            rows = await store.read(lambda conn: conn.execute(
                "SELECT session_id, seq, type FROM events ORDER BY session_id, seq").fetchall())
        return results, rows, log.lost
    (good, bad), rows, lost = arun(go())
    assert good["seq"] == 2 and isinstance(bad, web.StoreUnavailable)
    assert rows == [("good", 1, "delta"), ("good", 2, "error")]
    assert lost == {"bad": 1}              # its merged delta: its run will say so


def test_in_a_session_whose_share_fails_only_the_event_that_cannot_be_written_is_lost(
        tmp_path, monkeypatch):
    import agent_web as web
    refuse_rows(monkeypatch, lambda row: "poison" in row[3], "this row cannot be written")

    async def go():
        async with event_log(tmp_path / "a.db", "s") as (store, log):
            results = await asyncio.gather(*(
                log.emit("s", {"type": "error", "message": text, "retrying": False})
                for text in ("one", "poison", "three")), return_exceptions=True)
            rows = await store.read(lambda conn: conn.execute(
                "SELECT seq, data FROM events ORDER BY seq").fetchall())
        return results, [(seq, json.loads(d)["message"]) for seq, d in rows]
    results, rows = arun(go())
    assert isinstance(results[1], web.StoreUnavailable) and "cannot be written" in str(
        results[1])
    assert rows == [(1, "one"), (2, "three")]             # gapless, the rest kept


@both_stores
def test_deleting_a_live_session_tells_its_watchers_and_closes_4004(server):
    """Its subscribers got nothing and waited for ever."""
    sid = server.chat("slow")["session_id"]
    server.wait_event(sid, "delta")

    async def watch():
        async with websockets.connect(server.ws_url()) as ws:
            await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": 0}))
            frames = []
            deleted = False
            while True:
                try:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                except websockets.ConnectionClosed as closed:
                    return frames, closed.rcvd.code
                frames.append(frame)
                if frame["type"] == "delta" and not deleted:
                    deleted = True
                    r = await asyncio.to_thread(server.http, "DELETE", f"/agent/sessions/{sid}")
                    assert r.status_code == 204
    frames, code = arun(watch())
    assert frames[-1] == {"type": "session_deleted", "session_id": sid} and code == 4004
    assert server.http("GET", f"/agent/chat?session_id={sid}").status_code == 404


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_a_server_that_ignores_max_tokens_is_stopped_and_says_which_limit(llm, tmp_path,
                                                                          protocol):
    llm.script.append(Reply(" ".join(f"w{i}" for i in range(3000))))
    events = arun(run_agent(cfg_for(llm, protocol, max_tokens=20), tmp_path / "ws", "go"))
    assert events[-1]["status"] == "error"
    error = of(events, "error")[-1]
    assert "more than 320 characters" in error["message"] and "AGENT_MAX_TOKENS" in error["message"]
    assert of(events, "message")[-1]["incomplete"]           # what came is kept, marked cut
    assert len(llm.requests) == 1                             # not retried


def test_a_stream_with_no_end_of_event_is_capped(llm, tmp_path):
    llm.script.append(Reply(raw=[b"data: " + b"x" * 60_000 for _ in range(10)]))
    events = arun(run_agent(cfg_for(llm, "openai", max_tokens=100), tmp_path / "ws", "go"))
    assert events[-1]["status"] == "error" and len(llm.requests) == 1
    assert "more than 200,000 bytes" in of(events, "error")[-1]["message"]


def test_one_sse_event_may_not_grow_without_bound(monkeypatch):
    monkeypatch.setattr(core, "MAX_SSE_EVENT_BYTES", 1000)
    with pytest.raises(core.LLMError, match="without ending an event"):
        parse_sse([b"data: " + b"y" * 600, b"y" * 600])


def test_a_trickling_server_meets_the_step_deadline(llm, tmp_path):
    """One byte a second never trips the read time-out: the step's deadline does."""
    llm.script.append(Reply(" ".join(f"w{i}" for i in range(100)), delay=0.1))
    started = time.monotonic()
    events = arun(run_agent(cfg_for(llm, step_timeout=1.0), tmp_path / "ws", "go"))
    assert events[-1]["status"] == "error" and time.monotonic() - started < 8
    assert "longer than 1 s (AGENT_STEP_TIMEOUT)" in of(events, "error")[-1]["message"]
    assert of(events, "delta")                                 # it did stream, slowly


def test_the_servers_connections_send_without_nagles_delay():
    """Each response is two writes (headers, body): with Nagle's algorithm on,
    the second waited ~40 ms for the client's delayed ACK, on every request.
    asyncio turns it off only for sockets whose proto says TCP."""
    import agent_web as web

    async def go():
        sock = web.listening_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                raw = transport.get_extra_info("socket")
                seen.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        nodelay = await seen
        writer.close()
        server.close()
        await server.wait_closed()
        return nodelay
    assert arun(go()) != 0


def test_connections_past_the_cap_get_503_and_the_rest_are_served(tmp_path, llm):
    """AGENT_WEB_MAX_CONNECTIONS bounds what slow or idle clients can hold."""
    server = ServerProcess(tmp_path, llm, extra_env={"AGENT_WEB_MAX_CONNECTIONS": "4"})
    idle = []
    try:
        for _ in range(4):       # four requests that never finish their headers
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            idle.append(sock)
        time.sleep(0.3)
        refused = httpx.get(server.base + "/healthz", timeout=10)
        assert refused.status_code == 503
        for sock in idle:
            sock.close()
        deadline = time.time() + 10
        while httpx.get(server.base + "/healthz", timeout=10).status_code != 200:
            assert time.time() < deadline, "the cap never freed up"
            time.sleep(0.1)
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_a_body_sent_a_byte_at_a_time_times_out_408(tmp_path, llm):
    server = ServerProcess(tmp_path, llm, extra_env={"AGENT_WEB_BODY_TIMEOUT": "1"})
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /agent/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                         b"Bearer " + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 40\r\n\r\n{")
            started = time.monotonic()
            sock.settimeout(10)
            answer = b""
            for _ in range(8):            # a byte a second, never the whole body
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
                try:
                    sock.settimeout(1)
                    answer += sock.recv(4096)
                    if answer:
                        break
                except socket.timeout:
                    continue
            while b"body_timeout" not in answer:      # the body may come apart
                more = sock.recv(4096)
                if not more:
                    break
                answer += more
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"body_timeout" in answer and time.monotonic() - started < 5
        assert server.http("GET", "/healthz").status_code == 200
    finally:
        server.stop()


# =============================================================================
# Long sessions: context compaction and session notes (issue 18)
# =============================================================================

def test_prompt_too_long_is_recognised_in_what_each_server_says():
    bodies = {
        '{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too '
        'long: 208656 tokens > 200000 maximum"}}': 200000,                  # Anthropic
        '{"error":{"message":"This model\'s maximum context length is 16384 tokens. However, '
        'you requested 122946 tokens","code":"context_length_exceeded"}}': 16384,  # OpenAI, vLLM
        '{"error":{"code":400,"message":"the request exceeds the available context size. try '
        'increasing the context size or enable context shift","type":"exceed_context_size_error",'
        '"n_prompt_tokens":1407,"n_ctx":256}}': 256,                        # llama.cpp
        '{"error":{"code":500,"message":"Context size has been exceeded.","type":"server_error"}}':
            None,                                                           # older llama.cpp
        '{"detail":"Requested tokens (2285) exceed context window of 2048"}': 2048,
        '{"object":"error","message":"Input prompt (35247 tokens) is too long and exceeds limit '
        'of 1000"}': 1000,                                                  # vLLM's scheduler
    }
    for body, size in bodies.items():
        assert core.prompt_too_long(body) == (True, size), body
    for other in ('{"error":{"message":"Rate limit reached for tokens per min"}}',
                  '{"error":"model \'x\' not found"}', "Bad Gateway"):
        assert core.prompt_too_long(other) == (False, None)


def long_prompt(n: int, size: int = 2400) -> str:
    return f"say: turn{n} " + f"filler{n} " * (size // 8)


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_a_long_session_is_compacted_and_the_model_reads_the_summary(llm, tmp_path, protocol):
    """Past the limit (counted by the server's own usage, plus an estimate of
    what came since) the older turns are summarised by the model: one
    `compaction` event, and the next request is the summary and the newest
    turns, a conversation the provider accepts."""
    llm.count_tokens = True
    cfg = cfg_for(llm, protocol, token_limit=2000)
    history: list[dict] = []
    runs = []
    for n in range(4):
        runs.append(arun(run_agent(cfg, tmp_path / "ws", long_prompt(n), history=history)))
    events = [e for run in runs for e in run]
    compactions = of(events, "compaction")
    assert len(compactions) >= 1
    c = compactions[0]
    assert c["tokens_before"] > 2000 > c["tokens_after"] and c["messages"] >= 2
    assert "SUMMARY: the user sent" in c["summary"] and c["reason"] == "limit"
    assert all(r[-1]["status"] == "done" for r in runs)
    # The summary request: no tools, the transcript of the older part.
    asks = [b for b in llm.requests if is_summary_request(b)]
    assert asks and all("tools" not in b for b in asks)
    assert "turn0" in json.dumps(asks[0])
    # After it, the model reads the summary, not the turns it stands for.
    last = llm.requests[-1]
    sent = json.dumps(last["messages"])
    assert "SUMMARY: the user sent" in sent and "filler0" not in sent and "turn3" in sent
    check = anthropic_problems if protocol == "anthropic" else openai_problems
    assert all(check(b) == [] for b in llm.requests)
    # A context event after every step; the server's count, not an estimate.
    contexts = of(events, "context")
    assert len(contexts) >= len(of(events, "message")) and contexts[0]["limit"] == 2000
    assert not contexts[0]["estimated"] and contexts[0]["tokens"] > 0


def test_the_models_view_is_rebuilt_from_the_newest_compaction():
    events = [
        {"seq": 1, "type": "message", "role": "user", "content": "first"},
        {"seq": 2, "type": "message", "role": "assistant", "message_id": "a1", "content": "A1"},
        {"seq": 3, "type": "context", "tokens": 900, "limit": 1000, "estimated": False},
        {"seq": 4, "type": "message", "role": "user", "content": "second"},
        {"seq": 5, "type": "message", "role": "assistant", "message_id": "a2", "content": "A2"},
        {"seq": 6, "type": "compaction", "summary": "S-old", "through_seq": 2},
        {"seq": 7, "type": "message", "role": "user", "content": "third"},
        {"seq": 8, "type": "tool_call", "message_id": "a3", "call_id": "c1", "tool": "bash",
         "input": {"command": "ls"}},
        {"seq": 9, "type": "tool_result", "call_id": "c1", "tool": "bash", "output": "x",
         "is_error": False, "duration_ms": 1},
        {"seq": 10, "type": "compaction", "summary": "S-new", "through_seq": 7},
        {"seq": 11, "type": "context", "tokens": 300, "limit": 1000, "estimated": False},
    ]
    measure: dict = {}
    history = core.history_from_events(events, measure)
    assert [h["role"] for h in history] == ["user", "assistant", "tool"]
    assert history[0]["content"] == "S-new" and history[1]["tool_calls"][0]["id"] == "c1"
    assert measure == {"tokens": 300, "entries": 3}
    # A count taken before the newest compaction is not the context now.
    measure = {}
    core.history_from_events(events[:10], measure)
    assert measure == {}


def test_any_log_with_a_compaction_makes_requests_both_providers_accept():
    """Property test: random logs, a compaction through a random seq, a new
    message: the rebuilt requests pass both providers' validators."""
    import random
    for seed in range(600):
        rng = random.Random(seed)
        events = random_event_log(rng)
        for i, e in enumerate(events, 1):
            e["seq"] = i
        through = rng.randint(0, len(events))
        events.append({"seq": len(events) + 1, "type": "compaction", "summary": "[Context "
                       "compacted] what came before", "through_seq": through})
        events.append({"seq": len(events) + 1, "type": "message", "role": "user",
                       "content": "and now?"})
        a_body, o_body = request_bodies(core.history_from_events(events))
        assert anthropic_problems(a_body) == [], (seed, a_body["messages"])
        assert openai_problems(o_body) == [], (seed, o_body["messages"])
        assert "what came before" in json.dumps(o_body["messages"][1])


@pytest.mark.parametrize("protocol", ["anthropic", "openai"])
def test_prompt_too_long_is_answered_by_compacting_and_retrying(llm, tmp_path, protocol):
    """The server's context is smaller than token_limit: its own "too long"
    answer starts a compaction, and the step is tried again, not failed."""
    llm.count_tokens = True
    llm.context_size = 1800
    cfg = cfg_for(llm, protocol)                       # token_limit 80,000: far too high
    history: list[dict] = []
    runs = [arun(run_agent(cfg, tmp_path / "ws", long_prompt(n), history=history))
            for n in range(4)]
    events = [e for run in runs for e in run]
    assert all(r[-1]["status"] == "done" for r in runs)
    said = [e for e in events if e["type"] == "error"]
    assert said and all(e["retrying"] for e in said)
    assert "too long" in said[0]["message"] and "compacting" in said[0]["message"]
    c = of(events, "compaction")[0]
    assert c["reason"] == "too_long" and c["tokens_after"] < 1800
    assert llm.refused == len(said)          # each refusal said, then made to fit
    assert len(json.dumps(llm.requests[-1])) // 4 <= 1800


def test_one_huge_tool_output_is_shortened_in_the_models_view_only(llm, tmp_path):
    """Nothing older to summarise helps when one tool result alone is past
    the server's context: the largest results are shortened for the model,
    it says so, and the stored result keeps every character."""
    llm.count_tokens = True
    llm.context_size = 3000
    cmd = "python3 -c \"print('y' * 19000)\""
    events = arun(run_agent(cfg_for(llm), tmp_path / "ws", f"run: {cmd}"))
    assert events[-1]["status"] == "done"
    result = of(events, "tool_result")[0]
    assert result["output"].count("y") >= 19000              # the log keeps it whole
    notes = [e["message"] for e in of(events, "error")]
    assert all(e["retrying"] for e in of(events, "error"))
    assert any("shortened in the model's view" in m for m in notes)
    sent = json.dumps(llm.requests[-1]["messages"])
    assert "shortened to fit the model's context" in sent and sent.count("y") < 6000


def test_a_failing_summary_call_is_retried_and_stop_during_compaction_works(llm, tmp_path):
    llm.count_tokens = True
    cfg = cfg_for(llm, token_limit=2000)
    history: list[dict] = []
    assert not of(arun(run_agent(cfg, tmp_path / "ws", long_prompt(0), history=history)),
                  "compaction")
    before = [dict(h) for h in history]
    # Stop while the summary is being written: the run ends cancelled, and
    # nothing of a compaction is left (the history is as it was).
    llm.on_summary.append(Reply(hang=True))

    async def stop_during_summary():
        history.append({"role": "user", "content": long_prompt(9, 6000)})
        async with core.make_http_client(cfg) as http:
            agent = core.Agent(core.make_llm(cfg, http), cfg, core.Toolbox(tmp_path / "ws"))

            async def stop_soon():
                deadline = time.monotonic() + 10
                while not any(map(is_summary_request, llm.requests)):
                    assert time.monotonic() < deadline, "no summary was asked for"
                    await asyncio.sleep(0.02)
                agent.cancel()
            stopper = asyncio.ensure_future(stop_soon())
            out = [ev async for ev in agent.run(history)]
            await stopper
            return out
    events = arun(stop_during_summary())
    assert events[-1]["status"] == "cancelled" and not of(events, "compaction")
    assert history[:len(before)] == before
    history.pop()
    # A summary call that fails is retried like any other call.
    llm.on_summary.append(Reply(status=529, body=json.dumps(
        {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}).encode()))
    events = arun(run_agent(cfg, tmp_path / "ws", long_prompt(3), history=history))
    assert events[-1]["status"] == "done" and len(of(events, "compaction")) == 1
    retry = [e for e in of(events, "error") if e["retrying"]]
    assert retry and "summarising the conversation" in retry[0]["message"]


def test_compaction_in_the_server_is_stored_kept_across_a_restart_and_loses_nothing(
        tmp_path, llm):
    """The server stores the compaction with the last seq it stands for; the
    user's view keeps every message; after a restart the model's view starts
    from the summary; a crash during a summary loses nothing and the next
    message compacts again."""
    llm.count_tokens = True
    server = ServerProcess(tmp_path, llm, extra_env={"AGENT_TOKEN_LIMIT": "2000"})
    try:
        sid = None
        for n in range(3):
            sid = server.chat(long_prompt(n), sid)["session_id"]
            server.wait_status(sid)
        events = server.all_events(sid)
        c = of(events, "compaction")[0]
        assert 0 < c["through_seq"] < c["seq"] and "SUMMARY" in c["summary"]
        kept = [e for e in events if e["seq"] > c["through_seq"] and e["type"] == "message"]
        assert kept and kept[0]["role"] == "user"                # a turn starts there
        assert [e["content"] for e in of(events, "message") if e["role"] == "user"] == [
            long_prompt(n) for n in range(3)]                   # the user's view: all of it
        server.stop()
        server.start()
        server.chat("say: after the restart", sid)
        server.wait_status(sid)
        first = json.dumps(llm.requests[-1]["messages"][0])
        assert "[Context compacted]" in first and "filler0" not in json.dumps(
            llm.requests[-1]["messages"])
        # A crash while a summary is written: nothing is stored of it, and
        # the next message compacts again.
        count = len(of(server.all_events(sid), "compaction"))
        llm.on_summary.append(Reply(hang=True))
        server.chat(long_prompt(7), sid)
        deadline = time.time() + 20
        while not any(is_summary_request(b)
                      for b in llm.requests[-1:]) and time.time() < deadline:
            time.sleep(0.05)
        server.kill()
        server.start()
        assert server.history(sid)["status"] == "idle"
        assert len(of(server.all_events(sid), "compaction")) == count
        server.chat("say: once more", sid)
        server.wait_status(sid)
        assert len(of(server.all_events(sid), "compaction")) == count + 1
    finally:
        server.stop()


def test_the_terminal_prints_a_compaction_line(llm, tmp_path):
    llm.count_tokens = True
    llm.context_size = 3000
    out = subprocess.run(
        [sys.executable, str(HERE / "agent_core.py"), "-w", str(tmp_path), "--approve", "auto",
         "--token-limit", "1000", "-t", "run: python3 -c \"print('z' * 15000)\""],
        capture_output=True, text=True, timeout=60,
        env=free_env(ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL=llm.url,
                     AGENT_RETRY_BASE_DELAY="0.01"))
    assert "⟲ context compacted:" in out.stdout and "■ done" in out.stdout, out.stdout


def test_notes_are_kept_in_mini_agents_file_and_shape(tmp_path):
    upstream = [{"timestamp": "2025-10-01T09:00:00.000001", "category": "project_info",
                 "content": "Uses Python 3.12"}]
    (tmp_path / ".agent_memory.json").write_text(json.dumps(upstream, indent=2))
    box = core.Toolbox(tmp_path)

    async def go():
        return [await box.execute("record_note", {"content": "User likes short answers",
                                                  "category": "user_preference"}),
                await box.execute("record_note", {"content": "no category"}),
                await box.execute("recall_notes", {}),
                await box.execute("recall_notes", {"category": "user_preference"}),
                await box.execute("recall_notes", {"category": "nothing"})]
    rec, rec2, everything, prefs, none = arun(go())
    assert rec == ("Recorded note: User likes short answers (category: user_preference)", False)
    notes = json.loads((tmp_path / ".agent_memory.json").read_text())
    assert notes[0] == upstream[0] and [n["category"] for n in notes] == [
        "project_info", "user_preference", "general"]
    assert set(notes[1]) == {"timestamp", "category", "content"}
    assert everything[0].startswith("Recorded Notes:\n1. [project_info] Uses Python 3.12\n"
                                    "   (recorded at 2025-10-01T09:00:00.000001)")
    assert prefs[0] == ("Recorded Notes:\n1. [user_preference] User likes short answers\n"
                        f"   (recorded at {notes[1]['timestamp']})")
    assert none == ("No notes found in category: nothing", False)


def test_notes_written_at_once_by_many_sessions_lose_none_and_bad_files_are_kept(tmp_path):
    boxes = [core.Toolbox(tmp_path) for _ in range(4)]      # four sessions, one workspace

    async def go():
        return await asyncio.gather(*(
            box.execute("record_note", {"content": f"s{i} n{j}"})
            for i, box in enumerate(boxes) for j in range(15)))
    results = arun(go())
    assert all(not err for _, err in results)
    notes = json.loads((tmp_path / ".agent_memory.json").read_text())
    assert sorted(n["content"] for n in notes) == sorted(
        f"s{i} n{j}" for i in range(4) for j in range(15))
    assert not list(tmp_path.glob("*.tmp"))
    # A file that is not a list of notes is never overwritten.
    (tmp_path / ".agent_memory.json").write_text("{oops")
    out, err = arun(boxes[0].execute("record_note", {"content": "x"}))
    assert err and "not a JSON list" in out
    assert (tmp_path / ".agent_memory.json").read_text() == "{oops"
    # Nor followed out of the workspace.
    (tmp_path / ".agent_memory.json").unlink()
    outside = tmp_path.parent / f"outside-{tmp_path.name}.json"
    outside.write_text("[]")
    (tmp_path / ".agent_memory.json").symlink_to(outside)
    out, err = arun(boxes[0].execute("recall_notes", {}))
    assert err and "symlink" in out and outside.read_text() == "[]"


# =============================================================================
# Mini-Agent's config files (issue 19.1)
# =============================================================================

# A config.yaml with every field upstream's example has, as a CLI user keeps it.
MINI_AGENT_YAML = """\
api_key: "sk-from-the-file"
api_base: "https://api.minimax.io"
model: "MiniMax-M2.5"
provider: "anthropic"
retry:
  enabled: true
  max_retries: 2
  initial_delay: 0.5
  max_delay: 7.0
  exponential_base: 3.0
max_steps: 12
workspace_dir: "./my-workspace"
system_prompt_path: "system_prompt.md"
token_limit: 50000
tools:
  enable_file_tools: true
  enable_bash: true
  enable_note: true
  enable_skills: true
  skills_dir: "./skills"
  enable_mcp: true
  mcp_config_path: "mcp.json"
  mcp:
    connect_timeout: 10.0
    execute_timeout: 60.0
    sse_read_timeout: 120.0
"""


def write_config(folder: Path, text: str = MINI_AGENT_YAML, prompt: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(text)
    if prompt is not None:
        (folder / "system_prompt.md").write_text(prompt)
    return folder / "config.yaml"


def test_config_yaml_is_found_where_mini_agent_looks(tmp_path):
    cwd, home = tmp_path / "project", tmp_path / "home"
    assert core.ConfigFile.find(cwd=cwd, home=home) is None
    write_config(home / ".mini-agent" / "config", MINI_AGENT_YAML.replace("MiniMax-M2.5", "home"))
    assert core.ConfigFile.find(cwd=cwd, home=home).get("model") == "home"
    write_config(cwd / "mini_agent" / "config", MINI_AGENT_YAML.replace("MiniMax-M2.5", "dev"))
    assert core.ConfigFile.find(cwd=cwd, home=home).get("model") == "dev"   # development first
    explicit = write_config(tmp_path / "x", MINI_AGENT_YAML.replace("MiniMax-M2.5", "mine"))
    assert core.ConfigFile.find(str(explicit), cwd=cwd, home=home).get("model") == "mine"
    with pytest.raises(ValueError, match="no such file"):
        core.ConfigFile.find(str(tmp_path / "missing.yaml"))


def test_every_field_of_config_yaml_is_honoured(tmp_path):
    path = write_config(tmp_path / "conf", prompt="You are Mini-Agent.\n\n{SKILLS_METADATA}\n")
    file = core.ConfigFile.read(path)
    assert file.warnings == []
    cfg = core.config_from_env(env={}, file=file)
    assert (cfg.provider, cfg.model, cfg.api_key) == ("anthropic", "MiniMax-M2.5",
                                                      "sk-from-the-file")
    # upstream adds /anthropic (or /v1) to MiniMax hosts only
    assert core.AnthropicClient(cfg, None).url == "https://api.minimax.io/anthropic/v1/messages"
    assert (cfg.retry_attempts, cfg.retry_base_delay, cfg.retry_max_delay,
            cfg.retry_exp_base, cfg.token_limit) == (3, 0.5, 7.0, 3.0, 50000)
    assert core.with_skills(cfg.system_prompt, core.Skills(None)) == "You are Mini-Agent."
    said = "You are Mini-Agent.\n\n## Current Workspace\nWork in /srv/mine."    # kept as is
    assert core.with_workspace(said, tmp_path) == said
    assert core.with_workspace("You are Mini-Agent.", tmp_path).endswith(f"`{tmp_path}`\n"
        "All relative paths will be resolved relative to this directory.")
    assert file.get("max_steps") == 12 and file.get("workspace_dir") == "./my-workspace"
    openai = core.ConfigFile.read(write_config(tmp_path / "o", MINI_AGENT_YAML.replace(
        'provider: "anthropic"', 'provider: "openai"')))
    assert core.config_from_env(env={}, file=openai).base_url == "https://api.minimax.io/v1"
    other = core.ConfigFile.read(write_config(tmp_path / "t", MINI_AGENT_YAML.replace(
        'provider: "anthropic"', 'provider: "openai"').replace(
        "https://api.minimax.io", "https://api.siliconflow.cn/v1")))
    assert core.config_from_env(env={}, file=other).base_url == "https://api.siliconflow.cn/v1"
    off = core.ConfigFile.read(write_config(tmp_path / "r", MINI_AGENT_YAML.replace(
        "enabled: true", "enabled: false").replace("enable_bash: true", "enable_bash: false")
        .replace("enable_note: true", "enable_note: false")))
    assert core.config_from_env(env={}, file=off).retry_attempts == 1      # no retries
    names = {t["name"] for t in core.Toolbox(tmp_path / "ws", **off.toolbox_options()).specs()}
    assert names == {"read_file", "write_file", "edit_file"}


def test_flags_beat_environment_beat_the_file_beat_defaults(tmp_path):
    file = core.ConfigFile.read(write_config(tmp_path / "c"))
    env = {"AGENT_MODEL": "env-model", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
           "AGENT_TOKEN_LIMIT": "60000"}
    cfg = core.config_from_env(env=env, file=file)
    assert (cfg.model, cfg.base_url, cfg.api_key, cfg.token_limit) == (
        "env-model", "http://127.0.0.1:9", "sk-from-the-file", 60000)
    cfg = core.config_from_env(model="flag-model", token_limit=70000, env=env, file=file)
    assert (cfg.model, cfg.token_limit) == ("flag-model", 70000)
    # A provider key in the environment beats the file's LLM altogether.
    cfg = core.config_from_env(env={"OPENAI_API_KEY": "sk-env"}, file=file)
    assert (cfg.provider, cfg.api_key) == ("openai", "sk-env")
    # No api_key in the file (and none in the environment): the demo model.
    bare = core.ConfigFile.read(write_config(tmp_path / "d", "max_steps: 3\n"))
    assert core.config_from_env(env={}, file=bare).provider == "demo"


@pytest.mark.parametrize("line,says", [
    ("max_steps: many", "max_steps must be a whole number, not 'many'"),
    ("provider: gemini", "provider must be one of anthropic, openai, not 'gemini'"),
    ("tools:\n  enable_bash: maybe", "tools.enable_bash must be true or false, not 'maybe'"),
    ("retry:\n  initial_delay: -1", "retry.initial_delay must not be negative"),
    ('api_key: "YOUR_API_KEY_HERE"', "api_key is still the example's YOUR_API_KEY_HERE"),
    ("max_steps: [1", "cannot be read as YAML")])
def test_a_bad_config_value_is_a_usage_error_naming_field_and_file(tmp_path, line, says):
    path = write_config(tmp_path / "c", line + "\n")
    for script in ("agent_web.py", "agent_core.py"):
        proc = subprocess.run([sys.executable, str(HERE / script), "--config", str(path),
                               "--workspace" if script == "agent_web.py" else "-w",
                               str(tmp_path / "ws"), *(["--no-browser", "--db",
                                                        str(tmp_path / "a.db")]
                                                       if script == "agent_web.py" else
                                                       ["-t", "hi"])],
                              env=free_env(), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, (script, proc.stderr)
        assert says in proc.stderr and str(path) in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_server_runs_on_a_mini_agent_config_unchanged(tmp_path, llm):
    """`python agent_web.py --config` on a CLI user's files: the file's key,
    base URL, model, system prompt, max_steps, workspace and tool switches
    reach the requests; an unknown field is a warning in the log."""
    conf = write_config(tmp_path / "conf", MINI_AGENT_YAML.replace(
        "https://api.minimax.io", llm.url).replace('provider: "anthropic"', 'provider: "openai"')
        .replace("enable_note: true", "enable_note: false").replace(
        "max_steps: 12", "max_steps: 1\nshiny_new_option: 3"),
        prompt="You are the CLI's own prompt.\n{SKILLS_METADATA}")
    base = llm.url + "/v1"
    conf.write_text(conf.read_text().replace(llm.url, base))
    server = ServerProcess(tmp_path, None, args=["--config", str(conf)])
    try:
        assert any(f"Config {conf}" in line for line in server.lines)
        sid = server.chat("run: echo hi")["session_id"]
        h = server.wait_status(sid)
        assert llm.requests, (h["events"], server.lines)
        body, headers = llm.requests[0], llm.headers[0]
        assert body["model"] == "MiniMax-M2.5"
        assert body["messages"][0] == {"role": "system", "content": (
            "You are the CLI's own prompt.\n\n## Current Workspace\nYou are currently working "
            f"in: `{server.workspace}`\nAll relative paths will be resolved relative to this "
            "directory.")}                                   # (upstream's agent adds it too)
        assert {t["function"]["name"] for t in body["tools"]} == {
            "bash", "bash_output", "bash_kill", "read_file", "write_file", "edit_file"}
        assert {k.lower(): v for k, v in headers.items()}["authorization"] == \
            "Bearer sk-from-the-file"
        assert of(h["events"], "done")[-1]["status"] == "max_steps"     # max_steps: 1
    finally:
        server.stop()
    assert "unknown field 'shiny_new_option'" in (tmp_path / "server.log").read_text()


# =============================================================================
# Claude Skills (issue 19.3)
# =============================================================================

def make_skills(root: Path) -> Path:
    pdf = root / "skills" / "documents" / "pdf"
    (pdf / "scripts").mkdir(parents=True)
    (pdf / "scripts" / "fill.py").write_text("print('filled')\n")
    (pdf / "forms.md").write_text("# Forms\nFill them in.\n")
    (pdf / "reference").mkdir()
    (pdf / "reference" / "guide.md").write_text("the guide\n")
    (pdf / "SKILL.md").write_text(
        "---\nname: pdf\ndescription: >\n  Work with PDF files:\n  fill forms, split pages.\n"
        "license: MIT\n---\n# PDF\n\nRun `python scripts/fill.py` to fill a form; see "
        "forms.md first.\nThe [guide](./reference/guide.md) and [site](https://example.com/x.md)."
        "\nNot there: `scripts/missing.py`.\n")
    notes = root / "skills" / "notes"
    notes.mkdir(parents=True)
    (notes / "SKILL.md").write_text("---\nname: notes\ndescription: Keep tidy notes\n---\nBe brief.")
    (root / "skills" / "broken").mkdir()
    (root / "skills" / "broken" / "SKILL.md").write_text("no front matter here")
    (root / "skills" / "bad-yaml").mkdir()
    (root / "skills" / "bad-yaml" / "SKILL.md").write_text("---\nname: [unclosed\n---\nx")
    return root / "skills"


def test_skills_are_found_their_metadata_goes_to_the_prompt_and_get_skill_loads_one(tmp_path):
    folder = make_skills(tmp_path)
    skills = core.Skills(folder)
    assert sorted(skills.found) == ["notes", "pdf"] and len(skills.warnings) == 2
    meta = skills.metadata()
    assert "- `pdf`: Work with PDF files: fill forms, split pages." in meta
    assert "Be brief" not in meta                          # only names and descriptions
    assert core.with_skills("Intro.\n{SKILLS_METADATA}\nEnd.", skills).count("`notes`") == 1
    assert core.with_skills(core.SYSTEM_PROMPT, skills).startswith(core.SYSTEM_PROMPT)
    box = core.Toolbox(tmp_path / "ws")
    box.add_skills(skills)
    pdf = (folder / "documents" / "pdf").resolve()

    async def go():
        return [await box.execute("get_skill", {"skill_name": "pdf"}),
                await box.execute("get_skill", {"skill_name": "nope"}),
                await box.execute("read_file", {"path": str(pdf / "forms.md")}),
                await box.execute("write_file", {"path": str(pdf / "forms.md"), "content": "x"}),
                await box.execute("read_file", {"path": str(tmp_path / "elsewhere.txt")})]
    (text, err), (missing, m_err), (read, r_err), (wrote, w_err), (out, o_err) = arun(go())
    assert not err and f"The skill's folder: `{pdf}`" in text
    assert f"`python {pdf / 'scripts' / 'fill.py'}`" in text
    assert f"see `{pdf / 'forms.md'}` (read it with read_file)" in text
    assert f"[guide]({pdf / 'reference' / 'guide.md'})" in text
    assert "(https://example.com/x.md)" in text and "`scripts/missing.py`" in text
    assert m_err and "the skills are: pdf, notes" in missing
    assert not r_err and "Fill them in." in read              # read_file reads a skill's files
    assert w_err and "outside the workspace" in wrote         # ... but nothing writes there
    assert (pdf / "forms.md").read_text() == "# Forms\nFill them in.\n"
    assert o_err and "outside the workspace" in out


def test_a_symlink_in_a_skill_folder_does_not_lead_out(tmp_path):
    folder = make_skills(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    link = folder / "notes" / "leak.txt"
    link.symlink_to(secret)
    box = core.Toolbox(tmp_path / "ws")
    box.add_skills(core.Skills(folder))
    out, err = arun(box.execute("read_file", {"path": str(link)}))
    assert err and "top secret" not in out


def test_skills_dir_from_flag_environment_and_config(tmp_path, monkeypatch):
    folder = make_skills(tmp_path)
    assert sorted(core.Skills.locate(str(folder), env={}).found) == ["notes", "pdf"]
    assert sorted(core.Skills.locate(None, env={"AGENT_SKILLS_DIR": str(folder)}).found) == [
        "notes", "pdf"]
    monkeypatch.chdir(tmp_path)
    conf = core.ConfigFile.read(write_config(tmp_path / "c"))      # tools.skills_dir ./skills
    assert sorted(core.Skills.locate(None, env={}, file=conf).found) == ["notes", "pdf"]
    off = core.ConfigFile.read(write_config(tmp_path / "d", MINI_AGENT_YAML.replace(
        "enable_skills: true", "enable_skills: false")))
    assert core.Skills.locate(None, env={}, file=off).found == {}
    monkeypatch.chdir(tmp_path / "c")
    assert core.Skills.locate(None, env={}).found == {}            # no ./skills there


def test_the_server_offers_skills_to_the_model(tmp_path, llm):
    folder = make_skills(tmp_path)
    llm.script += [Reply("Loading.", tools=[("get_skill", json.dumps({"skill_name": "pdf"}))])]
    server = ServerProcess(tmp_path, llm, args=["--skills-dir", str(folder)])
    try:
        assert any("Skills " in line and "pdf, notes" in line for line in server.lines)
        sid = server.chat("fill the form")["session_id"]
        h = server.wait_status(sid)
        assert "- `pdf`: Work with PDF files" in llm.requests[0]["system"]
        # As upstream's agent says where it works (after the skills' list),
        # so the skills' absolute paths can be read against it.
        assert llm.requests[0]["system"].endswith(
            f"\n\n## Current Workspace\nYou are currently working in: `{server.workspace}`\n"
            "All relative paths will be resolved relative to this directory.")
        assert "get_skill" in {t["name"] for t in llm.requests[0]["tools"]}
        result = of(h["events"], "tool_result")[0]
        assert not result["is_error"] and "# Skill: pdf" in result["output"]
        tools = server.http("GET", "/agent/tools").json()["tools"]
        assert {"name": "get_skill", "source": "skills"}.items() <= next(
            t for t in tools if t["name"] == "get_skill").items()
    finally:
        server.stop()


# =============================================================================
# Background commands (issue 19.4)
# =============================================================================

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def test_background_commands_start_at_once_are_read_in_parts_and_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "BACKGROUND_KILL_GRACE", 0.5)
    box = core.Toolbox(tmp_path / "ws")

    async def go():
        out = {}
        started = time.monotonic()
        out["start"] = await box.execute("bash", {
            "command": "for i in 1 2 3; do echo line$i; echo noise; sleep 0.3; done; "
                       "echo end; exit 4", "run_in_background": True}, owner="s1")
        out["took"] = time.monotonic() - started
        bash_id = re.search(r"bash_id (bash_\w+)", out["start"][0]).group(1)
        await asyncio.sleep(0.15)
        out["first"] = await box.execute("bash_output", {"bash_id": bash_id,
                                                         "filter_str": "^line"}, owner="s1")
        out["stranger"] = await box.execute("bash_output", {"bash_id": bash_id}, owner="s2")
        await asyncio.sleep(1.5)
        out["rest"] = await box.execute("bash_output", {"bash_id": bash_id}, owner="s1")
        out["again"] = await box.execute("bash_output", {"bash_id": bash_id}, owner="s1")
        stubborn = await box.execute("bash", {
            "command": "trap '' TERM; echo $$; sleep 60", "run_in_background": True},
            owner="s1")
        stubborn_id = re.search(r"bash_id (bash_\w+)", stubborn[0]).group(1)
        pid = int(re.search(r"pid (\d+)", stubborn[0]).group(1))
        await asyncio.sleep(0.3)
        out["kill"] = await box.execute("bash_kill", {"bash_id": stubborn_id}, owner="s1")
        out["alive_after_kill"] = pid_alive(pid)
        last = await box.execute("bash", {"command": "sleep 60", "run_in_background": True},
                                 owner="s1")
        last_pid = int(re.search(r"pid (\d+)", last[0]).group(1))
        out["listed"] = [j["running"] for j in box.jobs.of("s1")]
        await box.jobs.end("s1")                      # the session was deleted
        out["alive_after_end"] = pid_alive(last_pid)
        out["gone"] = await box.execute("bash_output", {"bash_id": bash_id}, owner="s1")
        return out
    out = arun(go())
    assert not out["start"][1] and out["took"] < 1
    first, _ = out["first"]
    assert first.startswith("[bash_") and "still running" in first
    assert "line1" in first and "noise" not in first
    assert out["stranger"][1] and "no background command" in out["stranger"][0]
    rest = out["rest"][0]
    assert "finished with exit code 4" in rest and "line3" in rest and "end" in rest
    assert "line1" not in rest                              # only what came since the last read
    assert "(no new output)" in out["again"][0]
    assert "stopped" in out["kill"][0] and not out["alive_after_kill"]   # TERM ignored: KILL
    assert out["listed"] == [False, False, True]
    assert not out["alive_after_end"] and out["gone"][1] and "restart" in out["gone"][0]


def test_the_servers_background_commands_belong_to_their_session(tmp_path, llm):
    """Listed with their output; killed when their session is deleted and
    when the server stops; after a restart reported as gone."""
    def start(cmd):
        return Reply("Starting.", tools=[("bash", json.dumps(
            {"command": cmd, "run_in_background": True}))])
    llm.script += [start("echo ready; sleep 300"), Reply("Started."), start("sleep 301"),
                   Reply("Started.")]
    server = ServerProcess(tmp_path, llm)
    try:
        first = server.chat("one")["session_id"]
        h = server.wait_status(first)
        pid1 = int(re.search(r"pid (\d+)", of(h["events"], "tool_result")[0]["output"]).group(1))
        second = server.chat("two")["session_id"]
        h = server.wait_status(second)
        pid2 = int(re.search(r"pid (\d+)", of(h["events"], "tool_result")[0]["output"]).group(1))
        jobs = server.http("GET", f"/agent/sessions/{first}/background").json()["jobs"]
        assert len(jobs) == 1 and jobs[0]["running"] and jobs[0]["command"] == \
            "echo ready; sleep 300"
        deadline = time.time() + 5
        while "ready" not in jobs[0]["output_tail"] and time.time() < deadline:
            time.sleep(0.1)
            jobs = server.http("GET", f"/agent/sessions/{first}/background").json()["jobs"]
        assert "ready" in jobs[0]["output_tail"]
        assert server.http("DELETE", f"/agent/sessions/{first}").status_code == 204
        assert not pid_alive(pid1) and pid_alive(pid2)
        server.stop()
        assert not pid_alive(pid2)                          # nothing outlives the server
        server.start()
        jobs = server.http("GET", f"/agent/sessions/{second}/background").json()["jobs"]
        assert [(j["command"], j["running"], j.get("gone")) for j in jobs] == [
            ("sleep 301", False, True)]
    finally:
        server.stop()


# =============================================================================
# MCP: our client against servers built with the official SDK (issue 19.2)
# =============================================================================

# A server made with the official MCP Python SDK (`mcp`, test-only): run as
# `python mcp_server.py` for stdio, `python mcp_server.py http` for
# Streamable HTTP on a free port (printed on its first line).
# How the SDK servers below are run: stdio, or Streamable HTTP / HTTP+SSE on
# a free port, which the first line of their output names.
MCP_SERVE = r'''
if __name__ == "__main__":
    print("starting", file=sys.stderr, flush=True)
    if len(sys.argv) > 1 and sys.argv[1] in ("http", "sse"):
        import uvicorn
        sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(64)
        print(sock.getsockname()[1], flush=True)
        app = srv.streamable_http_app() if sys.argv[1] == "http" else srv.sse_app()
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    else:
        srv.run("stdio")
'''

MCP_TEST_SERVER = r'''import asyncio, os, socket, sys
from mcp.server.mcpserver import MCPServer, Image
from mcp.types import ToolAnnotations

srv = MCPServer("test-server")

@srv.tool(description="Echo the text back")
def echo(text: str) -> str:
    return f"echo: {text}"

@srv.tool(description="Always fails")
def fail(reason: str = "no reason") -> str:
    from mcp.server.mcpserver.exceptions import ToolError
    raise ToolError(f"it failed: {reason}")

@srv.tool(description="Sleep, then answer")
async def slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return f"slept {seconds}"

@srv.tool(description="The server process dies mid-call")
def die() -> str:
    os._exit(3)

@srv.tool(description="A small image")
def picture() -> Image:
    return Image(data=b"\x89PNG\r\n\x1a\n" + b"0" * 100, format="png")

@srv.tool(description="Read-only lookup", annotations=ToolAnnotations(readOnlyHint=True))
def lookup(key: str) -> str:
    return f"value of {key}"

@srv.tool(name="bash", description="A tool whose name clashes with a built-in")
def shadow() -> str:
    return "the MCP bash"
''' + MCP_SERVE

# A hand-written stdio server for what the SDK's servers do not show: tools
# listed over two pages, and an older protocol version (or an unknown one).
PAGED_MCP_SERVER = r'''
import json, sys
version = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if m["method"] == "initialize":
        result = {"protocolVersion": version, "capabilities": {"tools": {}},
                  "serverInfo": {"name": "paged", "version": "0"}}
    elif m["method"] == "tools/list":
        page = (m.get("params") or {}).get("cursor")
        tool = {"name": "second" if page else "first", "inputSchema": {"type": "object"}}
        result = {"tools": [tool]} if page else {"tools": [tool], "nextCursor": "p2"}
    else:
        result = {"content": [{"type": "text", "text": "called " + m["params"]["name"]}]}
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": result}), flush=True)
'''


@pytest.fixture
def mcp_script(tmp_path) -> Path:
    path = tmp_path / "mcp_server.py"
    path.write_text(MCP_TEST_SERVER)
    return path


@contextlib.contextmanager
def mcp_over_http(script: Path, kind: str):
    """The script's MCP server over HTTP ("http" or "sse") in a process of
    its own, printing its port: its URL, until the block ends."""
    proc = subprocess.Popen([sys.executable, str(script), kind], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/" + ("mcp" if kind == "http" else "sse")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def mcp_http(mcp_script):
    with mcp_over_http(mcp_script, "http") as url:
        yield url


@pytest.fixture
def mcp_sse(mcp_script):
    with mcp_over_http(mcp_script, "sse") as url:
        yield url


@pytest.fixture
def serve_mcp():
    """serve_mcp(script, kind): mcp_over_http for the rest of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda script, kind: stack.enter_context(mcp_over_http(script, kind))


def mcp_spec(kind: str, where) -> tuple[dict, str]:
    if kind == "stdio":
        return {"command": sys.executable, "args": [str(where)]}, "stdio"
    return {"url": where, "type": "streamable_http" if kind == "http" else "sse"}, kind


async def mcp_toolbox(tmp_path: Path, spec: dict, transport: str, **timeouts):
    server = core.McpServer("t", spec, transport, {**core.MCP_DEFAULT_TIMEOUTS, **timeouts})
    box = core.Toolbox(tmp_path / "ws")
    await core.start_mcp([server], box)
    return server, box


# The official SDK's servers speak both eras of MCP (see agent_core, "The two
# eras"): the client takes the modern one, unless told it knows none.
ERAS = [("stdio", "modern"), ("stdio", "legacy"), ("http", "modern"), ("http", "legacy"),
        ("sse", "legacy")]


def legacy_only(monkeypatch) -> None:
    monkeypatch.setattr(core, "MCP_MODERN_VERSIONS", ())


@pytest.mark.parametrize("kind,era", ERAS)
def test_mcp_tools_are_listed_and_called_over_every_transport(tmp_path, mcp_script, kind, era,
                                                              request, monkeypatch):
    """Every transport and era against the official SDK's server: a modern
    client asks server/discover and carries its version in each request
    (and, over HTTP, in the headers the SDK checks); a legacy one opens
    with initialize.  Calls, errors, content kinds, a call past
    execute_timeout stopped (its stream closed, or notifications/cancelled)."""
    if era == "legacy":
        legacy_only(monkeypatch)
    where = mcp_script if kind == "stdio" else request.getfixturevalue(f"mcp_{kind}")
    spec, transport = mcp_spec(kind, where)

    async def go():
        server, box = await mcp_toolbox(tmp_path, spec, transport, execute_timeout=1.5)
        try:
            started = time.monotonic()
            out = {name: await box.execute(name, args) for name, args in (
                ("echo", {"text": "hi"}), ("fail", {"reason": "on purpose"}),
                ("picture", {}), ("lookup", {"key": "k"}), ("t_bash", {}),
                ("slow", {"seconds": 5}))}
            out["took"] = time.monotonic() - started
            out["after"] = await box.execute("echo", {"text": "still there"})
            return server, box.describe(), out
        finally:
            await server.close()
    server, info, out = arun(go())
    assert server.protocol == "2026-07-28" if era == "modern" else (
        server.protocol in core.MCP_PROTOCOL_VERSIONS)
    assert server.modern == (era == "modern")
    assert out["echo"] == ("echo: hi", False)
    assert out["fail"][1] and "it failed: on purpose" in out["fail"][0]
    assert out["picture"] == ("[image: image/png, 108 bytes]", False)
    assert out["lookup"] == ("value of k", False)
    assert out["t_bash"] == ("the MCP bash", False)         # clashed with bash: prefixed
    assert out["slow"][1] and "within 1.5 s (execute_timeout)" in out["slow"][0]
    assert out["took"] < 5                                   # the slow call did not wait
    assert out["after"] == ("echo: still there", False)
    sources = {t["name"]: t["source"] for t in info["tools"]}
    assert sources["bash"] == "built-in" and sources["echo"] == "mcp:t"
    asks = {t["name"]: t["asks_first"] for t in info["tools"]}
    assert asks["echo"] and not asks["lookup"]               # readOnlyHint: never asks
    assert info["mcp_servers"] == [{"name": "t", "transport": transport, "state": "ready",
                                    "error": "", "tools": 7, "protocol": server.protocol}]


# A Streamable HTTP server that keeps its events (the SDK's EventStore) and
# closes a long call's stream on purpose, for the client to take it up again.
RESUMING_MCP_SERVER = r'''
import asyncio, socket, sys
import uvicorn
from mcp.server.mcpserver import MCPServer, Context
from mcp.server.streamable_http import EventMessage, EventStore

class Kept(EventStore):
    def __init__(self):
        self.events = []                          # (stream, id, message)
    async def store_event(self, stream_id, message):
        self.events.append((stream_id, str(len(self.events) + 1), message))
        return self.events[-1][1]
    async def replay_events_after(self, last_event_id, send_callback):
        stream = self.events[int(last_event_id) - 1][0]
        for sid, eid, message in self.events[int(last_event_id):]:
            if sid == stream and message is not None:
                await send_callback(EventMessage(message, eid))
        return stream

srv = MCPServer("resuming")

def added() -> str:
    return "added in the gap"

@srv.tool(description="Change the tool list on the stream of unasked messages, close that "
                      "stream, and change the list again while it is closed")
async def announce(ctx: Context) -> str:
    await ctx.session.send_tool_list_changed()    # kept, with an id, and sent
    await asyncio.sleep(0.5)                      # the client lists the tools again
    await ctx.close_standalone_sse_stream()
    srv.add_tool(added, description="Offered while the client was away")
    await ctx.session.send_tool_list_changed()    # kept, for the client to ask for
    return "announced"

@srv.tool(description="Work a while, with the answer's stream closed meanwhile")
async def long(ctx: Context) -> str:
    await ctx.info("started")
    await ctx.close_sse_stream()
    await asyncio.sleep(0.5)
    return "finished"

sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(64)
print(sock.getsockname()[1], flush=True)
app = srv.streamable_http_app(event_store=Kept(), retry_interval=100)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
'''


def test_an_mcp_answer_stream_closed_to_be_polled_is_taken_up_again(tmp_path, monkeypatch,
                                                                    serve_mcp):
    """MCP 2025-11-25: a server may close a long call's answer stream after
    an event with an id; the client takes it up again (GET, Last-Event-ID,
    after the `retry` the stream set) and the call gets its answer, against
    the official SDK's server with an event store."""
    legacy_only(monkeypatch)          # resumption is the handshake era's (2026-07-28 has none)
    script = tmp_path / "resuming.py"
    script.write_text(RESUMING_MCP_SERVER)
    url = serve_mcp(script, "http")

    async def go():
        server, box = await mcp_toolbox(tmp_path, {"url": url}, "http", execute_timeout=20)
        try:
            return await box.execute("long", {})
        finally:
            await server.close()
    assert arun(go()) == ("finished", False)


# A server of the handshake era only, written by hand as such servers behave
# when a request comes before `initialize`: over stdio it answers -32601
# (`error`), says nothing (`silent`) or exits (`exit`); over HTTP it answers
# 400 in plain text, having no session (as the SDK's 1.x servers do).
# Run as `legacy.py stdio error|silent|exit` or `legacy.py http`.
LEGACY_MCP_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def answer(message, initialized):
    method, rid = message.get("method"), message.get("id")
    if method == "initialize":
        return {"jsonrpc": "2.0", "id": rid, "result": {
            "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
            "serverInfo": {"name": "legacy", "version": "1"}}}
    if not initialized:
        return "before"
    if "_meta" in (message.get("params") or {}):
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": "_meta?"}}
    if method == "tools/list":
        return {"jsonrpc": "2.0", "id": rid, "result": {"tools": [
            {"name": "echo", "inputSchema": {"type": "object"}}]}}
    if method == "tools/call":
        text = "echo: " + message["params"]["arguments"].get("text", "")
        return {"jsonrpc": "2.0", "id": rid, "result": {"content": [
            {"type": "text", "text": text}]}}
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "unknown"}}

if sys.argv[1] == "stdio":
    initialized = False
    for line in sys.stdin:
        message = json.loads(line)
        if "id" not in message:
            continue
        reply = answer(message, initialized)
        if reply == "before":
            if sys.argv[2] == "exit":
                sys.exit(1)
            if sys.argv[2] == "silent":
                continue
            reply = {"jsonrpc": "2.0", "id": message["id"],
                     "error": {"code": -32601, "message": "Method not found"}}
        initialized = initialized or message["method"] == "initialize"
        print(json.dumps(reply), flush=True)
else:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *args):
            pass
        def send(self, status, body, kind="application/json", session=False):
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            if session:
                self.send_header("mcp-session-id", "s-1")
            self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            self.send(405, b"")
        def do_DELETE(self):
            self.send(200, b"")
        def do_POST(self):
            message = json.loads(self.rfile.read(int(self.headers["content-length"])))
            has_session = self.headers.get("mcp-session-id") == "s-1"
            if "id" not in message:
                return self.send(202, b"")
            reply = answer(message, has_session)
            if reply == "before":
                return self.send(400, b"Bad Request: Missing session ID", "text/plain")
            self.send(200, json.dumps(reply).encode(), session=message["method"] == "initialize")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
'''


@pytest.mark.parametrize("kind,before", [("stdio", "error"), ("stdio", "silent"),
                                         ("stdio", "exit"), ("http", "400")])
def test_a_server_of_the_handshake_era_only_is_spoken_to_with_initialize(
        tmp_path, kind, before, serve_mcp):
    """The era probe (server/discover) to a legacy server: whatever it does
    with a request before initialize (an error, silence until half the
    connect time, exiting, an HTTP 400 with no modern error), the client
    falls back to initialize and the server's tools work, no _meta sent."""
    script = tmp_path / "legacy.py"
    script.write_text(LEGACY_MCP_SERVER)
    where = serve_mcp(script, "http") if kind == "http" else None
    spec = ({"command": sys.executable, "args": [str(script), "stdio", before]}
            if kind == "stdio" else {"url": where.replace("/mcp", "/")})

    async def go():
        started = time.monotonic()
        server, box = await mcp_toolbox(tmp_path, spec, kind, connect_timeout=2.0)
        took = time.monotonic() - started
        try:
            return (server.state, server.error), server, took, await box.execute(
                "echo", {"text": "hi"})
        finally:
            await server.close()
    state, server, took, echoed = arun(go())
    assert state == ("ready", "")
    assert not server.modern and server.protocol == "2025-11-25"
    assert echoed == ("echo: hi", False)
    if before == "silent":
        assert took >= 1.0                   # it waited half the connect time for an answer


# A modern server of a revision this client does not speak (a later one):
# every request refused as 2026-07-28 says, -32022 with the versions it
# speaks; over HTTP with status 400.  Run as `modern.py stdio|http`.
MODERN_ONLY_MCP_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def answer(message):
    error = {"code": -32022, "message": "Unsupported protocol version",
             "data": {"supported": ["2027-03-30"], "requested": "2026-07-28"}}
    return {"jsonrpc": "2.0", "id": message.get("id"), "error": error}

if sys.argv[1] == "stdio":
    for line in sys.stdin:
        message = json.loads(line)
        if "id" in message:
            print(json.dumps(answer(message)), flush=True)
else:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass
        def do_POST(self):
            message = json.loads(self.rfile.read(int(self.headers["content-length"])))
            body = json.dumps(answer(message)).encode()
            self.send_response(400)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
'''


@pytest.mark.parametrize("kind,era", [(k, e) for k, e in ERAS if k != "sse"])
def test_a_server_of_a_revision_the_client_does_not_speak_is_reported_as_such(
        tmp_path, kind, era, monkeypatch, serve_mcp):
    """A modern server refuses a version it does not speak with -32022 and
    its own: whether the client probed with server/discover (modern) or
    opened with initialize (legacy only), the server is reported failed,
    saying which side speaks which revisions, not with the raw refusal."""
    if era == "legacy":
        legacy_only(monkeypatch)
    script = tmp_path / "modern.py"
    script.write_text(MODERN_ONLY_MCP_SERVER)
    where = serve_mcp(script, kind) if kind == "http" else None
    spec = ({"command": sys.executable, "args": [str(script), "stdio"]} if kind == "stdio"
            else {"url": where.replace("/mcp", "/")})

    async def go():
        server, box = await mcp_toolbox(tmp_path, spec, kind)
        await server.close()
        return server, box.describe()
    server, info = arun(go())
    assert server.state == "failed"
    assert server.error == "the server speaks only MCP 2027-03-30; this client speaks " + (
        "2026-07-28, " if era == "modern" else "") + ", ".join(core.MCP_PROTOCOL_VERSIONS)
    assert info["mcp_servers"][0]["state"] == "failed"


def test_an_mcp_answer_stream_cut_midway_fails_its_call_at_once(tmp_path):
    """Streamable HTTP: a tools/call answered with an SSE stream that the
    server cuts before the answer fails that call with a message saying so,
    not after execute_timeout (a cut stream is not resumed)."""
    async def handle(reader, writer):
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                method = head.split(" ", 1)[0]
                length = re.search(r"(?i)content-length:\s*(\d+)", head)
                body = json.loads(await reader.readexactly(int(length.group(1)))) \
                    if length else None
                if method != "POST":                 # GET (no stream offered), DELETE
                    writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                    continue
                if "id" not in body:                 # a notification
                    writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                    continue
                if body["method"] == "tools/call":   # an event, then the connection cut
                    event = json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                                        "params": {"level": "info", "data": "working"}})
                    chunk = f"data: {event}\n\n".encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n"
                                 + b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    writer.transport.abort()
                    return
                result = ({"protocolVersion": core.MCP_PROTOCOL_VERSIONS[0], "capabilities": {},
                           "serverInfo": {"name": "cut", "version": "0"}}
                          if body["method"] == "initialize" else
                          {"tools": [{"name": "work", "inputSchema": {"type": "object"}}]})
                answer = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": result})
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"mcp-session-id: s1\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(answer), answer.encode()))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def go():
        listener = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/mcp"
        server, box = await mcp_toolbox(tmp_path, {"url": url}, "http", execute_timeout=60)
        try:
            return await asyncio.wait_for(box.execute("work", {}), 30)
        finally:
            await server.close()
            listener.close()
    output, is_error = arun(go())
    assert is_error and "was cut" in output and "execute_timeout" not in output, output


def test_an_mcp_sse_servers_cut_event_stream_fails_the_call_and_the_next_starts_anew(
        tmp_path):
    """HTTP+SSE: the GET stream carries the answers and is the session.  Cut
    while a call waits, the call fails at once saying so, and the next call
    opens a new session (before, the call waited for execute_timeout and
    every later call went to the dead session)."""
    streams: list[asyncio.StreamWriter] = []

    def sse(writer, event: str, data: str) -> None:
        chunk = f"event: {event}\ndata: {data}\n\n".encode()
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    async def handle(reader, writer):
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                method, target = head.split(" ")[:2]
                if method == "GET":                      # a new session's stream
                    streams.append(writer)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    sse(writer, "endpoint", f"/messages?session={len(streams) - 1}")
                    await reader.read()                  # until the client goes
                    return
                length = int(re.search(r"(?i)content-length:\s*(\d+)", head).group(1))
                body = json.loads(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                session = int(target.rsplit("=", 1)[1])
                stream = streams[session]
                if "id" not in body:
                    continue
                if body["method"] == "tools/call" and session == 0:
                    stream.transport.abort()             # the first session dies mid-call
                    continue
                result = ({"protocolVersion": core.MCP_PROTOCOL_VERSIONS[0], "capabilities": {},
                           "serverInfo": {"name": "sse", "version": "0"}}
                          if body["method"] == "initialize" else
                          {"tools": [{"name": "work", "inputSchema": {"type": "object"}}]}
                          if body["method"] == "tools/list" else
                          {"content": [{"type": "text", "text": "done"}]})
                sse(stream, "message", json.dumps({"jsonrpc": "2.0", "id": body["id"],
                                                   "result": result}))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def go():
        listener = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/sse"
        server, box = await mcp_toolbox(tmp_path, {"url": url, "type": "sse"}, "sse",
                                        execute_timeout=60)
        try:
            first = await asyncio.wait_for(box.execute("work", {}), 30)
            return first, await asyncio.wait_for(box.execute("work", {}), 30)
        finally:
            await server.close()
            listener.close()
    first, second = arun(go())
    assert first[1] and "event stream" in first[0] and "execute_timeout" not in first[0], first
    assert second == ("done", False) and len(streams) == 2


# A stdio server that closes its output at a call and lives on.
MUTE_MCP_SERVER = r'''
import json, os, sys, time
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if m["method"] == "tools/call":
        os.close(1)
        time.sleep(120)
    result = ({"protocolVersion": m["params"]["protocolVersion"], "capabilities": {},
               "serverInfo": {"name": "mute", "version": "0"}}
              if m["method"] == "initialize" else
              {"tools": [{"name": "hush", "inputSchema": {"type": "object"}}]})
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": result}), flush=True)
'''


def test_an_mcp_stdio_server_that_closes_its_output_mid_call_is_stopped(tmp_path):
    """Its call fails within seconds, saying so, not at execute_timeout, and
    the process does not linger."""
    script = tmp_path / "mute.py"
    script.write_text(MUTE_MCP_SERVER)

    async def go():
        server, box = await mcp_toolbox(tmp_path, {"command": sys.executable,
                                                   "args": [str(script)]}, "stdio",
                                        execute_timeout=60)
        pid = server._proc.pid
        try:
            said = await asyncio.wait_for(box.execute("hush", {}), 30)
            return said, pid_alive(pid), server.state      # (before close() ends it)
        finally:
            await server.close()
    (output, is_error), alive, state = arun(go())
    assert is_error and "closed its output" in output, output
    assert state == "stopped" and not alive


def test_an_mcp_stdio_server_that_dies_mid_call_is_reported_and_started_again(tmp_path,
                                                                               mcp_script):
    spec, transport = mcp_spec("stdio", mcp_script)

    async def go():
        server, box = await mcp_toolbox(tmp_path, spec, transport)
        try:
            return (await box.execute("die", {}), server.state,
                    await box.execute("echo", {"text": "back"}), server.state)
        finally:
            await server.close()
    died, state, back, state_after = arun(go())
    assert died[1] and "exited (code 3) during the call" in died[0]
    assert state == "stopped" and back == ("echo: back", False) and state_after == "ready"


# A server whose tools change: `unlock` offers `secret` in its place and
# says so (notifications/tools/list_changed), as the official SDK sends it.
CHANGING_MCP_SERVER = r'''
import socket, sys
from mcp.server.mcpserver import MCPServer, Context

srv = MCPServer("changing")

def secret() -> str:
    return "the secret"

@srv.tool(description="Offer one more tool in place of this one")
async def unlock(ctx: Context) -> str:
    srv.add_tool(secret, description="The secret, once unlocked")
    srv.remove_tool("unlock")
    try:                                   # a legacy client: its session's own channel
        await ctx.session.send_tool_list_changed()
    except Exception:
        pass
    await ctx.notify_tools_changed()       # a modern one: its subscriptions/listen stream
    return "unlocked"
''' + MCP_SERVE


@pytest.mark.parametrize("kind,era", ERAS)
def test_an_mcp_servers_new_tool_list_is_offered_when_it_says_its_tools_changed(
        tmp_path, kind, era, monkeypatch, serve_mcp):
    """notifications/tools/list_changed: the tools are listed again and the
    toolbox offers the new list (the model's next step sees it).  Over
    Streamable HTTP it comes on the GET stream (legacy) or the
    subscriptions/listen stream (modern), either staying open through a
    quiet spell longer than sse_read_timeout; over stdio, modern, on the
    subscription opened for it."""
    if era == "legacy":
        legacy_only(monkeypatch)
    script = tmp_path / "changing.py"
    script.write_text(CHANGING_MCP_SERVER)
    where = serve_mcp(script, kind) if kind != "stdio" else script
    spec, transport = mcp_spec(kind, where)

    async def go():
        quiet = kind == "http"
        server, box = await mcp_toolbox(tmp_path, spec, transport,
                                        **({"sse_read_timeout": 0.5} if quiet else {}))
        try:
            before = {n for n, src in box.source.items() if src == "mcp:t"}
            await asyncio.sleep(1.5 if quiet else 0)
            unlocked = await box.execute("unlock", {})
            deadline = time.monotonic() + 10
            while "secret" not in box.tools and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            after = {n for n, src in box.source.items() if src == "mcp:t"}
            return before, unlocked, after, await box.execute("secret", {}), box.describe()
        finally:
            await server.close()
    before, unlocked, after, secret, info = arun(go())
    assert before == {"unlock"} and unlocked == ("unlocked", False)
    assert after == {"secret"} and secret == ("the secret", False)
    assert info["mcp_servers"][0]["tools"] == 1


def test_the_stream_of_unasked_mcp_messages_is_taken_up_again_where_it_was_left(
        tmp_path, monkeypatch, serve_mcp):
    """Streamable HTTP: a server may close its GET stream (the messages
    nobody asked for) on purpose, to be polled.  The client opens it again
    with the last event's id (Last-Event-ID), so a tool list that changed
    in the gap reaches it: against the official SDK's server with an event
    store, whose `announce` changes the list once on the open stream and
    once more after closing it."""
    legacy_only(monkeypatch)          # the GET stream is the handshake era's
    script = tmp_path / "resuming.py"
    script.write_text(RESUMING_MCP_SERVER)
    url = serve_mcp(script, "http")

    async def go():
        server, box = await mcp_toolbox(tmp_path, {"url": url}, "http")
        try:
            await asyncio.sleep(0.5)                      # the GET stream is open
            announced = await box.execute("announce", {})
            deadline = time.monotonic() + 10
            while "added" not in box.tools and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return announced, await box.execute("added", {}) if "added" in box.tools else None
        finally:
            await server.close()
    announced, added = arun(go())
    assert announced == ("announced", False)
    assert added == ("added in the gap", False)


# A modern stdio server whose one tool asks the client for input (MRTR's
# InputRequiredResult), and which refuses a request without the version in
# its _meta, as 2026-07-28 says a server must.
ASKING_MCP_SERVER = r'''
import json, sys
late = sys.argv[1:] == ["late"]          # too slow for the first server/discover
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if late and m["method"] == "server/discover":
        late = False
        continue
    meta = (m.get("params") or {}).get("_meta") or {}
    if meta.get("io.modelcontextprotocol/protocolVersion") != "2026-07-28":
        result = None
        error = {"code": -32022, "message": "Unsupported protocol version",
                 "data": {"supported": ["2026-07-28"]}}
    elif m["method"] == "server/discover":
        result = {"resultType": "complete", "supportedVersions": ["2026-07-28"],
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "asking"}}
    elif m["method"] == "tools/list":
        result = {"resultType": "complete", "ttlMs": 0, "cacheScope": "private",
                  "tools": [{"name": "ask", "inputSchema": {"type": "object"}}]}
    else:
        result = {"resultType": "input_required", "inputRequests": {"who": {
            "method": "elicitation/create", "params": {"message": "Your name?"}}}}
    reply = {"jsonrpc": "2.0", "id": m["id"]}
    reply.update({"result": result} if result is not None else {"error": error})
    print(json.dumps(reply), flush=True)
'''


def test_a_modern_tool_that_asks_for_input_fails_saying_so(tmp_path):
    """MCP 2026-07-28 over stdio, by hand: every request carries the version
    in its _meta (the server refuses one without), and a call answered with
    `input_required` (elicitation, here) fails saying what was asked and
    that this client does not give it."""
    (tmp_path / "asking.py").write_text(ASKING_MCP_SERVER)
    spec = {"command": sys.executable, "args": [str(tmp_path / "asking.py")]}

    async def go():
        server, box = await mcp_toolbox(tmp_path, spec, "stdio")
        try:
            return server.modern, server.state, await box.execute("ask", {})
        finally:
            await server.close()
    modern, state, asked = arun(go())
    assert modern and state == "ready"
    assert asked == ("Error: ask (MCP server t) asked for input this client cannot give "
                     "(elicitation/create): elicitation, sampling and roots are not offered "
                     "here", True)


def test_a_modern_server_that_missed_the_probe_is_asked_again_when_it_refuses_initialize(
        tmp_path):
    """A modern server too slow to answer the first server/discover looks
    legacy; its refusal of initialize (-32022, naming 2026-07-28) proves it
    modern, and the client asks server/discover once more and goes on."""
    (tmp_path / "asking.py").write_text(ASKING_MCP_SERVER)
    spec = {"command": sys.executable, "args": [str(tmp_path / "asking.py"), "late"]}

    async def go():
        server, box = await mcp_toolbox(tmp_path, spec, "stdio", connect_timeout=2.0)
        try:
            return server.modern, server.state, server.error, sorted(
                n for n, src in box.source.items() if src == "mcp:t")
        finally:
            await server.close()
    assert arun(go()) == (True, "ready", "", ["ask"])


def test_a_modern_http_call_past_its_time_is_stopped_by_closing_its_stream(tmp_path):
    """MCP 2026-07-28 over Streamable HTTP: a call is cancelled by closing
    its response stream, with no notifications/cancelled POST (the revision
    defines none over HTTP).  A hand-written modern server that opens the
    call's SSE stream and then waits sees its connection closed."""
    seen: dict = {"methods": [], "closed": asyncio.Event}

    async def handle(reader, writer):
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = int(re.search(r"(?i)content-length:\s*(\d+)", head).group(1))
                body = json.loads(await reader.readexactly(length))
                seen["methods"].append(body.get("method"))
                if body.get("method") == "tools/call":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    await writer.drain()
                    await reader.read()              # until the client closes it
                    seen["closed"].set()
                    return
                result = ({"resultType": "complete", "supportedVersions": ["2026-07-28"],
                           "capabilities": {"tools": {}}}
                          if body["method"] == "server/discover" else
                          {"resultType": "complete", "ttlMs": 0, "cacheScope": "private",
                           "tools": [{"name": "wait", "inputSchema": {"type": "object"}}]})
                answer = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": result})
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(answer), answer.encode()))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def go():
        seen["closed"] = asyncio.Event()
        listener = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/mcp"
        server, box = await mcp_toolbox(tmp_path, {"url": url}, "http", execute_timeout=0.5)
        try:
            called = await box.execute("wait", {})
            await asyncio.wait_for(seen["closed"].wait(), 5)
            await asyncio.sleep(0.3)                 # a notification would come now
            return server.modern, called
        finally:
            await server.close()
            listener.close()
    modern, called = arun(go())
    assert modern and called[1] and "within 0.5 s (execute_timeout)" in called[0]
    assert seen["methods"] == ["server/discover", "tools/list", "tools/call"]


# Tools whose arguments go in headers too (2026-07-28's x-mcp-header), which
# the SDK's server checks against the body; and one a client must not offer.
HEADERS_MCP_SERVER = r'''
import socket, sys
from typing import Annotated
from pydantic import Field
from mcp.server.mcpserver import MCPServer

srv = MCPServer("headers")

@srv.tool(description="Where a query runs")
def where(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})],
          shard: Annotated[int, Field(json_schema_extra={"x-mcp-header": "Shard"})] = 0,
          query: str = "") -> str:
    return f"{query} in {region} on {shard}"
''' + MCP_SERVE


def test_a_tools_arguments_marked_x_mcp_header_go_in_headers_the_sdks_server_checks(
        tmp_path, serve_mcp):
    """Modern Streamable HTTP: an argument the tool's schema marks
    `x-mcp-header` is mirrored into `Mcp-Param-*` (a non-ASCII value, or
    one with spaces at its ends, as =?base64?...?=), and the SDK's server,
    which rejects a call whose headers do not match its body, answers."""
    script = tmp_path / "headers.py"
    script.write_text(HEADERS_MCP_SERVER)
    url = serve_mcp(script, "http")

    async def go():
        server, box = await mcp_toolbox(tmp_path, {"url": url}, "http")
        try:
            return server.modern, [await box.execute("where", args) for args in (
                {"region": "us-west1", "shard": 3, "query": "q"},
                {"region": "東京 ", "query": "q"},
                {"region": "=?base64?looks-encoded?=", "shard": 0})]
        finally:
            await server.close()
    modern, answers = arun(go())
    assert modern
    assert answers == [("q in us-west1 on 3", False), ("q in 東京  on 0", False),
                       (" in =?base64?looks-encoded?= on 0", False)]


def test_x_mcp_header_marks_and_values_follow_the_specs_rules():
    """Where a mark may be (a chain of `properties` from the root), on what
    (a string, integer or boolean), named how (a header token, once), and
    how a value is written (as it is, or base64 between the sentinels)."""
    ok = {"type": "object", "properties": {
        "region": {"type": "string", "x-mcp-header": "Region"},
        "opts": {"type": "object", "properties": {"n": {"type": "integer",
                                                        "x-mcp-header": "N"}}},
        "x-mcp-header": {"type": "string"}}}               # a property of that name: fine
    assert core.mcp_param_headers(ok) == {"Region": ("region",), "N": ("opts", "n")}
    bad = {
        "under items": {"type": "object", "properties": {"list": {"type": "array", "items": {
            "type": "string", "x-mcp-header": "Item"}}}},
        "under anyOf": {"anyOf": [{"type": "object", "properties": {"a": {
            "type": "string", "x-mcp-header": "A"}}}]},
        "on a number": {"type": "object", "properties": {"f": {"type": "number",
                                                               "x-mcp-header": "F"}}},
        "not a token": {"type": "object", "properties": {"a": {"type": "string",
                                                               "x-mcp-header": "A B"}}},
        "twice": {"type": "object", "properties": {
            "a": {"type": "string", "x-mcp-header": "Same"},
            "b": {"type": "string", "x-mcp-header": "same"}}},
        "on the root": {"type": "string", "x-mcp-header": "Root"}}
    for why, schema in bad.items():
        with pytest.raises(ValueError):
            core.mcp_param_headers(schema)
            pytest.fail(why)
    assert [core.mcp_header_value(v) for v in ("us-west1", 42, -7, True, False, None, 3.0,
                                               [1], "Hello, 世界", " padded ", "a\nb",
                                               "=?base64?literal?=")] == [
        "us-west1", "42", "-7", "true", "false", None, "3", None,
        "=?base64?SGVsbG8sIOS4lueVjA==?=", "=?base64?IHBhZGRlZCA=?=", "=?base64?YQpi?=",
        "=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?="]


# A tool that answers only once `n` calls of it are in flight at once.
TOGETHER_TOOL = r'''
in_flight, all_in = [0], asyncio.Event()

@srv.tool(description="Answer once n calls are in flight together")
async def together(n: int) -> str:
    in_flight[0] += 1
    if in_flight[0] >= n:
        all_in.set()
    try:
        await asyncio.wait_for(all_in.wait(), 8)
        return "together"
    except asyncio.TimeoutError:
        return f"only {in_flight[0]} at once"
    finally:
        in_flight[0] -= 1

'''


def test_more_mcp_calls_at_once_than_an_http_pool_holds_all_go_in_together(
        tmp_path, serve_mcp):
    """An MCP call over Streamable HTTP holds its connection while the tool
    runs: 110 calls at once (110 sessions using one server) all reach it,
    where httpx's default pool of 100 held the last 10 back."""
    script = tmp_path / "mcp_server.py"
    script.write_text(MCP_TEST_SERVER.replace("if __name__", TOGETHER_TOOL + "if __name__"))
    spec, transport = mcp_spec("http", serve_mcp(script, "http"))

    async def go():
        server, box = await mcp_toolbox(tmp_path, spec, transport)
        try:
            return await asyncio.gather(*[box.execute("together", {"n": 110})
                                          for _ in range(110)])
        finally:
            await server.close()
    results = arun(go())
    assert {r for r in results} == {("together", False)}, results[0]

def test_mcp_version_negotiation_and_paged_tool_lists(tmp_path):
    script = tmp_path / "paged.py"
    script.write_text(PAGED_MCP_SERVER)

    async def go(version):
        server, box = await mcp_toolbox(
            tmp_path, {"command": sys.executable, "args": [str(script), version]}, "stdio")
        try:
            return server, [t["name"] for t in server.tools], (
                await box.execute("second", {}) if server.state == "ready" else None)
        finally:
            await server.close()
    server, names, called = arun(go("2025-03-26"))
    assert server.protocol == "2025-03-26" and names == ["first", "second"]
    assert called == ("called second", False)
    server, names, _ = arun(go("1999-01-01"))
    assert server.state == "failed" and "1999-01-01" in server.error and names == []


def test_an_mcp_server_that_fails_to_start_is_reported_and_holds_nothing_up(tmp_path, caplog):
    hang = tmp_path / "hang.py"
    hang.write_text("import sys, time\nprint('about to hang', file=sys.stderr, flush=True)\n"
                    "time.sleep(60)\n")
    servers = [core.McpServer("missing", {"command": "no-such-mcp-server"}, "stdio",
                              dict(core.MCP_DEFAULT_TIMEOUTS)),
               core.McpServer("silent", {"command": sys.executable, "args": [str(hang)]},
                              "stdio", dict(core.MCP_DEFAULT_TIMEOUTS, connect_timeout=1.0)),
               core.McpServer("nobody", {"url": "http://127.0.0.1:9/mcp"}, "http",
                              dict(core.MCP_DEFAULT_TIMEOUTS, connect_timeout=1.0))]

    async def go():
        box = core.Toolbox(tmp_path / "ws")
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="agent_core"):
            await core.start_mcp(servers, box)
        took = time.monotonic() - started
        await asyncio.gather(*(s.close() for s in servers))
        return took, box.describe()
    took, info = arun(go())
    assert took < 8                                     # side by side, each within its time
    states = {s["name"]: (s["state"], s["error"]) for s in info["mcp_servers"]}
    assert states["missing"][0] == "failed" and "cannot start no-such-mcp-server" in \
        states["missing"][1]
    assert states["silent"] == ("failed", "no answer within 1 s")
    assert states["nobody"][0] == "failed"
    assert "about to hang" in caplog.text                 # its stderr went to the log
    assert [t["source"] for t in info["tools"]] == ["built-in"] * len(info["tools"])


def test_mcp_json_in_mini_agents_format_is_read_as_upstream_does(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "local": {"description": "x", "command": "uvx", "args": ["thing"],
                  "env": {"KEY": "v"}, "execute_timeout": 5},
        "remote": {"url": "https://mcp.example/mcp", "headers": {"Authorization": "Bearer t"}},
        "old": {"type": "sse", "url": "https://mcp.example/sse"},
        "off": {"command": "npx", "args": ["-y", "x"], "disabled": True}}}))
    servers = core.mcp_servers(str(path), env={})
    assert [(s.name, s.transport) for s in servers] == [("local", "stdio"), ("remote", "http"),
                                                        ("old", "sse")]
    assert servers[0].timeouts["execute_timeout"] == 5.0
    assert servers[1].timeouts["connect_timeout"] == 10.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mcpServers": {"x": {"type": "carrier-pigeon", "url": "u"}}}))
    with pytest.raises(ValueError, match="carrier-pigeon"):
        core.mcp_servers(str(bad), env={})
    # from config.yaml: beside it, with its tools.mcp timeouts
    conf = write_config(tmp_path / "conf", MINI_AGENT_YAML.replace("execute_timeout: 60.0",
                                                                   "execute_timeout: 9.0"))
    (tmp_path / "conf" / "mcp.json").write_text(path.read_text())
    servers = core.mcp_servers(None, env={}, file=core.ConfigFile.read(conf))
    assert [s.name for s in servers] == ["local", "remote", "old"]
    assert servers[1].timeouts["execute_timeout"] == 9.0 and servers[0].timeouts[
        "execute_timeout"] == 5.0                       # the server's own wins


def test_stop_during_an_mcp_call_cancels_it_and_the_server_lives_on(tmp_path, llm, mcp_script):
    spec, transport = mcp_spec("stdio", mcp_script)
    llm.script += [Reply("Waiting.", tools=[("slow", json.dumps({"seconds": 30}))])]

    async def go():
        server, box = await mcp_toolbox(tmp_path, spec, transport)
        cfg = cfg_for(llm)
        try:
            async with core.make_http_client(cfg) as http:
                agent = core.Agent(core.make_llm(cfg, http), cfg, box)
                history = [{"role": "user", "content": "wait for it"}]
                events = []
                async for ev in agent.run(history):
                    events.append(ev)
                    if ev["type"] == "tool_call":
                        asyncio.get_running_loop().call_later(0.5, agent.cancel)
            return events, await box.execute("echo", {"text": "alive"})
        finally:
            await server.close()
    events, after = arun(go())
    assert events[-1]["status"] == "cancelled"
    result = of(events, "tool_result")[0]
    assert result["is_error"] and "cancelled" in result["output"]
    assert after == ("echo: alive", False)


def test_the_server_offers_mcp_tools_lists_them_and_asks_first_in_ask_mode(tmp_path, llm,
                                                                          mcp_script):
    conf = tmp_path / "mcp.json"
    conf.write_text(json.dumps({"mcpServers": {
        "t": {"command": sys.executable, "args": [str(mcp_script)]},
        "broken": {"command": "no-such-mcp-server"}}}))
    server = ServerProcess(tmp_path, llm, approve="ask", args=["--mcp-config", str(conf)])
    try:
        assert any("MCP broken (stdio): failed" in line for line in server.lines)
        info = server.http("GET", "/agent/tools").json()
        states = {s["name"]: s["state"] for s in info["mcp_servers"]}
        assert states == {"t": "ready", "broken": "failed"}
        assert {"echo", "lookup", "t_bash"} <= {t["name"] for t in info["tools"]}
        llm.script += [Reply("Looking.", tools=[("lookup", json.dumps({"key": "a"}))]),
                       Reply("Echoing.", tools=[("echo", json.dumps({"text": "b"}))])]
        sid = server.chat("go")["session_id"]
        request = server.wait_event(sid, "approval_request")     # echo asks; lookup did not
        assert request["tool"] == "echo"
        results = of(server.history(sid)["events"], "tool_result")
        assert results[0]["output"] == "value of a" and not results[0]["is_error"]
        server.http("POST", "/agent/approve", {"session_id": sid, "call_id": request["call_id"],
                                               "decision": "allow"})
        h = server.wait_status(sid)
        assert of(h["events"], "tool_result")[-1]["output"] == "echo: b"
        assert "echo" in {t["name"] for t in llm.requests[0]["tools"]}
        assert server.http("GET", "/agent/tools", token=False).status_code == 401
    finally:
        server.stop()


@pytest.mark.skipif(not shutil.which("npx"), reason="Node's npx is not installed")
def test_the_reference_memory_server_from_npm(tmp_path):
    """@modelcontextprotocol/server-memory, the reference implementation,
    as Mini-Agent's example mcp.json names it (fetched from the npm registry)."""
    spec = {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-memory"],
            "env": {"MEMORY_FILE_PATH": str(tmp_path / "memory.jsonl")}}

    async def go():
        server, box = await mcp_toolbox(tmp_path, spec, "stdio", connect_timeout=90.0)
        try:
            if server.state != "ready":
                return server, None, None
            made = await box.execute("create_entities", {"entities": [
                {"name": "Mini Agent Web", "entityType": "project",
                 "observations": ["talks MCP over stdio"]}]})
            found = await box.execute("search_nodes", {"query": "Mini Agent"})
            return server, made, found
        finally:
            await server.close()
    server, made, found = arun(go())
    if made is None:          # npx could not fetch or start it: the registry, not us
        pytest.skip(f"the npm server did not start: {server.error}")
    assert not made[1] and not found[1] and "talks MCP over stdio" in found[0]


def test_the_terminal_gets_all_of_it_config_mcp_skills_tools_and_stats(tmp_path, llm,
                                                                        mcp_script):
    """`python agent_core.py` on a Mini-Agent user's files: /tools lists the
    MCP, skill and background tools, /stats the context."""
    skills = make_skills(tmp_path)
    conf = write_config(tmp_path / "conf", MINI_AGENT_YAML.replace(
        "https://api.minimax.io", llm.url).replace("enable_note: true", "enable_note: false"))
    (tmp_path / "conf" / "mcp.json").write_text(json.dumps({"mcpServers": {
        "t": {"command": sys.executable, "args": [str(mcp_script)]}}}))
    proc = subprocess.run(
        [sys.executable, str(HERE / "agent_core.py"), "--config", str(conf), "--skills-dir",
         str(skills), "-w", str(tmp_path / "ws"), "--approve", "auto"],
        input="say: hello\n/tools\n/stats\n/exit\n", capture_output=True, text=True,
        timeout=60, env=free_env())
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "Skills (" in out and "MCP t (stdio, MCP 2026-07-28): 7 tool(s)" in out
    assert "MCP t (stdio, MCP 2026-07-28): ready" in out            # the SDK's: modern
    assert re.search(r"^echo +mcp:t +asks first$", out, re.M)
    assert re.search(r"^lookup +mcp:t *$", out, re.M)                 # read-only: no asking
    assert re.search(r"^get_skill +skills", out, re.M) and re.search(r"^bash_output +built-in",
                                                                    out, re.M)
    assert "record_note" not in out                                  # enable_note: false
    assert re.search(r"context [\d,]+ / 50,000 tokens", out)          # token_limit: 50000
    assert llm.requests[0]["model"] == "MiniMax-M2.5"
    assert "- `pdf`: Work with PDF files" in llm.requests[0]["system"]


# =============================================================================
# The store: one transaction per batch, seqs with no gaps, checkpoints aside
# =============================================================================

def test_one_batch_of_many_interleaved_sessions_gets_gapless_seqs(tmp_path):
    """More sessions and rows than one statement takes, interleaved, one of
    them deleted while its run was still going: every live session gets
    1..n in its own order, its status and title, and the rows are what the
    batch returned."""
    import agent_web as web

    async def go():
        store = web.Store(tmp_path / "a.db")
        await store.open()
        names = [f"s{i}" for i in range(
            max(web.Store.ROWS_PER_STATEMENT, web.Store.IDS_PER_STATEMENT) + 50)]
        for sid in names + ["gone"]:
            await store.write(web.Store.create_session, sid, "auto")
        await store.write(web.Store.delete_session, "gone")
        items = []
        for i in range(3):
            for sid in names + ["gone"]:
                items.append((sid, {"type": "delta", "message_id": "m", "channel": "text",
                                    "content": f"{sid}-{i}", "ts": 1.0}))
        items.insert(0, ("s1", {"type": "message", "role": "user", "ts": 1.0,
                                "content": "  fix   the\nbuild  "}))
        items.append(("s2", {"type": "done", "status": "done", "summary": "", "steps": 1,
                             "usage": {}, "ts": 1.0}))
        out = await store.write(web.Store.append, items)
        rows = await store.read(lambda conn: conn.execute(
            "SELECT session_id, seq, data FROM events ORDER BY session_id, seq").fetchall())
        sessions = {s["session_id"]: (s["last_seq"], s["status"], s["title"])
                    for s in await store.read(web.Store.list_sessions)}
        store.close()
        return items, out, rows, sessions

    items, out, rows, sessions = arun(go())
    assert [r is None for r in out] == [sid == "gone" for sid, _ in items]
    seen: dict[str, list] = {}
    for (sid, ev), result in zip(items, out):
        if result is not None:
            seq, text = result
            assert json.loads(text) == {"seq": seq, "session_id": sid, **ev}
            seen.setdefault(sid, []).append(seq)
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in seen.values())
    assert {(sid, seq) for sid, seq, _ in rows} == {
        (sid, r[0]) for (sid, _), r in zip(items, out) if r is not None}
    assert "gone" not in sessions
    assert sessions["s1"] == (4, "running", "fix the build")
    assert sessions["s2"] == (4, "idle", "")
    assert sessions["s3"] == (3, "idle", "")


def test_a_delta_written_from_its_template_is_the_generic_encoders_text():
    """Streamed deltas skip the generic JSON encoder (the push path's hottest
    line); what they are written as must not differ by one byte, whatever the
    model wrote.  Any other event, or a delta with other keys, goes the
    generic way."""
    import agent_web as web

    awkward = ['', 'plain ', 'quote " backslash \\ slash /', 'tab\tnew\nline\rcr',
               '\x00\x01\x1f\x7f control', 'é 中文 emoji 😀', '\u2028\u2029 separators',
               '</script><b>html</b>', 'lone surrogate \ud800', '{"json": [1, 2]}']
    for content in awkward:
        for ts in (1795670787.3194172, 1.0, 0.1 + 0.2, 1e21):
            ev = {"type": "delta", "ts": ts, "message_id": "msg_é\"1", "channel": "thinking",
                  "content": content}
            assert tuple(ev) == web.DELTA_KEYS
            expected = web.to_json({"seq": 123456789, "session_id": "s_x\\y", **ev})
            if content == 'lone surrogate \ud800':
                # Unstorable as UTF-8: escaped instead, so it can never fail
                # the batch it is committed in.
                expected = json.dumps({"seq": 123456789, "session_id": "s_x\\y", **ev},
                                      separators=(",", ":"))
            got = web.event_json(123456789, "s_x\\y", ev)
            assert got == expected and json.loads(got)["content"] == content
            got.encode("utf-8")
    # Other events and other shapes take the generic encoder.
    odd = {"type": "delta", "message_id": "m", "channel": "text", "content": "x", "ts": 1.0}
    other = {"type": "tool_call", "ts": 1.0, "call_id": "c", "tool": "bash", "input": {"a": 1}}
    for ev in (odd, other):
        assert web.event_json(7, "s", ev) == web.to_json({"seq": 7, "session_id": "s", **ev})


def test_streamed_deltas_rewrite_no_session_row(tmp_path):
    """A commit of deltas only writes events: the session's row (status,
    title, updated_at) changes with the other events, and its last_seq, read
    from the events, still counts every one."""
    import agent_web as web

    def delta(i):
        return {"type": "delta", "message_id": "a", "channel": "text", "content": f"t{i}",
                "ts": 1.0}

    async def go():
        store = web.Store(tmp_path / "a.db")
        await store.open()
        await store.write(web.Store.create_session, "s", "auto")
        await store.write(web.Store.append, [("s", {"type": "message", "role": "user",
                                                    "content": "hi", "ts": 1.0})])
        seen = [await store.read(web.Store.get_session, "s")]
        for i in range(5):
            await store.write(web.Store.append, [("s", delta(i)), ("s", delta(i))])
            seen.append(await store.read(web.Store.get_session, "s"))
        await asyncio.sleep(0.01)                          # a later updated_at
        await store.write(web.Store.append, [("s", {"type": "done", "status": "done",
                                                    "summary": "", "steps": 1, "usage": {},
                                                    "ts": 1.0})])
        seen.append(await store.read(web.Store.get_session, "s"))
        store.close()
        return seen

    seen = arun(go())
    assert [s["last_seq"] for s in seen] == [1, 3, 5, 7, 9, 11, 12]
    assert [s["status"] for s in seen] == ["running"] * 6 + ["idle"]
    assert len({s["updated_at"] for s in seen[:6]}) == 1      # the deltas left it
    assert seen[6]["updated_at"] > seen[0]["updated_at"]


def test_fragments_merge_only_with_the_pending_fragment_of_their_own_stream(tmp_path):
    """While a commit is in flight, a delta joins the session's last pending
    delta of the same message and channel, and a tool_output the last pending
    output of the same call; anything else starts a new event."""
    import agent_web as web

    def out(call, text):
        return {"type": "tool_output", "call_id": call, "content": text}

    def delta(channel, text):
        return {"type": "delta", "message_id": "m", "channel": channel, "content": text}

    async def go():
        store = web.Store(tmp_path / "a.db")
        await store.open()
        await store.write(web.Store.create_session, "s", "auto")
        log = web.EventLog(store, web.PushRegistry())
        log.start()
        for ev in (out("c1", "a"), out("c1", "b"), out("c2", "x"), out("c2", "y"),
                   out("c1", "c"), delta("text", "1"), delta("text", "2"),
                   delta("thinking", "3"), out("c1", "d")):
            log.emit_nowait("s", ev)          # no await: all pending together
        await log.flush()
        rows = await store.read(web.Store.history, "s", 0, 100)
        await log.stop()
        store.close()
        return [(e["type"], e.get("call_id") or e["channel"], e["content"])
                for e in map(json.loads, rows[1])]

    assert arun(go()) == [("tool_output", "c1", "ab"), ("tool_output", "c2", "xy"),
                          ("tool_output", "c1", "c"), ("delta", "text", "12"),
                          ("delta", "thinking", "3"), ("tool_output", "c1", "d")]


def test_pending_fragments_are_joined_once_not_added_piece_by_piece(tmp_path):
    """A burst of tokens while a commit is in flight merges into one pending
    delta; `content += piece` would copy the whole text again for every
    token (quadratic: 2 MB in 8-byte pieces held the loop for seconds).  A
    piece that counts each `+` made with it proves they are joined once."""
    import agent_web as web
    added = []

    class Piece(str):
        def __radd__(self, other):          # str + Piece lands here first
            added.append(1)
            return str.__add__(other, self)

    async def go():
        async with event_log(tmp_path / "a.db", "s") as (store, log):
            for i in range(20_000):
                log.emit_nowait("s", {"type": "delta", "message_id": "m", "channel": "text",
                                      "content": Piece(f"{i % 10}")})
            await log.flush()
            rows = await store.read(web.Store.history, "s", 0, 100)
        return [json.loads(r)["content"] for r in rows[1]]

    stored = arun(go())
    assert "".join(stored) == "0123456789" * 2_000 and len(stored) <= 2
    assert added == []


def test_a_commit_of_streamed_text_is_one_statement_and_other_writers_are_caught(tmp_path):
    """The writer remembers each session's last seq, so streamed text for a
    session it wrote to before commits in one INSERT (one sqlite3 call, not
    four).  Rows another connection adds behind its back, or a session that
    connection deletes, are caught: seqs stay unique and gapless, the deleted
    session's event is dropped."""
    import agent_web as web

    def delta(text):
        return {"type": "delta", "message_id": "a", "channel": "text", "content": text,
                "ts": 1.0}

    async def go():
        store = web.Store(tmp_path / "a.db")
        await store.open()
        for sid in ("s", "t"):
            await store.write(web.Store.create_session, sid, "auto")
        statements: list[str] = []
        await store.write(lambda conn: conn.set_trace_callback(statements.append))
        out = [await store.write(web.Store.append, [("s", delta("1")), ("t", delta("1"))])]
        first = statements[:]
        statements.clear()
        out.append(await store.write(web.Store.append, [("s", delta("2")), ("s", delta("3"))]))
        known = statements[:]
        other = sqlite3.connect(tmp_path / "a.db")
        other.execute("PRAGMA foreign_keys = ON")
        other.execute("""INSERT INTO events VALUES ('s', 4, 'delta', '{"seq":4}')""")
        other.execute("DELETE FROM sessions WHERE id = 't'")
        other.commit()
        other.close()
        out.append(await store.write(web.Store.append, [("s", delta("5")), ("t", delta("2"))]))
        out.append(await store.write(web.Store.append, [("s", delta("6"))]))
        # The run's `done`: the writer forgets the session, so what it keeps
        # is bounded by the runs going, and the next run reads its seq again.
        memory = [await store.write(lambda conn: dict(conn.last_seq))]
        done = {"type": "done", "status": "done", "summary": "", "steps": 1, "usage": {},
                "ts": 1.0}
        out.append(await store.write(web.Store.append, [("s", delta("7")), ("s", done)]))
        memory.append(await store.write(lambda conn: dict(conn.last_seq)))
        statements.clear()
        out.append(await store.write(web.Store.append, [("s", {
            "type": "message", "role": "user", "content": "again", "ts": 1.0})]))
        again = statements[:]
        out.append(await store.write(web.Store.append, [("s", delta("10"))]))
        rows = await store.read(lambda conn: conn.execute(
            "SELECT session_id, seq FROM events ORDER BY session_id, seq").fetchall())
        store.close()
        return first, known, out, rows, memory, again

    first, known, out, rows, memory, again = arun(go())
    assert [q.split()[0] for q in first] == ["BEGIN", "SELECT", "INSERT", "COMMIT"]
    assert len(known) == 1 and known[0].startswith("INSERT INTO events")
    assert [[r and r[0] for r in batch] for batch in out] == [
        [1, 1], [2, 3], [5, None], [6], [7, 8], [9], [10]]
    assert rows == [("s", n) for n in range(1, 11)]
    assert memory == [{"s": 6}, {}]
    assert [q.split()[0] for q in again] == ["BEGIN", "SELECT", "UPDATE", "INSERT", "COMMIT"]


def test_a_commit_that_fails_loses_only_its_own_events(tmp_path, monkeypatch):
    """A commit that fails (a full disk, say) fails the events waiting on it
    and takes no seq, whether it was one INSERT or a transaction rolled
    back: the next commit goes on from the last stored event."""
    import agent_web as web
    insert, fail = web.Store._insert, []

    def failing_insert(conn, rows):
        if fail:
            fail.pop()
            if conn.in_transaction:
                insert(conn, rows)            # written, then rolled back
            raise sqlite3.OperationalError("database or disk is full")
        insert(conn, rows)
    monkeypatch.setattr(web.Store, "_insert", staticmethod(failing_insert))

    def delta(text):
        return {"type": "delta", "message_id": "a", "channel": "text", "content": text}

    async def go():
        store = web.Store(tmp_path / "a.db")
        await store.open()
        await store.write(web.Store.create_session, "s", "auto")
        registry = web.PushRegistry()
        sub = registry.subscribe("s")
        log = web.EventLog(store, registry)
        log.start()
        await log.emit("s", {"type": "message", "role": "user", "content": "hi"})
        fail.append(True)
        log.emit_nowait("s", delta("lost"))              # deltas only: one INSERT
        # The store's own error, as the 503 it becomes for a client.
        with pytest.raises(web.StoreUnavailable, match="disk is full"):   # flush's commit
            await log.flush()
        fail.append(True)
        with pytest.raises(web.StoreUnavailable):          # a transaction
            await log.emit("s", {"type": "error", "message": "lost", "retrying": False})
        log.emit_nowait("s", delta("kept"))
        await log.emit("s", {"type": "error", "message": "kept", "retrying": False})
        await log.stop()
        rows = await store.read(lambda conn: conn.execute(
            "SELECT seq, data FROM events ORDER BY seq").fetchall())
        store.close()
        published = []
        while not sub.queue.empty():
            published.append(sub.queue.get_nowait())
        return published, rows

    published, rows = arun(go())
    assert published == rows
    assert [(seq, json.loads(text).get("content") or json.loads(text).get("message"))
            for seq, text in rows] == [(1, "hi"), (2, "kept"), (3, "kept")]


def test_a_database_made_before_last_seq_was_derived_still_works(tmp_path):
    """Databases made before 2026-11-26 store `sessions.last_seq`; the store
    now reads it from the events, and such a file opens and goes on."""
    import agent_web as web
    db = sqlite3.connect(tmp_path / "old.db")
    db.executescript("""
        PRAGMA journal_mode = WAL;
        CREATE TABLE sessions (id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'idle', approve_mode TEXT NOT NULL DEFAULT 'ask',
            created_at REAL NOT NULL, updated_at REAL NOT NULL,
            last_seq INTEGER NOT NULL DEFAULT 0);
        CREATE INDEX sessions_by_update ON sessions (updated_at DESC);
        CREATE TABLE events (session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL,
            PRIMARY KEY (session_id, seq)) WITHOUT ROWID;
        INSERT INTO sessions VALUES ('old', 'hello', 'idle', 'ask', 1.0, 1.0, 2);
        INSERT INTO events VALUES ('old', 1, 'message', '{"seq":1}'), ('old', 2, 'done', '{"seq":2}');
    """)
    db.close()

    async def go():
        store = web.Store(tmp_path / "old.db")
        await store.open()
        await store.write(web.Store.create_session, "new", "auto")
        out = await store.write(web.Store.append, [
            ("old", {"type": "message", "role": "user", "content": "again", "ts": 1.0}),
            ("new", {"type": "message", "role": "user", "content": "first", "ts": 1.0})])
        sessions = await store.read(web.Store.list_sessions)
        store.close()
        return out, sessions

    out, sessions = arun(go())
    assert [seq for seq, _ in out] == [3, 1]
    assert {s["session_id"]: (s["last_seq"], s["title"]) for s in sessions} == {
        "old": (3, "hello"), "new": (1, "first")}


def test_the_wal_is_checkpointed_beside_the_writer_not_inside_a_commit(tmp_path, monkeypatch):
    """Commits never checkpoint (SQLite's own synced the disk inside the
    commit that took the WAL past 1,000 pages); once the WAL passes
    WAL_CHECKPOINT_BYTES the checkpoint thread copies it into the database."""
    import agent_web as web
    monkeypatch.setattr(web, "WAL_CHECKPOINT_BYTES", 10**12)
    db = tmp_path / "a.db"

    async def write_and_checkpoint():
        store = web.Store(db)
        await store.open()
        log = web.EventLog(store, web.PushRegistry())
        log.start()
        await store.write(web.Store.create_session, "s", "auto")
        for i in range(5000):                  # over SQLite's own 4 MB threshold
            log.emit_nowait("s", {"type": "delta", "message_id": f"m{i}", "channel": "text",
                                  "content": "x" * 1000})
        await log.flush()
        before = db.stat().st_size             # still in the WAL: no commit checkpointed
        assert store.checkpoints == 0
        web.WAL_CHECKPOINT_BYTES = 1000
        await log.emit("s", {"type": "message", "role": "assistant", "message_id": "m",
                             "content": "x" * 1000})
        while store.checkpoints == 0:          # the one that commit started
            await asyncio.sleep(0.01)
        after = db.stat().st_size
        await log.stop()
        store.close()
        return before, after

    before, after = arun(write_and_checkpoint())
    assert before < 200_000 and after > 5_000_000
    with sqlite3.connect(db) as conn:          # and the close left it whole
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 5001
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_the_wal_stays_small_while_writes_never_stop(tmp_path, monkeypatch):
    """A checkpoint beside a busy writer never copies the whole WAL (commits
    land while it works), and only a whole copy lets the WAL start again: on
    its own the file grew by gigabytes.  The writer copies the rest before
    its next write, so the WAL restarts every cycle and stays small."""
    import agent_web as web
    monkeypatch.setattr(web, "WAL_CHECKPOINT_BYTES", 256 * 1024)
    db = tmp_path / "a.db"
    wal = Path(str(db) + "-wal")

    async def write_without_pause():
        store = web.Store(db)
        await store.open()
        log = web.EventLog(store, web.PushRegistry())
        log.start()
        sessions = [f"s{k}" for k in range(4)]
        for sid in sessions:
            await store.write(web.Store.create_session, sid, "auto")
        sizes, generations = [], set()

        async def run(sid):
            for i in range(600):               # each awaited: one commit after another
                await log.emit(sid, {"type": "tool_result", "call_id": f"c{i}", "tool": "bash",
                                     "output": "x" * 300, "is_error": False, "duration_ms": 1})
                sizes.append(wal.stat().st_size)
                with open(wal, "rb") as f:     # the WAL header's checkpoint sequence
                    generations.add(f.read(16)[12:16])   # number: +1 at each restart
        await asyncio.gather(*[run(sid) for sid in sessions])
        await log.stop()
        checkpoints = store.checkpoints
        store.close()
        return sizes, checkpoints, len(generations) - 1

    sizes, checkpoints, restarted = arun(write_without_pause())
    restarts = sum(1 for a, b in zip(sizes, sizes[1:]) if b < a)   # cut back: started again
    assert checkpoints >= 3 and restarts >= 3, (checkpoints, restarts)
    assert restarted >= 3, restarted
    assert max(sizes) < 16_000_000, max(sizes)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 2400
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# =============================================================================
# The server (issue 3): real uvicorn + wsproto, real WebSocket clients
# =============================================================================

@both_stores
def test_a_message_streams_over_the_websocket_and_matches_the_store(server):
    sid = server.chat("run: echo hello-web")["session_id"]
    events = arun(ws_collect(server.ws_url(), sid))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message" and "tool_call" in kinds and "tool_result" in kinds
    assert of(events, "tool_result")[0]["output"].strip() == "hello-web"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    stored = server.history(sid)
    assert stored["events"] == events and stored["status"] == "idle"
    assert stored["title"] == "run: echo hello-web"


@both_stores
def test_a_commands_output_is_stored_and_pushed_as_it_comes(server):
    """`tool_output` events take the same path as deltas: stored, pushed in
    order, merged while a commit is in flight; the conversation sent back to
    the model holds the result only."""
    sid = server.chat("run: for i in 1 2 3; do echo out$i; sleep 0.2; done")["session_id"]
    events = arun(ws_collect(server.ws_url(), sid))
    kinds = [e["type"] for e in events]
    live = of(events, "tool_output")
    result = of(events, "tool_result")[0]
    assert live and kinds.index("tool_call") < kinds.index("tool_output")
    assert "".join(e["content"] for e in live) == result["output"] == "out1\nout2\nout3\n"
    assert all(e["call_id"] == result["call_id"] for e in live)
    assert server.history(sid)["events"] == events
    import agent_web as web
    store = server.store()
    kinds = {e["type"] for e in arun(store.read(web.Store.conversation, sid))}
    store.close()
    assert "tool_result" in kinds and not kinds & {"tool_output", "delta"}


def test_post_answers_202_with_session_and_seq(server):
    r = server.http("POST", "/agent/chat", {"message": "hi"})
    assert r.status_code == 202
    body = r.json()
    assert body["seq"] == 1 and body["session_id"].startswith("s_")


@both_stores
def test_two_subscribers_receive_identical_streams(server):
    sid = server.chat("slow one")["session_id"]

    async def both():
        return await asyncio.gather(ws_collect(server.ws_url(), sid),
                                    ws_collect(server.ws_url(), sid))
    a, b = arun(both())
    assert a == b and a[-1]["type"] == "done"


@both_stores
def test_subscribe_mid_run_joins_store_and_live_with_no_gap(server):
    sid = server.chat("slow answer")["session_id"]
    server.wait_event(sid, "delta", count=5)
    events = arun(ws_collect(server.ws_url(), sid, after=2))
    assert [e["seq"] for e in events] == list(range(3, events[-1]["seq"] + 1))
    text = "".join(e["content"] for e in of(events, "delta") if e["channel"] == "text")
    assert of(events, "message")[-1]["content"].endswith(text)


@both_stores
def test_random_drops_and_resubscribes_join_to_exactly_the_stored_log(server):
    """20 trials: while a run streams fast (300 deltas at 1,000 a second), a
    client drops its socket at random moments (a clean close or an abrupt
    abort), reconnects and resubscribes after the last seq it saw.  Per
    trial, the joined stream must equal the stored log: no gap, no duplicate."""
    import random
    rng = random.Random(20261124)

    async def follow(sid: str) -> tuple[list[dict], int]:
        got, drops = [], 0
        while True:
            # max_queue=None: a client that stops reading (websockets does, at
            # 16 unread frames) never sees the server's close frame behind
            # them, and its close() sits out close_timeout.
            ws = await websockets.connect(server.ws_url(), max_size=None, max_queue=None)
            after = got[-1]["seq"] if got else 0
            await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": after}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] == "subscribed"
            budget = rng.choice([1, 2, 5, 20, 60, 10_000])     # frames before the drop
            for _ in range(budget):
                frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
                got.append(frame)
                if frame["type"] == "done":
                    await ws.close()
                    return got, drops
            drops += 1
            if rng.random() < 0.5:
                ws.transport.abort()                # vanish: no close frame
            else:
                await ws.close()
            if rng.random() < 0.5:
                await asyncio.sleep(rng.uniform(0, 0.05))       # miss some live events

    total_drops = 0
    for trial in range(20):
        sid = server.chat("stream 300 1000")["session_id"]
        if trial % 2:
            time.sleep(rng.uniform(0, 0.2))         # join late: part replay, part live
        got, drops = arun(follow(sid))
        total_drops += drops
        stored = server.history(sid)["events"]
        assert [e["seq"] for e in got] == list(range(1, len(got) + 1)), f"trial {trial}"
        assert got == stored, f"trial {trial}: the joined stream differs from the store"
    assert total_drops >= 20                        # the drops really happened


def test_a_run_completes_with_no_socket_connected(server):
    sid = server.chat("run: echo nobody-watching")["session_id"]
    h = server.wait_status(sid)
    assert of(h["events"], "done")[0]["status"] == "done"
    assert "nobody-watching" in of(h["events"], "tool_result")[0]["output"]


@both_stores
def test_second_post_during_a_run_gets_409(server):
    sid = server.chat("slow")["session_id"]
    r = server.http("POST", "/agent/chat", {"session_id": sid, "message": "again"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "run_in_progress"


@both_stores
def test_racing_posts_to_one_session_start_exactly_one_run(server):
    sid = server.chat("say: first")["session_id"]
    server.wait_status(sid)

    async def race():
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {TOKEN}"}) as c:
            return await asyncio.gather(*[
                c.post(server.base + "/agent/chat", json={"session_id": sid, "message": f"slow {i}"})
                for i in range(10)])
    codes = sorted(r.status_code for r in arun(race()))
    assert codes == [202] + [409] * 9
    h = server.wait_status(sid)
    assert len([e for e in of(h["events"], "message") if e["role"] == "user"]) == 2


@both_stores
def test_cancel_mid_stream_by_post(server):
    sid = server.chat("slow talker")["session_id"]
    server.wait_event(sid, "delta", count=3)
    r = server.http("POST", "/agent/cancel", {"session_id": sid})
    assert r.status_code == 202
    h = server.wait_status(sid)
    assert of(h["events"], "done")[-1]["status"] == "cancelled"
    assert of(h["events"], "message")[-1]["incomplete"] is True


def test_cancel_mid_tool_by_websocket_frame(server):
    sid = server.chat("run: sleep 30")["session_id"]
    server.wait_event(sid, "tool_call")

    async def cancel_and_watch():
        async with websockets.connect(server.ws_url()) as ws:
            await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": 0}))
            await ws.send(json.dumps({"type": "cancel"}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
                if frame.get("type") == "done":
                    return frame
    started = time.monotonic()
    done = arun(cancel_and_watch())
    assert done["status"] == "cancelled" and time.monotonic() - started < 10
    assert of(server.history(sid)["events"], "tool_result")[0]["is_error"]


def test_cancel_with_nothing_running_is_409(server):
    sid = server.chat("say: quick")["session_id"]
    server.wait_status(sid)
    r = server.http("POST", "/agent/cancel", {"session_id": sid})
    assert r.status_code == 409


class RawWebSocket:
    """A WebSocket client on a bare socket (wsproto does the framing), so a
    test controls exactly when bytes are read: a truly stalled reader."""

    def __init__(self, port: int, path: str, rcvbuf: int = 4096):
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.conn.send(Request(host=f"127.0.0.1:{port}", target=path)))
        while not any(isinstance(e, AcceptConnection) for e in self._read()):
            pass

    def _read(self, timeout: float = 10) -> list:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        self.conn.receive_data(data or None)
        return list(self.conn.events())

    def send_json(self, obj: dict) -> None:
        from wsproto.events import TextMessage
        self.sock.sendall(self.conn.send(TextMessage(json.dumps(obj))))

    def read_until_close(self, timeout: float = 30) -> tuple[int, list[dict]]:
        """Read everything now; returns (close code, event frames received)."""
        from wsproto.events import CloseConnection, TextMessage
        frames, parts, deadline = [], [], time.time() + timeout
        while time.time() < deadline:
            for ev in self._read():
                if isinstance(ev, TextMessage):
                    parts.append(ev.data)
                    if ev.message_finished:
                        frame = json.loads("".join(parts))
                        parts = []
                        if "seq" in frame:
                            frames.append(frame)
                elif isinstance(ev, CloseConnection):
                    return ev.code, frames
        raise AssertionError("no close frame")

    def close(self) -> None:
        self.sock.close()


def test_a_subscriber_that_never_reads_is_closed_4008_and_the_run_goes_on(tmp_path, llm):
    # AGENT_MAX_TOKENS: each fake token here is 2,000 characters, far past
    # what a real one holds (the per-token cap would rightly stop it).
    server = ServerProcess(tmp_path, llm, extra_env={"AGENT_WEB_QUEUE_SIZE": "50",
                                                     "AGENT_MAX_TOKENS": "1000000"})
    try:
        # 10 MB streamed: far more than a stalled socket's buffers (4 MB here) hold
        llm.script.append(Reply(" ".join(["y" * 2000] * 5000), delay=0.001))
        sid = server.chat("say: go")["session_id"]
        slow = RawWebSocket(server.port, f"/agent/ws?token={TOKEN}")
        slow.send_json({"type": "subscribe", "session_id": sid, "after": 0})
        events = arun(ws_collect(server.ws_url(), sid, timeout=60, max_size=None))
        assert events[-1]["type"] == "done" and events[-1]["status"] == "done"
        code, got = slow.read_until_close()
        slow.close()
        assert code == 4008
        assert got == events[:len(got)] and len(got) < len(events)   # a prefix, no gap
        assert server.all_events(sid) == events
    finally:
        server.stop()


def test_killed_server_restarts_with_interrupted_run_and_continues(tmp_path, llm):
    server = ServerProcess(tmp_path, llm)
    try:
        sid = server.chat("run: echo half-way; sleep 30")["session_id"]
        server.wait_event(sid, "tool_output")
        before = server.history(sid)["events"]
        server.kill()
        server.start()
        h = server.wait_status(sid)
        assert h["events"][:len(before)] == before            # nothing lost
        tail = [e["type"] for e in h["events"][len(before):]]
        assert tail == ["tool_result", "done"]
        assert h["events"][-1]["status"] == "interrupted"
        # What the command printed before the crash is in its result.
        assert of(h["events"], "tool_result")[0]["output"].endswith(
            "Output so far:\nhalf-way\n")
        n = len(llm.requests)
        server.chat("say: after restart", sid)
        h = server.wait_status(sid)
        assert of(h["events"], "done")[-1]["status"] == "done"
        sent = llm.requests[n]["messages"]
        flat = json.dumps(sent)
        assert "run: echo half-way; sleep 30" in flat and "after restart" in flat  # full context
        assert "half-way" in flat and "stopped" in flat              # the interrupted tool result
    finally:
        server.stop()


def test_ctrl_c_ends_running_runs_as_interrupted(tmp_path, llm):
    server = ServerProcess(tmp_path, llm)
    sid = server.chat("run: sleep 30")["session_id"]
    server.wait_event(sid, "tool_call")
    server.stop()
    assert server.proc.returncode == 0
    db = sqlite3.connect(server.db)
    kinds = [json.loads(r[0]) for r in db.execute(
        "SELECT data FROM events WHERE session_id = ? ORDER BY seq", (sid,))]
    assert kinds[-1]["type"] == "done" and kinds[-1]["status"] == "interrupted"
    assert db.execute("SELECT status FROM sessions").fetchone()[0] == "idle"


@both_stores
def test_sessions_list_newest_first_and_delete(server):
    a = server.chat("say: first")["session_id"]
    server.wait_status(a)
    b = server.chat("say: second")["session_id"]
    server.wait_status(b)
    sessions = server.http("GET", "/agent/sessions").json()["sessions"]
    assert [s["session_id"] for s in sessions][:2] == [b, a]
    assert set(sessions[0]) >= {"session_id", "title", "status", "created_at", "updated_at",
                                "last_seq"}
    assert server.http("DELETE", f"/agent/sessions/{a}").status_code == 204
    assert server.http("GET", f"/agent/chat?session_id={a}").status_code == 404
    assert server.http("DELETE", f"/agent/sessions/{a}").status_code == 404


def test_history_paging_after_and_limit(server):
    sid = server.chat("slow, so every word is an event")["session_id"]
    h = server.wait_status(sid)
    page = server.http("GET", f"/agent/chat?session_id={sid}&after=2&limit=3").json()
    assert [e["seq"] for e in page["events"]] == [3, 4, 5]
    assert page["has_more"] is True and page["last_seq"] == h["last_seq"]
    tail = server.http("GET", f"/agent/chat?session_id={sid}&tail=2").json()
    assert [e["seq"] for e in tail["events"]] == [h["last_seq"] - 1, h["last_seq"]]


def test_healthz_needs_no_token(server):
    r = server.http("GET", "/healthz", token=False)
    assert r.status_code == 200 and r.json() == {"ok": True}


def test_no_token_is_401_on_every_agent_route(server):
    for method, path in [("GET", "/agent/sessions"), ("GET", "/agent/chat?session_id=x"),
                         ("POST", "/agent/chat"), ("POST", "/agent/cancel"),
                         ("POST", "/agent/approve"), ("DELETE", "/agent/sessions/x"),
                         ("GET", "/agent/config")]:
        r = server.http(method, path, token=False)
        assert r.status_code == 401, (method, path)
        assert r.json()["error"]["code"] == "unauthorized"
    r = server.http("GET", "/agent/sessions", token=False,
                    headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_websocket_without_token_is_refused(server):
    async def attempt():
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(f"ws://127.0.0.1:{server.port}/agent/ws")
        return info.value.response.status_code
    assert arun(attempt()) == 401


def test_foreign_origin_is_refused_on_post_and_websocket(server):
    r = server.http("POST", "/agent/chat", {"message": "hi"},
                    headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "bad_origin"

    async def attempt():
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(server.ws_url(), origin="http://evil.example")
        return info.value.response.status_code
    assert arun(attempt()) == 403
    same = server.http("POST", "/agent/chat", {"message": "say: ok"},
                       headers={"origin": server.base})
    assert same.status_code == 202


def test_foreign_host_is_403(server):
    r = server.http("GET", "/agent/sessions", headers={"host": "evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "bad_host"
    assert server.http("GET", "/", headers={"host": "evil.example:80"}).status_code == 403


def test_oversized_body_is_413(server):
    r = server.http("POST", "/agent/chat", raw=b'{"message": "' + b"x" * (2 << 20) + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_page_trades_token_for_a_strict_cookie(server):
    r = httpx.get(server.url, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN in cookie
    name = cookie.split("=", 1)[0]
    page = httpx.get(server.base + "/", cookies={name: TOKEN})
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    api = httpx.get(server.base + "/agent/sessions", cookies={name: TOKEN})
    assert api.status_code == 200


def test_unknown_route_404_and_wrong_method_405_with_allow(server):
    assert server.http("GET", "/nope").status_code == 404
    r = server.http("PUT", "/agent/chat")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"


def test_static_files_cannot_escape_the_static_folder(server):
    assert server.http("GET", "/static/app.js").status_code == 200
    for path in ("/static/../agent_web.py", "/static/%2e%2e/agent_web.py",
                 "/static/..%2fschema.sql"):
        assert server.http("GET", path).status_code == 404, path


def test_module_level_app_runs_under_plain_uvicorn(tmp_path, llm):
    port = free_port()
    env = free_env(AGENT_WEB_TOKEN=TOKEN, ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL=llm.url,
                   AGENT_WEB_DB=str(tmp_path / "u.db"), AGENT_WORKSPACE=str(tmp_path / "ws"),
                   AGENT_APPROVE="auto", PYTHONPATH=str(HERE))
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "agent_web:app", "--ws", "wsproto",
                             "--port", str(port), "--log-level", "warning"], env=env, cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        h = {"authorization": f"Bearer {TOKEN}"}
        r = httpx.post(f"http://127.0.0.1:{port}/agent/chat", json={"message": "say: plain"},
                       headers=h)
        assert r.status_code == 202
        events = arun(ws_collect(f"ws://127.0.0.1:{port}/agent/ws?token={TOKEN}",
                                        r.json()["session_id"]))
        assert of(events, "message")[-1]["content"] == "plain"
    finally:
        proc.terminate()
        proc.wait(15)


HOST_APP = '''
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
import agent_web

inner = agent_web.create_app(db_path=sys.argv[2], workspace=sys.argv[3], token="{token}",
                             approve="auto")
host = Starlette(routes=[Route("/", lambda r: PlainTextResponse("host app")),
                         Mount("/agent-ui", app=inner)])
uvicorn.run(host, host="127.0.0.1", port=int(sys.argv[1]), ws="wsproto", log_level="warning",
            lifespan="off")
'''


def test_mounted_under_a_prefix_in_starlette_serves_a_whole_flow(tmp_path, llm):
    (tmp_path / "host_app.py").write_text(HOST_APP.format(token=TOKEN))
    port = free_port()
    env = free_env(ANTHROPIC_API_KEY="k", ANTHROPIC_BASE_URL=llm.url, PYTHONPATH=str(HERE))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "host_app.py"), str(port),
                             str(tmp_path / "m.db"), str(tmp_path / "ws")], env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}/agent-ui"
    try:
        wait_http(base + "/healthz")
        r = httpx.get(f"{base}/?token={TOKEN}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/agent-ui/"
        assert "Path=/agent-ui" in r.headers["set-cookie"]
        cookies = {r.headers["set-cookie"].split("=", 1)[0]: TOKEN}
        assert "static/app.js" in httpx.get(base + "/", cookies=cookies).text
        assert httpx.get(base + "/static/app.js").status_code == 200
        post = httpx.post(base + "/agent/chat", json={"message": "run: echo mounted"},
                          cookies=cookies)
        assert post.status_code == 202, post.text
        sid = post.json()["session_id"]
        events = arun(ws_collect(f"ws://127.0.0.1:{port}/agent-ui/agent/ws?token={TOKEN}",
                                        sid))
        assert "mounted" in of(events, "tool_result")[0]["output"]
        listed = httpx.get(base + "/agent/sessions", cookies=cookies).json()["sessions"]
        assert listed[0]["session_id"] == sid
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "host app"
    finally:
        proc.terminate()
        proc.wait(15)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


# =============================================================================
# Approvals (issue 7)
# =============================================================================

@pytest.fixture
def asking(tmp_path, llm):
    s = ServerProcess(tmp_path, llm, approve="ask")
    yield s
    s.stop()


def approve(server, sid, call_id, decision="allow") -> httpx.Response:
    return server.http("POST", "/agent/approve", {"session_id": sid, "call_id": call_id,
                                                  "decision": decision})


def test_ask_mode_waits_then_allow_runs_the_tool(asking):
    sid = asking.chat("run: echo approved-run")["session_id"]
    req = asking.wait_event(sid, "approval_request")
    h = asking.wait_status(sid, "awaiting_approval")
    assert not of(h["events"], "tool_result")          # nothing ran yet
    assert req["tool"] == "bash" and req["input"] == {"command": "echo approved-run"}
    assert approve(asking, sid, req["call_id"]).status_code == 202
    h = asking.wait_status(sid)
    assert of(h["events"], "approval")[0]["decision"] == "allow"
    assert of(h["events"], "tool_result")[0]["output"].strip() == "approved-run"


def test_deny_gives_the_model_an_error_result_and_the_run_goes_on(asking, llm):
    marker = asking.workspace / "denied"
    sid = asking.chat(f"run: touch {marker}")["session_id"]
    req = asking.wait_event(sid, "approval_request")
    assert approve(asking, sid, req["call_id"], "deny").status_code == 202
    h = asking.wait_status(sid)
    result = of(h["events"], "tool_result")[0]
    assert result["is_error"] and "denied" in result["output"]
    assert of(h["events"], "done")[0]["status"] == "done" and not marker.exists()
    assert "denied" in json.dumps(llm.requests[-1]["messages"][-1])   # the model was told


def test_answer_by_websocket_from_a_second_tab(asking):
    sid = asking.chat("run: echo second-tab")["session_id"]
    req = asking.wait_event(sid, "approval_request")

    async def second_tab():
        async with websockets.connect(asking.ws_url()) as ws:
            await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": 0}))
            await ws.send(json.dumps({"type": "approve", "call_id": req["call_id"],
                                      "decision": "allow"}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
                if frame.get("type") == "done":
                    return
    arun(second_tab())
    assert "second-tab" in of(asking.history(sid)["events"], "tool_result")[0]["output"]


def test_racing_answers_one_202_one_409(asking):
    sid = asking.chat("run: echo race")["session_id"]
    req = asking.wait_event(sid, "approval_request")

    async def race():
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {TOKEN}"}) as c:
            return await asyncio.gather(*[c.post(asking.base + "/agent/approve", json={
                "session_id": sid, "call_id": req["call_id"], "decision": d})
                for d in ("allow", "deny")])
    codes = sorted(r.status_code for r in arun(race()))
    assert codes == [202, 409]
    h = asking.wait_status(sid)
    assert len(of(h["events"], "approval")) == 1


def test_cancel_while_waiting_ends_the_run_cleanly(asking):
    sid = asking.chat("run: echo never")["session_id"]
    req = asking.wait_event(sid, "approval_request")
    assert asking.http("POST", "/agent/cancel", {"session_id": sid}).status_code == 202
    h = asking.wait_status(sid)
    assert of(h["events"], "done")[-1]["status"] == "cancelled"
    result = of(h["events"], "tool_result")[0]
    assert result["call_id"] == req["call_id"] and result["is_error"]
    assert approve(asking, sid, req["call_id"]).status_code == 409


def test_answer_after_server_restart_continues_the_run_to_done(asking):
    sid = asking.chat("run: echo after-restart")["session_id"]
    req = asking.wait_event(sid, "approval_request")
    asking.kill()
    asking.start()
    h = asking.history(sid)
    assert h["status"] == "awaiting_approval"
    assert len(of(h["events"], "approval_request")) == 1          # not asked twice
    assert approve(asking, sid, req["call_id"]).status_code == 202
    h = asking.wait_status(sid)
    assert "after-restart" in of(h["events"], "tool_result")[0]["output"]
    assert of(h["events"], "done")[0]["status"] == "done"


def test_graceful_restart_keeps_the_request_waiting(asking):
    sid = asking.chat("run: echo graceful")["session_id"]
    req = asking.wait_event(sid, "approval_request")
    asking.stop()
    asking.start()
    assert asking.history(sid)["status"] == "awaiting_approval"
    assert approve(asking, sid, req["call_id"]).status_code == 202
    assert "graceful" in of(asking.wait_status(sid)["events"], "tool_result")[0]["output"]


def test_second_post_while_waiting_is_409(asking):
    sid = asking.chat("run: echo wait")["session_id"]
    asking.wait_event(sid, "approval_request")
    r = asking.http("POST", "/agent/chat", {"session_id": sid, "message": "hello?"})
    assert r.status_code == 409


def test_allow_always_is_remembered_for_the_session(asking):
    sid = asking.chat("run: echo one")["session_id"]
    req = asking.wait_event(sid, "approval_request")
    assert approve(asking, sid, req["call_id"], "allow_always").status_code == 202
    asking.wait_status(sid)
    asking.chat("run: echo two", sid)
    h = asking.wait_status(sid)
    assert len(of(h["events"], "approval_request")) == 1
    assert of(h["events"], "tool_result")[-1]["output"].strip() == "two"


def test_auto_mode_never_asks(server):
    sid = server.chat("run: echo auto")["session_id"]
    h = server.wait_status(sid)
    assert not of(h["events"], "approval_request")
    assert of(h["events"], "tool_result")[0]["output"].strip() == "auto"


def test_approve_mode_is_per_session_and_can_change(asking):
    sid = asking.chat("run: echo first", approve_mode="auto")["session_id"]
    assert not of(asking.wait_status(sid)["events"], "approval_request")
    r = asking.http("PATCH", f"/agent/sessions/{sid}", {"approve_mode": "ask-all"})
    assert r.status_code == 200 and r.json()["approve_mode"] == "ask-all"
    asking.chat("run: echo second", sid)
    assert asking.wait_event(sid, "approval_request")["input"] == {"command": "echo second"}


def test_ask_all_asks_for_read_only_tools_and_ask_does_not(asking, llm):
    (asking.workspace / "f.txt").write_text("content")
    llm.script.append(Reply("", tools=[("read_file", '{"path": "f.txt"}')]))
    sid = asking.chat("read it")["session_id"]
    h = asking.wait_status(sid)
    assert not of(h["events"], "approval_request")          # ask: reads are fine
    llm.script.append(Reply("", tools=[("read_file", '{"path": "f.txt"}')]))
    sid = asking.chat("read it", approve_mode="ask-all")["session_id"]
    assert asking.wait_event(sid, "approval_request")["tool"] == "read_file"


# =============================================================================
# The page (issue 4, and approvals in the page): Debian's Chromium via Playwright
# =============================================================================

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (see .ci/run)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page_for(browser):
    """page_for(server) -> a signed-in tab; every tab of a test shares one context."""
    contexts = []

    def make(server, *, new_context=False, locale="en-US"):
        if new_context or not contexts:
            # bypass_csp lets Playwright evaluate its own wait expressions; it
            # also means the XSS test below proves safety without the CSP's help.
            contexts.append(browser.new_context(locale=locale, bypass_csp=True,
                                                viewport={"width": 1200, "height": 800}))
        page = contexts[-1].new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("dialog", lambda d: d.accept())
        page.goto(server.url)
        page.wait_for_selector("#conn.live")
        return page
    errors: list[str] = []
    yield make
    for c in contexts:
        c.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def send_in_page(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_the_page_loads_without_a_console_error(server, browser):
    """Every request of the page's start-up succeeds: its script, styles,
    the API calls, the socket, and the icon the browser asks for on its own
    (it was /favicon.ico, a 404 in every console)."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    try:
        page = context.new_page()
        said = []
        page.on("console", lambda m: m.type in ("error", "warning") and said.append(m.text))
        page.on("pageerror", lambda exc: said.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector("#conn.live")
        page.wait_for_function("document.querySelector('link[rel=icon]') !== null")
        page.wait_for_timeout(500)                 # the icon is fetched after load
        assert said == []
    finally:
        context.close()


def test_page_says_when_its_session_was_deleted_elsewhere(server, page_for, llm):
    page = page_for(server)
    send_in_page(page, "slow")
    page.wait_for_selector(".assistant")
    sid = re.search(r"session=([\w-]+)", page.url).group(1)
    assert server.http("DELETE", f"/agent/sessions/{sid}").status_code == 204
    page.wait_for_selector(".notice.error")
    assert "deleted" in page.locator(".notice.error").inner_text()
    assert "session=" not in page.url and page.locator("#sessions li").count() == 0
    page.wait_for_selector("#conn.live")                      # reconnected at once
    send_in_page(page, "say: still here")
    page.wait_for_selector(".done.status-done")


def test_page_send_streams_the_answer_and_shows_a_tool_card(server, page_for):
    page = page_for(server)
    send_in_page(page, "run: echo from-the-page")
    page.wait_for_selector(".done.status-done")
    card = page.locator(".tool")
    assert card.count() == 1
    assert card.locator(".args").inner_text() == "$ echo from-the-page"
    assert "from-the-page" in card.locator("pre.output").inner_text()
    assert "ok" in card.get_attribute("class")
    assert page.locator(".assistant").last.inner_text().startswith("The tool said: from-the-page")
    assert "session=" in page.url                      # the URL names the session
    assert page.locator("#sessions li").count() == 1


def test_page_reload_mid_stream_shows_the_answer_once_complete(server, page_for, llm):
    page = page_for(server)
    llm.script.append(Reply("", tools=[("bash", '{"command": "echo card"}')]))
    send_in_page(page, "run: echo card")
    page.wait_for_selector(".done")
    llm.script.append(Reply(" ".join(f"w{i}" for i in range(80)) + " FINAL", delay=0.04))
    send_in_page(page, "say something slowly")
    page.wait_for_function("document.querySelectorAll('.assistant').length >= 3 && "
                           "document.querySelector('.assistant:last-of-type .md')?.textContent.includes('w10')")
    page.reload()
    page.wait_for_selector("#conn.live")
    partial = page.locator(".assistant").last.inner_text()
    assert "w10" in partial                            # the text so far, straight away
    page.wait_for_selector(".done >> nth=1")
    text = page.locator(".assistant").last.inner_text()
    assert text.count("FINAL") == 1 and text.count("w1 ") == 1 and text.startswith("w0 w1 w2")
    assert page.locator(".tool").count() == 1          # no doubled card
    assert page.locator(".user").count() == 2


def test_page_two_tabs_same_transcript_and_stop_after_reload(server, page_for, llm):
    first = page_for(server)
    llm.script.append(Reply(" ".join(f"t{i}" for i in range(400)), delay=0.05))
    send_in_page(first, "talk for a long time")
    first.wait_for_selector(".assistant")
    second = page_for(server)
    second.goto(first.url)
    second.wait_for_selector(".assistant")
    first.reload()
    first.wait_for_selector("#send[data-mode=stop]")
    first.click("#send")                                # Stop, pressed after the reload
    for tab in (first, second):
        tab.wait_for_selector(".done.status-cancelled")
    a = first.locator("#events").inner_text()
    b = second.locator("#events").inner_text()
    assert a == b and "cancelled" in a
    assert first.locator("#send").inner_text() == "Send"


def test_page_escape_stops_a_run(server, page_for, llm):
    page = page_for(server)
    llm.script.append(Reply(" ".join(["slowly"] * 300), delay=0.05))
    send_in_page(page, "go on")
    page.wait_for_selector(".assistant")
    page.keyboard.press("Escape")
    page.wait_for_selector(".done.status-cancelled")


def test_page_shows_html_in_model_output_as_text_and_runs_nothing(server, page_for, llm):
    page = page_for(server)
    evil = ('Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
            'and [click](javascript:window.__pwned=3) and **bold** `code`')
    llm.script.append(Reply(evil))
    send_in_page(page, "be evil")
    page.wait_for_selector(".done")
    assistant = page.locator(".assistant").last
    assert '<img src=x onerror="window.__pwned=1">' in assistant.inner_text()
    assert "<script>window.__pwned=2</script>" in assistant.inner_text()
    assert assistant.locator("img, script").count() == 0
    assert assistant.locator("a").count() == 0          # javascript: links stay text
    assert assistant.locator("strong").inner_text() == "bold"
    assert page.evaluate("window.__pwned") is None


RICH_ANSWER = """## Plan for `app.py`

1. Read the config
2. Fix the bug:
   - in `load()`
   - and ~~in `save()`~~ not needed
     continued line
3. Run the tests

4. Ship it

- [x] tests pass
- [ ] docs

| file | lines | state |
| :--- | ---: | :---: |
| `app.py` | 120 | **changed** |
| a \\| b | 7 |

> Note: the *old* config
> stays readable.

---
Done <b>now</b>."""


def test_page_renders_the_markdown_models_write_tables_lists_quotes(server, page_for, llm):
    """Headings, nested and loose numbered lists, task items, a table with
    alignment and an escaped pipe, a quote, a rule: as elements holding text
    (the `<b>` stays text); and drawn piece by piece across any blank line it
    is what the whole text gives, as the streaming page draws it."""
    llm.script.append(Reply(RICH_ANSWER))
    page = page_for(server)
    send_in_page(page, "plan")
    page.wait_for_selector(".done")
    md = page.locator(".assistant .md").last
    assert md.locator("h2").inner_text() == "Plan for app.py"
    assert md.locator("h2 code").inner_text() == "app.py"
    lists = md.locator("ol").evaluate_all("(ls) => ls.map((l) => [l.start, l.children.length])")
    assert lists == [[1, 3], [4, 1]]            # numbering goes on after a blank line
    nested = md.locator("ol li ul li")
    assert nested.all_inner_texts() == ["in load()", "and in save() not needed\ncontinued line"]
    assert md.locator("ol li ul li del").inner_text() == "in save()"
    tasks = md.locator("li.task input[type=checkbox]")
    assert [tasks.nth(n).is_checked() for n in range(2)] == [True, False]
    assert md.locator("li.task").all_inner_texts() == ["tests pass", "docs"]
    table = md.locator(".table table")
    assert table.locator("th").all_inner_texts() == ["file", "lines", "state"]
    assert [table.locator("tbody tr").nth(n).locator("td").all_inner_texts() for n in range(2)] \
        == [["app.py", "120", "changed"], ["a | b", "7", ""]]
    assert table.locator("td").evaluate_all("(tds) => tds.slice(0, 3).map((td) => "
                                            "getComputedStyle(td).textAlign)") == [
        "left", "right", "center"]
    assert md.locator("blockquote p").inner_text() == "Note: the old config\nstays readable."
    assert md.locator("hr").count() == 1
    assert md.locator("p").last.inner_text() == "Done <b>now</b>."
    assert md.locator("b").count() == 0
    split = page.evaluate("""async (text) => {
      const { renderMarkdown } = await import(new URL("static/markdown.js", document.baseURI));
      const html = (...parts) => {
        const box = document.createElement("div");
        for (const part of parts) box.append(renderMarkdown(part));
        return box.innerHTML;
      };
      const whole = html(text), differ = [];
      for (let at = text.indexOf("\\n\\n"); at >= 0; at = text.indexOf("\\n\\n", at + 1)) {
        if (html(text.slice(0, at + 2), text.slice(at + 2)) !== whole) differ.push(at);
      }
      return differ;
    }""", RICH_ANSWER)
    assert split == []
    # And for 2,000 random texts of Markdown's pieces: no error, and the same
    # drawing however it is cut at a blank line outside a fence.
    bad = page.evaluate(r"""async () => {
      const { renderMarkdown } = await import(new URL("static/markdown.js", document.baseURI));
      const html = (...parts) => {
        const box = document.createElement("div");
        for (const part of parts) box.append(renderMarkdown(part));
        return box.innerHTML;
      };
      const pieces = ["|", "-", ":", "*", "_", ">", "#", "`", "```", "~~", "~~~", "[", "]", "(",
        ")", "\n", "\n", "\n\n", " ", "   ", "\t", "1.", "2)", "a", "b c", "\\", "[ ]",
        "[x]", "http://x", "---", "| a | b |\n| - | - |\n", "> ```", "   ```", "   - ", "## "];
      let seed = 7;
      const pick = () => pieces[(seed = (seed * 1103515245 + 12345) % 2147483648) % pieces.length];
      const bad = [];
      for (let k = 0; k < 2000 && bad.length < 3; k++) {
        let text = "";
        for (let n = 1 + (seed % 40); n > 0; n--) text += pick();
        try {
          const whole = html(text);
          let pos = 0, fence = null;
          for (const line of text.split("\n").slice(0, -1)) {
            pos += line.length + 1;
            const open = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)\s*$/);
            if (fence) { if (line.trim().startsWith(fence)) fence = null; }
            else if (open) fence = open[1];
            else if (!line.trim() && html(text.slice(0, pos), text.slice(pos)) !== whole) {
              bad.push(["split", text, pos]);
            }
          }
        } catch (e) { bad.push(["error", text, String(e)]); }
      }
      return bad;
    }""")
    assert bad == []
    # Marks nested thousands deep are drawn (at most 8 levels, the rest as
    # text), not a recursion that overflows the stack and breaks the page.
    deep = page.evaluate("""async () => {
      const { renderMarkdown } = await import(new URL("static/markdown.js", document.baseURI));
      const box = (text) => { const d = document.createElement("div"); d.append(renderMarkdown(text)); return d; };
      const quotes = box(">".repeat(5000) + " deep");
      const lists = box(Array.from({ length: 3000 }, (_, n) => " ".repeat(n) + "- x" + n).join("\\n"));
      const depth = (el, sel) => { let n = 0; while ((el = el.querySelector(sel))) n++; return n; };
      // Six levels two columns apart: the limit counts levels, not columns.
      const six = box(["a", "b", "c", "d", "e", "f"].map((w, n) => " ".repeat(2 * n) + "- " + w)
        .join("\\n"));
      return [depth(quotes, ":scope > blockquote, blockquote > blockquote"), quotes.textContent.endsWith("deep"),
              lists.querySelectorAll("ul").length, lists.textContent.includes("x2999"),
              depth(six, "ul"), six.querySelector("ul ul ul ul ul ul li").textContent];
    }""")
    assert deep == [8, True, 8, True, 6, "f"]


def test_page_shows_an_answer_as_text_if_its_markdown_fails(server, page_for, llm):
    """A renderer failure (staged: the answer's text refuses the renderer's
    first step, its line ends made one) costs that answer its formatting,
    while it streams and once whole, not the page its drawing."""
    llm.script += [Reply("**BREAK-ME** first\nsecond"), Reply("The *next* one.")]
    page = page_for(server)
    page.evaluate("""() => { const replace = String.prototype.replace;
      String.prototype.replace = function (...args) {
        if (this.includes("BREAK-ME")) throw new Error("staged");
        return replace.apply(this, args); }; }""")
    send_in_page(page, "one")
    page.wait_for_selector(".done")
    plain = page.locator(".assistant .md p.plain")
    assert plain.inner_text() == "**BREAK-ME** first\nsecond"
    send_in_page(page, "two")
    page.wait_for_selector(".done >> nth=1")
    assert page.locator(".assistant").last.locator("em").inner_text() == "next"


def test_page_markdown_code_block_has_a_copy_button_and_long_output_folds(server, page_for, llm):
    page = page_for(server)
    llm.script.append(Reply("Here:\n\n```python\nprint('hi')\n```\n\n- one\n- two",
                            tools=[("bash", '{"command": "seq 1 100"}')]))
    send_in_page(page, "show me")
    page.wait_for_selector(".done")
    assert page.locator(".codeblock code").first.inner_text() == "print('hi')"
    assert page.locator(".codeblock .copy").count() >= 1
    assert page.locator(".assistant li").count() == 2
    out = page.locator(".tool pre.output")
    assert "folded" in out.get_attribute("class")
    page.locator(".tool button.link").click()
    assert "folded" not in out.get_attribute("class")


def test_page_draws_a_streaming_answer_piece_by_piece_as_its_whole_text_renders(
        server, page_for, llm):
    """While an answer streams, its settled blocks are drawn once and kept
    (bench/page_open.py --stream): mid-stream a code block with a blank line
    inside is still one block, and once the answer is whole its drawing is
    exactly what rendering the whole text gives."""
    text = ("First paragraph.\n\n```python\nx = 1\n\ny = 2\n```\n\n- one\n- two\n\n"
            + " ".join(f"w{i}" for i in range(80)) + "\n\nLast *words*.")
    llm.script.append(Reply(text, delay=0.03))
    page = page_for(server)
    send_in_page(page, "draw")
    page.wait_for_function("document.querySelector('.assistant.streaming .md')"
                           "?.textContent.includes('w40')")
    md = page.locator(".assistant.streaming .md")
    assert md.locator(".codeblock").count() == 1
    assert md.locator(".codeblock code").inner_text() == "x = 1\n\ny = 2"
    assert md.locator("li").count() == 2 and md.locator("p").first.inner_text() == "First paragraph."
    page.wait_for_selector(".done")
    same = page.evaluate("""async (text) => {
      const { renderMarkdown } = await import(new URL("static/markdown.js", document.baseURI));
      const fresh = document.createElement("div");
      fresh.append(renderMarkdown(text, { copy: "Copy", copied: "Copied" }));
      const drawn = document.querySelector(".assistant .md");
      return [drawn.innerHTML === fresh.innerHTML, drawn.children.length];
    }""", text)
    assert same == [True, 5]


def test_page_slash_commands(server, page_for):
    page = page_for(server)
    send_in_page(page, "say: hello")
    page.wait_for_selector(".done")
    send_in_page(page, "/stats")
    page.wait_for_selector(".notice.info")
    assert "1 run(s)" in page.locator(".notice.info").last.inner_text()
    send_in_page(page, "/history")
    assert "you: say: hello" in page.locator(".notice.info").last.inner_text()
    send_in_page(page, "/clear")
    page.wait_for_function("!location.search.includes('session=')")
    assert page.locator("#events > *").count() == 0


def test_page_shows_compaction_as_a_divider_and_the_context_meter(tmp_path, llm, page_for):
    llm.count_tokens = True
    server = ServerProcess(tmp_path, llm, extra_env={"AGENT_TOKEN_LIMIT": "2000"})
    try:
        page = page_for(server)
        assert page.locator("#context").inner_text() == "context not measured yet"
        for n in range(3):
            send_in_page(page, long_prompt(n))
            page.wait_for_selector(f".done >> nth={n}")
        page.wait_for_selector("details.compaction")
        sid = re.search(r"session=([\w-]+)", page.url).group(1)
        c = of(server.all_events(sid), "compaction")[0]
        line = page.locator("details.compaction summary").first.inner_text()
        assert line == (f"⟲ context compacted: {c['tokens_before']:,} → "
                        f"{c['tokens_after']:,} tokens")
        assert not page.locator("details.compaction .body").first.is_visible()
        page.locator("details.compaction summary").first.click()
        assert "SUMMARY: the user sent" in page.locator("details.compaction .body"
                                                        ).first.inner_text()
        # Everything the user saw is still there, above the divider too.
        assert page.locator(".user").count() == 3
        last = of(server.all_events(sid), "context")[-1]
        assert page.locator("#context").inner_text() == f"context {last['tokens']:,} / 2,000"
        send_in_page(page, "/stats")
        page.wait_for_selector(".notice.info")
        assert f"context {last['tokens']:,} / 2,000" in page.locator(".notice.info").last.inner_text()
        page.reload()                              # the same after a reload
        page.wait_for_selector("details.compaction")
        assert page.locator("#context").inner_text() == f"context {last['tokens']:,} / 2,000"
    finally:
        server.stop()


def test_page_lists_tools_and_the_sessions_background_commands(tmp_path, llm, page_for,
                                                                mcp_script):
    conf = tmp_path / "mcp.json"
    conf.write_text(json.dumps({"mcpServers": {
        "t": {"command": sys.executable, "args": [str(mcp_script)]},
        "broken": {"command": "no-such-mcp-server"}}}))
    llm.script += [Reply("Starting.", tools=[("bash", json.dumps(
        {"command": "echo from-the-background; sleep 30", "run_in_background": True}))]),
        Reply("Started.")]
    server = ServerProcess(tmp_path, llm, args=["--mcp-config", str(conf)])
    try:
        page = page_for(server)
        page.click("#tools-panel summary")
        tools = page.locator("#tools")
        page.wait_for_selector("#tools .tool-name")
        text = tools.inner_text()
        assert "built-in" in text and "mcp:t" in text and "lookup" in text
        assert "MCP broken (stdio): failed — cannot start no-such-mcp-server" in text
        assert "asks" in page.locator("#tools .tool-name", has_text="echo").first.get_attribute(
            "class")
        assert "asks" not in page.locator("#tools .tool-name", has_text="lookup"
                                          ).first.get_attribute("class")
        assert not page.locator("#background-panel").is_visible()
        send_in_page(page, "start it")
        page.wait_for_selector(".done")
        page.wait_for_selector("#background .job.running")
        page.wait_for_function("document.querySelector('#background').textContent"
                               ".includes('from-the-background')")
        assert "$ echo from-the-background; sleep 30" in page.locator("#background").inner_text()
        page.click("#new-session")
        page.wait_for_function("document.querySelector('#background-panel').hidden")
    finally:
        server.stop()


def test_page_tools_panel_shows_an_mcp_servers_new_tools_when_opened_again(
        tmp_path, llm, page_for):
    """The model calls a tool after which its MCP server offers others (and
    says so): the Tools panel, opened again, lists the new ones."""
    script = tmp_path / "changing.py"
    script.write_text(CHANGING_MCP_SERVER)
    conf = tmp_path / "mcp.json"
    conf.write_text(json.dumps({"mcpServers": {
        "c": {"command": sys.executable, "args": [str(script)]}}}))
    llm.script += [Reply("Unlocking.", tools=[("unlock", "{}")]), Reply("Done.")]
    server = ServerProcess(tmp_path, llm, args=["--mcp-config", str(conf)])
    try:
        page = page_for(server)
        page.click("#tools-panel summary")
        page.wait_for_selector("#tools .tool-name >> text=unlock")
        page.click("#tools-panel summary")                     # closed
        send_in_page(page, "unlock it")
        page.wait_for_selector(".done")
        page.click("#tools-panel summary")                     # opened again
        page.wait_for_selector("#tools .tool-name >> text=secret")
        assert page.locator("#tools .tool-name", has_text="unlock").count() == 0
    finally:
        server.stop()


def test_page_shows_what_a_file_tool_changed_as_a_coloured_diff(server, page_for, llm):
    (server.workspace / "notes.txt").write_text("keep\nold line\n" + "same\n" * 60)
    llm.script += [Reply("Editing.", tools=[
        ("edit_file", json.dumps({"path": "notes.txt", "old_str": "old line",
                                  "new_str": "<b>new</b> line"})),
        ("write_file", json.dumps({"path": "long.txt",
                                   "content": "".join(f"row {i}\n" for i in range(80))}))]),
        Reply("Done.")]
    page = page_for(server)
    send_in_page(page, "edit it")
    page.wait_for_selector(".done")
    first, second = page.locator("details.diff").all()
    assert first.get_attribute("open") is not None            # short: open
    assert first.locator(".del").inner_text() == "-old line"
    assert first.locator(".add").inner_text() == "+<b>new</b> line"     # text, not HTML
    assert first.locator("summary").inner_text() == "changes: +1 −1 (9 lines)"
    assert second.get_attribute("open") is None                # long: folded
    assert second.locator(".add").count() == 80


@both_stores
def test_the_session_list_comes_in_pages_newest_first(server, llm):
    """`?limit=N` gives the newest N and a `next` cursor; following it gives
    every session once, in the order of the whole list, ties of updated_at
    kept apart by id; with `q` too; without `limit`, the whole list."""
    sids = []
    for n in range(7):
        sids.append(server.chat(f"say: item {n}" + (" blue" if n % 2 else ""))["session_id"])
        server.wait_status(sids[-1])
    # Three sessions updated in the same instant: only their ids order them.
    server.sql("UPDATE sessions SET updated_at = 1000.5 WHERE id IN (?, ?, ?)", tuple(sids[1:4]))

    def pages(limit: int, q: str = "") -> tuple[list[str], int]:
        seen, after, count = [], None, 0
        while True:
            query = {"limit": limit, **({"q": q} if q else {}), **({"after": after} if after else {})}
            r = server.http("GET", "/agent/sessions?" + urllib.parse.urlencode(query))
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["sessions"]) <= limit
            seen += [s["session_id"] for s in body["sessions"]]
            count += 1
            if not body["next"]:
                return seen, count
            after = body["next"]

    whole = server.http("GET", "/agent/sessions").json()
    assert whole["next"] is None
    order = [s["session_id"] for s in whole["sessions"]]
    assert sorted(order) == sorted(sids)
    assert order[-3:] == sorted(sids[1:4])              # the oldest, by id among themselves
    for limit in (1, 2, 3, 7):
        assert pages(limit) == (order, -(-7 // limit))
    assert pages(100) == (order, 1)
    blue = [s["session_id"] for s in server.http("GET", "/agent/sessions?q=blue").json()["sessions"]]
    assert len(blue) == 3 and pages(2, "blue") == (blue, 2)


@both_stores
def test_sessions_are_renamed_searched_and_exported(server, llm):
    one = server.chat("say: the quick brown fox")["session_id"]
    server.wait_status(one)
    llm.script.append(Reply("Listing.", tools=[("bash", json.dumps({"command": "echo hi"}))]))
    two = server.chat("list things")["session_id"]
    server.wait_status(two)
    r = server.http("PATCH", f"/agent/sessions/{two}", {"title": "  My  listing  "})
    assert r.status_code == 200 and r.json()["title"] == "My listing"
    assert server.http("PATCH", f"/agent/sessions/{two}", {"title": ""}).status_code == 400
    assert server.http("PATCH", f"/agent/sessions/{two}", {"title": "x" * 201}).status_code == 400
    assert server.http("PATCH", f"/agent/sessions/{two}", {}).status_code == 400

    def found(q):
        r = server.http("GET", "/agent/sessions?q=" + urllib.parse.quote(q))
        assert r.status_code == 200
        return [s["session_id"] for s in r.json()["sessions"]]
    assert found("listing") == [two]                 # the new title
    assert found("BROWN") == [one]                   # a message's text, any case
    assert found("tool said") == [two]               # the agent's words too
    assert found("100%_") == [] and set(found("")) == {one, two}
    md = server.http("GET", f"/agent/sessions/{two}/export?format=md")
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert md.headers["content-disposition"] == 'attachment; filename="My-listing.md"'
    assert md.text.startswith("# My listing\n") and "## You\n\nlist things" in md.text
    assert "**Tool `bash`**\n\n```bash\necho hi\n```" in md.text
    js = server.http("GET", f"/agent/sessions/{two}/export?format=json")
    doc = js.json()
    assert doc["session"]["title"] == "My listing"
    assert [e["type"] for e in doc["events"]][:2] == ["message", "message"]
    assert not [e for e in doc["events"] if e["type"] in ("delta", "tool_output")]
    assert server.http("GET", f"/agent/sessions/{two}/export?format=pdf").status_code == 400
    assert server.http("GET", f"/agent/sessions/{two}/export", token=False).status_code == 401


@both_stores
def test_a_search_says_where_in_each_session_its_text_is(server):
    """Each session a search finds says where: its newest message holding
    the text (seq, role, message_id) and the words around it, the text as
    written; a session found by its title alone says nothing."""
    one = server.chat("say: the quick  Brown fox\njumps")["session_id"]
    server.wait_status(one)
    two = server.chat("say: " + "long " * 30 + "brown at last")["session_id"]
    server.wait_status(two)
    server.http("PATCH", f"/agent/sessions/{two}", {"title": "A brownish title"})
    three = server.chat("say: nothing here")["session_id"]
    server.wait_status(three)
    server.http("PATCH", f"/agent/sessions/{three}", {"title": "brown in the title"})

    def search(q):
        r = server.http("GET", "/agent/sessions?limit=10&q=" + urllib.parse.quote(q))
        assert r.status_code == 200
        return {s["session_id"]: s["found"] for s in r.json()["sessions"]}
    got = search("brown")
    assert set(got) == {one, two, three} and got[three] is None
    answer = [e for e in server.history(one)["events"]
              if e["type"] == "message" and e["role"] == "assistant"][-1]
    assert got[one] == {"seq": answer["seq"], "role": "assistant",
                        "message_id": answer["message_id"],
                        "before": "the quick ", "text": "Brown", "after": " fox jumps"}
    assert got[two]["role"] == "assistant" and got[two]["text"] == "brown"
    assert got[two]["before"].startswith("…") and got[two]["before"].endswith("long ")
    assert got[two]["after"] == " at last"
    asked = search("SAY: THE")[one]                  # the user's own message, any case
    assert asked["role"] == "user" and asked["seq"] == 1 and asked["text"] == "say: the"
    assert "found" not in server.http("GET", "/agent/sessions?limit=10").json()["sessions"][0]
    assert "found" not in server.http("GET", "/agent/sessions?q=brown").json()["sessions"][0]


def test_session_search_reads_the_messages_index_not_every_event(tmp_path):
    """The search looks at each session's messages through their own index
    (a text in no message would otherwise read every delta of every
    session), finds what it found before, and a database made before the
    index gets it at start-up."""
    import agent_web as web

    class Recording:                       # the statements list_sessions runs
        def __init__(self, conn):
            self.conn, self.statements = conn, []

        def execute(self, sql, params=()):
            self.statements.append((sql, params))
            return self.conn.execute(sql, params)

    async def go(fill: bool):
        store = web.Store(tmp_path / "a.db")
        await store.open()
        for sid, said, streamed in [("s1", "Fix the Build", "compiler"),
                                    ("s2", "write docs", "build log"),
                                    ("s3", "100% done", "")] if fill else ():
            await store.write(web.Store.create_session, sid, "auto")
            await store.write(web.Store.append, [
                (sid, {"type": "message", "role": "user", "ts": 1.0, "content": said}),
                (sid, {"type": "delta", "message_id": "m", "channel": "text",
                       "content": streamed + " zebra", "ts": 1.0}),
                (sid, {"type": "message", "role": "assistant", "message_id": "m",
                       "ts": 1.0, "content": f"{streamed}."})])

        def search(conn, text):
            rec = Recording(conn)
            found = [s["session_id"] for s in web.Store.list_sessions(rec, text)]
            (sql, params), = rec.statements
            plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql,
                                                              params))
            return found, plan
        got = {q: await store.read(search, q) for q in ("build", "COMPILER", "%", "zebra")}
        store.close()
        return got

    got = arun(go(fill=True))
    assert {q: sorted(found) for q, (found, _) in got.items()} == {
        "build": ["s1", "s2"], "COMPILER": ["s1"], "%": ["s3"], "zebra": []}
    for _, plan in got.values():
        assert "SEARCH events USING INDEX events_message_text" in plan, plan
        assert plan.count("events USING PRIMARY KEY") == 1, plan    # the newest seq alone

    db = sqlite3.connect(tmp_path / "a.db")             # as a database made before it
    db.execute("DROP INDEX events_message_text")
    db.commit()
    db.close()
    again = arun(go(fill=False))
    assert {q: found for q, (found, _) in again.items()} == {q: found for q, (found, _) in got.items()}
    assert "SEARCH events USING INDEX events_message_text" in again["build"][1]


def test_page_renames_searches_and_offers_downloads(server, page_for):
    page = page_for(server)
    send_in_page(page, "say: alpha centauri")
    page.wait_for_selector(".done")
    page.click("#new-session")
    send_in_page(page, "say: beta")
    page.wait_for_selector(".done")
    page.wait_for_function("document.querySelectorAll('#sessions li').length === 2")
    page.locator("#sessions li.current button.rename").click()
    page.fill("#sessions li.current .rename-field", "Renamed beta")
    page.press("#sessions li.current .rename-field", "Enter")
    page.wait_for_selector("#sessions li a:text('Renamed beta')")
    page.fill("#session-search", "centauri")
    page.wait_for_function("document.querySelectorAll('#sessions li').length === 1")
    assert "alpha" in page.locator("#sessions li a").inner_text()
    href = page.locator("#export-md").get_attribute("href")
    assert page.locator("#export-md").is_visible() and href.endswith("/export?format=md")
    with page.expect_download() as info:
        page.click("#export-md")
    assert info.value.suggested_filename == "Renamed-beta.md"


def test_page_theme_follows_the_system_and_the_users_choice_is_remembered(server, page_for):
    page = page_for(server)
    bg = "getComputedStyle(document.body).backgroundColor"
    page.emulate_media(color_scheme="dark")
    assert page.evaluate(bg) == "rgb(22, 24, 28)"                 # the system's dark
    page.emulate_media(color_scheme="light")
    assert page.evaluate(bg) == "rgb(255, 255, 255)"
    page.click("#theme")                                          # auto -> dark
    assert page.evaluate(bg) == "rgb(22, 24, 28)"
    page.emulate_media(color_scheme="dark")
    page.click("#theme")                                          # dark -> light, system dark
    assert page.evaluate(bg) == "rgb(255, 255, 255)"
    page.reload()
    page.wait_for_selector("#conn.live")
    assert page.evaluate(bg) == "rgb(255, 255, 255)"              # remembered
    page.click("#theme")                                          # light -> the system's
    assert page.evaluate(bg) == "rgb(22, 24, 28)"


def test_page_colours_code_without_markup_and_has_keyboard_shortcuts(server, page_for, llm):
    llm.script.append(Reply("Here:\n\n```python\ndef f():\n    return '<img src=x "
                            "onerror=alert(1)>'  # done\n```\n"))
    page = page_for(server)
    page.evaluate("window.copied = []; navigator.clipboard.writeText = async (t) => "
                  "{ window.copied.push(t); }; 0")      # (a function would be called)
    send_in_page(page, "code please")
    page.wait_for_selector(".done")
    code = page.locator(".codeblock code")
    assert code.locator(".tok-keyword").all_inner_texts() == ["def", "return"]
    assert code.locator(".tok-string").inner_text() == "'<img src=x onerror=alert(1)>'"
    assert code.locator(".tok-comment").inner_text() == "# done"
    assert page.locator(".codeblock img").count() == 0
    page.locator("body").click()
    page.keyboard.press("Control+Shift+Semicolon")
    page.wait_for_function("window.copied.length === 1")
    assert page.evaluate("window.copied[0]").startswith("def f():")
    page.click(".msg-actions .copy_answer")             # the run's answer, as Markdown
    page.wait_for_function("window.copied.length === 2")
    assert page.evaluate("window.copied[1]") == ("Here:\n\n```python\ndef f():\n    return "
                                                 "'<img src=x onerror=alert(1)>'  # done\n```\n")
    assert page.locator(".notice.info").last.inner_text() == "Copied the answer, as Markdown."
    page.keyboard.press("Shift+Escape")
    assert page.evaluate("document.activeElement.id") == "input"
    page.locator("body").click()
    page.keyboard.press("Control+Shift+KeyO")
    page.wait_for_function("!location.search.includes('session=')")
    send_in_page(page, "/help")
    assert "Ctrl+Shift+O new session" in page.locator(".notice.info").last.inner_text()


def test_page_tells_a_hidden_tab_that_a_run_ended_or_waits(server, page_for, llm):
    page = page_for(server)
    send_in_page(page, "say: first")          # the session exists: what follows is pushed
    page.wait_for_selector(".done")
    page.evaluate("""() => {
        window.shown = [];
        window.Notification = class { constructor(title, opts) { window.shown.push(opts.body); }
            static requestPermission() { return Promise.resolve("granted"); } };
        window.Notification.permission = "granted";
        window.hiddenNow = false;
        Object.defineProperty(document, "hidden", { get: () => window.hiddenNow });
    }""")
    assert page.locator("#notify").inner_text() == "🔕"          # off by default
    page.click("#notify")
    assert page.locator("#notify").get_attribute("aria-pressed") == "true"
    send_in_page(page, "slow")                           # three seconds of streaming
    page.evaluate("window.hiddenNow = true")             # the user switched tabs
    page.wait_for_function("window.shown.length === 1")
    assert page.evaluate("window.shown") == ["The run finished: done"]
    assert page.title().startswith("● The run finished")
    page.evaluate("window.hiddenNow = false; document.dispatchEvent(new Event('visibilitychange'))")
    page.wait_for_function("!document.title.startsWith('●')")
    page.click("#notify")                                         # off again: no notification
    page.evaluate("window.hiddenNow = true")
    send_in_page(page, "say: again")
    page.wait_for_function("document.title.startsWith('●')")      # the title still flashes
    assert page.evaluate("window.shown") == ["The run finished: done"]


@both_stores
def test_a_session_forks_before_a_message_and_the_original_is_untouched(server, llm):
    sid = server.chat("say: first")["session_id"]
    server.wait_status(sid)
    server.chat("say: second", sid)
    server.wait_status(sid)
    original = server.all_events(sid)
    second = [e for e in original if e["type"] == "message" and e["role"] == "user"][1]
    r = server.http("POST", f"/agent/sessions/{sid}/fork", {"before_seq": second["seq"]})
    assert r.status_code == 201, r.text
    fork = r.json()
    assert fork["session_id"] != sid and fork["title"] == "say: first (edited)"
    events = server.all_events(fork["session_id"])
    copied, marker = events[:-1], events[-1]
    assert [(e["seq"], e["type"], e.get("content")) for e in copied] == [
        (e["seq"], e["type"], e.get("content")) for e in original if e["seq"] < second["seq"]]
    assert {e["session_id"] for e in events} == {fork["session_id"]}
    assert marker == {**marker, "type": "forked", "from_session": sid, "seq": second["seq"],
                      "before_seq": second["seq"], "from_title": "say: first"}
    assert server.all_events(sid) == original                     # untouched
    server.chat("say: instead", fork["session_id"])              # the fork goes on
    h = server.wait_status(fork["session_id"])
    assert of(h["events"], "message")[-1]["content"] == "instead"
    assert "first" in json.dumps(llm.requests[-1]["messages"])
    assert "second" not in json.dumps(llm.requests[-1]["messages"])
    for bad in (0, original[-1]["seq"] + 2, "3", True):
        assert server.http("POST", f"/agent/sessions/{sid}/fork",
                           {"before_seq": bad}).status_code == 400
    assert server.http("POST", "/agent/sessions/s_nope/fork",
                       {"before_seq": 1}).status_code == 404


def test_page_edit_and_regenerate_fork_the_session(server, page_for):
    page = page_for(server)
    send_in_page(page, "say: one")
    page.wait_for_selector(".done")
    send_in_page(page, "say: two")
    page.wait_for_selector(".done >> nth=1")
    first_sid = re.search(r"session=([\w-]+)", page.url).group(1)
    page.locator(".msg-actions .edit").nth(1).click()        # edit "say: two"
    page.wait_for_selector(".forked")
    assert re.search(r"session=([\w-]+)", page.url).group(1) != first_sid
    assert page.input_value("#input") == "say: two"
    assert page.locator(".user").count() == 1                # only what came before it
    assert "Edited copy of say: one" in page.locator(".forked").inner_text()
    page.fill("#input", "say: deux")
    page.press("#input", "Enter")
    page.wait_for_selector(".done >> nth=1")                 # the copy's, then its own
    assert page.locator(".assistant").last.inner_text().strip() == "deux"
    edited = page.evaluate("location.search")
    page.locator(".msg-actions .regenerate").last.click()    # regenerate that answer
    page.wait_for_function(f"location.search !== {json.dumps(edited)}")
    page.wait_for_function("document.querySelectorAll('.done').length === 2 && "
                           "document.querySelectorAll('.user').length === 2")
    assert page.locator(".user").all_inner_texts() == ["say: one", "say: deux"]
    assert page.locator(".forked").count() == 2               # its whole lineage
    page.locator(".forked a").last.click()                    # back to where it came from
    page.wait_for_function(f"location.search === {json.dumps(edited)}")


def test_workspace_files_are_listed_downloaded_and_uploaded_inside_it_only(server, tmp_path):
    ws = server.workspace
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "app.py").write_text("print('hi')\n")
    (ws / "big.bin").write_bytes(os.urandom(3 << 20))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP-SECRET-CONTENT")
    (ws / "link-out").symlink_to(outside)
    (ws / "file-link").symlink_to(outside / "secret.txt")
    r = server.http("GET", "/agent/files")
    assert r.status_code == 200
    entries = {e["name"]: e for e in r.json()["entries"]}
    assert entries["src"]["type"] == "dir" and entries["big.bin"]["size"] == 3 << 20
    assert entries["link-out"]["type"] == "symlink"
    assert [e["name"] for e in server.http("GET", "/agent/files?path=src").json()["entries"]] \
        == ["app.py"]
    got = server.http("GET", "/agent/files/raw?path=big.bin")
    assert got.status_code == 200 and got.content == (ws / "big.bin").read_bytes()
    assert got.headers["content-disposition"] == "attachment; filename*=UTF-8''big.bin"
    for bad in ("../outside/secret.txt", "link-out/secret.txt", "file-link", str(outside)):
        r = server.http("GET", "/agent/files/raw?path=" + urllib.parse.quote(bad))
        assert r.status_code in (403, 404) and b"TOP-SECRET" not in r.content, bad
    assert server.http("GET", "/agent/files?path=link-out").status_code == 403
    assert server.http("GET", "/agent/files?path=nope").status_code == 404
    assert server.http("GET", "/agent/files/raw?path=src").status_code == 400
    data = os.urandom(5 << 20)
    r = server.http("PUT", "/agent/files/raw?path=up/loaded.bin", raw=data,
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201 and r.json()["size"] == len(data)
    assert (ws / "up" / "loaded.bin").read_bytes() == data
    assert server.http("PUT", "/agent/files/raw?path=link-out/x", raw=b"x").status_code == 403
    assert not (outside / "x").exists()
    too_big = server.http("PUT", "/agent/files/raw?path=huge.bin", raw=b"0" * ((25 << 20) + 1))
    assert too_big.status_code == 413 and not (ws / "huge.bin").exists()
    assert not [p for p in ws.rglob("*.upload")]               # no half-written leftovers
    assert server.http("GET", "/agent/files", token=False).status_code == 401
    assert server.http("PUT", "/agent/files/raw?path=a", raw=b"x",
                       headers={"origin": "https://evil.example"}).status_code == 403
    # A folder of thousands: the first 1,000, folders first, and how many more.
    many = ws / "many"
    (many / "zsub").mkdir(parents=True)
    for n in range(1204):
        (many / f"f{n:04d}").write_bytes(b"")
    listed = server.http("GET", "/agent/files?path=many").json()
    assert len(listed["entries"]) == 1000 and listed["more"] == 205
    assert [e["name"] for e in listed["entries"][:2]] == ["zsub", "f0000"]
    assert server.http("GET", "/agent/files?path=src").json()["more"] == 0


def test_page_file_panel_browses_downloads_uploads_and_takes_drops(server, page_for, llm,
                                                                    tmp_path):
    ws = server.workspace
    (ws / "docs").mkdir(parents=True, exist_ok=True)
    (ws / "docs" / "readme.md").write_text("# hello\n")
    llm.script += [Reply("Writing.", tools=[("write_file", json.dumps(
        {"path": "docs/out.txt", "content": "made by the agent"}))]), Reply("Done.")]
    page = page_for(server)
    page.click("#files-panel summary")
    page.wait_for_selector("#files li button:text('📁 docs')")
    page.click("#files li button:text('📁 docs')")
    page.wait_for_selector("#files li a:text('readme.md')")
    assert page.locator("#files-path").inner_text() == "/docs"
    with page.expect_download() as info:
        page.click("#files li a:text('readme.md')")
    assert Path(info.value.path()).read_text() == "# hello\n"
    upload = tmp_path / "notes from me.txt"
    upload.write_text("uploaded by the button")
    page.set_input_files("#files-input", str(upload))
    page.wait_for_selector("#files li a:text('notes from me.txt')")
    assert (ws / "docs" / "notes from me.txt").read_text() == "uploaded by the button"
    page.evaluate("""() => {
        const data = new DataTransfer();
        data.items.add(new File(["dropped on the composer"], "dropped.txt"));
        const box = document.getElementById("composer");
        box.dispatchEvent(new DragEvent("dragover", { dataTransfer: data, bubbles: true }));
        box.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true }));
    }""")
    page.wait_for_selector("#files li a:text('dropped.txt')")
    assert (ws / "docs" / "dropped.txt").read_text() == "dropped on the composer"
    send_in_page(page, "write a file")
    page.wait_for_selector(".done")
    link = page.locator(".tool .file-link")
    assert link.inner_text() == "⬇ docs/out.txt"
    with page.expect_download() as info:
        link.click()
    assert Path(info.value.path()).read_text() == "made by the agent"
    # A folder of more than 1,000 entries says how many it does not list.
    (ws / "many").mkdir()
    for n in range(1003):
        (ws / "many" / f"f{n:04d}").write_bytes(b"")
    page.click("#files-up")
    page.click("#files li button:text('📁 many')")
    page.wait_for_selector("#files li.more")
    assert page.locator("#files li").count() == 1001
    assert page.locator("#files li.more").inner_text().startswith("… and 3 more")


@both_stores
def test_a_message_queued_during_a_run_reaches_the_model_at_its_next_step(server, llm):
    sid = server.chat("run: sleep 1; echo slept")["session_id"]
    server.wait_event(sid, "tool_call")
    assert server.http("POST", "/agent/chat", {"message": "say: too", "session_id": sid}
                       ).status_code == 409                      # without queue: as before
    r = server.http("POST", "/agent/chat", {"message": "say: also this", "session_id": sid,
                                            "queue": True})
    assert r.status_code == 202 and r.json()["queued"]
    queued = server.wait_event(sid, "queued")                     # stored at once
    assert queued["content"] == "say: also this"
    h = server.wait_status(sid)
    events = h["events"]
    delivered = [e for e in events if e["type"] == "message" and e.get("queued_id")]
    assert [e["queued_id"] for e in delivered] == [queued["message_id"]]
    kinds = [e["type"] for e in events]
    assert kinds.index("tool_result") < events.index(delivered[0])   # after the results
    assert len(of(events, "done")) == 1                           # the same run took it
    assert of(events, "message")[-1]["content"] == "also this"
    assert anthropic_problems(llm.requests[-1]) == []


@both_stores
def test_queued_messages_start_the_next_run_or_wait_after_stop_and_restart(server, llm):
    sid = server.chat("slow")["session_id"]
    server.wait_event(sid, "delta")
    server.chat("say: next one", sid, queue=True)                # the run ends first
    deadline = time.time() + 20
    while len(of(server.history(sid)["events"], "done")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    events = server.history(sid)["events"]
    assert [e["status"] for e in of(events, "done")] == ["done", "done"]
    assert of(events, "message")[-1]["content"] == "next one"
    # Stop with a message queued: it stays queued, across a restart too.
    server.chat("slow", sid)
    server.wait_event(sid, "delta", count=len(of(events, "delta")) + 1)
    kept = server.http("POST", "/agent/chat", {"message": "say: kept", "session_id": sid,
                                               "queue": True}).json()
    dropped = server.http("POST", "/agent/chat", {"message": "say: dropped",
                                                  "session_id": sid, "queue": True}).json()
    assert server.http("DELETE", f"/agent/sessions/{sid}/queue/{dropped['message_id']}"
                       ).status_code == 204
    assert server.http("DELETE", f"/agent/sessions/{sid}/queue/{dropped['message_id']}"
                       ).status_code == 409
    server.http("POST", "/agent/cancel", {"session_id": sid})
    server.wait_status(sid)
    server.stop()
    server.start()
    events = server.history(sid)["events"]
    assert of(events, "done")[-1]["status"] == "cancelled"
    assert not [e for e in events if e.get("queued_id") == kept["message_id"]]
    server.chat("say: and now", sid)                              # delivers "kept" first
    h = server.wait_status(sid)
    users = [e["content"] for e in of(h["events"], "message") if e["role"] == "user"]
    assert users[-2:] == ["say: kept", "say: and now"] and "say: dropped" not in users


class InProcess:
    """An app driven in its own event loop through httpx's ASGI transport,
    for tests that hold the store at a racing moment (use `async with`)."""

    def __init__(self, app):
        self.app = app
        self.h = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                        base_url="http://127.0.0.1", timeout=30)

    async def __aenter__(self) -> "InProcess":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.app.stop()
        await self.client.aclose()

    def post(self, path: str, body: dict):
        return self.client.post(path, json=body, headers=self.h)

    async def events(self, sid: str) -> dict:
        return (await self.client.get(f"/agent/chat?session_id={sid}&limit=5000",
                                      headers=self.h)).json()

    async def idle(self, sid: str) -> None:
        while (await self.events(sid))["status"] != "idle":
            await asyncio.sleep(0.02)

    async def left_queued(self, text: str) -> tuple[str, str]:
        """A session whose run was stopped with `text` left queued (no run
        goes): its id and the queued message's."""
        sid = (await self.post("/agent/chat", {"message": "run: sleep 5"})).json()["session_id"]
        while not of((await self.events(sid))["events"], "tool_call"):
            await asyncio.sleep(0.02)
        mid = (await self.post("/agent/chat", {"message": text, "session_id": sid,
                                               "queue": True})).json()["message_id"]
        await self.post("/agent/cancel", {"session_id": sid})
        await self.idle(sid)                          # stopped: the message waits
        return sid, mid


@pytest.mark.parametrize("paused", ["the drop's read", "the drop's commit"])
def test_a_drop_racing_the_next_run_either_drops_the_message_or_says_it_was_read(
        tmp_path, llm, paused):
    """A message left queued by a Stop, dropped while the next message starts
    a run that delivers it: never both.  The drop's look at the store is
    held until the new run has delivered the message (the drop then says
    409: read), or the drop's `unqueued` is held uncommitted while the new
    run looks (the run then waits for it and does not deliver the message)."""
    import agent_web as web

    async def scenario():
        app = web.create_app(db_path=tmp_path / "a.db", workspace=tmp_path / "ws", token=TOKEN,
                             llm_config=cfg_for(llm), approve="auto")
        gate, looked, held = asyncio.Event(), asyncio.Event(), asyncio.Event()
        holding = {"read": False, "commit": False, "run's look": False}

        async def read(fn, *args):
            result = await real_read(fn, *args)
            if fn is web.Store.queue_events:
                if holding["read"]:                       # the drop's look, then held
                    holding["read"] = False
                    looked.set()
                    await gate.wait()
                elif holding["run's look"]:               # the new run's look
                    looked.set()
            return result

        async def write(fn, *args):
            if (fn is web.Store.append and holding["commit"]
                    and any(ev["type"] == "unqueued" for _, ev in args[0])):
                held.set()
                await gate.wait()
            return await real_write(fn, *args)

        async with InProcess(app) as it:
            sid, mid = await it.left_queued("say: queued")
            real_read, real_write = app.store.read, app.store.write
            app.store.read, app.store.write = read, write

            holding["read" if paused == "the drop's read" else "commit"] = True
            drop = asyncio.ensure_future(it.client.delete(f"/agent/sessions/{sid}/queue/{mid}",
                                                          headers=it.h))
            if paused == "the drop's read":
                await looked.wait()                       # the drop saw it queued ...
                posted = await it.post("/agent/chat", {"message": "say: next",
                                                       "session_id": sid})
                gate.set()                                # ... and goes on after the run began
            else:
                await held.wait()                         # `unqueued` is queued, not committed
                holding["run's look"] = True
                post = asyncio.ensure_future(it.post("/agent/chat", {"message": "say: next",
                                                                     "session_id": sid}))
                await looked.wait()                       # the new run looked at the store
                holding["commit"] = False
                gate.set()
                posted = await post
            dropped = await drop
            await it.idle(sid)
            final = (await it.events(sid))["events"]
            return mid, posted, dropped, final

    mid, posted, dropped, final = arun(scenario())
    assert posted.status_code == 202
    read = [e for e in of(final, "message") if e.get("queued_id") == mid]
    unqueued = [e for e in of(final, "unqueued") if e["message_id"] == mid]
    if paused == "the drop's read":
        assert dropped.status_code == 409 and read and not unqueued
    else:
        assert dropped.status_code == 204 and unqueued and not read
    users = [e["content"] for e in of(final, "message") if e["role"] == "user"]
    assert users[-1] == "say: next"


def test_a_runs_start_reads_the_conversation_off_the_event_loop(tmp_path, llm, monkeypatch):
    """Rebuilding the model's view of a session is a pass over every event
    (~10 ms at 10,000), so it is done on the reader thread beside the read,
    never on the loop every other session's stream goes through."""
    import agent_web as web
    calls: list[bool] = []                    # True: called on a running event loop
    real = core.history_from_events

    def history_from_events(events, measure=None):
        calls.append(asyncio._get_running_loop() is not None)
        return real(events, measure)
    monkeypatch.setattr(core, "history_from_events", history_from_events)
    llm.script.append(Reply("First.", tools=[("bash", '{"command": "echo one"}')]))
    llm.script.append(Reply("Second."))
    llm.script.append(Reply("Third, with the first turn in view."))

    async def scenario():
        app = web.create_app(db_path=tmp_path / "a.db", workspace=tmp_path / "ws", token=TOKEN,
                             llm_config=cfg_for(llm), approve="auto")
        async with InProcess(app) as it:
            sid = (await it.post("/agent/chat", {"message": "go"})).json()["session_id"]
            await it.idle(sid)
            await it.post("/agent/chat", {"message": "again", "session_id": sid})
            await it.idle(sid)
            return (await it.events(sid))["events"]
    events = arun(scenario())
    assert [e["status"] for e in of(events, "done")] == ["done", "done"]
    assert "echo one" in json.dumps(llm.requests[-1])      # the model saw the whole session
    assert len(calls) >= 2 and not any(calls)


def test_page_queues_a_message_sent_during_a_run_and_stop_can_drop_it(server, page_for, llm):
    llm.script += [Reply("Sleeping.", tools=[("bash", json.dumps({"command": "sleep 1.5"}))])]
    page = page_for(server)
    send_in_page(page, "nap")
    page.wait_for_selector(".tool.running")
    send_in_page(page, "say: steer")                    # Enter during the run: queued
    page.wait_for_selector(".user.queued")
    assert "queued" in page.locator(".user.queued").inner_text()
    page.wait_for_selector(".done")
    page.wait_for_selector(".user.queued", state="detached")
    users = page.locator(".user:not(.queued)").all_inner_texts()
    assert users == ["nap", "say: steer"]
    assert page.locator(".assistant").last.inner_text().strip() == "steer"
    # One run: its steps go on counting past the message it read midway.
    steps = [re.match(r"\S+ (\d+)", s)[1] for s in page.locator(".step").all_inner_texts()]
    assert steps == ["1", "2"] and "2 step(s)" in page.locator(".done").inner_text()
    # Stop keeps what is queued (the dialog's answer), ✕ drops one.
    send_in_page(page, "slow")
    page.wait_for_selector(".assistant.streaming")
    send_in_page(page, "say: later")
    send_in_page(page, "say: never")
    page.wait_for_function("document.querySelectorAll('.user.queued').length === 2")
    page.locator(".user.queued", has_text="say: never").locator("button.drop").click()
    page.wait_for_function("document.querySelectorAll('.user.queued').length === 1")
    page.click("#send")                                 # Stop; "keep them?" -> yes
    page.wait_for_selector(".done.status-cancelled")
    assert page.locator(".user.queued").inner_text().startswith("say: later")
    page.reload()                                       # still queued after a reload
    page.wait_for_selector(".user.queued")
    send_in_page(page, "say: now")
    page.wait_for_selector(".done >> nth=2")
    page.wait_for_selector(".user.queued", state="detached")
    users = page.locator(".user:not(.queued)").all_inner_texts()
    assert users[-2:] == ["say: later", "say: now"] and "say: never" not in users


def test_page_sessions_switch_and_delete(server, page_for):
    page = page_for(server)
    send_in_page(page, "say: alpha")
    page.wait_for_selector(".done")
    page.click("#new-session")
    send_in_page(page, "say: beta")
    page.wait_for_selector(".done")
    page.wait_for_function("document.querySelectorAll('#sessions li').length === 2")
    page.locator("#sessions li a", has_text="say: alpha").click()
    page.wait_for_function("document.querySelector('.user')?.textContent === 'say: alpha'")
    page.locator("#sessions li.current button.delete").click()
    page.wait_for_function("document.querySelectorAll('#sessions li').length === 1")
    assert page.locator("#events > *").count() == 0


def test_page_on_a_phone_the_sessions_drawer_starts_closed_and_closes_on_a_pick(server,
                                                                                 page_for):
    page = page_for(server)
    send_in_page(page, "say: on a phone")
    page.wait_for_selector(".done")
    page.set_viewport_size({"width": 400, "height": 760})
    page.reload()
    page.wait_for_selector("#conn.live")
    assert page.locator("#sidebar").is_hidden()          # the transcript gets the screen
    for part in ("#approve-mode", "#conn"):              # the top bar wraps, not cut off
        box = page.locator(part).bounding_box()
        assert box["x"] + box["width"] <= 400, part
    page.click("#toggle-sidebar")
    page.locator("#sessions li a", has_text="say: on a phone").click()
    page.wait_for_function("document.querySelector('.user')?.textContent === 'say: on a phone'")
    assert page.locator("#sidebar").is_hidden()
    page.set_viewport_size({"width": 1200, "height": 800})
    page.click("#toggle-sidebar")                        # a wide screen keeps it open
    page.locator("#new-session").click()
    assert page.locator("#sidebar").is_visible()


def test_page_retries_share_one_line_then_the_answer_comes(server, page_for, llm):
    llm.script.extend([Reply(status=503, body=b'{"error": {"message": "busy"}}')] * 3
                      + [Reply("Recovered after retries.")])
    page = page_for(server)
    send_in_page(page, "flaky")
    page.wait_for_selector(".done")
    retries = page.locator(".notice.retry")
    assert retries.count() == 1 and "try 4 of 5" in retries.inner_text()
    assert "Recovered after retries." in page.locator(".assistant").inner_text()
    page.reload()                                   # the same from the stored events
    page.wait_for_selector(".done")
    assert page.locator(".notice.retry").count() == 1


def test_page_a_run_that_gives_up_says_why_once(server, page_for, llm):
    llm.script.extend([Reply(status=503, body=b'{"error": {"message": "overloaded"}}')] * 5)
    page = page_for(server)
    send_in_page(page, "flaky")
    page.wait_for_selector(".done")
    assert page.locator(".notice.retry").count() == 1
    error = page.locator(".notice.error").inner_text()
    assert "overloaded" in error and "gave up after 5 tries" in error
    done = page.locator(".done").inner_text()
    assert done.startswith("error") and "overloaded" not in done     # said once, above
    assert page.locator(".assistant").count() == 0                   # no empty cut message


def test_page_shows_a_commands_output_while_it_runs_and_after_a_reload(server, page_for, llm):
    llm.script.append(Reply("Counting.", tools=[("bash", json.dumps(
        {"command": "for i in 1 2 3 4 5 6; do echo live$i; sleep 0.4; done"}))]))
    page = page_for(server)
    send_in_page(page, "count slowly")
    page.wait_for_selector(".tool.running pre.live >> text=live2")
    assert page.locator(".done").count() == 0           # still running
    page.reload()                                       # the output so far is stored
    page.wait_for_selector("#conn.live")
    page.wait_for_selector(".tool.running pre.live >> text=live1")
    page.wait_for_selector(".done", timeout=15000)
    assert page.locator("pre.live").count() == 0         # the result replaced it
    assert page.locator(".tool pre.output").inner_text().split() == [
        f"live{i}" for i in range(1, 7)]
    took = re.search(r" · (\d+\.\d) s$", page.locator(".done").inner_text())
    assert took and 2.4 <= float(took[1]) < 60           # the run's time, message to end
    steps = page.locator(".step").all_inner_texts()     # and each step's: its reply and tools
    first = re.fullmatch(r"Step 1 · (\d+\.\d) s", steps[0])
    assert first and 2.4 <= float(first[1]) <= float(took[1])
    assert len(steps) == 2 and re.fullmatch(r"Step 2 · (\d+ ms|\d+\.\d s)", steps[1])
    page.reload()                                       # a finished call: result only
    page.wait_for_selector(".done")
    assert page.locator("pre.live").count() == 0 and page.locator(".tool pre.output").count() == 1
    assert page.locator(".done").inner_text().endswith(f" · {took[1]} s")   # from stored ts
    assert page.locator(".step").all_inner_texts() == steps


TERMINAL_COMMAND = (
    r"printf '\033]0;a title\007\033[1;31mred\033[0m plain \033[38;5;33mblue\033[m\n'; "
    r"printf 'progress 10%%\rprogress 100%%\n'; printf 'spin|\b/\b-\bdone\n'; "
    r"printf '\033[3'; sleep 0.8; printf '2mgreen\033[0m\n'")


def test_page_shows_a_commands_colours_and_progress_as_a_terminal_would(server, page_for, llm):
    """A command's SGR colours become styled text, a "\\r" progress meter
    shows its last state, "\\b" takes back a character, other sequences go;
    live (with a sequence cut between two pieces of output) and in the result."""
    llm.script.append(Reply("Colours.", tools=[("bash", json.dumps(
        {"command": TERMINAL_COMMAND}))]))
    page = page_for(server)
    page.evaluate("window.copied = []; navigator.clipboard.writeText = async (t) => "
                  "{ window.copied.push(t); }; 0")
    send_in_page(page, "colours")
    live = page.locator(".tool.running pre.live")
    page.wait_for_selector(".tool.running pre.live >> text=spindone")
    assert "[3" not in live.inner_text() and "\x1b" not in live.inner_text()
    page.wait_for_selector(".done", timeout=15000)
    out = page.locator(".tool pre.output")
    assert out.inner_text() == "red plain blue\nprogress 100%\nspindone\ngreen\n"
    styles = page.evaluate("""() => Object.fromEntries(
      [...document.querySelectorAll(".tool pre.output span")].map((s) => {
        const c = getComputedStyle(s);
        return [s.textContent, [c.color, c.fontWeight]];
      }))""")
    assert styles == {"red": ["rgb(192, 28, 40)", "700"], "blue": ["rgb(0, 135, 255)", "400"],
                      "green": ["rgb(38, 133, 47)", "400"]}
    page.locator(".tool .output-box .copy").click()              # copies what is shown
    page.wait_for_function("window.copied.length === 1")
    assert page.evaluate("window.copied[0]") == "red plain blue\nprogress 100%\nspindone\ngreen\n"
    assert page.locator(".tool .output-box .copy").inner_text() == "Copied"
    # The model read the output as the command printed it, and so does the
    # JSON export; the Markdown export shows it as the terminal left it.
    sid = re.search(r"session=([\w-]+)", page.url).group(1)
    result, = of(server.all_events(sid), "tool_result")
    assert "\x1b[1;31mred" in result["output"] and "progress 10%\rprogress 100%" in result["output"]
    doc = server.http("GET", f"/agent/sessions/{sid}/export?format=json").json()
    assert of(doc["events"], "tool_result")[0]["output"] == result["output"]
    md = server.http("GET", f"/agent/sessions/{sid}/export?format=md").text
    shown = md.split("Result (ok):\n\n", 1)[1].split("\n\n", 1)[0]
    assert shown == "```\nred plain blue\nprogress 100%\nspindone\ngreen\n```"


def test_terminal_text_is_the_same_however_the_output_is_cut(server, page_for):
    """The page's terminal writer, fed each text whole and then one code unit
    at a time: the same text and the same styles (a sequence cut anywhere);
    and the Markdown export's plain-text rules give the same text."""
    samples = {
        "\x1b]0;t\x07\x1b[1;31mred\x1b[0m \x1b[38;5;33mblue\x1b[m\n": "red blue\n",
        "a\r\nb\rc\n": "a\nc\n",
        "\x1b]8;;https://example.com\x1b\\link\x1b]8;;\x1b\\ after": "link after",
        "\x1b[1m\x1b[7minv\x1b[27m bold\x1b[22m plain": "inv bold plain",
        "x\x1b[2Ky and half\rwhole\x1b[K": "whole",
        "\x1b[38;2;255;0;0mrgb\x1b[48;5;240mgrey\x1b[49;39m": "rgbgrey",
        "tab\there nul\x00 bell\x07 del\x7f|\b\b!": "tab\there nul bell de!",
        "\x1b[2Aup\x1b[?25lhidden cursor\x1b[?25h": "uphidden cursor",
        "\x1b[4;3;32munder\x1b[24;23;39m": "under",
        "c1\x85 controls\x9b gone": "c1 controls gone",
    }
    page = page_for(server)
    got = page.evaluate("""async (samples) => {
      const { TermWriter } = await import(new URL("static/terminal.js", document.baseURI));
      const runs = (pre) => {          // [text, style] with equal neighbours merged
        const out = [];
        for (const node of pre.childNodes) {
          const style = node.nodeType === 1 ? node.getAttribute("style") : "";
          if (out.length && out.at(-1)[1] === style) out.at(-1)[0] += node.textContent;
          else out.push([node.textContent, style]);
        }
        return out;
      };
      return samples.map((text) => {
        const whole = document.createElement("pre");
        new TermWriter(whole).write(text);
        const cut = document.createElement("pre");
        const writer = new TermWriter(cut);
        for (let i = 0; i < text.length; i++) writer.write(text[i]);
        return [whole.textContent, JSON.stringify(runs(whole)) === JSON.stringify(runs(cut)),
                runs(whole)];
      });
    }""", list(samples))
    for (text, shown), (whole, same, runs) in zip(samples.items(), got):
        assert whole == shown, (text, whole)
        assert same, (text, runs)
        assert core.terminal_text(text) == shown, text      # the Markdown export's rules
    styles = {text: style for text, style in got[0][2] + got[3][2] + got[5][2] + got[8][2]}
    assert styles["red"] == "color: var(--ansi-1); font-weight: bold;"
    assert styles["blue"] == "color: rgb(0, 135, 255);"
    assert styles["inv"] == "color: var(--code); background-color: var(--fg); font-weight: bold;"
    assert styles[" bold"] == "font-weight: bold;" and styles[" plain"] == ""
    assert styles["rgb"] == "color: rgb(255, 0, 0);"
    assert styles["grey"] == "color: rgb(255, 0, 0); background-color: rgb(88, 88, 88);"
    assert styles["under"] == "color: var(--ansi-2); font-style: italic; text-decoration: underline;"


def test_page_demo_banner_and_chinese_labels(tmp_path, page_for):
    demo = ServerProcess(tmp_path, None)
    try:
        page = page_for(demo, new_context=True, locale="zh-CN")
        assert "ANTHROPIC_API_KEY" in page.locator("#demo-banner").inner_text()
        assert page.locator("#model").inner_text().startswith("demo")
        assert page.locator("#send").inner_text() == "发送"
        send_in_page(page, "list the files")
        page.wait_for_selector(".done")
        assert page.locator(".tool .args").inner_text() == "$ ls -la"
    finally:
        demo.stop()


def test_page_without_token_says_how_to_sign_in(server, browser):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.base + "/")
    page.wait_for_selector("#auth-banner:not([hidden])")
    assert "token" in page.locator("#auth-banner").inner_text()
    context.close()


def test_page_reconnects_after_the_server_restarts(tmp_path, llm, page_for):
    server = ServerProcess(tmp_path, llm)
    try:
        page = page_for(server)
        send_in_page(page, "say: before")
        page.wait_for_selector(".done")
        port = server.port
        server.stop()
        page.wait_for_selector("#conn.down")
        server.args = ["--port", str(port)]            # the same address again
        server.start()
        page.wait_for_selector("#conn.live", timeout=20000)
        send_in_page(page, "say: after")
        page.wait_for_selector(".done >> nth=1")
        assert page.locator(".user").count() == 2
    finally:
        server.stop()


def test_page_lists_sessions_a_page_at_a_time(server, page_for, llm):
    """With 130 sessions the list shows the newest 100 and "More sessions";
    the rest come on a click; a new session's run redraws the newest as many
    as were shown, and the one it pushed out comes with "More sessions"."""
    now = time.time()
    server.sql("INSERT INTO sessions (id, title, status, created_at, updated_at) "
               "VALUES " + ", ".join(["(?, ?, 'idle', ?, ?)"] * 130),
               tuple(v for n in range(130) for v in (f"s_seed{n:03d}", f"seeded {n}",
                                                        now - 100 - n, now - 100 - n)))
    page = page_for(server)
    items = page.locator("#sessions li")
    assert items.count() == 100 and page.locator("#more-sessions").is_visible()
    assert items.first.inner_text().startswith("seeded 0")
    page.click("#more-sessions")
    page.wait_for_function("document.querySelectorAll('#sessions li').length === 130")
    assert page.locator("#more-sessions").is_hidden()
    assert items.last.inner_text().startswith("seeded 129")
    send_in_page(page, "say: new one")          # the newest 130 now: one more to come
    page.wait_for_selector(".done")
    page.wait_for_selector("#more-sessions:not([hidden])")
    assert items.count() == 130 and items.first.inner_text().startswith("say: new one")
    page.click("#more-sessions")
    page.wait_for_function("document.querySelectorAll('#sessions li').length === 131")
    assert items.last.inner_text().startswith("seeded 129")


def test_page_long_session_opens_newest_first_and_loads_earlier(server, page_for):
    sid = seed_long_session(server.db, 5000)
    page = page_for(server)
    started = time.monotonic()
    page.goto(f"{server.base}/?session={sid}")
    page.wait_for_selector("#load-earlier:not([hidden])")
    opened = time.monotonic() - started
    assert page.locator(".user").count() == 50          # only the newest 200 events
    assert page.locator(".user").last.inner_text() == "question 1249"
    page.click("#load-earlier")
    page.wait_for_function("document.querySelectorAll('.user').length === 100")
    assert page.locator(".user").first.inner_text() == "question 1150"
    print(f"5,000-event session opened in {opened:.2f} s")


def test_page_search_shows_where_the_text_is_and_opens_the_session_there(server, page_for):
    """A search result shows the words around its match, the match marked;
    opening it loads the events back to the matched message (older than the
    200 a session opens with), brings it into view and marks it."""
    sid = seed_long_session(server.db, 2000, {12: "where did the quasar <b>go</b>?"})
    page = page_for(server)
    page.fill("#session-search", "QUASAR")
    page.wait_for_selector("#sessions li .found mark")
    where = page.locator("#sessions li .found")
    assert where.inner_text() == "where did the quasar <b>go</b>?"
    assert page.locator("#sessions li .found mark").inner_text() == "quasar"
    assert page.locator("#sessions li .found b").count() == 0          # text, never markup
    page.click(f"#sessions li[data-session-id='{sid}'] a")
    page.wait_for_selector(".user.found-here")
    found = page.locator(".user.found-here")
    assert found.inner_text() == "where did the quasar <b>go</b>?"
    assert found.get_attribute("data-seq") == "49"                     # exchange 12's
    assert page.evaluate("""() => {
        const box = document.getElementById("transcript").getBoundingClientRect();
        const el = document.querySelector(".user.found-here").getBoundingClientRect();
        return el.top >= box.top && el.bottom <= box.bottom; }""")
    # Every event from 20 before the match to the newest (seq 29 on), no gap.
    assert page.locator(".user").first.inner_text() == "question 7"
    assert page.locator(".user").last.inner_text() == "question 499"
    assert page.locator(".user").count() == 493
    assert page.locator("#load-earlier").is_visible()


def seed_session(db_path: Path, sid: str, title: str, events: list[dict]) -> str:
    """Write a session straight into a database (created if new): `events`
    get seq, session_id and ts as the store would give them."""
    db = sqlite3.connect(db_path)
    db.executescript((HERE / "schema.sql").read_text())
    now = time.time()
    db.execute("INSERT INTO sessions (id, title, status, created_at, updated_at) "
               "VALUES (?, ?, 'idle', ?, ?)", (sid, title, now, now))
    db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", [
        (sid, seq, ev["type"], json.dumps({"seq": seq, "session_id": sid, "ts": now, **ev},
                                          separators=(",", ":")))
        for seq, ev in enumerate(events, 1)])
    db.commit()
    db.close()
    return sid


def seed_long_session(db_path: Path, n: int, said: dict[int, str] | None = None) -> str:
    """A session of n events, 4 per exchange (`said`: exchange -> what its
    user says instead of "question N")."""
    def exchange(i: int) -> list[dict]:
        return [{"type": "message", "role": "user", "content": (said or {}).get(i, f"question {i}"),
                 "message_id": f"u{i}"},
                {"type": "delta", "message_id": f"a{i}", "channel": "text", "content": f"answer {i}"},
                {"type": "message", "role": "assistant", "content": f"answer {i}", "message_id": f"a{i}"},
                {"type": "done", "status": "done", "summary": "", "steps": 1,
                 "usage": {"input_tokens": 1, "output_tokens": 1}}]
    events = [ev for i in range((n + 3) // 4) for ev in exchange(i)][:n]
    return seed_session(db_path, "s_long", "long session", events)


# -- approvals in the page ----------------------------------------------------------

def test_page_shows_the_call_it_asks_about_with_its_hidden_characters(asking, page_for, llm):
    """A command holding a right-to-left override, an escape and a "\r" is
    shown with them made visible, in its card and in the approval bar: it
    cannot show itself as another command."""
    command = "echo fine \u202e; rm -rf ~/nothing-here #\x1b[2K\r"
    llm.script += [Reply("Running it.", tools=[("bash", json.dumps({"command": command}))]),
                   Reply("Not run.")]
    page = page_for(asking)
    send_in_page(page, "go")
    page.wait_for_selector("#approval-bar:not([hidden])")
    shown = "$ echo fine ⟨U+202E⟩; rm -rf ~/nothing-here #␛[2K␍"
    assert page.locator(".tool .args").inner_text() == shown
    assert page.locator("#approval-bar .what").inner_text() == shown
    page.locator("#approval-bar button[data-decision=deny]").click()
    page.wait_for_selector(".done")


def test_page_approval_allow_from_the_bar(asking, page_for, llm):
    # Slow enough that the sessions list, fetched when the message is sent,
    # still says "running" when the approval is asked for.
    llm.script.append(Reply("Running it.", tools=[("bash", '{"command": "echo page-allowed"}')],
                            delay=0.1))
    page = page_for(asking)
    send_in_page(page, "run: echo page-allowed")
    page.wait_for_selector("#approval-bar:not([hidden])")
    assert "$ echo page-allowed" in page.locator("#approval-bar").inner_text()
    # The list says so too at once, not at its next refresh (every 15 s).
    page.wait_for_selector("#sessions li.current .status.awaiting_approval", timeout=3000)
    # and the tool's card says it waits, not that it runs.
    assert page.locator(".tool.waiting .meta").inner_text() == "waiting for approval"
    # The status sits under the title, which keeps the list's whole width.
    assert page.locator("#sessions li.current a").bounding_box()["width"] > 180
    assert page.locator("#sessions li.current .status").inner_text() == "waiting for approval"
    page.locator("#approval-bar button[data-decision=allow]").click()
    page.wait_for_selector(".done")
    page.wait_for_selector("#sessions li.current .status.idle", state="attached")
    assert page.locator(".tool.waiting, .tool.running").count() == 0
    assert "page-allowed" in page.locator(".tool pre.output").inner_text()
    assert page.locator("#approval-bar").is_hidden()


def test_page_approval_deny_in_the_card(asking, page_for):
    page = page_for(asking)
    send_in_page(page, "run: echo nope")
    page.wait_for_selector(".tool .ask:not([hidden])")
    page.locator(".tool .ask button[data-decision=deny]").click()
    page.wait_for_selector(".done")
    assert "error" in page.locator(".tool").get_attribute("class")
    assert "denied" in page.locator(".tool pre.output").inner_text()


def test_page_approval_survives_reload_and_second_tab_sees_the_answer(asking, page_for):
    page = page_for(asking)
    send_in_page(page, "run: echo reloaded")
    page.wait_for_selector("#approval-bar:not([hidden])")
    other = page_for(asking)
    other.goto(page.url)
    other.wait_for_selector("#approval-bar:not([hidden])")
    page.reload()
    page.wait_for_selector("#approval-bar:not([hidden])")
    page.locator("#approval-bar button[data-decision=allow]").click()
    other.wait_for_selector(".done")                    # the other tab sees it through
    assert other.locator("#approval-bar").is_hidden()
    assert "reloaded" in other.locator(".tool pre.output").inner_text()


def test_page_approval_after_server_restart(asking, page_for):
    page = page_for(asking)
    send_in_page(page, "run: echo restarted")
    page.wait_for_selector("#approval-bar:not([hidden])")
    port = asking.port
    asking.kill()
    asking.args = ["--port", str(port)]
    asking.start()
    page.reload()
    page.wait_for_selector("#approval-bar:not([hidden])")
    page.locator("#approval-bar button[data-decision=allow]").click()
    page.wait_for_selector(".done.status-done")
    assert "restarted" in page.locator(".tool pre.output").inner_text()


def test_page_screenshot_mid_run(asking, page_for, llm, tmp_path):
    """The page mid-run, waiting for an approval.  UPDATE_SCREENSHOT=1 writes it
    to static/screenshot.png (shown in README.md); install an emoji font first
    (Debian: fonts-noto-color-emoji), or its icons come out as empty boxes."""
    page = page_for(asking)
    llm.script.append(Reply("I'll look at the workspace first.", thinking="The user wants an overview.",
                            tools=[("bash", '{"command": "echo README.md agent_web.py; uname -s"}')]))
    # Both replies are queued before the first message: the second LLM request
    # can follow the Allow click faster than this test could append it.
    llm.script.append(Reply(" ".join(["The workspace holds two files: **README.md** and "
                                      "`agent_web.py`. Let me check the system too."] * 3),
                            delay=0.03, tools=[("bash", '{"command": "sleep 5"}')]))
    send_in_page(page, "What is in this workspace?")
    page.locator("#approval-bar button[data-decision=allow]").click()
    page.wait_for_selector(".tool >> nth=1")
    page.wait_for_selector("#approval-bar:not([hidden]) >> nth=0")
    target = (HERE / "static" / "screenshot.png" if os.environ.get("UPDATE_SCREENSHOT")
              else tmp_path / "screenshot.png")
    page.screenshot(path=str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.locator(".tool").count() == 2 and page.locator(".tool.ok").count() == 1


# =============================================================================
# Bad input and faults (issue 5)
# =============================================================================
#
# One server for the whole corpus: after every case it must still be healthy,
# and at the end it must still run a normal flow on an intact database.

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    fake = FakeLLM()
    server = ServerProcess(tmp_path_factory.mktemp("corpus"), fake)
    sid = server.chat("say: an idle session for the corpus")["session_id"]
    server.wait_status(sid)
    server.idle = sid
    yield server
    server.stop()
    fake.close()


J = {"content-type": "application/json"}
IDLE = "{idle}"     # replaced by the corpus session's id

# (name, method, path, headers, body, status, error code)
HTTP_CORPUS = [
    ("chat: not JSON", "POST", "/agent/chat", J, b"hello", 400, "bad_json"),
    ("chat: truncated JSON", "POST", "/agent/chat", J, b'{"message": "hi"', 400, "bad_json"),
    ("chat: array", "POST", "/agent/chat", J, b"[]", 400, "bad_json"),
    ("chat: string", "POST", "/agent/chat", J, b'"hi"', 400, "bad_json"),
    ("chat: null", "POST", "/agent/chat", J, b"null", 400, "bad_json"),
    ("chat: number", "POST", "/agent/chat", J, b"42", 400, "bad_json"),
    ("chat: empty body", "POST", "/agent/chat", J, b"", 400, "bad_json"),
    ("chat: nested 100k deep", "POST", "/agent/chat", J, b"[" * 100_000, 400, "bad_json"),
    ("chat: invalid UTF-8", "POST", "/agent/chat", J, b'{"message": "\xff\xfe"}', 400, "bad_json"),
    ("chat: no message", "POST", "/agent/chat", J, b"{}", 400, "bad_field"),
    ("chat: message number", "POST", "/agent/chat", J, b'{"message": 5}', 400, "bad_field"),
    ("chat: message null", "POST", "/agent/chat", J, b'{"message": null}', 400, "bad_field"),
    ("chat: message list", "POST", "/agent/chat", J, b'{"message": ["a"]}', 400, "bad_field"),
    ("chat: message object", "POST", "/agent/chat", J, b'{"message": {"a": 1}}', 400, "bad_field"),
    ("chat: message NaN", "POST", "/agent/chat", J, b'{"message": NaN}', 400, "bad_field"),
    ("chat: empty message", "POST", "/agent/chat", J, b'{"message": ""}', 400, "empty_message"),
    ("chat: whitespace message", "POST", "/agent/chat", J, b'{"message": " \\n\\t "}', 400,
     "empty_message"),
    ("chat: message over limit", "POST", "/agent/chat", J,
     json.dumps({"message": "x" * 100_001}).encode(), 413, "too_large"),
    ("chat: body over 1 MiB", "POST", "/agent/chat", J,
     json.dumps({"message": "x" * (1 << 20)}).encode(), 413, "too_large"),
    ("chat: session_id number", "POST", "/agent/chat", J, b'{"message": "hi", "session_id": 5}',
     400, "bad_session_id"),
    ("chat: session_id empty", "POST", "/agent/chat", J, b'{"message": "hi", "session_id": ""}',
     400, "bad_session_id"),
    ("chat: session_id SQL", "POST", "/agent/chat", J,
     b'{"message": "hi", "session_id": "x\' OR 1=1 --"}', 400, "bad_session_id"),
    ("chat: session_id path", "POST", "/agent/chat", J,
     b'{"message": "hi", "session_id": "../../etc/passwd"}', 400, "bad_session_id"),
    ("chat: session_id too long", "POST", "/agent/chat", J,
     json.dumps({"message": "hi", "session_id": "a" * 65}).encode(), 400, "bad_session_id"),
    ("chat: session_id list", "POST", "/agent/chat", J, b'{"message": "hi", "session_id": []}',
     400, "bad_session_id"),
    ("chat: unknown session", "POST", "/agent/chat", J,
     b'{"message": "hi", "session_id": "s_nope"}', 404, "unknown_session"),
    ("chat: bad approve_mode", "POST", "/agent/chat", J,
     b'{"message": "hi", "approve_mode": "sometimes"}', 400, "bad_field"),
    ("chat: text/plain", "POST", "/agent/chat", {"content-type": "text/plain"},
     b'{"message": "hi"}', 415, "bad_content_type"),
    ("chat: form post", "POST", "/agent/chat",
     {"content-type": "application/x-www-form-urlencoded"}, b"message=hi", 415, "bad_content_type"),
    ("chat: no content type", "POST", "/agent/chat", {}, b'{"message": "hi"}', 415,
     "bad_content_type"),
    ("history: no session_id", "GET", "/agent/chat", {}, None, 400, "bad_session_id"),
    ("history: unknown session", "GET", "/agent/chat?session_id=s_nope", {}, None, 404,
     "unknown_session"),
    ("history: SQL session_id", "GET", "/agent/chat?session_id=x%27%20OR%201%3D1", {}, None, 400,
     "bad_session_id"),
    ("history: path session_id", "GET", "/agent/chat?session_id=..%2F..%2Fetc", {}, None, 400,
     "bad_session_id"),
    ("history: bad percent-encoding", "GET", "/agent/chat?session_id=%ff%fe", {}, None, 400,
     "bad_session_id"),
    ("history: after negative", "GET", f"/agent/chat?session_id={IDLE}&after=-1", {}, None, 400,
     "bad_query"),
    ("history: after not a number", "GET", f"/agent/chat?session_id={IDLE}&after=abc", {}, None,
     400, "bad_query"),
    ("history: after float", "GET", f"/agent/chat?session_id={IDLE}&after=1e3", {}, None, 400,
     "bad_query"),
    ("history: after huge", "GET", f"/agent/chat?session_id={IDLE}&after={10**30}", {}, None, 400,
     "bad_query"),
    ("history: limit zero", "GET", f"/agent/chat?session_id={IDLE}&limit=0", {}, None, 400,
     "bad_query"),
    ("history: limit huge", "GET", f"/agent/chat?session_id={IDLE}&limit=100000", {}, None, 400,
     "bad_query"),
    ("history: tail negative", "GET", f"/agent/chat?session_id={IDLE}&tail=-5", {}, None, 400,
     "bad_query"),
    ("history: repeated after", "GET", f"/agent/chat?session_id={IDLE}&after=1&after=2", {}, None,
     400, "bad_query"),
    ("history: repeated session_id", "GET", f"/agent/chat?session_id={IDLE}&session_id=s_x", {},
     None, 400, "bad_query"),
    ("sessions: limit zero", "GET", "/agent/sessions?limit=0", {}, None, 400, "bad_query"),
    ("sessions: limit over 1000", "GET", "/agent/sessions?limit=1001", {}, None, 400, "bad_query"),
    ("sessions: limit not a number", "GET", "/agent/sessions?limit=%C2%B2", {}, None, 400,
     "bad_query"),
    ("sessions: after not a cursor", "GET", "/agent/sessions?limit=5&after=s_x", {}, None, 400,
     "bad_query"),
    ("sessions: after with nan", "GET", "/agent/sessions?limit=5&after=nan%7Cs_x", {}, None, 400,
     "bad_query"),
    ("sessions: after without limit", "GET", "/agent/sessions?after=1.5%7Cs_x", {}, None, 400,
     "bad_query"),
    ("cancel: empty object", "POST", "/agent/cancel", J, b"{}", 400, "bad_session_id"),
    ("cancel: not JSON", "POST", "/agent/cancel", J, b"cancel!", 400, "bad_json"),
    ("cancel: session_id number", "POST", "/agent/cancel", J, b'{"session_id": 7}', 400,
     "bad_session_id"),
    ("cancel: unknown session", "POST", "/agent/cancel", J, b'{"session_id": "s_nope"}', 404,
     "unknown_session"),
    ("cancel: nothing running", "POST", "/agent/cancel", J,
     json.dumps({"session_id": IDLE}).encode(), 409, "not_running"),
    ("approve: empty object", "POST", "/agent/approve", J, b"{}", 400, "bad_session_id"),
    ("approve: no call_id", "POST", "/agent/approve", J,
     json.dumps({"session_id": IDLE, "decision": "allow"}).encode(), 400, "bad_field"),
    ("approve: call_id number", "POST", "/agent/approve", J,
     json.dumps({"session_id": IDLE, "call_id": 5, "decision": "allow"}).encode(), 400, "bad_field"),
    ("approve: bad decision", "POST", "/agent/approve", J,
     json.dumps({"session_id": IDLE, "call_id": "c", "decision": "maybe"}).encode(), 400,
     "bad_field"),
    ("approve: no decision", "POST", "/agent/approve", J,
     json.dumps({"session_id": IDLE, "call_id": "c"}).encode(), 400, "bad_field"),
    ("approve: nothing waiting", "POST", "/agent/approve", J,
     json.dumps({"session_id": IDLE, "call_id": "c", "decision": "allow"}).encode(), 409,
     "not_waiting"),
    ("approve: unknown session", "POST", "/agent/approve", J,
     b'{"session_id": "s_nope", "call_id": "c", "decision": "allow"}', 404, "unknown_session"),
    ("delete: unknown session", "DELETE", "/agent/sessions/s_nope", {}, None, 404,
     "unknown_session"),
    ("delete: SQL id", "DELETE", "/agent/sessions/x%27%3BDROP%20TABLE%20events", {}, None, 400,
     "bad_session_id"),
    ("patch: bad mode", "PATCH", f"/agent/sessions/{IDLE}", J, b'{"approve_mode": "yolo"}', 400,
     "bad_field"),
    ("patch: not JSON", "PATCH", f"/agent/sessions/{IDLE}", J, b"{", 400, "bad_json"),
    ("patch: unknown session", "PATCH", "/agent/sessions/s_nope", J, b'{"approve_mode": "auto"}',
     404, "unknown_session"),
    ("route: unknown", "GET", "/nope", {}, None, 404, "not_found"),
    ("route: unknown under /agent", "GET", "/agent/nope", {}, None, 404, "not_found"),
    ("route: PUT chat", "PUT", "/agent/chat", {}, None, 405, "method_not_allowed"),
    ("route: DELETE chat", "DELETE", "/agent/chat", {}, None, 405, "method_not_allowed"),
    ("route: GET cancel", "GET", "/agent/cancel", {}, None, 405, "method_not_allowed"),
    ("route: GET approve", "GET", "/agent/approve", {}, None, 405, "method_not_allowed"),
    ("route: POST healthz", "POST", "/healthz", {}, None, 405, "method_not_allowed"),
    ("route: POST sessions", "POST", "/agent/sessions", J, b"{}", 405, "method_not_allowed"),
    ("route: GET one session", "GET", f"/agent/sessions/{IDLE}", {}, None, 405,
     "method_not_allowed"),
    ("route: POST page", "POST", "/", {}, None, 405, "method_not_allowed"),
    ("static: missing file", "GET", "/static/nope.js", {}, None, 404, "not_found"),
    ("static: dot-dot", "GET", "/static/%2e%2e/agent_web.py", {}, None, 404, "not_found"),
    ("static: encoded slash", "GET", "/static/..%2F..%2Fetc%2Fpasswd", {}, None, 404, "not_found"),
    ("security: wrong token", "GET", "/agent/sessions", {"authorization": "Bearer nope"}, None,
     401, "unauthorized"),
    ("security: Host evil", "GET", "/agent/sessions", {"host": "evil.example"}, None, 403,
     "bad_host"),
    ("security: Origin null", "POST", "/agent/chat", {**J, "origin": "null"},
     b'{"message": "hi"}', 403, "bad_origin"),
    ("security: Origin other port", "POST", "/agent/chat", {**J, "origin": "http://127.0.0.1:1"},
     b'{"message": "hi"}', 403, "bad_origin"),
]


@pytest.mark.parametrize("case", HTTP_CORPUS, ids=[c[0] for c in HTTP_CORPUS])
def test_bad_http_input_gets_a_clear_4xx(corpus, case):
    name, method, path, headers, body, status, code = case
    path = path.replace(IDLE, corpus.idle)
    if isinstance(body, bytes):
        body = body.replace(IDLE.encode(), corpus.idle.encode())
    h = {"authorization": f"Bearer {TOKEN}", **headers}
    # a raw request, so nothing (httpx included) tidies the path or the body
    url = httpx.URL(corpus.base + "/").copy_with(raw_path=path.encode())
    r = httpx.request(method, url, content=body, headers=h, timeout=10)
    assert r.status_code == status, (name, r.text)
    assert r.json()["error"]["code"] == code, name
    assert "Traceback" not in r.text


# (name, frames to send, expected: ("error", code) | ("close", code) | ("frame", type))
WS_CORPUS = [
    ("text not JSON", ["hello"], ("error", "bad_json")),
    ("JSON array", ["[]"], ("error", "bad_json")),
    ("JSON number", ["42"], ("error", "bad_json")),
    ("JSON nested deep", ["[" * 50_000], ("error", "bad_json")),
    ("binary frame", [b"\x00\x01binary"], ("error", "bad_frame")),
    ("unknown type", ['{"type": "dance"}'], ("error", "unknown_type")),
    ("no type", ["{}"], ("error", "unknown_type")),
    ("type not a string", ['{"type": 5}'], ("error", "unknown_type")),
    ("subscribe without session", ['{"type": "subscribe"}'], ("error", "bad_session_id")),
    ("subscribe unknown session", ['{"type": "subscribe", "session_id": "s_nope"}'],
     ("error", "unknown_session")),
    ("subscribe path-like session", ['{"type": "subscribe", "session_id": "../x"}'],
     ("error", "bad_session_id")),
    ("subscribe after negative", ['{"type": "subscribe", "session_id": "{idle}", "after": -1}'],
     ("error", "bad_field")),
    ("subscribe after string", ['{"type": "subscribe", "session_id": "{idle}", "after": "5"}'],
     ("error", "bad_field")),
    ("subscribe after bool", ['{"type": "subscribe", "session_id": "{idle}", "after": true}'],
     ("error", "bad_field")),
    ("cancel before subscribing", ['{"type": "cancel"}'], ("error", "not_subscribed")),
    ("cancel with nothing running", ['{"type": "cancel", "session_id": "{idle}"}'],
     ("error", "not_running")),
    ("approve without call_id", ['{"type": "approve", "session_id": "{idle}", "decision": "allow"}'],
     ("error", "bad_field")),
    ("approve nothing waiting",
     ['{"type": "approve", "session_id": "{idle}", "call_id": "c", "decision": "allow"}'],
     ("error", "not_waiting")),
    ("subscribing twice", ['{"type": "subscribe", "session_id": "{idle}", "after": 999}',
                           '{"type": "subscribe", "session_id": "{idle}", "after": 999}'],
     ("frame", "subscribed")),
    ("ping", ['{"type": "ping"}'], ("frame", "pong")),
    ("frame over 64 KiB", ['{"type": "ping", "pad": "' + "x" * 70_000 + '"}'], ("close", 1009)),
]


@pytest.mark.parametrize("case", WS_CORPUS, ids=[c[0] for c in WS_CORPUS])
def test_bad_websocket_input_gets_an_error_frame_or_close_code(corpus, case):
    name, frames, (kind, expected) = case

    async def scenario():
        async with websockets.connect(corpus.ws_url(), max_size=None) as ws:
            for f in frames:
                await ws.send(f.replace("{idle}", corpus.idle) if isinstance(f, str) else f)
            try:
                replies = []
                for _ in range(len(frames)):
                    replies.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                await ws.send('{"type": "ping"}')        # the socket stays open after an error
                pong = json.loads(await asyncio.wait_for(ws.recv(), 10))
                return replies, pong, None
            except websockets.ConnectionClosed as exc:
                return None, None, exc.rcvd.code if exc.rcvd else None
    replies, pong, closed = arun(scenario())
    if kind == "close":
        assert closed == expected, name
        return
    assert closed is None and pong == {"type": "pong"}, name
    last = replies[-1]
    if kind == "error":
        assert last["type"] == "error" and last["code"] == expected, (name, last)
        assert last["message"]
    else:
        assert last["type"] == expected, (name, last)


def test_after_the_corpus_the_server_still_works_and_the_db_is_intact(corpus):
    sid = corpus.chat("run: echo still-alive")["session_id"]
    events = arun(ws_collect(corpus.ws_url(), sid))
    assert "still-alive" in of(events, "tool_result")[0]["output"]
    assert len(HTTP_CORPUS) + len(WS_CORPUS) >= 60
    db = sqlite3.connect(corpus.db)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM sessions WHERE status != 'idle'").fetchone()[0] == 0


def stats(server) -> dict:
    return server.http("GET", "/agent/stats").json()


def test_crash_campaign_bounded(tmp_path):
    """bench/crash_campaign.py runs 20 SIGKILL trials; CI runs 3 of them."""
    sys.path.insert(0, str(HERE / "bench"))
    from crash_campaign import run_trials
    s = run_trials(3, tmp_path, seed=7)
    assert s["received"] > 0 and s["lost"] == 0
    assert s["continued"] == 3 and s["stuck"] == 0 and s["integrity"] == "ok"


def test_vanishing_and_churning_clients_leak_nothing(server):
    sid = server.chat("say: warm up")["session_id"]
    server.wait_status(sid)
    base = stats(server)

    async def churn():
        for _ in range(200):        # rapid subscribe / unsubscribe
            async with websockets.connect(server.ws_url()) as ws:
                await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": 0}))
                await ws.recv()
    arun(churn())
    run = server.chat("slow and steady", sid)
    for _ in range(5):              # clients that vanish without a close frame
        raw = RawWebSocket(server.port, f"/agent/ws?token={TOKEN}")
        raw.send_json({"type": "subscribe", "session_id": sid, "after": 0})
        raw.sock.shutdown(socket.SHUT_RDWR)
        raw.close()
    h = server.wait_status(sid)
    assert of(h["events"], "done")[-1]["status"] == "done" and run["seq"] > 1
    time.sleep(0.5)
    after = stats(server)
    assert after["subscribers"] == 0 and after["runs"] == 0
    assert after["tasks"] <= base["tasks"]
    assert after["rss_kb"] - base["rss_kb"] < 20_000, (base, after)   # a bound, not a timing


def test_failing_llm_never_leaves_a_session_running(server, llm):
    llm.script += [Reply(status=500)] * 5
    sid = server.chat("hi")["session_id"]
    h = server.wait_status(sid)
    errors = of(h["events"], "error")
    assert [e["retrying"] for e in errors] == [True] * 4 + [False]
    assert of(h["events"], "done")[-1]["status"] == "error"


def test_tool_that_prints_50_mb_is_capped(server):
    sid = server.chat("run: head -c 50000000 /dev/zero | tr '\\0' x")["session_id"]
    out = of(server.wait_status(sid, timeout=60)["events"], "tool_result")[0]["output"]
    assert len(out) < 40_000 and "cut" in out


def test_background_child_that_keeps_writing_is_reclaimed(server):
    log = server.workspace / "bg.log"
    sid = server.chat(f"run: (while true; do echo bg >> {log}; sleep 0.05; done) & echo started")[
        "session_id"]
    h = server.wait_status(sid)
    assert "started" in of(h["events"], "tool_result")[0]["output"]
    time.sleep(0.3)
    size = log.stat().st_size
    time.sleep(0.5)
    assert log.stat().st_size == size          # nothing writes any more


def test_hanging_bash_times_out_and_the_run_ends(server, llm):
    llm.script.append(Reply("", tools=[("bash", '{"command": "sleep 100", "timeout": 1}')]))
    sid = server.chat("hang")["session_id"]
    h = server.wait_status(sid)
    result = of(h["events"], "tool_result")[0]
    assert result["is_error"] and "timed out" in result["output"].lower()


@both_stores
def test_fifty_sessions_at_once_and_ten_racers_on_one(server):
    target = server.chat("say: the contested session")["session_id"]
    server.wait_status(target)

    async def scenario():
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {TOKEN}"},
                                     timeout=30) as c:
            posts = await asyncio.gather(*[
                c.post(server.base + "/agent/chat", json={"message": f"run: echo session-{i}"})
                for i in range(50)])
            sids = [p.json()["session_id"] for p in posts]
            watchers = [ws_collect(server.ws_url(), sid, timeout=60) for sid in sids]
            # The winner's answer takes a second, longer than the racers'
            # arrival is spread over while 50 runs start (an instant answer
            # could end before the last racer came, which then rightly won).
            racers = [c.post(server.base + "/agent/chat",
                             json={"session_id": target, "message": "stream 20 20"})
                      for i in range(10)]
            results = await asyncio.gather(*watchers, *racers)
            return sids, results[:50], results[50:]
    sids, streams, racers = arun(scenario())
    assert sorted(r.status_code for r in racers) == [202] + [409] * 9
    for i, (sid, events) in enumerate(zip(sids, streams)):
        assert events == server.history(sid)["events"]
        assert of(events, "tool_result")[0]["output"].strip() == f"session-{i}"
    h = server.wait_status(target)
    assert len([e for e in of(h["events"], "message") if e["role"] == "user"]) == 2


def test_more_sessions_than_an_http_pool_holds_all_stream_at_once(server):
    """Each streaming step holds one connection to the model for as long as
    it writes; past httpx's default pool of 100 the rest used to wait,
    showing nothing, for another session's answer to end.  110 at once: every
    one has streamed its first token before any has finished."""
    async def start_all():
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {TOKEN}"},
                                     timeout=30) as c:
            posts = await asyncio.gather(*[
                c.post(server.base + "/agent/chat", json={"message": "stream 3 6"})
                for _ in range(110)])
            return [p.json()["session_id"] for p in posts]
    sids = arun(start_all())
    server.wait_no_runs(timeout=60)
    runs = [server.history(sid)["events"] for sid in sids]
    first_tokens = [of(events, "delta")[0]["ts"] for events in runs]
    ends = [of(events, "done")[0]["ts"] for events in runs]
    assert all(of(events, "done")[0]["status"] == "done" for events in runs)
    assert max(first_tokens) < min(ends), f"{sum(t > min(ends) for t in first_tokens)} waited"


# =============================================================================
# Many workers on one PostgreSQL database (issue 22)
# =============================================================================

WORKER_ENV = {"AGENT_WEB_LEASE": "3"}     # a dead worker is found within ~4 s


def start_workers(tmp_path: Path, llm, dsn: str, n: int, **kw) -> list[ServerProcess]:
    """N servers on one database, each on its own port and in its own folder."""
    for i in range(n):
        (tmp_path / f"w{i}").mkdir()
    return [ServerProcess(tmp_path / f"w{i}", llm, db=dsn, extra_env=WORKER_ENV, **kw)
            for i in range(n)]


async def ws_frames(url: str, frames: list[dict]) -> None:
    async with websockets.connect(url) as ws:
        for frame in frames:
            await ws.send(json.dumps(frame))
        await asyncio.sleep(0.3)


def test_three_workers_share_streams_runs_and_the_dead_ones_runs(tmp_path, llm, postgres):
    """Three servers on one database, each on its own port (as on three
    machines): a run started on one is pushed to subscribers on all three
    exactly as stored; a second run anywhere is 409; a cancel sent to
    another worker stops it; the sessions list is the same everywhere; a
    worker killed mid-run has its run ended `interrupted` by another, its
    tool call closed, and the others' live runs are never touched."""
    dsn = postgres.database()
    w = start_workers(tmp_path, llm, dsn, 3)
    try:
        # 1. streams: started on w0, watched from all three
        sid = w[0].chat("say: ready")["session_id"]
        w[0].wait_status(sid)
        last = w[0].history(sid)["last_seq"]

        async def watch_all():
            watchers = [asyncio.ensure_future(ws_collect(x.ws_url(), sid, after=last))
                        for x in w]
            await asyncio.sleep(0.5)              # all three subscribed
            r = await asyncio.to_thread(w[0].http, "POST", "/agent/chat",
                                        {"session_id": sid, "message": "stream 120 200"})
            assert r.status_code == 202, r.text
            r2 = await asyncio.to_thread(w[2].http, "POST", "/agent/chat",
                                         {"session_id": sid, "message": "say: no"})
            assert r2.status_code == 409 and r2.json()["error"]["code"] == "run_in_progress"
            return await asyncio.gather(*watchers)
        streams = arun(watch_all())
        stored = w[1].history(sid, after=last)["events"]
        assert of(stored, "done") and all(s == stored for s in streams)
        assert [e["seq"] for e in stored] == list(range(last + 1, last + 1 + len(stored)))

        # 2. a cancel through another worker stops the run
        sid2 = w[0].chat("run: sleep 30")["session_id"]
        w[1].wait_event(sid2, "tool_call")
        arun(ws_frames(w[2].ws_url(), [{"type": "cancel", "session_id": sid2}]))
        assert w[1].wait_status(sid2, timeout=10)["events"][-1]["status"] == "cancelled"
        r = w[1].http("POST", "/agent/cancel", {"session_id": sid2})
        assert r.status_code == 409                           # nothing runs there now

        # 3. a worker killed mid-run: another ends its run; a live one is left alone
        alive = w[0].chat("run: sleep 4; echo survived")["session_id"]
        doomed = w[1].chat("run: sleep 30")["session_id"]
        w[2].wait_event(doomed, "tool_call")
        w[2].wait_event(alive, "tool_call")
        w[1].kill()
        h = w[2].wait_status(doomed, timeout=15)
        assert h["events"][-1]["status"] == "interrupted"
        result = of(h["events"], "tool_result")[-1]
        assert result["is_error"] and result["call_id"] == of(h["events"], "tool_call")[-1]["call_id"]
        h = w[0].wait_status(alive, timeout=20)
        assert h["events"][-1]["status"] == "done"
        assert "survived" in of(h["events"], "tool_result")[-1]["output"]

        # 4. the sessions list is the same from every live worker
        w[1].start()
        lists = [x.http("GET", "/agent/sessions").json() for x in w]
        assert lists[0] == lists[1] == lists[2] and len(lists[0]["sessions"]) == 4
    finally:
        for x in w:
            x.stop()


def test_uvicorn_with_three_workers_serves_one_postgres_database(tmp_path, llm, postgres):
    """`uvicorn agent_web:app --workers 3`, as the README says to run it:
    streams on several connections (landing on whichever worker accepts
    them) equal the store, every worker lists the same sessions, and a
    worker SIGKILLed mid-run has its run ended `interrupted` by another."""
    dsn = postgres.database()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = free_env(AGENT_WEB_DB=dsn, AGENT_WEB_TOKEN=TOKEN, AGENT_WORKSPACE=tmp_path / "ws",
                   AGENT_APPROVE="auto", ANTHROPIC_API_KEY="key-123",
                   ANTHROPIC_BASE_URL=llm.url, **WORKER_ENV)
    log = open(tmp_path / "uvicorn.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "agent_web:app", "--app-dir",
                             str(HERE), "--ws", "wsproto", "--workers", "3", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    s = ServerProcess.__new__(ServerProcess)        # its HTTP and WebSocket helpers only
    s.port, s.base, s.db = port, f"http://127.0.0.1:{port}", dsn
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if s.http("GET", "/healthz").status_code == 200:
                    break
            time.sleep(0.1)
        time.sleep(1.0)                             # all three up, not just the first
        sid = s.chat("say: ready")["session_id"]
        last = s.wait_status(sid)["last_seq"]

        async def watch():
            watchers = [asyncio.ensure_future(ws_collect(s.ws_url(), sid, after=last))
                        for _ in range(6)]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(s.chat, "stream 100 200", sid)
            return await asyncio.gather(*watchers)
        streams = arun(watch())
        stored = s.history(sid, after=last)["events"]
        assert of(stored, "done") and all(x == stored for x in streams)

        lists = [s.http("GET", "/agent/sessions").json() for _ in range(9)]
        assert all(x == lists[0] for x in lists)
        # the workers name themselves (GET /agent/stats), and they are three
        alive = {r[0] for r in s.sql("SELECT id FROM workers WHERE lease_until > now()")}
        assert len(alive) == 3 and s.http("GET", "/agent/stats").json()["worker"] in alive

        doomed = s.chat("run: sleep 30")["session_id"]
        s.wait_event(doomed, "tool_call")
        (owner,), = s.sql("SELECT owner FROM runs WHERE session_id = ?", (doomed,))
        os.kill(int(owner.split(":")[1]), signal.SIGKILL)
        h = s.wait_status(doomed, timeout=20)
        assert h["events"][-1]["status"] == "interrupted"
        assert of(h["events"], "tool_result")[-1]["is_error"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_a_postgres_dsn_without_psycopg_or_a_server_is_one_clear_line(tmp_path):
    """Without psycopg the DSN is a usage error naming what to install; with
    it, a database that does not answer is one line (its password hidden),
    not a traceback."""
    (tmp_path / "psycopg").mkdir()
    (tmp_path / "psycopg" / "__init__.py").write_text("raise ImportError('not installed')\n")
    cmd = [sys.executable, str(HERE / "agent_web.py"), "--port", "0", "--no-browser", "--db",
           "postgresql://agent:s3cret@127.0.0.1:1/agent"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tmp_path,
                       env=free_env(PYTHONPATH=tmp_path))
    assert r.returncode == 2 and "pip install -r requirements-postgres.txt" in r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tmp_path,
                       env=free_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr and "s3cret" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "agent_web: cannot reach the database postgresql://agent:***@127.0.0.1:1/agent: ")


def test_approve_queue_and_a_waiting_run_reach_their_owner_from_another_worker(
        tmp_path, llm, postgres):
    """Two workers in ask mode: an approval sent to the worker that does not
    run the session reaches the run; so does a queued message; and a run
    left waiting for approval by a worker that stops is resumed, still
    waiting, by the other (as one server's restart resumes it)."""
    dsn = postgres.database()
    w = start_workers(tmp_path, llm, dsn, 2, approve="ask")
    try:
        sid = w[0].chat("run: echo approved-elsewhere")["session_id"]
        req = w[1].wait_event(sid, "approval_request")
        assert approve(w[1], sid, req["call_id"]).status_code == 202
        h = w[1].wait_status(sid)
        assert of(h["events"], "tool_result")[0]["output"].strip() == "approved-elsewhere"

        w[0].chat("run: sleep 1; echo slept", sid, approve_mode="auto")
        w[1].wait_event(sid, "tool_call", count=2)
        r = w[1].http("POST", "/agent/chat", {"message": "say: also this", "session_id": sid,
                                              "queue": True})
        assert r.status_code == 202 and r.json()["queued"]
        h = w[0].wait_status(sid)
        delivered = [e for e in h["events"] if e["type"] == "message" and e.get("queued_id")]
        assert [e["queued_id"] for e in delivered] == [r.json()["message_id"]]
        assert len(of(h["events"], "done")) == 2          # the running one took it

        waiting = w[0].chat("run: echo resumed", approve_mode="ask")["session_id"]
        req = w[1].wait_event(waiting, "approval_request")
        w[0].stop()                                       # a clean stop leaves it waiting
        deadline = time.time() + 10                       # until the other's sweep adopts it
        while (r := approve(w[1], waiting, req["call_id"])).status_code == 409:
            assert time.time() < deadline, r.text
            time.sleep(0.1)
        assert r.status_code == 202
        h = w[1].wait_status(waiting)
        assert of(h["events"], "tool_result")[0]["output"].strip() == "resumed"
        assert "interrupted" not in [e["status"] for e in of(h["events"], "done")]
    finally:
        for x in w:
            x.stop()


def test_a_queued_message_is_dropped_by_the_worker_that_runs_its_session(
        tmp_path, llm, postgres):
    """Asked on another worker, a drop waits for the run's worker to decide
    (its agent may be reading the message that moment): while that worker
    does not answer (stopped), the drop is 504 and nothing is stored; once it
    answers, it takes the message back itself and the agent never reads it;
    a second drop is 409."""
    dsn = postgres.database()
    (tmp_path / "w0").mkdir(), (tmp_path / "w1").mkdir()
    w = [ServerProcess(tmp_path / f"w{i}", llm, db=dsn, extra_env={"AGENT_WEB_LEASE": "60"})
         for i in range(2)]
    try:
        sid = w[0].chat("run: sleep 6; echo slept")["session_id"]
        w[1].wait_event(sid, "tool_call")
        r = w[1].http("POST", "/agent/chat", {"message": "say: never read", "session_id": sid,
                                              "queue": True})
        assert r.status_code == 202
        mid = r.json()["message_id"]
        time.sleep(0.5)                              # in w0's inbox by now
        os.kill(w[0].proc.pid, signal.SIGSTOP)
        try:
            path = f"/agent/sessions/{sid}/queue/{mid}"
            r = w[1].http("DELETE", path)
            assert r.status_code == 504 and r.json()["error"]["code"] == "no_answer"
            assert not of(w[1].history(sid)["events"], "unqueued")
        finally:
            os.kill(w[0].proc.pid, signal.SIGCONT)
        w[1].wait_event(sid, "unqueued")
        assert w[1].http("DELETE", path).status_code == 409
        h = w[0].wait_status(sid)
        assert [e["message_id"] for e in of(h["events"], "unqueued")] == [mid]
        assert not [e for e in of(h["events"], "message") if e.get("queued_id")]
        assert [e["status"] for e in of(h["events"], "done")] == ["done"]
    finally:
        for x in w:
            x.stop()


def test_background_commands_are_reached_from_any_worker(tmp_path, llm, postgres):
    """A background command lives in the worker that started it; a later
    run of its session on another worker reads its output and stops it
    (bash_output, bash_kill), that worker's page lists it live, and deleting
    the session through it ends the command.  An id no worker has is said
    to be unknown, at once; a command whose worker stopped is listed gone."""
    def start(cmd):
        return Reply("Starting.", tools=[("bash", json.dumps(
            {"command": cmd, "run_in_background": True}))])
    dsn = postgres.database()
    w = start_workers(tmp_path, llm, dsn, 2)
    try:
        llm.script += [start("echo ready; sleep 300"), Reply("Started.")]
        sid = w[0].chat("one")["session_id"]
        started = of(w[0].wait_status(sid)["events"], "tool_result")[0]["output"]
        bash_id = re.search(r"bash_id (bash_\w+)", started).group(1)
        pid = int(re.search(r"pid (\d+)", started).group(1))
        deadline = time.time() + 10
        while True:
            jobs = w[1].http("GET", f"/agent/sessions/{sid}/background").json()["jobs"]
            if jobs and "ready" in jobs[0]["output_tail"] or time.time() > deadline:
                break
            time.sleep(0.1)
        assert [(j["bash_id"], j["running"], "ready" in j["output_tail"], j.get("gone"))
                for j in jobs] == [(bash_id, True, True, None)]

        llm.script += [Reply("Looking.", tools=[
            ("bash_output", json.dumps({"bash_id": bash_id})),
            ("bash_kill", json.dumps({"bash_id": bash_id})),
            ("bash_output", json.dumps({"bash_id": "bash_nosuchcommand"}))]), Reply("Done.")]
        w[1].chat("how is it going?", sid)
        results = of(w[1].wait_status(sid)["events"], "tool_result")[1:]
        assert "still running" in results[0]["output"] and "ready" in results[0]["output"]
        assert not results[0]["is_error"]
        assert "stopped" in results[1]["output"] and not pid_alive(pid)
        assert results[2]["is_error"] and "no background command" in results[2]["output"]
        jobs = w[1].http("GET", f"/agent/sessions/{sid}/background").json()["jobs"]
        assert [(j["bash_id"], j["running"]) for j in jobs] == [(bash_id, False)]

        llm.script += [start("sleep 301"), Reply("Started.")]
        other = w[0].chat("two")["session_id"]
        started = of(w[0].wait_status(other)["events"], "tool_result")[0]["output"]
        pid = int(re.search(r"pid (\d+)", started).group(1))
        assert pid_alive(pid)
        assert w[1].http("DELETE", f"/agent/sessions/{other}").status_code == 204
        deadline = time.time() + 10
        while pid_alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid)

        llm.script += [start("sleep 302"), Reply("Started.")]
        third = w[0].chat("three")["session_id"]
        w[0].wait_status(third)
        w[0].stop()                                    # nothing outlives its worker
        jobs = w[1].http("GET", f"/agent/sessions/{third}/background").json()["jobs"]
        assert [(j["command"], j["running"], j.get("gone")) for j in jobs] == \
            [("sleep 302", False, True)]
    finally:
        for x in w:
            x.stop()


def test_the_store_keeps_a_queued_messages_first_decision_dropped_or_read(postgres):
    """Two workers can each find a queued message undecided (a drop asked of
    one while a run starts on another); the store keeps whichever decision
    commits first and refuses the other, on the session's row lock."""
    import agent_web as web
    store = web.PgStore(postgres.database(), "w1")

    async def go():
        await store.open()
        sid = "s_queue"
        await store.write(web.Store.create_session, sid, "auto")
        await store.write(web.PgStore.claim, sid, "w1")

        def append(*events):
            return store.write(web.Store.append, [
                (sid, {"ts": time.time(), **ev}) for ev in events])
        queued = [{"type": "queued", "message_id": m, "content": m} for m in ("m1", "m2")]
        assert None not in await append(*queued)
        read = {"type": "message", "role": "user", "content": "hi", "message_id": "u1"}
        return [await append({"type": "unqueued", "message_id": "m1"}),
                await append({**read, "queued_id": "m1"}),          # dropped first
                await append({**read, "message_id": "u2", "queued_id": "m2"}),
                await append({"type": "unqueued", "message_id": "m2"}),   # read first
                await append({"type": "unqueued", "message_id": "m3"},    # one batch:
                             {**read, "message_id": "u3", "queued_id": "m3"})]  # first wins
    try:
        dropped, late_read, read_first, late_drop, batch = arun(go())
    finally:
        store.close()
    assert dropped[0] is not None and late_read == [None]
    assert read_first[0] is not None and late_drop == [None]
    assert batch[0] is not None and batch[1] is None


@pytest.mark.parametrize("here", ["a run starts", "a drop"])
def test_a_queued_message_decided_by_another_worker_meanwhile_is_left_to_it(
        tmp_path, llm, postgres, here):
    """No run anywhere, a message queued: this worker starts a run that
    delivers it, or drops it, while another worker decides it the other way
    after this one looked.  The store refuses this worker's decision, and it
    acts on that: the run goes on without the message (the model never
    reads it), or the drop says 409.  (The other worker is a store of its
    own, writing at the racing moment.)"""
    import agent_web as web
    dsn = postgres.database()

    async def scenario():
        app = web.create_app(db_path=dsn, workspace=tmp_path / "ws", token=TOKEN,
                             llm_config=cfg_for(llm), approve="auto")
        other = web.PgStore(dsn, "another-worker")
        async with InProcess(app) as it:
            sid, mid = await it.left_queued("say: queued-one")

            async def other_decides():
                if here == "a run starts":            # the other worker drops it
                    await other.write(web.Store.append, [(sid, {
                        "type": "unqueued", "ts": time.time(), "message_id": mid})])
                else:                                 # the other worker's run reads it
                    await other.write(web.PgStore.claim, sid, "another-worker")
                    await other.write(web.Store.append, [(sid, {
                        "type": "message", "ts": time.time(), "role": "user",
                        "content": "say: queued-one", "message_id": "m_other",
                        "queued_id": mid})])
                    await other.write(web.PgStore.unclaim, sid, "another-worker")
            looks = 0
            real_read, real_forward = app.store.read, app.runs.owners.forward

            async def read(fn, *args):                # begin's second look, then the race
                nonlocal looks
                result = await real_read(fn, *args)
                if fn is web.Store.queue_events and here == "a run starts":
                    looks += 1
                    if looks == 2:
                        await other_decides()
                return result

            async def forward(session_id, op):        # the drop found no owner, then the race
                found = await real_forward(session_id, op)
                if not found:
                    await other_decides()
                return found
            app.store.read, app.runs.owners.forward = read, forward
            asked = len(llm.requests)
            if here == "a run starts":
                posted = await it.post("/agent/chat", {"message": "say: next", "session_id": sid})
                assert posted.status_code == 202
                await it.idle(sid)
            else:
                dropped = await it.client.delete(f"/agent/sessions/{sid}/queue/{mid}",
                                                 headers=it.h)
                assert dropped.status_code == 409 and dropped.json()["error"]["code"] == \
                    "not_queued"
            final = (await it.events(sid))["events"]
        other.close()
        return final, llm.requests[asked:], mid
    final, requests, mid = arun(scenario())
    decisions = ([e for e in final if e["type"] == "unqueued"]
                 + [e for e in final if e.get("queued_id") == mid])
    assert len(decisions) == 1                         # one decision, the other worker's
    if here == "a run starts":
        assert decisions[0]["type"] == "unqueued"
        assert requests and "queued-one" not in json.dumps(requests[-1]["messages"])
        assert "say: next" in json.dumps(requests[-1]["messages"])
        assert of(final, "done")[-1]["status"] == "done"
    else:
        assert decisions[0]["message_id"] == "m_other"


def test_five_subscribers_on_another_worker_get_the_stream_live_from_its_notices(
        tmp_path, llm, postgres):
    """A run on worker A, five subscribers on worker B: each gets exactly the
    stored stream, live (the lease is a minute, so no renewal's check stands
    in for the notices), one read for the five at each notice."""
    dsn = postgres.database()
    w = []
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
        w.append(ServerProcess(tmp_path / f"w{i}", llm, db=dsn,
                               extra_env={"AGENT_WEB_LEASE": "60"}))
    try:
        sid = w[0].chat("say: ready")["session_id"]
        w[0].wait_status(sid)
        last = w[0].history(sid)["last_seq"]

        async def watch():
            watchers = [asyncio.ensure_future(ws_collect(w[1].ws_url(), sid, after=last,
                                                         timeout=10)) for _ in range(5)]
            await asyncio.sleep(0.5)
            r = await asyncio.to_thread(w[0].http, "POST", "/agent/chat",
                                        {"session_id": sid, "message": "stream 60 100"})
            assert r.status_code == 202, r.text
            return await asyncio.gather(*watchers)
        streams = arun(watch())
        stored = w[0].history(sid, after=last)["events"]
        assert of(stored, "done") and all(s == stored for s in streams)
    finally:
        for x in w:
            x.stop()


def test_events_whose_notice_was_lost_reach_subscribers_at_the_next_renewal(tmp_path, llm,
                                                                           postgres):
    """A notice can be lost (the listening connection dropped); a row
    stored with none at all stands for it.  The subscriber behind gets it
    by the next lease renewal's check of each session's newest seq."""
    (tmp_path / "w").mkdir()
    w = ServerProcess(tmp_path / "w", llm, db=postgres.database(), extra_env=WORKER_ENV)
    try:
        sid = w.chat("say: ready")["session_id"]
        w.wait_status(sid)
        last = w.history(sid)["last_seq"]
        event = {"seq": last + 1, "session_id": sid, "type": "error", "ts": time.time(),
                 "message": "stored elsewhere, its notice lost", "retrying": False}

        async def watch():
            got = asyncio.ensure_future(ws_collect(w.ws_url(), sid, after=last,
                                                   until=lambda e: True, timeout=10))
            await asyncio.sleep(0.5)                        # subscribed and caught up
            await asyncio.to_thread(
                w.sql, "INSERT INTO events (session_id, seq, type, data) VALUES (?, ?, ?, ?)",
                (sid, last + 1, "error", json.dumps(event)))
            return await got
        assert arun(watch()) == [event]
    finally:
        w.stop()


def test_a_worker_that_lost_its_lease_stores_nothing_more_of_its_runs(tmp_path, llm, postgres):
    """A worker that looks dead (its lease ran out: here it is set in the
    past, as a long stall would leave it) stops its run, which is ended
    `interrupted` once; and a run whose claim another worker took (here
    moved by hand, as a sweep after a stall the worker has not noticed yet
    would) stores nothing more (the fence).  The worker goes on serving."""
    dsn = postgres.database()
    w = start_workers(tmp_path, llm, dsn, 2)
    try:
        sid = w[0].chat("run: sleep 2; echo late")["session_id"]
        w[1].wait_event(sid, "tool_call")
        w[0].sql("UPDATE workers SET lease_until = now() - interval '1 second' WHERE id = "
                 "(SELECT owner FROM runs WHERE session_id = ?)", (sid,))
        h = w[1].wait_status(sid, timeout=15)
        assert h["events"][-1]["status"] == "interrupted"
        w[0].wait_no_runs()                            # its run is over: whatever it did
        events = w[1].history(sid)["events"]
        assert len(of(events, "done")) == 1
        assert not any("late" in e.get("output", "") for e in of(events, "tool_result"))
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert w[0].chat("say: still here", sid)
        assert of(w[0].wait_status(sid)["events"], "done")[-1]["status"] == "done"

        other = w[0].chat("run: sleep 2; echo late")["session_id"]
        w[1].wait_event(other, "tool_call")
        w[0].sql("UPDATE runs SET owner = 'a-worker-gone' WHERE session_id = ?", (other,))
        h = w[1].wait_status(other, timeout=15)
        assert h["events"][-1]["status"] == "interrupted"
        w[0].wait_no_runs()
        events = w[1].history(other)["events"]
        assert len(of(events, "done")) == 1
        assert not any("late" in e.get("output", "") for e in of(events, "tool_result"))
    finally:
        for x in w:
            x.stop()


def test_a_worker_is_known_dead_at_once_only_on_its_own_machine_boot_and_pid_namespace():
    """gone_here: a worker id names host, pid, boot and PID namespace; only
    one of ours whose process has exited is dead without its lease."""
    import agent_web as web
    me = web.worker_name()
    host, pid, rand, boot = me.split(":")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = f"{host}:{child.pid}:{rand}:{boot}"
    assert not web.gone_here(me) and web.gone_here(dead)
    assert not web.gone_here(f"{host}:{child.pid}:{rand}:0000-1")        # another boot
    assert not web.gone_here(f"elsewhere:{child.pid}:{rand}:{boot}")     # another machine
    assert not web.gone_here(f"{host}:{child.pid}:{rand}:")              # no boot known
