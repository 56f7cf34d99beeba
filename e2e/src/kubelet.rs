//! The simulated kubelet and kube-proxy of a `--kube` cluster
//! (`weft-sim kubelet`, started by `up --kube`): it watches the API server
//! and, for every Pod bound to one of the simulator's nodes, does what
//! `up` does for a Pod of DIR — network namespace, routed veth, addresses,
//! cgroup, `/etc/hosts`, the containers' commands — then writes the Pod's
//! status back. Services and EndpointSlices become each node's nftables
//! rules and every pod's `/etc/hosts` as they change.
//!
//! One process plays the kubelet of every node of the simulator. It works
//! level-triggered: watches keep local caches of Pods, Services and
//! EndpointSlices, and a sync pass every few hundred milliseconds compares
//! them with what runs. See docs/simulator.md for what it does not do.

use crate::netconf;
use crate::plan::{self, FieldRefs};
use crate::state::{
    ContainerState, EndpointState, PodState, ServicePortState, ServiceState, State,
};
use crate::sys::{self, CgroupHandle};
use crate::volumes::{self, Mount, Payload};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Pods per node: addresses `.2` to `.254` of the node's /24.
const MAX_PODS_PER_NODE: usize = 250;

/// How often ConfigMap, Secret, downward API and projected volumes are
/// written again from the API server (the kubelet's sync period is longer;
/// a test should not wait a minute).
const VOLUME_SYNC: Duration = Duration::from_secs(2);

/// How often each node's Lease is renewed (the kubelet's default), and the
/// lease duration it announces.
const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_SECONDS: i32 = 40;

/// How often a pod whose ConfigMap or Secret is missing is tried again.
const CONFIG_RETRY: Duration = Duration::from_secs(2);

/// How often running pods are checked and the caches compared.
const SYNC_PERIOD: Duration = Duration::from_millis(250);

/// The longest a container waits before it is started again after it
/// exited (the kubelet's back-off, capped low for a simulator).
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(10);

/// Runs the kubelet of simulator `name` until killed.
/// Runs the kubelet of `node` (every node of the cluster when `None`)
/// until killed.
pub fn run(state_dir: &Path, node: Option<&str>) -> anyhow::Result<()> {
    let state = State::load(state_dir)?;
    if let Some(node) = node
        && state.node(node).is_none()
    {
        anyhow::bail!("simulator {} has no node {node:?}", state.name);
    }
    let nodes: BTreeSet<String> = state
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| node.is_none_or(|only| only == n))
        .collect();
    let kube = state
        .kube
        .clone()
        .ok_or_else(|| anyhow::anyhow!("simulator {} was not started with --kube", state.name))?;
    // The API client's TLS: ring, as the rest of the workspace.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = runtime.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kube.kubeconfig)?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        anyhow::Ok(kube::Client::try_from(config)?)
    })?;
    let pods = runtime.block_on(async { cache::<Pod>(&client) });
    let services = runtime.block_on(async { cache::<Service>(&client) });
    let slices = runtime.block_on(async { cache::<EndpointSlice>(&client) });
    runtime.block_on(async {
        pods.wait_until_ready().await?;
        services.wait_until_ready().await?;
        slices.wait_until_ready().await?;
        anyhow::Ok(())
    })?;
    eprintln!("kubelet: watching pods of nodes {nodes:?}");
    let mut kubelet = Kubelet {
        nodes,
        state,
        client,
        runtime: runtime.handle().clone(),
        running: BTreeMap::new(),
        proxy_rules: BTreeMap::new(),
        last_heartbeat: None,
        hosts: BTreeMap::new(),
    };
    loop {
        kubelet.sync(&pods, &services, &slices);
        std::thread::sleep(SYNC_PERIOD);
    }
}

/// A cache of every object of kind `K`, kept by a watch (re-listing after
/// errors with back-off).
fn cache<K>(client: &kube::Client) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                eprintln!("kubelet: watch error (retrying): {e}");
            }
        }
    });
    reader
}

struct Kubelet {
    /// The nodes this kubelet runs (one, when each node has its own).
    nodes: BTreeSet<String>,
    state: State,
    client: kube::Client,
    runtime: tokio::runtime::Handle,
    /// Pods this kubelet runs, by uid.
    running: BTreeMap<String, RunningPod>,
    /// The nftables ruleset last applied, per node.
    proxy_rules: BTreeMap<String, String>,
    /// The `/etc/hosts` last written, per pod network namespace.
    hosts: BTreeMap<String, String>,
    /// When the nodes' Leases were last renewed.
    last_heartbeat: Option<Instant>,
}

struct RunningPod {
    pod: PodState,
    /// The veth index on the node (`p<k>`), which also gives the address.
    slot: u8,
    host_network: bool,
    restart_policy: String,
    containers: Vec<RunningContainer>,
    start_time: String,
    /// SIGTERM was sent; SIGKILL at this instant.
    terminating: Option<Instant>,
    /// The status last written, to write only changes.
    last_status: Option<serde_json::Value>,
    /// The failure last reported as an Event (one per distinct failure,
    /// not one per retry).
    last_event: Option<(String, String)>,
    /// Why the pod cannot run (the status says so); nothing is started.
    failure: Option<(String, String)>,
    ready_ports: Vec<Vec<u16>>,
    /// When this kubelet took the pod (or last tried it again).
    started: Instant,
    /// The pod's volumes, to write again as their sources change.
    volumes: Vec<k8s_openapi::api::core::v1::Volume>,
    /// `<state_dir>/pods/<uid>`: volumes and container scratch space.
    dir: PathBuf,
    /// Projected service-account tokens: (volume, path) → token and when
    /// to request a new one.
    tokens: BTreeMap<(String, String), (String, Instant)>,
    last_volume_sync: Instant,
    /// The chained CNI plugins that ran ADD (DEL undoes them).
    cni: Option<crate::cni::Attachment>,
}

struct RunningContainer {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    started_at: String,
    restarts: u32,
    /// The last exit: code and when.
    last_exit: Option<(i32, String)>,
    /// Not before this instant (back-off after an exit).
    next_start: Option<Instant>,
    /// Volumes at their `mountPath`s.
    mounts: Vec<Mount>,
    /// Exited for good (restart policy says no more).
    done: bool,
    /// Its readiness probe, when it has one that is sent.
    readiness: Option<crate::probe::Prober>,
}

