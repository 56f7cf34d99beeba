#!/usr/bin/env python3
"""Opens connections to HOST:PORT, PARALLEL at a time (each worker pausing
PAUSE_MS between two), until its stdin is closed (or SECONDS have passed,
whichever is first); on each it sends one line and waits (10 s at most) for
it to come back or for the connection to end. A bounded load of policy
decisions on the server's node proxy.

usage: connect_many.py HOST PORT SECONDS PARALLEL PAUSE_MS
Prints "started" once running, then, when stopped,
{"echoed": n, "refused": n, "timeout": n, "stopped_by": "stdin"|"deadline"}.
"""
import json
import socket
import sys
import threading
import time

HOST, PORT = sys.argv[1], int(sys.argv[2])
SECONDS, PARALLEL = float(sys.argv[3]), int(sys.argv[4])
PAUSE = int(sys.argv[5]) / 1000
lock = threading.Lock()
stop = threading.Event()
results = {"echoed": 0, "refused": 0, "timeout": 0, "stopped_by": "deadline"}


def one():
    try:
        with socket.create_connection((HOST, PORT), timeout=10) as s:
            s.sendall(b"ping\n")
            return "echoed" if s.recv(16) else "refused"
    except socket.timeout:
        return "timeout"
    except OSError:
        return "refused"


def worker():
    while not stop.is_set():
        r = one()
        with lock:
            results[r] += 1
        stop.wait(PAUSE)


def until_stdin_closes():
    sys.stdin.read()
    with lock:
        if not stop.is_set():
            results["stopped_by"] = "stdin"
    stop.set()


threading.Thread(target=until_stdin_closes, daemon=True).start()
threads = [threading.Thread(target=worker) for _ in range(PARALLEL)]
for t in threads:
    t.start()
print("started", flush=True)
stop.wait(SECONDS)
stop.set()
for t in threads:
    t.join()
with lock:
    print(json.dumps(results), flush=True)
