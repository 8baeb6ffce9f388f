//! The pipeline for one (repository, revision, path, cluster): read the commit, parse its
//! manifests, plan against the live cluster, then apply and prune, all or nothing up to the first
//! write.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::audit::{self, Events, Outcome, Record, RecordStore};
use crate::cluster::{Cluster, ClusterError, ResourceType};
use crate::manifest::{self, Manifest, ManifestError, Origin};
use crate::object::{
    self, AUTHOR_ANNOTATION, CHANGE_CAUSE_ANNOTATION, COMMIT_ANNOTATION, DATE_ANNOTATION,
    FILE_ANNOTATION, INVENTORY_LABEL, ObjectKey, SOURCE_ANNOTATION, SUBJECT_ANNOTATION,
};
use crate::plan::{self, Action, Change, Plan, PlanSource};
use crate::source::{CommitInfo, GitSource, SourceError};

pub mod wait;
pub mod watch;

pub use wait::{ObjectHealth, Progress, Quiet, WaitOptions, WaitOutcome, Watched};
pub use watch::{WatchEvent, WatchOptions};

/// How many API requests run at once.
const CONCURRENCY: usize = 16;
/// How far back to look for the commit that last changed a file.
const ATTRIBUTION_DEPTH: usize = 5_000;

/// What to reconcile: a path of a repository at a revision.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub rev: Option<String>,
    pub path: String,
    /// Namespace for namespaced objects that name none (default: the kubeconfig's).
    pub namespace: Option<String>,
    /// Name of the inventory; default: derived from the repository and path.
    pub inventory: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub prune: bool,
    pub dry_run: bool,
    pub force_conflicts: bool,
    pub max_prune: usize,
    pub allow_mass_prune: bool,
    /// Wait for health after applying (`None`: do not wait).
    pub wait: Option<WaitOptions>,
    /// When the rollout fails, re-apply the last healthy commit.
    pub auto_rollback: bool,
    /// In a local repository, also commit a `git revert` of a commit whose rollout failed.
    pub revert_on_failure: bool,
    /// Apply a commit even though its rollout failed before.
    pub retry_failed: bool,
    /// Follow the branch again after `kommit rollback --to` pinned the cluster.
    pub unpin: bool,
    /// Write each outcome as a git note under refs/notes/kommit (local repositories).
    pub record_notes: bool,
    /// Namespaces that may hold objects to prune besides those of the commit's objects (where
    /// the source's objects were before); searched when kommit may not list cluster-wide.
    pub prune_namespaces: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            prune: false,
            dry_run: false,
            force_conflicts: false,
            max_prune: 10,
            allow_mass_prune: false,
            wait: None,
            auto_rollback: false,
            revert_on_failure: false,
            retry_failed: false,
            unpin: false,
            record_notes: false,
            prune_namespaces: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(
        "commit {commit} cannot be applied; nothing was changed in the cluster. {} problem{}:\n{}",
        problems.len(), if problems.len() == 1 { "" } else { "s" },
        problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
    )]
    Invalid {
        commit: String,
        problems: Vec<String>,
    },
    #[error(
        "refusing to prune {count} object{} ({reason}); nothing was changed. If this is \
         intended, re-run with --max-prune {count} or --allow-mass-prune; if not, check --path \
         and --rev",
        if *count == 1 { "" } else { "s" }
    )]
    PruneGuard { count: usize, reason: String },
    #[error(
        "the cluster is pinned to commit {pinned} (\"{subject}\") by `kommit rollback`; run \
         `kommit sync --unpin` to follow the branch again"
    )]
    Pinned { pinned: String, subject: String },
    #[error("{message}")]
    Revert { message: String },
    #[error(
        "sync of commit {commit} stopped at {object}: {source}; {applied} of {total} changes were \
         made before it. Fix the cause and sync again: kommit continues from the live state"
    )]
    ApplyFailed {
        commit: String,
        object: String,
        applied: usize,
        total: usize,
        #[source]
        source: Box<ClusterError>,
    },
}

/// Inventory of a source: the label value every applied object carries.
pub fn inventory_id(source: &GitSource, target: &Target) -> String {
    if let Some(name) = &target.inventory {
        return name.clone();
    }
    let path = crate::source::normalize_repo_path(&target.path).unwrap_or_default();
    let digest = Sha256::digest(format!("{}\n{}", source.identity(), path).as_bytes());
    format!("src-{}", &crate::source::hex(&digest)[..20])
}

/// One object of the commit, resolved against the cluster's API.
#[derive(Debug, Clone)]
struct Desired {
    manifest: Manifest,
    key: ObjectKey,
    /// `None` when its kind comes from a CustomResourceDefinition in the same commit.
    resource: Option<ResourceType>,
    /// The body for server-side apply (namespace and inventory set, no attribution yet).
    body: Value,
}

/// What is needed to carry a change out, beside what is shown.
#[derive(Debug, Clone)]
struct Step {
    action: Action,
    key: ObjectKey,
    resource: Option<ResourceType>,
    body: Option<Value>,
    origin: Option<Origin>,
    live_uid: Option<String>,
}

/// A plan together with what applying it takes.
pub struct Prepared {
    pub plan: Plan,
    pub inventory: String,
    /// How many live objects carry this source's inventory (prunes included).
    pub live_inventory: usize,
    steps: Vec<Step>,
    api_version_of: HashMap<ObjectKey, String>,
}

impl Prepared {
    /// The apiVersion an object was planned with.
    pub fn api_version(&self, key: &ObjectKey) -> String {
        self.plan
            .changes
            .iter()
            .find(|c| &c.key == key)
            .map(|c| c.api_version.clone())
            .or_else(|| self.api_version_of.get(key).cloned())
            .unwrap_or_else(|| "v1".to_string())
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("plan", &self.plan)
            .finish()
    }
}

/// The outcome of a sync.
#[derive(Debug)]
pub struct SyncReport {
    pub plan: Plan,
    /// The changes made, in the order they were made.
    pub applied: Vec<(Action, ObjectKey)>,
    pub dry_run: bool,
    /// The health of what was applied, when the sync waited for it.
    pub rollout: Option<WaitOutcome>,
    /// Set when the rollout failed and the last healthy commit was applied again.
    pub rollback: Option<Rollback>,
    /// Set when the commit was not applied because its rollout failed before.
    pub skipped: Option<String>,
    /// Deployments whose template went back to an earlier revision: (object, the commit that
    /// first rolled that revision out).
    pub returned_to: Vec<(ObjectKey, String)>,
    /// The `git revert` commit made for a failed commit (`--revert-on-failure`).
    pub reverted: Option<CommitInfo>,
}

impl SyncReport {
    /// True when the commit's rollout failed (whether or not it was rolled back).
    pub fn failed(&self) -> bool {
        self.skipped.is_some() || self.rollout.as_ref().is_some_and(|r| !r.is_healthy())
    }
}

/// What an automatic rollback did.
#[derive(Debug)]
pub struct Rollback {
    pub to: CommitInfo,
    pub outcome: Option<WaitOutcome>,
}

