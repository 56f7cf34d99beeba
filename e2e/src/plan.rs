//! Address and name planning: a pure function from manifests to the cluster
//! the simulator will build. Nothing here touches the machine, so every rule
//! (which IP a pod gets, which pods back a Service, what a pod can resolve)
//! is unit-tested.

use crate::manifest::{Manifests, Sourced};
use crate::state::{
    ContainerState, EndpointState, FabricState, NodeState, PodState, ServicePortState,
    ServiceState, State,
};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Where a simulator keeps its files and cgroups.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Parent of every simulator's state directory (`/run/weft-sim`).
    pub run_dir: PathBuf,
    /// Parent of every simulator's cgroups (`<cgroup2 mount>/weft-sim`).
    pub cgroup_root: PathBuf,
}

/// How to start one container.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerLaunch {
    pub name: String,
    /// `command[0]` as written; resolved against PATH and the manifest
    /// directory when the cluster starts.
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Declared TCP container ports: `ready` waits until they listen.
    pub tcp_ports: Vec<u16>,
    pub log: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub state: State,
    /// Per pod key (`ns/name`): the containers to start.
    pub launches: BTreeMap<String, Vec<ContainerLaunch>>,
    /// Per pod key: the contents of its `/etc/hosts`.
    pub hosts: BTreeMap<String, String>,
    /// Per pod key: the contents of its `/etc/resolv.conf`.
    pub resolv: BTreeMap<String, String>,
    /// The file each pod came from, for error messages.
    pub sources: BTreeMap<String, PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{count} nodes: the simulator supports at most {MAX_NODES}")]
    TooManyNodes { count: usize },
    #[error(
        "node {node} has {count} pods: the simulator supports at most {MAX_PODS_PER_NODE} per node"
    )]
    TooManyPods { node: String, count: usize },
    #[error("{}: {object}: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        object: String,
        reason: String,
    },
}

pub const MAX_NODES: usize = 200;
pub const MAX_PODS_PER_NODE: usize = 250;
/// The Service CIDR, as a kube-apiserver's `--service-cluster-ip-range`.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);

pub fn netns_fabric(name: &str) -> String {
    format!("weft.{name}.fabric")
}
pub fn netns_node(name: &str, node: &str) -> String {
    format!("weft.{name}.node.{node}")
}
pub fn netns_pod(name: &str, namespace: &str, pod: &str) -> String {
    format!("weft.{name}.pod.{namespace}.{pod}")
}
/// Prefix shared by every network namespace of one simulator: `down` removes
/// all of them, even ones a crashed `up` never wrote into its state.
pub fn netns_prefix(name: &str) -> String {
    format!("weft.{name}.")
}
/// Parent of the eBPF pin directories of one simulator's nodes.
pub fn bpf_pin_root(name: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/weft-sim").join(name)
}
/// A pod's cgroup under its cluster's, laid out as kubelet's cgroupfs
/// driver does (`kubepods/<QoS class>/pod<uid>`; every simulated pod is
/// best-effort: the simulator sets no resources).
pub fn pod_cgroup(cluster_cgroup: &Path, uid: &str) -> PathBuf {
    cluster_cgroup
        .join("kubepods")
        .join("besteffort")
        .join(format!("pod{uid}"))
}
pub fn host_interface(slot: u8) -> String {
    format!("wf{slot}h")
}
/// The alias given to the host interface, naming the simulator that owns it
/// (slots are reused, so the interface's name alone does not say whose).
pub fn host_interface_alias(name: &str) -> String {
    format!("weft-sim/{name}")
}

/// The control plane service a node credential is for: each takes its own
/// (docs/simulator.md, "Node credentials").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialFor {
    Identity,
    Destination,
}

/// The directory of `<node>.token` files for `service`: what its
/// `--local-credentials` names.
pub fn credential_dir(state_dir: &Path, service: CredentialFor) -> PathBuf {
    let dir = match service {
        CredentialFor::Identity => "identity",
        CredentialFor::Destination => "destination",
    };
    state_dir.join("credentials").join(dir)
}

