#!/usr/bin/env python3
"""HTTP/1.1 test server (keep-alive, dual-stack, one thread per connection).

usage: http_server.py PORT NAME [WORK_MS]

  GET  /hello            200, body "hello from NAME"
  GET  /status/CODE      that status, body "status CODE from NAME"
  GET  /delay/MS         200 after sleeping MS milliseconds
  GET  /chunked/N        200, N chunks "chunk-i\\n" (Transfer-Encoding: chunked)
  POST /delay/MS         200 after sleeping MS milliseconds (its own method,
                         so a test can find its latency in its own series)
  PUT  /echo             200, the request body (Content-Length or chunked)
  GET  /upgrade          with "Upgrade: weft-echo": 101, then echoes raw bytes
  GET  /flaky/PERCENT    500 for PERCENT % of the requests to /flaky, spread
                         evenly and deterministically (50: every other one)
  POST /flaky/PERCENT    the same (one count for both methods); a success
                         echoes the request body (Content-Length or chunked)
  GET  /stall/MS         200, chunked: "start\n", then after MS milliseconds
                         "end\n" (a body that stalls after its headers)
  GET  /work             200 after WORK_MS milliseconds (0 unless given), so
                         two servers of one Service can differ in latency
Every response names the server in the header "x-served-by: NAME".

A connection whose first byte cannot begin an HTTP request (methods are
upper-case tokens; e.g. tcp_probe.py's "ping\n") is echoed raw until EOF
instead of answered with a 400: one port then carries both HTTP and an
opaque byte stream, as the route-authorization tests need.
"""
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[2] if len(sys.argv) > 2 else "server"
WORK_MS = int(sys.argv[3]) if len(sys.argv) > 3 else 0

# /flaky requests seen; request n fails when floor((n+1)p/100) > floor(np/100).
flaky_lock = threading.Lock()
flaky_seen = 0


def flaky_fails(percent):
    global flaky_seen
    with flaky_lock:
        n = flaky_seen
        flaky_seen += 1
    return (n + 1) * percent // 100 > n * percent // 100


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without TCP_NODELAY the body
    # waits for the peer's delayed ACK of the headers (~40 ms), which would
    # swamp the latencies the tests measure.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def handle(self):
        first = self.connection.recv(1, socket.MSG_PEEK)
        if first and not first.isupper():
            self.echo_raw()
            return
        super().handle()

    def echo_raw(self):
        try:
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data)
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # reset by the peer: nothing left to echo

    def reply(self, code, body=b""):
        self.send_response(code)
        self.send_header("x-served-by", NAME)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if parts[0] == "hello":
            self.reply(200, f"hello from {NAME}".encode())
        elif parts[0] == "status":
            code = int(parts[1])
            self.reply(code, f"status {code} from {NAME}".encode())
        elif parts[0] == "delay":
            time.sleep(int(parts[1]) / 1000)
            self.reply(200, f"delayed {parts[1]} ms by {NAME}".encode())
        elif parts[0] == "flaky":
            if flaky_fails(int(parts[1])):
                self.reply(500, f"flaky failure from {NAME}".encode())
            else:
                self.reply(200, f"flaky success from {NAME}".encode())
        elif parts[0] == "stall":
            self.send_response(200)
            self.send_header("x-served-by", NAME)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"6\r\nstart\n\r\n")
            self.wfile.flush()
            time.sleep(int(parts[1]) / 1000)
            try:
                self.wfile.write(b"4\r\nend\n\r\n0\r\n\r\n")
            except OSError:
                pass
        elif parts[0] == "work":
            time.sleep(WORK_MS / 1000)
            self.reply(200, f"worked {WORK_MS} ms at {NAME}".encode())
        elif parts[0] == "chunked":
            self.send_response(200)
            self.send_header("x-served-by", NAME)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(parts[1])):
                chunk = f"chunk-{i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif parts[0] == "upgrade" and self.headers.get("Upgrade") == "weft-echo":
            self.send_response(101)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", "weft-echo")
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data)
            self.close_connection = True
        else:
            self.reply(404, b"not found")

    def do_POST(self):
        body = self.read_body()
        parts = self.path.strip("/").split("/")
        if parts[0] == "flaky":
            if flaky_fails(int(parts[1])):
                self.reply(500, f"flaky failure from {NAME}".encode())
            else:
                self.reply(200, body)
        elif parts[0] == "delay":
            time.sleep(int(parts[1]) / 1000)
            self.reply(200, f"delayed {parts[1]} ms by {NAME}".encode())
        else:
            self.reply(404, b"not found")

    def do_PUT(self):
        body = self.read_body()
        if self.path == "/echo":
            self.reply(200, body)
        else:
            self.reply(404, b"not found")


class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main():
    port = int(sys.argv[1])
    srv = Server(("::", port), Handler)
    print(f"listening on [::]:{port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
