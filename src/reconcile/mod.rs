//! The pipeline for one (repository, revision, path, cluster), as steps that read one way:
//! load the commit (`load`) → observe the cluster (`observe`, `inventory`) → decide (pure, in
//! `plan::decide`) → apply (`apply`) → wait for health (`wait`) → write it down (`record`).
//! All or nothing up to the first write; `sync` below is the short driver over those steps.
//! `continuous` is the one policy for keeping a cluster on a branch, shared by `watch` and the
//! operator.

use std::collections::{BTreeSet, HashMap};

use crate::audit::{self, Outcome, RecordStore};
use crate::cluster::{Cluster, ClusterError};
use crate::commit::CommitInfo;
use crate::object::ObjectKey;
use crate::plan::decide::Unconsented;
use crate::plan::decide::{self, PruneGuard};
use crate::plan::{Action, Drifted, Plan, Problem, Step};
use crate::source::{GitSource, SourceError};

mod apply;
pub mod continuous;
mod history;
mod inventory;
mod load;
mod observe;
mod record;
pub mod wait;
pub mod watch;

pub use history::{RecordNamespace, Revision, history, load_record};
pub use inventory::inventory_id;
pub use load::{Loaded, load};
pub use wait::{ObjectHealth, Progress, Quiet, WaitOptions, WaitOutcome, Watched};
pub use watch::{WatchEvent, WatchOptions};

use record::Journal;

/// How many API requests run at once.
const CONCURRENCY: usize = 16;

/// What to reconcile: a path of a repository at a revision.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub rev: Option<String>,
    pub path: String,
    /// Namespace for namespaced objects that name none (default: the kubeconfig's).
    pub namespace: Option<String>,
    /// Name of the inventory; default: derived from the repository and path.
    pub inventory: Option<String>,
    /// Which files under the path are read.
    pub select: crate::select::Selection,
    /// What one sync may read.
    pub budgets: crate::budget::Budgets,
    /// Every object must be namespaced and in `namespace` (a pull request's preview): any
    /// other is a problem of the commit, and nothing is written.
    pub confine: bool,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub prune: bool,
    pub dry_run: bool,
    /// Take over fields other managers hold; without it they are drift, and a sync that would
    /// write them stops before writing anything.
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
    /// Take over objects that exist without this source's inventory (`--adopt`).
    pub adopt: bool,
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
            adopt: false,
        }
    }
}

fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(
        "commit {commit} cannot be applied; nothing was changed in the cluster. {}:\n{}",
        count(problems.len(), "problem"),
        problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
    )]
    Invalid {
        commit: String,
        problems: Vec<Problem>,
    },
    #[error(
        "commit {commit} was not applied: fields of {} are held by other field managers \
         (changed outside git); nothing was changed in the cluster:\n{}\nRe-run with \
         --force-conflicts (in a GitSync: selfHeal) to take them back, or remove them from the \
         manifests",
        count(drift.len(), "object"),
        drift.iter().map(|d| format!("  - {d}")).collect::<Vec<_>>().join("\n")
    )]
    Drift { commit: String, drift: Vec<Drifted> },
    #[error(
        "commit {commit} was not applied: {} already in the cluster and kommit did not create \
         {}; nothing was changed in the cluster:\n{}\nTo take them over on purpose, sync with \
         --adopt (in a GitSync: spec.adopt: true) or annotate their manifests \
         kommit.dev/adopt: \"true\"; otherwise rename them in git",
        count(objects.len(), "object"),
        if objects.len() == 1 { "it" } else { "them" },
        objects.iter().map(|o| format!("  - {o}")).collect::<Vec<_>>().join("\n")
    )]
    Adopt {
        commit: String,
        objects: Vec<Unconsented>,
    },
    #[error(
        "refusing to prune {} ({}); nothing was changed. If this is intended, re-run with \
         --max-prune {} or --allow-mass-prune; if not, check --path, --rev and --namespace",
        count(.0.count, "object"), .0.reason, .0.count
    )]
    PruneGuard(PruneGuard),
    #[error(
        "the cluster is pinned to commit {pinned} (\"{subject}\") by `kommit rollback`; run \
         `kommit sync --unpin` to follow the branch again"
    )]
    Pinned { pinned: String, subject: String },
    #[error(
        "another kommit is syncing this source right now ({}, until {} at the latest); nothing \
         was changed: try again once it is done",
        .0.holder, .0.until
    )]
    Busy(audit::Held),
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

