//! A simulated cluster for one test: up from a manifest string, down on drop
//! (also when the test panics), with a name no other test process uses.
//!
//! ```no_run
//! let cluster = weft_sim::TestCluster::up(r#"
//! apiVersion: v1
//! kind: Pod
//! metadata: {name: a, namespace: default}
//! spec: {nodeName: n1, containers: [{name: c, command: [sleep, infinity]}]}
//! "#).unwrap();
//! let out = cluster.exec("default/a", &["ip", "-4", "addr"]);
//! assert!(out.status.success());
//! ```

use crate::cluster::{self, Cluster, Options, SimError};
use crate::state::{PodState, State};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct TestCluster {
    cluster: Cluster,
    opts: Options,
    dir: tempfile::TempDir,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Test workloads written into every test cluster's directory, so manifests
/// can run them as `command: [./tcp_echo.py, "9000"]`.
pub const APPS: &[(&str, &str)] = &[
    ("tcp_echo.py", include_str!("../apps/tcp_echo.py")),
    ("tcp_client.py", include_str!("../apps/tcp_client.py")),
    ("tcp_probe.py", include_str!("../apps/tcp_probe.py")),
    ("http_server.py", include_str!("../apps/http_server.py")),
    ("grpc_echo.py", include_str!("../apps/grpc_echo.py")),
    ("banner.py", include_str!("../apps/banner.py")),
    ("replica.py", include_str!("../apps/replica.py")),
    ("replica_load.py", include_str!("../apps/replica_load.py")),
];

/// A Service `web` with three replicas on two nodes (`replica.py`: each
/// prints what it got and answers with its name; SIGUSR1 closes its port)
/// and a client pod on node-a, in an enrolled namespace: what the failover
/// tests and the failover and rollout benchmarks run against.
pub const THREE_REPLICAS: &str = include_str!("../testdata/three-replicas.yaml");

impl TestCluster {
    /// Brings up a cluster from one multi-document YAML string.
    pub fn up(manifests: &str) -> Result<Self, SimError> {
        Self::up_with_files(&[("cluster.yaml", manifests)])
    }

    /// Brings up a cluster from several files (manifests, and scripts the
    /// pods run: containers start in this directory; `*.sh` and `*.py`
    /// files are made executable).
    pub fn up_with_files(files: &[(&str, &str)]) -> Result<Self, SimError> {
        Self::up_with(files, |_| {})
    }

    /// Like [`TestCluster::up_with_files`], adjusting the options first (for
    /// example to start node agents in mesh mode).
    pub fn up_with(
        files: &[(&str, &str)],
        adjust: impl FnOnce(&mut Options),
    ) -> Result<Self, SimError> {
        let dir = tempfile::tempdir().map_err(cluster_io("creating a manifest directory"))?;
        write_files(dir.path(), files).map_err(cluster_io("writing the manifest directory"))?;
        let name = format!(
            "t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut opts = Options::detect()?;
        adjust(&mut opts);
        let cluster = cluster::up(dir.path(), &name, &opts)?;
        Ok(Self { cluster, opts, dir })
    }

    pub fn name(&self) -> &str {
        &self.cluster.state.name
    }

    pub fn state(&self) -> &State {
        &self.cluster.state
    }

    /// The directory the manifests were written to (the local source of the
    /// destination service reads it; tests edit files there).
    pub fn manifest_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Reads the state file again: in a `--kube` cluster the kubelet
    /// rewrites it as pods come and go.
    pub fn refresh_state(&mut self) {
        if let Ok(state) = State::load(&self.cluster.state.state_dir) {
            self.cluster.state = state;
        }
    }

    /// A pod by `namespace/name`; panics with the list of pods if absent.
    pub fn pod(&self, key: &str) -> &PodState {
        self.state().pod(key).unwrap_or_else(|| {
            let known: Vec<String> = self.state().pods.iter().map(|p| p.key()).collect();
            panic!("no pod {key} in test cluster; pods: {known:?}")
        })
    }

    /// A `--kube` cluster's kubectl, as its admin; panics if the cluster
    /// was not started with a control plane.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let kube = self
            .state()
            .kube
            .as_ref()
            .expect("the test cluster has no API server: start it with `Options::kube`");
        kube.kubectl()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    /// Like [`TestCluster::kubectl`]; panics with its stderr unless it
    /// exits 0. Returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `argv` inside a pod and collects its output.
    pub fn exec(&self, pod: &str, argv: &[&str]) -> Output {
        let args: Vec<String> = argv[1..].iter().map(|s| s.to_string()).collect();
        let mut cmd = cluster::pod_command(self.state(), pod, argv[0], &args)
            .unwrap_or_else(|e| panic!("exec in {pod}: {e}"));
        cmd.output()
            .unwrap_or_else(|e| panic!("exec {argv:?} in {pod}: {e}"))
    }

    /// Runs `argv` inside a pod; panics with its stderr unless it exits 0.
    /// Returns stdout.
    pub fn exec_ok(&self, pod: &str, argv: &[&str]) -> String {
        let out = self.exec(pod, argv);
        assert!(
            out.status.success(),
            "{argv:?} in {pod} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Err(e) = cluster::down(self.name(), &self.opts) {
            eprintln!("test cluster {}: teardown failed: {e}", self.name());
        }
        // Reap the killed containers (this process started them).
        for (_, _, child) in &mut self.cluster.children {
            let _ = child.wait();
        }
        for (_, child) in &mut self.cluster.control_plane.children {
            let _ = child.wait();
        }
    }
}

fn cluster_io(what: &'static str) -> impl FnOnce(std::io::Error) -> SimError {
    move |e| SimError::Sys(crate::sys::io(what)(e))
}

/// Everything of simulator `name` still present on the machine: network
/// namespaces, per-netns files, cgroups, the state directory, the host
/// interface of `slot` (when known). Empty means a clean teardown.
pub fn leftovers(name: &str, slot: Option<u8>) -> Vec<String> {
    let mut left = Vec::new();
    let prefix = crate::plan::netns_prefix(name);
    for ns in crate::sys::netns_list() {
        if ns.starts_with(&prefix) {
            left.push(format!("network namespace {ns}"));
        }
    }
    for entry in std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            left.push(format!("{}", entry.path().display()));
        }
    }
    if let Ok(opts) = Options::detect() {
        for mount in crate::sys::mounts_under(&opts.layout.run_dir.join(name)) {
            left.push(format!("mount {}", mount.display()));
        }
        for dir in [
            opts.layout.cgroup_root.join(name),
            opts.layout.run_dir.join(name),
        ] {
            if dir.exists() {
                left.push(format!("{}", dir.display()));
            }
        }
    }
    let pins = crate::plan::bpf_pin_root(name);
    if pins.exists() {
        left.push(format!("eBPF pins under {}", pins.display()));
    }
    if let Some(slot) = slot {
        // The slot's interface counts only while its alias names this
        // cluster: a simulator started since may have taken the freed slot.
        let host = crate::plan::host_interface(slot);
        if crate::sys::link_alias(&host).as_deref()
            == Some(crate::plan::host_interface_alias(name).as_str())
        {
            left.push(format!("host interface {host}"));
        }
    }
    left
}

/// Tears down the simulator `name` when dropped: for tests that drive
/// `cluster::up` or the `weft-sim` binary by hand, so a failing assertion
/// does not leave the cluster behind.
pub struct DownOnDrop(pub String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if let Ok(opts) = Options::detect() {
            let _ = cluster::down(&self.0, &opts);
        }
    }
}

/// A temporary manifest directory holding `files` and the test [`APPS`]
/// (scripts made executable), for tests that call `cluster::up` themselves.
pub fn manifest_dir(files: &[(&str, &str)]) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    write_files(dir.path(), files)?;
    Ok(dir)
}

fn write_files(dir: &Path, files: &[(&str, &str)]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (name, text) in APPS.iter().chain(files) {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        if name.ends_with(".sh") || name.ends_with(".py") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}
