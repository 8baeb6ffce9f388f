//! The GitSync controller: for each GitSync, the same pipeline as `kommit sync`, run again every
//! interval, with the outcome written to the GitSync's status. One reconcile per GitSync at a
//! time (kube-runtime guarantees it), many GitSyncs in parallel.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::http::REQUESTED_AT_ANNOTATION;
use super::metrics::{GitSyncLabels, Metrics};
use super::{Condition, GitSync, GitSyncStatus, InventoryEntry};
use crate::audit::{self, HistoryEntry, Outcome};
use crate::cli::parse_duration;
use crate::cluster::Cluster;
use crate::object::FIELD_MANAGER;
use crate::plan::Action as PlanAction;
use crate::reconcile::{self, Policy, ReconcileError, Target, WaitOptions, WaitOutcome};
use crate::source::GitSource;

/// How many outcomes a GitSync's status keeps.
const STATUS_HISTORY: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("{0}")]
    Reconcile(#[from] ReconcileError),
    #[error("cannot open {repo}: {message}")]
    Source { repo: String, message: String },
    #[error("{message}")]
    Credentials { message: String },
    #[error("cannot write the status of GitSync {name}: {message}")]
    Status { name: String, message: String },
}

impl OperatorError {
    /// The failure reason for the metrics, as in the status conditions.
    fn reason(&self) -> &'static str {
        match self {
            OperatorError::Reconcile(_) => "SyncFailed",
            OperatorError::Source { .. } => "SourceUnavailable",
            OperatorError::Credentials { .. } => "CredentialsUnavailable",
            OperatorError::Status { .. } => "StatusWriteFailed",
        }
    }
}

pub struct Context {
    pub cluster: Cluster,
    pub cache_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    /// Per GitSync: what its last successful reconcile saw (`spec_or_request`) and when.
    pub last_runs: std::sync::Mutex<std::collections::HashMap<(String, String), (u64, Instant)>>,
}

impl Context {
    pub fn new(cluster: Cluster, cache_dir: PathBuf, metrics: Arc<Metrics>) -> Self {
        Context {
            cluster,
            cache_dir,
            metrics,
            last_runs: Default::default(),
        }
    }
}

/// Runs the controller until `shutdown` resolves (then lets the reconciles in flight finish);
/// `namespace` limits it to one namespace.
pub async fn run(
    context: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = context.cluster.client().clone();
    let api: Api<GitSync> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    // A deleted GitSync's commit age would otherwise be reported, and grow, until a restart.
    let metrics = context.metrics.clone();
    let all = api.clone();
    let forget_deleted = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let Ok(list) = all.list(&ListParams::default()).await else {
                continue;
            };
            let existing: std::collections::HashSet<(String, String)> = list
                .iter()
                .map(|g| (g.namespace().unwrap_or_default(), g.name_any()))
                .collect();
            metrics.retain_synced(|labels| {
                existing.contains(&(labels.namespace.clone(), labels.name.clone()))
            });
        }
    });
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile_one, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(gitsync = %object, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
    forget_deleted.abort();
}

/// What makes a GitSync worth a reconcile before its interval: a new spec or a new request.
fn spec_or_request(gitsync: &GitSync) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    gitsync.metadata.generation.hash(&mut hasher);
    gitsync
        .annotations()
        .get(REQUESTED_AT_ANNOTATION)
        .hash(&mut hasher);
    hasher.finish()
}

fn interval_of(gitsync: &GitSync) -> Duration {
    parse_duration(&gitsync.spec.interval).unwrap_or(Duration::from_secs(60))
}

fn error_policy(gitsync: Arc<GitSync>, error: &OperatorError, _: Arc<Context>) -> Action {
    tracing::warn!(gitsync = %gitsync.name_any(), error = %error, "will retry");
    let failures_backoff = reconcile::watch::backoff(interval_of(&gitsync), 1);
    Action::requeue(failures_backoff)
}

