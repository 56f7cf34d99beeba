#!/usr/bin/env python3
"""A raw HTTP/1.1 client: sends exactly the bytes it is given (no path
normalisation, no header fix-ups), one connection per case.

usage: raw_http.py HOST PORT CASES_JSON

CASES_JSON is a list of cases, each an object:
  "request":  the raw request (text, sent as latin-1);
  "delay_ms": wait this long after connecting before the first byte (0);
  "after_101": a second raw request, sent if the first was answered 101.
Prints a JSON list, one result per case:
  {"status": 200, "body": "...", "after": {...} | null, "error": null}
with "status" null and "error" set ("reset", "closed", "timeout", ...)
when no response came.
"""
import json
import socket
import sys
import time


def read_response(s, f):
    line = f.readline(1 << 16)
    if not line:
        return {"status": None, "body": "", "error": "closed"}
    status = int(line.split(b" ")[1])
    headers = {}
    while True:
        h = f.readline(1 << 16)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 101:
        body = b""
    elif "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(f.readline().strip().split(b";")[0], 16)
            if size == 0:
                f.readline()
                break
            body += f.read(size)
            f.readline()
    else:
        body = f.read()
    return {"status": status, "body": body.decode("latin-1"), "error": None}


def run(host, port, case):
    try:
        s = socket.create_connection((host, port), timeout=10)
    except OSError as e:
        return {"status": None, "body": "", "error": f"connect: {e}"}
    try:
        f = s.makefile("rb")
        if case.get("delay_ms"):
            time.sleep(case["delay_ms"] / 1000)
        s.sendall(case["request"].encode("latin-1"))
        result = read_response(s, f)
        result["after"] = None
        if result["status"] == 101 and case.get("after_101"):
            s.sendall(case["after_101"].encode("latin-1"))
            result["after"] = read_response(s, f)
        return result
    except ConnectionResetError:
        return {"status": None, "body": "", "error": "reset"}
    except socket.timeout:
        return {"status": None, "body": "", "error": "timeout"}
    except (OSError, ValueError, IndexError) as e:
        return {"status": None, "body": "", "error": f"{type(e).__name__}: {e}"}
    finally:
        s.close()


def main():
    host, port, cases = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    print(json.dumps([run(host, port, c) for c in cases]), flush=True)


if __name__ == "__main__":
    main()
