//! Waiting for applied objects to become healthy: watches (not polls) Deployments, their
//! ReplicaSets and the Pods of every workload, looks at other workloads and kinds with a status
//! worth judging, judges them with the `rollout` rules, and calls a failure as soon as a failure
//! signal has lasted `fail_after`. Objects that only wait for what many clusters lack (an address,
//! a volume) are shown but do not hold the sync.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
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

/// Kinds judged with their pods' failure signals.
fn has_pods(key: &ObjectKey) -> bool {
    key.is_kind("apps", "Deployment")
        || key.is_kind("apps", "StatefulSet")
        || key.is_kind("apps", "DaemonSet")
        || key.is_kind("apps", "ReplicaSet")
        || key.is_kind("batch", "Job")
        || key.is_kind("", "Pod")
}

/// Watches only where workloads or Pods are to be judged; `None` when there are none.
fn start_watches(cluster: &Cluster, watched: &[Watched]) -> Option<(Stores, Driver)> {
    let namespaces: BTreeSet<&str> = watched
        .iter()
        .filter(|w| has_pods(&w.key))
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

    /// The live pods an object owns directly (StatefulSet, DaemonSet, ReplicaSet, Job).
    fn pods_of(&self, owner: &Value) -> Vec<Value> {
        let Some(uid) = owner.pointer("/metadata/uid").and_then(Value::as_str) else {
            return Vec::new();
        };
        self.pods
            .get(uid)
            .into_iter()
            .flatten()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .map(|pod| to_value(&**pod))
            .collect()
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

/// What a wait remembers between evaluations.
#[derive(Default)]
struct Memory {
    /// Verdicts that hold once reached (a CRD established, a ConfigMap present): not looked at
    /// again.
    settled: HashMap<ObjectKey, Verdict>,
    /// Jobs as last seen: a finished Job may delete itself (`ttlSecondsAfterFinished`).
    jobs: HashMap<ObjectKey, Value>,
}

/// Judges every watched object once. Returns the verdicts and the failure signals seen.
async fn evaluate(
    cluster: &Cluster,
    stores: Option<&Stores>,
    watched: &[Watched],
    memory: &mut Memory,
) -> Result<Vec<(ObjectHealth, Vec<FailureSignal>)>, ClusterError> {
    let mut out = Vec::with_capacity(watched.len());
    let owned = stores.map(Owned::index);
    for item in watched {
        let key = &item.key;
        let (verdict, signals): (Verdict, Vec<FailureSignal>) = if let Some(settled) =
            memory.settled.get(key)
        {
            (settled.clone(), Vec::new())
        } else if let Some(stores) = stores
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
        } else if has_pods(key) {
            let live = cluster.get(&item.resource, key).await?;
            match live {
                Some(live) => {
                    let pods = owned.as_ref().map(|o| o.pods_of(&live)).unwrap_or_default();
                    let judged = match key.kind.as_str() {
                        "StatefulSet" => rollout::statefulset_health(&live, &pods),
                        "DaemonSet" => rollout::daemonset_health(&live, &pods),
                        "ReplicaSet" => rollout::replicaset_health(&live, &pods),
                        "Job" => rollout::job_health(&live, &pods),
                        // Deployments and Pods are judged from the watch caches above.
                        _ => (
                            rollout::generic_health(&key.group, &key.kind, Some(&live)),
                            Vec::new(),
                        ),
                    };
                    if key.is_kind("batch", "Job") {
                        memory.jobs.insert(key.clone(), live);
                    }
                    judged
                }
                None => match memory.jobs.get(key) {
                    Some(last_seen) => {
                        let failed = job_failure_event(cluster, key, last_seen).await;
                        let verdict = rollout::vanished_job_health(last_seen, failed.as_deref());
                        if verdict.health != Health::Missing {
                            memory.settled.insert(key.clone(), verdict.clone());
                        }
                        (verdict, Vec::new())
                    }
                    None => (verdict(Health::Missing, "not in the cluster"), Vec::new()),
                },
            }
        } else if rollout::needs_live_look(&key.group, &key.kind) {
            let live = cluster.get(&item.resource, key).await?;
            let verdict = rollout::generic_health(&key.group, &key.kind, live.as_ref());
            if verdict.health == Health::Healthy && rollout::stays_healthy(&key.group, &key.kind) {
                memory.settled.insert(key.clone(), verdict.clone());
            }
            (verdict, Vec::new())
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

/// Job failure reasons the Job controller records as Warning events.
const JOB_FAILURE_REASONS: [&str; 4] = [
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "PodFailurePolicy",
    "MaxFailedIndexesExceeded",
];

/// The failure a vanished Job's events record, if any: a finished Job's events outlive it.
/// Events that cannot be read count as none (the Job was last seen without a failure).
async fn job_failure_event(
    cluster: &Cluster,
    key: &ObjectKey,
    last_seen: &Value,
) -> Option<String> {
    let uid = last_seen.pointer("/metadata/uid").and_then(Value::as_str)?;
    let api: Api<Event> = Api::namespaced(cluster.client().clone(), key.namespace.as_deref()?);
    let params = ListParams::default().fields(&format!("involvedObject.uid={uid}"));
    let events = api.list(&params).await.ok()?;
    events
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .find(|reason| JOB_FAILURE_REASONS.contains(&reason.as_str()))
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
    let mut memory = Memory::default();
    Ok(evaluate(
        cluster,
        watches.as_ref().map(|(s, _)| s),
        watched,
        &mut memory,
    )
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
    let mut memory = Memory::default();
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
        let judged = evaluate(
            cluster,
            watches.as_ref().map(|(s, _)| s),
            watched,
            &mut memory,
        )
        .await?;
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
            // A healthy object's restarting pod (already ready again) is no failure.
            let signals = if health.health == Health::Healthy {
                &[][..]
            } else {
                &signals[..]
            };
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
        if objects.iter().all(|o| o.health.settled()) {
            return Ok(WaitOutcome::Healthy { objects });
        }
        if started.elapsed() >= options.timeout {
            let stuck = objects
                .iter()
                .find(|o| !o.health.settled())
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
