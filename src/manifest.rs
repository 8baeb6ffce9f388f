//! Manifests: multi-document YAML read the way Kubernetes means it, into objects that remember
//! where they came from (file, document, line).

use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::commit::SourceFile;

/// Where a manifest came from in the repository.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Origin {
    pub file: String,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
    /// 1-based line where the document's content starts.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One Kubernetes object as written in git.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub origin: Origin,
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// The namespace written in the manifest, if any (defaulting needs the cluster's discovery).
    pub namespace: Option<String>,
    /// The whole object as JSON, the form the API server takes.
    pub object: Value,
}

impl Manifest {
    /// API group from `apiVersion` (empty for the core group).
    pub fn group(&self) -> &str {
        split_api_version(&self.api_version).0
    }
}

pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    }
}

/// A problem with one manifest, always naming the file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ManifestError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl ManifestError {
    fn new(file: &str, line: usize, message: impl Into<String>) -> Self {
        ManifestError {
            file: file.to_string(),
            line,
            message: message.into(),
        }
    }
}

/// Limits against YAML bombs: generous for real manifests, fatal for a billion laughs.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        legacy_octal_numbers: true,
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_events: 2_000_000,
            max_aliases: 10_000,
            max_anchors: 10_000,
            max_nodes: 1_000_000,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 200_000,
            max_replay_stack_depth: 32,
        },
    }
}

/// Parses every file; returns all objects, or every problem found (never just the first).
pub fn parse_files(files: &[SourceFile]) -> Result<Vec<Manifest>, Vec<ManifestError>> {
    let mut manifests = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let (mut found, mut problems) = parse_file(&file.path, &file.content);
        manifests.append(&mut found);
        errors.append(&mut problems);
    }
    if errors.is_empty() {
        Ok(manifests)
    } else {
        Err(errors)
    }
}

/// Parses one multi-document file. Empty documents are skipped; a `kind: List` is expanded.
pub fn parse_file(path: &str, content: &[u8]) -> (Vec<Manifest>, Vec<ManifestError>) {
    let mut manifests = Vec::new();
    let mut errors = Vec::new();
    let text = match std::str::from_utf8(content) {
        Ok(text) => text.strip_prefix('\u{feff}').unwrap_or(text),
        Err(e) => {
            let line = 1 + content[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            errors.push(ManifestError::new(
                path,
                line,
                "the file is not valid UTF-8; save it as UTF-8 text",
            ));
            return (manifests, errors);
        }
    };
    for (index, chunk) in split_documents(text).into_iter().enumerate() {
        let Some(content_line) = chunk.content_line else {
            continue;
        };
        let origin = Origin {
            file: path.to_string(),
            document: index,
            line: content_line,
        };
        match parse_document(chunk.text, chunk.first_line, &origin) {
            Ok(None) => {}
            Ok(Some(value)) => match into_manifests(value, &origin) {
                Ok(mut found) => manifests.append(&mut found),
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(e),
        }
    }
    (manifests, errors)
}

struct Chunk<'a> {
    text: &'a str,
    /// Line (1-based) of the chunk's first line in the file.
    first_line: usize,
    /// Line of the first content (not blank, not comment, not marker); `None` for an empty document.
    content_line: Option<usize>,
}

/// Splits a YAML stream at document markers (`---` and `...` at the start of a line), which YAML
/// forbids inside content, so splitting here agrees with any conforming parser.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut content_line = None;
    // Whether the current chunk already opened with `---`: a second marker always splits.
    let mut has_marker = false;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let number = index + 1;
        let trimmed = line.trim_end_matches(['\n', '\r']);
        let starts_doc = is_marker(trimmed, "---");
        let ends_doc = is_marker(trimmed, "...");
        // Directives and comments before the first `---` belong to the document it opens.
        if starts_doc && (has_marker || content_line.is_some()) {
            chunks.push(Chunk {
                text: &text[start_byte..offset],
                first_line: start_line,
                content_line,
            });
            start_byte = offset;
            start_line = number;
            content_line = None;
        }
        has_marker |= starts_doc;
        let rest = if starts_doc {
            trimmed[3..].trim()
        } else {
            trimmed.trim()
        };
        let is_directive = !has_marker && rest.starts_with('%');
        if !ends_doc
            && !rest.is_empty()
            && !rest.starts_with('#')
            && !is_directive
            && content_line.is_none()
        {
            content_line = Some(number);
        }
        offset += line.len();
        if ends_doc {
            chunks.push(Chunk {
                text: &text[start_byte..offset],
                first_line: start_line,
                content_line,
            });
            start_byte = offset;
            start_line = number + 1;
            content_line = None;
            has_marker = false;
        }
    }
    if start_byte < text.len() {
        chunks.push(Chunk {
            text: &text[start_byte..],
            first_line: start_line,
            content_line,
        });
    }
    chunks
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.starts_with(marker)
        && line[marker.len()..]
            .chars()
            .next()
            .is_none_or(|c| c == ' ' || c == '\t')
}

