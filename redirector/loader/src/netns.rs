//! A pod's network namespace, and sockets opened inside it.
//!
//! A socket belongs to the network namespace it was created in, forever. So
//! the node proxy, running in the node's namespace, creates its in-pod
//! sockets on a thread that has `setns`-ed into the pod's namespace: only
//! that thread moves, the rest of the process (tokio's workers included)
//! never changes namespace. Set-up work (listeners, the cookie) runs on a
//! short-lived thread per call ([`Netns::run`]); the sockets of connections
//! ([`Netns::proxy_tcp_socket`]), one per new connection to an application,
//! come from one long-lived thread that joins whichever namespace each
//! request names: a thread created per connection cost more than the rest
//! of the connection's set-up (docs/benchmarks.md, new connections). It
//! also makes sockets ahead, several per visit
//! ([`Netns::make_proxy_tcp_sockets`]), so that a connection need not wait
//! for it.

use crate::{Error, PROXY_SOCKET_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, mpsc};

/// `SO_NETNS_COOKIE` (Linux 5.14, asm-generic/socket.h); not in every libc.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// An open network namespace (a file descriptor on `/proc/<pid>/ns/net`,
/// `/run/netns/<name>`, or one handed over by the CNI plugin).
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| Error::Netns {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            fd: file.into(),
            path,
        })
    }

    /// Wraps an already open namespace fd; `label` names it in errors.
    pub fn from_fd(fd: OwnedFd, label: impl Into<PathBuf>) -> Self {
        Self {
            fd,
            path: label.into(),
        }
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, Error> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that has joined this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> Result<T, Error> {
        let fd = self.fd.as_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("thread in the namespace panicked")))
        })
        .map_err(|source| Error::Netns {
            path: self.path.clone(),
            source,
        })
    }

    /// The namespace's cookie: the key of the enrolled-namespaces map, the
    /// same value `bpf_get_netns_cookie` returns inside it.
    pub fn cookie(&self) -> Result<u64, Error> {
        self.run(|| {
            let sock = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket_cookie(&sock)
        })
    }

    /// A TCP listener inside this namespace (SO_REUSEADDR; IPv6 sockets are
    /// IPv6-only so 0.0.0.0 and :: can both be bound). Non-blocking, ready
    /// for `tokio::net::TcpListener::from_std`.
    ///
    /// SO_REUSEPORT: a new node proxy (a rollout) can bind the same in-pod
    /// addresses while the old one still holds them, so the pod is never
    /// without a listener during the hand-over (docs/node-proxy.md). The
    /// kernel only groups sockets of the same effective uid, and only the
    /// pod's own traffic reaches these addresses.
    pub fn listen_tcp(&self, addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
        self.run(|| {
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            if addr.is_ipv6() {
                sock.set_only_v6(true)?;
            }
            sock.set_reuse_address(true)?;
            sock.set_reuse_port(true)?;
            sock.set_nonblocking(true)?;
            sock.bind(&addr.into())?;
            sock.listen(1024)?;
            Ok(sock.into())
        })
    }

    /// A TCP socket inside this namespace carrying [`PROXY_SOCKET_MARK`]:
    /// the proxy's own connections from the pod are never redirected.
    /// Non-blocking, ready for the runtime. Made by the process's socket
    /// thread; the caller's thread (a runtime worker) only waits for the
    /// answer.
    pub async fn proxy_tcp_socket(&self, domain: Domain) -> Result<Socket, Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.make_proxy_tcp_sockets(domain, 1, move |made| {
            // The asker may have given up (its connection was dropped).
            let _ = reply.send(made);
        })?;
        answer
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the socket thread has exited")))
            .and_then(|mut made| {
                made.pop()
                    .ok_or_else(|| io::Error::other("the socket thread made no socket"))
            })
            .map_err(|source| self.failed(source))
    }

    /// Asks the socket thread for `count` sockets like
    /// [`Netns::proxy_tcp_socket`]'s, made in one visit to the namespace,
    /// and returns at once: `deliver` gets them (or the error) on the
    /// socket thread, so it must be quick and must not block.
    pub fn make_proxy_tcp_sockets(
        &self,
        domain: Domain,
        count: usize,
        deliver: impl FnOnce(io::Result<Vec<Socket>>) + Send + 'static,
    ) -> Result<(), Error> {
        // The thread gets its own descriptor of the namespace: this one may
        // be closed (the pod gone) before the request is served.
        let netns = self.fd.try_clone().map_err(|e| self.failed(e))?;
        socket_thread()
            .and_then(|requests| {
                requests
                    .send(SocketRequest {
                        netns,
                        domain,
                        count,
                        deliver: Box::new(deliver),
                    })
                    .map_err(|_| io::Error::other("the socket thread has exited"))
            })
            .map_err(|e| self.failed(e))
    }

    fn failed(&self, source: io::Error) -> Error {
        Error::Netns {
            path: self.path.clone(),
            source,
        }
    }
}

