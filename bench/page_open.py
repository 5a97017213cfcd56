"""Opening a long session in the page, in Debian's Chromium (issue 21.4).

    python bench/page_open.py [--events 10000] [--repeat 5] [--against DIR]
    python bench/page_open.py --stream 5000 [--paragraph 40] [--events 10000] [--against DIR]
    python bench/page_open.py --sessions 20000 [--repeat 5] [--against DIR]

A session of EVENTS events of realistic sizes (bench/resume.py's shapes) is
written into a fresh database; the real server starts on it; a headless
Chromium tab opens `/?session=…` and we time, with the page's own clock,
navigation start -> the newest event drawn (its `done` line in the DOM),
and count the long tasks (over 50 ms) the main thread ran meanwhile
(PerformanceObserver).  --against runs another checkout's server in turn.

--sessions N: instead, a database of N sessions, and the page opened on
it: navigation start -> the session list drawn (its last change), the long
tasks meanwhile,
and then what one refresh of the list costs (each run's end asks for it):
its main-thread time and long tasks.

--stream TOKENS: instead, what streaming an answer of TOKENS tokens (at
1,000 a second, the tests' fake LLM; a new paragraph every --paragraph
words, as a model writes, or 0 for one paragraph) costs the page's main thread, in the
long session and in a short one (one earlier answer): Chromium's own
counters (DevTools Performance.getMetrics: TaskDuration, ScriptDuration,
LayoutDuration, RecalcStyleDuration) from the POST to the answer's `done` drawn, and the long
tasks meanwhile.  Each session in turn, REPEAT times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from resume import seed  # noqa: E402
from test_agent_web import CHROMIUM, CHROMIUM_ARGS, FakeLLMProcess, ServerProcess  # noqa: E402

DEBUG = False
WATCH = """() => {
  window.longTasks = [];
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.longTasks.push(e.duration);
  }).observe({ type: "longtask", buffered: true });
  // The page draws a session's events off the document, then puts them in
  // at once: the first `done` line that appears marks all of them drawn.
  new MutationObserver((_, obs) => {
    if (document.querySelector("#events .done")) {
      window.drawnAt = performance.now();
      obs.disconnect();
    }
  }).observe(document, { childList: true, subtree: true });
}"""


def measure(page, url: str, events: int) -> tuple[float, int, float]:
    page.goto("about:blank")
    page.add_init_script(f"({WATCH})()")
    page.goto(url)
    # The newest event is the session's last `done`: its line is drawn once
    # every event before it has been rendered.
    page.wait_for_function("window.drawnAt !== undefined")
    page.wait_for_timeout(200)                   # long tasks are reported a moment later
    took = page.evaluate("window.drawnAt")
    if DEBUG:
        print(page.evaluate("""() => performance.getEntries().map(e =>
            `${e.entryType} ${e.name.slice(-60)} start ${e.startTime.toFixed(0)} end ${(e.startTime + e.duration).toFixed(0)}`).join("\\n")"""))
    tasks = page.evaluate("window.longTasks")
    return took, len(tasks), max(tasks, default=0.0)


def stream_cost(page, server, sid: str, tokens: int, per: int) -> dict:
    """Main-thread seconds the page spends while an answer streams in."""
    page.goto(f"{server.base}/?session={sid}")
    page.wait_for_selector("#conn.live")
    page.wait_for_function("document.querySelector('#events .done') !== null")
    page.wait_for_timeout(300)
    page.evaluate("""() => { window.longTasks = [];
      new PerformanceObserver((l) => { for (const e of l.getEntries())
        window.longTasks.push(e.duration); }).observe({ type: "longtask" }); }""")
    ends = page.evaluate("document.querySelectorAll('#events .done').length")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")

    def metrics():
        got = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        return {k: got[k] for k in ("TaskDuration", "ScriptDuration", "LayoutDuration",
                                    "RecalcStyleDuration")}
    before = metrics()
    r = server.http("POST", "/agent/chat", {"session_id": sid,
                                            "message": f"stream {tokens} 1000 {per}"})
    assert r.status_code == 202, r.text
    page.wait_for_function(f"document.querySelectorAll('#events .done').length > {ends}",
                           timeout=120_000)
    after = metrics()
    cdp.detach()
    tasks = page.evaluate("window.longTasks")
    return {**{k: (after[k] - before[k]) * 1000 for k in before}, "long": len(tasks)}


def checkouts(args) -> dict[str, Path]:
    """This checkout's server and, with --against, another's, in turn."""
    codes = {"this": HERE.parent / "agent_web.py"}
    if args.against:
        codes["against"] = args.against.resolve() / "agent_web.py"
    return codes


def seeded_server(tmp: str, name: str, script: Path, events: int, llm=None):
    """A server of checkout `name` on a database seeded with a session of
    `events` events: (server, that session's id)."""
    folder = Path(tmp) / name
    folder.mkdir()
    sid = seed(folder / "agent.db", events)
    return ServerProcess(folder, llm, script=script), sid


def signed_in(browser, server):
    """A new context's tab with the server's cookie, the page live."""
    context = browser.new_context(viewport={"width": 1200, "height": 800},
                                  bypass_csp=True)   # for our evaluate() calls
    page = context.new_page()
    page.goto(server.url)                             # the cookie
    page.wait_for_selector("#conn.live")
    return context, page


LIST_WATCH = """() => {
  window.longTasks = [];
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) window.longTasks.push(e.duration);
  }).observe({ type: "longtask", buffered: true });
  // The list is drawn when it last changed: the old page appended its items
  // one by one, so its first item says little.
  new MutationObserver(() => {
    if (document.querySelector("#sessions li")) window.drawnAt = performance.now();
  }).observe(document, { childList: true, subtree: true });
}"""


def seed_sessions(db_path: Path, n: int) -> None:
    """n sessions of one message each, an hour's worth of minutes apart."""
    import json
    import sqlite3
    import time
    db = sqlite3.connect(db_path)
    db.executescript((HERE.parent / "schema.sql").read_text())
    now = time.time()
    db.executemany("INSERT INTO sessions (id, title, status, created_at, updated_at) "
                   "VALUES (?, ?, 'idle', ?, ?)",
                   [(f"s_{i:06d}", f"session {i}: a task of some words", now - 60 * i,
                     now - 60 * i) for i in range(n)])
    db.executemany("INSERT INTO events VALUES (?, 1, 'message', ?)", [
        (f"s_{i:06d}", json.dumps({"seq": 1, "session_id": f"s_{i:06d}", "ts": now - 60 * i,
                                   "type": "message", "role": "user",
                                   "content": f"task {i}", "message_id": f"m{i}"}))
        for i in range(n)])
    db.commit()
    db.close()


def main_sessions(args) -> None:
    from playwright.sync_api import sync_playwright
    codes = checkouts(args)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        print(f"{args.sessions:,} sessions; medians of {args.repeat}")
        print(f"{'code':>8} {'list drawn (ms)':>16} {'long tasks':>11} {'longest':>8} "
              f"{'refresh task ms':>16} {'refresh long':>13}")
        for name, script in codes.items():
            folder = Path(tmp) / name
            folder.mkdir()
            seed_sessions(folder / "agent.db", args.sessions)
            server = ServerProcess(folder, None, script=script)
            try:
                context, page = signed_in(browser, server)
                opened, refreshed = [], []
                for _ in range(args.repeat + 1):
                    page.goto("about:blank")
                    page.add_init_script(f"({LIST_WATCH})()")
                    page.goto(server.base + "/")
                    page.wait_for_function("window.drawnAt !== undefined", timeout=120_000)
                    page.wait_for_function("performance.now() - window.drawnAt > 1000",
                                           timeout=120_000)
                    tasks = page.evaluate("window.longTasks")
                    opened.append((page.evaluate("window.drawnAt"), len(tasks), max(tasks, default=0)))
                    # A refresh of the list, as a run's end asks for it: the
                    # page's own function, through its search box's input event.
                    cdp = page.context.new_cdp_session(page)
                    cdp.send("Performance.enable")
                    before = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
                    page.evaluate("""() => { window.longTasks = []; window.listDone = false;
                      new MutationObserver((_, obs) => { window.listDone = true; obs.disconnect(); })
                        .observe(document.getElementById("sessions"), { childList: true }); }""")
                    page.dispatch_event("#session-search", "input")
                    page.wait_for_function("window.listDone", timeout=120_000)
                    page.wait_for_timeout(300)
                    after = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
                    cdp.detach()
                    refreshed.append(((after["TaskDuration"] - before["TaskDuration"]) * 1000,
                                      len(page.evaluate("window.longTasks"))))
                context.close()
            finally:
                server.stop()
            opened, refreshed = opened[1:], refreshed[1:]          # the first warms the cache
            print(f"{name:>8} {statistics.median(o[0] for o in opened):>16.0f} "
                  f"{statistics.median(o[1] for o in opened):>11.0f} "
                  f"{statistics.median(o[2] for o in opened):>8.0f} "
                  f"{statistics.median(r[0] for r in refreshed):>16.0f} "
                  f"{statistics.median(r[1] for r in refreshed):>13.0f}", flush=True)
        browser.close()


def main_stream(args) -> None:
    from playwright.sync_api import sync_playwright
    codes = checkouts(args)
    fake = FakeLLMProcess()
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        print(f"a {args.stream:,}-token answer streamed at 1,000 tokens/s, "
              + (f"a paragraph every {args.paragraph} words" if args.paragraph
                 else "one paragraph") + f"; main thread, medians of {args.repeat}")
        print(f"{'code':>8} {'session':>22} {'task ms':>8} {'script ms':>10} "
              f"{'layout ms':>10} {'style ms':>9} {'long tasks':>11}")
        try:
            for name, script in codes.items():
                server, long_sid = seeded_server(tmp, name, script, args.events, fake)
                try:
                    short_sid = server.chat("say: a short session")["session_id"]
                    server.wait_status(short_sid)
                    context, page = signed_in(browser, server)
                    for label, sid in ((f"{args.events:,} events", long_sid),
                                       ("short (one answer)", short_sid)):
                        runs = [stream_cost(page, server, sid, args.stream, args.paragraph)
                                for _ in range(args.repeat)]
                        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                        print(f"{name:>8} {label:>22} {med['TaskDuration']:>8.0f} "
                              f"{med['ScriptDuration']:>10.0f} {med['LayoutDuration']:>10.0f} "
                              f"{med['RecalcStyleDuration']:>9.0f} {med['long']:>11.0f}",
                              flush=True)
                    context.close()
                finally:
                    server.stop()
        finally:
            fake.close()
            browser.close()


def main() -> None:
    from playwright.sync_api import sync_playwright
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--against", type=Path)
    ap.add_argument("--stream", type=int, help="measure streaming an answer of this many "
                    "tokens into the long session and a short one instead")
    ap.add_argument("--paragraph", type=int, default=40, help="with --stream: words per "
                    "paragraph of the answer (0: all one paragraph)")
    ap.add_argument("--sessions", type=int, help="measure the session list of a database "
                    "of this many sessions instead")
    args = ap.parse_args()
    if args.stream:
        return main_stream(args)
    if args.sessions:
        return main_sessions(args)
    codes = checkouts(args)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        print(f"{'code':>8} {'to the newest event (ms)':>26} {'long tasks':>11} "
              f"{'longest (ms)':>13}")
        for name, script in codes.items():
            server, sid = seeded_server(tmp, name, script, args.events)
            try:
                context, page = signed_in(browser, server)
                runs = [measure(page, f"{server.base}/?session={sid}", args.events)
                        for _ in range(args.repeat + 1)][1:]      # the first warms the cache
                context.close()
            finally:
                server.stop()
            took = [r[0] for r in runs]
            print(f"{name:>8} {statistics.median(took):>17.0f} (min {min(took):.0f})"
                  f" {statistics.median(r[1] for r in runs):>11.0f}"
                  f" {statistics.median(r[2] for r in runs):>13.0f}", flush=True)
        browser.close()


if __name__ == "__main__":
    main()
