//! The in-cluster face of kommit: the `GitSync` custom resource (group `kommit.dev`). Its CRD
//! is generated from these types (`kommit crd`).

use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::audit::HistoryEntry;
use crate::duration::parse_duration;
use http::REQUESTED_AT_ANNOTATION;

pub mod controller;
pub mod credentials;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod pull_requests;
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
    printcolumn = r#"{"name":"Previews","type":"integer","jsonPath":".status.previews"}"#,
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
    /// How often to fetch and to look for drift: whole hours, minutes and seconds in that
    /// order, e.g. `30s`, `5m`, `1h30m`; at least `10s` (a push webhook or the
    /// `kommit.dev/reconcile-requested-at` annotation syncs sooner). The API server checks it with
    /// CEL's `duration()`, so the pattern keeps to what both CEL and kommit read: no bare number
    /// of seconds, no fractions, no `ms`.
    #[serde(default = "default_interval")]
    #[schemars(
        length(min = 2, max = 21),
        regex(pattern = INTERVAL_PATTERN),
        extend("x-kubernetes-validations" = [{
            "rule": interval_rule(),
            "message": interval_floor_message(),
        }])
    )]
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
    /// Pull-request rollouts: a sticky diff comment and commit statuses for every open pull
    /// request against the GitSync's branch, and optionally a preview namespace for each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_requests: Option<PullRequestsSpec>,
}

/// The forge whose pull requests a GitSync follows.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ForgeProvider {
    Github,
    Gitea,
}

impl From<ForgeProvider> for crate::forge::Provider {
    fn from(provider: ForgeProvider) -> Self {
        match provider {
            ForgeProvider::Github => crate::forge::Provider::GitHub,
            ForgeProvider::Gitea => crate::forge::Provider::Gitea,
        }
    }
}

/// What kommit does for the open pull requests against a GitSync's branch.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullRequestsSpec {
    /// `github` or `gitea`.
    pub provider: ForgeProvider,
    /// The forge's API (default: from the repository URL: `https://api.github.com` for
    /// github.com, `<scheme>://<host>/api/v3` for GitHub Enterprise, `/api/v1` for Gitea).
    #[serde(default, rename = "apiURL", skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// A Secret of this namespace whose `token` may read pull requests and write comments and
    /// commit statuses (default: the GitSync's `secretRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Keep one comment per pull request with what it changes and what merging would apply.
    #[serde(default = "default_true")]
    pub comment: bool,
    /// Deploy each pull request's head into a namespace of its own, `<gitsync>-pr-<number>`.
    #[serde(default)]
    pub previews: bool,
    /// Only pull requests carrying all of these labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Pull requests from forks are diffed and previewed only with this true, and only once
    /// someone who may label the pull request added `approvalLabel`; the approval holds for the
    /// head commit it was given on (kommit removes the label when new commits are pushed).
    #[serde(default)]
    pub allow_forks: bool,
    #[serde(default = "default_approval_label")]
    pub approval_label: String,
    /// A preview without a new push for this long is removed (e.g. `72h`).
    #[serde(default = "default_preview_ttl")]
    pub ttl: String,
    /// The most previews at once; the oldest pull requests get them.
    #[serde(default = "default_max_previews")]
    #[schemars(range(min = 0, max = 100))]
    pub max_previews: u32,
    /// The ResourceQuota of each preview namespace (`spec.hard`), e.g. `{pods: "20"}`.
    #[serde(default = "default_preview_quota")]
    pub quota: std::collections::BTreeMap<String, String>,
    /// Container defaults of each preview namespace's LimitRange (requests and limits).
    #[serde(default)]
    pub container_defaults: ContainerDefaults,
    /// The ClusterRole the GitSync's ServiceAccount is bound to in its preview namespaces (and
    /// only there); the operator needs the `bind` verb on it.
    #[serde(default = "default_preview_role")]
    pub preview_role: String,
}

/// The LimitRange defaults of a preview namespace's containers.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerDefaults {
    #[serde(default = "default_request_cpu")]
    pub request_cpu: String,
    #[serde(default = "default_request_memory")]
    pub request_memory: String,
    #[serde(default = "default_limit_cpu")]
    pub limit_cpu: String,
    #[serde(default = "default_limit_memory")]
    pub limit_memory: String,
}

