//! Health of applied objects, judged the way `kubectl rollout status` does, plus the failure
//! signals that say a rollout will not succeed before its progress deadline. Pure: values in,
//! verdicts out; the waiting loop lives in `reconcile`.

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub enum Health {
    Healthy,
    /// Waiting for something many clusters do not have (a load-balancer address, a volume
    /// provisioner): shown, but it neither blocks nor fails a sync.
    Waiting,
    Progressing,
    Degraded,
    Missing,
    Unknown,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "Healthy",
            Health::Waiting => "Waiting",
            Health::Progressing => "Progressing",
            Health::Degraded => "Degraded",
            Health::Missing => "Missing",
            Health::Unknown => "Unknown",
        }
    }
}

impl Health {
    /// Whether a sync may finish with an object in this state.
    pub fn settled(self) -> bool {
        matches!(self, Health::Healthy | Health::Waiting)
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verdict with the words a person needs (`2/3 updated, 1 old pending`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub health: Health,
    pub message: String,
    /// The controller gave up (`ProgressDeadlineExceeded`): waiting longer cannot help.
    #[serde(skip)]
    pub past_deadline: bool,
}

impl Verdict {
    pub fn new(health: Health, message: impl Into<String>) -> Self {
        Verdict {
            health,
            message: message.into(),
            past_deadline: false,
        }
    }
}

/// A pod in a state that will not heal by waiting: the first sign a rollout has failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureSignal {
    pub pod: String,
    pub container: String,
    /// CrashLoopBackOff, ImagePullBackOff, ErrImagePull, …
    pub reason: String,
    pub restarts: i64,
}

impl std::fmt::Display for FailureSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod {} container {} is in {}",
            self.pod, self.container, self.reason
        )?;
        if self.restarts > 0 {
            write!(f, " ({} restarts)", self.restarts)?;
        }
        Ok(())
    }
}

/// Waiting reasons that do not resolve by themselves.
const FAILING_REASONS: [&str; 7] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Restarts after which a container counts as failing even between crash-loop back-offs.
const RESTART_LIMIT: i64 = 3;

fn int(value: &Value, pointer: &str) -> Option<i64> {
    value.pointer(pointer).and_then(Value::as_i64)
}

fn text<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

fn name(value: &Value) -> &str {
    text(value, "/metadata/name").unwrap_or("?")
}

fn condition<'a>(value: &'a Value, kind: &str) -> Option<&'a Value> {
    value
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

/// Failure signals of one pod's containers (and init containers).
pub fn pod_failures(pod: &Value) -> Vec<FailureSignal> {
    let mut signals = Vec::new();
    for field in ["/status/initContainerStatuses", "/status/containerStatuses"] {
        let Some(statuses) = pod.pointer(field).and_then(Value::as_array) else {
            continue;
        };
        for status in statuses {
            let restarts = int(status, "/restartCount").unwrap_or(0);
            let waiting = text(status, "/state/waiting/reason");
            let failing_reason = waiting.filter(|r| FAILING_REASONS.contains(r));
            let restarting =
                restarts >= RESTART_LIMIT && status.get("ready") != Some(&Value::Bool(true));
            if failing_reason.is_some() || restarting {
                signals.push(FailureSignal {
                    pod: name(pod).to_string(),
                    container: text(status, "/name").unwrap_or("?").to_string(),
                    reason: failing_reason.unwrap_or("restarting").to_string(),
                    restarts,
                });
            }
        }
    }
    signals
}

/// Health of a bare Pod.
pub fn pod_health(pod: &Value) -> Verdict {
    if let Some(signal) = pod_failures(pod).into_iter().next() {
        return Verdict::new(Health::Degraded, signal.to_string());
    }
    match text(pod, "/status/phase") {
        Some("Succeeded") => Verdict::new(Health::Healthy, "completed"),
        Some("Failed") => Verdict::new(
            Health::Degraded,
            text(pod, "/status/reason").map_or("failed".to_string(), |r| format!("failed: {r}")),
        ),
        _ if condition(pod, "Ready")
            .and_then(|c| c.get("status"))
            .and_then(Value::as_str)
            == Some("True") =>
        {
            Verdict::new(Health::Healthy, "ready")
        }
        Some(phase) => Verdict::new(
            Health::Progressing,
            format!("{} (not ready yet)", phase.to_lowercase()),
        ),
        None => Verdict::new(Health::Progressing, "not scheduled yet"),
    }
}

