"""agent_core.py — the Mini Agent: LLM clients, tools and the agent loop.

What this is
    The part of Mini Agent Web that thinks and acts, with no web server in it.
    `agent_web.py` drives it for the browser; `python agent_core.py` drives the
    very same loop from a terminal:

        python agent_core.py                 # interactive, workspace = ./workspace
        python agent_core.py -w DIR -t "list the files"   # one task, then exit

How one user message flows through this file
    1. The caller keeps a *history*: a list of plain dicts in a neutral shape
       (see "Conversation" below) and appends {"role": "user", ...}.
    2. `Agent.run(history)` is an async generator.  Each step it asks the LLM
       client to stream a reply.  Text and thinking fragments come out as
       `delta` events; the finished reply becomes `thinking`, `message` and
       `tool_call` events and is appended to the history.
    3. Each tool call is (optionally) approved, run by the `Toolbox`, and
       reported as a `tool_result` (a running `bash` streams its output as
       `tool_output` events first); the result goes into the history and the
       loop asks the LLM again.  A reply with no tool calls ends the run with a
       `done` event.  Every event is a dict shaped as in DESIGN.md, without
       `seq`/`session_id`/`ts`: the server's store adds those.
    4. `Agent.cancel()` stops the run at any moment (mid-stream, mid-tool,
       while waiting for approval).  The generator then closes every open tool
       call with a result that says so and yields `done` with `cancelled`, so
       the history is always one the providers accept.

LLM protocols (raw httpx, streaming Server-Sent Events, no vendor SDK)
    AnthropicClient  POST {base}/v1/messages          (also MiniMax's endpoint)
    OpenAIClient     POST {base}/chat/completions     (OpenAI, Ollama, vLLM, ...)
    DemoClient       offline; honest that it is a demo; still calls a tool.
    `stream_with_retries` wraps any of them: 429/5xx/529/time-outs are retried
    with exponential back-off and jitter (honouring Retry-After); 400/401/403/
    404 and TLS certificate failures are reported once and not retried.  Under
    httpx, `AsyncioBackend` is the socket layer (cheaper per read than
    anyio's; see its section), and a server whose event loop is busy reads
    the model's streams less often, several tokens a read (`ReadPacer`).
    Both clients build each request from
    `repair_history(history)`, so no stored log (a crash, a cancel, a failed
    tool) can make a request the provider refuses; a step that runs past its
    limits (characters and bytes per token of AGENT_MAX_TOKENS, a deadline)
    is stopped and says which limit stopped it.

Long sessions
    Before a step whose request would pass `token_limit`, the older turns are
    summarised by the model and replaced by that summary in the model's view
    (a `compaction` event; the store keeps everything); a server's "prompt is
    too long" is answered the same way ("Context compaction").  The tools
    `record_note` / `recall_notes` keep Mini-Agent's session notes in the
    workspace ("Session notes").

Mini-Agent's extensions, each its own section below
    Its `config.yaml` ("Mini-Agent's config files"), background commands
    (`bash` with `run_in_background`, `bash_output`, `bash_kill`), MCP servers'
    tools ("MCP client") and Claude Skills (`get_skill`).

What this is not
    A sandbox.  `bash` runs real commands as the user running the server; the
    file tools refuse paths outside the workspace (read_file may also read
    inside skill folders), `bash` cannot be confined.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import contextlib
import contextvars
import dataclasses
import errno
import functools
import json
import logging
import os
import random
import re
import signal
import ssl
import stat
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import httpcore
import httpx

try:
    import fcntl                      # POSIX: session notes lock their folder
except ImportError:                   # pragma: no cover (Windows: one writer at a time)
    fcntl = None
try:
    import termios                    # POSIX: Esc stops a task in the terminal front end
    import tty
except ImportError:                   # pragma: no cover (Windows: Ctrl+C only)
    termios = tty = None

log = logging.getLogger("agent_core")

# =============================================================================
# Configuration
# =============================================================================

DEFAULT_MAX_STEPS = 30            # LLM calls per user message before `max_steps`
DEFAULT_MAX_TOKENS = 8192         # output budget per LLM call
BASH_TIMEOUT_DEFAULT = 120        # seconds, when the model gives none
BASH_TIMEOUT_MAX = 600            # the model may not ask for more
OUTPUT_HEAD_CHARS = 12_000        # long tool output keeps this much of its start
OUTPUT_TAIL_CHARS = 8_000         # ... and this much of its end
LIVE_OUTPUT_CHARS = 12_000        # a running command's output shown live, at most
READ_FILE_MAX_BYTES = 10_000_000  # read_file refuses bigger files outright
READ_FILE_MAX_CHARS = 100_000     # and cuts what it returns at this size
RETRY_ATTEMPTS = 5                # tries per LLM call, the first one included
RETRY_BASE_DELAY = 1.0            # seconds; doubles each retry, with jitter
RETRY_MAX_DELAY = 60.0            # no single wait is longer than this
STEP_TIMEOUT = 600.0              # seconds one LLM step may take, retries included
# A server that ignores max_tokens must not stream for ever: a step may bring
# this many characters of text and thinking per token of AGENT_MAX_TOKENS
# (a token is ~4), and its whole stream this many bytes per token (one JSON
# envelope per token is ~200).  One SSE event may not pass MAX_SSE_EVENT_BYTES.
STEP_CHARS_PER_TOKEN = 16
STREAM_BYTES_PER_TOKEN = 2_000
MAX_SSE_EVENT_BYTES = 16 << 20
# After a stream's last event, how long its body's end may take to come
# before the connection is dropped rather than kept (_read_to_the_end).
END_OF_BODY_WAIT = 0.25           # seconds
DEFAULT_TOKEN_LIMIT = 80_000      # context size past which older turns are summarised
ANTHROPIC_VERSION = "2023-06-01"
MINIMAX_BASE_URL = "https://api.minimax.io/anthropic"

DEFAULT_MODELS = {
    "anthropic": "claude-sonnet-4-5",
    "openai": "gpt-4.1-mini",
    "minimax": "MiniMax-M2.5",          # upstream Mini-Agent's default since its M2.5 release
    "demo": "demo (offline)",
}

SYSTEM_PROMPT = """You are Mini Agent, a capable assistant working in a \
workspace folder on the user's machine. You can run shell commands with `bash` \
and read, write and edit files with the file tools. Paths are relative to the \
workspace. Work step by step, check your results, and finish with a short \
summary of what you did."""

APPROVAL_MODES = ("auto", "ask", "ask-all")   # see needs_approval()
WRITE_TOOLS = {"bash", "write_file", "edit_file"}


@dataclass
class LLMConfig:
    """Where and how to reach the model.  `provider` picks the wire protocol."""
    provider: str                 # "anthropic" | "openai" | "demo"
    model: str
    api_key: str = ""
    base_url: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    thinking_budget: int = 0      # >0 asks Anthropic models for extended thinking
    connect_timeout: float = 10.0
    read_timeout: float = 300.0   # silence on an open stream before we give up
    step_timeout: float = STEP_TIMEOUT   # a whole step, however steadily it trickles
    retry_attempts: int = RETRY_ATTEMPTS
    retry_base_delay: float = RETRY_BASE_DELAY
    retry_max_delay: float = RETRY_MAX_DELAY
    retry_exp_base: float = 2.0   # each wait is this many times the last (before jitter)
    token_limit: int = DEFAULT_TOKEN_LIMIT   # see "Context compaction"
    system_prompt: str = SYSTEM_PROMPT

    @property
    def label(self) -> str:
        return "demo" if self.provider == "demo" else f"{self.provider}:{self.model}"


def env_number(env, name: str, kind: type = int) -> Any:
    """A numeric setting, None when unset; a malformed one is a ValueError
    that names it (both front ends turn that into a usage error)."""
    value = env.get(name)
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, "
                         f"not {value!r}") from None


def config_from_env(provider: str | None = None, model: str | None = None,
                    env: dict[str, str] | None = None, token_limit: int | None = None,
                    file: "ConfigFile | None" = None) -> LLMConfig:
    """Settings the way the official SDKs read them: flags (arguments) beat
    environment variables beat Mini-Agent's config file (see its section)
    beat defaults.

    MINIMAX_API_KEY selects the Anthropic protocol at MiniMax's endpoint; with
    no key at all we fall back to the offline demo model rather than failing,
    so `python agent_web.py` always shows the whole loop working.
    """
    env = os.environ if env is None else env
    fv = file.values if file else {}
    provider = provider or env.get("AGENT_PROVIDER") or ""
    model = model or env.get("AGENT_MODEL") or ""
    extra: dict[str, Any] = file.llm_settings() if file else {}
    for name, field_name, kind in (("AGENT_LLM_READ_TIMEOUT", "read_timeout", float),
                                   ("AGENT_RETRY_BASE_DELAY", "retry_base_delay", float),
                                   ("AGENT_THINKING_BUDGET", "thinking_budget", int),
                                   ("AGENT_MAX_TOKENS", "max_tokens", int),
                                   ("AGENT_STEP_TIMEOUT", "step_timeout", float),
                                   ("AGENT_TOKEN_LIMIT", "token_limit", int)):
        value = env_number(env, name, kind)
        if value is not None:
            extra[field_name] = value
    if token_limit is not None:               # --token-limit beats AGENT_TOKEN_LIMIT
        extra["token_limit"] = token_limit
    if extra.get("token_limit", DEFAULT_TOKEN_LIMIT) < 1000:
        raise ValueError(f"the token limit (AGENT_TOKEN_LIMIT, --token-limit) must be at "
                         f"least 1,000 tokens, not {extra['token_limit']}")

    # A key in the environment beats the file's; the file's LLM is used when
    # no provider key is set, or when its provider is the one asked for.
    file_provider = fv.get("provider", "anthropic") if fv.get("api_key") else None
    if not provider:
        if env.get("ANTHROPIC_API_KEY"):
            provider = "anthropic"
        elif env.get("MINIMAX_API_KEY"):
            provider = "minimax"
        elif env.get("OPENAI_API_KEY"):
            provider = "openai"
        else:
            provider = file_provider or "demo"
    mine = provider == file_provider
    if mine:
        model = model or fv.get("model", UPSTREAM_MODEL)
    if provider == "minimax":
        return LLMConfig("anthropic", model or DEFAULT_MODELS["minimax"],
                         env.get("MINIMAX_API_KEY", ""),
                         env.get("MINIMAX_BASE_URL", MINIMAX_BASE_URL), **extra)
    if provider == "anthropic":
        return LLMConfig("anthropic", model or DEFAULT_MODELS["anthropic"],
                         env.get("ANTHROPIC_API_KEY") or (mine and fv["api_key"])
                         or env.get("MINIMAX_API_KEY", ""),
                         env.get("ANTHROPIC_BASE_URL") or (mine and file.base_url())
                         or "https://api.anthropic.com", **extra)
    if provider == "openai":
        return LLMConfig("openai", model or DEFAULT_MODELS["openai"],
                         env.get("OPENAI_API_KEY") or (mine and fv["api_key"]) or "",
                         env.get("OPENAI_BASE_URL") or (mine and file.base_url())
                         or "https://api.openai.com/v1", **extra)
    if provider == "demo":
        return LLMConfig("demo", DEFAULT_MODELS["demo"], **extra)
    raise ValueError(f"unknown provider {provider!r} (anthropic, openai, minimax or demo)")


# =============================================================================
# Mini-Agent's config files: config.yaml and system_prompt.md
# =============================================================================
#
# A Mini-Agent user's `config.yaml` works here unchanged.  It is found where
# upstream looks: `--config PATH`, else ./mini_agent/config/config.yaml, else
# ~/.mini-agent/config/config.yaml; its `system_prompt.md` and `mcp.json`
# are named relative to its folder.  Every upstream field is honoured, with
# upstream's defaults where it has them (api_base https://api.minimax.io,
# model MiniMax-M2.5, provider anthropic; for MiniMax hosts only, /anthropic
# or /v1 is added to api_base as upstream's client does), plus `token_limit`.
# The YAML is read with PyYAML's safe loader.  An unknown field is a warning
# (a typo must not pass silently, nor stop a start); a value of the wrong
# type is a usage error that names the field and the file.  Upstream's
# `retry.max_retries` counts retries, our `retry_attempts` tries: one more.
# `system_prompt.md` replaces the built-in system prompt; its
# `{SKILLS_METADATA}` placeholder is filled with the skills' names and
# descriptions (see "Claude Skills").  And as upstream's agent does, a prompt
# that does not say where the agent works gets a "Current Workspace"
# section naming the workspace's absolute path (`with_workspace`): the
# model can then read the absolute paths it meets (a skill's files, a
# command's output) against it.

UPSTREAM_API_BASE = "https://api.minimax.io"
UPSTREAM_MODEL = "MiniMax-M2.5"
PLACEHOLDER_KEY = "YOUR_API_KEY_HERE"          # config-example.yaml's
CONFIG_FIELDS: dict[str, Any] = {
    "api_key": str, "api_base": str, "model": str, "provider": ("anthropic", "openai"),
    "retry.enabled": bool, "retry.max_retries": int, "retry.initial_delay": float,
    "retry.max_delay": float, "retry.exponential_base": float,
    "max_steps": int, "workspace_dir": str, "system_prompt_path": str, "token_limit": int,
    "tools.enable_file_tools": bool, "tools.enable_bash": bool, "tools.enable_note": bool,
    "tools.enable_skills": bool, "tools.skills_dir": str,
    "tools.enable_mcp": bool, "tools.mcp_config_path": str,
    "tools.mcp.connect_timeout": float, "tools.mcp.execute_timeout": float,
    "tools.mcp.sse_read_timeout": float,
}


def config_search_path(cwd: Path | None = None, home: Path | None = None) -> list[Path]:
    return [(cwd or Path.cwd()) / "mini_agent" / "config" / "config.yaml",
            (home or Path.home()) / ".mini-agent" / "config" / "config.yaml"]


@dataclass
class ConfigFile:
    path: Path
    values: dict[str, Any]               # flat: "retry.max_retries" -> 3
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def find(cls, explicit: str | None = None, cwd: Path | None = None,
             home: Path | None = None) -> "ConfigFile | None":
        """The config file in upstream's search order, None if there is none."""
        if explicit:
            path = Path(explicit).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"--config {explicit}: no such file")
            return cls.read(path)
        for path in config_search_path(cwd, home):
            if path.is_file():
                return cls.read(path)
        return None

    @classmethod
    def read(cls, path: Path) -> "ConfigFile":
        import yaml           # PyYAML: only a front end that reads a config needs it
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot be read as YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top")
        values, warnings = {}, []

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                name = f"{prefix}{key}"
                if isinstance(value, dict) and any(f.startswith(name + ".")
                                                   for f in CONFIG_FIELDS):
                    walk(value, name + ".")
                elif name not in CONFIG_FIELDS:
                    warnings.append(f"{path}: unknown field {name!r} (ignored)")
                elif value is not None:
                    values[name] = cls._checked(path, name, value)
        walk(data, "")
        if values.get("api_key") == PLACEHOLDER_KEY:
            raise ValueError(f"{path}: api_key is still the example's {PLACEHOLDER_KEY}: put "
                             "your key there, or remove the line for the offline demo model")
        for w in warnings:
            log.warning("%s", w)
        return cls(path, values, warnings)

    @staticmethod
    def _checked(path: Path, name: str, value: Any) -> Any:
        want = CONFIG_FIELDS[name]
        if isinstance(want, tuple):
            if value not in want:
                raise ValueError(f"{path}: {name} must be one of {', '.join(want)}, "
                                 f"not {value!r}")
            return value
        if want is bool or want is str:
            ok = isinstance(value, want)
        else:                    # a number; YAML's `true` is not one, 3.0 is a whole one
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and (want is float or float(value).is_integer()))
        if not ok:
            kind = {bool: "true or false", int: "a whole number", float: "a number",
                    str: "a string"}[want]
            raise ValueError(f"{path}: {name} must be {kind}, not {value!r}")
        if want in (int, float) and value < 0:
            raise ValueError(f"{path}: {name} must not be negative, not {value!r}")
        return want(value)

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def toolbox_options(self) -> dict[str, bool]:
        """Toolbox(**options): upstream's tools.enable_* switches."""
        return {"file_tools": self.get("tools.enable_file_tools", True),
                "bash": self.get("tools.enable_bash", True),
                "notes": self.get("tools.enable_note", True)}

    def relative(self, name: str, default: str) -> Path:
        """A path setting; upstream reads config-folder files relative to it."""
        return (self.path.parent / self.values.get(name, default)).resolve()

    def base_url(self) -> str:
        base = self.values.get("api_base", UPSTREAM_API_BASE).rstrip("/")
        if self.values.get("provider", "anthropic") == "openai" and _is_host(
                base, MINIMAX_HOSTS) and not base.endswith("/v1"):
            base += "/v1"                 # (anthropic_base() adds /anthropic itself)
        return base

    def llm_settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        v = self.values
        if v.get("retry.enabled") is False:
            out["retry_attempts"] = 1
        elif "retry.max_retries" in v:
            out["retry_attempts"] = v["retry.max_retries"] + 1
        for name, field_name in (("retry.initial_delay", "retry_base_delay"),
                                 ("retry.max_delay", "retry_max_delay"),
                                 ("retry.exponential_base", "retry_exp_base"),
                                 ("token_limit", "token_limit")):
            if name in v:
                out[field_name] = v[name]
        prompt = self.relative("system_prompt_path", "system_prompt.md")
        if prompt.is_file():
            text = prompt.read_text(encoding="utf-8", errors="replace")
            out["system_prompt"] = text.strip()      # {SKILLS_METADATA}: see with_skills
        elif "system_prompt_path" in v:
            log.warning("%s: system_prompt_path %s does not exist; the built-in system "
                        "prompt is used", self.path, prompt)
        return out


def with_workspace(prompt: str, workspace: str | Path) -> str:
    """The system prompt with upstream's "Current Workspace" section, unless
    it has one of its own."""
    if "Current Workspace" in prompt:
        return prompt
    return (f"{prompt}\n\n## Current Workspace\nYou are currently working in: "
            f"`{Path(workspace).absolute()}`\nAll relative paths will be resolved relative "
            "to this directory.")


# =============================================================================
# Errors
# =============================================================================

class LLMError(Exception):
    """A failed LLM call.  `retryable` decides whether we try again."""

    def __init__(self, message: str, *, retryable: bool = False,
                 retry_after: float | None = None, status: int | None = None,
                 too_long: bool = False, context_limit: int | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status
        # The server says the prompt does not fit its context (see "Context
        # compaction"); `context_limit` is its size in tokens when it says.
        self.too_long = too_long
        self.context_limit = context_limit


class ToolError(Exception):
    """A tool failed in a way the model should read and can recover from."""


class RunCancelled(Exception):
    """Raised inside the agent loop when `Agent.cancel()` was called."""


# =============================================================================
# Conversation: the neutral history and how to rebuild it from events
# =============================================================================
#
# history entries:
#   {"role": "user", "content": str}
#   {"role": "assistant", "message_id": str, "text": str,
#    "thinking": [{"thinking": str, "signature": str} | {"redacted": str}],
#    "tool_calls": [{"id": str, "name": str, "input": dict}]}
#   {"role": "tool", "call_id": str, "tool": str, "output": str, "is_error": bool}
#
# Each provider client turns this into its own wire format, so a session can
# even switch provider between runs.

def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def history_from_events(events: list[dict], measure: dict | None = None) -> list[dict]:
    """Rebuild the neutral history from stored events (after a restart, say).

    `delta`s are skipped (the `message` supersedes them); a `message` marked
    `incomplete` (a cut stream or a cancel) is shown to the user but was never
    part of the conversation, so it is skipped too.  From the newest
    `compaction` on, its summary stands for every event up to its
    `through_seq` (see "Context compaction").  Each entry keeps the `seq` of
    its first event.  `measure`, if given, receives the context size the
    provider last reported: {"tokens", "entries"} (the history's length then).
    """
    history: list[dict] = []
    turns: dict[str, dict] = {}
    through = -1
    for ev in reversed(events):
        if ev.get("type") == "compaction":
            history.append(summary_entry(ev))
            through = ev.get("through_seq", -1)
            break
    last_measure: tuple[int, dict | None] | None = None

    def at(ev: dict, entry: dict) -> dict:
        if "seq" in ev:
            entry["seq"] = ev["seq"]
        return entry

    def turn(ev: dict) -> dict:
        mid = ev["message_id"]
        if mid not in turns:
            turns[mid] = at(ev, {"role": "assistant", "message_id": mid, "text": "",
                                 "thinking": [], "tool_calls": []})
            history.append(turns[mid])
        return turns[mid]

    for ev in events:
        kind = ev.get("type")
        if ev.get("seq", 0) <= through:
            continue
        if kind == "message" and ev.get("role") == "user":
            history.append(at(ev, {"role": "user", "content": ev["content"]}))
        elif kind == "message" and ev.get("role") == "assistant" and not ev.get("incomplete"):
            turn(ev)["text"] = ev["content"]
        elif kind == "thinking":
            block = ({"redacted": ev["redacted"]} if ev.get("redacted")
                     else {"thinking": ev["content"], "signature": ev.get("signature", "")})
            turn(ev)["thinking"].append(block)
        elif kind == "tool_call":
            turn(ev)["tool_calls"].append(
                {"id": ev["call_id"], "name": ev["tool"], "input": ev["input"]})
        elif kind == "tool_result":
            history.append(at(ev, {"role": "tool", "call_id": ev["call_id"], "tool": ev["tool"],
                                   "output": ev["output"], "is_error": bool(ev["is_error"])}))
        elif kind == "context" and not ev.get("estimated"):
            last_measure = (ev["tokens"], history[-1] if history else None)
        elif kind == "compaction":
            last_measure = None       # measured before it: a longer history than now
    # An assistant turn that ended up with nothing in it (only an incomplete
    # message) must not reach a provider: empty content is a 400 there.
    history = [h for h in history if h["role"] != "assistant"
               or h["text"] or h["thinking"] or h["tool_calls"]]
    if measure is not None and last_measure is not None:
        tokens, entry = last_measure
        entries = next((i + 1 for i, h in enumerate(history) if h is entry), None)
        if entries is not None:
            measure.update(tokens=tokens, entries=entries)
    return history


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """Text that UTF-8, SQLite and every provider accept.  JSON may carry a
    lone surrogate (`"\\ud800"` is valid JSON, and a model may split an
    emoji's two halves across chunks): a pair becomes its character, a lone
    half U+FFFD.  Applied where text enters: the user's message, the model's
    output and tool calls, tool results."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def storable_value(value: Any) -> Any:
    """`storable` through a tool call's arguments (dicts, lists, strings)."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(k): storable_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable_value(v) for v in value]
    return value


def unfinished_result(stopped: str, so_far: str, ran_for: float | None = None,
                      started: bool | None = None) -> str:
    """The output of a tool call that never finished (a cancel, a crash),
    saying only what is known, so the model does not repeat a command that
    did run (and left its effects) believing it never did.  `started`:
    True (it ran for `ran_for` s), False (it never began), None (unknown:
    a crash; having printed something means it began)."""
    if started or so_far:
        took = f" after {ran_for:.1f} s" if ran_for is not None else ""
        return (f"Stopped{took}: {stopped} while this ran. It had started, so what it "
                f"did before that is done. Output so far:\n{so_far or '(none)'}")
    if started is False:
        return f"Not run: {stopped} before this tool call started."
    return (f"Interrupted: {stopped} before this tool call finished. It may have started "
            "(no output was seen): check its effects before running it again.")


def pending_tool_calls(history: list[dict]) -> list[dict]:
    """Tool calls of the last assistant turn that have no result yet."""
    for i in range(len(history) - 1, -1, -1):
        if history[i]["role"] == "assistant":
            done = {h["call_id"] for h in history[i + 1:] if h["role"] == "tool"}
            return [c for c in history[i]["tool_calls"] if c["id"] not in done]
        if history[i]["role"] == "user":
            return []
    return []


# What every provider accepts, and what a stored log may break (a crash
# between a tool call and its result, a run that ended in an internal error,
# a deny, a cancel, a cut stream, a session that switched provider):
#   - each tool call is answered by exactly one result, right after its turn,
#     before anything else is said; a result answers a call of that turn;
#   - no turn is empty: no blank message, no assistant turn of thinking alone;
#   - tool call ids are unique, and ids and names use [A-Za-z0-9_-] only;
#   - the conversation ends with the user's side (a message or results).
# `repair_history` makes any history so, and both clients send only what it
# returns: the one place, so no log can break a session for good.

CALL_NAME_RE = re.compile(r"[^A-Za-z0-9_-]")
CALL_NAME_OK = re.compile(r"[A-Za-z0-9_-]{1,64}")


def repair_history(history: list[dict]) -> list[dict]:
    """The neutral history made valid for any provider (see above); the
    history itself is left as it is."""
    out: list[dict] = []
    open_calls: list[tuple[str, dict]] = []   # (stored id, call) still unanswered
    used_ids: set[str] = set()

    def close_open() -> None:
        for _, call in open_calls:
            out.append({"role": "tool", "call_id": call["id"], "tool": call["name"],
                        "output": unfinished_result("the run ended", ""), "is_error": True})
        open_calls.clear()

    for h in history:
        if h["role"] == "tool":
            # Results name calls by their stored ids; one that answers no
            # open call of this turn (a duplicate, an orphan) is dropped.
            found = next((i for i, (sid, _) in enumerate(open_calls) if sid == h["call_id"]),
                         None)
            if found is not None:
                call = open_calls.pop(found)[1]
                out.append({"role": "tool", "call_id": call["id"], "tool": call["name"],
                            "output": h["output"] or "(no output)",
                            "is_error": bool(h["is_error"])})
            continue
        close_open()
        if h["role"] == "user":
            out.append({"role": "user", "content": h["content"] if h["content"].strip()
                        else "(an empty message)"})
            continue
        calls, stored = [], []
        for c in h["tool_calls"]:
            cid = CALL_NAME_RE.sub("_", c["id"] or "")[:64]
            if not cid or cid in used_ids:
                cid = new_id("call")
            used_ids.add(cid)
            name = CALL_NAME_RE.sub("_", c["name"] or "")[:64] or "unnamed_tool"
            call = {"id": cid, "name": name,
                    "input": c["input"] if isinstance(c["input"], dict) else {}}
            calls.append(call)
            stored.append((c["id"], call))
        text = h["text"] if h["text"].strip() else ""
        if not text and not calls:
            continue
        out.append({"role": "assistant", "message_id": h.get("message_id", ""), "text": text,
                    "thinking": h["thinking"], "tool_calls": calls})
        open_calls = stored
    if open_calls:
        close_open()
    if not out or out[-1]["role"] == "assistant":
        out.append({"role": "user", "content": "Continue."})
    return out


@dataclass
class Turn:
    """One finished assistant reply, as a client assembled it from the stream."""
    text: str = ""
    thinking: list[dict] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)   # id, name, input, input_error
    stop_reason: str = ""
    usage: dict = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    usage_reported: bool = True   # False: the server sent no usage for this reply


