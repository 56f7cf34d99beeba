#!/usr/bin/env python3
# GET and POST requests (alternating, each on a new connection) from THREADS
# threads to http://HOST/, PER_THREAD each, or fewer once the file STOP (if
# given) exists. Prints "result <id> <method> <status> <served-by>" per
# request, "warm" after WARM results and "end" when every thread is done.
import http.client, os, sys, threading, time
url_host, threads, per_thread, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stop = sys.argv[5] if len(sys.argv) > 5 else None
lock = threading.Lock()
done = 0
def run(t):
    global done
    for i in range(per_thread):
        if stop and os.path.exists(stop):
            break
        rid = "%d-%d" % (t, i)
        method = "GET" if i % 2 == 0 else "POST"
        body = b"x" * 2048 if method == "POST" else None
        try:
            c = http.client.HTTPConnection(url_host, 80, timeout=20)
            c.request(method, "/", body=body, headers={"x-id": rid})
            r = c.getresponse()
            r.read()
            status, served = r.status, r.getheader("x-served-by") or "-"
            c.close()
        except Exception as e:
            status, served = 0, type(e).__name__
        with lock:
            print("result", rid, method, status, served, flush=True)
            done += 1
            if done == warm:
                print("warm", flush=True)
        time.sleep(0.01)
ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print("end", flush=True)
