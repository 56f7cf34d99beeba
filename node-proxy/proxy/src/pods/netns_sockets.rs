//! A pod's sockets on a node: made inside the pod's network namespace.

use crate::transport::SocketFactory;
use futures::future::BoxFuture;
use socket2::{Domain, SockAddr, Socket};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;
use weft_redirector::Netns;

/// Sockets inside one pod's network namespace. Outgoing ones carry the
/// proxy's socket mark, so the connect hook leaves them alone and they
/// leave from the pod's own address.
///
/// A connection takes its socket from a small stock made ahead by the
/// process's socket thread, which is then refilled behind it: waiting for
/// that thread (a hand-over, two `setns` and the answer) was a fixed cost
/// of every new connection to an application. The stock is made on first
/// use, so a pod that never connects holds none.
#[derive(Debug)]
pub struct NetnsSockets {
    netns: Arc<Netns>,
    stock: Arc<SocketStock>,
}

/// Sockets made ahead, per address family, at most [`STOCK`] each.
#[derive(Debug, Default)]
struct SocketStock {
    v4: Family,
    v6: Family,
}

#[derive(Debug, Default)]
struct Family {
    ready: Mutex<Vec<Socket>>,
    /// A refill is asked for and not delivered yet: at most one at a time.
    refilling: AtomicBool,
}

/// Sockets kept ready per address family: enough for a burst of new
/// connections to arrive between two visits of the socket thread, few
/// enough to cost nothing per pod (an unconnected socket is a descriptor
/// and a few KiB of kernel memory).
const STOCK: usize = 8;

/// The stock is refilled once it is down to this many: one visit of the
/// socket thread (a wake-up and two `setns`) serves several connections.
const REFILL_AT: usize = STOCK / 2;

impl SocketStock {
    fn family(&self, domain: Domain) -> &Family {
        if domain == Domain::IPV6 {
            &self.v6
        } else {
            &self.v4
        }
    }
}

impl NetnsSockets {
    pub fn new(netns: Arc<Netns>) -> Self {
        Self {
            netns,
            stock: Arc::default(),
        }
    }
}

/// Asks the socket thread to fill `domain`'s stock once it is down to
/// [`REFILL_AT`], unless a refill is already on its way. The sockets are
/// delivered straight into the stock, on the socket thread: no task waits
/// for them; a pod gone by then drops them. A refill that cannot be asked
/// for is no connection's error: the next one without a socket in stock
/// makes its own and reports what fails.
fn refill(netns: &Netns, stock: &Arc<SocketStock>, domain: Domain) {
    let family = stock.family(domain);
    let left = family.len();
    if left > REFILL_AT || family.refilling.swap(true, Ordering::AcqRel) {
        return;
    }
    let stock = Arc::downgrade(stock);
    let asked = netns.make_proxy_tcp_sockets(domain, STOCK - left, move |made| {
        if let Some(stock) = stock.upgrade() {
            stock.family(domain).restock(made.unwrap_or_default());
        }
    });
    if asked.is_err() {
        family.refilling.store(false, Ordering::Release);
    }
}

impl Family {
    fn take(&self) -> Option<Socket> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn len(&self) -> usize {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A refill's delivery (empty when it failed: the namespace is going
    /// away); the next connection may ask again.
    fn restock(&self, made: Vec<Socket>) {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        let room = STOCK.saturating_sub(ready.len());
        ready.extend(made.into_iter().take(room));
        drop(ready);
        self.refilling.store(false, Ordering::Release);
    }
}

impl SocketFactory for NetnsSockets {
    fn connect(&self, target: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        let domain = Domain::for_address(target);
        let taken = self.stock.family(domain).take();
        let (netns, stock) = (self.netns.clone(), self.stock.clone());
        Box::pin(async move {
            // From the stock, or made now when it is empty (the pod's first
            // connection, a burst); either way it is topped up behind.
            let socket = match taken {
                Some(socket) => socket,
                None => netns
                    .proxy_tcp_socket(domain)
                    .await
                    .map_err(io::Error::other)?,
            };
            refill(&netns, &stock, domain);
            // Made non-blocking.
            match socket.connect(&SockAddr::from(target)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            let stream = TcpStream::from_std(socket.into())?;
            stream.writable().await?;
            if let Some(e) = stream.take_error()? {
                return Err(e);
            }
            Ok(stream)
        })
    }

    fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        self.netns.listen_tcp(addr).map_err(io::Error::other)
    }

    fn original_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr> {
        weft_redirector::original_dst(accepted)
    }

    fn describe(&self) -> String {
        self.netns.path().display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The fds of the IPv4 sockets in stock once no refill is on its way
    /// (refills are delivered on the socket thread: waited for, 5 s at
    /// most).
    async fn settled_stock(sockets: &NetnsSockets) -> Vec<i32> {
        let family = &sockets.stock.v4;
        for _ in 0..500 {
            if !family.refilling.load(Ordering::Acquire) {
                return family
                    .ready
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_raw_fd())
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("a refill of the stock was not delivered within 5 s");
    }

    /// The first connection finds no stock and has a socket made for it,
    /// and the stock is filled behind it; the next connections take
    /// theirs from the stock, which is refilled once it is down to half:
    /// proxy-marked sockets of the namespace, which connect and carry
    /// bytes.
    #[tokio::test]
    async fn connections_take_their_sockets_from_a_stock_refilled_behind_them() {
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = app.local_addr().unwrap();
        let sockets = NetnsSockets::new(Arc::new(Netns::current().unwrap()));
        assert!(settled_stock(&sockets).await.is_empty());

        let _first = sockets.connect(target).await.expect("first connection");
        let _first_served = app.accept().await.unwrap();
        assert_eq!(settled_stock(&sockets).await.len(), STOCK);
        for _ in 0..6 {
            let stocked = settled_stock(&sockets).await;
            let mut conn = sockets.connect(target).await.expect("connection");
            assert!(
                stocked.contains(&conn.as_raw_fd()),
                "the connection's socket {} is one of the stock's {stocked:?}",
                conn.as_raw_fd()
            );
            assert_eq!(
                socket2::SockRef::from(&conn).mark().unwrap(),
                weft_redirector::PROXY_SOCKET_MARK
            );
            let (mut served, _) = app.accept().await.unwrap();
            conn.write_all(b"hello").await.unwrap();
            let mut got = [0u8; 5];
            served.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"hello");
        }
        // 8, taken down to 4, refilled to 8, taken twice more.
        assert_eq!(settled_stock(&sockets).await.len(), 6);
    }
}
