#!/usr/bin/env python3
"""An HTTP/1.1 application that resolves paths as web frameworks do.

usage: framework_app.py PORT NAME

Before dispatching, path parameters (`;...` in a segment) are dropped as
servlet containers do, the path is percent-decoded in full (`%2e`, `%2f`,
`%5c`, `%00` included), `\\` is taken as a separator, NUL bytes are dropped
and dot segments and repeated slashes are resolved: so `/public/..%2fadmin`
and `/public/..;/admin` are `/admin` to this application, as they would be
to many frameworks and file servers. The handlers:

  /admin, /admin/...    200 "admin handler of NAME"
  /public, /public/...  200 "public handler of NAME: <path as received>"
  anything else         404

An `Upgrade` request (with `Connection: upgrade`), to any protocol, is
answered 101 and the connection then carries more HTTP/1.1 requests,
dispatched the same way: as a server that speaks h2c would serve requests
inside the upgraded connection.

Every request the application sees is appended to NAME.seen (in the
working directory, the cluster's manifest directory) as one line,
`<handler> <request target as received>`, with handler `admin`,
`public`, `none` (404) or `upgrade:<protocol>`: the test reads which
handler ran for what.
"""
import posixpath
import socket
import sys
import threading
import urllib.parse

PORT = int(sys.argv[1])
NAME = sys.argv[2] if len(sys.argv) > 2 else "app"
SEEN = f"{NAME}.seen"
seen_lock = threading.Lock()


def record(handler, target):
    with seen_lock:
        with open(SEEN, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"{handler} {target}\n")


def resolve(target):
    path = target.split("?", 1)[0]
    path = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
    path = urllib.parse.unquote(path, errors="replace")
    path = path.replace("\\", "/").replace("\x00", "")
    resolved = posixpath.normpath("/" + path)
    # normpath keeps a leading "//".
    return "/" + resolved.lstrip("/")


def dispatch(target):
    path = resolve(target)
    if path == "/admin" or path.startswith("/admin/"):
        return "admin", f"admin handler of {NAME}"
    if path == "/public" or path.startswith("/public/"):
        return "public", f"public handler of {NAME}: {target}"
    return "none", "not found"


def read_head(f):
    """The request line and headers (lower-case names); None at EOF."""
    line = f.readline(1 << 20)
    if not line:
        return None
    request_line = line.decode("latin-1").rstrip("\r\n")
    headers = {}
    while True:
        h = f.readline(1 << 20)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return request_line, headers


def respond(conn, status, reason, body, extra=()):
    body = body.encode()
    head = [f"HTTP/1.1 {status} {reason}", f"x-served-by: {NAME}"]
    head += list(extra)
    head += ["Content-Type: text/plain", f"Content-Length: {len(body)}"]
    conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def serve(conn):
    f = conn.makefile("rb")
    try:
        while True:
            head = read_head(f)
            if head is None:
                return
            request_line, headers = head
            parts = request_line.split(" ")
            if len(parts) != 3:
                respond(conn, 400, "Bad Request", "bad request line")
                return
            _, target, _ = parts
            length = int(headers.get("content-length", "0") or "0")
            if length:
                f.read(length)
            upgrade = headers.get("upgrade")
            if upgrade and "upgrade" in headers.get("connection", "").lower():
                record(f"upgrade:{upgrade}", target)
                conn.sendall(
                    (
                        "HTTP/1.1 101 Switching Protocols\r\n"
                        f"Connection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
                    ).encode()
                )
                continue
            handler, body = dispatch(target)
            record(handler, target)
            if handler == "none":
                respond(conn, 404, "Not Found", body)
            else:
                respond(conn, 200, "OK", body)
    except OSError:
        pass
    finally:
        conn.close()


def main():
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", PORT))
    srv.listen(64)
    print(f"listening on [::]:{PORT}", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
