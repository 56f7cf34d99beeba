#!/usr/bin/env python3
"""TCP client for end-to-end tests: sends NBYTES of random data, half-closes,
reads the echo until EOF and checks it byte for byte. Prints one JSON line
and exits 0 only if everything came back intact.

usage: tcp_client.py HOST PORT NBYTES [PATTERN]
With PATTERN the payload is PATTERN repeated (recognizable on the wire,
e.g. to prove a capture never sees it) instead of random bytes.
"""
import hashlib
import json
import os
import socket
import sys
import threading


def main():
    host, port, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if len(sys.argv) > 4:
        pattern = sys.argv[4].encode()
        payload = (pattern * (nbytes // len(pattern) + 1))[:nbytes]
    else:
        payload = os.urandom(nbytes)
    conn = socket.create_connection((host, port), timeout=20)
    peer = conn.getpeername()

    def send():
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)  # the echo server stops at our EOF

    sender = threading.Thread(target=send)
    sender.start()
    received = bytearray()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
    sender.join()
    conn.close()
    ok = bytes(received) == payload
    print(json.dumps({
        "peer": peer[0],
        "port": peer[1],
        "sent": len(payload),
        "received": len(received),
        "sent_sha256": hashlib.sha256(payload).hexdigest(),
        "received_sha256": hashlib.sha256(received).hexdigest(),
        "match": ok,
    }))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
