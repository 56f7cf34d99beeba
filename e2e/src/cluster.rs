//! Bringing a simulated cluster up and tearing it down.
//!
//! `up` writes the state file before it creates anything, so that whatever a
//! crash leaves behind is named somewhere; `down` removes everything by name
//! *and* by prefix (namespaces `weft.<name>.*`, the cgroup directory), so it
//! also cleans up what a crashed `up` never recorded. `up` runs `down` for
//! its name first, which makes a re-run after a crash just work.

use crate::kube::{self, ControlPlane, KubeBinaries, KubeError};
use crate::manifest::{ManifestError, Manifests, Sourced};
use crate::netconf;
use crate::plan::{self, ContainerLaunch, CredentialFor, Layout, Plan, PlanError, credential_dir};
use crate::registration;
use crate::state::State;
use crate::sys::{self, CgroupHandle, SysError, io};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("the simulator creates network namespaces and cgroups: run it as root")]
    NotRoot,
    #[error("invalid simulator name {0:?}: use 1 to 16 characters of a-z, 0-9 and '-'")]
    BadName(String),
    #[error("{}: Pod {pod}: container {container:?}: command {program:?} not found (not on PATH, or not an executable file relative to the manifest directory)", file.display())]
    ProgramNotFound {
        file: PathBuf,
        pod: String,
        container: String,
        program: String,
    },
    #[error(
        "no simulator named {0:?} is running (no state file); start one with `weft-sim up DIR --name {0}`"
    )]
    NotRunning(String),
    #[error("no pod {pod:?} in simulator {name:?}; pods: {known}")]
    NoSuchPod {
        name: String,
        pod: String,
        known: String,
    },
    #[error("no node {node:?} in simulator {name:?}")]
    NoSuchNode { name: String, node: String },
    #[error(transparent)]
    NotReady(Box<NotReady>),
    #[error("Pod {pod}: node {node}'s agent did not take the pod ({source}); is the node proxy running and listening on {}?", socket.display())]
    Registration {
        pod: String,
        node: String,
        socket: PathBuf,
        source: weft_registration::ClientError,
    },
    #[error("starting the node agents failed: {0}")]
    NodeAgents(String),
    #[error(
        "tearing down simulator {name:?} was incomplete (run `weft-sim down --name {name}` again): {errors}"
    )]
    Teardown { name: String, errors: String },
    #[error("all {0} simulator slots are in use: run `weft-sim down` for some")]
    NoSlot(usize),
}

/// A container that did not come up, with the end of its log.
#[derive(Debug, thiserror::Error)]
#[error("Pod {pod}: container {container:?} {problem}; last lines of {}:\n{tail}", log.display())]
pub struct NotReady {
    pub pod: String,
    pub container: String,
    pub problem: String,
    pub log: PathBuf,
    pub tail: String,
}

/// Where simulators keep state, and how long `up` waits for pods.
#[derive(Clone, Debug)]
pub struct Options {
    pub layout: Layout,
    pub ready_timeout: Duration,
    /// Mesh mode: what runs on each node and takes pod registrations (the
    /// node proxies). Started once the network exists; then every pod is
    /// registered with its node's agent before its containers start.
    pub node_agents: Option<Arc<dyn NodeAgents>>,
    /// `--kube`: run a Kubernetes control plane with these programs,
    /// create a Node per simulated node and apply DIR's manifests to it
    /// (see [`crate::kube`]).
    pub kube: Option<KubeBinaries>,
    /// `--kube`: what program runs for a container that names an `image`
    /// and no `command` (see [`kube::load_images`]).
    pub images: std::collections::BTreeMap<String, PathBuf>,
}

/// Starts whatever listens on each node's `agent_socket` (in mesh mode, one
/// node proxy per node, in the node's namespace and cgroup; see
/// [`node_command`]). Called after the network and node credentials exist,
/// before any pod is registered or started. Processes it starts in a node
/// cgroup are stopped by `down`.
pub trait NodeAgents: Send + Sync + std::fmt::Debug {
    fn start(&self, state: &State) -> Result<(), String>;
}

