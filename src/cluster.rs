//! The only module that talks to the API server: discovery, get, list, server-side apply (and its
//! dry run), delete. A [`Cluster`] may act as another identity (a GitSync's ServiceAccount, by
//! impersonation), so that Kubernetes RBAC decides what a commit may touch.

use std::path::PathBuf;
use std::time::Duration;

use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
    PropagationPolicy,
};
use kube::core::{ApiResource, GroupVersionKind, Status};
use kube::discovery::{ApiCapabilities, Discovery, Scope, verbs};
use kube::{Client, Config};
use serde_json::Value;

use crate::object::{FIELD_MANAGER, ObjectKey};

#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// This process's name in the Events it writes (the operator's pod name).
    pub instance: Option<String>,
    /// How long one API request may wait for the server's next bytes
    /// (default [`DEFAULT_API_TIMEOUT`]).
    pub request_timeout: Option<Duration>,
}

/// An API server that goes quiet this long in the middle of a request has failed it.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot load the Kubernetes client configuration: {message}; {hint}")]
    Config { message: String, hint: String },
    #[error(
        "cannot reach the Kubernetes API server at {server}: {message}; check that the cluster \
         is running and that --kubeconfig/--context point at it"
    )]
    Unreachable { server: String, message: String },
    #[error("{what} is not served by this cluster: {hint}")]
    UnknownKind { what: String, hint: String },
    #[error(
        "{object}: {} owned by another field manager: {}; re-run with --force-conflicts to take \
         them over, or remove them from the manifest",
        if conflicts.len() == 1 { "a field is" } else { "fields are" },
        conflicts.iter().map(|c| format!("{} (manager \"{}\")", c.field, c.manager)).collect::<Vec<_>>().join(", ")
    )]
    Conflict {
        object: String,
        conflicts: Vec<FieldConflict>,
    },
    #[error("{object}: the API server rejected it: {message}")]
    Rejected {
        object: String,
        message: String,
        /// True when the rejection is about an immutable field (a replace can fix it).
        immutable: bool,
    },
    /// The API server refused a request: who may not do what, where, and how to allow it.
    #[error("{object}: {action} was forbidden: {}", denied)]
    Forbidden {
        object: String,
        action: &'static str,
        denied: Box<Denied>,
    },
    #[error("{object}: {action} failed: {message}")]
    Api {
        object: String,
        action: &'static str,
        message: String,
        code: u16,
    },
    #[error("{object}: timed out after {seconds}s waiting until {what}")]
    Timeout {
        object: String,
        what: &'static str,
        seconds: u64,
    },
    #[error(
        "not writing {object}: this replica can no longer be sure it holds the leader lease, and \
         another may already be reconciling"
    )]
    Fenced { object: String },
}

/// Until when this process may write: a leader's lease renewals move it forward, and once it
/// passes (a renewal failed for too long, or the process was paused), every write is refused
/// before it is sent. A monotonic clock, so a paused process finds its time gone on waking.
#[derive(Clone, Debug)]
pub struct Fence(std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>);

impl Fence {
    /// A fence that allows nothing yet.
    pub fn closed() -> Self {
        Fence(std::sync::Arc::new(std::sync::Mutex::new(None)))
    }

    /// Allows writes until `until` (never moves it back but through [`Fence::close`]).
    pub fn open_until(&self, until: std::time::Instant) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none_or(|current| current < until) {
            *slot = Some(until);
        }
    }

    pub fn close(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn allows_writes(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    /// Refuses a write of `object` that the fence does not allow, before it is sent.
    pub fn check(&self, object: &str) -> Result<(), ClusterError> {
        if self.allows_writes() {
            Ok(())
        } else {
            Err(ClusterError::Fenced {
                object: object.to_string(),
            })
        }
    }
}

/// What the API server refused, read from its 403: who may not do what, and where.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Denied {
    /// The identity refused (empty when the server did not say).
    pub user: String,
    /// The Kubernetes verb: get, list, watch, create, patch, delete, impersonate.
    pub verb: String,
    /// The resource (plural), e.g. `configmaps`.
    pub resource: String,
    /// Its API group (empty for the core group).
    pub group: String,
    /// Where: a namespace, or `None` for the cluster scope.
    pub namespace: Option<String>,
    /// The server's own words.
    pub message: String,
    /// The request was made as a ServiceAccount (or user) kommit impersonated.
    pub impersonated: bool,
}

