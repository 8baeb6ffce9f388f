//! What is written down about syncs: a record per source in the cluster (outcomes, the last
//! healthy commit, failed commits, a pin), Kubernetes Events on the objects concerned, and
//! optionally git notes under `refs/notes/kommit`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, ClusterError};
use crate::commit::CommitInfo;
use crate::object::{FIELD_MANAGER, ObjectKey};

/// Label on a record naming the inventory it belongs to (records never carry the inventory
/// label itself, so prune can never delete them).
pub const RECORD_LABEL: &str = "kommit.dev/record-of";
/// How many sync outcomes a record keeps.
pub const HISTORY_LIMIT: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Applied, health not waited for.
    Applied,
    Healthy,
    Failed,
    /// Failed, and the cluster was put back on the last healthy commit.
    RolledBack,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Healthy => "healthy",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolled back",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub commit: String,
    pub subject: String,
    pub author: String,
    /// When the sync finished (RFC 3339).
    pub time: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a rollback (automatic or `kommit rollback`): the commit the cluster went back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pin {
    pub commit: String,
    pub subject: String,
    pub time: String,
}

/// Everything kommit remembers about one source in one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// Newest first.
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_healthy: Option<String>,
    /// The commit applied last (whatever its outcome).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied: Option<String>,
    /// Commits whose rollout failed: not retried until git moves on or the user asks.
    #[serde(default)]
    pub failed: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<Pin>,
    /// Pod-template hash of each Deployment revision → the commit that first rolled it out.
    #[serde(default)]
    pub templates: BTreeMap<String, String>,
    /// The uids of the objects this source created or adopted: all that prune may delete and
    /// all that a sync updates without adopting. `None` in records older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned: Option<BTreeSet<String>>,
}

impl Record {
    pub fn push(&mut self, entry: HistoryEntry) {
        match entry.outcome {
            Outcome::Healthy => {
                self.last_healthy = Some(entry.commit.clone());
                self.failed.retain(|c| c != &entry.commit);
            }
            Outcome::Failed | Outcome::RolledBack => {
                if !self.failed.contains(&entry.commit) {
                    self.failed.push(entry.commit.clone());
                }
                self.failed.truncate(HISTORY_LIMIT);
            }
            Outcome::Applied => {}
        }
        self.last_applied = Some(
            entry
                .rolled_back_to
                .clone()
                .unwrap_or_else(|| entry.commit.clone()),
        );
        self.history.insert(0, entry);
        self.history.truncate(HISTORY_LIMIT);
    }

    pub fn has_failed(&self, commit: &str) -> bool {
        self.failed.iter().any(|c| c == commit)
    }

    /// The outcomes recorded for a commit, newest first.
    pub fn outcomes_of<'a>(&'a self, commit: &'a str) -> impl Iterator<Item = &'a HistoryEntry> {
        self.history.iter().filter(move |e| e.commit == commit)
    }
}

pub fn entry(
    commit: &CommitInfo,
    outcome: Outcome,
    reason: Option<String>,
    rolled_back_to: Option<String>,
) -> HistoryEntry {
    HistoryEntry {
        commit: commit.sha.clone(),
        subject: commit.subject.clone(),
        author: commit.author.clone(),
        time: now_rfc3339(),
        outcome,
        reason,
        rolled_back_to,
    }
}

pub fn now_rfc3339() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    crate::source::format_rfc3339(seconds)
}

/// Where a record lives: a ConfigMap named after the inventory, in the target namespace.
#[derive(Debug, Clone)]
pub struct RecordStore {
    api: Api<ConfigMap>,
    name: String,
    inventory: String,
    namespace: String,
}

impl RecordStore {
    pub fn new(cluster: &Cluster, namespace: &str, inventory: &str) -> Self {
        let mut name = format!("kommit-record-{inventory}");
        name.truncate(253);
        RecordStore {
            api: Api::namespaced(cluster.client().clone(), namespace),
            name,
            inventory: inventory.to_string(),
            namespace: namespace.to_string(),
        }
    }

