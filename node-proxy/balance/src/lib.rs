//! Choosing where a request goes and how often it may be tried again, with
//! no knowledge of sockets or of the mesh: keys are whatever the caller
//! balances over (the node proxy uses endpoint addresses).
//!
//! - [`Balancer`]: power of two choices over peak-EWMA latency, with
//!   failure backoff (ejection) per endpoint;
//! - [`RetryBudget`]: retries as a bounded share of recent requests.
//!
//! Layering: a leaf. It imports nothing of Weft's.

mod balancer;
mod budget;

pub use balancer::{Balancer, BalancerConfig, EndpointState, Verdict};
pub use budget::{BudgetConfig, RetryBudget};