/// A decision together with what carrying it out takes.
pub struct Prepared {
    pub plan: Plan,
    pub inventory: String,
    /// How many live objects carry this source's inventory (prunes included).
    pub live_inventory: usize,
    /// Objects whose fields other managers took over (empty when conflicts are forced).
    pub drift: Vec<Drifted>,
    /// Existing objects kommit did not create and was not told to adopt.
    pub unconsented: Vec<Unconsented>,
    /// The uids of the live objects of this source's inventory (listed only when pruning).
    inventory_uids: Vec<String>,
    /// The kinds this source's objects may have once the plan is carried out (for the record).
    kinds: Option<BTreeSet<String>>,
    steps: Vec<Step>,
    api_version_of: HashMap<ObjectKey, String>,
}

impl Prepared {
    /// The apiVersion an object was planned with.
    pub fn api_version(&self, key: &ObjectKey) -> String {
        self.api_version_of
            .get(key)
            .cloned()
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
    /// Objects whose fields other managers hold (only reported by dry runs: a sync that finds
    /// any stops with [`ReconcileError::Drift`]).
    pub drift: Vec<Drifted>,
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
    fn new(plan: Plan, applied: Vec<(Action, ObjectKey)>) -> Self {
        SyncReport {
            plan,
            applied,
            dry_run: false,
            drift: Vec::new(),
            rollout: None,
            rollback: None,
            skipped: None,
            returned_to: Vec::new(),
            reverted: None,
        }
    }

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
    let loaded = load(source, cluster, target).await?;
    let store = RecordStore::new(
        cluster,
        &loaded.record_namespace(target, cluster),
        loaded.inventory(),
    );
    if policy.dry_run {
        let record = store.load().await?;
        let prepared = plan_loaded(cluster, loaded, policy, &record).await?;
        let mut report = SyncReport::new(prepared.plan, Vec::new());
        report.dry_run = true;
        report.drift = prepared.drift;
        return Ok(report);
    }
    // One sync of a source at a time, whoever runs it (two CLIs, a CLI and the operator): the
    // lock is taken before the first write and held until the record is written; a sync with
    // nothing to write takes none, so a no-op sync writes nothing at all.
    let mut lock = SyncLock {
        holder: audit::lock_holder(cluster.instance().unwrap_or("kommit")),
        held: None,
    };
    let outcome = sync_loaded(
        source, cluster, target, policy, progress, loaded, &store, &mut lock,
    )
    .await;
    if let Some(held) = lock.held {
        held.release().await;
    }
    outcome
}

/// This sync's claim on its source, taken only once it is about to write.
struct SyncLock {
    holder: String,
    held: Option<audit::SourceLock>,
}

impl SyncLock {
    /// Takes the lock if not yet held; then reads the record again, as the sync that held it
    /// before may have changed it.
    async fn before_writing(
        &mut self,
        store: &RecordStore,
        record: &mut audit::Record,
        policy: &Policy,
    ) -> Result<(), ReconcileError> {
        if self.held.is_some() {
            return Ok(());
        }
        let held = store
            .lock(&self.holder)
            .await?
            .map_err(ReconcileError::Busy)?;
        self.held = Some(held);
        *record = store.load().await?;
        if policy.unpin {
            record.pinned = None;
        }
        Ok(())
    }
}

/// [`sync`] after loading the commit.
#[allow(clippy::too_many_arguments)]
async fn sync_loaded(
    source: &GitSource,
    cluster: &mut Cluster,
    target: &Target,
    policy: &Policy,
    progress: &dyn Progress,
    loaded: Loaded,
    store: &RecordStore,
    lock: &mut SyncLock,
) -> Result<SyncReport, ReconcileError> {
    let mut record = store.load().await?;
    let commit = loaded.commit().clone();
    if let Some(skipped) = refuse_by_record(&mut record, &commit, policy)? {
        let mut report = SyncReport::new(
            Plan {
                source: loaded.source,
                changes: Vec::new(),
            },
            Vec::new(),
        );
        report.skipped = Some(skipped);
        return Ok(report);
    }
    let prepared = plan_loaded(cluster, loaded, policy, &record).await?;
    if prepared.steps.iter().any(|s| s.action.writes()) {
        lock.before_writing(store, &mut record, policy).await?;
    }
    let owned_before = (record.owned.clone(), record.owned_kinds.clone());
    let applied = match apply_prepared(source, cluster, &prepared, policy, &mut record).await {
        Ok(applied) => applied,
        Err(e) => {
            // What was written before the failure is this source's: remembered, or the next
            // sync would take it for someone else's.
            if (&record.owned, &record.owned_kinds) != (&owned_before.0, &owned_before.1) {
                store.save(&record).await?;
            }
            return Err(e);
        }
    };
    let owned_changed = (&record.owned, &record.owned_kinds) != (&owned_before.0, &owned_before.1);
    let mut report = SyncReport::new(prepared.plan.clone(), applied);
    let journal = Journal::new(source, cluster, policy, &commit, &prepared);
    let Some(wait_options) = &policy.wait else {
        journal.synced(&report.applied).await;
        if owned_changed || !(report.applied.is_empty() && journal.already_recorded(&record, false))
        {
            let note = "applied".to_string();
            journal
                .outcome(&mut record, Outcome::Applied, None, None, note)
                .await;
            store.save(&record).await?;
        }
        return Ok(report);
    };

    let outcome = wait::wait_healthy(
        cluster,
        &watched_objects(cluster, &prepared)?,
        wait_options,
        progress,
    )
    .await?;
    let WaitOutcome::Failed { object, reason, .. } = &outcome else {
        report.returned_to =
            history::remember_revisions(cluster, &prepared, &mut record, &commit).await?;
        journal.synced(&report.applied).await;
        for (key, first) in &report.returned_to {
            let note = format!(
                "commit {} returns to the revision first rolled out by {}",
                commit.short_sha(),
                crate::commit::short(first)
            );
            journal.event(key, false, "RolledBack", note).await;
        }
        let unchanged = report.applied.is_empty() && report.returned_to.is_empty();
        if owned_changed || !(unchanged && journal.already_recorded(&record, true)) {
            let note = "healthy".to_string();
            journal
                .outcome(&mut record, Outcome::Healthy, None, None, note)
                .await;
            store.save(&record).await?;
        }
        report.rollout = Some(outcome);
        return Ok(report);
    };

    let failed_key = prepared
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
    journal
        .warn(failed_key.as_ref(), "RolloutFailed", message)
        .await;
    let healthy_before = record.last_healthy.clone().filter(|c| *c != commit.sha);
    report.rollout = Some(outcome.clone());
    match healthy_before {
        Some(previous) if policy.auto_rollback => {
            lock.before_writing(store, &mut record, policy).await?;
            let (to, back_outcome) = roll_back(
                source,
                cluster,
                target,
                policy,
                progress,
                &previous,
                &mut record,
            )
            .await?;
            let message = format!(
                "rolled back to {} (\"{}\") after commit {} failed: {reason}",
                to.short_sha(),
                to.subject,
                commit.short_sha()
            );
            journal
                .warn(failed_key.as_ref(), "RolledBack", message)
                .await;
            let note = format!("failed and rolled back to {}: {why}", to.short_sha());
            journal
                .outcome(
                    &mut record,
                    Outcome::RolledBack,
                    Some(why.clone()),
                    Some(to.sha.clone()),
                    note,
                )
                .await;
            report.rollback = Some(Rollback {
                to,
                outcome: Some(back_outcome),
            });
        }
        _ => {
            let note = format!("failed: {why}");
            journal
                .outcome(&mut record, Outcome::Failed, Some(why.clone()), None, note)
                .await;
        }
    }
    store.save(&record).await?;
    if policy.revert_on_failure && source.is_local() {
        let failed = commit.clone();
        let reason = why.clone();
        report.reverted = Some(
            source
                .blocking(move |git| git.revert(&failed, Some(&reason)))
                .await?,
        );
    }
    Ok(report)
}

/// Puts the cluster back on `previous`, the last healthy commit, and waits for it.
async fn roll_back(
    source: &GitSource,
    cluster: &mut Cluster,
    target: &Target,
    policy: &Policy,
    progress: &dyn Progress,
    previous: &str,
    record: &mut audit::Record,
) -> Result<(CommitInfo, WaitOutcome), ReconcileError> {
    let target = Target {
        rev: Some(previous.to_string()),
        ..target.clone()
    };
    let policy = Policy {
        auto_rollback: false,
        ..policy.clone()
    };
    let loaded = load(source, cluster, &target).await?;
    let to = loaded.commit().clone();
    let back = plan_loaded(cluster, loaded, &policy, record).await?;
    apply_prepared(source, cluster, &back, &policy, record).await?;
    let wait_options = policy.wait.clone().unwrap_or_default();
    let outcome = wait::wait_healthy(
        cluster,
        &watched_objects(cluster, &back)?,
        &wait_options,
        progress,
    )
    .await?;
    Ok((to, outcome))
}

/// What the record says against applying this commit: an error for a pin, a message for a commit
/// whose rollout failed before (not retried until git moves on).
fn refuse_by_record(
    record: &mut audit::Record,
    commit: &CommitInfo,
    policy: &Policy,
) -> Result<Option<String>, ReconcileError> {
    if let Some(pin) = &record.pinned
        && pin.commit != commit.sha
        && !policy.unpin
    {
        return Err(ReconcileError::Pinned {
            pinned: crate::commit::short(&pin.commit),
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
        return Ok(Some(format!(
            "commit {} was not applied: its rollout failed before ({reason}); push a new \
             commit, or re-run with --retry to try it again",
            commit.short_sha()
        )));
    }
    Ok(None)
}

/// A pull request's report: what its head changes against its base (manifests against
/// manifests), and what merging it would apply to the live cluster (the head planned against
/// this source's objects, as `kommit diff` plans it). Nothing is written.
pub async fn review(
    source: &GitSource,
    cluster: &Cluster,
    target: &Target,
    base: &str,
    head: &str,
    policy: &Policy,
) -> Result<crate::plan::review::Review, ReconcileError> {
    let at = |rev: &str| Target {
        rev: Some(rev.to_string()),
        ..target.clone()
    };
    let base_loaded = load(source, cluster, &at(base)).await?;
    let head_loaded = load(source, cluster, &at(head)).await?;
    let changes =
        crate::plan::review::changes_between(&base_loaded.desired, &head_loaded.desired, "base");
    let record = RecordStore::new(
        cluster,
        &head_loaded.record_namespace(target, cluster),
        head_loaded.inventory(),
    )
    .load()
    .await?;
    let head_source = head_loaded.source.clone();
    let policy = Policy {
        dry_run: true,
        ..policy.clone()
    };
    let live = plan_loaded(cluster, head_loaded, &policy, &record).await?;
    Ok(crate::plan::review::Review {
        base: base_loaded.source,
        head: head_source,
        changes,
        live: live.plan,
    })
}

/// Reads the commit and plans it against the cluster. Nothing is written.
pub async fn prepare(
    source: &GitSource,
    cluster: &Cluster,
    target: &Target,
    policy: &Policy,
) -> Result<Prepared, ReconcileError> {
    let loaded = load(source, cluster, target).await?;
    let record = RecordStore::new(
        cluster,
        &loaded.record_namespace(target, cluster),
        loaded.inventory(),
    )
    .load()
    .await?;
    plan_loaded(cluster, loaded, policy, &record).await
}

/// Observes the cluster for loaded objects and decides what to do, with what `record` says this
/// source owns. Nothing is written.
pub async fn plan_loaded(
    cluster: &Cluster,
    loaded: Loaded,
    policy: &Policy,
    record: &audit::Record,
) -> Result<Prepared, ReconcileError> {
    let span = tracing::info_span!("plan", repo = %loaded.source.repo, commit = %loaded.source.commit.short_sha());
    let Loaded {
        desired,
        source,
        inventory,
    } = loaded;
    let observations = tracing::Instrument::instrument(
        observe::observe_objects(cluster, &desired, policy),
        span.clone(),
    )
    .await?;
    let desired_kinds: BTreeSet<String> = desired
        .iter()
        .map(|d| inventory::kind_key(&d.key.group, &d.key.kind))
        .collect();
    // Searching the cluster for this source's objects is only worth it when something may be
    // pruned.
    let (mut live, listed_kinds) = if policy.prune {
        let (live, kinds) = tracing::Instrument::instrument(
            inventory::observe_inventory(
                cluster,
                &inventory,
                &desired,
                &policy.prune_namespaces,
                record.owned_kinds.as_ref(),
            ),
            span,
        )
        .await?;
        (live, Some(kinds))
    } else {
        (decide::Inventory::default(), None)
    };
    live.id = inventory.clone();
    live.recorded = record.owned.clone();
    let kinds = kinds_after(
        record.owned_kinds.as_ref(),
        &desired_kinds,
        listed_kinds.as_ref(),
    );
    let inventory_uids = live
        .objects
        .iter()
        .filter(|o| live.owner_of(&o.object) == decide::Owner::ThisSource)
        .filter_map(|o| o.object.pointer("/metadata/uid").and_then(|u| u.as_str()))
        .map(str::to_string)
        .collect();
    let commit = source.commit.short_sha().to_string();
    let options = decide::Options {
        prune: policy.prune,
        force_conflicts: policy.force_conflicts,
        adopt: policy.adopt,
    };
    let decision = decide::decide(source, desired, observations, live, options)
        .map_err(|problems| ReconcileError::Invalid { commit, problems })?;
    let api_version_of = decision
        .steps
        .iter()
        .map(|s| (s.key.clone(), s.api_version.clone()))
        .collect();
    Ok(Prepared {
        plan: decision.plan,
        inventory,
        live_inventory: decision.live_inventory,
        drift: decision.drift,
        unconsented: decision.unconsented,
        inventory_uids,
        kinds,
        steps: decision.steps,
        api_version_of,
    })
}

/// The kinds this source's objects may have once a plan is carried out: when the cluster was
/// searched, those found there (or not searchable) and the commit's; when not, those recorded
/// before and the commit's, or `None` (search every kind) if nothing was recorded before.
fn kinds_after(
    before: Option<&BTreeSet<String>>,
    desired: &BTreeSet<String>,
    listed: Option<&BTreeSet<String>>,
) -> Option<BTreeSet<String>> {
    let base = listed.or(before)?;
    Some(base.union(desired).cloned().collect())
}

/// Applies a prepared commit, unless it would prune too much, overwrite fields others took over
/// or take over objects kommit did not create; then nothing is written. The uids of what this
/// source owns afterwards go into `record` (also when the apply stops part-way).
async fn apply_prepared(
    source: &GitSource,
    cluster: &mut Cluster,
    prepared: &Prepared,
    policy: &Policy,
    record: &mut audit::Record,
) -> Result<Vec<(Action, ObjectKey)>, ReconcileError> {
    check_prune_guard(prepared, policy)?;
    let commit = &prepared.plan.source.commit;
    if !prepared.unconsented.is_empty() {
        return Err(ReconcileError::Adopt {
            commit: commit.short_sha().to_string(),
            objects: prepared.unconsented.clone(),
        });
    }
    if !prepared.drift.is_empty() {
        return Err(ReconcileError::Drift {
            commit: commit.short_sha().to_string(),
            drift: prepared.drift.clone(),
        });
    }
    let attribution = apply::attribution(source, prepared).await?;
    let span = tracing::info_span!("apply", repo = %source.display(), commit = %commit.short_sha());
    let mut applied = apply::Applied::default();
    let outcome = tracing::Instrument::instrument(
        apply::apply_steps(cluster, prepared, &attribution, policy, &mut applied),
        span,
    )
    .await;
    record.owned = Some(owned_after(
        prepared,
        record.owned.as_ref(),
        &applied,
        policy.prune,
    ));
    record.owned_kinds = prepared.kinds.clone();
    outcome.map(|()| applied.done)
}

/// The uids this source owns after carrying `prepared` out as far as `applied` got: what it
/// owned before, less what it pruned or replaced, plus everything of the commit now in the
/// cluster.
fn owned_after(
    prepared: &Prepared,
    before: Option<&BTreeSet<String>>,
    applied: &apply::Applied,
    listed_inventory: bool,
) -> BTreeSet<String> {
    let mut owned = before.cloned().unwrap_or_default();
    // Before kommit kept uids, the inventory label was the record: what it listed stays ours.
    if before.is_none() && listed_inventory {
        owned.extend(prepared.inventory_uids.iter().cloned());
    }
    let done: std::collections::HashSet<(Action, &ObjectKey)> =
        applied.done.iter().map(|(a, k)| (*a, k)).collect();
    for step in &prepared.steps {
        let written = done.contains(&(step.action, &step.key));
        match step.action {
            Action::Prune | Action::Replace if written => {
                if let Some(uid) = &step.live_uid {
                    owned.remove(uid);
                }
            }
            Action::Unchanged => owned.extend(step.live_uid.iter().cloned()),
            _ => {}
        }
        if step.action != Action::Prune
            && let Some(uid) = applied.uids.get(&step.key)
        {
            owned.insert(uid.clone());
        }
    }
    owned
}

/// Checks the prune guard: a sync that would delete a whole app, or many objects, needs consent.
pub fn check_prune_guard(prepared: &Prepared, policy: &Policy) -> Result<(), ReconcileError> {
    let count = prepared.plan.summary().prune;
    if count == 0 || policy.allow_mass_prune {
        return Ok(());
    }
    let guard = |reason: String| Err(ReconcileError::PruneGuard(PruneGuard { count, reason }));
    if count >= prepared.live_inventory {
        return guard("that is every object this source has in the cluster".to_string());
    }
    if count > policy.max_prune {
        return guard(format!("more than --max-prune {}", policy.max_prune));
    }
    Ok(())
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
            None => cluster.resolve(&step.api_version, &step.key.kind).ok(),
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
                past_deadline: false,
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
    let mut record = load_record(source, cluster, target, &report.plan).await?;
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
    let namespace = RecordNamespace::of(target, &report.plan, cluster);
    RecordStore::new(cluster, namespace.name(), &inventory_id(source, target))
        .save(&record)
        .await?;
    Ok(report)
}

/// `kommit revert REV` in a local repository: the revert commit, made off the async threads.
pub async fn revert_commit(
    source: &GitSource,
    commit: &CommitInfo,
) -> Result<CommitInfo, ReconcileError> {
    let commit = commit.clone();
    Ok(source
        .blocking(move |git| git.revert(&commit, None))
        .await?)
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
                None => cluster.resolve(&s.api_version, &s.key.kind)?,
            };
            Ok(Watched {
                key: s.key.clone(),
                resource,
            })
        })
        .collect()
}