/// Plans and applies a commit; then (per policy) waits for health, rolls back a failed rollout
/// to the last healthy commit, and writes the outcome down (record, events, git notes).
pub async fn sync(
    source: &GitSource,
    cluster: &mut Cluster,
    target: &Target,
    policy: &Policy,
    progress: &dyn Progress,
) -> Result<SyncReport, ReconcileError> {
    let loaded = load(source, cluster, target)?;
    if policy.dry_run {
        let (prepared, _) = apply_commit(source, cluster, loaded, policy).await?;
        return Ok(SyncReport {
            plan: prepared.plan,
            applied: Vec::new(),
            dry_run: true,
            rollout: None,
            rollback: None,
            skipped: None,
            returned_to: Vec::new(),
            reverted: None,
        });
    }
    // Plan once to learn the inventory and the record's place; nothing is written yet.
    let store = RecordStore::new(
        cluster,
        &loaded.record_namespace(target, cluster),
        loaded.inventory(),
    );
    let mut record = store.load().await?;
    let commit = loaded.commit().clone();
    if let Some(pin) = &record.pinned
        && pin.commit != commit.sha
        && !policy.unpin
    {
        return Err(ReconcileError::Pinned {
            pinned: pin.commit[..7.min(pin.commit.len())].to_string(),
            subject: pin.subject.clone(),
        });
    }
    if policy.unpin {
        record.pinned = None;
    }
    if record.has_failed(&commit.sha) && !policy.retry_failed {
        let reason = record
            .outcomes_of(&commit.sha)
            .find_map(|e| e.reason.clone())
            .unwrap_or_else(|| "its rollout failed".to_string());
        return Ok(SyncReport {
            plan: Plan {
                source: loaded.source,
                changes: Vec::new(),
            },
            applied: Vec::new(),
            dry_run: false,
            rollout: None,
            rollback: None,
            skipped: Some(format!(
                "commit {} was not applied: its rollout failed before ({reason}); push a new \
                 commit, or re-run with --retry to try it again",
                commit.short_sha()
            )),
            returned_to: Vec::new(),
            reverted: None,
        });
    }
    let (prepared, applied) = apply_commit(source, cluster, loaded, policy).await?;
    // A sync that changed nothing and finds the commit as recorded writes nothing at all.
    let already_recorded = |record: &Record, healthy: bool| {
        record.last_applied.as_deref() == Some(commit.sha.as_str())
            && (!healthy || record.last_healthy.as_deref() == Some(commit.sha.as_str()))
            && !policy.unpin
    };
    let events = Events::new(cluster);
    let mut report = SyncReport {
        plan: prepared.plan.clone(),
        applied,
        dry_run: false,
        rollout: None,
        rollback: None,
        skipped: None,
        returned_to: Vec::new(),
        reverted: None,
    };
    let Some(wait_options) = &policy.wait else {
        for (action, key) in &report.applied {
            if *action != Action::Prune {
                let api_version = prepared.api_version(key);
                events
                    .publish(key, &api_version, false, "Synced", sync_note(&commit))
                    .await;
            }
        }
        if !(report.applied.is_empty() && already_recorded(&record, false)) {
            record.push(audit::entry(&commit, Outcome::Applied, None, None));
            store.save(&record).await?;
            note(source, policy, &commit, "applied", cluster);
        }
        return Ok(report);
    };

    let watched = watched_objects(cluster, &prepared)?;
    let outcome = wait::wait_healthy(cluster, &watched, wait_options, progress).await?;
    match &outcome {
        WaitOutcome::Healthy { .. } => {
            report.returned_to =
                remember_revisions(cluster, &prepared, &mut record, &commit).await?;
            for (action, key) in &report.applied {
                if *action != Action::Prune {
                    let api_version = prepared.api_version(key);
                    events
                        .publish(key, &api_version, false, "Synced", sync_note(&commit))
                        .await;
                }
            }
            for (key, first) in &report.returned_to {
                let api_version = prepared.api_version(key);
                events
                    .publish(
                        key,
                        &api_version,
                        false,
                        "RolledBack",
                        format!(
                            "commit {} returns to the revision first rolled out by {}",
                            commit.short_sha(),
                            &first[..7.min(first.len())]
                        ),
                    )
                    .await;
            }
            let unchanged = report.applied.is_empty() && report.returned_to.is_empty();
            if !(unchanged && already_recorded(&record, true)) {
                record.push(audit::entry(&commit, Outcome::Healthy, None, None));
                store.save(&record).await?;
                note(source, policy, &commit, "healthy", cluster);
            }
            report.rollout = Some(outcome);
            Ok(report)
        }
        WaitOutcome::Failed { object, reason, .. } => {
            let failed_key = report
                .plan
                .changes
                .iter()
                .map(|c| &c.key)
                .find(|k| k.to_string() == *object)
                .cloned();
            let why = format!("{object}: {reason}");
            let message = format!(
                "commit {} (\"{}\"): {reason}",
                commit.short_sha(),
                commit.subject
            );
            warn_on(
                &events,
                &prepared,
                failed_key.as_ref(),
                "RolloutFailed",
                message,
            )
            .await;
            let healthy_before = record.last_healthy.clone().filter(|c| *c != commit.sha);
            report.rollout = Some(outcome.clone());
            match healthy_before {
                Some(previous) if policy.auto_rollback => {
                    let to = source.commit(&previous)?;
                    let rollback_target = Target {
                        rev: Some(previous.clone()),
                        ..target.clone()
                    };
                    let rollback_policy = Policy {
                        auto_rollback: false,
                        ..policy.clone()
                    };
                    let back_loaded = load(source, cluster, &rollback_target)?;
                    let (back, _) =
                        apply_commit(source, cluster, back_loaded, &rollback_policy).await?;
                    let watched = watched_objects(cluster, &back)?;
                    let back_outcome =
                        wait::wait_healthy(cluster, &watched, wait_options, progress).await?;
                    let message = format!(
                        "rolled back to {} (\"{}\") after commit {} failed: {reason}",
                        to.short_sha(),
                        to.subject,
                        commit.short_sha()
                    );
                    warn_on(
                        &events,
                        &prepared,
                        failed_key.as_ref(),
                        "RolledBack",
                        message,
                    )
                    .await;
                    record.push(audit::entry(
                        &commit,
                        Outcome::RolledBack,
                        Some(why.clone()),
                        Some(to.sha.clone()),
                    ));
                    note(
                        source,
                        policy,
                        &commit,
                        &format!("failed and rolled back to {}: {why}", to.short_sha()),
                        cluster,
                    );
                    report.rollback = Some(Rollback {
                        to,
                        outcome: Some(back_outcome),
                    });
                }
                _ => {
                    record.push(audit::entry(
                        &commit,
                        Outcome::Failed,
                        Some(why.clone()),
                        None,
                    ));
                    note(source, policy, &commit, &format!("failed: {why}"), cluster);
                }
            }
            store.save(&record).await?;
            if policy.revert_on_failure && source.is_local() {
                report.reverted = Some(revert_commit(source, &commit, Some(&why))?);
            }
            Ok(report)
        }
    }
}

/// The health of every object of a plan (prunes aside), now, without waiting.
pub async fn health(
    cluster: &Cluster,
    prepared: &Prepared,
) -> Result<Vec<ObjectHealth>, ReconcileError> {
    let mut missing = Vec::new();
    let mut watched = Vec::new();
    for step in prepared.steps.iter().filter(|s| s.action != Action::Prune) {
        let resource = match &step.resource {
            Some(rt) => Some(rt.clone()),
            None => resolve_late(cluster, prepared, step).ok(),
        };
        match resource {
            Some(resource) if step.action != Action::Create => watched.push(Watched {
                key: step.key.clone(),
                resource,
            }),
            _ => missing.push(ObjectHealth {
                kind: step.key.kind.clone(),
                namespace: step.key.namespace.clone(),
                name: step.key.name.clone(),
                health: crate::rollout::Health::Missing,
                message: "not in the cluster".to_string(),
                key: step.key.clone(),
            }),
        }
    }
    let mut all = wait::health_now(cluster, &watched).await?;
    all.extend(missing);
    Ok(all)
}

/// `kommit rollback --to REV`: applies REV and pins the cluster to it, so that a later sync of
/// the branch head says so instead of undoing the rollback.
pub async fn rollback_to(
    source: &GitSource,
    cluster: &mut Cluster,
    target: &Target,
    policy: &Policy,
    progress: &dyn Progress,
) -> Result<SyncReport, ReconcileError> {
    let policy = Policy {
        unpin: true,
        retry_failed: true,
        auto_rollback: false,
        revert_on_failure: false,
        ..policy.clone()
    };
    let report = sync(source, cluster, target, &policy, progress).await?;
    if report.failed() {
        return Ok(report);
    }
    let prepared_namespace = target
        .namespace
        .clone()
        .or_else(|| {
            report
                .plan
                .changes
                .iter()
                .find_map(|c| c.key.namespace.clone())
        })
        .unwrap_or_else(|| cluster.default_namespace().to_string());
    let store = RecordStore::new(cluster, &prepared_namespace, &inventory_id(source, target));
    let mut record = store.load().await?;
    let commit = &report.plan.source.commit;
    record.pinned = Some(audit::Pin {
        commit: commit.sha.clone(),
        subject: commit.subject.clone(),
        time: audit::now_rfc3339(),
    });
    if let Some(entry) = record.history.first_mut()
        && entry.commit == commit.sha
    {
        entry.reason = Some("kommit rollback --to: the cluster is pinned to this commit".into());
    }
    store.save(&record).await?;
    Ok(report)
}

