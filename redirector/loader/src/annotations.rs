//! Per-pod opt-outs read from pod annotations.

use crate::Error;
use std::collections::{BTreeSet, HashMap};

/// Outbound destination ports that are never redirected to the proxy.
pub const SKIP_OUTBOUND_PORTS: &str = "weft.io/skip-outbound-ports";
/// Inbound ports that are never steered to the proxy's 15006 listener.
pub const SKIP_INBOUND_PORTS: &str = "weft.io/skip-inbound-ports";

/// The ports a pod excludes from capture, per direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipPorts {
    pub outbound: BTreeSet<u16>,
    pub inbound: BTreeSet<u16>,
}

impl SkipPorts {
    /// Reads both annotations; a pod without them skips nothing. A malformed
    /// value is an error (not "skip nothing"): silently capturing a port the
    /// operator meant to exclude would break that traffic with no hint why.
    pub fn from_annotations(annotations: &HashMap<String, String>) -> Result<Self, Error> {
        Ok(Self {
            outbound: parse(SKIP_OUTBOUND_PORTS, annotations.get(SKIP_OUTBOUND_PORTS))?,
            inbound: parse(SKIP_INBOUND_PORTS, annotations.get(SKIP_INBOUND_PORTS))?,
        })
    }
}

fn parse(annotation: &'static str, value: Option<&String>) -> Result<BTreeSet<u16>, Error> {
    let Some(value) = value else {
        return Ok(BTreeSet::new());
    };
    let invalid = |reason: String| Error::Annotation {
        annotation,
        value: value.clone(),
        reason,
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(0) => Err(invalid("port 0 is not a port".into())),
            Ok(port) => Ok(port),
            Err(_) => Err(invalid(format!("{p:?} is not a port number"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn absent_annotations_skip_nothing() {
        let skip = SkipPorts::from_annotations(&HashMap::new()).unwrap();
        assert_eq!(skip, SkipPorts::default());
    }

    #[test]
    fn ports_are_parsed_with_spaces_and_trailing_commas() {
        let skip = SkipPorts::from_annotations(&annotations(&[
            (SKIP_OUTBOUND_PORTS, " 5432, 6379,"),
            (SKIP_INBOUND_PORTS, "9090"),
        ]))
        .unwrap();
        assert_eq!(
            skip.outbound.into_iter().collect::<Vec<_>>(),
            vec![5432, 6379]
        );
        assert_eq!(skip.inbound.into_iter().collect::<Vec<_>>(), vec![9090]);
    }

    #[test]
    fn garbage_is_a_typed_error_naming_the_annotation() {
        for bad in ["http", "70000", "0", "80;443"] {
            let err = SkipPorts::from_annotations(&annotations(&[(SKIP_INBOUND_PORTS, bad)]))
                .unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::Annotation { .. }), "{bad}: {msg}");
            assert!(msg.contains(SKIP_INBOUND_PORTS), "{msg}");
        }
    }
}
