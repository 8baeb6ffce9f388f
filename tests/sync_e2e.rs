//! kommit diff / sync / status against the sandbox, with real git repositories made here.

mod common;

use std::time::Duration;

use common::*;

/// The example app of `examples/shop`, moved into the test's namespace.
fn shop_repo(namespace: &str) -> GitRepo {
    let repo = GitRepo::new();
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/shop");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let text = text
            .replace("namespace: shop", &format!("namespace: {namespace}"))
            // The harness made the namespace, not kommit: the manifest asks to adopt it.
            .replace(
                "name: shop\n",
                &format!("name: {namespace}\n  annotations:\n    kommit.dev/adopt: \"true\"\n"),
            );
        repo.write(
            &format!("deploy/{}", file.file_name().unwrap().to_str().unwrap()),
            &text,
        );
    }
    repo.commit("Add the shop app");
    repo
}

fn set_image(repo: &GitRepo, image: &str) {
    let path = repo.path().join("deploy/web.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let current = text
        .lines()
        .find(|l| l.trim_start().starts_with("image: nginx"))
        .unwrap();
    let indent = &current[..current.len() - current.trim_start().len()];
    std::fs::write(
        &path,
        text.replace(current, &format!("{indent}image: {image}")),
    )
    .unwrap();
}

fn sync(repo: &GitRepo, extra: &[&str]) -> Run {
    let mut args = vec!["sync", "--repo", repo.path_str(), "--path", "deploy"];
    args.extend_from_slice(extra);
    kommit(&args)
}

fn diff(repo: &GitRepo, extra: &[&str]) -> Run {
    let mut args = vec!["diff", "--repo", repo.path_str(), "--path", "deploy"];
    args.extend_from_slice(extra);
    kommit(&args)
}

fn resource_versions(namespace: &str) -> String {
    kubectl_ok(&[
        "get",
        "deployment,service,configmap,pod",
        "-n",
        namespace,
        "-l",
        "kommit.dev/inventory",
        "-o",
        "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{'\\n'}{end}",
    ])
}

#[test]
fn first_sync_creates_everything_and_then_the_cluster_matches_the_commit() {
    let ns = TestNamespace::new("first-sync");
    let repo = shop_repo(&ns.name);

    let first = sync(&repo, &[]);
    assert_eq!(first.code, 0, "{first:?}");
    assert!(
        first
            .stdout
            .contains("4 to create, 0 to update, 1 to adopt"),
        "the harness made the namespace, so the manifest's annotation adopts it: {first:?}"
    );
    assert!(rollout_status(&ns.name, "web", "120s").status.success());
    kubectl_ok(&[
        "wait",
        "-n",
        &ns.name,
        "pod/log-shipper",
        "--for=condition=Ready",
        "--timeout=60s",
    ]);

    // Whatever the server defaulted, the commit that was just synced diffs as unchanged.
    let after = diff(&repo, &[]);
    assert_eq!(after.code, 0, "{after:?}");
    assert!(
        after
            .stdout
            .contains("0 to create, 0 to update, 0 to replace, 0 to prune, 5 unchanged"),
        "{after:?}"
    );

    // A no-op sync writes nothing.
    let before = resource_versions(&ns.name);
    let again = sync(&repo, &[]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("no writes"), "{again:?}");
    assert_eq!(resource_versions(&ns.name), before);

    // YAML as Kubernetes means it: octal modes, and strings the author wrote stay strings.
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.spec.template.spec.volumes[0].configMap.defaultMode}"
        ),
        "420"
    );
    assert_eq!(
        jsonpath(&ns.name, "configmap/web-config", "{.data.ENABLE_CACHE}"),
        "yes"
    );
    assert_eq!(
        jsonpath(&ns.name, "configmap/web-config", "{.data.COUNTRY}"),
        "NO"
    );

    // Every object says where it came from.
    let head = repo.head();
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.metadata.annotations.kommit\\.dev/commit}"
        ),
        head
    );
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.metadata.annotations.kommit\\.dev/file}"
        ),
        "deploy/web.yaml:1"
    );

    let status = kommit(&["status", "--repo", repo.path_str(), "--path", "deploy"]);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(
        status
            .stdout
            .contains("Synced: the cluster matches the commit"),
        "{status:?}"
    );
    assert!(status.stdout.contains(&head[..7]), "{status:?}");
}

