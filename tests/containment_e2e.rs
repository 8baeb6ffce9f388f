//! kommit never takes over or deletes what it did not create: objects made by hand are an
//! adoption it refuses unless asked, a copied inventory label proves nothing, and the same path
//! synced into two namespaces is two sources.

mod common;

use common::*;

fn config_map(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  k: {value}\n")
}

fn sync(repo: &GitRepo, namespace: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "sync",
        "--repo",
        repo.path_str(),
        "--path",
        "deploy",
        "-n",
        namespace,
        "--no-wait",
    ];
    args.extend_from_slice(extra);
    kommit(&args)
}

fn exists(namespace: &str, object: &str) -> bool {
    kubectl(&["get", "-n", namespace, object]).status.success()
}

#[test]
fn an_object_made_by_hand_is_neither_overwritten_nor_pruned_unless_adopted() {
    let ns = TestNamespace::new("containment");
    kubectl_ok(&[
        "create",
        "configmap",
        "precious",
        "-n",
        &ns.name,
        "--from-literal=k=theirs",
    ]);
    let repo = GitRepo::new();
    repo.write("deploy/app.yaml", &config_map("app", "ours"))
        .write("deploy/precious.yaml", &config_map("precious", "ours"));
    repo.commit("Add app and a ConfigMap that already exists");

    // The plan shows the takeover; the sync refuses the whole commit.
    let diff = kommit(&[
        "diff",
        "--repo",
        repo.path_str(),
        "--path",
        "deploy",
        "-n",
        &ns.name,
    ]);
    assert!(diff.stdout.contains("1 to adopt"), "{diff:?}");
    let refused = sync(&repo, &ns.name, &[]);
    assert_eq!(refused.code, 2, "{refused:?}");
    for expected in [
        format!("ConfigMap {}/precious (deploy/precious.yaml:1)", ns.name),
        "managed by kubectl-create".to_string(),
        "--adopt".to_string(),
        "nothing was changed".to_string(),
    ] {
        assert!(
            refused.stderr.contains(&expected),
            "{expected}: {refused:?}"
        );
    }
    assert!(
        !exists(&ns.name, "configmap/app"),
        "nothing is half-applied"
    );
    assert_eq!(
        jsonpath(&ns.name, "configmap/precious", "{.data.k}"),
        "theirs"
    );

    // Out of git, it is not kommit's to delete either.
    repo.remove("deploy/precious.yaml");
    repo.commit("Leave precious alone");
    let synced = sync(&repo, &ns.name, &["--prune"]);
    assert_eq!(synced.code, 0, "{synced:?}");
    assert_eq!(
        jsonpath(&ns.name, "configmap/precious", "{.data.k}"),
        "theirs"
    );

    // A copy of the inventory label and source annotation does not make an object kommit's.
    let inventory = jsonpath(
        &ns.name,
        "configmap/app",
        "{.metadata.labels.kommit\\.dev/inventory}",
    );
    let source = jsonpath(
        &ns.name,
        "configmap/app",
        "{.metadata.annotations.kommit\\.dev/source}",
    );
    kubectl_ok(&[
        "create",
        "configmap",
        "planted",
        "-n",
        &ns.name,
        "--from-literal=k=theirs",
    ]);
    kubectl_ok(&[
        "label",
        "-n",
        &ns.name,
        "configmap/planted",
        &format!("kommit.dev/inventory={inventory}"),
    ]);
    kubectl_ok(&[
        "annotate",
        "-n",
        &ns.name,
        "configmap/planted",
        &format!("kommit.dev/source={source}"),
    ]);
    let synced = sync(&repo, &ns.name, &["--prune"]);
    assert_eq!(synced.code, 0, "{synced:?}");
    assert!(exists(&ns.name, "configmap/planted"), "{synced:?}");

    // Taking it over on purpose: then it is kommit's, to update and to prune.
    repo.write("deploy/precious.yaml", &config_map("precious", "ours"));
    repo.commit("Adopt precious");
    let adopted = sync(&repo, &ns.name, &["--adopt"]);
    assert_eq!(adopted.code, 0, "{adopted:?}");
    assert_eq!(
        jsonpath(&ns.name, "configmap/precious", "{.data.k}"),
        "ours"
    );
    repo.remove("deploy/precious.yaml");
    repo.commit("Retire precious");
    let pruned = sync(&repo, &ns.name, &["--prune"]);
    assert_eq!(pruned.code, 0, "{pruned:?}");
    assert!(!exists(&ns.name, "configmap/precious"), "{pruned:?}");
    assert!(exists(&ns.name, "configmap/planted"));
}

