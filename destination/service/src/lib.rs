//! Weft's destination service: indexes the cluster's objects and streams
//! each node proxy the view of the cluster it needs.
//!
//! Data flow: sources ([`source`]) turn Kubernetes objects into validated
//! [`model`] objects in a [`store`]; the [`index`] (a pure function, and
//! its incremental form that the indexer keeps up to date) turns the store
//! into per-node [`views`]; the [`publisher`] versions them and
//! hands each node's latest view to its subscribers; the [`server`] streams
//! snapshots and deltas over gRPC.

pub mod admin;
pub mod index;
pub mod indexer;
pub mod metrics;
pub mod model;
pub mod object;
pub mod policy_model;
pub mod publisher;
pub mod server;
pub mod source;
pub mod store;
// Test and benchmark input only; see Cargo.toml.
#[cfg(any(test, feature = "testing"))]
pub mod synthetic;
pub mod views;
