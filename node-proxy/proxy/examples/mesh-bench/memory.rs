//! `WEFT_BENCH_PART=memory`: the node proxy's memory with 0, 1 and 100
//! enrolled pods, and a CPU spot check, for one or several builds.
//!
//! One cluster per round and build: node-a has `MANY_PODS` enrolled pods,
//! node-b one, node-c only a pod outside the mesh, so the three proxies of
//! the same moment are the three rows. Once node-a and node-b serve all
//! their pods (admin `config_dump`), VmRSS, RssAnon and RssFile of each
//! proxy are read from /proc (the largest mappings go to stderr). Then the
//! benchmark's usual cluster (a client and a server pod) carries the closed
//! loop of the main run (HTTP/1.1 through L7 and through L4 only), for
//! requests per CPU second of the two proxies, and RSS after it: a memory
//! saving must not be paid in CPU.
//!
//! `WEFT_BENCH_MEMORY_BUILDS="label=DIR,label=DIR"` adds builds (directories
//! holding weft-node-proxy, weft-identity and weft-destination) to this one;
//! rounds alternate the builds so the machine's drift hits them alike.
//! `WEFT_BENCH_MEMORY_ROUNDS` (default 3) sets the rounds.

use super::{CLUSTER, MANY_PODS, exe, median, per_cpu_second};
use std::time::{Duration, Instant};
use weft_sim::TestCluster;
use weft_sim::mesh::{Component, Mesh, MeshBinaries};

/// One process's memory, MiB.
#[derive(Clone, Copy, Debug)]
struct Memory {
    rss: f64,
    anon: f64,
    file: f64,
}

fn memory(pid: Option<u32>) -> Memory {
    let field = |status: &str, name: &str| -> Option<f64> {
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    };
    let status = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .unwrap_or_default();
    Memory {
        rss: field(&status, "VmRSS:").unwrap_or(f64::NAN),
        anon: field(&status, "RssAnon:").unwrap_or(f64::NAN),
        file: field(&status, "RssFile:").unwrap_or(f64::NAN),
    }
}

/// The mappings holding most of a process's RSS (for stderr: where the
/// memory is), as "KiB path" lines.
fn largest_mappings(pid: Option<u32>) -> Vec<String> {
    let smaps = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/smaps")).ok())
        .unwrap_or_default();
    let mut by_name: std::collections::BTreeMap<String, u64> = Default::default();
    let mut name = String::new();
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            name = fields.get(5).map_or("[anon]".into(), |n| n.to_string());
        } else if fields.first() == Some(&"Rss:") {
            *by_name.entry(name.clone()).or_default() += fields[1].parse::<u64>().unwrap_or(0);
        }
    }
    let mut v: Vec<(u64, String)> = by_name.into_iter().map(|(n, k)| (k, n)).collect();
    v.sort_by(|a, b| b.cmp(a));
    v.into_iter()
        .take(6)
        .map(|(k, n)| format!("{k} KiB {n}"))
        .collect()
}

/// One round of one build.
#[derive(Clone, Debug)]
struct Round {
    none: Memory,
    one: Memory,
    many: Memory,
    captured: usize,
    /// HTTP/1.1 requests per CPU second of both proxies: L7, L4 only.
    per_cpu: [f64; 2],
    after_load: Memory,
}

/// Pods the node proxy of `node` serves, by its admin `config_dump`.
pub fn served_pods(cluster: &TestCluster, node: &str) -> usize {
    let Some(node) = cluster.state().node(node) else {
        return 0;
    };
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.netns,
            "curl",
            "-s",
            "--max-time",
            "5",
        ])
        .arg("http://127.0.0.1:15000/config_dump")
        .output()
        .ok();
    out.and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v["pods"].as_array().map(|p| p.len()))
        .unwrap_or(0)
}