/// The inventory label value of a GitSync: readable when short, hashed when not.
fn inventory_of(gitsync: &GitSync) -> String {
    let name = format!(
        "gs-{}-{}",
        gitsync.namespace().unwrap_or_default(),
        gitsync.name_any()
    );
    if name.len() <= 63 {
        return name;
    }
    let digest = Sha256::digest(name.as_bytes());
    format!("gs-{}", &crate::source::hex(&digest)[..40])
}

async fn reconcile_one(
    gitsync: Arc<GitSync>,
    context: Arc<Context>,
) -> Result<Action, OperatorError> {
    let labels = GitSyncLabels {
        namespace: gitsync.namespace().unwrap_or_default(),
        name: gitsync.name_any(),
    };
    // Every status write of ours is a watch event too; those are not reasons to sync again.
    let key = (labels.namespace.clone(), labels.name.clone());
    let seen = spec_or_request(&gitsync);
    let interval = interval_of(&gitsync);
    let last = context
        .last_runs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .copied();
    if let Some((last_seen, at)) = last
        && last_seen == seen
        && at.elapsed() < interval
    {
        return Ok(Action::requeue(interval - at.elapsed()));
    }
    let started = Instant::now();
    let span = tracing::info_span!("gitsync", namespace = %labels.namespace, name = %labels.name, repo = %gitsync.spec.repo);
    let result =
        tracing::Instrument::instrument(sync_gitsync(&gitsync, &context, interval), span).await;
    let failure = match &result {
        Ok(outcome) => outcome.failure,
        Err(e) => Some(e.reason()),
    };
    if !matches!(result, Ok(Reconciled { skipped: true, .. })) {
        context
            .metrics
            .reconciled(&labels, started.elapsed(), failure);
    }
    if let Ok(outcome) = &result {
        if outcome.rolled_back {
            context.metrics.rolled_back(&labels);
        }
        if let Some(commit_time) = outcome.commit_time {
            context.metrics.synced_commit(&labels, commit_time);
        }
    }
    let mut last_runs = context.last_runs.lock().unwrap_or_else(|e| e.into_inner());
    match &result {
        Ok(_) => last_runs.insert(key, (seen, started)),
        // A failure is retried on the error policy's schedule, not held back.
        Err(_) => last_runs.remove(&key),
    };
    drop(last_runs);
    result.map(|outcome| outcome.action)
}

/// What one reconcile did, for the metrics.
struct Reconciled {
    action: Action,
    /// The reason of a failed sync or rollout (a status condition reason).
    failure: Option<&'static str>,
    rolled_back: bool,
    /// When the commit the cluster is now on was made.
    commit_time: Option<i64>,
    /// Suspended: nothing was attempted.
    skipped: bool,
}

impl Reconciled {
    fn after(interval: Duration) -> Self {
        Reconciled {
            action: Action::requeue(interval),
            failure: None,
            rolled_back: false,
            commit_time: None,
            skipped: false,
        }
    }
}

