//! Manifests: multi-document YAML (or a stream of JSON objects) read the way Kubernetes means
//! it, into objects that remember where they came from (file, document, line). Lists of any kind
//! are expanded, each item with its own line; a Secret's `stringData` is read as the `data` it
//! becomes on the server, so a key removed from it is removed live too.

use std::fmt;

use base64::Engine as _;
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
    parse_files_within(files, &crate::budget::Budgets::default())
}

/// [`parse_files`], stopping at the first file that takes the commit over a budget.
pub fn parse_files_within(
    files: &[SourceFile],
    budgets: &crate::budget::Budgets,
) -> Result<Vec<Manifest>, Vec<ManifestError>> {
    let mut manifests = Vec::new();
    let mut errors = Vec::new();
    let mut expanded: u64 = 0;
    for file in files {
        let (mut found, mut problems) = parse_file(&file.path, &file.content);
        // Only aliases (`*name`) make a document grow past its text; the others count as read,
        // so a sync of ordinary files does not serialise every object to weigh it.
        expanded += if file.content.contains(&b'*') {
            found
                .iter()
                .map(|m| serde_json::to_vec(&m.object).map_or(0, |v| v.len() as u64))
                .sum::<u64>()
        } else {
            file.content.len() as u64
        };
        manifests.append(&mut found);
        errors.append(&mut problems);
        if manifests.len() > budgets.max_objects {
            errors.push(ManifestError::new(
                &file.path,
                1,
                format!(
                    "the commit holds more than {} objects by this file, over the budget for one \
                     sync; narrow --path (or exclude files), or raise --max-objects (GitSync: \
                     spec.maxObjects)",
                    budgets.max_objects
                ),
            ));
            break;
        }
        if expanded > budgets.max_expanded_bytes {
            errors.push(ManifestError::new(
                &file.path,
                1,
                format!(
                    "the objects read up to this file expand to {} (YAML aliases included), over \
                     the budget of {} for one sync; raise --max-bytes (GitSync: spec.maxBytes) \
                     if they are meant to",
                    crate::budget::human_bytes(expanded),
                    crate::budget::human_bytes(budgets.max_expanded_bytes)
                ),
            ));
            break;
        }
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
    if let Some(values) = json_stream(text) {
        for (index, (line, value)) in values.into_iter().enumerate() {
            let origin = Origin {
                file: path.to_string(),
                document: index,
                line,
            };
            for found in into_manifests(value, &origin, "", line) {
                match found {
                    Ok(manifest) => manifests.push(manifest),
                    Err(e) => errors.push(e),
                }
            }
        }
        return (manifests, errors);
    }
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
            Ok(Some(value)) => {
                for found in into_manifests(value, &origin, chunk.text, chunk.first_line) {
                    match found {
                        Ok(manifest) => manifests.push(manifest),
                        Err(e) => errors.push(e),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    (manifests, errors)
}

/// A stream of two or more concatenated JSON objects (`{…}{…}` or one per line), as kubectl
/// takes it, with the line each starts on. `None` for anything else: one JSON object is YAML too,
/// and YAML's reading gives the better error for a broken one.
fn json_stream(text: &str) -> Option<Vec<(usize, Value)>> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut values = Vec::new();
    let mut start = 0;
    while let Some(next) = stream.next() {
        let value = next.ok()?;
        if !value.is_object() {
            return None;
        }
        let skipped = text[start..].len() - text[start..].trim_start().len();
        let line = 1 + text[..start + skipped].matches('\n').count();
        values.push((line, value));
        start = stream.byte_offset();
    }
    (values.len() >= 2).then_some(values)
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

/// Whether a document is a list of objects: `kind: List`, or any `…List` with `items`, as kubectl
/// takes them.
fn is_list(kind: &str, value: &Value) -> bool {
    kind == "List"
        || (kind.len() > 4
            && kind.ends_with("List")
            && value.get("items").is_some()
            && value.pointer("/metadata/name").is_none())
}

/// Every object of one document; each item of a list stands or falls on its own.
fn into_manifests(
    value: Value,
    origin: &Origin,
    text: &str,
    first_line: usize,
) -> Vec<Result<Manifest, ManifestError>> {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if is_list(kind, &value) {
        let items = match value.get("items") {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(_) => {
                return vec![Err(ManifestError::new(
                    &origin.file,
                    origin.line,
                    format!("a {kind}'s items must be a sequence of objects"),
                ))];
            }
        };
        // Items of a typed list (`ConfigMapList`) may leave out their apiVersion and kind.
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        let texts = list_items(text, first_line);
        let texts = (texts.len() == items.len()).then_some(texts);
        return items
            .into_iter()
            .enumerate()
            .map(|(index, mut item)| {
                if let (Some(item_kind), Value::Object(map)) = (item_kind, &mut item) {
                    map.entry("apiVersion")
                        .or_insert_with(|| Value::String(api_version.to_string()));
                    map.entry("kind")
                        .or_insert_with(|| Value::String(item_kind.to_string()));
                }
                let Some(item_text) = texts.as_ref().map(|t| &t[index]) else {
                    return into_manifest(item, origin);
                };
                let origin = Origin {
                    line: item_text.line,
                    ..origin.clone()
                };
                // Items of built-in kinds keep the strings their author wrote, as documents do.
                let item_api = item.get("apiVersion").and_then(Value::as_str).unwrap_or("");
                let item_kind = item.get("kind").and_then(Value::as_str).unwrap_or("");
                let item = match typed_reading(item_api, item_kind, &item_text.text) {
                    None => item,
                    Some(Ok(typed)) => overlay_typed_strings(item, &typed),
                    Some(Err(e)) => return Err(yaml_error(&origin.file, origin.line, &e)),
                };
                into_manifest(item, &origin)
            })
            .collect();
    }
    vec![into_manifest(value, origin)]
}

/// One item of a block-style list: the file line it starts on and its text, made a document of
/// its own (the `- ` and the indentation taken away).
struct ItemText {
    line: usize,
    text: String,
}

/// The items of a block-style top-level `items:` sequence; empty when the items are written
/// another way (flow style, JSON), where the document's line is the best there is.
fn list_items(text: &str, first_line: usize) -> Vec<ItemText> {
    let lines: Vec<&str> = text.lines().collect();
    // (index of the item's first line, column of its content)
    let mut starts: Vec<(usize, usize)> = Vec::new();
    let mut end = lines.len();
    let mut in_items = false;
    let mut indent: Option<usize> = None;
    for (index, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let here = line.len() - trimmed.len();
        if !in_items {
            let rest = line.strip_prefix("items:").map(str::trim);
            if rest.is_some_and(|r| r.is_empty() || r.starts_with('#')) {
                in_items = true;
            }
            continue;
        }
        let is_item = trimmed == "-" || trimmed.starts_with("- ");
        match indent {
            None if is_item => indent = Some(here),
            None => return Vec::new(),
            Some(i) if here < i || (here == i && !is_item) => {
                end = index;
                break;
            }
            Some(_) => {}
        }
        if is_item && Some(here) == indent {
            let after_dash = &trimmed[1..];
            let content = here + 1 + (after_dash.len() - after_dash.trim_start().len());
            starts.push((index, content));
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(n, &(start, column))| {
            let stop = starts.get(n + 1).map_or(end, |next| next.0);
            let text = lines[start..stop]
                .iter()
                .enumerate()
                .map(|(i, line)| {
                    let line = if i == 0 {
                        line.replacen('-', " ", 1)
                    } else {
                        line.to_string()
                    };
                    let indent = line.len() - line.trim_start().len();
                    line[indent.min(column)..].to_string()
                })
                .collect::<Vec<_>>()
                .join("\n");
            ItemText {
                line: first_line + start,
                text,
            }
        })
        .collect()
}

/// A Secret's `stringData` is write-only input the server merges into `data` (over `data`'s own
/// keys); compared and applied as written, a key removed from it would stay live for ever.
fn string_data_as_data(
    object: &mut Map<String, Value>,
    err: impl Fn(String) -> ManifestError,
) -> Result<(), ManifestError> {
    let Some(string_data) = object.remove("stringData") else {
        return Ok(());
    };
    let string_data = match string_data {
        Value::Null => return Ok(()),
        Value::Object(map) => map,
        _ => {
            return Err(err(
                "the Secret's stringData must be a mapping of keys to strings".into(),
            ));
        }
    };
    let data = object
        .entry("data")
        .or_insert_with(|| Value::Object(Map::new()));
    if data.is_null() {
        *data = Value::Object(Map::new());
    }
    let Value::Object(data) = data else {
        return Err(err(
            "the Secret's data must be a mapping of keys to base64 strings".into(),
        ));
    };
    for (key, value) in string_data {
        let Value::String(value) = value else {
            // The key only, never the value: it is a secret.
            return Err(err(format!(
                "the Secret's stringData.{key} must be a string"
            )));
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(value.as_bytes());
        data.insert(key, Value::String(encoded));
    }
    Ok(())
}

fn into_manifest(mut value: Value, origin: &Origin) -> Result<Manifest, ManifestError> {
    let err = |message: String| ManifestError::new(&origin.file, origin.line, message);
    let Value::Object(map) = &mut value else {
        return Err(err("a manifest must be a mapping".to_string()));
    };
    if map.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && map.get("kind").and_then(Value::as_str) == Some("Secret")
    {
        string_data_as_data(map, err)?;
    }
    let map = &*map;
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

    #[test]
    fn a_commit_over_its_budgets_is_refused_naming_the_file_and_the_flag() {
        let docs: String = (0..20)
            .map(|i| format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}}}\n"))
            .collect();
        let files = vec![SourceFile {
            path: "deploy/many.yaml".into(),
            content: docs.into_bytes(),
        }];
        let few = crate::budget::Budgets {
            max_objects: 10,
            ..crate::budget::Budgets::default()
        };
        let errors = parse_files_within(&files, &few).unwrap_err();
        assert_eq!(errors[0].file, "deploy/many.yaml");
        assert!(errors[0].message.contains("--max-objects"), "{errors:?}");
        let small = crate::budget::Budgets {
            max_expanded_bytes: 100,
            ..crate::budget::Budgets::default()
        };
        let errors = parse_files_within(&files, &small).unwrap_err();
        assert!(
            errors[0].message.contains("over the budget of 100 bytes"),
            "{errors:?}"
        );
        assert_eq!(
            parse_files_within(&files, &crate::budget::Budgets::default())
                .unwrap()
                .len(),
            20
        );
    }

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

    #[test]
    fn every_kind_of_list_is_expanded_with_a_line_per_item() {
        let (manifests, errors) = parse(
            "apiVersion: v1\nkind: ConfigMapList\nitems:\n- metadata:\n    name: dashboards-a\n  data: {a.json: '{}'}\n# a comment\n- metadata:\n    name: dashboards-b\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let found: Vec<_> = manifests
            .iter()
            .map(|m| {
                (
                    m.kind.as_str(),
                    m.api_version.as_str(),
                    m.name.as_str(),
                    m.origin.line,
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                ("ConfigMap", "v1", "dashboards-a", 4),
                ("ConfigMap", "v1", "dashboards-b", 8)
            ]
        );
        let (manifests, errors) = parse(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleList\nitems:\n  - apiVersion: rbac.authorization.k8s.io/v1\n    kind: Role\n    metadata: {name: a}\n    rules: []\n  - kind: Role\n    metadata: {}\n",
        );
        assert_eq!(manifests.len(), 1);
        assert_eq!(manifests[0].origin.line, 4);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].line, 8,
            "the broken item is named by its own line"
        );
        assert!(errors[0].message.contains("no metadata.name"), "{errors:?}");
    }

    #[test]
    fn list_items_of_built_in_kinds_keep_the_strings_their_author_wrote() {
        let (manifests, errors) = parse(
            "apiVersion: v1\nkind: ConfigMapList\nitems:\n  -   metadata:\n        name: flags\n      data:\n        enabled: yes\n        mode: 0644\n  - apiVersion: example.com/v1\n    kind: Widget\n    metadata: {name: w}\n    spec: {on: yes}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(manifests[0].object["data"]["enabled"], "yes");
        assert_eq!(manifests[0].object["data"]["mode"], "0644");
        assert_eq!(manifests[1].object["spec"]["on"], true);
        // A type error in an item names the item's line.
        let (_, errors) = parse(
            "apiVersion: apps/v1\nkind: DeploymentList\nitems:\n- metadata: {name: a}\n  spec: {replicas: 1}\n- metadata: {name: b}\n  spec: {replicas: three}\n",
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].line >= 6, "{errors:?}");
    }

    #[test]
    fn a_secrets_string_data_is_read_as_the_data_it_becomes() {
        let m = one(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {a: b2xk, keep: a2VlcA==}\nstringData:\n  a: new\n  b: \"0644\"\n",
        );
        assert!(m.object.get("stringData").is_none());
        assert_eq!(
            m.object["data"],
            serde_json::json!({"a": "bmV3", "b": "MDY0NA==", "keep": "a2VlcA=="})
        );
        let m = one("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {only: x}\n");
        assert_eq!(m.object["data"], serde_json::json!({"only": "eA=="}));
        let (_, errors) =
            parse("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: [a]\n");
        assert_eq!(errors[0].line, 4, "{errors:?}");
    }

    #[test]
    fn concatenated_json_objects_are_a_stream() {
        let (manifests, errors) = parse(
            "{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"a\"}}{\"apiVersion\": \"v1\",\n \"kind\": \"ConfigMap\", \"metadata\": {\"name\": \"b\"}}\n\n{\"apiVersion\": \"v1\", \"kind\": \"ConfigMap\", \"metadata\": {}}\n",
        );
        assert_eq!(
            manifests
                .iter()
                .map(|m| (m.name.as_str(), m.origin.line))
                .collect::<Vec<_>>(),
            [("a", 1), ("b", 1)]
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 4);
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
