//! What each namespace's network looks like, as `ip -batch` scripts and an
//! nftables ruleset. Pure text generation; `cluster.rs` runs it.
//!
//! Pods get a /32 (and /128) address and a default route via their node, and
//! the node routes each pod's address to its veth, as Calico does, rather
//! than a bridge per node as the reference bridge CNI does. The reason is
//! kube-proxy: with a bridge, the reply from a same-node Service endpoint is
//! bridged straight back to the client and never meets the node's conntrack,
//! so the DNAT is not undone unless `br_netfilter` is loaded (a host-wide
//! module we will not depend on). Routed pods send every packet through the
//! node, so Service NAT works for same-node and cross-node endpoints alike.

use crate::plan::SERVICE_CIDR;
use crate::state::{NodeState, PodState, State};
use std::fmt::Write;

/// The fabric namespace: one bridge joining every node and the host.
pub fn fabric_script(state: &State) -> String {
    let mut s = String::new();
    s.push_str("link set lo up\nlink add br0 type bridge\nlink set br0 up\n");
    s.push_str("link set host master br0\nlink set host up\n");
    for n in &state.nodes {
        let _ = writeln!(
            s,
            "link set n{} master br0\nlink set n{} up",
            n.index, n.index
        );
    }
    s
}

/// Creating the veth pairs from the fabric to every node (run in the fabric
/// namespace; the `eth0` ends move into the node namespaces).
pub fn fabric_links_script(state: &State) -> String {
    let mut s = String::new();
    for n in &state.nodes {
        let _ = writeln!(
            s,
            "link add n{} type veth peer name eth0 netns {}",
            n.index, n.netns
        );
    }
    s
}

/// The gateway address pods use: the first address of the node's pod CIDR.
pub fn gateway(node: &NodeState) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 244, node.index, 1)
}

/// A node namespace: fabric address, routes to the other nodes' pods, and
/// one routed veth per pod (the `eth0` end moves into the pod namespace).
pub fn node_script(state: &State, node: &NodeState) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "link set lo up");
    // The gateway address lives on lo: IPv4 ARP answers for any local
    // address on any interface, so every pod veth can reach it.
    let _ = writeln!(s, "addr add {}/32 dev lo", gateway(node));
    let _ = writeln!(s, "addr add {}/24 dev eth0", node.ip);
    let _ = writeln!(s, "addr add {}/64 dev eth0 nodad", node.ipv6);
    let _ = writeln!(s, "link set eth0 up");
    for other in state.nodes.iter().filter(|o| o.name != node.name) {
        let _ = writeln!(s, "route add {} via {} dev eth0", other.pod_cidr, other.ip);
        let _ = writeln!(
            s,
            "route add {} via {} dev eth0",
            other.pod_cidr_v6, other.ipv6
        );
    }
    // Service VIPs without a DNAT rule (no endpoints) are local, so the input
    // chain can refuse them with a reset, as kube-proxy does.
    let (net, len) = SERVICE_CIDR;
    let _ = writeln!(s, "route add local {net}/{len} dev lo src {}", node.ip);
    for (k, pod) in pods_on(state, node).enumerate() {
        let _ = writeln!(
            s,
            "link add p{k} type veth peer name eth0 netns {}",
            pod.netns
        );
        let _ = writeln!(s, "link set p{k} up");
        // IPv6 neighbour discovery is per link: the gateway fe80::1 must be
        // on each pod's veth.
        let _ = writeln!(s, "addr add fe80::1/64 dev p{k} nodad");
        // The node's own connections to its pods (kubelet probes) leave from
        // the node's address, as on a real node: policy recognises probes by
        // that source (docs/policy.md, "Kubelet probes").
        let _ = writeln!(s, "route add {}/32 dev p{k} src {}", pod.ip, node.ip);
        let _ = writeln!(s, "route add {}/128 dev p{k}", pod.ipv6);
    }
    s
}

pub fn pods_on<'a>(state: &'a State, node: &'a NodeState) -> impl Iterator<Item = &'a PodState> {
    state.pods.iter().filter(move |p| p.node == node.name)
}

/// A pod namespace: its addresses and a default route via the node.
pub fn pod_script(node: &NodeState, pod: &PodState) -> String {
    let gw = gateway(node);
    format!(
        "link set lo up\n\
         addr add {ip}/32 dev eth0\n\
         addr add {ip6}/128 dev eth0 nodad\n\
         link set eth0 up\n\
         route add {gw}/32 dev eth0 scope link\n\
         route add default via {gw} dev eth0\n\
         route add default via fe80::1 dev eth0\n",
        ip = pod.ip,
        ip6 = pod.ipv6,
    )
}

/// Sysctls of a node namespace (written as `path value` lines).
pub fn node_sysctls() -> &'static [(&'static str, &'static str)] {
    &[
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv6/conf/all/forwarding", "1"),
    ]
}

