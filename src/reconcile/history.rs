//! What happened to a source's Deployments, joined from three places: their ReplicaSets in the
//! cluster, kommit's record of outcomes, and `git log` of the file that defines each one.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::{Policy, Prepared, ReconcileError, Target, inventory_id, prepare};
use crate::audit::{Record, RecordStore};
use crate::cluster::Cluster;
use crate::commit::CommitInfo;
use crate::object::{self, COMMIT_ANNOTATION, ObjectKey, SUBJECT_ANNOTATION};
use crate::plan::{Action, Change, Plan, Problem, ProblemKind};
use crate::source::GitSource;

const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

/// Where a source's record lives, and why there (said to the user, who may have meant `-n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordNamespace {
    /// `--namespace`.
    Given(String),
    /// Where the source's first namespaced object is.
    OfObjects(String),
    /// The kubeconfig's: the source has no namespaced objects.
    Default(String),
}

impl RecordNamespace {
    pub fn of(target: &Target, plan: &Plan, cluster: &Cluster) -> Self {
        if let Some(ns) = &target.namespace {
            return RecordNamespace::Given(ns.clone());
        }
        match plan
            .changes
            .iter()
            .filter(|c| c.action != Action::Prune)
            .find_map(|c| c.key.namespace.clone())
        {
            Some(ns) => RecordNamespace::OfObjects(ns),
            None => RecordNamespace::Default(cluster.default_namespace().to_string()),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            RecordNamespace::Given(ns)
            | RecordNamespace::OfObjects(ns)
            | RecordNamespace::Default(ns) => ns,
        }
    }
}

impl std::fmt::Display for RecordNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordNamespace::Given(ns) => write!(f, "{ns} (--namespace)"),
            RecordNamespace::OfObjects(ns) => {
                write!(f, "{ns} (where the source's objects are; -n to choose)")
            }
            RecordNamespace::Default(ns) => write!(
                f,
                "{ns} (the kubeconfig's; the source has no namespaced objects; -n to choose)"
            ),
        }
    }
}

/// The record of a source, if kommit has synced it into this cluster.
pub async fn load_record(
    source: &GitSource,
    cluster: &Cluster,
    target: &Target,
    plan: &Plan,
) -> Result<Record, ReconcileError> {
    let namespace = RecordNamespace::of(target, plan, cluster);
    Ok(
        RecordStore::new(cluster, namespace.name(), &inventory_id(source, target))
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
) -> Result<(Vec<Revision>, RecordNamespace), ReconcileError> {
    let prepared = prepare(source, cluster, target, &Policy::default()).await?;
    let record = load_record(source, cluster, target, &prepared.plan).await?;
    let looked_in = RecordNamespace::of(target, &prepared.plan, cluster);
    let deployments_rt = cluster.resolve("apps/v1", "Deployment")?;
    let replica_sets_rt = cluster.resolve("apps/v1", "ReplicaSet")?;
    let commit = prepared.plan.source.commit.clone();
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
            problems: vec![Problem {
                kind: ProblemKind::Manifest,
                origin: None,
                message: format!("no Deployment named {name} is defined at this commit"),
            }],
        });
    }
    let mut rows = Vec::new();
    for change in wanted {
        let key = &change.key;
        let live = cluster.get(&deployments_rt, key).await?;
        let uid = live
            .as_ref()
            .and_then(|d| d.pointer("/metadata/uid"))
            .and_then(Value::as_str);
        let current_revision = live
            .as_ref()
            .and_then(|d| object::metadata_entry(d, "annotations", REVISION_ANNOTATION))
            .and_then(|r| r.parse::<i64>().ok());
        let replica_sets: Vec<Value> = cluster
            .list(&replica_sets_rt, key.namespace.as_deref(), None)
            .await?
            .into_iter()
            .filter(|rs| uid.is_some() && owned_by(rs, uid))
            .collect();
        // Every commit named by a ReplicaSet, and the log of the defining file: one git task.
        let shas: Vec<String> = replica_sets
            .iter()
            .filter_map(|rs| object::metadata_entry(rs, "annotations", COMMIT_ANNOTATION))
            .map(str::to_string)
            .collect();
        let file = change.source.as_ref().map(|o| o.file.clone());
        let head = commit.clone();
        let (known_commits, logged) = source
            .blocking(move |git| {
                let known: HashMap<String, CommitInfo> = shas
                    .into_iter()
                    .filter_map(|sha| git.commit(&sha).ok().map(|info| (sha, info)))
                    .collect();
                let logged = match &file {
                    Some(file) => git.log_for_path(&head, file, 50)?,
                    None => Vec::new(),
                };
                Ok((known, logged))
            })
            .await?;
        let mut revisions: Vec<Revision> = replica_sets
            .iter()
            .map(|rs| {
                let revision = object::metadata_entry(rs, "annotations", REVISION_ANNOTATION)
                    .and_then(|r| r.parse::<i64>().ok());
                let sha = object::metadata_entry(rs, "annotations", COMMIT_ANNOTATION)
                    .map(str::to_string);
                let info = sha.as_deref().and_then(|s| known_commits.get(s));
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
                    author: info.map(|c| c.author.clone()),
                    time: info.map(|c| c.time_rfc3339()),
                    subject: info.map(|c| c.subject.clone()).or_else(|| {
                        object::metadata_entry(rs, "annotations", SUBJECT_ANNOTATION)
                            .map(str::to_string)
                    }),
                    commit: sha,
                }
            })
            .collect();
        // Commits that changed the file without a revision of their own.
        let known: HashSet<String> = revisions.iter().filter_map(|r| r.commit.clone()).collect();
        for logged in logged {
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
        revisions.sort_by(|a, b| b.time.cmp(&a.time).then(b.revision.cmp(&a.revision)));
        rows.extend(revisions);
    }
    Ok((rows, looked_in))
}

fn owned_by(item: &Value, uid: Option<&str>) -> bool {
    item.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r.get("uid").and_then(Value::as_str) == uid)
        })
}

/// After a healthy rollout: remember which commit first rolled out each Deployment revision,
/// and report the Deployments that went back to a revision an earlier commit introduced.
pub(super) async fn remember_revisions(
    cluster: &Cluster,
    prepared: &Prepared,
    record: &mut Record,
    commit: &CommitInfo,
) -> Result<Vec<(ObjectKey, String)>, ReconcileError> {
    let mut returned = Vec::new();
    for step in prepared
        .steps
        .iter()
        .filter(|s| matches!(s.action, Action::Update | Action::Create | Action::Adopt))
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
            None => record.remember_template(id, &commit.sha),
        }
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
    let revision = object::metadata_entry(&deployment, "annotations", REVISION_ANNOTATION);
    let listed = cluster
        .list(&replica_sets, key.namespace.as_deref(), None)
        .await?;
    Ok(listed
        .iter()
        .filter(|rs| owned_by(rs, uid))
        .find(|rs| object::metadata_entry(rs, "annotations", REVISION_ANNOTATION) == revision)
        .and_then(|rs| object::metadata_entry(rs, "labels", "pod-template-hash"))
        .map(str::to_string))
}