# =============================================================================
# LLM clients
# =============================================================================
#
# Every client has `async stream(history, tools) -> AsyncIterator[tuple]`
# yielding ("text", str) and ("thinking", str) fragments and, last, ("turn",
# Turn).  A client raises LLMError for anything that went wrong, and it never
# yields a "turn" for a stream that did not finish: a half-received tool call
# is never run.

async def sse_events(response: httpx.Response, max_bytes: int | None = None,
                     cursor: dict[str, str] | None = None) -> AsyncIterator[tuple[str, str]]:
    """Parse a text/event-stream body into (event, data) pairs (WHATWG rules);
    `cursor`, when given, keeps the last `id` and `retry` the stream set
    (MCP takes a stream up again with them; the models' streams set none).

    Our own splitting rather than httpx's `aiter_lines()`, for two reasons.
    SSE lines end only at CR, LF or CRLF, while `aiter_lines()` splits like
    `str.splitlines()`, also at U+2028, U+0085 and others that JSON carries
    unescaped inside a string: a model writing one of those would have cut
    its own data line in two.  And whole chunks of bytes are cut into events
    at once, with two generator layers less per chunk than text then lines.
    """
    # The bytes after the last complete event grow in place, and each chunk
    # is searched only where it is new: an event arriving in many small
    # chunks costs its length once, not once per chunk.
    rest = bytearray()
    first = b""                   # a byte order mark may still come
    start, held_cr = True, False
    # A generator left mid-way is closed at once (aclosing, here and in the
    # callers); else the garbage collector leaves its closing to an event
    # loop that may be gone by then ("Task was destroyed but it is pending!").
    total = 0
    try:
        async with contextlib.aclosing(response.aiter_bytes()) as chunks:
            async for chunk in chunks:
                total += len(chunk)
                if start:
                    first += chunk
                    if len(first) < 3:
                        continue
                    start, chunk = False, first.removeprefix(b"\xef\xbb\xbf")
                if held_cr:
                    chunk, held_cr = b"\r" + chunk, False
                if b"\r" in chunk:
                    # A CR at the very end may be the first half of a CRLF: hold it.
                    held_cr = chunk.endswith(b"\r")
                    chunk = chunk[:-1] if held_cr else chunk
                    chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                scanned = len(rest)
                rest += chunk
                end = rest.rfind(b"\n\n", max(0, scanned - 1))
                if end < 0:
                    if max_bytes is not None and total > max_bytes:
                        raise _too_many_bytes(max_bytes)
                    if len(rest) > MAX_SSE_EVENT_BYTES:
                        raise LLMError(f"the model server sent over {MAX_SSE_EVENT_BYTES:,} bytes "
                                       "without ending an event; the answer was stopped")
                    continue
                complete = bytes(rest[:end])
                del rest[:end + 2]
                for block in complete.split(b"\n\n"):
                    event = _sse_event(block, cursor)
                    if event is not None:
                        yield event
                # Checked after the chunk's events are out, so that the caller's own
                # finer limit (characters of text) is met first when it applies,
                # however the bytes happened to be cut into chunks.
                if max_bytes is not None and total > max_bytes:
                    raise _too_many_bytes(max_bytes)
    except httpx.TransportError as exc:
        # The server had answered: the connection failed in the middle of
        # its answer, which the error says (not "cannot reach").
        raise _transport_error(exc, str(response.request.url.copy_with(query=None)),
                               midway=True) from exc
    # A last event with no blank line after it.
    tail = bytes(first if start else rest) + (b"\r" if held_cr else b"")
    event = _sse_event(tail.replace(b"\r", b"\n"), cursor)
    if event is not None:
        yield event


async def _read_to_the_end(events: AsyncIterator[tuple[str, str]],
                           seconds: float = END_OF_BODY_WAIT) -> None:
    """After a stream's last event, read its body to the end: httpx keeps a
    connection for the next request only if the response was read whole,
    and a chunked body (the providers' framing) ends with one more chunk,
    which usually comes with the last event or just after it.  Closed
    before that, the connection was dropped, and every step of a run paid a
    new TCP and TLS handshake to the provider.  A server that goes on
    sending, or holds the body open, is left after `seconds`: the
    connection then closes, as before."""
    try:
        async with asyncio.timeout(seconds):
            async for _ in events:
                pass
    except (TimeoutError, LLMError, httpx.HTTPError):
        pass


def _too_many_bytes(limit: int) -> LLMError:
    return LLMError(f"the model server sent more than {limit:,} bytes for one answer: it "
                    "ignores its output limit (AGENT_MAX_TOKENS), so the answer was stopped")


def _sse_event(block: bytes, cursor: dict[str, str] | None = None) -> tuple[str, str] | None:
    """One event's lines (no blank line among them but maybe a leading one)."""
    event, data = "", []
    for line in block.decode("utf-8", "replace").split("\n"):
        if not line or line[0] == ":":
            continue                      # a leftover blank line, or a comment / keep-alive
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif cursor is not None and (name == "id" and "\0" not in value
                                     or name == "retry" and value.isascii() and value.isdigit()):
            cursor[name] = value          # (an event with no data sets them too)
    return (event or "message", "\n".join(data)) if data else None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None                      # an HTTP date: rare; fall back to back-off


async def _raise_for_status(response: httpx.Response, url: str) -> None:
    """Turn an HTTP error answer into one clear LLMError."""
    if response.status_code < 400:
        return
    body = (await response.aread()).decode("utf-8", "replace")
    try:
        detail = _error_detail(json.loads(body)) or body[:300]
    except ValueError:
        detail = body[:300]
    code = response.status_code
    too_long, limit = prompt_too_long(body)
    if too_long and code != 429:          # a rate limit on tokens is not this
        raise LLMError(f"the prompt is too long for the model at {url} ({code}): {detail}",
                       status=code, too_long=True, context_limit=limit)
    if code in (401, 403):
        msg = f"API key rejected ({code}) by {url}: {detail}"
    elif code == 404:
        msg = f"Not found (404) at {url} — check the base URL and model name: {detail}"
    else:
        msg = f"LLM error {code} from {url}: {detail}"
    retryable = code in (408, 409, 429, 529) or code >= 500
    raise LLMError(msg, retryable=retryable, retry_after=_retry_after(response), status=code)


# How servers say a prompt does not fit, and where they give the size:
# Anthropic "prompt is too long: 208656 tokens > 200000 maximum"; OpenAI code
# `context_length_exceeded`, "maximum context length is 8192 tokens"
# (vLLM too, which also says "Input prompt (N tokens) is too long and exceeds
# limit of M"); llama.cpp's `exceed_context_size_error` with "n_ctx" (a 400,
# some versions a 500 "Context size has been exceeded."); llama-cpp-python
# "Requested tokens (N) exceed context window of M"; Ollama and LM Studio
# "... exceeds the context length" / "context length exceeded".
_TOO_LONG = re.compile(
    r"prompt is too long|context_length_exceeded|maximum context length|"
    r"exceed_context_size_error|exceeds the available context size|context size has been "
    r"exceeded|exceed context window|exceeds? (?:the )?(?:context|limit of)|context length "
    r"exceeded|context window exceeded", re.I)
_CONTEXT_SIZE = re.compile(
    r"(\d[\d,]*) maximum|maximum context length is (\d[\d,]*)|exceeds limit of (\d[\d,]*)|"
    r"context window of (\d[\d,]*)|available context size \((\d[\d,]*)|\"n_ctx\":\s*(\d+)", re.I)


def prompt_too_long(body: str) -> tuple[bool, int | None]:
    """Whether an error body says the prompt does not fit, and the context
    size in tokens if it gives one."""
    if not _TOO_LONG.search(body):
        return False, None
    found = _CONTEXT_SIZE.search(body)
    size = next((g for g in found.groups() if g), None) if found else None
    return True, int(size.replace(",", "")) if size else None


def _error_detail(doc: Any) -> str:
    """The message in an error body, in the shapes servers use: OpenAI's and
    Anthropic's {"error": {"message"}}, Ollama's {"error": "..."}, FastAPI's
    {"detail": ...} (llama-cpp-python), vLLM's {"object": "error", "message"}."""
    if not isinstance(doc, dict):
        return str(doc)[:300]
    err = doc.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)[:300]
    for value in (err, doc.get("detail"), doc.get("message")):
        if value:
            return (value if isinstance(value, str) else json.dumps(value))[:300]
    return ""


def _parse_tool_input(raw: str) -> tuple[dict, str | None]:
    """Arguments arrive as JSON text in fragments; bad JSON is the model's error."""
    if not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        return {}, f"arguments are not valid JSON ({exc.msg}): {raw[:200]}"
    if not isinstance(value, dict):
        return {}, f"arguments must be a JSON object, got: {raw[:200]}"
    return value, None


MINIMAX_HOSTS = ("minimax.io", "minimaxi.com")


def _is_host(url: str, domains: tuple[str, ...]) -> bool:
    host = httpx.URL(url).host
    return any(host == d or host.endswith("." + d) for d in domains)


def anthropic_base(base_url: str) -> str:
    """The base URL `/v1/messages` is added to.  MiniMax's is taken with or
    without its `/anthropic` suffix, and a trailing `/v1` (the SDKs' base URLs
    have none) is dropped rather than doubled."""
    base = base_url.rstrip("/").removesuffix("/v1")
    if _is_host(base, MINIMAX_HOSTS) and not base.endswith("/anthropic"):
        base += "/anthropic"
    return base


class AnthropicClient:
    """Anthropic Messages API, streaming.  Also MiniMax's Anthropic endpoint."""

    def __init__(self, cfg: LLMConfig, http: httpx.AsyncClient | None):
        self.cfg, self.http = cfg, http
        self.url = anthropic_base(cfg.base_url) + "/v1/messages"
        self.stream_cap = cfg.max_tokens * STREAM_BYTES_PER_TOKEN
        # MiniMax answers 401 to x-api-key alone and wants the key as a
        # bearer token too (upstream Mini-Agent sends both).  Anthropic's own
        # API reads a bearer token as OAuth, so it gets only its own header.
        self.headers = {"x-api-key": cfg.api_key, "anthropic-version": ANTHROPIC_VERSION,
                        "content-type": "application/json", "accept": "text/event-stream"}
        if httpx.URL(self.url).host != "api.anthropic.com":
            self.headers["authorization"] = f"Bearer {cfg.api_key}"

    @staticmethod
    def _messages(history: list[dict]) -> list[dict]:
        out: list[dict] = []

        def add(role: str, blocks: list[dict]) -> None:
            # Consecutive same-role entries (tool results, then a user message
            # after a cancel) are merged: the API wants roles to alternate.
            # Results come first in a user turn, as the API requires, because
            # repair_history puts them right after their call.
            if out and out[-1]["role"] == role:
                out[-1]["content"].extend(blocks)
            else:
                out.append({"role": role, "content": blocks})

        for h in repair_history(history):
            if h["role"] == "user":
                add("user", [{"type": "text", "text": h["content"]}])
            elif h["role"] == "tool":
                add("user", [{"type": "tool_result", "tool_use_id": h["call_id"],
                              "content": h["output"], "is_error": h["is_error"]}])
            else:
                blocks = []
                for t in h["thinking"]:    # sent back verbatim, signature and all
                    if "redacted" in t:
                        blocks.append({"type": "redacted_thinking", "data": t["redacted"]})
                    elif t.get("signature") and t.get("thinking"):
                        # Unsigned thinking (another provider's, the demo's)
                        # is refused by the API: it stays on the page only.
                        blocks.append({"type": "thinking", "thinking": t["thinking"],
                                       "signature": t["signature"]})
                if h["text"]:
                    blocks.append({"type": "text", "text": h["text"]})
                for c in h["tool_calls"]:
                    blocks.append({"type": "tool_use", "id": c["id"], "name": c["name"],
                                   "input": c["input"]})
                add("assistant", blocks)
        return out

    def body(self, history: list[dict], tools: list[dict]) -> dict:
        body: dict[str, Any] = {
            "model": self.cfg.model, "max_tokens": self.cfg.max_tokens,
            "system": self.cfg.system_prompt, "messages": self._messages(history),
            "stream": True,
        }
        if tools:
            body["tools"] = [{"name": t["name"], "description": t["description"],
                              "input_schema": t["schema"]} for t in tools]
        if self.cfg.thinking_budget:
            body["thinking"] = {"type": "enabled", "budget_tokens": self.cfg.thinking_budget}
        return body

    async def stream(self, history: list[dict], tools: list[dict]) -> AsyncIterator[tuple]:
        body = self.body(history, tools)
        turn, blocks, finished = Turn(), {}, False
        async with self.http.stream("POST", self.url, json=body, headers=self.headers) as resp:
            await _raise_for_status(resp, self.url)
            async with contextlib.aclosing(sse_events(resp, self.stream_cap)) as events:
                async for event, data in events:
                    try:
                        msg = json.loads(data)
                    except ValueError:
                        raise LLMError(f"garbled stream from {self.url}: {data[:100]!r}",
                                       retryable=True) from None
                    kind = msg.get("type", event)
                    if kind == "message_start":
                        usage = msg.get("message", {}).get("usage", {})
                        turn.usage["input_tokens"] = sum(
                            usage.get(k) or 0 for k in ("input_tokens", "cache_read_input_tokens",
                                                        "cache_creation_input_tokens"))
                        turn.usage["output_tokens"] = usage.get("output_tokens", 0)
                    elif kind == "content_block_start":
                        block = dict(msg["content_block"])
                        block["json_parts"] = []
                        blocks[msg["index"]] = block
                    elif kind == "content_block_delta":
                        block, delta = blocks[msg["index"]], msg["delta"]
                        dtype = delta.get("type")
                        # Fragments are collected in lists and joined once at the
                        # end: `s = s + piece` copies the whole text every time.
                        if dtype == "text_delta":
                            block.setdefault("parts", []).append(delta["text"])
                            yield ("text", delta["text"])
                        elif dtype == "thinking_delta":
                            block.setdefault("parts", []).append(delta["thinking"])
                            yield ("thinking", delta["thinking"])
                        elif dtype == "signature_delta":
                            block["signature"] = block.get("signature", "") + delta["signature"]
                        elif dtype == "input_json_delta":
                            block["json_parts"].append(delta["partial_json"])
                    elif kind == "content_block_stop":
                        blocks[msg["index"]]["stopped"] = True
                    elif kind == "message_delta":
                        turn.stop_reason = (msg.get("delta", {}).get("stop_reason")
                                            or turn.stop_reason)
                        usage = msg.get("usage") or {}
                        if "output_tokens" in usage:     # cumulative, per the API
                            turn.usage["output_tokens"] = usage["output_tokens"]
                    elif kind == "message_stop":
                        finished = True
                        await _read_to_the_end(events)
                        break
                    elif kind == "error":
                        err = msg.get("error", {})
                        etype = err.get("type", "error")
                        raise LLMError(f"{etype} from {self.url}: {err.get('message', '')}",
                                       retryable=etype in ("overloaded_error", "api_error",
                                                           "rate_limit_error"))
                    # "ping" and event types added later are ignored on purpose.
        if not finished:
            raise LLMError(f"the stream from {self.url} ended before message_stop",
                           retryable=True)
        for index in sorted(blocks):
            b = blocks[index]
            streamed = "".join(b.get("parts", ()))
            if b["type"] == "text":
                turn.text += b.get("text", "") + streamed
            elif b["type"] == "thinking":
                turn.thinking.append({"thinking": b.get("thinking", "") + streamed,
                                      "signature": b.get("signature", "")})
            elif b["type"] == "redacted_thinking":
                turn.thinking.append({"redacted": b.get("data", "")})
            elif b["type"] == "tool_use":
                raw = "".join(b["json_parts"])
                if not raw and b.get("input"):
                    raw = json.dumps(b["input"])
                args, problem = _parse_tool_input(raw)
                turn.tool_calls.append({"id": b["id"], "name": b["name"], "input": args,
                                        "input_error": problem})
        yield ("turn", turn)


