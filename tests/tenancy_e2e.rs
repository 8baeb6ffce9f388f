//! Several teams on one cluster, through the operator on the sandbox: a commit acts with its
//! GitSync's ServiceAccount's rights and no more, a refusal changes nothing and says which
//! binding would allow it, the operator lends neither its machine's repositories nor its
//! credentials, and a token in a repository URL is shown nowhere.

mod common;

use std::time::Duration;

use common::git_http::GitHttpServer;
use common::*;

const TOKEN: &str = "kommit-url-token-5e1d77b2";
const WRONG_TOKEN: &str = "kommit-url-wrong-token-93c0aa41";

fn config_map(name: &str, namespace: Option<&str>, owner: &str) -> String {
    let namespace = namespace.map_or(String::new(), |ns| format!("\n  namespace: {ns}"));
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}{namespace}\ndata:\n  owner: {owner}\n"
    )
}

/// A GitSync that fetches once an hour: a test brings in each later change with a reconcile
/// request, as a push webhook would.
fn gitsync(name: &str, repo: &str, extra: &str) -> String {
    format!(
        "apiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {{name: {name}}}\nspec:\n  repo: {repo}\n  path: deploy\n  interval: 1h\n{extra}"
    )
}

fn local(repo: &GitRepo) -> String {
    format!("file://{}", repo.path_str())
}

/// A condition's field of a GitSync, e.g. `condition(ns, "shop", "Ready", "reason")`.
fn condition(namespace: &str, gitsync: &str, kind: &str, field: &str) -> String {
    jsonpath(
        namespace,
        &format!("gitsync/{gitsync}"),
        &format!("{{.status.conditions[?(@.type=='{kind}')].{field}}}"),
    )
}

fn exists(namespace: Option<&str>, object: &str) -> bool {
    let mut args = vec!["get", object];
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    kubectl(&args).status.success()
}

/// Deletes a cluster-scoped object when dropped, should a failing test have let it be made.
struct ClusterScoped(String);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", &self.0, "--ignore-not-found", "--wait=false"]);
    }
}