fn now() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    k8s_openapi::chrono::DateTime::from_timestamp(seconds, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true)
}

impl Kubelet {
    fn sync(
        &mut self,
        pods: &Store<Pod>,
        services: &Store<Service>,
        slices: &Store<EndpointSlice>,
    ) {
        let nodes = &self.nodes;
        let mut wanted: BTreeMap<String, std::sync::Arc<Pod>> = BTreeMap::new();
        for pod in pods.state() {
            let on_ours = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some_and(|n| nodes.contains(n));
            if let (true, Some(uid)) = (on_ours, pod.metadata.uid.clone()) {
                wanted.insert(uid, pod);
            }
        }
        // Start new pods; a pod deleted before it ever ran here has nothing
        // to stop: the kubelet's last word is said at once.
        for (uid, pod) in &wanted {
            if self.running.contains_key(uid) {
                continue;
            }
            if pod.metadata.deletion_timestamp.is_some() {
                self.delete_now(
                    pod.metadata.namespace.as_deref().unwrap_or_default(),
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    uid,
                );
                continue;
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue; // finished before this kubelet started
            }
            match self.start_pod(pod) {
                Ok(running) => {
                    eprintln!("kubelet: started pod {}", running.pod.key());
                    self.running.insert(uid.clone(), running);
                }
                Err(e) => eprintln!("kubelet: pod {uid}: {e}"),
            }
        }
        // Deletions: the pod is gone, or marked for deletion.
        let uids: Vec<String> = self.running.keys().cloned().collect();
        for uid in uids {
            let pod = wanted.get(&uid);
            let deleting = pod.is_none_or(|p| p.metadata.deletion_timestamp.is_some());
            if deleting {
                let grace = pod
                    .and_then(|p| p.metadata.deletion_grace_period_seconds)
                    .or_else(|| {
                        pod.and_then(|p| p.spec.as_ref())
                            .and_then(|s| s.termination_grace_period_seconds)
                    })
                    .unwrap_or(30)
                    .clamp(0, 3600) as u64;
                if self.terminate(&uid, Duration::from_secs(grace)) {
                    let running = self.running.remove(&uid).expect("running");
                    self.cleanup(&running);
                    eprintln!("kubelet: stopped pod {}", running.pod.key());
                    if pod.is_some() {
                        self.finalize_delete(&running);
                    }
                }
            }
        }
        // A pod whose ConfigMap or Secret was missing, or whose sandbox
        // could not be made, is tried again.
        let retry: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| {
                r.terminating.is_none()
                    && r.failure.as_ref().is_some_and(|(reason, _)| {
                        // A kubelet tries a sandbox again whatever failed.
                        matches!(
                            reason.as_str(),
                            "CreateContainerConfigError"
                                | "FailedCreatePodSandBox"
                                | "CreatePodSandboxError"
                        )
                    })
                    && r.started.elapsed() > CONFIG_RETRY
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in retry {
            let running = self.running.remove(&uid).expect("running");
            self.cleanup(&running);
            if let Some(pod) = wanted.get(&uid) {
                match self.start_pod(pod) {
                    Ok(mut again) => {
                        again.last_status = running.last_status;
                        again.last_event = running.last_event;
                        self.running.insert(uid, again);
                    }
                    Err(e) => eprintln!("kubelet: pod {uid}: {e}"),
                }
            }
        }
        // Volumes follow their ConfigMaps, Secrets and token lifetimes.
        let due: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| {
                r.terminating.is_none()
                    && r.failure.is_none()
                    && r.last_volume_sync.elapsed() >= VOLUME_SYNC
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in due {
            let mut running = self.running.remove(&uid).expect("running");
            if let Err(e) = self.write_volumes(&mut running) {
                eprintln!("kubelet: volumes of {}: {e}", running.pod.key());
            }
            running.last_volume_sync = Instant::now();
            self.running.insert(uid, running);
        }
        // Containers of running pods: restarts, readiness, status.
        let uids: Vec<String> = self.running.keys().cloned().collect();
        for uid in uids {
            let running = self.running.get_mut(&uid).expect("running");
            if running.terminating.is_some() {
                continue;
            }
            if let Some((reason, message)) = running.failure.clone()
                && running.last_event.as_ref() != Some(&(reason.clone(), message.clone()))
            {
                running.last_event = Some((reason.clone(), message.clone()));
                let pod = running.pod.clone();
                self.warning_event(&pod, &reason, &message);
            }
            let running = self.running.get_mut(&uid).expect("running");
            tend_containers(running, &self.state.manifest_dir);
            // Probes leave from the node, as a kubelet's do.
            if let Some(node) = self.state.node(&running.pod.node) {
                let ip = std::net::IpAddr::V4(running.pod.ip);
                for c in &mut running.containers {
                    if let (Some(prober), Some(_)) = (&mut c.readiness, &c.child) {
                        prober.tick(&node.netns_path, ip);
                    }
                }
            }
            let status = pod_status(running, &self.state);
            if running.last_status.as_ref() != Some(&status) {
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &running.pod.namespace);
                let body = serde_json::json!({ "status": status });
                let name = running.pod.name.clone();
                let result = self.runtime.block_on(async move {
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
                        .await
                });
                match result {
                    Ok(_) => running.last_status = Some(status),
                    Err(e) => eprintln!("kubelet: status of {}: {e}", running.pod.key()),
                }
            }
        }
        self.sync_network(services, slices);
        if self.last_heartbeat.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
            self.heartbeat();
            self.last_heartbeat = Some(Instant::now());
        }
        self.save_state();
    }

