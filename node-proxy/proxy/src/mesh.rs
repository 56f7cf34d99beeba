//! What the control plane tells this proxy, and the decisions made from it.
//!
//! [`Mesh`] holds the latest destination view (kept by the destination
//! client, which keeps the last view while the control plane is away) and
//! the [`CertManager`] holding every local pod's certificate. [`route`] turns
//! a pod's original destination into where the proxy actually connects:
//! an HBONE tunnel to an enrolled workload, or a plain connection.

use crate::balancer::Balancer;
use rand::Rng;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::sync::watch;
use weft_cert_manager::{CertManager, SpiffeId};
use weft_destination_api::client::{ConnectionState, WatchHandle};
use weft_destination_api::{View, Workload, address};

/// The control plane's state as this proxy sees it.
#[derive(Clone)]
pub struct Mesh {
    pub view: watch::Receiver<View>,
    pub view_state: watch::Receiver<ConnectionState>,
    pub certs: CertManager,
    /// Keeps the destination client running (dropping it stops the watch).
    pub destination: Option<Arc<WatchHandle>>,
}

impl Mesh {
    /// Whether at least one view arrived (an empty cluster is a view too).
    pub fn has_view(&self) -> bool {
        !self.view.borrow().epoch.is_empty()
    }
}

/// The workload of a local pod: by uid (the CNI plugin knows it), else by
/// namespace/name (a uid the view spells differently, e.g. the simulator's).
pub fn local_workload(view: &View, uid: &str, namespace: &str, name: &str) -> Option<Workload> {
    view.workloads.get(uid).cloned().or_else(|| {
        view.workloads
            .values()
            .find(|w| w.namespace == namespace && w.name == name)
            .cloned()
    })
}

/// The SPIFFE identity of a workload, if it carries a valid one.
pub fn identity_of(w: &Workload) -> Option<SpiffeId> {
    w.identity.parse().ok()
}

/// A workload's primary address of the same family as `like`, else its first.
fn address_of(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    let all: Vec<IpAddr> = w
        .addresses
        .iter()
        .filter_map(|a| address::decode(a))
        .collect();
    all.iter()
        .find(|a| a.is_ipv4() == like.is_ipv4())
        .or(all.first())
        .copied()
}

/// Where an outbound connection goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// An HBONE stream to `tunnel` (podIP:15008) for `target` (podIP:port),
    /// whose server must prove `identity`.
    Hbone {
        target: SocketAddr,
        tunnel: SocketAddr,
        identity: SpiffeId,
        workload: Workload,
        service: Option<String>,
    },
    /// A plain TCP connection to `target` (outside the mesh).
    Plain {
        target: SocketAddr,
        workload: Option<Workload>,
        service: Option<String>,
    },
}

impl Route {
    pub fn target(&self) -> SocketAddr {
        match self {
            Route::Hbone { target, .. } | Route::Plain { target, .. } => *target,
        }
    }

    pub fn service(&self) -> Option<&str> {
        match self {
            Route::Hbone { service, .. } | Route::Plain { service, .. } => service.as_deref(),
        }
    }
}

/// The route to one workload (or plain address) at `target`.
fn to_address(view: &View, target: SocketAddr, service: Option<String>) -> Route {
    match view.workload_by_address(target.ip()) {
        Some(w) if w.enrolled && w.tunnel == weft_destination_api::TunnelProtocol::Hbone as i32 => {
            match identity_of(w) {
                Some(identity) => Route::Hbone {
                    target,
                    tunnel: SocketAddr::new(target.ip(), crate::hbone::HBONE_PORT),
                    identity,
                    workload: w.clone(),
                    service,
                },
                // The destination service always derives a valid identity;
                // if one ever does not parse, the peer cannot be
                // authenticated, so it is treated as outside the mesh.
                None => {
                    tracing::warn!(workload = %w.name, identity = %w.identity, "enrolled workload without a valid identity");
                    Route::Plain {
                        target,
                        workload: Some(w.clone()),
                        service,
                    }
                }
            }
        }
        other => Route::Plain {
            target,
            workload: other.cloned(),
            service,
        },
    }
}

/// Resolves an original destination. A Service VIP picks one ready endpoint
/// with `balancer`; then the second value is true and the caller must report
/// the outcome for the returned target (`connected`/`failed`). A pod IP goes
/// to that pod; anything else is plain.
pub fn route(
    view: &View,
    dst: SocketAddr,
    balancer: &Balancer<SocketAddr>,
    rng: &mut impl Rng,
) -> (Route, bool) {
    let Some(svc) = view.service_by_vip(dst.ip()) else {
        return (to_address(view, dst, None), false);
    };
    let hostname = Some(svc.hostname.clone());
    let Some(port) = svc.ports.iter().find(|p| p.port == u32::from(dst.port())) else {
        // A port the Service does not declare: the VIP answers nothing there
        // either; let the connection fail the same way it would without us.
        let plain = Route::Plain {
            target: dst,
            workload: None,
            service: hostname,
        };
        return (plain, false);
    };
    let candidates: Vec<SocketAddr> = svc
        .endpoints
        .iter()
        .filter_map(|ep| {
            let target_port = ep
                .ports
                .get(&port.port)
                .copied()
                .or((port.target_port != 0).then_some(port.target_port))?;
            let target_port = u16::try_from(target_port).ok()?;
            let ip = if ep.workload_uid.is_empty() {
                let all: Vec<IpAddr> = ep
                    .addresses
                    .iter()
                    .filter_map(|a| address::decode(a))
                    .collect();
                all.iter()
                    .find(|a| a.is_ipv4() == dst.is_ipv4())
                    .or(all.first())
                    .copied()?
            } else {
                address_of(view.workloads.get(&ep.workload_uid)?, dst.ip())?
            };
            Some(SocketAddr::new(ip, target_port))
        })
        .collect();
    match balancer.pick(&candidates, rng) {
        Some(target) => (to_address(view, target, hostname), true),
        None => {
            // No ready endpoint: the VIP itself refuses, as without the mesh.
            let plain = Route::Plain {
                target: dst,
                workload: None,
                service: hostname,
            };
            (plain, false)
        }
    }
}