#[test]
fn adopting_what_kubectl_apply_made_hands_its_fields_to_kommit() {
    let ns = TestNamespace::new("adopt-csa");
    let manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  a: \"1\"\n  b: \"2\"\n";
    kubectl_apply(&ns.name, manifest, &[]);
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  annotations:\n    kommit.dev/adopt: \"true\"\ndata:\n  a: \"1\"\n  b: \"2\"\n",
    );
    repo.commit("Settings, as kubectl applied them");
    let adopted = sync(&repo, &ns.name, &[]);
    assert_eq!(adopted.code, 0, "{adopted:?}");
    let managers = jsonpath(
        &ns.name,
        "configmap/settings",
        "{.metadata.managedFields[*].manager}",
    );
    assert!(
        !managers.contains("kubectl-client-side-apply"),
        "client-side apply's fields became kommit's: {managers}"
    );

    // A key removed in git goes live too, as after `kubectl apply --server-side`.
    repo.write(
        "deploy/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  annotations:\n    kommit.dev/adopt: \"true\"\ndata:\n  a: \"1\"\n",
    );
    repo.commit("Drop b");
    let synced = sync(&repo, &ns.name, &[]);
    assert_eq!(synced.code, 0, "{synced:?}");
    assert_eq!(
        jsonpath(&ns.name, "configmap/settings", "{.data}"),
        r#"{"a":"1"}"#
    );
}

#[test]
fn one_path_synced_into_two_namespaces_is_two_sources() {
    let staging = TestNamespace::new("staging");
    let prod = TestNamespace::new("prod");
    let repo = GitRepo::new();
    repo.write("deploy/app.yaml", &config_map("app", "v1"));
    repo.commit("Add app");
    let first = sync(&repo, &staging.name, &["--prune"]);
    assert_eq!(first.code, 0, "{first:?}");
    let second = sync(&repo, &prod.name, &["--prune"]);
    assert_eq!(second.code, 0, "{second:?}");
    assert!(
        second.stdout.contains("0 to prune"),
        "prod's sync sees nothing of staging's: {second:?}"
    );
    assert!(exists(&staging.name, "configmap/app"));
    assert!(exists(&prod.name, "configmap/app"));
}

#[test]
fn one_sync_of_a_source_at_a_time() {
    let ns = TestNamespace::new("sync-lock");
    let repo = GitRepo::new();
    repo.write("deploy/app.yaml", &config_map("app", "v1"));
    repo.commit("Add app");
    let first = sync(&repo, &ns.name, &[]);
    assert_eq!(first.code, 0, "{first:?}");
    let inventory = jsonpath(
        &ns.name,
        "configmap/app",
        "{.metadata.labels.kommit\\.dev/inventory}",
    );
    let record = format!("configmap/kommit-record-{inventory}");
    let lock = || {
        jsonpath(
            &ns.name,
            &record,
            "{.metadata.annotations.kommit\\.dev/sync-lock}",
        )
    };
    assert_eq!(lock(), "", "a finished sync leaves the source free");

    // Another sync (here: one that says so in the record) holds the source for a minute.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    kubectl_ok(&[
        "annotate",
        "-n",
        &ns.name,
        &record,
        &format!("kommit.dev/sync-lock=ci-runner-7 (pid 42)|{until}"),
    ]);
    // A sync with nothing to write takes no lock, and writes nothing, not even the record.
    let record_version = || jsonpath(&ns.name, &record, "{.metadata.resourceVersion}");
    let before = record_version();
    let no_op = sync(&repo, &ns.name, &[]);
    assert_eq!(no_op.code, 0, "{no_op:?}");
    assert_eq!(record_version(), before, "a no-op sync writes nothing");

    repo.write("deploy/app.yaml", &config_map("app", "v2"));
    repo.commit("App v2");
    let refused = sync(&repo, &ns.name, &[]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("another kommit is syncing this source")
            && refused.stderr.contains("ci-runner-7 (pid 42)"),
        "{refused:?}"
    );
    assert_eq!(jsonpath(&ns.name, "configmap/app", "{.data.k}"), "v1");

    // Once it is done (or its time ran out), the next sync goes ahead.
    kubectl_ok(&["annotate", "-n", &ns.name, &record, "kommit.dev/sync-lock-"]);
    let synced = sync(&repo, &ns.name, &[]);
    assert_eq!(synced.code, 0, "{synced:?}");
    assert_eq!(jsonpath(&ns.name, "configmap/app", "{.data.k}"), "v2");
    assert_eq!(lock(), "");
}