fn parse_document(
    text: &str,
    first_line: usize,
    origin: &Origin,
) -> Result<Option<Value>, ManifestError> {
    let value: Value = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| yaml_error(&origin.file, first_line, &e))?;
    if value.is_null() {
        return Ok(None);
    }
    if !value.is_object() {
        return Err(ManifestError::new(
            &origin.file,
            origin.line,
            "a manifest document must be a mapping with apiVersion, kind and metadata",
        ));
    }
    // Kinds Kubernetes itself defines are read again into their typed form, where a string field
    // keeps `yes`, `on` or `0644` as written; the server then sees what the author meant.
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    match typed_reading(api_version, kind, text) {
        None => Ok(Some(value)),
        Some(Ok(typed)) => Ok(Some(overlay_typed_strings(value, &typed))),
        Some(Err(e)) => Err(yaml_error(&origin.file, first_line, &e)),
    }
}

fn yaml_error(file: &str, first_line: usize, err: &serde_saphyr::Error) -> ManifestError {
    let text = err.to_string();
    // The parser appends " at line L, column C"; we give the file's line instead.
    let message = text
        .split_once(" at line ")
        .map_or(text.as_str(), |(message, _)| message)
        .to_string();
    let (line, column) = err
        .location()
        .map_or((1, 0), |l| (l.line() as usize, l.column() as usize));
    let line = first_line + line.saturating_sub(1);
    let message = if column > 0 {
        format!("column {column}: {message}")
    } else {
        message
    };
    ManifestError::new(file, line, format!("invalid YAML: {message}"))
}

macro_rules! typed_kinds {
    ($api_version:expr, $kind:expr, $text:expr; $( $av:literal, $k:literal => $ty:ty ),* $(,)?) => {
        match ($api_version, $kind) {
            $( ($av, $k) => Some(
                serde_saphyr::from_str_with_options::<$ty>($text, yaml_options())
                    .map(|typed| serde_json::to_value(typed).unwrap_or(Value::Null)),
            ), )*
            _ => None,
        }
    };
}

fn typed_reading(
    api_version: &str,
    kind: &str,
    text: &str,
) -> Option<Result<Value, serde_saphyr::Error>> {
    use k8s_openapi::api::{
        apps::v1 as apps, autoscaling::v2 as autoscaling, batch::v1 as batch, core::v1 as core,
        networking::v1 as networking, policy::v1 as policy, rbac::v1 as rbac,
        scheduling::v1 as scheduling, storage::v1 as storage,
    };
    typed_kinds!(api_version, kind, text;
        "v1", "Pod" => core::Pod,
        "v1", "Service" => core::Service,
        "v1", "ConfigMap" => core::ConfigMap,
        "v1", "Secret" => core::Secret,
        "v1", "ServiceAccount" => core::ServiceAccount,
        "v1", "Namespace" => core::Namespace,
        "v1", "PersistentVolumeClaim" => core::PersistentVolumeClaim,
        "v1", "PersistentVolume" => core::PersistentVolume,
        "v1", "LimitRange" => core::LimitRange,
        "v1", "ResourceQuota" => core::ResourceQuota,
        "apps/v1", "Deployment" => apps::Deployment,
        "apps/v1", "StatefulSet" => apps::StatefulSet,
        "apps/v1", "DaemonSet" => apps::DaemonSet,
        "apps/v1", "ReplicaSet" => apps::ReplicaSet,
        "batch/v1", "Job" => batch::Job,
        "batch/v1", "CronJob" => batch::CronJob,
        "networking.k8s.io/v1", "Ingress" => networking::Ingress,
        "networking.k8s.io/v1", "NetworkPolicy" => networking::NetworkPolicy,
        "rbac.authorization.k8s.io/v1", "Role" => rbac::Role,
        "rbac.authorization.k8s.io/v1", "RoleBinding" => rbac::RoleBinding,
        "rbac.authorization.k8s.io/v1", "ClusterRole" => rbac::ClusterRole,
        "rbac.authorization.k8s.io/v1", "ClusterRoleBinding" => rbac::ClusterRoleBinding,
        "policy/v1", "PodDisruptionBudget" => policy::PodDisruptionBudget,
        "autoscaling/v2", "HorizontalPodAutoscaler" => autoscaling::HorizontalPodAutoscaler,
        "scheduling.k8s.io/v1", "PriorityClass" => scheduling::PriorityClass,
        "storage.k8s.io/v1", "StorageClass" => storage::StorageClass,
    )
}

