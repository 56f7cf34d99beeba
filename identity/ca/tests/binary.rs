//! The `weft-identity` binary as the simulator and the demo run it:
//! `init`, then `serve` in local mode, then a Certify over TLS.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use weft_identity::testing::metric_value;

/// Kills the CA process even when an assertion fails.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        // Its status after our kill says nothing; whether it had already
        // exited on its own does: a CA that died mid-test fails the test.
        let before = self.0.try_wait();
        let _ = self.0.kill();
        self.0.wait().expect("reaping weft-identity");
        if let Ok(Some(status)) = before
            && !std::thread::panicking()
        {
            panic!("weft-identity exited during the test ({status})");
        }
    }
}

#[tokio::test]
async fn serve_in_local_mode() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let bin = env!("CARGO_BIN_EXE_weft-identity");
    let status = Command::new(bin)
        .args(["init", "--out"])
        .arg(&ca_dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("node-a.token"), "token-of-node-a\n").unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(
        &state,
        r#"{"name":"t","pods":[{"namespace":"demo","name":"c","node":"node-a","service_account":"client"}]}"#,
    )
    .unwrap();

    let child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--leaf-ttl-seconds",
            "600",
            "--ca-dir",
        ])
        .arg(&ca_dir)
        .arg("--local-credentials")
        .arg(&creds)
        .arg("--local-cluster-state")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Process(child);
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .expect("`ready` within 20 s")
        .unwrap();
    // "ready <grpc addr> metrics <metrics addr>"
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"ready"), "{line}");
    let addr = words[1].parse().unwrap();
    let metrics_addr = words[3].parse().unwrap();

    let anchors = std::fs::read(ca_dir.join("ca.crt")).unwrap();
    let mut client = common::connect(addr, &anchors, "localhost").await;
    let id = "spiffe://cluster.local/ns/demo/sa/client";
    let reply = common::certify(
        &mut client,
        Some("token-of-node-a"),
        id,
        common::p256_csr(id).1,
    )
    .await
    .expect("issued");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now + 598..=now + 601).contains(&reply.valid_until),
        "--leaf-ttl-seconds honoured"
    );
    let text = weft_identity::testing::scrape(metrics_addr).await;
    assert_eq!(
        metric_value(
            &text,
            "weft_identity_certificates_issued_total{result=\"issued\"}"
        ),
        Some(1.0)
    );
}

/// `weft-identity init --out DIR | head -c0`: the reader went away (closed
/// before the program starts, so its first write fails every run). The
/// program ends quietly, as by SIGPIPE, not with a `println!` panic, and
/// the CA it was asked to write is there.
#[test]
fn init_with_a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let init = |out: &str, stdout: Stdio| {
        Command::new(env!("CARGO_BIN_EXE_weft-identity"))
            .args(["init", "--out"])
            .arg(dir.path().join(out))
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // Control: with a reader, it says what it wrote (so below, it did try
    // to write to stdout).
    let out = init("read", Stdio::piped());
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("wrote tls.crt"));

    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = init("unread", writer.into());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert_eq!(stderr, "");
    assert!(dir.path().join("unread/tls.crt").exists());
}
