//! Rollouts that are watched, rollbacks that follow git, and an audit trail that is git.

mod common;

use std::time::Duration;

use common::*;

fn web(namespace: &str, image: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {namespace}
spec:
  replicas: 3
  progressDeadlineSeconds: 120
  selector:
    matchLabels: {{app: web}}
  strategy:
    rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}
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

fn image(namespace: &str) -> String {
    jsonpath(
        namespace,
        "deployment/web",
        "{.spec.template.spec.containers[0].image}",
    )
}

fn replica_sets(namespace: &str) -> Vec<String> {
    kubectl_ok(&[
        "get",
        "rs",
        "-n",
        namespace,
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])
    .split_whitespace()
    .map(str::to_string)
    .collect()
}

fn events(namespace: &str) -> String {
    kubectl_ok(&[
        "get",
        "events",
        "-n",
        namespace,
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.message}{'\\n'}{end}",
    ])
}

fn sync(repo: &GitRepo, extra: &[&str]) -> Run {
    let mut args = vec![
        "sync",
        "--repo",
        repo.path_str(),
        "--fail-after",
        "5s",
        "--timeout",
        "2m",
    ];
    args.extend_from_slice(extra);
    kommit(&args)
}

#[test]
fn a_broken_commit_is_rolled_back_to_the_last_healthy_one_and_git_tells_the_story() {
    let ns = TestNamespace::new("auto-rollback");
    let repo = GitRepo::new();
    repo.write("web.yaml", &web(&ns.name, "nginx:1.25"));
    let v1 = repo.commit("Web on nginx 1.25");
    let first = sync(&repo, &["--auto-rollback"]);
    assert_eq!(first.code, 0, "{first:?}");
    assert!(first.stdout.contains("Healthy"), "{first:?}");
    let healthy_replica_sets = replica_sets(&ns.name);

    repo.write("web.yaml", &web(&ns.name, "nginx:broken"));
    let v2 = repo.commit("Web on a broken build");
    let failed = sync(&repo, &["--auto-rollback"]);
    assert_eq!(failed.code, 3, "a failed rollout exits 3: {failed:?}");
    assert!(
        failed.stdout.contains("CrashLoopBackOff"),
        "says why: {failed:?}"
    );
    assert!(
        failed
            .stdout
            .contains(&format!("Rolled back to {}", &v1[..7])),
        "{failed:?}"
    );
    assert_eq!(image(&ns.name), "nginx:1.25");
    assert!(rollout_status(&ns.name, "web", "60s").status.success());
    assert_eq!(
        jsonpath(&ns.name, "deployment/web", "{.status.availableReplicas}"),
        "3"
    );

    let recorded = events(&ns.name);
    assert!(
        recorded.contains("RolloutFailed") && recorded.contains(&v2[..7]),
        "{recorded}"
    );
    assert!(
        recorded.contains("RolledBack") && recorded.contains(&v1[..7]),
        "{recorded}"
    );
    let rollout_history = kubectl_ok(&["rollout", "history", "-n", &ns.name, "deployment/web"]);
    assert!(
        rollout_history.contains("Web on nginx 1.25"),
        "{rollout_history}"
    );
    assert!(
        rollout_history.contains("Web on a broken build"),
        "{rollout_history}"
    );
    let history = kommit(&["history", "deploy/web", "--repo", repo.path_str()]);
    assert_eq!(history.code, 0, "{history:?}");
    assert!(
        history.stdout.contains(&format!(
            "Record in:  {} (where the source's objects are; -n to choose)",
            ns.name
        )),
        "says where it looked: {history:?}"
    );
    let broken_row = history
        .stdout
        .lines()
        .find(|l| l.contains(&v2[..7]))
        .expect("the broken commit is listed");
    assert!(broken_row.contains("rolled back"), "{history:?}");
    let healthy_row = history
        .stdout
        .lines()
        .find(|l| l.contains(&v1[..7]))
        .expect("the good commit is listed");
    assert!(
        healthy_row.contains("healthy") && healthy_row.contains('*'),
        "v1 is current and healthy: {history:?}"
    );

    // The failed commit is not retried while git stays on it.
    let again = sync(&repo, &["--auto-rollback"]);
    assert_eq!(again.code, 3, "{again:?}");
    assert!(
        again.stdout.contains("was not applied") && again.stdout.contains("--retry"),
        "{again:?}"
    );
    assert_eq!(image(&ns.name), "nginx:1.25");

    // Git moves on with a good build; then a commit brings the template back to v1's, which
    // reuses v1's ReplicaSet: a rollback done in git.
    repo.write("web.yaml", &web(&ns.name, "nginx:1.26"));
    repo.commit("Web on nginx 1.26");
    let moved_on = sync(&repo, &["--auto-rollback"]);
    assert_eq!(moved_on.code, 0, "{moved_on:?}");
    assert_eq!(image(&ns.name), "nginx:1.26");
    repo.write("web.yaml", &web(&ns.name, "nginx:1.25"));
    repo.commit("Back to nginx 1.25");
    let before = replica_sets(&ns.name);
    let back = sync(&repo, &["--auto-rollback"]);
    assert_eq!(back.code, 0, "{back:?}");
    assert!(
        back.stdout
            .contains(&format!("the one commit {} first rolled out", &v1[..7])),
        "{back:?}"
    );
    assert_eq!(replica_sets(&ns.name), before, "no new ReplicaSet");
    assert!(healthy_replica_sets.iter().all(|rs| before.contains(rs)));
}

