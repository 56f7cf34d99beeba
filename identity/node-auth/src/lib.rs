//! Who is calling? The control plane (identity CA, destination service) serves
//! node proxies only, and each answer depends on *which node* asks: a proxy may
//! obtain certificates only for pods on its own node, and receives its own
//! node's view. This crate turns a caller's bearer credential into a node name.
//!
//! Two schemes, one trait:
//! - [`LocalCredentials`]: a directory of `<node>.token` files written by the
//!   simulator (local mode, `docs/simulator.md`).
//! - [`kubernetes::TokenReviewAuthenticator`]: on Kubernetes, a projected
//!   ServiceAccount token checked by TokenReview, bound to a node through the
//!   token's node claim; one audience per control plane service.
//!
//! In both, the identity CA and the destination service take different
//! credentials from a node proxy, so neither can replay what it received to
//! the other.

pub mod kubernetes;
mod local;

pub use local::LocalCredentials;

use futures::future::BoxFuture;

/// A node proxy the control plane has authenticated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthenticatedNode {
    /// The Kubernetes node name the caller runs on.
    pub node: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credential presented: node proxies must send `authorization: Bearer <token>`")]
    Missing,
    #[error("credential not recognised: is the node proxy using this cluster's credentials?")]
    Unknown,
    #[error("credential rejected: {0}")]
    Rejected(String),
    #[error("cannot check credentials right now: {0}")]
    Unavailable(String),
}

/// Maps a bearer credential to the node it belongs to.
pub trait NodeAuthenticator: Send + Sync + 'static {
    fn authenticate<'a>(
        &'a self,
        bearer: &'a str,
    ) -> BoxFuture<'a, Result<AuthenticatedNode, AuthError>>;
}

/// Extracts the token from an `authorization` header value (`Bearer <token>`).
pub fn bearer_token(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| AuthError::Rejected("authorization header is not `Bearer <token>`".into()))?
        .trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer_token(Some("Bearer abc")).unwrap(), "abc");
        assert!(matches!(bearer_token(None), Err(AuthError::Missing)));
        assert!(matches!(
            bearer_token(Some("Bearer ")),
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            bearer_token(Some("Basic abc")),
            Err(AuthError::Rejected(_))
        ));
    }
}
