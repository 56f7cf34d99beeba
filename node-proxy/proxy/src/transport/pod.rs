//! A local pod as the connection code sees it: what the control plane says
//! of it ([`PodInfo`]) and where its sockets come from ([`SocketFactory`]).

use crate::state::PodInfo;
use futures::future::BoxFuture;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use tokio::net::TcpStream;

/// Where a pod's sockets come from. On a node, sockets are made inside the
/// pod's network namespace, with the proxy's mark so that the redirection
/// leaves them alone (`pods::NetnsSockets`); in tests, on loopback.
pub trait SocketFactory: Send + Sync + std::fmt::Debug {
    /// A TCP connection to `target` as the pod would make it (from the
    /// pod's own address), not captured again.
    fn connect(&self, target: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>>;
    /// A listening socket on `addr` inside the pod.
    fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener>;
    /// The address a connection accepted on the pod's outbound listener was
    /// meant for (before the redirection).
    fn original_dst(&self, accepted: &TcpStream) -> io::Result<SocketAddr>;
    /// Where the pod's sockets live, for `/config_dump` (a namespace path).
    fn describe(&self) -> String;
}

/// A pod this proxy serves: the control plane's facts about it, and its
/// sockets. Dereferences to [`PodInfo`], which is all that policy and
/// telemetry may see of it.
#[derive(Clone, Debug)]
pub struct LocalPod {
    pub info: Arc<PodInfo>,
    pub sockets: Arc<dyn SocketFactory>,
}

impl Deref for LocalPod {
    type Target = PodInfo;

    fn deref(&self) -> &PodInfo {
        &self.info
    }
}

impl LocalPod {
    /// A TCP connection from the pod to `target`, without Nagle's delay
    /// (the proxy forwards what it has at once).
    pub async fn connect(&self, target: SocketAddr) -> io::Result<TcpStream> {
        let stream = self.sockets.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}
