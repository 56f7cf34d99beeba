//! The local source on a temporary directory, through the indexer and
//! publisher: what a node proxy would see as files change.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use weft_destination::index::{EndpointsFrom, IndexConfig};
use weft_destination::indexer;
use weft_destination::metrics::Metrics;
use weft_destination::model::{Kind, Object};
use weft_destination::publisher::Publisher;
use weft_destination::source::local::{EMPTY_STABLE, LocalSource};
use weft_destination::store::ClusterObjects;
use weft_destination::views::NodeView;
use weft_destination_api::address;

/// How long a test waits for a file change to reach the view. Generous on
/// purpose: a change normally arrives within tens of milliseconds (a file
/// event), at worst after the 1 s periodic re-read; a bound near either
/// would measure the machine's load, not the source. The times measured are
/// printed.
const PROPAGATION: Duration = Duration::from_secs(10);

struct Pipeline {
    publisher: Arc<Publisher>,
    metrics: Arc<Metrics>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn start(dir: &Path, state: Option<&Path>) -> Pipeline {
    let metrics = Arc::new(Metrics::new());
    let publisher = Arc::new(Publisher::new(metrics.clone()));
    let (tx, rx) = mpsc::channel(64);
    let source = LocalSource::new(
        dir.to_path_buf(),
        state.map(Path::to_path_buf),
        metrics.clone(),
    );
    let objects = ClusterObjects {
        tracks_service_accounts: true,
        ..Default::default()
    };
    let config = IndexConfig {
        endpoints: EndpointsFrom::Selectors,
        ..IndexConfig::default()
    };
    Pipeline {
        tasks: vec![
            tokio::spawn(async move {
                source.run(tx).await.unwrap();
            }),
            tokio::spawn(indexer::run(objects, config, rx, publisher.clone())),
        ],
        publisher,
        metrics,
    }
}

async fn wait(
    rx: &mut watch::Receiver<NodeView>,
    within: Duration,
    what: &str,
    check: impl FnMut(&NodeView) -> bool,
) {
    tokio::time::timeout(within, rx.wait_for(check))
        .await
        .unwrap_or_else(|_| panic!("not within {within:?}: {what}"))
        .unwrap();
}

fn has(view: &NodeView, name: &str) -> bool {
    view.workloads().any(|(_, w)| w.name == name)
}

const NAMESPACE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    weft.io/mesh: enabled
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: client
  namespace: demo
";

const CLIENT: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: demo
  labels: {app: client}
spec:
  nodeName: node-a
  serviceAccountName: client
  containers:
  - name: main
    command: [sleep, infinity]
status:
  podIP: 10.244.0.2
";

const SERVER: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: demo
  labels: {app: server}
spec:
  nodeName: node-a
  containers:
  - name: main
    ports: [{name: http, containerPort: 8080}]
status:
  podIP: 10.244.0.3
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: http}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_editing_and_deleting_files_changes_the_view() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("namespace.yaml"), NAMESPACE).unwrap();
    std::fs::write(dir.path().join("client.yaml"), CLIENT).unwrap();
    let p = start(dir.path(), None);
    let mut ready = p.publisher.ready();
    let mut view = p.publisher.subscribe("node-a");
    wait(&mut view, Duration::from_secs(5), "first view", |v| {
        has(v, "client")
    })
    .await;
    assert!(*ready.wait_for(|r| *r).await.unwrap());
    let w = view.borrow().workloads().next().unwrap().1.clone();
    assert!(w.enrolled);
    assert_eq!(w.identity, "spiffe://cluster.local/ns/demo/sa/client");
    assert_eq!(
        address::decode(&w.addresses[0]),
        Some("10.244.0.2".parse().unwrap())
    );

    // Add a file: a server and its Service.
    let t = Instant::now();
    std::fs::write(dir.path().join("server.yaml"), SERVER).unwrap();
    wait(&mut view, PROPAGATION, "server added", |v| {
        v.services()
            .any(|(k, s)| k == "demo/server" && s.endpoints.len() == 1)
    })
    .await;
    eprintln!("file added -> view changed in {:?}", t.elapsed());

    // Edit a file: the namespace leaves the mesh.
    let t = Instant::now();
    std::fs::write(
        dir.path().join("namespace.yaml"),
        NAMESPACE.replace("weft.io/mesh: enabled", "weft.io/mesh: disabled"),
    )
    .unwrap();
    wait(&mut view, PROPAGATION, "namespace left the mesh", |v| {
        v.mesh.is_none() && v.workloads().all(|(_, w)| !w.enrolled)
    })
    .await;
    eprintln!("file edited -> view changed in {:?}", t.elapsed());

    // Delete a file: the server goes.
    std::fs::remove_file(dir.path().join("server.yaml")).unwrap();
    wait(&mut view, PROPAGATION, "server removed", |v| {
        !has(v, "server")
    })
    .await;
    assert!(has(&view.borrow(), "client"));
    assert_eq!(p.metrics.rejected("File"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_and_objects_are_reported_and_the_rest_served() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("namespace.yaml"), NAMESPACE).unwrap();
    std::fs::write(dir.path().join("client.yaml"), CLIENT).unwrap();
    std::fs::write(
        dir.path().join("garbage.yaml"),
        "kind: Pod\nmetadata: {name: [oops\n",
    )
    .unwrap();
    // One bad object among good ones: only it is refused.
    std::fs::write(
        dir.path().join("mixed.yaml"),
        format!("{SERVER}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: bad, namespace: demo}}\nspec:\n  nodeName: node-a\n  containers: []\nstatus: {{podIP: not-an-ip}}\n"),
    )
    .unwrap();
    let p = start(dir.path(), None);
    let mut view = p.publisher.subscribe("node-a");
    wait(
        &mut view,
        Duration::from_secs(5),
        "good objects served",
        |v| has(v, "client") && has(v, "server"),
    )
    .await;
    assert!(!has(&view.borrow(), "bad"));
    assert_eq!(p.metrics.rejected("File"), 1, "garbage.yaml");
    assert_eq!(p.metrics.rejected("Pod"), 1, "demo/bad");

    // A good file broken by an edit keeps serving what it held.
    std::fs::write(
        dir.path().join("client.yaml"),
        "kind: Pod\n  bad: indentation\n :",
    )
    .unwrap();
    let t = Instant::now();
    while p.metrics.rejected("File") < 2 && t.elapsed() < PROPAGATION {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        p.metrics.rejected("File"),
        2,
        "client.yaml's broken edit is reported"
    );
    assert!(
        has(&view.borrow(), "client"),
        "its last good objects are still served"
    );

    // Unchanged broken files are not reported again on later reloads. A
    // reload is provoked and seen (a new file's pod appears), so the
    // directory, broken files included, was certainly re-read.
    std::fs::write(
        dir.path().join("other.yaml"),
        CLIENT
            .replace("name: client\n  namespace", "name: other\n  namespace")
            .replace("10.244.0.2", "10.244.0.4"),
    )
    .unwrap();
    wait(&mut view, PROPAGATION, "a reload (other.yaml)", |v| {
        has(v, "other")
    })
    .await;
    assert_eq!(p.metrics.rejected("File"), 2);

    // Fixed: the new content is served.
    std::fs::write(
        dir.path().join("client.yaml"),
        CLIENT.replace("10.244.0.2", "10.244.0.9"),
    )
    .unwrap();
    wait(&mut view, PROPAGATION, "fixed file served", |v| {
        v.workloads().any(|(_, w)| {
            w.name == "client"
                && address::decode(&w.addresses[0]) == Some("10.244.0.9".parse().unwrap())
        })
    })
    .await;
    let text = p.metrics.encode();
    assert!(
        text.contains("weft_destination_rejected_objects_total{kind=\"File\"} 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_state_supplies_addresses_the_manifests_leave_out() {
    let dir = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let state_dir = run.path().join("weft-sim/demo");
    let state_file = state_dir.join("state.json");
    std::fs::write(dir.path().join("namespace.yaml"), NAMESPACE).unwrap();
    // No status and no clusterIP: the simulator assigns them.
    let server = SERVER
        .replace("status:\n  podIP: 10.244.0.3\n", "")
        .replace("  clusterIP: 10.96.0.20\n", "");
    std::fs::write(dir.path().join("server.yaml"), server).unwrap();
    // The state file's directory does not exist yet: the simulator is not up.
    let p = start(dir.path(), Some(&state_file));
    let mut view = p.publisher.subscribe("node-a");
    wait(
        &mut view,
        Duration::from_secs(5),
        "server without address",
        |v| {
            v.workloads()
                .any(|(_, w)| w.name == "server" && w.addresses.is_empty())
        },
    )
    .await;
    let uid_before = view.borrow().workloads().next().unwrap().1.uid.clone();
    assert_eq!(uid_before, "local:demo/server");

    let state = |ip: &str| {
        format!(
            r#"{{"name": "demo", "pods": [{{"namespace": "demo", "name": "server", "uid": "5f0c-server",
                "node": "node-a", "ip": "{ip}", "ipv6": "fd00:10:244:0::3"}}],
               "services": [{{"namespace": "demo", "name": "server", "cluster_ip": "10.96.17.4"}}]}}"#
        )
    };
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(&state_file, state("10.244.0.3")).unwrap();
    // The directory appeared after start: found by the periodic re-read.
    wait(
        &mut view,
        PROPAGATION,
        "addresses from the state file",
        |v| {
            v.workloads()
                .any(|(_, w)| w.uid == "5f0c-server" && w.addresses.len() == 2)
                && v.services().any(|(_, s)| {
                    s.cluster_ips.first().and_then(|a| address::decode(a))
                        == Some("10.96.17.4".parse().unwrap())
                        && s.endpoints.len() == 1
                })
        },
    )
    .await;

    // The simulator restarts the pod with another IP: followed.
    std::fs::write(&state_file, state("10.244.0.7")).unwrap();
    wait(&mut view, PROPAGATION, "new IP from the state file", |v| {
        v.workloads()
            .any(|(_, w)| address::decode(&w.addresses[0]) == Some("10.244.0.7".parse().unwrap()))
    })
    .await;
}