impl Default for ContainerDefaults {
    fn default() -> Self {
        ContainerDefaults {
            request_cpu: default_request_cpu(),
            request_memory: default_request_memory(),
            limit_cpu: default_limit_cpu(),
            limit_memory: default_limit_memory(),
        }
    }
}

fn default_preview_role() -> String {
    "edit".into()
}
fn default_approval_label() -> String {
    "kommit/preview".into()
}
fn default_preview_ttl() -> String {
    "72h".into()
}
fn default_max_previews() -> u32 {
    10
}
fn default_preview_quota() -> std::collections::BTreeMap<String, String> {
    [
        ("pods", "20"),
        ("requests.cpu", "2"),
        ("requests.memory", "4Gi"),
        ("limits.cpu", "4"),
        ("limits.memory", "8Gi"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}
fn default_request_cpu() -> String {
    "50m".into()
}
fn default_request_memory() -> String {
    "64Mi".into()
}
fn default_limit_cpu() -> String {
    "500m".into()
}
fn default_limit_memory() -> String {
    "512Mi".into()
}

fn default_interval() -> String {
    "1m".to_string()
}

/// The shortest `spec.interval`. The CRD refuses less; a GitSync made under an older CRD that
/// asks for less is reconciled at this interval instead (and the operator says so).
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// What `spec.interval` may be: whole hours, minutes and seconds in that order, each at most six
/// digits (so the sum stays within what CEL's `duration()` can hold). It is a subset of both
/// what CEL reads (which adds fractions, `ms`, `us`, `ns` and signs) and what
/// [`parse_duration`] reads (which adds bare numbers of seconds), so both read it alike.
pub const INTERVAL_PATTERN: &str = r"^([0-9]{1,6}h)?([0-9]{1,6}m)?([0-9]{1,6}s)?$";

/// The CEL rule of the interval's floor. A value off the pattern (or empty, which the pattern
/// admits and `minLength` refuses) is left to those checks' own messages: `duration()` would
/// otherwise fail on it with an evaluation error.
fn interval_rule() -> String {
    format!(
        "self == '' || !self.matches('{INTERVAL_PATTERN}') || duration(self) >= duration('{}s')",
        MIN_INTERVAL.as_secs()
    )
}

fn interval_floor_message() -> String {
    format!(
        "must be at least {}s; a push webhook or the {REQUESTED_AT_ANNOTATION} annotation \
         syncs sooner",
        MIN_INTERVAL.as_secs()
    )
}

/// How often a GitSync is reconciled, and why not at its `spec.interval` when it is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    pub every: Duration,
    /// Set when `spec.interval` was not used as written (below the floor, or unreadable: both
    /// possible only under a CRD older than the floor).
    pub adjusted: Option<String>,
}

impl GitSyncSpec {
    /// The interval the operator reconciles this GitSync at.
    pub fn interval(&self) -> Interval {
        match parse_duration(&self.interval) {
            Ok(every) if every >= MIN_INTERVAL => Interval {
                every,
                adjusted: None,
            },
            Ok(_) => Interval {
                every: MIN_INTERVAL,
                adjusted: Some(format!(
                    "spec.interval {} is below the floor of {}s; reconciling every {}s (the \
                     installed CRD predates the floor: upgrade it to have such values refused)",
                    self.interval,
                    MIN_INTERVAL.as_secs(),
                    MIN_INTERVAL.as_secs()
                )),
            },
            Err(problem) => {
                let every = Duration::from_secs(60);
                Interval {
                    every,
                    adjusted: Some(format!(
                        "spec.interval {problem}; reconciling every {}s (the installed CRD \
                         predates the check: upgrade it to have such values refused)",
                        every.as_secs()
                    )),
                }
            }
        }
    }
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
    /// How many pull requests have a preview namespace now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previews: Option<u32>,
    /// The open pull requests kommit follows (bounded), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_requests: Vec<PullRequestStatus>,
    /// Why the pull requests could not be read or answered, if they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_requests_error: Option<String>,
}

/// What kommit did for one pull request.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullRequestStatus {
    pub number: u64,
    /// The head commit the comment and statuses are about.
    pub head_sha: String,
    /// The base commit the comment compared against.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_sha: String,
    /// The preview namespace, while there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The uid of the namespace kommit made: what it updates and deletes is that one, never
    /// another that merely carries its name or labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_uid: Option<String>,
    /// Of the preview: Progressing, Healthy, Degraded, Refused; or Waiting (a fork not yet
    /// approved), Expired (idle past the ttl), NoPreview (over maxPreviews or previews off).
    #[serde(default)]
    pub health: String,
    /// Why the preview is not healthy, or the diff failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The head commit a fork's approval label was seen on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_sha: Option<String>,
    /// When kommit first saw `headSha` (RFC 3339): the ttl counts from it.
    #[serde(default)]
    pub last_push: String,
    /// When kommit last updated the comment, statuses or preview (RFC 3339).
    #[serde(default)]
    pub last_update: String,
}