impl Options {
    /// The machine's defaults: `/run/weft-sim` and the real cgroup2 mount.
    pub fn detect() -> Result<Self, SimError> {
        Ok(Self {
            layout: Layout {
                run_dir: PathBuf::from("/run/weft-sim"),
                cgroup_root: sys::cgroup2_mount()?.join("weft-sim"),
            },
            ready_timeout: Duration::from_secs(30),
            node_agents: None,
            kube: None,
            images: Default::default(),
        })
    }
}

/// A running simulated cluster. Dropping it does not tear it down (a
/// detached `up` must outlive the process): call [`down`].
pub struct Cluster {
    pub state: State,
    /// Container processes, when this process started them.
    pub children: Vec<(String, String, Child)>,
    /// `--kube`: the control plane's processes, when this process started them.
    pub control_plane: ControlPlane,
}

pub fn validate_name(name: &str) -> Result<(), SimError> {
    let ok = !name.is_empty()
        && name.len() <= 16
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SimError::BadName(name.to_string()))
    }
}

/// Brings up the cluster described by the manifests in `dir`.
pub fn up(dir: &Path, name: &str, opts: &Options) -> Result<Cluster, SimError> {
    validate_name(name)?;
    let dir = dir
        .canonicalize()
        .map_err(io(format!("manifest directory {}", dir.display())))?;
    let manifests = match &opts.kube {
        // The API server takes DIR's objects; the network is planned for
        // the nodes alone.
        Some(_) => kube_nodes(&dir)?,
        None => Manifests::load_dir(&dir)?,
    };
    // Everything that can be wrong with the input is found before anything
    // is created: a bad manifest leaves nothing behind. And before the root
    // check, so that anyone can check their manifests (and the tests of
    // this validation need no root).
    let draft = plan::plan(name, 0, &manifests, &opts.layout)?;
    let programs = resolve_programs(&draft)?;
    if !sys::is_root() {
        return Err(SimError::NotRoot);
    }

    down(name, opts)?;
    std::fs::create_dir_all(&opts.layout.run_dir).map_err(io("creating /run/weft-sim"))?;
    let lock = std::fs::File::create(opts.layout.run_dir.join(".lock"))
        .map_err(io("creating the simulator lock"))?;
    lock.lock().map_err(io("locking the simulator directory"))?;
    let slot = free_slot(&opts.layout)?;
    let mut plan = plan::plan(name, slot, &manifests, &opts.layout)?;
    // With `--kube` the kubelet's CNI plugin registers pods, as on a node.
    plan.state.registers_pods = opts.node_agents.is_some() && opts.kube.is_none();
    plan.state.save().map_err(io("writing the state file"))?;
    drop(lock); // the slot is claimed by the state file now

    match build(&plan, &programs, opts) {
        Ok(cluster) => Ok(cluster),
        Err(e) => {
            if let Err(cleanup) = down(name, opts) {
                eprintln!("weft-sim: cleaning up after a failed up also failed: {cleanup}");
            }
            Err(e)
        }
    }
}

fn resolve_programs(plan: &Plan) -> Result<Vec<(String, Vec<PathBuf>)>, SimError> {
    let mut out = Vec::new();
    for (pod, launches) in &plan.launches {
        let mut paths = Vec::new();
        for l in launches {
            let found =
                plan::resolve_program(&l.program, &plan.state.manifest_dir).ok_or_else(|| {
                    SimError::ProgramNotFound {
                        file: plan.sources[pod].clone(),
                        pod: pod.clone(),
                        container: l.name.clone(),
                        program: l.program.clone(),
                    }
                })?;
            paths.push(found);
        }
        out.push((pod.clone(), paths));
    }
    Ok(out)
}

/// The lowest slot no state file claims and no leftover interface occupies.
fn free_slot(layout: &Layout) -> Result<u8, SimError> {
    let mut used = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&layout.run_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(state) = State::load(&entry.path()) {
            used.insert(state.slot);
        }
    }
    (0..=250u8)
        .find(|s| !used.contains(s) && !sys::link_exists(&plan::host_interface(*s)))
        .ok_or(SimError::NoSlot(251))
}