/// Keeps the dynamic reading (so unknown fields still reach the server's strict validation) but
/// takes the typed reading's string wherever the dynamic one guessed a boolean or a number.
fn overlay_typed_strings(dynamic: Value, typed: &Value) -> Value {
    match (dynamic, typed) {
        (Value::Object(map), Value::Object(typed_map)) => Value::Object(
            map.into_iter()
                .map(|(key, value)| {
                    let value = match typed_map.get(&key) {
                        Some(typed_value) => overlay_typed_strings(value, typed_value),
                        None => value,
                    };
                    (key, value)
                })
                .collect(),
        ),
        (Value::Array(items), Value::Array(typed_items)) if items.len() == typed_items.len() => {
            Value::Array(
                items
                    .into_iter()
                    .zip(typed_items)
                    .map(|(value, typed_value)| overlay_typed_strings(value, typed_value))
                    .collect(),
            )
        }
        // Quantities read from a number (cpu: 1) become "1" too, which the server takes alike.
        (Value::Bool(_) | Value::Number(_), Value::String(s)) => Value::String(s.clone()),
        (value, _) => value,
    }
}

fn into_manifests(value: Value, origin: &Origin) -> Result<Vec<Manifest>, ManifestError> {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if api_version == "v1" && kind == "List" {
        let items = match value.get("items") {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => {
                return Err(ManifestError::new(
                    &origin.file,
                    origin.line,
                    "a List's items must be a sequence of objects",
                ));
            }
        };
        return items
            .into_iter()
            .map(|item| into_manifest(item, origin))
            .collect();
    }
    Ok(vec![into_manifest(value, origin)?])
}