#[test]
fn rollback_pins_the_cluster_and_revert_commits_to_git() {
    let ns = TestNamespace::new("pin-revert");
    let repo = GitRepo::new();
    repo.write("web.yaml", &web(&ns.name, "nginx:1.25"));
    repo.commit("Web on nginx 1.25");
    assert_eq!(sync(&repo, &[]).code, 0);
    repo.write("web.yaml", &web(&ns.name, "nginx:1.26"));
    let v2 = repo.commit("Web on nginx 1.26");
    assert_eq!(sync(&repo, &[]).code, 0);
    assert_eq!(image(&ns.name), "nginx:1.26");

    let rolled = kommit(&["rollback", "--to", "HEAD~1", "--repo", repo.path_str()]);
    assert_eq!(rolled.code, 0, "{rolled:?}");
    assert_eq!(image(&ns.name), "nginx:1.25");
    assert!(rolled.stderr.contains("pinned"), "{rolled:?}");
    let status = kommit(&["status", "--repo", repo.path_str()]);
    assert!(status.stdout.contains("Pinned:"), "{status:?}");
    let refused = sync(&repo, &[]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("pinned") && refused.stderr.contains("--unpin"),
        "{refused:?}"
    );
    assert_eq!(image(&ns.name), "nginx:1.25");
    let unpinned = sync(&repo, &["--unpin"]);
    assert_eq!(unpinned.code, 0, "{unpinned:?}");
    assert_eq!(image(&ns.name), "nginx:1.26");

    // The GitOps way back: a revert commit, synced.
    let reverted = kommit(&["revert", &v2, "--repo", repo.path_str()]);
    assert_eq!(reverted.code, 0, "{reverted:?}");
    assert_eq!(image(&ns.name), "nginx:1.25");
    let subject = repo.git(&["log", "-1", "--format=%s"]);
    assert_eq!(subject, "Revert \"Web on nginx 1.26\"");
    assert_eq!(
        std::fs::read_to_string(repo.path().join("web.yaml")).unwrap(),
        web(&ns.name, "nginx:1.25"),
        "the work tree follows the revert"
    );
}

#[test]
fn a_failed_rollout_can_be_reverted_in_git_and_noted() {
    let ns = TestNamespace::new("revert-on-failure");
    let repo = GitRepo::new();
    repo.write("web.yaml", &web(&ns.name, "nginx:1.25"));
    let v1 = repo.commit("Web on nginx 1.25");
    assert_eq!(sync(&repo, &["--record-notes"]).code, 0);
    let note = repo.git(&["notes", "--ref=kommit", "show", &v1]);
    assert!(note.contains("healthy"), "{note}");

    repo.write("web.yaml", &web(&ns.name, "nginx:missing-tag"));
    let bad = repo.commit("Web on a tag that does not exist");
    let run = sync(
        &repo,
        &["--auto-rollback", "--revert-on-failure", "--record-notes"],
    );
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stdout.contains("ImagePullBackOff") || run.stdout.contains("ErrImagePull"),
        "{run:?}"
    );
    assert_eq!(image(&ns.name), "nginx:1.25");
    assert_eq!(
        repo.git(&["log", "-1", "--format=%s"]),
        "Revert \"Web on a tag that does not exist\""
    );
    let note = repo.git(&["notes", "--ref=kommit", "show", &bad]);
    assert!(note.contains("rolled back"), "{note}");
    // git and the cluster agree again: the new HEAD syncs as a no-op.
    let diff = kommit(&["diff", "--repo", repo.path_str()]);
    assert_eq!(diff.code, 0, "{diff:?}");
}

