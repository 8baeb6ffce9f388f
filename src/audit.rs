//! What is written down about syncs: a record per source in the cluster (outcomes, the last
//! healthy commit, failed commits, a pin), Kubernetes Events on the objects concerned, and
//! optionally git notes under `refs/notes/kommit`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, ClusterError, Fence};
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
    /// The kinds (`group/Kind`) this source's objects may have in the cluster: where prune
    /// looks for them, instead of listing every kind the cluster serves. `None` in records
    /// older than this field (every kind is searched, and the field is written then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned_kinds: Option<BTreeSet<String>>,
    /// The keys of `templates` in the order they were added, oldest first (for eviction).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub template_order: Vec<String>,
}

/// How many Deployment revisions a record remembers.
pub const TEMPLATE_LIMIT: usize = 1_000;
/// How long a recorded reason may be; the rest is cut with a note.
const REASON_LIMIT: usize = 2_000;
/// The most a record may weigh, well under the 1 MiB an object may: the oldest history goes
/// first when it grows past this.
pub const RECORD_BYTES_LIMIT: usize = 512 * 1024;

impl Record {
    pub fn push(&mut self, entry: HistoryEntry) {
        match entry.outcome {
            Outcome::Healthy => {
                self.last_healthy = Some(entry.commit.clone());
                self.failed.retain(|c| c != &entry.commit);
            }
            Outcome::Failed | Outcome::RolledBack => {
                // Newest first, so that the bound forgets the oldest failures.
                self.failed.retain(|c| c != &entry.commit);
                self.failed.insert(0, entry.commit.clone());
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
        let mut entry = entry;
        if let Some(reason) = &mut entry.reason
            && reason.len() > REASON_LIMIT
        {
            let cut: String = reason.chars().take(REASON_LIMIT).collect();
            *reason = format!("{cut}… (cut)");
        }
        self.history.insert(0, entry);
        self.history.truncate(HISTORY_LIMIT);
    }

    /// Remembers the commit that first rolled a Deployment revision out; the oldest revisions
    /// are forgotten beyond [`TEMPLATE_LIMIT`].
    pub fn remember_template(&mut self, id: String, commit: &str) {
        if self.templates.contains_key(&id) {
            return;
        }
        self.templates.insert(id.clone(), commit.to_string());
        self.template_order.push(id);
        // Revisions recorded before the order was kept are the oldest.
        if self.template_order.len() < self.templates.len() {
            let ordered: BTreeSet<&String> = self.template_order.iter().collect();
            let older: Vec<String> = self
                .templates
                .keys()
                .filter(|k| !ordered.contains(k))
                .cloned()
                .collect();
            self.template_order.splice(0..0, older);
        }
        while self.templates.len() > TEMPLATE_LIMIT && !self.template_order.is_empty() {
            let oldest = self.template_order.remove(0);
            self.templates.remove(&oldest);
        }
    }

    /// What a record read from the cluster must hold to be trusted: commit ids, not text.
    fn check(&self) -> Result<(), String> {
        let commits = self
            .history
            .iter()
            .map(|e| e.commit.as_str())
            .chain(self.last_healthy.as_deref())
            .chain(self.last_applied.as_deref())
            .chain(self.failed.iter().map(String::as_str))
            .chain(self.pinned.as_ref().map(|p| p.commit.as_str()))
            .chain(self.templates.values().map(String::as_str));
        for commit in commits {
            if !crate::commit::is_commit_id(commit) {
                let shown: String = commit.chars().take(50).collect();
                return Err(format!("{shown:?} is not a commit id"));
            }
        }
        Ok(())
    }

    /// The record as stored: JSON, with the oldest history dropped until it fits
    /// [`RECORD_BYTES_LIMIT`].
    fn to_stored(&self) -> Result<String, String> {
        let mut record = self.clone();
        loop {
            let text = serde_json::to_string(&record).map_err(|e| e.to_string())?;
            if text.len() <= RECORD_BYTES_LIMIT {
                return Ok(text);
            }
            if record.history.len() > 1 {
                let keep = record.history.len() / 2;
                record.history.truncate(keep);
            } else if !record.template_order.is_empty() {
                let drop = record.template_order.len().div_ceil(2);
                for id in record.template_order.drain(..drop) {
                    record.templates.remove(&id);
                }
            } else {
                return Err(format!(
                    "it would weigh {} KiB, more than the {} KiB a record may ({} objects \
                     recorded); split the source into smaller paths",
                    text.len() / 1024,
                    RECORD_BYTES_LIMIT / 1024,
                    record.owned.as_ref().map_or(0, BTreeSet::len)
                ));
            }
        }
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

/// On a record: who is syncing its source and until when (`holder|unix seconds`).
pub const LOCK_ANNOTATION: &str = "kommit.dev/sync-lock";
/// How long a lock lasts unrenewed: the longest a crashed sync holds the next one back.
const LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(30);

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Who holds a lock: the machine (or pod) and the process.
pub fn lock_holder(instance: &str) -> String {
    format!("{instance} pid {}", std::process::id())
}

/// A lock left by a process of this same machine that is gone (killed mid-sync): it need not
/// be waited out.
fn left_by_a_dead_process(held: &str, ours: &str) -> bool {
    let (Some((held_at, pid)), Some((our_at, _))) =
        (held.rsplit_once(" pid "), ours.rsplit_once(" pid "))
    else {
        return false;
    };
    let proc_fs = std::path::Path::new("/proc/self").exists();
    held_at == our_at
        && proc_fs
        && pid.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
}

/// A source's lock, as another sync holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub holder: String,
    /// RFC 3339.
    pub until: String,
}

impl Held {
    /// The lock an annotation describes, if it is still in force at `now`.
    fn in_force(value: &str, now: i64) -> Option<Held> {
        let (holder, until) = value.rsplit_once('|')?;
        let until: i64 = until.parse().ok()?;
        (until > now).then(|| Held {
            holder: holder.to_string(),
            until: crate::commit::format_rfc3339(until),
        })
    }
}

/// This sync's hold on its source, renewed in the background until released.
pub struct SourceLock {
    api: Api<ConfigMap>,
    name: String,
    holder: String,
    /// `None` when there was nowhere to put the lock yet: the record's namespace is one the
    /// commit creates, so no sync of this source has happened there.
    renewal: Option<tokio::task::JoinHandle<()>>,
    /// The fence of the sync's writes: a replica that may have lost its lease neither renews
    /// nor releases the lock (it expires by itself).
    fence: Option<Fence>,
}

impl SourceLock {
    /// Frees the source for the next sync (best effort: unreleased, it expires by itself).
    pub async fn release(mut self) {
        let Some(renewal) = self.renewal.take() else {
            return;
        };
        renewal.abort();
        if self
            .fence
            .as_ref()
            .is_some_and(|fence| !fence.allows_writes())
        {
            tracing::info!(record = %self.name, "not releasing the sync lock: this replica may no longer lead; it expires by itself");
            return;
        }
        let Ok(Some(config_map)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let ours = config_map
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LOCK_ANNOTATION))
            .is_some_and(|v| v.rsplit_once('|').is_some_and(|(h, _)| h == self.holder));
        if !ours {
            return;
        }
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": config_map.metadata.resource_version,
            "annotations": {LOCK_ANNOTATION: null},
        }});
        if let Err(e) = self
            .api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(error = %e, record = %self.name, "could not release the sync lock; it expires by itself");
        }
    }
}

