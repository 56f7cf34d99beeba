//! Label selectors (`matchLabels` and `matchExpressions`), as Kubernetes
//! evaluates them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub struct Selector {
    labels: BTreeMap<String, String>,
    expressions: Vec<Expression>,
}

#[derive(Clone, Debug, PartialEq)]
enum Expression {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// An operator Kubernetes does not know, or In/NotIn without values,
    /// is an error: such a selector selects nothing the operator meant.
    pub fn parse(selector: &LabelSelector) -> Result<Self, String> {
        let mut expressions = Vec::new();
        for e in selector.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            expressions.push(match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "podSelector: operator {} on {:?} needs values",
                        e.operator, e.key
                    ));
                }
                "In" => Expression::In(e.key.clone(), values),
                "NotIn" => Expression::NotIn(e.key.clone(), values),
                "Exists" => Expression::Exists(e.key.clone()),
                "DoesNotExist" => Expression::DoesNotExist(e.key.clone()),
                other => {
                    return Err(format!(
                        "podSelector: unknown operator {other:?} (use In, NotIn, Exists, DoesNotExist)"
                    ));
                }
            });
        }
        Ok(Self {
            labels: selector.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    /// For a selector [`Selector::parse`] refuses: `matchLabels` and the
    /// expressions that make sense, the others dropped. It selects at least
    /// every pod the operator can have meant (and maybe more), which is what
    /// failing closed needs: an invalid Server denies on those pods' port.
    pub fn parse_superset(selector: &LabelSelector) -> Self {
        let expressions = selector
            .match_expressions
            .iter()
            .flatten()
            .filter_map(|e| {
                let values = e.values.clone().unwrap_or_default();
                match e.operator.as_str() {
                    "In" if !values.is_empty() => Some(Expression::In(e.key.clone(), values)),
                    "NotIn" if !values.is_empty() => Some(Expression::NotIn(e.key.clone(), values)),
                    "Exists" => Some(Expression::Exists(e.key.clone())),
                    "DoesNotExist" => Some(Expression::DoesNotExist(e.key.clone())),
                    _ => None,
                }
            })
            .collect();
        Self {
            labels: selector.match_labels.clone().unwrap_or_default(),
            expressions,
        }
    }

    /// One `matchLabels` pair every selected pod has: lets the index look
    /// Servers up by a pod's labels instead of trying each one.
    pub fn required_label(&self) -> Option<(&str, &str)> {
        self.labels
            .iter()
            .next()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// An empty selector selects every pod (of the namespace).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| match e {
                Expression::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Expression::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Expression::Exists(k) => labels.contains_key(k),
                Expression::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn labels_and_expressions() {
        let s = Selector::parse(&LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                req("tier", "In", &["front", "edge"]),
                req("canary", "DoesNotExist", &[]),
                req("zone", "NotIn", &["b"]),
            ]),
        })
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "edge")])));
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "edge"),
            ("canary", "1")
        ])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "edge"), ("zone", "b")])));
        assert!(!s.matches(&labels(&[("tier", "edge")])));
    }

    #[test]
    fn bad_operators_are_errors() {
        for bad in [req("a", "Equals", &["x"]), req("a", "In", &[])] {
            let s = LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![bad]),
            };
            assert!(Selector::parse(&s).is_err());
        }
    }
}
