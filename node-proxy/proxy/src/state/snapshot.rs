//! One snapshot of the control plane's state, built once when the view
//! changes and shared by `Arc`: the view, and the HTTPRoutes compiled from
//! it (outbound per Service and port, inbound per local workload and port).
//! Connection code takes the current snapshot once per connection (or
//! request) and holds no lock while it decides: a view update never waits
//! for a policy evaluation, and nothing is compiled on the request path.
//!
//! A proxy without a control plane (redirection only) has one snapshot,
//! [`Snapshot::without_control_plane`], that never changes: connection code
//! takes a snapshot the same way in both cases, and the decisions that
//! differ (nothing enforced, every connection opaque) are made here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use weft_destination_api::routing::{InboundRoutes, OutboundRoutes};
use weft_destination_api::{View, service_key};

pub struct Snapshot {
    pub view: View,
    /// Whether the view came from a control plane. Without one nothing is
    /// known of the cluster: no policy is enforced (there is none to
    /// enforce) and every connection is opaque.
    from_control_plane: bool,
    /// By (Service key, Service port): Services with routes only.
    outbound: HashMap<(String, u16), Arc<OutboundRoutes>>,
    /// By (local workload uid, port): the Server's name and its routes, for
    /// Servers with routes only.
    inbound: HashMap<(String, u16), (String, Arc<InboundRoutes>)>,
}

impl Snapshot {
    /// Compiles every route of `view` (regular expressions included).
    pub fn build(view: View) -> Self {
        let mut outbound = HashMap::new();
        for svc in view.services.values().filter(|s| !s.routes.is_empty()) {
            for p in &svc.ports {
                let Ok(port) = u16::try_from(p.port) else {
                    continue;
                };
                outbound.insert(
                    (service_key(&svc.namespace, &svc.name), port),
                    Arc::new(OutboundRoutes::compile(svc, port)),
                );
            }
        }
        let mut inbound = HashMap::new();
        for w in view.workloads.values() {
            let Some(policy) = view.policy_of(w) else {
                continue;
            };
            for server in policy.servers.iter().filter(|s| !s.routes.is_empty()) {
                let Ok(port) = u16::try_from(server.port) else {
                    continue;
                };
                inbound.insert(
                    (w.uid.clone(), port),
                    (
                        server.name.clone(),
                        Arc::new(InboundRoutes::compile(server)),
                    ),
                );
            }
        }
        Self {
            view,
            from_control_plane: true,
            outbound,
            inbound,
        }
    }

    /// The snapshot of a proxy that runs without a control plane: an empty
    /// view, nothing enforced, every connection opaque.
    pub fn without_control_plane() -> Self {
        Self {
            view: View::default(),
            from_control_plane: false,
            outbound: HashMap::new(),
            inbound: HashMap::new(),
        }
    }

    /// The view that inbound policy is decided against; `None` without a
    /// control plane (nothing to enforce).
    pub fn policy_view(&self) -> Option<&View> {
        self.from_control_plane.then_some(&self.view)
    }

    /// Whether an outbound connection to `dst` skips protocol detection.
    pub fn is_opaque(&self, dst: SocketAddr) -> bool {
        !self.from_control_plane || super::opaque::is_opaque(&self.view, dst)
    }

    /// Whether a local pod's `port` skips detection (see
    /// [`super::opaque::is_local_opaque`]).
    pub fn is_local_opaque(&self, pod_key: &str, uid: Option<&str>, port: u16) -> bool {
        !self.from_control_plane || super::opaque::is_local_opaque(&self.view, pod_key, uid, port)
    }

    /// The compiled routes of Service `key` on `port`; `None`: no routes.
    pub fn outbound_routes(&self, key: &str, port: u16) -> Option<&Arc<OutboundRoutes>> {
        self.outbound.get(&(key.to_string(), port))
    }

    /// The Server (name) with routes on `port` of local workload `uid`.
    pub fn inbound_routes(&self, uid: &str, port: u16) -> Option<&(String, Arc<InboundRoutes>)> {
        self.inbound.get(&(uid.to_string(), port))
    }
}

/// Follows `view`: a new snapshot for every new view, until the view's
/// sender is gone. The first snapshot is built before this returns.
pub fn follow(mut view: watch::Receiver<View>) -> watch::Receiver<Arc<Snapshot>> {
    let first = Arc::new(Snapshot::build(view.borrow_and_update().clone()));
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = view.changed() => if changed.is_err() { return },
                // Nobody reads the snapshots any more.
                () = tx.closed() => return,
            }
            // Cloned under the watch's lock, built outside it.
            let next = view.borrow_and_update().clone();
            tx.send_replace(Arc::new(Snapshot::build(next)));
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_destination_api::WatchResponse;

    #[tokio::test]
    async fn a_new_view_makes_a_new_snapshot() {
        let (tx, rx) = watch::channel(View::default());
        let mut snapshots = follow(rx);
        assert_eq!(snapshots.borrow().view.version, 0);
        let mut v = View::default();
        v.apply(WatchResponse {
            epoch: "e".into(),
            version: 7,
            snapshot: true,
            ..Default::default()
        })
        .unwrap();
        tx.send_replace(v);
        snapshots
            .changed()
            .await
            .expect("a snapshot follows the view");
        assert_eq!(snapshots.borrow().view.version, 7);
        assert!(snapshots.borrow().policy_view().is_some());
    }

    #[test]
    fn without_a_control_plane_nothing_is_enforced_and_everything_is_opaque() {
        let s = Snapshot::without_control_plane();
        assert!(s.policy_view().is_none());
        let http = "10.96.0.10:80".parse().unwrap();
        assert!(s.is_opaque(http));
        assert!(s.is_local_opaque("demo/server", Some("uid"), 8080));
        // The same empty view from a control plane: detected, enforced.
        let built = Snapshot::build(View::default());
        assert!(!built.is_opaque(http));
        assert!(!built.is_local_opaque("demo/server", Some("uid"), 8080));
        assert!(built.policy_view().is_some());
    }
}