fn build(
    plan: &Plan,
    programs: &[(String, Vec<PathBuf>)],
    opts: &Options,
) -> Result<Cluster, SimError> {
    let state = &plan.state;
    let fabric = &state.fabric.netns;
    sys::run("ip", &["netns", "add", fabric], None)?;
    for n in &state.nodes {
        sys::run("ip", &["netns", "add", &n.netns], None)?;
    }
    for p in &state.pods {
        sys::run("ip", &["netns", "add", &p.netns], None)?;
    }
    // The host's leg into the fabric, and every node's.
    sys::ip_batch(
        None,
        &format!(
            "link add {h} type veth peer name host netns {fabric}\naddr add {ip}/24 dev {h}\naddr add {ip6}/64 dev {h} nodad\nlink set {h} alias {alias}\nlink set {h} up\n",
            h = state.fabric.host_interface,
            alias = plan::host_interface_alias(&state.name),
            ip = state.fabric.host_ip,
            ip6 = state.fabric.host_ipv6,
        ),
    )?;
    sys::ip_batch(Some(fabric), &netconf::fabric_links_script(state))?;
    sys::ip_batch(Some(fabric), &netconf::fabric_script(state))?;
    for n in &state.nodes {
        sys::netns_sysctls(&n.netns, netconf::node_sysctls())?;
        sys::ip_batch(Some(&n.netns), &netconf::node_script(state, n))?;
        sys::nft_in(&n.netns, &netconf::kube_proxy_rules(state, n))?;
        std::fs::create_dir_all(&n.cgroup)
            .map_err(io(format!("creating cgroup {}", n.cgroup.display())))?;
    }
    write_credentials(state)?;
    for p in &state.pods {
        let node = state
            .node(&p.node)
            .expect("planned pods are on planned nodes");
        sys::ip_batch(Some(&p.netns), &netconf::pod_script(node, p))?;
        let etc = Path::new("/etc/netns").join(&p.netns);
        std::fs::create_dir_all(&etc).map_err(io(format!("creating {}", etc.display())))?;
        std::fs::write(etc.join("hosts"), &plan.hosts[&p.key()])
            .map_err(io("writing a pod's /etc/hosts"))?;
        std::fs::write(etc.join("resolv.conf"), &plan.resolv[&p.key()])
            .map_err(io("writing a pod's /etc/resolv.conf"))?;
        std::fs::create_dir_all(&p.cgroup)
            .map_err(io(format!("creating cgroup {}", p.cgroup.display())))?;
    }

    for n in &state.nodes {
        let dir = n.agent_socket.parent().expect("socket path has a parent");
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    // With `--kube` the mesh starts once the API server serves.
    if let Some(agents) = opts.node_agents.as_ref().filter(|_| opts.kube.is_none()) {
        agents.start(state).map_err(SimError::NodeAgents)?;
        for p in &state.pods {
            let node = state
                .node(&p.node)
                .expect("planned pods are on planned nodes");
            registration::add(node, p).map_err(|source| SimError::Registration {
                pod: p.key(),
                node: node.name.clone(),
                socket: node.agent_socket.clone(),
                source,
            })?;
        }
    }
    std::fs::create_dir_all(state.state_dir.join("logs"))
        .map_err(io("creating the log directory"))?;
    let mut cluster = Cluster {
        state: state.clone(),
        children: Vec::new(),
        control_plane: ControlPlane::default(),
    };
    for (pod_key, paths) in programs {
        let pod = cluster
            .state
            .pods
            .iter_mut()
            .find(|p| p.key() == *pod_key)
            .expect("planned pod");
        for ((launch, program), container) in plan.launches[pod_key]
            .iter()
            .zip(paths)
            .zip(pod.containers.iter_mut())
        {
            let child = start_container(
                pod.netns.as_str(),
                &pod.cgroup,
                &state.manifest_dir,
                launch,
                program,
            )?;
            container.pid = Some(child.id());
            cluster
                .children
                .push((pod_key.clone(), launch.name.clone(), child));
        }
    }
    cluster.state.save().map_err(io("writing the state file"))?;
    wait_ready(&mut cluster, plan, opts.ready_timeout)?;
    if let Some(binaries) = &opts.kube {
        start_kube(&mut cluster, binaries, opts)?;
    }
    Ok(cluster)
}

/// The manifests a `--kube` cluster's network is planned from: one Node
/// per simulated node ([`kube::node_names`]); every object of DIR goes to
/// the API server instead.
fn kube_nodes(dir: &Path) -> Result<Manifests, SimError> {
    let nodes = kube::node_names(dir)?
        .into_iter()
        .map(|name| Sourced {
            file: dir.to_path_buf(),
            object: k8s_openapi::api::core::v1::Node {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some(name),
                    ..Default::default()
                },
                ..Default::default()
            },
        })
        .collect();
    Ok(Manifests {
        dir: dir.to_path_buf(),
        nodes,
        ..Default::default()
    })
}