pub fn plan(
    name: &str,
    slot: u8,
    manifests: &Manifests,
    layout: &Layout,
) -> Result<Plan, PlanError> {
    let state_dir = layout.run_dir.join(name);
    let cgroup_dir = layout.cgroup_root.join(name);

    // Nodes: Node objects plus every node a pod names, in name order.
    let node_names: BTreeSet<String> = manifests
        .nodes
        .iter()
        .filter_map(|n| n.object.metadata.name.clone())
        .chain(manifests.pods.iter().filter_map(|p| node_of(&p.object)))
        .collect();
    if node_names.len() > MAX_NODES {
        return Err(PlanError::TooManyNodes {
            count: node_names.len(),
        });
    }
    let nodes: Vec<NodeState> = node_names
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let i = i as u8;
            NodeState {
                name: node.clone(),
                index: i,
                ip: Ipv4Addr::new(10, 240, slot, 10 + i),
                ipv6: Ipv6Addr::new(0xfd00, 0x10, 0x240, slot.into(), 0, 0, 0, 10 + u16::from(i)),
                pod_cidr: format!("10.244.{i}.0/24"),
                pod_cidr_v6: format!(
                    "{}/64",
                    Ipv6Addr::new(0xfd00, 0x10, 0x244, i.into(), 0, 0, 0, 0)
                ),
                netns: netns_node(name, node),
                netns_path: PathBuf::from("/run/netns").join(netns_node(name, node)),
                cgroup: cgroup_dir.join(format!("node.{node}")),
                ca_credential_file: credential_dir(&state_dir, CredentialFor::Identity)
                    .join(format!("{node}.token")),
                destination_credential_file: credential_dir(&state_dir, CredentialFor::Destination)
                    .join(format!("{node}.token")),
                agent_socket: state_dir.join("nodes").join(node).join("cni.sock"),
                bpf_pin_dir: bpf_pin_root(name).join(node),
            }
        })
        .collect();

    // Pods: per node in (namespace, name) order, from .2 (.1 is the node's gateway).
    let mut by_node: BTreeMap<String, Vec<&Sourced<Pod>>> = BTreeMap::new();
    for p in &manifests.pods {
        by_node
            .entry(node_of(&p.object).unwrap_or_default())
            .or_default()
            .push(p);
    }
    let mut pods = Vec::new();
    let mut launches = BTreeMap::new();
    let mut sources = BTreeMap::new();
    for node in &nodes {
        let mut on_node = by_node.remove(&node.name).unwrap_or_default();
        if on_node.len() > MAX_PODS_PER_NODE {
            return Err(PlanError::TooManyPods {
                node: node.name.clone(),
                count: on_node.len(),
            });
        }
        on_node.sort_by_key(|p| (namespace_of(&p.object), p.object.metadata.name.clone()));
        for (k, sourced) in on_node.into_iter().enumerate() {
            let host = 2 + k as u8;
            let pod = &sourced.object;
            let namespace = namespace_of(pod);
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let spec = pod.spec.clone().unwrap_or_default();
            let ip = Ipv4Addr::new(10, 244, node.index, host);
            let uid = pod.metadata.uid.clone().unwrap_or_else(|| {
                let seed = format!("weft-sim/{name}/{namespace}/{pod_name}");
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, seed.as_bytes()).to_string()
            });
            let service_account = spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into());
            let key = format!("{namespace}/{pod_name}");
            let object = format!("Pod {key}");
            let invalid = |reason: String| PlanError::Invalid {
                file: sourced.file.clone(),
                object: object.clone(),
                reason,
            };
            // The uid names the pod's cgroup directory: only what a
            // Kubernetes uid can be (a UUID), never a path.
            if uid.is_empty()
                || uid.len() > 64
                || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(invalid(format!(
                    "metadata.uid {uid:?} is not a uid (letters, digits and '-', at most 64)"
                )));
            }
            let fields = FieldRefs {
                name: &pod_name,
                namespace: &namespace,
                uid: &uid,
                node: &node.name,
                service_account: &service_account,
                pod_ip: ip,
                host_ip: node.ip,
            };
            let mut containers = Vec::new();
            let mut launch = Vec::new();
            for c in &spec.containers {
                let log = state_dir
                    .join("logs")
                    .join(format!("{namespace}.{pod_name}.{}.log", c.name));
                let mut command = c.command.clone().unwrap_or_default();
                let program = command.remove(0);
                command.extend(c.args.clone().unwrap_or_default());
                let mut env = Vec::new();
                for var in c.env.iter().flatten() {
                    env.push((var.name.clone(), fields.value(var).map_err(invalid)?));
                }
                let tcp_ports = c
                    .ports
                    .iter()
                    .flatten()
                    .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                    .map(|p| {
                        u16::try_from(p.container_port).map_err(|_| {
                            invalid(format!("containerPort {} out of range", p.container_port))
                        })
                    })
                    .collect::<Result<Vec<u16>, _>>()?;
                containers.push(ContainerState {
                    name: c.name.clone(),
                    pid: None,
                    log: log.clone(),
                });
                launch.push(ContainerLaunch {
                    name: c.name.clone(),
                    program,
                    args: command,
                    env,
                    tcp_ports,
                    log,
                });
            }
            launches.insert(key.clone(), launch);
            sources.insert(key.clone(), sourced.file.clone());
            let cgroup = pod_cgroup(&cgroup_dir, &uid);
            pods.push(PodState {
                namespace: namespace.clone(),
                name: pod_name.clone(),
                uid,
                node: node.name.clone(),
                service_account,
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                annotations: pod.metadata.annotations.clone().unwrap_or_default(),
                ip,
                ipv6: Ipv6Addr::new(0xfd00, 0x10, 0x244, node.index.into(), 0, 0, 0, host.into()),
                netns: netns_pod(name, &namespace, &pod_name),
                netns_path: PathBuf::from("/run/netns")
                    .join(netns_pod(name, &namespace, &pod_name)),
                cgroup,
                containers,
            });
        }
    }

    let services = plan_services(manifests, &pods, &manifests.pods)?;
    let hosts = pods
        .iter()
        .map(|p| (p.key(), hosts_file(p, &services)))
        .collect();
    let resolv = pods.iter().map(|p| (p.key(), resolv_conf(p))).collect();
    Ok(Plan {
        state: State {
            name: name.to_string(),
            slot,
            registers_pods: false,
            manifest_dir: manifests.dir.clone(),
            state_dir,
            fabric: FabricState {
                netns: netns_fabric(name),
                host_interface: host_interface(slot),
                host_ip: Ipv4Addr::new(10, 240, slot, 1),
                host_ipv6: Ipv6Addr::new(0xfd00, 0x10, 0x240, slot.into(), 0, 0, 0, 1),
                cidr: format!("10.240.{slot}.0/24"),
            },
            nodes,
            pods,
            services,
            kube: None,
        },
        launches,
        hosts,
        resolv,
        sources,
    })
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

