//! The decision core: given what a commit wants and what the cluster showed about it, what
//! happens to each object (create, update, replace, unchanged, prune) and what stops the commit.
//! Pure: observations in, a plan out, so every decision has a unit test without a cluster.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

use serde_json::Value;

use super::{Action, Change, Plan, PlanSource};
use crate::cluster::{FieldConflict, ResourceType};
use crate::manifest::Origin;
use crate::object::{
    self, ADOPT_ANNOTATION, COMMIT_ANNOTATION, INVENTORY_LABEL, ObjectKey, SOURCE_ANNOTATION,
};

/// One object of a commit, resolved against the cluster's API.
#[derive(Debug, Clone)]
pub struct Desired {
    pub key: ObjectKey,
    pub api_version: String,
    pub origin: Origin,
    /// `None` when its kind comes from a CustomResourceDefinition of the same commit.
    pub resource: Option<ResourceType>,
    /// The body for server-side apply (namespace and inventory set, no attribution yet).
    pub body: Value,
}

/// What the cluster showed about one desired object.
#[derive(Debug, Clone)]
pub enum Observation {
    /// Not asked yet: it lives in a namespace this commit creates, or its kind comes from a
    /// CustomResourceDefinition of this commit. The server validates it when it is applied.
    NotYetServed(NotYetServed),
    /// Not in the cluster; the server accepted its creation in a dry run.
    Absent,
    /// In the cluster.
    Present { live: Value, dry_run: DryRun },
    /// The server refused it in a dry run.
    Refused {
        live: Option<Value>,
        rejection: Rejection,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotYetServed {
    NewNamespace,
    NewKind,
}

/// The server's dry run of applying a present object.
#[derive(Debug, Clone)]
pub enum DryRun {
    /// Not asked: kommit owns exactly the manifest's fields and each holds the manifest's value.
    ProvablyUnchanged,
    /// What the server would store.
    Stored(Value),
    /// Other field managers hold fields the manifest sets to other values; `forced` is what the
    /// server would store if git took them back.
    Conflict {
        conflicts: Vec<FieldConflict>,
        forced: Value,
    },
}

/// Why the server refused a dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A field that cannot change after creation changed.
    Immutable(String),
    /// The object's namespace does not exist.
    MissingNamespace(String),
    /// Validation, admission or anything else the server said no to.
    Invalid(String),
    /// The identity the sync acts as may not read or write it (RBAC).
    Forbidden(String),
}

/// A live object carrying this source's inventory, as prune sees it.
#[derive(Debug, Clone)]
pub struct LiveObject {
    pub resource: ResourceType,
    pub object: Value,
}

/// What the cluster holds of this source beyond the commit's own objects.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// The inventory label value of this source.
    pub id: String,
    /// The uids kommit recorded creating or adopting for this source. `None` for a record
    /// written before kommit kept them: the inventory label is trusted once, and the uids are
    /// recorded from then on.
    pub recorded: Option<BTreeSet<String>>,
    /// Every live object of the inventory (listed only when pruning).
    pub objects: Vec<LiveObject>,
    /// For namespaces of the inventory: objects in them kommit does not own (a few names).
    pub foreign_in_namespace: HashMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub prune: bool,
    /// Take fields other managers hold; without it they are drift to report.
    pub force_conflicts: bool,
    /// Take over objects that exist without this source's inventory (`--adopt`).
    pub adopt: bool,
}

/// Who an existing object belongs to, as far as kommit can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Created or adopted by this source, as kommit recorded it.
    ThisSource,
    /// Nobody kommit knows: made by hand, by another tool, or carrying a copy of this
    /// source's label that kommit has no record of.
    Foreign { managers: Vec<String> },
    /// Another kommit source.
    OtherSource {
        inventory: String,
        source: Option<String>,
    },
}

impl Inventory {
    /// Whether kommit recorded `live` as this source's own.
    pub fn owner_of(&self, live: &Value) -> Owner {
        let label = object::metadata_entry(live, "labels", INVENTORY_LABEL);
        let uid = live.pointer("/metadata/uid").and_then(Value::as_str);
        match label {
            Some(id) if id == self.id => {
                let recorded = match (&self.recorded, uid) {
                    (None, _) => true,
                    (Some(uids), Some(uid)) => uids.contains(uid),
                    (Some(_), None) => false,
                };
                if recorded {
                    return Owner::ThisSource;
                }
            }
            Some(other) if !other.is_empty() => {
                return Owner::OtherSource {
                    inventory: other.to_string(),
                    source: object::metadata_entry(live, "annotations", SOURCE_ANNOTATION)
                        .map(str::to_string),
                };
            }
            _ => {}
        }
        Owner::Foreign {
            managers: managers_of(live),
        }
    }
}

/// The field managers of a live object, in the order the server lists them.
pub fn managers_of(live: &Value) -> Vec<String> {
    let mut managers: Vec<String> = Vec::new();
    for entry in live
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(manager) = entry.get("manager").and_then(Value::as_str)
            && !managers.iter().any(|m| m == manager)
        {
            managers.push(manager.to_string());
        }
    }
    managers
}

