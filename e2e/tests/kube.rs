//! `weft-sim up --kube`: a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler built by `cargo xtask setup`)
//! driven with its own kubectl. These tests need root and the built
//! binaries; without them they fail and say how to build them, they never
//! skip.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use weft_sim::kube::{KUBERNETES_VERSION, KubeBinaries};
use weft_sim::testing::{DownOnDrop, leftovers, manifest_dir};
use weft_sim::{Options, TestCluster, cluster};

fn binaries() -> KubeBinaries {
    KubeBinaries::from_cache().unwrap_or_else(|e| panic!("{e}"))
}

fn kube_cluster(files: &[(&str, &str)]) -> TestCluster {
    let bins = binaries();
    TestCluster::up_with(files, |o| o.kube = Some(bins)).expect("--kube cluster up")
}

/// Polls `check` until it returns `Some`, or panics after `limit` with `what`.
fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("kubectl output {text:?}: {e}"))
}

const NODES_AND_NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: web}}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {color: blue}
---
apiVersion: v1
kind: Pod
metadata: {name: pinned, namespace: shop}
spec:
  nodeName: node-a
  containers: [{name: main, image: example.invalid/app, command: [sleep, infinity]}]
"#;

#[test]
fn the_api_server_serves_nodes_and_the_applied_manifests() {
    let cluster = kube_cluster(&[("cluster.yaml", NODES_AND_NAMESPACE)]);
    let kube = cluster.state().kube.clone().expect("kube state");
    assert!(kube.kubeconfig.is_file(), "{}", kube.kubeconfig.display());

    // The server is the version that was built, with the version flags.
    let version = json(&cluster.kubectl_ok(&["version", "-o", "json"]));
    assert_eq!(version["serverVersion"]["gitVersion"], KUBERNETES_VERSION);
    assert_eq!(version["clientVersion"]["gitVersion"], KUBERNETES_VERSION);

    // One Ready node per simulated node, with the simulator's addresses.
    let nodes = json(&cluster.kubectl_ok(&["get", "nodes", "-o", "json"]));
    let mut seen = Vec::new();
    for node in nodes["items"].as_array().unwrap() {
        let name = node["metadata"]["name"].as_str().unwrap().to_string();
        let ready = node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True", "{name}");
        let sim_node = cluster.state().node(&name).expect("simulated node");
        assert_eq!(
            node["status"]["addresses"][0]["address"],
            sim_node.ip.to_string()
        );
        assert_eq!(node["spec"]["podCIDR"], sim_node.pod_cidr);
        assert_eq!(node["status"]["allocatable"]["pods"], "110");
        seen.push(name);
    }
    assert_eq!(seen, ["node-a", "node-b"]);

    // The kubelet renews each node's Lease (the node lifecycle controller
    // runs and would otherwise take the node for dead).
    let renew_time = || {
        let out = cluster.kubectl(&[
            "get",
            "lease",
            "node-a",
            "-n",
            "kube-node-lease",
            "-o",
            "json",
        ]);
        if !out.status.success() {
            return None; // not created yet
        }
        let lease = json(&String::from_utf8_lossy(&out.stdout));
        lease["spec"]["renewTime"].as_str().map(String::from)
    };
    let first = wait_for("node-a's Lease", Duration::from_secs(120), renew_time);
    wait_for("node-a's Lease renewed", Duration::from_secs(120), || {
        renew_time().filter(|t| *t != first)
    });

    // DIR was applied server-side, by the field manager weft-sim.
    let ns = json(&cluster.kubectl_ok(&["get", "namespace", "shop", "-o", "json"]));
    assert_eq!(ns["metadata"]["labels"]["team"], "web");
    let cm = json(&cluster.kubectl_ok(&[
        "get",
        "configmap",
        "settings",
        "-n",
        "shop",
        "-o",
        "json",
        "--show-managed-fields",
    ]));
    assert_eq!(cm["data"]["color"], "blue");
    assert_eq!(cm["metadata"]["managedFields"][0]["manager"], "weft-sim");
    assert_eq!(cm["metadata"]["managedFields"][0]["operation"], "Apply");

    // The controller manager runs: every namespace gets its `default`
    // ServiceAccount, and a Deployment becomes Pods; the scheduler binds
    // them to a simulated node.
    cluster.kubectl_ok(&["create", "namespace", "later"]);
    wait_for(
        "ServiceAccount later/default",
        Duration::from_secs(120),
        || {
            cluster
                .kubectl(&["get", "serviceaccount", "default", "-n", "later"])
                .status
                .success()
                .then_some(())
        },
    );
    cluster.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        "-n",
        "later",
        "--image=example.invalid/web",
        "--replicas=2",
    ]);
    let bound = wait_for(
        "2 pods of deployment web bound",
        Duration::from_secs(120),
        || {
            let pods = json(&cluster.kubectl_ok(&["get", "pods", "-n", "later", "-o", "json"]));
            let nodes: Vec<String> = pods["items"]
                .as_array()?
                .iter()
                .filter_map(|p| p["spec"]["nodeName"].as_str().map(String::from))
                .collect();
            (nodes.len() == 2).then_some(nodes)
        },
    );
    for node in bound {
        assert!(cluster.state().node(&node).is_some(), "bound to {node}");
    }

    // RBAC is on: a service account may not list secrets it was not granted.
    let can = cluster.kubectl(&[
        "auth",
        "can-i",
        "list",
        "secrets",
        "-n",
        "shop",
        "--as=system:serviceaccount:shop:default",
    ]);
    assert_eq!(String::from_utf8_lossy(&can.stdout).trim(), "no");

    // TokenRequest and TokenReview work with the API server's issuer.
    let token = cluster.kubectl_ok(&[
        "create",
        "token",
        "default",
        "-n",
        "shop",
        "--audience=weft-test",
    ]);
    let review = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token.trim(), "audiences": ["weft-test"]},
    });
    let answer = json(&kubectl_stdin(
        &cluster,
        &["create", "-o", "json", "-f", "-"],
        &review.to_string(),
    ));
    assert_eq!(answer["status"]["authenticated"], true, "{answer}");
    assert_eq!(
        answer["status"]["user"]["username"],
        "system:serviceaccount:shop:default"
    );

    let (name, slot) = (cluster.name().to_string(), cluster.state().slot);
    let mut pids = control_plane_pids(&cluster);
    assert_eq!(
        pids.len(),
        4,
        "etcd, apiserver, controller manager, scheduler"
    );
    // One kubelet per node, each naming its node.
    let kubelets = kubelet_pids(&cluster);
    let mut kubelet_nodes: Vec<String> = kubelets
        .iter()
        .map(|pid| {
            let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            let argv: Vec<String> = argv
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let at = argv.iter().position(|a| a == "--node").expect("--node");
            argv[at + 1].clone()
        })
        .collect();
    kubelet_nodes.sort();
    let mut nodes: Vec<String> = cluster
        .state()
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    nodes.sort();
    assert!(nodes.len() >= 2, "{nodes:?}");
    assert_eq!(kubelet_nodes, nodes);
    pids.extend(kubelets);
    drop(cluster);
    assert_eq!(leftovers(&name, Some(slot)), Vec::<String>::new());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "control plane process {pid} survived down"
        );
    }
}

