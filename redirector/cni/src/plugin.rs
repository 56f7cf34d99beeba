//! The CNI plugin proper, as a pure function of the CNI environment and
//! stdin so it is testable without a container runtime.
//!
//! CNI spec: the runtime passes `CNI_COMMAND`, `CNI_CONTAINERID`,
//! `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` in the environment and the network
//! configuration (with `prevResult` when chained) on stdin. On ADD a chained
//! plugin prints the previous result unchanged; on error it prints a CNI
//! error object and exits non-zero.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use weft_registration::{self as protocol, ClientError, Message, PodEvent, PodRef};

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Our part of the network configuration (the rest is passed through).
#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// The node agent's registration socket.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<serde_json::Value>,
}

/// The CNI environment variables the plugin uses.
#[derive(Debug, Default, Clone)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub args: String,
}

impl CniEnv {
    pub fn from_process() -> Self {
        let var = |k| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }
}

/// A CNI error result (spec: "Error" object).
#[derive(Debug, Serialize, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

// Well-known CNI error codes.
const INVALID_ENV: u32 = 4;
const DECODE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;

fn error(version: &str, code: u32, msg: &str, details: impl Into<String>) -> CniError {
    CniError {
        cni_version: if version.is_empty() {
            "1.0.0".into()
        } else {
            version.into()
        },
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

/// Runs one CNI command; `Ok` carries what to print on stdout.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<String, CniError> {
    if env.command == "VERSION" {
        return Ok(serde_json::json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })
        .to_string());
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        error(
            "",
            DECODE,
            "weft-cni: cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    let v = conf.cni_version.as_str();
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| protocol::DEFAULT_AGENT_SOCKET.into());
    let timeout = Duration::from_millis(conf.timeout_ms.unwrap_or(5_000));
    match env.command.as_str() {
        "ADD" => {
            let Some(prev) = conf.prev_result.clone() else {
                return Err(error(
                    v,
                    INVALID_CONFIG,
                    "weft-cni must be chained after the cluster's CNI plugin",
                    "no prevResult in the configuration; add weft-cni to the end of the plugins list of a .conflist",
                ));
            };
            if env.netns.is_empty() {
                return Err(error(
                    v,
                    INVALID_ENV,
                    "weft-cni: CNI_NETNS is empty",
                    "ADD needs the pod's network namespace",
                ));
            }
            let event = PodEvent::Add {
                pod: pod_ref(&env.args)
                    .map_err(|d| error(v, INVALID_ENV, "weft-cni: bad CNI_ARGS", d))?,
                netns: env.netns.clone().into(),
                container_id: env.container_id.clone(),
                annotations: None,
                ips: result_ips(&prev),
            };
            // Fail the ADD when the agent cannot take the pod: the kubelet
            // retries, and an enrolled pod never starts without capture.
            protocol::send(&socket, &Message::new(event), timeout).map_err(|e| match e {
                ClientError::Rejected(_) => error(
                    v,
                    TRY_AGAIN_LATER,
                    "weft-cni: the node agent refused the pod",
                    e.to_string(),
                ),
                _ => error(
                    v,
                    TRY_AGAIN_LATER,
                    "weft-cni: the node agent is unreachable",
                    e.to_string(),
                ),
            })?;
            let mut prev = prev;
            if let Some(obj) = prev.as_object_mut() {
                obj.insert("cniVersion".into(), v.into());
            }
            Ok(prev.to_string())
        }
        "DEL" => {
            // DEL must succeed even if the agent is gone (the spec asks DEL to
            // be idempotent and tolerant); the agent also garbage-collects.
            if let Ok(pod) = pod_ref(&env.args) {
                let event = PodEvent::Del {
                    pod,
                    netns: (!env.netns.is_empty()).then(|| env.netns.clone().into()),
                    container_id: env.container_id.clone(),
                };
                if let Err(e) = protocol::send(&socket, &Message::new(event), timeout) {
                    eprintln!("weft-cni: DEL not delivered (ignored): {e}");
                }
            }
            Ok(String::new())
        }
        "CHECK" | "GC" | "STATUS" => Ok(String::new()),
        other => Err(error(
            v,
            INVALID_ENV,
            "weft-cni: unknown CNI_COMMAND",
            format!("{other:?}"),
        )),
    }
}

/// The pod's addresses in the previous plugin's result (`ips[].address`,
/// CIDR notation, in the spec's 0.3.0 to 1.1.0 formats), in its order;
/// entries that do not parse are left out.
pub fn result_ips(prev: &serde_json::Value) -> Vec<std::net::IpAddr> {
    prev.get("ips")
        .and_then(|ips| ips.as_array())
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.get("address")?.as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

/// The pod from `CNI_ARGS` (`K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;K8S_POD_UID=…`).
pub fn pod_ref(args: &str) -> Result<PodRef, String> {
    let kv: HashMap<&str, &str> = args
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let get = |k: &str| kv.get(k).map(|v| v.to_string()).filter(|v| !v.is_empty());
    Ok(PodRef {
        namespace: get("K8S_POD_NAMESPACE").ok_or("CNI_ARGS has no K8S_POD_NAMESPACE")?,
        name: get("K8S_POD_NAME").ok_or("CNI_ARGS has no K8S_POD_NAME")?,
        uid: get("K8S_POD_UID").unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_give_the_pod() {
        let pod = pod_ref("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID=u-1").unwrap();
        assert_eq!(
            pod,
            PodRef {
                namespace: "demo".into(),
                name: "client".into(),
                uid: "u-1".into()
            }
        );
        assert!(
            pod_ref("IgnoreUnknown=1")
                .unwrap_err()
                .contains("K8S_POD_NAMESPACE")
        );
    }

    #[test]
    fn the_previous_result_gives_the_pods_addresses() {
        let prev = serde_json::json!({
            "cniVersion": "1.0.0",
            "ips": [
                {"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 0},
                {"address": "fd00:10:244::5/64", "interface": 0},
                {"address": "not an address"},
                {"gateway": "10.244.0.1"}
            ]
        });
        let ips: Vec<String> = result_ips(&prev).iter().map(|ip| ip.to_string()).collect();
        assert_eq!(ips, ["10.244.0.5", "fd00:10:244::5"]);
        assert!(result_ips(&serde_json::json!({"ips": "nope"})).is_empty());
        assert!(result_ips(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn version_lists_supported_versions() {
        let out = run(
            &CniEnv {
                command: "VERSION".into(),
                ..Default::default()
            },
            b"",
        )
        .unwrap();
        assert!(out.contains("\"1.0.0\""), "{out}");
    }

    #[test]
    fn unchained_add_is_a_config_error() {
        let env = CniEnv {
            command: "ADD".into(),
            netns: "/run/netns/x".into(),
            args: "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b".into(),
            ..Default::default()
        };
        let err = run(
            &env,
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"weft-cni"}"#,
        )
        .unwrap_err();
        assert_eq!(err.code, INVALID_CONFIG);
        assert!(err.details.contains("plugins list"), "{err}");
    }

    #[test]
    fn garbage_config_is_a_decode_error() {
        let env = CniEnv {
            command: "ADD".into(),
            ..Default::default()
        };
        assert_eq!(run(&env, b"\xff\xfe not json").unwrap_err().code, DECODE);
    }
}