/// `--kube`: the control plane, the simulated kubelet, DIR applied; returns
/// once DIR's workloads are ready (the state file is the kubelet's from then
/// on: it lists the pods it runs).
fn start_kube(
    cluster: &mut Cluster,
    binaries: &KubeBinaries,
    opts: &Options,
) -> Result<(), SimError> {
    // The control plane may start slowly on a busy machine: at least two
    // minutes, whatever the pods' readiness timeout.
    let timeout = opts.ready_timeout.max(Duration::from_secs(120));
    let cluster_cgroup = opts.layout.cgroup_root.join(&cluster.state.name);
    let api = kube::start(
        &cluster.state,
        binaries,
        &cluster_cgroup,
        timeout,
        &mut cluster.control_plane,
    )?;
    let mut api = api;
    api.images = opts.images.clone();
    cluster.state.kube = Some(api.clone());
    cluster.state.save().map_err(io("writing the state file"))?;
    // The mesh before the kubelets: its CNI plugin is in place before the
    // first pod's network is set up (a pod it cannot register does not
    // start; the kubelet would retry).
    if let Some(agents) = &opts.node_agents {
        agents.start(&cluster.state).map_err(SimError::NodeAgents)?;
    }
    let kubelet = kube::start_kubelet(
        &cluster.state,
        binaries,
        &cluster_cgroup,
        &mut cluster.control_plane,
    )?;
    kube::apply_dir(&api, &cluster.state.manifest_dir, timeout)?;
    kube::wait_workloads_ready(&api, timeout, &kubelet)?;
    if let Ok(state) = State::load(&cluster.state.state_dir) {
        cluster.state = state;
    }
    Ok(())
}

/// Two random tokens per node, one for each control plane service (see
/// docs/simulator.md, "Node credentials").
fn write_credentials(state: &State) -> Result<(), SimError> {
    use rand::RngCore;
    for service in [CredentialFor::Identity, CredentialFor::Destination] {
        let dir = credential_dir(&state.state_dir, service);
        std::fs::create_dir_all(&dir).map_err(io("creating the credentials directory"))?;
    }
    for n in &state.nodes {
        for file in [&n.ca_credential_file, &n.destination_credential_file] {
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            sys::write_private(file, token.as_bytes())
                .map_err(io(format!("writing {}", file.display())))?;
        }
    }
    Ok(())
}

fn start_container(
    netns: &str,
    cgroup: &Path,
    workdir: &Path,
    launch: &ContainerLaunch,
    program: &Path,
) -> Result<Child, SimError> {
    let log = std::fs::File::create(&launch.log)
        .map_err(io(format!("creating {}", launch.log.display())))?;
    let log2 = log.try_clone().map_err(io("duplicating a log file"))?;
    let cg = CgroupHandle::open(cgroup)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(program)
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // Its own process group: a Ctrl-C meant for `weft-sim up` reaches the
    // simulator, which then tears the pods down in order, not the pods first.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    sys::join_cgroup_before_exec(&mut cmd, &cg);
    cmd.spawn()
        .map_err(|e| SimError::Sys(io(format!("starting {}", program.display()))(e)))
}