#[test]
fn an_image_change_diffs_as_that_line_and_rolls_out() {
    let ns = TestNamespace::new("image-change");
    let repo = shop_repo(&ns.name);
    assert_eq!(sync(&repo, &[]).code, 0);
    assert!(rollout_status(&ns.name, "web", "120s").status.success());

    set_image(&repo, "nginx:1.26");
    let sha = repo.commit("Bump web to nginx 1.26");
    let planned = diff(&repo, &[]);
    assert_eq!(
        planned.code, 1,
        "diff exits 1 when there are changes: {planned:?}"
    );
    let changed: Vec<&str> = planned
        .stdout
        .lines()
        // Diff lines are indented by four spaces in the text output.
        .filter_map(|l| l.strip_prefix("    "))
        .filter(|l| {
            (l.starts_with('+') || l.starts_with('-'))
                && !l.starts_with("+++")
                && !l.starts_with("---")
        })
        .collect();
    assert_eq!(
        changed,
        ["-        image: nginx:1.25", "+        image: nginx:1.26"],
        "{planned:?}"
    );
    assert!(
        planned
            .stdout
            .contains("0 to create, 1 to update, 0 to replace, 0 to prune, 4 unchanged"),
        "{planned:?}"
    );

    let json = diff(&repo, &["--output", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).expect("json output parses");
    assert_eq!(parsed["summary"]["update"], 1);
    assert_eq!(parsed["source"]["commit"]["sha"], sha.as_str());
    let markdown = diff(&repo, &["--output", "markdown"]);
    assert!(markdown.stdout.contains("```diff"), "{markdown:?}");

    let synced = sync(&repo, &[]);
    assert_eq!(synced.code, 0, "{synced:?}");
    assert!(rollout_status(&ns.name, "web", "120s").status.success());
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.spec.template.spec.containers[0].image}"
        ),
        "nginx:1.26"
    );
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.metadata.annotations.kubernetes\\.io/change-cause}"
        ),
        format!("{} Bump web to nginx 1.26", &sha[..7])
    );
    let history = kubectl_ok(&["rollout", "history", "-n", &ns.name, "deployment/web"]);
    assert!(history.contains("Bump web to nginx 1.26"), "{history}");
    assert!(history.contains("Add the shop app"), "{history}");
    // Objects the commit did not change still name the commit that last changed them.
    assert_ne!(
        jsonpath(
            &ns.name,
            "service/web",
            "{.metadata.annotations.kommit\\.dev/commit}"
        ),
        sha
    );
}

