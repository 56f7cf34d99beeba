#!/usr/bin/env python3
"""gRPC test server and client (grpcio, raw bytes: no generated code).

Service weft.test.Echo:
  Unary  "Echo":   returns "NAME:" + the request; a request "fail:CODE"
                   fails with that status code (e.g. fail:13 = INTERNAL),
                   "sleep:MS" answers after MS milliseconds,
                   "flaky:CODE" fails every other flaky call (per
                   server) with that status code.
  Server streaming "Stream": request "N" streams N messages "NAME:i";
                   "N@MS" waits MS milliseconds before each.

usage:
  grpc_echo.py serve PORT NAME
  grpc_echo.py call HOST:PORT MESSAGE...   one unary call per message
  grpc_echo.py stream HOST:PORT N          one server-streaming call
The client prints one JSON line: the results, each {"ok": reply} or
{"code": status name}.
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "weft.test.Echo"
# No proxy from the environment: the test talks to the pod address directly.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


def serve(port, name):
    flaky = {"seen": 0, "lock": threading.Lock()}

    def echo(request, context):
        text = request.decode()
        if text.startswith("flaky:"):
            with flaky["lock"]:
                n = flaky["seen"]
                flaky["seen"] += 1
            if n % 2 == 0:
                context.abort(grpc.StatusCode(_code(int(text[6:]))), f"flaky failure from {name}")
        if text.startswith("fail:"):
            context.abort(grpc.StatusCode(_code(int(text[5:]))), f"failed on purpose by {name}")
        if text.startswith("sleep:"):
            time.sleep(int(text[6:]) / 1000)
        return f"{name}:{text}".encode()

    def stream(request, context):
        count, _, pause_ms = request.decode().partition("@")
        for i in range(int(count)):
            if pause_ms:
                time.sleep(int(pause_ms) / 1000)
            yield f"{name}:{i}".encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print(f"listening on [::]:{port}", flush=True)
    server.wait_for_termination()


def _code(value):
    for c in grpc.StatusCode:
        if c.value[0] == value:
            return c.value
    raise ValueError(f"no gRPC status {value}")


def call(target, messages):
    results = []
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo")
        for m in messages:
            try:
                results.append({"ok": echo(m.encode(), timeout=20).decode()})
            except grpc.RpcError as e:
                results.append({"code": e.code().name})
    print(json.dumps(results), flush=True)


def stream(target, n):
    """The messages received, then the error if the call failed."""
    results = []
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        rpc = channel.unary_stream(f"/{SERVICE}/Stream")
        try:
            for r in rpc(n.encode(), timeout=20):
                results.append({"ok": r.decode()})
        except grpc.RpcError as e:
            results.append({"code": e.code().name})
    print(json.dumps(results), flush=True)


def main():
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif mode == "call":
        call(sys.argv[2], sys.argv[3:])
    elif mode == "stream":
        stream(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
