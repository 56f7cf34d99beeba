//! Where the objects come from: the Kubernetes API ([`kube`]) or a directory
//! of manifests plus the simulator's state file ([`local`]). Both send
//! [`SourceEvent`](crate::indexer::SourceEvent)s carrying validated objects;
//! what fails validation is logged and counted here, at the edge, once per
//! version of the object.

pub mod kube;
pub mod kube_status;
pub mod local;
pub mod local_cluster;
pub mod manifests;

pub use local_cluster::LocalClusterState;
