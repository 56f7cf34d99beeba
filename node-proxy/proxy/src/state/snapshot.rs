//! One snapshot of the control plane's state, built once when the view
//! changes and shared by `Arc`: the view, and the HTTPRoutes compiled from
//! it (outbound per Service and port, inbound per local workload and port).
//! Connection code takes the current snapshot once per connection (or
//! request) and holds no lock while it decides: a view update never waits
//! for a policy evaluation, and nothing is compiled on the request path.

use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;
use weft_destination_api::routing::{InboundRoutes, OutboundRoutes};
use weft_destination_api::{View, service_key};

#[derive(Default)]
pub struct Snapshot {
    pub view: View,
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
            outbound,
            inbound,
        }
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
    }
}