fn into_manifest(value: Value, origin: &Origin) -> Result<Manifest, ManifestError> {
    let err = |message: String| ManifestError::new(&origin.file, origin.line, message);
    let Value::Object(map) = &value else {
        return Err(err("a manifest must be a mapping".to_string()));
    };
    let field = |map: &Map<String, Value>, name: &str| -> Result<String, ManifestError> {
        match map.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                Err(err(format!("the document has no {name}")))
            }
            Some(other) => Err(err(format!("{name} must be a string, not {other}"))),
        }
    };
    let api_version = field(map, "apiVersion")?;
    let kind = field(map, "kind")?;
    let metadata = match map.get("metadata") {
        Some(Value::Object(metadata)) => metadata,
        _ => return Err(err(format!("the {kind} has no metadata with a name"))),
    };
    let name = match metadata.get("name") {
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        _ if metadata.contains_key("generateName") => {
            return Err(err(format!(
                "the {kind} uses metadata.generateName; kommit needs a fixed metadata.name to \
                 track the object across commits"
            )));
        }
        _ => return Err(err(format!("the {kind} has no metadata.name"))),
    };
    let namespace = match metadata.get("namespace") {
        Some(Value::String(ns)) if !ns.is_empty() => Some(ns.clone()),
        None | Some(Value::Null) => None,
        Some(Value::String(_)) => None,
        Some(other) => {
            return Err(err(format!(
                "metadata.namespace must be a string, not {other}"
            )));
        }
    };
    Ok(Manifest {
        origin: origin.clone(),
        api_version,
        kind,
        name,
        namespace,
        object: value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<Manifest>, Vec<ManifestError>) {
        parse_file("app/web.yaml", text.as_bytes())
    }

    fn one(text: &str) -> Manifest {
        let (mut manifests, errors) = parse(text);
        assert!(errors.is_empty(), "unexpected errors: {errors:?}");
        assert_eq!(manifests.len(), 1);
        manifests.remove(0)
    }

    #[test]
    fn documents_remember_file_index_and_line() {
        let (manifests, errors) = parse(
            "# leading comment\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n\
             ---\n\
             ---\n\
             # a comment only\n\
             ---\n\
             \n\
             apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n  namespace: team\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let found: Vec<_> = manifests
            .iter()
            .map(|m| {
                (
                    m.name.as_str(),
                    m.origin.document,
                    m.origin.line,
                    m.namespace.clone(),
                )
            })
            .collect();
        assert_eq!(
            found,
            vec![("a", 0, 2, None), ("b", 3, 11, Some("team".to_string()))]
        );
    }

    #[test]
    fn octal_reads_as_kubernetes_means_it() {
        let m = one(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n      containers: []\n      volumes:\n      - name: cfg\n        configMap: {name: cfg, defaultMode: 0644}\n",
        );
        assert_eq!(
            m.object["spec"]["template"]["spec"]["volumes"][0]["configMap"]["defaultMode"],
            420
        );
        // A kind kommit does not know is read dynamically, with the same octal rule.
        let m = one(
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\nspec: {mode: 0644}\n",
        );
        assert_eq!(m.object["spec"]["mode"], 420);
    }

    #[test]
    fn known_kinds_keep_strings_the_author_wrote() {
        let m = one(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: flags}\ndata:\n  enabled: yes\n  legacy: on\n  country: N\n  mode: 0644\n  ratio: 1.50\n",
        );
        let data = &m.object["data"];
        assert_eq!(data["enabled"], "yes");
        assert_eq!(data["legacy"], "on");
        assert_eq!(data["country"], "N");
        assert_eq!(data["mode"], "0644");
        assert_eq!(data["ratio"], "1.50");
    }

    #[test]
    fn unknown_kinds_infer_booleans_like_kubectl() {
        let m = one(
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\nspec: {enabled: on, name: yes}\n",
        );
        assert_eq!(m.object["spec"]["enabled"], true);
        assert_eq!(m.object["spec"]["name"], true);
    }

    #[test]
    fn unknown_fields_of_known_kinds_reach_the_server() {
        // The server's strict validation names the typo; the typed reading must not drop it.
        let m = one("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndatta: {a: b}\n");
        assert_eq!(m.object["datta"]["a"], "b");
    }

    #[test]
    fn syntax_errors_name_the_file_line() {
        let (_, errors) = parse(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [broken\n",
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].file, "app/web.yaml");
        assert!(errors[0].line >= 8, "{errors:?}");
        assert!(
            errors[0].to_string().starts_with("app/web.yaml:"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn type_errors_in_known_kinds_name_the_line() {
        let (_, errors) = parse(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: three\n",
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].line, 5, "{errors:?}");
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let (manifests, errors) = parse(
            "kind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nmetadata: {name: b}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {}\n---\n- just\n- a list\n",
        );
        assert!(manifests.is_empty());
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 4, "{messages:#?}");
        assert!(messages[0].contains("app/web.yaml:1: the document has no apiVersion"));
        assert!(messages[1].contains("app/web.yaml:4: the document has no kind"));
        assert!(messages[2].contains("app/web.yaml:7: the ConfigMap has no metadata.name"));
        assert!(messages[3].contains("app/web.yaml:11: a manifest document must be a mapping"));
    }

    #[test]
    fn generate_name_is_refused_with_a_reason() {
        let (_, errors) = parse("apiVersion: v1\nkind: Pod\nmetadata: {generateName: job-}\n");
        assert!(errors[0].message.contains("generateName"), "{errors:?}");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let (_, errors) = parse(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: 1}\ndata: {k: 2}\n",
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 5);
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut bomb = String::from(
            "apiVersion: example.com/v1\nkind: Bomb\nmetadata: {name: b}\na0: &a0 [x,x,x,x,x,x,x,x,x,x]\n",
        );
        for i in 1..9 {
            let prev = format!("*a{}", i - 1);
            bomb.push_str(&format!(
                "a{i}: &a{i} [{}]\n",
                [prev.as_str(); 10].join(",")
            ));
        }
        let (manifests, errors) = parse(&bomb);
        assert!(manifests.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("limit exceeded"), "{errors:?}");
    }

    #[test]
    fn lists_are_expanded() {
        let (manifests, errors) = parse(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: a}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: b}\n",
        );
        assert!(errors.is_empty());
        assert_eq!(
            manifests
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn directives_and_explicit_markers_are_understood() {
        let (manifests, errors) = parse(
            "%YAML 1.1\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n...\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(manifests.len(), 2);
        assert_eq!(manifests[0].origin.line, 3);
        assert_eq!(manifests[1].origin.line, 8);
    }

    #[test]
    fn json_files_parse_too() {
        let m = one(
            r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "j"}, "data": {"a": "1"}}"#,
        );
        assert_eq!(m.name, "j");
    }

    #[test]
    fn invalid_utf8_is_refused_with_its_line() {
        let (_, errors) = parse_file("bad.yaml", b"apiVersion: v1\nkind: \xff\n");
        assert_eq!(errors[0].line, 2);
    }

    proptest::proptest! {
        #[test]
        fn splitting_never_loses_or_reorders_text(docs in proptest::collection::vec("[a-z: \\n#-]{0,40}", 0..6)) {
            let text = docs.join("\n---\n");
            let rebuilt: String = split_documents(&text).iter().map(|c| c.text).collect();
            proptest::prop_assert_eq!(rebuilt, text);
        }
    }
}
