//! `cargo xtask demo [DIR]`: the main job on a fresh machine. Brings up the
//! local cluster from `examples/demo` (or DIR) with the mesh (control plane
//! and one node proxy per node), sends traffic, shows the identities on
//! both ends, proof that the bytes between the nodes were TLS, and the
//! metrics; then tears everything down again, also when a step fails.

use crate::{cmd, setup};
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLUSTER: &str = "demo";
/// What the demo server answers; must never appear on the wire between nodes.
const PAYLOAD: &str = "hello from demo/server";

pub fn run(args: &[String]) -> Result<()> {
    setup::run()?;
    let dir = match args.first() {
        Some(d) => PathBuf::from(d),
        None => cmd::root().join("examples/demo"),
    };
    // weft-sim finds the mesh programs next to itself.
    cmd::run(
        "cargo",
        &[
            "build",
            "--quiet",
            "--bins",
            "--package",
            "weft-sim",
            "--package",
            "weft-node-proxy",
            "--package",
            "weft-identity",
            "--package",
            "weft-destination",
            "--package",
            "weft-cni",
        ],
    )?;
    let sim = cmd::root().join("target/debug/weft-sim");
    let sim = sim.to_str().context("workspace path is not UTF-8")?;

    let dir = dir.to_str().context("DIR is not UTF-8")?;
    let up = cmd::run(sim, &["up", dir, "--mesh", "--name", CLUSTER, "--detach"]);
    let shown = up.and_then(|()| show(sim));
    let down = cmd::run(sim, &["down", "--name", CLUSTER]);
    shown?;
    down
}

fn show(sim: &str) -> Result<()> {
    let status = output(Command::new(sim).args(["status", "--name", CLUSTER]))?;
    // `  proxy  node-a  metrics http://10.240.0.10:15020/metrics ...`
    let proxies: Vec<(String, String)> = status
        .lines()
        .filter(|l| l.trim_start().starts_with("proxy "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(1)?.to_string(), f.get(3)?.to_string()))
        })
        .collect();
    if proxies.is_empty() {
        bail!("weft-sim status shows no node proxies (was the cluster started with --mesh?)");
    }

    out!("\n== capturing the fabric between the nodes (tcpdump on br0)")?;
    let capture_dir = std::env::temp_dir().join(format!("weft-demo-{}", std::process::id()));
    std::fs::create_dir_all(&capture_dir)?;
    let mut capture = Capture::start(&format!("weft.{CLUSTER}.fabric"), &capture_dir)?;

    out!(
        "\n== demo/client -> http://server.demo:8080/ (enrolled pod on node-a to enrolled pod on node-b, through a Service)"
    )?;
    let reply = curl(sim, "demo/client")?;
    out!("{reply}")?;

    // Let tcpdump write what it has seen, then stop it.
    capture.wait_until(|c| c.count("tcp port 15008") > 0)?;
    let pcap = capture.stop()?;
    let tls_packets = capture.count("tcp port 15008");
    let leaked = pcap.windows(PAYLOAD.len()).any(|w| w == PAYLOAD.as_bytes());
    out!("\n== on the wire between the nodes")?;
    for line in capture.lines("tcp port 15008").iter().take(6) {
        out!("  {line}")?;
    }
    out!("  {tls_packets} packets to/from port 15008 (HBONE: HTTP/2 CONNECT over mutual TLS 1.3)")?;
    let _ = std::fs::remove_dir_all(&capture_dir);
    if leaked {
        bail!("the server's reply {PAYLOAD:?} crossed the fabric in plaintext");
    }
    if tls_packets == 0 {
        bail!("no HBONE traffic between the nodes: the mesh did not carry the request");
    }
    out!(
        "  the reply {PAYLOAD:?} never appears in the capture: the bytes between nodes were encrypted"
    )?;

    out!(
        "\n== legacy/client (not enrolled, node-a) -> http://server.demo:8080/ (plaintext into the mesh)"
    )?;
    out!("{}", curl(sim, "legacy/client")?)?;

    out!("\n== identities (from the node proxies' metrics)")?;
    for (node, metrics) in &proxies {
        let body = output(Command::new("curl").args(["-sS", "--max-time", "5", metrics]))?;
        for line in body
            .lines()
            .filter(|l| l.starts_with("weft_tcp_connections_opened_total{"))
        {
            let label = |k: &str| {
                line.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_string()
            };
            out!(
                "  {node} ({} side): {} -> {}  [{}]",
                label("reporter"),
                or_none(label("source_principal"), label("source_workload")),
                or_none(
                    label("destination_principal"),
                    label("destination_workload")
                ),
                label("connection_security_policy")
            )?;
        }
    }

    out!("\n== metrics")?;
    for (node, metrics) in &proxies {
        out!("-- {node} {metrics}")?;
        let body = output(Command::new("curl").args(["-sS", "--max-time", "5", metrics]))?;
        // The connections, the inbound authorization decisions (the demo's
        // default policy, all-unauthenticated, admits both clients), and the
        // golden request metrics (curl speaks HTTP: the proxies see each
        // request; an HTTP connection is a request series on the client's
        // side, not a TCP one).
        let shown = |l: &&str| {
            l.starts_with("weft_tcp_")
                || l.starts_with("weft_inbound_authz_")
                || l.starts_with("weft_requests_total{")
        };
        for line in body.lines().filter(shown) {
            out!("  {line}")?;
        }
    }
    Ok(())
}