/// The CustomResourceDefinition of GitSync as YAML, generated from the Rust types.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(GitSync::crd()).unwrap_or_default();
    kubernetes_formats(&mut crd);
    serde_saphyr::to_string(&crd).unwrap_or_else(|e| format!("# cannot render the CRD: {e}\n"))
}

/// schemars names Rust's unsigned integers (`uint`, `uint32`, `uint64`…), formats Kubernetes
/// does not know: `kubectl apply` warns about each on every GitSync. They become `int64` (or
/// `int32`) with a minimum of 0, which says the same in Kubernetes' words.
fn kubernetes_formats(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(fields) => {
            let unsigned = fields
                .get("format")
                .and_then(|f| f.as_str())
                .filter(|f| f.starts_with("uint"))
                .map(|f| {
                    if f == "uint32" || f == "uint16" || f == "uint8" {
                        "int32"
                    } else {
                        "int64"
                    }
                });
            if let Some(format) = unsigned {
                fields.insert("format".into(), format.into());
                fields.entry("minimum").or_insert(0.into());
            }
            fields.values_mut().for_each(kubernetes_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(kubernetes_formats),
        _ => {}
    }
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
        assert!(
            !yaml.contains("format: uint"),
            "only formats Kubernetes knows, so kubectl apply does not warn: {yaml}"
        );
        assert!(yaml.contains("format: int64"));
    }

    fn spec_with_interval(interval: &str) -> GitSyncSpec {
        serde_json::from_value(serde_json::json!({"repo": "https://h/r.git", "interval": interval}))
            .unwrap()
    }

    #[test]
    fn the_crd_refuses_intervals_below_the_floor_and_values_cel_cannot_read() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(GitSync::crd()).unwrap();
        let interval = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["interval"];
        assert_eq!(interval["pattern"], INTERVAL_PATTERN, "{interval}");
        assert_eq!(interval["default"], "1m");
        let rules = interval["x-kubernetes-validations"].as_array().unwrap();
        let rule = rules[0]["rule"].as_str().unwrap();
        assert!(
            rule.contains(&format!("self.matches('{INTERVAL_PATTERN}')"))
                && rule.contains("duration(self) >= duration('10s')"),
            "{rule}"
        );
        assert!(
            rules[0]["message"]
                .as_str()
                .unwrap()
                .contains("at least 10s")
        );
    }

    #[test]
    fn what_the_schema_admits_the_operator_reads_as_cel_does() {
        // Values of the schema's pattern, and their durations as Go's ParseDuration (CEL) has
        // them.
        for (text, seconds) in [
            ("10s", 10),
            ("1m", 60),
            ("1h30m", 5400),
            ("2h0m5s", 7205),
            ("999999h999999m999999s", 999_999 * 3661),
        ] {
            let interval = spec_with_interval(text).interval();
            assert_eq!(interval.every, Duration::from_secs(seconds), "{text}");
            assert_eq!(interval.adjusted, None, "{text}");
        }
    }

    #[test]
    fn an_interval_below_the_floor_from_an_older_crd_is_raised_to_it_and_said_so() {
        for text in ["2s", "0s", "5"] {
            let interval = spec_with_interval(text).interval();
            assert_eq!(interval.every, MIN_INTERVAL, "{text}");
            let said = interval.adjusted.unwrap();
            assert!(
                said.contains(text) && said.contains("floor of 10s"),
                "{said}"
            );
        }
        let unreadable = spec_with_interval("1.5m").interval();
        assert_eq!(unreadable.every, Duration::from_secs(60));
        assert!(
            unreadable
                .adjusted
                .unwrap()
                .contains("'1.5m' is not a duration")
        );
        assert_eq!(
            spec_with_interval("90").interval().every,
            Duration::from_secs(90)
        );
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