/// The processes of one of the cluster's cgroups (`kube-control-plane`,
/// the kubelets').
fn cgroup_pids(cluster: &TestCluster, cgroup: &str) -> Vec<u32> {
    let procs = Options::detect()
        .unwrap()
        .layout
        .cgroup_root
        .join(cluster.name())
        .join(cgroup)
        .join("cgroup.procs");
    std::fs::read_to_string(&procs)
        .unwrap_or_else(|e| panic!("{}: {e}", procs.display()))
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn control_plane_pids(cluster: &TestCluster) -> Vec<u32> {
    cgroup_pids(cluster, "kube-control-plane")
}

fn kubelet_pids(cluster: &TestCluster) -> Vec<u32> {
    cgroup_pids(cluster, weft_sim::kube::KUBELET_CGROUP)
}

fn kubectl_stdin(cluster: &TestCluster, args: &[&str], stdin: &str) -> String {
    cluster
        .state()
        .kube
        .as_ref()
        .unwrap()
        .kubectl_ok(args, Some(stdin))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_manifest_the_api_server_refuses_fails_up_with_its_message_and_leaves_nothing() {
    let opts = Options {
        kube: Some(binaries()),
        ..Options::detect().unwrap()
    };
    let dir = manifest_dir(&[(
        "bad.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: Not_A_Name, namespace: default}\n",
    )])
    .unwrap();
    let name = format!("kbad{}", std::process::id());
    let _down = DownOnDrop(name.clone());
    let err = cluster::up(dir.path(), &name, &opts)
        .err()
        .expect("an invalid object must fail up")
        .to_string();
    assert!(err.contains("Not_A_Name"), "{err}");
    assert_eq!(leftovers(&name, None), Vec::<String>::new());
}

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-sim"))
}

#[test]
fn weft_sim_up_kube_status_kubectl_and_down() {
    binaries(); // fail with the setup hint rather than in weft-sim's output
    let dir = manifest_dir(&[(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: from-dir}\n",
    )])
    .unwrap();
    let name = format!("kcli{}", std::process::id());
    let _down = DownOnDrop(name.clone());
    let up = sim()
        .args(["up", dir.path().to_str().unwrap(), "--name", &name])
        .args(["--kube", "--detach"])
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "up --kube: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let status = sim().args(["status", "--name", &name]).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("kubeconfig") && text.contains("admin.kubeconfig"),
        "{text}"
    );
    let out = sim()
        .args(["kubectl", "--name", &name, "get", "namespace", "from-dir"])
        .args(["-o", "jsonpath={.status.phase}"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Active",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // kubectl's exit status is weft-sim's.
    let missing = sim()
        .args(["kubectl", "--name", &name, "get", "namespace", "nope"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));

    let state: Value = json(&String::from_utf8_lossy(
        &sim()
            .args(["status", "--name", &name, "--json"])
            .output()
            .unwrap()
            .stdout,
    ));
    let slot = state["slot"].as_u64().unwrap() as u8;
    let down = sim().args(["down", "--name", &name]).output().unwrap();
    assert!(down.status.success());
    assert_eq!(leftovers(&name, Some(slot)), Vec::<String>::new());
    let without = sim()
        .args(["kubectl", "--name", &name, "get", "nodes"])
        .output()
        .unwrap();
    assert!(!without.status.success());
}

const WEB: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: http
        image: example.invalid/web
        command: [./http_server.py, "8080", "$(POD_NAME)"]
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec:
  containers: [{name: main, image: example.invalid/client, command: [sleep, infinity]}]
"#;

const WEB_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

/// Pods of `ns` with label `app=APP` that are Ready, by name.
fn ready_pods(cluster: &TestCluster, ns: &str, app: &str) -> Vec<String> {
    let pods = json(&cluster.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        &format!("app={app}"),
        "-o",
        "json",
    ]));
    let mut names: Vec<String> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn pod_count(cluster: &TestCluster, ns: &str, selector: &str) -> usize {
    let pods = json(&cluster.kubectl_ok(&["get", "pods", "-n", ns, "-l", selector, "-o", "json"]));
    pods["items"].as_array().unwrap().len()
}

