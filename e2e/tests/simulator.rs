//! End-to-end tests of the simulator: real namespaces, veths, nftables and
//! processes (they need root, as the simulator does).

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weft_sim::testing::{DownOnDrop, leftovers, manifest_dir};
use weft_sim::{Options, TestCluster, cluster};

const TWO_NODES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec:
  nodeName: node-a
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: near, namespace: demo}
spec:
  nodeName: node-b
  containers:
  - name: main
    command: [sh, -c, 'echo "ip=$MY_IP node=$MY_NODE"; exec sleep infinity']
    env:
    - {name: MY_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: MY_NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo, labels: {app: echo}}
spec:
  nodeName: node-b
  containers:
  - name: main
    command: [./tcp_echo.py, "9000"]
    ports: [{name: echo, containerPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{port: 80, targetPort: echo}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: demo}
spec:
  selector: {app: nobody}
  ports: [{port: 80}]
"#;

/// Runs the checking TCP client in `pod` against `host:port` and returns its report.
fn echo_through(cluster: &TestCluster, pod: &str, host: &str, port: u16, bytes: usize) -> Value {
    let out = cluster.exec(
        pod,
        &[
            "./tcp_client.py",
            host,
            &port.to_string(),
            &bytes.to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client in {pod} -> {host}:{port} failed ({}): {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("client output {stdout:?}: {e}"))
}

fn assert_echoed(report: &Value, bytes: usize) {
    assert_eq!(report["match"], true, "{report}");
    assert_eq!(report["sent"], bytes, "{report}");
    assert_eq!(report["received"], bytes, "{report}");
    assert_eq!(report["sent_sha256"], report["received_sha256"], "{report}");
}

#[test]
fn pod_reaches_pod_across_nodes_by_ip_cluster_ip_and_name() {
    let cluster = TestCluster::up(TWO_NODES).expect("cluster up");
    let echo = cluster.pod("demo/echo").clone();
    assert_eq!(echo.node, "node-b");
    assert_eq!(cluster.pod("demo/client").node, "node-a");
    let svc = cluster
        .state()
        .services
        .iter()
        .find(|s| s.name == "echo")
        .unwrap();
    let vip = svc.cluster_ip.unwrap().to_string();
    const MB: usize = 1 << 20;

    // By pod IP (v4 and v6), across the fabric.
    let r = echo_through(&cluster, "demo/client", &echo.ip.to_string(), 9000, MB);
    assert_echoed(&r, MB);
    assert_eq!(r["peer"], echo.ip.to_string());
    let r = echo_through(&cluster, "demo/client", &echo.ipv6.to_string(), 9000, MB);
    assert_echoed(&r, MB);

    // By ClusterIP and by every name kube-dns would answer.
    for host in [
        vip.as_str(),
        "echo.demo.svc.cluster.local",
        "echo.demo",
        "echo",
    ] {
        let r = echo_through(&cluster, "demo/client", host, 80, MB);
        assert_echoed(&r, MB);
        assert_eq!(
            r["peer"], vip,
            "the client sees the ClusterIP, not the endpoint ({host})"
        );
    }

    // Same node, through the Service (replies must meet the node's conntrack).
    let r = echo_through(&cluster, "demo/near", "echo", 80, MB);
    assert_echoed(&r, MB);
    // Hairpin: the endpoint reaches itself through its own Service.
    let r = echo_through(&cluster, "demo/echo", &vip, 80, 4096);
    assert_echoed(&r, 4096);
}

#[test]
fn service_without_endpoints_refuses_at_once_and_unknown_names_fail_fast() {
    let cluster = TestCluster::up(TWO_NODES).expect("cluster up");
    let out = cluster.exec(
        "demo/client",
        &["curl", "-sS", "--max-time", "5", "http://nobody:80/"],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: connection refused expected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Couldn't connect"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster.exec(
        "demo/client",
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://no-such-service.demo/",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(6),
        "could not resolve host expected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No wall-clock bound around the two commands (it would include
    // entering the pod and starting curl on a loaded machine): curl's own
    // --max-time bounds each attempt, and a DNS or connect timeout would
    // end in exit 28, not in the refusal (7) and the negative answer (6)
    // asserted above.
}

#[test]
fn containers_run_in_their_pod_cgroup_with_downward_env() {
    let cluster = TestCluster::up(TWO_NODES).expect("cluster up");
    let near = cluster.pod("demo/near").clone();
    let log = std::fs::read_to_string(&near.containers[0].log).unwrap();
    assert_eq!(log.trim(), format!("ip={} node=node-b", near.ip));

    let pid = near.containers[0].pid.unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let procs = std::fs::read_to_string(near.cgroup.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "container {pid} not in {}: {cgroup}",
        near.cgroup.display()
    );
    // `exec` joins the cgroup too.
    let own = cluster.exec_ok("demo/near", &["cat", "/proc/self/cgroup"]);
    let expected_suffix = format!(
        "/weft-sim/{}/kubepods/besteffort/pod{}",
        cluster.name(),
        near.uid
    );
    assert!(own.trim().ends_with(&expected_suffix), "{own}");
}

/// `weft-sim status --name X | head`: the reader went away. The program
/// ends quietly, as by SIGPIPE, instead of panicking in `println!`. The
/// pipe is closed before it starts, so its first write fails every run.
#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    let cluster = TestCluster::up(TWO_NODES).expect("cluster up");
    let status = |stdout: Stdio| {
        sim()
            .args(["status", "--name", cluster.name()])
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // Control: with a reader, status prints the cluster.
    let out = status(Stdio::piped());
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("cluster {}:", cluster.name())),
        "{out:?}"
    );

    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = status(writer.into());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert_eq!(stderr, "");
}

#[test]
fn down_leaves_no_namespace_veth_cgroup_or_process() {
    let cluster = TestCluster::up(TWO_NODES).expect("cluster up");
    let name = cluster.name().to_string();
    let slot = cluster.state().slot;
    let pids: Vec<u32> = cluster
        .state()
        .pods
        .iter()
        .flat_map(|p| p.containers.iter().filter_map(|c| c.pid))
        .collect();
    assert_eq!(pids.len(), 3);
    assert!(
        !leftovers(&name, Some(slot)).is_empty(),
        "a running cluster must be visible to the leftover check"
    );
    let host_if = cluster.state().fabric.host_interface.clone();
    assert!(Path::new("/sys/class/net").join(&host_if).exists());

    drop(cluster);
    assert_eq!(leftovers(&name, Some(slot)), Vec::<String>::new());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "container process {pid} survived down"
        );
    }
}