#[test]
fn a_team_admin_of_its_namespace_cannot_write_into_another_nor_bind_cluster_admin() {
    install_gitsync_crd();
    let a = TestNamespace::new("tenancy-a");
    let b = TestNamespace::new("tenancy-b");
    // Team a's ServiceAccount is admin of namespace a, and of nothing else.
    kubectl_ok(&["create", "serviceaccount", "deployer", "-n", &a.name]);
    kubectl_ok(&[
        "create",
        "rolebinding",
        "deployer-admin",
        "-n",
        &a.name,
        "--clusterrole=admin",
        &format!("--serviceaccount={}:deployer", a.name),
    ]);
    // Team b's ConfigMap, made by hand.
    kubectl_ok(&[
        "create",
        "configmap",
        "precious",
        "-n",
        &b.name,
        "--from-literal=owner=team-b",
    ]);

    // Team a's repository holds its own settings, and a ConfigMap aimed at namespace b.
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        &config_map("settings", None, "team-a"),
    );
    repo.write(
        "deploy/precious.yaml",
        &config_map("precious", Some(&b.name), "team-a"),
    );
    repo.commit("Settings, and team b's ConfigMap");
    let _operator = OperatorProcess::start(
        &[
            "--watch-namespace",
            &a.name,
            "--no-leader-election",
            "--allow-local-repos",
        ],
        &[],
    );
    kubectl_apply(
        &a.name,
        &gitsync(
            "shop",
            &local(&repo),
            "  serviceAccountName: deployer\n  prune: true\n",
        ),
        &[],
    );
    let ready = |field: &str| condition(&a.name, "shop", "Ready", field);
    wait_until(
        Duration::from_secs(60),
        "the commit is refused as Forbidden",
        || ready("reason") == "Forbidden",
    );
    let message = ready("message");
    assert_eq!(ready("status"), "False");
    assert_eq!(condition(&a.name, "shop", "Synced", "reason"), "Forbidden");
    for expected in [
        format!("ConfigMap {}/precious", b.name),
        // The file and line of the object refused.
        "deploy/precious.yaml:1".to_string(),
        format!("ServiceAccount {}/deployer may not", a.name),
        format!("configmaps in namespace {}", b.name),
        format!(
            "kubectl create rolebinding deployer-configmaps -n {} --clusterrole=kommit-configmaps \
             --serviceaccount={}:deployer",
            b.name, a.name
        ),
    ] {
        assert!(message.contains(&expected), "{expected}\nnot in: {message}");
    }
    // All or nothing: team b's ConfigMap is untouched, and not even a's own settings exist.
    assert_eq!(
        jsonpath(&b.name, "configmap/precious", "{.data.owner}"),
        "team-b"
    );
    assert_eq!(
        jsonpath(&b.name, "configmap/precious", "{.metadata.labels}"),
        "",
        "kommit marked team b's ConfigMap as its own"
    );
    assert!(!exists(Some(&a.name), "configmap/settings"));

    // The next commit tries to make the ServiceAccount cluster-admin instead.
    let binding = format!("{}-root", a.name);
    let _cleanup = ClusterScoped(format!("clusterrolebinding/{binding}"));
    repo.remove("deploy/precious.yaml");
    repo.write(
        "deploy/root.yaml",
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {binding}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\nsubjects:\n- kind: ServiceAccount\n  name: deployer\n  namespace: {}\n",
            a.name
        ),
    );
    repo.commit("Make the deployer cluster-admin");
    reconcile_and_wait(
        &a.name,
        "shop",
        Duration::from_secs(60),
        "the ClusterRoleBinding is refused as Forbidden",
        || ready("reason") == "Forbidden" && ready("message").contains("ClusterRoleBinding"),
    );
    let message = ready("message");
    for expected in [
        format!("ClusterRoleBinding {binding}"),
        "clusterrolebindings.rbac.authorization.k8s.io cluster-wide".to_string(),
        format!(
            "kubectl create clusterrolebinding deployer-clusterrolebindings.rbac.authorization.k8s.io \
             --clusterrole=kommit-clusterrolebindings.rbac.authorization.k8s.io \
             --serviceaccount={}:deployer",
            a.name
        ),
    ] {
        assert!(message.contains(&expected), "{expected}\nnot in: {message}");
    }
    assert!(!exists(None, &format!("clusterrolebinding/{binding}")));
    assert!(!exists(Some(&a.name), "configmap/settings"));

    // Within its own namespace the commit goes through.
    repo.remove("deploy/root.yaml");
    repo.write("deploy/extra.yaml", &config_map("extra", None, "team-a"));
    repo.commit("Only our own settings");
    reconcile_and_wait(
        &a.name,
        "shop",
        Duration::from_secs(60),
        "the commit within namespace a is applied",
        || ready("status") == "True",
    );
    assert_eq!(
        jsonpath(&a.name, "configmap/settings", "{.data.owner}"),
        "team-a"
    );
    assert_eq!(
        jsonpath(&a.name, "configmap/extra", "{.data.owner}"),
        "team-a"
    );
    assert_eq!(
        jsonpath(&b.name, "configmap/precious", "{.data.owner}"),
        "team-b"
    );
    assert!(!exists(None, &format!("clusterrolebinding/{binding}")));

    // Prune, made as the ServiceAccount too, removes what left git in namespace a.
    repo.remove("deploy/extra.yaml");
    let last = repo.commit("No extra settings");
    reconcile_and_wait(
        &a.name,
        "shop",
        Duration::from_secs(60),
        "the removed file's ConfigMap is pruned",
        || {
            jsonpath(&a.name, "gitsync/shop", "{.status.lastAppliedCommit}") == last
                && !exists(Some(&a.name), "configmap/extra")
        },
    );
    assert_eq!(ready("status"), "True", "{}", ready("message"));
    assert!(exists(Some(&a.name), "configmap/settings"));
    assert_eq!(
        jsonpath(&b.name, "configmap/precious", "{.data.owner}"),
        "team-b"
    );
}

