//! A pod's sockets on a node: made inside the pod's network namespace.

use crate::transport::SocketFactory;
use futures::future::BoxFuture;
use socket2::{Domain, SockAddr};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use weft_redirector::Netns;

/// Sockets inside one pod's network namespace. Outgoing ones carry the
/// proxy's socket mark, so the connect hook leaves them alone and they
/// leave from the pod's own address.
#[derive(Debug)]
pub struct NetnsSockets {
    netns: Arc<Netns>,
}

impl NetnsSockets {
    pub fn new(netns: Arc<Netns>) -> Self {
        Self { netns }
    }
}

impl SocketFactory for NetnsSockets {
    fn connect(&self, target: SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> {
        let netns = self.netns.clone();
        Box::pin(async move {
            let socket = netns
                .proxy_tcp_socket(Domain::for_address(target))
                .await
                .map_err(io::Error::other)?;
            socket.set_nonblocking(true)?;
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