    /// Posts a Warning Event about `pod`, as a kubelet does when it cannot
    /// run it (`kubectl describe pod` and `kubectl get events` show it).
    fn warning_event(&self, pod: &PodState, reason: &str, message: &str) {
        use k8s_openapi::api::core::v1::Event;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let event: Event = match serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{}.{nanos:x}", pod.name), "namespace": pod.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace,
                               "name": pod.name, "uid": pod.uid},
            "reason": reason,
            "message": message,
            "type": "Warning",
            "count": 1,
            "firstTimestamp": now(),
            "lastTimestamp": now(),
            "source": {"component": "kubelet", "host": pod.node},
            "reportingComponent": "kubelet",
            "reportingInstance": pod.node,
        })) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("kubelet: an event for {}: {e}", pod.key());
                return;
            }
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        let result = self
            .runtime
            .block_on(async move { api.create(&Default::default(), &event).await });
        if let Err(e) = result {
            eprintln!("kubelet: an event for {}: {e}", pod.key());
        }
    }

    /// The nodes this kubelet runs, as the state file describes them.
    fn own_nodes(&self) -> impl Iterator<Item = &crate::state::NodeState> {
        self.state
            .nodes
            .iter()
            .filter(|n| self.nodes.contains(&n.name))
    }

    /// Renews every node's Lease in `kube-node-lease`, as a kubelet does:
    /// the node lifecycle controller takes a node whose Lease is not renewed
    /// within its grace period for dead (taints it, evicts its pods).
    fn heartbeat(&self) {
        use k8s_openapi::api::coordination::v1::Lease;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let renew = k8s_openapi::chrono::DateTime::from_timestamp_micros(micros)
            .unwrap_or_default()
            .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Micros, true);
        for node in self.own_nodes() {
            let lease = serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": node.name, "namespace": "kube-node-lease"},
                "spec": {
                    "holderIdentity": node.name,
                    "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": renew,
                },
            });
            let params = PatchParams::apply("weft-sim-kubelet").force();
            let name = node.name.clone();
            let api = api.clone();
            if let Err(e) = self
                .runtime
                .block_on(async move { api.patch(&name, &params, &Patch::Apply(&lease)).await })
            {
                eprintln!("kubelet: renewing the Lease of node {}: {e}", node.name);
            }
        }
    }

    fn start_pod(&mut self, pod: &Pod) -> anyhow::Result<RunningPod> {
        let spec = pod.spec.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let node_name = spec.node_name.clone().unwrap_or_default();
        let node = self
            .state
            .node(&node_name)
            .ok_or_else(|| anyhow::anyhow!("node {node_name} is not simulated"))?
            .clone();
        let host_network = spec.host_network.unwrap_or(false);
        let used: BTreeSet<u8> = self
            .running
            .values()
            .filter(|r| r.pod.node == node.name && !r.host_network)
            .map(|r| r.slot)
            .collect();
        let slot = (0..MAX_PODS_PER_NODE as u8)
            .find(|k| !used.contains(k))
            .ok_or_else(|| anyhow::anyhow!("node {} has {MAX_PODS_PER_NODE} pods", node.name))?;
        let host = slot + 2;
        let sim = &self.state.name;
        let (ip, ipv6, netns) = if host_network {
            (node.ip, node.ipv6, node.netns.clone())
        } else {
            (
                Ipv4Addr::new(10, 244, node.index, host),
                Ipv6Addr::new(0xfd00, 0x10, 0x244, node.index.into(), 0, 0, 0, host.into()),
                plan::netns_pod(sim, &namespace, &name),
            )
        };
        let cgroup = plan::pod_cgroup(
            node.cgroup.parent().expect("a node cgroup has a parent"),
            &uid,
        );
        let service_account = spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into());
        let logs = self.state.state_dir.join("logs");
        let mut pod_state = PodState {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: uid.clone(),
            node: node.name.clone(),
            service_account: service_account.clone(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            annotations: pod.metadata.annotations.clone().unwrap_or_default(),
            ip,
            ipv6,
            netns_path: PathBuf::from("/run/netns").join(&netns),
            netns,
            cgroup,
            containers: Vec::new(),
        };
        let fields = FieldRefs {
            name: &name,
            namespace: &namespace,
            uid: &uid,
            node: &node.name,
            service_account: &service_account,
            pod_ip: ip,
            host_ip: node.ip,
        };
        let mut failure = None;
        let mut containers = Vec::new();
        let mut ready_ports = Vec::new();
        for c in &spec.containers {
            let log = logs.join(format!("{namespace}.{name}.{}.log", c.name));
            pod_state.containers.push(ContainerState {
                name: c.name.clone(),
                pid: None,
                log: log.clone(),
            });
            let mut argv = c.command.clone().unwrap_or_default();
            argv.extend(c.args.clone().unwrap_or_default());
            // As the kubelet: the API server's address for in-cluster
            // clients (with the projected token and CA of the
            // `kube-api-access` volume).
            let mut env = vec![
                (
                    "KUBERNETES_SERVICE_HOST".to_string(),
                    "10.96.0.1".to_string(),
                ),
                ("KUBERNETES_SERVICE_PORT".to_string(), "443".to_string()),
                (
                    "KUBERNETES_SERVICE_PORT_HTTPS".to_string(),
                    "443".to_string(),
                ),
            ];
            for var in c.env.iter().flatten() {
                let from = var.value_from.as_ref();
                if let Some(r) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
                    match self.key_of::<k8s_openapi::api::core::v1::ConfigMap>(
                        &namespace, &r.name, &r.key, r.optional,
                    ) {
                        Ok(Some(v)) => env.push((var.name.clone(), v)),
                        Ok(None) => {}
                        Err(e) => {
                            failure = Some((
                                "CreateContainerConfigError".to_string(),
                                format!("env {}: {e}", var.name),
                            ))
                        }
                    }
                    continue;
                }
                if let Some(r) = from.and_then(|f| f.secret_key_ref.as_ref()) {
                    match self.key_of::<k8s_openapi::api::core::v1::Secret>(
                        &namespace, &r.name, &r.key, r.optional,
                    ) {
                        Ok(Some(v)) => env.push((var.name.clone(), v)),
                        Ok(None) => {}
                        Err(e) => {
                            failure = Some((
                                "CreateContainerConfigError".to_string(),
                                format!("env {}: {e}", var.name),
                            ))
                        }
                    }
                    continue;
                }
                match fields.value(var) {
                    Ok(v) => env.push((var.name.clone(), v)),
                    Err(e) => failure = Some(("CreateContainerConfigError".to_string(), e)),
                }
            }
            let mut argv: Vec<String> = argv.iter().map(|a| expand(a, &env)).collect();
            let images = self.state.kube.as_ref().map(|k| &k.images);
            let from_image = c
                .image
                .as_deref()
                .and_then(|i| images.and_then(|t| crate::kube::image_program(t, i)));
            let has_command = c.command.as_ref().is_some_and(|c| !c.is_empty());
            let program = match (argv.first().filter(|_| has_command), from_image) {
                // No command: the image's program, with the container's args.
                (None, Some(program)) => {
                    argv = std::iter::once(program.to_string_lossy().into_owned())
                        .chain(argv)
                        .collect();
                    program.to_path_buf()
                }
                (None, None) => {
                    failure = Some((
                        "ErrImagePull".to_string(),
                        format!(
                            "container {}: image {:?} is not in the simulator's image table (`up --kube --images FILE`), and the container has no `command`",
                            c.name,
                            c.image.as_deref().unwrap_or_default()
                        ),
                    ));
                    PathBuf::new()
                }
                (Some(p), _) => match plan::resolve_program(p, &self.state.manifest_dir) {
                    Some(path) => path,
                    None => {
                        failure = Some((
                            "RunContainerError".to_string(),
                            format!(
                                "container {}: command {p:?} not found on this machine (PATH, or relative to {})",
                                c.name,
                                self.state.manifest_dir.display()
                            ),
                        ));
                        PathBuf::new()
                    }
                },
            };
            let mut ports: Vec<u16> = c
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| u16::try_from(p.container_port).ok())
                .collect();
            // A readiness probe decides, as on a kubelet; without one, the
            // declared ports listening stand for "started".
            let readiness = match crate::probe::ProbeSpec::readiness(c) {
                Some(Ok(spec)) => {
                    ports.clear();
                    Some(crate::probe::Prober::new(spec))
                }
                Some(Err(why)) => {
                    eprintln!("kubelet: pod {namespace}/{name}: {why}");
                    ports.clear();
                    None
                }
                None => None,
            };
            ready_ports.push(ports);
            containers.push(RunningContainer {
                name: c.name.clone(),
                program,
                args: argv.into_iter().skip(1).collect(),
                env,
                log,
                child: None,
                started_at: String::new(),
                restarts: 0,
                last_exit: None,
                next_start: None,
                done: false,
                mounts: Vec::new(),
                readiness,
            });
        }
        let mut running = RunningPod {
            pod: pod_state,
            slot,
            host_network,
            restart_policy: spec
                .restart_policy
                .clone()
                .unwrap_or_else(|| "Always".into()),
            containers,
            start_time: now(),
            terminating: None,
            last_status: None,
            last_event: None,
            failure,
            ready_ports,
            started: Instant::now(),
            volumes: spec.volumes.clone().unwrap_or_default(),
            dir: self.state.state_dir.join("pods").join(&uid),
            tokens: BTreeMap::new(),
            last_volume_sync: Instant::now(),
            cni: None,
        };
        if running.failure.is_none()
            && let Err(e) = self.prepare_volumes(&mut running, &spec)
        {
            running.failure = Some(("CreateContainerConfigError".into(), e));
        }
        if running.failure.is_none()
            && let Err(e) = self.create_sandbox(&running, &node)
        {
            running.failure = Some(("CreatePodSandboxError".into(), e.to_string()));
            self.cleanup(&running);
        }
        // The node's chained CNI plugins, before any container starts.
        if running.failure.is_none() && !running.host_network {
            let (attachment, result) = crate::cni::add(&self.state.state_dir, &node, &running.pod);
            running.cni = attachment;
            if let Err(e) = result {
                eprintln!("kubelet: pod {}: {e}", running.pod.key());
                running.failure = Some(("FailedCreatePodSandBox".into(), e));
            }
        }
        Ok(running)
    }

    /// The pod's network namespace, veth, addresses, routes, `/etc` files
    /// and cgroup.
    fn create_sandbox(
        &mut self,
        running: &RunningPod,
        node: &crate::state::NodeState,
    ) -> Result<(), sys::SysError> {
        let p = &running.pod;
        std::fs::create_dir_all(&p.cgroup)
            .map_err(sys::io(format!("creating cgroup {}", p.cgroup.display())))?;
        if running.host_network {
            return Ok(());
        }
        sys::run("ip", &["netns", "add", &p.netns], None)?;
        let k = running.slot;
        let script = format!(
            "link add p{k} type veth peer name eth0 netns {ns}\nlink set p{k} up\naddr add fe80::1/64 dev p{k} nodad\nroute add {ip}/32 dev p{k} src {node_ip}\nroute add {ip6}/128 dev p{k}\n",
            ns = p.netns,
            ip = p.ip,
            ip6 = p.ipv6,
            node_ip = node.ip,
        );
        sys::ip_batch(Some(&node.netns), &script)?;
        sys::ip_batch(Some(&p.netns), &netconf::pod_script(node, p))?;
        let etc = Path::new("/etc/netns").join(&p.netns);
        std::fs::create_dir_all(&etc).map_err(sys::io(format!("creating {}", etc.display())))?;
        let hosts = plan::hosts_file(p, &self.services_snapshot());
        std::fs::write(etc.join("hosts"), &hosts).map_err(sys::io("writing a pod's /etc/hosts"))?;
        self.hosts.insert(p.netns.clone(), hosts);
        std::fs::write(etc.join("resolv.conf"), plan::resolv_conf(p))
            .map_err(sys::io("writing a pod's /etc/resolv.conf"))?;
        Ok(())
    }

    /// One key of a ConfigMap or Secret (`Ok(None)`: absent and optional).
    fn key_of<K: KeyValues>(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        optional: Option<bool>,
    ) -> Result<Option<String>, String> {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let object = self
            .runtime
            .block_on(async { api.get_opt(name).await })
            .map_err(|e| format!("reading {} {namespace}/{name}: {e}", K::KIND))?;
        let optional = optional.unwrap_or(false);
        let value = object.as_ref().and_then(|o| o.value(key));
        match (object, value) {
            (_, Some(v)) => Ok(Some(v)),
            (None, None) if optional => Ok(None),
            (Some(_), None) if optional => Ok(None),
            (None, None) => Err(format!("{} {namespace}/{name} not found", K::KIND)),
            (Some(_), None) => Err(format!("{} {namespace}/{name} has no key {key:?}", K::KIND)),
        }
    }

    /// Creates every volume's directory, writes their contents, and gives
    /// each container its mounts.
    fn prepare_volumes(
        &mut self,
        running: &mut RunningPod,
        spec: &k8s_openapi::api::core::v1::PodSpec,
    ) -> Result<(), String> {
        let mut sources: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
        for v in &running.volumes {
            let source = if let Some(host) = &v.host_path {
                volumes::check_absolute(&host.path)
                    .map_err(|e| format!("volume {}: hostPath {e}", v.name))?;
                let root = self
                    .state
                    .state_dir
                    .join("nodes")
                    .join(&running.pod.node)
                    .join("root");
                let path = root.join(host.path.trim_start_matches('/'));
                let kind = host.type_.as_deref().unwrap_or("");
                let exists = std::fs::symlink_metadata(&path).is_ok();
                match kind {
                    "File" | "Directory" | "Socket" | "CharDevice" | "BlockDevice" if !exists => {
                        return Err(format!(
                            "volume {}: hostPath {} (type {kind}) does not exist on node {} (its root is {})",
                            v.name,
                            host.path,
                            running.pod.node,
                            root.display()
                        ));
                    }
                    "FileOrCreate" if !exists => {
                        if let Some(parent) = path.parent() {
                            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                        }
                        std::fs::write(&path, b"").map_err(|e| e.to_string())?;
                    }
                    _ if !exists => std::fs::create_dir_all(&path).map_err(|e| e.to_string())?,
                    _ => {}
                }
                (path, false)
            } else if v.empty_dir.is_some() {
                let path = running.dir.join("volumes").join(&v.name);
                std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
                (path, false)
            } else if v.config_map.is_some()
                || v.secret.is_some()
                || v.projected.is_some()
                || v.downward_api.is_some()
            {
                (running.dir.join("volumes").join(&v.name), true)
            } else {
                return Err(format!(
                    "volume {}: only emptyDir, hostPath, configMap, secret, downwardAPI and projected volumes are simulated",
                    v.name
                ));
            };
            sources.insert(v.name.clone(), source);
        }
        self.write_volumes(running)?;
        for (c, spec_c) in running.containers.iter_mut().zip(&spec.containers) {
            for vm in spec_c.volume_mounts.iter().flatten() {
                let (source, read_only) = sources.get(&vm.name).ok_or_else(|| {
                    format!(
                        "container {}: volumeMount of unknown volume {:?}",
                        c.name, vm.name
                    )
                })?;
                if vm.sub_path.as_deref().is_some_and(|p| !p.is_empty())
                    || vm.sub_path_expr.is_some()
                {
                    return Err(format!(
                        "container {}: volumeMount {}: subPath is not simulated",
                        c.name, vm.name
                    ));
                }
                volumes::check_absolute(&vm.mount_path)
                    .map_err(|e| format!("container {}: mountPath {e}", c.name))?;
                c.mounts.push(Mount {
                    source: source.clone(),
                    target: vm.mount_path.clone(),
                    read_only: *read_only || vm.read_only.unwrap_or(false),
                });
            }
        }
        Ok(())
    }

    /// Writes the ConfigMap, Secret, downward API and projected volumes
    /// (atomically; only what changed).
    fn write_volumes(&mut self, running: &mut RunningPod) -> Result<(), String> {
        use k8s_openapi::api::core::v1::{ConfigMap, Secret};
        let namespace = running.pod.namespace.clone();
        for v in running.volumes.clone() {
            let dir = running.dir.join("volumes").join(&v.name);
            let named = |e: String| format!("volume {}: {e}", v.name);
            let mut payload = Payload::new();
            if let Some(cm) = &v.config_map {
                let mode = cm.default_mode.unwrap_or(0o644) as u32;
                self.object_files::<ConfigMap>(
                    &namespace,
                    &cm.name,
                    &cm.items,
                    cm.optional,
                    mode,
                    &mut payload,
                )
                .map_err(named)?;
            } else if let Some(secret) = &v.secret {
                let mode = secret.default_mode.unwrap_or(0o644) as u32;
                let name = secret.secret_name.clone().unwrap_or_default();
                self.object_files::<Secret>(
                    &namespace,
                    &name,
                    &secret.items,
                    secret.optional,
                    mode,
                    &mut payload,
                )
                .map_err(named)?;
            } else if let Some(downward) = &v.downward_api {
                let mode = downward.default_mode.unwrap_or(0o644) as u32;
                for item in downward.items.iter().flatten() {
                    downward_file(&running.pod, item, mode, &mut payload).map_err(named)?;
                }
            } else if let Some(projected) = &v.projected {
                let mode = projected.default_mode.unwrap_or(0o644) as u32;
                for source in projected.sources.iter().flatten() {
                    if let Some(cm) = &source.config_map {
                        self.object_files::<ConfigMap>(
                            &namespace,
                            &cm.name,
                            &cm.items,
                            cm.optional,
                            mode,
                            &mut payload,
                        )
                        .map_err(named)?;
                    }
                    if let Some(secret) = &source.secret {
                        self.object_files::<Secret>(
                            &namespace,
                            &secret.name,
                            &secret.items,
                            secret.optional,
                            mode,
                            &mut payload,
                        )
                        .map_err(named)?;
                    }
                    if let Some(downward) = &source.downward_api {
                        for item in downward.items.iter().flatten() {
                            downward_file(&running.pod, item, mode, &mut payload).map_err(named)?;
                        }
                    }
                    if let Some(sat) = &source.service_account_token {
                        volumes::check_relative(&sat.path).map_err(named)?;
                        let key = (v.name.clone(), sat.path.clone());
                        let fresh = running
                            .tokens
                            .get(&key)
                            .filter(|(_, renew)| Instant::now() < *renew)
                            .map(|(t, _)| t.clone());
                        let token = match fresh {
                            Some(t) => t,
                            None => {
                                let seconds = sat.expiration_seconds.unwrap_or(3600).max(600);
                                let token = self
                                    .request_token(&running.pod, sat.audience.as_deref(), seconds)
                                    .map_err(named)?;
                                // As the kubelet: renew at 80 % of the lifetime.
                                let renew =
                                    Instant::now() + Duration::from_secs(seconds as u64 * 4 / 5);
                                running.tokens.insert(key, (token.clone(), renew));
                                token
                            }
                        };
                        payload.insert(sat.path.clone(), (token.into_bytes(), mode));
                    }
                }
            } else {
                continue;
            }
            volumes::write_atomic(&dir, &payload).map_err(|e| named(e.to_string()))?;
        }
        Ok(())
    }

    /// The files of a ConfigMap or Secret volume (all keys, or `items`).
    fn object_files<K: KeyValues>(
        &self,
        namespace: &str,
        name: &str,
        items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
        optional: Option<bool>,
        mode: u32,
        payload: &mut Payload,
    ) -> Result<(), String> {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let object = self
            .runtime
            .block_on(async { api.get_opt(name).await })
            .map_err(|e| format!("reading {} {namespace}/{name}: {e}", K::KIND))?;
        let Some(object) = object else {
            if optional.unwrap_or(false) {
                return Ok(());
            }
            return Err(format!("{} {namespace}/{name} not found", K::KIND));
        };
        let all = object.all();
        match items {
            None => {
                for (key, bytes) in all {
                    volumes::check_relative(&key)?;
                    payload.insert(key, (bytes, mode));
                }
            }
            Some(items) => {
                for item in items {
                    volumes::check_relative(&item.path)?;
                    match all.get(&item.key) {
                        Some(bytes) => {
                            let m = item.mode.map_or(mode, |m| m as u32);
                            payload.insert(item.path.clone(), (bytes.clone(), m));
                        }
                        None if optional.unwrap_or(false) => {}
                        None => {
                            return Err(format!(
                                "{} {namespace}/{name} has no key {:?}",
                                K::KIND,
                                item.key
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A TokenRequest for the pod's ServiceAccount, bound to the pod.
    fn request_token(
        &self,
        pod: &PodState,
        audience: Option<&str>,
        seconds: i64,
    ) -> Result<String, String> {
        let mut spec = serde_json::json!({
            "expirationSeconds": seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": pod.uid},
        });
        if let Some(audience) = audience.filter(|a| !a.is_empty()) {
            spec["audiences"] = serde_json::json!([audience]);
        }
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": spec,
        });
        let url = format!(
            "/api/v1/namespaces/{}/serviceaccounts/{}/token",
            pod.namespace, pod.service_account
        );
        let request = http::Request::post(url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).expect("serializable"))
            .map_err(|e| e.to_string())?;
        let client = self.client.clone();
        let answer: serde_json::Value = self
            .runtime
            .block_on(async move { client.request(request).await })
            .map_err(|e| {
                format!(
                    "TokenRequest for {}/{}: {e}",
                    pod.namespace, pod.service_account
                )
            })?;
        answer["status"]["token"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| "TokenRequest answered without a token".to_string())
    }

    fn services_snapshot(&self) -> Vec<ServiceState> {
        self.state.services.clone()
    }

    /// SIGTERM once, SIGKILL after `grace`; true once nothing runs.
    fn terminate(&mut self, uid: &str, grace: Duration) -> bool {
        let running = self.running.get_mut(uid).expect("running");
        let procs = cgroup_procs(&running.pod.cgroup);
        match running.terminating {
            None => {
                for pid in &procs {
                    // SAFETY: kill(2) on processes of this pod's cgroup.
                    unsafe { libc::kill(*pid, libc::SIGTERM) };
                }
                running.terminating = Some(Instant::now() + grace);
            }
            Some(deadline) if Instant::now() >= deadline => {
                let _ = std::fs::write(running.pod.cgroup.join("cgroup.kill"), "1");
            }
            Some(_) => {}
        }
        for c in &mut running.containers {
            if let Some(child) = &mut c.child
                && let Ok(Some(_)) = child.try_wait()
            {
                c.child = None;
            }
        }
        procs.is_empty() && running.containers.iter().all(|c| c.child.is_none())
    }

    fn cleanup(&mut self, running: &RunningPod) {
        let p = &running.pod;
        if let Err(e) = sys::remove_cgroup(&p.cgroup, Duration::from_secs(5)) {
            eprintln!("kubelet: {e}");
        }
        let _ = std::fs::remove_dir_all(&running.dir);
        if let Some(attachment) = &running.cni {
            for e in crate::cni::del(attachment, p) {
                eprintln!("kubelet: pod {}: {e}", p.key());
            }
        }
        if !running.host_network {
            // The node's end of the pod's veth, at once: deleting the pod's
            // namespace removes it only when the kernel has destroyed that
            // namespace, which can take seconds on a busy machine, and a
            // new sandbox in the same slot would find the name taken.
            if let Some(node) = self.state.node(&p.node) {
                let veth = format!("p{}", running.slot);
                let _ = sys::run("ip", &["-n", &node.netns, "link", "del", &veth], None);
            }
            if sys::netns_list().contains(&p.netns)
                && let Err(e) = sys::run("ip", &["netns", "del", &p.netns], None)
            {
                eprintln!("kubelet: {e}");
            }
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&p.netns));
            self.hosts.remove(&p.netns);
        }
    }

    /// The kubelet's last word on a deleted pod: delete it with grace 0
    /// (only this uid), which removes it from the API server.
    fn finalize_delete(&self, running: &RunningPod) {
        self.delete_now(&running.pod.namespace, &running.pod.name, &running.pod.uid);
    }

    fn delete_now(&self, namespace: &str, name: &str, uid: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let owned = name.to_string();
        if let Err(e) = self
            .runtime
            .block_on(async move { api.delete(&owned, &params).await })
            && !matches!(&e, kube::Error::Api(s) if s.code == 404 || s.code == 409)
        {
            eprintln!("kubelet: deleting {namespace}/{name}: {e}");
        }
    }

    /// kube-proxy's rules on every node and names in every pod's
    /// `/etc/hosts`, from the Services and EndpointSlices of the API server.
    fn sync_network(&mut self, services: &Store<Service>, slices: &Store<EndpointSlice>) {
        self.state.services = service_states(services, slices);
        self.state.pods = self.running.values().map(|r| r.pod.clone()).collect();
        let ours: Vec<_> = self.own_nodes().cloned().collect();
        for node in ours {
            let rules = netconf::kube_proxy_rules(&self.state, &node);
            if self.proxy_rules.get(&node.name) == Some(&rules) {
                continue;
            }
            // One transaction: the old table goes and the new one comes
            // at once, so no packet sees a half-written ruleset.
            let script = format!(
                "table ip weft_kube_proxy\ndelete table ip weft_kube_proxy\ntable ip6 weft_fabric_guard\ndelete table ip6 weft_fabric_guard\n{rules}"
            );
            match sys::nft_in(&node.netns, &script) {
                Ok(()) => {
                    self.proxy_rules.insert(node.name.clone(), rules);
                }
                Err(e) => eprintln!("kubelet: kube-proxy rules of {}: {e}", node.name),
            }
        }
        for running in self.running.values() {
            let p = &running.pod;
            if running.host_network || running.failure.is_some() {
                continue;
            }
            let hosts = plan::hosts_file(p, &self.state.services);
            if self.hosts.get(&p.netns) == Some(&hosts) {
                continue;
            }
            // Written in place, not renamed: `ip netns exec` bind-mounts
            // this file over /etc/hosts, and a bind mount follows the inode.
            let path = Path::new("/etc/netns").join(&p.netns).join("hosts");
            match std::fs::write(&path, &hosts) {
                Ok(()) => {
                    self.hosts.insert(p.netns.clone(), hosts);
                }
                Err(e) => eprintln!("kubelet: writing {}: {e}", path.display()),
            }
        }
    }

    /// Writes this kubelet's pods into the state file, keeping the other
    /// nodes' (their kubelets write theirs): read, merge and write under a
    /// lock, so no kubelet's update is lost.
    fn save_state(&mut self) {
        let lock = match std::fs::File::create(self.state.state_dir.join(".kubelet.lock")) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("kubelet: the state file's lock: {e}");
                return;
            }
        };
        if let Err(e) = lock.lock() {
            eprintln!("kubelet: locking the state file: {e}");
            return;
        }
        let on_disk = State::load(&self.state.state_dir).ok();
        let mut pods: Vec<PodState> = on_disk
            .iter()
            .flat_map(|s| s.pods.iter())
            .filter(|p| !self.nodes.contains(&p.node))
            .cloned()
            .collect();
        pods.extend(self.running.values().map(|r| r.pod.clone()));
        pods.sort_by_key(|p| p.key());
        self.state.pods = pods;
        if on_disk.as_ref() != Some(&self.state)
            && let Err(e) = self.state.save()
        {
            eprintln!("kubelet: writing the state file: {e}");
        }
    }
}