#[test]
fn two_simulators_side_by_side() {
    let one = TestCluster::up(TWO_NODES).expect("first cluster");
    let two = TestCluster::up(TWO_NODES).expect("second cluster");
    assert_ne!(one.state().slot, two.state().slot);
    assert_ne!(
        one.state().fabric.host_interface,
        two.state().fabric.host_interface
    );
    // Same pod addresses in both, each in its own namespaces.
    assert_eq!(one.pod("demo/echo").ip, two.pod("demo/echo").ip);
    for c in [&one, &two] {
        assert_echoed(&echo_through(c, "demo/client", "echo", 80, 65536), 65536);
    }
    let (name, slot) = (one.name().to_string(), one.state().slot);
    drop(one);
    assert_eq!(leftovers(&name, Some(slot)), Vec::<String>::new());
    assert_echoed(&echo_through(&two, "demo/client", "echo", 80, 65536), 65536);
}

/// A name for a cluster this test drives by hand.
fn unique(tag: &str) -> String {
    format!("{tag}{}", std::process::id())
}

/// `weft-sim` as an unprivileged user (nobody), whoever runs the tests.
fn sim_unprivileged() -> Command {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to our effective user.
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_weft-sim"));
        cmd
    } else {
        sim()
    }
}

/// A manifest directory the unprivileged user can read.
fn readable_manifest_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = manifest_dir(files).unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o444)).unwrap();
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Input errors are found before anything is created, so before the root
/// check: an unprivileged user, who can create nothing, gets them (and not
/// "run it as root"), with the file and the object.
#[test]
fn bad_input_is_reported_with_file_and_object_before_the_root_check() {
    let pod = |body: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: n}}\nspec:\n{body}")
    };
    let good = pod("  nodeName: n1\n  containers: [{name: c, command: [sleep, '1']}]\n");
    let up = |file: &str, text: &str| {
        let dir = readable_manifest_dir(&[(file, text)]);
        let out = sim_unprivileged()
            .args(["up", dir.path().to_str().unwrap(), "--name", &unique("bad")])
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Control: good input gets as far as the root check (so the user below
    // is really unprivileged, and validation passing is what lets `up` go on).
    let (status, stderr) = up("good.yaml", &good);
    assert!(!status.success());
    assert!(stderr.contains("run it as root"), "{stderr}");

    let cases = [
        (
            "broken.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n".to_string(),
            "broken.yaml: document 1 is not valid YAML",
        ),
        (
            "nonode.yaml",
            pod("  containers: [{name: c, command: [sleep, '1']}]\n"),
            "nonode.yaml: Pod n/p: spec.nodeName is required",
        ),
        (
            "missing.yaml",
            pod("  nodeName: n1\n  containers: [{name: c, command: [no-such-command-weft]}]\n"),
            "missing.yaml: Pod n/p: container \"c\": command \"no-such-command-weft\" not found",
        ),
        (
            "dup.yaml",
            format!(
                "{}---\n{}",
                good,
                pod("  nodeName: n2\n  containers: [{name: c, command: [sleep, '1']}]\n")
            ),
            "dup.yaml: Pod n/p is defined twice",
        ),
    ];
    for (file, text, expected) in cases {
        let (status, stderr) = up(file, &text);
        assert_eq!(status.code(), Some(1), "{file}: {stderr}");
        assert!(stderr.contains(expected), "{file}: got {stderr}");
        assert!(!stderr.contains("root"), "{file}: got {stderr}");
    }
}

#[test]
fn a_container_that_fails_at_start_is_reported_and_cleaned_up() {
    let opts = Options::detect().unwrap();
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n}\nspec:\n  nodeName: n1\n  containers: [{name: c, command: [sh, -c, 'echo broken config >&2; exit 3'], ports: [{containerPort: 80}]}]\n";
    let dir = manifest_dir(&[("p.yaml", text)]).unwrap();
    let name = unique("fail");
    let err = cluster::up(dir.path(), &name, &opts)
        .err()
        .expect("must fail")
        .to_string();
    // The container ran (its stderr is quoted): its namespaces, veths,
    // cgroup and state file existed when `up` failed, so the check below
    // sees a cleanup, not an early refusal.
    assert!(
        err.contains("Pod n/p: container \"c\" exited") && err.contains("broken config"),
        "{err}"
    );
    assert_eq!(leftovers(&name, None), Vec::<String>::new());
}

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-sim"))
}

