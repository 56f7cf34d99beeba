//! SPIFFE IDs of Kubernetes workloads: one per (namespace, service account).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The trust domain when none is configured (design.md).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Parsing is strict: this string is what a certificate's URI SAN must equal
/// byte for byte, so two spellings of one identity must not both parse.
///
/// Held as the URI itself, shared, with where its names are: a route, a
/// pool key or a connection takes a copy of its peer's identity for every
/// request, and a copy is then a reference count, not three strings.
///
/// Equal, and hashed alike, as URIs: the offsets follow from the URI.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: Arc<str>,
    /// Where the namespace starts and ends in `uri`.
    namespace: (u16, u16),
}

/// What comes before the trust domain, and between the names.
const SCHEME: &str = "spiffe://";
const NS: &str = "/ns/";
const SA: &str = "/sa/";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error(
        "{0:?} is not a SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Format(String),
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error(
        "invalid {what} {value:?}: Kubernetes names are lowercase letters, digits, '-' and '.', at most 253 characters"
    )]
    Name { what: &'static str, value: String },
}

impl SpiffeId {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let (trust_domain, namespace, service_account) = (
            trust_domain.into(),
            namespace.into(),
            service_account.into(),
        );
        Self::from_names(
            &format!("{SCHEME}{trust_domain}{NS}{namespace}{SA}{service_account}"),
            &trust_domain,
            &namespace,
            &service_account,
        )
    }

    /// `uri`, already known to be made of these names, once they are
    /// valid (their lengths bound the offsets: 9 + 255 + 4 + 253 < 65 536).
    fn from_names(
        uri: &str,
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_name("namespace", namespace)?;
        validate_name("service account", service_account)?;
        let start = SCHEME.len() + trust_domain.len() + NS.len();
        let end = start + namespace.len();
        Ok(Self {
            uri: Arc::from(uri),
            namespace: (start as u16, end as u16),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..usize::from(self.namespace.0) - NS.len()]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[usize::from(self.namespace.0)..usize::from(self.namespace.1)]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.namespace.1) + SA.len()..]
    }

    /// The URI as it appears in a certificate's SAN.
    pub fn uri(&self) -> String {
        self.uri.to_string()
    }

    /// The names, in the order identities compare.
    fn names(&self) -> (&str, &str, &str) {
        (
            self.trust_domain(),
            self.namespace(),
            self.service_account(),
        )
    }
}

impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SpiffeId {
    /// By trust domain, then namespace, then service account.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.names().cmp(&other.names())
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeId")
            .field("trust_domain", &self.trust_domain())
            .field("namespace", &self.namespace())
            .field("service_account", &self.service_account())
            .finish()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let format = || SpiffeIdError::Format(s.chars().take(300).collect());
        let rest = s.strip_prefix(SCHEME).ok_or_else(format)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(format());
        };
        // `s` is exactly these names in the one spelling (no other `/`).
        Self::from_names(s, td, ns, sa)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(td.chars().take(300).collect()))
    }
}

/// Namespaces and service accounts are DNS-1123 subdomains in Kubernetes.
fn validate_name(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    let bytes = value.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Name {
            what,
            value: value.chars().take(300).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = "spiffe://cluster.local/ns/demo/sa/default";
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "default");
        assert_eq!(id.to_string(), s);
    }

    #[test]
    fn built_and_parsed_are_one_identity_of_the_same_names() {
        let longest = "a".repeat(253);
        for (td, ns, sa) in [
            ("cluster.local", "demo", "default"),
            ("t", "n", "s"),
            ("x".repeat(255).as_str(), longest.as_str(), longest.as_str()),
        ] {
            let built = SpiffeId::new(td, ns, sa).unwrap();
            let parsed: SpiffeId = built.to_string().parse().unwrap();
            assert_eq!(built, parsed);
            for id in [&built, &parsed] {
                assert_eq!(
                    (id.trust_domain(), id.namespace(), id.service_account()),
                    (td, ns, sa)
                );
                assert_eq!(id.uri(), format!("spiffe://{td}/ns/{ns}/sa/{sa}"));
            }
        }
        let id = SpiffeId::new("cluster.local", "demo", "web").unwrap();
        assert_eq!(
            format!("{id:?}"),
            r#"SpiffeId { trust_domain: "cluster.local", namespace: "demo", service_account: "web" }"#
        );
    }

    #[test]
    fn identities_order_by_trust_domain_then_namespace_then_account() {
        let id = |td, ns, sa| SpiffeId::new(td, ns, sa).unwrap();
        // As names, not as URIs: "a" < "a.b" although "spiffe://a/" sorts
        // after "spiffe://a.b" ('/' > '.').
        let mut ids = [
            id("a.b", "n", "s"),
            id("a", "z", "s"),
            id("a", "n-x", "s"),
            id("a", "n", "t"),
            id("a", "n", "s"),
        ];
        ids.sort();
        let names: Vec<_> = ids
            .iter()
            .map(|i| {
                format!(
                    "{}/{}/{}",
                    i.trust_domain(),
                    i.namespace(),
                    i.service_account()
                )
            })
            .collect();
        assert_eq!(names, ["a/n/s", "a/n/t", "a/n-x/s", "a/z/s", "a.b/n/s"]);
    }

    #[test]
    fn refuses_other_shapes() {
        for bad in [
            "",
            "spiffe://",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a/sa/-b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} parsed");
        }
    }
}
