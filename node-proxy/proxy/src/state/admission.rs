//! Whether a pod that registers (its sandbox is being set up; the CNI ADD
//! waits for the answer, and the pod's containers start after it) is
//! captured now, is outside the mesh, or must not start yet.
//!
//! An enrolled pod must never run uncaptured: its first connections would
//! leave in plaintext. On Kubernetes the pod's address is known to the
//! control plane only after the CNI ADD has returned (the kubelet reports it
//! then), so the view normally has the pod without an address at this
//! moment: the address the cluster's CNI plugin assigned comes with the
//! registration instead. A pod the view does not have at all is in the mesh
//! when its namespace is (a pod can only opt out, never in): such a pod is
//! refused until the view has it (the kubelet retries the ADD), while a pod
//! of a namespace outside the mesh is let through at once — the mesh never
//! holds up pods that are not its own.

use super::control_plane::identity_of;
use std::net::IpAddr;
use std::sync::Arc;
use weft_cert_manager::SpiffeId;
use weft_destination_api::{View, Workload, address};

/// What to do with a registering pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// In the mesh: captured as this.
    Capture(Capture),
    /// Not in the mesh (its namespace is not, it opts out, or it shares the
    /// node's network namespace): runs uncaptured.
    Outside,
    /// Cannot be decided yet, and the pod may be in the mesh: it must not
    /// start (why, for the kubelet's events).
    Undecided(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    pub identity: SpiffeId,
    /// Its primary address, and the other family's (dual stack).
    pub ip: IpAddr,
    pub other_ip: Option<IpAddr>,
    pub workload_uid: String,
}

/// A pod as its registration names it.
#[derive(Clone, Copy, Debug)]
pub struct Registering<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Empty when the runtime gave none.
    pub uid: &'a str,
    /// From the cluster's CNI plugin; empty when the sender did not know
    /// them.
    pub ips: &'a [IpAddr],
}

/// Decides for `pod`.
pub fn admit(view: &View, pod: Registering<'_>) -> Admission {
    let registered_ips = pod.ips;
    if let Some(w) = workload_of(view, pod) {
        if !w.enrolled {
            return Admission::Outside;
        }
        let Some(identity) = identity_of(w) else {
            return Admission::Undecided("the view gives the pod no valid identity");
        };
        let in_view: Vec<IpAddr> = w
            .addresses
            .iter()
            .filter_map(|a| address::decode(a))
            .collect();
        // The view's addresses once it has them (the API server's word);
        // until then the ones the pod's network was just set up with.
        let ips = if in_view.is_empty() {
            registered_ips
        } else {
            &in_view
        };
        let Some(&ip) = ips.first() else {
            return Admission::Undecided(
                "neither the view nor the registration gives the pod an address",
            );
        };
        let other_ip = ips.iter().copied().find(|o| o.is_ipv4() != ip.is_ipv4());
        return Admission::Capture(Capture {
            identity,
            ip,
            other_ip,
            workload_uid: w.uid.clone(),
        });
    }
    match &view.enrolled_namespaces {
        Some(namespaces) if !namespaces.contains(pod.namespace) => Admission::Outside,
        Some(_) => Admission::Undecided(
            "its namespace is in the mesh and the destination service has not sent the pod yet",
        ),
        None => Admission::Undecided("no view from the destination service yet"),
    }
}

