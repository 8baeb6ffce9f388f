//! What belongs to a source: its inventory id, the label and annotation kommit puts on what it
//! applies, and finding those objects again in the cluster for prune.

use std::collections::{BTreeSet, HashMap, HashSet};

use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{CONCURRENCY, ReconcileError, Target};
use crate::audit;
use crate::cluster::{Cluster, ClusterError, ResourceType};
use crate::object::{self, INVENTORY_LABEL, ObjectKey, SOURCE_ANNOTATION};
use crate::plan::{Desired, Inventory, LiveObject};
use crate::source::GitSource;

/// Inventory of a source: the label value every applied object carries.
pub fn inventory_id(source: &GitSource, target: &Target) -> String {
    if let Some(name) = &target.inventory {
        return name.clone();
    }
    let path = crate::source::normalize_repo_path(&target.path).unwrap_or_default();
    // The target namespace is part of it: the same path synced into staging and into prod
    // with --prune are two sources, and neither may prune the other's objects.
    let namespace = target.namespace.as_deref().unwrap_or("");
    let digest =
        Sha256::digest(format!("{}\n{}\n{}", source.identity(), path, namespace).as_bytes());
    format!("src-{}", &crate::source::hex(&digest)[..20])
}

/// The object as kommit applies it: namespace filled in, inventory label and source annotation.
pub(super) fn apply_body(
    object: Value,
    namespace: Option<&str>,
    inventory: &str,
    source_note: &str,
) -> Value {
    let mut body = object;
    let metadata = body
        .as_object_mut()
        .and_then(|map| map.get_mut("metadata"))
        .and_then(Value::as_object_mut);
    if let Some(metadata) = metadata {
        match namespace {
            Some(ns) => {
                metadata.insert("namespace".into(), Value::String(ns.to_string()));
            }
            None => {
                metadata.remove("namespace");
            }
        }
        entry_map(metadata, "labels").insert(INVENTORY_LABEL.into(), inventory.into());
        entry_map(metadata, "annotations").insert(SOURCE_ANNOTATION.into(), source_note.into());
    }
    body
}

pub(super) fn entry_map<'a>(
    map: &'a mut Map<String, Value>,
    field: &str,
) -> &'a mut Map<String, Value> {
    let slot = map
        .entry(field.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().expect("just made an object")
}

/// The key of a kind in [`audit::Record::owned_kinds`].
pub(super) fn kind_key(group: &str, kind: &str) -> String {
    format!("{group}/{kind}")
}

/// Whether prune lists a kind: one of the commit's kinds, or one this source's objects may still
/// have (`recorded`); every kind when there is no such record.
fn searched(
    group: &str,
    kind: &str,
    applied_kinds: &HashSet<(&str, &str)>,
    recorded: Option<&BTreeSet<String>>,
) -> bool {
    match recorded {
        None => true,
        Some(kinds) => {
            applied_kinds.contains(&(group, kind)) || kinds.contains(&kind_key(group, kind))
        }
    }
}

/// The live objects of this source and, for its namespaces that left git, what else they hold;
/// and the kinds its objects may now have in the cluster: those found, and those that could not
/// be searched. `recorded_kinds`: the kinds they could have before (see
/// [`audit::Record::owned_kinds`]).
pub(super) async fn observe_inventory(
    cluster: &Cluster,
    inventory: &str,
    desired: &[Desired],
    extra_namespaces: &[String],
    recorded_kinds: Option<&BTreeSet<String>>,
) -> Result<(Inventory, BTreeSet<String>), ReconcileError> {
    let namespaces: BTreeSet<&str> = desired
        .iter()
        .filter_map(|d| d.key.namespace.as_deref())
        .chain(extra_namespaces.iter().map(String::as_str))
        .collect();
    let applied_kinds: HashSet<(&str, &str)> = desired
        .iter()
        .map(|d| (d.key.group.as_str(), d.key.kind.as_str()))
        .collect();
    let (objects, mut kinds) = list_inventory(
        cluster,
        inventory,
        &namespaces,
        &applied_kinds,
        recorded_kinds,
    )
    .await?;
    kinds.extend(
        objects
            .iter()
            .filter_map(|live| ObjectKey::of_value(&live.object))
            .map(|key| kind_key(&key.group, &key.kind)),
    );
    let desired_keys: HashSet<&ObjectKey> = desired.iter().map(|d| &d.key).collect();
    let mut foreign_in_namespace = HashMap::new();
    for live in &objects {
        if let Some(key) = ObjectKey::of_value(&live.object)
            && key.is_kind("", "Namespace")
            && !desired_keys.contains(&key)
        {
            let foreign = foreign_objects(cluster, &key.name, inventory).await?;
            foreign_in_namespace.insert(key.name, foreign);
        }
    }
    let inventory = Inventory {
        objects,
        foreign_in_namespace,
        ..Inventory::default()
    };
    Ok((inventory, kinds))
}

