//! Object identity and the metadata kommit writes on what it applies.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

/// Field manager for every server-side apply kommit makes.
pub const FIELD_MANAGER: &str = "kommit";

/// Label naming the source (inventory) an object was applied from; what prune selects on.
pub const INVENTORY_LABEL: &str = "kommit.dev/inventory";
/// Annotation with the human-readable source: repository and path.
pub const SOURCE_ANNOTATION: &str = "kommit.dev/source";
/// On a manifest: kommit may take over the object of that name if it already exists.
pub const ADOPT_ANNOTATION: &str = "kommit.dev/adopt";
/// Annotations naming the commit that last changed the object, and where in git it is defined.
pub const COMMIT_ANNOTATION: &str = "kommit.dev/commit";
pub const AUTHOR_ANNOTATION: &str = "kommit.dev/commit-author";
pub const DATE_ANNOTATION: &str = "kommit.dev/commit-date";
pub const SUBJECT_ANNOTATION: &str = "kommit.dev/commit-subject";
pub const FILE_ANNOTATION: &str = "kommit.dev/file";
/// What `kubectl rollout history` shows as CHANGE-CAUSE.
pub const CHANGE_CAUSE_ANNOTATION: &str = "kubernetes.io/change-cause";

/// Annotations that describe *which commit* wrote an object rather than what the object is; the
/// diff ignores them so that a new commit alone never makes an object look changed.
pub const ATTRIBUTION_ANNOTATIONS: [&str; 6] = [
    COMMIT_ANNOTATION,
    AUTHOR_ANNOTATION,
    DATE_ANNOTATION,
    SUBJECT_ANNOTATION,
    FILE_ANNOTATION,
    CHANGE_CAUSE_ANNOTATION,
];

/// Identity of an object in a cluster: group, kind, namespace and name (the version is not part
/// of the identity; the same object is served at several versions).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    pub group: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    pub fn new(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> Self {
        ObjectKey {
            group: group.to_string(),
            kind: kind.to_string(),
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    /// Reads the identity of a live object as the API server returns it.
    pub fn of_value(value: &Value) -> Option<Self> {
        let api_version = value.get("apiVersion")?.as_str()?;
        let kind = value.get("kind")?.as_str()?;
        let metadata = value.get("metadata")?;
        let name = metadata.get("name")?.as_str()?;
        let namespace = metadata.get("namespace").and_then(Value::as_str);
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        Some(ObjectKey::new(group, kind, namespace, name))
    }

    pub fn is_kind(&self, group: &str, kind: &str) -> bool {
        self.group == group && self.kind == kind
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// The order objects are applied in: what others depend on first. Prune runs in reverse.
pub fn apply_tier(group: &str, kind: &str) -> u8 {
    match (group, kind) {
        ("", "Namespace") => 0,
        ("apiextensions.k8s.io", "CustomResourceDefinition") => 1,
        ("", "ServiceAccount" | "ConfigMap" | "Secret" | "LimitRange" | "ResourceQuota")
        | ("", "PersistentVolume" | "PersistentVolumeClaim")
        | ("rbac.authorization.k8s.io", _)
        | ("scheduling.k8s.io", "PriorityClass")
        | ("storage.k8s.io", "StorageClass") => 2,
        ("", "Service") => 3,
        ("apps", _) | ("batch", _) | ("", "Pod" | "ReplicationController") => 4,
        _ => 5,
    }
}

/// Reads `metadata.<field>.<key>` from an object.
pub fn metadata_entry<'a>(object: &'a Value, field: &str, key: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.get(key)?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_from_live_objects() {
        let value = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop"}
        });
        let key = ObjectKey::of_value(&value).unwrap();
        assert_eq!(
            key,
            ObjectKey::new("apps", "Deployment", Some("shop"), "web")
        );
        assert_eq!(key.to_string(), "Deployment shop/web");
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}});
        assert_eq!(
            ObjectKey::of_value(&ns).unwrap().to_string(),
            "Namespace shop"
        );
    }

    #[test]
    fn dependencies_apply_first() {
        let mut kinds = [
            ("apps", "Deployment"),
            ("", "Service"),
            ("", "ConfigMap"),
            ("example.com", "Widget"),
            ("apiextensions.k8s.io", "CustomResourceDefinition"),
            ("", "Namespace"),
        ];
        kinds.sort_by_key(|(g, k)| apply_tier(g, k));
        assert_eq!(
            kinds.iter().map(|(_, k)| *k).collect::<Vec<_>>(),
            [
                "Namespace",
                "CustomResourceDefinition",
                "ConfigMap",
                "Service",
                "Deployment",
                "Widget"
            ]
        );
    }
}