/// Health of a Deployment by the rule `kubectl rollout status` uses. `new_pods` are the pods of
/// its newest ReplicaSet; their failure signals make the verdict Degraded at once (the caller
/// decides how long a signal must last).
pub fn deployment_health(deployment: &Value, new_pods: &[Value]) -> (Verdict, Vec<FailureSignal>) {
    let signals: Vec<FailureSignal> = new_pods.iter().flat_map(pod_failures).collect();
    let generation = int(deployment, "/metadata/generation").unwrap_or(0);
    let observed = int(deployment, "/status/observedGeneration").unwrap_or(0);
    if observed < generation {
        return (
            Verdict::new(
                Health::Progressing,
                "waiting for the controller to see the new spec",
            ),
            signals,
        );
    }
    if let Some(progressing) = condition(deployment, "Progressing")
        && progressing.get("reason").and_then(Value::as_str) == Some("ProgressDeadlineExceeded")
    {
        let mut message = "exceeded its progress deadline".to_string();
        if let Some(signal) = signals.first() {
            message.push_str(&format!(": {signal}"));
        }
        let verdict = Verdict {
            past_deadline: true,
            ..Verdict::new(Health::Degraded, message)
        };
        return (verdict, signals);
    }
    // Pods the ReplicaSet may not create (quota, admission) will not come by waiting.
    if let Some(failure) = condition(deployment, "ReplicaFailure")
        && failure.get("status").and_then(Value::as_str) == Some("True")
    {
        let reason = failure
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("ReplicaFailure");
        let message = failure.get("message").and_then(Value::as_str).unwrap_or("");
        return (
            Verdict::new(
                Health::Degraded,
                format!("cannot create pods ({reason}): {message}"),
            ),
            signals,
        );
    }
    let desired = int(deployment, "/spec/replicas").unwrap_or(1);
    let updated = int(deployment, "/status/updatedReplicas").unwrap_or(0);
    let total = int(deployment, "/status/replicas").unwrap_or(0);
    let available = int(deployment, "/status/availableReplicas").unwrap_or(0);
    let old = (total - updated).max(0);
    let progress = format!(
        "{updated}/{desired} updated, {}/{desired} available{}",
        available.min(updated),
        if old > 0 {
            format!(", {old} old pending")
        } else {
            String::new()
        }
    );
    if let Some(signal) = signals.first() {
        return (
            Verdict::new(Health::Degraded, format!("{progress}; {signal}")),
            signals,
        );
    }
    let healthy = updated >= desired && old == 0 && available >= updated;
    if healthy {
        (
            Verdict::new(Health::Healthy, format!("{desired}/{desired} ready")),
            signals,
        )
    } else {
        (Verdict::new(Health::Progressing, progress), signals)
    }
}

/// Whether a condition of this type has this status.
fn condition_is(value: &Value, kind: &str, status: &str) -> bool {
    condition(value, kind)
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some(status)
}

fn condition_words(value: &Value, kind: &str) -> String {
    let Some(c) = condition(value, kind) else {
        return format!("no {kind} condition yet");
    };
    let reason = c.get("reason").and_then(Value::as_str).unwrap_or("");
    let message = c.get("message").and_then(Value::as_str).unwrap_or("");
    match (reason.is_empty(), message.is_empty()) {
        (false, false) => format!("{kind} is not True ({reason}): {message}"),
        (false, true) => format!("{kind} is not True ({reason})"),
        (true, false) => format!("{kind} is not True: {message}"),
        (true, true) => format!("{kind} is not True"),
    }
}

fn label<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.pointer("/metadata/labels")?.get(key)?.as_str()
}

fn annotation<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.pointer("/metadata/annotations")?.get(key)?.as_str()
}

fn not_observed(value: &Value) -> bool {
    let generation = int(value, "/metadata/generation").unwrap_or(0);
    let observed = int(value, "/status/observedGeneration").unwrap_or(0);
    observed == 0 || observed < generation
}

/// A verdict that turns Degraded when pods show failure signals (the caller decides how long a
/// signal must last before the rollout fails).
fn with_signals(verdict: Verdict, signals: Vec<FailureSignal>) -> (Verdict, Vec<FailureSignal>) {
    match signals.first() {
        Some(signal) if verdict.health != Health::Healthy => {
            let message = format!("{}; {signal}", verdict.message);
            (Verdict::new(Health::Degraded, message), signals)
        }
        _ => (verdict, signals),
    }
}

fn waiting_for_controller() -> Verdict {
    Verdict::new(
        Health::Progressing,
        "waiting for the controller to see the new spec",
    )
}

/// Health of a StatefulSet by `kubectl rollout status`: observed generation, ready replicas,
/// partition, then the current revision. `pods` are its pods; those of the update revision
/// give the failure signals.
pub fn statefulset_health(sts: &Value, pods: &[Value]) -> (Verdict, Vec<FailureSignal>) {
    let update_revision = text(sts, "/status/updateRevision");
    let signals: Vec<FailureSignal> = pods
        .iter()
        .filter(|pod| {
            update_revision.is_none() || label(pod, "controller-revision-hash") == update_revision
        })
        .flat_map(pod_failures)
        .collect();
    if text(sts, "/spec/updateStrategy/type").is_some_and(|t| t != "RollingUpdate") {
        return (
            Verdict::new(
                Health::Healthy,
                "OnDelete: pods take the new spec when they are deleted",
            ),
            signals,
        );
    }
    if not_observed(sts) {
        return with_signals(waiting_for_controller(), signals);
    }
    let desired = int(sts, "/spec/replicas").unwrap_or(1);
    let ready = int(sts, "/status/readyReplicas").unwrap_or(0);
    let updated = int(sts, "/status/updatedReplicas").unwrap_or(0);
    if ready < desired {
        let verdict = Verdict::new(
            Health::Progressing,
            format!("{ready}/{desired} ready, {updated}/{desired} updated"),
        );
        return with_signals(verdict, signals);
    }
    let partition = int(sts, "/spec/updateStrategy/rollingUpdate/partition").unwrap_or(0);
    if partition > 0 {
        let want = (desired - partition).max(0);
        if updated < want {
            let verdict = Verdict::new(
                Health::Progressing,
                format!("partitioned rollout: {updated}/{want} new pods updated"),
            );
            return with_signals(verdict, signals);
        }
        return (
            Verdict::new(
                Health::Healthy,
                format!("{desired}/{desired} ready, partitioned rollout complete ({want} updated)"),
            ),
            signals,
        );
    }
    let current_revision = text(sts, "/status/currentRevision");
    if update_revision.is_some() && update_revision != current_revision {
        let verdict = Verdict::new(
            Health::Progressing,
            format!(
                "{updated}/{desired} pods at revision {}",
                update_revision.unwrap_or("?")
            ),
        );
        return with_signals(verdict, signals);
    }
    (
        Verdict::new(Health::Healthy, format!("{desired}/{desired} ready")),
        signals,
    )
}

