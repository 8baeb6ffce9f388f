//! The sandbox is a real control plane: Deployments roll, roll back, fail at their progress
//! deadline, and ReplicaSets replace deleted pods; kwok makes pods Ready or fail by image tag.

mod common;

use std::time::Duration;

use common::*;

fn deployment(name: &str, image: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: 3
{extra_spec}  selector:
    matchLabels: {{app: {name}}}
  strategy:
    rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
      - name: web
        image: {image}
"
    )
}

/// Images of the app's pods that are not on their way out.
fn pod_images(namespace: &str, app: &str) -> Vec<String> {
    let out = kubectl_ok(&[
        "get",
        "pods",
        "-n",
        namespace,
        "-l",
        &format!("app={app}"),
        "-o",
        "jsonpath={range .items[*]}{.spec.containers[0].image} {.metadata.deletionTimestamp}{'\\n'}{end}",
    ]);
    out.lines()
        .filter_map(|line| {
            let (image, deleting) = line.split_once(' ').unwrap_or((line, ""));
            (deleting.trim().is_empty() && !image.is_empty()).then(|| image.to_string())
        })
        .collect()
}

#[test]
fn a_deployment_rolls_out_updates_and_rolls_back() {
    let ns = TestNamespace::new("rolls");
    kubectl_apply(&ns.name, &deployment("web", "nginx:1.25", ""), &[]);
    let status = rollout_status(&ns.name, "web", "90s");
    assert!(status.status.success(), "{status:?}");
    assert_eq!(
        jsonpath(&ns.name, "deployment/web", "{.status.readyReplicas}"),
        "3"
    );

    kubectl_ok(&[
        "set",
        "image",
        "-n",
        &ns.name,
        "deployment/web",
        "web=nginx:1.26",
    ]);
    let status = rollout_status(&ns.name, "web", "90s");
    assert!(status.status.success(), "{status:?}");
    wait_until(Duration::from_secs(60), "every pod runs nginx:1.26", || {
        let images = pod_images(&ns.name, "web");
        images.len() == 3 && images.iter().all(|i| i == "nginx:1.26")
    });
    let replica_sets = kubectl_ok(&["get", "rs", "-n", &ns.name, "-o", "name"]);
    assert_eq!(replica_sets.lines().count(), 2, "{replica_sets}");

    kubectl_ok(&["rollout", "undo", "-n", &ns.name, "deployment/web"]);
    let status = rollout_status(&ns.name, "web", "90s");
    assert!(status.status.success(), "{status:?}");
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.spec.template.spec.containers[0].image}"
        ),
        "nginx:1.25"
    );
    wait_until(
        Duration::from_secs(60),
        "every pod runs nginx:1.25 again",
        || {
            let images = pod_images(&ns.name, "web");
            images.len() == 3 && images.iter().all(|i| i == "nginx:1.25")
        },
    );
}

#[test]
fn a_broken_image_crash_loops_and_misses_the_progress_deadline() {
    let ns = TestNamespace::new("broken");
    kubectl_apply(
        &ns.name,
        &deployment("web", "nginx:1.25", "  progressDeadlineSeconds: 15\n"),
        &[],
    );
    assert!(rollout_status(&ns.name, "web", "90s").status.success());

    kubectl_ok(&[
        "set",
        "image",
        "-n",
        &ns.name,
        "deployment/web",
        "web=nginx:broken",
    ]);
    let status = rollout_status(&ns.name, "web", "120s");
    assert!(
        !status.status.success(),
        "the rollout of a broken image must fail"
    );
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        stderr.contains("exceeded its progress deadline"),
        "{stderr}"
    );
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.status.conditions[?(@.type=='Progressing')].reason}"
        ),
        "ProgressDeadlineExceeded"
    );
    // The old pods keep serving (maxUnavailable 0); the new one crash-loops, restarts climbing.
    let broken_pod =
        || {
            kubectl_ok(&[
            "get", "pods", "-n", &ns.name, "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.containers[0].image}{'\\n'}{end}",
        ])
        .lines()
        .find(|l| l.ends_with("nginx:broken"))
        .map(|l| l.split(' ').next().unwrap().to_string())
        };
    let pod = broken_pod().expect("a pod with the broken image exists");
    assert_eq!(
        jsonpath(
            &ns.name,
            &format!("pod/{pod}"),
            "{.status.containerStatuses[0].state.waiting.reason}"
        ),
        "CrashLoopBackOff"
    );
    let restarts = |pod: &str| -> u32 {
        jsonpath(
            &ns.name,
            &format!("pod/{pod}"),
            "{.status.containerStatuses[0].restartCount}",
        )
        .parse()
        .unwrap_or(0)
    };
    let first = restarts(&pod);
    wait_until(Duration::from_secs(30), "the restart count climbs", || {
        restarts(&pod) > first
    });
    assert_eq!(
        jsonpath(&ns.name, "deployment/web", "{.status.availableReplicas}"),
        "3"
    );
}

#[test]
fn a_missing_image_cannot_be_pulled() {
    let ns = TestNamespace::new("missing");
    kubectl_apply(
        &ns.name,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: ghost}\nspec:\n  containers:\n  - {name: app, image: 'example.com/ghost:missing-1'}\n",
        &[],
    );
    let reason = || {
        jsonpath(
            &ns.name,
            "pod/ghost",
            "{.status.containerStatuses[0].state.waiting.reason}",
        )
    };
    wait_until(Duration::from_secs(30), "the pull fails", || {
        matches!(reason().as_str(), "ErrImagePull" | "ImagePullBackOff")
    });
    wait_until(Duration::from_secs(30), "it backs off", || {
        reason() == "ImagePullBackOff"
    });
    assert_eq!(
        jsonpath(&ns.name, "pod/ghost", "{.status.phase}"),
        "Pending"
    );
}

