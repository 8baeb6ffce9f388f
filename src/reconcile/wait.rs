//! Waiting for applied objects to become healthy: watches (not polls) Deployments, their
//! ReplicaSets and Pods, judges them with the `rollout` rules, and calls a failure as soon as a
//! failure signal has lasted `fail_after`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::Serialize;
use serde_json::Value;

use crate::cluster::{Cluster, ClusterError, ResourceType};
use crate::object::ObjectKey;
use crate::rollout::{self, FailureSignal, Health, Verdict};

const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

#[derive(Debug, Clone)]
pub struct WaitOptions {
    /// Give up (and call the rollout failed) after this long.
    pub timeout: Duration,
    /// How long a failure signal (crash loop, pull error) must last to fail the rollout.
    pub fail_after: Duration,
}

impl Default for WaitOptions {
    fn default() -> Self {
        WaitOptions {
            timeout: Duration::from_secs(300),
            fail_after: Duration::from_secs(30),
        }
    }
}

/// Receives the health of the watched objects whenever a verdict changes.
pub trait Progress: Send + Sync {
    fn show(&self, objects: &[ObjectHealth]);
}

impl<F: Fn(&[ObjectHealth]) + Send + Sync> Progress for F {
    fn show(&self, objects: &[ObjectHealth]) {
        self(objects)
    }
}

/// Shows nothing (diffs, the operator: the outcome is told elsewhere).
pub struct Quiet;

impl Progress for Quiet {
    fn show(&self, _: &[ObjectHealth]) {}
}

/// One object to judge.
#[derive(Debug, Clone)]
pub struct Watched {
    pub key: ObjectKey,
    pub resource: ResourceType,
}

/// The health of one object at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectHealth {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub health: Health,
    pub message: String,
    #[serde(skip)]
    pub past_deadline: bool,
    #[serde(skip)]
    pub key: ObjectKey,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum WaitOutcome {
    Healthy {
        objects: Vec<ObjectHealth>,
    },
    Failed {
        object: String,
        reason: String,
        objects: Vec<ObjectHealth>,
    },
}

impl WaitOutcome {
    pub fn is_healthy(&self) -> bool {
        matches!(self, WaitOutcome::Healthy { .. })
    }

    pub fn objects(&self) -> &[ObjectHealth] {
        match self {
            WaitOutcome::Healthy { objects } | WaitOutcome::Failed { objects, .. } => objects,
        }
    }
}

/// Reflector stores of the kinds whose health needs more than a look at the object itself.
struct Stores {
    deployments: Stores1<Deployment>,
    replica_sets: Stores1<ReplicaSet>,
    pods: Stores1<Pod>,
}

/// One kind's stores, one per watched namespace: watching each namespace rather than the whole
/// cluster works for a kommit bound by Roles in those namespaces only.
struct Stores1<K: kube::Resource + 'static>(Vec<Store<K>>)
where
    K::DynamicType: std::hash::Hash + Eq + Clone;

impl<K> Stores1<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    fn get(&self, key: &reflector::ObjectRef<K>) -> Option<Arc<K>> {
        self.0.iter().find_map(|store| store.get(key))
    }

    fn state(&self) -> Vec<Arc<K>> {
        self.0.iter().flat_map(|store| store.state()).collect()
    }

    async fn wait_until_ready(&self) {
        // One after the other: they fill in parallel anyway, and a closure returning a borrowing
        // future would keep the whole sync from being provably `Send` (rust-lang/rust#102211).
        for store in &self.0 {
            let _ = store.wait_until_ready().await;
        }
    }
}

type Driver = std::pin::Pin<Box<dyn Stream<Item = ()> + Send>>;