/// A sync cut short (its future dropped) stops renewing: the lock then expires by itself.
impl Drop for SourceLock {
    fn drop(&mut self) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
    }
}

/// Where a record lives: a ConfigMap named after the inventory, in the target namespace.
#[derive(Debug, Clone)]
pub struct RecordStore {
    api: Api<ConfigMap>,
    /// For its errors: a refusal names who was refused and the RoleBinding that would allow it.
    cluster: Cluster,
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
            cluster: cluster.clone(),
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
            .map_err(|e| self.cluster.classify(e, &self.location(), "read"))?;
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
        let invalid = |why: String| ClusterError::Api {
            object: self.location(),
            action: "read",
            message: format!(
                "the record is not valid ({why}); fix it or delete it to start a new one (kommit \
                 then treats the objects of this source as made by someone else until adopted)"
            ),
            code: 0,
        };
        let record: Record = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        record.check().map_err(invalid)?;
        Ok(record)
    }

    /// Takes this source's lock for `holder`, unless another sync holds it (then `Err(Held)`).
    /// The lock is an annotation on the record, written with the resourceVersion as a
    /// precondition, so two syncs racing for it cannot both win.
    pub async fn lock(&self, holder: &str) -> Result<Result<SourceLock, Held>, ClusterError> {
        self.cluster.check_fence(&self.location())?;
        let value = |now: i64| format!("{holder}|{}", now + LOCK_TTL.as_secs() as i64);
        let classify = |e| self.cluster.classify(e, &self.location(), "lock");
        for _ in 0..3 {
            let now = unix_now();
            let found = self.api.get_opt(&self.name).await.map_err(classify)?;
            let written = match found {
                None => {
                    let config_map: ConfigMap = serde_json::from_value(serde_json::json!({
                        "metadata": {
                            "name": self.name,
                            "namespace": self.namespace,
                            "labels": {RECORD_LABEL: self.inventory, "app.kubernetes.io/managed-by": "kommit"},
                            "annotations": {LOCK_ANNOTATION: value(now)},
                        },
                    }))
                    .expect("a ConfigMap");
                    self.api
                        .create(&kube::api::PostParams::default(), &config_map)
                        .await
                        .map(|_| ())
                }
                Some(config_map) => {
                    let current = config_map
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(LOCK_ANNOTATION));
                    if let Some(held) = current.and_then(|v| Held::in_force(v, now))
                        && held.holder != holder
                    {
                        if !left_by_a_dead_process(&held.holder, holder) {
                            return Ok(Err(held));
                        }
                        tracing::info!(holder = %held.holder, "taking over the sync lock of a process that is gone");
                    }
                    let patch = serde_json::json!({"metadata": {
                        "resourceVersion": config_map.metadata.resource_version,
                        "annotations": {LOCK_ANNOTATION: value(now)},
                    }});
                    self.api
                        .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(|_| ())
                }
            };
            match written {
                Ok(()) => {
                    let (api, name, renewed) =
                        (self.api.clone(), self.name.clone(), holder.to_string());
                    let fence = self.cluster.fence().cloned();
                    let renewal = tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(LOCK_TTL / 3).await;
                            if fence.as_ref().is_some_and(|fence| !fence.allows_writes()) {
                                continue;
                            }
                            let until = unix_now() + LOCK_TTL.as_secs() as i64;
                            let patch = serde_json::json!({"metadata": {"annotations": {
                                LOCK_ANNOTATION: format!("{renewed}|{until}"),
                            }}});
                            if let Err(e) = api
                                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                                .await
                            {
                                tracing::warn!(error = %e, record = %name, "could not renew the sync lock");
                            }
                        }
                    });
                    return Ok(Ok(SourceLock {
                        api: self.api.clone(),
                        name: self.name.clone(),
                        holder: holder.to_string(),
                        renewal: Some(renewal),
                        fence: self.cluster.fence().cloned(),
                    }));
                }
                // The namespace does not exist yet (the commit creates it): nothing of this
                // source can be there, and nowhere to write a lock.
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    return Ok(Ok(SourceLock {
                        api: self.api.clone(),
                        name: self.name.clone(),
                        holder: holder.to_string(),
                        renewal: None,
                        fence: self.cluster.fence().cloned(),
                    }));
                }
                // Someone else wrote in between: look again.
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(classify(e)),
            }
        }
        Ok(Err(Held {
            holder: "another kommit (it kept winning the race for the lock)".to_string(),
            until: crate::commit::format_rfc3339(unix_now() + LOCK_TTL.as_secs() as i64),
        }))
    }

    pub async fn save(&self, record: &Record) -> Result<(), ClusterError> {
        self.cluster.check_fence(&self.location())?;
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {RECORD_LABEL: self.inventory, "app.kubernetes.io/managed-by": "kommit"},
            },
            "data": {"record.json": record.to_stored().map_err(|why| ClusterError::Api {
                object: self.location(),
                action: "write",
                message: why,
                code: 0,
            })?},
        });
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ())
            .map_err(|e| self.cluster.classify(e, &self.location(), "write"))
    }
}