/// Starts `weft-sim up` in the foreground and waits for its `ready` line.
fn up_foreground(dir: &Path, name: &str) -> std::process::Child {
    let mut child = sim()
        .args(["up", dir.to_str().unwrap(), "--name", name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lines.next() {
            Some(Ok(line)) if line == "ready" => break,
            Some(Ok(_)) => {}
            other => panic!("weft-sim up ended before ready: {other:?}"),
        }
        assert!(Instant::now() < deadline, "no ready line within 30s");
    }
    child
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cli_detach_exec_status_down() {
    let dir = manifest_dir(&[("c.yaml", TWO_NODES)]).unwrap();
    let name = unique("cli");
    let _guard = DownOnDrop(name.clone());
    let out = sim()
        .args([
            "up",
            dir.path().to_str().unwrap(),
            "--name",
            &name,
            "--detach",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().last(),
        Some("ready")
    );

    let out = sim()
        .args([
            "exec",
            "--name",
            &name,
            "demo/client",
            "--",
            "./tcp_client.py",
            "echo.demo",
            "80",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = sim()
        .args([
            "exec",
            "--name",
            &name,
            "demo/client",
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7), "exec passes the exit code through");

    let out = sim()
        .args(["status", "--name", &name, "--json"])
        .output()
        .unwrap();
    let state: weft_sim::State =
        serde_json::from_slice(&out.stdout).expect("status --json is the state file");
    assert_eq!(state.pods.len(), 3);
    let slot = state.slot;

    assert!(
        sim()
            .args(["down", "--name", &name])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(leftovers(&name, Some(slot)), Vec::<String>::new());
    assert!(
        sim()
            .args(["down", "--name", &name])
            .status()
            .unwrap()
            .success(),
        "down is idempotent"
    );
    let out = sim()
        .args(["exec", "--name", &name, "demo/client", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn foreground_up_tears_down_on_sigterm() {
    let dir = manifest_dir(&[("c.yaml", TWO_NODES)]).unwrap();
    let name = unique("fg");
    let _guard = DownOnDrop(name.clone());
    let mut child = up_foreground(dir.path(), &name);
    let slot = cluster::load(&name, &Options::detect().unwrap())
        .unwrap()
        .slot;
    // SAFETY: signalling the weft-sim process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
    assert_eq!(leftovers(&name, Some(slot)), Vec::<String>::new());
}

#[test]
fn down_and_up_clean_up_after_a_crashed_simulator() {
    let dir = manifest_dir(&[("c.yaml", TWO_NODES)]).unwrap();
    let name = unique("crash");
    let _guard = DownOnDrop(name.clone());
    let mut child = up_foreground(dir.path(), &name);
    let state = cluster::load(&name, &Options::detect().unwrap()).unwrap();
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(
        !leftovers(&name, Some(state.slot)).is_empty(),
        "a killed simulator leaves its cluster behind"
    );

    // `up` of the same name first clears what the crash left.
    let out = sim()
        .args([
            "up",
            dir.path().to_str().unwrap(),
            "--name",
            &name,
            "--detach",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pids: Vec<u32> = state
        .pods
        .iter()
        .flat_map(|p| p.containers.iter().filter_map(|c| c.pid))
        .collect();
    for pid in pids {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(
            !alive,
            "container {pid} of the crashed simulator still runs"
        );
    }
    assert!(
        sim()
            .args(["down", "--name", &name])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(leftovers(&name, Some(state.slot)), Vec::<String>::new());
}

#[test]
fn the_two_node_example_serves_curl_through_its_service() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/two-node");
    let name = unique("ex");
    let _guard = DownOnDrop(name.clone());
    let opts = Options::detect().unwrap();
    let running = cluster::up(&example, &name, &opts).expect("examples/two-node comes up");
    let mut curl = cluster::pod_command(
        &running.state,
        "demo/client",
        "curl",
        &["-sS", "--max-time", "5", "http://server.demo:8080/"].map(String::from),
    )
    .unwrap();
    let out = curl.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served = std::fs::read_to_string(example.join("www/index.html")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), served);
}

#[test]
fn nodes_reach_cluster_ips_and_the_host_reaches_nodes() {
    let cluster = TestCluster::up(TWO_NODES).expect("cluster up");
    let state = cluster.state();
    let vip = state
        .services
        .iter()
        .find(|s| s.name == "echo")
        .unwrap()
        .cluster_ip
        .unwrap();
    // From node-a's own namespace (a node proxy would connect from here).
    let args = ["./tcp_client.py", &vip.to_string(), "80", "10000"].map(String::from);
    let mut cmd = cluster::node_command(state, "node-a", "python3", &args).unwrap();
    let out = cmd.current_dir(cluster.manifest_dir()).output().unwrap();
    assert!(
        out.status.success(),
        "node -> ClusterIP: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // From the host to a listener in node-b's namespace (as Prometheus
    // scrapes node proxies at <node ip>:15020).
    let node_b = state.node("node-b").unwrap();
    let mut server = cluster::node_command(
        state,
        "node-b",
        "python3",
        &["./tcp_echo.py", "15020"].map(String::from),
    )
    .unwrap();
    let mut server = server
        .current_dir(cluster.manifest_dir())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("listening"), "{first}");
    let mut conn =
        std::net::TcpStream::connect_timeout(&(node_b.ip, 15020).into(), Duration::from_secs(3))
            .expect("host reaches node-b");
    use std::io::{Read, Write};
    conn.write_all(b"ping from the host").unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = String::new();
    conn.read_to_string(&mut back).unwrap();
    assert_eq!(back, "ping from the host");
    server.kill().unwrap();
    server.wait().unwrap();
}
