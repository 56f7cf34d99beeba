//! The node agent's end of the pod registration protocol
//! (`weft_registration`): the CNI plugin and the simulator connect here.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use weft_registration::{MAX_LINE, Message, PodEvent, Reply};

/// Accepts registrations on a Unix socket and hands them to the agent one
/// by one ([`Self::next`]); each must be answered with
/// [`RegistrationRequest::ack`] or [`RegistrationRequest::reject`].
pub struct PodRegistrationListener {
    path: PathBuf,
    /// (device, inode) of our socket file: dropped, we remove the path only
    /// while it is still ours, not a successor's that took it over.
    file: Option<(u64, u64)>,
    requests: mpsc::Receiver<RegistrationRequest>,
    acceptor: tokio::task::JoinHandle<()>,
}

/// One pod event waiting for the agent's answer.
#[derive(Debug)]
pub struct RegistrationRequest {
    pub event: PodEvent,
    reply: oneshot::Sender<Reply>,
}

impl RegistrationRequest {
    /// The pod is handled (enrolled, or deliberately left alone).
    pub fn ack(self) {
        let _ = self.reply.send(Reply::ok());
    }

    /// The pod could not be handled; the CNI plugin fails the ADD with
    /// this reason, and the kubelet retries.
    pub fn reject(self, reason: impl std::fmt::Display) {
        let _ = self.reply.send(Reply::error(reason.to_string()));
    }
}

impl PodRegistrationListener {
    /// Listens on `path` (mode 0600: only root, the CNI plugin's user, may
    /// register pods). A socket there, stale or of a running agent, is
    /// replaced in one rename: a client connecting meanwhile reaches the
    /// old agent or the new one, never nothing (a rollout's hand-over).
    /// Must be called inside a tokio runtime.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; refusing to replace it",
                        path.display()
                    ),
                ));
            }
            Err(_) => {}
        }
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".{}.new", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let file = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let (tx, requests) = mpsc::channel(64);
        let acceptor = tokio::spawn(accept_loop(listener, tx));
        Ok(Self {
            path,
            file,
            requests,
            acceptor,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next pod event, in arrival order per connection.
    pub async fn next(&mut self) -> Option<RegistrationRequest> {
        self.requests.recv().await
    }
}

impl Drop for PodRegistrationListener {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.acceptor.abort();
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<RegistrationRequest>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, tx.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "pod registration accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<RegistrationRequest>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                let _ = send(
                    &mut write,
                    &Reply::error(format!("unreadable message: {e}")),
                )
                .await;
                return;
            }
        };
        if n == 0 {
            return;
        }
        if !line.ends_with('\n') && n > MAX_LINE {
            let _ = send(
                &mut write,
                &Reply::error(format!("message longer than {MAX_LINE} bytes")),
            )
            .await;
            return;
        }
        let reply = match Message::parse(line.trim_end()) {
            Err(e) => Reply::error(e),
            Ok(msg) => {
                let (reply_tx, reply_rx) = oneshot::channel();
                let request = RegistrationRequest {
                    event: msg.event,
                    reply: reply_tx,
                };
                if tx.send(request).await.is_err() {
                    Reply::error("the node agent is shutting down")
                } else {
                    reply_rx.await.unwrap_or_else(|_| {
                        Reply::error("the node agent dropped the request without an answer")
                    })
                }
            }
        };
        if send(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_string(reply).map_err(io::Error::other)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use weft_registration::{ClientError, PodRef, send as client_send};

    fn add(uid: &str) -> Message {
        Message::new(PodEvent::Add {
            pod: PodRef {
                namespace: "demo".into(),
                name: "client".into(),
                uid: uid.into(),
            },
            netns: "/run/netns/x".into(),
            container_id: "c1".into(),
            annotations: Some(
                [("weft.io/skip-inbound-ports".to_string(), "9090".to_string())].into(),
            ),
            ips: Vec::new(),
        })
    }

    /// The client is blocking std code (as in the CNI binary): run it off the runtime.
    async fn client(path: PathBuf, msg: Message) -> Result<(), ClientError> {
        tokio::task::spawn_blocking(move || client_send(&path, &msg, Duration::from_secs(5)))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn events_reach_the_agent_and_answers_reach_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        let mut listener = PodRegistrationListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let ok = tokio::spawn(client(path.clone(), add("u-1")));
        let req = listener.next().await.unwrap();
        match &req.event {
            PodEvent::Add {
                pod, annotations, ..
            } => {
                assert_eq!(pod.uid, "u-1");
                assert_eq!(
                    annotations.as_ref().unwrap()["weft.io/skip-inbound-ports"],
                    "9090"
                );
            }
            other => panic!("{other:?}"),
        }
        req.ack();
        ok.await.unwrap().unwrap();

        let refused = tokio::spawn(client(path.clone(), add("u-2")));
        listener.next().await.unwrap().reject("netns is gone");
        let err = refused.await.unwrap().unwrap_err();
        assert!(
            matches!(&err, ClientError::Rejected(r) if r == "netns is gone"),
            "{err}"
        );

        let dropped = tokio::spawn(client(path.clone(), add("u-3")));
        drop(listener.next().await.unwrap());
        let err = dropped.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("without an answer"), "{err}");
    }

    #[tokio::test]
    async fn garbage_gets_an_error_reply_and_nothing_reaches_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        let mut listener = PodRegistrationListener::bind(&path).unwrap();
        let mut stream = UnixStream::connect(&path).await.unwrap();
        stream.write_all(b"{not json\n").await.unwrap();
        let mut reply = String::new();
        BufReader::new(&mut stream)
            .read_line(&mut reply)
            .await
            .unwrap();
        let reply: Reply = serde_json::from_str(&reply).unwrap();
        assert!(!reply.ok);
        assert!(reply.error.unwrap().contains("malformed"));
        let nothing = tokio::time::timeout(Duration::from_millis(100), listener.next()).await;
        assert!(nothing.is_err(), "garbage was not forwarded");
    }

    #[tokio::test]
    async fn a_regular_file_at_the_path_is_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        std::fs::write(&path, b"important").unwrap();
        let err = PodRegistrationListener::bind(&path).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"important");
    }

    /// A rollout: a second agent binds the path of a running one. New
    /// clients reach the second; the first one's drop (its exit) leaves the
    /// second's socket in place.
    #[tokio::test]
    async fn a_second_agent_takes_the_socket_over_and_the_first_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        let mut old = PodRegistrationListener::bind(&path).unwrap();
        // Positive control: the first agent takes pods.
        let ok = tokio::spawn(client(path.clone(), add("u-old")));
        old.next().await.unwrap().ack();
        ok.await.unwrap().unwrap();

        let mut new = PodRegistrationListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let ok = tokio::spawn(client(path.clone(), add("u-new")));
        let req = new.next().await.unwrap();
        assert!(matches!(&req.event, PodEvent::Add { pod, .. } if pod.uid == "u-new"));
        req.ack();
        ok.await.unwrap().unwrap();

        drop(old);
        assert!(
            path.exists(),
            "the old agent removed its successor's socket"
        );
        let ok = tokio::spawn(client(path.clone(), add("u-after")));
        new.next().await.unwrap().ack();
        ok.await.unwrap().unwrap();
        // Nothing but the socket is left in the directory (no temporary names).
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("cni.sock")]);
        drop(new);
        assert!(!path.exists(), "the last agent removes its socket");
    }
}
