//! Micro-benchmark of the redirector's per-call cost (run as root; `cargo
//! xtask bench redirector` builds and runs it).
//!
//! Each round measures every case in three states, in rotating order: bare
//! (nothing attached), noop (do-nothing getsockopt and connect4 programs at
//! the cgroup root: the kernel's own cost of having the hooks) and weft (the
//! redirector installed). Added costs are per-round differences; we report
//! their median and p10..p90 over the rounds.
//!
//! Every process on the node pays, with its namespace not enrolled:
//! - `getsockopt(SO_RCVBUF)`: any getsockopt (our program exits on optname);
//! - `UDP connect()`: connect4 hook, early exit (not TCP);
//! - `TCP connect+accept`: to the namespace's own IP (map lookup, miss).
//!
//! An enrolled pod and the proxy pay:
//! - `getsockopt(SO_ORIGINAL_DST)` on the accepted socket (baseline: the
//!   kernel's "no such option" answer);
//! - `TCP connect+accept` redirected to the 127.0.0.1:15001 listener
//!   (connect4 + socket storage + sockops entry), against a direct connect
//!   to 127.0.0.1:15001 without programs.

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

/// What is attached at the cgroup root while a case runs.
#[derive(Clone, Copy, PartialEq)]
enum State {
    /// Nothing of ours.
    Bare,
    /// Do-nothing getsockopt and connect4 programs: the kernel's own cost
    /// of having these hooks at all.
    Noop,
    /// The redirector.
    Weft,
}

struct Noop(#[allow(dead_code)] aya::Ebpf);

impl Noop {
    fn attach() -> Result<Self, String> {
        use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt};
        let root = weft_redirector::find_cgroup2_root().map_err(|e| e.to_string())?;
        let cgroup = std::fs::File::open(root).map_err(|e| e.to_string())?;
        let mut ebpf = aya::Ebpf::load(weft_redirector::bench_support::BENCH_NOOP_OBJECT)
            .map_err(|e| e.to_string())?;
        let p: &mut CgroupSockopt = ebpf
            .program_mut("weft_bench_noop_getsockopt")
            .ok_or("noop getsockopt missing")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        p.load().map_err(|e| e.to_string())?;
        p.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| e.to_string())?;
        let p: &mut CgroupSockAddr = ebpf
            .program_mut("weft_bench_noop_connect4")
            .ok_or("noop connect4 missing")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        p.load().map_err(|e| e.to_string())?;
        p.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| e.to_string())?;
        // Dropping the Ebpf detaches both (unpinned links).
        Ok(Self(ebpf))
    }
}

