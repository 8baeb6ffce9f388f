//! The GitSync controller: for each GitSync, the same pipeline as `kommit sync`, run again every
//! interval, with the outcome written to the GitSync's status. One reconcile per GitSync at a
//! time (kube-runtime guarantees it), many GitSyncs in parallel.
//!
//! A commit acts with its owner's rights: the sync of a GitSync impersonates its ServiceAccount
//! (see [`Tenancy`]), while the GitSync, its status and its Secret are read and written as the
//! operator itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{Predicate, WatchStreamExt, predicates, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::http::REQUESTED_AT_ANNOTATION;
use super::metrics::{GitSyncLabels, Metrics};
use super::{Condition, ConditionType, GitSync, GitSyncStatus, InventoryEntry, Reason};
use crate::audit::{self, HistoryEntry, Outcome};
use crate::cluster::{Cluster, ClusterError, Fence, Identity};
use crate::object::FIELD_MANAGER;
use crate::plan::{Action as PlanAction, ProblemKind};
use crate::reconcile::continuous::{self, NextStep};
use crate::reconcile::{self, Policy, ReconcileError, Target, WaitOptions, WaitOutcome};
use crate::source::{AmbientCredentials, GitSource, is_remote, redact_url};

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
    #[error("{message}")]
    Previews { message: String },
}

impl OperatorError {
    /// The failure reason for the metrics, as in the status conditions.
    fn reason(&self) -> Reason {
        match self {
            OperatorError::Reconcile(e) => failure_reason(e),
            OperatorError::Source { .. } => Reason::SourceUnavailable,
            OperatorError::Credentials { .. } => Reason::CredentialsUnavailable,
            OperatorError::Status { .. } | OperatorError::Previews { .. } => Reason::SyncFailed,
        }
    }
}

/// The condition reason of a sync that stopped before or while writing.
fn failure_reason(error: &ReconcileError) -> Reason {
    match error {
        ReconcileError::Invalid { problems, .. }
            if problems.iter().any(|p| p.kind == ProblemKind::Forbidden) =>
        {
            Reason::Forbidden
        }
        ReconcileError::Invalid { .. } => Reason::InvalidCommit,
        ReconcileError::Drift { .. } => Reason::Drift,
        ReconcileError::Adopt { .. } => Reason::AdoptionRefused,
        ReconcileError::Busy(_) => Reason::SourceBusy,
        ReconcileError::PruneGuard(_) => Reason::PruneGuard,
        ReconcileError::Pinned { .. } => Reason::Pinned,
        ReconcileError::Source(_) => Reason::SourceUnavailable,
        ReconcileError::Cluster(ClusterError::Forbidden { .. }) => Reason::Forbidden,
        ReconcileError::ApplyFailed { source, .. }
            if matches!(**source, ClusterError::Forbidden { .. }) =>
        {
            Reason::Forbidden
        }
        ReconcileError::Cluster(_) | ReconcileError::ApplyFailed { .. } => Reason::SyncFailed,
    }
}

/// What a GitSync may borrow from the operator: its rights in the cluster, its machine's
/// repositories, its git credentials. All off unless the operator is started to lend them.
#[derive(Debug, Clone, Default)]
pub struct Tenancy {
    /// The ServiceAccount (of the GitSync's own namespace) that GitSyncs without
    /// `serviceAccountName` act as; `None`: they act as the operator (a single-team cluster).
    pub default_service_account: Option<String>,
    /// Local paths and file:// repositories may be synced (tests, demos, single-team set-ups).
    pub allow_local_repos: bool,
    /// GitSyncs without `secretRef` fetch with the operator's own git credentials.
    pub use_operator_credentials: bool,
}

/// `name` if it can name a ServiceAccount; a name with `:` would make another user name than
/// the ServiceAccount's. Also the parser of `--default-service-account`.
pub fn service_account_name(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if valid {
        Ok(name.to_string())
    } else {
        Err(format!(
            "\"{name}\" is not a ServiceAccount name (lower-case letters, digits, '-' and '.')"
        ))
    }
}

