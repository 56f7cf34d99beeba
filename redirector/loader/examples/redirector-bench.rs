//! Micro-benchmark of the redirector's per-call cost (run as root; `cargo
//! xtask bench redirector` builds and runs it).
//!
//! Each round measures every case twice, without our programs (baseline) and
//! with them installed at the cgroup root, so both sides of a pair share the
//! machine's state of the moment; the added cost is the per-round difference
//! and we report its median and spread (p10..p90) over the rounds.
//!
//! Cases:
//! - `getsockopt SO_RCVBUF (any process)`: what every getsockopt on the node
//!   pays once a cgroup getsockopt program exists (our early exit included).
//! - `getsockopt SO_ORIGINAL_DST (proxy)`: the proxy's call on an accepted
//!   redirected socket (baseline: the kernel's own "no such option" answer).
//! - `UDP connect (any process)`: connect4 hook early exit (not TCP).
//! - `TCP connect, not enrolled`: connect+accept to the netns's own IP with
//!   the netns not enrolled (map lookup, miss).
//! - `TCP connect, enrolled -> 15001`: an enrolled pod's connect redirected
//!   to the 127.0.0.1:15001 listener (connect4 + sk_storage + sockops entry),
//!   against a direct connect to 127.0.0.1:15001 without programs.

use socket2::{Domain, Socket, Type};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use weft_redirector::{Netns, PodEnrollment, Redirector, RedirectorConfig, original_dst};

const ROUNDS: usize = 15;

fn main() {
    if let Err(e) = run() {
        eprintln!("redirector-bench: {e}");
        std::process::exit(1);
    }
}

struct BenchNetns(String);
impl Drop for BenchNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .map_err(|e| e.to_string())?
        .success();
    if ok {
        Ok(())
    } else {
        Err(format!("ip {} failed", args.join(" ")))
    }
}

struct Install {
    pin_dir: PathBuf,
    redirector: Option<Redirector>,
}
impl Install {
    fn new(pin_dir: &Path, netns: Option<&Netns>) -> Result<Self, String> {
        let r = Redirector::install(RedirectorConfig {
            pin_dir: pin_dir.to_path_buf(),
            cgroup_root: None,
        })
        .map_err(|e| e.to_string())?;
        if let Some(ns) = netns {
            r.enroll(&PodEnrollment {
                netns: ns,
                pod_uid: "bench".into(),
                annotations: Default::default(),
            })
            .map_err(|e| e.to_string())?;
        }
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            redirector: Some(r),
        })
    }
}
impl Drop for Install {
    fn drop(&mut self) {
        if let Some(r) = self.redirector.take() {
            let _ = r.uninstall();
        }
        let _ = weft_redirector::uninstall_at(&self.pin_dir);
    }
}

