//! Step one: a commit's objects. Git is read on a blocking thread and handed back as owned data;
//! the manifests are parsed and resolved against the cluster's API (discovery only: nothing is
//! fetched from the cluster yet). Every problem is reported at once.

use std::collections::HashMap;

use super::inventory::{apply_body, inventory_id};
use super::{ReconcileError, Target};
use crate::cluster::Cluster;
use crate::commit::CommitInfo;
use crate::manifest::{self, Manifest, Origin};
use crate::object::ObjectKey;
use crate::plan::{Desired, PlanSource, Problem, ProblemKind};
use crate::source::GitSource;

/// A commit's objects, read from git and resolved against the cluster's API.
pub struct Loaded {
    pub(super) desired: Vec<Desired>,
    pub(super) source: PlanSource,
    pub(super) inventory: String,
}

impl Loaded {
    pub fn commit(&self) -> &CommitInfo {
        &self.source.commit
    }

    pub fn inventory(&self) -> &str {
        &self.inventory
    }

    /// Where the source's record lives: --namespace, else the namespace of its first
    /// namespaced object, else the kubeconfig's.
    pub fn record_namespace(&self, target: &Target, cluster: &Cluster) -> String {
        target
            .namespace
            .clone()
            .or_else(|| self.desired.iter().find_map(|d| d.key.namespace.clone()))
            .unwrap_or_else(|| cluster.default_namespace().to_string())
    }
}

/// Reads the commit and resolves its manifests.
pub async fn load(
    source: &GitSource,
    cluster: &Cluster,
    target: &Target,
) -> Result<Loaded, ReconcileError> {
    let rev = target.rev.clone();
    let path = target.path.clone();
    let select = target.select.clone();
    let budgets = target.budgets;
    // Reading and parsing a large tree is blocking work: off the async threads, owned data back.
    let (commit, parsed) = source
        .blocking(move |git| {
            let commit = git.resolve(rev.as_deref())?;
            let files = git.read_selected_manifests(&commit, &path, &select, &budgets)?;
            Ok((commit, manifest::parse_files_within(&files, &budgets)))
        })
        .await?;
    let _span = tracing::info_span!("load", repo = %source.display(), commit = %commit.short_sha(), path = %target.path)
        .entered();
    let manifests = parsed.map_err(|errors| ReconcileError::Invalid {
        commit: commit.short_sha().to_string(),
        problems: errors
            .into_iter()
            .map(|e| Problem {
                kind: ProblemKind::Manifest,
                origin: Some(Origin {
                    file: e.file,
                    document: 0,
                    line: e.line,
                }),
                message: e.message,
            })
            .collect(),
    })?;
    let inventory = inventory_id(source, target);
    let path = crate::source::normalize_repo_path(&target.path).unwrap_or_default();
    let source_note = format!("{}#{}", source.identity(), path);
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| cluster.default_namespace().to_string());
    // A kind the cluster did not serve when kommit last looked may be served now (a CRD
    // installed since): look again once before calling it unknown.
    if manifests
        .iter()
        .any(|m| cluster.resolve(&m.api_version, &m.kind).is_err() && !defined_in(&manifests, m))
    {
        drop(_span);
        cluster.refresh_discovery().await?;
    }
    let confined_to = target.confine.then_some(namespace.as_str());
    let desired = resolve(
        cluster,
        manifests,
        &namespace,
        confined_to,
        &inventory,
        &source_note,
    )
    .map_err(|problems| ReconcileError::Invalid {
        commit: commit.short_sha().to_string(),
        problems,
    })?;
    Ok(Loaded {
        desired,
        source: PlanSource {
            repo: source.display().to_string(),
            path,
            rev: target.rev.clone().unwrap_or_else(|| "HEAD".to_string()),
            commit,
        },
        inventory,
    })
}

/// Whether a CustomResourceDefinition among `manifests` defines the kind of `manifest`.
fn defined_in(manifests: &[Manifest], manifest: &Manifest) -> bool {
    manifests.iter().any(|m| {
        m.group() == "apiextensions.k8s.io"
            && m.kind == "CustomResourceDefinition"
            && m.object.pointer("/spec/group").and_then(|g| g.as_str()) == Some(manifest.group())
            && m.object
                .pointer("/spec/names/kind")
                .and_then(|k| k.as_str())
                == Some(manifest.kind.as_str())
    })
}

/// Resolves every manifest's kind, namespace and identity; reports all problems at once.
fn resolve(
    cluster: &Cluster,
    manifests: Vec<Manifest>,
    default_namespace: &str,
    confined_to: Option<&str>,
    inventory: &str,
    source_note: &str,
) -> Result<Vec<Desired>, Vec<Problem>> {
    // Kinds defined by CRDs of this same commit can only be resolved once those are applied;
    // their scope comes from the CRD.
    let crd_scopes: HashMap<(String, String), bool> = manifests
        .iter()
        .filter(|m| m.group() == "apiextensions.k8s.io" && m.kind == "CustomResourceDefinition")
        .filter_map(|m| {
            let group = m.object.pointer("/spec/group")?.as_str()?;
            let kind = m.object.pointer("/spec/names/kind")?.as_str()?;
            let namespaced = m
                .object
                .pointer("/spec/scope")
                .and_then(|s| s.as_str())
                .is_none_or(|s| s == "Namespaced");
            Some(((group.to_string(), kind.to_string()), namespaced))
        })
        .collect();

    let mut problems = Vec::new();
    let mut seen: HashMap<ObjectKey, Origin> = HashMap::new();
    let mut out = Vec::with_capacity(manifests.len());
    for mut manifest in manifests {
        let group = manifest.group().to_string();
        let (resource, namespaced) = match cluster.resolve(&manifest.api_version, &manifest.kind) {
            Ok(rt) => {
                let namespaced = rt.namespaced;
                (Some(rt), namespaced)
            }
            Err(e) => match crd_scopes.get(&(group.clone(), manifest.kind.clone())) {
                Some(namespaced) => (None, *namespaced),
                None => {
                    problems.push(Problem::at(
                        ProblemKind::UnknownKind,
                        &manifest.origin,
                        e.to_string(),
                    ));
                    continue;
                }
            },
        };
        let namespace = namespaced.then(|| {
            manifest
                .namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_string())
        });
        let key = ObjectKey::new(&group, &manifest.kind, namespace.as_deref(), &manifest.name);
        if let Some(only) = confined_to
            && namespace.as_deref() != Some(only)
        {
            let where_ = match &namespace {
                Some(other) => format!("is in namespace {other}"),
                None => "is cluster-scoped".to_string(),
            };
            problems.push(Problem::at(
                ProblemKind::OutsideNamespace,
                &manifest.origin,
                format!(
                    "{key} {where_}; a preview writes only into its own namespace {only}: \
                     leave metadata.namespace out of the manifests a preview deploys"
                ),
            ));
            continue;
        }
        if let Some(first) = seen.get(&key) {
            problems.push(Problem::at(
                ProblemKind::Duplicate,
                &manifest.origin,
                format!("{key} is defined twice, here and at {first}; keep one of them"),
            ));
            continue;
        }
        seen.insert(key.clone(), manifest.origin.clone());
        // The body is all that is needed of the object from here on; keep one copy, not two.
        let body = apply_body(
            std::mem::take(&mut manifest.object),
            namespace.as_deref(),
            inventory,
            source_note,
        );
        out.push(Desired {
            key,
            api_version: manifest.api_version,
            origin: manifest.origin,
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
