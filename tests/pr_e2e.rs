//! A pull request's report from any CI: what the pull request changes, and what merging it
//! would apply to the live cluster, with Secrets masked; production does not move.

mod common;

use common::*;

fn web(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: {image}\n"
    )
}

fn secret(password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\nstringData:\n  password: {password}\n"
    )
}

#[test]
fn a_pull_request_report_shows_its_changes_and_what_merging_would_do_secrets_masked() {
    let ns = TestNamespace::new("pr-diff");
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"))
        .write("deploy/db.yaml", &secret("old-hunter2"));
    repo.commit("Web and its database password");
    repo.git(&["branch", "-M", "main"]);
    let synced = kommit(&[
        "sync",
        "--repo",
        repo.path_str(),
        "--path",
        "deploy",
        "-n",
        &ns.name,
        "--no-wait",
    ]);
    assert_eq!(synced.code, 0, "{synced:?}");

    // The pull request: a new image, a new ConfigMap, a rotated password.
    repo.git(&["checkout", "-q", "-b", "bump"]);
    repo.write("deploy/web.yaml", &web("nginx:1.26"))
        .write("deploy/db.yaml", &secret("new-hunter3"))
        .write(
            "deploy/flags.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: flags\ndata:\n  beta: \"on\"\n",
        );
    repo.commit("Bump web to 1.26, rotate the password, add flags");
    repo.git(&["checkout", "-q", "main"]);

    let report = |output: &str| {
        kommit(&[
            "pr",
            "diff",
            "--repo",
            repo.path_str(),
            "--path",
            "deploy",
            "-n",
            &ns.name,
            "--base",
            "main",
            "--head",
            "bump",
            "-o",
            output,
        ])
    };
    let markdown = report("markdown");
    assert_eq!(
        markdown.code, 1,
        "changes: exit 1 like kommit diff: {markdown:?}"
    );
    let text = &markdown.stdout;
    for expected in [
        "| **This pull request**",
        "| **Merging it** (live cluster",
        "#### What this pull request changes",
        "#### What merging would apply to the live cluster",
        &format!(
            "| create | `ConfigMap {}/flags` | `deploy/flags.yaml:1` |",
            ns.name
        ),
        &format!("| update | `Deployment {}/web` |", ns.name),
        "+      - image: nginx:1.26",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    for secret in [
        "old-hunter2",
        "new-hunter3",
        "b2xkLWh1bnRlcjI=",
        "bmV3LWh1bnRlcjM=",
    ] {
        assert!(
            !markdown.all().contains(secret),
            "a secret leaked: {secret}"
        );
    }
    let json = report("json");
    assert_eq!(json.code, 1, "{json:?}");
    let value: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(value["kommit"], "review/v1");
    assert_eq!(value["summary"]["create"], 1);
    assert_eq!(value["live"]["summary"]["update"], 2, "{}", json.stdout);

    // Production never moves for a report.
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.spec.template.spec.containers[0].image}"
        ),
        "nginx:1.25"
    );

    // A pull request that changes nothing says so, exit 0.
    let same = kommit(&[
        "pr",
        "diff",
        "--repo",
        repo.path_str(),
        "--path",
        "deploy",
        "-n",
        &ns.name,
        "--base",
        "main",
        "--head",
        "main",
    ]);
    assert_eq!(same.code, 0, "{same:?}");
    assert!(
        same.stdout.contains("nothing: the manifests are the same"),
        "{same:?}"
    );
}