fn or_none(principal: String, workload: String) -> String {
    match (principal.is_empty(), workload.is_empty()) {
        (false, _) => principal,
        (true, false) => format!("{workload} (no identity: outside the mesh)"),
        (true, true) => "(outside the mesh)".into(),
    }
}

fn curl(sim: &str, pod: &str) -> Result<String> {
    let out = Command::new(sim)
        .args(["exec", "--name", CLUSTER, pod, "--"])
        .args(["curl", "-sS", "--max-time", "5", "http://server.demo:8080/"])
        .output()
        .with_context(|| format!("running curl in {pod}"))?;
    if !out.status.success() {
        bail!(
            "curl in {pod} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bounded tcpdump on the fabric bridge, inside the fabric namespace.
struct Capture {
    child: Child,
    file: PathBuf,
    err: PathBuf,
}

impl Capture {
    fn start(netns: &str, dir: &Path) -> Result<Self> {
        let file = dir.join("fabric.pcap");
        let err = dir.join("tcpdump.err");
        let child = Command::new("ip")
            .args([
                "netns", "exec", netns, "tcpdump", "-i", "br0", "-U", "-n", "-s", "0", "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .context("starting tcpdump")?;
        let mut capture = Self { child, file, err };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&capture.err).unwrap_or_default();
            if text.contains("listening on") {
                return Ok(capture);
            }
            if capture.child.try_wait()?.is_some() || Instant::now() > deadline {
                let _ = capture.child.kill();
                bail!("tcpdump did not start: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_until(&self, done: impl Fn(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done(self) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<Vec<u8>> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // tcpdump exits 0 on SIGINT, after writing what it captured; any
        // other end (it died, or needed the kill above) may have cut the
        // capture short: say so next to the checks that read it.
        let status = self.child.wait()?;
        if !status.success() {
            eprintln!("demo: tcpdump ended with {status}; the capture may be incomplete");
        }
        // What tcpdump could not keep up with is missing from the pcap too.
        let report = std::fs::read_to_string(&self.err).unwrap_or_default();
        if let Some(n) = report
            .lines()
            .find_map(|l| l.strip_suffix(" packets dropped by kernel"))
            .filter(|n| n.trim() != "0")
        {
            eprintln!(
                "demo: the kernel dropped {n} packets before tcpdump read them; the capture is incomplete"
            );
        }
        Ok(std::fs::read(&self.file)?)
    }

    fn lines(&self, filter: &str) -> Vec<String> {
        Command::new("tcpdump")
            .arg("-r")
            .arg(&self.file)
            .args(["-n", filter])
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn count(&self, filter: &str) -> usize {
        self.lines(filter).len()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