/// Kubernetes' expansion of `$(VAR)` in `command` and `args`: a defined
/// variable of the container's `env` is replaced, `$$` is a literal `$`,
/// anything else is left as written.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, value)) = env.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// ConfigMaps and Secrets, for `configMapKeyRef` and `secretKeyRef`.
trait KeyValues:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
{
    const KIND: &'static str;
    fn value(&self, key: &str) -> Option<String>;
    /// Every key with its bytes.
    fn all(&self) -> BTreeMap<String, Vec<u8>>;
}

impl KeyValues for k8s_openapi::api::core::v1::ConfigMap {
    const KIND: &'static str = "ConfigMap";
    fn value(&self, key: &str) -> Option<String> {
        self.data.as_ref()?.get(key).cloned()
    }
    fn all(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out: BTreeMap<String, Vec<u8>> = self
            .binary_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        for (k, v) in self.data.iter().flatten() {
            out.insert(k.clone(), v.clone().into_bytes());
        }
        out
    }
}

impl KeyValues for k8s_openapi::api::core::v1::Secret {
    const KIND: &'static str = "Secret";
    fn value(&self, key: &str) -> Option<String> {
        let bytes = &self.data.as_ref()?.get(key)?.0;
        String::from_utf8(bytes.clone()).ok()
    }
    fn all(&self) -> BTreeMap<String, Vec<u8>> {
        self.data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect()
    }
}