/// `curl http://web/hello` from the client pod until every name in `want`
/// has answered.
fn answered_by_all(cluster: &mut TestCluster, want: &[String]) {
    let mut seen = BTreeSet::new();
    wait_for(
        &format!("answers from each of {want:?} through Service web"),
        Duration::from_secs(120),
        || {
            cluster.refresh_state();
            let out = cluster.exec(
                "shop/client",
                &["curl", "-s", "--max-time", "5", "http://web/hello"],
            );
            let body = String::from_utf8_lossy(&out.stdout).to_string();
            if let Some(name) = body.strip_prefix("hello from ") {
                seen.insert(name.trim().to_string());
            }
            want.iter().all(|w| seen.contains(w)).then_some(())
        },
    );
}

#[test]
fn kubectl_drives_pods_that_run_and_answer_through_a_service_by_name() {
    let mut cluster = kube_cluster(&[("web.yaml", WEB)]);
    // `up` returned once the Deployment was ready: its pods run here.
    let pods = ready_pods(&cluster, "shop", "web");
    assert_eq!(pods.len(), 2, "{pods:?}");
    let status = json(&cluster.kubectl_ok(&["get", "pod", &pods[0], "-n", "shop", "-o", "json"]));
    let pod_ip = status["status"]["podIP"].as_str().unwrap().to_string();
    assert!(pod_ip.starts_with("10.244."), "{pod_ip}");
    assert_eq!(status["status"]["phase"], "Running");
    assert_eq!(status["status"]["containerStatuses"][0]["restartCount"], 0);
    let sim = cluster.pod(&format!("shop/{}", pods[0])).clone();
    assert_eq!(sim.ip.to_string(), pod_ip);

    // A Service created after `up`: kube-proxy and names follow it.
    let svc = manifest_dir(&[("svc.yaml", WEB_SERVICE)]).unwrap();
    cluster.kubectl_ok(&["apply", "-f", svc.path().join("svc.yaml").to_str().unwrap()]);
    answered_by_all(&mut cluster, &pods);

    // Pods reach the API server through the `kubernetes` Service, and are
    // recognised by their projected service-account token, as in-cluster
    // clients are.
    let version = cluster.exec_ok(
        "shop/client",
        &[
            "curl",
            "-sk",
            "--max-time",
            "10",
            "https://kubernetes.default.svc/version",
        ],
    );
    assert_eq!(json(&version)["gitVersion"], KUBERNETES_VERSION);
    let as_pod = in_container(
        &cluster,
        "shop/client",
        &[
            "sh",
            "-c",
            "d=/var/run/secrets/kubernetes.io/serviceaccount; curl -s --max-time 10 --cacert $d/ca.crt -H \"Authorization: Bearer $(cat $d/token)\" https://kubernetes.default.svc/api/v1/namespaces/shop/secrets",
        ],
    );
    let answer = json(&String::from_utf8_lossy(&as_pod.stdout));
    assert_eq!(answer["code"], 403, "{answer}");
    let pid = cluster.pod("shop/client").containers[0].pid.unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        String::from_utf8_lossy(&environ).contains("KUBERNETES_SERVICE_HOST=10.96.0.1"),
        "in-cluster clients find the API server"
    );
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("system:serviceaccount:shop:default"),
        "{answer}"
    );

    // Scale up: a third pod runs and answers too.
    cluster.kubectl_ok(&["scale", "deployment", "web", "-n", "shop", "--replicas=3"]);
    let three = wait_for("3 ready pods", Duration::from_secs(120), || {
        let p = ready_pods(&cluster, "shop", "web");
        (p.len() == 3).then_some(p)
    });
    answered_by_all(&mut cluster, &three);

    // Scale down: two pods stop, their namespaces go.
    cluster.kubectl_ok(&["scale", "deployment", "web", "-n", "shop", "--replicas=1"]);
    wait_for("1 web pod left", Duration::from_secs(120), || {
        (pod_count(&cluster, "shop", "app=web") == 1).then_some(())
    });
    let left = ready_pods(&cluster, "shop", "web");
    for gone in three.iter().filter(|p| !left.contains(p)) {
        let netns = format!("weft.{}.pod.shop.{gone}", cluster.name());
        wait_for(
            &format!("{netns} removed"),
            Duration::from_secs(120),
            || (!weft_sim::sys::netns_list().contains(&netns)).then_some(()),
        );
    }

    // Delete the Deployment: no web pod is left.
    cluster.kubectl_ok(&["delete", "deployment", "web", "-n", "shop"]);
    wait_for("web pods deleted", Duration::from_secs(120), || {
        (pod_count(&cluster, "shop", "app=web") == 0).then_some(())
    });

    // Deleting the namespace removes its pods (the client), and the
    // namespace finishes terminating.
    cluster.kubectl_ok(&["delete", "namespace", "shop", "--wait=false"]);
    wait_for("namespace shop gone", Duration::from_secs(120), || {
        (!cluster
            .kubectl(&["get", "namespace", "shop"])
            .status
            .success())
        .then_some(())
    });
    let netns = format!("weft.{}.pod.shop.client", cluster.name());
    assert!(!weft_sim::sys::netns_list().contains(&netns));
}