fn round(binaries: &MeshBinaries) -> Round {
    let mut manifest = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: many, labels: {weft.io/mesh: enabled}}\n",
    );
    for i in 0..MANY_PODS {
        manifest.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i:03}, namespace: many}}\nspec: {{nodeName: node-a, containers: [{{name: main, command: [sleep, infinity]}}]}}\n"
        ));
    }
    manifest.push_str("---\napiVersion: v1\nkind: Pod\nmetadata: {name: one, namespace: many}\nspec: {nodeName: node-b, containers: [{name: main, command: [sleep, infinity]}]}\n");
    // node-c exists only through a pod outside the mesh.
    manifest.push_str("---\napiVersion: v1\nkind: Pod\nmetadata: {name: idle, namespace: default}\nspec: {nodeName: node-c, containers: [{name: main, command: [sleep, infinity]}]}\n");
    let mesh = std::sync::Arc::new(Mesh::new(binaries.clone()));
    let cluster = TestCluster::up_with(&[("many.yaml", manifest.as_str())], |o| {
        o.node_agents = Some(mesh.clone());
        o.ready_timeout = Duration::from_secs(300);
    })
    .expect("cluster with 100 enrolled pods");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut captured = (0, 0);
    while Instant::now() < deadline {
        captured = (
            served_pods(&cluster, "node-a"),
            served_pods(&cluster, "node-b"),
        );
        if captured == (MANY_PODS, 1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Let start-up work (certificate fetches, first snapshots) finish.
    std::thread::sleep(Duration::from_secs(3));
    let of = |node: &str| memory(mesh.pid(&Component::NodeProxy(node.into())));
    let (many, one, none) = (of("node-a"), of("node-b"), of("node-c"));
    for node in ["node-c", "node-a"] {
        let pid = mesh.pid(&Component::NodeProxy(node.into()));
        eprintln!("{node} largest mappings: {:?}", largest_mappings(pid));
    }
    drop(cluster);
    mesh.reap();

    let mesh = std::sync::Arc::new(Mesh::new(binaries.clone()));
    let manifest = CLUSTER.replace("BENCH_EXE", &exe());
    let cluster = TestCluster::up_with(
        &[
            ("c.yaml", manifest.as_str()),
            ("conn_rtt.py", super::CONN_RTT),
        ],
        |o| {
            o.node_agents = Some(mesh.clone());
            o.ready_timeout = Duration::from_secs(60);
        },
    )
    .expect("cluster with the mesh");
    let per_cpu =
        [8080, 8090].map(|port| per_cpu_second(&cluster, &mesh, port, super::http::Proto::Http1).0);
    let after_load = memory(mesh.pid(&Component::NodeProxy("node-b".into())));
    drop(cluster);
    mesh.reap();
    Round {
        none,
        one,
        many,
        captured: captured.0,
        per_cpu,
        after_load,
    }
}

/// The builds to compare: this one, then `WEFT_BENCH_MEMORY_BUILDS`.
fn builds(this: MeshBinaries) -> Vec<(String, MeshBinaries)> {
    let mut builds = vec![("this build".to_string(), this)];
    for entry in std::env::var("WEFT_BENCH_MEMORY_BUILDS")
        .unwrap_or_default()
        .split(',')
        .filter(|e| !e.is_empty())
    {
        let Some((label, dir)) = entry.split_once('=') else {
            eprintln!("mesh-bench: WEFT_BENCH_MEMORY_BUILDS: {entry:?} is not label=DIR");
            std::process::exit(2)
        };
        let binaries = MeshBinaries::in_dir(std::path::Path::new(dir)).unwrap_or_else(|e| {
            eprintln!("mesh-bench: {e}");
            std::process::exit(2)
        });
        builds.push((label.to_string(), binaries));
    }
    builds
}

fn cell(v: &[f64], decimals: usize) -> String {
    let mut sorted = v.to_vec();
    let m = median(&mut sorted);
    format!(
        "{m:.decimals$} [{:.decimals$}-{:.decimals$}]",
        sorted[0],
        sorted[sorted.len() - 1]
    )
}

pub fn bench(this: MeshBinaries) {
    let builds = builds(this);
    let rounds: usize = std::env::var("WEFT_BENCH_MEMORY_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); builds.len()];
    for r in 0..rounds {
        for (i, (label, binaries)) in builds.iter().enumerate() {
            let round = round(binaries);
            eprintln!("memory round {r} {label}: {round:?}");
            results[i].push(round);
        }
    }
    println!(
        "node proxy memory, MiB (median of {rounds} rounds [min-max]); requests per CPU second of both proxies, HTTP/1.1 closed loop"
    );
    println!(
        "{:<16} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18}",
        "build",
        "RSS 0 pods",
        "RSS 1 pod",
        "RSS 100 pods",
        "anon 0 pods",
        "file 0 pods",
        "anon 100 pods",
        "RSS after load",
        "req/CPU-s L7",
        "req/CPU-s L4",
    );
    for ((label, _), runs) in builds.iter().zip(&results) {
        let col = |f: fn(&Round) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        println!(
            "{:<16} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18} {:>18}",
            label,
            cell(&col(|r| r.none.rss), 1),
            cell(&col(|r| r.one.rss), 1),
            cell(&col(|r| r.many.rss), 1),
            cell(&col(|r| r.none.anon), 1),
            cell(&col(|r| r.none.file), 1),
            cell(&col(|r| r.many.anon), 1),
            cell(&col(|r| r.after_load.rss), 1),
            cell(&col(|r| r.per_cpu[0]), 0),
            cell(&col(|r| r.per_cpu[1]), 0),
        );
        let short: Vec<usize> = runs
            .iter()
            .map(|r| r.captured)
            .filter(|c| *c != MANY_PODS)
            .collect();
        if !short.is_empty() {
            println!("  {label}: rounds with fewer than {MANY_PODS} pods captured: {short:?}");
        }
    }
}