class OpenAIClient:
    """OpenAI Chat Completions, streaming; any OpenAI-compatible server.

    The compatible servers people run differ from OpenAI in small ways, each
    handled here (see README, "OpenAI-compatible servers"):
      - llama.cpp repeats a call's function name in every streamed chunk;
        Ollama's chunks may carry no `index`; arguments may come as an object;
      - llama.cpp refuses an assistant `content` of null: we send "";
      - OpenAI wants `max_completion_tokens` (its reasoning models refuse
        `max_tokens`); llama.cpp, Ollama, LM Studio and older vLLM read only
        `max_tokens`: so OpenAI's own hosts get the first, others the second;
      - reasoning comes as `reasoning_content` (DeepSeek, vLLM, llama.cpp),
        `reasoning` (Ollama, OpenRouter, LM Studio) or as a leading
        `<think>…</think>` inside the text (models served raw): all thinking;
      - usage may never be sent in a stream: the turn then says so.
    """

    OPENAI_HOSTS = ("openai.com", "openai.azure.com")

    def __init__(self, cfg: LLMConfig, http: httpx.AsyncClient | None):
        self.cfg, self.http = cfg, http
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.stream_cap = cfg.max_tokens * STREAM_BYTES_PER_TOKEN
        self.max_tokens_field = ("max_completion_tokens" if _is_host(self.url, self.OPENAI_HOSTS)
                                 else "max_tokens")
        self.headers = {"authorization": f"Bearer {cfg.api_key}",
                        "content-type": "application/json", "accept": "text/event-stream"}

    @staticmethod
    def _messages(history: list[dict], system: str = SYSTEM_PROMPT) -> list[dict]:
        out: list[dict] = [{"role": "system", "content": system}]
        for h in repair_history(history):
            if h["role"] == "user":
                out.append({"role": "user", "content": h["content"]})
            elif h["role"] == "tool":
                out.append({"role": "tool", "tool_call_id": h["call_id"],
                            "content": h["output"]})
            else:
                msg: dict[str, Any] = {"role": "assistant", "content": h["text"]}
                if h["tool_calls"]:
                    msg["tool_calls"] = [
                        {"id": c["id"], "type": "function",
                         "function": {"name": c["name"], "arguments": json.dumps(c["input"])}}
                        for c in h["tool_calls"]]
                out.append(msg)
        return out

    def body(self, history: list[dict], tools: list[dict]) -> dict:
        body: dict[str, Any] = {
            "model": self.cfg.model, "stream": True,
            "messages": self._messages(history, self.cfg.system_prompt),
            "stream_options": {"include_usage": True},
            self.max_tokens_field: self.cfg.max_tokens,
        }
        if tools:              # OpenAI refuses an empty list (a summary asks with none)
            body["tools"] = [{"type": "function", "function": {
                "name": t["name"], "description": t["description"], "parameters": t["schema"]}}
                for t in tools]
        return body

    async def stream(self, history: list[dict], tools: list[dict]) -> AsyncIterator[tuple]:
        body = self.body(history, tools)
        turn, calls, finished = Turn(usage_reported=False), {}, False
        text, thinking = [], []          # fragments, joined once at the end
        think = ThinkTags()
        async with self.http.stream("POST", self.url, json=body, headers=self.headers) as resp:
            await _raise_for_status(resp, self.url)
            async with contextlib.aclosing(sse_events(resp, self.stream_cap)) as events:
                async for _event, data in events:
                    if data.strip() == "[DONE]":
                        finished = True
                        await _read_to_the_end(events)
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise LLMError(f"garbled stream from {self.url}: {data[:100]!r}",
                                       retryable=True) from None
                    if not isinstance(chunk, dict):
                        raise LLMError(f"garbled stream from {self.url}: {data[:100]!r}",
                                       retryable=True)
                    if chunk.get("error") or chunk.get("object") == "error":
                        raise LLMError(f"error from {self.url} mid-stream: {_error_detail(chunk)}",
                                       retryable=True)
                    if chunk.get("usage"):
                        turn.usage_reported = True
                        turn.usage["input_tokens"] = chunk["usage"].get("prompt_tokens") or 0
                        turn.usage["output_tokens"] = chunk["usage"].get("completion_tokens") or 0
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                        if isinstance(reasoning, str) and reasoning:
                            yield ("thinking", reasoning)
                            thinking.append(reasoning)
                        # A refusal (how Structured Outputs decline) comes instead
                        # of content, and is the answer the user should read.
                        content = delta.get("content") or delta.get("refusal")
                        if isinstance(content, str) and content:
                            for channel, piece in think.split(content):
                                (text if channel == "text" else thinking).append(piece)
                                yield (channel, piece)
                        for tc in delta.get("tool_calls") or []:
                            self._add_call_fragment(calls, tc)
                        if choice.get("finish_reason"):
                            turn.stop_reason = choice["finish_reason"]
        # Some compatible servers end without [DONE]; a finish_reason will do.
        if not finished and not turn.stop_reason:
            raise LLMError(f"the stream from {self.url} ended before [DONE]", retryable=True)
        for channel, piece in think.flush():
            (text if channel == "text" else thinking).append(piece)
            yield (channel, piece)
        turn.text = "".join(text)
        if thinking:
            turn.thinking.append({"thinking": "".join(thinking), "signature": ""})
        for index in sorted(calls):
            c = calls[index]
            args, problem = _parse_tool_input("".join(c["arguments"]))
            turn.tool_calls.append({"id": c["id"] or new_id("call"), "name": c["name"],
                                    "input": args, "input_error": problem})
        yield ("turn", turn)

    @staticmethod
    def _add_call_fragment(calls: dict[int, dict], tc: dict) -> None:
        """One streamed piece of a tool call, into its slot."""
        index = tc.get("index")
        if not isinstance(index, int):
            # No index (Ollama): a new id starts a new call, else it continues.
            last = calls[max(calls)] if calls else None
            new = last is None or (tc.get("id") and last["id"] and tc["id"] != last["id"])
            index = len(calls) if new else max(calls)
        slot = calls.setdefault(index, {"id": "", "name": "", "arguments": []})
        fn = tc.get("function") or {}
        slot["id"] = tc.get("id") or slot["id"]
        name = fn.get("name") or ""
        # OpenAI sends the name once; llama.cpp repeats it whole in every chunk.
        if name and name != slot["name"]:
            slot["name"] += name
        args = fn.get("arguments")
        if isinstance(args, dict):               # an object instead of JSON text
            args = json.dumps(args)
        if args:
            slot["arguments"].append(args)       # joined once, at the end


class ThinkTags:
    """Splits a leading `<think>…</think>` out of streamed text, as thinking.

    Models served without a reasoning parser (llama.cpp, LM Studio and
    Ollama in some set-ups) write their reasoning into the text itself.  Only
    a tag at the very start counts; the tags may arrive cut across chunks."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self):
        self.state = "start"      # start -> thinking -> text, or start -> text
        self.held = ""            # what may still be the start of a tag

    def split(self, piece: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        data = self.held + piece
        self.held = ""
        if self.state == "start":
            lead = data.lstrip()
            if self.OPEN.startswith(lead):          # still could be the tag
                self.held = data
                return out
            if lead.startswith(self.OPEN):
                self.state, data = "thinking", lead[len(self.OPEN):]
            else:
                self.state = "text"
        if self.state == "thinking":
            end = data.find(self.CLOSE)
            if end < 0:
                # Hold back a tail that may be the start of the closing tag.
                keep = next((k for k in range(len(self.CLOSE) - 1, 0, -1)
                             if data.endswith(self.CLOSE[:k])), 0)
                self.held, data = data[len(data) - keep:], data[:len(data) - keep]
                if data:
                    out.append(("thinking", data))
                return out
            if data[:end]:
                out.append(("thinking", data[:end]))
            self.state, data = "text", data[end + len(self.CLOSE):].lstrip("\n")
        if data:
            out.append(("text", data))
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What is held back when the stream ends."""
        held, self.held = self.held, ""
        return [("thinking" if self.state == "thinking" else "text", held)] if held else []


class DemoClient:
    """An offline stand-in model.  It says it is one, and still runs the loop.

    Ask it to "list the files" and it calls `bash ls -la`; write a command in
    backticks ("run `date`") and it runs that; anything else gets an honest
    explanation of how to connect a real model.
    """

    WORD_DELAY = 0.02   # seconds between streamed words, so streaming is visible

    def __init__(self, cfg: LLMConfig, http: httpx.AsyncClient | None = None):
        self.cfg = cfg

    async def _words(self, text: str, channel: str) -> AsyncIterator[tuple]:
        for word in re.findall(r"\S+\s*", text):
            await asyncio.sleep(self.WORD_DELAY)
            yield (channel, word)

    async def stream(self, history: list[dict], tools: list[dict]) -> AsyncIterator[tuple]:
        last = history[-1] if history else {"role": "user", "content": ""}
        turn = Turn(usage={"input_tokens": 0, "output_tokens": 0})
        if last["role"] == "user" and last["content"].startswith(SUMMARY_PROMPT):
            # A compaction's summary request: a summary, honestly mechanical.
            asked = re.findall(r"^## User\n(.*)$", last["content"], re.M)
            calls = len(re.findall(r"^-> calls ", last["content"], re.M))
            text = (f"(Demo model summary, not written by an LLM.) The user sent {len(asked)} "
                    f"message(s) in this part and the agent made {calls} tool call(s). "
                    "The user asked: " + "; ".join(a[:80] for a in asked[-5:]))
        elif last["role"] == "tool":
            lines = last["output"].strip().splitlines()
            shown = "\n".join(lines[:15]) + ("\n…" if len(lines) > 15 else "")
            verdict = "failed" if last["is_error"] else "finished"
            text = (f"The `{last['tool']}` call {verdict} with {len(lines)} line(s) of "
                    f"output:\n\n```\n{shown}\n```\n\nThat is the whole loop: I streamed "
                    "text, called a tool, and read its result. (Demo model — set an API "
                    "key for real answers.)")
        else:
            prompt = last.get("content", "")
            thought = f"The user wrote {len(prompt)} characters. I am the offline demo model."
            async for item in self._words(thought, "thinking"):
                yield item
            turn.thinking.append({"thinking": thought, "signature": ""})
            command = re.search(r"`([^`]+)`", prompt)
            if command or re.search(r"\b(list|files|ls)\b|文件|列出", prompt, re.I):
                cmd = command.group(1) if command else "ls -la"
                text = f"I'll run `{cmd}` in the workspace."
                turn.tool_calls.append({"id": new_id("demo"), "name": "bash",
                                        "input": {"command": cmd}, "input_error": None})
            else:
                text = ("**This is the offline demo model**, not a real LLM. It can show "
                        "you the whole agent loop: ask me to *list the files*, or to run "
                        "a command in backticks such as `uname -a`.\n\nFor real answers, "
                        "restart with a key: `ANTHROPIC_API_KEY=… python agent_web.py` "
                        "(or `OPENAI_API_KEY`, or `MINIMAX_API_KEY`).")
        async for item in self._words(text, "text"):
            yield item
        turn.text = text
        turn.usage["output_tokens"] = len(text.split())
        turn.stop_reason = "tool_use" if turn.tool_calls else "end_turn"
        yield ("turn", turn)


def make_llm(cfg: LLMConfig, http: httpx.AsyncClient):
    return {"anthropic": AnthropicClient, "openai": OpenAIClient,
            "demo": DemoClient}[cfg.provider](cfg, http)


def tls_context(env=None) -> ssl.SSLContext:
    """Certificates trusted for the LLM: the usual public roots (certifi's,
    as httpx has them) *plus* those in SSL_CERT_FILE / SSL_CERT_DIR.  httpx
    alone would trust only the file named there, so a company's own root
    would cost every public host."""
    import certifi                          # httpx's own dependency
    env = os.environ if env is None else env
    ctx = ssl.create_default_context(cafile=certifi.where())
    cafile, capath = env.get("SSL_CERT_FILE"), env.get("SSL_CERT_DIR")
    if cafile or capath:
        try:
            ctx.load_verify_locations(cafile=cafile or None, capath=capath or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"SSL_CERT_FILE / SSL_CERT_DIR ({cafile or capath}) cannot be "
                             f"loaded as certificates: {exc}") from None
    return ctx


# Every streaming step holds one connection for as long as the model writes
# (an MCP call over HTTP, for as long as its tool runs).  httpx's default pool
# stops at 100, so the 101st session at once would wait, showing nothing, for
# another's answer to end (and fail after the pool time-out): one connection
# per request in flight, then, however many; 20 kept for reuse.
UNCAPPED = httpx.Limits(max_connections=None, max_keepalive_connections=20)


def make_http_client(cfg: LLMConfig, read_pace: float = 0.0) -> httpx.AsyncClient:
    """httpx, on our socket layer; `read_pace` (seconds, 0: off) is ReadPacer's
    window, shared by all the client's connections."""
    timeout = httpx.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout,
                            write=30.0, pool=30.0)
    client = httpx.AsyncClient(timeout=timeout, verify=tls_context(), limits=UNCAPPED)
    backend = AsyncioBackend(ReadPacer(read_pace) if read_pace > 0 else None)
    # httpx has no public switch for the socket layer: each of its pools (one
    # more per proxy taken from the environment) keeps it in
    # `_network_backend`.  Should a version keep it elsewhere, httpx's own
    # stays in place: slower, never wrong.
    for transport in (client._transport, *client._mounts.values()):
        pool = getattr(transport, "_pool", None)
        if hasattr(pool, "_network_backend"):
            pool._network_backend = backend
    return client


# =============================================================================
# The socket under httpx
# =============================================================================
#
# httpx reaches sockets through httpcore's "network backend"; on asyncio that
# is anyio's, which for every read enters a cancel scope, asks sniffio which
# event loop is running and registers, then unregisters, the socket with
# epoll.  A model sends one token per read, so with 50 sessions streaming
# that was a fifth of the server's CPU (py-spy; bench/RESULTS.md).
# This backend keeps an asyncio Protocol reading into a buffer and hands the
# buffer over.  Everything above the socket (HTTP/1.1, TLS set-up, proxies,
# the pool) is still httpx's.

class _SocketProtocol(asyncio.Protocol):
    MAX_BUFFER = 256 * 1024        # read no further ahead than this

    def __init__(self, pacer: "ReadPacer | None" = None):
        self.pacer = pacer
        self.read_at = 0.0             # loop time the reader last took data (ReadPacer)
        self.held: asyncio.TimerHandle | None = None       # data held back (ReadPacer)
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False            # EOF, or the connection is lost
        self.error: Exception | None = None
        self.paused = False            # we stopped reading: the buffer is full
        self.waiter: asyncio.Future | None = None          # a read() waiting for data
        self.drained: asyncio.Future | None = None         # a write() waiting for room
        # The read time-out: one timer per connection, moved lazily.  A timer
        # per read (set, then cancelled a few ms later when the token came)
        # cost 4 % of the CPU a token with 120 sessions streaming (bench/paced.py).
        self.deadline = 0.0                                # loop time the waiter fails at
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > self.MAX_BUFFER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        if self.waiter is None or self.held is not None:
            return                      # the reader takes it when it comes, or at `held`
        if self.pacer is not None:
            loop = asyncio.get_running_loop()
            due = self.pacer.due(self.read_at, loop.time())
            if due is not None:
                self.held = loop.call_at(due, self._release)
                return
        self._wake("waiter")

    def _release(self) -> None:
        self.held = None
        self._wake("waiter")

    def eof_received(self) -> None:
        self.closed = True
        self._wake("waiter")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed, self.error = True, exc
        for timer in (self.timer, self.held):
            if timer is not None:
                timer.cancel()
        self.timer = self.held = None
        self._wake("waiter")
        self._wake("drained")

    def pause_writing(self) -> None:
        self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake("drained")

    def _wake(self, name: str) -> None:
        future = getattr(self, name)
        setattr(self, name, None)
        if future is not None and not future.done():
            future.set_result(None)

    def wait_for_data(self, timeout: float | None) -> asyncio.Future:
        """A future for the next data (or EOF), failing with ReadTimeout
        `timeout` s from now.  The timer, once set, is left where it is while
        reads keep coming; when it fires early it moves to the deadline."""
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        if timeout is not None:
            self.deadline = loop.time() + timeout
            if self.timer is None or self.timer.when() > self.deadline:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = loop.call_at(self.deadline, self._expire)
        return self.waiter

    def _expire(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return                      # nobody waits: a later read sets a new timer
        loop = asyncio.get_running_loop()
        if loop.time() < self.deadline:
            self.timer = loop.call_at(self.deadline, self._expire)
        else:
            self.waiter = None
            waiter.set_exception(httpcore.ReadTimeout("timed out"))


async def _wait(future: asyncio.Future, timeout: float | None, error: type) -> None:
    """Wait for a future the protocol resolves; `error` if it takes too long."""
    timer = None
    if timeout is not None:
        timer = asyncio.get_running_loop().call_later(
            timeout, lambda: future.done() or future.set_exception(error("timed out")))
    try:
        await future
    finally:
        if timer is not None:
            timer.cancel()


class _SocketStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _SocketProtocol):
        self._transport, self._protocol = transport, protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._protocol
        if not p.buffer and not p.closed:
            await p.wait_for_data(timeout)
        if p.buffer:
            data = bytes(p.buffer[:max_bytes])
            del p.buffer[:max_bytes]
            if p.pacer is not None:
                p.read_at = asyncio.get_running_loop().time()
            if p.paused and len(p.buffer) <= p.MAX_BUFFER // 2:
                p.paused = False
                self._transport.resume_reading()
            return data
        if p.error is not None:
            raise httpcore.ReadError(str(p.error))
        return b""                     # the peer closed: httpcore reports it

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        p = self._protocol
        if p.closed or self._transport.is_closing():
            raise httpcore.WriteError(str(p.error or "the connection is closed"))
        self._transport.write(buffer)
        if p.drained is not None:      # the kernel's buffer is full: wait for room
            await _wait(p.drained, timeout, httpcore.WriteTimeout)
            if p.error is not None:
                raise httpcore.WriteError(str(p.error))

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> "_SocketStream":
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(loop.start_tls(
                self._transport, self._protocol, ssl_context,
                server_hostname=server_hostname), timeout)
        except asyncio.TimeoutError:
            self._transport.close()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        self._protocol.transport = transport     # pause and resume the TLS layer now
        return _SocketStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":      # an idle pooled connection the server closed
            return self._protocol.closed or bool(self._protocol.buffer)
        name = {"ssl_object": "ssl_object", "client_addr": "sockname",
                "server_addr": "peername", "socket": "socket"}.get(info)
        return self._transport.get_extra_info(name) if name else None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, pacer: "ReadPacer | None" = None):
        self.protocol = functools.partial(_SocketProtocol, pacer)

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options=None) -> _SocketStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        return await self._connect(loop.create_connection(
            self.protocol, host, port, local_addr=local), timeout, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options=None) -> _SocketStream:
        loop = asyncio.get_running_loop()
        return await self._connect(loop.create_unix_connection(self.protocol, path),
                                   timeout, socket_options)

    @staticmethod
    async def _connect(connecting, timeout, socket_options) -> _SocketStream:
        try:
            transport, protocol = await asyncio.wait_for(connecting, timeout)
        except asyncio.TimeoutError:
            raise httpcore.ConnectTimeout("connecting timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        for option in socket_options or ():
            transport.get_extra_info("socket").setsockopt(*option)
        return _SocketStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# =============================================================================
# Read pacing: fewer, fuller reads of the model's streams when the loop is busy
# =============================================================================
#
# A model writes one token per write, so each token is a read of its own:
# a wake-up of the loop, httpcore's and h11's layers, our SSE split, a step
# of the run's task.  That costs the loop ~50 us whatever the read carries
# (bench/paced.py; a bare asyncio Protocol alone costs ~24 us a read here),
# and with 200 sessions streaming the loop's thread does little else.
#
# So, while the loop is busy, a connection that was handed data less than
# `window` ago holds what comes next until the window is up, and one read
# then carries every token that came meanwhile.  "Busy" is the loop thread's
# own CPU time over the last tenth of a second or so (one `thread_time()` a
# sample, taken when data comes): on after three looks in a row at 0.7 of
# it or more, so the burst of many runs starting at once does not engage
# it, and off again at the first look below 0.5, so a server near the line
# does not flip every look.  Near 0.7 the loop is close to full (the SQLite
# writer needs the rest of a core): below it the wait would only add
# latency, as measured at 50-150 sessions.  A lone session or a few never
# see it: their tokens are handed over as they come.  Events are still
# stored before they are shown; this only decides how often the LLM's bytes
# are read (bench/RESULTS.md, "Read pacing").

class ReadPacer:
    BUSY_ON, BUSY_OFF = 0.7, 0.5       # share of the loop thread's time
    SAMPLE = 0.1                       # seconds between two looks at it
    SUSTAINED = 3                      # busy looks in a row before it engages

    def __init__(self, window: float):
        self.window = window
        self.engaged = False
        self._busy_looks = 0
        self._looked_at = time.monotonic()      # the last look at the loop's CPU time
        self._cpu = time.thread_time()

    def due(self, read_at: float, now: float) -> float | None:
        """When a connection whose reader last took data at `read_at` may be
        handed more (loop time, as `now` is), or None: at once."""
        wall = time.monotonic()
        if wall - self._looked_at >= self.SAMPLE:
            cpu = time.thread_time()
            busy = (cpu - self._cpu) / (wall - self._looked_at)
            if self.engaged:
                self.engaged = busy >= self.BUSY_OFF
            else:
                self._busy_looks = self._busy_looks + 1 if busy >= self.BUSY_ON else 0
                self.engaged = self._busy_looks >= self.SUSTAINED
            self._looked_at, self._cpu = wall, cpu
        if not self.engaged or now - read_at >= self.window:
            return None
        return read_at + self.window


# =============================================================================
# Retries: a step that failed for a passing reason is asked again
# =============================================================================

def backoff_delay(attempt: int, base: float, retry_after: float | None,
                  most: float = RETRY_MAX_DELAY, factor: float = 2.0) -> float:
    """Exponential back-off with full jitter; the server's Retry-After wins."""
    if retry_after is not None:
        return min(retry_after, most)
    return min(most, base * (factor ** attempt)) * (0.5 + random.random() / 2)


def _transport_error(exc: httpx.TransportError, url: str, midway: bool = False) -> LLMError:
    """A failure below HTTP as one LLMError.  Most are transient (a refused
    or dropped connection) and retried; a TLS failure is not: the same
    certificate fails the same way on every try.  The message tells a server
    never reached from one that was, and `midway` (its answer had begun:
    see sse_events) one that stopped in the middle of it."""
    # Midway, the TLS handshake was long done: an SSL error then is a lost connection.
    cause: BaseException | None = None if midway else exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return LLMError(f"the TLS certificate of {url} is not trusted "
                        f"({cause.verify_message or cause.reason}). This is a certificate "
                        "problem, not a network one, so it is not retried. If the server's "
                        "certificate comes from your own authority, name its PEM file in "
                        "SSL_CERT_FILE (extra trusted roots).")
    if isinstance(cause, ssl.SSLError):
        return LLMError(f"the TLS handshake with {url} failed ({cause.reason or cause}); "
                        "check that the base URL's scheme and port speak HTTPS.")
    what = type(exc).__name__ + (f": {exc}" if str(exc) else "")
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return LLMError(f"cannot reach {url}: {what}", retryable=True)
    if isinstance(exc, httpx.ReadTimeout):
        said = "stopped sending in the middle of the answer" if midway else "did not answer in time"
        return LLMError(f"{url} {said} ({what}; AGENT_LLM_READ_TIMEOUT)", retryable=True)
    said = " in the middle of the answer" if midway else ""
    return LLMError(f"the connection to {url} was lost{said} ({what})", retryable=True)


async def stream_with_retries(llm, cfg: LLMConfig, history: list[dict],
                              tools: list[dict]) -> AsyncIterator[tuple]:
    """Like llm.stream(), plus ("retry", message, partial) items between tries.

    `partial` is True when fragments of the failed try were already yielded,
    so the caller can close that message as incomplete and start a new one.
    """
    for attempt in range(cfg.retry_attempts):
        yielded = False
        try:
            async for item in llm.stream(history, tools):
                yielded = yielded or item[0] != "turn"
                yield item
            return
        except (LLMError, httpx.TransportError) as exc:
            if isinstance(exc, httpx.TransportError):
                err = _transport_error(exc, getattr(llm, "url", "the LLM"))
            else:
                err = exc
            if not err.retryable or attempt + 1 >= cfg.retry_attempts:
                if err.retryable:
                    err.message += f" (gave up after {cfg.retry_attempts} tries)"
                raise err from None
            delay = backoff_delay(attempt, cfg.retry_base_delay, err.retry_after,
                                  cfg.retry_max_delay, cfg.retry_exp_base)
            yield ("retry", f"{err.message} — retrying in {delay:.1f} s "
                            f"(try {attempt + 2} of {cfg.retry_attempts})", yielded)
            await asyncio.sleep(delay)


# =============================================================================
# Tools
# =============================================================================

def validate_args(schema: dict, args: Any) -> str | None:
    """A small JSON-Schema check (object, required, property types, no extras).

    Enough for our flat tool schemas; returns a message for the model or None.
    """
    if not isinstance(args, dict):
        return "arguments must be a JSON object"
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in args:
            return f"missing required argument {name!r}"
    py_types = {"string": str, "integer": int, "boolean": bool, "number": (int, float)}
    for name, value in args.items():
        if name not in props:
            if schema.get("additionalProperties", True) is False:
                return f"unknown argument {name!r} (expected: {', '.join(props)})"
            continue
        want = props[name].get("type")
        ok = isinstance(value, py_types[want]) if want in py_types else True
        if want in ("integer", "number") and isinstance(value, bool):
            ok = False
        if not ok:
            return f"argument {name!r} must be of type {want}, got {type(value).__name__}"
    return None


def clip_output(text: str, head: int = OUTPUT_HEAD_CHARS, tail: int = OUTPUT_TAIL_CHARS) -> str:
    if len(text) <= head + tail:
        return text
    cut = len(text) - head - tail
    return f"{text[:head]}\n\n… [{cut:,} characters cut] …\n\n{text[-tail:]}"


def tool_failure(tool: str, args: dict, exc: Exception) -> str:
    """A short account of an exception from a tool, one the model can act on
    ("write_file: adir is a directory").  Unexpected ones are logged whole."""
    path = args.get("path") or getattr(exc, "filename", None) or ""
    if isinstance(exc, UnicodeError):
        return (f"{tool}: {path} is not UTF-8 text ({getattr(exc, 'reason', exc)}); "
                "use bash (iconv, sed) for files in other encodings")
    reasons = {IsADirectoryError: "{p} is a directory",
               NotADirectoryError: "a part of {p} is not a folder",
               FileNotFoundError: "{p}: no such file or folder",
               FileExistsError: "{p} already exists",
               PermissionError: "{p}: permission denied"}
    for kind, text in reasons.items():
        if isinstance(exc, kind):
            return f"{tool}: " + text.format(p=path or "the path")
    if isinstance(exc, OSError):
        return f"{tool}: {path + ': ' if path else ''}{exc.strerror or exc}"
    log.error("tool %s failed unexpectedly", tool, exc_info=exc)
    return f"{tool} failed: {type(exc).__name__}: {exc}"


def _is_link(name: str, folder_fd: int) -> bool:
    """Whether `name` in the folder open as `folder_fd` is a symbolic link
    (lstat through the descriptor: no path is looked up again)."""
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=folder_fd).st_mode)
    except OSError:
        return False