#[derive(Default)]
struct Samples {
    bare: Vec<f64>,
    noop: Vec<f64>,
    weft: Vec<f64>,
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn diff(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn spread(v: &[f64]) -> String {
    format!(
        "{:.0} ({:.0}..{:.0})",
        pct(v, 0.5),
        pct(v, 0.1),
        pct(v, 0.9)
    )
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

    let common_names = [
        "getsockopt(SO_RCVBUF)",
        "UDP connect()",
        "TCP connect+accept, not enrolled",
    ];
    let enrolled_names = [
        "getsockopt(SO_ORIGINAL_DST) by the proxy",
        "TCP connect+accept, enrolled -> 15001",
    ];
    let mut common: Vec<Samples> = common_names.iter().map(|_| Samples::default()).collect();
    let mut enrolled: Vec<Samples> = enrolled_names.iter().map(|_| Samples::default()).collect();

    for round in 0..ROUNDS {
        let mut order = [State::Bare, State::Noop, State::Weft];
        // Rotate the order per round, so drift within a round cancels.
        order.rotate_left(round % 3);
        for state in order {
            for (s, v) in common
                .iter_mut()
                .zip(measure_common(&netns, &pin_dir, state)?)
            {
                match state {
                    State::Bare => s.bare.push(v),
                    State::Noop => s.noop.push(v),
                    State::Weft => s.weft.push(v),
                }
            }
            if state != State::Noop {
                let weft = state == State::Weft;
                for (s, v) in enrolled
                    .iter_mut()
                    .zip(measure_enrolled(&netns, &pin_dir, weft)?)
                {
                    if weft { s.weft.push(v) } else { s.bare.push(v) }
                }
            }
        }
        eprint!(".");
    }
    eprintln!();
    println!(
        "redirector micro-benchmark: {ROUNDS} rounds, ns per call, median (p10..p90 of per-round differences)"
    );
    println!();
    println!("Paid by every process on the node (namespace not enrolled):");
    println!(
        "{:<36} {:>9} {:>9} {:>9} {:>20} {:>20}",
        "case", "bare", "noop", "weft", "added: kernel hook", "added: weft total"
    );
    for (name, s) in common_names.iter().zip(&common) {
        println!(
            "{:<36} {:>9.0} {:>9.0} {:>9.0} {:>20} {:>20}",
            name,
            pct(&s.bare, 0.5),
            pct(&s.noop, 0.5),
            pct(&s.weft, 0.5),
            spread(&diff(&s.noop, &s.bare)),
            spread(&diff(&s.weft, &s.bare)),
        );
    }
    println!();
    println!(
        "Enrolled pod / proxy (baseline: same call without programs, direct to 127.0.0.1:15001):"
    );
    println!("{:<44} {:>9} {:>9} {:>22}", "case", "bare", "weft", "added");
    for (name, s) in enrolled_names.iter().zip(&enrolled) {
        println!(
            "{:<44} {:>9.0} {:>9.0} {:>22}",
            name,
            pct(&s.bare, 0.5),
            pct(&s.weft, 0.5),
            spread(&diff(&s.weft, &s.bare)),
        );
    }
    Ok(())
}

/// The cases every process pays, with `state` attached at the root.
fn measure_common(netns: &Netns, pin_dir: &Path, state: State) -> Result<Vec<f64>, String> {
    let _noop = if state == State::Noop {
        Some(Noop::attach()?)
    } else {
        None
    };
    let _weft = if state == State::Weft {
        Some(Install::new(pin_dir, None)?)
    } else {
        None
    };
    let err = |e: weft_redirector::Error| e.to_string();
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    let fd = sock.as_raw_fd();
    let getsockopt = per_call(300_000, || getsockopt_rcvbuf(fd));
    let udp = netns
        .run(|| {
            let u = UdpSocket::bind("0.0.0.0:0")?;
            Ok(per_call(200_000, || {
                u.connect("10.98.0.7:53").expect("udp connect");
            }))
        })
        .map_err(err)?;
    let tcp = netns
        .run(|| {
            let l = TcpListener::bind("0.0.0.0:8080")?;
            let to: SocketAddr = "10.98.0.1:8080".parse().unwrap();
            Ok(per_call(3_000, || tcp_connect_accept(&l, to)))
        })
        .map_err(err)?;
    Ok(vec![getsockopt, udp, tcp])
}

/// The redirect path and SO_ORIGINAL_DST, with the bench netns enrolled
/// (`weft`) or with nothing attached.
fn measure_enrolled(netns: &Netns, pin_dir: &Path, weft: bool) -> Result<Vec<f64>, String> {
    let _install = if weft {
        Some(Install::new(pin_dir, Some(netns))?)
    } else {
        None
    };
    let (orig, tcp) = netns
        .run(|| {
            let l = TcpListener::bind("127.0.0.1:15001")?;
            // With programs: the app's connect to 10.98.0.2:8080 is
            // redirected; baseline: the same handshake, addressed directly.
            let to: SocketAddr = if weft {
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
            if weft {
                assert_eq!(
                    original_dst(&a).expect("answered"),
                    "10.98.0.2:8080".parse::<SocketAddr>().unwrap()
                );
            }
            Ok((orig, tcp))
        })
        .map_err(|e| e.to_string())?;
    Ok(vec![orig, tcp])
}
