//! `weft-sim up DIR --kube`: a real Kubernetes control plane for the
//! simulated cluster — etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler, upstream releases built by `cargo xtask setup` — with a
//! `Node` object per simulated node and DIR's manifests applied with
//! server-side apply.
//!
//! Addresses (`S` is the simulator's slot, so simulators run side by side):
//! etcd on `127.240.S.1:2379` (loopback only: nothing in the cluster talks
//! to etcd but the API server), the API server on the fabric host address
//! `10.240.S.1:6443` (the host and every node reach it), the controller
//! manager's and scheduler's health endpoints on `127.240.S.1:10257/10259`.
//! Everything — data, certificates, kubeconfigs, logs — lives under
//! `<state_dir>/kube`, and the processes in the cgroup
//! `<cluster cgroup>/kube-control-plane`, so `down` removes all of it.

use crate::state::State;
use crate::sys::{self, CgroupHandle, SysError};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

include!("../k8s/versions.rs");

/// The Service CIDR of the simulator (docs/simulator.md), also the API
/// server's `--service-cluster-ip-range`.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// The node a `--kube` cluster gets when DIR names none.
pub const DEFAULT_NODE: &str = "node-a";

/// The issuer (and default audience) of service-account tokens.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Largest manifest file read to find node names.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "the Kubernetes control plane ({KUBERNETES_VERSION}, etcd {ETCD_VERSION}) is not built: {} lacks {missing}; run `cargo xtask setup` (it builds them once into $HOME/.cache/weft/k8s/, 9 to 17 minutes cold), or set WEFT_K8S_BIN_DIR to a directory holding {CONTROL_PLANE_PROGRAMS:?}",
        dir.display()
    )]
    NotBuilt { dir: PathBuf, missing: String },
    #[error("HOME is not set: it says where the control plane cache is (or set WEFT_K8S_BIN_DIR)")]
    NoHome,
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{}: {reason}", file.display())]
    Manifest { file: PathBuf, reason: String },
    #[error("certificates of the control plane: {0}")]
    Certificate(String),
    #[error("{component} did not become ready within {seconds}s ({problem}); last lines of {}:\n{tail}", log.display())]
    NotReady {
        component: String,
        seconds: u64,
        problem: String,
        log: PathBuf,
        tail: String,
    },
    #[error("`kubectl {args}` failed ({status}): {stderr}")]
    Kubectl {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("this simulator was not started with --kube: it has no API server")]
    NotKube,
    #[error(
        "the simulated kubelet is `weft-sim kubelet`, and there is no weft-sim next to {}; build it with `cargo build -p weft-sim --bins`",
        exe.display()
    )]
    NoSimulator { exe: PathBuf },
    #[error("workloads not ready after {seconds}s: {waiting}; last lines of {}:\n{tail}", log.display())]
    WorkloadsNotReady {
        seconds: u64,
        waiting: String,
        log: PathBuf,
        tail: String,
    },
}

/// The cgroup of the simulated kubelet, in the cluster's.
pub const KUBELET_CGROUP: &str = "kubelet";

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KubeError {
    let f = sys::io(what);
    move |e| KubeError::Sys(f(e))
}

/// Where the control plane programs are: `$WEFT_K8S_BIN_DIR`, else the
/// cache `cargo xtask setup` fills, `$HOME/.cache/weft/k8s/<versions>/bin`.
#[derive(Clone, Debug)]
pub struct KubeBinaries {
    dir: PathBuf,
    /// The `weft-sim` program (its `kubelet` subcommand is the kubelet).
    simulator: PathBuf,
}