impl Tenancy {
    /// Who the sync of `gitsync` acts as: its ServiceAccount, else the default one, else the
    /// operator (`None`).
    fn identity_for(&self, gitsync: &GitSync) -> Result<Option<Identity>, String> {
        let namespace = gitsync.namespace().unwrap_or_default();
        let named = gitsync.spec.service_account_name.as_deref();
        let Some(account) = named.or(self.default_service_account.as_deref()) else {
            return Ok(None);
        };
        let account = service_account_name(account)
            .map_err(|problem| format!("serviceAccountName {problem}"))?;
        Ok(Some(Identity::service_account(&namespace, &account)))
    }

    /// Why the operator does not read `repo` for a GitSync, if it does not.
    fn refuses_source(&self, repo: &str) -> Option<String> {
        let local = !is_remote(repo) || repo.trim().to_ascii_lowercase().starts_with("file:");
        (local && !self.allow_local_repos).then(|| {
            format!(
                "spec.repo {} is a path on the operator's machine; the operator reads only \
                 remote repositories (https://, ssh://) for GitSyncs, since a path would let a \
                 GitSync read whatever the operator can read. Push the repository to a git \
                 server, or start the operator with --allow-local-repos (single-team set-ups \
                 and tests)",
                redact_url(repo)
            )
        })
    }
}

pub struct Context {
    pub cluster: Cluster,
    pub cache_dir: PathBuf,
    /// The operator's own git credentials, lent to GitSyncs without a `secretRef` only with
    /// `tenancy.use_operator_credentials`.
    pub ambient: AmbientCredentials,
    pub tenancy: Tenancy,
    /// How many GitSyncs are reconciled at once: one slow repository or rollout holds one slot.
    pub concurrency: u16,
    pub metrics: Arc<Metrics>,
    /// Each GitSync's forge client, kept for its conditional-request cache: (a fingerprint of
    /// provider, API URL and token, the client), by `namespace/name`.
    pub forges: std::sync::Mutex<std::collections::HashMap<String, (String, crate::forge::Forge)>>,
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
    // Only a new spec or a new annotation (a reconcile request) is a reason to look before the
    // interval; the status writes of every reconcile are not.
    let (store, writer) = reflector::store();
    // A deleted GitSync's commit age would otherwise be reported, and grow, until a restart:
    // forgotten when its deletion is seen, and in a sweep for deletions missed while the watch
    // was re-listing.
    let on_delete = context.metrics.clone();
    let triggers = watcher(api, context.cluster.watcher_config())
        .default_backoff()
        .reflect(writer)
        .inspect_ok(move |event| {
            if let watcher::Event::Delete(gone) = event {
                let (namespace, name) = (gone.namespace().unwrap_or_default(), gone.name_any());
                on_delete.retain_synced(|l| !(l.namespace == namespace && l.name == name));
            }
        })
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::annotations),
            Default::default(),
        );
    let metrics = context.metrics.clone();
    let known = store.clone();
    let forget_deleted = tokio::spawn(async move {
        known.wait_until_ready().await.ok();
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let existing: std::collections::HashSet<(String, String)> = known
                .state()
                .iter()
                .map(|g| (g.namespace().unwrap_or_default(), g.name_any()))
                .collect();
            metrics.retain_synced(|labels| {
                existing.contains(&(labels.namespace.clone(), labels.name.clone()))
            });
        }
    });
    Controller::for_stream(triggers, store)
        .with_config(kube::runtime::controller::Config::default().concurrency(context.concurrency))
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

fn interval_of(gitsync: &GitSync) -> Duration {
    gitsync.spec.interval().every
}

fn error_policy(gitsync: Arc<GitSync>, error: &OperatorError, _: Arc<Context>) -> Action {
    tracing::warn!(gitsync = %gitsync.name_any(), error = %error, "will retry");
    let failures_backoff = reconcile::watch::backoff(interval_of(&gitsync), 1);
    Action::requeue(failures_backoff)
}

