//! The pipeline for one (repository, revision, path, cluster): read the commit, parse its
//! manifests, plan against the live cluster, then apply and prune, all or nothing up to the first
//! write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::cluster::{Cluster, ClusterError, ResourceType};
use crate::manifest::{self, Manifest, ManifestError, Origin};
use crate::object::{
    self, AUTHOR_ANNOTATION, CHANGE_CAUSE_ANNOTATION, COMMIT_ANNOTATION, DATE_ANNOTATION,
    FILE_ANNOTATION, INVENTORY_LABEL, ObjectKey, SOURCE_ANNOTATION, SUBJECT_ANNOTATION,
};
use crate::plan::{self, Action, Change, Plan, PlanSource};
use crate::source::{CommitInfo, GitSource, SourceError};

/// How many API requests run at once.
const CONCURRENCY: usize = 16;
/// How far back to look for the commit that last changed a file.
const ATTRIBUTION_DEPTH: usize = 5_000;

/// What to reconcile: a path of a repository at a revision.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub rev: Option<String>,
    pub path: String,
    /// Namespace for namespaced objects that name none (default: the kubeconfig's).
    pub namespace: Option<String>,
    /// Name of the inventory; default: derived from the repository and path.
    pub inventory: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub prune: bool,
    pub dry_run: bool,
    pub force_conflicts: bool,
    pub max_prune: usize,
    pub allow_mass_prune: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            prune: false,
            dry_run: false,
            force_conflicts: false,
            max_prune: 10,
            allow_mass_prune: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(
        "commit {commit} cannot be applied; nothing was changed in the cluster. {} problem{}:\n{}",
        problems.len(), if problems.len() == 1 { "" } else { "s" },
        problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
    )]
    Invalid {
        commit: String,
        problems: Vec<String>,
    },
    #[error(
        "refusing to prune {count} object{} ({reason}); nothing was changed. If this is \
         intended, re-run with --max-prune {count} or --allow-mass-prune; if not, check --path \
         and --rev",
        if *count == 1 { "" } else { "s" }
    )]
    PruneGuard { count: usize, reason: String },
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

/// Inventory of a source: the label value every applied object carries.
pub fn inventory_id(source: &GitSource, target: &Target) -> String {
    if let Some(name) = &target.inventory {
        return name.clone();
    }
    let path = crate::source::normalize_repo_path(&target.path).unwrap_or_default();
    let digest = Sha256::digest(format!("{}\n{}", source.identity(), path).as_bytes());
    format!("src-{}", &crate::source::hex(&digest)[..20])
}

/// One object of the commit, resolved against the cluster's API.
#[derive(Debug, Clone)]
struct Desired {
    manifest: Manifest,
    key: ObjectKey,
    /// `None` when its kind comes from a CustomResourceDefinition in the same commit.
    resource: Option<ResourceType>,
    /// The body for server-side apply (namespace and inventory set, no attribution yet).
    body: Value,
}

/// What is needed to carry a change out, beside what is shown.
#[derive(Debug, Clone)]
struct Step {
    action: Action,
    key: ObjectKey,
    resource: Option<ResourceType>,
    body: Option<Value>,
    origin: Option<Origin>,
    live_uid: Option<String>,
}

/// A plan together with what applying it takes.
pub struct Prepared {
    pub plan: Plan,
    pub inventory: String,
    /// How many live objects carry this source's inventory (prunes included).
    pub live_inventory: usize,
    steps: Vec<Step>,
    api_version_of: HashMap<ObjectKey, String>,
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
}

/// Reads the commit and plans it against the cluster. Nothing is written.
pub async fn prepare(
    source: &GitSource,
    cluster: &Cluster,
    target: &Target,
    policy: &Policy,
) -> Result<Prepared, ReconcileError> {
    let commit = source.resolve(target.rev.as_deref())?;
    let span = tracing::info_span!("plan", repo = %source.display(), commit = %commit.short_sha(), path = %target.path);
    let _enter = span.enter();
    let files = source.read_manifests(&commit, &target.path)?;
    let manifests = manifest::parse_files(&files).map_err(|errors| ReconcileError::Invalid {
        commit: commit.short_sha().to_string(),
        problems: errors.iter().map(ManifestError::to_string).collect(),
    })?;
    let inventory = inventory_id(source, target);
    let source_note = format!(
        "{}#{}",
        source.identity(),
        crate::source::normalize_repo_path(&target.path).unwrap_or_default()
    );
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| cluster.default_namespace().to_string());
    let desired =
        resolve(cluster, manifests, &namespace, &inventory, &source_note).map_err(|problems| {
            ReconcileError::Invalid {
                commit: commit.short_sha().to_string(),
                problems,
            }
        })?;
    let plan_source = PlanSource {
        repo: source.display().to_string(),
        path: crate::source::normalize_repo_path(&target.path).unwrap_or_default(),
        rev: target.rev.clone().unwrap_or_else(|| "HEAD".to_string()),
        commit: commit.clone(),
    };
    drop(_enter);
    plan_against(cluster, desired, plan_source, inventory, policy)
        .instrument_in(span)
        .await
}