#[test]
fn under_a_default_service_account_a_gitsync_can_do_only_what_that_account_may() {
    install_gitsync_crd();
    let ns = TestNamespace::new("tenancy-default");
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        &config_map("settings", None, "the-team"),
    );
    repo.commit("Settings");
    let _operator = OperatorProcess::start(
        &[
            "--watch-namespace",
            &ns.name,
            "--no-leader-election",
            "--allow-local-repos",
            "--default-service-account",
            "default",
        ],
        &[],
    );
    // No serviceAccountName: the namespace's `default` ServiceAccount, which may do nothing yet.
    kubectl_apply(&ns.name, &gitsync("shop", &local(&repo), ""), &[]);
    let ready = |field: &str| condition(&ns.name, "shop", "Ready", field);
    wait_until(
        Duration::from_secs(60),
        "the commit is refused as Forbidden",
        || ready("reason") == "Forbidden",
    );
    let message = ready("message");
    for expected in [
        format!("ServiceAccount {}/default may not", ns.name),
        format!("configmaps in namespace {}", ns.name),
        format!(
            "kubectl create rolebinding default-configmaps -n {0} --clusterrole=kommit-configmaps \
             --serviceaccount={0}:default",
            ns.name
        ),
    ] {
        assert!(message.contains(&expected), "{expected}\nnot in: {message}");
    }
    assert!(!exists(Some(&ns.name), "configmap/settings"));

    // The team grants its ServiceAccount rights in its own namespace: the commit goes through.
    kubectl_ok(&[
        "create",
        "rolebinding",
        "default-edit",
        "-n",
        &ns.name,
        "--clusterrole=edit",
        &format!("--serviceaccount={}:default", ns.name),
    ]);
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(60),
        "the commit is applied once the ServiceAccount may",
        || ready("status") == "True",
    );
    assert_eq!(
        jsonpath(&ns.name, "configmap/settings", "{.data.owner}"),
        "the-team"
    );
}

#[test]
fn the_operators_own_repositories_are_not_lent_without_allow_local_repos() {
    install_gitsync_crd();
    let ns = TestNamespace::new("tenancy-local");
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        &config_map("settings", None, "the-operators-disk"),
    );
    repo.commit("Settings");
    let _operator = OperatorProcess::start(
        &["--watch-namespace", &ns.name, "--no-leader-election"],
        &[],
    );
    kubectl_apply(&ns.name, &gitsync("by-url", &local(&repo), ""), &[]);
    kubectl_apply(&ns.name, &gitsync("by-path", repo.path_str(), ""), &[]);
    for name in ["by-url", "by-path"] {
        wait_until(
            Duration::from_secs(60),
            &format!("GitSync {name} is refused"),
            || condition(&ns.name, name, "Ready", "reason") == "SourceNotAllowed",
        );
        let message = condition(&ns.name, name, "Ready", "message");
        assert!(message.contains("--allow-local-repos"), "{message}");
        assert!(
            message.contains("path on the operator's machine"),
            "{message}"
        );
        assert_eq!(condition(&ns.name, name, "Stalled", "status"), "True");
    }
    assert!(!exists(Some(&ns.name), "configmap/settings"));
}

