//! 15001: connections an enrolled pod makes, redirected here by the
//! `cgroup/connect` program. The original destination comes from
//! `SO_ORIGINAL_DST` on the accepted socket.
//!
//! The destination view decides where it goes ([`crate::mesh::route`]): an
//! enrolled workload (directly or behind a Service VIP) gets an HBONE
//! stream, from the source pod's namespace, presenting the source pod's
//! certificate and requiring the destination workload's identity. Anything
//! else is connected directly from the pod's own namespace (a proxy-marked
//! socket, so it is not redirected again): it still leaves from the pod's IP.
//!
//! Before that, the first bytes decide how ([`crate::protocol`]): HTTP/1
//! and HTTP/2 are served request by request ([`crate::l7::outbound`]);
//! anything else, and ports declared opaque, are spliced as TCP here, the
//! bytes detection read replayed first.

use crate::hbone::{H2Stream, HboneError};
use crate::mesh::{self, Route};
use crate::metrics::{Reporter, SecurityPolicy, TcpLabels};
use crate::pods::{Context, LocalPod, PoolKey};
use crate::protocol::{self, Prefixed, Protocol};
use crate::splice::splice;
use bytes::BytesMut;
use socket2::{Domain, SockAddr};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

pub async fn serve(listener: TcpListener, pod: Arc<LocalPod>, cx: Context) {
    crate::pods::accept_loop(listener, &pod, "outbound", |stream, peer| {
        handle(stream, peer, pod.clone(), cx.clone())
    })
    .await
}

async fn handle(mut client: TcpStream, peer: SocketAddr, pod: Arc<LocalPod>, cx: Context) {
    let started = Instant::now();
    let dst = match weft_redirector::original_dst(&client) {
        Ok(t) => t,
        Err(e) => {
            // Someone connected to 15001 directly: there is nowhere to go.
            tracing::warn!(pod = %pod.key(), %peer, error = %e, "no original destination");
            return;
        }
    };
    // With a control plane, HTTP is proxied request by request; standalone
    // (redirection only) every connection is opaque.
    let opaque = match &cx.mesh {
        Some(mesh) => protocol::opaque::is_opaque(&mesh.view.borrow(), dst),
        None => true,
    };
    let mut client = if opaque {
        Prefixed::new(BytesMut::new(), client)
    } else {
        let detected = protocol::detect(&mut client, cx.detect_timeout).await;
        match detected.protocol {
            Protocol::Http1 | Protocol::Http2 => {
                // A client may write a request in pieces: ACK them at once.
                let client = Prefixed::new(detected.prefix, crate::quickack::QuickAck::new(client));
                crate::l7::outbound::serve(client, detected.protocol, dst, pod, cx).await;
                return;
            }
            Protocol::Opaque => {
                if detected.timed_out {
                    tracing::debug!(pod = %pod.key(), %dst, "the client sent nothing within the detection timeout: opaque TCP");
                }
                Prefixed::new(detected.prefix, client)
            }
        }
    };
    let (route, balanced) = match &cx.mesh {
        Some(mesh) => {
            let view = mesh.view.borrow();
            mesh::route(&view, dst, &cx.balancer, &mut rand::rng())
        }
        None => (
            Route::Plain {
                target: dst,
                workload: None,
                service: None,
            },
            false,
        ),
    };
    let labels = labels(&pod, &route);
    let open = cx.tcp_metrics.open(labels);
    let target = route.target();
    let connected = open_upstream(&route, &pod, &cx, Protocol::Opaque).await;
    if balanced {
        match &connected {
            Ok(_) => cx.balancer.connected(&target, started.elapsed()),
            Err(_) => cx.balancer.failed(&target),
        }
    }
    let mut upstream = match connected {
        Ok(u) => u,
        Err(e) => {
            tracing::info!(target: "access", pod = %pod.key(), dst = %dst, via = %target, error = %e, "outbound connect failed");
            open.close(&Default::default());
            // As the pod would have seen it without the mesh (refused, or
            // the destination's policy denied it): a reset, not an orderly
            // end that looks like an empty answer.
            crate::authz::reset(client.into_inner());
            return;
        }
    };
    // A client may write in pieces here too: ACK them at once.
    let mut acked = crate::quickack::QuickAck::new(&mut client);
    let (moved, err) = splice(&mut acked, &mut upstream).await;
    tracing::info!(
        target: "access",
        direction = "outbound",
        src = %pod.key(),
        src_identity = pod.identity.as_ref().map(|i| i.to_string()),
        dst = %dst,
        via = %target,
        dst_identity = match &route { Route::Hbone { identity, .. } => Some(identity.to_string()), _ => None },
        service = route.service(),
        mtls = matches!(route, Route::Hbone { .. }),
        from_client = moved.a_to_b,
        to_client = moved.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        error = err.as_ref().map(|e| e.to_string()),
        "connection closed"
    );
    open.close(&moved);
    if err.is_some() {
        // The far side failed or was reset (a policy change there revoked
        // the connection): pass the reset on rather than a clean close.
        crate::authz::reset(client.into_inner());
    }
}