trait InstrumentIn: Sized {
    fn instrument_in(self, span: tracing::Span) -> tracing::instrument::Instrumented<Self>;
}
impl<F: std::future::Future> InstrumentIn for F {
    fn instrument_in(self, span: tracing::Span) -> tracing::instrument::Instrumented<Self> {
        tracing::Instrument::instrument(self, span)
    }
}

/// Resolves every manifest's kind, namespace and identity; reports all problems at once.
fn resolve(
    cluster: &Cluster,
    manifests: Vec<Manifest>,
    default_namespace: &str,
    inventory: &str,
    source_note: &str,
) -> Result<Vec<Desired>, Vec<String>> {
    // Kinds defined by CRDs of this same commit can only be resolved once those are applied.
    let crd_kinds: HashSet<(String, String)> = manifests
        .iter()
        .filter(|m| m.group() == "apiextensions.k8s.io" && m.kind == "CustomResourceDefinition")
        .filter_map(|m| {
            let group = m.object.pointer("/spec/group")?.as_str()?;
            let kind = m.object.pointer("/spec/names/kind")?.as_str()?;
            Some((group.to_string(), kind.to_string()))
        })
        .collect();
    let crd_scopes: HashMap<(String, String), bool> = manifests
        .iter()
        .filter(|m| m.kind == "CustomResourceDefinition")
        .filter_map(|m| {
            let group = m.object.pointer("/spec/group")?.as_str()?;
            let kind = m.object.pointer("/spec/names/kind")?.as_str()?;
            let namespaced = m.object.pointer("/spec/scope")?.as_str()? == "Namespaced";
            Some(((group.to_string(), kind.to_string()), namespaced))
        })
        .collect();

    let mut problems = Vec::new();
    let mut seen: HashMap<ObjectKey, Origin> = HashMap::new();
    let mut out = Vec::with_capacity(manifests.len());
    for manifest in manifests {
        let group = manifest.group().to_string();
        let (resource, namespaced) = match cluster.resolve(&manifest.api_version, &manifest.kind) {
            Ok(rt) => {
                let namespaced = rt.namespaced;
                (Some(rt), namespaced)
            }
            Err(_) if crd_kinds.contains(&(group.clone(), manifest.kind.clone())) => {
                let namespaced = crd_scopes
                    .get(&(group.clone(), manifest.kind.clone()))
                    .copied()
                    .unwrap_or(true);
                (None, namespaced)
            }
            Err(e) => {
                problems.push(format!("{}: {e}", manifest.origin));
                continue;
            }
        };
        let namespace = namespaced.then(|| {
            manifest
                .namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_string())
        });
        let key = ObjectKey::new(&group, &manifest.kind, namespace.as_deref(), &manifest.name);
        if let Some(first) = seen.get(&key) {
            problems.push(format!(
                "{}: {key} is defined twice, here and at {first}; keep one of them",
                manifest.origin
            ));
            continue;
        }
        seen.insert(key.clone(), manifest.origin.clone());
        let body = apply_body(
            &manifest.object,
            namespace.as_deref(),
            inventory,
            source_note,
        );
        out.push(Desired {
            manifest,
            key,
            resource,
            body,
        });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// The object as kommit applies it: namespace filled in, inventory label and source annotation.
fn apply_body(
    object: &Value,
    namespace: Option<&str>,
    inventory: &str,
    source_note: &str,
) -> Value {
    let mut body = object.clone();
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

fn entry_map<'a>(map: &'a mut Map<String, Value>, field: &str) -> &'a mut Map<String, Value> {
    let slot = map
        .entry(field.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().expect("just made an object")
}

/// The outcome of looking at one desired object against the cluster.
enum Looked {
    Planned(Box<Change>, Box<Step>),
    Problem(String),
}

async fn plan_against(
    cluster: &Cluster,
    desired: Vec<Desired>,
    source: PlanSource,
    inventory: String,
    policy: &Policy,
) -> Result<Prepared, ReconcileError> {
    let label = |origin: &Origin| format!("git {}@{}", origin, source.commit.short_sha());
    // Namespaces created by this commit: objects inside them cannot be dry-run yet.
    let mut creating_namespaces = HashSet::new();
    let namespace_objects: Vec<&Desired> = desired
        .iter()
        .filter(|d| d.key.is_kind("", "Namespace"))
        .collect();
    for ns in namespace_objects {
        if let Some(rt) = &ns.resource
            && cluster.get(rt, &ns.key).await?.is_none()
        {
            creating_namespaces.insert(ns.key.name.clone());
        }
    }

    let looked: Vec<Looked> = stream::iter(desired.iter())
        .map(|d| {
            look(
                cluster,
                d,
                &creating_namespaces,
                policy,
                label(&d.manifest.origin),
            )
        })
        .buffered(CONCURRENCY)
        .try_collect()
        .await?;

    let mut changes = Vec::with_capacity(looked.len());
    let mut steps = Vec::with_capacity(looked.len());
    let mut problems = Vec::new();
    for item in looked {
        match item {
            Looked::Planned(change, step) => {
                changes.push(*change);
                steps.push(*step);
            }
            Looked::Problem(problem) => problems.push(problem),
        }
    }
    if !problems.is_empty() {
        return Err(ReconcileError::Invalid {
            commit: source.commit.short_sha().to_string(),
            problems,
        });
    }

    let desired_keys: HashSet<&ObjectKey> = desired.iter().map(|d| &d.key).collect();
    let live = list_inventory(cluster, &inventory).await?;
    let live_inventory = live.len();
    let mut api_version_of = HashMap::new();
    if policy.prune {
        for (rt, object) in live {
            let Some(key) = ObjectKey::of_value(&object) else {
                continue;
            };
            if desired_keys.contains(&key) {
                continue;
            }
            let mut reason = None;
            if key.is_kind("", "Namespace") {
                let foreign = foreign_objects(cluster, &key.name, &inventory).await?;
                if !foreign.is_empty() {
                    changes.push(Change {
                        action: Action::Unchanged,
                        live_commit: None,
                        api_version: rt.resource.api_version.clone(),
                        kind: key.kind.clone(),
                        namespace: None,
                        name: key.name.clone(),
                        source: None,
                        diff: String::new(),
                        reason: Some(format!(
                            "not pruned: the namespace still holds objects kommit does not own ({})",
                            foreign.join(", ")
                        )),
                        key: key.clone(),
                    });
                    continue;
                }
                reason = Some("no longer in git; the namespace holds nothing else".to_string());
            }
            api_version_of.insert(key.clone(), rt.resource.api_version.clone());
            changes.push(Change {
                action: Action::Prune,
                live_commit: object::metadata_entry(&object, "annotations", COMMIT_ANNOTATION)
                    .map(str::to_string),
                api_version: rt.resource.api_version.clone(),
                kind: key.kind.clone(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                source: None,
                diff: plan::prune_diff(&key, &object),
                reason: reason.or_else(|| Some("no longer in git".to_string())),
                key: key.clone(),
            });
            steps.push(Step {
                action: Action::Prune,
                key,
                resource: Some(rt),
                body: None,
                origin: None,
                live_uid: object
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
    }
    Ok(Prepared {
        plan: Plan { source, changes },
        inventory,
        live_inventory,
        steps,
        api_version_of,
    })
}

async fn look(
    cluster: &Cluster,
    desired: &Desired,
    creating_namespaces: &HashSet<String>,
    policy: &Policy,
    to_label: String,
) -> Result<Looked, ReconcileError> {
    let key = &desired.key;
    let origin = &desired.manifest.origin;
    let change = |action: Action, diff: String, reason: Option<String>| {
        Box::new(Change {
            action,
            live_commit: None,
            api_version: desired.manifest.api_version.clone(),
            kind: key.kind.clone(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            source: Some(origin.clone()),
            diff,
            reason,
            key: key.clone(),
        })
    };
    let step = |action: Action, live_uid: Option<String>| {
        Box::new(Step {
            action,
            key: key.clone(),
            resource: desired.resource.clone(),
            body: Some(desired.body.clone()),
            origin: Some(origin.clone()),
            live_uid,
        })
    };
    let Some(rt) = &desired.resource else {
        // Its CustomResourceDefinition is applied first; the server validates it then.
        let diff = plan::creation_diff(key, &desired.body, &to_label);
        return Ok(Looked::Planned(
            change(
                Action::Create,
                diff,
                Some(
                    "its CustomResourceDefinition is in this commit; validated when applied".into(),
                ),
            ),
            step(Action::Create, None),
        ));
    };
    let in_new_namespace = key
        .namespace
        .as_ref()
        .is_some_and(|ns| creating_namespaces.contains(ns));
    let live = if in_new_namespace {
        None
    } else {
        cluster.get(rt, key).await?
    };
    let live_uid = live
        .as_ref()
        .and_then(|l| l.pointer("/metadata/uid"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let live_commit = live
        .as_ref()
        .and_then(|l| object::metadata_entry(l, "annotations", COMMIT_ANNOTATION))
        .map(str::to_string);
    let problem = |e: ClusterError| Ok(Looked::Problem(format!("{origin}: {e}")));
    let looked = match live {
        None if in_new_namespace => Ok(Looked::Planned(
            change(
                Action::Create,
                plan::creation_diff(key, &desired.body, &to_label),
                None,
            ),
            step(Action::Create, None),
        )),
        None => match cluster
            .apply(rt, key, &desired.body, true, policy.force_conflicts)
            .await
        {
            Ok(_) => Ok(Looked::Planned(
                change(
                    Action::Create,
                    plan::creation_diff(key, &desired.body, &to_label),
                    None,
                ),
                step(Action::Create, None),
            )),
            Err(ClusterError::Api {
                code: 404, message, ..
            }) if key.namespace.is_some() => Ok(Looked::Problem(format!(
                "{origin}: {key}: {message}; add a Namespace manifest to the synced path or \
                     create the namespace first"
            ))),
            Err(e @ ClusterError::Unreachable { .. }) => Err(e.into()),
            Err(e) => problem(e),
        },
        Some(live) => match cluster
            .apply(rt, key, &desired.body, true, policy.force_conflicts)
            .await
        {
            Ok(dry_run) => {
                let (action, diff) = plan::compare(key, &live, &dry_run, &to_label);
                Ok(Looked::Planned(
                    change(action, diff, None),
                    step(action, live_uid),
                ))
            }
            Err(ClusterError::Rejected {
                immutable: true,
                message,
                ..
            }) if key.is_kind("", "Pod") => Ok(Looked::Planned(
                change(
                    Action::Replace,
                    plan::replacement_diff(key, &live, &desired.body, &to_label),
                    Some(format!(
                        "a Pod cannot be changed in place ({}); it is deleted and created again",
                        short_reason(&message)
                    )),
                ),
                step(Action::Replace, live_uid),
            )),
            Err(ClusterError::Rejected {
                immutable: true,
                message,
                ..
            }) => Ok(Looked::Problem(format!(
                "{origin}: {key}: {message}. kommit replaces only Pods by itself; delete the \
                 object (kubectl delete) and sync again to create it anew"
            ))),
            Err(e @ ClusterError::Unreachable { .. }) => Err(e.into()),
            Err(e) => problem(e),
        },
    };
    looked.map(|looked| match looked {
        Looked::Planned(mut change, step) => {
            change.live_commit = live_commit;
            Looked::Planned(change, step)
        }
        problem => problem,
    })
}

fn short_reason(message: &str) -> String {
    let first = message.split('\n').next().unwrap_or(message);
    let trimmed: String = first.chars().take(160).collect();
    if trimmed.len() < first.len() {
        format!("{trimmed}…")
    } else {
        trimmed
    }
}

/// Every live object carrying this inventory, across all kinds that can be listed.
async fn list_inventory(
    cluster: &Cluster,
    inventory: &str,
) -> Result<Vec<(ResourceType, Value)>, ReconcileError> {
    let selector = format!("{INVENTORY_LABEL}={inventory}");
    let types = cluster.prunable_types();
    let found: Vec<Vec<(ResourceType, Value)>> = stream::iter(types)
        .map(|rt| {
            let selector = selector.clone();
            async move {
                match cluster.list(&rt, None, Some(&selector)).await {
                    Ok(items) => Ok(items.into_iter().map(|v| (rt.clone(), v)).collect()),
                    // Kinds we may not list (RBAC) or that vanished cannot hold our objects
                    // in a way we could prune anyway.
                    Err(
                        ClusterError::Forbidden { .. }
                        | ClusterError::Api {
                            code: 404 | 405, ..
                        },
                    ) => {
                        tracing::debug!(kind = %rt.kind(), "skipping a kind that cannot be listed");
                        Ok(Vec::new())
                    }
                    Err(e) => Err(ReconcileError::from(e)),
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let mut all: Vec<(ResourceType, Value)> = found.into_iter().flatten().collect();
    // Controllers copy labels onto what they make (Endpoints and EndpointSlices take their
    // Service's); only objects that also carry kommit's annotation and no controller are ours.
    all.retain(|(_, v)| is_ours(v));
    // The same object may be served by two groups (e.g. events); keep one entry per identity.
    let mut seen = HashSet::new();
    all.retain(|(_, v)| ObjectKey::of_value(v).is_some_and(|k| seen.insert(k)));
    all.sort_by_key(|(_, v)| ObjectKey::of_value(v));
    Ok(all)
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
        .map(|rt| async move {
            let items = match cluster.list(&rt, Some(namespace), None).await {
                Ok(items) => items,
                Err(_) => return Ok::<_, ReconcileError>(Vec::new()),
            };
            Ok(items
                .iter()
                .filter(|item| !is_automatic(item, inventory))
                .filter_map(ObjectKey::of_value)
                .map(|k| k.to_string())
                .collect())
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let mut all: Vec<String> = found.into_iter().flatten().collect();
    all.sort();
    all.truncate(5);
    Ok(all)
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

/// Checks the prune guard: a sync that would delete a whole app, or many objects, needs consent.
pub fn check_prune_guard(prepared: &Prepared, policy: &Policy) -> Result<(), ReconcileError> {
    let count = prepared.plan.summary().prune;
    if count == 0 || policy.allow_mass_prune {
        return Ok(());
    }
    if count >= prepared.live_inventory {
        return Err(ReconcileError::PruneGuard {
            count,
            reason: "that is every object this source has in the cluster".to_string(),
        });
    }
    if count > policy.max_prune {
        return Err(ReconcileError::PruneGuard {
            count,
            reason: format!("more than --max-prune {}", policy.max_prune),
        });
    }
    Ok(())
}

/// Plans, then (unless a dry run) applies the commit: namespaces and CRDs first, workloads last,
/// and prunes in the reverse order. Nothing is written when planning finds any problem.
pub async fn sync(
    source: &GitSource,
    cluster: &mut Cluster,
    target: &Target,
    policy: &Policy,
) -> Result<SyncReport, ReconcileError> {
    let prepared = prepare(source, cluster, target, policy).await?;
    check_prune_guard(&prepared, policy)?;
    if policy.dry_run {
        return Ok(SyncReport {
            plan: prepared.plan,
            applied: Vec::new(),
            dry_run: true,
        });
    }
    let commit = prepared.plan.source.commit.clone();
    let files: Vec<String> = prepared
        .steps
        .iter()
        .filter(|s| s.action.writes() && s.action != Action::Prune)
        .filter_map(|s| s.origin.as_ref().map(|o| o.file.clone()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let attribution = if files.is_empty() {
        HashMap::new()
    } else {
        source.last_changes(&commit, &files, ATTRIBUTION_DEPTH)?
    };
    let span = tracing::info_span!("apply", repo = %source.display(), commit = %commit.short_sha());
    let applied = tracing::Instrument::instrument(
        apply_steps(cluster, &prepared, &attribution, policy),
        span,
    )
    .await?;
    Ok(SyncReport {
        plan: prepared.plan,
        applied,
        dry_run: false,
    })
}

async fn apply_steps(
    cluster: &mut Cluster,
    prepared: &Prepared,
    attribution: &HashMap<String, CommitInfo>,
    policy: &Policy,
) -> Result<Vec<(Action, ObjectKey)>, ReconcileError> {
    let commit = &prepared.plan.source.commit;
    let writes: Vec<&Step> = prepared
        .steps
        .iter()
        .filter(|s| s.action.writes())
        .collect();
    let total = writes.len();
    let mut applied: Vec<(Action, ObjectKey)> = Vec::with_capacity(total);

    let mut tiers: BTreeMap<u8, Vec<&Step>> = BTreeMap::new();
    for step in writes.iter().filter(|s| s.action != Action::Prune) {
        tiers
            .entry(object::apply_tier(&step.key.group, &step.key.kind))
            .or_default()
            .push(step);
    }
    let mut applied_crds = false;
    for (tier, steps) in tiers {
        if applied_crds {
            wait_for_new_kinds(cluster, &steps).await?;
            applied_crds = false;
        }
        let results: Vec<Result<(Action, ObjectKey), (ObjectKey, ClusterError)>> =
            stream::iter(steps.iter().copied())
                .map(|step| {
                    let cluster = &*cluster;
                    async move {
                        let rt = match &step.resource {
                            Some(rt) => rt.clone(),
                            None => resolve_late(cluster, prepared, step)
                                .map_err(|e| (step.key.clone(), e))?,
                        };
                        let body = attributed_body(step, commit, attribution);
                        write(cluster, &rt, step, &body, policy)
                            .await
                            .map(|()| (step.action, step.key.clone()))
                            .map_err(|e| (step.key.clone(), e))
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        let mut failure = None;
        for result in results {
            match result {
                Ok(done) => {
                    tracing::info!(object = %done.1, action = done.0.verb(), "applied");
                    applied.push(done);
                }
                Err(e) if failure.is_none() => failure = Some(e),
                Err((key, e)) => tracing::error!(object = %key, error = %e, "apply failed"),
            }
        }
        if let Some((key, source)) = failure {
            return Err(ReconcileError::ApplyFailed {
                commit: commit.short_sha().to_string(),
                object: key.to_string(),
                applied: applied.len(),
                total,
                source: Box::new(source),
            });
        }
        if tier == 1 {
            applied_crds = true;
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
        match cluster.delete(rt, &step.key).await {
            Ok(_) => {
                tracing::info!(object = %step.key, "pruned");
                applied.push((Action::Prune, step.key.clone()));
            }
            Err(source) => {
                return Err(ReconcileError::ApplyFailed {
                    commit: commit.short_sha().to_string(),
                    object: step.key.to_string(),
                    applied: applied.len(),
                    total,
                    source: Box::new(source),
                });
            }
        }
    }
    Ok(applied)
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
) -> Result<(), ClusterError> {
    if step.action == Action::Replace {
        cluster.delete(rt, &step.key).await?;
        cluster
            .wait_gone(
                rt,
                &step.key,
                step.live_uid.as_deref(),
                Duration::from_secs(120),
            )
            .await?;
    }
    cluster
        .apply(rt, &step.key, body, false, policy.force_conflicts)
        .map_ok(|_| ())
        .await
}

use futures::TryFutureExt;

fn resolve_late(
    cluster: &Cluster,
    prepared: &Prepared,
    step: &Step,
) -> Result<ResourceType, ClusterError> {
    let api_version = step
        .body
        .as_ref()
        .and_then(|b| b.get("apiVersion"))
        .and_then(Value::as_str)
        .or_else(|| prepared.api_version_of.get(&step.key).map(String::as_str))
        .unwrap_or_default();
    cluster.resolve(api_version, &step.key.kind)
}

/// After CRDs were applied: wait until the API serves the kinds the next steps need.
async fn wait_for_new_kinds(cluster: &mut Cluster, steps: &[&Step]) -> Result<(), ReconcileError> {
    if steps.iter().all(|s| s.resource.is_some()) {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        cluster.refresh_discovery().await?;
        let missing: Vec<&Step> = steps
            .iter()
            .copied()
            .filter(|s| s.resource.is_none())
            .filter(|s| {
                let api_version = s
                    .body
                    .as_ref()
                    .and_then(|b| b.get("apiVersion"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                cluster.resolve(api_version, &s.key.kind).is_err()
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::Timeout {
                object: missing[0].key.to_string(),
                what: "its CustomResourceDefinition is established",
                seconds: 60,
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apply_body_sets_namespace_and_inventory_but_no_attribution() {
        let object = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"app": "web"}}, "data": {"a": "1"}});
        let body = apply_body(&object, Some("shop"), "src-abc", "/repo#deploy");
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
            &json!({"metadata": {"name": "n", "namespace": "x"}}),
            None,
            "i",
            "s",
        );
        assert!(cluster_scoped["metadata"].get("namespace").is_none());
    }

    #[test]
    fn deployments_get_a_change_cause_from_the_commit_that_changed_their_file() {
        let step = Step {
            action: Action::Update,
            key: ObjectKey::new("apps", "Deployment", Some("shop"), "web"),
            resource: None,
            body: Some(json!({"metadata": {"name": "web"}})),
            origin: Some(Origin {
                file: "deploy/web.yaml".into(),
                document: 0,
                line: 1,
            }),
            live_uid: None,
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