#[test]
fn a_crash_looping_bare_pod_is_degraded() {
    let ns = TestNamespace::new("bare-crash");
    let repo = GitRepo::new();
    repo.write(
        "pod.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: worker\n  namespace: {}\nspec:\n  containers:\n  - name: worker\n    image: busybox:broken\n", ns.name),
    );
    repo.commit("A worker that crashes");
    let run = kommit(&["sync", "--repo", repo.path_str(), "--fail-after", "3s"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stdout.contains("Pod") && run.stdout.contains("CrashLoopBackOff"),
        "{run:?}"
    );
    let status = kommit(&["status", "--repo", repo.path_str(), "-o", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&status.stdout).expect("json");
    assert_eq!(parsed["objects"][0]["health"], "Degraded", "{status:?}");
    assert_eq!(parsed["health"], "Degraded");
}

#[test]
fn a_sync_killed_while_waiting_picks_up_where_the_rollout_is() {
    let ns = TestNamespace::new("resume");
    let repo = GitRepo::new();
    repo.write("web.yaml", &web(&ns.name, "nginx:1.25"));
    repo.commit("Web on nginx 1.25");
    assert_eq!(sync(&repo, &[]).code, 0);

    repo.write("web.yaml", &web(&ns.name, "nginx:1.26"));
    repo.commit("Web on nginx 1.26");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kommit"))
        .args(["sync", "--repo", repo.path_str()])
        .env("KUBECONFIG", kubeconfig())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the new template is applied",
        || image(&ns.name) == "nginx:1.26",
    );
    child.kill().unwrap();
    let _ = child.wait();
    let generation = jsonpath(&ns.name, "deployment/web", "{.metadata.generation}");

    let resumed = sync(&repo, &[]);
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert!(
        resumed.stdout.contains("no writes"),
        "nothing is re-applied: {resumed:?}"
    );
    assert!(resumed.stdout.contains("Healthy"), "{resumed:?}");
    assert_eq!(
        jsonpath(&ns.name, "deployment/web", "{.metadata.generation}"),
        generation
    );
    assert_eq!(
        jsonpath(&ns.name, "deployment/web", "{.status.updatedReplicas}"),
        "3"
    );
}

#[test]
fn pods_refused_by_a_quota_fail_the_rollout_without_waiting_for_the_deadline() {
    let ns = TestNamespace::new("quota");
    let repo = GitRepo::new();
    repo.write("web.yaml", &web(&ns.name, "nginx:1.25"));
    let v1 = repo.commit("Web on nginx 1.25");
    assert_eq!(sync(&repo, &[]).code, 0);
    // Three pods allowed: the rolling update's surge pod is refused by admission.
    kubectl_apply(
        &ns.name,
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: pods}\nspec:\n  hard: {pods: \"3\"}\n",
        &[],
    );
    wait_until(Duration::from_secs(30), "the quota counts the pods", || {
        jsonpath(&ns.name, "resourcequota/pods", "{.status.used.pods}") == "3"
    });
    repo.write("web.yaml", &web(&ns.name, "nginx:1.26"));
    repo.commit("Web on nginx 1.26");
    let started = std::time::Instant::now();
    let run = kommit(&[
        "sync",
        "--repo",
        repo.path_str(),
        "--auto-rollback",
        "--timeout",
        "5m",
    ]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stdout.contains("exceeded quota"), "says why: {run:?}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "called as soon as the signal is clear"
    );
    assert!(
        run.stdout.contains(&format!("Rolled back to {}", &v1[..7])),
        "{run:?}"
    );
    assert_eq!(image(&ns.name), "nginx:1.25");
}
