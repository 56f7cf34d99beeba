//! The CRDs in `crds/`: up to date with the Rust types, valid
//! `apiextensions.k8s.io/v1` objects, and schemas that accept the worked
//! examples of docs/policy.md and refuse malformed objects.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn crds_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../crds"))
}

#[test]
fn crds_dir_is_up_to_date() {
    let rendered = weft_policy_api::crd::render();
    for (name, text) in &rendered {
        let path = crds_dir().join(name);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == *text,
            "{} is stale or missing: run `cargo xtask crds` and commit crds/",
            path.display()
        );
    }
    // No generated file left over from a kind that no longer exists.
    let mut on_disk: Vec<String> = std::fs::read_dir(crds_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".policy.weft.io.yaml"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = rendered.into_iter().map(|(n, _)| n).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "run `cargo xtask crds` and commit crds/");
}

/// The CRDs as read back from the files, by kind.
fn crds() -> BTreeMap<String, CustomResourceDefinition> {
    let mut out = BTreeMap::new();
    for (name, _) in weft_policy_api::crd::render() {
        let text = std::fs::read_to_string(crds_dir().join(&name)).unwrap();
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{name} is not a CustomResourceDefinition: {e}"));
        out.insert(crd.spec.names.kind.clone(), crd);
    }
    out
}

#[test]
fn crds_have_the_expected_group_names_scope_and_version() {
    let crds = crds();
    let expected = [
        (
            "AuthorizationPolicy",
            "authorizationpolicies",
            "authorizationpolicy",
        ),
        ("HTTPRoute", "httproutes", "httproute"),
        (
            "MeshTLSAuthentication",
            "meshtlsauthentications",
            "meshtlsauthentication",
        ),
        (
            "NetworkAuthentication",
            "networkauthentications",
            "networkauthentication",
        ),
        ("Server", "servers", "server"),
    ];
    assert_eq!(crds.len(), expected.len());
    for (kind, plural, singular) in expected {
        let crd = &crds[kind];
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.policy.weft.io").as_str())
        );
        assert_eq!(crd.spec.group, "policy.weft.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(crd.spec.names.singular.as_deref(), Some(singular));
        assert_eq!(crd.spec.versions.len(), 1);
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.served && v.storage);
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind}: status subresource (conditions)"
        );
        let schema = v
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap();
        assert!(schema.properties.as_ref().unwrap().contains_key("spec"));
    }
}

