#!/usr/bin/env python3
"""TCP probe for policy tests: reports how a connection to an echo server
ends, as a user would see it. Prints one JSON line; always exits 0 (the
test decides what was expected).

usage: tcp_probe.py HOST PORT              one ping, then close
       tcp_probe.py HOST PORT hold SECONDS keep the connection open, one
                                           ping every 100 ms, up to SECONDS

result: "echo" (the ping came back), "open" (hold: first ping came back;
followed by a second line when the connection ends or SECONDS pass),
"reset", "closed" (orderly EOF before the echo), "refused", "timeout",
"still-open" (hold: SECONDS passed without the connection ending).
"""
import json
import socket
import sys
import time

PING = b"ping\n"


def report(result, **extra):
    print(json.dumps({"result": result, **extra}), flush=True)


def ping(conn):
    """One round trip; returns None if the echo came back, else the result."""
    try:
        conn.sendall(PING)
        got = b""
        while len(got) < len(PING):
            chunk = conn.recv(len(PING) - len(got))
            if not chunk:
                return "closed"
            got += chunk
        return None if got == PING else "garbled"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except socket.timeout:
        return "timeout"


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    hold = len(sys.argv) > 3 and sys.argv[3] == "hold"
    seconds = float(sys.argv[4]) if hold else 0.0
    try:
        conn = socket.create_connection((host, port), timeout=10)
    except ConnectionRefusedError:
        return report("refused")
    except ConnectionResetError:
        return report("reset")
    except socket.timeout:
        return report("timeout")
    local = conn.getsockname()[0]
    failure = ping(conn)
    if failure:
        return report(failure, local=local)
    if not hold:
        conn.close()
        return report("echo", local=local)
    report("open", local=local)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        failure = ping(conn)
        if failure:
            return report(failure)
    report("still-open")


if __name__ == "__main__":
    main()
