//! Destinations that skip protocol detection: their bytes are carried as
//! TCP from the first byte, with no detection delay.
//!
//! A destination port is opaque when
//! - it is one of the well-known server-speaks-first ports
//!   ([`DEFAULT_OPAQUE_PORTS`], Linkerd's default list: SMTP, MySQL, Galera,
//!   PostgreSQL, Redis, Elasticsearch transport, memcached), where the
//!   client waits for the server and detection could only time out;
//! - the destination pod declares it with the annotation
//!   `weft.io/opaque-ports` (`Workload.opaque_ports` in the view); for a
//!   Service VIP, when any endpoint declares its target port so;
//! - the Service port's `appProtocol` names a protocol that is not HTTP
//!   (`tcp`, `mysql`, `https`, `tls`, ...): the Service's owner said so.
//!
//! On the destination side ([`is_local_opaque`]) the same rules apply to
//! the local pod's port, plus a Server's `proxyProtocol` (`opaque` or
//! `TLS`), which only the destination's own node knows (it comes with the
//! pod's inbound policy).

use std::net::SocketAddr;
use weft_destination_api::{View, Workload};

/// SMTP (25, 587), MySQL (3306), Galera (4444), PostgreSQL (5432), Redis
/// (6379), Elasticsearch transport (9300), memcached (11211).
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// `appProtocol` values under which detection still runs (HTTP flavours:
/// Kubernetes' standard names and the IANA-style ones in common use).
const HTTP_APP_PROTOCOLS: [&str; 8] = [
    "http",
    "http2",
    "h2c",
    "grpc",
    "grpc-web",
    "kubernetes.io/h2c",
    "kubernetes.io/ws",
    "websocket",
];

fn declares_opaque(w: &Workload, port: u16) -> bool {
    let port = u32::from(port);
    w.opaque_ports
        .iter()
        .any(|r| r.first <= port && port <= r.last)
}

fn http_app_protocol(app_protocol: &str) -> bool {
    app_protocol.is_empty()
        || HTTP_APP_PROTOCOLS
            .iter()
            .any(|p| p.eq_ignore_ascii_case(app_protocol))
}

/// Whether a pod's connection to `dst` must skip protocol detection.
pub fn is_opaque(view: &View, dst: SocketAddr) -> bool {
    if DEFAULT_OPAQUE_PORTS.contains(&dst.port()) {
        return true;
    }
    let Some(svc) = view.service_by_vip(dst.ip()) else {
        return view
            .workload_by_address(dst.ip())
            .is_some_and(|w| declares_opaque(w, dst.port()));
    };
    let Some(port) = svc.ports.iter().find(|p| p.port == u32::from(dst.port())) else {
        return false;
    };
    if !http_app_protocol(&port.app_protocol) {
        return true;
    }
    svc.endpoints.iter().any(|ep| {
        let target = ep
            .ports
            .get(&port.port)
            .copied()
            .unwrap_or(port.target_port);
        let Ok(target) = u16::try_from(target) else {
            return false;
        };
        DEFAULT_OPAQUE_PORTS.contains(&target)
            || view
                .workloads
                .get(&ep.workload_uid)
                .is_some_and(|w| declares_opaque(w, target))
    })
}

/// `proxyProtocol` values of a Server that rule detection out.
const OPAQUE_PROXY_PROTOCOLS: [&str; 2] = ["opaque", "TLS"];