# Workspace file I/O (the file tools, the notes, the server's file routes)
# runs on threads of its own, not on asyncio's default executor: that one
# also looks up host names (getaddrinfo) for every LLM and MCP connection,
# so a workspace on a stalled disk or network mount would otherwise, once a
# few reads hung there, stop every session's model as well.
FILE_THREADS = ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4),
                                  thread_name_prefix="agent-files")


async def in_file_thread(fn: Callable, *args) -> Any:
    """asyncio.to_thread on FILE_THREADS (the caller's context goes along)."""
    work = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(FILE_THREADS, work)


class Toolbox:
    """The tools the model sees, bound to one workspace folder."""

    def __init__(self, workspace: str | Path, notes: bool = True, file_tools: bool = True,
                 bash: bool = True):
        self.workspace = Path(workspace).resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.tools: dict[str, tuple[dict, Callable[[dict], Awaitable[str]]]] = {}
        self.jobs = BackgroundJobs(self.workspace)      # see "Background commands"
        if bash:
            self.tools["bash"] = (BASH_SCHEMA, self.bash)
            self.tools["bash_output"] = (BASH_OUTPUT_SCHEMA, self.jobs.output)
            self.tools["bash_kill"] = (BASH_KILL_SCHEMA, self.jobs.kill)
        if file_tools:
            self.tools.update({"read_file": (READ_SCHEMA, self.read_file),
                               "write_file": (WRITE_SCHEMA, self.write_file),
                               "edit_file": (EDIT_SCHEMA, self.edit_file)})
        if notes:                                # see "Session notes"
            book = Notes(self.workspace)
            self.tools["record_note"] = (RECORD_NOTE_SCHEMA, book.record)
            self.tools["recall_notes"] = (RECALL_NOTES_SCHEMA, book.recall)
        self.source: dict[str, str] = {name: "built-in" for name in self.tools}
        self.read_only: set[str] = set()         # MCP tools that never ask (readOnlyHint)
        self.mcp: list[McpServer] = []
        self.read_roots: list[Path] = []         # skill folders read_file may read
        self.skills: Skills | None = None

    def add_skills(self, skills: "Skills") -> None:
        """Offer get_skill, and let read_file read inside the skills' folders."""
        if not skills.found:
            return
        self.skills = skills
        self.read_roots = sorted({s.folder for s in skills.found.values()})
        self.tools["get_skill"] = (GET_SKILL_SCHEMA, skills.get)
        self.source["get_skill"] = "skills"

    def add_mcp(self, server: "McpServer") -> None:
        """Offer a started MCP server's tools (see "MCP client"), and its new
        list whenever it says its tools changed."""
        self.mcp.append(server)
        server.on_tools_changed = self._offer_mcp
        self._offer_mcp(server)

    def _offer_mcp(self, server: "McpServer") -> None:
        ours = f"mcp:{server.name}"
        for name in [n for n, source in self.source.items() if source == ours]:
            del self.tools[name], self.source[name]
            self.read_only.discard(name)
        for tool in server.tools:
            name = tool.get("name") or ""
            offered = name
            if not CALL_NAME_OK.fullmatch(offered) or offered in self.tools:
                offered = CALL_NAME_RE.sub("_", f"{server.name}_{name}")[:64]
                log.warning("MCP server %s: tool %r is offered as %r (the name was taken "
                            "or not allowed)", server.name, name, offered)
            schema = dict(tool.get("inputSchema") or {"type": "object"})
            schema["description"] = tool.get("description") or f"{name} (MCP: {server.name})"

            async def run(args: dict, server=server, name=name) -> str:
                return await server.call(name, args)
            self.tools[offered] = (schema, run)
            self.source[offered] = f"mcp:{server.name}"
            if (tool.get("annotations") or {}).get("readOnlyHint") is True:
                self.read_only.add(offered)

    def describe(self) -> dict:
        """What the model is offered, by source, and each MCP server's state
        (GET /agent/tools and the terminal's /tools)."""
        return {"tools": [{"name": name, "source": self.source.get(name, "built-in"),
                           "description": schema.get("description", ""),
                           "asks_first": self.writes(name)}
                          for name, (schema, _) in self.tools.items()],
                "mcp_servers": [{"name": s.name, "transport": s.transport, "state": s.state,
                                 "error": s.error, "tools": len(s.tools),
                                 "protocol": s.protocol} for s in self.mcp]}

    def writes(self, name: str) -> bool:
        """Whether a tool may change things (so `ask` asks first)."""
        if self.source.get(name, "built-in") == "built-in":
            return name in WRITE_TOOLS
        return name not in self.read_only

    def specs(self) -> list[dict]:
        return [{"name": name, "description": schema["description"],
                 "schema": {k: v for k, v in schema.items() if k != "description"}}
                for name, (schema, _) in self.tools.items()]

    async def execute(self, name: str, args: dict, input_error: str | None = None,
                      on_output: Callable[[str], None] | None = None,
                      owner: str = "", extras: dict | None = None) -> tuple[str, bool]:
        """Run one tool call; returns (output, is_error).  Never raises ToolError.

        `on_output` gets a running command's output as it comes (bash only;
        the first LIVE_OUTPUT_CHARS of it): the result still has it all.
        """
        if name not in self.tools:
            return f"Error: unknown tool {name!r}. Available: {', '.join(self.tools)}.", True
        if input_error:
            return f"Error: {input_error}", True
        schema, fn = self.tools[name]
        problem = validate_args(schema, args)
        if problem:
            return f"Error: {problem}", True
        # Whose call this is, for the background commands (see there).
        owner_token = TOOL_OWNER.set(owner)
        try:
            if name == "bash":
                return storable(await self.bash(args, on_output)), False
            result = await fn(args)
            if extras is not None and getattr(result, "diff", None):
                extras["diff"] = storable(result.diff)   # for the page, not the model
            return storable(str(result)), False
        except ToolError as exc:
            return f"Error: {storable(str(exc))}", True
        except Exception as exc:
            # The one place any tool's failure becomes an answer: the model
            # reads what went wrong and the run goes on, whatever the tool.
            return f"Error: {tool_failure(name, args, exc)}", True
        finally:
            TOOL_OWNER.reset(owner_token)

    # -- paths ---------------------------------------------------------------
    def resolve(self, path: str, write: bool = False) -> tuple[Path, Path]:
        """(root, target): a path inside the workspace (or, to read, inside a
        skill's folder: see "Claude Skills"), or ToolError.  Symlinks are
        followed first, so a link that leads out of the workspace is refused
        too."""
        if "\x00" in path:
            raise ToolError("path contains a NUL byte")
        target = (self.workspace / path).resolve()
        for root in [self.workspace] + ([] if write else self.read_roots):
            if target == root or root in target.parents:
                return root, target
        raise ToolError(f"path {path!r} is outside the workspace ({self.workspace}); "
                        "use a path inside it")

    # Checking a path and then opening it is a race: swap a folder for a
    # symlink in between and the open follows it out of the workspace.  So a
    # file tool opens its file through folder descriptors walked down from
    # the workspace, each component with O_NOFOLLOW: the path resolve()
    # checked has no symlink left in it, so one that appears meanwhile is
    # refused instead of followed, and a folder once opened is pinned.  Only
    # regular files are opened (O_NONBLOCK first, so a FIFO cannot block the
    # thread for ever), and the check is made on the opened descriptor.
    _DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | os.O_CLOEXEC

    def open_file(self, path: str, write: bool = False) -> int:
        """A descriptor of a regular file inside the workspace (see above);
        `write` creates it (and its folders) or empties it."""
        root, target = self.resolve(path, write)
        if target == root:
            raise ToolError(f"{path!r} is a folder itself, not a file")
        folder = self._folder_fd(root, target.parent.relative_to(root).parts, path, write)
        flags = ((os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if write else os.O_RDONLY)
        try:
            fd = os.open(target.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o666, dir_fd=folder)
        except OSError as exc:
            if exc.errno == errno.ENXIO:          # a FIFO with no reader
                raise ToolError(f"{path} is not a regular file (a FIFO); the file tools "
                                "open only regular files") from None
            if exc.errno == errno.ELOOP:
                raise ToolError(f"{path} became a symbolic link while it was opened; "
                                "refused") from None
            raise
        finally:
            os.close(folder)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise ToolError(f"{path} is {what}; the file tools open only regular files")
        os.set_blocking(fd, True)
        return fd

    def list_folder(self, path: str) -> list[dict]:
        """A workspace folder's entries (name, type, size, modified), opened
        as the file tools open files: no symlink is followed out of it."""
        root, target = self.resolve(path or ".", write=True)
        fd = self._folder_fd(root, target.relative_to(root).parts, path, False)
        try:
            out = []
            with os.scandir(fd) as entries:
                for e in entries:
                    info = e.stat(follow_symlinks=False)
                    kind = ("symlink" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False)
                            else "file" if e.is_file(follow_symlinks=False) else "other")
                    out.append({"name": e.name, "type": kind,
                                "size": info.st_size if kind == "file" else None,
                                "modified": info.st_mtime})
            return sorted(out, key=lambda e: (e["type"] != "dir", e["name"].lower()))
        finally:
            os.close(fd)

    def open_new_file(self, path: str) -> tuple[int, int, str, str]:
        """For an upload: (folder fd, temp file fd, temp name, final name), the
        temp file made beside the target, so a rename finishes the upload."""
        root, target = self.resolve(path, write=True)
        if target == root:
            raise ToolError(f"{path!r} is the workspace folder itself, not a file")
        folder = self._folder_fd(root, target.parent.relative_to(root).parts, path, True)
        temp = f".{target.name}.{uuid.uuid4().hex[:8]}.upload"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644, dir_fd=folder)
        except BaseException:
            os.close(folder)
            raise
        return folder, fd, temp, target.name

    def _folder_fd(self, root: Path, parts: tuple[str, ...], path: str, create: bool) -> int:
        fd = os.open(root, self._DIR_FLAGS)
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                try:
                    inner = os.open(part, self._DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(part, fd):
                        raise ToolError(f"a folder of {path} became a symbolic link while "
                                        "it was opened; refused") from None
                    raise
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- bash ----------------------------------------------------------------
    async def bash(self, args: dict, on_output: Callable[[str], None] | None = None) -> str:
        if args.get("run_in_background"):
            return await self.jobs.start(args["command"])
        timeout = min(max(int(args.get("timeout", BASH_TIMEOUT_DEFAULT)), 1), BASH_TIMEOUT_MAX)
        proc = await _shell(args["command"], self.workspace)
        head, tail = bytearray(), bytearray()
        total = 0
        live = LIVE_OUTPUT_CHARS if on_output else 0     # characters still to show
        decoder = codecs.getincrementaldecoder("utf-8")("replace")   # whole characters

        async def read_capped() -> None:
            # Keep the head and a rolling tail, never the whole output, so a
            # command that prints gigabytes costs a few kilobytes of memory.
            nonlocal total, live
            while chunk := await proc.stdout.read(65536):
                if live > 0:
                    text = decoder.decode(chunk)[:live]
                    live -= len(text)
                    if live <= 0:
                        text += "\n… (the rest comes with the result)\n"
                    if text:
                        on_output(text)
                total += len(chunk)
                room = OUTPUT_HEAD_CHARS - len(head)
                if room > 0:
                    head.extend(chunk[:room])
                    chunk = chunk[room:]
                tail.extend(chunk)
                del tail[:-OUTPUT_TAIL_CHARS]

        reader = asyncio.ensure_future(read_capped())
        timed_out = False
        try:
            try:
                await asyncio.wait_for(_exited(proc), timeout)
            except asyncio.TimeoutError:
                timed_out = True
            # The shell has exited; a background child may still hold the pipe
            # open.  Give the output a moment to drain, then end the group.
            try:
                await asyncio.wait_for(asyncio.shield(reader), 0.5)
            except asyncio.TimeoutError:
                pass
        finally:
            # Runs on success, time-out and cancellation alike.
            _kill_group(proc.pid)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 5)
                await asyncio.wait_for(asyncio.shield(reader), 2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                reader.cancel()
        text = head.decode("utf-8", "replace")
        cut = total - len(head) - len(tail)
        if tail:
            if cut > 0:
                text += f"\n\n… [{cut:,} bytes cut] …\n\n"
            text += tail.decode("utf-8", "replace")
        if timed_out:
            raise ToolError(f"command timed out after {timeout} s and was killed "
                            f"(with its child processes). Output so far:\n{text}")
        if proc.returncode:
            raise ToolError(f"exit code {proc.returncode}\n{text}")
        return text or "(no output)"

    # -- files (blocking file I/O goes to a thread) ----------------------------
    async def read_file(self, args: dict) -> str:
        offset = max(1, int(args.get("offset", 1)))
        limit = max(1, int(args.get("limit", 2000)))

        def read() -> str:
            try:
                fd = self.open_file(args["path"])
            except FileNotFoundError:
                raise ToolError(f"no such file: {args['path']}") from None
            with open(fd, encoding="utf-8", errors="replace") as f:
                if os.fstat(fd).st_size > READ_FILE_MAX_BYTES:
                    raise ToolError(f"{args['path']} is larger than {READ_FILE_MAX_BYTES:,} "
                                    "bytes; use bash (head, grep, sed -n) to read parts of it")
                out, size = [], 0
                for number, line in enumerate(f, 1):
                    if number < offset:
                        continue
                    if number >= offset + limit or size > READ_FILE_MAX_CHARS:
                        out.append(f"… (more lines; continue with offset={number})")
                        break
                    row = f"{number:6}\t{line.rstrip(chr(10))}"
                    out.append(row)
                    size += len(row)
            return "\n".join(out) if out else "(empty file or offset past the end)"

        return await in_file_thread(read)

    async def write_file(self, args: dict) -> str:
        data = args["content"].encode("utf-8")      # before the file is emptied

        def write() -> str:
            try:                                    # what was there, for the diff
                with open(self.open_file(args["path"]), "rb") as f:
                    before = f.read(DIFF_MAX_INPUT + 1)
            except (FileNotFoundError, ToolError):
                before = None
            with open(self.open_file(args["path"], write=True), "wb") as f:
                f.write(data)
            return Changed(f"Wrote {len(data)} bytes to {args['path']}",
                           unified_diff(args["path"], before, data))

        return await in_file_thread(write)

    async def edit_file(self, args: dict) -> str:
        def edit() -> str:
            try:
                fd = self.open_file(args["path"])
            except FileNotFoundError:
                raise ToolError(f"no such file: {args['path']}") from None
            # Bytes in, bytes out: text mode would turn CRLF into LF.  A file
            # that is not UTF-8 is taken as latin-1, which maps every byte to
            # one character and back, so the bytes the edit does not touch
            # are written back exactly as they were.
            with open(fd, "rb") as f:
                raw = f.read()
            try:
                text, encoding = raw.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                text, encoding = raw.decode("latin-1"), "latin-1"
            count = text.count(args["old_str"]) if args["old_str"] else 0
            if count != 1:
                raise ToolError(f"old_str occurs {count} times in {args['path']}; it must "
                                "occur exactly once (add surrounding lines to make it unique)")
            try:
                new = text.replace(args["old_str"], args["new_str"], 1).encode(encoding)
            except UnicodeEncodeError:
                raise ToolError(f"{args['path']} is not UTF-8, so it was read as latin-1, "
                                "and new_str has characters latin-1 cannot hold") from None
            with open(self.open_file(args["path"], write=True), "wb") as f:
                f.write(new)
            return Changed(f"Edited {args['path']}" + ("" if encoding == "utf-8" else
                                                       " (kept in its latin-1 encoding)"),
                           unified_diff(args["path"], raw, new, encoding))

        return await in_file_thread(edit)


# A file tool's result carries a unified diff of what it changed: the page
# shows it (the `diff` field of the tool_result); the model reads only the
# short result.  Computed here, on the thread that has both versions, and
# capped: a diff of a huge or binary file would be noise.
DIFF_MAX_INPUT = 2_000_000        # bytes of a file version, past which no diff is made
DIFF_MAX_CHARS = 40_000           # the diff itself, past which it is cut


class Changed(str):
    """A tool's text result that also carries a `diff` for the page."""

    def __new__(cls, text: str, diff: str):
        obj = super().__new__(cls, text)
        obj.diff = diff
        return obj


def unified_diff(path: str, before: bytes | None, after: bytes, encoding: str = "utf-8") -> str:
    import difflib
    if len(after) > DIFF_MAX_INPUT or (before is not None and len(before) > DIFF_MAX_INPUT):
        return ""
    if b"\0" in after[:8000] or (before and b"\0" in before[:8000]):
        return ""                                 # binary: no lines to compare
    old = before.decode(encoding, "replace").splitlines(keepends=True) if before else []
    new = after.decode(encoding, "replace").splitlines(keepends=True)
    lines = difflib.unified_diff(old, new, "/dev/null" if before is None else f"a/{path}",
                                 f"b/{path}", n=3)
    text = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in lines)
    if len(text) > DIFF_MAX_CHARS:
        cut = text.count("\n", DIFF_MAX_CHARS)
        text = text[:DIFF_MAX_CHARS].rsplit("\n", 1)[0] + f"\n… ({cut:,} more diff lines)\n"
    return text


async def _shell(command: str, cwd: Path) -> asyncio.subprocess.Process:
    """`bash -c command` in a session of its own: the shell leads a process
    group, so one killpg reaches every child it started, background ones
    included; stdout and stderr merged."""
    return await asyncio.create_subprocess_exec(
        "/bin/bash", "-c", command, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True)