/// The annotation the API server keeps on DaemonSets and copies to pods as a label: it tells
/// the current pods from the old ones.
const DAEMONSET_GENERATION: &str = "deprecated.daemonset.template.generation";

/// Health of a DaemonSet by `kubectl rollout status`: observed generation, pods updated on every
/// node, and available. `pods` are its pods; those of the current template give the signals.
pub fn daemonset_health(ds: &Value, pods: &[Value]) -> (Verdict, Vec<FailureSignal>) {
    let generation = annotation(ds, DAEMONSET_GENERATION);
    let signals: Vec<FailureSignal> = pods
        .iter()
        .filter(|pod| generation.is_none() || label(pod, "pod-template-generation") == generation)
        .flat_map(pod_failures)
        .collect();
    if text(ds, "/spec/updateStrategy/type").is_some_and(|t| t != "RollingUpdate") {
        return (
            Verdict::new(
                Health::Healthy,
                "OnDelete: pods take the new spec when they are deleted",
            ),
            signals,
        );
    }
    if not_observed(ds) {
        return with_signals(waiting_for_controller(), signals);
    }
    let desired = int(ds, "/status/desiredNumberScheduled").unwrap_or(0);
    let updated = int(ds, "/status/updatedNumberScheduled").unwrap_or(0);
    let available = int(ds, "/status/numberAvailable").unwrap_or(0);
    if updated < desired || available < desired {
        let verdict = Verdict::new(
            Health::Progressing,
            format!("{updated}/{desired} updated, {available}/{desired} available"),
        );
        return with_signals(verdict, signals);
    }
    (
        Verdict::new(Health::Healthy, format!("{desired}/{desired} ready")),
        signals,
    )
}

/// Health of a ReplicaSet: observed, pods creatable, every replica ready.
pub fn replicaset_health(rs: &Value, pods: &[Value]) -> (Verdict, Vec<FailureSignal>) {
    let signals: Vec<FailureSignal> = pods.iter().flat_map(pod_failures).collect();
    if not_observed(rs) {
        return with_signals(waiting_for_controller(), signals);
    }
    if condition_is(rs, "ReplicaFailure", "True") {
        return (
            Verdict::new(
                Health::Degraded,
                format!(
                    "cannot create pods: {}",
                    condition_words(rs, "ReplicaFailure")
                ),
            ),
            Vec::new(),
        );
    }
    let desired = int(rs, "/spec/replicas").unwrap_or(1);
    let ready = int(rs, "/status/readyReplicas").unwrap_or(0);
    let verdict = if ready >= desired {
        Verdict::new(Health::Healthy, format!("{desired}/{desired} ready"))
    } else {
        Verdict::new(Health::Progressing, format!("{ready}/{desired} ready"))
    };
    with_signals(verdict, signals)
}

/// Health of a Job: complete, failed, or running (its pods' failure signals count).
pub fn job_health(job: &Value, pods: &[Value]) -> (Verdict, Vec<FailureSignal>) {
    if condition_is(job, "Failed", "True") {
        let reason = condition(job, "Failed")
            .and_then(|c| c.get("reason"))
            .and_then(Value::as_str)
            .map_or(String::new(), |r| format!(" ({r})"));
        return (
            Verdict::new(Health::Degraded, format!("the job failed{reason}")),
            Vec::new(),
        );
    }
    if condition_is(job, "Complete", "True") {
        return (Verdict::new(Health::Healthy, "complete"), Vec::new());
    }
    if job.pointer("/spec/suspend") == Some(&Value::Bool(true)) {
        return (Verdict::new(Health::Healthy, "suspended"), Vec::new());
    }
    let succeeded = int(job, "/status/succeeded").unwrap_or(0);
    let completions = int(job, "/spec/completions").unwrap_or(1);
    let active = int(job, "/status/active").unwrap_or(0);
    let signals: Vec<FailureSignal> = pods.iter().flat_map(pod_failures).collect();
    with_signals(
        Verdict::new(
            Health::Progressing,
            format!("running: {succeeded}/{completions} succeeded, {active} active"),
        ),
        signals,
    )
}