/// The inventory label value of a GitSync: readable when short, hashed when not.
fn inventory_of(gitsync: &GitSync) -> String {
    // A namespace holds no `.`, so the first one after `gs.` ends it: `team/a-web` and
    // `team-a/web` differ. The record ConfigMap is named after it, so it stays a DNS subdomain.
    let name = format!(
        "gs.{}.{}",
        gitsync.namespace().unwrap_or_default(),
        gitsync.name_any()
    );
    if name.len() <= 63 {
        return name;
    }
    let digest = Sha256::digest(name.as_bytes());
    format!("gs.{}", &crate::source::hex(&digest)[..40])
}

async fn reconcile_one(
    gitsync: Arc<GitSync>,
    context: Arc<Context>,
) -> Result<Action, OperatorError> {
    let labels = GitSyncLabels {
        namespace: gitsync.namespace().unwrap_or_default(),
        name: gitsync.name_any(),
    };
    let started = Instant::now();
    let interval = gitsync.spec.interval();
    if let Some(adjusted) = &interval.adjusted {
        tracing::warn!(namespace = %labels.namespace, name = %labels.name, "{adjusted}");
    }
    let interval = interval.every;
    let span = tracing::info_span!("gitsync", namespace = %labels.namespace, name = %labels.name, repo = %redact_url(&gitsync.spec.repo));
    let result =
        tracing::Instrument::instrument(sync_gitsync(&gitsync, &context, interval), span).await;
    let failure = match &result {
        Ok(outcome) => outcome.failure,
        Err(e) => Some(e.reason()),
    };
    if !matches!(result, Ok(Reconciled { skipped: true, .. })) {
        context
            .metrics
            .reconciled(&labels, started.elapsed(), failure.map(Reason::as_str));
    }
    if let Ok(outcome) = &result {
        if outcome.rolled_back {
            context.metrics.rolled_back(&labels);
        }
        if let Some(commit_time) = outcome.commit_time {
            context.metrics.synced_commit(&labels, commit_time);
        }
    }
    result.map(|outcome| outcome.action)
}

/// What one reconcile did, for the metrics.
struct Reconciled {
    action: Action,
    /// The reason of a failed sync or rollout (a status condition reason).
    failure: Option<Reason>,
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
    let api = Statuses {
        api: Api::namespaced(context.cluster.client().clone(), &namespace),
        namespace: namespace.clone(),
        fence: context.cluster.fence().cloned(),
    };
    let mut status = gitsync.status.clone().unwrap_or_default();
    let generation = gitsync.meta().generation;
    // Previews outlive nothing: the GitSync keeps a finalizer while it may have some, and its
    // deletion removes them first.
    let previews = spec.pull_requests.as_ref().is_some_and(|p| p.previews);
    if gitsync.meta().deletion_timestamp.is_some() {
        if gitsync
            .finalizers()
            .iter()
            .any(|f| f == super::pull_requests::PREVIEWS_FINALIZER)
        {
            let removed = super::pull_requests::remove_all_previews(context, &status)
                .await
                .map_err(|message| OperatorError::Previews { message })?;
            tracing::info!(removed, "the GitSync is deleted: its previews are removed");
            super::pull_requests::keep_finalizer(context, gitsync, false)
                .await
                .map_err(|message| OperatorError::Previews { message })?;
        }
        return Ok(Reconciled {
            skipped: true,
            action: Action::await_change(),
            ..Reconciled::after(interval)
        });
    }
    if !previews
        && gitsync
            .finalizers()
            .iter()
            .any(|f| f == super::pull_requests::PREVIEWS_FINALIZER)
    {
        super::pull_requests::remove_all_previews(context, &status)
            .await
            .map_err(|message| OperatorError::Previews { message })?;
        status.previews = None;
    }
    if spec.pull_requests.is_none() {
        status.pull_requests.clear();
        status.pull_requests_error = None;
    }
    if super::pull_requests::keep_finalizer(context, gitsync, previews)
        .await
        .map_err(|message| OperatorError::Previews { message })?
    {
        // The finalizer write made this copy old; the next reconcile starts from the new one.
        return Ok(Reconciled {
            skipped: true,
            action: Action::requeue(Duration::from_millis(100)),
            ..Reconciled::after(interval)
        });
    }
    // A request (webhook or `kubectl annotate`) is handled by this very reconcile.
    if let Some(requested) = gitsync.annotations().get(REQUESTED_AT_ANNOTATION) {
        status.last_handled_reconcile_at = Some(requested.clone());
    }

