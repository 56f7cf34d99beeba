//! HTTP/1.1 protocol upgrades (WebSocket and the like): after a 101 both
//! sides hand their connections over and bytes flow as for opaque TCP.
//!
//! The spliced connections outlive the HTTP connection that negotiated
//! them, so they are tracked: the HTTP connection's handler waits for them
//! (the proxy still counts the connection as open, and the destination side
//! can still revoke it), and dropping the tracker aborts them.

use std::net::SocketAddr;
use std::sync::Mutex;
use tokio::task::JoinHandle;

/// An HTTP/1 request asking to switch protocols.
pub fn wants_upgrade<B>(request: &http::Request<B>) -> bool {
    request.headers().contains_key(http::header::UPGRADE)
        && request
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// The upgraded connections of one HTTP connection.
#[derive(Default)]
pub struct Upgrades(Mutex<Vec<JoinHandle<()>>>);

impl Upgrades {
    /// Splices `client` and `upstream` once both sides have upgraded.
    pub fn spawn(
        &self,
        client: hyper::upgrade::OnUpgrade,
        upstream: hyper::upgrade::OnUpgrade,
        target: SocketAddr,
    ) {
        let task = tokio::spawn(splice_upgraded(client, upstream, target));
        self.0.lock().expect("upgrades lock").push(task);
    }

    /// Waits until every upgraded connection has ended.
    pub async fn finish(&self) {
        loop {
            let next = self.0.lock().expect("upgrades lock").pop();
            let Some(mut task) = next else { return };
            // If this wait is dropped (revocation), the task is aborted.
            let guard = AbortOnDrop(Some(&mut task));
            let _ = guard.wait().await;
        }
    }
}

impl Drop for Upgrades {
    fn drop(&mut self) {
        if let Ok(tasks) = self.0.get_mut() {
            tasks.drain(..).for_each(|t| t.abort());
        }
    }
}

struct AbortOnDrop<'a>(Option<&'a mut JoinHandle<()>>);

impl AbortOnDrop<'_> {
    async fn wait(mut self) -> Result<(), tokio::task::JoinError> {
        let result = match self.0.as_mut() {
            Some(task) => (&mut **task).await,
            None => Ok(()),
        };
        self.0 = None;
        result
    }
}

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

async fn splice_upgraded(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    target: SocketAddr,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(%target, error = %e, "protocol upgrade did not complete");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    let (_, err) = weft_stream::splice(&mut client, &mut upstream).await;
    if let Some(e) = err {
        tracing::debug!(%target, error = %e, "upgraded connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_are_recognised() {
        let r = http::Request::builder()
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(wants_upgrade(&r));
        let r = http::Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!wants_upgrade(&r), "Upgrade without Connection: upgrade");
    }

    #[tokio::test]
    async fn dropping_the_tracker_aborts_upgraded_connections() {
        let upgrades = Upgrades::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // A stand-in for a spliced connection: runs until aborted.
        let task = tokio::spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        upgrades.0.lock().unwrap().push(task);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), upgrades.finish());
        assert!(waiting.await.is_err(), "finish waits for the connection");
        drop(upgrades);
        assert!(
            rx.await.is_err(),
            "the task was aborted (its sender dropped)"
        );
    }
}