const POLICY: &str = "\
apiVersion: policy.weft.io/v1alpha1
kind: Server
metadata: {name: server-http, namespace: demo}
spec:
  podSelector: {matchLabels: {app: server}}
  port: http
---
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: server-from-client, namespace: demo}
spec:
  targetRef: {group: policy.weft.io, kind: Server, name: server-http}
  requiredAuthenticationRefs:
  - {kind: ServiceAccount, name: client}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_policy_file_flips_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("namespace.yaml"), NAMESPACE).unwrap();
    std::fs::write(dir.path().join("server.yaml"), SERVER).unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let p = start(dir.path(), None);
    let mut view = p.publisher.subscribe("node-a");
    let client: weft_identity_api::SpiffeId =
        "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
    let from: std::net::IpAddr = "10.244.0.2".parse().unwrap();
    let allowed = |v: &NodeView| {
        v.local.policies.get("demo/server").map(|policy| {
            weft_destination_api::authorize(policy, 8080, Some(&client), from).allowed
        })
    };
    wait(&mut view, Duration::from_secs(5), "client allowed", |v| {
        allowed(v) == Some(true)
    })
    .await;

    // Authorize another account instead: the client is refused.
    let t = Instant::now();
    std::fs::write(
        dir.path().join("policy.yaml"),
        POLICY.replace("name: client}", "name: other}"),
    )
    .unwrap();
    wait(&mut view, PROPAGATION, "client refused", |v| {
        allowed(v) == Some(false)
    })
    .await;
    eprintln!("policy edited -> view changed in {:?}", t.elapsed());

    // A policy whose Server does not exist: reported, counted, no access.
    std::fs::write(
        dir.path().join("policy.yaml"),
        POLICY
            .replace("name: other}", "name: client}")
            .replace("name: server-http}", "name: no-such-server}"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = p.metrics.encode();
        if text.contains("weft_destination_ineffective_policies{reason=\"dangling_reference\"} 1") {
            assert!(
                text.contains("weft_destination_ineffective_policies{reason=\"invalid\"} 0"),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not counted: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(allowed(&view.borrow()), Some(false));
}

fn pods(objects: &[Object]) -> Vec<String> {
    objects
        .iter()
        .filter(|o| o.kind() == Kind::Pod)
        .map(|o| o.key().name)
        .collect()
}

/// An in-place rewrite (truncate, then write; editors and `>` do this),
/// with the re-read landing in between, where a real watcher lands about
/// one time in ten. Driven step by step on a paused clock, so the worst
/// interleaving happens every run.
#[tokio::test(start_paused = true)]
async fn a_file_rewritten_in_place_keeps_its_objects_while_it_reads_empty() {
    let dir = tempfile::tempdir().unwrap();
    let client = dir.path().join("client.yaml");
    std::fs::write(dir.path().join("namespace.yaml"), NAMESPACE).unwrap();
    std::fs::write(&client, CLIENT).unwrap();
    let metrics = Arc::new(Metrics::new());
    let mut source = LocalSource::new(dir.path().to_path_buf(), None, metrics.clone());
    assert_eq!(pods(&source.load().unwrap()), ["client"]);

    // Truncated: read mid-rewrite, the pod is still served.
    std::fs::File::create(&client).unwrap();
    assert_eq!(
        pods(&source.load().unwrap()),
        ["client"],
        "a truncated file dropped its objects"
    );
    // The write that follows does not parse (a half-finished edit): still
    // the objects of the last good content, and the breakage is reported.
    std::fs::write(&client, "kind: Pod\n  bad: indentation\n :").unwrap();
    assert_eq!(pods(&source.load().unwrap()), ["client"]);
    assert_eq!(metrics.rejected("File"), 1);
    // Truncated again, then written with good content: the new content.
    std::fs::File::create(&client).unwrap();
    tokio::time::advance(EMPTY_STABLE / 2).await;
    assert_eq!(pods(&source.load().unwrap()), ["client"]);
    std::fs::write(
        &client,
        CLIENT.replace("name: client\n  namespace", "name: renamed\n  namespace"),
    )
    .unwrap();
    assert_eq!(pods(&source.load().unwrap()), ["renamed"]);

    // Emptied on purpose: once it has stayed empty, its objects go.
    std::fs::write(&client, "\n").unwrap();
    assert_eq!(pods(&source.load().unwrap()), ["renamed"]);
    tokio::time::advance(EMPTY_STABLE / 2).await;
    assert_eq!(pods(&source.load().unwrap()), ["renamed"], "not yet stable");
    tokio::time::advance(EMPTY_STABLE / 2).await;
    assert_eq!(pods(&source.load().unwrap()), Vec::<String>::new());
    // Empty is not an error.
    assert_eq!(metrics.rejected("File"), 1);
}

/// The same through the running source and its watcher: a file emptied on
/// purpose leaves the view (by the periodic re-read after it stayed empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_emptied_on_purpose_leaves_the_view() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("namespace.yaml"), NAMESPACE).unwrap();
    std::fs::write(dir.path().join("client.yaml"), CLIENT).unwrap();
    std::fs::write(dir.path().join("server.yaml"), SERVER).unwrap();
    let p = start(dir.path(), None);
    let mut view = p.publisher.subscribe("node-a");
    wait(&mut view, PROPAGATION, "both pods", |v| {
        has(v, "client") && has(v, "server")
    })
    .await;
    std::fs::File::create(dir.path().join("server.yaml")).unwrap();
    wait(&mut view, PROPAGATION, "server gone", |v| !has(v, "server")).await;
    assert!(has(&view.borrow(), "client"));
}