/// Every container is running (or has completed successfully) and every
/// declared TCP port listens in its pod's namespace.
fn wait_ready(cluster: &mut Cluster, plan: &Plan, timeout: Duration) -> Result<(), SimError> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<usize> = (0..cluster.children.len()).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for i in pending {
            let (pod, container, child) = &mut cluster.children[i];
            let launch = plan.launches[pod.as_str()]
                .iter()
                .find(|l| l.name == *container)
                .expect("launch");
            if let Some(status) = child.try_wait().map_err(io("checking a container"))? {
                if status.success() && launch.tcp_ports.is_empty() {
                    continue; // ran to completion, like a Job's pod
                }
                return Err(SimError::NotReady(Box::new(NotReady {
                    pod: pod.clone(),
                    container: container.clone(),
                    problem: format!("exited ({status}) before the cluster was ready"),
                    log: launch.log.clone(),
                    tail: sys::tail(&launch.log, 10),
                })));
            }
            let listening = sys::listening_ports(child.id());
            let missing: Vec<u16> = launch
                .tcp_ports
                .iter()
                .copied()
                .filter(|p| !listening.contains(p))
                .collect();
            if missing.is_empty() {
                continue;
            }
            if Instant::now() > deadline {
                return Err(SimError::NotReady(Box::new(NotReady {
                    pod: pod.clone(),
                    container: container.clone(),
                    problem: format!(
                        "is not listening on TCP port(s) {missing:?} after {}s",
                        timeout.as_secs()
                    ),
                    log: launch.log.clone(),
                    tail: sys::tail(&launch.log, 10),
                })));
            }
            still.push(i);
        }
        pending = still;
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    Ok(())
}

/// Tears down the simulator `name`: processes, namespaces, cgroups, host
/// interface, per-netns files and the state directory. Idempotent.
pub fn down(name: &str, opts: &Options) -> Result<(), SimError> {
    validate_name(name)?;
    let state_dir = opts.layout.run_dir.join(name);
    let state = State::load(&state_dir).ok();
    let mut errors: Vec<String> = Vec::new();

    // 0. A `--kube` cluster's kubelet, so it restarts no container that is
    //    being stopped.
    if let Err(e) = sys::remove_cgroup(
        &opts
            .layout
            .cgroup_root
            .join(name)
            .join(kube::KUBELET_CGROUP),
        Duration::from_secs(5),
    ) {
        errors.push(e.to_string());
    }
    // 1. Processes: pods first, then (as a kubelet would, once a pod's
    //    containers are gone) `del` to each node's agent while the agents
    //    still run, then node-level processes and stragglers that entered
    //    one of the namespaces without its cgroup.
    if let Some(state) = &state {
        for p in &state.pods {
            if let Err(e) = sys::remove_cgroup(&p.cgroup, Duration::from_secs(5)) {
                errors.push(e.to_string());
            }
            if state.registers_pods
                && let Some(node) = state.node(&p.node)
                && let Err(e) = registration::del(node, p)
            {
                // Best effort, as CNI DEL: the agent also notices vanished namespaces.
                eprintln!("weft-sim: del of {} to node {}: {e}", p.key(), node.name);
            }
        }
    }
    // Node-level processes (node proxies) get SIGTERM and a grace period,
    // as the kubelet gives a pod, so they can drain and clean up after
    // themselves (a node proxy removes its eBPF programs), then the rest
    // is killed.
    if let Some(state) = &state {
        let cgroups: Vec<&Path> = state.nodes.iter().map(|n| n.cgroup.as_path()).collect();
        sys::terminate_cgroups(&cgroups, Duration::from_secs(10));
    }
    if let Err(e) = sys::remove_cgroup(&opts.layout.cgroup_root.join(name), Duration::from_secs(5))
    {
        errors.push(e.to_string());
    }
    let prefix = plan::netns_prefix(name);
    let namespaces: Vec<String> = sys::netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    for ns in &namespaces {
        for pid in sys::netns_pids(ns) {
            // SAFETY: kill(2) on a pid whose network namespace is one this
            // simulator created: only processes running inside our cluster.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    // Pod namespaces a node proxy kept for its restart (bind mounts under
    // the state directory): they would keep those namespaces alive, and
    // the directory could not be removed. No process of the cluster is
    // left to mount them again.
    for mount in sys::mounts_under(&state_dir) {
        if let Err(e) = sys::unmount(&mount) {
            errors.push(e.to_string());
        }
    }
    // 2. Namespaces (their veths go with them) and the host interface.
    for ns in &namespaces {
        if let Err(e) = sys::run("ip", &["netns", "del", ns], None) {
            errors.push(e.to_string());
        }
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
    }
    // Per-netns files of namespaces already gone (deleted by hand or by a
    // test playing the runtime), by prefix too.
    for entry in std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    if let Some(state) = &state {
        // The host end of the fabric veth goes when the fabric namespace is
        // destroyed, which the kernel does asynchronously: give it a moment
        // before deleting it by hand, and accept that it vanished meanwhile.
        let host = &state.fabric.host_interface;
        let deadline = Instant::now() + Duration::from_secs(2);
        while sys::link_exists(host) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Never another simulator's (its alias would name its cluster):
        // the slot stays claimed while our state file exists, so this is
        // a guard against a state file edited or copied by hand.
        if sys::link_exists(host)
            && sys::link_alias(host).is_none_or(|a| a == plan::host_interface_alias(name))
            && let Err(e) = sys::run("ip", &["link", "del", host], None)
            && sys::link_exists(host)
        {
            errors.push(e.to_string());
        }
    }
    // The node proxies leave their eBPF programs and maps pinned when they
    // stop (a restarted proxy finds its pods there; a killed or hung one
    // could not remove them anyway). No process holds them any more:
    // removing the pins detaches the links and frees programs and maps.
    let pins = plan::bpf_pin_root(name);
    match std::fs::remove_dir_all(&pins) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("removing the eBPF pins {}: {e}", pins.display())),
    }
    // 3. Files: kept when something above failed, so a retry still knows the slot.
    if errors.is_empty()
        && let Err(e) = std::fs::remove_dir_all(&state_dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        errors.push(format!("removing {}: {e}", state_dir.display()));
    }
    if errors.is_empty() {
        return Ok(());
    }
    Err(SimError::Teardown {
        name: name.to_string(),
        errors: errors.join("; "),
    })
}

