//! Test helpers (feature `testing`, never in a release binary): a pod whose
//! sockets are plain loopback sockets of the test's own process, so that
//! connection code (routing, retries, timeouts, authorization, error
//! responses) runs in-process, without root, namespaces or eBPF.

use crate::state::PodInfo;
use crate::transport::{LocalPod, SocketFactory};
use futures::future::BoxFuture;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpStream;

/// Sockets of the test process. What a redirected connection was meant for
/// cannot be read from a loopback socket, so the test says it: every
/// connection accepted on the pod's outbound listener goes to the address
/// last set with [`LoopbackSockets::set_original_dst`] (by default, the
/// address the connection was accepted on, as for inbound).
#[derive(Debug, Default)]
pub struct LoopbackSockets {
    original_dst: Mutex<Option<SocketAddr>>,
}

impl LoopbackSockets {
    pub fn set_original_dst(&self, dst: SocketAddr) {
        *self.original_dst.lock().expect("original_dst lock") = Some(dst);
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
        match *self.original_dst.lock().expect("original_dst lock") {
            Some(dst) => Ok(dst),
            None => accepted.local_addr(),
        }
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