    if spec.suspend {
        status.set_condition(
            ConditionType::Ready,
            false,
            Reason::Suspended,
            "spec.suspend is true; no changes are made",
            generation,
        );
        write_status(&api, &name, &status).await?;
        return Ok(Reconciled {
            skipped: true,
            ..Reconciled::after(interval)
        });
    }

    // Refusals of the spec itself come first: nothing is fetched or read for them.
    let refused = context
        .tenancy
        .refuses_source(&spec.repo)
        .map(|message| (Reason::SourceNotAllowed, message))
        .or_else(|| {
            let identity = context.tenancy.identity_for(gitsync);
            identity.err().map(|message| (Reason::InvalidSpec, message))
        });
    if let Some((reason, message)) = refused {
        status.stall(reason, &message, generation);
        status.set_condition(ConditionType::Synced, false, reason, &message, generation);
        status.observed_generation = generation;
        write_status(&api, &name, &status).await?;
        tracing::warn!(reason = reason.as_str(), %message, "not synced");
        return Ok(Reconciled {
            failure: Some(reason),
            ..Reconciled::after(interval)
        });
    }

    // The Secret of spec.secretRef, read on every reconcile so that a rotated token is used.
    let ambient = context
        .tenancy
        .use_operator_credentials
        .then_some(&context.ambient);
    let creds = match super::credentials::credentials_for(
        context.cluster.client(),
        &namespace,
        &name,
        spec.secret_ref.as_ref(),
        ambient,
    )
    .await
    {
        Ok(creds) => creds,
        Err(e) => {
            let message = e.to_string();
            status.stall(Reason::CredentialsUnavailable, &message, generation);
            write_status(&api, &name, &status).await?;
            return Err(OperatorError::Credentials { message });
        }
    };
    let repo = spec.repo.clone();
    // A mirror per repository and credentials: GitSyncs that fetch the same URL with the same
    // credentials share one (one clone and, when asked at once, one fetch for all of them); a
    // GitSync with other credentials, or none, never reads what these fetched.
    let cache = context
        .cache_dir
        .join("mirrors")
        .join(creds.mirror_key(&spec.repo));
    let rev = spec.rev.clone().or_else(|| spec.branch.clone());
    let wanted = rev.clone();
    // Opening fetches: blocking network work, off the async threads; the head comes back too.
    let opened = tokio::task::spawn_blocking(move || {
        let source = GitSource::open_with(&repo, &cache, creds)?;
        let head = source.resolve(wanted.as_deref())?;
        Ok::<_, crate::source::SourceError>((source, head))
    })
    .await
    .map_err(|e| OperatorError::Source {
        repo: redact_url(&spec.repo),
        message: e.to_string(),
    })?;
    let (source, head) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            status.stall(Reason::SourceUnavailable, &e.to_string(), generation);
            write_status(&api, &name, &status).await?;
            return Err(OperatorError::Source {
                repo: redact_url(&spec.repo),
                message: e.to_string(),
            });
        }
    };
    let target = Target {
        rev: Some(head.sha.clone()),
        path: spec.path.clone(),
        namespace: Some(
            spec.target_namespace
                .clone()
                .unwrap_or_else(|| namespace.clone()),
        ),
        inventory: Some(inventory_of(gitsync)),
        select: crate::select::Selection {
            include: spec.include.clone(),
            exclude: spec.exclude.clone(),
        },
        budgets: crate::budget::Budgets {
            max_bytes: spec.max_bytes.unwrap_or(crate::budget::DEFAULT_MAX_BYTES),
            max_objects: spec
                .max_objects
                .unwrap_or(crate::budget::DEFAULT_MAX_OBJECTS),
            max_expanded_bytes: spec.max_bytes.unwrap_or(crate::budget::DEFAULT_MAX_BYTES),
        },
        confine: false,
    };
    let base = Policy {
        prune: spec.prune,
        auto_rollback: spec.auto_rollback,
        // Self-heal means git wins over whoever edited an object.
        force_conflicts: spec.self_heal,
        adopt: spec.adopt,
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
    // Every reconcile is a look: the controller calls it on a new spec or request, and again
    // after each interval.
    let step = continuous::next_step(continuous::State {
        head: &head.sha,
        applied: status.last_applied_commit.as_deref(),
        since_last_look: None,
        interval,
        self_heal: spec.self_heal,
    });
    let policy = continuous::policy_for(&step, &base);
    // The commit's reads, dry runs, writes and prunes are made as its ServiceAccount.
    let identity = context.tenancy.identity_for(gitsync).ok().flatten();
    let mut cluster = match identity {
        Some(identity) => match context.cluster.impersonating(identity) {
            Ok(cluster) => cluster,
            Err(e) => {
                let message = e.to_string();
                status.stall(Reason::SyncFailed, &message, generation);
                write_status(&api, &name, &status).await?;
                return Err(OperatorError::Reconcile(e.into()));
            }
        },
        None => context.cluster.clone(),
    };
    let result = reconcile::sync(&source, &mut cluster, &target, &policy, &reconcile::Quiet).await;
    if let Some(pull_requests) = &spec.pull_requests {
        let inventory = inventory_of(gitsync);
        let work = super::pull_requests::Work {
            gitsync,
            spec: pull_requests,
            context,
            source: &source,
            cluster: &cluster,
            target: &target,
            base_sha: &head.sha,
            inventory: &inventory,
        };
        let span = tracing::info_span!("pull_requests");
        let looked = tracing::Instrument::instrument(
            super::pull_requests::reconcile(&work, &mut status),
            span,
        )
        .await;
        if let Err(e) = looked {
            tracing::warn!(error = %e, "cannot look at the pull requests; previews are kept");
            status.pull_requests_error = Some(e.to_string());
        }
    }
    // The source answered: an earlier fetch failure no longer stalls the GitSync.
    status.set_condition(
        ConditionType::Stalled,
        false,
        Reason::Reachable,
        "",
        generation,
    );
    match result {
        Err(e) => {
            let reason = failure_reason(&e);
            let message = match &e {
                ReconcileError::Drift { drift, .. } => format!(
                    "changed outside git: {}",
                    drift
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                other => other.to_string(),
            };
            status.set_condition(ConditionType::Synced, false, reason, &message, generation);
            status.set_condition(ConditionType::Ready, false, reason, &message, generation);
            write_status(&api, &name, &status).await?;
            Ok(Reconciled {
                failure: Some(reason),
                ..Reconciled::after(interval)
            })
        }
        Ok(report) if step == NextStep::CheckDrift => {
            let drifted = drift_summary(&report);
            if drifted.is_empty() {
                status.set_condition(
                    ConditionType::Synced,
                    true,
                    Reason::InSync,
                    "the cluster matches the commit",
                    generation,
                );
                if status.health.as_deref() == Some("Healthy") {
                    let commit = &report.plan.source.commit;
                    let message = format!("{} \"{}\"", commit.short_sha(), commit.subject);
                    status.set_condition(
                        ConditionType::Ready,
                        true,
                        Reason::Ready,
                        &message,
                        generation,
                    );
                }
            } else {
                let message = format!("changed outside git: {}", drifted.join("; "));
                status.set_condition(
                    ConditionType::Synced,
                    false,
                    Reason::Drift,
                    &message,
                    generation,
                );
                status.set_condition(
                    ConditionType::Ready,
                    false,
                    Reason::Drift,
                    &message,
                    generation,
                );
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
                    None => Some(Reason::FailedBefore),
                    Some(Outcome::Failed | Outcome::RolledBack) => Some(Reason::RolloutFailed),
                    Some(_) => None,
                },
                rolled_back: outcome == Some(Outcome::RolledBack),
                commit_time: status_commit_time(&report),
                ..Reconciled::after(interval)
            })
        }
    }
}

