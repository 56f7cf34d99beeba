//! Local mode: one token file per node, `<dir>/<node>.token`.
//!
//! The directory is read on every call rather than cached: the simulator
//! writes it when a cluster comes up, and a control plane started earlier (or
//! a node added later) must see the new files without a restart. It holds a
//! handful of small files, so the cost is a few `read`s per authentication,
//! which happens once per connection, not per request.

use crate::{AuthError, AuthenticatedNode, NodeAuthenticator};
use futures::future::BoxFuture;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct LocalCredentials {
    dir: PathBuf,
}

impl LocalCredentials {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn lookup(&self, bearer: &str) -> Result<AuthenticatedNode, AuthError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| {
            AuthError::Unavailable(format!(
                "cannot read credentials directory {}: {e}",
                self.dir.display()
            ))
        })?;
        let mut found = None;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(node) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".token"))
            else {
                continue;
            };
            let Ok(expected) = std::fs::read_to_string(&path) else {
                tracing::warn!(path = %path.display(), "unreadable node credential file");
                continue;
            };
            // Compare every file without stopping early, in constant time per
            // file, so timing tells a caller nothing about which token is close.
            if constant_time_eq(expected.trim().as_bytes(), bearer.as_bytes()) {
                found = Some(node.to_string());
            }
        }
        found
            .map(|node| AuthenticatedNode { node })
            .ok_or(AuthError::Unknown)
    }
}

impl NodeAuthenticator for LocalCredentials {
    fn authenticate<'a>(
        &'a self,
        bearer: &'a str,
    ) -> BoxFuture<'a, Result<AuthenticatedNode, AuthError>> {
        Box::pin(async move { self.lookup(bearer) })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn maps_token_to_node_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node-a.token"), "aaaa1111\n").unwrap();
        std::fs::write(dir.path().join("node-b.token"), "bbbb2222").unwrap();
        std::fs::write(dir.path().join("README"), "not a token").unwrap();
        let auth = LocalCredentials::new(dir.path());

        let a = auth.authenticate("aaaa1111").await.unwrap();
        assert_eq!(a.node, "node-a");
        let b = auth.authenticate("bbbb2222").await.unwrap();
        assert_eq!(b.node, "node-b");
        assert!(matches!(
            auth.authenticate("aaaa111").await,
            Err(AuthError::Unknown)
        ));
        assert!(matches!(
            auth.authenticate("not a token").await,
            Err(AuthError::Unknown)
        ));
    }

    #[tokio::test]
    async fn missing_directory_is_unavailable_not_a_panic() {
        let auth = LocalCredentials::new("/nonexistent/weft/credentials");
        let err = auth.authenticate("x").await.unwrap_err();
        assert!(matches!(err, AuthError::Unavailable(_)), "{err}");
    }

    #[tokio::test]
    async fn new_node_file_is_seen_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let auth = LocalCredentials::new(dir.path());
        assert!(auth.authenticate("cccc").await.is_err());
        std::fs::write(dir.path().join("node-c.token"), "cccc").unwrap();
        assert_eq!(auth.authenticate("cccc").await.unwrap().node, "node-c");
    }
}
