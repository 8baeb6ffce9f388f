//! Continuous mode: keep the cluster on a branch's head. A local repository is watched with
//! notify (its git directory, so only a new commit triggers, never an edit of the work tree); a
//! remote one is fetched every interval, backing off with jitter on errors. Drift (someone
//! edited a synced object) is reported, and reverted when self-heal is on.

use std::time::Duration;

use notify_debouncer_full::notify::RecursiveMode;
use tokio::sync::mpsc;

use super::continuous::{self, NextStep};
use super::{Policy, Progress, ReconcileError, SyncReport, Target, sync};
use crate::cluster::Cluster;
use crate::plan::Plan;
use crate::source::GitSource;

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// How each sync is done (prune, rollout waiting, auto-rollback, ...).
    pub policy: Policy,
    /// How often to fetch a remote repository and to look for drift.
    pub interval: Duration,
    /// Re-apply the commit when the live objects drifted from it.
    pub self_heal: bool,
}

/// What the loop did, for the caller to show or count.
#[derive(Debug)]
pub enum WatchEvent {
    /// A new commit was synced (or skipped: see the report).
    Synced(Box<SyncReport>),
    /// The cluster drifted from the synced commit.
    Drift { plan: Box<Plan>, healed: bool },
    /// A sync or fetch failed; the loop goes on.
    Error { message: String, retry_in: Duration },
}

/// Runs until `shutdown` completes. What to do at each look is [`continuous::next_step`], the
/// same rule the operator follows.
pub async fn watch(
    source: &GitSource,
    cluster: &mut Cluster,
    target: &Target,
    options: &WatchOptions,
    progress: &dyn Progress,
    on_event: &(dyn Fn(WatchEvent) + Send + Sync),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ReconcileError> {
    tokio::pin!(shutdown);
    let (trigger, mut triggered) = mpsc::unbounded_channel::<()>();
    // Keep the watcher alive for the whole loop.
    let _watcher = if source.is_local() {
        Some(watch_git_dir(source, trigger.clone())?)
    } else {
        None
    };
    let mut synced: Option<String> = None;
    let mut failures: u32 = 0;
    let mut wait = Duration::ZERO;
    let mut last_look = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            Some(()) = triggered.recv() => {
                // Coalesce a burst of file events into one look.
                while triggered.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(wait) => {}
        }
        if !source.is_local() {
            match source.blocking(|git| git.fetch()).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    let retry_in = backoff(options.interval, failures);
                    on_event(WatchEvent::Error {
                        message: e.to_string(),
                        retry_in,
                    });
                    wait = retry_in;
                    continue;
                }
            }
        }
        wait = options.interval;
        let rev = target.rev.clone();
        let head = match source
            .blocking(move |git| git.resolve(rev.as_deref()))
            .await
        {
            Ok(head) => head,
            Err(e) => {
                on_event(WatchEvent::Error {
                    message: e.to_string(),
                    retry_in: wait,
                });
                continue;
            }
        };
        let step = continuous::next_step(continuous::State {
            head: &head.sha,
            applied: synced.as_deref(),
            since_last_look: Some(last_look.elapsed()),
            interval: options.interval,
            self_heal: options.self_heal,
        });
        let policy = continuous::policy_for(&step, &options.policy);
        let pinned_target = Target {
            rev: Some(head.sha.clone()),
            ..target.clone()
        };
        match step {
            NextStep::Wait(left) => {
                wait = left;
                continue;
            }
            NextStep::SyncCommit => {
                match sync(source, cluster, &pinned_target, &policy, progress).await {
                    Ok(report) => {
                        synced = Some(head.sha.clone());
                        last_look = tokio::time::Instant::now();
                        on_event(WatchEvent::Synced(Box::new(report)));
                    }
                    // A commit that cannot be applied stays unapplied until git moves on.
                    Err(e @ ReconcileError::Invalid { .. }) => {
                        synced = Some(head.sha.clone());
                        on_event(WatchEvent::Error {
                            message: e.to_string(),
                            retry_in: wait,
                        });
                    }
                    Err(e) => {
                        failures += 1;
                        wait = backoff(options.interval, failures);
                        on_event(WatchEvent::Error {
                            message: e.to_string(),
                            retry_in: wait,
                        });
                    }
                }
            }
            NextStep::CheckDrift | NextStep::HealDrift => {
                last_look = tokio::time::Instant::now();
                let healing = step == NextStep::HealDrift;
                match sync(source, cluster, &pinned_target, &policy, progress).await {
                    Ok(report) if healing && !report.applied.is_empty() => {
                        on_event(WatchEvent::Drift {
                            plan: Box::new(report.plan),
                            healed: true,
                        })
                    }
                    Ok(report) if !healing && report.plan.summary().has_changes() => {
                        on_event(WatchEvent::Drift {
                            plan: Box::new(report.plan),
                            healed: false,
                        })
                    }
                    Ok(_) => {}
                    Err(e) => on_event(WatchEvent::Error {
                        message: format!(
                            "{} failed: {e}",
                            if healing { "self-heal" } else { "drift check" }
                        ),
                        retry_in: wait,
                    }),
                }
            }
        }
    }
}

/// `interval × 2^failures`, at most ten minutes, with ±20% jitter so that many watchers do not
/// hammer a recovering server in step.
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let base = interval
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(Duration::from_secs(600));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let factor = 0.8 + f64::from(nanos % 1000) / 1000.0 * 0.4;
    base.mul_f64(factor)
}

/// Watches the repository's git directory (refs, packed refs, HEAD): a commit, fetch or branch
/// switch triggers a look; editing the work tree does not (nothing there changes HEAD's SHA).
fn watch_git_dir(
    source: &GitSource,
    trigger: mpsc::UnboundedSender<()>,
) -> Result<
    notify_debouncer_full::Debouncer<
        notify_debouncer_full::notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
    ReconcileError,
> {
    let git_dir = source.git_dir();
    let mut debouncer = notify_debouncer_full::new_debouncer(
        Duration::from_millis(200),
        None,
        move |result: notify_debouncer_full::DebounceEventResult| {
            if result.is_ok_and(|events| !events.is_empty()) {
                let _ = trigger.send(());
            }
        },
    )
    .map_err(|e| {
        ReconcileError::Source(crate::source::SourceError::Git {
            repo: git_dir.display().to_string(),
            message: format!("cannot watch the repository: {e}"),
        })
    })?;
    debouncer
        .watch(&git_dir, RecursiveMode::Recursive)
        .map_err(|e| {
            ReconcileError::Source(crate::source::SourceError::Git {
                repo: git_dir.display().to_string(),
                message: format!("cannot watch the repository: {e}"),
            })
        })?;
    Ok(debouncer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let interval = Duration::from_secs(10);
        let first = backoff(interval, 1);
        assert!(
            first >= Duration::from_secs(16) && first <= Duration::from_secs(24),
            "{first:?}"
        );
        let capped = backoff(interval, 30);
        assert!(
            capped <= Duration::from_secs(720) && capped >= Duration::from_secs(480),
            "{capped:?}"
        );
    }
}