/// Each object a drift check found changed outside git: the fields others took over and who
/// holds them, or what a sync would do to it (an object deleted by hand is created again).
fn drift_summary(report: &reconcile::SyncReport) -> Vec<String> {
    let mut drifted: Vec<String> = report.drift.iter().map(ToString::to_string).collect();
    for change in report.plan.changes.iter().filter(|c| c.action.writes()) {
        if report.drift.iter().any(|d| d.key == change.key) {
            continue;
        }
        let what = match change.action {
            PlanAction::Create => "missing from the cluster",
            PlanAction::Prune => "left git but is still in the cluster",
            _ => "differs from git",
        };
        drifted.push(format!("{} {}: {what}", change.kind, change.name));
    }
    drifted
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
        status.set_condition(
            ConditionType::Synced,
            false,
            Reason::FailedBefore,
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
            status.health = Some("Healthy".into());
            let applied_message = format!("commit {} is applied", commit.short_sha());
            let ready_message = format!("{} \"{}\"", commit.short_sha(), commit.subject);
            status.set_condition(
                ConditionType::Synced,
                true,
                Reason::Synced,
                &applied_message,
                generation,
            );
            status.set_condition(
                ConditionType::Healthy,
                true,
                Reason::Healthy,
                "every object is healthy",
                generation,
            );
            status.set_condition(
                ConditionType::Ready,
                true,
                Reason::Ready,
                &ready_message,
                generation,
            );
            status.set_condition(
                ConditionType::Stalled,
                false,
                Reason::Progressing,
                "",
                generation,
            );
        }
        Outcome::RolledBack | Outcome::Failed => {
            let why = reason.unwrap_or_default();
            let verb = if outcome == Outcome::RolledBack {
                format!("rolled back to {}", applied.short_sha())
            } else {
                "not rolled back".to_string()
            };
            status.health = Some(
                if outcome == Outcome::RolledBack {
                    "Healthy"
                } else {
                    "Degraded"
                }
                .into(),
            );
            let message = format!("commit {} failed ({verb}): {why}", commit.short_sha());
            status.set_condition(
                ConditionType::Synced,
                false,
                Reason::RolloutFailed,
                &message,
                generation,
            );
            status.set_condition(
                ConditionType::Healthy,
                false,
                Reason::RolloutFailed,
                &why,
                generation,
            );
            status.set_condition(
                ConditionType::Ready,
                false,
                Reason::RolloutFailed,
                &why,
                generation,
            );
        }
    }
    Some(outcome)
}