async fn sync_gitsync(
    gitsync: &GitSync,
    context: &Context,
    interval: Duration,
) -> Result<Reconciled, OperatorError> {
    let name = gitsync.name_any();
    let namespace = gitsync.namespace().unwrap_or_else(|| "default".to_string());
    let spec = &gitsync.spec;
    let api: Api<GitSync> = Api::namespaced(context.cluster.client().clone(), &namespace);
    let mut status = gitsync.status.clone().unwrap_or_default();
    let generation = gitsync.meta().generation;
    // A request (webhook or `kubectl annotate`) is handled by this very reconcile.
    if let Some(requested) = gitsync.annotations().get(REQUESTED_AT_ANNOTATION) {
        status.last_handled_reconcile_at = Some(requested.clone());
    }

    if spec.suspend {
        set_condition(
            &mut status,
            "Ready",
            "False",
            "Suspended",
            "spec.suspend is true; no changes are made",
            generation,
        );
        write_status(&api, &name, &status).await?;
        return Ok(Reconciled {
            skipped: true,
            ..Reconciled::after(interval)
        });
    }

    // The Secret of spec.secretRef, read on every reconcile so that a rotated token is used.
    let creds = match super::credentials::credentials_for(
        context.cluster.client(),
        &namespace,
        &name,
        spec.secret_ref.as_ref(),
    )
    .await
    {
        Ok(creds) => creds,
        Err(e) => {
            let (reason, message) = ("CredentialsUnavailable", e.to_string());
            for (kind, value) in [("Ready", "False"), ("Stalled", "True")] {
                set_condition(&mut status, kind, value, reason, &message, generation);
            }
            write_status(&api, &name, &status).await?;
            return Err(OperatorError::Credentials { message });
        }
    };
    let repo = spec.repo.clone();
    let cache = context.cache_dir.clone();
    let source = tokio::task::spawn_blocking(move || GitSource::open_with(&repo, &cache, creds))
        .await
        .map_err(|e| OperatorError::Source {
            repo: spec.repo.clone(),
            message: e.to_string(),
        })?;
    let source = match source {
        Ok(source) => source,
        Err(e) => {
            set_condition(
                &mut status,
                "Ready",
                "False",
                "SourceUnavailable",
                &e.to_string(),
                generation,
            );
            set_condition(
                &mut status,
                "Stalled",
                "True",
                "SourceUnavailable",
                &e.to_string(),
                generation,
            );
            write_status(&api, &name, &status).await?;
            return Err(OperatorError::Source {
                repo: spec.repo.clone(),
                message: e.to_string(),
            });
        }
    };
    let rev = spec.rev.clone().or_else(|| spec.branch.clone());
    let target = Target {
        rev,
        path: spec.path.clone(),
        namespace: Some(
            spec.target_namespace
                .clone()
                .unwrap_or_else(|| namespace.clone()),
        ),
        inventory: Some(inventory_of(gitsync)),
    };
    let policy = Policy {
        prune: spec.prune,
        auto_rollback: spec.auto_rollback,
        // Self-heal means git wins over whoever edited an object.
        force_conflicts: spec.self_heal,
        wait: Some(WaitOptions::default()),
        // Where the GitSync's objects were: a namespace emptied in git is still searched.
        prune_namespaces: status
            .inventory
            .iter()
            .filter_map(|entry| entry.namespace.clone())
            .chain(target.namespace.clone())
            .collect(),
        ..Policy::default()
    };
    let head = source
        .resolve(target.rev.as_deref())
        .map_err(ReconcileError::from)?;
    // Without self-heal a commit already applied is only checked, never applied again.
    let already_applied = status.last_applied_commit.as_deref() == Some(head.sha.as_str());
    let policy = if already_applied && !spec.self_heal {
        Policy {
            dry_run: true,
            ..policy
        }
    } else {
        policy
    };
    let result = sync_on_blocking_thread(source, context.cluster.clone(), target, policy).await?;
    match result {
        Err(e) => {
            let reason = match &e {
                ReconcileError::Invalid { .. } => "InvalidCommit",
                ReconcileError::PruneGuard { .. } => "PruneGuard",
                ReconcileError::Pinned { .. } => "Pinned",
                _ => "SyncFailed",
            };
            set_condition(
                &mut status,
                "Synced",
                "False",
                reason,
                &e.to_string(),
                generation,
            );
            set_condition(
                &mut status,
                "Ready",
                "False",
                reason,
                &e.to_string(),
                generation,
            );
            write_status(&api, &name, &status).await?;
            Ok(Reconciled {
                failure: Some(reason),
                ..Reconciled::after(interval)
            })
        }
        Ok(report) if report.dry_run => {
            let drifted: Vec<String> = report
                .plan
                .changes
                .iter()
                .filter(|c| c.action.writes())
                .map(|c| c.key.to_string())
                .collect();
            // The source was reachable again: an earlier fetch failure no longer stalls it.
            set_condition(&mut status, "Stalled", "False", "Reachable", "", generation);
            let healthy = status.health.as_deref() == Some("Healthy");
            if drifted.is_empty() {
                set_condition(
                    &mut status,
                    "Synced",
                    "True",
                    "InSync",
                    "the cluster matches the commit",
                    generation,
                );
                if healthy {
                    let commit = &report.plan.source.commit;
                    set_condition(
                        &mut status,
                        "Ready",
                        "True",
                        "Ready",
                        &format!("{} \"{}\"", commit.short_sha(), commit.subject),
                        generation,
                    );
                }
            } else {
                let message = format!("changed outside git: {}", drifted.join(", "));
                set_condition(
                    &mut status,
                    "Synced",
                    "False",
                    "Drift",
                    &message,
                    generation,
                );
                set_condition(&mut status, "Ready", "False", "Drift", &message, generation);
            }
            status.observed_generation = generation;
            write_status(&api, &name, &status).await?;
            Ok(Reconciled {
                commit_time: Some(report.plan.source.commit.time),
                ..Reconciled::after(interval)
            })
        }
        Ok(report) => {
            let outcome = record_report(&mut status, &report, generation);
            write_status(&api, &name, &status).await?;
            Ok(Reconciled {
                failure: match outcome {
                    None => Some("FailedBefore"),
                    Some(Outcome::Failed | Outcome::RolledBack) => Some("RolloutFailed"),
                    Some(_) => None,
                },
                rolled_back: outcome == Some(Outcome::RolledBack),
                commit_time: status_commit_time(&report),
                ..Reconciled::after(interval)
            })
        }
    }
}