/// One file of a downward API volume.
fn downward_file(
    pod: &PodState,
    item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
    mode: u32,
    payload: &mut Payload,
) -> Result<(), String> {
    volumes::check_relative(&item.path)?;
    let Some(field) = &item.field_ref else {
        return Err(format!(
            "downwardAPI {}: only fieldRef is simulated",
            item.path
        ));
    };
    let map = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect::<String>()
    };
    let value = match field.field_path.as_str() {
        "metadata.name" => pod.name.clone(),
        "metadata.namespace" => pod.namespace.clone(),
        "metadata.uid" => pod.uid.clone(),
        "metadata.labels" => map(&pod.labels),
        "metadata.annotations" => map(&pod.annotations),
        "spec.nodeName" => pod.node.clone(),
        "spec.serviceAccountName" => pod.service_account.clone(),
        "status.podIP" => pod.ip.to_string(),
        other => {
            return Err(format!(
                "downwardAPI {}: fieldRef {other:?} is not simulated",
                item.path
            ));
        }
    };
    let m = item.mode.map_or(mode, |m| m as u32);
    payload.insert(item.path.clone(), (value.into_bytes(), m));
    Ok(())
}

fn cgroup_procs(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Starts containers that should run, notices exits, applies the restart
/// policy with back-off.
fn tend_containers(running: &mut RunningPod, workdir: &Path) {
    if running.failure.is_some() {
        return;
    }
    for c in &mut running.containers {
        if let Some(child) = &mut c.child {
            match child.try_wait() {
                Ok(None) => continue,
                Ok(Some(status)) => {
                    let code = status.code().unwrap_or(128 + status_signal(&status));
                    c.last_exit = Some((code, now()));
                    c.child = None;
                    let again = match running.restart_policy.as_str() {
                        "Never" => false,
                        "OnFailure" => code != 0,
                        _ => true,
                    };
                    if again {
                        let backoff =
                            Duration::from_secs(1 << c.restarts.min(4)).min(MAX_RESTART_BACKOFF);
                        c.next_start = Some(Instant::now() + backoff);
                        c.restarts += 1;
                    } else {
                        c.done = true;
                    }
                }
                Err(e) => {
                    eprintln!("kubelet: waiting for {}: {e}", c.name);
                    continue;
                }
            }
        }
        if c.done || c.next_start.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        match start_container(&running.pod, &running.dir, workdir, c) {
            Ok(child) => {
                if let Some(state) = running.pod.containers.iter_mut().find(|s| s.name == c.name) {
                    state.pid = Some(child.id());
                }
                c.child = Some(child);
                c.started_at = now();
                c.next_start = None;
                if let Some(prober) = &mut c.readiness {
                    prober.restarted();
                }
            }
            Err(e) => {
                eprintln!("kubelet: starting {}/{}: {e}", running.pod.key(), c.name);
                c.next_start = Some(Instant::now() + MAX_RESTART_BACKOFF);
            }
        }
    }
}

fn status_signal(status: &std::process::ExitStatus) -> i32 {
    std::os::unix::process::ExitStatusExt::signal(status).unwrap_or(0)
}

fn start_container(
    pod: &PodState,
    pod_dir: &Path,
    workdir: &Path,
    c: &RunningContainer,
) -> Result<Child, sys::SysError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&c.log)
        .map_err(sys::io(format!("opening {}", c.log.display())))?;
    let log2 = log.try_clone().map_err(sys::io("duplicating a log file"))?;
    let cg = CgroupHandle::open(&pod.cgroup)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &pod.netns]);
    if !c.mounts.is_empty() {
        // The container's own mount namespace (made by `ip netns exec`)
        // gets its volumes from `weft-sim pod-exec`, which then execs it.
        let simulator = std::env::current_exe().map_err(sys::io("finding weft-sim"))?;
        let scratch = pod_dir.join("scratch").join(&c.name);
        cmd.arg(simulator)
            .args(["pod-exec", "--netns", &pod.netns, "--scratch"])
            .arg(&scratch);
        for m in &c.mounts {
            cmd.arg("--mount").arg(m.to_arg());
        }
        cmd.arg("--");
    }
    cmd.arg(&c.program)
        .args(&c.args)
        .envs(c.env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    sys::join_cgroup_before_exec(&mut cmd, &cg);
    cmd.spawn()
        .map_err(sys::io(format!("starting {}", c.program.display())))
}