/// Whether an inbound connection to `port` of the local pod `pod_key`
/// (`namespace/name`, with workload uid `uid`) must skip detection.
pub fn is_local_opaque(view: &View, pod_key: &str, uid: Option<&str>, port: u16) -> bool {
    if DEFAULT_OPAQUE_PORTS.contains(&port) {
        return true;
    }
    let declared = uid
        .and_then(|uid| view.workloads.get(uid))
        .is_some_and(|w| declares_opaque(w, port));
    let server_says = view.policies.get(pod_key).is_some_and(|p| {
        p.servers.iter().any(|s| {
            s.port == u32::from(port)
                && OPAQUE_PROXY_PROTOCOLS
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(&s.proxy_protocol))
        })
    });
    declared || server_says
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_destination_api::{
        Endpoint, Policy, PolicyServer, PortRange, Service, ServicePort, WatchResponse, Workload,
        address,
    };

    fn workload(uid: &str, ip: &str, opaque: &[(u32, u32)]) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "demo".into(),
            addresses: vec![address::encode(ip.parse().unwrap())],
            opaque_ports: opaque
                .iter()
                .map(|(first, last)| PortRange {
                    first: *first,
                    last: *last,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn service(app_protocol: &str, uid: &str) -> Service {
        Service {
            name: "db".into(),
            namespace: "demo".into(),
            hostname: "db.demo.svc.cluster.local".into(),
            cluster_ips: vec![address::encode("10.96.0.20".parse().unwrap())],
            ports: vec![ServicePort {
                port: 80,
                target_port: 9000,
                app_protocol: app_protocol.into(),
                ..Default::default()
            }],
            endpoints: vec![Endpoint {
                workload_uid: uid.into(),
                weight: 1,
                ports: [(80, 9000)].into(),
                ..Default::default()
            }],
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

    #[test]
    fn well_known_server_first_ports_are_opaque_anywhere() {
        let v = view(vec![], vec![]);
        assert!(is_opaque(&v, addr("192.0.2.1:3306")));
        assert!(is_opaque(&v, addr("192.0.2.1:25")));
        assert!(!is_opaque(&v, addr("192.0.2.1:8080")));
    }

    #[test]
    fn a_pod_annotation_makes_its_ports_opaque_by_pod_ip_and_behind_a_vip() {
        let v = view(
            vec![workload("u1", "10.244.1.2", &[(9000, 9000), (7000, 7010)])],
            vec![service("", "u1")],
        );
        assert!(is_opaque(&v, addr("10.244.1.2:9000")));
        assert!(is_opaque(&v, addr("10.244.1.2:7005")));
        assert!(!is_opaque(&v, addr("10.244.1.2:7011")));
        assert!(
            is_opaque(&v, addr("10.96.0.20:80")),
            "service port 80 targets the opaque 9000"
        );
        let plain = view(
            vec![workload("u1", "10.244.1.2", &[])],
            vec![service("", "u1")],
        );
        assert!(!is_opaque(&plain, addr("10.96.0.20:80")));
    }

    #[test]
    fn app_protocol_decides_for_a_service_port() {
        let w = || vec![workload("u1", "10.244.1.2", &[])];
        for (proto, opaque) in [
            ("", false),
            ("http", false),
            ("kubernetes.io/h2c", false),
            ("GRPC", false),
            ("tcp", true),
            ("mysql", true),
            ("https", true),
        ] {
            let v = view(w(), vec![service(proto, "u1")]);
            assert_eq!(is_opaque(&v, addr("10.96.0.20:80")), opaque, "{proto:?}");
        }
    }

    #[test]
    fn the_local_side_follows_the_annotation_and_a_servers_proxy_protocol() {
        let mut v = view(vec![workload("u1", "10.244.1.2", &[(9000, 9000)])], vec![]);
        let server = |port: u32, proxy_protocol: &str| PolicyServer {
            name: format!("s{port}"),
            port,
            proxy_protocol: proxy_protocol.into(),
            ..Default::default()
        };
        v.apply(WatchResponse {
            epoch: "e".into(),
            version: 2,
            base_version: 1,
            policies: vec![Policy {
                name: "u1".into(),
                namespace: "demo".into(),
                workload_uid: "u1".into(),
                servers: vec![
                    server(7000, "opaque"),
                    server(7001, "HTTP/2"),
                    server(7002, "TLS"),
                ],
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap();
        let local = |port| is_local_opaque(&v, "demo/u1", Some("u1"), port);
        assert!(local(9000), "annotation");
        assert!(local(7000), "Server proxyProtocol: opaque");
        assert!(local(7002), "Server proxyProtocol: TLS");
        assert!(!local(7001), "HTTP/2 is detected");
        assert!(!local(8080));
        assert!(local(5432), "well-known port");
        assert!(!is_local_opaque(&v, "demo/other", None, 7000));
    }
}
