#!/usr/bin/env python3
import os, signal, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[2]
MODE = sys.argv[3] if len(sys.argv) > 3 else ""  # "503": always 503; "slow": 20 ms
# SIGTERM, with DRAIN_SECONDS set: as applications behind Kubernetes
# Services are told to stop (a preStop sleep, Spring's or Go's graceful
# shutdown): serve on for that long while the endpoint is taken out of
# rotation, then close the port, finish what is in flight and exit. Without
# it, SIGTERM ends the process at once (Python's default).
DRAIN = os.environ.get("DRAIN_SECONDS")
conns = set()
busy = 0
lock = threading.Lock()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *args):
        pass
    def setup(self):
        super().setup()
        with lock:
            conns.add(self.connection)
    def finish(self):
        with lock:
            conns.discard(self.connection)
        super().finish()
    def answer(self):
        global busy
        with lock:
            busy += 1
        try:
            self.serve_one()
        finally:
            with lock:
                busy -= 1
    def serve_one(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        # One write per line under a lock: threads must not interleave.
        with lock:
            sys.stdout.write("got %s %d\n" % (self.headers.get("x-id"), len(body)))
            sys.stdout.flush()
        out = ("%s %s\n" % (NAME, self.headers.get("x-id"))).encode()
        if MODE == "slow":
            time.sleep(0.02)
        self.send_response(503 if MODE == "503" else 200)
        self.send_header("x-served-by", NAME)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = answer
    do_POST = answer

server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)
server.daemon_threads = True

def close_port(*_):
    def close():
        server.socket.close()
        with lock:
            for c in list(conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        print("closed", flush=True)
    threading.Thread(target=close).start()

signal.signal(signal.SIGUSR1, close_port)

def drain_and_exit(*_):
    def run():
        print("terminating", flush=True)
        time.sleep(float(DRAIN))
        # One line under the lock: a request read after it came on a
        # connection the port's closing did not end.
        with lock:
            print("closing", flush=True)
        server.socket.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if busy == 0:
                    break
            time.sleep(0.01)
        sys.stdout.flush()
        os._exit(0)
    threading.Thread(target=run).start()

if DRAIN:
    signal.signal(signal.SIGTERM, drain_and_exit)
try:
    server.serve_forever()
except (OSError, ValueError):
    pass
# The port is closed: live on, as a pod whose server stopped listening.
threading.Event().wait()
