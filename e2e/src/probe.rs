//! Readiness probes as the kubelet sends them (`--kube`): `tcpSocket` (a
//! connection is made) and `httpGet` (a GET; a status from 200 to 399 is a
//! success), from the node's network namespace to the pod's address (so a
//! mesh recognises them as the kubelet's, by their source), every
//! `periodSeconds` after `initialDelaySeconds`, each within
//! `timeoutSeconds`. A container is ready after `successThreshold`
//! successes in a row and not ready after `failureThreshold` failures in a
//! row; a container that (re)starts is not ready until its probe says so.
//!
//! Not sent: `exec` and `grpc` probes (such a container is ready while it
//! runs, and the kubelet logs why), and HTTPS (`scheme: HTTPS` is probed as
//! a TCP connection: the kubelet does not verify the certificate either).

use k8s_openapi::api::core::v1::{Container, Probe};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a probe does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Tcp {
        port: u16,
    },
    Http {
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeSpec {
    /// The container's readiness probe, if it has one this prober sends
    /// (`Err`: a probe it does not send, and why).
    pub fn readiness(c: &Container) -> Option<Result<Self, String>> {
        let probe = c.readiness_probe.as_ref()?;
        Some(Self::from_probe(probe, c))
    }

    fn from_probe(probe: &Probe, c: &Container) -> Result<Self, String> {
        let seconds = |v: Option<i32>, default: i32, min: i32| {
            Duration::from_secs(v.unwrap_or(default).max(min) as u64)
        };
        let port = |p| {
            resolve_port(p, c).ok_or_else(|| {
                format!(
                    "container {}: probe port {p:?} is not one of its ports",
                    c.name
                )
            })
        };
        let action = if let Some(tcp) = &probe.tcp_socket {
            Action::Tcp {
                port: port(&tcp.port)?,
            }
        } else if let Some(http) = &probe.http_get {
            let port = port(&http.port)?;
            if http.scheme.as_deref() == Some("HTTPS") {
                Action::Tcp { port }
            } else {
                Action::Http {
                    port,
                    path: http.path.clone().unwrap_or_else(|| "/".into()),
                    headers: http
                        .http_headers
                        .iter()
                        .flatten()
                        .map(|h| (h.name.clone(), h.value.clone()))
                        .collect(),
                }
            }
        } else {
            return Err(format!(
                "container {}: only tcpSocket and httpGet readiness probes are sent; it is ready while it runs",
                c.name
            ));
        };
        Ok(Self {
            action,
            initial_delay: seconds(probe.initial_delay_seconds, 0, 0),
            period: seconds(probe.period_seconds, 10, 1),
            timeout: seconds(probe.timeout_seconds, 1, 1),
            success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
        })
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve_port(
    port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    c: &k8s_openapi::api::core::v1::Container,
) -> Option<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// One container's readiness, as its probes find it.
#[derive(Debug)]
pub struct Prober {
    spec: ProbeSpec,
    ready: bool,
    successes: u32,
    failures: u32,
    next: Instant,
    in_flight: Option<mpsc::Receiver<bool>>,
}

impl Prober {
    pub fn new(spec: ProbeSpec) -> Self {
        let next = Instant::now() + spec.initial_delay;
        Self {
            spec,
            ready: false,
            successes: 0,
            failures: 0,
            next,
            in_flight: None,
        }
    }

    pub fn ready(&self) -> bool {
        self.ready
    }

    /// The container started (again): not ready until probed.
    pub fn restarted(&mut self) {
        self.ready = false;
        self.successes = 0;
        self.failures = 0;
        self.next = Instant::now() + self.spec.initial_delay;
        self.in_flight = None;
    }

    /// Takes the result of the probe in flight, if it is in, and sends the
    /// next one when it is due (on a thread of its own: a slow probe holds
    /// up nothing else). `netns`: the node's network namespace; `ip`: the
    /// pod's address.
    pub fn tick(&mut self, netns: &Path, ip: IpAddr) {
        if let Some(rx) = &self.in_flight {
            match rx.try_recv() {
                Ok(success) => {
                    self.in_flight = None;
                    self.record(success);
                }
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.in_flight = None;
                    self.record(false);
                }
            }
        }
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + self.spec.period;
        let (tx, rx) = mpsc::channel();
        let (action, timeout, netns) = (
            self.spec.action.clone(),
            self.spec.timeout,
            netns.to_path_buf(),
        );
        std::thread::spawn(move || {
            let success = in_netns(&netns, || probe(&action, ip, timeout)).unwrap_or(false);
            let _ = tx.send(success);
        });
        self.in_flight = Some(rx);
    }

    fn record(&mut self, success: bool) {
        if success {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= self.spec.success_threshold {
                self.ready = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= self.spec.failure_threshold {
                self.ready = false;
            }
        }
    }
}

/// Runs `f` on this thread inside the network namespace at `netns`. Call
/// it on a thread made for it: the thread stays in that namespace.
fn in_netns<T>(netns: &PathBuf, f: impl FnOnce() -> T) -> std::io::Result<T> {
    let file = std::fs::File::open(netns)?;
    // SAFETY: setns(2) on a valid open descriptor changes only the calling
    // thread's network namespace; that thread is the probe's own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f())
}

/// One probe: whether it succeeded within `timeout`.
pub fn probe(action: &Action, ip: IpAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let port = match action {
        Action::Tcp { port } | Action::Http { port, .. } => *port,
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&SocketAddr::new(ip, port), timeout) else {
        return false;
    };
    let Action::Http { path, headers, .. } = action else {
        return true;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero()
        || stream.set_read_timeout(Some(left)).is_err()
        || stream.set_write_timeout(Some(left)).is_err()
    {
        return false;
    }
    let host = SocketAddr::new(ip, port);
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kube-probe/1.36\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    // The status line is all that counts: "HTTP/1.1 200 OK".
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => {
                read += n;
                if head[..read].contains(&b'\n') {
                    break;
                }
            }
            Err(_) => return false,
        }
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let status: Option<u16> = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok());
    status.is_some_and(|s| (200..400).contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server on loopback answering every connection with `status`.
    fn server(status: &'static str) -> (u16, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                );
            }
        });
        (port, handle)
    }

    fn http(port: u16) -> Action {
        Action::Http {
            port,
            path: "/ready".into(),
            headers: vec![],
        }
    }

    #[test]
    fn http_probes_succeed_on_2xx_and_3xx_only() {
        let localhost: IpAddr = "127.0.0.1".parse().unwrap();
        for (status, ok) in [
            ("200 OK", true),
            ("302 Found", true),
            ("503 Unavailable", false),
            ("404 Not Found", false),
        ] {
            let (port, server) = server(status);
            assert_eq!(
                probe(&http(port), localhost, Duration::from_secs(5)),
                ok,
                "{status}"
            );
            server.join().unwrap();
        }
        // Nobody listening: a failure, for both kinds.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(!probe(&http(closed), localhost, Duration::from_secs(5)));
        assert!(!probe(
            &Action::Tcp { port: closed },
            localhost,
            Duration::from_secs(5)
        ));
    }

    #[test]
    fn a_server_that_never_answers_fails_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let started = Instant::now();
        assert!(!probe(
            &http(port),
            "127.0.0.1".parse().unwrap(),
            Duration::from_secs(1)
        ));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the probe hung"
        );
        drop(listener);
    }

    #[test]
    fn thresholds_decide_readiness() {
        let mut p = Prober::new(ProbeSpec {
            action: Action::Tcp { port: 1 },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 2,
            failure_threshold: 3,
        });
        assert!(!p.ready());
        p.record(true);
        assert!(!p.ready(), "one success of two");
        p.record(true);
        assert!(p.ready());
        p.record(false);
        p.record(false);
        assert!(p.ready(), "two failures of three");
        p.record(true);
        p.record(false);
        p.record(false);
        assert!(p.ready(), "a success starts the count again");
        p.record(false);
        assert!(!p.ready());
        p.record(true);
        p.record(true);
        p.restarted();
        assert!(!p.ready(), "a restarted container is probed again");
    }
}