impl KubeBinaries {
    pub fn from_cache() -> Result<Self, KubeError> {
        let dir = match std::env::var_os("WEFT_K8S_BIN_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => {
                let home = std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .ok_or(KubeError::NoHome)?;
                PathBuf::from(home)
                    .join(".cache/weft/k8s")
                    .join(control_plane_cache_key())
                    .join("bin")
            }
        };
        Self::in_dir(&dir)
    }

    pub fn in_dir(dir: &Path) -> Result<Self, KubeError> {
        let missing: Vec<&str> = CONTROL_PLANE_PROGRAMS
            .iter()
            .copied()
            .filter(|p| !dir.join(p).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(KubeError::NotBuilt {
                dir: dir.to_path_buf(),
                missing: missing.join(", "),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            simulator: find_simulator()?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// `weft-sim` itself, or the one in the directory of the running program or
/// its parent (a test binary in `target/debug/deps` finds
/// `target/debug/weft-sim`).
fn find_simulator() -> Result<PathBuf, KubeError> {
    let exe = std::env::current_exe().map_err(io("finding the running program"))?;
    if exe.file_name().is_some_and(|n| n == "weft-sim") {
        return Ok(exe);
    }
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("weft-sim"))
        .find(|p| p.is_file())
        .ok_or(KubeError::NoSimulator { exe })
}

pub use crate::state::KubeState;

impl KubeState {
    /// A `kubectl` of the control plane's version, talking to this cluster
    /// as its admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// Runs kubectl and fails with its stderr unless it exits 0.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> Result<String, KubeError> {
        let out = run_kubectl(self.kubectl(), args, stdin)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(KubeError::Kubectl {
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn run_kubectl(mut cmd: Command, args: &[&str], stdin: Option<&str>) -> Result<Output, KubeError> {
    use std::io::Write;
    let mut child = cmd
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting kubectl"))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(text.as_bytes())
            .map_err(io("writing to kubectl"))?;
    }
    child.wait_with_output().map_err(io("waiting for kubectl"))
}

/// Reads an image table: a YAML map from image (`name`, or `name:tag` for
/// one tag only) to the program that plays it — absolute, or relative to
/// the file. Every program must be an executable file.
pub fn load_images(file: &Path) -> Result<BTreeMap<String, PathBuf>, KubeError> {
    let bad = |reason: String| KubeError::Manifest {
        file: file.to_path_buf(),
        reason,
    };
    let size = std::fs::metadata(file)
        .map_err(io(format!("reading {}", file.display())))?
        .len();
    if size > MAX_MANIFEST_BYTES {
        return Err(bad(format!("{size} bytes: too large for an image table")));
    }
    let text = std::fs::read_to_string(file).map_err(io(format!("reading {}", file.display())))?;
    let table: BTreeMap<String, String> = serde_yaml::from_str(&text)
        .map_err(|e| bad(format!("not a map of image to program: {e}")))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut out = BTreeMap::new();
    for (image, program) in table {
        let path = base.join(&program);
        let executable = std::fs::metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        });
        if image.is_empty() || !executable {
            return Err(bad(format!(
                "image {image:?}: program {} is not an executable file",
                path.display()
            )));
        }
        out.insert(image, path);
    }
    Ok(out)
}

/// The program of `image` in `table`: the exact `name:tag` first, then the
/// name without tag or digest.
pub fn image_program<'a>(table: &'a BTreeMap<String, PathBuf>, image: &str) -> Option<&'a Path> {
    if let Some(p) = table.get(image) {
        return Some(p);
    }
    let without_digest = image.split('@').next().unwrap_or(image);
    // A tag is after the last ':' that follows the last '/' (a registry
    // port is not a tag).
    let name = match without_digest.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => without_digest,
    };
    table.get(name).map(PathBuf::as_path)
}