#[test]
fn a_token_in_a_repository_url_appears_nowhere() {
    install_gitsync_crd();
    let ns = TestNamespace::new("tenancy-token");
    let server = GitHttpServer::start(TOKEN);
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        &config_map("settings", None, "from-http"),
    );
    let commit = repo.commit("Settings");
    let url = server.publish(&repo, "shop.git");
    let with_token = |token: &str| url.replacen("http://", &format!("http://ci:{token}@"), 1);
    let operator = OperatorProcess::start(
        &["--watch-namespace", &ns.name, "--no-leader-election"],
        &[("KOMMIT_LOG", "kommit=debug,info")],
    );
    kubectl_apply(&ns.name, &gitsync("shop", &with_token(TOKEN), ""), &[]);
    kubectl_apply(
        &ns.name,
        &gitsync("stale", &with_token(WRONG_TOKEN), ""),
        &[],
    );
    wait_until(
        Duration::from_secs(60),
        "the commit is fetched with the URL's token and applied",
        || jsonpath(&ns.name, "gitsync/shop", "{.status.lastAppliedCommit}") == commit,
    );
    wait_until(
        Duration::from_secs(60),
        "the wrong token's GitSync reports its failed fetch",
        || condition(&ns.name, "stale", "Ready", "reason") == "SourceUnavailable",
    );
    let stale = condition(&ns.name, "stale", "Ready", "message");
    assert!(stale.contains("ci:<redacted>@127.0.0.1"), "{stale}");
    let source = jsonpath(
        &ns.name,
        "configmap/settings",
        "{.metadata.annotations.kommit\\.dev/source}",
    );
    assert!(source.contains("ci:<redacted>@127.0.0.1"), "{source}");

    // What a user can see: statuses, Events, every object kommit wrote, the operator's log,
    // and the CLI's plan of the same URL in every output format.
    let mut seen = vec![
        kubectl_ok(&[
            "get",
            "gitsyncs",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.items[*].status}",
        ]),
        kubectl_ok(&["get", "events", "-n", &ns.name, "-o", "yaml"]),
        kubectl_ok(&["get", "configmaps", "-n", &ns.name, "-o", "yaml"]),
        operator.log(),
    ];
    for output in ["text", "json", "markdown"] {
        let run = kommit(&[
            "diff",
            "--repo",
            &with_token(TOKEN),
            "--path",
            "deploy",
            "-n",
            &ns.name,
            "-o",
            output,
        ]);
        assert!(run.all().contains("<redacted>"), "{run:?}");
        seen.push(run.all());
    }
    for text in seen {
        assert!(
            !text.contains(TOKEN) && !text.contains(WRONG_TOKEN),
            "a token shows in: {text}"
        );
    }
    assert!(server.users().iter().any(|user| user == "ci"));
}

/// This machine's address on its way out (not loopback): the source of a UDP "connection" to a
/// documentation address, which sends nothing.
fn outward_address() -> String {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .connect("192.0.2.1:9")
        .expect("this test needs a network interface besides loopback (a route to 192.0.2.1)");
    let address = socket.local_addr().unwrap().ip();
    assert!(!address.is_loopback(), "{address}");
    address.to_string()
}

#[test]
fn a_token_is_never_sent_over_plain_http_to_another_machine() {
    install_gitsync_crd();
    let ns = TestNamespace::new("tenancy-plain-http");
    let server = GitHttpServer::start_on(TOKEN, &outward_address());
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        &config_map("settings", None, "over-http"),
    );
    repo.commit("Settings");
    let url = server.publish(&repo, "shop.git");
    assert!(!url.contains("127.0.0.1"), "{url}");
    let _operator = OperatorProcess::start(
        &["--watch-namespace", &ns.name, "--no-leader-election"],
        &[],
    );
    // The token in a Secret, and the token in the URL: neither goes over plain http.
    kubectl_apply(
        &ns.name,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: git-creds}}\nstringData: {{token: {TOKEN}}}\n"
        ),
        &[],
    );
    kubectl_apply(
        &ns.name,
        &gitsync("by-secret", &url, "  secretRef: {name: git-creds}\n"),
        &[],
    );
    let in_url = url.replacen("http://", &format!("http://ci:{TOKEN}@"), 1);
    kubectl_apply(&ns.name, &gitsync("by-url", &in_url, ""), &[]);
    for (name, expected) in [
        ("by-secret", "over plain http"),
        ("by-url", "does not send them over plain http"),
    ] {
        wait_until(
            Duration::from_secs(60),
            &format!("GitSync {name} reports the refused fetch"),
            || condition(&ns.name, name, "Ready", "reason") == "SourceUnavailable",
        );
        let message = condition(&ns.name, name, "Ready", "message");
        assert!(message.contains(expected), "{message}");
        assert!(message.contains("https"), "{message}");
        assert!(!message.contains(TOKEN), "{message}");
    }
    assert!(
        server.users().is_empty(),
        "the token reached the server: {:?}",
        server.users()
    );
    assert!(!exists(Some(&ns.name), "configmap/settings"));
}