/// The record of a source, if kommit has synced it into this cluster.
pub async fn load_record(
    source: &GitSource,
    cluster: &Cluster,
    target: &Target,
    plan: &Plan,
) -> Result<Record, ReconcileError> {
    let namespace = target
        .namespace
        .clone()
        .or_else(|| {
            plan.changes
                .iter()
                .filter(|c| c.action != Action::Prune)
                .find_map(|c| c.key.namespace.clone())
        })
        .unwrap_or_else(|| cluster.default_namespace().to_string());
    Ok(
        RecordStore::new(cluster, &namespace, &inventory_id(source, target))
            .load()
            .await?,
    )
}

/// One revision of a Deployment, joined with git and the record.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    pub deployment: String,
    /// The Deployment revision, or `None` for a commit that changed the file without making a
    /// new revision (a scale, a label).
    pub revision: Option<i64>,
    pub replica_set: Option<String>,
    pub current: bool,
    pub commit: Option<String>,
    pub author: Option<String>,
    pub time: Option<String>,
    pub subject: Option<String>,
    pub outcome: Option<String>,
}

/// Each revision of the source's Deployments (or one of them), newest first, with its
/// ReplicaSet, commit, author, time and outcome, joined with `git log` of the defining file.
pub async fn history(
    source: &GitSource,
    cluster: &Cluster,
    target: &Target,
    only: Option<&str>,
) -> Result<Vec<Revision>, ReconcileError> {
    let prepared = prepare(source, cluster, target, &Policy::default()).await?;
    let record = load_record(source, cluster, target, &prepared.plan).await?;
    let deployments_rt = cluster.resolve("apps/v1", "Deployment")?;
    let replica_sets_rt = cluster.resolve("apps/v1", "ReplicaSet")?;
    let commit = &prepared.plan.source.commit;
    let mut rows = Vec::new();
    let wanted: Vec<&Change> = prepared
        .plan
        .changes
        .iter()
        .filter(|c| c.key.is_kind("apps", "Deployment"))
        .filter(|c| only.is_none_or(|name| c.key.name == name))
        .collect();
    if let Some(name) = only
        && wanted.is_empty()
    {
        return Err(ReconcileError::Invalid {
            commit: commit.short_sha().to_string(),
            problems: vec![format!(
                "no Deployment named {name} is defined at this commit"
            )],
        });
    }
    for change in wanted {
        let key = &change.key;
        let live = cluster.get(&deployments_rt, key).await?;
        let uid = live
            .as_ref()
            .and_then(|d| d.pointer("/metadata/uid"))
            .and_then(Value::as_str);
        let current_revision = live
            .as_ref()
            .and_then(|d| {
                object::metadata_entry(d, "annotations", "deployment.kubernetes.io/revision")
            })
            .and_then(|r| r.parse::<i64>().ok());
        let replica_sets = cluster
            .list(&replica_sets_rt, key.namespace.as_deref(), None)
            .await?;
        let mut revisions: Vec<Revision> = replica_sets
            .iter()
            .filter(|rs| {
                uid.is_some()
                    && rs
                        .pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| {
                            refs.iter()
                                .any(|r| r.get("uid").and_then(Value::as_str) == uid)
                        })
            })
            .map(|rs| {
                let revision =
                    object::metadata_entry(rs, "annotations", "deployment.kubernetes.io/revision")
                        .and_then(|r| r.parse::<i64>().ok());
                let sha = object::metadata_entry(rs, "annotations", COMMIT_ANNOTATION)
                    .map(str::to_string);
                let info = sha.as_deref().and_then(|s| source.commit(s).ok());
                Revision {
                    deployment: key.to_string(),
                    revision,
                    replica_set: rs
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    current: revision.is_some() && revision == current_revision,
                    outcome: sha
                        .as_deref()
                        .and_then(|s| record.outcomes_of(s).next())
                        .map(|e| e.outcome.as_str().to_string()),
                    author: info.as_ref().map(|c| c.author.clone()),
                    time: info.as_ref().map(|c| c.time_rfc3339()),
                    subject: info.as_ref().map(|c| c.subject.clone()).or_else(|| {
                        object::metadata_entry(rs, "annotations", SUBJECT_ANNOTATION)
                            .map(str::to_string)
                    }),
                    commit: sha,
                }
            })
            .collect();
        // Commits that changed the file without a revision of their own.
        if let Some(origin) = &change.source {
            let known: HashSet<String> =
                revisions.iter().filter_map(|r| r.commit.clone()).collect();
            for logged in source.log_for_path(commit, &origin.file, 50)? {
                if known.contains(&logged.sha) {
                    continue;
                }
                revisions.push(Revision {
                    deployment: key.to_string(),
                    revision: None,
                    replica_set: None,
                    current: false,
                    outcome: record
                        .outcomes_of(&logged.sha)
                        .next()
                        .map(|e| e.outcome.as_str().to_string()),
                    author: Some(logged.author.clone()),
                    time: Some(logged.time_rfc3339()),
                    subject: Some(logged.subject.clone()),
                    commit: Some(logged.sha.clone()),
                });
            }
        }
        revisions.sort_by(|a, b| b.time.cmp(&a.time).then(b.revision.cmp(&a.revision)));
        rows.extend(revisions);
    }
    Ok(rows)
}

/// A warning Event on the object a failure concerns (when it is one of the commit's objects).
async fn warn_on(
    events: &Events,
    prepared: &Prepared,
    key: Option<&ObjectKey>,
    reason: &str,
    note: String,
) {
    if let Some(key) = key {
        events
            .publish(key, &prepared.api_version(key), true, reason, note)
            .await;
    }
}

fn sync_note(commit: &CommitInfo) -> String {
    format!(
        "synced commit {} (\"{}\") by {}",
        commit.short_sha(),
        commit.subject,
        commit.author
    )
}

fn note(
    source: &GitSource,
    policy: &Policy,
    commit: &CommitInfo,
    outcome: &str,
    cluster: &Cluster,
) {
    if !policy.record_notes || !source.is_local() {
        return;
    }
    let text = format!(
        "kommit: {} {} on {}",
        audit::now_rfc3339(),
        outcome,
        cluster.server()
    );
    if let Err(e) = audit::write_note(source, commit, &text) {
        tracing::warn!(error = %e, "could not write the git note");
    }
}

/// What to wait for: every object the sync wrote, and every object of the commit whose health is
/// more than its presence (so a sync run again after an interrupted one waits for the rollout
/// in progress instead of declaring victory because it had nothing to write).
fn watched_objects(cluster: &Cluster, prepared: &Prepared) -> Result<Vec<Watched>, ReconcileError> {
    prepared
        .steps
        .iter()
        .filter(|s| s.action != Action::Prune)
        .filter(|s| s.action.writes() || crate::rollout::has_rollout(&s.key.group, &s.key.kind))
        .map(|s| {
            let resource = match &s.resource {
                Some(rt) => rt.clone(),
                None => resolve_late(cluster, prepared, s)?,
            };
            Ok(Watched {
                key: s.key.clone(),
                resource,
            })
        })
        .collect()
}

/// After a healthy rollout: remember which commit first rolled out each Deployment revision,
/// and report the Deployments that went back to a revision an earlier commit introduced.
async fn remember_revisions(
    cluster: &Cluster,
    prepared: &Prepared,
    record: &mut Record,
    commit: &CommitInfo,
) -> Result<Vec<(ObjectKey, String)>, ReconcileError> {
    let mut returned = Vec::new();
    for step in prepared
        .steps
        .iter()
        .filter(|s| s.action == Action::Update || s.action == Action::Create)
    {
        if !step.key.is_kind("apps", "Deployment") {
            continue;
        }
        let Some(hash) = current_template_hash(cluster, &step.key).await? else {
            continue;
        };
        let id = format!("{}/{}", step.key, hash);
        match record.templates.get(&id) {
            Some(first) if *first != commit.sha => returned.push((step.key.clone(), first.clone())),
            Some(_) => {}
            None => {
                record.templates.insert(id, commit.sha.clone());
            }
        }
    }
    // Keep the map bounded: forget the oldest entries beyond a generous limit.
    while record.templates.len() > 1_000 {
        let first = record.templates.keys().next().cloned().expect("not empty");
        record.templates.remove(&first);
    }
    Ok(returned)
}

