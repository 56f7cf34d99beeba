//! The mesh on the simulator, wired as on a cluster: the control plane
//! (`weft-identity serve`, `weft-destination` with the local source on the
//! manifest directory) runs on the host and listens on the fabric host
//! address; one `weft-node-proxy` runs in every node's namespace and cgroup
//! and reaches the control plane over the fabric with its node credential.
//!
//! This crate runs the binaries; it does not link the mesh crates (nothing
//! here depends on the node proxy, identity or destination code). They are
//! found in one directory, normally next to `weft-sim` itself (the same
//! Cargo target directory).
//!
//! The control plane processes run in a cgroup under the cluster's
//! (`<cluster cgroup>/control-plane`), so `down` stops them with everything
//! else, also after a crash.

use crate::cluster::NodeAgents;
use crate::plan::{CredentialFor, credential_dir};
use crate::state::State;
use crate::sys::{self, CgroupHandle};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const IDENTITY_PORT: u16 = 15012;
pub const IDENTITY_METRICS_PORT: u16 = 15014;
pub const DESTINATION_PORT: u16 = 15010;
pub const DESTINATION_ADMIN_PORT: u16 = 15015;
pub const DESTINATION_SERVER_NAME: &str = "weft-destination.weft-system.svc";
pub const TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Nothing here runs Cargo (a test that builds would race other builds
    /// and hide a stale binary): the message says what to run instead.
    #[error("{binary} not found in {dir}: build the binaries first with `{build}`")]
    MissingBinary {
        binary: &'static str,
        dir: PathBuf,
        build: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Sys(#[from] sys::SysError),
    #[error("creating the destination service's TLS certificate: {0}")]
    Certificate(String),
    #[error("{0} was not started by this mesh (is the mesh up?)")]
    NotStarted(Component),
    #[error("{0} can only be stopped, not restarted, through the mesh (restart the cluster)")]
    NotRestartable(Component),
    #[error("{0} is not a node proxy")]
    NotANodeProxy(Component),
    #[error("no node proxy runs on node {0}")]
    NoNodeProxy(String),
    #[error("{component} is still running; stop it before restarting it")]
    StillRunning { component: Component },
    #[error("{component} did not exit within {seconds}s of SIGTERM")]
    DidNotExit { component: Component, seconds: u64 },
    /// `--kube`: preparing the API server for the mesh.
    #[error("{0}")]
    Kube(String),
    #[error("{component} did not become ready within {seconds}s: {problem}; log {log}:\n{tail}")]
    NotReady {
        component: String,
        seconds: u64,
        problem: String,
        log: PathBuf,
        tail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

/// Where the three mesh programs are.
#[derive(Clone, Debug)]
pub struct MeshBinaries {
    pub identity: PathBuf,
    pub destination: PathBuf,
    pub node_proxy: PathBuf,
    /// The chained CNI plugin (`--kube`: the simulated kubelet runs it).
    pub cni: PathBuf,
}

impl MeshBinaries {
    /// The programs in `dir` (a Cargo profile directory such as `target/debug`).
    pub fn in_dir(dir: &Path) -> Result<Self, MeshError> {
        let find = |binary: &'static str| {
            let path = dir.join(binary);
            if path.is_file() {
                Ok(path)
            } else {
                Err(MeshError::MissingBinary {
                    binary,
                    dir: dir.to_path_buf(),
                    build: build_command(dir),
                })
            }
        };
        Ok(Self {
            identity: find("weft-identity")?,
            destination: find("weft-destination")?,
            node_proxy: find("weft-node-proxy")?,
            cni: find("weft-cni")?,
        })
    }

    /// Next to the running executable (for a test binary in
    /// `target/<profile>/deps` or an example in `…/examples`, their parent):
    /// where Cargo put the binaries of the same build. Tests use this and
    /// never build: `cargo xtask test` builds every binary first.
    pub fn next_to_current_exe() -> Result<Self, MeshError> {
        let exe = std::env::current_exe().map_err(io("finding the current executable"))?;
        let mut dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
        if dir.ends_with("deps") || dir.ends_with("examples") {
            dir.pop();
        }
        Self::in_dir(&dir)
    }
}

/// The command that puts the binaries in `dir`, a Cargo profile directory:
/// `target/release` for release builds (the benchmarks), `target/debug`
/// otherwise (the workspace defines no other profile).
fn build_command(dir: &Path) -> String {
    let release = if dir.ends_with("release") {
        " --release"
    } else {
        ""
    };
    format!("cargo build --workspace --bins{release}")
}

/// What `status --json` shows of the mesh (`<state_dir>/mesh.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MeshState {
    pub trust_domain: String,
    /// The identity CA (gRPC over TLS) and its metrics.
    pub identity: SocketAddr,
    pub identity_metrics: SocketAddr,
    /// The destination service (gRPC over TLS) and its admin endpoint.
    pub destination: SocketAddr,
    pub destination_admin: SocketAddr,
    /// The mesh's trust anchors (`ca.crt`).
    pub trust_anchors: PathBuf,
    /// The CA of the destination service's serving certificate.
    pub destination_ca: PathBuf,
    /// Each node proxy's metrics (`/metrics`), health and admin addresses.
    pub node_proxies: Vec<NodeProxyState>,
    /// Prometheus file service discovery for the node proxies.
    pub prometheus_targets: PathBuf,
    pub prometheus_config: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeProxyState {
    pub node: String,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    /// Inside the node's namespace only.
    pub admin: SocketAddr,
    pub log: PathBuf,
    /// The program and its arguments, to start it again the same way
    /// (`weft-sim restart-proxy`, `rollout-proxy`).
    #[serde(default)]
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
}

/// What a kubelet does to a node proxy that is restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyRestart {
    /// It crashed: SIGKILL (nothing of its own shutdown runs), then it is
    /// started again with the same arguments.
    Crash,
    /// SIGTERM, wait for it to exit (its drain), then start it again.
    Graceful,
}

/// The line a node proxy logs when it becomes ready: the simulator waits
/// for it in the log, because during a rollout two proxies answer on the
/// node's health port.
pub const PROXY_READY_LINE: &str = "node proxy ready: every enrolled pod of this node is served";

impl MeshState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("mesh.json")
    }

    pub fn load(state_dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(Self::path(state_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// One process the mesh runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    Identity,
    Destination,
    /// The node proxy of the named node.
    NodeProxy(String),
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Identity => f.write_str("weft-identity"),
            Self::Destination => f.write_str("weft-destination"),
            Self::NodeProxy(node) => write!(f, "the node proxy of {node}"),
        }
    }
}

/// How a control plane process was started, to start it again the same way.
#[derive(Clone, Debug)]
struct Launch {
    cgroup: PathBuf,
    /// The network namespace it runs in (node proxies: their node's).
    netns: Option<PathBuf>,
    program: PathBuf,
    args: Vec<String>,
    /// Added to the environment (`KUBECONFIG` with `--kube`).
    env: Vec<(String, String)>,
    log: PathBuf,
    /// When it serves (checked after a restart).
    ready: Readiness,
}

#[derive(Clone, Debug)]
enum Readiness {
    /// A line starting with `ready ` appears in the log.
    LogLine,
    /// `GET /ready` answers 200.
    Http(SocketAddr),
    /// A node proxy: [`PROXY_READY_LINE`] appears in the log.
    ProxyLine,
}

/// The exit status of a process, set by its reaper thread.
#[derive(Debug, Default)]
struct Exit {
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
}

impl Exit {
    fn wait(&self, timeout: Duration) -> Option<ExitStatus> {
        let guard = self.status.lock().expect("exit lock");
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .expect("exit lock");
        *guard
    }
}

#[derive(Debug)]
struct Process {
    pid: u32,
    exit: Arc<Exit>,
    launch: Option<Launch>,
}

/// Starts the control plane and the node proxies when the simulator asks
/// (`Options::node_agents`). Keeps the children to reap them; `down` stops
/// them (they live in the cluster's cgroups).
#[derive(Debug)]
pub struct Mesh {
    binaries: MeshBinaries,
    /// Extra flags for every node proxy (e.g. `--log-json`).
    pub proxy_args: Vec<String>,
    /// Extra flags for the CA's `serve` (e.g. `--leaf-ttl-seconds`).
    pub identity_args: Vec<String>,
    /// The node proxies' `--drain-seconds` (short by default: `down` waits
    /// for them).
    pub drain_seconds: u64,
    /// One thread per child waits for it, so a process `down` killed is
    /// reaped at once (an unreaped one pins its cgroup).
    children: Mutex<Vec<std::thread::JoinHandle<()>>>,
    processes: Mutex<HashMap<Component, Process>>,
    state: Mutex<Option<MeshState>>,
}

impl Mesh {
    pub fn new(binaries: MeshBinaries) -> Self {
        Self {
            binaries,
            proxy_args: Vec::new(),
            identity_args: Vec::new(),
            drain_seconds: 1,
            children: Mutex::default(),
            processes: Mutex::default(),
            state: Mutex::default(),
        }
    }

    /// The process id of a running component (`None` if it was not started
    /// or has exited).
    pub fn pid(&self, component: &Component) -> Option<u32> {
        let processes = self.processes.lock().expect("mesh lock");
        let p = processes.get(component)?;
        let running = p.exit.status.lock().expect("exit lock").is_none();
        running.then_some(p.pid)
    }

    /// Sends SIGTERM to a component, and returns at once.
    pub fn terminate(&self, component: &Component) -> Result<(), MeshError> {
        self.signal(component, libc::SIGTERM)
    }

    /// Sends SIGKILL to a component (a crash: none of its shutdown runs),
    /// and returns at once.
    pub fn kill(&self, component: &Component) -> Result<(), MeshError> {
        self.signal(component, libc::SIGKILL)
    }

    fn signal(&self, component: &Component, signal: libc::c_int) -> Result<(), MeshError> {
        let processes = self.processes.lock().expect("mesh lock");
        let p = processes
            .get(component)
            .ok_or_else(|| MeshError::NotStarted(component.clone()))?;
        terminate_process(p, signal);
        Ok(())
    }

    /// Starts a node's proxy again with the arguments it was first started
    /// with (the previous one must have exited), and returns at once; the
    /// offset in its log where this start's output begins (for
    /// [`Mesh::wait_node_proxy_ready`]).
    pub fn start_node_proxy(&self, node: &str) -> Result<u64, MeshError> {
        let component = Component::NodeProxy(node.to_string());
        let launch = self.launch_of(&component, false)?;
        let offset = std::fs::metadata(&launch.log).map_or(0, |m| m.len());
        self.spawn(component, launch, true)?;
        Ok(offset)
    }

    /// Waits until the node proxy started at `log_offset` logs that it is
    /// ready (every enrolled pod of its node served).
    pub fn wait_node_proxy_ready(
        &self,
        node: &str,
        log_offset: u64,
        timeout: Duration,
    ) -> Result<(), MeshError> {
        let component = Component::NodeProxy(node.to_string());
        let launch = self.launch_of(&component, true)?;
        wait_ready(&component, &launch, log_offset, Instant::now() + timeout)
    }

    /// What a kubelet does when a node proxy crashes ([`ProxyRestart::Crash`])
    /// or is restarted ([`ProxyRestart::Graceful`]): the old process ends,
    /// then a new one starts with the same arguments. Returns once the new
    /// one is ready.
    pub fn restart_node_proxy(&self, node: &str, how: ProxyRestart) -> Result<(), MeshError> {
        let component = Component::NodeProxy(node.to_string());
        let grace = Duration::from_secs(self.drain_seconds + 10);
        match how {
            ProxyRestart::Crash => self.kill(&component)?,
            ProxyRestart::Graceful => self.terminate(&component)?,
        }
        self.wait_exit(&component, grace)?
            .ok_or_else(|| MeshError::DidNotExit {
                component: component.clone(),
                seconds: grace.as_secs(),
            })?;
        let offset = self.start_node_proxy(node)?;
        self.wait_node_proxy_ready(node, offset, Duration::from_secs(60))
    }

    /// A DaemonSet rollout with `maxSurge: 1, maxUnavailable: 0`: a new
    /// proxy starts next to the running one, and once it is ready the old
    /// one gets SIGTERM (it drains and exits). Returns once the old one has
    /// exited (its exit status).
    pub fn roll_out_node_proxy(&self, node: &str) -> Result<ExitStatus, MeshError> {
        let component = Component::NodeProxy(node.to_string());
        let launch = self.launch_of(&component, true)?;
        let old = self
            .processes
            .lock()
            .expect("mesh lock")
            .remove(&component)
            .ok_or_else(|| MeshError::NotStarted(component.clone()))?;
        let offset = std::fs::metadata(&launch.log).map_or(0, |m| m.len());
        let started = self
            .spawn(component.clone(), launch.clone(), true)
            .and_then(|()| {
                wait_ready(
                    &component,
                    &launch,
                    offset,
                    Instant::now() + Duration::from_secs(60),
                )
            });
        if let Err(e) = started {
            // The old one keeps serving (maxUnavailable: 0); it stays ours.
            let mut processes = self.processes.lock().expect("mesh lock");
            if let Some(new) = processes.insert(component.clone(), old) {
                terminate_process(&new, libc::SIGKILL);
            }
            return Err(e);
        }
        terminate_process(&old, libc::SIGTERM);
        let grace = Duration::from_secs(self.drain_seconds + 10);
        old.exit.wait(grace).ok_or(MeshError::DidNotExit {
            component,
            seconds: grace.as_secs(),
        })
    }

    fn launch_of(&self, component: &Component, running: bool) -> Result<Launch, MeshError> {
        if !matches!(component, Component::NodeProxy(_)) {
            return Err(MeshError::NotANodeProxy(component.clone()));
        }
        let processes = self.processes.lock().expect("mesh lock");
        let p = processes
            .get(component)
            .ok_or_else(|| MeshError::NotStarted(component.clone()))?;
        let is_running = p.exit.status.lock().expect("exit lock").is_none();
        if is_running && !running {
            return Err(MeshError::StillRunning {
                component: component.clone(),
            });
        }
        p.launch
            .clone()
            .ok_or_else(|| MeshError::NotRestartable(component.clone()))
    }

    /// Waits up to `timeout` for a component to exit; its status if it did.
    pub fn wait_exit(
        &self,
        component: &Component,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, MeshError> {
        let exit = self
            .processes
            .lock()
            .expect("mesh lock")
            .get(component)
            .map(|p| p.exit.clone())
            .ok_or_else(|| MeshError::NotStarted(component.clone()))?;
        Ok(exit.wait(timeout))
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn stop(&self, component: &Component, timeout: Duration) -> Result<ExitStatus, MeshError> {
        self.terminate(component)?;
        self.wait_exit(component, timeout)?
            .ok_or_else(|| MeshError::DidNotExit {
                component: component.clone(),
                seconds: timeout.as_secs(),
            })
    }

    /// Starts a stopped control plane component again, exactly as before
    /// (same addresses, CA directory and certificates; its log is appended
    /// to), and waits until it serves.
    pub fn restart(&self, component: &Component) -> Result<(), MeshError> {
        let launch = {
            let processes = self.processes.lock().expect("mesh lock");
            let p = processes
                .get(component)
                .ok_or_else(|| MeshError::NotStarted(component.clone()))?;
            if p.exit.status.lock().expect("exit lock").is_none() {
                return Err(MeshError::StillRunning {
                    component: component.clone(),
                });
            }
            if matches!(component, Component::NodeProxy(_)) {
                return Err(MeshError::NotRestartable(component.clone()));
            }
            p.launch
                .clone()
                .ok_or_else(|| MeshError::NotRestartable(component.clone()))?
        };
        // A restart appends to the log: readiness is read from what this
        // start writes.
        let log_offset = std::fs::metadata(&launch.log).map_or(0, |m| m.len());
        self.spawn(component.clone(), launch.clone(), true)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        wait_ready(component, &launch, log_offset, deadline)
    }

    /// The addresses, once started.
    pub fn state(&self) -> Option<MeshState> {
        self.state.lock().expect("mesh lock").clone()
    }

    /// Waits for every process this mesh started (after `down` stopped them).
    pub fn reap(&self) {
        for reaper in self.children.lock().expect("mesh lock").drain(..) {
            let _ = reaper.join();
        }
    }

    fn start_all(&self, state: &State) -> Result<MeshState, MeshError> {
        let host: IpAddr = state.fabric.host_ip.into();
        let cgroup = control_plane_cgroup(state);
        std::fs::create_dir_all(&cgroup).map_err(io(format!("creating {}", cgroup.display())))?;
        let logs = state.state_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(io("creating the log directory"))?;

        // Identity: a fresh CA for this cluster.
        let ca_dir = state.state_dir.join("identity");
        let init = Command::new(&self.binaries.identity)
            .args(["init", "--trust-domain", TRUST_DOMAIN, "--out"])
            .arg(&ca_dir)
            .output()
            .map_err(io("running weft-identity init"))?;
        if !init.status.success() {
            return Err(MeshError::Io {
                what: "weft-identity init".into(),
                source: std::io::Error::other(String::from_utf8_lossy(&init.stderr).to_string()),
            });
        }
        let identity = SocketAddr::new(host, IDENTITY_PORT);
        let identity_metrics = SocketAddr::new(host, IDENTITY_METRICS_PORT);
        let identity_log = logs.join("weft-identity.log");
        let mut args: Vec<String> = vec!["serve".into(), "--ca-dir".into()];
        args.push(path_arg(&ca_dir));
        args.extend(
            [
                "--trust-domain",
                TRUST_DOMAIN,
                "--listen",
                &identity.to_string(),
                "--metrics-listen",
                &identity_metrics.to_string(),
            ]
            .map(String::from),
        );
        // With `--kube` the control plane runs against the API server (the
        // node proxies' tokens reviewed there, the pods listed there), as
        // on a cluster; otherwise in local mode, on the simulator's files.
        let env = match &state.kube {
            Some(kube) => {
                prepare_kube(&self.binaries, state, kube)?;
                vec![("KUBECONFIG".to_string(), path_arg(&kube.kubeconfig))]
            }
            None => {
                args.extend(
                    [
                        "--local-credentials",
                        &path_arg(&credential_dir(&state.state_dir, CredentialFor::Identity)),
                        "--local-cluster-state",
                        &path_arg(&State::path(&state.state_dir)),
                    ]
                    .map(String::from),
                );
                Vec::new()
            }
        };
        args.extend(self.identity_args.iter().cloned());
        let identity_launch = Launch {
            cgroup: cgroup.clone(),
            netns: None,
            program: self.binaries.identity.clone(),
            args,
            env: env.clone(),
            log: identity_log,
            ready: Readiness::LogLine,
        };
        self.spawn(Component::Identity, identity_launch.clone(), false)?;

        // Destination: its own serving certificate, from a CA of its own.
        let dest_dir = state.state_dir.join("destination");
        let destination_ca = write_destination_tls(&dest_dir, host)?;
        let destination = SocketAddr::new(host, DESTINATION_PORT);
        let destination_admin = SocketAddr::new(host, DESTINATION_ADMIN_PORT);
        let destination_log = logs.join("weft-destination.log");
        let mut args: Vec<String> = [
            "--grpc-addr",
            &destination.to_string(),
            "--admin-addr",
            &destination_admin.to_string(),
            "--tls-cert",
            &path_arg(&dest_dir.join("tls.crt")),
            "--tls-key",
            &path_arg(&dest_dir.join("tls.key")),
            "--trust-domain",
            TRUST_DOMAIN,
            // The cluster networks are the pod networks, as an operator
            // would set them: the nodes' fabric addresses (and the host) are
            // then outside, which the cluster-* policies can tell apart.
            "--cluster-networks",
            &cluster_networks(state),
        ]
        .map(String::from)
        .to_vec();
        if state.kube.is_some() {
            args.extend(["--source", "kube"].map(String::from));
        } else {
            args.extend(
                [
                    "--source",
                    "local",
                    "--manifests",
                    &path_arg(&state.manifest_dir),
                    "--cluster-state",
                    &path_arg(&State::path(&state.state_dir)),
                    "--local-credentials",
                    &path_arg(&credential_dir(
                        &state.state_dir,
                        CredentialFor::Destination,
                    )),
                ]
                .map(String::from),
            );
        }
        let destination_launch = Launch {
            cgroup,
            netns: None,
            program: self.binaries.destination.clone(),
            args,
            env,
            log: destination_log,
            ready: Readiness::Http(destination_admin),
        };
        self.spawn(Component::Destination, destination_launch.clone(), false)?;

        let deadline = Instant::now() + Duration::from_secs(30);
        wait_ready(&Component::Identity, &identity_launch, 0, deadline)?;
        wait_ready(&Component::Destination, &destination_launch, 0, deadline)?;

        // Node proxies.
        let trust_anchors = ca_dir.join("ca.crt");
        let mut proxies = Vec::new();
        for node in &state.nodes {
            let log = logs.join(format!("weft-node-proxy.{}.log", node.name));
            let metrics = SocketAddr::new(node.ip.into(), 15020);
            let health = SocketAddr::new(node.ip.into(), 15021);
            let mut args: Vec<String> = [
                "--node",
                &node.name,
                "--agent-socket",
                &path_arg(&node.agent_socket),
                "--pin-dir",
                &path_arg(&node.bpf_pin_dir),
                "--metrics-addr",
                &metrics.to_string(),
                "--health-addr",
                &health.to_string(),
                // Kept across restarts; `down` removes them (and the pins,
                // which the proxy leaves so that a restart finds its pods).
                "--state-dir",
                &path_arg(&node_proxy_state_dir(state, &node.name)),
                "--drain-seconds",
                &self.drain_seconds.to_string(),
                "--destination-address",
                &format!("https://{destination}"),
                "--destination-server-name",
                DESTINATION_SERVER_NAME,
                "--destination-ca",
                &path_arg(&destination_ca),
                "--ca-address",
                &identity.to_string(),
                "--trust-anchors",
                &path_arg(&trust_anchors),
                "--ca-token-file",
                &path_arg(&node.ca_credential_file),
                "--destination-token-file",
                &path_arg(&node.destination_credential_file),
                "--trust-domain",
                TRUST_DOMAIN,
            ]
            .map(String::from)
            .to_vec();
            args.extend(self.proxy_args.iter().cloned());
            let launch = Launch {
                cgroup: node.cgroup.clone(),
                netns: Some(node.netns_path.clone()),
                program: self.binaries.node_proxy.clone(),
                args: args.clone(),
                env: Vec::new(),
                log: log.clone(),
                ready: Readiness::ProxyLine,
            };
            self.spawn(Component::NodeProxy(node.name.clone()), launch, false)?;
            proxies.push(NodeProxyState {
                node: node.name.clone(),
                metrics,
                health,
                admin: "127.0.0.1:15000".parse().expect("address"),
                log,
                program: self.binaries.node_proxy.clone(),
                args,
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for p in &proxies {
            wait_for(
                &format!("node proxy of {}", p.node),
                &p.log,
                deadline,
                || http_get(p.health, "/ready").is_some_and(|(s, _)| s == 200),
            )?;
        }
        let (prometheus_targets, prometheus_config) = write_prometheus(state, &proxies)?;
        let mesh = MeshState {
            trust_domain: TRUST_DOMAIN.into(),
            identity,
            identity_metrics,
            destination,
            destination_admin,
            trust_anchors,
            destination_ca,
            node_proxies: proxies,
            prometheus_targets,
            prometheus_config,
        };
        let text = serde_json::to_string_pretty(&mesh).expect("serializable");
        std::fs::write(MeshState::path(&state.state_dir), text).map_err(io("writing mesh.json"))?;
        Ok(mesh)
    }

    /// Starts a control plane process in its cgroup.
    fn spawn(&self, component: Component, launch: Launch, append: bool) -> Result<(), MeshError> {
        let cg = CgroupHandle::open(&launch.cgroup)?;
        let netns = launch
            .netns
            .as_deref()
            .map(sys::NetnsHandle::open)
            .transpose()?;
        let mut cmd = Command::new(&launch.program);
        cmd.args(&launch.args);
        cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
        if let Some(netns) = &netns {
            sys::enter_netns_before_exec(&mut cmd, netns);
        }
        sys::join_cgroup_before_exec(&mut cmd, &cg);
        let log = launch.log.clone();
        self.start_logged(&mut cmd, &log, component, Some(launch), append)?;
        // Only after spawn: the child uses both before exec.
        drop((cg, netns));
        Ok(())
    }

    /// Starts `cmd` with both output streams going to `log`, and keeps it
    /// to be stopped with the mesh.
    fn start_logged(
        &self,
        cmd: &mut Command,
        log: &Path,
        component: Component,
        launch: Option<Launch>,
        append: bool,
    ) -> Result<(), MeshError> {
        if !append {
            std::fs::write(log, b"").map_err(io(format!("creating {}", log.display())))?;
        }
        // Always O_APPEND: in a rollout the old and the new node proxy
        // write to the same log, and a writer at its own offset (the old
        // one's, opened without it) overwrote the new one's lines,
        // "ready" included, so the hand-over waited for it in vain.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("log file"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("starting {component}")))?;
        let exit = Arc::new(Exit::default());
        self.processes.lock().expect("mesh lock").insert(
            component,
            Process {
                pid: child.id(),
                exit: exit.clone(),
                launch,
            },
        );
        self.adopt(child, exit);
        Ok(())
    }

    fn adopt(&self, mut child: Child, exit: Arc<Exit>) {
        let reaper = std::thread::spawn(move || {
            // Wait for the exit without reaping, then reap under the exit
            // lock: while `terminate` holds that lock and sees no status,
            // the pid is still this child's (a reaped pid may be reused).
            let pid = child.id() as libc::id_t;
            loop {
                // SAFETY: a zeroed siginfo_t is valid (plain data); waitid
                // writes only into it.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: as above; `pid` is our unreaped child.
                let rc = unsafe {
                    libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
                };
                if rc == 0
                    || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    break;
                }
            }
            let mut status = exit.status.lock().expect("exit lock");
            *status = child.wait().ok();
            drop(status);
            exit.changed.notify_all();
        });
        self.children.lock().expect("mesh lock").push(reaper);
    }
}

impl NodeAgents for Mesh {
    fn start(&self, state: &State) -> Result<(), String> {
        let mesh = self.start_all(state).map_err(|e| e.to_string())?;
        *self.state.lock().expect("mesh lock") = Some(mesh);
        Ok(())
    }
}

/// What the mesh needs in a `--kube` cluster's API server before it
/// starts: the node proxy's namespace and service account (its tokens are
/// that account's) and the policy CRDs the destination service watches
/// (rendered from their types, as `crds/` is).
fn kube_objects() -> String {
    let mut objects = vec![
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: weft-system}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: weft-node-proxy, namespace: weft-system}\n".to_string(),
    ];
    objects.extend(
        weft_policy_api::crd::render()
            .into_iter()
            .map(|(_, yaml)| yaml),
    );
    objects.join("\n---\n")
}

/// The node proxy's service account, `(namespace, name)`: the control
/// plane's default `--node-proxy-service-account`.
const NODE_PROXY_ACCOUNT: (&str, &str) = ("weft-system", "weft-node-proxy");

/// How long the node proxies' tokens are valid: longer than any test or
/// demo (the simulator does not rotate them as a kubelet would).
const NODE_PROXY_TOKEN_DURATION: &str = "48h";

/// `--kube`: what a cluster's installation of the mesh provides, done
/// through the API server: the objects above; for every node, the node
/// proxy's two tokens (TokenRequest for `weft-system/weft-node-proxy`,
/// bound to the node's `Node` object, one per control plane audience) in
/// its credential files; and the chained CNI plugin in the node's
/// `/etc/cni/net.d` and `/opt/cni/bin`, which the simulated kubelet runs
/// for every pod as a container runtime does (so pods are registered with
/// their node proxy by the plugin, not by the simulator).
fn prepare_kube(
    binaries: &MeshBinaries,
    state: &State,
    kube: &crate::state::KubeState,
) -> Result<(), MeshError> {
    let kubectl = |args: &[&str], stdin: Option<&str>| {
        kube.kubectl_ok(args, stdin)
            .map_err(|e| MeshError::Kube(format!("preparing the API server for the mesh: {e}")))
    };
    let objects = kube_objects();
    kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=weft-sim",
            "-f",
            "-",
        ],
        Some(&objects),
    )?;
    kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
        None,
    )?;
    for node in &state.nodes {
        for (audience, file) in [
            ("weft-identity", &node.ca_credential_file),
            ("weft-destination", &node.destination_credential_file),
        ] {
            let token = kubectl(
                &[
                    "create",
                    "token",
                    NODE_PROXY_ACCOUNT.1,
                    "--namespace",
                    NODE_PROXY_ACCOUNT.0,
                    "--audience",
                    audience,
                    "--bound-object-kind",
                    "Node",
                    "--bound-object-name",
                    &node.name,
                    "--duration",
                    NODE_PROXY_TOKEN_DURATION,
                ],
                None,
            )?;
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            }
            sys::write_private(file, token.trim().as_bytes())
                .map_err(io(format!("writing {}", file.display())))?;
        }
        let root = crate::cni::node_root(&state.state_dir, &node.name);
        let bin = root.join("opt/cni/bin");
        let conf = root.join("etc/cni/net.d");
        for dir in [&bin, &conf] {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let plugin = bin.join("weft-cni");
        let _ = std::fs::remove_file(&plugin);
        std::os::unix::fs::symlink(&binaries.cni, &plugin)
            .map_err(io(format!("linking {}", plugin.display())))?;
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "plugins": [{"type": "weft-cni", "agent_socket": node.agent_socket}],
        });
        let file = conf.join("10-weft.conflist");
        std::fs::write(&file, config.to_string())
            .map_err(io(format!("writing {}", file.display())))?;
    }
    Ok(())
}

