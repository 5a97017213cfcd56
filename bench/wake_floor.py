"""The floor under "CPU per token" on this machine: what one wake-up costs.

    python bench/wake_floor.py [--events 500] [--rate 100]

Another process writes one byte to a socket RATE times a second; this
process's asyncio loop reads each (and, in the second row, also hands each
to a thread and back, as the server's commit does).  Printed: this
process's CPU time per event.  Nothing else runs here, so it is the price of
waking from idle, which a server streaming one token at a time pays per
token, several times (the LLM's socket, the writer thread, the loop again,
the subscriber's socket) whatever its own code costs.  On a virtual machine
a wake-up is dear: compare a burst, where the loop never sleeps.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

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
    import os
    import tempfile
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


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=500)
    ap.add_argument("--rate", type=float, default=100)
    args = ap.parse_args()
    print(f"{'events/s':>9} {'per event':>30} {'CPU ms':>7}")
    for rate in (args.rate, 0):
        for hand_off in (False, True):
            ms = await one(args.events if rate else args.events * 20, rate, hand_off)
            label = "a read" + (" + a thread hand-off" if hand_off else "")
            print(f"{(f'{rate:g}' if rate else 'burst'):>9} {label:>30} {ms:>7.3f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