/// kube-proxy's job for one node, in nftables: DNAT from each Service port
/// to a random endpoint, hairpin SNAT for a pod reaching itself through its
/// own Service, TCP reset for Services without endpoints, and a guard that
/// keeps pods from reaching the host's fabric address (the host has no
/// route back to pod addresses and would send replies to its default route).
pub fn kube_proxy_rules(state: &State, node: &NodeState) -> String {
    let (net, len) = SERVICE_CIDR;
    let mut services = String::new();
    let mut chains = String::new();
    let mut hairpin = String::new();
    for (si, svc) in state.services.iter().enumerate() {
        let Some(vip) = svc.cluster_ip else { continue };
        for (pi, port) in svc.ports.iter().enumerate() {
            let proto = match port.protocol.as_str() {
                "TCP" => "tcp",
                "UDP" => "udp",
                _ => continue, // SCTP: not simulated
            };
            let Some(target) = port.target_port else {
                continue;
            };
            if svc.endpoints.is_empty() {
                continue; // falls through to the local route and is refused
            }
            let chain = format!("svc{si}p{pi}");
            let _ = writeln!(
                services,
                "\t\tip daddr {vip} {proto} dport {} jump {chain}",
                port.port
            );
            let map: Vec<String> = (0..svc.endpoints.len())
                .map(|e| format!("{e} : jump {chain}e{e}"))
                .collect();
            let _ = writeln!(
                chains,
                "\tchain {chain} {{\n\t\tnumgen random mod {} vmap {{ {} }}\n\t}}",
                svc.endpoints.len(),
                map.join(", ")
            );
            for (e, ep) in svc.endpoints.iter().enumerate() {
                let _ = writeln!(
                    chains,
                    "\tchain {chain}e{e} {{\n\t\tmeta l4proto {proto} dnat to {}:{target}\n\t}}",
                    ep.ip
                );
            }
        }
        for ep in &svc.endpoints {
            let local = state
                .pods
                .iter()
                .any(|p| p.ip == ep.ip && p.node == node.name);
            if local {
                let _ = writeln!(
                    hairpin,
                    "\t\tct status dnat ip saddr {ip} ip daddr {ip} snat to {}",
                    gateway(node),
                    ip = ep.ip
                );
            }
        }
    }
    // `--kube`: pods reach the API server on the host (the `kubernetes`
    // Service's endpoint) through their node, masqueraded to the node's
    // address, which the host routes back; nothing else of the host.
    let mut api_server_accept = String::new();
    if let Some(port) = state
        .kube
        .as_ref()
        .and_then(|k| k.api_server.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<u16>().ok())
    {
        let host = state.fabric.host_ip;
        let _ = writeln!(
            hairpin,
            "\t\toifname \"eth0\" ip daddr {host} tcp dport {port} masquerade"
        );
        api_server_accept =
            format!("\t\toifname \"eth0\" ip daddr {host} tcp dport {port} accept\n");
    }
    let mut hairpin_lines: Vec<&str> = hairpin.lines().collect();
    hairpin_lines.dedup();
    let hairpin = hairpin_lines
        .iter()
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    format!(
        "table ip weft_kube_proxy {{\n\
         \tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tip daddr {net}/{len} jump services\n\t}}\n\
         \tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tip daddr {net}/{len} jump services\n\t}}\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{hairpin}\t}}\n\
         \tchain services {{\n{services}\t}}\n\
         {chains}\
         \tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
         \t\tip daddr {net}/{len} meta l4proto tcp reject with tcp reset\n\
         \t\tip daddr {net}/{len} reject\n\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
         {api_server_accept}\t\toifname \"eth0\" ip daddr {host} reject\n\t}}\n\
         }}\n\
         table ip6 weft_fabric_guard {{\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
         \t\toifname \"eth0\" ip6 daddr {host6} reject\n\t}}\n\
         }}\n",
        host = state.fabric.host_ip,
        host6 = state.fabric.host_ipv6,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifests;
    use crate::plan::{Layout, plan};
    use std::path::Path;

    fn state() -> State {
        let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: demo, labels: {app: server}}
spec: {nodeName: node-b, containers: [{name: c, command: [x], ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec: {nodeName: node-a, containers: [{name: c, command: [x]}]}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo}
spec: {clusterIP: 10.96.0.20, selector: {app: server}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec: {clusterIP: 10.96.0.21, selector: {app: none}, ports: [{port: 80}]}
"#;
        let m = Manifests::from_text(Path::new("m.yaml"), text).unwrap();
        let layout = Layout {
            run_dir: "/run/x".into(),
            cgroup_root: "/cg".into(),
        };
        plan("t", 1, &m, &layout).unwrap().state
    }

    #[test]
    fn node_routes_to_other_nodes_and_own_pods() {
        let s = state();
        let a = node_script(&s, &s.nodes[0]);
        assert!(
            a.contains("route add 10.244.1.0/24 via 10.240.1.11 dev eth0\n"),
            "{a}"
        );
        assert!(
            a.contains("link add p0 type veth peer name eth0 netns weft.t.pod.demo.client\n"),
            "{a}"
        );
        assert!(
            a.contains("route add 10.244.0.2/32 dev p0 src 10.240.1.10\n"),
            "{a}"
        );
        assert!(!a.contains("via 10.240.1.10"), "no route to itself: {a}");
    }

    #[test]
    fn pod_default_route_via_node() {
        let s = state();
        let p = pod_script(&s.nodes[1], s.pod("demo/server").unwrap());
        assert!(p.contains("addr add 10.244.1.2/32 dev eth0\n"), "{p}");
        assert!(
            p.contains("route add default via 10.244.1.1 dev eth0\n"),
            "{p}"
        );
    }

    #[test]
    fn service_dnat_and_no_endpoint_reject() {
        let s = state();
        let r = kube_proxy_rules(&s, &s.nodes[1]);
        assert!(
            r.contains("ip daddr 10.96.0.20 tcp dport 80 jump svc1p0\n"),
            "{r}"
        );
        assert!(
            r.contains("meta l4proto tcp dnat to 10.244.1.2:8080\n"),
            "{r}"
        );
        assert!(
            !r.contains("10.96.0.21"),
            "no DNAT for a Service without endpoints: {r}"
        );
        assert!(
            r.contains(
                "ct status dnat ip saddr 10.244.1.2 ip daddr 10.244.1.2 snat to 10.244.1.1\n"
            ),
            "{r}"
        );
        let on_a = kube_proxy_rules(&s, &s.nodes[0]);
        assert!(
            !on_a.contains("snat"),
            "hairpin only where the endpoint runs: {on_a}"
        );
    }
}
