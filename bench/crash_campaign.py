"""Crash campaign: SIGKILL the server at random moments of a streaming,
tool-calling run, restart it, and check that nothing a client saw is lost.

    python bench/crash_campaign.py [--trials 20] [--seed 1]

Each trial: one WebSocket client watches a run that streams text and calls
bash several times; at a random moment the server process gets SIGKILL; it is
started again on the same database.  Then:
  - every event the client had received is in the database, byte for byte;
  - the run reads `done` with `interrupted` (or `done`, if it finished first);
  - the session is idle, and a new message in it runs to `done`.
Uses the test suite's fake LLM server and server launcher (pytest installed).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_agent_web import FakeLLM, Reply, ServerProcess, of  # noqa: E402
import websockets  # noqa: E402


def script_run(llm: FakeLLM) -> None:
    """Three steps: streamed text + a bash call, twice, then a final answer."""
    for step in range(2):
        llm.script.append(Reply(" ".join(f"s{step}w{i}" for i in range(40)), delay=0.01,
                                tools=[("bash", json.dumps(
                                    {"command": f"for i in 1 2 3; do echo step{step}-$i; "
                                                "sleep 0.1; done"}))]))
    llm.script.append(Reply(" ".join(f"end{i}" for i in range(40)), delay=0.01))


def watch(url: str, sid: str, received: list, stop: threading.Event) -> None:
    """A client in its own thread: collect frames until the socket dies."""
    async def run():
        try:
            async with websockets.connect(url, max_size=None) as ws:
                await ws.send(json.dumps({"type": "subscribe", "session_id": sid, "after": 0}))
                while not stop.is_set():
                    frame = await ws.recv()
                    if '"seq"' in frame:
                        received.append(frame)
        except (websockets.ConnectionClosed, OSError):
            pass
    asyncio.run(run())


def trial(server: ServerProcess, llm: FakeLLM, rng: random.Random) -> dict:
    llm.script.clear()
    script_run(llm)
    sid = server.chat("crash me")["session_id"]
    received: list[str] = []
    stop = threading.Event()
    t = threading.Thread(target=watch, args=(server.ws_url(), sid, received, stop), daemon=True)
    t.start()
    time.sleep(rng.uniform(0.05, 2.0))
    server.kill()
    stop.set()
    t.join(5)
    llm.script.clear()
    started = time.monotonic()
    server.start()
    h = server.wait_status(server_sid := sid)
    restart_s = time.monotonic() - started
    db = sqlite3.connect(server.db)
    stored = {seq: data for seq, data in db.execute(
        "SELECT seq, data FROM events WHERE session_id = ?", (server_sid,))}
    db.close()
    lost = sum(1 for frame in received if stored.get(json.loads(frame)["seq"]) != frame)
    status = of(h["events"], "done")[-1]["status"]
    server.chat("say: continue", sid)
    after = of(server.wait_status(sid)["events"], "done")[-1]["status"]
    return {"received": len(received), "lost": lost, "status": status,
            "continued": after == "done", "restart_s": restart_s}


def run_trials(n: int, workdir: Path, seed: int = 1) -> dict:
    rng = random.Random(seed)
    llm = FakeLLM()
    server = ServerProcess(workdir, llm)
    results = []
    try:
        for _ in range(n):
            results.append(trial(server, llm, rng))
    finally:
        server.stop()
        llm.close()
    db = sqlite3.connect(workdir / "agent.db")
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    stuck = db.execute("SELECT count(*) FROM sessions WHERE status != 'idle'").fetchone()[0]
    db.close()
    return {"trials": n, "results": results, "integrity": integrity, "stuck": stuck,
            "received": sum(r["received"] for r in results),
            "lost": sum(r["lost"] for r in results),
            "interrupted": sum(r["status"] == "interrupted" for r in results),
            "finished": sum(r["status"] == "done" for r in results),
            "continued": sum(r["continued"] for r in results),
            "restart_max_s": max(r["restart_s"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        s = run_trials(args.trials, Path(tmp), args.seed)
    print(f"{'trials':>22} {s['trials']}")
    print(f"{'events seen by client':>22} {s['received']}")
    print(f"{'events lost':>22} {s['lost']}")
    print(f"{'runs interrupted':>22} {s['interrupted']}")
    print(f"{'runs done before kill':>22} {s['finished']}")
    print(f"{'sessions continued':>22} {s['continued']} of {s['trials']}")
    print(f"{'stuck sessions':>22} {s['stuck']}")
    print(f"{'integrity_check':>22} {s['integrity']}")
    print(f"{'slowest restart':>22} {s['restart_max_s']:.2f} s (process start to recovered)")


if __name__ == "__main__":
    main()