/// The repository's own manifests, read from the source tree.
fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn the_destination_rbac_in_daemonset_is_enforced_by_the_api_server() {
    // The policy CRDs (the API server must accept them) and the namespace.
    let crd_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&crd_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .map(|n| (n.clone(), repo_file(&format!("crds/{n}"))))
        .collect();
    files.push((
        "weft-system.yaml".into(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: weft-system}\n".into(),
    ));
    let borrowed: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let cluster = kube_cluster(&borrowed);
    let kustomization = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset/destination");
    cluster.kubectl_ok(&["apply", "-k", kustomization.to_str().unwrap()]);

    let sa = "--as=system:serviceaccount:weft-system:weft-destination";
    let can = |args: &[&str]| -> bool {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        all.push(sa);
        let out = cluster.kubectl(&all);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            answer == "yes" || answer == "no",
            "kubectl auth can-i {args:?}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answer == "yes"
    };
    let policy = [
        "servers.policy.weft.io",
        "authorizationpolicies.policy.weft.io",
        "meshtlsauthentications.policy.weft.io",
        "networkauthentications.policy.weft.io",
        "httproutes.policy.weft.io",
    ];
    let watched = [
        "namespaces",
        "pods",
        "services",
        "endpointslices.discovery.k8s.io",
    ];
    // What the kube source does: list and watch everything it indexes,
    // cluster-wide, and patch the status of policy objects.
    for resource in watched.iter().chain(&policy) {
        for verb in ["list", "watch"] {
            assert!(
                can(&[verb, resource, "--all-namespaces"]),
                "{verb} {resource}"
            );
        }
    }
    // It authenticates node proxies (TokenReview, audience
    // weft-destination) and finds the pod a token was issued to.
    assert!(can(&["create", "tokenreviews"]), "create tokenreviews");
    assert!(can(&["get", "pods", "--all-namespaces"]), "get pods");
    for resource in policy {
        assert!(
            can(&["patch", resource, "--subresource=status", "-n", "shop"]),
            "patch {resource}/status"
        );
        // …and nothing else of them.
        for verb in ["create", "update", "patch", "delete"] {
            assert!(!can(&[verb, resource, "-n", "shop"]), "{verb} {resource}");
        }
        assert!(!can(&[
            "update",
            resource,
            "--subresource=status",
            "-n",
            "shop"
        ]));
    }
    // Nothing it must not: secrets, writes to workloads, nodes, tokens.
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("delete", "pods"),
        ("patch", "services"),
        ("get", "nodes"),
        ("create", "serviceaccounts/token"),
        ("create", "subjectaccessreviews"),
        ("escalate", "clusterroles"),
    ] {
        assert!(
            !can(&[verb, resource, "--all-namespaces"]),
            "{verb} {resource}"
        );
    }
    // The default service account of the namespace gets none of it.
    let other = cluster.kubectl(&[
        "auth",
        "can-i",
        "list",
        "pods",
        "--all-namespaces",
        "--as=system:serviceaccount:weft-system:default",
    ]);
    assert_eq!(String::from_utf8_lossy(&other.stdout).trim(), "no");

    // The CRD schema bounds identity patterns (they are matched for every
    // connection on a shared proxy): the API server refuses one with more
    // than 8 `*` or over 256 characters, and takes one within the limits.
    let kube = cluster.state().kube.as_ref().unwrap();
    let authn = |name: &str, identity: &str| {
        format!(
            "apiVersion: policy.weft.io/v1alpha1\nkind: MeshTLSAuthentication\nmetadata: {{name: {name}, namespace: weft-system}}\nspec: {{identities: [{identity:?}]}}\n"
        )
    };
    let starry = format!("spiffe://cluster.local/ns/bank/sa/{}b", "*a".repeat(9));
    let long = format!("spiffe://cluster.local/ns/bank/sa/{}", "a".repeat(250));
    for (name, identity, field) in [
        ("starry", &starry, "spec.identities[0]"),
        ("long", &long, "spec.identities[0]"),
    ] {
        let refused = kube
            .kubectl_ok(&["apply", "-f", "-"], Some(&authn(name, identity)))
            .expect_err("the API server refuses it");
        assert!(refused.to_string().contains(field), "{name}: {refused}");
    }
    kube.kubectl_ok(
        &["apply", "-f", "-"],
        Some(&authn("fine", "spiffe://cluster.local/ns/*/sa/*")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn containers_restart_by_policy_and_deletion_honours_the_grace_period() {
    let cluster = kube_cluster(&[(
        "pods.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: flaky, namespace: default}
spec:
  containers:
  - name: main
    image: example.invalid/flaky
    command: [sh, -c, 'echo started; sleep 2; exit 3']
---
apiVersion: v1
kind: Pod
metadata: {name: once, namespace: default}
spec:
  restartPolicy: Never
  containers: [{name: main, image: example.invalid/once, command: [sh, -c, 'exit 0']}]
---
apiVersion: v1
kind: Pod
metadata: {name: stubborn, namespace: default}
spec:
  terminationGracePeriodSeconds: 3
  containers:
  - name: main
    image: example.invalid/stubborn
    command: [sh, -c, 'trap "echo got TERM" TERM; while true; do sleep 0.1; done']
"#,
    )]);
    let pod = |name: &str| json(&cluster.kubectl_ok(&["get", "pod", name, "-o", "json"]));
    // restartPolicy Always (the default): the exited container runs again,
    // and its status counts the restarts and keeps the last exit code.
    let flaky = wait_for("flaky restarted twice", Duration::from_secs(120), || {
        let p = pod("flaky");
        (p["status"]["containerStatuses"][0]["restartCount"].as_u64()? >= 2).then_some(p)
    });
    assert_eq!(
        flaky["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
        3
    );
    // restartPolicy Never: exit 0 makes the pod Succeeded.
    wait_for("once Succeeded", Duration::from_secs(120), || {
        (pod("once")["status"]["phase"] == "Succeeded").then_some(())
    });

    // A process that ignores SIGTERM is killed after the grace period
    // (3 s), not before, and the Pod is then gone from the API server.
    let started = Instant::now();
    cluster.kubectl_ok(&["delete", "pod", "stubborn", "--wait=true", "--timeout=120s"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(60),
        "deletion took {took:?}"
    );
    // A pod that cannot start (its ConfigMap does not exist) says why in
    // its status, and is deleted at once.
    let missing = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"unstartable","namespace":"default"},
        "spec":{"containers":[{"name":"main","image":"example.invalid/x","command":["sleep","infinity"],
        "env":[{"name":"X","valueFrom":{"configMapKeyRef":{"name":"absent","key":"k"}}}]}]}}"#;
    kubectl_stdin(&cluster, &["create", "-f", "-"], missing);
    let reason = wait_for("unstartable's reason", Duration::from_secs(120), || {
        let p = pod("unstartable");
        let waiting = &p["status"]["containerStatuses"][0]["state"]["waiting"];
        waiting["message"]
            .as_str()
            .map(|m| (waiting["reason"].clone(), m.to_string()))
    });
    assert_eq!(reason.0, "CreateContainerConfigError");
    assert!(
        reason.1.contains("ConfigMap default/absent not found"),
        "{}",
        reason.1
    );
    cluster.kubectl_ok(&[
        "delete",
        "pod",
        "unstartable",
        "--wait=true",
        "--timeout=120s",
    ]);

    let log = cluster
        .state()
        .state_dir
        .join("logs/default.stubborn.main.log");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("got TERM"), "{text}");
    assert!(
        !cluster
            .kubectl(&["get", "pod", "stubborn"])
            .status
            .success()
    );
}

const VOLUMES: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: default}
data: {color: blue}
---
apiVersion: v1
kind: Secret
metadata: {name: password, namespace: default}
stringData: {password: first}
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: default}
spec:
  nodeName: node-a
  containers:
  - name: main
    image: example.invalid/app
    command: [sh, -c, 'echo "color=$COLOR password=$PASSWORD"; echo hello > /var/run/weft-test/hello; exec sleep infinity']
    env:
    - {name: COLOR, valueFrom: {configMapKeyRef: {name: settings, key: color}}}
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: password, key: password}}}
    volumeMounts:
    - {name: config, mountPath: /etc/weft-test-config}
    - {name: secret, mountPath: /etc/weft-test-secret}
    - {name: token, mountPath: /var/run/secrets/weft-test}
    - {name: node, mountPath: /var/run/weft-test}
    - {name: scratch, mountPath: /tmp/weft-test-scratch}
  volumes:
  - {name: config, configMap: {name: settings}}
  - {name: secret, secret: {secretName: password}}
  - name: token
    projected:
      sources:
      - serviceAccountToken: {audience: weft-test, expirationSeconds: 3600, path: token}
  - {name: node, hostPath: {path: /var/run/weft-test, type: DirectoryOrCreate}}
  - {name: scratch, emptyDir: {}}
