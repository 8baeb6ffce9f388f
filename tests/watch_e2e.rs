//! Continuous mode: `kommit watch` follows commits, ignores the work tree, and heals drift.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn manifests(namespace: &str, image: &str) -> String {
    format!(
        "apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: {namespace}
data:
  mode: steady
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {namespace}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: web
        image: {image}
"
    )
}

#[test]
fn watch_follows_new_commits_only_and_heals_drift() {
    let ns = TestNamespace::new("watch");
    let repo = GitRepo::new();
    repo.write("app.yaml", &manifests(&ns.name, "nginx:1.25"));
    repo.commit("Web on nginx 1.25");
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kommit"))
        .args([
            "watch",
            "--repo",
            repo.path_str(),
            "--interval",
            "2s",
            "--self-heal",
        ])
        .env("KUBECONFIG", kubeconfig())
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let image = || {
        let out = kubectl(&[
            "get",
            "deployment",
            "web",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until(
        Duration::from_secs(60),
        "the first commit is synced",
        || image() == "nginx:1.25",
    );

    // Editing the work tree is not a commit: nothing happens.
    std::fs::write(
        repo.path().join("app.yaml"),
        manifests(&ns.name, "nginx:1.26"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(image(), "nginx:1.25");

    // A commit is synced within seconds.
    repo.commit("Web on nginx 1.26");
    wait_until(Duration::from_secs(30), "the new commit is synced", || {
        image() == "nginx:1.26"
    });

    // Someone edits a synced object: the drift is reported and healed.
    kubectl_ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"data":{"mode":"edited"}}"#,
    ]);
    wait_until(Duration::from_secs(30), "the drift is healed", || {
        jsonpath(&ns.name, "configmap/settings", "{.data.mode}") == "steady"
    });

    // The heal is reported once its sync has finished (health, record, events).
    let output = || {
        let mut output = String::new();
        std::fs::File::open(log.path())
            .unwrap()
            .read_to_string(&mut output)
            .unwrap();
        output
    };
    wait_until(Duration::from_secs(30), "the heal is reported", || {
        output().contains("healed")
    });
    child.kill().unwrap();
    let _ = child.wait();
    let output = output();
    assert!(
        output.contains("drift") && output.contains("ConfigMap"),
        "{output}"
    );
    assert!(output.contains("healed"), "{output}");
}
