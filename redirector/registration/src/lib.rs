//! The pod registration protocol: newline-delimited JSON over a Unix stream
//! socket. The client writes one [`Message`] per line; the agent answers each
//! with one [`Reply`] line, in order. A connection may carry several
//! messages. Version 1.
//!
//! Its own crate so that each side depends on the protocol and not on the
//! other side: the CNI plugin (`weft-cni`) and the simulator send with
//! [`send`]; the node agent's listener lives in `weft-redirector`
//! (`PodRegistrationListener`). Specification: docs/redirector.md.
//!
//! ```text
//! → {"version":1,"op":"add","pod":{"namespace":"demo","name":"client","uid":"5f0c…"},
//!    "netns":"/run/netns/cni-1234","container_id":"abc","annotations":{}}
//! ← {"ok":true}
//! → {"version":1,"op":"del","pod":{…},"netns":"/run/netns/cni-1234","container_id":"abc"}
//! ← {"ok":false,"error":"pod \"5f0c…\" is not enrolled"}
//! ```

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const PROTOCOL_VERSION: u32 = 1;
/// Where the node agent listens on a node (a hostPath shared with the CNI plugin).
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/weft/cni.sock";
/// A message line longer than this is rejected (a misbehaving client must
/// not make the agent buffer without bound).
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`; empty when the runtime did not pass K8S_POD_UID.
    #[serde(default)]
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PodEvent {
    /// A pod sandbox was created; its network is set up.
    Add {
        pod: PodRef,
        /// Path of the pod's network namespace, valid while the pod lives.
        netns: PathBuf,
        container_id: String,
        /// Pod annotations when the sender knows them (the simulator does;
        /// the CNI plugin does not, the agent then reads them from its pod watch).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        annotations: Option<HashMap<String, String>>,
        /// The pod's addresses, primary first, when the sender knows them
        /// (the CNI plugin: from the result of the cluster's CNI plugin).
        /// On Kubernetes the control plane learns them only after the ADD
        /// returns, and the agent must capture an enrolled pod before that.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ips: Vec<IpAddr>,
    },
    /// A pod sandbox is being torn down. `netns` may be absent or already gone.
    Del {
        pod: PodRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<PathBuf>,
        container_id: String,
    },
}

impl PodEvent {
    pub fn pod(&self) -> &PodRef {
        match self {
            PodEvent::Add { pod, .. } | PodEvent::Del { pod, .. } => pod,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub version: u32,
    #[serde(flatten)]
    pub event: PodEvent,
}

impl Message {
    pub fn new(event: PodEvent) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            event,
        }
    }

    /// Parses one line; the error text is what the agent sends back.
    pub fn parse(line: &str) -> Result<Self, String> {
        let msg: Message = serde_json::from_str(line)
            .map_err(|e| format!("malformed registration message: {e}"))?;
        if msg.version != PROTOCOL_VERSION {
            return Err(format!(
                "unsupported protocol version {} (this agent speaks {PROTOCOL_VERSION}); upgrade the CNI plugin and the node agent together",
                msg.version
            ));
        }
        Ok(msg)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn ok() -> Self {
        Self {
            ok: true,
            error: None,
        }
    }
    pub fn error(e: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(e.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the Weft node agent at {path}: {source}; is the weft node proxy running on this node?"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the Weft node agent at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the Weft node agent refused the pod: {0}")]
    Rejected(String),
    #[error("the Weft node agent sent an unreadable reply: {0}")]
    BadReply(String),
}

/// Sends one message and waits for its reply (bounded by `timeout`).
pub fn send(socket: &Path, message: &Message, timeout: Duration) -> Result<(), ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.into(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: socket.into(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(message).expect("messages always serialise");
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .take(MAX_LINE as u64)
        .read_line(&mut reply)
        .map_err(io)?;
    if reply.is_empty() {
        return Err(ClientError::BadReply(
            "connection closed without a reply".into(),
        ));
    }
    let reply: Reply =
        serde_json::from_str(reply.trim_end()).map_err(|e| ClientError::BadReply(e.to_string()))?;
    if reply.ok {
        Ok(())
    } else {
        Err(ClientError::Rejected(
            reply.error.unwrap_or_else(|| "no reason given".into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_message_wire_format_is_stable() {
        let msg = Message::new(PodEvent::Add {
            pod: PodRef {
                namespace: "demo".into(),
                name: "client".into(),
                uid: "u-1".into(),
            },
            netns: "/run/netns/cni-1".into(),
            container_id: "abc".into(),
            annotations: None,
            ips: Vec::new(),
        });
        let line = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"op":"add","pod":{"namespace":"demo","name":"client","uid":"u-1"},"netns":"/run/netns/cni-1","container_id":"abc"}"#
        );
        assert_eq!(Message::parse(&line).unwrap(), msg);
        let with_ips = r#"{"version":1,"op":"add","pod":{"namespace":"demo","name":"client","uid":"u-1"},"netns":"/run/netns/cni-1","container_id":"abc","ips":["10.244.0.5","fd00::5"]}"#;
        match Message::parse(with_ips).unwrap().event {
            PodEvent::Add { ips, .. } => assert_eq!(
                ips,
                [
                    "10.244.0.5".parse::<IpAddr>().unwrap(),
                    "fd00::5".parse().unwrap()
                ]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn del_without_netns_parses() {
        let msg = Message::parse(
            r#"{"version":1,"op":"del","pod":{"namespace":"a","name":"b"},"container_id":"c"}"#,
        )
        .unwrap();
        assert!(matches!(msg.event, PodEvent::Del { netns: None, .. }));
        assert_eq!(msg.event.pod().uid, "");
    }

    #[test]
    fn garbage_and_wrong_versions_are_explained() {
        assert!(
            Message::parse("\u{0}\u{1}garbage")
                .unwrap_err()
                .contains("malformed")
        );
        assert!(
            Message::parse(r#"{"version":1,"op":"reboot"}"#)
                .unwrap_err()
                .contains("malformed")
        );
        let err = Message::parse(
            r#"{"version":2,"op":"del","pod":{"namespace":"a","name":"b"},"container_id":"c"}"#,
        )
        .unwrap_err();
        assert!(err.contains("version 2"), "{err}");
    }
}