/// A Job that is gone after it was seen: `ttlSecondsAfterFinished` deletes a finished Job (0:
/// at once). `last_seen` is the Job as last seen; `failed_event` whether the cluster recorded a
/// failure for it. Without a TTL the Job was deleted by someone, which is Missing.
pub fn vanished_job_health(last_seen: &Value, failed_event: Option<&str>) -> Verdict {
    let (verdict, _) = job_health(last_seen, &[]);
    if verdict.health == Health::Degraded {
        return verdict;
    }
    if last_seen.pointer("/spec/ttlSecondsAfterFinished").is_none() {
        return Verdict::new(Health::Missing, "not in the cluster (deleted while it ran)");
    }
    match failed_event {
        Some(reason) => Verdict::new(
            Health::Degraded,
            format!("the job failed ({reason}) and its ttlSecondsAfterFinished deleted it"),
        ),
        None => Verdict::new(
            Health::Healthy,
            "complete (deleted by its ttlSecondsAfterFinished)",
        ),
    }
}

/// Groups Kubernetes itself serves; any other group is a custom resource, judged by its Ready
/// condition when it has one.
const BUILT_IN_GROUPS: [&str; 22] = [
    "",
    "apps",
    "batch",
    "autoscaling",
    "policy",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
    "storage.k8s.io",
    "scheduling.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "apiregistration.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "node.k8s.io",
    "certificates.k8s.io",
    "flowcontrol.apiserver.k8s.io",
    "resource.k8s.io",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "storagemigration.k8s.io",
];

fn is_custom(group: &str) -> bool {
    !BUILT_IN_GROUPS.contains(&group)
}

