//! Desired vs live → a list of changes with a normalised, secret-masked diff; and its rendering
//! as text, JSON and markdown. Pure: values in, values out.

pub mod decide;
mod render;
pub mod review;

use serde::Serialize;
use serde_json::{Map, Value};

pub use decide::{
    Decision, Desired, Drifted, DryRun, Inventory, LiveObject, NotYetServed, Observation, Problem,
    ProblemKind, Rejection, Step, decide,
};
pub use render::{render_json, render_markdown, render_text};

use crate::commit::CommitInfo;
use crate::manifest::Origin;
use crate::object::{ATTRIBUTION_ANNOTATIONS, ObjectKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    /// Take over an object that exists but that kommit did not create.
    Adopt,
    Replace,
    Prune,
    Unchanged,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Adopt => "adopt",
            Action::Replace => "replace",
            Action::Prune => "prune",
            Action::Unchanged => "unchanged",
        }
    }

    pub fn writes(self) -> bool {
        self != Action::Unchanged
    }
}

/// One object's planned change.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub action: Action,
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// Where the object is defined in git (absent for prunes).
    pub source: Option<Origin>,
    /// Unified diff of the YAML, live → desired; empty when unchanged.
    pub diff: String,
    /// Why a replace or prune is planned, or a note about the object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The commit the live object was last applied from (its `kommit.dev/commit` annotation).
    #[serde(rename = "liveCommit", skip_serializing_if = "Option::is_none")]
    pub live_commit: Option<String>,
    #[serde(skip)]
    pub key: ObjectKey,
}

/// What a plan was made from.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSource {
    pub repo: String,
    pub path: String,
    pub rev: String,
    pub commit: CommitInfo,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub source: PlanSource,
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub create: usize,
    pub update: usize,
    pub adopt: usize,
    pub replace: usize,
    pub prune: usize,
    pub unchanged: usize,
}

impl Summary {
    pub fn has_changes(&self) -> bool {
        self.create + self.update + self.adopt + self.replace + self.prune > 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} to create, {} to update, ", self.create, self.update)?;
        // Adoption is rare; the line people know stays the same without it.
        if self.adopt > 0 {
            write!(f, "{} to adopt, ", self.adopt)?;
        }
        write!(
            f,
            "{} to replace, {} to prune, {} unchanged",
            self.replace, self.prune, self.unchanged
        )
    }
}

impl Plan {
    pub fn summary(&self) -> Summary {
        Summary::of(&self.changes)
    }
}

impl Summary {
    /// How many of `changes` do what.
    pub fn of(changes: &[Change]) -> Summary {
        let mut summary = Summary::default();
        for change in changes {
            match change.action {
                Action::Create => summary.create += 1,
                Action::Update => summary.update += 1,
                Action::Adopt => summary.adopt += 1,
                Action::Replace => summary.replace += 1,
                Action::Prune => summary.prune += 1,
                Action::Unchanged => summary.unchanged += 1,
            }
        }
        summary
    }
}

/// Server-owned metadata that says nothing about what the object should be.
const NOISE_METADATA: [&str; 6] = [
    "managedFields",
    "resourceVersion",
    "generation",
    "uid",
    "creationTimestamp",
    "selfLink",
];

/// Drops what the server owns or kommit writes for attribution, so two objects compare equal
/// exactly when they mean the same.
pub fn normalize(object: &Value) -> Value {
    let mut object = object.clone();
    if let Value::Object(map) = &mut object {
        map.remove("status");
        if let Some(Value::Object(metadata)) = map.get_mut("metadata") {
            for field in NOISE_METADATA {
                metadata.remove(field);
            }
            if let Some(Value::Object(annotations)) = metadata.get_mut("annotations") {
                for key in ATTRIBUTION_ANNOTATIONS {
                    annotations.remove(key);
                }
            }
            for field in ["annotations", "labels"] {
                if metadata.get(field).is_some_and(is_empty_map) {
                    metadata.remove(field);
                }
            }
        }
    }
    object
}

fn is_empty_map(value: &Value) -> bool {
    matches!(value, Value::Object(map) if map.is_empty()) || value.is_null()
}

const MASK: &str = "***";