"#;

/// Runs `argv` in the mount namespace of the pod's first container (where
/// its volumes are), in its network namespace.
fn in_container(cluster: &TestCluster, pod: &str, argv: &[&str]) -> std::process::Output {
    let pid = cluster.pod(pod).containers[0].pid.expect("container pid");
    Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "-n", "--"])
        .args(argv)
        .output()
        .unwrap()
}

fn read_in(cluster: &TestCluster, pod: &str, path: &str) -> String {
    let out = in_container(cluster, pod, &["cat", path]);
    assert!(
        out.status.success(),
        "cat {path} in {pod}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn token_review(cluster: &TestCluster, token: &str, audience: &str) -> Value {
    let review = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    });
    json(&kubectl_stdin(
        cluster,
        &["create", "-o", "json", "-f", "-"],
        &review.to_string(),
    ))
}

#[test]
fn volumes_tokens_and_secret_updates_reach_a_running_pod() {
    let cluster = kube_cluster(&[("app.yaml", VOLUMES)]);
    let log = cluster.state().state_dir.join("logs/default.app.main.log");
    wait_for(
        "the container's first line",
        Duration::from_secs(120),
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("color=").then_some(())
        },
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("color=blue password=first"), "{text}");

    // ConfigMap and Secret volumes, read-only, with the kubelet's layout.
    assert_eq!(
        read_in(&cluster, "default/app", "/etc/weft-test-config/color"),
        "blue"
    );
    assert_eq!(
        read_in(&cluster, "default/app", "/etc/weft-test-secret/password"),
        "first"
    );
    let link = in_container(
        &cluster,
        "default/app",
        &["readlink", "/etc/weft-test-secret/password"],
    );
    assert_eq!(
        String::from_utf8_lossy(&link.stdout).trim(),
        "..data/password"
    );
    let write = in_container(
        &cluster,
        "default/app",
        &["sh", "-c", "echo x > /etc/weft-test-config/color"],
    );
    assert!(
        !write.status.success(),
        "a configMap volume must be read-only"
    );
    // The default service-account volume the API server adds to every pod.
    assert_eq!(
        read_in(
            &cluster,
            "default/app",
            "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        ),
        "default"
    );
    // emptyDir is writable.
    let scratch = in_container(
        &cluster,
        "default/app",
        &[
            "sh",
            "-c",
            "echo ok > /tmp/weft-test-scratch/f && cat /tmp/weft-test-scratch/f",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&scratch.stdout), "ok\n");
    // Mount paths were made inside the container only, never on the machine.
    for path in [
        "/etc/weft-test-config",
        "/var/run/secrets/weft-test",
        "/tmp/weft-test-scratch",
        "/run/weft-test",
    ] {
        assert!(
            !Path::new(path).exists(),
            "{path} was created on the machine"
        );
    }
    // hostPath is rooted in the node's own directory.
    let on_node = cluster
        .state()
        .state_dir
        .join("nodes/node-a/root/var/run/weft-test/hello");
    assert_eq!(std::fs::read_to_string(&on_node).unwrap(), "hello\n");

    // The projected token is a real one: TokenReview accepts it for its
    // audience, as the pod's ServiceAccount, and refuses it for another.
    let token = read_in(&cluster, "default/app", "/var/run/secrets/weft-test/token");
    let ok = token_review(&cluster, &token, "weft-test");
    assert_eq!(ok["status"]["authenticated"], true, "{ok}");
    assert_eq!(
        ok["status"]["user"]["username"],
        "system:serviceaccount:default:default"
    );
    let pod_name = &ok["status"]["user"]["extra"]["authentication.kubernetes.io/pod-name"];
    assert_eq!(pod_name[0], "app", "{ok}");
    let other = token_review(&cluster, &token, "someone-else");
    assert_ne!(other["status"]["authenticated"], true, "{other}");

    // A Secret update reaches the running pod's file (atomically swapped).
    cluster.kubectl_ok(&[
        "patch",
        "secret",
        "password",
        "--type=merge",
        "-p",
        r#"{"stringData":{"password":"second"}}"#,
    ]);
    wait_for(
        "the new password in the pod",
        Duration::from_secs(120),
        || {
            (read_in(&cluster, "default/app", "/etc/weft-test-secret/password") == "second")
                .then_some(())
        },
    );
}