/// The verbs kommit uses on a kind it syncs: read, watch for health, apply, prune.
const SYNC_VERBS: &str = "get,list,watch,create,patch,delete";

impl Denied {
    fn from_status(status: &Status, action: &str) -> Self {
        let message = status.message.clone();
        let quoted_after = |marker: &str| -> Option<String> {
            let rest = &message[message.find(marker)? + marker.len()..];
            Some(rest[..rest.find('"')?].to_string())
        };
        let user = quoted_after("User \"")
            .or_else(|| quoted_after("user \""))
            .unwrap_or_default();
        // `... cannot patch resource "configmaps" in API group "" in the namespace "b"`
        let verb = message
            .split_once(" cannot ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .filter(|_| message.contains(" resource \""))
            .map(str::to_string);
        let (verb, resource, group, namespace) = match verb {
            Some(verb) => (
                verb,
                quoted_after(" resource \"").unwrap_or_default(),
                quoted_after(" in API group \"").unwrap_or_default(),
                quoted_after(" in the namespace \""),
            ),
            // Not the authorizer's words (an admission plugin, RBAC escalation): what we know.
            None => (
                verb_of(action).to_string(),
                status
                    .details
                    .as_ref()
                    .map(|d| d.kind.clone())
                    .unwrap_or_default(),
                status
                    .details
                    .as_ref()
                    .map(|d| d.group.clone())
                    .unwrap_or_default(),
                None,
            ),
        };
        Denied {
            user,
            verb,
            resource,
            group,
            namespace,
            message,
            impersonated: false,
        }
    }

    /// `configmaps`, or `clusterrolebindings.rbac.authorization.k8s.io`, as kubectl takes it.
    pub fn qualified_resource(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    fn who(&self) -> String {
        match service_account_of(&self.user) {
            Some((namespace, name)) => format!("ServiceAccount {namespace}/{name}"),
            None if self.user.is_empty() => "the identity in your kubeconfig".to_string(),
            None => format!("user {}", self.user),
        }
    }

    /// The kubectl commands that would allow what was refused.
    pub fn hint(&self) -> Option<String> {
        if self.resource.is_empty() || self.user.is_empty() {
            return None;
        }
        if self.verb == "impersonate" {
            return Some(format!(
                "kommit's own identity ({}) needs `impersonate` on {}{}: install the chart with \
                 tenancy.mode=locked, or `kubectl create clusterrole kommit-impersonate \
                 --verb=impersonate --resource=serviceaccounts` and bind it to kommit's \
                 ServiceAccount",
                self.user,
                self.qualified_resource(),
                self.namespace
                    .as_deref()
                    .map_or(String::new(), |ns| format!(" in namespace {ns}"))
            ));
        }
        let resource = self.qualified_resource();
        let role = format!("kommit-{resource}");
        let (subject, short) = match service_account_of(&self.user) {
            Some((namespace, name)) => (format!("--serviceaccount={namespace}:{name}"), name),
            None => (format!("--user={}", self.user), self.user.as_str()),
        };
        let binding = format!("{short}-{resource}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect::<String>();
        let bind = match &self.namespace {
            Some(ns) => {
                format!(
                    "kubectl create rolebinding {binding} -n {ns} --clusterrole={role} {subject}"
                )
            }
            None => {
                format!(
                    "kubectl create clusterrolebinding {binding} --clusterrole={role} {subject}"
                )
            }
        };
        let rbac_note = if self.group == "rbac.authorization.k8s.io" {
            " (a binding also needs `bind` on the role it grants, or every permission in it)"
        } else {
            ""
        };
        Some(format!(
            "to allow it: `kubectl create clusterrole {role} --verb={SYNC_VERBS} \
             --resource={resource}` (once), then `{bind}`{rbac_note}"
        ))
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = self.who();
        if self.resource.is_empty() || self.message.contains("attempting to grant") {
            write!(f, "{}; {who} needs RBAC permission for it", self.message)?;
        } else {
            let place = match &self.namespace {
                Some(ns) => format!("in namespace {ns}"),
                None => "cluster-wide".to_string(),
            };
            write!(
                f,
                "{who} may not {} {} {place}",
                self.verb,
                self.qualified_resource()
            )?;
        }
        if let Some(hint) = self.hint() {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

/// The Kubernetes verb behind one of kommit's actions.
fn verb_of(action: &str) -> &str {
    match action {
        "apply" | "dry-run apply" | "write" => "patch",
        "read" => "get",
        other => other,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldConflict {
    pub field: String,
    pub manager: String,
}

/// A kind as the cluster serves it.
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub resource: ApiResource,
    pub namespaced: bool,
    pub capabilities: ApiCapabilities,
}

impl ResourceType {
    pub fn group(&self) -> &str {
        &self.resource.group
    }
    pub fn kind(&self) -> &str {
        &self.resource.kind
    }
}

/// A connection to one cluster, with its API discovery (two requests, done once).
#[derive(Clone)]
pub struct Cluster {
    /// Acts as `acting_as` when set, else as the identity of the configuration.
    client: Client,
    /// The configuration's own identity, for what this process keeps for itself (Events).
    own_client: Client,
    /// The loaded configuration, from which impersonating clients are made.
    config: std::sync::Arc<Config>,
    /// Shared by every clone (each GitSync's impersonating one too): a refresh after a CRD
    /// appeared serves them all.
    discovery: std::sync::Arc<std::sync::RwLock<std::sync::Arc<Discovery>>>,
    default_namespace: String,
    server: String,
    instance: Option<String>,
    acting_as: Option<Identity>,
    /// When set, writes go out only while it allows them (a leader's lease).
    fence: Option<Fence>,
}

/// Someone a [`Cluster`] acts as by impersonation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name, e.g. `system:serviceaccount:team-a:deployer`.
    pub user: String,
    /// Groups sent with it. A ServiceAccount needs none: the API server adds
    /// `system:serviceaccounts` and `system:serviceaccounts:<namespace>` itself when none are sent,
    /// and sending groups would need `impersonate` on every group (system:masters included).
    pub groups: Vec<String>,
}

impl Identity {
    /// The ServiceAccount `name` of `namespace`, as the API server names it.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Identity {
            user: format!("system:serviceaccount:{namespace}:{name}"),
            groups: Vec::new(),
        }
    }

    /// `(namespace, name)` when this is a ServiceAccount.
    pub fn service_account_parts(&self) -> Option<(&str, &str)> {
        service_account_of(&self.user)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match service_account_of(&self.user) {
            Some((namespace, name)) => write!(f, "ServiceAccount {namespace}/{name}"),
            None => write!(f, "user {}", self.user),
        }
    }
}

/// `(namespace, name)` of a ServiceAccount's user name.
fn service_account_of(user: &str) -> Option<(&str, &str)> {
    user.strip_prefix("system:serviceaccount:")?.split_once(':')
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("server", &self.server)
            .finish()
    }
}

impl Cluster {
    /// Watches end on the server's side before the read timeout could cut them (and resume
    /// where they were), so a quiet watch is not taken for a hung server.
    pub fn watcher_config(&self) -> kube::runtime::watcher::Config {
        let read_timeout = self.config.read_timeout.unwrap_or(DEFAULT_API_TIMEOUT);
        let seconds = read_timeout.as_secs().saturating_sub(5).max(5);
        kube::runtime::watcher::Config::default().timeout(u32::try_from(seconds).unwrap_or(290))
    }

    /// Loads the client configuration the usual way (explicit file, `KUBECONFIG`,
    /// `~/.kube/config`, or the in-cluster service account) and runs discovery.
    pub async fn connect(options: &ConnectOptions) -> Result<Self, ClusterError> {
        let mut config = load_config(options).await?;
        config.connect_timeout = Some(Duration::from_secs(10));
        // kube waits for ever by default: a hung API server would hold a sync for good.
        let timeout = options.request_timeout.unwrap_or(DEFAULT_API_TIMEOUT);
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        let server = config.cluster_url.to_string();
        let default_namespace = config.default_namespace.clone();
        let client = client_for(config.clone())?;
        let discovery = run_discovery(&client, &server).await?;
        Ok(Cluster {
            own_client: client.clone(),
            client,
            config: std::sync::Arc::new(config),
            discovery: std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(discovery))),
            default_namespace,
            server,
            instance: options.instance.clone(),
            acting_as: None,
            fence: None,
        })
    }

    /// The same cluster, writing only while `fence` allows it.
    pub fn fenced(&self, fence: Fence) -> Cluster {
        Cluster {
            fence: Some(fence),
            ..self.clone()
        }
    }

    /// Refuses a write the fence does not allow, before it is sent.
    pub fn check_fence(&self, object: &str) -> Result<(), ClusterError> {
        self.fence
            .as_ref()
            .map_or(Ok(()), |fence| fence.check(object))
    }

    /// The fence of this cluster's writes, if any: for writes made through a client of their
    /// own (GitSync statuses, Events, source locks), which must stop with the others.
    pub fn fence(&self) -> Option<&Fence> {
        self.fence.as_ref()
    }

    /// The same cluster, every request made as `identity` (Kubernetes impersonation); the
    /// discovery is shared. This process's own identity needs `impersonate` on it (for a
    /// ServiceAccount: on `serviceaccounts` in its namespace).
    pub fn impersonating(&self, identity: Identity) -> Result<Cluster, ClusterError> {
        let mut config = (*self.config).clone();
        config.auth_info.impersonate = Some(identity.user.clone());
        config.auth_info.impersonate_groups =
            (!identity.groups.is_empty()).then(|| identity.groups.clone());
        Ok(Cluster {
            client: client_for(config)?,
            acting_as: Some(identity),
            ..self.clone()
        })
    }

    /// Who the requests are made as, when not as the configuration's own identity.
    pub fn acting_as(&self) -> Option<&Identity> {
        self.acting_as.as_ref()
    }

    /// A client with this process's own identity, even when the cluster acts as another: for
    /// what the process keeps for itself, such as the Events it publishes.
    pub fn own_client(&self) -> &Client {
        &self.own_client
    }

    /// Runs discovery again (after CustomResourceDefinitions were applied, or when a kind is
    /// unknown), for this cluster and all its clones.
    pub async fn refresh_discovery(&self) -> Result<(), ClusterError> {
        let fresh = std::sync::Arc::new(run_discovery(&self.own_client, &self.server).await?);
        *self.discovery.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    fn discovery(&self) -> std::sync::Arc<Discovery> {
        self.discovery
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// This process's name in the Events it writes, when it has one.
    pub fn instance(&self) -> Option<&str> {
        self.instance.as_deref()
    }

    /// The namespace of the kubeconfig's context (or the pod's), else `default`.
    pub fn default_namespace(&self) -> &str {
        &self.default_namespace
    }

    /// Finds how the cluster serves `apiVersion`/`kind`.
    pub fn resolve(&self, api_version: &str, kind: &str) -> Result<ResourceType, ClusterError> {
        let (group, version) = crate::manifest::split_api_version(api_version);
        let gvk = GroupVersionKind::gvk(group, version, kind);
        if let Some((resource, capabilities)) = self.discovery().resolve_gvk(&gvk) {
            return Ok(ResourceType {
                namespaced: capabilities.scope == Scope::Namespaced,
                resource,
                capabilities,
            });
        }
        let what = format!("{kind} ({api_version})");
        let discovery = self.discovery();
        let hint = match discovery.get(group) {
            None if group.is_empty() => format!("the core API has no kind {kind}"),
            None => format!(
                "the API group {group} does not exist here; install its CustomResourceDefinition \
                 first (or add it to the synced path), or fix the apiVersion"
            ),
            Some(api_group) => {
                let versions: Vec<String> = api_group
                    .versions()
                    .filter(|v| {
                        api_group
                            .versioned_resources(v)
                            .iter()
                            .any(|(r, _)| r.kind == kind)
                    })
                    .map(|v| format!("{}/{v}", api_group.name()))
                    .collect();
                if versions.is_empty() {
                    format!(
                        "the group {group} has no kind {kind}; kinds are case-sensitive, check the spelling"
                    )
                } else {
                    format!("use apiVersion {}", versions.join(" or "))
                }
            }
        };
        Err(ClusterError::UnknownKind { what, hint })
    }

    /// Every kind that can be listed and deleted, at its preferred version: where prune looks.
    pub fn prunable_types(&self) -> Vec<ResourceType> {
        let mut types = Vec::new();
        let discovery = self.discovery();
        for group in discovery.groups() {
            for (resource, capabilities) in group.recommended_resources() {
                let listable = capabilities.supports_operation(verbs::LIST)
                    && capabilities.supports_operation(verbs::DELETE);
                let is_event = resource.kind == "Event";
                if listable && !is_event {
                    types.push(ResourceType {
                        namespaced: capabilities.scope == Scope::Namespaced,
                        resource,
                        capabilities,
                    });
                }
            }
        }
        types
    }

    fn api(&self, rt: &ResourceType, namespace: Option<&str>) -> Api<DynamicObject> {
        match (rt.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &rt.resource),
            (true, None) => Api::all_with(self.client.clone(), &rt.resource),
            (false, _) => Api::all_with(self.client.clone(), &rt.resource),
        }
    }

    /// The live object, or `None` when it does not exist.
    pub async fn get(
        &self,
        rt: &ResourceType,
        key: &ObjectKey,
    ) -> Result<Option<Value>, ClusterError> {
        let api = self.api(rt, key.namespace.as_deref());
        match api.get_opt(&key.name).await {
            Ok(found) => Ok(found.map(to_value)),
            Err(e) => Err(self.classify(e, &key.to_string(), "get")),
        }
    }

    /// Lists objects of a kind (in one namespace, or everywhere), following pagination. Other
    /// field managers' managedFields entries, often the bulk of an object and never needed
    /// here, are dropped before the objects are kept.
    pub async fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        label_selector: Option<&str>,
    ) -> Result<Vec<Value>, ClusterError> {
        let api = self.api(rt, namespace);
        // Modest pages keep the peak memory of a thousand-object list low.
        let mut params = ListParams::default().limit(250);
        if let Some(selector) = label_selector {
            params = params.labels(selector);
        }
        let mut out = Vec::new();
        loop {
            let page = api
                .list(&params)
                .await
                .map_err(|e| self.classify(e, &format!("{} list", rt.kind()), "list"))?;
            let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
            out.extend(page.items.into_iter().map(|mut item| {
                // List items come without apiVersion/kind; give them back for uniform handling.
                item.types = Some(kube::core::TypeMeta {
                    api_version: rt.resource.api_version.clone(),
                    kind: rt.resource.kind.clone(),
                });
                if let Some(entries) = item.metadata.managed_fields.as_mut() {
                    entries.retain(|e| e.manager.as_deref() == Some(FIELD_MANAGER));
                }
                to_value(item)
            }));
            match next {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        Ok(out)
    }

    /// Server-side apply as field manager `kommit`, with strict field validation.
    pub async fn apply(
        &self,
        rt: &ResourceType,
        key: &ObjectKey,
        body: &Value,
        dry_run: bool,
        force: bool,
    ) -> Result<Value, ClusterError> {
        if !dry_run {
            self.check_fence(&key.to_string())?;
        }
        let api = self.api(rt, key.namespace.as_deref());
        let mut params = PatchParams::apply(FIELD_MANAGER).validation_strict();
        if dry_run {
            params = params.dry_run();
        }
        if force {
            params = params.force();
        }
        let action = if dry_run { "dry-run apply" } else { "apply" };
        api.patch(&key.name, &params, &Patch::Apply(body))
            .await
            .map(to_value)
            .map_err(|e| self.classify(e, &key.to_string(), action))
    }

    /// Deletes an object (dependents are garbage-collected in the background). Returns the uid of
    /// what was deleted, or `None` when it was already gone.
    pub async fn delete(&self, rt: &ResourceType, key: &ObjectKey) -> Result<bool, ClusterError> {
        self.check_fence(&key.to_string())?;
        let api = self.api(rt, key.namespace.as_deref());
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        match api.delete(&key.name, &params).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(self.classify(e, &key.to_string(), "delete")),
        }
    }

    /// Deletes the object only if it is still the one with `uid` (a precondition the server
    /// checks); `Ok(false)` when it is gone or was made anew under the same name.
    pub async fn delete_exact(
        &self,
        rt: &ResourceType,
        key: &ObjectKey,
        uid: Option<&str>,
    ) -> Result<bool, ClusterError> {
        let Some(uid) = uid else {
            return self.delete(rt, key).await;
        };
        self.check_fence(&key.to_string())?;
        let api = self.api(rt, key.namespace.as_deref());
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&key.name, &params).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
                if status.code == 409 {
                    tracing::warn!(object = %key, "not deleted: it was made anew since kommit looked");
                }
                Ok(false)
            }
            Err(e) => Err(self.classify(e, &key.to_string(), "delete")),
        }
    }

    /// Replaces the object's managed fields, provided it still has `resource_version`.
    pub async fn replace_managed_fields(
        &self,
        rt: &ResourceType,
        key: &ObjectKey,
        resource_version: Option<&str>,
        managed_fields: &Value,
    ) -> Result<(), ClusterError> {
        self.check_fence(&key.to_string())?;
        let api = self.api(rt, key.namespace.as_deref());
        let mut metadata = serde_json::json!({ "managedFields": managed_fields });
        if let Some(version) = resource_version {
            metadata["resourceVersion"] = version.into();
        }
        let patch = serde_json::json!({ "metadata": metadata });
        api.patch(&key.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(|e| self.classify(e, &key.to_string(), "take over the fields of"))
    }

    /// Waits until the object with this uid is gone (deleted, or replaced by a new one).
    pub async fn wait_gone(
        &self,
        rt: &ResourceType,
        key: &ObjectKey,
        uid: Option<&str>,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.get(rt, key).await? {
                None => return Ok(()),
                Some(live) => {
                    let live_uid = live.pointer("/metadata/uid").and_then(Value::as_str);
                    if uid.is_some() && live_uid != uid {
                        return Ok(());
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::Timeout {
                    object: key.to_string(),
                    what: "it is deleted",
                    seconds: timeout.as_secs(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Turns an error of a request this cluster's client made into a [`ClusterError`] (a 403
    /// into [`ClusterError::Forbidden`] naming who was refused): for code that uses
    /// [`Cluster::client`] directly.
    pub fn classify(&self, error: kube::Error, object: &str, action: &'static str) -> ClusterError {
        let mut error = classify_error(error, object, action, &self.server);
        if let (ClusterError::Forbidden { denied, .. }, Some(identity)) =
            (&mut error, &self.acting_as)
        {
            denied.impersonated = true;
            if denied.user.is_empty() {
                denied.user = identity.user.clone();
            }
        }
        error
    }
}

fn client_for(config: Config) -> Result<Client, ClusterError> {
    Client::try_from(config).map_err(|e| ClusterError::Config {
        message: e.to_string(),
        hint: "check the cluster and user entries of the kubeconfig".to_string(),
    })
}

async fn load_config(options: &ConnectOptions) -> Result<Config, ClusterError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let kube_options = KubeConfigOptions {
        context: options.context.clone(),
        cluster: None,
        user: None,
    };
    let result = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| ClusterError::Config {
                message: e.to_string(),
                hint: format!(
                    "check that {} is a readable kubeconfig file",
                    path.display()
                ),
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &kube_options)
                .await
                .map_err(|e| e.to_string())
        }
        None if options.context.is_some() => Config::from_kubeconfig(&kube_options)
            .await
            .map_err(|e| e.to_string()),
        None => Config::infer().await.map_err(|e| e.to_string()),
    };
    result.map_err(|message| ClusterError::Config {
        message,
        hint: "pass --kubeconfig FILE (and --context NAME), set KUBECONFIG, or run inside a pod"
            .to_string(),
    })
}

async fn run_discovery(client: &Client, server: &str) -> Result<Discovery, ClusterError> {
    let aggregated = Discovery::new(client.clone()).run_aggregated().await;
    match aggregated {
        Ok(discovery) => Ok(discovery),
        Err(kube::Error::Api(_)) => Discovery::new(client.clone())
            .run()
            .await
            .map_err(|e| classify_error(e, "API discovery", "discovery", server)),
        Err(e) => Err(classify_error(e, "API discovery", "discovery", server)),
    }
}

fn to_value(object: DynamicObject) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

fn classify_error(
    error: kube::Error,
    object: &str,
    action: &'static str,
    server: &str,
) -> ClusterError {
    match error {
        kube::Error::Api(status) => classify_status(*status, object, action),
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            let mut message = error_chain(&error);
            if message.contains("timed out") || message.contains("deadline has elapsed") {
                message.push_str(&format!(
                    " (no answer to {action} {object} in time; --api-timeout or \
                     KOMMIT_API_TIMEOUT sets how long to wait)"
                ));
            }
            ClusterError::Unreachable {
                server: server.to_string(),
                message,
            }
        }
        other => ClusterError::Api {
            object: object.to_string(),
            action,
            message: error_chain(&other),
            code: 0,
        },
    }
}

fn classify_status(status: Status, object: &str, action: &'static str) -> ClusterError {
    let causes = status
        .details
        .as_ref()
        .map(|d| d.causes.as_slice())
        .unwrap_or(&[]);
    if status.code == 409 && causes.iter().any(|c| c.reason == "FieldManagerConflict") {
        let conflicts = causes
            .iter()
            .filter(|c| c.reason == "FieldManagerConflict")
            .map(|c| FieldConflict {
                field: c.field.clone(),
                manager: c
                    .message
                    .split('"')
                    .nth(1)
                    .unwrap_or(c.message.as_str())
                    .to_string(),
            })
            .collect();
        return ClusterError::Conflict {
            object: object.to_string(),
            conflicts,
        };
    }
    match status.code {
        422 | 400 => {
            let immutable = status.message.contains("field is immutable")
                || status.message.contains("may not change fields")
                || status.message.contains("updates to statefulset spec");
            ClusterError::Rejected {
                object: object.to_string(),
                message: explain_rejection(&status.message),
                immutable,
            }
        }
        403 => ClusterError::Forbidden {
            object: object.to_string(),
            action,
            denied: Box::new(Denied::from_status(&status, action)),
        },
        code => ClusterError::Api {
            object: object.to_string(),
            action,
            message: if status.message.is_empty() {
                status.reason
            } else {
                status.message
            },
            code,
        },
    }
}

/// Adds what to do to the server's words where we know a common cause.
fn explain_rejection(message: &str) -> String {
    let message = &without_value_dumps(message);
    if message.contains("\"boolean\"") && message.contains("string") {
        format!(
            "{message} (a YAML 1.1 boolean such as yes, on or N landed in a string field; quote it, \
             e.g. \"yes\")"
        )
    } else if message.contains("unknown field") {
        format!("{message} (check the field's spelling and indentation)")
    } else {
        message.to_string()
    }
}

/// The server quotes the whole rejected value (`spec.template: Invalid value:
/// {"labels":…,"Spec":{…}}: field is immutable`: kilobytes of a pod template before the words
/// that matter); a value longer than a line is left out, short ones stay.
fn without_value_dumps(message: &str) -> String {
    const MARKER: &str = "Invalid value: ";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(MARKER) {
        let value = &rest[at + MARKER.len()..];
        let Some(end) = dump_end(value).filter(|end| *end > 80) else {
            out.push_str(&rest[..at + MARKER.len()]);
            rest = value;
            continue;
        };
        out.push_str(&rest[..at]);
        rest = value[end..].strip_prefix(": ").unwrap_or(&value[end..]);
    }
    out.push_str(rest);
    out
}

/// Where a quoted composite value (JSON, or a Go struct literal `pkg.Type{…}`) ends.
fn dump_end(value: &str) -> Option<usize> {
    let open = value.find('{')?;
    let prefix = &value[..open];
    if !prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '*' || c == '&')
    {
        return None;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in value.char_indices().skip_while(|(i, _)| *i < open) {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '{' if !in_string => depth += 1,
            '}' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_allows_writes_only_until_the_lease_could_have_passed() {
        let now = std::time::Instant::now();
        let fence = Fence::closed();
        assert!(!fence.allows_writes(), "nothing before the first renewal");
        fence.open_until(now + Duration::from_secs(60));
        assert!(fence.allows_writes());
        fence.open_until(now);
        assert!(fence.allows_writes(), "an older renewal never shortens it");
        fence.close();
        assert!(!fence.allows_writes(), "a lost lease ends it at once");
        fence.open_until(now - Duration::from_millis(1));
        assert!(
            !fence.allows_writes(),
            "a renewal whose time has passed allows nothing"
        );
    }
    use kube::core::response::{StatusCause, StatusDetails};

    fn status(code: u16, message: &str, causes: Vec<StatusCause>) -> Status {
        let mut status = Status::failure(message, "");
        status.code = code;
        status.details = Some(StatusDetails {
            name: String::new(),
            group: String::new(),
            kind: String::new(),
            uid: String::new(),
            causes,
            retry_after_seconds: 0,
        });
        status
    }

    #[test]
    fn conflicts_name_field_and_manager() {
        let err = classify_status(
            status(
                409,
                "Apply failed with 1 conflict",
                vec![StatusCause {
                    reason: "FieldManagerConflict".into(),
                    message: "conflict with \"kubectl-edit\" using apps/v1".into(),
                    field: ".spec.replicas".into(),
                }],
            ),
            "Deployment shop/web",
            "apply",
        );
        let text = err.to_string();
        assert!(
            text.contains(".spec.replicas (manager \"kubectl-edit\")"),
            "{text}"
        );
        assert!(text.contains("--force-conflicts"), "{text}");
    }

    #[test]
    fn immutable_rejections_are_recognised() {
        let err = classify_status(
            status(
                422,
                "Pod \"p\" is invalid: spec: Forbidden: pod updates may not change fields other than ...",
                vec![],
            ),
            "Pod shop/p",
            "dry-run apply",
        );
        assert!(matches!(
            err,
            ClusterError::Rejected {
                immutable: true,
                ..
            }
        ));
    }

    #[test]
    fn a_refusal_names_who_what_where_and_the_rolebinding_that_allows_it() {
        let err = classify_status(
            status(
                403,
                "configmaps \"precious\" is forbidden: User \"system:serviceaccount:a:deployer\" \
                 cannot patch resource \"configmaps\" in API group \"\" in the namespace \"b\"",
                vec![],
            ),
            "ConfigMap b/precious",
            "dry-run apply",
        );
        let text = err.to_string();
        assert!(
            text.starts_with(
                "ConfigMap b/precious: dry-run apply was forbidden: ServiceAccount a/deployer may \
                 not patch configmaps in namespace b; to allow it:"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "`kubectl create rolebinding deployer-configmaps -n b \
                 --clusterrole=kommit-configmaps --serviceaccount=a:deployer`"
            ),
            "{text}"
        );
        assert!(
            text.contains("kubectl create clusterrole kommit-configmaps --verb=get,list,watch,create,patch,delete --resource=configmaps"),
            "{text}"
        );
    }

    #[test]
    fn a_cluster_scoped_refusal_suggests_a_clusterrolebinding() {
        let err = classify_status(
            status(
                403,
                "clusterrolebindings.rbac.authorization.k8s.io \"root\" is forbidden: User \
                 \"system:serviceaccount:a:default\" cannot patch resource \
                 \"clusterrolebindings\" in API group \"rbac.authorization.k8s.io\" at the \
                 cluster scope",
                vec![],
            ),
            "ClusterRoleBinding root",
            "apply",
        );
        let text = err.to_string();
        assert!(
            text.contains(
                "ServiceAccount a/default may not patch \
                 clusterrolebindings.rbac.authorization.k8s.io cluster-wide"
            ),
            "{text}"
        );
        assert!(
            text.contains("`kubectl create clusterrolebinding default-clusterrolebindings.rbac.authorization.k8s.io --clusterrole=kommit-clusterrolebindings.rbac.authorization.k8s.io --serviceaccount=a:default`"),
            "{text}"
        );
        assert!(text.contains("`bind`"), "{text}");
    }

    #[test]
    fn a_refused_impersonation_points_at_kommits_own_role() {
        let err = classify_status(
            status(
                403,
                "serviceaccounts \"deployer\" is forbidden: User \"system:serviceaccount:kommit:kommit\" \
                 cannot impersonate resource \"serviceaccounts\" in API group \"\" in the \
                 namespace \"a\"",
                vec![],
            ),
            "ConfigMap a/settings",
            "get",
        );
        let text = err.to_string();
        assert!(
            text.contains("may not impersonate serviceaccounts in namespace a"),
            "{text}"
        );
        assert!(text.contains("tenancy.mode=locked"), "{text}");
    }

    #[test]
    fn a_refusal_in_other_words_keeps_them_and_says_who() {
        let err = classify_status(
            status(403, "namespace b is being terminated", vec![]),
            "ConfigMap b/x",
            "apply",
        );
        let text = err.to_string();
        assert!(text.contains("namespace b is being terminated"), "{text}");
        assert!(text.contains("the identity in your kubeconfig"), "{text}");
    }

    #[test]
    fn booleans_in_string_fields_get_a_hint() {
        let text = explain_rejection(
            "spec.mode: Invalid value: \"boolean\": spec.mode in body must be of type string",
        );
        assert!(text.contains("quote it"), "{text}");
    }

    #[test]
    fn a_rejected_values_dump_is_left_out_of_the_message() {
        let template = format!(
            "{{\"labels\":{{\"job-name\":\"migrate\"}},\"Spec\":{{\"Containers\":[{{\"Name\":\"m\",\"Image\":\"m:v2\",\"Command\":\"{}\"}}]}}}}",
            "x}".repeat(40)
        );
        let message = format!(
            "Job.batch \"migrate\" is invalid: spec.template: Invalid value: {template}: field is immutable"
        );
        assert_eq!(
            without_value_dumps(&message),
            "Job.batch \"migrate\" is invalid: spec.template: field is immutable"
        );
        let go = format!(
            "spec.selector: Invalid value: v1.LabelSelector{{MatchLabels:map[string]string{{\"app\":\"{}\"}}}}: field is immutable",
            "w".repeat(90)
        );
        assert_eq!(
            without_value_dumps(&go),
            "spec.selector: field is immutable"
        );
        let short = "spec.replicas: Invalid value: -1: must be greater than or equal to 0";
        assert_eq!(without_value_dumps(short), short);
    }
}