#[test]
fn a_deleted_pod_is_replaced_by_its_replica_set() {
    let ns = TestNamespace::new("replace");
    kubectl_apply(&ns.name, &deployment("api", "nginx:1.25", ""), &[]);
    assert!(rollout_status(&ns.name, "api", "90s").status.success());
    let names = || -> Vec<String> {
        kubectl_ok(&[
            "get",
            "pods",
            "-n",
            &ns.name,
            "-l",
            "app=api",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect()
    };
    let before = names();
    assert_eq!(before.len(), 3);
    kubectl_ok(&[
        "delete",
        "pod",
        "-n",
        &ns.name,
        &before[0],
        "--wait=true",
        "--timeout=60s",
    ]);
    wait_until(
        Duration::from_secs(60),
        "a new pod replaces the deleted one",
        || {
            let now = names();
            now.len() == 3 && !now.contains(&before[0])
        },
    );
    assert!(rollout_status(&ns.name, "api", "60s").status.success());
}

#[test]
fn a_bare_pod_becomes_ready_and_a_namespace_deletes_cleanly() {
    let ns = TestNamespace::new("bare");
    kubectl_apply(
        &ns.name,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: debug}\nspec:\n  containers:\n  - {name: shell, image: 'busybox:1.36'}\n",
        &[],
    );
    kubectl_ok(&[
        "wait",
        "-n",
        &ns.name,
        "pod/debug",
        "--for=condition=Ready",
        "--timeout=60s",
    ]);
    assert_eq!(
        jsonpath(&ns.name, "pod/debug", "{.status.phase}"),
        "Running"
    );
    assert!(!jsonpath(&ns.name, "pod/debug", "{.status.podIP}").is_empty());

    // Deleting the namespace must finish: kwok's delete stage lets pods go.
    let doomed = TestNamespace::new("doomed");
    kubectl_apply(&doomed.name, &deployment("web", "nginx:1.25", ""), &[]);
    assert!(rollout_status(&doomed.name, "web", "90s").status.success());
    kubectl_ok(&[
        "delete",
        "namespace",
        &doomed.name,
        "--wait=true",
        "--timeout=90s",
    ]);
}

#[test]
fn the_server_reports_the_real_kubernetes_version() {
    let version = kubectl_ok(&["version", "-o", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&version).unwrap();
    assert_eq!(
        parsed["serverVersion"]["gitVersion"], "v1.36.1",
        "{version}"
    );
    let nodes = kubectl_ok(&["get", "nodes", "-o", "jsonpath={.items[*].metadata.name}"]);
    assert!(nodes.split_whitespace().count() >= 3, "{nodes}");
}

#[test]
fn the_gitsync_crd_installs_and_serves_gitsyncs() {
    let ns = TestNamespace::new("crd");
    let crd = std::process::Command::new(env!("CARGO_BIN_EXE_kommit"))
        .arg("crd")
        .output()
        .expect("kommit crd runs");
    assert!(crd.status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crd.yaml");
    std::fs::write(&file, &crd.stdout).unwrap();
    kubectl_ok(&["apply", "--server-side", "-f", file.to_str().unwrap()]);
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/gitsyncs.kommit.dev",
        "--timeout=60s",
    ]);
    kubectl_apply(
        &ns.name,
        "apiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {name: shop}\nspec:\n  repo: https://example.com/shop.git\n  path: deploy\n",
        &[],
    );
    let interval = jsonpath(&ns.name, "gitsync/shop", "{.spec.interval}");
    assert_eq!(interval, "1m", "defaults come from the schema");
    assert_eq!(
        jsonpath(&ns.name, "gitsync/shop", "{.spec.autoRollback}"),
        "true"
    );
    let listed = kubectl_ok(&["get", "gitsyncs", "-n", &ns.name]);
    assert!(
        listed.contains("COMMIT") && listed.contains("HEALTH"),
        "{listed}"
    );
}

/// The API server itself refuses an interval below the floor (CEL in the CRD), naming the field,
/// and a value CEL could not read gets the pattern's message rather than an evaluation error.
#[test]
fn the_gitsync_crd_refuses_an_interval_below_ten_seconds() {
    install_gitsync_crd();
    let ns = TestNamespace::new("crd-interval");
    let apply = |name: &str, interval: &str| {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gitsync.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {{name: {name}}}\nspec:\n  repo: https://example.com/shop.git\n  interval: \"{interval}\"\n"
            ),
        )
        .unwrap();
        kubectl(&["apply", "-n", &ns.name, "-f", file.to_str().unwrap()])
    };

    let refused = apply("fast", "2s");
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "2s was accepted");
    assert!(
        said.contains("spec.interval") && said.contains("must be at least 10s"),
        "{said}"
    );
    assert!(
        !kubectl(&["get", "-n", &ns.name, "gitsync/fast"])
            .status
            .success(),
        "nothing was made"
    );

    let bare = apply("bare", "90");
    let said = String::from_utf8_lossy(&bare.stderr).into_owned();
    assert!(!bare.status.success(), "a bare number was accepted");
    assert!(
        said.contains("spec.interval") && said.contains("should match"),
        "{said}"
    );
    assert!(!said.contains("evaluating rule"), "{said}");

    for (name, interval) in [("floor", "10s"), ("minute", "1m"), ("long", "1h30m")] {
        let accepted = apply(name, interval);
        assert!(
            accepted.status.success(),
            "{interval}: {}",
            String::from_utf8_lossy(&accepted.stderr)
        );
        assert_eq!(
            jsonpath(&ns.name, &format!("gitsync/{name}"), "{.spec.interval}"),
            interval
        );
    }
}
