//! A simulated cluster with the mesh (control plane and node proxies).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use weft_sim::TestCluster;
use weft_sim::mesh::{Mesh, MeshBinaries};

/// The mesh programs: the node proxy Cargo built for this test, the control
/// plane next to it (built once if absent).
pub fn binaries() -> MeshBinaries {
    let proxy = Path::new(env!("CARGO_BIN_EXE_weft-node-proxy"));
    let dir = proxy.parent().unwrap();
    if let Ok(b) = MeshBinaries::in_dir(dir) {
        return b;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target_dir = dir.parent().unwrap();
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "-p",
            "weft-identity",
            "-p",
            "weft-destination",
            "--bins",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .expect("running cargo build for the control plane binaries");
    assert!(status.success(), "cargo build --bins failed");
    MeshBinaries::in_dir(dir).expect("control plane binaries after cargo build")
}

/// Brings the cluster and the mesh up; dropping it tears both down.
pub struct MeshCluster {
    cluster: Option<TestCluster>,
    pub mesh: Arc<Mesh>,
}

impl MeshCluster {
    pub fn up(files: &[(&str, &str)]) -> Self {
        let mesh = Arc::new(Mesh::new(binaries()));
        let cluster = TestCluster::up_with(files, |o| o.node_agents = Some(mesh.clone()))
            .expect("cluster with the mesh");
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
