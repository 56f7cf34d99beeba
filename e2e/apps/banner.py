#!/usr/bin/env python3
"""A server-speaks-first protocol for tests (think SMTP or MySQL).

usage:
  banner.py serve PORT NAME    on connect, writes "220 NAME ready\\r\\n"
                               first, then echoes lines back until EOF
  banner.py client HOST PORT   connects, reads the banner *before sending
                               anything*, then sends one line and reads its
                               echo; prints JSON {"banner", "echo"}
"""
import json
import socket
import sys
import threading


def serve(port, name):
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(64)
    print(f"listening on [::]:{port}", flush=True)

    def session(conn):
        with conn:
            conn.sendall(f"220 {name} ready\r\n".encode())
            f = conn.makefile("rb")
            for line in f:
                conn.sendall(b"250 " + line)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=session, args=(conn,), daemon=True).start()


def client(host, port):
    with socket.create_connection((host, port), timeout=20) as s:
        f = s.makefile("rb")
        banner = f.readline().decode().strip()  # nothing sent yet
        s.sendall(b"HELO weft\r\n")
        echo = f.readline().decode().strip()
    print(json.dumps({"banner": banner, "echo": echo}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        client(sys.argv[2], int(sys.argv[3]))