/// Health of any other kind: present is healthy, except for kinds with a clear rule.
pub fn generic_health(group: &str, kind: &str, live: Option<&Value>) -> Verdict {
    let Some(live) = live else {
        return Verdict::new(Health::Missing, "not in the cluster");
    };
    match (group, kind) {
        ("apps", "StatefulSet") => statefulset_health(live, &[]).0,
        ("apps", "DaemonSet") => daemonset_health(live, &[]).0,
        ("apps", "ReplicaSet") => replicaset_health(live, &[]).0,
        ("apps", "Deployment") => deployment_health(live, &[]).0,
        ("", "Pod") => pod_health(live),
        ("batch", "Job") => job_health(live, &[]).0,
        ("batch", "CronJob") => cronjob_health(live),
        ("", "PersistentVolumeClaim") => match text(live, "/status/phase") {
            Some("Bound") => Verdict::new(Health::Healthy, "bound"),
            Some("Lost") => Verdict::new(Health::Degraded, "lost its volume"),
            phase => Verdict::new(
                Health::Waiting,
                format!(
                    "{}: waiting for a volume (does not block the sync)",
                    phase.unwrap_or("Pending").to_lowercase()
                ),
            ),
        },
        ("", "Service") => {
            if text(live, "/spec/type") == Some("LoadBalancer") && !has_address(live) {
                Verdict::new(
                    Health::Waiting,
                    "waiting for a load-balancer address (does not block the sync)",
                )
            } else {
                Verdict::new(Health::Healthy, "present")
            }
        }
        ("networking.k8s.io", "Ingress") => {
            if has_address(live) {
                Verdict::new(Health::Healthy, "has an address")
            } else {
                Verdict::new(
                    Health::Waiting,
                    "waiting for an address from an ingress controller (does not block the sync)",
                )
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if condition_is(live, "Established", "True") {
                Verdict::new(Health::Healthy, "established")
            } else if condition_is(live, "NamesAccepted", "False") {
                Verdict::new(Health::Degraded, condition_words(live, "NamesAccepted"))
            } else {
                Verdict::new(Health::Progressing, condition_words(live, "Established"))
            }
        }
        ("apiregistration.k8s.io", "APIService") => {
            if condition_is(live, "Available", "True") {
                Verdict::new(Health::Healthy, "available")
            } else {
                Verdict::new(Health::Progressing, condition_words(live, "Available"))
            }
        }
        _ if is_custom(group) => custom_health(live),
        _ => Verdict::new(Health::Healthy, "present"),
    }
}

fn has_address(live: &Value) -> bool {
    live.pointer("/status/loadBalancer/ingress")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

/// A CronJob is healthy once its controller has it: its Jobs are judged when they run.
fn cronjob_health(live: &Value) -> Verdict {
    if live.pointer("/spec/suspend") == Some(&Value::Bool(true)) {
        return Verdict::new(Health::Healthy, "suspended");
    }
    let schedule = text(live, "/spec/schedule").unwrap_or("?");
    match text(live, "/status/lastScheduleTime") {
        Some(last) => Verdict::new(
            Health::Healthy,
            format!("schedule {schedule}, last run {last}"),
        ),
        None => Verdict::new(Health::Healthy, format!("schedule {schedule}, not run yet")),
    }
}

/// A custom resource: by its Ready condition (Stalled=True fails), or present if it has none.
fn custom_health(live: &Value) -> Verdict {
    if condition_is(live, "Stalled", "True") {
        let c = condition(live, "Stalled");
        let field = |name: &str| c.and_then(|c| c.get(name)).and_then(Value::as_str);
        let why = field("message")
            .or(field("reason"))
            .unwrap_or("no reason given");
        return Verdict::new(Health::Degraded, format!("stalled: {why}"));
    }
    match condition(live, "Ready") {
        None => Verdict::new(Health::Healthy, "present"),
        Some(_) if condition_is(live, "Ready", "True") => Verdict::new(Health::Healthy, "ready"),
        Some(_) => {
            if not_observed(live) && int(live, "/status/observedGeneration").is_some() {
                return waiting_for_controller();
            }
            Verdict::new(Health::Progressing, condition_words(live, "Ready"))
        }
    }
}

/// Whether kommit judges the health of this kind by more than its presence (an unchanged object
/// of such a kind is still waited for).
pub fn has_rollout(group: &str, kind: &str) -> bool {
    matches!(
        (group, kind),
        (
            "apps",
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet"
        ) | ("", "Pod" | "PersistentVolumeClaim")
            | ("batch", "Job")
    )
}

/// Whether judging this kind needs a look at the live object (otherwise applied is healthy).
pub fn needs_live_look(group: &str, kind: &str) -> bool {
    has_rollout(group, kind)
        || is_custom(group)
        || matches!(
            (group, kind),
            ("", "Service")
                | ("batch", "CronJob")
                | ("networking.k8s.io", "Ingress")
                | ("apiextensions.k8s.io", "CustomResourceDefinition")
                | ("apiregistration.k8s.io", "APIService")
        )
}

/// Kinds whose verdict, once Healthy, holds for the rest of a wait: no need to look again.
pub fn stays_healthy(group: &str, kind: &str) -> bool {
    !has_rollout(group, kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(
        generation: i64,
        observed: i64,
        desired: i64,
        updated: i64,
        total: i64,
        available: i64,
    ) -> Value {
        json!({
            "metadata": {"name": "web", "generation": generation},
            "spec": {"replicas": desired},
            "status": {"observedGeneration": observed, "updatedReplicas": updated,
                       "replicas": total, "availableReplicas": available}
        })
    }

    fn pod(name: &str, waiting: Option<&str>, restarts: i64, ready: bool) -> Value {
        let mut status = json!({"name": "app", "restartCount": restarts, "ready": ready, "state": {"running": {}}});
        if let Some(reason) = waiting {
            status["state"] = json!({"waiting": {"reason": reason}});
        }
        json!({"metadata": {"name": name}, "status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}],
            "containerStatuses": [status]}})
    }

    #[test]
    fn deployments_follow_the_rollout_status_rule() {
        let (v, _) = deployment_health(&deployment(2, 1, 3, 3, 3, 3), &[]);
        assert_eq!(v.health, Health::Progressing);
        let (v, _) = deployment_health(&deployment(2, 2, 3, 2, 4, 3), &[]);
        assert_eq!(
            v,
            Verdict::new(
                Health::Progressing,
                "2/3 updated, 2/3 available, 2 old pending"
            )
        );
        let (v, _) = deployment_health(&deployment(2, 2, 3, 3, 4, 3), &[]);
        assert_eq!(
            v.health,
            Health::Progressing,
            "an old replica is still terminating"
        );
        let (v, _) = deployment_health(&deployment(2, 2, 3, 3, 3, 2), &[]);
        assert_eq!(
            v.health,
            Health::Progressing,
            "not all updated replicas are available"
        );
        let (v, _) = deployment_health(&deployment(2, 2, 3, 3, 3, 3), &[]);
        assert_eq!(v, Verdict::new(Health::Healthy, "3/3 ready"));
    }

    #[test]
    fn a_missed_progress_deadline_is_degraded() {
        let mut d = deployment(2, 2, 3, 1, 4, 3);
        d["status"]["conditions"] = json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]);
        let (v, _) = deployment_health(&d, &[pod("web-new", Some("CrashLoopBackOff"), 4, false)]);
        assert_eq!(v.health, Health::Degraded);
        assert!(v.past_deadline, "waiting longer cannot help");
        assert!(
            v.message.contains("progress deadline") && v.message.contains("web-new"),
            "{}",
            v.message
        );
    }

    #[test]
    fn pods_refused_by_quota_or_admission_fail_at_once() {
        let mut d = deployment(2, 2, 3, 0, 3, 3);
        d["status"]["conditions"] = json!([{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
            "message": "pods \"web-1\" is forbidden: exceeded quota: compute"}]);
        let (v, signals) = deployment_health(&d, &[]);
        assert_eq!(v.health, Health::Degraded);
        assert!(
            signals.is_empty(),
            "no pod signal: the verdict alone fails the rollout"
        );
        assert!(
            v.message.contains("FailedCreate") && v.message.contains("exceeded quota"),
            "{}",
            v.message
        );
    }

    #[test]
    fn crash_loops_and_pull_errors_of_new_pods_are_failure_signals() {
        let (v, signals) = deployment_health(
            &deployment(2, 2, 3, 1, 4, 3),
            &[pod("web-new", Some("ImagePullBackOff"), 0, false)],
        );
        assert_eq!(v.health, Health::Degraded);
        assert_eq!(signals[0].reason, "ImagePullBackOff");
        assert!(pod_failures(&pod("p", None, 5, false))[0].reason == "restarting");
        assert!(
            pod_failures(&pod("p", None, 5, true)).is_empty(),
            "a ready pod that once restarted is fine"
        );
        assert!(pod_failures(&pod("p", Some("ContainerCreating"), 0, false)).is_empty());
    }

    #[test]
    fn bare_pods_are_ready_or_degraded() {
        assert_eq!(pod_health(&pod("p", None, 0, true)).health, Health::Healthy);
        let crashing = pod_health(&pod("p", Some("CrashLoopBackOff"), 2, false));
        assert_eq!(crashing.health, Health::Degraded);
        assert_eq!(
            crashing.message,
            "pod p container app is in CrashLoopBackOff (2 restarts)"
        );
        assert_eq!(
            pod_health(&json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}})).health,
            Health::Progressing
        );
        assert_eq!(
            pod_health(&json!({"metadata": {"name": "p"}, "status": {"phase": "Succeeded"}}))
                .health,
            Health::Healthy
        );
    }

    #[test]
    fn other_kinds_are_healthy_when_present() {
        assert_eq!(
            generic_health("", "ConfigMap", Some(&json!({}))).health,
            Health::Healthy
        );
        assert_eq!(
            generic_health("", "ConfigMap", None).health,
            Health::Missing
        );
        let job = json!({"status": {"conditions": [{"type": "Failed", "status": "True"}]}});
        assert_eq!(
            generic_health("batch", "Job", Some(&job)).health,
            Health::Degraded
        );
    }

    // Status shapes below are as the API server returns them (trimmed to the fields judged).

    fn sts(generation: i64, status: Value, strategy: Value) -> Value {
        json!({"metadata": {"name": "db", "generation": generation, "uid": "s1"},
               "spec": {"replicas": 3, "updateStrategy": strategy}, "status": status})
    }

    fn sts_pod(name: &str, revision: &str, waiting: Option<&str>) -> Value {
        let mut p = pod(name, waiting, 0, waiting.is_none());
        p["metadata"]["labels"] = json!({"controller-revision-hash": revision});
        p
    }

    #[test]
    fn statefulsets_follow_the_rollout_status_rule() {
        let rolling = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}});
        // Three ready, but one pod still at the old revision: kubectl keeps waiting.
        let rolling_out = sts(
            2,
            json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 3, "currentReplicas": 2,
                   "updatedReplicas": 1, "currentRevision": "db-6b8f", "updateRevision": "db-7c9d",
                   "availableReplicas": 3, "collisionCount": 0}),
            rolling.clone(),
        );
        let (v, _) = statefulset_health(&rolling_out, &[]);
        assert_eq!(v.health, Health::Progressing, "{v:?}");
        assert_eq!(v.message, "1/3 pods at revision db-7c9d");
        let done = sts(
            2,
            json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 3, "currentReplicas": 3,
                   "updatedReplicas": 3, "currentRevision": "db-7c9d", "updateRevision": "db-7c9d",
                   "availableReplicas": 3}),
            rolling.clone(),
        );
        assert_eq!(
            statefulset_health(&done, &[]).0,
            Verdict::new(Health::Healthy, "3/3 ready")
        );
        let unobserved = sts(3, done["status"].clone(), rolling.clone());
        assert_eq!(
            statefulset_health(&unobserved, &[]).0.health,
            Health::Progressing
        );
        // A partition of 2 rolls out one pod; then it is done.
        let partitioned = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 2}});
        let mut status = rolling_out["status"].clone();
        status["updatedReplicas"] = json!(0);
        assert_eq!(
            statefulset_health(&sts(2, status.clone(), partitioned.clone()), &[])
                .0
                .health,
            Health::Progressing
        );
        status["updatedReplicas"] = json!(1);
        assert_eq!(
            statefulset_health(&sts(2, status, partitioned), &[])
                .0
                .health,
            Health::Healthy
        );
        // OnDelete: kubectl has no rollout to follow.
        let on_delete = sts(
            2,
            rolling_out["status"].clone(),
            json!({"type": "OnDelete"}),
        );
        assert_eq!(
            statefulset_health(&on_delete, &[]).0.health,
            Health::Healthy
        );
    }

    #[test]
    fn crash_loops_of_a_statefulsets_new_pods_are_failure_signals() {
        let mut status = json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 2,
            "updatedReplicas": 1, "currentRevision": "db-6b8f", "updateRevision": "db-7c9d"});
        let set = sts(2, status.clone(), json!({"type": "RollingUpdate"}));
        let pods = [
            sts_pod("db-0", "db-6b8f", Some("CrashLoopBackOff")),
            sts_pod("db-2", "db-7c9d", Some("CrashLoopBackOff")),
        ];
        let (v, signals) = statefulset_health(&set, &pods);
        assert_eq!(v.health, Health::Degraded);
        assert_eq!(
            signals.len(),
            1,
            "only the new revision's pod counts: {signals:?}"
        );
        assert_eq!(signals[0].pod, "db-2");
        status["readyReplicas"] = json!(3);
        status["updatedReplicas"] = json!(3);
        status["currentRevision"] = json!("db-7c9d");
        let (v, _) = statefulset_health(&sts(2, status, json!({"type": "RollingUpdate"})), &[]);
        assert_eq!(v.health, Health::Healthy);
    }

    fn ds(status: Value) -> Value {
        json!({"metadata": {"name": "speaker", "generation": 4, "uid": "d1",
                            "annotations": {"deprecated.daemonset.template.generation": "4"}},
               "spec": {"updateStrategy": {"type": "RollingUpdate",
                        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}},
               "status": status})
    }

    #[test]
    fn a_daemonset_all_ready_but_not_updated_is_still_rolling_out() {
        // The speaker DaemonSet of the issue: "3/3 ready" with 1 of 3 updated.
        let rolling = ds(json!({"currentNumberScheduled": 3, "numberMisscheduled": 0,
            "desiredNumberScheduled": 3, "numberReady": 3, "observedGeneration": 4,
            "updatedNumberScheduled": 1, "numberAvailable": 3}));
        let (v, _) = daemonset_health(&rolling, &[]);
        assert_eq!(
            v,
            Verdict::new(Health::Progressing, "1/3 updated, 3/3 available")
        );
        let unavailable = ds(json!({"desiredNumberScheduled": 3, "numberReady": 2,
            "observedGeneration": 4, "updatedNumberScheduled": 3, "numberAvailable": 2,
            "numberUnavailable": 1}));
        assert_eq!(
            daemonset_health(&unavailable, &[]).0.health,
            Health::Progressing
        );
        let stale = ds(json!({"desiredNumberScheduled": 3, "numberReady": 3,
            "observedGeneration": 3, "updatedNumberScheduled": 3, "numberAvailable": 3}));
        assert_eq!(daemonset_health(&stale, &[]).0.health, Health::Progressing);
        let done = ds(json!({"desiredNumberScheduled": 3, "numberReady": 3,
            "observedGeneration": 4, "updatedNumberScheduled": 3, "numberAvailable": 3}));
        assert_eq!(
            daemonset_health(&done, &[]).0,
            Verdict::new(Health::Healthy, "3/3 ready")
        );
    }

    #[test]
    fn a_crash_looping_daemonset_pod_of_the_current_template_is_a_failure_signal() {
        let rolling = ds(json!({"desiredNumberScheduled": 3, "numberReady": 2,
            "observedGeneration": 4, "updatedNumberScheduled": 1, "numberAvailable": 2}));
        let mut old = pod("speaker-old", Some("CrashLoopBackOff"), 9, false);
        old["metadata"]["labels"] = json!({"pod-template-generation": "3"});
        let mut new = pod("speaker-new", Some("CrashLoopBackOff"), 1, false);
        new["metadata"]["labels"] = json!({"pod-template-generation": "4"});
        let (v, signals) = daemonset_health(&rolling, &[old, new]);
        assert_eq!(v.health, Health::Degraded);
        assert_eq!(
            signals.iter().map(|s| s.pod.as_str()).collect::<Vec<_>>(),
            ["speaker-new"]
        );
    }

    #[test]
    fn replicasets_are_ready_when_every_replica_is() {
        let rs = |ready: i64| {
            json!({"metadata": {"name": "web-5d4", "generation": 1},
            "spec": {"replicas": 2},
            "status": {"replicas": 2, "fullyLabeledReplicas": 2, "readyReplicas": ready,
                       "availableReplicas": ready, "observedGeneration": 1}})
        };
        assert_eq!(replicaset_health(&rs(1), &[]).0.health, Health::Progressing);
        assert_eq!(replicaset_health(&rs(2), &[]).0.health, Health::Healthy);
        let mut refused = rs(0);
        refused["status"]["conditions"] = json!([{"type": "ReplicaFailure", "status": "True",
            "reason": "FailedCreate", "message": "pods \"web-5d4-x\" is forbidden: exceeded quota"}]);
        let v = replicaset_health(&refused, &[]).0;
        assert_eq!(v.health, Health::Degraded);
        assert!(v.message.contains("exceeded quota"), "{}", v.message);
    }

    #[test]
    fn jobs_complete_fail_or_run_and_a_self_deleted_job_counts_as_complete() {
        let running = json!({"metadata": {"name": "migrate", "uid": "j1"},
            "spec": {"completions": 1, "backoffLimit": 6, "ttlSecondsAfterFinished": 0},
            "status": {"active": 1, "startTime": "2026-12-07T20:00:00Z", "ready": 0,
                       "terminating": 0, "uncountedTerminatedPods": {}}});
        assert_eq!(job_health(&running, &[]).0.health, Health::Progressing);
        let mut complete = running.clone();
        complete["status"] = json!({"succeeded": 1, "completionTime": "2026-12-07T20:00:05Z",
            "conditions": [{"type": "SuccessCriteriaMet", "status": "True"},
                           {"type": "Complete", "status": "True"}]});
        assert_eq!(
            job_health(&complete, &[]).0,
            Verdict::new(Health::Healthy, "complete")
        );
        let mut failed = running.clone();
        failed["status"] = json!({"failed": 7, "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"},
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]});
        assert_eq!(job_health(&failed, &[]).0.health, Health::Degraded);
        // Crash-looping pods of a running Job (restartPolicy: OnFailure) are failure signals.
        let (v, signals) = job_health(
            &running,
            &[pod("migrate-x", Some("CrashLoopBackOff"), 4, false)],
        );
        assert_eq!((v.health, signals.len()), (Health::Degraded, 1));
        // Gone after it was seen: ttlSecondsAfterFinished deleted it, unless it failed.
        assert_eq!(vanished_job_health(&running, None).health, Health::Healthy);
        assert_eq!(vanished_job_health(&complete, None).health, Health::Healthy);
        assert_eq!(
            vanished_job_health(&running, Some("BackoffLimitExceeded")).health,
            Health::Degraded
        );
        let mut no_ttl = running.clone();
        no_ttl["spec"] = json!({"completions": 1});
        assert_eq!(vanished_job_health(&no_ttl, None).health, Health::Missing);
    }

    #[test]
    fn cronjobs_pods_and_ingresses() {
        let cron = json!({"spec": {"schedule": "*/5 * * * *", "suspend": false},
            "status": {"lastScheduleTime": "2026-12-07T20:00:00Z"}});
        assert_eq!(
            generic_health("batch", "CronJob", Some(&cron)).health,
            Health::Healthy
        );
        let ingress = json!({"spec": {"rules": []}, "status": {"loadBalancer": {}}});
        assert_eq!(
            generic_health("networking.k8s.io", "Ingress", Some(&ingress)).health,
            Health::Waiting
        );
        let served = json!({"status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.7"}]}}});
        assert_eq!(
            generic_health("networking.k8s.io", "Ingress", Some(&served)).health,
            Health::Healthy
        );
        let pending = json!({"metadata": {"name": "p"}, "status": {"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}]}});
        assert_eq!(
            generic_health("", "Pod", Some(&pending)).health,
            Health::Progressing
        );
    }

    #[test]
    fn load_balancers_and_volumes_wait_without_blocking() {
        let lb = json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
                        "status": {"loadBalancer": {}}});
        let v = generic_health("", "Service", Some(&lb));
        assert_eq!(v.health, Health::Waiting);
        assert!(v.health.settled(), "a sync does not wait for it");
        let cluster_ip = json!({"spec": {"type": "ClusterIP"}, "status": {"loadBalancer": {}}});
        assert_eq!(
            generic_health("", "Service", Some(&cluster_ip)).health,
            Health::Healthy
        );
        let pvc =
            json!({"spec": {"accessModes": ["ReadWriteOnce"]}, "status": {"phase": "Pending"}});
        assert_eq!(
            generic_health("", "PersistentVolumeClaim", Some(&pvc)).health,
            Health::Waiting
        );
        let bound = json!({"status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}});
        assert_eq!(
            generic_health("", "PersistentVolumeClaim", Some(&bound)).health,
            Health::Healthy
        );
        assert!(!Health::Progressing.settled());
    }

    #[test]
    fn apiservices_crds_and_custom_resources() {
        let unavailable = json!({"status": {"conditions": [{"type": "Available", "status": "False",
            "reason": "MissingEndpoints", "message": "endpoints for service/metrics-server in \"kube-system\" have no addresses"}]}});
        let v = generic_health("apiregistration.k8s.io", "APIService", Some(&unavailable));
        assert_eq!(v.health, Health::Progressing);
        assert!(v.message.contains("MissingEndpoints"), "{}", v.message);
        let available = json!({"status": {"conditions": [{"type": "Available", "status": "True", "reason": "Passed"}]}});
        assert_eq!(
            generic_health("apiregistration.k8s.io", "APIService", Some(&available)).health,
            Health::Healthy
        );

        let crd = |established: &str| {
            json!({"status": {"conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
            {"type": "Established", "status": established, "reason": "InitialNamesAccepted"}]}})
        };
        let group = "apiextensions.k8s.io";
        assert_eq!(
            generic_health(group, "CustomResourceDefinition", Some(&crd("False"))).health,
            Health::Progressing
        );
        assert_eq!(
            generic_health(group, "CustomResourceDefinition", Some(&crd("True"))).health,
            Health::Healthy
        );
        let conflict = json!({"status": {"conditions": [
            {"type": "NamesAccepted", "status": "False", "reason": "PluralConflict"}]}});
        assert_eq!(
            generic_health(group, "CustomResourceDefinition", Some(&conflict)).health,
            Health::Degraded
        );

        let widget = |ready: &str| {
            json!({"metadata": {"generation": 1}, "status": {"observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": ready, "reason": "Reconciling"}]}})
        };
        assert_eq!(
            generic_health("example.com", "Widget", Some(&widget("False"))).health,
            Health::Progressing
        );
        assert_eq!(
            generic_health("example.com", "Widget", Some(&widget("True"))).health,
            Health::Healthy
        );
        assert_eq!(
            generic_health("example.com", "Widget", Some(&json!({"spec": {}}))).health,
            Health::Healthy
        );
        let stalled = json!({"status": {"conditions": [{"type": "Stalled", "status": "True", "message": "bad spec"}]}});
        let v = generic_health("example.com", "Widget", Some(&stalled));
        assert_eq!(v, Verdict::new(Health::Degraded, "stalled: bad spec"));
        assert!(needs_live_look("example.com", "Widget"));
        assert!(!needs_live_look("", "ConfigMap"));
    }
}
