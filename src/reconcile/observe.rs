//! Step two: what the cluster holds of a commit's objects. Each object is fetched (by one LIST
//! per kind and namespace where many share them) and dry-run applied unless it is provably
//! unchanged; what the server says is kept as an observation for the pure decision core. Only
//! an unreachable cluster is an error here: every refusal is data.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use serde_json::Value;

use super::{CONCURRENCY, Policy, ReconcileError};
use crate::cluster::{Cluster, ClusterError};
use crate::object::ObjectKey;
use crate::plan::{self, Desired, DryRun, NotYetServed, Observation, Rejection};

/// Observes every desired object, in order.
pub(super) async fn observe_objects(
    cluster: &Cluster,
    desired: &[Desired],
    policy: &Policy,
) -> Result<Vec<Observation>, ReconcileError> {
    // Namespaces created by this commit: objects inside them cannot be dry-run yet.
    let mut creating_namespaces = HashSet::new();
    // Collected first: an iterator adaptor's closure held across an await would keep the future
    // from being provably `Send` (rust-lang/rust#102211).
    let namespaces: Vec<&Desired> = desired
        .iter()
        .filter(|d| d.key.is_kind("", "Namespace"))
        .collect();
    for ns in namespaces {
        if let Some(rt) = &ns.resource
            && cluster.get(rt, &ns.key).await?.is_none()
        {
            creating_namespaces.insert(ns.key.name.clone());
        }
    }
    // Each prefetched object is handed over (not copied) to the one look that needs it.
    let mut prefetched = prefetch_live(cluster, desired, &creating_namespaces).await?;
    let looks: Vec<_> = desired
        .iter()
        .map(|d| {
            let in_new_namespace = d
                .key
                .namespace
                .as_ref()
                .is_some_and(|ns| creating_namespaces.contains(ns));
            observe_one(
                cluster,
                d,
                in_new_namespace,
                policy.force_conflicts,
                prefetched.remove(&d.key),
            )
            .boxed()
        })
        .collect();
    stream::iter(looks)
        .buffered(CONCURRENCY)
        .try_collect()
        .await
}

async fn observe_one(
    cluster: &Cluster,
    desired: &Desired,
    in_new_namespace: bool,
    force: bool,
    prefetched: Option<Option<Value>>,
) -> Result<Observation, ReconcileError> {
    let Some(rt) = &desired.resource else {
        return Ok(Observation::NotYetServed(NotYetServed::NewKind));
    };
    if in_new_namespace {
        return Ok(Observation::NotYetServed(NotYetServed::NewNamespace));
    }
    let key = &desired.key;
    let live = match prefetched {
        Some(live) => live,
        None => match cluster.get(rt, key).await {
            Ok(live) => live,
            // Not this identity's to read: a problem of the commit, named with its file.
            Err(e @ ClusterError::Forbidden { .. }) => {
                return Ok(Observation::Refused {
                    live: None,
                    rejection: Rejection::Forbidden(e.to_string()),
                });
            }
            Err(e) => return Err(e.into()),
        },
    };
    // Most objects of a commit did not change; prove it locally and spare the dry run.
    if let Some(live) = &live
        && plan::provably_unchanged(live, &desired.body)
    {
        return Ok(Observation::Present {
            live: live.clone(),
            dry_run: DryRun::ProvablyUnchanged,
        });
    }
    let dry_run = match cluster.apply(rt, key, &desired.body, true, force).await {
        Ok(stored) => Ok(DryRun::Stored(stored)),
        // Fields others took over: what git would make of them, for the diff.
        Err(ClusterError::Conflict { conflicts, .. }) => {
            match cluster.apply(rt, key, &desired.body, true, true).await {
                Ok(forced) => Ok(DryRun::Conflict { conflicts, forced }),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    Ok(match (dry_run, live) {
        (Ok(_), None) => Observation::Absent,
        (Ok(dry_run), Some(live)) => Observation::Present { live, dry_run },
        (Err(e @ ClusterError::Unreachable { .. }), _) => return Err(e.into()),
        (Err(e), live) => Observation::Refused {
            rejection: rejection(key, e, live.is_none()),
            live,
        },
    })
}

fn rejection(key: &ObjectKey, error: ClusterError, absent: bool) -> Rejection {
    match error {
        ClusterError::Rejected {
            immutable: true,
            message,
            ..
        } => Rejection::Immutable(message),
        e @ ClusterError::Forbidden { .. } => Rejection::Forbidden(e.to_string()),
        ClusterError::Api {
            code: 404, message, ..
        } if absent && key.namespace.is_some() => Rejection::MissingNamespace(message),
        other => Rejection::Invalid(other.to_string()),
    }
}

/// Fetches live objects by one LIST per kind and namespace where many objects share them
/// (cheaper than a GET each); the rest are fetched one by one.
async fn prefetch_live(
    cluster: &Cluster,
    desired: &[Desired],
    creating_namespaces: &HashSet<String>,
) -> Result<HashMap<ObjectKey, Option<Value>>, ReconcileError> {
    const LIST_THRESHOLD: usize = 8;
    let mut groups: BTreeMap<(String, String, Option<String>), Vec<&Desired>> = BTreeMap::new();
    for d in desired {
        let Some(rt) = &d.resource else { continue };
        if d.key
            .namespace
            .as_ref()
            .is_some_and(|ns| creating_namespaces.contains(ns))
        {
            continue;
        }
        groups
            .entry((
                rt.resource.api_version.clone(),
                rt.resource.plural.clone(),
                d.key.namespace.clone(),
            ))
            .or_default()
            .push(d);
    }
    let lists: Vec<_> = groups
        .into_values()
        .filter(|members| members.len() >= LIST_THRESHOLD)
        .map(|members| list_members(cluster, members).boxed())
        .collect();
    let lists: Vec<Vec<(ObjectKey, Option<Value>)>> = stream::iter(lists)
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    Ok(lists.into_iter().flatten().collect())
}

async fn list_members(
    cluster: &Cluster,
    members: Vec<&Desired>,
) -> Result<Vec<(ObjectKey, Option<Value>)>, ReconcileError> {
    let rt = members[0].resource.as_ref().expect("grouped by resource");
    let items = match cluster
        .list(rt, members[0].key.namespace.as_deref(), None)
        .await
    {
        Ok(items) => items,
        // Allowed to get but not to list: each object is looked at by itself instead.
        Err(ClusterError::Forbidden { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut by_name: HashMap<String, Value> = items
        .into_iter()
        .filter_map(|item| {
            let name = item.pointer("/metadata/name")?.as_str()?.to_string();
            Some((name, item))
        })
        .collect();
    Ok(members
        .iter()
        .map(|d| (d.key.clone(), by_name.remove(&d.key.name)))
        .collect())
}