/// Replaces Secret values by `***` (or `*** (before)` / `*** (after)` where they differ), on both
/// sides at once so the diff still says *which* keys changed without ever showing a value.
pub fn mask_secrets(key: &ObjectKey, before: Option<&mut Value>, after: Option<&mut Value>) {
    if !key.is_kind("", "Secret") {
        return;
    }
    let mut before = before;
    let mut after = after;
    for field in ["data", "stringData"] {
        let before_map = before
            .as_deref()
            .and_then(|v| v.get(field))
            .and_then(Value::as_object)
            .cloned();
        let after_map = after
            .as_deref()
            .and_then(|v| v.get(field))
            .and_then(Value::as_object)
            .cloned();
        let differs = |k: &str| -> bool {
            match (&before_map, &after_map) {
                (Some(b), Some(a)) => b.get(k) != a.get(k),
                _ => false,
            }
        };
        if let Some(Value::Object(map)) = before.as_deref_mut().and_then(|v| v.get_mut(field)) {
            for (k, v) in map.iter_mut() {
                let both_present = after_map.as_ref().is_some_and(|a| a.contains_key(k));
                *v = Value::String(if both_present && differs(k) {
                    format!("{MASK} (before)")
                } else {
                    MASK.to_string()
                });
            }
        }
        if let Some(Value::Object(map)) = after.as_deref_mut().and_then(|v| v.get_mut(field)) {
            for (k, v) in map.iter_mut() {
                let both_present = before_map.as_ref().is_some_and(|b| b.contains_key(k));
                *v = Value::String(if both_present && differs(k) {
                    format!("{MASK} (after)")
                } else {
                    MASK.to_string()
                });
            }
        }
    }
    // kubectl's client-side apply keeps a full copy of the Secret in an annotation.
    for side in [before, after].into_iter().flatten() {
        if let Some(Value::Object(annotations)) = side.pointer_mut("/metadata/annotations")
            && let Some(value) =
                annotations.get_mut("kubectl.kubernetes.io/last-applied-configuration")
        {
            *value = Value::String(MASK.to_string());
        }
    }
}

fn set_pointer(target: &mut Value, pointer: &str, value: Value) {
    let mut current = target;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let Some(map) = current.as_object_mut() else {
            return;
        };
        if i + 1 == parts.len() {
            map.insert((*part).to_string(), value);
            return;
        }
        current = map
            .entry((*part).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// The live object as far as a field manager owns it through server-side apply: what it last
/// applied, identity included. `None` when it never applied the object.
pub fn owned_view(live: &Value, manager: &str) -> Option<Value> {
    let fields = owned_fields(live, manager)?;
    let mut owned = project_fields(live, fields);
    // fieldsV1 never lists the identity; it is part of every manifest.
    for pointer in [
        "/apiVersion",
        "/kind",
        "/metadata/name",
        "/metadata/namespace",
    ] {
        if let Some(value) = live.pointer(pointer) {
            set_pointer(&mut owned, pointer, value.clone());
        }
    }
    Some(owned)
}

/// True when applying `desired` cannot change `live`: kommit owns exactly the fields of the
/// manifest and each holds the manifest's value. Sound, not complete: whatever it cannot prove
/// (a value the server normalizes, a new or dropped field, a field another manager took over)
/// goes to the server's dry run.
pub fn provably_unchanged(live: &Value, desired: &Value) -> bool {
    owned_view(live, crate::object::FIELD_MANAGER)
        .is_some_and(|owned| normalize(&owned) == normalize(desired))
}

/// The `fieldsV1` set a field manager owns through server-side apply, from `managedFields`.
pub fn owned_fields<'a>(live: &'a Value, manager: &str) -> Option<&'a Value> {
    live.pointer("/metadata/managedFields")?
        .as_array()?
        .iter()
        .find(|entry| {
            entry.get("manager").and_then(Value::as_str) == Some(manager)
                && entry.get("operation").and_then(Value::as_str) == Some("Apply")
        })?
        .get("fieldsV1")
}

