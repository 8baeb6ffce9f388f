//! Health of applied objects, judged the way `kubectl rollout status` does, plus the failure
//! signals that say a rollout will not succeed before its progress deadline. Pure: values in,
//! verdicts out; the waiting loop lives in `reconcile`.

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub enum Health {
    Healthy,
    Progressing,
    Degraded,
    Missing,
    Unknown,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "Healthy",
            Health::Progressing => "Progressing",
            Health::Degraded => "Degraded",
            Health::Missing => "Missing",
            Health::Unknown => "Unknown",
        }
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

/// Health of any other kind: present is healthy, except for a few kinds with a clear rule.
pub fn generic_health(group: &str, kind: &str, live: Option<&Value>) -> Verdict {
    let Some(live) = live else {
        return Verdict::new(Health::Missing, "not in the cluster");
    };
    match (group, kind) {
        ("apps", "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            let generation = int(live, "/metadata/generation").unwrap_or(0);
            let observed = int(live, "/status/observedGeneration").unwrap_or(0);
            let (want, ready) = if kind == "DaemonSet" {
                (
                    int(live, "/status/desiredNumberScheduled").unwrap_or(0),
                    int(live, "/status/numberReady").unwrap_or(0),
                )
            } else {
                (
                    int(live, "/spec/replicas").unwrap_or(1),
                    int(live, "/status/readyReplicas").unwrap_or(0),
                )
            };
            if observed < generation || ready < want {
                Verdict::new(Health::Progressing, format!("{ready}/{want} ready"))
            } else {
                Verdict::new(Health::Healthy, format!("{ready}/{want} ready"))
            }
        }
        ("batch", "Job") => {
            if condition(live, "Failed")
                .and_then(|c| c.get("status"))
                .and_then(Value::as_str)
                == Some("True")
            {
                Verdict::new(Health::Degraded, "the job failed")
            } else if condition(live, "Complete")
                .and_then(|c| c.get("status"))
                .and_then(Value::as_str)
                == Some("True")
            {
                Verdict::new(Health::Healthy, "complete")
            } else {
                Verdict::new(Health::Progressing, "running")
            }
        }
        ("", "PersistentVolumeClaim") => match text(live, "/status/phase") {
            Some("Bound") => Verdict::new(Health::Healthy, "bound"),
            Some(phase) => Verdict::new(Health::Progressing, phase.to_lowercase()),
            None => Verdict::new(Health::Progressing, "pending"),
        },
        _ => Verdict::new(Health::Healthy, "present"),
    }
}

/// Whether kommit judges the health of this kind by more than its presence.
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
}
