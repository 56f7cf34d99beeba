//! Test fixture: two network namespaces joined by a veth pair, a redirector
//! installed under a pin directory of this test only, and a packet capture.
//!
//! Everything is removed on Drop, also when the test panics. Names embed the
//! pid, so parallel tests (nextest: one process each) never collide, and a
//! later run removes what a killed run left behind.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use weft_redirector::{Netns, PodEnrollment, Redirector, RedirectorConfig};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub const CLIENT_V4: &str = "10.99.0.1";
pub const SERVER_V4: &str = "10.99.0.2";
pub const CLIENT_V6: &str = "fd00:99::1";
pub const SERVER_V6: &str = "fd00:99::2";

fn unique(tag: &str) -> String {
    format!(
        "wrt{}-{}{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        tag
    )
}

pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace created by the test (`ip netns add`), deleted on Drop.
pub struct TestNetns {
    pub name: String,
    pub netns: Netns,
}

impl TestNetns {
    fn new(name: String) -> Self {
        sh("ip", &["netns", "add", &name]);
        let netns = Netns::open(format!("/run/netns/{name}")).expect("open created netns");
        Self { name, netns }
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A namespace someone else created (the simulator's pods).
pub struct TestNetnsRef {
    pub netns: Netns,
}

impl TestNetnsRef {
    pub fn open(path: &Path) -> Self {
        Self {
            netns: Netns::open(path).expect("open pod netns"),
        }
    }
}

/// Two "pods": `client` (10.99.0.1, fd00:99::1) and `server` (10.99.0.2,
/// fd00:99::2), each with `eth0`, joined by a veth pair. Addresses exist
/// only inside these namespaces.
pub struct PodPair {
    pub client: TestNetns,
    pub server: TestNetns,
}

impl PodPair {
    pub fn new() -> Self {
        remove_stale();
        let client = TestNetns::new(unique("c"));
        let server = TestNetns::new(unique("s"));
        sh(
            "ip",
            &[
                "-n",
                &client.name,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &server.name,
            ],
        );
        for (ns, v4, v6) in [
            (&client, CLIENT_V4, CLIENT_V6),
            (&server, SERVER_V4, SERVER_V6),
        ] {
            sh(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{v4}/24"),
                    "dev",
                    "eth0",
                ],
            );
            sh(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            );
            sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
            sh("ip", &["-n", &ns.name, "link", "set", "eth0", "up"]);
        }
        Self { client, server }
    }
}

/// A redirector installed under `/sys/fs/bpf/weft-test-<pid>-<n>`;
/// uninstalled on Drop (panic included).
pub struct Installed {
    pub redirector: Option<Redirector>,
    pub pin_dir: PathBuf,
}

impl Installed {
    pub fn new() -> Self {
        remove_stale();
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/weft-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let redirector = Redirector::install(RedirectorConfig {
            pin_dir: pin_dir.clone(),
            cgroup_root: None,
        })
        .expect("install redirector");
        Self {
            redirector: Some(redirector),
            pin_dir,
        }
    }

    pub fn get(&self) -> &Redirector {
        self.redirector.as_ref().expect("installed")
    }

    pub fn enroll(&self, ns: &TestNetns, uid: &str, annotations: &[(&str, &str)]) {
        self.get()
            .enroll(&PodEnrollment {
                netns: &ns.netns,
                pod_uid: uid.into(),
                annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
            .expect("enroll");
    }

    pub fn uninstall(&mut self) {
        if let Some(r) = self.redirector.take() {
            r.uninstall().expect("uninstall");
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        drop(self.redirector.take());
        let _ = weft_redirector::uninstall_at(&self.pin_dir);
    }
}

/// Removes namespaces and pin directories of test processes that no longer
/// exist (a run killed before its Drop guards ran).
fn remove_stale() {
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix("weft-test-") {
                let pid = rest.split('-').next().unwrap_or("");
                if !alive(pid) {
                    let _ = weft_redirector::uninstall_at(&e.path());
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix("wrt") {
                let pid = rest.split('-').next().unwrap_or("");
                if !alive(pid) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
    }
}

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A socket made in `netns` with the proxy's mark, as the proxy makes
/// them (on its socket thread), waited for here.
pub fn marked_socket(netns: &Netns, domain: socket2::Domain) -> socket2::Socket {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(netns.proxy_tcp_socket(domain))
        .expect("marked socket")
}

/// A non-blocking listener in `ns`.
pub fn listen(ns: &TestNetns, addr: &str) -> TcpListener {
    let l = ns.netns.listen_tcp(addr.parse().unwrap()).expect("listen");
    l.set_nonblocking(true).unwrap();
    l
}

/// Closes `listener` and waits until the kernel has released its socket
/// (it is gone from `ns`'s socket table), as when the proxy holding it has
/// exited. Dropping the descriptor alone does not promise that: a process
/// that a concurrent test is spawning holds a copy of every descriptor
/// from its fork until its exec.
pub fn close_listener(listener: TcpListener, ns: &TestNetns) {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
    // "socket:[INODE]"
    let inode: String = link
        .to_string_lossy()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let present = || {
        let inode = inode.clone();
        ns.netns
            .run(move || {
                let mut found = false;
                for table in ["tcp", "tcp6"] {
                    let text = std::fs::read_to_string(format!("/proc/thread-self/net/{table}"))?;
                    // The tenth column is the socket's inode.
                    found |= text
                        .lines()
                        .skip(1)
                        .any(|line| line.split_whitespace().nth(9) == Some(inode.as_str()));
                }
                Ok::<_, io::Error>(found)
            })
            .expect("reading the namespace's sockets")
    };
    // Seen while open, so that its absence below means something.
    assert!(present(), "socket inode {inode} not found in the namespace");
    drop(listener);
    let deadline = Instant::now() + TIMEOUT;
    while present() {
        assert!(
            Instant::now() < deadline,
            "the listener (socket inode {inode}) was not released"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Accepts one connection within `timeout`, or None.
pub fn accept_within(l: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return Some(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A TCP connect made from inside `ns`, as an application there would.
pub fn connect_from(ns: &TestNetns, to: &str) -> io::Result<TcpStream> {
    let addr: SocketAddr = to.parse().unwrap();
    ns.netns
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .map_err(|e| match e {
            weft_redirector::Error::Netns { source, .. } => source,
            other => io::Error::other(other.to_string()),
        })
}

/// A TCP connect from inside `ns` that no hook steers: the proxy's own
/// (marked) socket, which goes direct (`proxy_marked_sockets_go_direct`).
pub fn direct_connect_from(ns: &TestNetns, to: &str) -> TcpStream {
    let to: SocketAddr = to.parse().unwrap();
    let domain = if to.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = marked_socket(&ns.netns, domain);
    sock.connect_timeout(&to.into(), TIMEOUT)
        .unwrap_or_else(|e| panic!("direct connect to {to}: {e}"));
    TcpStream::from(sock)
}

/// "Nothing (else) reached `listener`", checked without guessing a time
/// window: a sentinel connection that certainly reaches it (direct, from
/// `ns`, the listener's namespace) is made after the connections under
/// test. The kernel queues connections for `accept` in the order they were
/// established, so the sentinel must be the first one accepted; had an
/// earlier connection reached the listener, it would come first. A
/// sentinel that does not arrive fails the test too, so the check cannot
/// pass on a listener that is not reachable at all.
#[track_caller]
pub fn assert_nothing_else_reached(listener: &TcpListener, ns: &TestNetns, what: &str) {
    let mut to = listener.local_addr().unwrap();
    if to.ip().is_unspecified() {
        to.set_ip(match to {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let sentinel = direct_connect_from(ns, &to.to_string());
    let first = accept_within(listener, TIMEOUT)
        .unwrap_or_else(|| panic!("{what}: the sentinel connection to {to} was not accepted"));
    assert_eq!(
        first.peer_addr().unwrap(),
        sentinel.local_addr().unwrap(),
        "{what}: a connection reached {to} before the sentinel"
    );
}

/// Writes `msg` on `a` and checks it arrives on `b`.
pub fn assert_bytes_flow(a: &mut TcpStream, b: &mut TcpStream, msg: &[u8]) {
    a.write_all(msg).unwrap();
    b.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = vec![0u8; msg.len()];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}

/// Raw capture of every frame on an interface of a namespace (AF_PACKET).
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    pub fn start(ns: &TestNetns, ifname: &str) -> Self {
        Self::start_in(&ns.netns, ifname)
    }

    pub fn start_in(netns: &Netns, ifname: &str) -> Self {
        let ifname = std::ffi::CString::new(ifname).unwrap();
        let fd = netns
            .run(move || {
                let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
                // SAFETY: plain socket/bind syscalls on a socket we own.
                unsafe {
                    let fd =
                        libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let owned = OwnedFd::from_raw_fd(fd);
                    let index = libc::if_nametoindex(ifname.as_ptr());
                    if index == 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                    sll.sll_family = libc::AF_PACKET as u16;
                    sll.sll_protocol = proto as u16;
                    sll.sll_ifindex = index as i32;
                    let rc = libc::bind(
                        fd,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    if rc != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(owned)
                }
            })
            .expect("packet capture");
        Self { fd }
    }

    /// TCP SYNs (without ACK) captured so far whose destination port is `port`.
    pub fn syns_to_port(&self, port: u16) -> usize {
        let mut count = 0;
        let mut buf = [0u8; 2048];
        for _ in 0..100_000 {
            // SAFETY: recv into a buffer of the given length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            if let Some((dport, flags)) = tcp_of_frame(&buf[..n as usize])
                && dport == port
                && flags & 0x02 != 0
                && flags & 0x10 == 0
            {
                count += 1;
            }
        }
        count
    }
}

/// (destination port, flags) of a TCP segment in an Ethernet frame.
fn tcp_of_frame(frame: &[u8]) -> Option<(u16, u8)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let tcp = match ethertype {
        0x0800 if *ip.get(9)? == 6 => ip.get(((ip[0] & 0x0f) as usize) * 4..)?,
        0x86dd if *ip.get(6)? == 6 => ip.get(40..)?,
        _ => return None,
    };
    Some((
        u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]),
        *tcp.get(13)?,
    ))
}

/// A stand-in for the node proxy inside one pod's namespace: accepts on a
/// listener, finds where the connection was going (SO_ORIGINAL_DST for
/// outbound, the local address for inbound), connects there with a
/// proxy-marked socket from inside the pod and relays bytes both ways.
/// Records every destination it served. Stops on Drop.
pub struct StandInProxy {
    pub served: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy, PartialEq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl StandInProxy {
    pub fn start(netns_path: &Path, listener: TcpListener, direction: Direction) -> Self {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let served = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let netns = Netns::open(netns_path).expect("pod netns");
        let (served2, stop2) = (served.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                let (client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => panic!("stand-in accept: {e}"),
                };
                client.set_nonblocking(false).unwrap();
                let target = match direction {
                    Direction::Outbound => {
                        weft_redirector::original_dst(&client).expect("SO_ORIGINAL_DST")
                    }
                    Direction::Inbound => client.local_addr().unwrap(),
                };
                served2.lock().unwrap().push(target);
                let domain = socket2::Domain::for_address(target);
                let upstream = marked_socket(&netns, domain);
                if upstream
                    .connect_timeout(&target.into(), Duration::from_secs(5))
                    .is_err()
                {
                    continue; // drops the client: it sees EOF
                }
                relay(client, TcpStream::from(upstream));
            }
        });
        Self {
            served,
            stop,
            thread: Some(thread),
        }
    }

    pub fn served(&self) -> Vec<SocketAddr> {
        self.served.lock().unwrap().clone()
    }
}

impl Drop for StandInProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways until each side half-closes (threads end with the streams).
fn relay(a: TcpStream, b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (mut a, mut b) = (a, b);
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    std::thread::spawn(move || {
        let _ = io::copy(&mut a, &mut b2);
        let _ = b2.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = io::copy(&mut b, &mut a2);
        let _ = a2.shutdown(std::net::Shutdown::Write);
    });
}
