//! A long-lived TCP connection from inside a pod, driven line by line by the
//! test: `stream_client.py` (written into the cluster directory) connects,
//! then for every line on its stdin sends it and prints what came back.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use weft_sim::TestCluster;

/// Add to the cluster's files: `("stream_client.py", STREAM_CLIENT)`.
pub const STREAM_CLIENT: &str = r#"#!/usr/bin/env python3
# usage: stream_client.py HOST PORT
# Prints "connected", then per stdin line: "echo <line>" when the same bytes
# came back, "closed" on EOF from the peer, "error <reason>" on a socket
# error (and exits). At stdin EOF: half-close, "done" once the peer closed.
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
except OSError as e:
    print("error", type(e).__name__, e, flush=True)
    sys.exit(0)
print("connected", flush=True)
try:
    for line in sys.stdin:
        data = line.encode()
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(len(data) - len(got))
            if not chunk:
                print("closed", flush=True)
                sys.exit(0)
            got += chunk
        print("echo", got.decode().strip(), flush=True)
    s.shutdown(socket.SHUT_WR)
    print("done" if s.recv(1) == b"" else "unexpected data", flush=True)
except OSError as e:
    print("error", type(e).__name__, e, flush=True)
"#;

/// The running client; killed on drop.
pub struct Stream {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Stream {
    /// Connects from `pod` to `host:port`; panics unless it connected.
    pub fn open(cluster: &TestCluster, pod: &str, host: &str, port: u16) -> Self {
        let args = vec![host.to_string(), port.to_string()];
        let mut cmd =
            weft_sim::cluster::pod_command(cluster.state(), pod, "./stream_client.py", &args)
                .expect("command in the pod");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("stream_client.py");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stream = Self {
            stdin: child.stdin.take(),
            child,
            lines,
        };
        let first = stream.next_line();
        assert_eq!(first, "connected", "{pod} -> {host}:{port}");
        stream
    }

    /// The client's next output line (waits at most 20 s).
    pub fn next_line(&mut self) -> String {
        match self.lines.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => "(no answer within 20s)".into(),
            Err(mpsc::RecvTimeoutError::Disconnected) => "(the client has exited)".into(),
        }
    }

    /// Sends `line` over the connection; returns what the client printed:
    /// `echo <line>` when it came back intact.
    pub fn round_trip(&mut self, line: &str) -> String {
        let sent = self
            .stdin
            .as_mut()
            .map(|s| writeln!(s, "{line}").and_then(|()| s.flush()));
        match sent {
            Some(Ok(())) => self.next_line(),
            _ => "(the client has exited)".into(),
        }
    }

    /// Half-closes (stdin EOF); returns the client's last line (`done`
    /// when the peer closed its side in turn).
    pub fn finish(&mut self) -> String {
        drop(self.stdin.take());
        self.next_line()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
