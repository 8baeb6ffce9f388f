//! The in-cluster face of kommit: the `GitSync` custom resource (group `kommit.dev`). Its CRD
//! is generated from these types (`kommit crd`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::audit::HistoryEntry;

pub mod controller;
pub mod credentials;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod run;
pub mod webhook;

/// Keeps a path of a git repository synced into the cluster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kommit.dev",
    version = "v1alpha1",
    kind = "GitSync",
    plural = "gitsyncs",
    shortname = "gs",
    namespaced,
    status = "GitSyncStatus",
    printcolumn = r#"{"name":"Commit","type":"string","jsonPath":".status.lastAppliedCommitShort"}"#,
    printcolumn = r#"{"name":"Synced","type":"string","jsonPath":".status.conditions[?(@.type==\"Synced\")].status"}"#,
    printcolumn = r#"{"name":"Health","type":"string","jsonPath":".status.health"}"#,
    printcolumn = r#"{"name":"Subject","type":"string","priority":1,"jsonPath":".status.lastAppliedSubject"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GitSyncSpec {
    /// Repository URL (https://, ssh:// or git@host:path). A file:// URL or a path is read only
    /// by an operator started with `--allow-local-repos`. Credentials belong in `secretRef`, not
    /// in the URL (where they are redacted wherever the URL is shown).
    pub repo: String,
    /// Branch to follow (default: the repository's default branch). Exclusive with `rev`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// A fixed revision (tag or commit SHA) instead of a branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Folder of the repository holding the manifests (default: all of it).
    #[serde(default)]
    pub path: String,
    /// Namespace for manifests that name none (default: the GitSync's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_namespace: Option<String>,
    /// How often to fetch and to look for drift, e.g. `1m`, `30s`.
    #[serde(default = "default_interval")]
    pub interval: String,
    /// Delete objects that left git.
    #[serde(default)]
    pub prune: bool,
    /// Re-apply the commit when someone edits a synced object.
    #[serde(default)]
    pub self_heal: bool,
    /// Re-apply the last healthy commit when a rollout fails.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// Stop making changes (the status is still reported).
    #[serde(default)]
    pub suspend: bool,
    /// A Secret with git credentials: `token` (https), or `ssh-privatekey` and `known_hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Take over objects of the commit that already exist and that kommit did not create.
    #[serde(default)]
    pub adopt: bool,
    /// The ServiceAccount of this namespace whose rights the commit has: every read, dry run,
    /// write and prune is made as it (impersonated), so RBAC decides what the commit may touch.
    /// Default: the operator's `--default-service-account`, else the operator itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Read only files matching one of these patterns (gitignore syntax, from the repository
    /// root). Dot files and folders, and what `.kommitignore` names, are never read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Do not read files matching these patterns (gitignore syntax, from the repository root).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// The most objects one sync may read (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_objects: Option<usize>,
    /// The most bytes of manifests one sync may read, and their size once parsed (default
    /// 256 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<u64>,
}

fn default_interval() -> String {
    "1m".to_string()
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    pub name: String,
}

/// A condition in the usual Kubernetes shape.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Ready, Synced, Healthy or Stalled.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The conditions a GitSync reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    /// The cluster is on the commit and it is healthy.
    Ready,
    /// The cluster matches the commit.
    Synced,
    /// What the commit applied is healthy.
    Healthy,
    /// Progress needs a person (no credentials, unreachable source).
    Stalled,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Synced => "Synced",
            ConditionType::Healthy => "Healthy",
            ConditionType::Stalled => "Stalled",
        }
    }
}

/// Why a condition is what it is: the `reason` of a condition, one word as Kubernetes has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Ready,
    Synced,
    InSync,
    Healthy,
    Progressing,
    Reachable,
    Suspended,
    /// Objects were changed outside git (fields taken over, objects deleted).
    Drift,
    CredentialsUnavailable,
    SourceUnavailable,
    InvalidCommit,
    PruneGuard,
    Pinned,
    SyncFailed,
    RolloutFailed,
    /// The commit's rollout failed before; it is not tried again until git moves on.
    FailedBefore,
    /// The commit would take over objects kommit did not create, without `spec.adopt`.
    AdoptionRefused,
    /// Another kommit (a CLI run, another GitSync of the same source) is syncing it now.
    SourceBusy,
    /// The GitSync's ServiceAccount may not do what the commit needs (RBAC said no).
    Forbidden,
    /// The operator does not read this kind of source for GitSyncs (a local path or file://).
    SourceNotAllowed,
    /// The spec asks for something that cannot be (e.g. an invalid serviceAccountName).
    InvalidSpec,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ready => "Ready",
            Reason::Synced => "Synced",
            Reason::InSync => "InSync",
            Reason::Healthy => "Healthy",
            Reason::Progressing => "Progressing",
            Reason::Reachable => "Reachable",
            Reason::Suspended => "Suspended",
            Reason::Drift => "Drift",
            Reason::CredentialsUnavailable => "CredentialsUnavailable",
            Reason::SourceUnavailable => "SourceUnavailable",
            Reason::InvalidCommit => "InvalidCommit",
            Reason::PruneGuard => "PruneGuard",
            Reason::Pinned => "Pinned",
            Reason::SyncFailed => "SyncFailed",
            Reason::RolloutFailed => "RolloutFailed",
            Reason::FailedBefore => "FailedBefore",
            Reason::AdoptionRefused => "AdoptionRefused",
            Reason::SourceBusy => "SourceBusy",
            Reason::Forbidden => "Forbidden",
            Reason::SourceNotAllowed => "SourceNotAllowed",
            Reason::InvalidSpec => "InvalidSpec",
        }
    }
}

/// An object the GitSync applied.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryEntry {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitSyncStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_commit: Option<String>,
    /// The first seven characters, for `kubectl get gitsyncs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_commit_short: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_healthy_commit: Option<String>,
    /// Healthy, Progressing, Degraded, Missing or Unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// The latest sync outcomes, newest first (bounded).
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    #[serde(default)]
    pub inventory: Vec<InventoryEntry>,
    /// The last `kommit.dev/reconcile-requested-at` annotation (set by webhooks) acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
}

/// The CustomResourceDefinition of GitSync as YAML, generated from the Rust types.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = GitSync::crd();
    serde_saphyr::to_string(&crd).unwrap_or_else(|e| format!("# cannot render the CRD: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_names_group_kind_and_columns() {
        let yaml = crd_yaml();
        assert!(yaml.contains("name: gitsyncs.kommit.dev"), "{yaml}");
        assert!(yaml.contains("kind: GitSync"));
        assert!(yaml.contains("scope: Namespaced"));
        assert!(yaml.contains("name: Commit") && yaml.contains("name: Health"));
        assert!(yaml.contains("autoRollback") && yaml.contains("secretRef"));
        assert!(yaml.contains("serviceAccountName"));
    }

    #[test]
    fn spec_defaults_match_the_docs() {
        let spec: GitSyncSpec =
            serde_json::from_value(serde_json::json!({"repo": "https://example.com/app.git"}))
                .unwrap();
        assert_eq!(spec.interval, "1m");
        assert!(
            spec.auto_rollback,
            "auto-rollback is on by default in the operator"
        );
        assert!(!spec.prune && !spec.self_heal && !spec.suspend);
    }
}