fn namespace_of(pod: &Pod) -> String {
    pod.metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

/// The downward API fields a container's `env` may refer to.
pub(crate) struct FieldRefs<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub service_account: &'a str,
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
}

impl FieldRefs<'_> {
    pub(crate) fn value(&self, var: &k8s_openapi::api::core::v1::EnvVar) -> Result<String, String> {
        if let Some(v) = &var.value {
            return Ok(v.clone());
        }
        let Some(from) = &var.value_from else {
            return Ok(String::new());
        };
        let Some(field) = &from.field_ref else {
            return Err(format!(
                "env {}: only `value` and `valueFrom.fieldRef` are supported by the simulator",
                var.name
            ));
        };
        Ok(match field.field_path.as_str() {
            "metadata.name" => self.name.to_string(),
            "metadata.namespace" => self.namespace.to_string(),
            "metadata.uid" => self.uid.to_string(),
            "spec.nodeName" => self.node.to_string(),
            "spec.serviceAccountName" => self.service_account.to_string(),
            "status.podIP" => self.pod_ip.to_string(),
            "status.hostIP" => self.host_ip.to_string(),
            other => {
                return Err(format!(
                    "env {}: fieldRef {other:?} is not supported",
                    var.name
                ));
            }
        })
    }
}

fn plan_services(
    manifests: &Manifests,
    pods: &[PodState],
    pod_objects: &[Sourced<Pod>],
) -> Result<Vec<ServiceState>, PlanError> {
    let mut sorted: Vec<&Sourced<Service>> = manifests.services.iter().collect();
    sorted.sort_by_key(|s| {
        (
            s.object.metadata.namespace.clone(),
            s.object.metadata.name.clone(),
        )
    });
    let pod_object = |p: &PodState| {
        pod_objects.iter().find(|o| {
            namespace_of(&o.object) == p.namespace
                && o.object.metadata.name.as_deref() == Some(&p.name)
        })
    };

    // Explicit ClusterIPs first, so a hashed one never takes an address a
    // later manifest asks for.
    let mut taken: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut explicit: BTreeMap<String, Option<Ipv4Addr>> = BTreeMap::new();
    for s in &sorted {
        let key = service_key(&s.object);
        let invalid = |reason: String| PlanError::Invalid {
            file: s.file.clone(),
            object: format!("Service {key}"),
            reason,
        };
        match s
            .object
            .spec
            .as_ref()
            .and_then(|sp| sp.cluster_ip.as_deref())
        {
            None | Some("") => {}
            Some("None") => {
                explicit.insert(key.clone(), None);
            }
            Some(text) => {
                let ip: Ipv4Addr = text
                    .parse()
                    .map_err(|_| invalid(format!("clusterIP {text:?} is not an IPv4 address")))?;
                if !in_service_cidr(ip) {
                    return Err(invalid(format!(
                        "clusterIP {ip} is outside the service CIDR 10.96.0.0/16"
                    )));
                }
                if let Some(other) = taken.insert(ip, key.clone()) {
                    return Err(invalid(format!(
                        "clusterIP {ip} is already used by Service {other}"
                    )));
                }
                explicit.insert(key.clone(), Some(ip));
            }
        }
    }

    let mut services = Vec::new();
    for s in sorted {
        let key = service_key(&s.object);
        let spec = s.object.spec.clone().unwrap_or_default();
        let namespace = s
            .object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let cluster_ip = match explicit.get(&key) {
            Some(ip) => *ip,
            None => {
                let ip = hashed_cluster_ip(&key, &taken);
                taken.insert(ip, key.clone());
                Some(ip)
            }
        };
        // Endpoints, as the endpoints controller picks them: pods of the same
        // namespace whose labels include every selector pair. No selector
        // selects nothing (those Services get manual Endpoints on a cluster).
        let selector = spec.selector.clone().unwrap_or_default();
        let members: Vec<&PodState> = if selector.is_empty() {
            Vec::new()
        } else {
            pods.iter()
                .filter(|p| {
                    p.namespace == namespace
                        && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                })
                .collect()
        };
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                let target_port = match &p.target_port {
                    None => u16::try_from(p.port).ok(),
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                    // A named port resolves through the first endpoint that
                    // declares it; pods are expected to agree on the number.
                    Some(IntOrString::String(port_name)) => members
                        .iter()
                        .find_map(|m| pod_object(m).and_then(|o| named_port(&o.object, port_name))),
                };
                ServicePortState {
                    name: p.name.clone(),
                    port: u16::try_from(p.port).unwrap_or(0),
                    target_port,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                }
            })
            .collect();
        services.push(ServiceState {
            namespace,
            name: s.object.metadata.name.clone().unwrap_or_default(),
            cluster_ip,
            ports,
            endpoints: members
                .iter()
                .map(|m| EndpointState {
                    pod: m.key(),
                    ip: m.ip,
                })
                .collect(),
        });
    }
    Ok(services)
}