/// Watches only where Deployments or Pods are to be judged; `None` when there are none.
fn start_watches(cluster: &Cluster, watched: &[Watched]) -> Option<(Stores, Driver)> {
    let namespaces: BTreeSet<&str> = watched
        .iter()
        .filter(|w| w.key.is_kind("apps", "Deployment") || w.key.is_kind("", "Pod"))
        .filter_map(|w| w.key.namespace.as_deref())
        .collect();
    if namespaces.is_empty() {
        return None;
    }
    let client = cluster.client().clone();
    let config = cluster.watcher_config().page_size(100);
    let mut drivers: Vec<Driver> = Vec::new();
    let mut stores = Stores {
        deployments: Stores1(Vec::new()),
        replica_sets: Stores1(Vec::new()),
        pods: Stores1(Vec::new()),
    };
    // Health needs metadata and status; the caches keep little else (a no-op sync of a thousand
    // Deployments would otherwise hold every pod spec and managedFields entry).
    for ns in namespaces {
        let (deployments, deployment_writer) = reflector::store::<Deployment>();
        let (replica_sets, replica_set_writer) = reflector::store::<ReplicaSet>();
        let (pods, pod_writer) = reflector::store::<Pod>();
        let deployment_events = watcher(Api::namespaced(client.clone(), ns), config.clone())
            .default_backoff()
            .modify(|d: &mut Deployment| d.metadata.managed_fields = None)
            .reflect(deployment_writer)
            .map(|_| ());
        let replica_set_events = watcher(Api::namespaced(client.clone(), ns), config.clone())
            .default_backoff()
            .modify(|rs: &mut ReplicaSet| {
                rs.metadata.managed_fields = None;
                rs.spec = None;
            })
            .reflect(replica_set_writer)
            .map(|_| ());
        let pod_events = watcher(Api::namespaced(client.clone(), ns), config.clone())
            .default_backoff()
            .modify(|pod: &mut Pod| {
                pod.metadata.managed_fields = None;
                pod.spec = None;
            })
            .reflect(pod_writer)
            .map(|_| ());
        drivers.push(Box::pin(deployment_events));
        drivers.push(Box::pin(replica_set_events));
        drivers.push(Box::pin(pod_events));
        stores.deployments.0.push(deployments);
        stores.replica_sets.0.push(replica_sets);
        stores.pods.0.push(pods);
    }
    let driver: Driver = Box::pin(futures::stream::select_all(drivers));
    Some((stores, driver))
}

async fn stores_ready(stores: &Stores) {
    let _ = tokio::join!(
        stores.deployments.wait_until_ready(),
        stores.replica_sets.wait_until_ready(),
        stores.pods.wait_until_ready()
    );
}

fn to_value<K: Serialize>(object: &K) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// ReplicaSets and Pods by the uid of their owner, built once per evaluation.
struct Owned {
    replica_sets: HashMap<String, Vec<Arc<ReplicaSet>>>,
    pods: HashMap<String, Vec<Arc<Pod>>>,
}

impl Owned {
    fn index(stores: &Stores) -> Self {
        fn by_owner<K: kube::Resource>(items: Vec<Arc<K>>) -> HashMap<String, Vec<Arc<K>>> {
            let mut map: HashMap<String, Vec<Arc<K>>> = HashMap::new();
            for item in items {
                for owner in item.meta().owner_references.iter().flatten() {
                    map.entry(owner.uid.clone()).or_default().push(item.clone());
                }
            }
            map
        }
        Owned {
            replica_sets: by_owner(stores.replica_sets.state()),
            pods: by_owner(stores.pods.state()),
        }
    }

    /// The pods of a Deployment's newest ReplicaSet (what `kubectl rollout status` watches).
    fn new_pods(&self, deployment: &Deployment) -> Vec<Value> {
        let Some(uid) = deployment.metadata.uid.as_deref() else {
            return Vec::new();
        };
        let revision = deployment
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVISION_ANNOTATION));
        let newest = self.replica_sets.get(uid).and_then(|sets| {
            sets.iter().find(|rs| {
                rs.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REVISION_ANNOTATION))
                    == revision
            })
        });
        let Some(rs_uid) = newest.and_then(|rs| rs.metadata.uid.as_deref()) else {
            return Vec::new();
        };
        self.pods
            .get(rs_uid)
            .into_iter()
            .flatten()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .map(|pod| to_value(&**pod))
            .collect()
    }
}

fn object_ref<K: kube::Resource<DynamicType = ()>>(key: &ObjectKey) -> ObjectRef<K> {
    let r = ObjectRef::new(&key.name);
    match &key.namespace {
        Some(ns) => r.within(ns),
        None => r,
    }
}

/// Judges every watched object once. Returns the verdicts and the failure signals seen.
async fn evaluate(
    cluster: &Cluster,
    stores: Option<&Stores>,
    watched: &[Watched],
) -> Result<Vec<(ObjectHealth, Vec<FailureSignal>)>, ClusterError> {
    let mut out = Vec::with_capacity(watched.len());
    let owned = stores.map(Owned::index);
    for item in watched {
        let key = &item.key;
        let (verdict, signals): (Verdict, Vec<FailureSignal>) = if let Some(stores) = stores
            && key.is_kind("apps", "Deployment")
        {
            match stores.deployments.get(&object_ref(key)) {
                Some(d) => {
                    let pods = owned.as_ref().map(|o| o.new_pods(&d)).unwrap_or_default();
                    rollout::deployment_health(&to_value(&*d), &pods)
                }
                None => (verdict(Health::Missing, "not in the cluster"), Vec::new()),
            }
        } else if let Some(stores) = stores
            && key.is_kind("", "Pod")
        {
            match stores.pods.get(&object_ref(key)) {
                Some(pod) => {
                    let value = to_value(&*pod);
                    (rollout::pod_health(&value), rollout::pod_failures(&value))
                }
                None => (verdict(Health::Missing, "not in the cluster"), Vec::new()),
            }
        } else if rollout::has_rollout(&key.group, &key.kind) {
            let live = cluster.get(&item.resource, key).await?;
            (
                rollout::generic_health(&key.group, &key.kind, live.as_ref()),
                Vec::new(),
            )
        } else {
            (verdict(Health::Healthy, "applied"), Vec::new())
        };
        out.push((
            ObjectHealth {
                kind: key.kind.clone(),
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                health: verdict.health,
                message: verdict.message,
                past_deadline: verdict.past_deadline,
                key: key.clone(),
            },
            signals,
        ));
    }
    Ok(out)
}

