//! What the control plane tells this proxy, and the decisions made from it.
//!
//! [`ControlPlane`] holds the latest destination view (kept by the destination
//! client, which keeps the last view while the control plane is away) and
//! the [`CertManager`] holding every local pod's certificate. [`route`] turns
//! a pod's original destination into where the proxy actually connects:
//! an HBONE tunnel to an enrolled workload, or a plain connection.

use super::snapshot::Snapshot;
use rand::Rng;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::sync::watch;
use weft_balance::Balancer;
use weft_cert_manager::{CertManager, SpiffeId};
use weft_destination_api::client::{ConnectionState, WatchHandle};
use weft_destination_api::{View, Workload, address};

/// The control plane's state as this proxy sees it.
#[derive(Clone)]
pub struct ControlPlane {
    pub view: watch::Receiver<View>,
    /// The view and its compiled routes, rebuilt when the view changes.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub view_state: watch::Receiver<ConnectionState>,
    pub certs: CertManager,
    /// Keeps the destination client running (dropping it stops the watch).
    pub destination: Option<Arc<WatchHandle>>,
}

impl ControlPlane {
    /// Follows `view` with a snapshot per view (a task of its own: call
    /// from within the runtime).
    pub fn new(
        view: watch::Receiver<View>,
        view_state: watch::Receiver<ConnectionState>,
        certs: CertManager,
        destination: Option<Arc<WatchHandle>>,
    ) -> Self {
        Self {
            snapshot: super::snapshot::follow(view.clone()),
            view,
            view_state,
            certs,
            destination,
        }
    }

    /// Whether at least one view arrived (an empty cluster is a view too).
    pub fn has_view(&self) -> bool {
        !self.view.borrow().epoch.is_empty()
    }
}

/// The workload of a local pod, by the pod's uid: the runtime's word for
/// which pod this is. Never by namespace/name: a pod recreated under the
/// same name (a StatefulSet's) is another pod, and giving it the old one's
/// workload would be an identity decision made on a name.
pub fn local_workload(view: &View, uid: &str) -> Option<Arc<Workload>> {
    if uid.is_empty() {
        return None;
    }
    view.workloads.get(uid).cloned()
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
        workload: Arc<Workload>,
        service: Option<String>,
    },
    /// A plain TCP connection to `target` (outside the mesh).
    Plain {
        target: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<String>,
    },
}

impl Route {
    pub fn target(&self) -> SocketAddr {
        match self {
            Route::Hbone { target, .. } | Route::Plain { target, .. } => *target,
        }
    }

    /// What the view knows of the workload at the target, if anything.
    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Route::Hbone { workload, .. } => Some(workload),
            Route::Plain { workload, .. } => workload.as_ref(),
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
                    tunnel: SocketAddr::new(target.ip(), weft_hbone::HBONE_PORT),
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
    avoid: &[SocketAddr],
    rng: &mut impl Rng,
) -> (Route, bool) {
    let Some(svc) = view.service_by_vip(dst.ip()) else {
        return (to_address(view, dst, None), false);
    };
    route_to_service(view, svc, dst.port(), dst, balancer, avoid, rng)
}