/// Sockets to make in a namespace, and who gets them.
struct SocketRequest {
    netns: OwnedFd,
    domain: Domain,
    count: usize,
    deliver: Box<dyn FnOnce(io::Result<Vec<Socket>>) + Send>,
}

/// The requests of the process's socket thread, started on first use. It
/// lives as long as the process (sockets are wanted until the end).
fn socket_thread() -> io::Result<&'static mpsc::Sender<SocketRequest>> {
    static REQUESTS: OnceLock<mpsc::Sender<SocketRequest>> = OnceLock::new();
    if let Some(requests) = REQUESTS.get() {
        return Ok(requests);
    }
    let (send, receive) = mpsc::channel::<SocketRequest>();
    // The thread goes back to the proxy's own namespace after each visit:
    // a thread left in a pod's namespace would keep that namespace (and
    // its interfaces) alive after the pod is gone.
    let home = File::open("/proc/thread-self/ns/net")?;
    let thread = std::thread::Builder::new()
        .name("netns-sockets".into())
        .spawn(move || {
            let join = |ns: BorrowedFd<'_>| {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            };
            for request in receive {
                let made = join(request.netns.as_fd()).and_then(|()| {
                    let made: io::Result<Vec<Socket>> = (0..request.count)
                        .map(|_| {
                            let sock = Socket::new(
                                request.domain,
                                Type::STREAM.nonblocking(),
                                Some(Protocol::TCP),
                            )?;
                            sock.set_mark(PROXY_SOCKET_MARK)?;
                            Ok(sock)
                        })
                        .collect();
                    let back = join(home.as_fd());
                    let made = made?;
                    back.map(|()| made)
                });
                (request.deliver)(made);
            }
        });
    // Two callers racing here each start a thread; the loser's exits at
    // once (its sender is dropped with the lost value).
    thread?;
    Ok(REQUESTS.get_or_init(|| send))
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn socket_cookie(sock: &Socket) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_of_current_namespace_is_stable_and_nonzero() {
        let ns = Netns::current().unwrap();
        let a = ns.cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, Netns::current().unwrap().cookie().unwrap());
    }

    /// The rollout hand-over: a second listener binds the address a first
    /// one holds, both accept, and once the first closes the second takes
    /// every new connection.
    #[test]
    fn a_second_listener_binds_the_same_address_and_takes_over() {
        use std::io::{Read, Write};
        let ns = Netns::current().unwrap();
        let old = ns.listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = old.local_addr().unwrap();
        let new = ns
            .listen_tcp(addr)
            .expect("a second listener on the same address");
        // Control: a socket without SO_REUSEPORT cannot join them.
        assert!(std::net::TcpListener::bind(addr).is_err());
        for l in [&old, &new] {
            l.set_nonblocking(false).unwrap();
        }
        // The kernel spreads new connections over the group: connect until
        // each listener has accepted one (bounded).
        let accepted = |l: &std::net::TcpListener| {
            l.set_nonblocking(true).unwrap();
            let got = l.accept().is_ok();
            l.set_nonblocking(false).unwrap();
            got
        };
        let (mut old_got, mut new_got) = (false, false);
        let mut clients = Vec::new();
        for _ in 0..200 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            // The handshake completed in connect: the connection is queued.
            old_got |= accepted(&old);
            new_got |= accepted(&new);
            if old_got && new_got {
                break;
            }
        }
        assert!(old_got && new_got, "both listeners accept");
        // The old one closes: every new connection reaches the new one.
        drop(old);
        for i in 0..20u8 {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(&[i]).unwrap();
            let (mut s, _) = new.accept().unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i);
        }
    }

    #[test]
    fn missing_namespace_is_a_typed_error() {
        let err = Netns::open("/run/netns/weft-does-not-exist").unwrap_err();
        assert!(matches!(err, Error::Netns { .. }), "{err}");
        assert!(err.to_string().contains("weft-does-not-exist"));
    }
}