/// The part of `value` named by a `fieldsV1` set: `f:name` map keys, `k:{..}` list items by
/// their keys, `v:..` set items by value, `i:N` items by index.
pub fn project_fields(value: &Value, fields: &Value) -> Value {
    let Some(fields) = fields.as_object() else {
        return value.clone();
    };
    // An owned leaf (or an atomic value) is taken whole.
    if fields.keys().all(|k| k == ".") {
        return value.clone();
    }
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (path, sub) in fields {
                if let Some(name) = path.strip_prefix("f:")
                    && let Some(child) = map.get(name)
                {
                    out.insert(name.to_string(), project_fields(child, sub));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .filter_map(|(index, item)| {
                    fields.iter().find_map(|(path, sub)| {
                        let matches = if let Some(keys) = path.strip_prefix("k:") {
                            serde_json::from_str::<Map<String, Value>>(keys)
                                .is_ok_and(|keys| keys.iter().all(|(k, v)| item.get(k) == Some(v)))
                        } else if let Some(set_value) = path.strip_prefix("v:") {
                            serde_json::from_str::<Value>(set_value).is_ok_and(|v| &v == item)
                        } else if let Some(position) = path.strip_prefix("i:") {
                            position.parse::<usize>() == Ok(index)
                        } else {
                            false
                        };
                        matches.then(|| project_fields(item, sub))
                    })
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The part of `live` that `desired` speaks about: maps keep only the keys desired has, lists are
/// compared item by item. Used where no dry run can show the server's view (replaces).
pub fn project(live: &Value, desired: &Value) -> Value {
    match (live, desired) {
        (Value::Object(live_map), Value::Object(desired_map)) => {
            let mut out = Map::new();
            for (key, desired_value) in desired_map {
                if let Some(live_value) = live_map.get(key) {
                    out.insert(key.clone(), project(live_value, desired_value));
                }
            }
            Value::Object(out)
        }
        (Value::Array(live_items), Value::Array(desired_items)) => Value::Array(
            live_items
                .iter()
                .enumerate()
                .map(|(i, item)| match desired_items.get(i) {
                    Some(desired_item) => project(item, desired_item),
                    None => item.clone(),
                })
                .collect(),
        ),
        (live, _) => live.clone(),
    }
}

/// YAML text of a value (keys sorted), the form diffs are made of.
pub fn to_yaml(value: &Value) -> String {
    if value.is_null() {
        return String::new();
    }
    serde_saphyr::to_string(value).unwrap_or_else(|e| format!("# cannot render as YAML: {e}\n"))
}

/// A unified diff with three lines of context; empty when the texts are equal.
pub fn unified_diff(before: &str, after: &str, from: &str, to: &str) -> String {
    if before == after {
        return String::new();
    }
    similar::TextDiff::from_lines(before, after)
        .unified_diff()
        .context_radius(3)
        .header(from, to)
        .to_string()
}

/// Compares a live object with the server's dry-run result of applying the desired one.
pub fn compare(key: &ObjectKey, live: &Value, dry_run: &Value, to_label: &str) -> (Action, String) {
    let mut before = normalize(live);
    let mut after = normalize(dry_run);
    if before == after {
        return (Action::Unchanged, String::new());
    }
    mask_secrets(key, Some(&mut before), Some(&mut after));
    let diff = unified_diff(
        &to_yaml(&before),
        &to_yaml(&after),
        &format!("live {key}"),
        to_label,
    );
    (Action::Update, diff)
}

/// The diff of an object that does not exist yet: all of it is new.
pub fn creation_diff(key: &ObjectKey, desired: &Value, to_label: &str) -> String {
    let mut after = normalize(desired);
    mask_secrets(key, None, Some(&mut after));
    unified_diff("", &to_yaml(&after), "/dev/null", to_label)
}

/// The diff of an object that is deleted and created again (immutable fields changed).
pub fn replacement_diff(key: &ObjectKey, live: &Value, desired: &Value, to_label: &str) -> String {
    let mut after = normalize(desired);
    // What kommit applied last is exactly the live fields it owns; without that record, the
    // part of the live object the desired one speaks about.
    let mut before = match owned_view(live, crate::object::FIELD_MANAGER) {
        Some(owned) => normalize(&owned),
        None => project(&normalize(live), &after),
    };
    mask_secrets(key, Some(&mut before), Some(&mut after));
    unified_diff(
        &to_yaml(&before),
        &to_yaml(&after),
        &format!("live {key}"),
        to_label,
    )
}

/// The diff of an object that is pruned: all of it goes.
pub fn prune_diff(key: &ObjectKey, live: &Value) -> String {
    let mut before = normalize(live);
    mask_secrets(key, Some(&mut before), None);
    unified_diff(&to_yaml(&before), "", &format!("live {key}"), "/dev/null")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}
        })
    }

    fn key() -> ObjectKey {
        ObjectKey::new("apps", "Deployment", Some("shop"), "web")
    }

    #[test]
    fn server_noise_is_not_a_change() {
        let mut live = deployment("nginx:1.25");
        let meta = live["metadata"].as_object_mut().unwrap();
        meta.insert("uid".into(), json!("1234"));
        meta.insert("resourceVersion".into(), json!("99"));
        meta.insert("generation".into(), json!(4));
        meta.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
        meta.insert("managedFields".into(), json!([{"manager": "kommit"}]));
        meta.insert(
            "annotations".into(),
            json!({"kommit.dev/commit": "abc", "kubernetes.io/change-cause": "abc x"}),
        );
        live["status"] = json!({"replicas": 3});
        let mut dry_run = deployment("nginx:1.25");
        dry_run["metadata"]["annotations"] = json!({"kommit.dev/commit": "def"});
        let (action, diff) = compare(&key(), &live, &dry_run, "git");
        assert_eq!(action, Action::Unchanged);
        assert!(diff.is_empty());
    }

    #[test]
    fn an_image_change_diffs_as_exactly_that_line() {
        let (action, diff) = compare(
            &key(),
            &deployment("nginx:1.25"),
            &deployment("nginx:1.26"),
            "git deploy/web.yaml",
        );
        assert_eq!(action, Action::Update);
        let changed: Vec<&str> = diff
            .lines()
            .filter(|l| {
                (l.starts_with('+') || l.starts_with('-'))
                    && !l.starts_with("+++")
                    && !l.starts_with("---")
            })
            .collect();
        assert_eq!(
            changed,
            ["-      - image: nginx:1.25", "+      - image: nginx:1.26"],
            "{diff}"
        );
    }

    #[test]
    fn secret_values_never_appear_but_changed_keys_do() {
        let secret_key = ObjectKey::new("", "Secret", Some("shop"), "db");
        let live = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"password\":\"aHVudGVyMg==\"}}"}},
            "data": {"password": "aHVudGVyMg==", "user": "YWRtaW4="}});
        let desired = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"password\":\"aHVudGVyMg==\"}}"}},
            "data": {"password": "c3dvcmRmaXNo", "user": "YWRtaW4=", "token": "dG9rZW4="}});
        let (action, diff) = compare(&secret_key, &live, &desired, "git");
        assert_eq!(action, Action::Update);
        for secret in ["aHVudGVyMg", "c3dvcmRmaXNo", "YWRtaW4", "dG9rZW4"] {
            assert!(!diff.contains(secret), "{diff}");
        }
        assert!(
            diff.contains("-  password: '*** (before)'")
                || diff.contains("-  password: \"*** (before)\""),
            "{diff}"
        );
        assert!(diff.contains("token:"), "{diff}");
        let created = creation_diff(
            &secret_key,
            &json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "db"}, "stringData": {"password": "hunter2"}}),
            "git",
        );
        assert!(!created.contains("hunter2"), "{created}");
        let pruned = prune_diff(&secret_key, &live);
        assert!(!pruned.contains("aHVudGVyMg"), "{pruned}");
    }

    #[test]
    fn replacements_show_only_what_the_manifest_speaks_about() {
        let pod_key = ObjectKey::new("", "Pod", Some("shop"), "debug");
        let live = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "debug", "uid": "u"},
            "spec": {"nodeName": "kwok-node-0", "dnsPolicy": "ClusterFirst",
                     "containers": [{"name": "c", "image": "busybox", "env": [{"name": "A", "value": "1"}],
                                     "terminationMessagePath": "/dev/termination-log"}]}});
        let desired = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "debug"},
            "spec": {"containers": [{"name": "c", "image": "busybox", "env": [{"name": "A", "value": "2"}]}]}});
        let diff = replacement_diff(&pod_key, &live, &desired, "git");
        assert!(
            !diff.contains("nodeName") && !diff.contains("terminationMessagePath"),
            "{diff}"
        );
        assert!(
            diff.contains("-      value: \"1\"\n+      value: \"2\""),
            "{diff}"
        );
    }

    #[test]
    fn replacements_compare_with_what_kommit_applied_last() {
        let pod_key = ObjectKey::new("", "Pod", Some("shop"), "debug");
        // The server added a service-account mount kommit never wrote; the user removed env B.
        let live = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "debug",
            "managedFields": [{"manager": "kommit", "operation": "Apply", "fieldsV1": {
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:name": {}, "f:image": {},
                    "f:env": {"k:{\"name\":\"A\"}": {".": {}, "f:name": {}, "f:value": {}},
                              "k:{\"name\":\"B\"}": {".": {}, "f:name": {}, "f:value": {}}}}}}}}],
            "labels": {"app": "debug"}},
            "spec": {"containers": [{"name": "c", "image": "busybox",
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                "volumeMounts": [{"name": "kube-api-access-x1y2z", "mountPath": "/var/run/secrets"}]}]}});
        let desired = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "debug", "labels": {"app": "debug"}},
            "spec": {"containers": [{"name": "c", "image": "busybox", "env": [{"name": "A", "value": "1"}]}]}});
        let diff = replacement_diff(&pod_key, &live, &desired, "git");
        assert!(!diff.contains("kube-api-access"), "{diff}");
        assert!(
            diff.contains("-    - name: B\n-      value: \"2\""),
            "{diff}"
        );
    }

    #[test]
    fn unchanged_is_proved_only_from_what_kommit_owns() {
        let fields = json!({"f:metadata": {"f:labels": {"f:app": {}}},
            "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {
                "k:{\"name\":\"web\"}": {".": {}, "f:name": {}, "f:image": {}}}}}}});
        let live = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                "annotations": {"kommit.dev/commit": "abc", "deployment.kubernetes.io/revision": "2"},
                "managedFields": [{"manager": "kommit", "operation": "Apply", "fieldsV1": fields}]},
            "spec": {"replicas": 3, "progressDeadlineSeconds": 600,
                "template": {"spec": {"containers": [{"name": "web", "image": "nginx:1.25", "imagePullPolicy": "IfNotPresent"}]}}},
            "status": {"replicas": 3}});
        let desired = |replicas: i64, image: &str| {
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}})
        };
        assert!(
            provably_unchanged(&live, &desired(3, "nginx:1.25")),
            "defaults and status do not count"
        );
        assert!(!provably_unchanged(&live, &desired(3, "nginx:1.26")));
        assert!(!provably_unchanged(&live, &desired(2, "nginx:1.25")));
        let mut with_new_field = desired(3, "nginx:1.25");
        with_new_field["spec"]["minReadySeconds"] = json!(5);
        assert!(
            !provably_unchanged(&live, &with_new_field),
            "a new field needs the server"
        );
        let mut taken_over = live.clone();
        taken_over["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]
            .as_object_mut()
            .unwrap()
            .remove("f:replicas");
        assert!(
            !provably_unchanged(&taken_over, &desired(3, "nginx:1.25")),
            "someone else owns replicas now"
        );
        let mut by_kubectl = live.clone();
        by_kubectl["metadata"]["managedFields"][0]["manager"] = json!("kubectl");
        assert!(
            !provably_unchanged(&by_kubectl, &desired(3, "nginx:1.25")),
            "never applied by kommit"
        );
    }

    #[test]
    fn summary_line_reads_like_the_docs() {
        let summary = Summary {
            create: 3,
            update: 1,
            replace: 0,
            prune: 1,
            unchanged: 12,
            ..Summary::default()
        };
        assert_eq!(
            summary.to_string(),
            "3 to create, 1 to update, 0 to replace, 1 to prune, 12 unchanged"
        );
        assert!(summary.has_changes());
        assert_eq!(
            Summary {
                adopt: 2,
                ..Summary::default()
            }
            .to_string(),
            "0 to create, 0 to update, 2 to adopt, 0 to replace, 0 to prune, 0 unchanged"
        );
        assert!(
            !Summary {
                unchanged: 4,
                ..Summary::default()
            }
            .has_changes()
        );
    }

    proptest::proptest! {
        #[test]
        fn normalizing_is_idempotent_and_equal_values_never_diff(name in "[a-z]{1,8}", replicas in 0u32..50, image in "[a-z]{1,6}:[0-9]{1,2}") {
            let value = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "uid": "x", "annotations": {"kommit.dev/commit": "a"}},
                "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "c", "image": image}]}}},
                "status": {"replicas": replicas}});
            let once = normalize(&value);
            proptest::prop_assert_eq!(normalize(&once), once.clone());
            let (action, diff) = compare(&key(), &value, &once, "git");
            proptest::prop_assert_eq!(action, Action::Unchanged);
            proptest::prop_assert!(diff.is_empty());
        }
    }
}