/// The pod-template hash of a Deployment's current ReplicaSet.
async fn current_template_hash(
    cluster: &Cluster,
    key: &ObjectKey,
) -> Result<Option<String>, ReconcileError> {
    let deployments = cluster.resolve("apps/v1", "Deployment")?;
    let replica_sets = cluster.resolve("apps/v1", "ReplicaSet")?;
    let Some(deployment) = cluster.get(&deployments, key).await? else {
        return Ok(None);
    };
    let uid = deployment.pointer("/metadata/uid").and_then(Value::as_str);
    let revision = object::metadata_entry(
        &deployment,
        "annotations",
        "deployment.kubernetes.io/revision",
    );
    let listed = cluster
        .list(&replica_sets, key.namespace.as_deref(), None)
        .await?;
    Ok(listed
        .iter()
        .filter(|rs| {
            rs.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| {
                    refs.iter()
                        .any(|r| r.get("uid").and_then(Value::as_str) == uid)
                })
        })
        .find(|rs| {
            object::metadata_entry(rs, "annotations", "deployment.kubernetes.io/revision")
                == revision
        })
        .and_then(|rs| object::metadata_entry(rs, "labels", "pod-template-hash"))
        .map(str::to_string))
}

/// Makes a `git revert` commit of `commit` on the checked-out branch of a local repository.
pub fn revert_commit(
    source: &GitSource,
    commit: &CommitInfo,
    why: Option<&str>,
) -> Result<CommitInfo, ReconcileError> {
    let revert_err = |message: String| ReconcileError::Revert { message };
    if !source.is_local() {
        return Err(revert_err(format!(
            "{} is not a local repository; revert the commit where the repository lives and push it",
            source.display()
        )));
    }
    let sha = {
        let repo = source.repo();
        let git = |e: git2::Error| {
            revert_err(format!(
                "cannot revert {}: {}",
                commit.short_sha(),
                e.message()
            ))
        };
        if repo.is_bare() {
            return Err(revert_err(format!(
                "{} has no work tree to revert in",
                source.display()
            )));
        }
        let mut status_options = git2::StatusOptions::new();
        status_options.include_untracked(false);
        let dirty = repo
            .statuses(Some(&mut status_options))
            .map_err(git)?
            .iter()
            .any(|s| {
                s.status().intersects(
                    git2::Status::INDEX_NEW
                        | git2::Status::INDEX_MODIFIED
                        | git2::Status::INDEX_DELETED
                        | git2::Status::WT_MODIFIED
                        | git2::Status::WT_DELETED,
                )
            });
        if dirty {
            return Err(revert_err(format!(
                "the work tree of {} has uncommitted changes; commit or stash them, then revert",
                source.display()
            )));
        }
        let target = repo
            .find_commit(git2::Oid::from_str(&commit.sha).map_err(git)?)
            .map_err(git)?;
        let head = repo.head().map_err(git)?.peel_to_commit().map_err(git)?;
        let mut index = repo.revert_commit(&target, &head, 0, None).map_err(git)?;
        if index.has_conflicts() {
            return Err(revert_err(format!(
                "reverting {} conflicts with later commits; revert it by hand (git revert {})",
                commit.short_sha(),
                commit.short_sha()
            )));
        }
        let tree_id = index.write_tree_to(&repo).map_err(git)?;
        let tree = repo.find_tree(tree_id).map_err(git)?;
        let signature = repo
            .signature()
            .or_else(|_| git2::Signature::now("kommit", "kommit@localhost"))
            .map_err(git)?;
        let mut message = format!(
            "Revert \"{}\"\n\nThis reverts commit {}.\n",
            commit.subject, commit.sha
        );
        if let Some(why) = why {
            message.push_str(&format!("\nkommit: its rollout failed: {why}\n"));
        }
        let new = repo
            .commit(
                Some("HEAD"),
                &signature,
                &signature,
                &message,
                &tree,
                &[&head],
            )
            .map_err(git)?;
        // Bring the work tree to the new commit, like `git revert` does.
        repo.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))
            .map_err(git)?;
        new.to_string()
    };
    Ok(source.commit(&sha)?)
}

/// Reads the commit and plans it against the cluster. Nothing is written.
pub async fn prepare(
    source: &GitSource,
    cluster: &Cluster,
    target: &Target,
    policy: &Policy,
) -> Result<Prepared, ReconcileError> {
    let loaded = load(source, cluster, target)?;
    plan_loaded(cluster, loaded, policy).await
}

/// A commit's objects, read from git and resolved against the cluster's API (discovery only:
/// nothing fetched from the cluster yet).
pub struct Loaded {
    desired: Vec<Desired>,
    source: PlanSource,
    inventory: String,
}

impl Loaded {
    pub fn commit(&self) -> &CommitInfo {
        &self.source.commit
    }

    pub fn inventory(&self) -> &str {
        &self.inventory
    }

    /// Where the source's record lives: --namespace, else the namespace of its first
    /// namespaced object, else the kubeconfig's.
    pub fn record_namespace(&self, target: &Target, cluster: &Cluster) -> String {
        target
            .namespace
            .clone()
            .or_else(|| self.desired.iter().find_map(|d| d.key.namespace.clone()))
            .unwrap_or_else(|| cluster.default_namespace().to_string())
    }
}

/// Reads the commit and resolves its manifests; reports every problem at once.
pub fn load(
    source: &GitSource,
    cluster: &Cluster,
    target: &Target,
) -> Result<Loaded, ReconcileError> {
    let commit = source.resolve(target.rev.as_deref())?;
    let _span = tracing::info_span!("load", repo = %source.display(), commit = %commit.short_sha(), path = %target.path)
        .entered();
    let files = source.read_manifests(&commit, &target.path)?;
    let manifests = manifest::parse_files(&files).map_err(|errors| ReconcileError::Invalid {
        commit: commit.short_sha().to_string(),
        problems: errors.iter().map(ManifestError::to_string).collect(),
    })?;
    let inventory = inventory_id(source, target);
    let path = crate::source::normalize_repo_path(&target.path).unwrap_or_default();
    let source_note = format!("{}#{}", source.identity(), path);
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| cluster.default_namespace().to_string());
    let desired =
        resolve(cluster, manifests, &namespace, &inventory, &source_note).map_err(|problems| {
            ReconcileError::Invalid {
                commit: commit.short_sha().to_string(),
                problems,
            }
        })?;
    Ok(Loaded {
        desired,
        source: PlanSource {
            repo: source.display().to_string(),
            path,
            rev: target.rev.clone().unwrap_or_else(|| "HEAD".to_string()),
            commit,
        },
        inventory,
    })
}

/// Plans loaded objects against the live cluster. Nothing is written.
pub async fn plan_loaded(
    cluster: &Cluster,
    loaded: Loaded,
    policy: &Policy,
) -> Result<Prepared, ReconcileError> {
    let span = tracing::info_span!("plan", repo = %loaded.source.repo, commit = %loaded.source.commit.short_sha());
    plan_against(
        cluster,
        loaded.desired,
        loaded.source,
        loaded.inventory,
        policy,
    )
    .instrument_in(span)
    .await
}

trait InstrumentIn: Sized {
    fn instrument_in(self, span: tracing::Span) -> tracing::instrument::Instrumented<Self>;
}
impl<F: std::future::Future> InstrumentIn for F {
    fn instrument_in(self, span: tracing::Span) -> tracing::instrument::Instrumented<Self> {
        tracing::Instrument::instrument(self, span)
    }
}