/// The controller spawns each reconcile, so its future must be `Send`, which the compiler
/// cannot prove through the pipeline's borrowing stream combinators. The pipeline therefore runs
/// on a blocking-pool thread of its own, driven by the runtime's handle; it only needs owned,
/// `Send` inputs.
async fn sync_on_blocking_thread(
    source: GitSource,
    mut cluster: Cluster,
    target: Target,
    policy: Policy,
) -> Result<Result<reconcile::SyncReport, ReconcileError>, OperatorError> {
    let handle = tokio::runtime::Handle::current();
    let repo = source.display().to_string();
    tokio::task::spawn_blocking(move || {
        handle.block_on(reconcile::sync(
            &source,
            &mut cluster,
            &target,
            &policy,
            &reconcile::Quiet,
        ))
    })
    .await
    .map_err(|e| OperatorError::Source {
        repo,
        message: format!("the sync task failed: {e}"),
    })
}

/// When the commit the cluster is on after a sync was made (after a rollback: the one it went
/// back to).
fn status_commit_time(report: &reconcile::SyncReport) -> Option<i64> {
    match &report.rollback {
        Some(rollback) => Some(rollback.to.time),
        None if report.skipped.is_none() => Some(report.plan.source.commit.time),
        None => None,
    }
}

/// Writes a sync's outcome into the status and returns it (None: the commit failed before and
/// was not tried again).
fn record_report(
    status: &mut GitSyncStatus,
    report: &reconcile::SyncReport,
    generation: Option<i64>,
) -> Option<Outcome> {
    let commit = &report.plan.source.commit;
    status.observed_generation = generation;
    status.inventory = report
        .plan
        .changes
        .iter()
        .filter(|c| c.action != PlanAction::Prune)
        .map(|c| InventoryEntry {
            api_version: c.api_version.clone(),
            kind: c.kind.clone(),
            namespace: c.namespace.clone(),
            name: c.name.clone(),
        })
        .collect();
    if let Some(skipped) = &report.skipped {
        set_condition(
            status,
            "Synced",
            "False",
            "FailedBefore",
            skipped,
            generation,
        );
        return None;
    }
    let (outcome, reason, applied) = match (&report.rollout, &report.rollback) {
        (Some(WaitOutcome::Healthy { .. }), _) => (Outcome::Healthy, None, commit.clone()),
        (Some(WaitOutcome::Failed { object, reason, .. }), Some(rollback)) => (
            Outcome::RolledBack,
            Some(format!("{object}: {reason}")),
            rollback.to.clone(),
        ),
        (Some(WaitOutcome::Failed { object, reason, .. }), None) => (
            Outcome::Failed,
            Some(format!("{object}: {reason}")),
            commit.clone(),
        ),
        (None, _) => (Outcome::Applied, None, commit.clone()),
    };
    // The commit the cluster is on: after a rollback, the one it went back to.
    status.last_applied_commit = Some(applied.sha.clone());
    status.last_applied_commit_short = Some(applied.short_sha().to_string());
    status.last_applied_subject = Some(applied.subject.clone());
    if outcome == Outcome::Healthy {
        status.last_healthy_commit = Some(commit.sha.clone());
    } else if outcome == Outcome::RolledBack {
        status.last_healthy_commit = Some(applied.sha.clone());
    }
    let entry: HistoryEntry = audit::entry(
        commit,
        outcome,
        reason.clone(),
        (outcome == Outcome::RolledBack).then(|| applied.sha.clone()),
    );
    // A re-check of the same commit with the same outcome is not news.
    let repeat = status
        .history
        .first()
        .is_some_and(|e| e.commit == entry.commit && e.outcome == entry.outcome);
    if !repeat {
        status.history.insert(0, entry);
        status.history.truncate(STATUS_HISTORY);
    }
    match outcome {
        Outcome::Healthy | Outcome::Applied => {
            set_condition(
                status,
                "Synced",
                "True",
                "Synced",
                &format!("commit {} is applied", commit.short_sha()),
                generation,
            );
            set_condition(
                status,
                "Healthy",
                "True",
                "Healthy",
                "every object is healthy",
                generation,
            );
            set_condition(
                status,
                "Ready",
                "True",
                "Ready",
                &format!("{} \"{}\"", commit.short_sha(), commit.subject),
                generation,
            );
            set_condition(status, "Stalled", "False", "Progressing", "", generation);
            status.health = Some("Healthy".into());
        }
        Outcome::RolledBack | Outcome::Failed => {
            let why = reason.unwrap_or_default();
            let verb = if outcome == Outcome::RolledBack {
                format!("rolled back to {}", applied.short_sha())
            } else {
                "not rolled back".to_string()
            };
            set_condition(
                status,
                "Synced",
                "False",
                "RolloutFailed",
                &format!("commit {} failed ({verb}): {why}", commit.short_sha()),
                generation,
            );
            set_condition(
                status,
                "Healthy",
                "False",
                "RolloutFailed",
                &why,
                generation,
            );
            set_condition(status, "Ready", "False", "RolloutFailed", &why, generation);
            status.health = Some(
                if outcome == Outcome::RolledBack {
                    "Healthy"
                } else {
                    "Degraded"
                }
                .into(),
            );
        }
    }
    Some(outcome)
}