#[test]
fn a_pod_spec_change_is_planned_and_done_as_a_replace() {
    let ns = TestNamespace::new("pod-replace");
    let repo = shop_repo(&ns.name);
    assert_eq!(sync(&repo, &[]).code, 0);
    kubectl_ok(&[
        "wait",
        "-n",
        &ns.name,
        "pod/log-shipper",
        "--for=condition=Ready",
        "--timeout=60s",
    ]);
    let old_uid = jsonpath(&ns.name, "pod/log-shipper", "{.metadata.uid}");

    let path = repo.path().join("deploy/log-shipper.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("value: info", "value: debug");
    std::fs::write(&path, text).unwrap();
    repo.commit("Ship debug logs");

    let planned = diff(&repo, &[]);
    assert_eq!(planned.code, 1, "{planned:?}");
    assert!(planned.stdout.contains("replace"), "{planned:?}");
    assert!(planned.stdout.contains("1 to replace"), "{planned:?}");
    assert!(
        planned
            .stdout
            .contains("    -      value: info\n    +      value: debug\n"),
        "{planned:?}"
    );

    let synced = sync(&repo, &[]);
    assert_eq!(synced.code, 0, "{synced:?}");
    let new_uid = jsonpath(&ns.name, "pod/log-shipper", "{.metadata.uid}");
    assert_ne!(new_uid, old_uid, "the pod was recreated");
    assert_eq!(
        jsonpath(
            &ns.name,
            "pod/log-shipper",
            "{.spec.containers[1].env[0].value}"
        ),
        "debug"
    );
    assert_eq!(diff(&repo, &[]).code, 0);
}

#[test]
fn prune_deletes_what_left_git_and_nothing_else() {
    let ns = TestNamespace::new("prune");
    let repo = GitRepo::new();
    for name in ["a", "b", "c"] {
        repo.write(
            &format!("cm/{name}.yaml"),
            &format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {}\ndata:\n  k: v\n", ns.name),
        );
    }
    repo.commit("Three settings");
    let sync = |extra: &[&str]| {
        let mut args = vec!["sync", "--repo", repo.path_str(), "--path", "cm"];
        args.extend_from_slice(extra);
        kommit(&args)
    };
    assert_eq!(sync(&[]).code, 0);
    // Someone else's object in the same namespace, never to be touched.
    kubectl_ok(&[
        "create",
        "configmap",
        "theirs",
        "-n",
        &ns.name,
        "--from-literal=k=v",
    ]);

    repo.remove("cm/b.yaml");
    repo.commit("Drop b");
    let without_prune = sync(&[]);
    assert_eq!(without_prune.code, 0, "{without_prune:?}");
    assert!(
        kubectl(&["get", "configmap", "b", "-n", &ns.name])
            .status
            .success(),
        "no --prune, no delete"
    );

    let planned = kommit(&["diff", "--repo", repo.path_str(), "--path", "cm", "--prune"]);
    assert_eq!(planned.code, 1, "{planned:?}");
    assert!(
        planned.stdout.contains("prune") && planned.stdout.contains("ConfigMap"),
        "{planned:?}"
    );
    let pruned = sync(&["--prune"]);
    assert_eq!(pruned.code, 0, "{pruned:?}");
    assert!(
        !kubectl(&["get", "configmap", "b", "-n", &ns.name])
            .status
            .success(),
        "b is pruned"
    );
    for kept in ["a", "c", "theirs"] {
        assert!(
            kubectl(&["get", "configmap", kept, "-n", &ns.name])
                .status
                .success(),
            "{kept} is kept"
        );
    }

    // The classic accident: an emptied folder would delete the whole app. kommit refuses.
    repo.remove("cm");
    repo.write("cm/README.md", "moved elsewhere\n");
    repo.commit("Move the settings");
    let guarded = sync(&["--prune"]);
    assert_eq!(guarded.code, 2, "{guarded:?}");
    assert!(guarded.stderr.contains("--allow-mass-prune"), "{guarded:?}");
    for kept in ["a", "c"] {
        assert!(
            kubectl(&["get", "configmap", kept, "-n", &ns.name])
                .status
                .success(),
            "{kept} survives the guard"
        );
    }
    let confirmed = sync(&["--prune", "--allow-mass-prune"]);
    assert_eq!(confirmed.code, 0, "{confirmed:?}");
    assert!(
        !kubectl(&["get", "configmap", "a", "-n", &ns.name])
            .status
            .success()
    );
    assert!(
        kubectl(&["get", "configmap", "theirs", "-n", &ns.name])
            .status
            .success()
    );
}

#[test]
fn a_broken_commit_changes_nothing_and_says_where() {
    let ns = TestNamespace::new("broken-commit");
    let repo = shop_repo(&ns.name);
    assert_eq!(sync(&repo, &[]).code, 0);
    // Let the controllers finish writing status before taking the snapshot.
    assert!(rollout_status(&ns.name, "web", "120s").status.success());
    kubectl_ok(&[
        "wait",
        "-n",
        &ns.name,
        "pod/log-shipper",
        "--for=condition=Ready",
        "--timeout=60s",
    ]);
    let before = resource_versions(&ns.name);

    // A good change next to a YAML error: neither is applied.
    set_image(&repo, "nginx:1.27");
    repo.write(
        "deploy/extra.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n  labels: [oops\n",
    );
    repo.commit("Half-broken commit");
    let run = sync(&repo, &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("deploy/extra.yaml:5"),
        "names file and line: {run:?}"
    );
    assert!(run.stderr.contains("nothing was changed"), "{run:?}");
    assert_eq!(resource_versions(&ns.name), before);
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.spec.template.spec.containers[0].image}"
        ),
        "nginx:1.25"
    );

    // An unknown kind and a value the server rejects: both reported, still nothing applied.
    repo.write(
        "deploy/extra.yaml",
        "apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: g\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  ports:\n  - port: 99999\n",
    );
    repo.commit("Unknown kind and an invalid port");
    let run = sync(&repo, &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("deploy/extra.yaml:1") && run.stderr.contains("Gadget"),
        "{run:?}"
    );
    assert_eq!(resource_versions(&ns.name), before);

    repo.write(
        "deploy/extra.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  ports:\n  - port: 99999\n",
    );
    repo.commit("Only the invalid port");
    let run = sync(&repo, &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("deploy/extra.yaml:1") && run.stderr.contains("99999"),
        "{run:?}"
    );
    assert_eq!(resource_versions(&ns.name), before);

    // A bad revision and a missing path are clear errors too.
    let bad_rev = kommit(&["diff", "--repo", repo.path_str(), "--rev", "no-such-branch"]);
    assert_eq!(bad_rev.code, 2, "{bad_rev:?}");
    assert!(
        bad_rev.stderr.contains("revision 'no-such-branch'"),
        "{bad_rev:?}"
    );
    let bad_path = kommit(&["diff", "--repo", repo.path_str(), "--path", "nowhere"]);
    assert_eq!(bad_path.code, 2, "{bad_path:?}");
    assert!(
        bad_path.stderr.contains("path 'nowhere' does not exist")
            && bad_path.stderr.contains("deploy"),
        "{bad_path:?}"
    );
}

