//! Chained CNI plugins, run for each pod as a container runtime runs them
//! (the CNI specification, version 1.0): after the simulator's own primary
//! network setup, the node's CNI configuration — the first `*.conflist`,
//! `*.conf` or `*.json` in lexical order in the node's `/etc/cni/net.d`
//! (rooted in the node's directory, as every `hostPath`) — lists plugins
//! that are run in order with `CNI_COMMAND=ADD` before the pod's containers
//! start, each given the previous one's result (the first: the primary
//! network's interfaces and addresses), and with `DEL` in reverse order
//! when the pod goes. Plugins are found in the node's `/opt/cni/bin`.

use crate::state::{NodeState, PodState};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Largest CNI configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Longest a plugin may run before it is killed and the call fails.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest plugin output kept.
const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// The plugins a pod's network was given, to undo them.
#[derive(Clone, Debug)]
pub struct Attachment {
    /// Each plugin's full configuration (with `name` and `cniVersion`).
    plugins: Vec<serde_json::Value>,
    bin_dir: PathBuf,
    /// The last plugin's result (DEL gets it as `prevResult`).
    result: serde_json::Value,
}

/// The node's directory that stands for `/`.
pub fn node_root(state_dir: &Path, node: &str) -> PathBuf {
    state_dir.join("nodes").join(node).join("root")
}

/// The chained plugins of `node_root`'s configuration (none without one).
fn load(node_root: &Path) -> Result<Vec<serde_json::Value>, String> {
    let dir = node_root.join("etc/cni/net.d");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    let Some(file) = files.first() else {
        return Ok(Vec::new());
    };
    let shown = file.display();
    let size = std::fs::metadata(file)
        .map_err(|e| format!("{shown}: {e}"))?
        .len();
    if size > MAX_CONFIG_BYTES {
        return Err(format!(
            "{shown}: {size} bytes, too large for a CNI configuration"
        ));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{shown}: {e}"))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{shown}: not JSON: {e}"))?;
    let version = config["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    let name = config["name"]
        .as_str()
        .unwrap_or("k8s-pod-network")
        .to_string();
    let plugins: Vec<serde_json::Value> = match config.get("plugins") {
        Some(list) => list
            .as_array()
            .ok_or_else(|| format!("{shown}: `plugins` is not a list"))?
            .clone(),
        None => vec![config.clone()],
    };
    plugins
        .into_iter()
        .map(|mut p| {
            let kind = p["type"].as_str().unwrap_or_default();
            if kind.is_empty()
                || !kind
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                || kind.starts_with('.')
            {
                return Err(format!("{shown}: a plugin has no valid `type` ({kind:?})"));
            }
            p["name"] = name.clone().into();
            p["cniVersion"] = version.clone().into();
            Ok(p)
        })
        .collect()
}

/// The primary network's result, as the first chained plugin's `prevResult`.
fn primary_result(pod: &PodState, version: &str) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "sandbox": pod.netns_path}],
        "ips": [
            {"address": format!("{}/32", pod.ip), "interface": 0},
            {"address": format!("{}/128", pod.ipv6), "interface": 0},
        ],
    })
}

/// Runs every chained plugin's ADD for `pod`. On failure the plugins are
/// returned too, so that DEL can undo a half-made chain.
pub fn add(
    state_dir: &Path,
    node: &NodeState,
    pod: &PodState,
) -> (Option<Attachment>, Result<(), String>) {
    let root = node_root(state_dir, &node.name);
    let plugins = match load(&root) {
        Ok(p) if p.is_empty() => return (None, Ok(())),
        Ok(p) => p,
        Err(e) => return (None, Err(e)),
    };
    let version = plugins[0]["cniVersion"]
        .as_str()
        .unwrap_or("1.0.0")
        .to_string();
    let mut attachment = Attachment {
        plugins: plugins.clone(),
        bin_dir: root.join("opt/cni/bin"),
        result: primary_result(pod, &version),
    };
    for plugin in &plugins {
        let mut config = plugin.clone();
        config["prevResult"] = attachment.result.clone();
        match call("ADD", &attachment.bin_dir, &config, pod) {
            Ok(result) => attachment.result = result,
            Err(e) => return (Some(attachment), Err(e)),
        }
    }
    (Some(attachment), Ok(()))
}

/// DEL of every plugin, in reverse order; best effort (as a runtime: a
/// plugin's DEL error is reported, the others still run).
pub fn del(attachment: &Attachment, pod: &PodState) -> Vec<String> {
    let mut errors = Vec::new();
    for plugin in attachment.plugins.iter().rev() {
        let mut config = plugin.clone();
        config["prevResult"] = attachment.result.clone();
        if let Err(e) = call("DEL", &attachment.bin_dir, &config, pod) {
            errors.push(e);
        }
    }
    errors
}

/// One plugin call; the result on success, the plugin's message else.
fn call(
    command: &str,
    bin_dir: &Path,
    config: &serde_json::Value,
    pod: &PodState,
) -> Result<serde_json::Value, String> {
    let kind = config["type"].as_str().unwrap_or_default();
    let program = bin_dir.join(kind);
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.namespace, pod.name, pod.uid, pod.uid
    );
    let mut child = Command::new(&program)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.uid)
        .env("CNI_NETNS", &pod.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bin_dir)
        .env("CNI_ARGS", &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("CNI plugin {kind} ({}): {e}", program.display()))?;
    let input = serde_json::to_vec(config).expect("serializable");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&input);
    }
    let deadline = Instant::now() + PLUGIN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "CNI plugin {kind} {command}: no answer within {PLUGIN_TIMEOUT:?}"
                ));
            }
            Err(e) => return Err(format!("CNI plugin {kind} {command}: {e}")),
        }
    };
    let mut out = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read;
        let _ = (&mut stdout)
            .take(MAX_OUTPUT_BYTES as u64)
            .read_to_end(&mut out);
    }
    if !status.success() {
        let error: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        let message = error["msg"]
            .as_str()
            .map(|m| match error["details"].as_str() {
                Some(d) if !d.is_empty() => format!("{m}: {d}"),
                _ => m.to_string(),
            })
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&out)
                    .trim()
                    .chars()
                    .take(500)
                    .collect()
            });
        return Err(format!(
            "CNI plugin {kind} {command} failed ({status}): {message}"
        ));
    }
    if command == "DEL" || out.iter().all(u8::is_ascii_whitespace) {
        return Ok(config["prevResult"].clone());
    }
    serde_json::from_slice(&out)
        .map_err(|e| format!("CNI plugin {kind} {command}: its result is not JSON: {e}"))
}