/// ns per call of `f` over `n` calls.
fn per_call(n: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn getsockopt_rcvbuf(fd: i32) {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: writes at most `len` bytes into `v`.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
}

fn tcp_connect_accept(listener: &TcpListener, to: SocketAddr) {
    let s = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("socket");
    // RST on close: no TIME_WAIT, so thousands of rounds do not exhaust ports.
    s.set_linger(Some(Duration::ZERO)).expect("linger");
    s.connect(&to.into()).expect("connect");
    let (a, _) = listener.accept().expect("accept");
    drop(s);
    drop(a);
}

#[derive(Default)]
struct Case {
    name: &'static str,
    base: Vec<f64>,
    with: Vec<f64>,
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn run() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "must run as root (it loads eBPF programs and creates a network namespace)".into(),
        );
    }
    let pid = std::process::id();
    let name = format!("wbench{pid}");
    ip(&["netns", "add", &name])?;
    let _ns_guard = BenchNetns(name.clone());
    ip(&["-n", &name, "link", "set", "lo", "up"])?;
    // veth (present everywhere the simulator runs; dummy may be a missing module)
    ip(&[
        "-n", &name, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ])?;
    ip(&["-n", &name, "link", "set", "d1", "up"])?;
    ip(&["-n", &name, "addr", "add", "10.98.0.1/24", "dev", "d0"])?;
    ip(&["-n", &name, "link", "set", "d0", "up"])?;
    let netns = Netns::open(format!("/run/netns/{name}")).map_err(|e| e.to_string())?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/weft-bench-{pid}"));

    let mut cases = vec![
        Case {
            name: "getsockopt SO_RCVBUF (any process)",
            ..Default::default()
        },
        Case {
            name: "getsockopt SO_ORIGINAL_DST (proxy)",
            ..Default::default()
        },
        Case {
            name: "UDP connect (any process)",
            ..Default::default()
        },
        Case {
            name: "TCP connect+accept, not enrolled",
            ..Default::default()
        },
        Case {
            name: "TCP connect+accept, enrolled -> 15001",
            ..Default::default()
        },
    ];

    for round in 0..ROUNDS {
        for installed in [false, true] {
            // Alternate which side goes first, so drift within a round cancels.
            let installed = installed ^ (round % 2 == 1);
            let results = measure(&netns, &pin_dir, installed)?;
            for (case, v) in cases.iter_mut().zip(results) {
                if installed {
                    case.with.push(v)
                } else {
                    case.base.push(v)
                }
            }
        }
        eprint!(".");
    }
    eprintln!();
    println!(
        "redirector micro-benchmark: {ROUNDS} rounds, ns per call; added = with programs - baseline, paired per round"
    );
    println!(
        "{:<40} {:>12} {:>12} {:>12} {:>20}",
        "case", "baseline", "with progs", "added", "added p10..p90"
    );
    for c in &cases {
        let deltas: Vec<f64> = c.with.iter().zip(&c.base).map(|(w, b)| w - b).collect();
        println!(
            "{:<40} {:>12.0} {:>12.0} {:>12.0} {:>9.0}..{:<9.0}",
            c.name,
            pct(&c.base, 0.5),
            pct(&c.with, 0.5),
            pct(&deltas, 0.5),
            pct(&deltas, 0.1),
            pct(&deltas, 0.9),
        );
    }
    Ok(())
}

/// One measurement of every case; `installed` puts the programs in place
/// (and enrolls the bench netns for the enrolled case only).
fn measure(netns: &Netns, pin_dir: &Path, installed: bool) -> Result<Vec<f64>, String> {
    let mut out = Vec::new();
    let err = |e: weft_redirector::Error| e.to_string();

    // Not enrolled: cases that every process on the node pays.
    {
        let _install = if installed {
            Some(Install::new(pin_dir, None)?)
        } else {
            None
        };
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
        let fd = sock.as_raw_fd();
        out.push(per_call(300_000, || getsockopt_rcvbuf(fd)));
        out.push(0.0); // filled below (needs an enrolled netns)
        let udp = netns
            .run(|| {
                let u = UdpSocket::bind("0.0.0.0:0")?;
                Ok(per_call(200_000, || {
                    u.connect("10.98.0.7:53").expect("udp connect");
                }))
            })
            .map_err(err)?;
        out.push(udp);
        let tcp = netns
            .run(|| {
                let l = TcpListener::bind("0.0.0.0:8080")?;
                let to: SocketAddr = "10.98.0.1:8080".parse().unwrap();
                Ok(per_call(3_000, || tcp_connect_accept(&l, to)))
            })
            .map_err(err)?;
        out.push(tcp);
    }

    // Enrolled: the redirect path, and SO_ORIGINAL_DST on the proxy's socket.
    {
        let _install = if installed {
            Some(Install::new(pin_dir, Some(netns))?)
        } else {
            None
        };
        let (tcp, orig) = netns
            .run(|| {
                let l = TcpListener::bind("127.0.0.1:15001")?;
                // With programs: the app's connect to 10.98.0.2:8080 is
                // redirected; baseline: the same handshake, addressed directly.
                let to: SocketAddr = if installed {
                    "10.98.0.2:8080"
                } else {
                    "127.0.0.1:15001"
                }
                .parse()
                .unwrap();
                let tcp = per_call(3_000, || tcp_connect_accept(&l, to));
                let c = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                c.connect(&to.into())?;
                let (a, _) = l.accept()?;
                let orig = per_call(300_000, || {
                    let _ = original_dst(&a);
                });
                if installed {
                    assert_eq!(
                        original_dst(&a).expect("answered"),
                        "10.98.0.2:8080".parse::<SocketAddr>().unwrap()
                    );
                }
                Ok((tcp, orig))
            })
            .map_err(err)?;
        out[1] = orig;
        out.push(tcp);
    }
    Ok(out)
}