/// Resolves every manifest's kind, namespace and identity; reports all problems at once.
fn resolve(
    cluster: &Cluster,
    manifests: Vec<Manifest>,
    default_namespace: &str,
    inventory: &str,
    source_note: &str,
) -> Result<Vec<Desired>, Vec<String>> {
    // Kinds defined by CRDs of this same commit can only be resolved once those are applied.
    let crd_kinds: HashSet<(String, String)> = manifests
        .iter()
        .filter(|m| m.group() == "apiextensions.k8s.io" && m.kind == "CustomResourceDefinition")
        .filter_map(|m| {
            let group = m.object.pointer("/spec/group")?.as_str()?;
            let kind = m.object.pointer("/spec/names/kind")?.as_str()?;
            Some((group.to_string(), kind.to_string()))
        })
        .collect();
    let crd_scopes: HashMap<(String, String), bool> = manifests
        .iter()
        .filter(|m| m.kind == "CustomResourceDefinition")
        .filter_map(|m| {
            let group = m.object.pointer("/spec/group")?.as_str()?;
            let kind = m.object.pointer("/spec/names/kind")?.as_str()?;
            let namespaced = m.object.pointer("/spec/scope")?.as_str()? == "Namespaced";
            Some(((group.to_string(), kind.to_string()), namespaced))
        })
        .collect();

    let mut problems = Vec::new();
    let mut seen: HashMap<ObjectKey, Origin> = HashMap::new();
    let mut out = Vec::with_capacity(manifests.len());
    for manifest in manifests {
        let group = manifest.group().to_string();
        let (resource, namespaced) = match cluster.resolve(&manifest.api_version, &manifest.kind) {
            Ok(rt) => {
                let namespaced = rt.namespaced;
                (Some(rt), namespaced)
            }
            Err(_) if crd_kinds.contains(&(group.clone(), manifest.kind.clone())) => {
                let namespaced = crd_scopes
                    .get(&(group.clone(), manifest.kind.clone()))
                    .copied()
                    .unwrap_or(true);
                (None, namespaced)
            }
            Err(e) => {
                problems.push(format!("{}: {e}", manifest.origin));
                continue;
            }
        };
        let namespace = namespaced.then(|| {
            manifest
                .namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_string())
        });
        let key = ObjectKey::new(&group, &manifest.kind, namespace.as_deref(), &manifest.name);
        if let Some(first) = seen.get(&key) {
            problems.push(format!(
                "{}: {key} is defined twice, here and at {first}; keep one of them",
                manifest.origin
            ));
            continue;
        }
        seen.insert(key.clone(), manifest.origin.clone());
        // The body is all that is needed of the object from here on; keep one copy, not two.
        let mut manifest = manifest;
        let body = apply_body(
            std::mem::take(&mut manifest.object),
            namespace.as_deref(),
            inventory,
            source_note,
        );
        out.push(Desired {
            manifest,
            key,
            resource,
            body,
        });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// The object as kommit applies it: namespace filled in, inventory label and source annotation.
fn apply_body(object: Value, namespace: Option<&str>, inventory: &str, source_note: &str) -> Value {
    let mut body = object;
    let metadata = body
        .as_object_mut()
        .and_then(|map| map.get_mut("metadata"))
        .and_then(Value::as_object_mut);
    if let Some(metadata) = metadata {
        match namespace {
            Some(ns) => {
                metadata.insert("namespace".into(), Value::String(ns.to_string()));
            }
            None => {
                metadata.remove("namespace");
            }
        }
        entry_map(metadata, "labels").insert(INVENTORY_LABEL.into(), inventory.into());
        entry_map(metadata, "annotations").insert(SOURCE_ANNOTATION.into(), source_note.into());
    }
    body
}

fn entry_map<'a>(map: &'a mut Map<String, Value>, field: &str) -> &'a mut Map<String, Value> {
    let slot = map
        .entry(field.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().expect("just made an object")
}

/// The outcome of looking at one desired object against the cluster.
enum Looked {
    Planned(Box<Change>, Box<Step>),
    Problem(String),
}