async def end_process_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """TERM to a running process's group, KILL after `grace` s if it is
    still there, then KILL to whatever of the group is left (a child that
    ignored TERM).  One long gone is left alone: its group id may be reused."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
    except asyncio.TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
    _kill_group(proc.pid)


async def _exited(proc: asyncio.subprocess.Process) -> None:
    """Until the shell itself has exited.  proc.wait() is not enough: asyncio
    wakes it only once every pipe is closed too, and a background child that
    inherited stdout keeps the pipe open, so wait() would sit out the whole
    time-out.  The return code is set as soon as the shell is reaped, so a
    light poll beside wait() ends as soon as either knows."""
    waiter = asyncio.ensure_future(proc.wait())
    try:
        delay = 0.005
        while proc.returncode is None and not waiter.done():
            await asyncio.wait({waiter}, timeout=delay)
            delay = min(delay * 2, 0.1)
    finally:
        waiter.cancel()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


BASH_SCHEMA = {
    "description": "Run a bash command in the workspace. stdout and stderr are merged; "
                   "long output is cut in the middle. Default time-out 120 s, at most 600.",
    "type": "object",
    "properties": {"command": {"type": "string", "description": "the command line"},
                   "timeout": {"type": "integer", "description": "seconds (1-600)"},
                   "run_in_background": {"type": "boolean", "description":
                                         "start it and return at once with a bash_id (a "
                                         "server, a watcher, a long build); read its output "
                                         "with bash_output, stop it with bash_kill"}},
    "required": ["command"], "additionalProperties": False,
}
READ_SCHEMA = {
    "description": "Read a text file of the workspace, with line numbers.",
    "type": "object",
    "properties": {"path": {"type": "string"},
                   "offset": {"type": "integer", "description": "first line, from 1"},
                   "limit": {"type": "integer", "description": "how many lines"}},
    "required": ["path"], "additionalProperties": False,
}
WRITE_SCHEMA = {
    "description": "Write a whole file in the workspace (parent folders are created).",
    "type": "object",
    "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
    "required": ["path", "content"], "additionalProperties": False,
}
EDIT_SCHEMA = {
    "description": "Replace old_str by new_str in a file; old_str must occur exactly once.",
    "type": "object",
    "properties": {"path": {"type": "string"}, "old_str": {"type": "string"},
                   "new_str": {"type": "string"}},
    "required": ["path", "old_str", "new_str"], "additionalProperties": False,
}


def needs_approval(mode: str, tool: str, writes: bool | None = None) -> bool:
    """auto: never ask; ask: tools that may change things (bash, file
    writes, MCP tools not marked read-only); ask-all: every tool."""
    return mode == "ask-all" or (mode == "ask" and (tool in WRITE_TOOLS if writes is None
                                                    else writes))


# =============================================================================
# Session notes: record_note and recall_notes
# =============================================================================
#
# Mini-Agent's notes, in its file and its shape, so a user's notes carry over
# both ways: the workspace's `.agent_memory.json`, a JSON list of
# {"timestamp", "category", "content"} (timestamps in local ISO form,
# category "general" when none is given).  Upstream offers only record_note;
# here the model can read them back too.
#
# Several sessions may write at once (and the CLI beside us): a write holds
# an exclusive flock on the workspace folder while it reads the list, adds
# its note, writes a new file and renames it over the old, so no writer
# loses another's note and no reader ever sees half a file.  Files are opened
# relative to the workspace without following a symlink, as the file tools
# do.  A notes file that is not a JSON list is never overwritten: the tool
# says so.  The work runs in a thread; waiting for the lock gives up after
# NOTES_LOCK_WAIT s, so it cannot outlive Stop for long.

NOTES_FILE = ".agent_memory.json"
NOTES_LOCK_WAIT = 10.0

RECORD_NOTE_SCHEMA = {
    "description": "Record important information as a session note for later: key facts, "
                   "user preferences, decisions, context. Each note is timestamped and kept "
                   "in the workspace across sessions.",
    "type": "object",
    "properties": {"content": {"type": "string", "description": "the note; concise, specific"},
                   "category": {"type": "string", "description": "a tag such as "
                                "user_preference, project_info, decision (default general)"}},
    "required": ["content"], "additionalProperties": False,
}
RECALL_NOTES_SCHEMA = {
    "description": "Recall the session notes recorded so far (by any session in this "
                   "workspace), optionally only those of one category.",
    "type": "object",
    "properties": {"category": {"type": "string", "description": "only this category"}},
    "additionalProperties": False,
}


class Notes:
    def __init__(self, workspace: Path):
        self.workspace = workspace

    def _load(self, folder: int) -> list:
        try:
            fd = os.open(NOTES_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=folder)
        except FileNotFoundError:
            return []
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ToolError(f"{NOTES_FILE} is a symlink; notes are kept in a plain file") \
                    from None
            raise
        with open(fd, encoding="utf-8") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ToolError(f"{NOTES_FILE} is not a regular file")
            text = f.read()
        try:
            notes = json.loads(text) if text.strip() else []
        except ValueError as exc:
            notes = exc
        if not isinstance(notes, list):
            raise ToolError(f"{NOTES_FILE} is not a JSON list of notes, so it was left as it "
                            "is; fix it or move it away to record new notes")
        return notes

    def _with_folder(self, work: Callable[[int], str], lock: bool) -> str:
        folder = os.open(self.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if lock and fcntl is not None:
                deadline = time.monotonic() + NOTES_LOCK_WAIT
                while True:
                    try:
                        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise ToolError("another writer held the notes for over "
                                            f"{NOTES_LOCK_WAIT:g} s; try again") from None
                        time.sleep(0.005)
            return work(folder)
        finally:
            os.close(folder)                 # and with it the lock

    async def record(self, args: dict) -> str:
        content, category = args["content"], args.get("category") or "general"
        if not content.strip():
            raise ToolError("the note is empty")

        def add(folder: int) -> str:
            notes = self._load(folder)
            notes.append({"timestamp": datetime.now().isoformat(), "category": category,
                          "content": content})
            temp = f"{NOTES_FILE}.{uuid.uuid4().hex[:8]}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=folder)
            try:
                with open(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(notes, indent=2, ensure_ascii=False))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temp, NOTES_FILE, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=folder)
                raise
            return f"Recorded note: {content} (category: {category})"

        return await in_file_thread(self._with_folder, add, True)

    async def recall(self, args: dict) -> str:
        category = args.get("category")

        def read(folder: int) -> str:
            notes = [n for n in self._load(folder) if isinstance(n, dict)]
            if not notes:
                return "No notes recorded yet."
            if category:
                notes = [n for n in notes if n.get("category") == category]
                if not notes:
                    return f"No notes found in category: {category}"
            return "Recorded Notes:\n" + "\n".join(
                f"{i}. [{n.get('category', 'general')}] {n.get('content', '')}\n"
                f"   (recorded at {n.get('timestamp', 'unknown time')})"
                for i, n in enumerate(notes, 1))

        return await in_file_thread(self._with_folder, read, False)


# =============================================================================
# Background commands: bash run_in_background, bash_output, bash_kill
# =============================================================================
#
# As Mini-Agent's background bash: `bash` with `run_in_background` starts
# the command (its own process group, in the workspace) and answers at once
# with a `bash_id`; `bash_output(bash_id, filter_str?)` returns what it
# printed since the last read (only the lines matching the regex, if one is
# given) and whether it still runs; `bash_kill(bash_id)` sends TERM to its
# group, then KILL after BACKGROUND_KILL_GRACE s.  Each command belongs to
# its owner (a session in the server): another session cannot read or kill
# it, and all of an owner's are killed when the session is deleted; all of
# them when the server stops.  Output waiting to be read is capped at
# BACKGROUND_BUFFER bytes (the oldest is dropped, and the next read says so).
# Nothing of a command outlives the process, so after a restart its id is
# unknown and `bash_output` says it is gone.  With several server processes
# (agent_web on PostgreSQL) an id this process does not have is asked of
# the others (`BackgroundJobs.elsewhere`).

BACKGROUND_BUFFER = 1 << 20
BACKGROUND_KILL_GRACE = 5.0
BACKGROUND_STARTED = "Started in the background: bash_id "   # a start's result begins so
# Whose command a tool call is (a session): set by Toolbox.execute for the
# task running the call, read here, so no tool's signature carries it.
TOOL_OWNER: contextvars.ContextVar[str] = contextvars.ContextVar("tool_owner", default="")
BASH_OUTPUT_SCHEMA = {
    "description": "What a background command (bash with run_in_background) printed since "
                   "the last read, and whether it still runs.",
    "type": "object",
    "properties": {"bash_id": {"type": "string"},
                   "filter_str": {"type": "string",
                                  "description": "a regex: only the lines that match"}},
    "required": ["bash_id"], "additionalProperties": False,
}
BASH_KILL_SCHEMA = {
    "description": "Stop a background command (TERM, then KILL after 5 s).",
    "type": "object",
    "properties": {"bash_id": {"type": "string"}},
    "required": ["bash_id"], "additionalProperties": False,
}


@dataclass
class Job:
    bash_id: str
    owner: str
    command: str
    proc: asyncio.subprocess.Process
    started: float = field(default_factory=time.time)
    unread: bytearray = field(default_factory=bytearray)
    dropped: int = 0                 # bytes lost since the last read (over the cap)
    tail: bytearray = field(default_factory=bytearray)   # the last output, for the page
    reader: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def describe(self) -> dict:
        return {"bash_id": self.bash_id, "command": self.command, "started": self.started,
                "running": self.running, "exit_code": self.proc.returncode,
                "output_tail": self.tail.decode("utf-8", "replace")}


class BackgroundJobs:
    def __init__(self, workspace: Path):
        self.workspace = workspace
        self.jobs: dict[str, Job] = {}
        # A command lives in the process that started it.  With many server
        # processes (agent_web on PostgreSQL) a session's next run may be in
        # another one: `elsewhere(action, args)` then asks the others about
        # an id this process does not have, and answers as its owner did
        # (None: nobody has it).  Unset, only this process's commands exist.
        self.elsewhere: Callable[[str, dict], Awaitable[str | None]] | None = None

    async def start(self, command: str) -> str:
        proc = await _shell(command, self.workspace)
        job = Job(new_id("bash"), TOOL_OWNER.get(), command, proc)
        job.reader = asyncio.ensure_future(self._read(job))
        self.jobs[job.bash_id] = job
        return (f"{BACKGROUND_STARTED}{job.bash_id} (pid {proc.pid}). "
                "Read its output with bash_output, stop it with bash_kill.")

    async def _read(self, job: Job) -> None:
        while chunk := await job.proc.stdout.read(65536):
            job.unread += chunk
            over = len(job.unread) - BACKGROUND_BUFFER
            if over > 0:
                del job.unread[:over]
                job.dropped += over
            job.tail += chunk
            del job.tail[:-4000]
        await job.proc.wait()

    async def _ask_elsewhere(self, action: str, args: dict) -> str | None:
        if self.elsewhere is None or args.get("bash_id") in self.jobs:
            return None
        return await self.elsewhere(action, args)

    def _job(self, bash_id: str) -> Job:
        job = self.jobs.get(bash_id)
        if job is None or job.owner != TOOL_OWNER.get():
            raise ToolError(f"no background command {bash_id!r} in this session: it may have "
                            "ended with a restart of the server (nothing outlives it)")
        return job

    async def output(self, args: dict) -> str:
        if (answer := await self._ask_elsewhere("output", args)) is not None:
            return answer
        job = self._job(args["bash_id"])
        await asyncio.sleep(0)                       # let a pending read land
        text = job.unread.decode("utf-8", "replace")
        job.unread.clear()
        dropped, job.dropped = job.dropped, 0
        if args.get("filter_str"):
            try:
                pattern = re.compile(args["filter_str"])
            except re.error as exc:
                raise ToolError(f"filter_str is not a valid regex: {exc}") from None
            text = "\n".join(line for line in text.splitlines() if pattern.search(line))
        state = ("still running" if job.running
                 else f"finished with exit code {job.proc.returncode}")
        return (f"[{job.bash_id}: {state}]"
                + (f"\n… ({dropped:,} bytes dropped before this read)" if dropped else "")
                + (f"\n{text}" if text else "\n(no new output)"))

    async def kill(self, args: dict) -> str:
        if (answer := await self._ask_elsewhere("kill", args)) is not None:
            return answer
        job = self._job(args["bash_id"])
        if not job.running:
            return f"{job.bash_id} had already finished (exit code {job.proc.returncode})"
        await self._stop(job)
        return f"{job.bash_id} stopped (exit code {job.proc.returncode})"

    async def _stop(self, job: Job) -> None:
        await end_process_group(job.proc, BACKGROUND_KILL_GRACE)
        if job.reader:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(job.reader, 1)

    def of(self, owner: str) -> list[dict]:
        return [j.describe() for j in self.jobs.values() if j.owner == owner]

    async def end(self, owner: str | None = None) -> None:
        """Kill an owner's commands (a deleted session), or everyone's."""
        chosen = [j for j in self.jobs.values() if owner is None or j.owner == owner]
        await asyncio.gather(*(self._stop(j) for j in chosen if j.running))
        for job in chosen:
            self.jobs.pop(job.bash_id, None)


# =============================================================================
# MCP client: tools from Model Context Protocol servers
# =============================================================================
#
# Mini-Agent's `mcp.json` works here unchanged: {"mcpServers": {name: {...}}}
# with `command`/`args`/`env` (stdio) or `url`/`headers` and `type`
# `streamable_http`/`http` (Streamable HTTP; the default when there is a url)
# or `sse` (the older HTTP+SSE transport), `disabled`, and per-server
# `connect_timeout`/`execute_timeout`/`sse_read_timeout`.
#
# One `McpServer` per entry speaks JSON-RPC 2.0 as the MCP specification
# says, in either of its two eras (below).  Start: `server/discover`, and
# for a server of the handshake era `initialize` (our newest protocol
# version; the server's answer must be one we know) and
# `notifications/initialized`; then `tools/list` page by page
# (`nextCursor`), all within `connect_timeout`; a server that fails is
# reported (its state and error) and never holds up the rest.  A call is
# `tools/call`; its `content` (text, image, audio, embedded resources,
# resource links) becomes one text result, `isError` its error flag.  A
# call past `execute_timeout`, or stopped by Stop, is followed by
# `notifications/cancelled` (a modern HTTP call: its stream is closed
# instead).  A ping from the server is answered; other requests from it
# are refused (-32601).  When the server says its tools changed
# (`notifications/tools/list_changed`) they are listed again, and the
# toolbox offers the new list from the next step on.
#
# Transports: stdio is a child process (its own process group; stderr goes
# to our log line by line; messages are lines of JSON).  A stdio server that
# died is started again at the next call.  Streamable HTTP POSTs each
# message; the answer is JSON or an SSE stream; in the handshake era
# `Mcp-Session-Id` from the initialize answer goes on every later request
# (a 404 then means the session is gone: that call fails, and the next one
# initializes again), and a GET stream, open while the server is ready,
# carries what the server sends unasked (a 405 says it offers none).
# HTTP+SSE reads one GET stream whose first event names the URL to POST to.
#
# Tools keep their MCP names; one that clashes with a tool already there is
# named `<server>_<tool>` (logged).  In `ask` mode an MCP tool asks first
# unless the server marks it read-only (`annotations.readOnlyHint`).

MCP_PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
MCP_LINE_LIMIT = 32 << 20          # one JSON-RPC message from a stdio server, at most
MCP_DEFAULT_TIMEOUTS = {"connect_timeout": 10.0, "execute_timeout": 60.0,
                        "sse_read_timeout": 120.0}


class McpError(Exception):
    def __init__(self, message: str, error: dict | None = None):
        super().__init__(message)
        self.error = error or {}         # the JSON-RPC error, when the server sent one


# The two eras.  MCP 2026-07-28 is stateless: no `initialize`, no session;
# every request carries the protocol version, the client's identity and its
# capabilities in its `_meta`, and over HTTP in headers too (`MCP-Protocol-
# Version`, `Mcp-Method`, `Mcp-Name`, and `Mcp-Param-*` for the arguments a
# tool's schema marks `x-mcp-header`).  The earlier revisions above open
# with the handshake.  This client speaks both ("dual-era"), as the spec
# says to tell them apart: over stdio and Streamable HTTP it first asks
# `server/discover` in the modern revision.  A `DiscoverResult` naming a
# version we speak, or a modern error (the codes below) naming one, makes
# the server modern for as long as it runs; any other answer (an unknown
# method, a 4xx without a modern error, no answer in time) makes it legacy:
# `initialize` then, as before.  HTTP+SSE is legacy only.  A modern server's
# tool list changes arrive on a `subscriptions/listen` stream (in place of
# the GET stream), a call is stopped by closing its stream (HTTP) or by
# `notifications/cancelled` (stdio), and a call that asks for input this
# client cannot give (`resultType: input_required`: elicitation, sampling,
# roots) fails, saying so.
MCP_MODERN_VERSIONS = ("2026-07-28",)
MCP_CLIENT_INFO = {"name": "mini-agent-web", "version": "1"}
HEADER_MISMATCH, MISSING_CLIENT_CAPABILITY, UNSUPPORTED_PROTOCOL_VERSION = -32020, -32021, -32022
MODERN_ERRORS = (HEADER_MISMATCH, MISSING_CLIENT_CAPABILITY, UNSUPPORTED_PROTOCOL_VERSION)


def refused_versions(exc: "McpError") -> list | None:
    """The versions a server speaks, when it refused ours with them
    (UnsupportedProtocolVersionError's `data.supported`); else None."""
    data = exc.error.get("data")
    supported = data.get("supported") if isinstance(data, dict) else None
    return (supported if exc.error.get("code") == UNSUPPORTED_PROTOCOL_VERSION
            and isinstance(supported, list) else None)


def no_shared_version(supported: list) -> "McpError":
    return McpError(f"the server speaks only MCP {', '.join(map(str, supported))}; this client "
                    f"speaks {', '.join(MCP_MODERN_VERSIONS + MCP_PROTOCOL_VERSIONS)}")


def mcp_header_value(value: Any) -> str | None:
    """A value as an MCP request header carries it (2026-07-28, "Value
    Encoding"): an integer in decimal, a boolean as true/false, a string as
    it is when it is visible ASCII with no space at either end, else as
    =?base64?...?=; None: no header (null, or not a primitive)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or isinstance(value, float) and value.is_integer():
        return str(int(value))
    if not isinstance(value, str):
        return None
    if (value and value == value.strip() and all(" " <= c <= "~" for c in value)
            and not (value.startswith("=?base64?") and value.endswith("?="))):
        return value
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


# The schema keywords that hold subschemas: an `x-mcp-header` under any of
# them is off the chain of `properties` the spec allows it on.
_SUBSCHEMA_KEYS = ("items", "prefixItems", "additionalProperties", "patternProperties", "oneOf",
                   "anyOf", "allOf", "not", "if", "then", "else", "$defs", "definitions",
                   "contains", "propertyNames", "dependentSchemas", "unevaluatedProperties",
                   "unevaluatedItems")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def mcp_param_headers(schema: Any) -> dict[str, tuple[str, ...]]:
    """A tool's `x-mcp-header` annotations: header name → the path of
    properties its value is read at.  ValueError (why) when one breaks the
    spec's rules, which makes the whole tool one a client must not offer."""
    found: dict[str, tuple[str, ...]] = {}

    def walk(node: Any, path: tuple[str, ...] | None) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, None)
            return
        if not isinstance(node, dict):
            return
        if "x-mcp-header" in node:
            name = node["x-mcp-header"]
            if path is None or not path:
                raise ValueError("x-mcp-header off the chain of properties from the root")
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise ValueError(f"x-mcp-header {name!r} is not a header name token")
            if node.get("type") not in ("string", "integer", "boolean"):
                raise ValueError(f"x-mcp-header {name!r} on a {node.get('type')!r} property")
            if name.lower() in (n.lower() for n in found):
                raise ValueError(f"x-mcp-header {name!r} twice")
            found[name] = path
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for prop, sub in value.items():
                    walk(sub, None if path is None else path + (prop,))
            elif key in _SUBSCHEMA_KEYS:
                walk(list(value.values()) if key in ("patternProperties", "$defs",
                                                     "definitions", "dependentSchemas")
                     and isinstance(value, dict) else value, None)
    walk(schema, ())
    return found


def mcp_servers_from_file(path: Path, timeouts: dict[str, float] | None = None
                          ) -> list["McpServer"]:
    """The enabled servers of an mcp.json; a malformed file is a ValueError."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be read as JSON: {exc}") from None
    servers = doc.get("mcpServers") if isinstance(doc, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(f"{path}: expected {{\"mcpServers\": {{name: {{...}}}}}}")
    out = []
    for name, spec in servers.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: mcpServers.{name} must be an object")
        if spec.get("disabled"):
            continue
        kind = str(spec.get("type") or ("streamable_http" if spec.get("url") else "stdio"))
        kind = kind.lower()
        if kind not in ("stdio", "sse", "http", "streamable_http"):
            raise ValueError(f"{path}: mcpServers.{name}.type {kind!r} is not stdio, sse, "
                             "http or streamable_http")
        if kind == "stdio" and not spec.get("command"):
            raise ValueError(f"{path}: mcpServers.{name} has no command")
        if kind != "stdio" and not spec.get("url"):
            raise ValueError(f"{path}: mcpServers.{name} has no url")
        limits = {**MCP_DEFAULT_TIMEOUTS, **(timeouts or {})}
        limits.update({k: float(spec[k]) for k in MCP_DEFAULT_TIMEOUTS if k in spec})
        out.append(McpServer(name, spec, "stdio" if kind == "stdio" else
                             "sse" if kind == "sse" else "http", limits))
    return out


def mcp_content_text(content: list) -> str:
    """An MCP result's content blocks as the one text a tool result is."""
    parts = []
    for block in content or []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind in ("image", "audio"):
            size = len(block.get("data", "")) * 3 // 4
            parts.append(f"[{kind}: {block.get('mimeType', '?')}, {size:,} bytes]")
        elif kind == "resource":
            res = block.get("resource") or {}
            parts.append(res.get("text") if "text" in res else
                         f"[resource {res.get('uri', '?')}: {res.get('mimeType', 'binary')}]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.get('uri', '?')}"
                         + (f": {block['name']}" if block.get("name") else "") + "]")
        else:
            parts.append(json.dumps(block, ensure_ascii=False)[:500])
    return "\n".join(parts)


def _retry_wait(cursor: dict[str, str], default_ms: int, most_ms: int) -> float:
    """Seconds before a closed MCP stream is opened again: the `retry` the
    stream set (0.1 s at least, `most_ms` at most), else `default_ms`."""
    return min(max(int(cursor.get("retry", default_ms)), 100), most_ms) / 1000


def _cut(exc: Exception) -> BaseException:
    """What cut an MCP stream: sse_events words a lost connection for the
    model's streams (an LLMError naming AGENT_LLM_READ_TIMEOUT); its cause
    is the plainer account here."""
    return exc.__cause__ or exc