#[test]
fn an_image_without_command_runs_the_program_of_the_image_table() {
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("python3");
    let bins = binaries();
    let cluster = TestCluster::up_with(
        &[(
            "web.yaml",
            r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  containers:
  - name: main
    image: registry.example/weft-test/python:3.11
    args: [-m, http.server, "8080"]
    ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: on-host, namespace: default}
spec:
  hostNetwork: true
  containers: [{name: main, image: example.invalid/x, command: [sleep, infinity]}]
"#,
        )],
        |o| {
            o.kube = Some(bins);
            o.images = [(
                "registry.example/weft-test/python".to_string(),
                python.into(),
            )]
            .into();
        },
    )
    .expect("--kube cluster up");
    // `up` returned: the image's program listens on the declared port.
    assert_eq!(ready_pods_named(&cluster, "web"), ["web"]);
    let pid = cluster.pod("default/web").containers[0].pid.unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("http.server 8080"), "{cmdline}");

    // hostNetwork: the node's namespace and address.
    let node = cluster.state().node("node-a").unwrap().clone();
    let status = json(&cluster.kubectl_ok(&["get", "pod", "on-host", "-o", "json"]));
    assert_eq!(status["status"]["podIP"], node.ip.to_string());
    let pid = cluster.pod("default/on-host").containers[0].pid.unwrap();
    let netns_of = |path: String| {
        std::fs::metadata(path)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    };
    assert_eq!(
        netns_of(format!("/proc/{pid}/ns/net")),
        netns_of(node.netns_path.to_string_lossy().into_owned())
    );
}