/// The cgroup of the control plane processes, inside the cluster's.
/// Every node's pod CIDRs (IPv4 and IPv6), comma-separated.
fn cluster_networks(state: &State) -> String {
    state
        .nodes
        .iter()
        .flat_map(|n| [n.pod_cidr.as_str(), n.pod_cidr_v6.as_str()])
        .collect::<Vec<_>>()
        .join(",")
}

pub fn control_plane_cgroup(state: &State) -> PathBuf {
    let cluster = state
        .nodes
        .first()
        .and_then(|n| n.cgroup.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified/weft-sim").join(&state.name));
    cluster.join("control-plane")
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Waits until a (re)started control plane process serves; `log_offset`:
/// where this start's output begins in its log.
fn wait_ready(
    component: &Component,
    launch: &Launch,
    log_offset: u64,
    deadline: Instant,
) -> Result<(), MeshError> {
    let name = component.to_string();
    match launch.ready {
        Readiness::LogLine => wait_for(&name, &launch.log, deadline, || {
            std::fs::read(&launch.log).is_ok_and(|l| {
                let new = l.get(log_offset as usize..).unwrap_or_default();
                String::from_utf8_lossy(new)
                    .lines()
                    .any(|l| l.starts_with("ready "))
            })
        }),
        Readiness::Http(addr) => wait_for(&name, &launch.log, deadline, || {
            http_get(addr, "/ready").is_some_and(|(s, _)| s == 200)
        }),
        Readiness::ProxyLine => wait_for(&name, &launch.log, deadline, || {
            log_since(&launch.log, log_offset).contains(PROXY_READY_LINE)
        }),
    }
}

/// What a log holds from `offset` on.
fn log_since(log: &Path, offset: u64) -> String {
    std::fs::read(log)
        .map(|l| String::from_utf8_lossy(l.get(offset as usize..).unwrap_or_default()).into_owned())
        .unwrap_or_default()
}

/// A signal to a process the mesh started, unless it was reaped. Checked
/// under the exit lock: the reaper only reaps while holding it, so the pid
/// is still this child's.
fn terminate_process(p: &Process, signal: libc::c_int) {
    let exited = p.exit.status.lock().expect("exit lock");
    if exited.is_none() {
        // SAFETY: kill(2) on a child of ours that has not been reaped.
        unsafe { libc::kill(p.pid as libc::pid_t, signal) };
    }
}

/// `weft-sim restart-proxy` and `rollout-proxy`: what [`Mesh::restart_node_proxy`]
/// (`how` given) and [`Mesh::roll_out_node_proxy`] (`how` = `None`) do,
/// from a process that did not start the proxies (a detached `up`). The
/// node proxy is found in its node's cgroup and started again from what
/// `mesh.json` recorded; the new one is left running when this returns.
/// Returns the pids of the old process(es) and of the new one.
pub fn cycle_node_proxy(
    state: &State,
    node: &str,
    how: Option<ProxyRestart>,
    timeout: Duration,
) -> Result<(Vec<i32>, u32), MeshError> {
    let mesh = MeshState::load(&state.state_dir)
        .ok_or_else(|| MeshError::NotStarted(Component::NodeProxy(node.into())))?;
    let proxy = mesh
        .node_proxies
        .iter()
        .find(|p| p.node == node)
        .filter(|p| !p.args.is_empty())
        .ok_or_else(|| MeshError::NotRestartable(Component::NodeProxy(node.into())))?;
    let n = state
        .node(node)
        .ok_or_else(|| MeshError::NoNodeProxy(node.into()))?;
    let component = Component::NodeProxy(node.into());
    let procs = || -> Vec<i32> {
        std::fs::read_to_string(n.cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let old = procs();
    if old.is_empty() {
        return Err(MeshError::NoNodeProxy(node.into()));
    }
    let signal_old = |signal: libc::c_int| {
        for pid in &old {
            // SAFETY: kill(2) on a process of the node's cgroup, which only
            // the simulator's node-level processes (the node proxy) join.
            unsafe { libc::kill(*pid, signal) };
        }
    };
    let wait_old_gone = || -> Result<(), MeshError> {
        let deadline = Instant::now() + timeout;
        while procs().iter().any(|p| old.contains(p)) {
            if Instant::now() > deadline {
                return Err(MeshError::DidNotExit {
                    component: component.clone(),
                    seconds: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    match how {
        Some(ProxyRestart::Crash) => signal_old(libc::SIGKILL),
        Some(ProxyRestart::Graceful) => signal_old(libc::SIGTERM),
        None => {}
    }
    if how.is_some() {
        wait_old_gone()?;
    }
    let launch = Launch {
        cgroup: n.cgroup.clone(),
        netns: Some(n.netns_path.clone()),
        program: proxy.program.clone(),
        args: proxy.args.clone(),
        env: Vec::new(),
        log: proxy.log.clone(),
        ready: Readiness::ProxyLine,
    };
    let offset = std::fs::metadata(&launch.log).map_or(0, |m| m.len());
    let cg = CgroupHandle::open(&launch.cgroup)?;
    let netns = sys::NetnsHandle::open(&n.netns_path)?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log)
        .map_err(io(format!("opening {}", launch.log.display())))?;
    let err = out.try_clone().map_err(io("log file"))?;
    let mut cmd = Command::new(&launch.program);
    cmd.args(&launch.args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // Not in our process group: a Ctrl-C meant for this command does not
    // reach the node proxy it leaves running.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    sys::enter_netns_before_exec(&mut cmd, &netns);
    sys::join_cgroup_before_exec(&mut cmd, &cg);
    let child = cmd.spawn().map_err(io(format!("starting {component}")))?;
    drop((cg, netns));
    let new = child.id();
    if let Err(e) = wait_ready(&component, &launch, offset, Instant::now() + timeout) {
        if how.is_none() {
            // A rollout whose new proxy never became ready: the old one
            // keeps serving (maxUnavailable: 0).
            // SAFETY: kill(2) on the child we just started (not reaped:
            // `child` is still held).
            unsafe { libc::kill(new as libc::pid_t, libc::SIGKILL) };
        }
        drop(child);
        return Err(e);
    }
    drop(child);
    if how.is_none() {
        signal_old(libc::SIGTERM);
        wait_old_gone()?;
    }
    Ok((old, new))
}

/// Where a node's proxy keeps its pod registrations and kept namespaces.
pub fn node_proxy_state_dir(state: &State, node: &str) -> PathBuf {
    state.state_dir.join("nodes").join(node).join("proxy")
}

fn wait_for(
    component: &str,
    log: &Path,
    deadline: Instant,
    mut ready: impl FnMut() -> bool,
) -> Result<(), MeshError> {
    let started = Instant::now();
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(MeshError::NotReady {
        component: component.into(),
        seconds: started.elapsed().as_secs(),
        problem: "not ready".into(),
        log: log.to_path_buf(),
        tail: sys::tail(log, 20),
    })
}

pub use crate::sys::http_get;

/// A CA of the destination service's own and a serving certificate for its
/// Service name and the fabric host address. Returns the CA file.
fn write_destination_tls(dir: &Path, host: IpAddr) -> Result<PathBuf, MeshError> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let err = |e: rcgen::Error| MeshError::Certificate(e.to_string());
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "weft-sim destination CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(err)?).map_err(err)?;
    let mut params =
        CertificateParams::new(vec![DESTINATION_SERVER_NAME.to_string()]).map_err(err)?;
    params.subject_alt_names.push(SanType::IpAddress(host));
    let key = KeyPair::generate().map_err(err)?;
    let cert = params.signed_by(&key, &ca).map_err(err)?;
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(io(format!("writing {name}")))
    };
    write("ca.crt", ca.pem())?;
    write("tls.crt", cert.pem())?;
    // The serving key: its owner's only (it was world-readable).
    let key_path = dir.join("tls.key");
    crate::sys::write_private(&key_path, key.serialize_pem().as_bytes())
        .map_err(io(format!("writing {}", key_path.display())))?;
    Ok(dir.join("ca.crt"))
}

/// Prometheus file service discovery for the node proxies, and a minimal
/// configuration that reads it.
fn write_prometheus(
    state: &State,
    proxies: &[NodeProxyState],
) -> Result<(PathBuf, PathBuf), MeshError> {
    let dir = state.state_dir.join("prometheus");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let targets: Vec<_> = proxies
        .iter()
        .map(|p| {
            serde_json::json!({
                "targets": [p.metrics.to_string()],
                "labels": {"job": "weft-node-proxy", "node": p.node, "weft_cluster": state.name},
            })
        })
        .collect();
    let targets_path = dir.join("node-proxies.json");
    std::fs::write(
        &targets_path,
        serde_json::to_string_pretty(&targets).expect("serializable"),
    )
    .map_err(io("writing the Prometheus targets"))?;
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: weft-node-proxy\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n",
        targets_path.display()
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).map_err(io("writing the Prometheus configuration"))?;
    Ok((targets_path, config_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = MeshBinaries::in_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("weft-identity"), "{err}");
        assert!(err.contains("cargo build --workspace --bins`"), "{err}");
        for name in ["weft-identity", "weft-destination"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let err = MeshBinaries::in_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("weft-node-proxy"), "{err}");
        std::fs::write(dir.path().join("weft-node-proxy"), "").unwrap();
        let err = MeshBinaries::in_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("weft-cni"), "{err}");
        std::fs::write(dir.path().join("weft-cni"), "").unwrap();
        assert!(MeshBinaries::in_dir(dir.path()).is_ok());
    }

    #[test]
    fn the_build_command_names_the_profile_of_the_directory() {
        let cmd = |d: &str| build_command(Path::new(d));
        assert_eq!(cmd("/w/target/debug"), "cargo build --workspace --bins");
        assert_eq!(
            cmd("/w/target/release"),
            "cargo build --workspace --bins --release"
        );
    }

    /// The destination's serving certificate is what a node proxy will
    /// accept: it chains to the CA written next to it, for server auth,
    /// under the service name and the host address (and nothing else), and
    /// its key is the one in tls.key.
    #[test]
    fn the_destination_certificate_verifies_for_its_names() {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
        use x509_parser::prelude::FromDer;
        let dir = tempfile::tempdir().unwrap();
        let host: IpAddr = "10.240.3.1".parse().unwrap();
        // A key file left over world-readable (as older versions wrote it)
        // is narrowed, not reused with its mode.
        std::fs::write(dir.path().join("tls.key"), "old").unwrap();
        let ca = write_destination_tls(dir.path(), host).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "tls.key is its owner's only");
        let ca = CertificateDer::from_pem_file(ca).unwrap();
        let leaf = CertificateDer::from_pem_file(dir.path().join("tls.crt")).unwrap();
        let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
        let cert = webpki::EndEntityCert::try_from(&leaf).unwrap();
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .expect("chains to ca.crt");
        for name in [
            ServerName::try_from(DESTINATION_SERVER_NAME).unwrap(),
            ServerName::IpAddress(host.into()),
        ] {
            cert.verify_is_valid_for_subject_name(&name)
                .unwrap_or_else(|e| panic!("not valid for {name:?}: {e:?}"));
        }
        for other in ["other.weft-system.svc", "10.240.3.2"] {
            let name = ServerName::try_from(other).unwrap();
            assert!(
                cert.verify_is_valid_for_subject_name(&name).is_err(),
                "valid for {other}"
            );
        }
        // Another CA's certificate does not chain: the check above can fail.
        let other_dir = tempfile::tempdir().unwrap();
        let other_ca =
            CertificateDer::from_pem_file(write_destination_tls(other_dir.path(), host).unwrap())
                .unwrap();
        assert!(
            cert.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[webpki::anchor_from_trusted_cert(&other_ca).unwrap()],
                &[],
                UnixTime::now(),
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .is_err()
        );
        // The private key is the certificate's.
        let key =
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("tls.key")).unwrap())
                .unwrap();
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&leaf).unwrap();
        assert_eq!(
            parsed.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
    }
}