/// The most a condition message holds (the API allows 32 KiB; a status stays readable and the
/// GitSync object small): the rest is cut, with a pointer to the whole of it.
const MESSAGE_LIMIT: usize = 4 * 1024;

fn bounded_message(message: &str) -> String {
    if message.len() <= MESSAGE_LIMIT {
        return message.to_string();
    }
    let mut end = MESSAGE_LIMIT;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… (cut at {} KiB: the operator's log and `kommit diff` show all of it)",
        &message[..end],
        MESSAGE_LIMIT / 1024
    )
}

impl GitSyncStatus {
    /// Sets a condition observed at `generation`; its transition time changes only when its
    /// status does.
    fn set_condition(
        &mut self,
        kind: ConditionType,
        value: bool,
        reason: Reason,
        message: &str,
        generation: Option<i64>,
    ) {
        let now = audit::now_rfc3339();
        let value = if value { "True" } else { "False" };
        let message = bounded_message(message);
        let message = message.as_str();
        match self
            .conditions
            .iter_mut()
            .find(|c| c.type_ == kind.as_str())
        {
            Some(existing) => {
                if existing.status != value {
                    existing.last_transition_time = Some(now);
                }
                existing.status = value.to_string();
                existing.reason = reason.as_str().to_string();
                existing.message = message.to_string();
                existing.observed_generation = generation;
            }
            None => self.conditions.push(Condition {
                type_: kind.as_str().to_string(),
                status: value.to_string(),
                reason: reason.as_str().to_string(),
                message: message.to_string(),
                last_transition_time: Some(now),
                observed_generation: generation,
            }),
        }
    }