/// Every live object carrying this inventory, across the kinds that can be listed and may hold
/// one (see [`searched`]): a sync of a few objects makes a few requests, not one per kind the
/// cluster serves (forty and more, times every GitSync of an operator). A namespaced kind that
/// may not be listed cluster-wide (kommit bound by Roles rather than a ClusterRole) is listed in
/// each of `namespaces`, those the source's objects live in.
async fn list_inventory(
    cluster: &Cluster,
    inventory: &str,
    namespaces: &BTreeSet<&str>,
    applied_kinds: &HashSet<(&str, &str)>,
    recorded_kinds: Option<&BTreeSet<String>>,
) -> Result<(Vec<LiveObject>, BTreeSet<String>), ReconcileError> {
    let selector = format!("{INVENTORY_LABEL}={inventory}");
    let types: Vec<ResourceType> = cluster
        .prunable_types()
        .into_iter()
        .filter(|rt| searched(rt.group(), rt.kind(), applied_kinds, recorded_kinds))
        .collect();
    let found: Vec<Listed> = stream::iter(types)
        .map(|rt| list_kind(cluster, rt, selector.clone(), namespaces, applied_kinds).boxed())
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    // A kind that could not be searched everywhere may still hold this source's objects.
    let unsearched: BTreeSet<String> = found
        .iter()
        .filter(|listed| listed.forbidden)
        .map(|listed| kind_key(listed.resource.group(), listed.resource.kind()))
        .collect();
    let mut all: Vec<LiveObject> = found.into_iter().flat_map(|l| l.objects).collect();
    // Controllers copy labels onto what they make (Endpoints and EndpointSlices take their
    // Service's); only objects that also carry kommit's annotation and no controller are ours.
    all.retain(|live| is_ours(&live.object));
    // The same object may be served by two groups (e.g. events); keep one entry per identity.
    let mut seen = HashSet::new();
    all.retain(|live| ObjectKey::of_value(&live.object).is_some_and(|k| seen.insert(k)));
    all.sort_by_key(|live| ObjectKey::of_value(&live.object));
    Ok((all, unsearched))
}

/// What listing one kind found.
struct Listed {
    resource: ResourceType,
    objects: Vec<LiveObject>,
    /// Some list was forbidden: the kind may hold objects that were not seen.
    forbidden: bool,
}

async fn list_kind(
    cluster: &Cluster,
    rt: ResourceType,
    selector: String,
    namespaces: &BTreeSet<&str>,
    applied_kinds: &HashSet<(&str, &str)>,
) -> Result<Listed, ReconcileError> {
    let mut forbidden = false;
    let cannot_list = |e: &ClusterError| {
        matches!(
            e,
            ClusterError::Forbidden { .. }
                | ClusterError::Api {
                    code: 404 | 405,
                    ..
                }
        )
    };
    // Kommit applies this kind but may not list it: what leaves git stays behind.
    let blind = |e: &ClusterError, namespace: Option<&str>| {
        if matches!(e, ClusterError::Forbidden { .. })
            && applied_kinds.contains(&(rt.group(), rt.kind()))
        {
            tracing::warn!(
                kind = %rt.kind(),
                namespace = namespace.unwrap_or("(all)"),
                "kommit may not list {} there, so those that left git are not pruned: grant it list",
                rt.resource.plural
            );
        }
    };
    let items = match cluster.list(&rt, None, Some(&selector)).await {
        Ok(items) => items,
        Err(ClusterError::Forbidden { .. }) if rt.namespaced => {
            let mut items = Vec::new();
            for ns in namespaces {
                match cluster.list(&rt, Some(ns), Some(&selector)).await {
                    Ok(found) => items.extend(found),
                    Err(e) if cannot_list(&e) => {
                        forbidden |= matches!(e, ClusterError::Forbidden { .. });
                        blind(&e, Some(ns))
                    }
                    Err(e) => return Err(ReconcileError::from(e)),
                }
            }
            items
        }
        // Kinds we may not list at all (RBAC) or that vanished cannot hold objects we could
        // prune anyway.
        Err(e) if cannot_list(&e) => {
            forbidden |= matches!(e, ClusterError::Forbidden { .. });
            blind(&e, None);
            tracing::debug!(kind = %rt.kind(), "skipping a kind that cannot be listed");
            Vec::new()
        }
        Err(e) => return Err(ReconcileError::from(e)),
    };
    let objects = items
        .into_iter()
        .map(|object| LiveObject {
            resource: rt.clone(),
            object,
        })
        .collect();
    Ok(Listed {
        resource: rt,
        objects,
        forbidden,
    })
}