#[test]
fn a_field_owned_by_another_manager_is_a_conflict_until_forced() {
    let ns = TestNamespace::new("conflict");
    let repo = GitRepo::new();
    let config = |value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: limits\n  namespace: {}\ndata:\n  max: \"{value}\"\n",
            ns.name
        )
    };
    repo.write("limits.yaml", &config("10"));
    repo.commit("Set the limit");
    assert_eq!(kommit(&["sync", "--repo", repo.path_str()]).code, 0);

    // Someone takes the field over with their own server-side apply.
    kubectl_apply(
        &ns.name,
        &config("20"),
        &[
            "--server-side",
            "--field-manager=oncall",
            "--force-conflicts",
        ],
    );
    repo.write("limits.yaml", &config("30"));
    repo.commit("Raise the limit");

    let run = kommit(&["sync", "--repo", repo.path_str()]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("ConfigMap limits: .data.max (oncall)"),
        "names field and manager: {run:?}"
    );
    assert!(run.stderr.contains("--force-conflicts"), "{run:?}");
    assert_eq!(jsonpath(&ns.name, "configmap/limits", "{.data.max}"), "20");

    let forced = kommit(&["sync", "--repo", repo.path_str(), "--force-conflicts"]);
    assert_eq!(forced.code, 0, "{forced:?}");
    assert_eq!(jsonpath(&ns.name, "configmap/limits", "{.data.max}"), "30");
}

#[test]
fn secret_values_never_appear_in_any_output() {
    let ns = TestNamespace::new("secrets");
    let repo = GitRepo::new();
    let secret = |password: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: {}\ntype: Opaque\nstringData:\n  password: {password}\n  user: admin-user\n",
            ns.name
        )
    };
    repo.write("db.yaml", &secret("hunter2-first"));
    repo.commit("Database credentials");
    let outputs = |password_seen: &[&str]| {
        let mut runs = Vec::new();
        for output in ["text", "json", "markdown"] {
            runs.push(kommit(&["diff", "--repo", repo.path_str(), "-o", output]));
        }
        runs.push(kommit(&["status", "--repo", repo.path_str(), "-o", "json"]));
        for run in &runs {
            for secret in password_seen {
                assert!(
                    !run.all().contains(secret),
                    "a secret value leaked: {run:?}"
                );
            }
            // base64 of the values, as the API server stores them
            for encoded in [
                "aHVudGVyMi1maXJzdA",
                "aHVudGVyMi1zZWNvbmQ",
                "YWRtaW4tdXNlcg",
            ] {
                assert!(
                    !run.all().contains(encoded),
                    "an encoded secret value leaked: {run:?}"
                );
            }
        }
        runs
    };
    outputs(&["hunter2-first", "admin-user"]);
    let synced = kommit(&["sync", "--repo", repo.path_str(), "-v"]);
    assert_eq!(synced.code, 0, "{synced:?}");
    assert!(
        !synced.all().contains("hunter2") && !synced.all().contains("aHVudGVy"),
        "{synced:?}"
    );

    repo.write("db.yaml", &secret("hunter2-second"));
    repo.commit("Rotate the password");
    let runs = outputs(&["hunter2-first", "hunter2-second", "admin-user"]);
    assert_eq!(runs[0].code, 1, "{:?}", runs[0]);
    assert!(
        runs[0].stdout.contains("password: '*** (after)'")
            || runs[0].stdout.contains("password: \"*** (after)\""),
        "{:?}",
        runs[0]
    );
    let synced = kommit(&["sync", "--repo", repo.path_str(), "-vv"]);
    assert_eq!(synced.code, 0, "{synced:?}");
    assert!(
        !synced.all().contains("hunter2") && !synced.all().contains("aHVudGVy"),
        "{synced:?}"
    );
}

