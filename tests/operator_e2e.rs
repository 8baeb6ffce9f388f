//! The GitSync operator, run out-of-cluster against the sandbox.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn install_crd() {
    let crd = Command::new(env!("CARGO_BIN_EXE_kommit"))
        .arg("crd")
        .output()
        .expect("kommit crd runs");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crd.yaml");
    std::fs::write(&file, &crd.stdout).unwrap();
    kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        file.to_str().unwrap(),
    ]);
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/gitsyncs.kommit.dev",
        "--timeout=60s",
    ]);
}

fn web(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: {image}\n"
    )
}

#[test]
fn a_gitsync_follows_its_repository_rolls_back_a_bad_commit_and_can_be_suspended() {
    install_crd();
    let ns = TestNamespace::new("operator");
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    let v1 = repo.commit("Web on nginx 1.25");
    let _operator = OperatorProcess::start(&["--watch-namespace", &ns.name], &[]);
    kubectl_apply(
        &ns.name,
        &format!(
            "apiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {{name: shop}}\nspec:\n  repo: file://{}\n  path: deploy\n  interval: 2s\n",
            repo.path_str()
        ),
        &[],
    );
    let status = |path: &str| jsonpath(&ns.name, "gitsync/shop", path);
    let image = || {
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.spec.template.spec.containers[0].image}",
        )
    };
    wait_until(
        Duration::from_secs(90),
        "the first commit is applied and healthy",
        || status("{.status.lastAppliedCommit}") == v1 && status("{.status.health}") == "Healthy",
    );
    assert_eq!(image(), "nginx:1.25");
    assert_eq!(
        status("{.status.conditions[?(@.type=='Ready')].status}"),
        "True"
    );

    repo.write("deploy/web.yaml", &web("nginx:1.26"));
    let v2 = repo.commit("Web on nginx 1.26");
    wait_until(Duration::from_secs(90), "the new commit rolls out", || {
        status("{.status.lastAppliedCommit}") == v2 && image() == "nginx:1.26"
    });

    repo.write("deploy/web.yaml", &web("nginx:broken"));
    let v3 = repo.commit("Web on a broken build");
    wait_until(
        Duration::from_secs(120),
        "the broken commit is rolled back",
        || {
            status("{.status.history[0].commit}") == v3
                && status("{.status.history[0].outcome}") == "rolled-back"
        },
    );
    assert_eq!(image(), "nginx:1.26");
    assert!(
        status("{.status.conditions[?(@.type=='Synced')].message}").contains("CrashLoopBackOff")
    );

    kubectl_ok(&[
        "patch",
        "gitsync",
        "shop",
        "-n",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ]);
    wait_until(
        Duration::from_secs(30),
        "the GitSync says it is suspended",
        || status("{.status.conditions[?(@.type=='Ready')].reason}") == "Suspended",
    );
    repo.write("deploy/web.yaml", &web("nginx:1.27"));
    repo.commit("Web on nginx 1.27");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(image(), "nginx:1.26", "a suspended GitSync changes nothing");
}