/// The nodes a `--kube` cluster simulates: DIR's `Node` objects and every
/// `spec.nodeName` of its Pods, else one node, [`DEFAULT_NODE`]. Only those
/// fields are read here; the API server judges the rest of every object.
pub fn node_names(dir: &Path) -> Result<BTreeSet<String>, KubeError> {
    let mut names = BTreeSet::new();
    let entries = std::fs::read_dir(dir).map_err(io(format!("reading {}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    files.sort();
    for file in files {
        let bad = |reason: String| KubeError::Manifest {
            file: file.clone(),
            reason,
        };
        let size = std::fs::metadata(&file)
            .map_err(io(format!("reading {}", file.display())))?
            .len();
        if size > MAX_MANIFEST_BYTES {
            return Err(bad(format!(
                "{size} bytes: larger than the {MAX_MANIFEST_BYTES} bytes a manifest may have"
            )));
        }
        let text =
            std::fs::read_to_string(&file).map_err(io(format!("reading {}", file.display())))?;
        for (index, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc)
                .map_err(|e| bad(format!("document {index} is not valid YAML: {e}")))?;
            let kind = value.get("kind").and_then(|k| k.as_str());
            let name = match kind {
                Some("Node") => value
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(|n| n.as_str()),
                Some("Pod") => value
                    .get("spec")
                    .and_then(|s| s.get("nodeName"))
                    .and_then(|n| n.as_str()),
                _ => None,
            };
            if let Some(name) = name {
                if !is_dns_label(name) {
                    return Err(bad(format!(
                        "document {index}: node name {name:?} is not a DNS label (a-z, 0-9, '-', at most 63)"
                    )));
                }
                names.insert(name.to_string());
            }
        }
    }
    if names.is_empty() {
        names.insert(DEFAULT_NODE.to_string());
    }
    Ok(names)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The running control plane's processes (to reap them in the foreground).
#[derive(Debug, Default)]
pub struct ControlPlane {
    pub children: Vec<(String, Child)>,
}

/// Addresses of one simulator's control plane.
struct Addresses {
    loopback: Ipv4Addr,
    host: Ipv4Addr,
}

impl Addresses {
    fn of(state: &State) -> Self {
        Self {
            loopback: Ipv4Addr::new(127, 240, state.slot, 1),
            host: state.fabric.host_ip,
        }
    }
    fn etcd_client(&self) -> String {
        format!("http://{}:2379", self.loopback)
    }
    fn etcd_peer(&self) -> String {
        format!("http://{}:2380", self.loopback)
    }
    fn api_server(&self) -> String {
        format!("https://{}:6443", self.host)
    }
}

/// Starts etcd, the API server, the controller manager and the scheduler
/// for `state`'s cluster, each waited for in turn; creates a Ready `Node`
/// per simulated node. `cluster_cgroup` is the simulator's cgroup
/// directory. Returns once the controllers run (the `default`
/// ServiceAccount exists).
pub fn start(
    state: &State,
    binaries: &KubeBinaries,
    cluster_cgroup: &Path,
    timeout: Duration,
    control_plane: &mut ControlPlane,
) -> Result<KubeState, KubeError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let dir = state.state_dir.join("kube");
    let logs = state.state_dir.join("logs");
    for d in [&dir, &logs] {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    let cgroup = cluster_cgroup.join("kube-control-plane");
    std::fs::create_dir_all(&cgroup).map_err(io(format!("creating {}", cgroup.display())))?;
    let addr = Addresses::of(state);
    let pki = write_pki(&dir, &addr)?;
    let kube = KubeState {
        kubernetes_version: KUBERNETES_VERSION.into(),
        etcd_version: ETCD_VERSION.into(),
        api_server: addr.api_server(),
        kubeconfig: dir.join("admin.kubeconfig"),
        etcd: addr.etcd_client(),
        bin_dir: binaries.dir().to_path_buf(),
        dir: dir.clone(),
        ca_file: pki.ca_cert.clone(),
        service_account_issuer: SERVICE_ACCOUNT_ISSUER.into(),
        images: BTreeMap::new(),
    };
    for (file, user, cert) in [
        ("admin.kubeconfig", "admin", &pki.admin),
        (
            "controller-manager.kubeconfig",
            "system:kube-controller-manager",
            &pki.controller_manager,
        ),
        (
            "scheduler.kubeconfig",
            "system:kube-scheduler",
            &pki.scheduler,
        ),
    ] {
        write_kubeconfig(
            &dir.join(file),
            &state.name,
            &kube.api_server,
            &pki,
            user,
            cert,
        )?;
    }
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut spawn = |name: &str, args: Vec<String>| -> Result<PathBuf, KubeError> {
        let log = logs.join(format!("{name}.log"));
        let child = spawn_in_cgroup(&binaries.program(name), &args, &cgroup, &log)?;
        control_plane.children.push((name.to_string(), child));
        Ok(log)
    };

    let etcd_log = spawn(
        "etcd",
        vec![
            "--name=weft-sim".into(),
            format!("--data-dir={}", path(&dir.join("etcd"))),
            format!("--listen-client-urls={}", addr.etcd_client()),
            format!("--advertise-client-urls={}", addr.etcd_client()),
            format!("--listen-peer-urls={}", addr.etcd_peer()),
            format!("--initial-advertise-peer-urls={}", addr.etcd_peer()),
            format!("--initial-cluster=weft-sim={}", addr.etcd_peer()),
            // A test cluster's data dies with it: no fsync, as envtest runs it.
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ],
    )?;
    let etcd_health: std::net::SocketAddr = (addr.loopback, 2379).into();
    wait_until("etcd", &etcd_log, deadline, || {
        crate::sys::http_get(etcd_health, "/health")
            .is_some_and(|(status, body)| status == 200 && body.contains("true"))
    })?;

    let api_log = spawn(
        "kube-apiserver",
        vec![
            format!("--etcd-servers={}", addr.etcd_client()),
            format!("--bind-address={}", addr.host),
            format!("--advertise-address={}", addr.host),
            "--secure-port=6443".into(),
            format!("--cert-dir={}", path(&dir.join("apiserver"))),
            format!("--tls-cert-file={}", path(&pki.api_server_cert)),
            format!("--tls-private-key-file={}", path(&pki.api_server_key)),
            format!("--client-ca-file={}", path(&pki.ca_cert)),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", path(&pki.sa_public)),
            format!("--service-account-signing-key-file={}", path(&pki.sa_key)),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ],
    )?;
    let api_started = Instant::now();
    wait_until("kube-apiserver", &api_log, deadline, || {
        kube.kubectl_ok(&["get", "--raw=/readyz"], None)
            .is_ok_and(|body| body.trim() == "ok")
    })?;
    eprintln!(
        "weft-sim: etcd and kube-apiserver ready in {:.1}s (the API server {:.1}s after etcd)",
        started.elapsed().as_secs_f64(),
        api_started.elapsed().as_secs_f64()
    );

    let cm_kubeconfig = path(&dir.join("controller-manager.kubeconfig"));
    let cm_log = spawn(
        "kube-controller-manager",
        vec![
            format!("--kubeconfig={cm_kubeconfig}"),
            format!("--authentication-kubeconfig={cm_kubeconfig}"),
            format!("--authorization-kubeconfig={cm_kubeconfig}"),
            format!("--bind-address={}", addr.loopback),
            "--secure-port=10257".into(),
            format!("--cert-dir={}", path(&dir.join("controller-manager"))),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=true".into(),
            format!("--service-account-private-key-file={}", path(&pki.sa_key)),
            format!("--root-ca-file={}", path(&pki.ca_cert)),
            format!("--cluster-signing-cert-file={}", path(&pki.ca_cert)),
            format!("--cluster-signing-key-file={}", path(&pki.ca_key)),
            format!("--cluster-name={}", state.name),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // Node CIDRs are the simulator's. The node lifecycle
            // controller runs: the simulated kubelet renews each node's
            // Lease, and a node whose kubelet is gone is tainted as on a
            // cluster.
            "--controllers=*,-nodeipam".into(),
            "--profiling=false".into(),
        ],
    )?;
    let sched_kubeconfig = path(&dir.join("scheduler.kubeconfig"));
    let sched_log = spawn(
        "kube-scheduler",
        vec![
            format!("--kubeconfig={sched_kubeconfig}"),
            format!("--authentication-kubeconfig={sched_kubeconfig}"),
            format!("--authorization-kubeconfig={sched_kubeconfig}"),
            format!("--bind-address={}", addr.loopback),
            "--secure-port=10259".into(),
            format!("--cert-dir={}", path(&dir.join("scheduler"))),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
        ],
    )?;
    create_nodes(&kube, state)?;
    wait_until("kube-controller-manager", &cm_log, deadline, || {
        kube.kubectl_ok(&["get", "serviceaccount", "default", "-n", "default"], None)
            .is_ok()
            && healthy(&format!("https://{}:10257/healthz", addr.loopback))
    })?;
    wait_until("kube-scheduler", &sched_log, deadline, || {
        healthy(&format!("https://{}:10259/healthz", addr.loopback))
    })?;
    eprintln!(
        "weft-sim: Kubernetes control plane ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(kube)
}

/// `GET url` answers `ok` (the components' own serving certificates are
/// self-signed, so they are not verified: this is a liveness probe on
/// loopback, as the kubelet's probes are).
fn healthy(url: &str) -> bool {
    Command::new("curl")
        .args(["-sk", "--max-time", "2", url])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"ok")
}

fn spawn_in_cgroup(
    program: &Path,
    args: &[String],
    cgroup: &Path,
    log: &Path,
) -> Result<Child, KubeError> {
    let out = std::fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
    let err = out.try_clone().map_err(io("duplicating a log file"))?;
    let cg = CgroupHandle::open(cgroup)?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // Its own process group: a Ctrl-C meant for `weft-sim up` reaches the
    // simulator, which then tears down in order.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    sys::join_cgroup_before_exec(&mut cmd, &cg);
    let child = cmd
        .spawn()
        .map_err(io(format!("starting {}", program.display())))?;
    drop(cg); // only after spawn: the child writes to it before exec
    Ok(child)
}

fn wait_until(
    component: &str,
    log: &Path,
    deadline: Instant,
    mut ready: impl FnMut() -> bool,
) -> Result<(), KubeError> {
    let started = Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(KubeError::NotReady {
                component: component.into(),
                seconds: started.elapsed().as_secs(),
                problem: "not ready".into(),
                log: log.to_path_buf(),
                tail: sys::tail(log, 20),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `Node` per simulated node, then its status: Ready, with addresses
/// and allocatable resources (the scheduler binds pods only to such nodes).
fn create_nodes(kube: &KubeState, state: &State) -> Result<(), KubeError> {
    for n in &state.nodes {
        let node = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": n.name,
                "labels": {
                    "kubernetes.io/hostname": n.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                },
            },
            "spec": {
                "podCIDR": n.pod_cidr,
                "podCIDRs": [n.pod_cidr, n.pod_cidr_v6],
            },
        });
        kube.kubectl_ok(
            &[
                "apply",
                "--server-side",
                // Not DIR's manager: applying DIR (which may hold the same
                // Node) must not drop the fields the kubelet set.
                "--field-manager=weft-sim-kubelet",
                "-f",
                "-",
            ],
            Some(&node.to_string()),
        )?;
        // The API server taints a new Node not-ready; the node lifecycle
        // controller lifts it once it sees the node Ready, on its next pass:
        // lifting it here lets DIR's pods be scheduled at once.
        kube.kubectl_ok(
            &[
                "patch",
                "node",
                &n.name,
                "--type=merge",
                "-p",
                r#"{"spec":{"taints":null}}"#,
            ],
            None,
        )?;
        let status = serde_json::json!({ "status": node_status(n) });
        kube.kubectl_ok(
            &[
                "patch",
                "node",
                &n.name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ],
            None,
        )?;
    }
    Ok(())
}

fn node_status(n: &crate::state::NodeState) -> serde_json::Value {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let now = k8s_openapi::chrono::DateTime::from_timestamp(seconds, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true);
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        serde_json::json!({
            "type": kind, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        })
    };
    let resources = serde_json::json!({
        "cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi",
    });
    serde_json::json!({
        "conditions": [
            condition("Ready", "True", "KubeletReady", "weft-sim is posting ready status"),
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "simulated"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "simulated"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "simulated"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": n.ip.to_string()},
            {"type": "InternalIP", "address": n.ipv6.to_string()},
            {"type": "Hostname", "address": n.name},
        ],
        "capacity": resources,
        "allocatable": resources,
        "nodeInfo": {
            "kubeletVersion": KUBERNETES_VERSION,
            "kubeProxyVersion": KUBERNETES_VERSION,
            "containerRuntimeVersion": "weft-sim://0.1.0",
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            "osImage": "weft-sim",
            "kernelVersion": "",
            "machineID": "", "systemUUID": "", "bootID": "",
        },
    })
}

/// Starts `weft-sim kubelet` for the cluster (in its own cgroup, so that
/// `down` stops it before the pods). Returns its log.
pub fn start_kubelet(
    state: &State,
    binaries: &KubeBinaries,
    cluster_cgroup: &Path,
    control_plane: &mut ControlPlane,
) -> Result<Vec<PathBuf>, KubeError> {
    let cgroup = cluster_cgroup.join(KUBELET_CGROUP);
    std::fs::create_dir_all(&cgroup).map_err(io(format!("creating {}", cgroup.display())))?;
    // One kubelet per node, as on a cluster: each runs its node's pods,
    // renews its node's Lease and keeps its node's kube-proxy rules.
    let mut logs = Vec::new();
    for node in &state.nodes {
        let log = state
            .state_dir
            .join("logs")
            .join(format!("kubelet.{}.log", node.name));
        let args = vec![
            "kubelet".to_string(),
            "--state-dir".to_string(),
            state.state_dir.to_string_lossy().into_owned(),
            "--node".to_string(),
            node.name.clone(),
        ];
        let child = spawn_in_cgroup(&binaries.simulator, &args, &cgroup, &log)?;
        control_plane
            .children
            .push((format!("weft-sim kubelet ({})", node.name), child));
        logs.push(log);
    }
    Ok(logs)
}

/// Waits until every Pod is Ready (or Succeeded) and every Deployment and
/// DaemonSet has all its replicas ready.
pub fn wait_workloads_ready(
    kube: &KubeState,
    timeout: Duration,
    kubelet_logs: &[PathBuf],
) -> Result<(), KubeError> {
    let started = Instant::now();
    loop {
        let waiting = not_ready(kube)?;
        if waiting.is_empty() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            // The log of the kubelet with the most recent lines.
            let log = kubelet_logs
                .iter()
                .max_by_key(|l| std::fs::metadata(l).and_then(|m| m.modified()).ok())
                .cloned()
                .unwrap_or_default();
            return Err(KubeError::WorkloadsNotReady {
                seconds: started.elapsed().as_secs(),
                waiting: waiting.join(", "),
                tail: sys::tail(&log, 10),
                log,
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What is not ready yet, one phrase each.
fn not_ready(kube: &KubeState) -> Result<Vec<String>, KubeError> {
    let text = kube.kubectl_ok(
        &["get", "pods,deployments,daemonsets", "-A", "-o", "json"],
        None,
    )?;
    let list: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let mut waiting = Vec::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let kind = item["kind"].as_str().unwrap_or_default();
        let name = format!(
            "{kind} {}/{}",
            item["metadata"]["namespace"].as_str().unwrap_or_default(),
            item["metadata"]["name"].as_str().unwrap_or_default()
        );
        if !item["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        let status = &item["status"];
        let count = |v: &serde_json::Value| v.as_i64().unwrap_or(0);
        match kind {
            "Pod" => {
                if status["phase"] == "Succeeded" {
                    continue;
                }
                let ready = status["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                if !ready {
                    let containers = status["containerStatuses"].as_array();
                    let waiting_message = containers
                        .into_iter()
                        .flatten()
                        .find_map(|c| c["state"]["waiting"]["message"].as_str());
                    let unready: Vec<&str> = containers
                        .into_iter()
                        .flatten()
                        .filter(|c| c["ready"] != true)
                        .filter_map(|c| c["name"].as_str())
                        .collect();
                    let why = match (waiting_message, status["phase"].as_str()) {
                        (Some(message), _) => message.to_string(),
                        (None, Some("Running")) => format!(
                            "running; not ready: {} (a container is ready once its readiness probe succeeds, or without one once its declared TCP ports listen)",
                            unready.join(", ")
                        ),
                        (None, phase) => phase.unwrap_or("Pending").to_string(),
                    };
                    waiting.push(format!("{name} ({why})"));
                }
            }
            "Deployment" => {
                let want = item["spec"]["replicas"].as_i64().unwrap_or(1);
                if count(&status["readyReplicas"]) < want
                    || count(&status["observedGeneration"]) < count(&item["metadata"]["generation"])
                {
                    waiting.push(format!(
                        "{name} ({} of {want} ready)",
                        count(&status["readyReplicas"])
                    ));
                }
            }
            "DaemonSet" => {
                let want = count(&status["desiredNumberScheduled"]);
                if count(&status["numberReady"]) < want
                    || count(&status["observedGeneration"]) < count(&item["metadata"]["generation"])
                {
                    waiting.push(format!(
                        "{name} ({} of {want} ready)",
                        count(&status["numberReady"])
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(waiting)
}

/// Applies every manifest of `dir` with server-side apply (field manager
/// `weft-sim`). Objects whose Namespace or CRD appears in the same run are
/// refused until it exists, so while those are the only errors the apply
/// is repeated (until `timeout`); any other error fails at once.
pub fn apply_dir(kube: &KubeState, dir: &Path, timeout: Duration) -> Result<(), KubeError> {
    let dir = dir.to_string_lossy();
    let args = [
        "apply",
        "--server-side",
        "--field-manager=weft-sim",
        "-f",
        dir.as_ref(),
    ];
    let deadline = Instant::now() + timeout;
    loop {
        match kube.kubectl_ok(&args, None) {
            Ok(_) => return Ok(()),
            Err(KubeError::Kubectl { stderr, .. })
                if waits_for_another_object(&stderr) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether every error of an apply is an object waiting for one that the
/// same apply creates: its Namespace, or the CRD of its kind.
fn waits_for_another_object(stderr: &str) -> bool {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("Warning:"))
        .collect();
    !errors.is_empty()
        && errors.iter().all(|l| {
            (l.contains("namespaces \"") && l.contains("not found"))
                || l.contains("no matches for kind")
                || l.contains("ensure CRDs are installed first")
        })
}

/// The certificates and keys of the control plane.
struct Pki {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    api_server_cert: PathBuf,
    api_server_key: PathBuf,
    sa_key: PathBuf,
    sa_public: PathBuf,
    admin: ClientCert,
    controller_manager: ClientCert,
    scheduler: ClientCert,
}

struct ClientCert {
    cert: PathBuf,
    key: PathBuf,
}

/// A CA of the cluster's own; the API server's serving certificate (its
/// addresses and the `kubernetes` Service's names); client certificates
/// for the admin (`system:masters`), the controller manager and the
/// scheduler (their built-in RBAC users); the service-account signing key.
fn write_pki(dir: &Path, addr: &Addresses) -> Result<Pki, KubeError> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    let err = |e: rcgen::Error| KubeError::Certificate(e.to_string());
    let pki_dir = dir.join("pki");
    std::fs::create_dir_all(&pki_dir).map_err(io(format!("creating {}", pki_dir.display())))?;
    let write = |name: &str, text: &str, private: bool| -> Result<PathBuf, KubeError> {
        let path = pki_dir.join(name);
        write_file(&path, text, private)?;
        Ok(path)
    };

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "weft-sim kubernetes CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;

    let mut server = CertificateParams::new(vec![
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
        "localhost".to_string(),
    ])
    .map_err(err)?;
    for ip in [
        addr.host,
        addr.loopback,
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::new(10, 96, 0, 1),
    ] {
        server.subject_alt_names.push(SanType::IpAddress(ip.into()));
    }
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().map_err(err)?;
    let server_cert = server.signed_by(&server_key, &ca).map_err(err)?;

    let client = |file: &str, cn: &str, org: Option<&str>| -> Result<ClientCert, KubeError> {
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(org) = org {
            p.distinguished_name.push(DnType::OrganizationName, org);
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &ca).map_err(err)?;
        Ok(ClientCert {
            cert: write(&format!("{file}.crt"), &cert.pem(), false)?,
            key: write(&format!("{file}.key"), &key.serialize_pem(), true)?,
        })
    };
    let sa = KeyPair::generate().map_err(err)?;

    Ok(Pki {
        ca_cert: write("ca.crt", &ca.pem(), false)?,
        ca_key: write("ca.key", &ca_key_pem, true)?,
        api_server_cert: write("apiserver.crt", &server_cert.pem(), false)?,
        api_server_key: write("apiserver.key", &server_key.serialize_pem(), true)?,
        sa_key: write("sa.key", &sa.serialize_pem(), true)?,
        sa_public: write("sa.pub", &sa.public_key_pem(), false)?,
        admin: client("admin", "weft-sim-admin", Some("system:masters"))?,
        controller_manager: client("controller-manager", "system:kube-controller-manager", None)?,
        scheduler: client("scheduler", "system:kube-scheduler", None)?,
    })
}

fn write_kubeconfig(
    path: &Path,
    cluster: &str,
    server: &str,
    pki: &Pki,
    user: &str,
    cert: &ClientCert,
) -> Result<(), KubeError> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "server": server,
            "certificate-authority": pki.ca_cert,
        }}],
        "users": [{"name": user, "user": {
            "client-certificate": cert.cert,
            "client-key": cert.key,
        }}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
    });
    let text = serde_json::to_string_pretty(&config).expect("a kubeconfig serializes");
    write_file(path, &text, true)
}

/// Writes `text` to `path`, readable only by its owner when `private`.
fn write_file(path: &Path, text: &str, private: bool) -> Result<(), KubeError> {
    if private {
        return crate::sys::write_private(path, text.as_bytes())
            .map_err(io(format!("writing {}", path.display())));
    }
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_modules_pin_the_versions_the_simulator_looks_for() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s");
        let kubernetes = std::fs::read_to_string(root.join("kubernetes/go.mod")).unwrap();
        assert!(
            kubernetes.contains(&format!("require k8s.io/kubernetes {KUBERNETES_VERSION}\n")),
            "e2e/k8s/kubernetes/go.mod does not require k8s.io/kubernetes {KUBERNETES_VERSION}"
        );
        let staging = KUBERNETES_VERSION.replacen("v1.", "v0.", 1);
        assert!(kubernetes.contains(&format!("k8s.io/api => k8s.io/api {staging}")));
        let etcd = std::fs::read_to_string(root.join("etcd/go.mod")).unwrap();
        assert!(
            etcd.contains(&format!(
                "require go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n"
            )),
            "e2e/k8s/etcd/go.mod does not require etcd {ETCD_VERSION}"
        );
    }

    #[test]
    fn node_names_come_from_nodes_and_pods_else_one_default() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        )
        .unwrap();
        assert_eq!(
            node_names(dir.path()).unwrap(),
            BTreeSet::from([DEFAULT_NODE.to_string()])
        );
        std::fs::write(
            dir.path().join("b.yaml"),
            "kind: Node\nmetadata: {name: n2}\n---\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: n1}\n---\nkind: Deployment\nspec: {nodeName: nope}\n",
        )
        .unwrap();
        assert_eq!(
            node_names(dir.path()).unwrap(),
            BTreeSet::from(["n1".to_string(), "n2".to_string()])
        );
    }

    #[test]
    fn hostile_node_names_and_yaml_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "kind: Node\nmetadata: {name: \"../etc\"}\n",
        )
        .unwrap();
        let e = node_names(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a DNS label"), "{e}");
        std::fs::write(dir.path().join("a.yaml"), "kind: [unclosed\n").unwrap();
        let e = node_names(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not valid YAML"), "{e}");
    }

    #[test]
    fn images_map_to_programs_by_name_and_tag() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("images.yaml");
        std::fs::write(
            &table,
            "registry.example:5000/weft/proxy: /bin/true\nweft/ca:v2: /bin/false\n",
        )
        .unwrap();
        let images = load_images(&table).unwrap();
        let find = |i: &str| image_program(&images, i).map(|p| p.to_path_buf());
        assert_eq!(
            find("registry.example:5000/weft/proxy:1.0"),
            Some("/bin/true".into())
        );
        assert_eq!(
            find("registry.example:5000/weft/proxy@sha256:abc"),
            Some("/bin/true".into())
        );
        assert_eq!(find("weft/ca:v2"), Some("/bin/false".into()));
        assert_eq!(find("weft/ca:v3"), None);
        std::fs::write(&table, "weft/x: ./missing\n").unwrap();
        let e = load_images(&table).unwrap_err().to_string();
        assert!(e.contains("not an executable file"), "{e}");
        std::fs::write(&table, "[a, b]\n").unwrap();
        let e = load_images(&table).unwrap_err().to_string();
        assert!(e.contains("not a map of image to program"), "{e}");
    }
}