fn ready_pods_named(cluster: &TestCluster, name: &str) -> Vec<String> {
    let pod = json(&cluster.kubectl_ok(&["get", "pod", name, "-o", "json"]));
    let ready = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    if ready {
        vec![name.to_string()]
    } else {
        vec![]
    }
}

/// A chained CNI plugin for the test: appends what it was called with to
/// `calls.jsonl` next to it, fails while a file `fail` is there, passes
/// the previous result on.
const TEST_CNI_PLUGIN: &str = r#"#!/usr/bin/env python3
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
conf = json.load(sys.stdin)
with open(os.path.join(here, "calls.jsonl"), "a") as log:
    log.write(json.dumps({k: os.environ.get(k) for k in
        ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]}
        | {"marker": conf.get("marker"), "prevResult": conf.get("prevResult"),
           "netns_exists": os.path.exists(os.environ.get("CNI_NETNS", ""))}) + "\n")
if os.environ["CNI_COMMAND"] == "ADD" and os.path.exists(os.path.join(here, "fail")):
    print(json.dumps({"cniVersion": "1.0.0", "code": 999, "msg": "test plugin says no"}))
    sys.exit(1)
if os.environ["CNI_COMMAND"] == "ADD":
    print(json.dumps(conf["prevResult"]))
"#;

fn cni_calls(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(json)
        .collect()
}

#[test]
fn the_chained_cni_plugins_of_the_node_run_before_and_after_a_pod() {
    let cluster = kube_cluster(&[(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    )]);
    // The node's own /etc/cni/net.d and /opt/cni/bin, under its root.
    let root = cluster.state().state_dir.join("nodes/node-a/root");
    let bin = root.join("opt/cni/bin");
    let conf = root.join("etc/cni/net.d");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let plugin = bin.join("weft-test-cni");
    std::fs::write(&plugin, TEST_CNI_PLUGIN).unwrap();
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(
        conf.join("10-weft.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "k8s-pod-network",
            "plugins": [{"type": "weft-test-cni", "marker": "first"}, {"type": "weft-test-cni", "marker": "second"}]}"#,
    )
    .unwrap();
    let calls = bin.join("calls.jsonl");
    std::fs::write(bin.join("fail"), "").unwrap();

    // While ADD fails the pod does not run, says why, and is tried again.
    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","namespace":"shop"},
        "spec":{"containers":[{"name":"main","image":"example.invalid/x","command":["sleep","infinity"]}]}}"#;
    kubectl_stdin(&cluster, &["create", "-f", "-"], pod);
    let message = wait_for(
        "the ADD failure in the pod's status",
        Duration::from_secs(120),
        || {
            let p = json(&cluster.kubectl_ok(&["get", "pod", "web", "-n", "shop", "-o", "json"]));
            p["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
                .as_str()
                .map(String::from)
        },
    );
    assert!(message.contains("test plugin says no"), "{message}");
    // …and in its events, as a kubelet reports it.
    let event = wait_for(
        "a FailedCreatePodSandBox event",
        Duration::from_secs(60),
        || {
            let events = json(&cluster.kubectl_ok(&[
                "get",
                "events",
                "-n",
                "shop",
                "--field-selector",
                "involvedObject.name=web,reason=FailedCreatePodSandBox",
                "-o",
                "json",
            ]));
            events["items"].as_array().and_then(|i| i.first()).cloned()
        },
    );
    assert_eq!(event["type"], "Warning", "{event}");
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| m.contains("test plugin says no")),
        "{event}"
    );
    assert_eq!(event["involvedObject"]["kind"], "Pod", "{event}");
    wait_for("ADD tried again", Duration::from_secs(120), || {
        let adds = cni_calls(&calls)
            .iter()
            .filter(|c| c["CNI_COMMAND"] == "ADD")
            .count();
        (adds >= 2).then_some(())
    });
    assert!(!pod_ready(&cluster, "shop", "web"));

    // Once ADD succeeds the pod runs; the plugins saw the standard protocol.
    std::fs::remove_file(bin.join("fail")).unwrap();
    std::fs::remove_file(&calls).unwrap();
    wait_for("web ready", Duration::from_secs(120), || {
        pod_ready(&cluster, "shop", "web").then_some(())
    });
    let adds = cni_calls(&calls);
    let ok: Vec<&Value> = adds.iter().filter(|c| c["CNI_COMMAND"] == "ADD").collect();
    assert_eq!(ok.len(), 2, "{adds:?}");
    assert_eq!(ok[0]["marker"], "first");
    assert_eq!(ok[1]["marker"], "second");
    let status = json(&cluster.kubectl_ok(&["get", "pod", "web", "-n", "shop", "-o", "json"]));
    let uid = status["metadata"]["uid"].as_str().unwrap();
    let pod_ip = status["status"]["podIP"].as_str().unwrap();
    for call in &ok {
        assert_eq!(call["CNI_CONTAINERID"], uid);
        assert_eq!(call["CNI_IFNAME"], "eth0");
        assert_eq!(call["netns_exists"], true);
        let args = call["CNI_ARGS"].as_str().unwrap();
        assert!(
            args.contains("K8S_POD_NAMESPACE=shop") && args.contains("K8S_POD_NAME=web"),
            "{args}"
        );
        assert_eq!(
            call["prevResult"]["ips"][0]["address"],
            format!("{pod_ip}/32")
        );
    }

    // Deleting the pod runs DEL, last plugin first. (The failed attempts
    // were undone with DEL too: start counting afresh.)
    std::fs::remove_file(&calls).unwrap();
    cluster.kubectl_ok(&[
        "delete",
        "pod",
        "web",
        "-n",
        "shop",
        "--wait=true",
        "--timeout=120s",
    ]);
    let dels: Vec<Value> = cni_calls(&calls)
        .into_iter()
        .filter(|c| c["CNI_COMMAND"] == "DEL")
        .collect();
    assert_eq!(dels.len(), 2, "{dels:?}");
    assert_eq!(dels[0]["marker"], "second");
    assert_eq!(dels[1]["marker"], "first");
}

