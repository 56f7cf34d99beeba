//! Serving a pod's connections, one direction per module:
//!
//! - [`outbound`]: 15001, what a pod connects to (original destination →
//!   one look at the control plane's state → opaque or detected → TCP or
//!   HTTP);
//! - [`inbound`]: 15006 and 15008, what reaches a pod (context → every
//!   check that can fail → delivery).
//!
//! The two never import each other; what both use lives in the layers
//! below (`http`, `transport`, `policy`, `telemetry`, `state`) or here, in
//! [`ProxyInputs`].
//!
//! Layering: above `http`; below `pods` and `admin`.

pub mod inbound;
pub mod outbound;

use crate::l7::UpstreamPool;
use crate::policy::InboundAuthz;
use crate::policy::route_authz::InboundRouting;
use crate::state::ControlPlane;
use crate::state::routes::OutboundRouting;
use crate::state::snapshot::Snapshot;
use crate::telemetry::{RequestMetrics, TcpMetrics};
use crate::transport::limits;
use crate::transport::tunnel::tunnel_pool;
use crate::transport::{ConnectionLimits, ConnectionThreads, Drain, RequestConnections, TunnelKey};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use weft_balance::{Balancer, BalancerConfig};
use weft_hbone::HbonePool;

/// Every port the node proxy listens on, in a pod or on the node (admin
/// 15000, outbound 15001, inbound 15006, HBONE 15008, metrics 15020,
/// health 15021). Never a destination it delivers to: a connection to one
/// of them would come straight back into the proxy, which then connects
/// again, thousands of times for one client connection.
pub const PROXY_PORTS: [u16; 6] = [15000, 15001, 15006, 15008, 15020, 15021];

/// What every connection handler of the proxy shares.
#[derive(Clone)]
pub struct ProxyInputs {
    pub tcp_metrics: TcpMetrics,
    /// The control plane's view and the certificates; `None` when the proxy
    /// runs without a control plane (every pod captured, all plaintext).
    pub control_plane: Option<ControlPlane>,
    /// What connections are decided with: the control plane's snapshots,
    /// or the one snapshot of a proxy without a control plane.
    snapshots: watch::Receiver<Arc<Snapshot>>,
    pub balancer: Arc<Balancer<SocketAddr>>,
    /// HBONE connections to other node proxies (with a control plane).
    pub tunnels: Option<Arc<HbonePool<TunnelKey>>>,
    /// Connections that carry HTTP/2 requests to other node proxies as
    /// streams of their own (with a control plane).
    pub requests: Option<Arc<RequestConnections>>,
    /// Shutdown: connections finish (HBONE and HTTP/2 GOAWAY, HTTP/1.1
    /// `Connection: close`) and are waited for.
    pub drain: Drain,
    /// Inbound authorization: decisions, and the admitted connections a
    /// policy change may revoke.
    pub authz: Arc<InboundAuthz>,
    /// Golden request metrics of the HTTP connections the proxy terminates
    /// (registered by the caller, next to the TCP metrics).
    pub request_metrics: RequestMetrics,
    /// HTTP client connections to endpoints, for request-level proxying.
    pub upstreams: UpstreamPool,
    /// Compiled HTTPRoutes of the view, retry budgets per Service.
    pub routing: Arc<OutboundRouting>,
    /// Compiled inbound routes (route-level authorization).
    pub inbound_routing: Arc<InboundRouting>,
    /// How long protocol detection waits for a client's first bytes.
    pub detect_timeout: Duration,
    /// Bounds on the connections carried per pod and for the node.
    pub limits: Arc<ConnectionLimits>,
    /// The threads pods' connections run on (`transport::threads`).
    pub threads: ConnectionThreads,
}

impl ProxyInputs {
    pub fn new(tcp_metrics: TcpMetrics, control_plane: Option<ControlPlane>) -> Self {
        let tunnels = control_plane.as_ref().map(|c| tunnel_pool(c.certs.clone()));
        let requests = control_plane
            .as_ref()
            .map(|c| Arc::new(RequestConnections::new(c.certs.clone())));
        let upstreams = UpstreamPool::new();
        if let Some(c) = &control_plane {
            upstreams.follow_trust_bundle(c.certs.trust_bundle());
        }
        let snapshots = match &control_plane {
            Some(c) => c.snapshot.clone(),
            // The sender goes at once: the receiver keeps this one value.
            None => watch::channel(Arc::new(Snapshot::without_control_plane())).1,
        };
        Self {
            control_plane,
            snapshots,
            balancer: Arc::new(Balancer::new(BalancerConfig::default())),
            tunnels,
            requests,
            drain: Drain::default(),
            authz: Arc::default(),
            request_metrics: RequestMetrics::default(),
            upstreams,
            routing: Arc::default(),
            inbound_routing: Arc::default(),
            detect_timeout: weft_stream::DETECT_TIMEOUT,
            limits: ConnectionLimits::new(
                limits::DEFAULT_PER_POD,
                limits::DEFAULT_PER_NODE,
                tcp_metrics.clone(),
            ),
            tcp_metrics,
            threads: ConnectionThreads::current(),
        }
    }

    /// The current snapshot of the control plane's state (an `Arc`: no lock
    /// is held while it is used). Taken once per connection or request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }
}