/// The operator spawns each sync as a task of its own: the whole pipeline must be `Send` for
/// any lifetime of what it borrows (a compile-time check; never called).
#[allow(dead_code)]
fn sync_is_send(source: GitSource, mut cluster: Cluster, target: Target, policy: Policy) {
    std::mem::drop(tokio::spawn(async move {
        let _ = sync(&source, &mut cluster, &target, &policy, &Quiet).await;
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_recorded_kinds_are_what_was_found_and_the_commits_else_what_was_recorded() {
        let desired = kinds(&["apps/Deployment"]);
        // Searched: a kind recorded before but found empty is dropped.
        assert_eq!(
            kinds_after(
                Some(&kinds(&["/ConfigMap", "apps/Deployment"])),
                &desired,
                Some(&kinds(&["/Secret"]))
            ),
            Some(kinds(&["/Secret", "apps/Deployment"]))
        );
        // Not searched (no prune): what was recorded may still be there.
        assert_eq!(
            kinds_after(Some(&kinds(&["/ConfigMap"])), &desired, None),
            Some(kinds(&["/ConfigMap", "apps/Deployment"]))
        );
        // Never recorded and not searched: unknown, so every kind is searched next time.
        assert_eq!(kinds_after(None, &desired, None), None);
        assert_eq!(
            kinds_after(None, &desired, Some(&BTreeSet::new())),
            Some(desired.clone())
        );
    }
}