fn service_key(s: &Service) -> String {
    format!(
        "{}/{}",
        s.metadata.namespace.as_deref().unwrap_or("default"),
        s.metadata.name.as_deref().unwrap_or_default()
    )
}

fn named_port(pod: &Pod, port_name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find_map(|p| {
            (p.name.as_deref() == Some(port_name))
                .then(|| u16::try_from(p.container_port).ok())
                .flatten()
        })
}

fn in_service_cidr(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    (a, b) == (10, 96)
}

/// A ClusterIP that stays the same for a Service whatever else is in the
/// directory (hash of `namespace/name`, probing past taken addresses), so
/// adding a Service does not renumber the others. Skips 10.96.0.0, 10.96.0.1
/// (the API server's, by convention) and the broadcast address.
fn hashed_cluster_ip(key: &str, taken: &BTreeMap<Ipv4Addr, String>) -> Ipv4Addr {
    let mut host = (fnv1a(key.as_bytes()) % 65536) as u32;
    loop {
        let ip = Ipv4Addr::from(u32::from(SERVICE_CIDR.0) | host);
        if host > 1 && host < 65535 && !taken.contains_key(&ip) {
            return ip;
        }
        host = (host + 1) % 65536;
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// `/etc/hosts` for one pod: the names kube-dns would answer for Services.
pub(crate) fn hosts_file(pod: &PodState, services: &[ServiceState]) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    out.push_str(&format!("{}\t{}\n", pod.ip, pod.name));
    for s in services {
        let ip = match (s.cluster_ip, s.endpoints.first()) {
            (Some(ip), _) => ip,
            (None, Some(e)) => e.ip, // headless: the first endpoint
            (None, None) => continue,
        };
        let (n, ns) = (&s.name, &s.namespace);
        let mut names = format!("{n}.{ns}.svc.cluster.local {n}.{ns}.svc {n}.{ns}");
        if *ns == pod.namespace {
            names.push_str(&format!(" {n}"));
        }
        out.push_str(&format!("{ip}\t{names}\n"));
    }
    out
}

/// `/etc/resolv.conf` for one pod: kubelet's search path, and a nameserver
/// on the pod's own loopback where nothing listens, so a name that is not in
/// `/etc/hosts` fails at once (port unreachable) instead of waiting out a
/// timeout against the host's resolver, which a pod cannot reach.
pub(crate) fn resolv_conf(pod: &PodState) -> String {
    format!(
        "search {ns}.svc.cluster.local svc.cluster.local cluster.local\nnameserver 127.0.0.1\noptions ndots:5 timeout:1 attempts:1\n",
        ns = pod.namespace
    )
}

/// Resolves a container's program as a shell would, with the manifest
/// directory standing in for the working directory.
pub fn resolve_program(program: &str, manifest_dir: &Path) -> Option<PathBuf> {
    let is_executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = manifest_dir.join(program);
        return is_executable(&p).then_some(p);
    }
    std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(program))
                .find(|p| is_executable(p))
        })
        .unwrap_or(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            run_dir: "/run/weft-sim".into(),
            cgroup_root: "/cg/weft-sim".into(),
        }
    }

    fn plan_text(text: &str) -> Result<Plan, PlanError> {
        let mut m = Manifests::from_text(Path::new("m.yaml"), text).unwrap();
        m.dir = "/m".into();
        plan("t", 3, &m, &layout())
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: demo, labels: {app: web}}
spec:
  nodeName: node-b
  containers: [{name: main, command: [sleep, "1"], ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: demo, labels: {app: web}}
spec:
  nodeName: node-b
  containers:
  - name: main
    command: [sleep]
    args: ["1"]
    ports: [{name: http, containerPort: 8080}]
    env:
    - {name: MY_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: PLAIN, value: x}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec:
  nodeName: node-a
  serviceAccountName: client
  containers: [{name: main, command: [sleep, "1"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: prod, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{name: main, command: [sleep, "1"]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: fixed, namespace: prod}
spec:
  clusterIP: 10.96.7.7
  selector: {app: nothing}
  ports: [{port: 9000}]
"#;

    #[test]
    fn nodes_and_pods_are_numbered_in_name_order() {
        let p = plan_text(CLUSTER).unwrap();
        let s = &p.state;
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.ip.to_string(), n.pod_cidr.as_str()))
            .collect();
        assert_eq!(
            nodes,
            [
                ("node-a", "10.240.3.10".into(), "10.244.0.0/24"),
                ("node-b", "10.240.3.11".into(), "10.244.1.0/24")
            ]
        );
        let ip = |k: &str| s.pod(k).unwrap().ip.to_string();
        assert_eq!(ip("demo/client"), "10.244.0.2");
        assert_eq!(ip("prod/other"), "10.244.0.3");
        assert_eq!(ip("demo/web-a"), "10.244.1.2");
        assert_eq!(ip("demo/web-b"), "10.244.1.3");
        assert_eq!(
            s.pod("demo/web-b").unwrap().ipv6.to_string(),
            "fd00:10:244:1::3"
        );
        assert_eq!(s.pod("demo/client").unwrap().service_account, "client");
        assert_eq!(s.pod("demo/web-a").unwrap().service_account, "default");
        assert_eq!(
            s.pod("demo/client").unwrap().netns,
            "weft.t.pod.demo.client"
        );
        let client = s.pod("demo/client").unwrap();
        assert_eq!(
            client.cgroup,
            PathBuf::from(format!(
                "/cg/weft-sim/t/kubepods/besteffort/pod{}",
                client.uid
            ))
        );
        assert_eq!(
            s.nodes[0].ca_credential_file,
            PathBuf::from("/run/weft-sim/t/credentials/identity/node-a.token")
        );
        assert_eq!(
            s.nodes[0].destination_credential_file,
            PathBuf::from("/run/weft-sim/t/credentials/destination/node-a.token")
        );
    }

    /// The control plane reads the state file in local mode through
    /// `weft-local-cluster`: what the simulator writes must read back there
    /// as the same pods, nodes and Services.
    #[test]
    fn the_state_file_reads_back_as_the_local_cluster_schema() {
        use std::net::IpAddr;
        let state = plan_text(CLUSTER).unwrap().state;
        let json = serde_json::to_vec(&state).unwrap();
        let read = weft_local_cluster::LocalClusterState::parse(&json).unwrap();
        let written: Vec<_> = state
            .pods
            .iter()
            .map(|p| {
                (
                    p.namespace.clone(),
                    p.name.clone(),
                    p.uid.clone(),
                    p.node.clone(),
                    p.service_account.clone(),
                    Some(IpAddr::from(p.ip)),
                    Some(IpAddr::from(p.ipv6)),
                )
            })
            .collect();
        let parsed: Vec<_> = read
            .pods
            .iter()
            .map(|p| {
                (
                    p.namespace.clone(),
                    p.name.clone(),
                    p.uid.clone(),
                    p.node.clone(),
                    p.service_account.clone(),
                    p.ip,
                    p.ipv6,
                )
            })
            .collect();
        assert_eq!(parsed, written);
        assert_eq!(read.pods.len(), 4);
        let nodes: Vec<_> = read
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.ip, n.ipv6))
            .collect();
        let want: Vec<_> = state
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    Some(IpAddr::from(n.ip)),
                    Some(IpAddr::from(n.ipv6)),
                )
            })
            .collect();
        assert_eq!(nodes, want);
        let services: Vec<_> = read
            .services
            .iter()
            .map(|s| (s.namespace.clone(), s.name.clone(), s.cluster_ip))
            .collect();
        let want: Vec<_> = state
            .services
            .iter()
            .map(|s| {
                (
                    s.namespace.clone(),
                    s.name.clone(),
                    s.cluster_ip.map(IpAddr::from),
                )
            })
            .collect();
        assert_eq!(services, want);
        assert!(
            services
                .iter()
                .any(|s| s.2 == Some("10.96.7.7".parse().unwrap()))
        );
    }

    #[test]
    fn plan_is_deterministic_and_uids_stable() {
        let a = plan_text(CLUSTER).unwrap().state;
        let b = plan_text(CLUSTER).unwrap().state;
        assert_eq!(a, b);
        assert_eq!(a.pod("demo/client").unwrap().uid.len(), 36);
    }

    #[test]
    fn services_select_same_namespace_and_resolve_named_ports() {
        let p = plan_text(CLUSTER).unwrap();
        let web = p.state.services.iter().find(|s| s.name == "web").unwrap();
        let eps: Vec<_> = web.endpoints.iter().map(|e| e.pod.as_str()).collect();
        assert_eq!(
            eps,
            ["demo/web-a", "demo/web-b"],
            "prod/other has the label but another namespace"
        );
        assert_eq!(web.ports[0].port, 80);
        assert_eq!(web.ports[0].target_port, Some(8080));
        let ip = web.cluster_ip.unwrap();
        assert!(
            in_service_cidr(ip) && ip != Ipv4Addr::new(10, 96, 0, 1),
            "{ip}"
        );

        let fixed = p.state.services.iter().find(|s| s.name == "fixed").unwrap();
        assert_eq!(fixed.cluster_ip, Some(Ipv4Addr::new(10, 96, 7, 7)));
        assert!(fixed.endpoints.is_empty());
        assert_eq!(
            fixed.ports[0].target_port,
            Some(9000),
            "targetPort defaults to port"
        );
    }

    #[test]
    fn hosts_resolve_short_names_only_in_own_namespace() {
        let p = plan_text(CLUSTER).unwrap();
        let web_ip = p
            .state
            .services
            .iter()
            .find(|s| s.name == "web")
            .unwrap()
            .cluster_ip
            .unwrap();
        let client = &p.hosts["demo/client"];
        assert!(
            client.contains(&format!(
                "{web_ip}\tweb.demo.svc.cluster.local web.demo.svc web.demo web\n"
            )),
            "{client}"
        );
        let other = &p.hosts["prod/other"];
        assert!(
            other.contains("web.demo.svc.cluster.local web.demo.svc web.demo\n"),
            "{other}"
        );
        assert!(
            other.contains(
                "10.96.7.7\tfixed.prod.svc.cluster.local fixed.prod.svc fixed.prod fixed\n"
            ),
            "{other}"
        );
    }

    #[test]
    fn container_command_args_env_and_ports() {
        let p = plan_text(CLUSTER).unwrap();
        let l = &p.launches["demo/web-a"][0];
        assert_eq!(l.program, "sleep");
        assert_eq!(l.args, ["1"]);
        assert_eq!(
            l.env,
            [
                ("MY_IP".to_string(), "10.244.1.2".to_string()),
                ("PLAIN".into(), "x".into())
            ]
        );
        assert_eq!(l.tcp_ports, [8080]);
        assert_eq!(
            l.log,
            PathBuf::from("/run/weft-sim/t/logs/demo.web-a.main.log")
        );
    }

    #[test]
    fn hashed_cluster_ip_is_stable_when_services_are_added() {
        let one = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: n}\nspec: {ports: [{port: 1}]}\n";
        let two = format!(
            "{one}---\napiVersion: v1\nkind: Service\nmetadata: {{name: b, namespace: n}}\nspec: {{ports: [{{port: 1}}]}}\n"
        );
        let ip = |text: &str| {
            plan_text(text)
                .unwrap()
                .state
                .services
                .iter()
                .find(|s| s.name == "a")
                .unwrap()
                .cluster_ip
        };
        assert_eq!(ip(one), ip(&two));
    }

    #[test]
    fn bad_cluster_ips_are_reported() {
        let svc = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip:?}}}\n---\n"
            )
        };
        let e = plan_text(&svc("a", "192.168.0.1")).unwrap_err().to_string();
        assert!(
            e.contains("Service default/a: clusterIP 192.168.0.1 is outside"),
            "{e}"
        );
        let e = plan_text(&svc("a", "banana")).unwrap_err().to_string();
        assert!(e.contains("not an IPv4 address"), "{e}");
        let e = plan_text(&format!(
            "{}{}",
            svc("a", "10.96.1.1"),
            svc("b", "10.96.1.1")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("already used by Service default/a"), "{e}");
    }

    #[test]
    fn a_uid_that_is_not_a_uid_is_reported_not_used_as_a_path() {
        let pod = |uid: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, uid: {uid:?}}}\nspec:\n  nodeName: n\n  containers: [{{name: c, command: [x]}}]\n"
            )
        };
        for bad in ["../../../escape", "a/b", ""] {
            let e = plan_text(&pod(bad)).unwrap_err().to_string();
            assert!(e.contains("Pod default/p: metadata.uid"), "{bad}: {e}");
        }
        let good = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let p = plan_text(&pod(good)).unwrap();
        assert!(p.state.pods[0].cgroup.ends_with(format!("pod{good}")));
    }

    #[test]
    fn unsupported_env_source_is_reported() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  nodeName: n\n  containers:\n  - name: c\n    command: [x]\n    env: [{name: A, valueFrom: {secretKeyRef: {name: s, key: k}}}]\n";
        let e = plan_text(text).unwrap_err().to_string();
        assert!(
            e.starts_with("m.yaml: Pod default/p: env A: only `value`"),
            "{e}"
        );
    }

    #[test]
    fn program_resolution() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resolve_program("sh", dir.path()).is_some());
        assert!(resolve_program("no-such-program-weft", dir.path()).is_none());
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(
            resolve_program("./run.sh", dir.path()).is_none(),
            "not executable"
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_program("./run.sh", dir.path()),
            Some(dir.path().join("./run.sh"))
        );
    }
}
