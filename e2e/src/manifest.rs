//! Loading a directory of ordinary Kubernetes YAML.
//!
//! The simulator reads the same files an operator would `kubectl apply`:
//! multi-document YAML (or JSON), any file name ending in `.yaml`, `.yml` or
//! `.json`, top level of the directory only. Kinds it plays (Namespace,
//! ServiceAccount, Pod, Service, Node) are parsed with the real Kubernetes
//! types; everything else (the policy CRDs, ConfigMaps, …) is counted and
//! left to the parts that care about it.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One object and the file it came from, so errors can name both.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub file: PathBuf,
    pub object: T,
}

#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub dir: PathBuf,
    pub namespaces: Vec<Sourced<Namespace>>,
    pub service_accounts: Vec<Sourced<ServiceAccount>>,
    pub pods: Vec<Sourced<Pod>>,
    pub services: Vec<Sourced<Service>>,
    pub nodes: Vec<Sourced<Node>>,
    /// Objects of kinds the simulator does not play (policy CRDs, …).
    pub ignored: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot read: {source}", file.display())]
    ReadFile {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: document {index} is not valid YAML: {reason}", file.display())]
    Yaml {
        file: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{}: {object}: {reason}", file.display())]
    Invalid {
        file: PathBuf,
        object: String,
        reason: String,
    },
    #[error("{}: {object} is defined twice (first in {})", file.display(), first.display())]
    Duplicate {
        file: PathBuf,
        object: String,
        first: PathBuf,
    },
    #[error("no manifests (*.yaml, *.yml, *.json) in {}", dir.display())]
    Empty { dir: PathBuf },
}

impl Manifests {
    /// Reads every manifest file in `dir` (sorted by name, so errors and
    /// address plans do not depend on directory order).
    pub fn load_dir(dir: &Path) -> Result<Self, ManifestError> {
        let read_dir = std::fs::read_dir(dir).map_err(|source| ManifestError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut files: Vec<PathBuf> = read_dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_manifest_file(p))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ManifestError::Empty {
                dir: dir.to_path_buf(),
            });
        }
        let mut manifests = Manifests {
            dir: dir.to_path_buf(),
            ..Default::default()
        };
        let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
        for file in files {
            let text =
                std::fs::read_to_string(&file).map_err(|source| ManifestError::ReadFile {
                    file: file.clone(),
                    source,
                })?;
            manifests.add_text(&file, &text, &mut seen)?;
        }
        Ok(manifests)
    }

    /// Parses the documents of one file (exposed for tests).
    pub fn from_text(file: &Path, text: &str) -> Result<Self, ManifestError> {
        let mut manifests = Manifests::default();
        manifests.add_text(file, text, &mut BTreeMap::new())?;
        Ok(manifests)
    }

    fn add_text(
        &mut self,
        file: &Path,
        text: &str,
        seen: &mut BTreeMap<String, PathBuf>,
    ) -> Result<(), ManifestError> {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let yaml_err = |e: serde_yaml::Error| ManifestError::Yaml {
                file: file.to_path_buf(),
                index: index + 1,
                reason: e.to_string(),
            };
            let value = serde_yaml::Value::deserialize(document).map_err(yaml_err)?;
            if value.is_null() {
                continue; // an empty document (`---` at the end of a file)
            }
            self.add_value(file, index + 1, value, seen)?;
        }
        Ok(())
    }

    fn add_value(
        &mut self,
        file: &Path,
        index: usize,
        value: serde_yaml::Value,
        seen: &mut BTreeMap<String, PathBuf>,
    ) -> Result<(), ManifestError> {
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_string);
        let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
            return Err(ManifestError::Invalid {
                file: file.to_path_buf(),
                object: format!("document {index}"),
                reason: "missing apiVersion or kind: not a Kubernetes object".into(),
            });
        };
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(|v| v.as_str());
        let namespace = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str());
        let object = match (namespace, name) {
            (_, None) => format!("{kind} (document {index})"),
            (Some(ns), Some(n)) if namespaced(&kind) => format!("{kind} {ns}/{n}"),
            (None, Some(n)) if namespaced(&kind) => format!("{kind} default/{n}"),
            (_, Some(n)) => format!("{kind} {n}"),
        };
        let invalid = |reason: String| ManifestError::Invalid {
            file: file.to_path_buf(),
            object: object.clone(),
            reason,
        };
        if api_version != "v1"
            || !matches!(
                kind.as_str(),
                "Namespace" | "ServiceAccount" | "Pod" | "Service" | "Node"
            )
        {
            self.ignored += 1;
            return Ok(());
        }
        if name.is_none() {
            return Err(invalid("metadata.name is required".into()));
        }
        if let Some(first) = seen.insert(object.clone(), file.to_path_buf()) {
            return Err(ManifestError::Duplicate {
                file: file.to_path_buf(),
                object,
                first,
            });
        }
        let file = file.to_path_buf();
        let parse_err = |e: serde_yaml::Error| invalid(e.to_string());
        match kind.as_str() {
            "Namespace" => self.namespaces.push(Sourced {
                file,
                object: serde_yaml::from_value(value).map_err(parse_err)?,
            }),
            "ServiceAccount" => self.service_accounts.push(Sourced {
                file,
                object: serde_yaml::from_value(value).map_err(parse_err)?,
            }),
            "Node" => self.nodes.push(Sourced {
                file,
                object: serde_yaml::from_value(value).map_err(parse_err)?,
            }),
            "Service" => self.services.push(Sourced {
                file,
                object: serde_yaml::from_value(value).map_err(parse_err)?,
            }),
            "Pod" => {
                let pod: Pod = serde_yaml::from_value(value).map_err(parse_err)?;
                check_pod(&pod).map_err(invalid)?;
                self.pods.push(Sourced { file, object: pod });
            }
            _ => unreachable!("kind filtered above"),
        }
        Ok(())
    }
}

