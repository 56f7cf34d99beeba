//! Test helpers (feature `testing`, never in a release binary): a pod whose
//! sockets are plain loopback sockets of the test's own process, so that
//! connection code (routing, retries, timeouts, authorization, error
//! responses) runs in-process, without root, namespaces or eBPF.

use crate::state::PodInfo;
use crate::transport::{LocalPod, SocketFactory};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;

/// Sockets of the test process. What a redirected connection was meant for
/// cannot be read from a loopback socket, so the test says it: connections
/// accepted on a listener registered with [`LoopbackSockets::redirect`] were
/// meant for its destination; any other connection for the address it was
/// accepted on (as inbound connections are).
#[derive(Debug, Default)]
pub struct LoopbackSockets {
    redirects: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl LoopbackSockets {
    /// Connections accepted on `listener` were meant for `dst`.
    pub fn redirect(&self, listener: SocketAddr, dst: SocketAddr) {
        self.redirects
            .lock()
            .expect("redirects lock")
            .insert(listener, dst);
    }
}

impl SocketFactory for LoopbackSockets {
    fn connect(&self, target: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(target))
    }

    fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    fn original_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr> {
        let local = accepted.local_addr()?;
        let redirects = self.redirects.lock().expect("redirects lock");
        Ok(redirects.get(&local).copied().unwrap_or(local))
    }

    fn describe(&self) -> String {
        "loopback (test)".into()
    }
}

/// A local pod on loopback sockets; `info` says who it is.
pub fn loopback_pod(info: PodInfo) -> (Arc<LocalPod>, Arc<LoopbackSockets>) {
    let sockets = Arc::new(LoopbackSockets::default());
    let pod = Arc::new(LocalPod {
        info: Arc::new(info),
        sockets: sockets.clone(),
    });
    (pod, sockets)
}
