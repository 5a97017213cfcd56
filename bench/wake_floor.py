"""The floor under "CPU per token" on this machine: what one wake-up costs.

    python bench/wake_floor.py [--events 500] [--rate 100]
    python bench/wake_floor.py --streams 200 [--rate 50]    # the floor under load

Another process writes one byte to a socket RATE times a second; this
process's asyncio loop reads each (and, in the second row, also hands each
to a thread and back, as the server's commit does).  Printed: this
process's CPU time per event.  Nothing else runs here, so it is the price of
waking from idle, which a server streaming one token at a time pays per
token, several times (the LLM's socket, the writer thread, the loop again,
the subscriber's socket) whatever its own code costs.  On a virtual machine
a wake-up is dear: compare a burst, where the loop never sleeps.

With --streams N: N connections to bench/paced.py's fake LLM, each streaming
at RATE tokens a second in the Anthropic SSE format (one write a token), read
by a bare asyncio Protocol that only counts them, pinned like the server in
`paced.py --pin` (this process on the last CPU, the fake LLM on the others).
Printed: CPU per token and the share of the core: what the server's one core
spends before any of its own code runs, at the loads of "Capacity".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FEEDER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
rate = float(sys.argv[3])
gap = 1 / rate if rate else 0
for _ in range(int(sys.argv[2])):
    s.send(b"x")
    if gap: time.sleep(gap)
s.close()
"""


async def one(events: int, rate: float, hand_off: bool) -> float:
    path = os.path.join(tempfile.mkdtemp(), "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    feeder = subprocess.Popen([sys.executable, "-c", FEEDER, path, str(events), str(rate)])
    conn, _ = await asyncio.get_running_loop().sock_accept(listener)
    reader, _ = await asyncio.open_connection(sock=conn)
    pool = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    started, seen = time.process_time(), 0
    while seen < events:
        data = await reader.read(100)
        if not data:
            break
        seen += len(data)
        if hand_off:
            await loop.run_in_executor(pool, len, data)
    cpu = time.process_time() - started
    feeder.wait()
    pool.shutdown()
    return cpu * 1000 / max(1, seen)


async def streams(n: int, rate: float, seconds: float) -> tuple[float, float]:
    """CPU ms a token and busy share, N streams read by a bare Protocol."""
    # --identity: each answer ends with its connection, which ends a Counter.
    fake = subprocess.Popen([sys.executable, str(Path(__file__).with_name("paced.py")),
                             "--serve-llm", "--identity"], stdout=subprocess.PIPE, text=True)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(fake.pid, cpus[:-1] or cpus)
    os.sched_setaffinity(0, cpus[-1:])
    port = int(fake.stdout.readline())
    body = json.dumps({"messages": [{"role": "user", "content":
                                     f"stream {int(rate * seconds)} {rate}"}]}).encode()
    request = (b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: %d\r\n\r\n"
               % len(body) + body)
    loop = asyncio.get_running_loop()

    class Counter(asyncio.Protocol):
        def __init__(self, done: asyncio.Future):
            self.done, self.tokens = done, 0

        def connection_made(self, transport):
            transport.write(request)

        def data_received(self, data: bytes) -> None:
            self.tokens += data.count(b"text_delta")

        def connection_lost(self, exc) -> None:
            self.done.set_result(self.tokens)

    ends = [loop.create_future() for _ in range(n)]
    began, cpu = time.monotonic(), time.process_time()
    for end in ends:
        await loop.create_connection(lambda end=end: Counter(end), "127.0.0.1", port)
    tokens = sum(await asyncio.gather(*ends))
    cpu, wall = time.process_time() - cpu, time.monotonic() - began
    fake.kill()
    return cpu * 1000 / max(1, tokens), cpu / wall


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=500)
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--streams", type=int, help="N paced SSE streams read at once")
    ap.add_argument("--seconds", type=float, default=4.0, help="with --streams")
    args = ap.parse_args()
    if args.streams:
        ms, busy = await streams(args.streams, args.rate, args.seconds)
        print(f"{args.streams} streams at {args.rate:g} tokens/s, a bare Protocol on one "
              f"core: {ms * 1000:.1f} us CPU a token, {busy:.2f} of the core")
        return
    print(f"{'events/s':>9} {'per event':>30} {'CPU ms':>7}")
    for rate in (args.rate, 0):
        for hand_off in (False, True):
            ms = await one(args.events if rate else args.events * 20, rate, hand_off)
            label = "a read" + (" + a thread hand-off" if hand_off else "")
            print(f"{(f'{rate:g}' if rate else 'burst'):>9} {label:>30} {ms:>7.3f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
