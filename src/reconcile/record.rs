//! Step six: what is written down after a sync: Events on the objects concerned, the outcome in
//! the source's record, and (on request, in a local repository) a git note on the commit.

use futures::{FutureExt, StreamExt, stream};

use super::{CONCURRENCY, Policy, Prepared};
use crate::audit::{self, Events, Outcome, Record};
use crate::cluster::Cluster;
use crate::commit::CommitInfo;
use crate::object::ObjectKey;
use crate::plan::Action;
use crate::source::GitSource;

/// How long the Events of one sync may take to write, all together.
const EVENTS_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes down the outcome of one commit's sync.
pub(super) struct Journal<'a> {
    pub source: &'a GitSource,
    /// The API server, named in git notes.
    pub server: String,
    pub policy: &'a Policy,
    pub commit: &'a CommitInfo,
    pub prepared: &'a Prepared,
    pub events: Events,
}

impl<'a> Journal<'a> {
    pub fn new(
        source: &'a GitSource,
        cluster: &Cluster,
        policy: &'a Policy,
        commit: &'a CommitInfo,
        prepared: &'a Prepared,
    ) -> Self {
        Journal {
            source,
            server: cluster.server().to_string(),
            policy,
            commit,
            prepared,
            events: Events::new(cluster),
        }
    }

    /// A "Synced" Event on every object the sync wrote (prunes aside: they are gone).
    pub async fn synced(&self, applied: &[(Action, ObjectKey)]) {
        let note = format!(
            "synced commit {} (\"{}\") by {}",
            self.commit.short_sha(),
            self.commit.subject,
            self.commit.author
        );
        let publishing: Vec<_> = applied
            .iter()
            .filter(|(action, _)| *action != Action::Prune)
            .map(|(_, key)| self.event(key, false, "Synced", note.clone()).boxed())
            .collect();
        let all = stream::iter(publishing)
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<()>>();
        // Best effort, and bounded: a server that stopped answering after the writes must not
        // hold the sync for one timeout per object.
        if tokio::time::timeout(EVENTS_BUDGET, all).await.is_err() {
            tracing::warn!(
                "not every Synced Event was written within {}s; the sync itself is done",
                EVENTS_BUDGET.as_secs()
            );
        }
    }

    pub async fn event(&self, key: &ObjectKey, warning: bool, reason: &str, note: String) {
        let api_version = self.prepared.api_version(key);
        self.events
            .publish(key, &api_version, warning, reason, note)
            .await;
    }

    /// A warning on the object a failure concerns, when it is one of the commit's objects.
    pub async fn warn(&self, key: Option<&ObjectKey>, reason: &str, note: String) {
        if let Some(key) = key {
            self.event(key, true, reason, note).await;
        }
    }

    /// True when the record already says what this sync found, so it need not be written.
    pub fn already_recorded(&self, record: &Record, healthy: bool) -> bool {
        let sha = self.commit.sha.as_str();
        record.last_applied.as_deref() == Some(sha)
            && (!healthy || record.last_healthy.as_deref() == Some(sha))
            && !self.policy.unpin
    }

    /// Adds an outcome to the record (saved by the caller) and, if asked, a git note.
    pub async fn outcome(
        &self,
        record: &mut Record,
        outcome: Outcome,
        reason: Option<String>,
        rolled_back_to: Option<String>,
        note: String,
    ) {
        record.push(audit::entry(self.commit, outcome, reason, rolled_back_to));
        self.note(note).await;
    }

    async fn note(&self, outcome: String) {
        if !self.policy.record_notes || !self.source.is_local() {
            return;
        }
        let text = format!(
            "kommit: {} {} on {}",
            audit::now_rfc3339(),
            outcome,
            self.server
        );
        let commit = self.commit.clone();
        let written = self
            .source
            .blocking(move |git| git.add_note(&commit, &text))
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not write the git note");
        }
    }
}