fn pod_ready(cluster: &TestCluster, ns: &str, name: &str) -> bool {
    let pod = json(&cluster.kubectl_ok(&["get", "pod", name, "-n", ns, "-o", "json"]));
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// An application whose `/ready` answers 200 only while the file named by
/// its second argument exists, and logs each probe's source address.
const READY_GATE: &str = r#"#!/usr/bin/env python3
import http.server, os, sys
port, gate, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = os.path.exists(gate)
        with open(log, "a") as f:
            f.write(f"{self.client_address[0]} {self.path} {200 if ok else 503} {self.headers.get('User-Agent')}\n")
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", port), Handler).serve_forever()
"#;

#[test]
fn an_http_readiness_probe_decides_readiness_and_the_endpoints() {
    let cluster = kube_cluster(&[
        ("ready_gate.py", READY_GATE),
        ("gate-open", ""),
        (
            "gated.yaml",
            r#"
apiVersion: v1
kind: Pod
metadata: {name: gated, namespace: default, labels: {app: gated}}
spec:
  containers:
  - name: main
    image: example.invalid/gated
    command: [python3, ./ready_gate.py, "8080", ./gate-open, ./probes.log]
    ports: [{containerPort: 8080, name: http}]
    readinessProbe:
      httpGet: {path: /ready, port: http}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Service
metadata: {name: gated, namespace: default}
spec: {selector: {app: gated}, ports: [{port: 80, targetPort: 8080}]}
"#,
        ),
    ]);
    let dir = cluster.manifest_dir().to_path_buf();
    let probes = || std::fs::read_to_string(dir.join("probes.log")).unwrap_or_default();
    let endpoint_ready = || {
        let slices = json(&cluster.kubectl_ok(&[
            "get",
            "endpointslices",
            "-n",
            "default",
            "-l",
            "kubernetes.io/service-name=gated",
            "-o",
            "json",
        ]));
        slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .map(|e| e["conditions"]["ready"] == true)
            .next()
    };

    // `up` waits for the pod to be ready: its probe succeeded.
    assert!(pod_ready(&cluster, "default", "gated"));
    wait_for("the endpoint ready", Duration::from_secs(30), || {
        (endpoint_ready() == Some(true)).then_some(())
    });

    // The port still listens, but the application says it is not ready:
    // after failureThreshold failed probes neither is the pod nor its
    // endpoint (a listening port is not what readiness means when a probe
    // is declared).
    std::fs::remove_file(dir.join("gate-open")).unwrap();
    wait_for("not Ready", Duration::from_secs(30), || {
        (!pod_ready(&cluster, "default", "gated")).then_some(())
    });
    assert!(
        probes().lines().filter(|l| l.contains(" 503 ")).count() >= 2,
        "{}",
        probes()
    );
    wait_for("the endpoint not ready", Duration::from_secs(30), || {
        (endpoint_ready() == Some(false)).then_some(())
    });

    // Ready again once the probe succeeds.
    std::fs::write(dir.join("gate-open"), "").unwrap();
    wait_for("Ready again", Duration::from_secs(30), || {
        pod_ready(&cluster, "default", "gated").then_some(())
    });
    wait_for("the endpoint ready again", Duration::from_secs(30), || {
        (endpoint_ready() == Some(true)).then_some(())
    });

    // Every probe came from the node, as a kubelet's, to the probe's path.
    let pod = json(&cluster.kubectl_ok(&["get", "pod", "gated", "-o", "json"]));
    let node_ip = pod["status"]["hostIP"].as_str().unwrap().to_string();
    let log = probes();
    for line in log.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[0], node_ip, "{log}");
        assert_eq!(fields[1], "/ready", "{log}");
        assert!(fields[3].starts_with("kube-probe/"), "{log}");
    }
}
