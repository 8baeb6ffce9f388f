//! Continuous mode, one policy for `kommit watch` and the GitSync operator: given the branch's
//! head and what was last applied, what to do now. Pure, so both faces behave the same and the
//! rule has unit tests.

use std::time::Duration;

use super::Policy;

/// What keeping the cluster on a branch asks for at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// Git moved (or nothing was applied yet): sync the head commit.
    SyncCommit,
    /// The head is applied; look for drift without writing (self-heal off).
    CheckDrift,
    /// The head is applied; sync it again taking back fields others changed (self-heal on). A
    /// cluster without drift makes this a no-op: nothing is written.
    HealDrift,
    /// The head is applied and was checked recently; look again after this long.
    Wait(Duration),
}

/// What the loop knows when it decides.
#[derive(Debug, Clone, Copy)]
pub struct State<'a> {
    pub head: &'a str,
    /// The commit the cluster was last synced to, if any.
    pub applied: Option<&'a str>,
    /// Since the last sync or drift check; `None` forces a look now (a new spec, a webhook).
    pub since_last_look: Option<Duration>,
    pub interval: Duration,
    pub self_heal: bool,
}

pub fn next_step(state: State<'_>) -> NextStep {
    if state.applied != Some(state.head) {
        return NextStep::SyncCommit;
    }
    if let Some(since) = state.since_last_look
        && since < state.interval
    {
        return NextStep::Wait(state.interval - since);
    }
    if state.self_heal {
        NextStep::HealDrift
    } else {
        NextStep::CheckDrift
    }
}

/// The sync policy for a step: `base` is how the user asked syncs to be made. A drift check is a
/// dry run that reports fields others took over; healing takes them back.
pub fn policy_for(step: &NextStep, base: &Policy) -> Policy {
    match step {
        NextStep::CheckDrift => Policy {
            dry_run: true,
            force_conflicts: false,
            ..base.clone()
        },
        NextStep::HealDrift => Policy {
            force_conflicts: true,
            ..base.clone()
        },
        NextStep::SyncCommit | NextStep::Wait(_) => base.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state<'a>(
        head: &'a str,
        applied: Option<&'a str>,
        since: Option<u64>,
        heal: bool,
    ) -> State<'a> {
        State {
            head,
            applied,
            since_last_look: since.map(Duration::from_secs),
            interval: Duration::from_secs(60),
            self_heal: heal,
        }
    }

    #[test]
    fn a_new_commit_is_synced_whatever_else_holds() {
        assert_eq!(
            next_step(state("b", Some("a"), Some(1), false)),
            NextStep::SyncCommit
        );
        assert_eq!(
            next_step(state("b", None, None, true)),
            NextStep::SyncCommit
        );
    }

    #[test]
    fn an_applied_commit_is_checked_or_healed_once_per_interval() {
        assert_eq!(
            next_step(state("a", Some("a"), Some(20), false)),
            NextStep::Wait(Duration::from_secs(40))
        );
        assert_eq!(
            next_step(state("a", Some("a"), Some(60), false)),
            NextStep::CheckDrift
        );
        assert_eq!(
            next_step(state("a", Some("a"), Some(61), true)),
            NextStep::HealDrift
        );
        // A request (webhook, new spec) looks at once.
        assert_eq!(
            next_step(state("a", Some("a"), None, false)),
            NextStep::CheckDrift
        );
    }

    #[test]
    fn checks_never_write_and_never_force_healing_takes_fields_back() {
        let base = Policy {
            prune: true,
            ..Policy::default()
        };
        let check = policy_for(&NextStep::CheckDrift, &base);
        assert!(check.dry_run && !check.force_conflicts && check.prune);
        let heal = policy_for(&NextStep::HealDrift, &base);
        assert!(!heal.dry_run && heal.force_conflicts);
        let sync = policy_for(&NextStep::SyncCommit, &base);
        assert!(!sync.dry_run && !sync.force_conflicts);
    }
}
