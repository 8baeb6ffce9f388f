//! kommit: a GitOps reconciler for Kubernetes. Git is the desired state; the cluster is made to
//! match it one commit at a time, and every change in the cluster traces back to its commit.
//!
//! The pipeline, one way through: `source` (git) → `manifest` (YAML with origins) → `plan`
//! (desired vs live, noise-free) → apply and prune (`cluster`), run by `reconcile`; `cli` only
//! parses, calls and prints.

pub mod audit;
pub mod budget;
pub mod cli;
pub mod cluster;
pub mod commit;
pub mod duration;
pub mod forge;
pub mod manifest;
pub mod object;
pub mod operator;
pub mod plan;
pub mod reconcile;
pub mod rollout;
pub mod select;
pub mod source;
