//! The real `weft-cni` binary, run as a container runtime would run it,
//! against a stand-in node agent on a Unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use weft_registration::{Message, PodEvent, Reply};

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/cni-1"}],"ips":[{"address":"10.244.0.5/24","interface":0}]}"#;

fn conf(socket: &Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"weft-cni","agent_socket":"{}","timeout_ms":2000,"prevResult":{PREV}}}"#,
        socket.display()
    )
}

fn run_plugin(command: &str, stdin: &str) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "abc123")
        .env("CNI_NETNS", "/run/netns/cni-1")
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;K8S_POD_UID=u-42",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// Answers one message with `reply` and returns what it received.
fn agent_once(listener: UnixListener, reply: Reply) -> std::thread::JoinHandle<Message> {
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        let msg = Message::parse(line.trim_end()).unwrap();
        let mut out = serde_json::to_string(&reply).unwrap();
        out.push('\n');
        (&stream).write_all(out.as_bytes()).unwrap();
        msg
    })
}

#[test]
fn add_registers_the_pod_and_passes_prev_result_through() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let agent = agent_once(UnixListener::bind(&socket).unwrap(), Reply::ok());
    let (code, stdout) = run_plugin("ADD", &conf(&socket));
    assert_eq!(code, 0, "{stdout}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        printed,
        serde_json::from_str::<serde_json::Value>(PREV).unwrap()
    );
    match agent.join().unwrap().event {
        PodEvent::Add {
            pod,
            netns,
            container_id,
            ips,
            ..
        } => {
            assert_eq!(
                (pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str()),
                ("demo", "client", "u-42")
            );
            assert_eq!(netns, Path::new("/run/netns/cni-1"));
            assert_eq!(container_id, "abc123");
            // The address the cluster's plugin assigned (prevResult), for
            // the agent to capture the pod before the API server has it.
            assert_eq!(ips, ["10.244.0.5".parse::<std::net::IpAddr>().unwrap()]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn add_fails_when_the_agent_is_down_or_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let (code, stdout) = run_plugin("ADD", &conf(&socket));
    assert_eq!(code, 1);
    let err: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(err["code"], 11, "{stdout}");
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("is the weft node proxy running"),
        "{stdout}"
    );

    let agent = agent_once(
        UnixListener::bind(&socket).unwrap(),
        Reply::error("netns vanished"),
    );
    let (code, stdout) = run_plugin("ADD", &conf(&socket));
    agent.join().unwrap();
    assert_eq!(code, 1);
    assert!(stdout.contains("netns vanished"), "{stdout}");
}

#[test]
fn del_succeeds_even_without_an_agent_and_is_delivered_when_there_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let (code, _) = run_plugin("DEL", &conf(&socket));
    assert_eq!(code, 0);

    let agent = agent_once(UnixListener::bind(&socket).unwrap(), Reply::ok());
    let (code, _) = run_plugin("DEL", &conf(&socket));
    assert_eq!(code, 0);
    assert!(matches!(agent.join().unwrap().event, PodEvent::Del { .. }));
}

/// A runtime that stops reading (or `weft-cni | head`): the plugin's first
/// write fails; it must end quietly, not with a `println!` panic. The pipe
/// is closed before the plugin starts, so every run hits it.
#[test]
fn a_closed_stdout_ends_the_plugin_quietly() {
    let run = |stdout: Stdio| {
        Command::new(env!("CARGO_BIN_EXE_weft-cni"))
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // Control: with a reader, VERSION prints something (so below, it did
    // try to write) and succeeds.
    let out = run(Stdio::piped());
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("supportedVersions"),
        "{out:?}"
    );

    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = run(writer.into());
    assert_eq!(
        out.status.code(),
        Some(141),
        "exit as by SIGPIPE; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