/// The Pod's status as a kubelet writes it.
fn pod_status(running: &RunningPod, state: &State) -> serde_json::Value {
    let node_ip = state
        .node(&running.pod.node)
        .map(|n| n.ip.to_string())
        .unwrap_or_default();
    let mut statuses = Vec::new();
    let mut all_ready = true;
    let mut all_done = true;
    let mut any_failed = false;
    for (i, c) in running.containers.iter().enumerate() {
        let (state_json, ready) = match (&c.child, &running.failure) {
            (_, Some((reason, message))) => (
                serde_json::json!({"waiting": {"reason": reason, "message": message}}),
                false,
            ),
            (Some(child), None) => {
                let ready = match &c.readiness {
                    Some(prober) => prober.ready(),
                    None => {
                        let listening = sys::listening_ports(child.id());
                        running.ready_ports[i].iter().all(|p| listening.contains(p))
                    }
                };
                (
                    serde_json::json!({"running": {"startedAt": c.started_at}}),
                    ready,
                )
            }
            (None, None) => match &c.last_exit {
                Some((code, at)) if c.done => (
                    serde_json::json!({"terminated": {"exitCode": code, "finishedAt": at, "reason": if *code == 0 { "Completed" } else { "Error" }}}),
                    false,
                ),
                _ => (
                    serde_json::json!({"waiting": {"reason": if c.restarts > 0 { "CrashLoopBackOff" } else { "ContainerCreating" }}}),
                    false,
                ),
            },
        };
        all_ready &= ready;
        all_done &= c.done;
        any_failed |= c.done && c.last_exit.as_ref().is_some_and(|(code, _)| *code != 0);
        let mut status = serde_json::json!({
            "name": c.name,
            "state": state_json,
            "ready": ready,
            "started": c.child.is_some(),
            "restartCount": c.restarts,
            "image": "",
            "imageID": "",
        });
        if let Some((code, at)) = &c.last_exit
            && !c.done
        {
            status["lastState"] =
                serde_json::json!({"terminated": {"exitCode": code, "finishedAt": at}});
        }
        statuses.push(status);
    }
    let phase = if running.failure.is_some() {
        "Pending"
    } else if all_done && !running.containers.is_empty() {
        if any_failed { "Failed" } else { "Succeeded" }
    } else {
        "Running"
    };
    let ready = all_ready && phase == "Running";
    let condition = |kind: &str, ok: bool| serde_json::json!({"type": kind, "status": if ok { "True" } else { "False" }});
    let (pod_ip, pod_ips) = if running.failure.is_some() {
        (serde_json::Value::Null, serde_json::json!([]))
    } else if running.host_network {
        (
            serde_json::json!(running.pod.ip.to_string()),
            serde_json::json!([{"ip": running.pod.ip.to_string()}]),
        )
    } else {
        (
            serde_json::json!(running.pod.ip.to_string()),
            serde_json::json!([{"ip": running.pod.ip.to_string()}, {"ip": running.pod.ipv6.to_string()}]),
        )
    };
    serde_json::json!({
        "phase": phase,
        "hostIP": node_ip,
        "hostIPs": [{"ip": node_ip}],
        "podIP": pod_ip,
        "podIPs": pod_ips,
        "startTime": running.start_time,
        "conditions": [
            condition("PodScheduled", true),
            condition("Initialized", true),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
        "containerStatuses": statuses,
    })
}

/// The Services with a ClusterIP and their ready endpoints, as kube-proxy
/// sees them (EndpointSlices labelled with the Service's name).
fn service_states(services: &Store<Service>, slices: &Store<EndpointSlice>) -> Vec<ServiceState> {
    let slices = slices.state();
    let mut out = Vec::new();
    for svc in services.state() {
        let namespace = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let spec = svc.spec.clone().unwrap_or_default();
        let cluster_ip = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        let mine: Vec<_> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace.as_str())
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(&name)
                    && s.address_type == "IPv4"
            })
            .collect();
        let mut endpoints = Vec::new();
        for slice in &mine {
            for ep in &slice.endpoints {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                let pod = ep
                    .target_ref
                    .as_ref()
                    .map(|r| {
                        format!(
                            "{}/{}",
                            r.namespace.clone().unwrap_or_default(),
                            r.name.clone().unwrap_or_default()
                        )
                    })
                    .unwrap_or_default();
                for a in &ep.addresses {
                    if let Ok(ip) = a.parse() {
                        endpoints.push(EndpointState {
                            pod: pod.clone(),
                            ip,
                        });
                    }
                }
            }
        }
        endpoints.sort_by_key(|e| e.ip);
        endpoints.dedup_by_key(|e| e.ip);
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                let target = mine
                    .iter()
                    .flat_map(|s| s.ports.iter().flatten())
                    .find(|sp| sp.name == p.name)
                    .and_then(|sp| sp.port)
                    .and_then(|n| u16::try_from(n).ok());
                ServicePortState {
                    name: p.name.clone(),
                    port: u16::try_from(p.port).unwrap_or(0),
                    target_port: target,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                }
            })
            .collect();
        out.push(ServiceState {
            namespace,
            name,
            cluster_ip,
            ports,
            endpoints,
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_references_expand_as_kubernetes_does() {
        let env = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "x y".to_string()),
        ];
        assert_eq!(expand("$(A)-$(B)", &env), "1-x y");
        assert_eq!(expand("$$(A) $(C) $( $", &env), "$(A) $(C) $( $");
        assert_eq!(expand("$(A", &env), "$(A");
        assert_eq!(expand("ünï$(A)cödé", &env), "ünï1cödé");
    }
}