    /// Progress needs a person: not ready, and stalled, for the same reason.
    fn stall(&mut self, reason: Reason, message: &str, generation: Option<i64>) {
        self.set_condition(ConditionType::Ready, false, reason, message, generation);
        self.set_condition(ConditionType::Stalled, true, reason, message, generation);
    }
}

/// Where the GitSyncs of a namespace get their statuses: behind the fence of the operator's
/// writes, so that a replica that can no longer be sure it leads writes no status either (it
/// could overwrite the new leader's).
struct Statuses {
    api: Api<GitSync>,
    namespace: String,
    fence: Option<Fence>,
}

async fn write_status(
    statuses: &Statuses,
    name: &str,
    status: &GitSyncStatus,
) -> Result<(), OperatorError> {
    if let Some(fence) = &statuses.fence {
        let object = format!("the status of GitSync {}/{name}", statuses.namespace);
        fence
            .check(&object)
            .map_err(|fenced| OperatorError::Reconcile(fenced.into()))?;
    }
    let patch = json!({
        "apiVersion": GitSync::api_version(&()),
        "kind": GitSync::kind(&()),
        "status": status,
    });
    statuses
        .api
        .patch_status(
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
    fn condition_messages_are_bounded_on_a_character_boundary() {
        assert_eq!(bounded_message("short"), "short");
        let long = "é".repeat(MESSAGE_LIMIT);
        let cut = bounded_message(&long);
        assert!(cut.len() < MESSAGE_LIMIT + 100, "{}", cut.len());
        assert!(cut.ends_with("show all of it)"));
    }

    #[test]
    fn conditions_change_their_transition_time_only_when_their_status_changes() {
        let mut status = GitSyncStatus::default();
        status.set_condition(ConditionType::Ready, false, Reason::Suspended, "", Some(1));
        let first = status.conditions[0].last_transition_time.clone();
        status.set_condition(
            ConditionType::Ready,
            false,
            Reason::Suspended,
            "again",
            Some(2),
        );
        assert_eq!(status.conditions[0].last_transition_time, first);
        assert_eq!(status.conditions[0].observed_generation, Some(2));
        assert_eq!(status.conditions.len(), 1);
    }

    fn gitsync_in(namespace: &str, spec: serde_json::Value) -> GitSync {
        let mut gs = GitSync::new("shop", serde_json::from_value(spec).unwrap());
        gs.metadata.namespace = Some(namespace.into());
        gs
    }

    #[test]
    fn a_gitsync_acts_as_its_service_account_else_the_default_else_the_operator() {
        let open = Tenancy::default();
        let locked = Tenancy {
            default_service_account: Some("default".into()),
            ..Tenancy::default()
        };
        let plain = gitsync_in("team-a", json!({"repo": "https://h/r.git"}));
        let named = gitsync_in(
            "team-a",
            json!({"repo": "https://h/r.git", "serviceAccountName": "deployer"}),
        );
        assert_eq!(open.identity_for(&plain), Ok(None));
        assert_eq!(
            open.identity_for(&named).unwrap().unwrap().user,
            "system:serviceaccount:team-a:deployer"
        );
        assert_eq!(
            locked.identity_for(&plain).unwrap().unwrap().user,
            "system:serviceaccount:team-a:default"
        );
        let sneaky = gitsync_in(
            "team-a",
            json!({"repo": "https://h/r.git", "serviceAccountName": "x:kube-system:admin"}),
        );
        assert!(open.identity_for(&sneaky).is_err());
    }

    #[test]
    fn local_repositories_are_refused_unless_allowed() {
        let tenancy = Tenancy::default();
        for repo in [
            "file:///srv/git/shop",
            "/srv/git/shop",
            "FILE:///x",
            "./shop",
        ] {
            let refused = tenancy.refuses_source(repo);
            assert!(
                refused
                    .as_deref()
                    .is_some_and(|m| m.contains("--allow-local-repos")),
                "{repo}: {refused:?}"
            );
        }
        for repo in ["https://github.com/a/b.git", "git@github.com:a/b.git"] {
            assert_eq!(tenancy.refuses_source(repo), None, "{repo}");
        }
        let allowed = Tenancy {
            allow_local_repos: true,
            ..Tenancy::default()
        };
        assert_eq!(allowed.refuses_source("file:///srv/git/shop"), None);
    }

    #[test]
    fn a_forbidden_sync_has_its_own_reason() {
        let forbidden = || ClusterError::Forbidden {
            object: "ConfigMap b/x".into(),
            action: "apply",
            denied: Box::default(),
        };
        assert_eq!(
            failure_reason(&ReconcileError::Cluster(forbidden())),
            Reason::Forbidden
        );
        let stopped = ReconcileError::ApplyFailed {
            commit: "abc".into(),
            object: "ConfigMap b/x".into(),
            applied: 0,
            total: 1,
            source: Box::new(forbidden()),
        };
        assert_eq!(failure_reason(&stopped), Reason::Forbidden);
    }

    /// A server that counts the connections made to it and answers none.
    async fn counting_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        (address, count)
    }

    #[tokio::test]
    async fn a_replica_that_may_have_lost_its_lease_writes_no_status() {
        let (address, connections) = counting_server().await;
        let config = kube::Config::new(address.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let fence = Fence::closed();
        let statuses = Statuses {
            api: Api::namespaced(client, "team"),
            namespace: "team".into(),
            fence: Some(fence.clone()),
        };
        let status = GitSyncStatus::default();

        let refused = write_status(&statuses, "shop", &status).await.unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("not writing the status of GitSync team/shop: this replica"),
            "{refused}"
        );
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);

        // While the lease is surely held, the status is sent (here to a server that hangs up).
        fence.open_until(Instant::now() + Duration::from_secs(60));
        let sent = write_status(&statuses, "shop", &status).await.unwrap_err();
        assert!(!sent.to_string().contains("not writing"), "{sent}");
        assert!(connections.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }

    #[test]
    fn inventory_names_fit_a_label_value() {
        let mut gs = GitSync::new(
            "shop",
            serde_json::from_value(json!({"repo": "file:///r"})).unwrap(),
        );
        gs.metadata.namespace = Some("team".into());
        assert_eq!(inventory_of(&gs), "gs.team.shop");
        gs.metadata.name = Some("x".repeat(80));
        let long = inventory_of(&gs);
        assert!(long.len() <= 63 && long.starts_with("gs."), "{long}");
        let named = |namespace: &str, name: &str| {
            let spec = serde_json::from_value(json!({"repo": "file:///r"})).unwrap();
            let mut gs = GitSync::new(name, spec);
            gs.metadata.namespace = Some(namespace.into());
            inventory_of(&gs)
        };
        assert_ne!(named("team", "a-web"), named("team-a", "web"));
    }
}
