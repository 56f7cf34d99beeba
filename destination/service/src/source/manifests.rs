//! Reading a manifest file: YAML (several documents) or JSON, `kind: List`
//! unwrapped, unknown kinds skipped, each object validated on its own so one
//! bad object does not hide its neighbours.

use crate::model::{self, Object, Rejection};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// What one file holds.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub rejections: Vec<Rejection>,
}

/// `Err`: the file as a whole does not parse (YAML/JSON syntax).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, String> {
    let documents: Vec<Value> = if path.extension().is_some_and(|e| e == "json") {
        vec![serde_json::from_slice(bytes).map_err(|e| e.to_string())?]
    } else {
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_slice(bytes) {
            docs.push(Value::deserialize(doc).map_err(|e| e.to_string())?);
        }
        docs
    };
    let mut parsed = Parsed::default();
    for (i, doc) in documents.into_iter().enumerate() {
        collect(doc, i, &mut parsed);
    }
    Ok(parsed)
}

fn collect(doc: Value, index: usize, out: &mut Parsed) {
    match &doc {
        Value::Null => return,
        Value::Object(map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
            if let Some(Value::Array(items)) = map.get("items") {
                for item in items.clone() {
                    collect(item, index, out);
                }
            }
            return;
        }
        Value::Object(map) if map.get("kind").and_then(Value::as_str).is_some() => {}
        _ => {
            out.rejections.push(Rejection {
                kind: "Unknown".into(),
                object: format!("document {}", index + 1),
                reason: "is not a Kubernetes object (no `kind`)".into(),
            });
            return;
        }
    }
    match model::from_value(doc) {
        Ok(Some(object)) => out.objects.push(object),
        Ok(None) => {}
        Err(rejection) => out.rejections.push(rejection),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_with_unknown_kinds_and_a_bad_object() {
        let yaml = br#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: demo}
spec: {containers: [{name: c, ports: [{containerPort: 70000}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec: {nodeName: node-a, containers: [{name: c}]}
"#;
        let parsed = parse(Path::new("demo.yaml"), yaml).unwrap();
        assert_eq!(parsed.objects.len(), 2);
        assert_eq!(parsed.rejections.len(), 1);
        assert_eq!(parsed.rejections[0].object, "demo/broken");
        assert!(parsed.rejections[0].reason.contains("70000"));
    }

    #[test]
    fn syntax_error_fails_the_file() {
        let err = parse(
            Path::new("x.yaml"),
            b"kind: Pod\nmetadata: {name: [unclosed\n",
        )
        .unwrap_err();
        // The reason a user needs to fix the file: what is wrong, and where
        // (the flow sequence opened on line 2 is never closed).
        assert!(err.contains("did not find expected ',' or ']'"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        // JSON too, by extension: its own parser's reason and position.
        let err = parse(
            Path::new("x.json"),
            b"{\"kind\": \"Pod\",\n \"metadata\": }",
        )
        .unwrap_err();
        assert!(err.contains("expected value at line 2"), "{err}");
    }
}
