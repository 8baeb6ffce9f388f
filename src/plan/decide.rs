//! The decision core: given what a commit wants and what the cluster showed about it, what
//! happens to each object (create, update, replace, unchanged, prune) and what stops the commit.
//! Pure: observations in, a plan out, so every decision has a unit test without a cluster.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde_json::Value;

use super::{Action, Change, Plan, PlanSource};
use crate::cluster::{FieldConflict, ResourceType};
use crate::manifest::Origin;
use crate::object::{self, COMMIT_ANNOTATION, ObjectKey};

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
    /// How many live objects carry this source's inventory (what prune could touch).
    pub live_inventory: usize,
}

/// Decides every object of a commit. `observations` are in the order of `desired`. Every
/// problem is reported at once; nothing is decided when there is one.
pub fn decide(
    source: PlanSource,
    desired: Vec<Desired>,
    observations: Vec<Observation>,
    inventory: Inventory,
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
            } => (Action::Unchanged, String::new(), None),
            Observation::Present {
                live,
                dry_run: DryRun::Stored(stored),
            } => {
                let (action, diff) = super::compare(&d.key, &live, &stored, &label);
                (action, diff, None)
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
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    let live_inventory = inventory.objects.len();
    if options.prune {
        for LiveObject { resource, object } in inventory.objects {
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
            });
        }
    }
    Ok(Decision {
        plan: Plan { source, changes },
        steps,
        drift,
        live_inventory,
    })
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

    fn decide_one(
        d: Desired,
        observation: Observation,
        options: Options,
    ) -> Result<Decision, Vec<Problem>> {
        decide(
            source(),
            vec![d],
            vec![observation],
            Inventory::default(),
            options,
        )
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
            Inventory::default(),
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
                foreign_in_namespace: HashMap::new(),
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
}