fn namespaced(kind: &str) -> bool {
    !matches!(kind, "Namespace" | "Node")
}

fn is_manifest_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// What the simulator needs of a Pod beyond what the schema enforces.
fn check_pod(pod: &Pod) -> Result<(), String> {
    let spec = pod.spec.as_ref().ok_or("spec is required")?;
    if spec.node_name.as_deref().unwrap_or("").is_empty() {
        return Err("spec.nodeName is required: the simulator has no scheduler, so say which node runs the pod".into());
    }
    if spec.containers.is_empty() {
        return Err("spec.containers is empty".into());
    }
    for c in &spec.containers {
        if c.command.as_ref().is_none_or(|cmd| cmd.is_empty()) {
            return Err(format!(
                "container {:?} has no command: the simulator runs commands on this machine, not images",
                c.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {weft.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec:
  nodeName: node-a
  containers:
  - name: main
    command: [sleep, infinity]
---
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: web, namespace: demo}
spec: {}
---
"#;

    #[test]
    fn loads_kinds_and_ignores_others() {
        let m = Manifests::from_text(Path::new("x.yaml"), GOOD).unwrap();
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(m.pods.len(), 1);
        assert_eq!(m.ignored, 1);
        let ns = &m.namespaces[0].object;
        assert_eq!(
            ns.metadata.labels.as_ref().unwrap()["weft.io/mesh"],
            "enabled"
        );
    }

    fn err(text: &str) -> String {
        Manifests::from_text(Path::new("bad.yaml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn pod_without_node_names_file_and_object() {
        let e = err(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n}\nspec:\n  containers: [{name: c, command: [sh]}]\n",
        );
        assert!(
            e.starts_with("bad.yaml: Pod n/p: spec.nodeName is required"),
            "{e}"
        );
    }

    #[test]
    fn container_without_command() {
        let e = err(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: nginx}]\n",
        );
        assert!(
            e.contains("Pod default/p") && e.contains("has no command"),
            "{e}"
        );
    }

    #[test]
    fn unparseable_yaml() {
        let e = err("apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n");
        assert!(
            e.starts_with("bad.yaml: document 1 is not valid YAML"),
            "{e}"
        );
    }

    #[test]
    fn wrong_field_type_names_object() {
        let e = err(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: n}\nspec: {ports: oops}\n",
        );
        assert!(e.starts_with("bad.yaml: Service n/s: "), "{e}");
    }

    #[test]
    fn duplicate_objects() {
        let one = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n";
        let e = err(&format!("{one}---\n{one}"));
        assert!(e.contains("Namespace demo is defined twice"), "{e}");
    }

    #[test]
    fn not_an_object() {
        let e = err("just: a map\n");
        assert!(e.contains("missing apiVersion or kind"), "{e}");
    }

    #[test]
    fn missing_directory_and_empty_directory() {
        let e = Manifests::load_dir(Path::new("/nonexistent/weft")).unwrap_err();
        assert!(
            e.to_string().contains("cannot read manifest directory"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let e = Manifests::load_dir(dir.path()).unwrap_err();
        assert!(matches!(e, ManifestError::Empty { .. }), "{e}");
    }
}