class McpServer:
    def __init__(self, name: str, spec: dict, transport: str, timeouts: dict[str, float]):
        self.name, self.spec, self.transport, self.timeouts = name, spec, transport, timeouts
        self.state, self.error = "stopped", ""      # stopped, starting, ready, failed
        self.tools: list[dict] = []
        self.protocol = ""
        self.modern = False                          # 2026-07-28 and on: see "The two eras"
        self.capabilities: dict = {}                 # a modern server's, from server/discover
        self._params: dict[str, dict] = {}           # tool → its x-mcp-header paths (modern HTTP)
        self._ids = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self._answering: dict[int, asyncio.Task] = {}  # HTTP: the task reading each answer
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: set[asyncio.Task] = set()       # readers, answers; each leaves when done
        self._http: httpx.AsyncClient | None = None
        self._session_id: str | None = None
        self._post_url = ""                            # HTTP+SSE: where messages go
        self._lock = asyncio.Lock()                    # one (re)start at a time
        # Called after the server's tools changed and were listed again (Toolbox).
        self.on_tools_changed: Callable[["McpServer"], None] | None = None

    def summary(self) -> str:
        """One line for a front end's start: the server, how it is spoken
        to, and its tools or what failed."""
        spoken = f", MCP {self.protocol}" if self.protocol else ""
        return f"MCP {self.name} ({self.transport}{spoken}): " + (
            f"{len(self.tools)} tool(s)" if self.state == "ready"
            else f"{self.state}: {self.error}")

    # -- life cycle ---------------------------------------------------------
    async def start(self) -> None:
        """Connect, learn the server's era (server/discover, else
        initialize) and list the tools, within connect_timeout;
        on failure the state says why (and nothing is left running)."""
        async with self._lock:
            if self.state == "ready":
                return
            await self.close()           # what a dead process or ended session left
            self.state, self.error = "starting", ""
            try:
                await asyncio.wait_for(self._connect(), self.timeouts["connect_timeout"])
                self.state = "ready"
                if self.on_tools_changed is not None:    # started again: its list may differ
                    self.on_tools_changed(self)
            except Exception as exc:
                await self.close()
                self.state, self.modern, self.protocol = "failed", False, ""
                self.error = (f"no answer within {self.timeouts['connect_timeout']:g} s"
                              if isinstance(exc, (asyncio.TimeoutError, TimeoutError))
                              else str(exc) or type(exc).__name__)
                log.warning("MCP server %s failed to start: %s", self.name, self.error)

    async def _connect(self) -> None:
        self.modern, self.protocol, self.capabilities = False, "", {}
        if self.transport == "stdio":
            await self._open_stdio()
        else:
            headers = {str(k): str(v) for k, v in (self.spec.get("headers") or {}).items()}
            self._http = httpx.AsyncClient(
                headers=headers, limits=UNCAPPED, timeout=httpx.Timeout(
                    self.timeouts["execute_timeout"], connect=self.timeouts["connect_timeout"],
                    read=self.timeouts["sse_read_timeout"]))
            if self.transport == "sse":
                await self._open_sse()
        can_be_modern = self.transport != "sse" and bool(MCP_MODERN_VERSIONS)
        modern = can_be_modern and await self._discover()
        if not modern:
            try:
                result = await self.request("initialize", {
                    "protocolVersion": MCP_PROTOCOL_VERSIONS[0], "capabilities": {},
                    "clientInfo": MCP_CLIENT_INFO})
            except McpError as exc:
                supported = refused_versions(exc)
                if supported is None:
                    raise
                # A modern server after all (a probe it was too slow to
                # answer, say): once more in a version it names, if we can.
                if not (can_be_modern and any(v in MCP_MODERN_VERSIONS for v in supported)
                        and await self._discover()):
                    raise no_shared_version(supported) from None
                modern = True
        if modern:
            self.tools = await self._list_tools()
            if (self.capabilities.get("tools") or {}).get("listChanged"):
                self._spawn(self._listen())
            return
        version = result.get("protocolVersion")
        if version not in MCP_PROTOCOL_VERSIONS:
            raise McpError(f"the server speaks MCP {version!r}, which this client does not "
                           f"know ({', '.join(MCP_PROTOCOL_VERSIONS)})")
        self.protocol = version
        await self.notify("notifications/initialized")
        self.tools = await self._list_tools()
        if self.transport == "http":
            self._spawn(self._listen_unasked())

    async def _discover(self) -> bool:
        """The era probe (see "The two eras"): True, and the server is
        modern from now on; False: it is legacy, `initialize` it."""
        self.modern, self.protocol = True, MCP_MODERN_VERSIONS[0]
        # A legacy stdio server may not answer a request before initialize
        # at all: half the time to connect is its answer's.
        probe = self.timeouts["connect_timeout"] / 2
        try:
            result = await asyncio.wait_for(self.request("server/discover", {}), probe)
        except McpError as exc:
            supported = refused_versions(exc)
            if supported is not None:
                mutual = [v for v in MCP_MODERN_VERSIONS if v in supported]
                if mutual:
                    self.protocol = mutual[0]
                    return True
                if not any(v in MCP_PROTOCOL_VERSIONS for v in supported):
                    raise no_shared_version(supported) from None
            elif exc.error.get("code") in MODERN_ERRORS:
                raise McpError(f"server/discover was refused: {exc}") from None
            if self.transport == "stdio" and (self._proc is None
                                              or self._proc.returncode is not None):
                await self.close()                  # it ended over a request it did not know
                await self._open_stdio()
        except asyncio.TimeoutError:
            pass
        else:
            versions = result.get("supportedVersions")
            mutual = [v for v in MCP_MODERN_VERSIONS if isinstance(versions, list)
                      and v in versions]
            if mutual:
                self.protocol = mutual[0]
                caps = result.get("capabilities")
                self.capabilities = caps if isinstance(caps, dict) else {}
                return True
        self.modern, self.protocol = False, ""
        return False

    async def _list_tools(self) -> list[dict]:
        tools, cursor = [], None
        while True:
            page = await self.request("tools/list", {"cursor": cursor} if cursor else {})
            tools += page.get("tools") or []
            cursor = page.get("nextCursor")
            if not cursor:
                break
        if not (self.modern and self.transport == "http"):
            return tools
        # Over HTTP a modern client mirrors the arguments a tool marks
        # `x-mcp-header` into headers, and must not offer a tool whose marks
        # break the rules (one bad tool, not the whole server).
        offered, self._params = [], {}
        for tool in tools:
            try:
                self._params[tool.get("name")] = mcp_param_headers(tool.get("inputSchema"))
                offered.append(tool)
            except ValueError as why:
                log.warning("MCP server %s: tool %r not offered: %s", self.name,
                            tool.get("name"), why)
        return offered

    async def _listen(self) -> None:
        """Modern: a `subscriptions/listen` stream for the tool list's
        changes, open while the server is ready (opened again when it ends;
        the notifications go through `_received` as any other message)."""
        delay = 1.0
        while True:
            try:
                await self.request("subscriptions/listen",
                                   {"notifications": {"toolsListChanged": True}})
                delay = 1.0                        # the server ended it on purpose
            except McpError as exc:
                if exc.error.get("code") == -32601:
                    return                         # it offers none after all
                log.info("MCP %s: its subscription stream: %s", self.name, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _tools_changed(self) -> None:
        """The server said its tools changed: list them again, and the
        toolbox offers the new list from the model's next step on."""
        try:
            self.tools = await asyncio.wait_for(self._list_tools(),
                                                self.timeouts["connect_timeout"])
        except Exception as exc:
            log.warning("MCP server %s: its tools changed, but listing them failed: %s",
                        self.name, exc)
            return
        if self.on_tools_changed is not None:
            self.on_tools_changed(self)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._proc is not None:
            await end_process_group(self._proc, 3.0)
        self._proc = None
        if self._http is not None:
            if self._session_id:               # the spec: end the session with DELETE
                with contextlib.suppress(httpx.HTTPError):
                    await self._http.delete(self.spec["url"], headers=self._headers())
            await self._http.aclose()
            self._http = None
        self._session_id = None
        self._fail_waiting(McpError("the connection was closed"))
        if self.state == "ready":
            self.state = "stopped"

    def _fail_waiting(self, exc: Exception) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(exc)
        self._waiting.clear()

    # -- JSON-RPC -----------------------------------------------------------
    async def request(self, method: str, params: dict, timeout: float | None = None) -> dict:
        self._ids += 1
        rid = self._ids
        future = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        if self.modern:
            params = {**params, "_meta": {
                "io.modelcontextprotocol/protocolVersion": self.protocol,
                "io.modelcontextprotocol/clientInfo": MCP_CLIENT_INFO,
                "io.modelcontextprotocol/clientCapabilities": {}}}
        async def exchange() -> dict:
            await self._send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
            return await future
        try:
            return await asyncio.wait_for(exchange(), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            if self.modern and self.transport == "http":
                # Closing its stream stops it (the POST itself, if still
                # waiting, was cut with this task): no notification.
                reading = self._answering.get(rid)
                if reading is not None:
                    reading.cancel()
            # The spec: tell the server it may stop working on it.
            elif self.state == "ready" and method != "initialize":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.notify("notifications/cancelled", {
                        "requestId": rid, "reason": "stopped by the user" if
                        asyncio.current_task().cancelling() else "timed out"}), 2)
            raise
        finally:
            self._waiting.pop(rid, None)
            self._answering.pop(rid, None)

    async def notify(self, method: str, params: dict | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self._send(message)

    def _received(self, message: Any) -> None:
        """One message from the server: an answer, or a request of its own."""
        for m in message if isinstance(message, list) else [message]:
            if not isinstance(m, dict):
                continue
            if "method" in m and "id" in m:        # the server asks us something
                answer = ({"jsonrpc": "2.0", "id": m["id"], "result": {}} if m["method"] == "ping"
                          else {"jsonrpc": "2.0", "id": m["id"], "error": {
                              "code": -32601, "message": f"{m['method']} is not supported"}})
                self._spawn(self._send(answer))
                continue
            if m.get("method") == "notifications/tools/list_changed":
                self._spawn(self._tools_changed())
                continue
            future = self._waiting.get(m.get("id"))
            if future is None or future.done():
                continue                           # a notification, or an answer too late
            if "error" in m:
                err = m["error"] if isinstance(m["error"], dict) else {"message": m["error"]}
                future.set_exception(McpError(f"{err.get('message', 'error')} "
                                              f"(code {err.get('code', '?')})", err))
            else:
                future.set_result(m.get("result") or {})

    async def _send(self, message: dict) -> None:
        if self.transport == "stdio":
            if self._proc is None or self._proc.returncode is not None:
                raise McpError("the server process is not running")
            self._proc.stdin.write(json.dumps(message).encode() + b"\n")
            await self._proc.stdin.drain()
        elif self.transport == "sse":
            r = await self._http.post(self._post_url, json=message)
            if r.status_code >= 400:
                raise McpError(f"HTTP {r.status_code} from {self._post_url}")
        else:
            await self._post(message)

    # -- stdio --------------------------------------------------------------
    async def _open_stdio(self) -> None:
        env = {**os.environ, **{str(k): str(v) for k, v in (self.spec.get("env") or {}).items()}}
        try:
            self._proc = await asyncio.create_subprocess_exec(
                str(self.spec["command"]), *map(str, self.spec.get("args") or []),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=self.spec.get("cwd"),
                start_new_session=True, limit=MCP_LINE_LIMIT)
        except OSError as exc:
            raise McpError(f"cannot start {self.spec['command']}: {exc.strerror or exc}") \
                from None
        self._spawn(self._read_stdout(self._proc))
        self._spawn(self._read_stderr(self._proc))

    async def _read_stdout(self, proc) -> None:
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:                 # one line past MCP_LINE_LIMIT
                self._fail_waiting(McpError("the server sent a message over "
                                            f"{MCP_LINE_LIMIT:,} bytes"))
                continue
            if not line:
                break
            try:
                self._received(json.loads(line))
            except ValueError:
                log.info("MCP %s (not JSON-RPC): %s", self.name, line[:200])
        try:
            code = await asyncio.wait_for(proc.wait(), 3)
            what = f"exited (code {code})"
        except asyncio.TimeoutError:
            # It closed its output but lives on: it can answer nothing more.
            await end_process_group(proc, 3.0)
            what = "closed its output (so it was stopped)"
        self._fail_waiting(McpError(f"the server {what} during the call"))
        if self.state == "ready":
            self.state, self.error = "stopped", f"{what}; started again at the next call"

    async def _read_stderr(self, proc) -> None:
        while line := await proc.stderr.readline():
            log.info("MCP %s: %s", self.name, line.decode("utf-8", "replace").rstrip())

    # -- Streamable HTTP ----------------------------------------------------
    def _headers(self, message: dict | None = None) -> dict[str, str]:
        h = {"accept": "application/json, text/event-stream"}
        if self._session_id:
            h["mcp-session-id"] = self._session_id
        if self.protocol:
            h["mcp-protocol-version"] = self.protocol
        if self.modern and message is not None:
            # What the body says, mirrored for gateways (the server checks them).
            h["mcp-method"] = message.get("method", "")
            params = message.get("params") or {}
            if message.get("method") == "tools/call":
                h["mcp-name"] = mcp_header_value(params.get("name")) or ""
                args = params.get("arguments") or {}
                for header, path in self._params.get(params.get("name"), {}).items():
                    value: Any = args
                    for key in path:
                        value = value.get(key) if isinstance(value, dict) else None
                    if (encoded := mcp_header_value(value)) is not None:
                        h[f"mcp-param-{header}"] = encoded
        return h

    async def _post(self, message: dict) -> None:
        """POST one message; its answer (JSON or an SSE stream) is read in
        a task of its own, so a slow answer never blocks another."""
        # A subscription stream is quiet for as long as nothing changes.
        timeout = (httpx.Timeout(None, connect=self.timeouts["connect_timeout"])
                   if message.get("method") == "subscriptions/listen" else self._http.timeout)
        request = self._http.build_request("POST", self.spec["url"], json=message,
                                           headers=self._headers(message), timeout=timeout)
        response = await self._http.send(request, stream=True)
        if message.get("method") == "initialize":
            self._session_id = response.headers.get("mcp-session-id") or None
        if response.status_code == 404 and self._session_id:
            await response.aclose()
            self.state, self.error = "stopped", "the server ended the session"
            raise McpError("the server ended the session; it is started again at the next call")
        if response.status_code >= 400:
            body = (await response.aread()).decode("utf-8", "replace")
            await response.aclose()
            try:                                 # a JSON-RPC error, as MCP servers send
                error = json.loads(body)["error"]
                error = error if isinstance(error, dict) else None
            except (ValueError, KeyError, TypeError):
                error = None
            raise McpError(f"HTTP {response.status_code} from {self.spec['url']}: {body[:300]}",
                           error)
        if "id" not in message or "method" not in message:
            await response.aclose()              # a notification or an answer: 202
            return
        self._answering[message["id"]] = self._spawn(self._read_answer(response, message["id"]))

    async def _receive_all(self, response: httpx.Response,
                           cursor: dict[str, str] | None = None) -> None:
        """Every JSON-RPC message of a response (an SSE stream, or one JSON
        body) to `_received`; `cursor` as sse_events keeps it."""
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            async with contextlib.aclosing(sse_events(response, cursor=cursor)) as events:
                async for _, data in events:
                    with contextlib.suppress(ValueError):
                        self._received(json.loads(data))
        else:
            self._received(json.loads(await response.aread() or b"null"))

    async def _listen_unasked(self) -> None:
        """Streamable HTTP: the GET stream on which the server sends what
        nobody asked for (a changed tool list, a ping).  Opened again when
        it ends or fails (a server error: later), while the server is
        ready; a 405 says the server offers none, a 404 that its session is
        gone (its next call starts it again).  Once its events have had
        ids, it is opened again with the last one (Last-Event-ID), so that a
        server that keeps its events sends what came in the gap; servers
        may close the stream on purpose, to be polled."""
        delay = 1.0
        cursor: dict[str, str] = {}            # sse_events keeps the last id and retry
        # No read time-out: a quiet server is the usual case, and each
        # reopening would be a gap.
        timeout = httpx.Timeout(None, connect=self.timeouts["connect_timeout"])
        while True:
            headers = {**self._headers(), "accept": "text/event-stream"}
            if "id" in cursor:
                headers["last-event-id"] = cursor["id"]
            try:
                async with self._http.stream("GET", self.spec["url"], timeout=timeout,
                                             headers=headers) as r:
                    # 405: none offered; 404: the session is gone.  409: the
                    # server still holds our last stream (one at a time): later.
                    if 400 <= r.status_code < 500 and r.status_code != 409:
                        return
                    if r.status_code < 400:
                        delay = 1.0
                        await self._receive_all(r, cursor)
            except (httpx.HTTPError, LLMError) as exc:
                log.info("MCP %s: its stream of unasked messages: %s", self.name, _cut(exc))
            # The stream's own `retry` when it set one (a server that closes
            # it to be polled says when to come back), else backing off.
            await asyncio.sleep(_retry_wait(cursor, int(delay * 1000), 30_000))
            delay = min(delay * 2, 30.0)

    async def _read_answer(self, response: httpx.Response, rid: int) -> None:
        """Read one POST's answer.  A stream that ends, or is cut, before the
        answer came is taken up again where it was left when its events had
        ids (a GET with Last-Event-ID, after the `retry` it set: servers may
        close a long call's stream on purpose, to be polled); otherwise, or
        if the server cannot, that request fails at once, saying so."""
        cursor: dict[str, str] = {}
        why = "ended without an answer"
        try:
            while True:
                try:
                    await self._receive_all(response, cursor)
                except (httpx.HTTPError, LLMError, ValueError) as exc:
                    why = f"was cut ({_cut(exc)})"
                    log.info("MCP %s: an answer %s", self.name, why)
                finally:
                    await response.aclose()
                future = self._waiting.get(rid)
                if future is None or future.done() or "id" not in cursor or self.modern:
                    return                       # (2026-07-28 streams are not taken up again)
                await asyncio.sleep(_retry_wait(cursor, 1000, 10_000))
                try:
                    response = await self._http.send(self._http.build_request(
                        "GET", self.spec["url"], headers={
                            **self._headers(), "accept": "text/event-stream",
                            "last-event-id": cursor["id"]}), stream=True)
                except httpx.HTTPError as exc:
                    why = f"was cut, and taking it up again failed ({exc})"
                    return
                if response.status_code >= 400:
                    await response.aclose()
                    why = (f"was cut, and the server could not take it up again "
                           f"(HTTP {response.status_code})")
                    return
        finally:
            future = self._waiting.get(rid)
            if future is not None and not future.done():
                future.set_exception(McpError(f"the answer from {self.spec['url']} {why}"))

    # -- HTTP+SSE (the older transport) ---------------------------------------
    async def _open_sse(self) -> None:
        endpoint = asyncio.get_running_loop().create_future()

        async def listen() -> None:
            why = "the server closed its event stream"
            try:
                async with self._http.stream("GET", self.spec["url"],
                                             headers={"accept": "text/event-stream"}) as r:
                    if r.status_code >= 400:
                        raise McpError(f"HTTP {r.status_code} from {self.spec['url']}")
                    async with contextlib.aclosing(sse_events(r)) as events:
                        async for kind, data in events:
                            if kind == "endpoint" and not endpoint.done():
                                endpoint.set_result(
                                    str(httpx.URL(self.spec["url"]).join(data)))
                            elif kind == "message":
                                with contextlib.suppress(ValueError):
                                    self._received(json.loads(data))
            except (httpx.HTTPError, LLMError) as exc:
                if not endpoint.done():
                    raise                            # start() says what went wrong
                why = f"its event stream was cut ({_cut(exc)})"
            # The stream is the session: what waits fails now, and the next
            # call starts the server's session again.
            self._fail_waiting(McpError(why))
            if self.state == "ready":
                self.state, self.error = "stopped", why

        task = self._spawn(listen())
        done, _ = await asyncio.wait({endpoint, task}, return_when=asyncio.FIRST_COMPLETED)
        if endpoint not in done:
            task.result()                            # raises what went wrong
            raise McpError("the event stream ended before it named its endpoint")
        self._post_url = endpoint.result()

    # -- tools --------------------------------------------------------------
    async def call(self, tool: str, args: dict) -> str:
        """Run one tool; returns its text, raises ToolError for an error."""
        if self.state != "ready":
            await self.start()                      # died, or the session ended
            if self.state != "ready":
                raise ToolError(f"MCP server {self.name} is not available: {self.error}")
        limit = self.timeouts["execute_timeout"]
        try:
            result = await self.request("tools/call", {"name": tool, "arguments": args}, limit)
        except asyncio.TimeoutError:
            raise ToolError(f"{tool} (MCP server {self.name}) gave no answer within "
                            f"{limit:g} s (execute_timeout); it was told to stop") from None
        except McpError as exc:
            raise ToolError(f"{tool} (MCP server {self.name}): {exc}") from None
        if result.get("resultType") == "input_required":
            requests = result.get("inputRequests")
            asked = ", ".join(sorted({str(r.get("method", "?")) for r in (
                requests.values() if isinstance(requests, dict) else ()) if isinstance(r, dict)}))
            raise ToolError(f"{tool} (MCP server {self.name}) asked for input this client "
                            f"cannot give ({asked or 'unsaid'}): elicitation, sampling and "
                            "roots are not offered here")
        text = mcp_content_text(result.get("content") or [])
        if not text and result.get("structuredContent") is not None:
            text = json.dumps(result["structuredContent"], ensure_ascii=False)
        if result.get("isError"):
            raise ToolError(text or f"{tool} failed (MCP server {self.name})")
        return text or "(no output)"


def mcp_servers(explicit: str | None = None, env=None, file: "ConfigFile | None" = None
                ) -> list[McpServer]:
    """The MCP servers to start: from `--mcp-config`, else AGENT_MCP_CONFIG,
    else the config file's `tools.mcp_config_path` (beside it; only when
    `tools.enable_mcp` is not false and the file is there)."""
    env = os.environ if env is None else env
    timeouts = {k: file.get(f"tools.mcp.{k}") for k in MCP_DEFAULT_TIMEOUTS} if file else {}
    timeouts = {k: v for k, v in timeouts.items() if v is not None}
    for given, label in ((explicit, "--mcp-config"), (env.get("AGENT_MCP_CONFIG"),
                                                       "AGENT_MCP_CONFIG")):
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise ValueError(f"{label} {given}: no such file")
            return mcp_servers_from_file(path, timeouts)
    if file and file.get("tools.enable_mcp", True):
        path = file.relative("tools.mcp_config_path", "mcp.json")
        if path.is_file():
            return mcp_servers_from_file(path, timeouts)
    return []


async def start_mcp(servers: list[McpServer], toolbox: "Toolbox") -> None:
    """Start every server at once (each within its own connect_timeout) and
    offer their tools in `toolbox`."""
    await asyncio.gather(*(s.start() for s in servers))
    for server in servers:
        toolbox.add_mcp(server)


# =============================================================================
# Claude Skills: SKILL.md folders, disclosed step by step
# =============================================================================
#
# As Mini-Agent (and Claude) load them: every SKILL.md under the skills
# folder (`--skills-dir`, AGENT_SKILLS_DIR, the config's `tools.skills_dir`,
# default ./skills, then ./mini_agent/skills as upstream looks) starts with
# YAML front matter holding at least `name` and `description`.  Only those
# two go into the system prompt (its `{SKILLS_METADATA}` placeholder, or
# appended to ours); `get_skill(skill_name)` returns a skill's whole text,
# with the skill's folder named and its relative references (scripts/,
# references/, assets/, Markdown links, "see forms.md") made absolute when
# the file is there, so the model can run or read them from the workspace.
# read_file may read inside a skill's folder (still with no symlink out of
# it); writing there, and anything else outside the workspace, stays
# refused.  A SKILL.md that cannot be read is a warning, never a failed start.

GET_SKILL_SCHEMA = {
    "description": "Load the full instructions of one of the skills listed in the system "
                   "prompt (its files are named with absolute paths).",
    "type": "object",
    "properties": {"skill_name": {"type": "string", "description": "the skill's name"}},
    "required": ["skill_name"], "additionalProperties": False,
}
SKILL_FRONT_MATTER = re.compile(r"\A---\r?\n(.*?)\r?\n---[ \t]*\r?\n?(.*)\Z", re.S)
SKILL_DIR_REF = re.compile(r"(?<![\w/.-])((?:scripts|references|assets)/[^\s`'\")\]]+)")
SKILL_LINK = re.compile(r"\]\((?!https?:|/|#)(?:\./)?([^)\s]+)\)")
SKILL_DOC_REF = re.compile(r"\b((?:see|read|refer to|check)\s+)([\w-]+\.(?:md|txt|json|yaml))\b",
                           re.I)


@dataclass
class Skill:
    name: str
    description: str
    body: str
    folder: Path


class Skills:
    def __init__(self, folder: Path | None):
        self.folder = folder
        self.found: dict[str, Skill] = {}
        self.warnings: list[str] = []
        if folder is not None and folder.is_dir():
            for path in sorted(folder.rglob("SKILL.md")):
                self._load(path)

    @classmethod
    def locate(cls, explicit: str | None = None, env=None, file: "ConfigFile | None" = None
               ) -> "Skills":
        env = os.environ if env is None else env
        given = explicit or env.get("AGENT_SKILLS_DIR")
        if given:
            return cls(Path(given).expanduser().resolve())
        if file and file.get("tools.enable_skills", True) is False:
            return cls(None)
        name = Path(str(file.get("tools.skills_dir", "./skills")) if file else "./skills")
        name = name.expanduser()
        for folder in ([name] if name.is_absolute() else [name, Path("mini_agent") / name]):
            if folder.is_dir():
                return cls(folder.resolve())
        return cls(None)

    def _load(self, path: Path) -> None:
        import yaml
        try:
            text = path.read_text(encoding="utf-8")
            match = SKILL_FRONT_MATTER.match(text)
            meta = yaml.safe_load(match.group(1)) if match else None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            self._warn(f"{path}: cannot be read ({exc})")
            return
        if not isinstance(meta, dict) or not meta.get("name") or not meta.get("description"):
            self._warn(f"{path}: no front matter with a name and a description; skipped")
            return
        name = str(meta["name"])
        if name in self.found:
            self._warn(f"{path}: a second skill named {name!r}; the first is kept")
            return
        self.found[name] = Skill(name, " ".join(str(meta["description"]).split()),
                                 match.group(2).strip(), path.parent.resolve())

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("%s", text)

    def metadata(self) -> str:
        """The skills' names and descriptions, for the system prompt."""
        if not self.found:
            return ""
        return ("## Available Skills\n\nEach skill holds expert instructions for one kind of "
                "task. Load one with `get_skill(skill_name)` before doing such a task.\n\n"
                + "\n".join(f"- `{s.name}`: {s.description}" for s in self.found.values()))

    @staticmethod
    def absolute(body: str, folder: Path) -> str:
        """A skill's relative references made absolute where the file exists."""
        def there(rel: str) -> Path | None:
            path = (folder / rel).resolve()
            return path if path.exists() and (path == folder or folder in path.parents) else None

        def dir_ref(m: re.Match) -> str:
            path = there(m.group(1))
            return str(path) if path else m.group(0)

        def link(m: re.Match) -> str:
            path = there(m.group(1))
            return f"]({path})" if path else m.group(0)

        def doc(m: re.Match) -> str:
            path = there(m.group(2))
            return f"{m.group(1)}`{path}` (read it with read_file)" if path else m.group(0)
        body = SKILL_LINK.sub(link, body)
        body = SKILL_DIR_REF.sub(dir_ref, body)
        return SKILL_DOC_REF.sub(doc, body)

    async def get(self, args: dict) -> str:
        skill = self.found.get(args["skill_name"])
        if skill is None:
            raise ToolError(f"no skill named {args['skill_name']!r}; the skills are: "
                            + ", ".join(self.found))
        return (f"# Skill: {skill.name}\n\n{skill.description}\n\nThe skill's folder: "
                f"`{skill.folder}` (its files are named below with absolute paths; read "
                f"them with read_file, run its scripts with bash)\n\n---\n\n"
                + self.absolute(skill.body, skill.folder))


def with_skills(prompt: str, skills: Skills) -> str:
    """The system prompt with the skills' metadata in its placeholder (or
    after it, when the prompt has none)."""
    listed = skills.metadata()
    if "{SKILLS_METADATA}" in prompt:
        return prompt.replace("{SKILLS_METADATA}", listed).strip()
    return f"{prompt}\n\n{listed}" if listed else prompt


# =============================================================================
# Context compaction: a long session stays under the model's limit
# =============================================================================
#
# Every step sends the whole history, so a long task grows its requests until
# the provider refuses them.  Before a step whose request would pass
# `token_limit`, the older part of the history is replaced in the model's
# view by one summary the LLM writes (a user turn); the newest turns, up to
# COMPACT_KEEP of the limit, stay word for word, cut only where a turn starts
# (a tool result never loses its call).  The user's own messages of the
# summarised part go into the summary turn word for word, newest first, up to
# USER_KEEP of the limit: what was asked is never paraphrased away.
#
# The size of the next request is the provider's count for the last call
# (input + output tokens, from its `usage`) plus an estimate of what was
# added since; without a count, an estimate of all of it.  The estimate is
# UTF-8 bytes / 4 (a token is ~4 bytes of English, and CJK's 3-byte characters
# are ~1 token): no tokenizer, nothing downloaded.
#
# The summary is an ordinary LLM call (retried like any other, stopped by
# Stop) with no tools.  A part too big for one summary request is summarised
# in pieces, each with the summary so far.  Only the finished result becomes
# an event, `compaction` {summary, through_seq, tokens_before, tokens_after,
# messages}; the store keeps every event it stands for, so the page still
# shows them all, and `history_from_events` rebuilds the model's view from the
# newest compaction on.  A crash or a Stop mid-way stores nothing, so the next
# step compacts again.
#
# A server that still says the prompt is too long (its context is smaller
# than `token_limit`) is answered by compacting to fit what it said, and if
# nothing is left to summarise (one huge tool output), by shortening the
# largest tool results in the model's view; each is said in an `error` event
# with `retrying: true`.

COMPACT_KEEP = 0.3          # of the limit: the newest turns kept word for word
USER_KEEP = 0.1             # of the limit: the user's own words kept in the summary
SUMMARY_INPUT = 0.5         # of the limit: the most one summary request carries
SUMMARY_RESULT_CHARS = 2_000  # a tool result, as the summariser sees it
SHORT_RESULT_CHARS = 4_000  # a tool result shortened to fit, head and tail
TOO_LONG_TRIES = 3          # "prompt is too long" answers before giving up
SUMMARY_MARK = "[Context compacted]"

SUMMARY_PROMPT = f"""{SUMMARY_MARK} is how your summary will begin. You are \
summarising the earlier part of a working session between a user and an AI \
agent that uses tools (shell commands, file edits) in a workspace. The agent \
will continue from your summary alone, so keep everything it needs: the \
user's goals and constraints, decisions made, files created or changed \
(with paths), commands run and what they showed, errors and how they were \
solved, and what is still to do. Be concise and factual; use short bullet \
points; no preamble. The transcript follows."""


def estimate_tokens(text: str) -> int:
    return (len(text) if text.isascii() else len(text.encode("utf-8", "replace"))) // 4 + 1


def entry_tokens(h: dict) -> int:
    if h["role"] == "user":
        return estimate_tokens(h["content"]) + 4
    if h["role"] == "tool":
        return estimate_tokens(h["output"]) + 8
    size = estimate_tokens(h["text"]) + 4
    for t in h["thinking"]:
        size += estimate_tokens(t.get("thinking") or t.get("redacted") or "")
    for c in h["tool_calls"]:
        size += estimate_tokens(json.dumps(c["input"], ensure_ascii=False)) + 8
    return size


def request_tokens(history: list[dict], tools: list[dict], system: str = SYSTEM_PROMPT) -> int:
    """An estimate of a whole request: system prompt, tool specs, messages."""
    return (estimate_tokens(system) + estimate_tokens(json.dumps(tools))
            + sum(entry_tokens(h) for h in history))


def summary_entry(ev: dict) -> dict:
    """The user turn that stands for everything a `compaction` summarised."""
    return {"role": "user", "content": ev["summary"], "compaction": True}


def cut_point(history: list[dict], keep: int) -> int | None:
    """Where the kept tail starts: the earliest turn start from which the
    tail fits in `keep` tokens, else the last turn start.  None when there is
    nothing before it to summarise (only an earlier summary, or nothing)."""
    best, size = None, 0
    for i in range(len(history) - 1, 0, -1):
        size += entry_tokens(history[i])
        if history[i]["role"] != "tool":            # a turn starts here
            if best is None or size <= keep:
                best = i
            if size > keep:
                break
    if best is None or all(h.get("compaction") for h in history[:best]):
        return None
    return best


def transcript(entries: list[dict]) -> str:
    """The part to summarise, as plain text the summariser reads."""
    out = []
    for h in entries:
        if h.get("compaction"):
            out.append(f"## Summary of what came before\n{h['content']}")
        elif h["role"] == "user":
            out.append(f"## User\n{h['content']}")
        elif h["role"] == "assistant":
            part = [f"## Assistant\n{h['text']}".rstrip()]
            for c in h["tool_calls"]:
                args = json.dumps(c["input"], ensure_ascii=False)
                part.append(f"-> calls {c['name']} {clip_output(args, 400, 200)}")
            out.append("\n".join(part))
        else:
            verdict = "failed" if h["is_error"] else "ok"
            out.append(f"## Result of {h['tool']} ({verdict})\n"
                       + clip_output(h["output"], SUMMARY_RESULT_CHARS // 2,
                                     SUMMARY_RESULT_CHARS // 2))
    return "\n\n".join(out)


def pieces_to_summarise(entries: list[dict], budget: int) -> list[list[dict]]:
    """The part split so each summary request stays within `budget` tokens,
    counted on the transcript it will send (tool results come clipped)."""
    pieces: list[list[dict]] = [[]]
    size = 0
    for h in entries:
        t = estimate_tokens(transcript([h]))
        if pieces[-1] and size + t > budget:
            pieces.append([])
            size = 0
        pieces[-1].append(h)
        size += t
    return pieces


def users_words(entries: list[dict], budget: int) -> str:
    """The user's messages in the summarised part, word for word, newest
    first within `budget` tokens (older ones live only in the summary)."""
    kept, size = [], 0
    for h in reversed(entries):
        if h["role"] == "user" and not h.get("compaction"):
            t = entry_tokens(h)
            if size + t > budget:
                break
            kept.append(h["content"])
            size += t
    if not kept:
        return ""
    return ("\n\nThe user's messages in that part, word for word (oldest first):\n"
            + "\n".join(f"- {' '.join(text.split()) if len(text) < 300 else text}"
                        for text in reversed(kept)))


def shorten_tool_results(history: list[dict], target: int, size: Callable[[], int]) -> int:
    """Cut the largest tool results (in place, in the model's view only)
    until the request (`size()` tokens) fits in `target`; returns how many
    were cut."""
    cut = 0
    for h in sorted((h for h in history if h["role"] == "tool"),
                    key=lambda h: len(h["output"]), reverse=True):
        if size() <= target or len(h["output"]) <= SHORT_RESULT_CHARS:
            break
        was = len(h["output"])
        h["output"] = (clip_output(h["output"], SHORT_RESULT_CHARS // 2, SHORT_RESULT_CHARS // 2)
                       + f"\n[shortened to fit the model's context: {was:,} characters in all; "
                       "the whole output is in the session's log]")
        cut += 1
    return cut


# =============================================================================
# The agent loop
# =============================================================================

Approver = Callable[[dict], Awaitable[str]]   # tool call -> "allow" | "deny"


# Stop reasons (Anthropic) and finish reasons (OpenAI) that end an answer
# before the model meant to: the user is told, or a cut answer passes for whole.
CUT_SHORT = {
    "max_tokens": "The answer was cut short at the model's output limit ({max_tokens} "
                  "tokens, AGENT_MAX_TOKENS). Send \"continue\" to have it go on.",
    "model_context_window_exceeded": "The answer was cut short: the conversation fills the "
                                     "model's context window. Start a new session to go on.",
    "refusal": "The model declined to go on with this answer (stop reason: refusal).",
    "content_filter": "The provider's content filter stopped this answer.",
}
CUT_SHORT["length"] = CUT_SHORT["max_tokens"]          # OpenAI's name for it


class _StreamCut:
    """Stops a stream that the run's own task reads (Agent._stream_step).

    `cancel()` (the user's, via Agent.cancel, or the step's time-out) cancels
    the task only while it waits inside the stream, never while it stores an
    event, and the stream's reader takes that cancellation back (uncancel)
    and raises RunCancelled or LLMError instead: the run goes on to say how
    it ended.  Asked between two reads, the next read is never begun."""

    def __init__(self, task: asyncio.Task):
        self.task = task
        self.reading = False          # the task waits inside the stream now
        self.why: str | None = None   # "cancel" or "timeout", once asked

    def cancel(self, why: str = "cancel") -> None:
        if self.why is None:
            self.why = why
            if self.reading:
                self.task.cancel()


class Agent:
    """Runs one user message to its `done`, as an async generator of events.

    Cancellation is cooperative from the outside and immediate on the inside:
    `cancel()` sets a flag and cancels only the current wait: the child task
    running a tool or waiting for an approval, or, for the LLM stream (read
    in the run's own task, as a child task per token cost too much), the
    run's task while it waits inside the stream, a cancellation taken back
    where it is caught (`_StreamCut`).  So the generator itself stays in
    control and can close the run cleanly.  `decisions` pre-answers
    approvals (used to resume a run that waited across a server restart).
    """

    def __init__(self, llm, cfg: LLMConfig, toolbox: Toolbox, *,
                 max_steps: int = DEFAULT_MAX_STEPS, approval_mode: str = "auto",
                 approver: Approver | None = None, decisions: dict[str, str] | None = None,
                 asked: set[str] | None = None, allowed_tools: set[str] | None = None,
                 measured: dict | None = None, owner: str = "",
                 inbox: Callable[[], list[dict]] | None = None):
        self.llm, self.cfg, self.toolbox = llm, cfg, toolbox
        self.owner = owner       # whose background commands these are (a session)
        # Messages the user sent while this runs (steering): `inbox()` hands
        # over what came since, as user `message` events, read before each step.
        self.inbox = inbox
        # The context: the provider's last count {"tokens", "entries"} (see
        # history_from_events), and the limit, lowered if a server says less.
        self.measured = measured or None
        self.limit = cfg.token_limit
        self.max_steps = max_steps
        self.approval_mode = approval_mode
        self.approver = approver
        self.decisions = dict(decisions or {})
        # "allow this tool for the rest of the session" answers so far
        self.allowed_tools: set[str] = allowed_tools if allowed_tools is not None else set()
        # calls whose approval_request is already stored (a run resumed after a
        # restart): wait for the answer without asking a second time
        self.asked = set(asked or ())
        self.cancel_status: str | None = None  # "cancelled" or "interrupted" once asked
        self.waiting_approval = False
        self._inflight: asyncio.Future | _StreamCut | None = None   # what cancel() stops
        self._input_errors: dict[str, str | None] = {}   # call id -> bad-arguments message
        self._output_so_far: dict[str, list[str]] = {}   # call id -> what it printed, live
        self._started_at: dict[str, float] = {}          # call id -> when it began to run
        self._half: dict[str, str] = {}    # a channel's trailing high surrogate, held

    def cancel(self, status: str = "cancelled") -> None:
        if self.cancel_status is None:
            self.cancel_status = status
        if self._inflight is not None:
            self._inflight.cancel()

    async def _guard(self, awaitable):
        """Await in a child task that cancel() can stop without stopping us."""
        if self.cancel_status:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise RunCancelled
        task = asyncio.ensure_future(awaitable)
        self._inflight = task
        try:
            return await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if self.cancel_status and not (me and me.cancelling()):
                raise RunCancelled from None
            raise                      # we ourselves are being cancelled: let it go
        finally:
            self._inflight = None

    async def run(self, history: list[dict]) -> AsyncIterator[dict]:
        steps, usage = 0, {"input_tokens": 0, "output_tokens": 0}
        message_id, streamed = None, False
        try:
            while True:
                # 1. Tool calls without a result (just asked for, or waiting
                #    since before a restart) are run before the LLM is asked again.
                for call in pending_tool_calls(history):
                    async for ev in self._run_call(call, history):
                        yield ev
                if steps >= self.max_steps:
                    yield self._done("max_steps", f"stopped after {steps} steps "
                                     "(max_steps); send a message to continue", steps, usage)
                    return
                steps += 1
                # What the user sent meanwhile joins the conversation here,
                # after the tool results, before the model is asked again.
                for ev in self.inbox() if self.inbox else ():
                    history.append({"role": "user", "content": ev["content"]})
                    yield ev
                # 2. Room first, when this step's request would pass the limit.
                if self.context_size(history)[0] > self.limit:
                    async for ev in self._make_room(history, usage):
                        yield ev
                # 3. One LLM step, streamed; a server that finds the prompt
                #    too long for it gets a shorter one (see "Context compaction").
                too_long = 0
                while True:
                    message_id = new_id("msg")
                    partial: list[str] = []  # this step's text so far, in fragments
                    streamed = False         # any delta of it, text or thinking
                    turn = None
                    try:
                        async for item in self._stream_step(history):
                            ev = self._step_item(item, message_id, partial)
                            if ev is None:
                                continue
                            if ev["type"] == "delta":
                                streamed = True
                            elif ev["type"] == "error" and streamed:
                                # the failed try had streamed: close it, start anew
                                yield self._incomplete(message_id, "".join(partial))
                                message_id, streamed = new_id("msg"), False
                                partial.clear()
                            if ev["type"] == "turn":
                                turn = ev["turn"]
                            else:
                                yield ev
                        break
                    except LLMError as exc:
                        if not exc.too_long or streamed or too_long >= TOO_LONG_TRIES:
                            raise
                        too_long += 1
                        message_id = None
                        async for ev in self._make_room(history, usage, exc):
                            yield ev
                usage["input_tokens"] += turn.usage.get("input_tokens", 0)
                usage["output_tokens"] += turn.usage.get("output_tokens", 0)
                if not turn.usage_reported:
                    # Never "0 tokens" when the server did not say: the counts
                    # then cover only the steps that were reported.
                    usage["reported"] = False
                # 4. The finished reply: into the history, then out as events.
                history.append({"role": "assistant", "message_id": message_id,
                                "text": turn.text, "thinking": turn.thinking,
                                "tool_calls": [{k: c[k] for k in ("id", "name", "input")}
                                               for c in turn.tool_calls]})
                for t in turn.thinking:
                    ev = {"type": "thinking", "message_id": message_id,
                          "content": t.get("thinking", ""), "signature": t.get("signature", "")}
                    if "redacted" in t:
                        ev["redacted"] = t["redacted"]
                    yield ev
                yield {"type": "message", "role": "assistant", "message_id": message_id,
                       "content": turn.text}
                message_id = None
                # An answer cut short looks like a finished one: say why.
                note = CUT_SHORT.get(turn.stop_reason)
                if note:
                    yield {"type": "error", "retrying": False,
                           "message": note.format(max_tokens=self.cfg.max_tokens)}
                self._input_errors = {c["id"]: c.get("input_error") for c in turn.tool_calls}
                for c in turn.tool_calls:
                    yield {"type": "tool_call", "message_id": history[-1]["message_id"],
                           "call_id": c["id"], "tool": c["name"], "input": c["input"]}
                # The context after this step, for the page's meter (and the
                # next run's count: see history_from_events).
                counted = turn.usage_reported and turn.usage.get("input_tokens", 0) > 0
                if counted:
                    self.measured = {"tokens": turn.usage["input_tokens"]
                                     + turn.usage.get("output_tokens", 0),
                                     "entries": len(history)}
                yield self.context_event(history)
                if not turn.tool_calls:
                    summary = turn.text.strip().splitlines()[0][:200] if turn.text.strip() else ""
                    yield self._done("done", summary, steps, usage)
                    return
        except RunCancelled:
            status = self.cancel_status or "cancelled"
            if message_id is not None and streamed:
                yield self._incomplete(message_id, "".join(partial))
            # Every tool call gets a result, so the history stays valid.
            for call in pending_tool_calls(history):
                # A command stopped mid-way keeps what it printed, for the
                # user (its card shows it) and the model (next message).
                began = self._started_at.pop(call["id"], None)
                output = unfinished_result(
                    f"the run was {status}", "".join(self._output_so_far.pop(call["id"], [])),
                    ran_for=None if began is None else time.monotonic() - began,
                    started=began is not None)
                history.append({"role": "tool", "call_id": call["id"], "tool": call["name"],
                                "output": output, "is_error": True})
                yield {"type": "tool_result", "call_id": call["id"], "tool": call["name"],
                       "output": output, "is_error": True, "duration_ms": 0}
            yield self._done(status, f"run {status} by the user" if status == "cancelled"
                             else f"run {status}", steps, usage)
        except LLMError as exc:
            # A message that streamed nothing is not shown as an empty cut one.
            if message_id is not None and streamed:
                yield self._incomplete(message_id, "".join(partial))
            yield {"type": "error", "message": exc.message, "retrying": False}
            yield self._done("error", exc.message, steps, usage)

    @staticmethod
    def _incomplete(message_id: str, text: str) -> dict:
        return {"type": "message", "role": "assistant", "message_id": message_id,
                "content": text, "incomplete": True}

    @staticmethod
    def _done(status: str, summary: str, steps: int, usage: dict) -> dict:
        return {"type": "done", "status": status, "summary": summary, "steps": steps,
                "usage": dict(usage)}

    # -- the context (see "Context compaction") -------------------------------
    def context_size(self, history: list[dict]) -> tuple[int, bool]:
        """(tokens of the next request, whether that is only an estimate)."""
        m = self.measured
        if m and m["entries"] <= len(history):
            return m["tokens"] + sum(entry_tokens(h) for h in history[m["entries"]:]), False
        return request_tokens(history, self.toolbox.specs(), self.cfg.system_prompt), True

    def context_event(self, history: list[dict]) -> dict:
        tokens, estimated = self.context_size(history)
        return {"type": "context", "tokens": tokens, "limit": self.limit,
                "estimated": estimated}

    async def _make_room(self, history: list[dict], usage: dict,
                         refused: LLMError | None = None) -> AsyncIterator[dict]:
        """Bring the next request under the limit: compact, then if need be
        shorten the largest tool results.  `refused`: the server's "prompt is
        too long", which also teaches us its real limit."""
        if refused is not None:
            size = self.context_size(history)[0]
            told = refused.context_limit
            self.limit = int(min(self.limit, size * 0.8, told * 0.9 if told else size))
            yield {"type": "error", "retrying": True, "message":
                   f"{refused.message} — compacting the conversation to fit "
                   f"{self.limit:,} tokens, then trying again"}
        compacted = False
        async for ev in self._compact(history, usage, "too_long" if refused else "limit"):
            compacted = True
            yield ev
        size = self.context_size(history)[0]
        if size > self.limit:
            self.measured = None          # the outputs change: only an estimate holds
            cut = shorten_tool_results(history, int(self.limit * 0.9),
                                       lambda: self.context_size(history)[0])
            if cut:
                yield {"type": "error", "retrying": True, "message":
                       f"the conversation is still {size:,} tokens, over the limit of "
                       f"{self.limit:,}: the {cut} largest tool result(s) are shortened in "
                       "the model's view (the whole outputs stay in the log)"}
                yield self.context_event(history)
            elif refused is not None and not compacted:
                raise refused                 # nothing left to make smaller

    async def _compact(self, history: list[dict], usage: dict, reason: str
                       ) -> AsyncIterator[dict]:
        """Summarise the older part of `history` (replaced in place) and yield
        the `compaction` event; nothing when there is nothing to summarise."""
        before = self.context_size(history)[0]
        cut = cut_point(history, int(self.limit * COMPACT_KEEP))
        if cut is None:
            return
        old, tail = history[:cut], history[cut:]
        summary = ""
        for piece in pieces_to_summarise(old, int(self.limit * SUMMARY_INPUT)):
            earlier = [{"role": "user", "content": summary, "compaction": True}] if summary else []
            ask = [{"role": "user", "content": f"{SUMMARY_PROMPT}\n\n{transcript(earlier + piece)}"}]
            async for item in self._stream_step(ask, tools=[]):
                if item[0] == "retry":
                    yield {"type": "error", "retrying": True,
                           "message": f"summarising the conversation: {item[1]}"}
                elif item[0] == "turn":
                    usage["input_tokens"] += item[1].usage.get("input_tokens", 0)
                    usage["output_tokens"] += item[1].usage.get("output_tokens", 0)
                    summary = storable(item[1].text.strip()) or summary
        told = sum(1 for h in old if not h.get("compaction"))
        content = (f"{SUMMARY_MARK} The earlier part of this session ({told} messages) is "
                   f"summarised here; the newest messages follow word for word.\n\n"
                   f"{summary or '(the model gave no summary)'}"
                   f"{users_words(old, int(self.limit * USER_KEEP))}")
        history[:] = [{"role": "user", "content": content, "compaction": True}, *tail]
        self.measured = None
        first = tail[0]
        keep_from = ({"seq": first["seq"]} if first.get("seq")
                     else {"message_id": first["message_id"]} if first.get("message_id") else {})
        yield {"type": "compaction", "summary": content, "tokens_before": before,
               "tokens_after": self.context_size(history)[0], "messages": told,
               "reason": reason, "keep_from": keep_from}
        yield self.context_event(history)

    def _step_item(self, item: tuple, message_id: str, partial: list[str]) -> dict | None:
        """One item of a streamed step as an event (a `delta`, a retry's
        `error`), or {"type": "turn"} with the finished reply; None to skip."""
        kind = item[0]
        if kind in ("text", "thinking"):
            # An emoji whose halves come in two chunks is joined before it is
            # stored (see storable()).
            piece = self._half.pop(kind, "") + item[1]
            if "\ud800" <= piece[-1:] <= "\udbff":
                self._half[kind], piece = piece[-1], piece[:-1]
            piece = storable(piece)
            if not piece:
                return None
            if kind == "text":
                partial.append(piece)
            return {"type": "delta", "message_id": message_id, "channel": kind,
                    "content": piece}
        if kind == "retry":
            self._half.clear()
            return {"type": "error", "message": item[1], "retrying": True}
        turn = item[1]
        self._half.clear()
        turn.text = storable(turn.text)
        turn.thinking = storable_value(turn.thinking)
        for c in turn.tool_calls:
            c["input"] = storable_value(c["input"])
        return {"type": "turn", "turn": turn}

    async def _stream_step(self, history: list[dict], tools: list[dict] | None = None
                           ) -> AsyncIterator[tuple]:
        """The LLM's stream, read in the run's own task; cancel() and the
        step's time-out cut it wherever it waits (see _StreamCut).

        No child task reads ahead: a task hop per token (a queue, a wake-up,
        a step of a second task) was a sixth of what reading a token cost the
        event loop with 200 streams (bench/RESULTS.md, "Capacity on one
        core")."""
        tools = self.toolbox.specs() if tools is None else tools
        cut = _StreamCut(asyncio.current_task())
        self._inflight = cut
        # One timer for the whole step, not a time-out per token: a server
        # trickling a byte a second never trips the read time-out.
        timer = asyncio.get_running_loop().call_later(self.cfg.step_timeout, cut.cancel,
                                                      "timeout")
        chars, cap = 0, self.cfg.max_tokens * STEP_CHARS_PER_TOKEN
        try:
            async with contextlib.aclosing(
                    stream_with_retries(self.llm, self.cfg, history, tools)) as stream:
                while True:
                    if cut.why or self.cancel_status:
                        raise self._cut_short(cut.why)
                    cut.reading = True
                    try:
                        item = await anext(stream)
                    except StopAsyncIteration:
                        return
                    except asyncio.CancelledError:
                        # Ours (cut.cancel) is taken back; any other, such as
                        # the server's shutdown, stops the run as it should.
                        if cut.why is None or cut.task.uncancel() > 0:
                            raise
                        raise self._cut_short(cut.why) from None
                    finally:
                        cut.reading = False
                    if item[0] in ("text", "thinking"):
                        chars += len(item[1])
                        if chars > cap:
                            raise LLMError(f"the model sent more than {cap:,} characters in "
                                           f"one answer, past its output limit "
                                           f"({self.cfg.max_tokens} tokens, AGENT_MAX_TOKENS), "
                                           "so it was stopped")
                    yield item
        finally:
            timer.cancel()
            self._inflight = None

    def _cut_short(self, why: str | None) -> Exception:
        if why == "timeout" and not self.cancel_status:
            return LLMError(f"the model's answer took longer than {self.cfg.step_timeout:g} s "
                            "(AGENT_STEP_TIMEOUT), so it was stopped")
        return RunCancelled()

    async def _run_call(self, call: dict, history: list[dict]) -> AsyncIterator[dict]:
        name, args = call["name"], call["input"]
        input_error = self._input_errors.get(call["id"])
        if (name in self.toolbox.tools and not input_error
                and needs_approval(self.approval_mode, name, self.toolbox.writes(name))
                and name not in self.allowed_tools):
            decision = self.decisions.pop(call["id"], None)
            if decision is None:
                if call["id"] not in self.asked:
                    yield {"type": "approval_request", "call_id": call["id"], "tool": name,
                           "input": args}
                if self.approver is None:
                    decision = "deny"
                else:
                    self.waiting_approval = True
                    try:
                        decision = await self._guard(self.approver(call))
                    finally:
                        self.waiting_approval = False
            always = decision == "allow_always"
            if always:
                self.allowed_tools.add(name)
            decision = "deny" if decision == "deny" else "allow"
            ev = {"type": "approval", "call_id": call["id"], "decision": decision}
            if always:
                ev["always"] = True     # the server remembers it for the session
            yield ev
            if decision == "deny":
                output = f"The user denied this {name} call. Do not retry it as is; " \
                         "ask the user or try something else."
                history.append({"role": "tool", "call_id": call["id"], "tool": name,
                                "output": output, "is_error": True})
                yield {"type": "tool_result", "call_id": call["id"], "tool": name,
                       "output": output, "is_error": True, "duration_ms": 0}
                return
        started = self._started_at[call["id"]] = time.monotonic()
        # The tool runs in a task of its own while this generator hands on
        # what it prints, as `tool_output` events, until it ends.
        live: asyncio.Queue[str] = asyncio.Queue()
        extras: dict = {}                      # a file tool's `diff`
        work = asyncio.ensure_future(self._guard(
            self.toolbox.execute(name, args, input_error, on_output=live.put_nowait,
                                 owner=self.owner, extras=extras)))
        try:
            while not (work.done() and live.empty()):
                if live.empty():
                    more = asyncio.ensure_future(live.get())
                    await asyncio.wait((work, more), return_when=asyncio.FIRST_COMPLETED)
                    if not more.done():
                        more.cancel()        # takes nothing off the queue
                        continue
                    text = more.result()
                else:
                    text = live.get_nowait()
                self._output_so_far.setdefault(call["id"], []).append(text)
                yield {"type": "tool_output", "call_id": call["id"], "content": text}
            output, is_error = work.result()    # RunCancelled if cancel() stopped it
            self._output_so_far.pop(call["id"], None)
            self._started_at.pop(call["id"], None)
        finally:
            work.cancel()                       # a no-op unless we are stopped ourselves
        duration_ms = int((time.monotonic() - started) * 1000)
        history.append({"role": "tool", "call_id": call["id"], "tool": name,
                        "output": output, "is_error": is_error})
        yield {"type": "tool_result", "call_id": call["id"], "tool": name, "output": output,
               "is_error": is_error, "duration_ms": duration_ms, **extras}


# =============================================================================
# Terminal front end: `python agent_core.py`
# =============================================================================

def context_line(context: dict | None, limit: int) -> str:
    """"context 12,300 / 80,000 tokens" for /stats, from the last `context` event."""
    if context is None:
        return f"context not measured yet (limit {limit:,} tokens)"
    return (f"context {'~' if context['estimated'] else ''}{context['tokens']:,} / "
            f"{context['limit']:,} tokens")


def usage_line(usage: dict) -> str:
    """A run's token counts, honest when the server did not report them."""
    counts = f"{usage['input_tokens']} in / {usage['output_tokens']} out tokens"
    if usage.get("reported", True):
        return counts
    if not (usage["input_tokens"] or usage["output_tokens"]):
        return "token usage not reported by the model server"
    return f"{counts} (some steps' usage not reported by the model server)"


# What the model writes, and what a command or an MCP server prints, reaches
# the user's terminal through for_terminal(): an escape sequence there could
# retitle the terminal, write its clipboard (OSC 52), clear the screen, or
# move the cursor to draw over what was shown.  A command's own colours
# (SGR) pass when the terminal shows colours, and its "\r" (a progress
# meter); every other sequence and control character goes, and the model's
# text keeps none.  terminal_text() is what a terminal leaves on the screen
# of a command's output, as plain text (the Markdown export's; the page's
# static/terminal.js follows the same rules, with colours).  The call a user
# is asked to allow shows its control characters as visible symbols
# (visible_controls: ESC as ␛, CR as ␍, a right-to-left override as
# ⟨U+202E⟩), so a command cannot draw itself as another before "Allow bash?".
TERMINAL_CONTROL = re.compile(
    r"\x1b\[([0-?]*)[ -/]*([@-~])"                       # CSI: colours, erasing, cursor moves
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[PX^_][^\x1b]*\x1b\\"   # OSC, DCS ... to their end
    r"|\x1b[ -/]*[0-~]?|[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # any other escape; controls


def for_terminal(text: str, printed: bool = False, colours: bool = False) -> str:
    """`text` without what could steer a terminal; `printed`: a command's
    output, which keeps its "\r" and, with `colours`, its SGR colours."""
    def keep(m: re.Match) -> str:
        if printed and (m[0] == "\r" or colours and m[2] == "m"):
            return m[0]
        return ""
    return TERMINAL_CONTROL.sub(keep, text)


def terminal_text(text: str) -> str:
    """A command's output as a terminal would leave it: a "\r" then more text
    starts the line again, "\b" takes back a character, "ESC [ 2 K" (or
    "ESC [ K" after a "\r") clears the line, every other control goes."""
    if not TERMINAL_CONTROL.search(text):
        return text
    lines = []
    for raw in text.split("\n"):
        line, cr, at = "", False, 0
        for m in [*TERMINAL_CONTROL.finditer(raw), None]:
            start = m.start() if m else len(raw)
            if start > at:
                line = ("" if cr else line) + raw[at:start]
                cr = False
            if m is None:
                break
            at = m.end()
            if m[0] == "\r":
                cr = True
            elif m[0] == "\b":
                line = line[:-1]
            elif m[2] == "K" and (m[1] == "2" or cr):
                line = ""
        lines.append(line)
    return "\n".join(lines)


def visible_controls(text: str) -> str:
    """Control characters (but line ends and tabs) as the symbols for them,
    and the invisible ones that change the text's direction by name (as the
    page shows a call: app.js, visibleControls)."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]",
                  lambda m: chr(0x2400 + ord(m[0])) if m[0] < " " else "␡" if m[0] == "\x7f"
                  else f"⟨U+{ord(m[0]):04X}⟩", text)


class EscToStop:
    """Esc stops the running task, as in upstream's CLI.  While a task runs
    the terminal hands over each key at once, unechoed (cbreak mode), and a
    lone ESC cancels the agent; an arrow key's sequence, which starts with
    ESC, comes in the same read and does not.  Other keys typed meanwhile
    are dropped, as upstream drops them.  An approval's question gets the
    line mode back for its answer (`line_mode`).  Does nothing where stdin
    is not a terminal (a pipe, a test's input) or there is no termios."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_esc: Callable[[], None]):
        self.loop, self.on_esc = loop, on_esc
        self.fd = sys.stdin.fileno() if termios and sys.stdin.isatty() else None
        self.saved: list | None = None        # the terminal's settings, while listening

    def start(self) -> None:
        if self.fd is not None and self.saved is None:
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)             # Ctrl+C still signals (ISIG stays on)
            self.loop.add_reader(self.fd, self._read)

    def stop(self) -> None:
        if self.saved is not None:
            self.loop.remove_reader(self.fd)
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None

    def _read(self) -> None:
        try:
            keys = os.read(self.fd, 64)
        except OSError:
            return
        if keys == b"\x1b":
            self.on_esc()

    @contextlib.contextmanager
    def line_mode(self):
        listening = self.saved is not None
        self.stop()
        try:
            yield
        finally:
            if listening:
                self.start()


class Terminal:
    """The Mini-Agent experience in a terminal, on the same Agent loop."""

    HELP = ("/help  this help      /clear  new conversation   /history  the conversation\n"
            "/stats  token usage   /tools  what the model may use\n"
            "/exit   quit          Esc or Ctrl+C  stop the running task")

    def __init__(self, cfg: LLMConfig, workspace: str, max_steps: int, approve: str,
                 tools: dict[str, bool] | None = None, mcp: list[McpServer] | None = None,
                 skills: Skills | None = None):
        skills = skills or Skills(None)
        self.cfg = dataclasses.replace(cfg, system_prompt=with_workspace(
            with_skills(cfg.system_prompt, skills), workspace))
        self.max_steps, self.approve = max_steps, approve
        self.toolbox = Toolbox(workspace, **(tools or {}))
        self.toolbox.add_skills(skills)
        self.mcp = mcp or []
        self.history: list[dict] = []
        self.totals = {"runs": 0, "steps": 0, "input_tokens": 0, "output_tokens": 0}
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self.loop = asyncio.new_event_loop()
        self.http = make_http_client(self.cfg)
        self.llm = make_llm(self.cfg, self.http)
        self.allowed: set[str] = set()
        self.context: dict | None = None      # the last `context` event
        self.measured: dict | None = None     # carried from run to run
        self.keys: EscToStop | None = None    # while a task runs

    def c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, flush=True)

    async def ask_approval(self, call: dict) -> str:
        # Line mode first: a key typed once the question shows is echoed.
        with self.keys.line_mode() if self.keys else contextlib.nullcontext():
            self.say(self.c("33", f"  Allow {visible_controls(call['name'])}? [y/N/a] "),
                     end="")
            answer = (await asyncio.to_thread(sys.stdin.readline)).strip().lower()
        return {"y": "allow", "yes": "allow", "a": "allow_always"}.get(answer, "deny")

    async def run_task(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        agent = Agent(self.llm, self.cfg, self.toolbox, max_steps=self.max_steps,
                      approval_mode=self.approve, approver=self.ask_approval,
                      measured=self.measured)
        agent.allowed_tools = self.allowed
        try:
            self.loop.add_signal_handler(signal.SIGINT, agent.cancel)
        except (NotImplementedError, RuntimeError):
            pass
        self.keys = EscToStop(self.loop, agent.cancel)
        self.keys.start()
        step, started, streaming = 0, {}, None
        shown: set[str] = set()          # calls whose output was printed as it came
        began = step_began = last = time.monotonic()

        def step_took() -> None:
            # As upstream's CLI says it, and as the page times a step: from
            # the event before its first to the event before the next step's.
            if step:
                self.say(self.c("2", f"⏱ Step {step} took {last - step_began:.1f} s"))

        def new_step() -> None:
            nonlocal step, step_began
            step_took()
            step, step_began = step + 1, last
            self.say(self.c("1;36", f"\n── Step {step} " + "─" * 40))
        try:
            async for ev in agent.run(self.history):
                kind = ev["type"]
                if kind == "delta":
                    if streaming is None:
                        new_step()
                    if streaming != ev["channel"]:
                        if streaming:
                            self.say()
                        self.say(self.c("2", "💭 ") if ev["channel"] == "thinking"
                                 else self.c("1", "🤖 "), end="")
                        streaming = ev["channel"]
                    text = for_terminal(ev["content"])
                    self.say(self.c("2", text) if ev["channel"] == "thinking" else text, end="")
                elif kind == "message":
                    if streaming is None:     # nothing streamed: a step all the same
                        new_step()
                        if ev["content"]:
                            self.say("🤖 " + for_terminal(ev["content"]), end="")
                    if ev.get("incomplete"):
                        self.say(self.c("33", " [cut off]"), end="")
                    if streaming is not None or ev["content"] or ev.get("incomplete"):
                        self.say()
                    streaming = None
                elif kind == "tool_call":
                    started[ev["call_id"]] = time.monotonic()
                    args = (f"$ {ev['input'].get('command', '')}" if ev["tool"] == "bash"
                            else json.dumps(ev["input"], ensure_ascii=False)[:300])
                    self.say(self.c("1;33", f"🔧 {visible_controls(ev['tool'])} ")
                             + visible_controls(args))
                elif kind == "tool_output":
                    shown.add(ev["call_id"])
                    self.say(self.c("2", for_terminal(ev["content"], True, self.color)), end="")
                elif kind == "tool_result":
                    out = for_terminal(ev["output"], True, self.color)
                    mark = self.c("31", "✗") if ev["is_error"] else self.c("32", "✓")
                    took = self.c("2", f"{ev['duration_ms']} ms")
                    if ev["call_id"] in shown:        # printed already, as it came
                        self.say(f"{mark} {took}" + (f" {out.splitlines()[0]}"
                                                     if ev["is_error"] else ""))
                    else:
                        lines = out.splitlines()
                        first = "\n".join(lines[:20]) + (
                            f"\n… ({len(lines) - 20} more lines)" if len(lines) > 20 else "")
                        self.say(f"{mark} {took}")
                        self.say("   " + first.replace("\n", "\n   "))
                elif kind == "approval":
                    self.say(self.c("2", f"  → {ev['decision']}"))
                elif kind == "error":
                    self.say(self.c("31", f"⚠ {for_terminal(ev['message'])}"))
                elif kind == "compaction":
                    self.say(self.c("35", f"⟲ context compacted: {ev['tokens_before']:,} → "
                                          f"{ev['tokens_after']:,} tokens ({ev['messages']} "
                                          "messages summarised)"))
                elif kind == "context":
                    self.context = ev
                elif kind == "done":
                    step_took()
                    self.totals["runs"] += 1
                    self.totals["steps"] += ev["steps"]
                    for k in ("input_tokens", "output_tokens"):
                        self.totals[k] += ev["usage"][k]
                    colour = "32" if ev["status"] == "done" else "33"
                    self.say(self.c(colour, f"\n■ {ev['status']} · {ev['steps']} step(s) · "
                                    + usage_line(ev["usage"])
                                    + f" · {time.monotonic() - began:.1f} s"))
                last = time.monotonic()
        finally:
            self.keys.stop()
            self.keys = None
            self.measured = agent.measured
            try:
                self.loop.remove_signal_handler(signal.SIGINT)
            except (NotImplementedError, RuntimeError):
                pass

    def command(self, line: str) -> bool:
        """Handle a slash command; False means quit."""
        cmd = line.split()[0].lower()
        if cmd in ("/exit", "/quit", "/q"):                 # upstream's three
            return False
        if cmd == "/help":
            self.say(self.HELP)
        elif cmd == "/clear":
            self.history.clear()
            self.say("New conversation.")
        elif cmd == "/history":
            for h in self.history:
                if h["role"] == "user":
                    self.say(self.c("1", "you: ") + h["content"])
                elif h["role"] == "assistant":
                    calls = ", ".join(c["name"] for c in h["tool_calls"])
                    self.say(self.c("1", "agent: ") + for_terminal(h["text"][:200])
                             + (f" [tools: {visible_controls(calls)}]" if calls else ""))
            self.say(f"({len(self.history)} entries)")
        elif cmd == "/tools":
            info = self.toolbox.describe()
            for tool in info["tools"]:
                self.say(f"{visible_controls(tool['name']):<24} {tool['source']:<16}"
                         + (" asks first" if tool["asks_first"] else ""))
            for server in info["mcp_servers"]:
                self.say(f"MCP {server['name']} ({server['transport']}"
                         + (f", MCP {server['protocol']}" if server["protocol"] else "")
                         + f"): {server['state']}"
                         + (f" — {for_terminal(server['error'])}" if server["error"] else ""))
        elif cmd == "/stats":
            t = self.totals
            self.say(f"runs {t['runs']} · steps {t['steps']} · tokens in "
                     f"{t['input_tokens']} · out {t['output_tokens']} · " + context_line(
                         self.context, self.cfg.token_limit))
        else:
            self.say(f"Unknown command {cmd}. /help lists them.")
        return True

    def main(self, task: str | None) -> int:
        banner = (f"Mini Agent · model {self.cfg.label} · workspace {self.toolbox.workspace}"
                  f" · approvals {self.approve}")
        self.say(self.c("1", banner))
        if self.toolbox.skills:
            self.say(f"Skills ({self.toolbox.skills.folder}): "
                     + ", ".join(self.toolbox.skills.found))
        if self.mcp:
            self.loop.run_until_complete(start_mcp(self.mcp, self.toolbox))
            for server in self.mcp:
                line = server.summary()
                self.say(line if server.state == "ready" else self.c("31", line))
        if self.cfg.provider == "demo":
            self.say(self.c("33", "Offline demo model: set ANTHROPIC_API_KEY, OPENAI_API_KEY "
                                  "or MINIMAX_API_KEY for a real one."))
        try:
            if task:
                self.loop.run_until_complete(self.run_task(task))
                return 0
            self.say("Type a task, or /help.")
            while True:
                try:
                    line = input(self.c("1;32", "\nYou › ")).strip()
                except KeyboardInterrupt:
                    self.say("\n(/exit quits)")
                    continue
                except EOFError:
                    self.say()
                    return 0
                if not line:
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                    continue
                self.loop.run_until_complete(self.run_task(line))
        finally:
            # As asyncio.run() ends: close the LLM connections and MCP
            # servers, then every async generator and task still open.
            self.loop.run_until_complete(self.http.aclose())
            self.loop.run_until_complete(self.toolbox.jobs.end())
            for server in self.mcp:
                self.loop.run_until_complete(server.close())
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:        # gather() of nothing would belong to another loop
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Mini Agent in the terminal.")
    p.add_argument("-w", "--workspace")
    p.add_argument("--config", help="Mini-Agent's config.yaml (default: ./mini_agent/config/"
                   "config.yaml, then ~/.mini-agent/config/config.yaml)")
    p.add_argument("-t", "--task", help="run one task and exit")
    p.add_argument("--provider", choices=["anthropic", "openai", "minimax", "demo"])
    p.add_argument("--model")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--approve", choices=APPROVAL_MODES,
                   default=os.environ.get("AGENT_APPROVE", "ask"),
                   help="auto: run every tool; ask: confirm bash and file writes (default); "
                        "ask-all: confirm every tool")
    p.add_argument("--token-limit", type=int, help="context size in tokens past which older "
                   f"turns are summarised (AGENT_TOKEN_LIMIT; {DEFAULT_TOKEN_LIMIT:,})")
    p.add_argument("--mcp-config", help="Mini-Agent's mcp.json (AGENT_MCP_CONFIG; default: "
                   "the config's tools.mcp_config_path)")
    p.add_argument("--skills-dir", help="a folder of SKILL.md skills (AGENT_SKILLS_DIR; "
                   "default: the config's tools.skills_dir, else ./skills)")
    args = p.parse_args(argv)
    try:
        file = ConfigFile.find(args.config)
        cfg = config_from_env(args.provider, args.model, token_limit=args.token_limit,
                              file=file)
        workspace = (args.workspace or os.environ.get("AGENT_WORKSPACE")
                     or (file and file.get("workspace_dir")) or "workspace")
        max_steps = args.max_steps or (file and file.get("max_steps")) or DEFAULT_MAX_STEPS
        terminal = Terminal(cfg, workspace, max_steps, args.approve,
                            file.toolbox_options() if file else {},
                            mcp_servers(args.mcp_config, file=file),
                            Skills.locate(args.skills_dir, file=file))
    except ValueError as exc:
        p.error(str(exc))
    return terminal.main(args.task)


if __name__ == "__main__":
    sys.exit(main())
