//! A simulator cluster with the real mesh (control plane on the host, a node
//! proxy per node), torn down on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_sim::TestCluster;
use weft_sim::mesh::{Mesh, MeshBinaries};

/// The mesh programs, next to the `weft-sim` Cargo built for this test (the
/// same profile directory). Tests never build them (`cargo xtask test`
/// builds every binary first); a missing one fails with the command that
/// builds it.
pub fn binaries() -> MeshBinaries {
    let sim = Path::new(env!("CARGO_BIN_EXE_weft-sim"));
    MeshBinaries::in_dir(sim.parent().unwrap()).unwrap_or_else(|e| panic!("{e}"))
}

/// Brings the cluster and the mesh up; the guard tears both down.
pub struct MeshCluster {
    cluster: Option<TestCluster>,
    pub mesh: Arc<Mesh>,
}

impl MeshCluster {
    /// `files`: manifests and scripts; `configure` adjusts the mesh
    /// (e.g. the node proxies' drain deadline) before it starts.
    pub fn up(files: &[(&str, &str)], configure: impl FnOnce(&mut Mesh)) -> Self {
        let mut mesh = Mesh::new(binaries());
        configure(&mut mesh);
        let mesh = Arc::new(mesh);
        let cluster = TestCluster::up_with(files, |o| o.node_agents = Some(mesh.clone()))
            .expect("cluster with the mesh");
        Self {
            cluster: Some(cluster),
            mesh,
        }
    }

    /// The same on a real control plane (`up --kube`): the mesh's control
    /// plane reads the API server, the kubelet's CNI plugin registers pods.
    pub fn up_kube(files: &[(&str, &str)], configure: impl FnOnce(&mut Mesh)) -> Self {
        let kube = weft_sim::kube::KubeBinaries::from_cache().unwrap_or_else(|e| panic!("{e}"));
        let mut mesh = Mesh::new(binaries());
        configure(&mut mesh);
        let mesh = Arc::new(mesh);
        let cluster = TestCluster::up_with(files, |o| {
            o.node_agents = Some(mesh.clone());
            o.kube = Some(kube);
        })
        .expect("--kube cluster with the mesh");
        Self {
            cluster: Some(cluster),
            mesh,
        }
    }

    pub fn cluster(&self) -> &TestCluster {
        self.cluster.as_ref().unwrap()
    }

    pub fn node_ip(&self, node: &str) -> Ipv4Addr {
        self.cluster().state().node(node).unwrap().ip
    }

    /// `/ready` of a node's proxy: its HTTP status, `None` if nothing answers.
    pub fn ready_status(&self, node: &str) -> Option<u16> {
        super::http_get(SocketAddr::new(self.node_ip(node).into(), 15021), "/ready").map(|r| r.0)
    }

    /// One curl from `pod` (20 s at most): the status and the body.
    pub fn curl(&self, pod: &str, url: &str) -> (u16, String) {
        let out = self.cluster().exec(
            pod,
            &[
                "curl",
                "-sS",
                "--noproxy",
                "*",
                "--max-time",
                "20",
                "-w",
                "\n=%{http_code}",
                url,
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = stdout.rsplit_once("\n=").unwrap_or_else(|| {
            panic!(
                "{pod} {url}: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (code.trim().parse().unwrap(), body.to_string())
    }

    /// `/config_dump` is on 127.0.0.1:15000 inside the node's namespace.
    pub fn config_dump(&self, node: &str) -> serde_json::Value {
        let state = self.cluster().state();
        let node = state.node(node).unwrap();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node.netns,
                "curl",
                "-s",
                "--max-time",
                "5",
                "http://127.0.0.1:15000/config_dump",
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("config_dump: {e}: {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Whether `node`'s proxy currently captures pod `name`.
    pub fn captures(&self, node: &str, name: &str) -> bool {
        self.config_dump(node)["pods"]
            .as_array()
            .is_some_and(|pods| pods.iter().any(|p| p["name"] == name))
    }

    /// Tears down and checks nothing is left behind.
    pub fn down(mut self) {
        let state = self.cluster().state().clone();
        drop(self.cluster.take());
        self.mesh.reap();
        assert_eq!(
            weft_sim::testing::leftovers(&state.name, Some(state.slot)),
            Vec::<String>::new()
        );
    }
}

impl Drop for MeshCluster {
    fn drop(&mut self) {
        drop(self.cluster.take());
        self.mesh.reap();
    }
}

/// How long the mesh tests wait for something to happen: generous, because
/// CI runs several clusters at once on two cores.
pub const PATIENCE: Duration = Duration::from_secs(45);

/// Polls `done` every 100 ms until it holds; panics after `within`.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {within:?}");
}
