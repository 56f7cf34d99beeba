//! What the control plane tells this proxy, and the pure decisions made
//! from it: no socket, no namespace, no task. Tested with plain values.
//!
//! - [`control_plane`]: the destination view and the certificates
//!   ([`ControlPlane`]), and [`route`]: where a pod's original destination
//!   really goes;
//! - [`PodInfo`]: a local pod as the control plane knows it;
//! - [`opaque`]: which ports skip protocol detection;
//! - [`routes`]: the compiled HTTPRoutes of the view, retry budgets;
//! - [`snapshot`]: the view and its compiled routes, built once per view.
//!
//! Layering: the bottom layer of the crate; imports no other module of it.

pub mod admission;
pub mod control_plane;
pub mod opaque;
pub mod routes;
pub mod snapshot;

pub use control_plane::{
    ControlPlane, Route, endpoints_of, forget_departed_endpoints, identity_of, local_workload,
    route, route_to_service,
};
pub use snapshot::Snapshot;

use std::net::IpAddr;
use weft_cert_manager::SpiffeId;

/// A pod on this node, as far as the control plane knows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's SPIFFE identity (with a control plane; `None` standalone).
    pub identity: Option<SpiffeId>,
    /// The pod's primary address, from the destination view.
    pub ip: Option<IpAddr>,
    /// Its address of the other family, if it has one (dual stack).
    pub other_ip: Option<IpAddr>,
    /// The destination view's key (uid) of the pod's workload.
    pub workload_uid: Option<String>,
}

impl PodInfo {
    /// Whether `ip` is one of the pod's addresses (an IPv4-mapped IPv6
    /// address counts as its IPv4 address).
    pub fn has_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.ip == Some(ip) || self.other_ip == Some(ip)
    }

    /// Every address of the pod, the primary first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip.into_iter().chain(self.other_ip)
    }

    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