    pub fn location(&self) -> String {
        format!("ConfigMap {}/{}", self.namespace, self.name)
    }

    pub async fn load(&self) -> Result<Record, ClusterError> {
        let found = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| ClusterError::Api {
                object: self.location(),
                action: "read",
                message: e.to_string(),
                code: 0,
            })?;
        let Some(config_map) = found else {
            return Ok(Record::default());
        };
        let text = config_map
            .data
            .as_ref()
            .and_then(|d| d.get("record.json"))
            .cloned()
            .unwrap_or_default();
        if text.is_empty() {
            return Ok(Record::default());
        }
        serde_json::from_str(&text).map_err(|e| ClusterError::Api {
            object: self.location(),
            action: "read",
            message: format!("the record is not valid ({e}); delete it to start a new one"),
            code: 0,
        })
    }

    pub async fn save(&self, record: &Record) -> Result<(), ClusterError> {
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {RECORD_LABEL: self.inventory, "app.kubernetes.io/managed-by": "kommit"},
            },
            "data": {"record.json": serde_json::to_string_pretty(record).unwrap_or_default()},
        });
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Api {
                object: self.location(),
                action: "write",
                message: e.to_string(),
                code: 0,
            })
    }
}

/// Publishes Kubernetes Events on the objects a sync concerns.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

impl Events {
    pub fn new(cluster: &Cluster) -> Self {
        let reporter = Reporter {
            controller: "kommit".into(),
            instance: cluster.instance().map(str::to_string),
        };
        Events {
            recorder: Recorder::new(cluster.client().clone(), reporter),
        }
    }

    /// Best effort: an event that cannot be written is logged, never fails the sync.
    pub async fn publish(
        &self,
        key: &ObjectKey,
        api_version: &str,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let reference = ObjectReference {
            api_version: Some(api_version.to_string()),
            kind: Some(key.kind.clone()),
            name: Some(key.name.clone()),
            namespace: key.namespace.clone(),
            ..ObjectReference::default()
        };
        let mut note = note;
        // The Events API limits notes to 1 KiB.
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note),
            action: "Sync".to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(object = %key, error = %e, "could not publish an event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(sha: &str) -> CommitInfo {
        CommitInfo {
            sha: sha.repeat(40),
            author: "Ada".into(),
            email: "ada@x".into(),
            time: 0,
            subject: format!("commit {sha}"),
        }
    }

    #[test]
    fn a_record_remembers_the_last_healthy_and_the_failed_commits() {
        let mut record = Record::default();
        record.push(entry(&commit("a"), Outcome::Healthy, None, None));
        record.push(entry(
            &commit("b"),
            Outcome::RolledBack,
            Some("crash loop".into()),
            Some("a".repeat(40)),
        ));
        assert_eq!(record.last_healthy, Some("a".repeat(40)));
        assert_eq!(
            record.last_applied,
            Some("a".repeat(40)),
            "after a rollback the cluster is on a"
        );
        assert!(record.has_failed(&"b".repeat(40)));
        assert_eq!(record.history[0].outcome, Outcome::RolledBack);
        // A later healthy sync of b (the user asked to retry) clears it.
        record.push(entry(&commit("b"), Outcome::Healthy, None, None));
        assert!(!record.has_failed(&"b".repeat(40)));
        assert_eq!(record.outcomes_of(&"b".repeat(40)).count(), 2);
    }

    #[test]
    fn history_is_bounded_and_round_trips_as_json() {
        let mut record = Record::default();
        for i in 0..(HISTORY_LIMIT + 10) {
            record.push(entry(
                &commit(&format!("{}", i % 10)),
                Outcome::Applied,
                None,
                None,
            ));
        }
        assert_eq!(record.history.len(), HISTORY_LIMIT);
        let text = serde_json::to_string(&record).unwrap();
        assert!(text.contains("\"outcome\":\"applied\""));
        let back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(back, record);
    }
}
