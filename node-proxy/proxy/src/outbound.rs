//! 15001: connections an enrolled pod makes, redirected here by the
//! `cgroup/connect` program. The original destination comes from
//! `SO_ORIGINAL_DST` on the accepted socket.
//!
//! Until the destination view and identities are wired in, every
//! destination is treated as outside the mesh: the proxy connects to it
//! directly from the pod's own namespace (a proxy-marked socket, so it is
//! not redirected again), so the connection still leaves from the pod's IP.

use crate::metrics::{Reporter, SecurityPolicy, TcpLabels};
use crate::pods::{Context, LocalPod};
use crate::splice::splice;
use socket2::{Domain, SockAddr};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};

pub async fn serve(listener: TcpListener, pod: Arc<LocalPod>, cx: Context) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer, pod.clone(), cx.clone()));
            }
            Err(e) => {
                tracing::warn!(pod = %pod.key(), error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut client: TcpStream, peer: SocketAddr, pod: Arc<LocalPod>, cx: Context) {
    let started = Instant::now();
    let target = match weft_redirector::original_dst(&client) {
        Ok(t) => t,
        Err(e) => {
            // Someone connected to 15001 directly: there is nowhere to go.
            tracing::warn!(pod = %pod.key(), %peer, error = %e, "no original destination");
            return;
        }
    };
    let labels = TcpLabels {
        reporter: Reporter::Source,
        source_workload: pod.name.clone(),
        source_namespace: pod.namespace.clone(),
        source_principal: String::new(),
        destination_workload: String::new(),
        destination_namespace: String::new(),
        destination_principal: String::new(),
        destination_service: String::new(),
        connection_security_policy: SecurityPolicy::None,
    };
    let open = cx.tcp_metrics.open(labels);
    let mut upstream = match connect_from_pod(&pod, target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(target: "access", pod = %pod.key(), dst = %target, error = %e, "outbound connect failed");
            open.close(&Default::default());
            return;
        }
    };
    let (moved, err) = splice(&mut client, &mut upstream).await;
    tracing::info!(
        target: "access",
        direction = "outbound",
        src = %pod.key(),
        dst = %target,
        from_client = moved.a_to_b,
        to_client = moved.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        error = err.as_ref().map(|e| e.to_string()),
        "connection closed"
    );
    open.close(&moved);
}

/// A TCP connection from inside the pod's namespace, carrying the proxy's
/// socket mark so the connect hook leaves it alone.
pub async fn connect_from_pod(pod: &LocalPod, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = pod
        .netns
        .proxy_tcp_socket(Domain::for_address(target))
        .map_err(std::io::Error::other)?;
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
    stream.set_nodelay(true)?;
    Ok(stream)
}