/// Objects in a namespace that kommit does not own (ignoring what Kubernetes creates by itself).
async fn foreign_objects(
    cluster: &Cluster,
    namespace: &str,
    inventory: &str,
) -> Result<Vec<String>, ReconcileError> {
    let types: Vec<ResourceType> = cluster
        .prunable_types()
        .into_iter()
        .filter(|rt| rt.namespaced)
        .collect();
    let found: Vec<Vec<String>> = stream::iter(types)
        .map(|rt| {
            async move {
                let items = match cluster.list(&rt, Some(namespace), None).await {
                    Ok(items) => items,
                    // A kind that vanished holds nothing.
                    Err(ClusterError::Api {
                        code: 404 | 405, ..
                    }) => return Ok::<_, ReconcileError>(Vec::new()),
                    // Fail closed: what cannot be listed may hold someone's objects, so the
                    // namespace is kept.
                    Err(e) => {
                        return Ok(vec![format!(
                            "{} that kommit could not list ({})",
                            rt.resource.plural,
                            first_words(&e.to_string())
                        )]);
                    }
                };
                Ok(items
                    .iter()
                    .filter(|item| !is_automatic(item, inventory))
                    .filter_map(ObjectKey::of_value)
                    .map(|k| k.to_string())
                    .collect())
            }
            .boxed()
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let mut all: Vec<String> = found.into_iter().flatten().collect();
    all.sort();
    all.truncate(5);
    Ok(all)
}

fn first_words(message: &str) -> String {
    let first: String = message.chars().take(100).collect();
    if first.len() < message.len() {
        format!("{first}…")
    } else {
        first
    }
}

/// Applied by kommit itself rather than derived from something it applied.
fn is_ours(item: &Value) -> bool {
    let annotated = object::metadata_entry(item, "annotations", SOURCE_ANNOTATION).is_some();
    let controlled = item
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r.get("controller") == Some(&Value::Bool(true)))
        });
    annotated && !controlled
}

/// Ours, or made by Kubernetes itself (owned by another object, or the per-namespace defaults).
fn is_automatic(item: &Value, inventory: &str) -> bool {
    if object::metadata_entry(item, "labels", INVENTORY_LABEL) == Some(inventory) {
        return true;
    }
    if item
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| !refs.is_empty())
    {
        return true;
    }
    if object::metadata_entry(item, "labels", audit::RECORD_LABEL).is_some() {
        return true;
    }
    let Some(key) = ObjectKey::of_value(item) else {
        return true;
    };
    matches!(
        (key.group.as_str(), key.kind.as_str(), key.name.as_str()),
        ("", "ServiceAccount", "default")
            | ("", "ConfigMap", "kube-root-ca.crt")
            | ("", "Endpoints", _)
            | ("discovery.k8s.io", "EndpointSlice", _)
            | ("", "Event", _)
            | ("events.k8s.io", "Event", _)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::COMMIT_ANNOTATION;
    use serde_json::json;

    #[test]
    fn apply_body_sets_namespace_and_inventory_but_no_attribution() {
        let object = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"app": "web"}}, "data": {"a": "1"}});
        let body = apply_body(object, Some("shop"), "src-abc", "/repo#deploy");
        assert_eq!(body["metadata"]["namespace"], "shop");
        assert_eq!(body["metadata"]["labels"]["app"], "web");
        assert_eq!(body["metadata"]["labels"][INVENTORY_LABEL], "src-abc");
        assert_eq!(
            body["metadata"]["annotations"][SOURCE_ANNOTATION],
            "/repo#deploy"
        );
        assert!(
            body["metadata"]["annotations"]
                .get(COMMIT_ANNOTATION)
                .is_none()
        );
        let cluster_scoped = apply_body(
            json!({"metadata": {"name": "n", "namespace": "x"}}),
            None,
            "i",
            "s",
        );
        assert!(cluster_scoped["metadata"].get("namespace").is_none());
    }

    #[test]
    fn prune_searches_the_commits_and_the_recorded_kinds_or_all_without_a_record() {
        let applied: HashSet<(&str, &str)> = [("apps", "Deployment")].into_iter().collect();
        let recorded: BTreeSet<String> = [kind_key("", "ConfigMap")].into_iter().collect();
        assert!(searched("apps", "Deployment", &applied, Some(&recorded)));
        assert!(searched("", "ConfigMap", &applied, Some(&recorded)));
        assert!(!searched("", "Secret", &applied, Some(&recorded)));
        assert!(!searched("apps", "ConfigMap", &applied, Some(&recorded)));
        assert!(searched("", "Secret", &applied, None));
        assert!(searched("", "Secret", &HashSet::new(), None));
    }

    #[test]
    fn copies_of_our_label_are_not_our_objects() {
        let ours = json!({"metadata": {"labels": {INVENTORY_LABEL: "i"}, "annotations": {SOURCE_ANNOTATION: "r#p"}}});
        let endpoints = json!({"metadata": {"labels": {INVENTORY_LABEL: "i"}}});
        let slice = json!({"metadata": {"labels": {INVENTORY_LABEL: "i"}, "annotations": {SOURCE_ANNOTATION: "r#p"},
            "ownerReferences": [{"kind": "Service", "controller": true}]}});
        assert!(is_ours(&ours));
        assert!(!is_ours(&endpoints));
        assert!(!is_ours(&slice));
    }

    #[test]
    fn kubernetes_own_objects_do_not_keep_a_namespace_alive() {
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "a"}});
        let pod_of_rs = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "a",
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web"}]}});
        let ours = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "a",
            "labels": {INVENTORY_LABEL: "inv"}}});
        let theirs = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "db", "namespace": "a"}});
        assert!(is_automatic(&sa, "inv"));
        assert!(is_automatic(&pod_of_rs, "inv"));
        assert!(is_automatic(&ours, "inv"));
        assert!(!is_automatic(&theirs, "inv"));
    }
}
