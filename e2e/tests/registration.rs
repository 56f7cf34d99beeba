//! The simulator registers pods with their node's agent as the CNI plugin
//! does: `add` before a pod's containers start, `del` after they are gone.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weft_sim::cluster::NodeAgents;
use weft_sim::testing::{DownOnDrop, leftovers};
use weft_sim::{Options, State, TestCluster, cluster};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo, annotations: {weft.io/skip-inbound-ports: "9090"}}
spec: {nodeName: node-a, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: demo}
spec: {nodeName: node-b, containers: [{name: c, command: [sleep, infinity]}]}
"#;

/// What a stand-in agent saw: the node it serves, the message, and whether
/// the pod had any process running at that moment.
#[derive(Debug, Clone)]
struct Seen {
    node: String,
    message: Value,
    pod_running: bool,
}

/// One stand-in agent per node: answers every registration with ok.
#[derive(Debug, Default)]
struct StandInAgents {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl NodeAgents for StandInAgents {
    fn start(&self, state: &State) -> Result<(), String> {
        for node in &state.nodes {
            let listener = UnixListener::bind(&node.agent_socket).map_err(|e| e.to_string())?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let (seen, stop, node_name, state) = (
                self.seen.clone(),
                self.stop.clone(),
                node.name.clone(),
                state.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    conn.set_nonblocking(false).unwrap();
                    let mut writer = conn.try_clone().unwrap();
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { break };
                        let message: Value = serde_json::from_str(&line).unwrap();
                        let key = format!(
                            "{}/{}",
                            message["pod"]["namespace"].as_str().unwrap(),
                            message["pod"]["name"].as_str().unwrap()
                        );
                        let cgroup = &state.pod(&key).unwrap().cgroup;
                        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))
                            .unwrap_or_default();
                        seen.lock().unwrap().push(Seen {
                            node: node_name.clone(),
                            message,
                            pod_running: !procs.trim().is_empty(),
                        });
                        writer.write_all(b"{\"ok\":true}\n").unwrap();
                    }
                }
            });
        }
        Ok(())
    }
}

#[test]
fn pods_are_added_before_they_start_and_deleted_after_they_stop() {
    let agents = Arc::new(StandInAgents::default());
    let seen = agents.seen.clone();
    let stop = agents.stop.clone();
    let cluster = TestCluster::up_with(&[("c.yaml", CLUSTER)], |opts| {
        opts.node_agents = Some(agents)
    })
    .expect("cluster up");
    let state = cluster.state().clone();
    assert!(state.registers_pods);

    let adds: Vec<Seen> = seen.lock().unwrap().clone();
    assert_eq!(adds.len(), 2, "{adds:?}");
    for add in &adds {
        let m = &add.message;
        assert_eq!(m["version"], 1);
        assert_eq!(m["op"], "add");
        let key = format!(
            "{}/{}",
            m["pod"]["namespace"].as_str().unwrap(),
            m["pod"]["name"].as_str().unwrap()
        );
        let pod = state.pod(&key).unwrap();
        assert_eq!(add.node, pod.node, "registered with the pod's own node");
        assert_eq!(m["pod"]["uid"], pod.uid);
        assert_eq!(m["netns"], pod.netns_path.to_str().unwrap());
        assert!(
            !add.pod_running,
            "{key} had processes before its add was answered"
        );
    }
    let a = adds
        .iter()
        .find(|s| s.message["pod"]["name"] == "a")
        .unwrap();
    assert_eq!(
        a.message["annotations"]["weft.io/skip-inbound-ports"],
        "9090"
    );

    drop(cluster);
    let all: Vec<Seen> = seen.lock().unwrap().clone();
    let dels: Vec<&Seen> = all.iter().filter(|s| s.message["op"] == "del").collect();
    assert_eq!(dels.len(), 2, "{all:?}");
    assert!(
        dels.iter().all(|d| !d.pod_running),
        "del is sent once the pod's processes are gone: {dels:?}"
    );
    stop.store(true, Ordering::Relaxed);
}

/// Agents that never listen: registration fails, the pod never starts.
#[derive(Debug)]
struct NoAgents;

impl NodeAgents for NoAgents {
    fn start(&self, _state: &State) -> Result<(), String> {
        Ok(())
    }
}

#[test]
fn a_pod_whose_agent_does_not_answer_is_not_started() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.yaml"), CLUSTER).unwrap();
    let mut opts = Options::detect().unwrap();
    opts.node_agents = Some(Arc::new(NoAgents));
    let name = format!("noagent{}", std::process::id());
    // Should `up` wrongly succeed, the assertion below fails: tear down anyway.
    let _guard = DownOnDrop(name.clone());
    let err = cluster::up(dir.path(), &name, &opts)
        .err()
        .expect("up must fail closed")
        .to_string();
    assert!(
        err.contains("Pod demo/a: node node-a's agent did not take the pod"),
        "{err}"
    );
    assert_eq!(leftovers(&name, None), Vec::<String>::new());
}