/// The pod's workload: by uid, or by namespace and name when the runtime
/// gave no uid.
fn workload_of<'v>(view: &'v View, pod: Registering<'_>) -> Option<&'v Workload> {
    if !pod.uid.is_empty() {
        return view.workloads.get(pod.uid).map(Arc::as_ref);
    }
    let mut same_name = view
        .workloads
        .values()
        .filter(|w| w.namespace == pod.namespace && w.name == pod.name);
    let found = same_name.next()?;
    // Two pods of that name (the mesh's and a local one): not this way.
    same_name.next().is_none().then_some(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_destination_api::{NamespaceSet, WatchResponse};

    fn workload(uid: &str, ns: &str, ips: &[&str], enrolled: bool) -> Workload {
        Workload {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: ns.into(),
            identity: format!("spiffe://cluster.local/ns/{ns}/sa/default"),
            addresses: ips
                .iter()
                .map(|ip| address::encode(ip.parse().unwrap()))
                .collect(),
            enrolled,
            ..Default::default()
        }
    }

    fn view(workloads: Vec<Workload>, namespaces: Option<&[&str]>) -> View {
        let mut v = View::default();
        v.apply(WatchResponse {
            epoch: "e".into(),
            version: 1,
            snapshot: true,
            workloads,
            enrolled_namespaces: namespaces.map(|n| NamespaceSet {
                names: n.iter().map(|s| s.to_string()).collect(),
            }),
            ..Default::default()
        })
        .unwrap();
        v
    }

    /// Pods named `pod-<uid>`.
    fn admit_pod(view: &View, ns: &str, uid: &str, ips: &[IpAddr]) -> Admission {
        let name = format!("pod-{uid}");
        admit(
            view,
            Registering {
                namespace: ns,
                name: &name,
                uid,
                ips,
            },
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_enrolled_pod_the_view_has_without_address_is_captured_with_the_registered_one() {
        let v = view(vec![workload("u1", "shop", &[], true)], Some(&["shop"]));
        let registered = [ip("fd00::5"), ip("10.244.0.5")];
        match admit_pod(&v, "shop", "u1", &registered) {
            Admission::Capture(c) => {
                assert_eq!(c.ip, ip("fd00::5"));
                assert_eq!(c.other_ip, Some(ip("10.244.0.5")));
                assert_eq!(c.workload_uid, "u1");
                assert_eq!(c.identity.namespace(), "shop");
            }
            other => panic!("{other:?}"),
        }
        // Without an address from either: not started.
        assert!(matches!(
            admit_pod(&v, "shop", "u1", &[]),
            Admission::Undecided(_)
        ));
    }

    #[test]
    fn the_views_address_wins_over_the_registered_one() {
        let v = view(
            vec![workload("u1", "shop", &["10.244.0.9"], true)],
            Some(&["shop"]),
        );
        match admit_pod(&v, "shop", "u1", &[ip("10.244.0.5")]) {
            Admission::Capture(c) => assert_eq!((c.ip, c.other_ip), (ip("10.244.0.9"), None)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pod_the_view_lacks_waits_only_when_its_namespace_is_in_the_mesh() {
        let v = view(vec![], Some(&["shop"]));
        assert!(matches!(
            admit_pod(&v, "shop", "u2", &[ip("10.244.0.5")]),
            Admission::Undecided(_)
        ));
        assert_eq!(
            admit_pod(&v, "batch", "u3", &[ip("10.244.0.6")]),
            Admission::Outside
        );
        // No view yet: nothing can be said, not even "outside".
        let none = view(vec![], None);
        assert!(matches!(
            admit_pod(&none, "batch", "u3", &[]),
            Admission::Undecided(_)
        ));
    }

    #[test]
    fn a_pod_that_opts_out_is_outside_in_an_enrolled_namespace() {
        let v = view(vec![workload("u1", "shop", &[], false)], Some(&["shop"]));
        assert_eq!(
            admit_pod(&v, "shop", "u1", &[ip("10.244.0.5")]),
            Admission::Outside
        );
    }

    #[test]
    fn without_a_uid_the_pod_is_found_by_name_unless_two_share_it() {
        let v = view(vec![workload("u1", "shop", &[], true)], Some(&["shop"]));
        let ips = [ip("10.244.0.5")];
        let by_name = Registering {
            namespace: "shop",
            name: "pod-u1",
            uid: "",
            ips: &ips,
        };
        assert!(matches!(admit(&v, by_name), Admission::Capture(_)));
        let mut twin = workload("u2", "shop", &[], true);
        twin.name = "pod-u1".into();
        let v = view(
            vec![workload("u1", "shop", &[], true), twin],
            Some(&["shop"]),
        );
        assert!(matches!(admit(&v, by_name), Admission::Undecided(_)));
    }
}
