#!/usr/bin/env python3
"""Times COUNT echo exchanges with HOST:PORT, one connection each, INTERVAL_MS
apart: connect, send 4 KiB, half-close, read the echo to EOF. Measured in
the pod, so the time is the connection's, not the test's process start.

usage: echo_timed.py HOST PORT COUNT INTERVAL_MS
Prints a JSON list, one {"ok": bool, "seconds": s, "error": str|null} per
exchange; stops after the first that fails (5 s at most each).
"""
import json
import os
import socket
import sys
import time

HOST, PORT = sys.argv[1], int(sys.argv[2])
COUNT, INTERVAL = int(sys.argv[3]), int(sys.argv[4]) / 1000


def exchange():
    payload = os.urandom(4096)
    with socket.create_connection((HOST, PORT), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got == payload


results = []
for i in range(COUNT):
    if i:
        time.sleep(INTERVAL)
    start = time.monotonic()
    try:
        ok, error = exchange(), None
    except OSError as e:
        ok, error = False, f"{type(e).__name__}: {e}"
    results.append({"ok": ok, "seconds": time.monotonic() - start, "error": error})
    if not ok:
        break
print(json.dumps(results), flush=True)