/// Where a pod's connection (or, with L7, one HTTP connection) goes.
pub enum Upstream {
    Hbone(H2Stream),
    Plain(TcpStream),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Hbone(#[from] HboneError),
    #[error("cannot connect to {target} from the pod: {source}")]
    Tcp {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "pod {pod} has no certificate identity: an mTLS tunnel needs one (is the node proxy connected to the control plane?)"
    )]
    NoIdentity { pod: String },
}

/// Opens the transport for `route`: an HBONE stream (pooled TLS connection)
/// from the pod to an enrolled workload, telling the destination that it
/// carries `protocol`; else TCP from the pod's namespace.
pub async fn open_upstream(
    route: &Route,
    pod: &Arc<LocalPod>,
    cx: &Context,
    protocol: Protocol,
) -> Result<Upstream, ConnectError> {
    let target = route.target();
    match route {
        Route::Hbone {
            tunnel, identity, ..
        } => match (&cx.pool, &pod.identity) {
            (Some(pool), Some(source)) => {
                let key = PoolKey {
                    pod: pod.clone(),
                    source: source.clone(),
                    destination: identity.clone(),
                    tunnel: *tunnel,
                };
                let stream = pool
                    .open_with(key, *tunnel, target, Some(protocol.token()))
                    .await?;
                Ok(Upstream::Hbone(stream))
            }
            _ => Err(ConnectError::NoIdentity { pod: pod.key() }),
        },
        Route::Plain { .. } => connect_from_pod(pod, target)
            .await
            .map(Upstream::Plain)
            .map_err(|source| ConnectError::Tcp { target, source }),
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s).poll_read(cx, buf),
            // A pooled connection to a server outside the mesh: its
            // responses may come in pieces too.
            Upstream::Plain(s) => crate::quickack::poll_read(s, cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s).poll_flush(cx),
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Hbone(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Source-side labels: this pod, and what the view says of the destination.
fn labels(pod: &LocalPod, route: &Route) -> TcpLabels {
    let (workload, principal, policy) = match route {
        Route::Hbone {
            workload, identity, ..
        } => (
            Some(workload),
            identity.to_string(),
            SecurityPolicy::MutualTls,
        ),
        Route::Plain { workload, .. } => (workload.as_ref(), String::new(), SecurityPolicy::None),
    };
    TcpLabels {
        reporter: Reporter::Source,
        source_workload: pod.name.clone(),
        source_namespace: pod.namespace.clone(),
        source_principal: pod
            .identity
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_default(),
        destination_workload: workload.map(|w| w.name.clone()).unwrap_or_default(),
        destination_namespace: workload.map(|w| w.namespace.clone()).unwrap_or_default(),
        destination_principal: principal,
        destination_service: route.service().unwrap_or_default().to_string(),
        connection_security_policy: policy,
    }
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