async fn plan_against(
    cluster: &Cluster,
    desired: Vec<Desired>,
    source: PlanSource,
    inventory: String,
    policy: &Policy,
) -> Result<Prepared, ReconcileError> {
    let label = |origin: &Origin| format!("git {}@{}", origin, source.commit.short_sha());
    // Namespaces created by this commit: objects inside them cannot be dry-run yet.
    let mut creating_namespaces = HashSet::new();
    let namespace_objects: Vec<&Desired> = desired
        .iter()
        .filter(|d| d.key.is_kind("", "Namespace"))
        .collect();
    for ns in namespace_objects {
        if let Some(rt) = &ns.resource
            && cluster.get(rt, &ns.key).await?.is_none()
        {
            creating_namespaces.insert(ns.key.name.clone());
        }
    }

    // Each prefetched object is handed over (not copied) to the one look that needs it.
    let prefetched =
        std::sync::Mutex::new(prefetch_live(cluster, &desired, &creating_namespaces).await?);
    let looked: Vec<Looked> = stream::iter(desired.iter())
        .map(|d| {
            look(
                cluster,
                d,
                &creating_namespaces,
                policy,
                label(&d.manifest.origin),
                prefetched
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&d.key),
            )
        })
        .buffered(CONCURRENCY)
        .try_collect()
        .await?;

    let mut changes = Vec::with_capacity(looked.len());
    let mut steps = Vec::with_capacity(looked.len());
    let mut problems = Vec::new();
    for item in looked {
        match item {
            Looked::Planned(change, step) => {
                changes.push(*change);
                steps.push(*step);
            }
            Looked::Problem(problem) => problems.push(problem),
        }
    }
    if !problems.is_empty() {
        return Err(ReconcileError::Invalid {
            commit: source.commit.short_sha().to_string(),
            problems,
        });
    }

    let desired_keys: HashSet<&ObjectKey> = desired.iter().map(|d| &d.key).collect();
    // Listing every kind is only worth it when something may be pruned.
    let live = if policy.prune {
        let namespaces: BTreeSet<&str> = desired
            .iter()
            .filter_map(|d| d.key.namespace.as_deref())
            .chain(policy.prune_namespaces.iter().map(String::as_str))
            .collect();
        let applied_kinds: HashSet<(&str, &str)> = desired
            .iter()
            .map(|d| (d.key.group.as_str(), d.key.kind.as_str()))
            .collect();
        list_inventory(cluster, &inventory, &namespaces, &applied_kinds).await?
    } else {
        Vec::new()
    };
    let live_inventory = live.len();
    let mut api_version_of = HashMap::new();
    if policy.prune {
        for (rt, object) in live {
            let Some(key) = ObjectKey::of_value(&object) else {
                continue;
            };
            if desired_keys.contains(&key) {
                continue;
            }
            let mut reason = None;
            if key.is_kind("", "Namespace") {
                let foreign = foreign_objects(cluster, &key.name, &inventory).await?;
                if !foreign.is_empty() {
                    changes.push(Change {
                        action: Action::Unchanged,
                        live_commit: None,
                        api_version: rt.resource.api_version.clone(),
                        kind: key.kind.clone(),
                        namespace: None,
                        name: key.name.clone(),
                        source: None,
                        diff: String::new(),
                        reason: Some(format!(
                            "not pruned: the namespace still holds objects kommit does not own ({})",
                            foreign.join(", ")
                        )),
                        key: key.clone(),
                    });
                    continue;
                }
                reason = Some("no longer in git; the namespace holds nothing else".to_string());
            }
            api_version_of.insert(key.clone(), rt.resource.api_version.clone());
            changes.push(Change {
                action: Action::Prune,
                live_commit: object::metadata_entry(&object, "annotations", COMMIT_ANNOTATION)
                    .map(str::to_string),
                api_version: rt.resource.api_version.clone(),
                kind: key.kind.clone(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                source: None,
                diff: plan::prune_diff(&key, &object),
                reason: reason.or_else(|| Some("no longer in git".to_string())),
                key: key.clone(),
            });
            steps.push(Step {
                action: Action::Prune,
                key,
                resource: Some(rt),
                body: None,
                origin: None,
                live_uid: object
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
    }
    Ok(Prepared {
        plan: Plan { source, changes },
        inventory,
        live_inventory,
        steps,
        api_version_of,
    })
}

/// Fetches live objects by one LIST per kind and namespace where many objects share them
/// (cheaper than a GET each); the rest are fetched one by one in `look`.
async fn prefetch_live(
    cluster: &Cluster,
    desired: &[Desired],
    creating_namespaces: &HashSet<String>,
) -> Result<HashMap<ObjectKey, Option<Value>>, ReconcileError> {
    const LIST_THRESHOLD: usize = 8;
    let mut groups: BTreeMap<(String, String, Option<String>), Vec<&Desired>> = BTreeMap::new();
    for d in desired {
        let Some(rt) = &d.resource else { continue };
        if d.key
            .namespace
            .as_ref()
            .is_some_and(|ns| creating_namespaces.contains(ns))
        {
            continue;
        }
        groups
            .entry((
                rt.resource.api_version.clone(),
                rt.resource.plural.clone(),
                d.key.namespace.clone(),
            ))
            .or_default()
            .push(d);
    }
    let lists: Vec<Vec<(ObjectKey, Option<Value>)>> = stream::iter(
        groups
            .into_values()
            .filter(|members| members.len() >= LIST_THRESHOLD),
    )
    .map(|members| async move {
        let rt = members[0].resource.as_ref().expect("grouped by resource");
        let items = match cluster
            .list(rt, members[0].key.namespace.as_deref(), None)
            .await
        {
            Ok(items) => items,
            // Allowed to get but not to list: each object is looked at by itself instead.
            Err(ClusterError::Forbidden { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut by_name: HashMap<String, Value> = items
            .into_iter()
            .filter_map(|item| {
                let name = item.pointer("/metadata/name")?.as_str()?.to_string();
                Some((name, item))
            })
            .collect();
        Ok::<_, ReconcileError>(
            members
                .iter()
                .map(|d| (d.key.clone(), by_name.remove(&d.key.name)))
                .collect(),
        )
    })
    .buffer_unordered(CONCURRENCY)
    .try_collect()
    .await?;
    Ok(lists.into_iter().flatten().collect())
}

async fn look(
    cluster: &Cluster,
    desired: &Desired,
    creating_namespaces: &HashSet<String>,
    policy: &Policy,
    to_label: String,
    prefetched: Option<Option<Value>>,
) -> Result<Looked, ReconcileError> {
    let key = &desired.key;
    let origin = &desired.manifest.origin;
    let change = |action: Action, diff: String, reason: Option<String>| {
        Box::new(Change {
            action,
            live_commit: None,
            api_version: desired.manifest.api_version.clone(),
            kind: key.kind.clone(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            source: Some(origin.clone()),
            diff,
            reason,
            key: key.clone(),
        })
    };
    let step = |action: Action, live_uid: Option<String>| {
        Box::new(Step {
            action,
            key: key.clone(),
            resource: desired.resource.clone(),
            // Only what is written needs its body; unchanged objects keep none.
            body: action.writes().then(|| desired.body.clone()),
            origin: Some(origin.clone()),
            live_uid,
        })
    };
    let Some(rt) = &desired.resource else {
        // Its CustomResourceDefinition is applied first; the server validates it then.
        let diff = plan::creation_diff(key, &desired.body, &to_label);
        return Ok(Looked::Planned(
            change(
                Action::Create,
                diff,
                Some(
                    "its CustomResourceDefinition is in this commit; validated when applied".into(),
                ),
            ),
            step(Action::Create, None),
        ));
    };
    let in_new_namespace = key
        .namespace
        .as_ref()
        .is_some_and(|ns| creating_namespaces.contains(ns));
    let live = match prefetched {
        _ if in_new_namespace => None,
        Some(live) => live,
        None => cluster.get(rt, key).await?,
    };
    let live_uid = live
        .as_ref()
        .and_then(|l| l.pointer("/metadata/uid"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let live_commit = live
        .as_ref()
        .and_then(|l| object::metadata_entry(l, "annotations", COMMIT_ANNOTATION))
        .map(str::to_string);
    let problem = |e: ClusterError| Ok(Looked::Problem(format!("{origin}: {e}")));
    let looked = match live {
        None if in_new_namespace => Ok(Looked::Planned(
            change(
                Action::Create,
                plan::creation_diff(key, &desired.body, &to_label),
                None,
            ),
            step(Action::Create, None),
        )),
        None => match cluster
            .apply(rt, key, &desired.body, true, policy.force_conflicts)
            .await
        {
            Ok(_) => Ok(Looked::Planned(
                change(
                    Action::Create,
                    plan::creation_diff(key, &desired.body, &to_label),
                    None,
                ),
                step(Action::Create, None),
            )),
            Err(ClusterError::Api {
                code: 404, message, ..
            }) if key.namespace.is_some() => Ok(Looked::Problem(format!(
                "{origin}: {key}: {message}; add a Namespace manifest to the synced path or \
                     create the namespace first"
            ))),
            Err(e @ ClusterError::Unreachable { .. }) => Err(e.into()),
            Err(e) => problem(e),
        },
        // Most objects of a commit did not change; prove it locally and spare the dry run.
        Some(live) if plan::provably_unchanged(&live, &desired.body) => Ok(Looked::Planned(
            change(Action::Unchanged, String::new(), None),
            step(Action::Unchanged, live_uid),
        )),
        Some(live) => match cluster
            .apply(rt, key, &desired.body, true, policy.force_conflicts)
            .await
        {
            Ok(dry_run) => {
                let (action, diff) = plan::compare(key, &live, &dry_run, &to_label);
                Ok(Looked::Planned(
                    change(action, diff, None),
                    step(action, live_uid),
                ))
            }
            Err(ClusterError::Rejected {
                immutable: true,
                message,
                ..
            }) if key.is_kind("", "Pod") => Ok(Looked::Planned(
                change(
                    Action::Replace,
                    plan::replacement_diff(key, &live, &desired.body, &to_label),
                    Some(format!(
                        "a Pod cannot be changed in place ({}); it is deleted and created again",
                        short_reason(&message)
                    )),
                ),
                step(Action::Replace, live_uid),
            )),
            Err(ClusterError::Rejected {
                immutable: true,
                message,
                ..
            }) => Ok(Looked::Problem(format!(
                "{origin}: {key}: {message}. kommit replaces only Pods by itself; delete the \
                 object (kubectl delete) and sync again to create it anew"
            ))),
            Err(e @ ClusterError::Unreachable { .. }) => Err(e.into()),
            Err(e) => problem(e),
        },
    };
    looked.map(|looked| match looked {
        Looked::Planned(mut change, step) => {
            change.live_commit = live_commit;
            Looked::Planned(change, step)
        }
        problem => problem,
    })
}

fn short_reason(message: &str) -> String {
    let first = message.split('\n').next().unwrap_or(message);
    let trimmed: String = first.chars().take(160).collect();
    if trimmed.len() < first.len() {
        format!("{trimmed}…")
    } else {
        trimmed
    }
}

/// Every live object carrying this inventory, across all kinds that can be listed. A namespaced
/// kind that may not be listed cluster-wide (kommit bound by Roles rather than a ClusterRole) is
/// listed in each of `namespaces`, those the source's objects live in.
async fn list_inventory(
    cluster: &Cluster,
    inventory: &str,
    namespaces: &BTreeSet<&str>,
    applied_kinds: &HashSet<(&str, &str)>,
) -> Result<Vec<(ResourceType, Value)>, ReconcileError> {
    let selector = format!("{INVENTORY_LABEL}={inventory}");
    let types = cluster.prunable_types();
    let found: Vec<Vec<(ResourceType, Value)>> = stream::iter(types)
        .map(|rt| {
            let selector = selector.clone();
            async move {
                let cannot_list = |e: &ClusterError| {
                    matches!(
                        e,
                        ClusterError::Forbidden { .. }
                            | ClusterError::Api {
                                code: 404 | 405,
                                ..
                            }
                    )
                };
                // Kommit applies this kind but may not list it: what leaves git stays behind.
                let blind = |e: &ClusterError, namespace: Option<&str>| {
                    if matches!(e, ClusterError::Forbidden { .. })
                        && applied_kinds.contains(&(rt.group(), rt.kind()))
                    {
                        tracing::warn!(
                            kind = %rt.kind(),
                            namespace = namespace.unwrap_or("(all)"),
                            "kommit may not list {} there, so those that left git are not pruned: grant it list",
                            rt.resource.plural
                        );
                    }
                };
                let items = match cluster.list(&rt, None, Some(&selector)).await {
                    Ok(items) => items,
                    Err(ClusterError::Forbidden { .. }) if rt.namespaced => {
                        let mut items = Vec::new();
                        for ns in namespaces {
                            match cluster.list(&rt, Some(ns), Some(&selector)).await {
                                Ok(found) => items.extend(found),
                                Err(e) if cannot_list(&e) => blind(&e, Some(ns)),
                                Err(e) => return Err(ReconcileError::from(e)),
                            }
                        }
                        items
                    }
                    // Kinds we may not list at all (RBAC) or that vanished cannot hold objects
                    // we could prune anyway.
                    Err(e) if cannot_list(&e) => {
                        blind(&e, None);
                        tracing::debug!(kind = %rt.kind(), "skipping a kind that cannot be listed");
                        Vec::new()
                    }
                    Err(e) => return Err(ReconcileError::from(e)),
                };
                Ok(items.into_iter().map(|v| (rt.clone(), v)).collect())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let mut all: Vec<(ResourceType, Value)> = found.into_iter().flatten().collect();
    // Controllers copy labels onto what they make (Endpoints and EndpointSlices take their
    // Service's); only objects that also carry kommit's annotation and no controller are ours.
    all.retain(|(_, v)| is_ours(v));
    // The same object may be served by two groups (e.g. events); keep one entry per identity.
    let mut seen = HashSet::new();
    all.retain(|(_, v)| ObjectKey::of_value(v).is_some_and(|k| seen.insert(k)));
    all.sort_by_key(|(_, v)| ObjectKey::of_value(v));
    Ok(all)
}

/// Objects in a namespace that kommit does not own (ignoring what Kubernetes creates by itself).
async fn foreign_objects(
    cluster: &Cluster,
    namespace: &str,
    inventory: &str,
) -> Result<Vec<String>, ReconcileError> {
    let types: Vec<ResourceType> = cluster
        .prunable_types()
        .into_iter()
        .filter(|rt| rt.namespaced)
        .collect();
    let found: Vec<Vec<String>> = stream::iter(types)
        .map(|rt| async move {
            let items = match cluster.list(&rt, Some(namespace), None).await {
                Ok(items) => items,
                Err(_) => return Ok::<_, ReconcileError>(Vec::new()),
            };
            Ok(items
                .iter()
                .filter(|item| !is_automatic(item, inventory))
                .filter_map(ObjectKey::of_value)
                .map(|k| k.to_string())
                .collect())
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let mut all: Vec<String> = found.into_iter().flatten().collect();
    all.sort();
    all.truncate(5);
    Ok(all)
}

/// Applied by kommit itself rather than derived from something it applied.
fn is_ours(item: &Value) -> bool {
    let annotated = object::metadata_entry(item, "annotations", SOURCE_ANNOTATION).is_some();
    let controlled = item
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r.get("controller") == Some(&Value::Bool(true)))
        });
    annotated && !controlled
}

/// Ours, or made by Kubernetes itself (owned by another object, or the per-namespace defaults).
fn is_automatic(item: &Value, inventory: &str) -> bool {
    if object::metadata_entry(item, "labels", INVENTORY_LABEL) == Some(inventory) {
        return true;
    }
    if item
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| !refs.is_empty())
    {
        return true;
    }
    if object::metadata_entry(item, "labels", audit::RECORD_LABEL).is_some() {
        return true;
    }
    let Some(key) = ObjectKey::of_value(item) else {
        return true;
    };
    matches!(
        (key.group.as_str(), key.kind.as_str(), key.name.as_str()),
        ("", "ServiceAccount", "default")
            | ("", "ConfigMap", "kube-root-ca.crt")
            | ("", "Endpoints", _)
            | ("discovery.k8s.io", "EndpointSlice", _)
            | ("", "Event", _)
            | ("events.k8s.io", "Event", _)
    )
}

/// Checks the prune guard: a sync that would delete a whole app, or many objects, needs consent.
pub fn check_prune_guard(prepared: &Prepared, policy: &Policy) -> Result<(), ReconcileError> {
    let count = prepared.plan.summary().prune;
    if count == 0 || policy.allow_mass_prune {
        return Ok(());
    }
    if count >= prepared.live_inventory {
        return Err(ReconcileError::PruneGuard {
            count,
            reason: "that is every object this source has in the cluster".to_string(),
        });
    }
    if count > policy.max_prune {
        return Err(ReconcileError::PruneGuard {
            count,
            reason: format!("more than --max-prune {}", policy.max_prune),
        });
    }
    Ok(())
}

/// Plans, then (unless a dry run) applies the commit: namespaces and CRDs first, workloads last,
/// and prunes in the reverse order. Nothing is written when planning finds any problem.
async fn apply_commit(
    source: &GitSource,
    cluster: &mut Cluster,
    loaded: Loaded,
    policy: &Policy,
) -> Result<(Prepared, Vec<(Action, ObjectKey)>), ReconcileError> {
    let prepared = plan_loaded(cluster, loaded, policy).await?;
    check_prune_guard(&prepared, policy)?;
    if policy.dry_run {
        return Ok((prepared, Vec::new()));
    }
    let commit = prepared.plan.source.commit.clone();
    let files: Vec<String> = prepared
        .steps
        .iter()
        .filter(|s| s.action.writes() && s.action != Action::Prune)
        .filter_map(|s| s.origin.as_ref().map(|o| o.file.clone()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let attribution = if files.is_empty() {
        HashMap::new()
    } else {
        source.last_changes(&commit, &files, ATTRIBUTION_DEPTH)?
    };
    let span = tracing::info_span!("apply", repo = %source.display(), commit = %commit.short_sha());
    let applied = tracing::Instrument::instrument(
        apply_steps(cluster, &prepared, &attribution, policy),
        span,
    )
    .await?;
    Ok((prepared, applied))
}

async fn apply_steps(
    cluster: &mut Cluster,
    prepared: &Prepared,
    attribution: &HashMap<String, CommitInfo>,
    policy: &Policy,
) -> Result<Vec<(Action, ObjectKey)>, ReconcileError> {
    let commit = &prepared.plan.source.commit;
    let writes: Vec<&Step> = prepared
        .steps
        .iter()
        .filter(|s| s.action.writes())
        .collect();
    let total = writes.len();
    let mut applied: Vec<(Action, ObjectKey)> = Vec::with_capacity(total);

    let mut tiers: BTreeMap<u8, Vec<&Step>> = BTreeMap::new();
    for step in writes.iter().filter(|s| s.action != Action::Prune) {
        tiers
            .entry(object::apply_tier(&step.key.group, &step.key.kind))
            .or_default()
            .push(step);
    }
    let mut applied_crds = false;
    for (tier, steps) in tiers {
        if applied_crds {
            wait_for_new_kinds(cluster, &steps).await?;
            applied_crds = false;
        }
        let results: Vec<Result<(Action, ObjectKey), (ObjectKey, ClusterError)>> =
            stream::iter(steps.iter().copied())
                .map(|step| {
                    let cluster = &*cluster;
                    async move {
                        let rt = match &step.resource {
                            Some(rt) => rt.clone(),
                            None => resolve_late(cluster, prepared, step)
                                .map_err(|e| (step.key.clone(), e))?,
                        };
                        let body = attributed_body(step, commit, attribution);
                        write(cluster, &rt, step, &body, policy)
                            .await
                            .map(|()| (step.action, step.key.clone()))
                            .map_err(|e| (step.key.clone(), e))
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        let mut failure = None;
        for result in results {
            match result {
                Ok(done) => {
                    tracing::info!(object = %done.1, action = done.0.verb(), "applied");
                    applied.push(done);
                }
                Err(e) if failure.is_none() => failure = Some(e),
                Err((key, e)) => tracing::error!(object = %key, error = %e, "apply failed"),
            }
        }
        if let Some((key, source)) = failure {
            return Err(ReconcileError::ApplyFailed {
                commit: commit.short_sha().to_string(),
                object: key.to_string(),
                applied: applied.len(),
                total,
                source: Box::new(source),
            });
        }
        if tier == 1 {
            applied_crds = true;
        }
    }

    let mut prunes: Vec<&Step> = writes
        .iter()
        .copied()
        .filter(|s| s.action == Action::Prune)
        .collect();
    prunes.sort_by_key(|s| std::cmp::Reverse(object::apply_tier(&s.key.group, &s.key.kind)));
    for step in prunes {
        let rt = step
            .resource
            .as_ref()
            .expect("prunes come from live objects");
        match cluster.delete(rt, &step.key).await {
            Ok(_) => {
                tracing::info!(object = %step.key, "pruned");
                applied.push((Action::Prune, step.key.clone()));
            }
            Err(source) => {
                return Err(ReconcileError::ApplyFailed {
                    commit: commit.short_sha().to_string(),
                    object: step.key.to_string(),
                    applied: applied.len(),
                    total,
                    source: Box::new(source),
                });
            }
        }
    }
    Ok(applied)
}

/// Adds the commit that last changed the object's file, so the cluster says which commit put it
/// there; Deployments also get `kubernetes.io/change-cause` for `kubectl rollout history`.
fn attributed_body(
    step: &Step,
    commit: &CommitInfo,
    attribution: &HashMap<String, CommitInfo>,
) -> Value {
    let mut body = step.body.clone().unwrap_or(Value::Null);
    let origin = step.origin.as_ref();
    let by = origin
        .and_then(|o| attribution.get(&o.file))
        .unwrap_or(commit);
    if let Some(metadata) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = entry_map(metadata, "annotations");
        annotations.insert(COMMIT_ANNOTATION.into(), by.sha.clone().into());
        annotations.insert(
            AUTHOR_ANNOTATION.into(),
            format!("{} <{}>", by.author, by.email).into(),
        );
        annotations.insert(DATE_ANNOTATION.into(), by.time_rfc3339().into());
        annotations.insert(SUBJECT_ANNOTATION.into(), by.subject.clone().into());
        if let Some(origin) = origin {
            annotations.insert(FILE_ANNOTATION.into(), origin.to_string().into());
        }
        if step.key.is_kind("apps", "Deployment") {
            annotations.insert(
                CHANGE_CAUSE_ANNOTATION.into(),
                format!("{} {}", by.short_sha(), by.subject).into(),
            );
        }
    }
    body
}

async fn write(
    cluster: &Cluster,
    rt: &ResourceType,
    step: &Step,
    body: &Value,
    policy: &Policy,
) -> Result<(), ClusterError> {
    if step.action == Action::Replace {
        cluster.delete(rt, &step.key).await?;
        cluster
            .wait_gone(
                rt,
                &step.key,
                step.live_uid.as_deref(),
                Duration::from_secs(120),
            )
            .await?;
    }
    cluster
        .apply(rt, &step.key, body, false, policy.force_conflicts)
        .map_ok(|_| ())
        .await
}

use futures::TryFutureExt;

fn resolve_late(
    cluster: &Cluster,
    prepared: &Prepared,
    step: &Step,
) -> Result<ResourceType, ClusterError> {
    let api_version = step
        .body
        .as_ref()
        .and_then(|b| b.get("apiVersion"))
        .and_then(Value::as_str)
        .or_else(|| prepared.api_version_of.get(&step.key).map(String::as_str))
        .unwrap_or_default();
    cluster.resolve(api_version, &step.key.kind)
}

/// After CRDs were applied: wait until the API serves the kinds the next steps need.
async fn wait_for_new_kinds(cluster: &mut Cluster, steps: &[&Step]) -> Result<(), ReconcileError> {
    if steps.iter().all(|s| s.resource.is_some()) {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        cluster.refresh_discovery().await?;
        let missing: Vec<&Step> = steps
            .iter()
            .copied()
            .filter(|s| s.resource.is_none())
            .filter(|s| {
                let api_version = s
                    .body
                    .as_ref()
                    .and_then(|b| b.get("apiVersion"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                cluster.resolve(api_version, &s.key.kind).is_err()
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::Timeout {
                object: missing[0].key.to_string(),
                what: "its CustomResourceDefinition is established",
                seconds: 60,
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apply_body_sets_namespace_and_inventory_but_no_attribution() {
        let object = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"app": "web"}}, "data": {"a": "1"}});
        let body = apply_body(object, Some("shop"), "src-abc", "/repo#deploy");
        assert_eq!(body["metadata"]["namespace"], "shop");
        assert_eq!(body["metadata"]["labels"]["app"], "web");
        assert_eq!(body["metadata"]["labels"][INVENTORY_LABEL], "src-abc");
        assert_eq!(
            body["metadata"]["annotations"][SOURCE_ANNOTATION],
            "/repo#deploy"
        );
        assert!(
            body["metadata"]["annotations"]
                .get(COMMIT_ANNOTATION)
                .is_none()
        );
        let cluster_scoped = apply_body(
            json!({"metadata": {"name": "n", "namespace": "x"}}),
            None,
            "i",
            "s",
        );
        assert!(cluster_scoped["metadata"].get("namespace").is_none());
    }

    #[test]
    fn deployments_get_a_change_cause_from_the_commit_that_changed_their_file() {
        let step = Step {
            action: Action::Update,
            key: ObjectKey::new("apps", "Deployment", Some("shop"), "web"),
            resource: None,
            body: Some(json!({"metadata": {"name": "web"}})),
            origin: Some(Origin {
                file: "deploy/web.yaml".into(),
                document: 0,
                line: 1,
            }),
            live_uid: None,
        };
        let head = CommitInfo {
            sha: "b".repeat(40),
            author: "Bo".into(),
            email: "bo@x".into(),
            time: 0,
            subject: "Docs".into(),
        };
        let changed_it = CommitInfo {
            sha: "a".repeat(40),
            author: "Ada".into(),
            email: "ada@x".into(),
            time: 0,
            subject: "Bump web".into(),
        };
        let attribution = HashMap::from([("deploy/web.yaml".to_string(), changed_it)]);
        let body = attributed_body(&step, &head, &attribution);
        let annotations = &body["metadata"]["annotations"];
        assert_eq!(annotations[COMMIT_ANNOTATION], "a".repeat(40));
        assert_eq!(annotations[CHANGE_CAUSE_ANNOTATION], "aaaaaaa Bump web");
        assert_eq!(annotations[AUTHOR_ANNOTATION], "Ada <ada@x>");
        assert_eq!(annotations[FILE_ANNOTATION], "deploy/web.yaml:1");
    }

    #[test]
    fn copies_of_our_label_are_not_our_objects() {
        let ours = json!({"metadata": {"labels": {INVENTORY_LABEL: "i"}, "annotations": {SOURCE_ANNOTATION: "r#p"}}});
        let endpoints = json!({"metadata": {"labels": {INVENTORY_LABEL: "i"}}});
        let slice = json!({"metadata": {"labels": {INVENTORY_LABEL: "i"}, "annotations": {SOURCE_ANNOTATION: "r#p"},
            "ownerReferences": [{"kind": "Service", "controller": true}]}});
        assert!(is_ours(&ours));
        assert!(!is_ours(&endpoints));
        assert!(!is_ours(&slice));
    }

    #[test]
    fn kubernetes_own_objects_do_not_keep_a_namespace_alive() {
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "a"}});
        let pod_of_rs = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "a",
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web"}]}});
        let ours = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "a",
            "labels": {INVENTORY_LABEL: "inv"}}});
        let theirs = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "db", "namespace": "a"}});
        assert!(is_automatic(&sa, "inv"));
        assert!(is_automatic(&pod_of_rs, "inv"));
        assert!(is_automatic(&ours, "inv"));
        assert!(!is_automatic(&theirs, "inv"));
    }
}
