//! Step four: carry a decision out. Namespaces and CRDs first, workloads last, prunes in the
//! reverse order; each object carries the commit that last changed its file. Between two writes
//! the future may be dropped, and nothing more is written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::{FutureExt, StreamExt, stream};
use serde_json::Value;

use super::inventory::entry_map;
use super::{CONCURRENCY, Policy, Prepared, ReconcileError};
use crate::cluster::{Cluster, ClusterError, ResourceType};
use crate::commit::CommitInfo;
use crate::object::{
    self, AUTHOR_ANNOTATION, CHANGE_CAUSE_ANNOTATION, COMMIT_ANNOTATION, DATE_ANNOTATION,
    FILE_ANNOTATION, ObjectKey, SUBJECT_ANNOTATION,
};
use crate::plan::{Action, Step};
use crate::source::GitSource;

/// How far back to look for the commit that last changed a file.
const ATTRIBUTION_DEPTH: usize = 5_000;

/// The commit that last changed each file the plan writes (one walk of the history, off the
/// async threads).
pub(super) async fn attribution(
    source: &GitSource,
    prepared: &Prepared,
) -> Result<HashMap<String, CommitInfo>, ReconcileError> {
    let files: Vec<String> = prepared
        .steps
        .iter()
        .filter(|s| s.action.writes() && s.action != Action::Prune)
        .filter_map(|s| s.origin.as_ref().map(|o| o.file.clone()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if files.is_empty() {
        return Ok(HashMap::new());
    }
    let commit = prepared.plan.source.commit.clone();
    Ok(source
        .blocking(move |git| git.last_changes(&commit, &files, ATTRIBUTION_DEPTH))
        .await?)
}

/// What a sync wrote, in order, and the uid of each object it created or updated.
#[derive(Debug, Default)]
pub(super) struct Applied {
    pub done: Vec<(Action, ObjectKey)>,
    pub uids: HashMap<ObjectKey, String>,
}

/// Applies every writing step into `applied` (which holds what was done when it fails).
pub(super) async fn apply_steps(
    cluster: &mut Cluster,
    prepared: &Prepared,
    attribution: &HashMap<String, CommitInfo>,
    policy: &Policy,
    applied: &mut Applied,
) -> Result<(), ReconcileError> {
    let commit = &prepared.plan.source.commit;
    let writes: Vec<&Step> = prepared
        .steps
        .iter()
        .filter(|s| s.action.writes())
        .collect();
    let total = writes.len();
    let failed =
        |applied: &Applied, key: &ObjectKey, source: ClusterError| ReconcileError::ApplyFailed {
            commit: commit.short_sha().to_string(),
            object: key.to_string(),
            applied: applied.done.len(),
            total,
            source: Box::new(source),
        };

    let mut tiers: BTreeMap<u8, Vec<&Step>> = BTreeMap::new();
    for step in writes.iter().filter(|s| s.action != Action::Prune) {
        tiers
            .entry(object::apply_tier(&step.key.group, &step.key.kind))
            .or_default()
            .push(step);
    }
    // Objects of kinds whose CustomResourceDefinitions this commit brings.
    let new_kinds: Vec<&Step> = writes
        .iter()
        .copied()
        .filter(|s| s.resource.is_none() && s.action != Action::Prune)
        .collect();
    let mut new_kinds_accepted = new_kinds.is_empty();
    for (tier, steps) in tiers {
        if tier > 1 && !new_kinds_accepted {
            // Before anything but namespaces and CRDs is written, the new kinds must be served
            // and their objects accepted, so that a refused one leaves only the CRDs.
            if let Err((key, source)) = accept_new_kinds(cluster, &new_kinds, policy).await {
                return Err(failed(applied, &key, source));
            }
            new_kinds_accepted = true;
        }
        let cluster_now = &*cluster;
        let writes: Vec<_> = steps
            .iter()
            .map(|step| write_one(cluster_now, step, commit, attribution, policy).boxed())
            .collect();
        let results: Vec<Result<Written, (ObjectKey, ClusterError)>> = stream::iter(writes)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut failure = None;
        for result in results {
            match result {
                Ok((action, key, uid)) => {
                    tracing::info!(object = %key, action = action.verb(), "applied");
                    if let Some(uid) = uid {
                        applied.uids.insert(key.clone(), uid);
                    }
                    applied.done.push((action, key));
                }
                Err(e) if failure.is_none() => failure = Some(e),
                Err((key, e)) => tracing::error!(object = %key, error = %e, "apply failed"),
            }
        }
        if let Some((key, source)) = failure {
            return Err(failed(applied, &key, source));
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
        // The uid precondition: an object made anew under the same name since it was observed
        // is not the one kommit recorded, and is not deleted.
        match cluster
            .delete_exact(rt, &step.key, step.live_uid.as_deref())
            .await
        {
            Ok(_) => {
                tracing::info!(object = %step.key, "pruned");
                applied.done.push((Action::Prune, step.key.clone()));
            }
            Err(source) => return Err(failed(applied, &step.key, source)),
        }
    }
    Ok(())
}

/// A write done: its action, its object and the uid the server gave it.
type Written = (Action, ObjectKey, Option<String>);

async fn write_one(
    cluster: &Cluster,
    step: &Step,
    commit: &CommitInfo,
    attribution: &HashMap<String, CommitInfo>,
    policy: &Policy,
) -> Result<Written, (ObjectKey, ClusterError)> {
    let fail = |e| (step.key.clone(), e);
    let rt = match &step.resource {
        Some(rt) => rt.clone(),
        None => cluster
            .resolve(&step.api_version, &step.key.kind)
            .map_err(fail)?,
    };
    let body = attributed_body(step, commit, attribution);
    let stored = write(cluster, &rt, step, &body, policy)
        .await
        .map_err(fail)?;
    let uid = stored
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok((step.action, step.key.clone(), uid))
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
) -> Result<Value, ClusterError> {
    if step.action == Action::Replace {
        cluster
            .delete_exact(rt, &step.key, step.live_uid.as_deref())
            .await?;
        cluster
            .wait_gone(
                rt,
                &step.key,
                step.live_uid.as_deref(),
                Duration::from_secs(120),
            )
            .await?;
    }
    // Adopting what client-side `kubectl apply` made: its fields become kommit's first, as
    // `kubectl apply --server-side` does, so that a field later removed from git goes too.
    if let Some(fields) = &step.upgrade_ownership {
        cluster
            .replace_managed_fields(rt, &step.key, step.live_resource_version.as_deref(), fields)
            .await?;
    }
    // Adoption was asked for: the fields other managers hold are taken with the object.
    let force = policy.force_conflicts || step.action == Action::Adopt;
    cluster.apply(rt, &step.key, body, false, force).await
}

/// After the commit's CRDs were applied: waits until the API serves their kinds, then asks the
/// server (dry run) to accept every object of them, before the rest of the commit is written.
async fn accept_new_kinds(
    cluster: &mut Cluster,
    steps: &[&Step],
    policy: &Policy,
) -> Result<(), (ObjectKey, ClusterError)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        cluster
            .refresh_discovery()
            .await
            .map_err(|e| (steps[0].key.clone(), e))?;
        let missing: Vec<&Step> = steps
            .iter()
            .copied()
            .filter(|s| cluster.resolve(&s.api_version, &s.key.kind).is_err())
            .collect();
        if missing.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err((
                missing[0].key.clone(),
                ClusterError::Timeout {
                    object: missing[0].key.to_string(),
                    what: "its CustomResourceDefinition is established",
                    seconds: 60,
                },
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cluster = &*cluster;
    let checks: Vec<_> = steps
        .iter()
        .map(|step| {
            async move {
                let rt = cluster
                    .resolve(&step.api_version, &step.key.kind)
                    .map_err(|e| (step.key.clone(), e))?;
                let body = step.body.clone().unwrap_or(Value::Null);
                cluster
                    .apply(&rt, &step.key, &body, true, policy.force_conflicts)
                    .await
                    .map(|_| ())
                    .map_err(|e| (step.key.clone(), e))
            }
            .boxed()
        })
        .collect();
    let results: Vec<Result<(), (ObjectKey, ClusterError)>> = stream::iter(checks)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Origin;
    use serde_json::json;

    #[test]
    fn deployments_get_a_change_cause_from_the_commit_that_changed_their_file() {
        let step = Step {
            action: Action::Update,
            key: ObjectKey::new("apps", "Deployment", Some("shop"), "web"),
            api_version: "apps/v1".into(),
            resource: None,
            body: Some(json!({"metadata": {"name": "web"}})),
            origin: Some(Origin {
                file: "deploy/web.yaml".into(),
                document: 0,
                line: 1,
            }),
            live_uid: None,
            upgrade_ownership: None,
            live_resource_version: None,
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
}