fn verdict(health: Health, message: &str) -> Verdict {
    Verdict::new(health, message)
}

/// The health of the objects right now, without waiting.
pub async fn health_now(
    cluster: &Cluster,
    watched: &[Watched],
) -> Result<Vec<ObjectHealth>, ClusterError> {
    let mut watches = start_watches(cluster, watched);
    if let Some((stores, driver)) = &mut watches {
        let ready = stores_ready(stores);
        tokio::pin!(ready);
        loop {
            tokio::select! {
                () = &mut ready => break,
                _ = driver.next() => {}
            }
        }
    }
    Ok(evaluate(cluster, watches.as_ref().map(|(s, _)| s), watched)
        .await?
        .into_iter()
        .map(|(health, _)| health)
        .collect())
}

/// Waits until every object is healthy, one fails, or the timeout passes. `progress` is called
/// whenever a verdict changes.
pub async fn wait_healthy(
    cluster: &Cluster,
    watched: &[Watched],
    options: &WaitOptions,
    progress: &dyn Progress,
) -> Result<WaitOutcome, ClusterError> {
    let started = Instant::now();
    if watched.is_empty() {
        return Ok(WaitOutcome::Healthy {
            objects: Vec::new(),
        });
    }
    let mut watches = start_watches(cluster, watched);
    let mut first_seen: HashMap<(ObjectKey, String, String, String), Instant> = HashMap::new();
    let mut last_reported: Vec<ObjectHealth> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if let Some((stores, driver)) = &mut watches {
        let ready = stores_ready(stores);
        tokio::pin!(ready);
        loop {
            tokio::select! {
                () = &mut ready => break,
                _ = driver.next() => {}
            }
        }
    }
    loop {
        match &mut watches {
            Some((_, driver)) => {
                tokio::select! {
                    _ = driver.next() => continue,
                    _ = tick.tick() => {}
                }
            }
            None => {
                tick.tick().await;
            }
        }
        let judged = evaluate(cluster, watches.as_ref().map(|(s, _)| s), watched).await?;
        let now = Instant::now();
        let objects: Vec<ObjectHealth> = judged.iter().map(|(h, _)| h.clone()).collect();
        if objects != last_reported {
            progress.show(&objects);
            last_reported = objects.clone();
        }
        // Failures that will not heal by waiting.
        let mut seen_now = Vec::new();
        for (health, signals) in &judged {
            if health.health == Health::Degraded && signals.is_empty() {
                return Ok(WaitOutcome::Failed {
                    object: health.key.to_string(),
                    reason: health.message.clone(),
                    objects,
                });
            }
            for signal in signals {
                let id = (
                    health.key.clone(),
                    signal.pod.clone(),
                    signal.container.clone(),
                    signal.reason.clone(),
                );
                let since = *first_seen.entry(id.clone()).or_insert(now);
                seen_now.push(id);
                if now.duration_since(since) >= options.fail_after || health.past_deadline {
                    return Ok(WaitOutcome::Failed {
                        object: health.key.to_string(),
                        reason: signal.to_string(),
                        objects,
                    });
                }
            }
        }
        first_seen.retain(|id, _| seen_now.contains(id));
        if objects.iter().all(|o| o.health == Health::Healthy) {
            return Ok(WaitOutcome::Healthy { objects });
        }
        if started.elapsed() >= options.timeout {
            let stuck = objects
                .iter()
                .find(|o| o.health != Health::Healthy)
                .cloned()
                .expect("not all healthy");
            return Ok(WaitOutcome::Failed {
                object: stuck.key.to_string(),
                reason: format!(
                    "not healthy after {}s: {}",
                    options.timeout.as_secs(),
                    stuck.message
                ),
                objects,
            });
        }
    }
}