/// Loads the state of a running simulator.
pub fn load(name: &str, opts: &Options) -> Result<State, SimError> {
    validate_name(name)?;
    State::load(&opts.layout.run_dir.join(name)).map_err(|_| SimError::NotRunning(name.to_string()))
}

/// A command that runs inside the cluster. It holds the cgroup's open
/// `cgroup.procs` until it is dropped, because the child writes to it
/// between fork and exec.
pub struct ClusterCommand {
    command: Command,
    _cgroup: CgroupHandle,
    _netns: Option<sys::NetnsHandle>,
}

impl std::ops::Deref for ClusterCommand {
    type Target = Command;
    fn deref(&self) -> &Command {
        &self.command
    }
}

impl std::ops::DerefMut for ClusterCommand {
    fn deref_mut(&mut self) -> &mut Command {
        &mut self.command
    }
}

/// A command that runs `program args…` inside a pod: its network namespace
/// (with its `/etc/hosts`, via `ip netns exec`), its cgroup, and its
/// containers' working directory (the manifest directory), as `kubectl exec`
/// runs in the container's.
pub fn pod_command(
    state: &State,
    pod: &str,
    program: &str,
    args: &[String],
) -> Result<ClusterCommand, SimError> {
    let p = state.pod(pod).ok_or_else(|| SimError::NoSuchPod {
        name: state.name.clone(),
        pod: pod.to_string(),
        known: state
            .pods
            .iter()
            .map(|p| p.key())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let mut cmd = command_in(&p.netns, &p.cgroup, program, args)?;
    cmd.current_dir(&state.manifest_dir);
    Ok(cmd)
}

/// A command that runs inside a node's namespace and node cgroup (where a
/// node proxy runs).
pub fn node_command(
    state: &State,
    node: &str,
    program: &str,
    args: &[String],
) -> Result<ClusterCommand, SimError> {
    let n = state.node(node).ok_or_else(|| SimError::NoSuchNode {
        name: state.name.clone(),
        node: node.to_string(),
    })?;
    let cg = CgroupHandle::open(&n.cgroup)?;
    let netns = sys::NetnsHandle::open(&n.netns_path)?;
    let mut command = Command::new(program);
    command.args(args);
    sys::enter_netns_before_exec(&mut command, &netns);
    sys::join_cgroup_before_exec(&mut command, &cg);
    Ok(ClusterCommand {
        command,
        _cgroup: cg,
        _netns: Some(netns),
    })
}

fn command_in(
    netns: &str,
    cgroup: &Path,
    program: &str,
    args: &[String],
) -> Result<ClusterCommand, SimError> {
    let cg = CgroupHandle::open(cgroup)?;
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns, program]).args(args);
    sys::join_cgroup_before_exec(&mut command, &cg);
    Ok(ClusterCommand {
        command,
        _cgroup: cg,
        _netns: None,
    })
}