/// Picks an endpoint of `svc` for its port `port` (as [`route`] does for a
/// VIP). `dialled`: the address the client dialled, for the address family
/// and for the plain fallback when the Service has no ready endpoint (an
/// HTTPRoute backend is another Service than the one dialled). `avoid`:
/// endpoints that already failed this request or connection, skipped while
/// another is usable.
pub fn route_to_service(
    view: &View,
    svc: &weft_destination_api::Service,
    port: u16,
    dialled: SocketAddr,
    balancer: &Balancer<SocketAddr>,
    avoid: &[SocketAddr],
    rng: &mut impl Rng,
) -> (Route, bool) {
    let dst = dialled;
    let hostname = Some(svc.hostname.clone());
    let dialled_port = port;
    let Some(_) = svc.ports.iter().find(|p| p.port == u32::from(port)) else {
        // A port the Service does not declare: the VIP answers nothing there
        // either; let the connection fail the same way it would without us.
        let plain = Route::Plain {
            target: dst,
            workload: None,
            service: hostname,
        };
        return (plain, false);
    };
    let candidates = endpoints_of(view, svc, dialled_port, dst);
    match balancer.pick_avoiding(&candidates, avoid, rng) {
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

/// The ready endpoints of `svc` for its port `port` (target addresses, in
/// `dialled`'s address family where an endpoint has both).
pub fn endpoints_of(
    view: &View,
    svc: &weft_destination_api::Service,
    port: u16,
    dialled: SocketAddr,
) -> Vec<SocketAddr> {
    let dst = dialled;
    let Some(port) = svc.ports.iter().find(|p| p.port == u32::from(port)) else {
        return Vec::new();
    };
    svc.endpoints
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
        .collect()
}

/// Forgets the balancer's statistics of endpoints that left the view: a
/// deleted pod's address (a new pod may get it next, and must not inherit
/// its latency or its ejection), an address outside any workload removed
/// from its Service. A pod that is only not ready keeps them (it may come
/// back). Without this, the statistics of every endpoint ever picked stayed
/// for the proxy's lifetime. Run at each new view; one pass over the
/// Services' endpoints, hashing only those outside any workload.
pub fn forget_departed_endpoints(view: &View, balancer: &Balancer<SocketAddr>) {
    let outside_workloads: std::collections::HashSet<IpAddr> = view
        .services
        .values()
        .flat_map(|s| s.endpoints.iter())
        .filter(|ep| ep.workload_uid.is_empty())
        .flat_map(|ep| ep.addresses.iter().filter_map(|a| address::decode(a)))
        .collect();
    balancer.retain(|k| {
        view.workload_by_address(k.ip()).is_some() || outside_workloads.contains(&k.ip())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_balance::BalancerConfig;
    use weft_destination_api::{Endpoint, Service, ServicePort, TunnelProtocol, WatchResponse};

    fn workload(uid: &str, name: &str, ip: &str, enrolled: bool) -> Workload {
        Workload {
            uid: uid.into(),
            name: name.into(),
            namespace: "demo".into(),
            service_account: name.into(),
            identity: format!("spiffe://cluster.local/ns/demo/sa/{name}"),
            node: "node-b".into(),
            addresses: vec![address::encode(ip.parse().unwrap())],
            enrolled,
            tunnel: if enrolled {
                TunnelProtocol::Hbone as i32
            } else {
                TunnelProtocol::None as i32
            },
            ..Default::default()
        }
    }

    fn service(endpoints: Vec<Endpoint>) -> Service {
        Service {
            name: "echo".into(),
            namespace: "demo".into(),
            hostname: "echo.demo.svc.cluster.local".into(),
            cluster_ips: vec![address::encode("10.96.0.10".parse().unwrap())],
            ports: vec![ServicePort {
                port: 80,
                target_port: 9000,
                ..Default::default()
            }],
            endpoints,
            ..Default::default()
        }
    }

    fn endpoint_of(uid: &str) -> Endpoint {
        Endpoint {
            workload_uid: uid.into(),
            weight: 1,
            ports: [(80, 9000)].into(),
            ..Default::default()
        }
    }

    /// An endpoint outside any workload: an address, port 80 to `port`.
    fn endpoint_at(ip: &str, port: u32) -> Endpoint {
        Endpoint {
            addresses: vec![address::encode(ip.parse().unwrap())],
            weight: 1,
            ports: [(80, port)].into(),
            ..Default::default()
        }
    }

    fn view(workloads: Vec<Workload>, services: Vec<Service>) -> View {
        let mut v = View::default();
        v.apply(WatchResponse {
            epoch: "e".into(),
            version: 1,
            snapshot: true,
            workloads,
            services,
            ..Default::default()
        })
        .unwrap();
        v
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The statistics of a deleted pod's address are forgotten with the
    /// next view; those of endpoints still in a Service (a pod's, or an
    /// address outside any workload) are kept.
    #[test]
    fn a_departed_endpoints_statistics_are_forgotten() {
        let external = endpoint_at("192.0.2.7", 9000);
        let before = view(
            vec![
                workload("u1", "echo-1", "10.244.1.2", true),
                workload("u2", "echo-2", "10.244.1.3", true),
            ],
            vec![service(vec![
                endpoint_of("u1"),
                endpoint_of("u2"),
                external.clone(),
            ])],
        );
        let b = Balancer::new(BalancerConfig::default());
        for ep in ["10.244.1.2:9000", "10.244.1.3:9000", "192.0.2.7:9000"] {
            b.connected(&addr(ep), std::time::Duration::from_millis(5));
        }
        forget_departed_endpoints(&before, &b);
        assert_eq!(b.snapshot().len(), 3, "all still in the view");

        // echo-2 is deleted.
        let after = view(
            vec![workload("u1", "echo-1", "10.244.1.2", true)],
            vec![service(vec![endpoint_of("u1"), external])],
        );
        forget_departed_endpoints(&after, &b);
        let mut kept: Vec<SocketAddr> = b.snapshot().into_iter().map(|(k, _)| k).collect();
        kept.sort();
        assert_eq!(kept, [addr("10.244.1.2:9000"), addr("192.0.2.7:9000")]);
    }

    #[test]
    fn enrolled_pod_ip_goes_through_hbone_to_its_15008() {
        let v = view(vec![workload("u1", "echo", "10.244.1.2", true)], vec![]);
        let b = Balancer::new(BalancerConfig::default());
        let (r, balanced) = route(&v, addr("10.244.1.2:9000"), &b, &[], &mut rand::rng());
        assert!(!balanced);
        match r {
            Route::Hbone {
                target,
                tunnel,
                identity,
                service,
                ..
            } => {
                assert_eq!(target, addr("10.244.1.2:9000"));
                assert_eq!(tunnel, addr("10.244.1.2:15008"));
                assert_eq!(
                    identity.to_string(),
                    "spiffe://cluster.local/ns/demo/sa/echo"
                );
                assert_eq!(service, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pods_outside_the_mesh_and_unknown_addresses_are_plain() {
        let v = view(vec![workload("u1", "legacy", "10.244.1.3", false)], vec![]);
        let b = Balancer::new(BalancerConfig::default());
        let (r, _) = route(&v, addr("10.244.1.3:9000"), &b, &[], &mut rand::rng());
        assert!(matches!(r, Route::Plain { workload: Some(ref w), .. } if w.name == "legacy"));
        let (r, _) = route(&v, addr("192.0.2.1:443"), &b, &[], &mut rand::rng());
        assert_eq!(
            r,
            Route::Plain {
                target: addr("192.0.2.1:443"),
                workload: None,
                service: None
            }
        );
    }

    #[test]
    fn a_vip_picks_an_endpoint_and_maps_the_port() {
        let v = view(
            vec![
                workload("u1", "echo", "10.244.1.2", true),
                workload("u2", "echo", "10.244.0.5", true),
            ],
            vec![service(vec![endpoint_of("u1"), endpoint_of("u2")])],
        );
        let b = Balancer::new(BalancerConfig::default());
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let (r, balanced) = route(&v, addr("10.96.0.10:80"), &b, &[], &mut rand::rng());
            assert!(balanced);
            assert_eq!(r.service(), Some("echo.demo.svc.cluster.local"));
            assert!(matches!(r, Route::Hbone { .. }));
            b.connected(&r.target(), std::time::Duration::from_millis(1));
            seen.insert(r.target());
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec![addr("10.244.0.5:9000"), addr("10.244.1.2:9000")]
        );
    }

    #[test]
    fn a_failed_endpoint_is_skipped_while_backed_off() {
        let v = view(
            vec![
                workload("u1", "echo", "10.244.1.2", true),
                workload("u2", "echo", "10.244.0.5", true),
            ],
            vec![service(vec![endpoint_of("u1"), endpoint_of("u2")])],
        );
        let b = Balancer::new(BalancerConfig::default());
        b.failed(&addr("10.244.1.2:9000"));
        for _ in 0..50 {
            let (r, _) = route(&v, addr("10.96.0.10:80"), &b, &[], &mut rand::rng());
            assert_eq!(r.target(), addr("10.244.0.5:9000"));
            b.connected(&r.target(), std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn backends_outside_the_mesh_and_undeclared_ports_are_plain() {
        let outside = endpoint_at("10.244.3.9", 8080);
        let v = view(vec![], vec![service(vec![outside])]);
        let b = Balancer::new(BalancerConfig::default());
        let (r, balanced) = route(&v, addr("10.96.0.10:80"), &b, &[], &mut rand::rng());
        assert!(balanced);
        assert_eq!(
            r,
            Route::Plain {
                target: addr("10.244.3.9:8080"),
                workload: None,
                service: Some("echo.demo.svc.cluster.local".into())
            }
        );
        let (r, balanced) = route(&v, addr("10.96.0.10:81"), &b, &[], &mut rand::rng());
        assert!(!balanced);
        assert_eq!(r.target(), addr("10.96.0.10:81"));
    }

    #[test]
    fn local_workload_by_uid_only() {
        let v = view(vec![workload("u1", "echo", "10.244.1.2", true)], vec![]);
        assert_eq!(local_workload(&v, "u1").unwrap().name, "echo");
        // Same namespace and name, another pod: not this workload.
        assert!(local_workload(&v, "other").is_none());
        assert!(local_workload(&v, "").is_none());
    }
}