/// An existing object the commit would take over without having been told to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unconsented {
    pub key: ObjectKey,
    pub origin: Origin,
    pub managers: Vec<String>,
}

impl fmt::Display for Unconsented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.key, self.origin)?;
        if !self.managers.is_empty() {
            write!(f, ", managed by {}", self.managers.join(", "))?;
        }
        Ok(())
    }
}

/// The manager `kubectl apply` (client-side) writes as.
const CLIENT_SIDE_APPLY: &str = "kubectl-client-side-apply";

/// The managed fields of `live` with what client-side `kubectl apply` owns handed to kommit's
/// server-side apply, as `kubectl apply --server-side` migrates an object the first time; `None`
/// when client-side apply owns nothing. Without this, a field removed from git would stay live
/// after adoption (still owned by the client-side manager).
pub fn upgrade_client_side_ownership(live: &Value) -> Option<Value> {
    let entries = live.pointer("/metadata/managedFields")?.as_array()?;
    let is_client_side = |e: &Value| {
        e.get("manager").and_then(Value::as_str) == Some(CLIENT_SIDE_APPLY)
            && e.get("operation").and_then(Value::as_str) == Some("Update")
    };
    if !entries.iter().any(is_client_side) {
        return None;
    }
    let is_ours = |e: &Value| {
        e.get("manager").and_then(Value::as_str) == Some(object::FIELD_MANAGER)
            && e.get("operation").and_then(Value::as_str) == Some("Apply")
    };
    let mut ours = entries.iter().find(|e| is_ours(e)).cloned();
    let mut kept = Vec::new();
    for entry in entries {
        if is_client_side(entry) {
            let fields = entry.get("fieldsV1").cloned().unwrap_or(Value::Null);
            match &mut ours {
                Some(existing) => {
                    let mut merged = existing.get("fieldsV1").cloned().unwrap_or(Value::Null);
                    merge_field_sets(&mut merged, &fields);
                    existing["fieldsV1"] = merged;
                }
                None => {
                    let mut taken = entry.clone();
                    taken["manager"] = object::FIELD_MANAGER.into();
                    taken["operation"] = "Apply".into();
                    if let Some(map) = taken.as_object_mut() {
                        map.remove("subresource");
                    }
                    ours = Some(taken);
                }
            }
        } else if !is_ours(entry) {
            kept.push(entry.clone());
        }
    }
    kept.extend(ours);
    Some(Value::Array(kept))
}

