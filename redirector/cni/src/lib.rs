//! Weft's chained CNI plugin.
//!
//! The plugin (binary `weft-cni`) runs after the cluster's main CNI plugin
//! on every pod sandbox ADD/DEL and tells the node agent (the node proxy)
//! over a Unix socket, passing the pod's network namespace path, in the pod
//! registration protocol of the `weft-registration` crate. The agent's end
//! lives in `weft-redirector` (`PodRegistrationListener`); the local
//! simulator speaks the same protocol. Specification: docs/redirector.md.

pub mod plugin;