#[test]
fn an_unreachable_cluster_is_a_clear_error() {
    let repo = GitRepo::new();
    repo.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    repo.commit("x");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kubeconfig");
    std::fs::write(
        &config,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n",
    )
    .unwrap();
    let run = kommit(&[
        "diff",
        "--repo",
        repo.path_str(),
        "--kubeconfig",
        config.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("cannot reach the Kubernetes API server at https://127.0.0.1:1"),
        "{run:?}"
    );
    let _ = Duration::from_secs(0);
}

#[test]
fn a_crd_its_resource_and_another_object_sync_together_the_first_time() {
    let ns = TestNamespace::new("crd-first");
    // A group per test run: CRDs are cluster-wide.
    let group = format!("{}.example.com", ns.name);
    let repo = GitRepo::new();
    repo.write(
        "deploy/crd.yaml",
        &format!(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: widgets, singular: widget, kind: Widget}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec:\n            type: object\n            properties:\n              size: {{type: integer}}\n"
        ),
    )
    .write(
        "deploy/widget.yaml",
        &format!("apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: w\nspec:\n  size: 3\n"),
    )
    .write(
        "deploy/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  a: \"1\"\n",
    );
    repo.commit("A Widget kind, a Widget and a ConfigMap");
    let first = sync(&repo, &["-n", &ns.name, "--no-wait"]);
    let crd = format!("customresourcedefinition/widgets.{group}");
    let cleanup = || {
        let _ = kubectl(&["delete", &crd, "--wait=false"]);
    };
    if first.code != 0 {
        cleanup();
        panic!("{first:?}");
    }
    assert_eq!(
        jsonpath(&ns.name, &format!("widget.{group}/w"), "{.spec.size}"),
        "3"
    );
    assert!(
        kubectl(&["get", "-n", &ns.name, "configmap/settings"])
            .status
            .success()
    );
    let again = diff(&repo, &["-n", &ns.name]);
    cleanup();
    assert_eq!(again.code, 0, "in sync after the first sync: {again:?}");
}

#[test]
fn a_git_server_that_never_answers_is_given_up_on_with_a_clear_error() {
    // Accepts connections and never says a word.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = server.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in server.incoming() {
            held.push(stream);
        }
    });
    let url = format!("http://{address}/shop.git");
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(kommit(&["diff", "--repo", &url, "--git-timeout", "2s"]));
    });
    let run = finished
        .recv_timeout(Duration::from_secs(120))
        .expect("kommit gives up on its own");
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("did not answer within 2s") && run.stderr.contains("--git-timeout"),
        "{run:?}"
    );
}

#[test]
fn a_commit_over_a_budget_is_refused_whole_naming_the_file_and_how_to_raise_it() {
    let ns = TestNamespace::new("budgets");
    let repo = GitRepo::new();
    let many: String = (0..30)
        .map(|i| format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}}}\n"))
        .collect();
    repo.write("deploy/many.yaml", &many);
    repo.commit("Thirty ConfigMaps");
    let too_many = sync(&repo, &["-n", &ns.name, "--max-objects", "20", "--no-wait"]);
    assert_eq!(too_many.code, 2, "{too_many:?}");
    assert!(
        too_many.stderr.contains("deploy/many.yaml") && too_many.stderr.contains("--max-objects"),
        "{too_many:?}"
    );
    let too_big = sync(&repo, &["-n", &ns.name, "--max-bytes", "1Ki", "--no-wait"]);
    assert_eq!(too_big.code, 2, "{too_big:?}");
    assert!(
        too_big.stderr.contains("over the budget of 1 KiB")
            && too_big.stderr.contains("--max-bytes"),
        "{too_big:?}"
    );
    let written = kubectl_ok(&[
        "get",
        "configmaps",
        "-n",
        &ns.name,
        "-l",
        "kommit.dev/inventory",
        "-o",
        "name",
    ]);
    assert!(written.trim().is_empty(), "nothing is written: {written}");
    let within = sync(&repo, &["-n", &ns.name, "--no-wait"]);
    assert_eq!(within.code, 0, "{within:?}");
}