/// Adds the fields of `more` to the field set `into` (both in the server's `fieldsV1` form).
fn merge_field_sets(into: &mut Value, more: &Value) {
    match (into, more) {
        (Value::Object(into), Value::Object(more)) => {
            for (key, value) in more {
                match into.get_mut(key) {
                    Some(existing) => merge_field_sets(existing, value),
                    None => {
                        into.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (into @ Value::Null, more) => *into = more.clone(),
        _ => {}
    }
}

/// What carrying a change out needs beside what is shown.
#[derive(Debug, Clone)]
pub struct Step {
    pub action: Action,
    pub key: ObjectKey,
    pub api_version: String,
    pub resource: Option<ResourceType>,
    /// The body to apply (only for steps that write it).
    pub body: Option<Value>,
    pub origin: Option<Origin>,
    pub live_uid: Option<String>,
    /// For an adoption: the live object's managed fields with client-side apply's handed to
    /// kommit, written before the apply (see [`upgrade_client_side_ownership`]).
    pub upgrade_ownership: Option<Value>,
    /// The live object's resourceVersion, the precondition of that write.
    pub live_resource_version: Option<String>,
}

/// Fields of one object that other managers took over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drifted {
    pub key: ObjectKey,
    pub fields: Vec<FieldConflict>,
}

impl fmt::Display for Drifted {
    /// `Deployment web: .spec.replicas (kubectl), .spec.template.spec.containers[app].image (kubectl-set)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|c| format!("{} ({})", short_field_path(&c.field), c.manager))
            .collect();
        write!(
            f,
            "{} {}: {}",
            self.key.kind,
            self.key.name,
            fields.join(", ")
        )
    }
}

/// `.spec.containers[name="app"].image` → `.spec.containers[app].image`.
pub fn short_field_path(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let Some(close) = rest.find(']') else { break };
        let inside = &rest[..close];
        let shown = inside
            .split_once('=')
            .map(|(_, value)| value.trim_matches('"'))
            .unwrap_or(inside);
        out.push_str(shown);
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// What kind of problem stops a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// YAML that cannot be read, or an object without identity.
    Manifest,
    /// A kind the cluster does not serve.
    UnknownKind,
    /// The same object twice.
    Duplicate,
    /// A change to an immutable field of a kind kommit does not replace.
    Immutable,
    /// A namespaced object whose namespace does not exist.
    MissingNamespace,
    /// The server refused the object.
    Invalid,
    /// The object belongs to another kommit source.
    OtherSource,
    /// The identity the sync acts as may not touch the object.
    Forbidden,
    /// An object outside the one namespace the sync is confined to (a preview).
    OutsideNamespace,
}

/// One reason a commit cannot be applied, with where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub origin: Option<Origin>,
    pub message: String,
}

impl Problem {
    pub fn at(kind: ProblemKind, origin: &Origin, message: impl Into<String>) -> Self {
        Problem {
            kind,
            origin: Some(origin.clone()),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) => write!(f, "{origin}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The outcome of deciding: what will be shown, what will be done, and the drift found.
#[derive(Debug, Clone)]
pub struct Decision {
    pub plan: Plan,
    pub steps: Vec<Step>,
    /// Objects whose fields other managers hold (only without `force_conflicts`).
    pub drift: Vec<Drifted>,
    /// Existing objects the commit would take over without consent: nothing may be written.
    pub unconsented: Vec<Unconsented>,
    /// How many live objects carry this source's inventory (what prune could touch).
    pub live_inventory: usize,
}

/// Decides every object of a commit. `observations` are in the order of `desired`. Every
/// problem is reported at once; nothing is decided when there is one.
pub fn decide(
    source: PlanSource,
    desired: Vec<Desired>,
    observations: Vec<Observation>,
    mut inventory: Inventory,
    options: Options,
) -> Result<Decision, Vec<Problem>> {
    assert_eq!(
        desired.len(),
        observations.len(),
        "one observation per desired object"
    );
    let to_label = |origin: &Origin| format!("git {}@{}", origin, source.commit.short_sha());
    let mut changes = Vec::with_capacity(desired.len());
    let mut steps = Vec::with_capacity(desired.len());
    let mut problems = Vec::new();
    let mut drift = Vec::new();
    let mut unconsented = Vec::new();
    let desired_keys: HashSet<ObjectKey> = desired.iter().map(|d| d.key.clone()).collect();

    for (d, observation) in desired.into_iter().zip(observations) {
        let label = to_label(&d.origin);
        let live = match &observation {
            Observation::Present { live, .. } => Some(live),
            Observation::Refused { live, .. } => live.as_ref(),
            _ => None,
        };
        let live_uid = live
            .and_then(|l| l.pointer("/metadata/uid"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let live_commit = live
            .and_then(|l| object::metadata_entry(l, "annotations", COMMIT_ANNOTATION))
            .map(str::to_string);
        let live_resource_version = live
            .and_then(|l| l.pointer("/metadata/resourceVersion"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let foreign = match live.map(|l| inventory.owner_of(l)) {
            None | Some(Owner::ThisSource) => None,
            Some(Owner::Foreign { managers }) => Some(managers),
            Some(Owner::OtherSource { inventory, source }) => {
                problems.push(Problem::at(
                    ProblemKind::OtherSource,
                    &d.origin,
                    format!(
                        "{}: belongs to another kommit source ({}, inventory {inventory}); kommit \
                         never takes over another source's objects: keep it in one of the two",
                        d.key,
                        source.as_deref().unwrap_or("source unknown")
                    ),
                ));
                continue;
            }
        };
        let upgrade_ownership = foreign
            .as_ref()
            .and(live)
            .and_then(upgrade_client_side_ownership);
        let adoption_note = foreign.as_ref().map(|managers| {
            let by = if managers.is_empty() {
                String::new()
            } else {
                format!(" (managed by {})", managers.join(", "))
            };
            if options.adopt || wants_adoption(&d.body) {
                format!("exists and kommit did not create it{by}: taken over as asked")
            } else {
                unconsented.push(Unconsented {
                    key: d.key.clone(),
                    origin: d.origin.clone(),
                    managers: managers.clone(),
                });
                format!(
                    "exists and kommit did not create it{by}: not taken over without --adopt, \
                     the manifest annotation {ADOPT_ANNOTATION}: \"true\" or GitSync spec.adopt"
                )
            }
        });
        let (action, diff, reason) = match observation {
            Observation::NotYetServed(why) => (
                Action::Create,
                super::creation_diff(&d.key, &d.body, &label),
                (why == NotYetServed::NewKind).then(|| {
                    "its CustomResourceDefinition is in this commit; validated when applied"
                        .to_string()
                }),
            ),
            Observation::Absent => (
                Action::Create,
                super::creation_diff(&d.key, &d.body, &label),
                None,
            ),
            Observation::Present {
                dry_run: DryRun::ProvablyUnchanged,
                ..
            } if adoption_note.is_none() => (Action::Unchanged, String::new(), None),
            Observation::Present {
                dry_run: DryRun::ProvablyUnchanged,
                ..
            } => (Action::Adopt, String::new(), adoption_note),
            Observation::Present {
                live,
                dry_run: DryRun::Stored(stored),
            } => {
                let (action, diff) = super::compare(&d.key, &live, &stored, &label);
                match adoption_note {
                    Some(note) => (Action::Adopt, diff, Some(note)),
                    None => (action, diff, None),
                }
            }
            // Taking an object over takes its fields too.
            Observation::Present {
                live,
                dry_run: DryRun::Conflict { forced, .. },
            } if adoption_note.is_some() => {
                let (_, diff) = super::compare(&d.key, &live, &forced, &label);
                (Action::Adopt, diff, adoption_note)
            }
            Observation::Present {
                live,
                dry_run: DryRun::Conflict { conflicts, forced },
            } => {
                let (_, diff) = super::compare(&d.key, &live, &forced, &label);
                let drifted = Drifted {
                    key: d.key.clone(),
                    fields: conflicts,
                };
                let reason = format!("changed outside git: {drifted}");
                if !options.force_conflicts {
                    drift.push(drifted);
                }
                (Action::Update, diff, Some(reason))
            }
            Observation::Refused {
                live: Some(live),
                rejection: Rejection::Immutable(message),
            } if d.key.is_kind("", "Pod") => (
                Action::Replace,
                super::replacement_diff(&d.key, &live, &d.body, &label),
                Some(format!(
                    "a Pod cannot be changed in place ({}); it is deleted and created again",
                    first_line(&message)
                )),
            ),
            Observation::Refused { rejection, .. } => {
                let key = &d.key;
                problems.push(match rejection {
                    Rejection::Immutable(message) => Problem::at(
                        ProblemKind::Immutable,
                        &d.origin,
                        format!(
                            "{key}: {message}. kommit replaces only Pods by itself; delete the \
                             object (kubectl delete) and sync again to create it anew"
                        ),
                    ),
                    Rejection::MissingNamespace(message) => Problem::at(
                        ProblemKind::MissingNamespace,
                        &d.origin,
                        format!(
                            "{key}: {message}; add a Namespace manifest to the synced path or \
                             create the namespace first"
                        ),
                    ),
                    Rejection::Invalid(message) => {
                        Problem::at(ProblemKind::Invalid, &d.origin, message)
                    }
                    Rejection::Forbidden(message) => {
                        Problem::at(ProblemKind::Forbidden, &d.origin, message)
                    }
                });
                continue;
            }
        };
        changes.push(Change {
            action,
            live_commit,
            api_version: d.api_version.clone(),
            kind: d.key.kind.clone(),
            namespace: d.key.namespace.clone(),
            name: d.key.name.clone(),
            source: Some(d.origin.clone()),
            diff,
            reason,
            key: d.key.clone(),
        });
        steps.push(Step {
            action,
            key: d.key,
            api_version: d.api_version,
            resource: d.resource,
            // Only what is written needs its body; unchanged objects keep none.
            body: action.writes().then_some(d.body),
            origin: Some(d.origin),
            live_uid,
            upgrade_ownership: upgrade_ownership.filter(|_| action.writes()),
            live_resource_version,
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    let (ours, unproven): (Vec<LiveObject>, Vec<LiveObject>) =
        std::mem::take(&mut inventory.objects)
            .into_iter()
            .partition(|live| inventory.owner_of(&live.object) == Owner::ThisSource);
    let live_inventory = ours.len();
    if options.prune {
        // A copied label proves nothing: what kommit has no record of is never deleted.
        for LiveObject { resource, object } in unproven {
            let Some(key) = ObjectKey::of_value(&object) else {
                continue;
            };
            if desired_keys.contains(&key) {
                continue;
            }
            changes.push(Change {
                action: Action::Unchanged,
                live_commit: None,
                api_version: resource.resource.api_version.clone(),
                kind: key.kind.clone(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                source: None,
                diff: String::new(),
                reason: Some(
                    "not pruned: it carries this source's inventory label, but kommit has no \
                     record of creating it"
                        .to_string(),
                ),
                key,
            });
        }
        for LiveObject { resource, object } in ours {
            let Some(key) = ObjectKey::of_value(&object) else {
                continue;
            };
            if desired_keys.contains(&key) {
                continue;
            }
            let mut reason = "no longer in git".to_string();
            if key.is_kind("", "Namespace") {
                match inventory.foreign_in_namespace.get(&key.name) {
                    Some(foreign) if !foreign.is_empty() => {
                        changes.push(Change {
                            action: Action::Unchanged,
                            live_commit: None,
                            api_version: resource.resource.api_version.clone(),
                            kind: key.kind.clone(),
                            namespace: None,
                            name: key.name.clone(),
                            source: None,
                            diff: String::new(),
                            reason: Some(format!(
                                "not pruned: the namespace still holds objects kommit does not own ({})",
                                foreign.join(", ")
                            )),
                            key,
                        });
                        continue;
                    }
                    _ => reason = "no longer in git; the namespace holds nothing else".to_string(),
                }
            }
            changes.push(Change {
                action: Action::Prune,
                live_commit: object::metadata_entry(&object, "annotations", COMMIT_ANNOTATION)
                    .map(str::to_string),
                api_version: resource.resource.api_version.clone(),
                kind: key.kind.clone(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                source: None,
                diff: super::prune_diff(&key, &object),
                reason: Some(reason),
                key: key.clone(),
            });
            steps.push(Step {
                action: Action::Prune,
                api_version: resource.resource.api_version.clone(),
                key,
                resource: Some(resource),
                body: None,
                origin: None,
                live_uid: object
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                upgrade_ownership: None,
                live_resource_version: None,
            });
        }
    }
    Ok(Decision {
        plan: Plan { source, changes },
        steps,
        drift,
        unconsented,
        live_inventory,
    })
}

/// The manifest asks kommit to take the object over if it exists.
fn wants_adoption(body: &Value) -> bool {
    object::metadata_entry(body, "annotations", ADOPT_ANNOTATION) == Some("true")
}

/// Why a sync would prune too much to go ahead without consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneGuard {
    pub count: usize,
    pub reason: String,
}

/// A sync that would delete every object of its source, or more than `max_prune`, needs consent.
pub fn check_prune_guard(
    decision: &Decision,
    max_prune: usize,
    allow_mass_prune: bool,
) -> Result<(), PruneGuard> {
    let count = decision.plan.summary().prune;
    if count == 0 || allow_mass_prune {
        return Ok(());
    }
    if count >= decision.live_inventory {
        return Err(PruneGuard {
            count,
            reason: "that is every object this source has in the cluster".to_string(),
        });
    }
    if count > max_prune {
        return Err(PruneGuard {
            count,
            reason: format!("more than --max-prune {max_prune}"),
        });
    }
    Ok(())
}

fn first_line(message: &str) -> String {
    let first = message.split('\n').next().unwrap_or(message);
    let trimmed: String = first.chars().take(160).collect();
    if trimmed.len() < first.len() {
        format!("{trimmed}…")
    } else {
        trimmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::CommitInfo;
    use crate::object::{FIELD_MANAGER, INVENTORY_LABEL};
    use kube::core::ApiResource;
    use kube::discovery::{ApiCapabilities, Scope};
    use serde_json::json;

    fn resource(api_version: &str, kind: &str, plural: &str, namespaced: bool) -> ResourceType {
        let (group, version) = crate::manifest::split_api_version(api_version);
        ResourceType {
            resource: ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: api_version.into(),
                kind: kind.into(),
                plural: plural.into(),
            },
            namespaced,
            capabilities: ApiCapabilities {
                scope: if namespaced {
                    Scope::Namespaced
                } else {
                    Scope::Cluster
                },
                subresources: Vec::new(),
                operations: Vec::new(),
            },
        }
    }

    fn source() -> PlanSource {
        PlanSource {
            repo: "/repo".into(),
            path: String::new(),
            rev: "HEAD".into(),
            commit: CommitInfo {
                sha: "c".repeat(40),
                author: "Ada".into(),
                email: "ada@x".into(),
                time: 0,
                subject: "Change".into(),
            },
        }
    }

    fn config_map(name: &str, value: &str) -> Desired {
        let key = ObjectKey::new("", "ConfigMap", Some("shop"), name);
        Desired {
            key,
            api_version: "v1".into(),
            origin: Origin {
                file: format!("{name}.yaml"),
                document: 0,
                line: 1,
            },
            resource: Some(resource("v1", "ConfigMap", "configmaps", true)),
            body: json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": "shop", "labels": {INVENTORY_LABEL: "inv"}},
                "data": {"k": value}}),
        }
    }

    fn live(desired: &Desired, value: &str) -> Value {
        let mut live = desired.body.clone();
        live["data"]["k"] = json!(value);
        live["metadata"]["uid"] = json!(format!("uid-{}", desired.key.name));
        live["metadata"]["managedFields"] = json!([{"manager": FIELD_MANAGER, "operation": "Apply",
            "fieldsV1": {"f:data": {"f:k": {}}}}]);
        live
    }

    /// The inventory of the source under test, from before kommit recorded uids.
    fn ours() -> Inventory {
        Inventory {
            id: "inv".into(),
            ..Inventory::default()
        }
    }

    fn decide_one(
        d: Desired,
        observation: Observation,
        options: Options,
    ) -> Result<Decision, Vec<Problem>> {
        decide(source(), vec![d], vec![observation], ours(), options)
    }

    #[test]
    fn an_absent_object_is_created_with_all_of_it_in_the_diff() {
        let d = config_map("app", "1");
        let decision = decide_one(d, Observation::Absent, Options::default()).unwrap();
        let change = &decision.plan.changes[0];
        assert_eq!(change.action, Action::Create);
        assert!(
            change.diff.contains("+  k: '1'") || change.diff.contains("+  k: \"1\""),
            "{}",
            change.diff
        );
        assert!(decision.steps[0].body.is_some());
    }

    #[test]
    fn a_changed_object_is_updated_with_the_servers_view_in_the_diff() {
        let d = config_map("app", "2");
        let before = live(&d, "1");
        let stored = live(&d, "2");
        let decision = decide_one(
            d,
            Observation::Present {
                live: before,
                dry_run: DryRun::Stored(stored),
            },
            Options::default(),
        )
        .unwrap();
        assert_eq!(decision.plan.changes[0].action, Action::Update);
        assert_eq!(decision.steps[0].live_uid.as_deref(), Some("uid-app"));
    }

    #[test]
    fn what_the_server_would_store_unchanged_is_unchanged_and_keeps_no_body() {
        let d = config_map("app", "1");
        let same = live(&d, "1");
        let decision = decide_one(
            d.clone(),
            Observation::Present {
                live: same.clone(),
                dry_run: DryRun::Stored(same.clone()),
            },
            Options::default(),
        )
        .unwrap();
        assert_eq!(decision.plan.changes[0].action, Action::Unchanged);
        assert!(decision.steps[0].body.is_none());
        let proved = decide_one(
            d,
            Observation::Present {
                live: same,
                dry_run: DryRun::ProvablyUnchanged,
            },
            Options::default(),
        )
        .unwrap();
        assert_eq!(proved.plan.changes[0].action, Action::Unchanged);
        assert!(proved.plan.changes[0].diff.is_empty());
    }

    #[test]
    fn a_pod_with_an_immutable_change_is_replaced_other_kinds_are_refused() {
        let pod_key = ObjectKey::new("", "Pod", Some("shop"), "debug");
        let pod = Desired {
            key: pod_key,
            api_version: "v1".into(),
            origin: Origin {
                file: "pod.yaml".into(),
                document: 0,
                line: 1,
            },
            resource: Some(resource("v1", "Pod", "pods", true)),
            body: json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "debug", "namespace": "shop"},
                "spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}),
        };
        let mut live_pod = pod.body.clone();
        live_pod["spec"]["containers"][0]["image"] = json!("busybox:1");
        live_pod["metadata"]["uid"] = json!("pod-uid");
        let refused = Observation::Refused {
            live: Some(live_pod.clone()),
            rejection: Rejection::Immutable("pod updates may not change fields".into()),
        };
        let decision = decide_one(pod, refused.clone(), Options::default()).unwrap();
        assert_eq!(decision.plan.changes[0].action, Action::Replace);
        assert_eq!(decision.steps[0].live_uid.as_deref(), Some("pod-uid"));
        assert!(
            decision.plan.changes[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("deleted and created again")
        );

        let problems = decide_one(config_map("app", "1"), refused, Options::default()).unwrap_err();
        assert_eq!(problems[0].kind, ProblemKind::Immutable);
        assert!(
            problems[0]
                .to_string()
                .starts_with("app.yaml:1: ConfigMap shop/app"),
            "{}",
            problems[0]
        );
        assert!(problems[0].message.contains("kubectl delete"));
    }

    #[test]
    fn every_refusal_is_reported_at_once_and_nothing_is_decided() {
        let problems = decide(
            source(),
            vec![
                config_map("a", "1"),
                config_map("b", "1"),
                config_map("c", "1"),
            ],
            vec![
                Observation::Refused {
                    live: None,
                    rejection: Rejection::MissingNamespace("namespaces \"shop\" not found".into()),
                },
                Observation::Absent,
                Observation::Refused {
                    live: None,
                    rejection: Rejection::Invalid("data.k: Invalid value".into()),
                },
            ],
            ours(),
            Options::default(),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].kind, ProblemKind::MissingNamespace);
        assert!(problems[0].message.contains("add a Namespace manifest"));
        assert_eq!(problems[1].origin.as_ref().unwrap().file, "c.yaml");
    }

    #[test]
    fn objects_waiting_for_a_new_namespace_or_kind_are_created() {
        let d = config_map("app", "1");
        let decision = decide_one(
            d.clone(),
            Observation::NotYetServed(NotYetServed::NewNamespace),
            Options::default(),
        )
        .unwrap();
        assert_eq!(decision.plan.changes[0].action, Action::Create);
        assert!(decision.plan.changes[0].reason.is_none());
        let decision = decide_one(
            d,
            Observation::NotYetServed(NotYetServed::NewKind),
            Options::default(),
        )
        .unwrap();
        assert!(
            decision.plan.changes[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("CustomResourceDefinition")
        );
    }

    #[test]
    fn fields_another_manager_holds_are_drift_unless_forced() {
        let d = config_map("app", "1");
        let before = live(&d, "2");
        let forced = live(&d, "1");
        let observation = Observation::Present {
            live: before,
            dry_run: DryRun::Conflict {
                conflicts: vec![FieldConflict {
                    field: ".data.k".into(),
                    manager: "kubectl-edit".into(),
                }],
                forced,
            },
        };
        let decision = decide_one(d.clone(), observation.clone(), Options::default()).unwrap();
        assert_eq!(decision.plan.changes[0].action, Action::Update);
        assert_eq!(decision.drift.len(), 1);
        assert_eq!(
            decision.drift[0].to_string(),
            "ConfigMap app: .data.k (kubectl-edit)"
        );
        let forced = decide_one(
            d,
            observation,
            Options {
                force_conflicts: true,
                ..Options::default()
            },
        )
        .unwrap();
        assert!(forced.drift.is_empty());
        assert_eq!(forced.plan.changes[0].action, Action::Update);
    }

    #[test]
    fn server_field_paths_read_as_people_write_them() {
        assert_eq!(
            short_field_path(".spec.template.spec.containers[name=\"app\"].image"),
            ".spec.template.spec.containers[app].image"
        );
        assert_eq!(short_field_path(".spec.replicas"), ".spec.replicas");
    }

    fn inventory_object(
        kind: &str,
        plural: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> LiveObject {
        let mut object = json!({"apiVersion": "v1", "kind": kind,
            "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {INVENTORY_LABEL: "inv"}}});
        if let Some(ns) = namespace {
            object["metadata"]["namespace"] = json!(ns);
        }
        LiveObject {
            resource: resource("v1", kind, plural, namespace.is_some()),
            object,
        }
    }

    #[test]
    fn what_left_git_is_pruned_only_when_asked_and_namespaces_with_foreign_objects_stay() {
        let kept = config_map("kept", "1");
        let kept_live = live(&kept, "1");
        let inventory = || Inventory {
            id: "inv".into(),
            recorded: None,
            objects: vec![
                inventory_object("ConfigMap", "configmaps", Some("shop"), "kept"),
                inventory_object("ConfigMap", "configmaps", Some("shop"), "gone"),
                inventory_object("Namespace", "namespaces", None, "shop"),
                inventory_object("Namespace", "namespaces", None, "empty"),
            ],
            foreign_in_namespace: HashMap::from([(
                "shop".to_string(),
                vec!["ConfigMap shop/db".to_string()],
            )]),
        };
        let observed = || Observation::Present {
            live: kept_live.clone(),
            dry_run: DryRun::ProvablyUnchanged,
        };
        let without = decide(
            source(),
            vec![kept.clone()],
            vec![observed()],
            inventory(),
            Options::default(),
        )
        .unwrap();
        assert_eq!(without.plan.summary().prune, 0);
        assert_eq!(without.live_inventory, 4);

        let with = decide(
            source(),
            vec![kept],
            vec![observed()],
            inventory(),
            Options {
                prune: true,
                ..Options::default()
            },
        )
        .unwrap();
        let pruned: Vec<String> = with
            .steps
            .iter()
            .filter(|s| s.action == Action::Prune)
            .map(|s| s.key.to_string())
            .collect();
        assert_eq!(pruned, ["ConfigMap shop/gone", "Namespace empty"]);
        let shop = with
            .plan
            .changes
            .iter()
            .find(|c| c.key.is_kind("", "Namespace") && c.name == "shop")
            .unwrap();
        assert_eq!(shop.action, Action::Unchanged);
        assert!(
            shop.reason
                .as_deref()
                .unwrap()
                .contains("ConfigMap shop/db")
        );
        assert_eq!(
            with.steps
                .iter()
                .find(|s| s.key.name == "gone")
                .unwrap()
                .live_uid
                .as_deref(),
            Some("uid-gone")
        );
    }

    #[test]
    fn mass_prunes_need_consent() {
        let decision = decide(
            source(),
            Vec::new(),
            Vec::new(),
            Inventory {
                objects: vec![
                    inventory_object("ConfigMap", "configmaps", Some("shop"), "a"),
                    inventory_object("ConfigMap", "configmaps", Some("shop"), "b"),
                ],
                ..ours()
            },
            Options {
                prune: true,
                ..Options::default()
            },
        )
        .unwrap();
        let guard = check_prune_guard(&decision, 10, false).unwrap_err();
        assert_eq!(guard.count, 2);
        assert!(guard.reason.contains("every object"));
        assert!(check_prune_guard(&decision, 10, true).is_ok());
    }

    fn foreign(mut live: Value, manager: &str) -> Value {
        live["metadata"]["labels"] = json!({});
        live["metadata"]["managedFields"] = json!([{"manager": manager, "operation": "Update",
            "apiVersion": "v1", "fieldsV1": {"f:data": {"f:k": {}}}}]);
        live
    }

    #[test]
    fn an_object_kommit_did_not_create_is_an_adoption_refused_without_consent() {
        let d = config_map("precious", "2");
        let live = foreign(live(&d, "1"), "kubectl-create");
        let observed = || Observation::Present {
            live: live.clone(),
            dry_run: DryRun::Stored(live.clone()),
        };
        let refused = decide_one(d.clone(), observed(), Options::default()).unwrap();
        assert_eq!(refused.plan.changes[0].action, Action::Adopt);
        assert_eq!(
            refused.unconsented,
            vec![Unconsented {
                key: d.key.clone(),
                origin: d.origin.clone(),
                managers: vec!["kubectl-create".into()],
            }]
        );
        assert_eq!(
            refused.unconsented[0].to_string(),
            "ConfigMap shop/precious (precious.yaml:1), managed by kubectl-create"
        );

        let asked = Options {
            adopt: true,
            ..Options::default()
        };
        let adopted = decide_one(d.clone(), observed(), asked).unwrap();
        assert!(adopted.unconsented.is_empty());
        assert_eq!(adopted.steps[0].action, Action::Adopt);
        assert!(adopted.steps[0].body.is_some(), "an adoption writes");

        let mut annotated = d;
        annotated.body["metadata"]["annotations"] = json!({ADOPT_ANNOTATION: "true"});
        let by_annotation = decide_one(annotated, observed(), Options::default()).unwrap();
        assert!(by_annotation.unconsented.is_empty());
    }

    #[test]
    fn an_adoption_takes_the_fields_others_hold_and_is_not_drift() {
        let d = config_map("precious", "2");
        let live = foreign(live(&d, "1"), "kubectl-client-side-apply");
        let observation = Observation::Present {
            live: live.clone(),
            dry_run: DryRun::Conflict {
                conflicts: vec![FieldConflict {
                    field: ".data.k".into(),
                    manager: "kubectl-client-side-apply".into(),
                }],
                forced: live.clone(),
            },
        };
        let decision = decide_one(
            d,
            observation,
            Options {
                adopt: true,
                ..Options::default()
            },
        )
        .unwrap();
        assert!(decision.drift.is_empty());
        assert_eq!(decision.steps[0].action, Action::Adopt);
        let upgraded = decision.steps[0]
            .upgrade_ownership
            .as_ref()
            .expect("client-side apply's fields are handed over first");
        assert_eq!(upgraded[0]["manager"], FIELD_MANAGER);
        assert_eq!(upgraded[0]["operation"], "Apply");
    }

    #[test]
    fn another_sources_object_is_never_taken_over() {
        let d = config_map("shared", "2");
        let mut other = live(&d, "1");
        other["metadata"]["labels"] = json!({INVENTORY_LABEL: "gs.team-b.web"});
        other["metadata"]["annotations"] = json!({SOURCE_ANNOTATION: "git@example.com:b.git"});
        let problems = decide_one(
            d,
            Observation::Present {
                live: other.clone(),
                dry_run: DryRun::Stored(other),
            },
            Options {
                adopt: true,
                ..Options::default()
            },
        )
        .unwrap_err();
        assert_eq!(problems[0].kind, ProblemKind::OtherSource);
        assert!(
            problems[0].message.contains("git@example.com:b.git")
                && problems[0].message.contains("gs.team-b.web"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn a_copied_label_is_neither_pruned_nor_updated_without_adoption() {
        let recorded = Inventory {
            recorded: Some(BTreeSet::from(["uid-mine".to_string()])),
            objects: vec![
                inventory_object("ConfigMap", "configmaps", Some("shop"), "mine"),
                inventory_object("ConfigMap", "configmaps", Some("shop"), "planted"),
            ],
            ..ours()
        };
        let prune = Options {
            prune: true,
            ..Options::default()
        };
        let decision = decide(source(), Vec::new(), Vec::new(), recorded.clone(), prune).unwrap();
        let pruned: Vec<&str> = decision
            .steps
            .iter()
            .filter(|s| s.action == Action::Prune)
            .map(|s| s.key.name.as_str())
            .collect();
        assert_eq!(pruned, vec!["mine"]);
        assert_eq!(
            decision.live_inventory, 1,
            "only what kommit recorded counts"
        );
        let planted = decision
            .plan
            .changes
            .iter()
            .find(|c| c.key.name == "planted")
            .unwrap();
        assert_eq!(planted.action, Action::Unchanged);
        assert!(planted.reason.as_deref().unwrap().contains("no record"));

        // Updating the planted one would be taking it over.
        let d = config_map("planted", "2");
        let mut planted_live = live(&d, "1");
        planted_live["metadata"]["uid"] = json!("uid-planted");
        let decision = decide(
            source(),
            vec![d],
            vec![Observation::Present {
                live: planted_live.clone(),
                dry_run: DryRun::Stored(planted_live),
            }],
            recorded,
            Options::default(),
        )
        .unwrap();
        assert_eq!(decision.unconsented.len(), 1);
    }

    #[test]
    fn client_side_ownership_is_merged_into_kommits_apply_entry() {
        let live = json!({"metadata": {"managedFields": [
            {"manager": "kommit", "operation": "Apply", "apiVersion": "v1",
             "fieldsV1": {"f:data": {"f:a": {}}}},
            {"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
             "fieldsV1": {"f:data": {"f:b": {}}, "f:metadata": {"f:annotations": {}}}},
            {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
             "subresource": "status", "fieldsV1": {"f:status": {}}}
        ]}});
        let upgraded = upgrade_client_side_ownership(&live).unwrap();
        let entries = upgraded.as_array().unwrap();
        assert_eq!(entries.len(), 2, "{upgraded:#}");
        assert_eq!(entries[0]["manager"], "kube-controller-manager");
        assert_eq!(entries[1]["manager"], "kommit");
        assert_eq!(
            entries[1]["fieldsV1"],
            json!({"f:data": {"f:a": {}, "f:b": {}}, "f:metadata": {"f:annotations": {}}})
        );
        let server_side_only = json!({"metadata": {"managedFields": [
            {"manager": "kommit", "operation": "Apply", "fieldsV1": {}}]}});
        assert_eq!(upgrade_client_side_ownership(&server_side_only), None);
    }

    #[test]
    fn what_the_syncs_identity_may_not_touch_is_a_problem_named_with_its_file() {
        let d = config_map("elsewhere", "1");
        let problems = decide_one(
            d.clone(),
            Observation::Refused {
                live: None,
                rejection: Rejection::Forbidden(
                    "ServiceAccount a/deployer may not get configmaps in namespace b".into(),
                ),
            },
            Options::default(),
        )
        .unwrap_err();
        assert_eq!(problems[0].kind, ProblemKind::Forbidden);
        assert_eq!(problems[0].origin.as_ref(), Some(&d.origin));
        assert!(
            problems[0]
                .to_string()
                .starts_with("elsewhere.yaml:1: ServiceAccount")
        );
    }
}
