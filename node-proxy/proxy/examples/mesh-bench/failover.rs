//! `WEFT_BENCH_PART=failover`: requests failed when one of three replicas
//! is killed under load, next to a baseline run without a kill (issue
//! #20; target 0). The same cluster and load as `e2e/tests/failover.rs`:
//! three replicas of a Service on two nodes, 4 clients x 100 requests
//! (GET and 2 KiB POST alternately, a new connection each, 10 ms apart)
//! from a pod on node-a; in the kill run, web-1 (node-b) gets SIGKILL
//! once 60 requests were answered. Each run on a fresh cluster.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use weft_sim::TestCluster;
use weft_sim::mesh::{Mesh, MeshBinaries};

const REQUESTS: usize = 400;

/// What one run saw: failed requests (status not 200), of them POSTs.
struct Run {
    answered: usize,
    failed: usize,
    failed_posts: usize,
}

fn run(binaries: &MeshBinaries, kill: bool) -> Run {
    let mesh = Arc::new(Mesh::new(binaries.clone()));
    let cluster = TestCluster::up_with(&[("c.yaml", weft_sim::testing::THREE_REPLICAS)], |o| {
        o.node_agents = Some(mesh.clone());
        o.ready_timeout = Duration::from_secs(60);
    })
    .expect("cluster with the mesh");
    let args: Vec<String> = ["web.demo", "4", "100", "60"].map(String::from).into();
    let mut child =
        weft_sim::cluster::pod_command(cluster.state(), "demo/client", "./replica_load.py", &args)
            .expect("command in the pod")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("replica_load.py starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut run = Run {
        answered: 0,
        failed: 0,
        failed_posts: 0,
    };
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line == "warm" && kill {
            let pid = cluster.state().pod("demo/web-1").expect("web-1").containers[0]
                .pid
                .expect("web-1 runs");
            // SAFETY: kill(2) to a process this simulator started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let Some(result) = line.strip_prefix("result ") else {
            continue;
        };
        let fields: Vec<&str> = result.split(' ').collect();
        run.answered += 1;
        if fields.get(2) != Some(&"200") {
            run.failed += 1;
            if fields.get(1) == Some(&"POST") {
                run.failed_posts += 1;
            }
        }
    }
    let _ = child.wait();
    drop(cluster);
    mesh.reap();
    run
}

pub fn bench(binaries: MeshBinaries) {
    let baseline = run(&binaries, false);
    let killed = run(&binaries, true);
    println!(
        "failover: 3 replicas on 2 nodes, 4 clients x 100 GET/POST (2 KiB), new connection per request"
    );
    println!("{:<40} {:>8} {:>8}", "", "failed", "of");
    println!(
        "{:<40} {:>8} {:>8}",
        "baseline, no replica killed", baseline.failed, baseline.answered
    );
    println!(
        "{:<40} {:>8} {:>8}   (of them POSTs: {}; target 0)",
        "one of three replicas SIGKILLed", killed.failed, killed.answered, killed.failed_posts
    );
    if baseline.answered != REQUESTS || killed.answered != REQUESTS {
        println!("(replica_load.py did not report every request)");
    }
}