/// Publishes Kubernetes Events (`events.k8s.io/v1`) on the objects a sync concerns.
#[derive(Clone)]
pub struct Events {
    client: kube::Client,
    instance: String,
    /// A replica that may have lost its lease publishes nothing, as it writes nothing.
    fence: Option<Fence>,
}

/// Who reports the events.
const REPORTING_CONTROLLER: &str = "kommit";

impl Events {
    pub fn new(cluster: &Cluster) -> Self {
        Events {
            // The operator's own: a GitSync's ServiceAccount need not be allowed to write Events.
            client: cluster.own_client().clone(),
            instance: cluster.instance().unwrap_or("kommit").to_string(),
            fence: cluster.fence().cloned(),
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
        use k8s_openapi::api::events::v1::Event;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

        if let Some(fence) = &self.fence
            && let Err(fenced) = fence.check(&format!("an event on {key}"))
        {
            tracing::warn!(error = %fenced, "event not published");
            return;
        }
        let regarding = ObjectReference {
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
        let now = k8s_openapi::jiff::Timestamp::now();
        // Cluster-scoped objects get their events in `default`, as kubectl and kube do.
        let namespace = key.namespace.clone().unwrap_or_else(|| "default".into());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(event_name(&key.name, now.as_nanosecond())),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if warning { "Warning" } else { "Normal" }.to_string()),
            reason: Some(reason.to_string()),
            action: Some("Sync".to_string()),
            note: Some(note),
            regarding: Some(regarding),
            reporting_controller: Some(REPORTING_CONTROLLER.to_string()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(e) = api.create(&kube::api::PostParams::default(), &event).await {
            tracing::warn!(object = %key, error = %e, "could not publish an event");
        }
    }
}

/// An Event's name is a DNS subdomain, unlike many object names (`system:aggregated-metrics-reader`,
/// `lb-system:controller`): the object's name made into one, then a unique suffix.
pub fn event_name(object: &str, nanos: i128) -> String {
    let suffix = format!(".{nanos:x}");
    let mut base: String = object
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.' | '-') => c,
            _ => '-',
        })
        .collect();
    base.truncate(253 - suffix.len());
    // Each dot-separated label must start and end with a letter or digit.
    let base = base
        .split('.')
        .map(|label| label.trim_matches('-'))
        .filter(|label| !label.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    let base = if base.is_empty() {
        "object".to_string()
    } else {
        base
    };
    format!("{base}{suffix}")
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

    fn hex_commit(i: usize) -> CommitInfo {
        CommitInfo {
            sha: format!("{i:040x}"),
            ..commit("a")
        }
    }

    #[test]
    fn the_newest_failures_are_kept_and_the_oldest_forgotten() {
        let mut record = Record::default();
        for i in 0..(HISTORY_LIMIT + 5) {
            record.push(entry(
                &hex_commit(i),
                Outcome::Failed,
                Some("x".into()),
                None,
            ));
        }
        assert_eq!(record.failed.len(), HISTORY_LIMIT);
        assert!(
            record.has_failed(&hex_commit(HISTORY_LIMIT + 4).sha),
            "the newest"
        );
        assert!(
            !record.has_failed(&hex_commit(0).sha),
            "the oldest is forgotten"
        );
    }

    #[test]
    fn the_oldest_revisions_are_evicted_first() {
        let mut record = Record::default();
        // One from before the order was kept, sorting last by key.
        record
            .templates
            .insert("zzz-legacy".into(), hex_commit(0).sha.clone());
        for i in 0..TEMPLATE_LIMIT {
            record.remember_template(format!("a-{i:05}"), &hex_commit(i).sha);
        }
        assert_eq!(record.templates.len(), TEMPLATE_LIMIT);
        assert!(!record.templates.contains_key("zzz-legacy"), "legacy first");
        record.remember_template("b-new".into(), &hex_commit(1).sha);
        assert!(record.templates.contains_key("b-new"));
        assert!(!record.templates.contains_key("a-00000"), "then the oldest");
        assert!(record.templates.contains_key("a-00001"));
    }

    #[test]
    fn a_record_stays_well_under_the_object_size_limit() {
        let mut record = Record::default();
        for i in 0..HISTORY_LIMIT {
            record.push(entry(
                &hex_commit(i),
                Outcome::Failed,
                Some("é".repeat(5_000)),
                None,
            ));
        }
        assert!(
            record.history[0]
                .reason
                .as_ref()
                .unwrap()
                .ends_with("… (cut)")
        );
        let stored = record.to_stored().unwrap();
        assert!(stored.len() <= RECORD_BYTES_LIMIT, "{}", stored.len());
        let back: Record = serde_json::from_str(&stored).unwrap();
        assert_eq!(
            back.history[0], record.history[0],
            "the newest history stays"
        );

        let huge = Record {
            owned: Some((0..20_000).map(|i| format!("{i:036}")).collect()),
            ..Record::default()
        };
        assert!(huge.to_stored().unwrap_err().contains("20000 objects"));
    }

    #[test]
    fn a_record_edited_into_nonsense_is_an_error_not_a_panic() {
        let mut record = Record {
            pinned: Some(Pin {
                commit: "ééééééééé".into(),
                subject: String::new(),
                time: String::new(),
            }),
            ..Record::default()
        };
        assert!(record.check().unwrap_err().contains("is not a commit id"));
        assert_eq!(crate::commit::short("ééééééééé"), "ééééééé");
        record.pinned = None;
        record.push(entry(&hex_commit(7), Outcome::Healthy, None, None));
        assert_eq!(record.check(), Ok(()));
    }

    #[test]
    fn event_names_are_dns_subdomains_whatever_the_object_is_called() {
        let valid = |name: &str| {
            name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                })
        };
        for object in [
            "system:aggregated-metrics-reader",
            "lb-system:controller",
            "web",
            ":leading",
            "Upper.Case_",
            "::",
            &"x:".repeat(200),
        ] {
            let name = event_name(object, 0x18a2b3c4d5e6f708);
            assert!(valid(&name), "{object} gave {name}");
        }
        assert_eq!(
            event_name("system:aggregated-metrics-reader", 255),
            "system-aggregated-metrics-reader.ff"
        );
        assert_eq!(event_name("web", 255), "web.ff");
    }

    #[test]
    fn a_lock_is_in_force_until_its_time_and_names_its_holder() {
        let held = Held::in_force("ci-runner (pid 7)|2000", 1_999).unwrap();
        assert_eq!(held.holder, "ci-runner (pid 7)");
        assert_eq!(held.until, crate::commit::format_rfc3339(2000));
        assert_eq!(
            Held::in_force("ci-runner (pid 7)|2000", 2_000),
            None,
            "expired"
        );
        assert_eq!(Held::in_force("garbage", 0), None);
        assert_eq!(Held::in_force("a|b|3", 1).unwrap().holder, "a|b");
    }

    #[test]
    fn only_a_lock_of_a_dead_process_of_this_machine_is_taken_over() {
        let ours = lock_holder("box");
        // Pid 1 lives; u32::MAX never does.
        assert!(!left_by_a_dead_process("box pid 1", &ours));
        assert!(left_by_a_dead_process(
            &format!("box pid {}", u32::MAX),
            &ours
        ));
        assert!(!left_by_a_dead_process(
            &format!("other pid {}", u32::MAX),
            &ours
        ));
        assert!(!left_by_a_dead_process("ci-runner", &ours));
    }
}