/// A strict subset of the API server's validation of a custom object
/// against a structural schema: types, required fields, enums, int-or-string,
/// and unknown fields (refused, as `kubectl apply` does with the default
/// strict field validation).
fn validate(schema: &JSONSchemaProps, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if schema.nullable != Some(true) {
            errors.push(format!("{path}: null"));
        }
        return;
    }
    if schema.x_kubernetes_int_or_string == Some(true) {
        if !(value.is_i64() || value.is_string()) {
            errors.push(format!("{path}: must be an integer or a string"));
        }
        return;
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        errors.push(format!("{path}: {value} is not one of the allowed values"));
    }
    match schema.type_.as_deref() {
        Some("object") => {
            let Some(map) = value.as_object() else {
                errors.push(format!("{path}: must be an object"));
                return;
            };
            for required in schema.required.iter().flatten() {
                if !map.contains_key(required) {
                    errors.push(format!("{path}.{required}: required"));
                }
            }
            for (k, v) in map {
                let sub = format!("{path}.{k}");
                match (schema.properties.as_ref().and_then(|p| p.get(k)), &schema.additional_properties) {
                    (Some(s), _) => validate(s, v, &sub, errors),
                    (None, Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(s))) => {
                        validate(s, v, &sub, errors)
                    }
                    (None, _) if schema.x_kubernetes_preserve_unknown_fields == Some(true) => {}
                    (None, _) => errors.push(format!("{sub}: unknown field")),
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                errors.push(format!("{path}: must be an array"));
                return;
            };
            if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s)) = &schema.items {
                for (i, item) in items.iter().enumerate() {
                    validate(s, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Some("string") if !value.is_string() => errors.push(format!("{path}: must be a string")),
        Some("integer") if !value.is_i64() => errors.push(format!("{path}: must be an integer")),
        Some("boolean") if !value.is_boolean() => errors.push(format!("{path}: must be a boolean")),
        _ => {}
    }
}

/// Validates a custom object the way the API server would: apiVersion and
/// kind select the CRD, metadata is the API server's, the rest the schema's.
fn check(crds: &BTreeMap<String, CustomResourceDefinition>, object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let Some(crd) = crds.get(kind) else {
        return vec![format!("no CRD for kind {kind:?}")];
    };
    if object["apiVersion"] != json!("policy.weft.io/v1alpha1") {
        return vec![format!("apiVersion {} is not served", object["apiVersion"])];
    }
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    let mut body = object.clone();
    let map = body.as_object_mut().unwrap();
    for k in ["apiVersion", "kind", "metadata"] {
        map.remove(k);
    }
    let mut errors = Vec::new();
    validate(schema, &body, kind, &mut errors);
    errors
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn schemas_accept_every_policy_object_of_the_documented_examples() {
    let crds = crds();
    let examples = weft_policy_api::examples::load();
    let mut checked = 0;
    for (name, yaml) in &examples {
        for doc in documents(yaml) {
            if doc["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("policy.weft.io/"))
            {
                let errors = check(&crds, &doc);
                assert!(errors.is_empty(), "example {name}: {errors:?}\n{doc}");
                // And the Rust types read it (what the kube watchers do).
                let kind = doc["kind"].as_str().unwrap();
                let parsed = match kind {
                    "Server" => {
                        serde_json::from_value::<weft_policy_api::Server>(doc.clone()).map(|_| ())
                    }
                    "AuthorizationPolicy" => {
                        serde_json::from_value::<weft_policy_api::AuthorizationPolicy>(doc.clone())
                            .map(|_| ())
                    }
                    "MeshTLSAuthentication" => serde_json::from_value::<
                        weft_policy_api::MeshTLSAuthentication,
                    >(doc.clone())
                    .map(|_| ()),
                    "NetworkAuthentication" => serde_json::from_value::<
                        weft_policy_api::NetworkAuthentication,
                    >(doc.clone())
                    .map(|_| ()),
                    other => panic!("unexpected kind {other}"),
                };
                parsed.unwrap_or_else(|e| panic!("example {name}: {kind}: {e}"));
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 12,
        "only {checked} policy objects in docs/policy.md"
    );
}

#[test]
fn schemas_refuse_malformed_objects() {
    let crds = crds();
    let server = |spec: Value| {
        json!({"apiVersion": "policy.weft.io/v1alpha1", "kind": "Server",
               "metadata": {"name": "s", "namespace": "shop"}, "spec": spec})
    };
    let cases = [
        (
            server(json!({"podSelector": {}, "port": 80, "accessPolicy": "allow-everything"})),
            "Server.spec.accessPolicy",
        ),
        (
            server(json!({"podSelector": {}})),
            "Server.spec.port: required",
        ),
        (
            server(json!({"port": 80})),
            "Server.spec.podSelector: required",
        ),
        (
            server(json!({"podSelector": {}, "port": [80]})),
            "Server.spec.port",
        ),
        (
            server(json!({"podSelector": {}, "port": 80, "proxyProtocol": "QUIC"})),
            "Server.spec.proxyProtocol",
        ),
        (
            server(json!({"podSelector": {"matchLabels": {"app": 1}}, "port": 80})),
            "Server.spec.podSelector.matchLabels.app",
        ),
        (
            server(json!({"podSelector": {}, "port": 80, "acessPolicy": "deny"})),
            "Server.spec.acessPolicy: unknown field",
        ),
        (
            json!({"apiVersion": "policy.weft.io/v1alpha1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": "a"},
                   "spec": {"requiredAuthenticationRefs": []}}),
            "AuthorizationPolicy.spec.targetRef: required",
        ),
        (
            json!({"apiVersion": "policy.weft.io/v1alpha1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": "a"},
                   "spec": {"targetRef": {"kind": "Server"}, "requiredAuthenticationRefs": []}}),
            "AuthorizationPolicy.spec.targetRef.name: required",
        ),
        (
            json!({"apiVersion": "policy.weft.io/v1alpha1", "kind": "NetworkAuthentication",
                   "metadata": {"name": "n"},
                   "spec": {"networks": [{"except": ["10.0.0.0/8"]}]}}),
            "NetworkAuthentication.spec.networks[0].cidr: required",
        ),
        (
            json!({"apiVersion": "policy.weft.io/v1alpha1", "kind": "MeshTLSAuthentication",
                   "metadata": {"name": "m"},
                   "spec": {"identities": "spiffe://cluster.local/ns/a/sa/b"}}),
            "MeshTLSAuthentication.spec.identities: must be an array",
        ),
    ];
    for (object, expected) in cases {
        let errors = check(&crds, &object);
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "expected an error at {expected}, got {errors:?} for {object}"
        );
    }
    // The unmodified base object passes, so the cases above fail for the
    // reason given.
    assert_eq!(
        check(&crds, &server(json!({"podSelector": {}, "port": 80}))),
        Vec::<String>::new()
    );
}