fn set_condition(
    status: &mut GitSyncStatus,
    kind: &str,
    value: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let now = audit::now_rfc3339();
    match status.conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(existing) => {
            if existing.status != value {
                existing.last_transition_time = Some(now);
            }
            existing.status = value.to_string();
            existing.reason = reason.to_string();
            existing.message = message.to_string();
            existing.observed_generation = generation;
        }
        None => status.conditions.push(Condition {
            type_: kind.to_string(),
            status: value.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            last_transition_time: Some(now),
            observed_generation: generation,
        }),
    }
}

async fn write_status(
    api: &Api<GitSync>,
    name: &str,
    status: &GitSyncStatus,
) -> Result<(), OperatorError> {
    let patch = json!({
        "apiVersion": GitSync::api_version(&()),
        "kind": GitSync::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|e| OperatorError::Status {
        name: name.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_change_their_transition_time_only_when_their_status_changes() {
        let mut status = GitSyncStatus::default();
        set_condition(&mut status, "Ready", "False", "Suspended", "", Some(1));
        let first = status.conditions[0].last_transition_time.clone();
        set_condition(&mut status, "Ready", "False", "Suspended", "again", Some(2));
        assert_eq!(status.conditions[0].last_transition_time, first);
        assert_eq!(status.conditions[0].observed_generation, Some(2));
        assert_eq!(status.conditions.len(), 1);
    }

    #[test]
    fn inventory_names_fit_a_label_value() {
        let mut gs = GitSync::new(
            "shop",
            serde_json::from_value(json!({"repo": "file:///r"})).unwrap(),
        );
        gs.metadata.namespace = Some("team".into());
        assert_eq!(inventory_of(&gs), "gs-team-shop");
        gs.metadata.name = Some("x".repeat(80));
        let long = inventory_of(&gs);
        assert!(long.len() <= 63 && long.starts_with("gs-"), "{long}");
    }
}
