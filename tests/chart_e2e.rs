//! The Helm chart in `charts/kommit`: it lints and renders what a cluster operator expects, its
//! manifests pass a server-side dry run, and its RBAC is exactly enough: the operator, run
//! out-of-cluster as the chart's ServiceAccount (impersonated), does its whole job, and the same
//! run with one permission less fails to sync.
//!
//! Helm comes from `scripts/helm --build` (which `scripts/test` runs), or `KOMMIT_HELM`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> String {
    repo_root().join("charts/kommit").display().to_string()
}

/// The helm binary: `KOMMIT_HELM`, else the one `scripts/helm --build` builds. Never skips.
fn helm_binary() -> PathBuf {
    let path = std::env::var_os("KOMMIT_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/tools/bin/helm"));
    assert!(
        path.exists(),
        "helm is missing ({}): build it with `scripts/helm --build` (pinned version, cached in \
         target/tools; `scripts/test` does this), or point KOMMIT_HELM at a helm binary",
        path.display()
    );
    path
}

fn helm(args: &[&str]) -> Output {
    Command::new(helm_binary())
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            repo_root().join("target/tools/helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            repo_root().join("target/tools/helm-config"),
        )
        .env("HELM_DATA_HOME", repo_root().join("target/tools/helm-data"))
        .output()
        .expect("helm runs")
}

fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm template` of the chart; `values` are `--set`/`--set-json` style arguments.
fn render(release: &str, namespace: &str, values: &[&str]) -> String {
    let chart = chart_dir();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    args.extend_from_slice(values);
    helm_ok(&args)
}

/// The objects of a multi-document YAML text.
fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("the chart renders valid YAML: {e}\n{yaml}"))
        .into_iter()
        .filter(|doc| doc.is_object())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "exactly one {kind} is rendered: {found:#?}");
    found[0]
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every rule of every Role and ClusterRole, with where it comes from.
fn rules(docs: &[Value]) -> Vec<(String, Value)> {
    docs.iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
        .flat_map(|d| {
            let name = format!(
                "{} {}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["namespace"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap()
            );
            d["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |r| (name.clone(), r))
        })
        .collect()
}

/// Whether some rule of `docs` allows `verb` on `group`/`resource`.
fn allows(docs: &[Value], group: &str, resource: &str, verb: &str) -> bool {
    rules(docs).iter().any(|(_, r)| {
        strings(&r["apiGroups"]).iter().any(|g| g == group)
            && strings(&r["resources"]).iter().any(|x| x == resource)
            && strings(&r["verbs"]).iter().any(|v| v == verb)
    })
}

fn container(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(docs: &[Value]) -> Vec<String> {
    strings(&container(docs)["args"])
}

/// The value that follows `flag` in the container's arguments.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn env_of<'a>(docs: &'a [Value], name: &str) -> Option<&'a Value> {
    container(docs)["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == name))
}

/// A release name no other test run uses (cluster-scoped RBAC objects are named after it).
fn unique_release(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn write_temp(dir: &Path, name: &str, content: &str) -> String {
    let file = dir.join(name);
    std::fs::write(&file, content).unwrap();
    file.display().to_string()
}

#[test]
fn the_chart_ships_the_crd_that_kommit_crd_prints() {
    let shipped = std::fs::read_to_string(repo_root().join("charts/kommit/crds/gitsyncs.yaml"))
        .expect("charts/kommit/crds/gitsyncs.yaml exists");
    let out = Command::new(env!("CARGO_BIN_EXE_kommit"))
        .arg("crd")
        .output()
        .expect("kommit crd runs");
    assert!(out.status.success(), "kommit crd fails: {out:?}");
    let generated = String::from_utf8(out.stdout).unwrap();
    if shipped != generated {
        let first = shipped
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| shipped.lines().count().min(generated.lines().count()));
        panic!(
            "charts/kommit/crds/gitsyncs.yaml differs from `kommit crd` (first at line {}: \
             shipped {:?}, generated {:?}); regenerate it with\n    cargo run -q -- crd > \
             charts/kommit/crds/gitsyncs.yaml",
            first + 1,
            shipped.lines().nth(first),
            generated.lines().nth(first)
        );
    }
}

/// `tenancy.mode=open`: every GitSync acts as the operator, with the chart's deploy rules.
const OPEN: [&str; 2] = ["--set", "tenancy.mode=open"];

/// `values` with `tenancy.mode=open` before them.
fn open_mode<'a>(values: &[&'a str]) -> Vec<&'a str> {
    OPEN.iter().chain(values).copied().collect()
}

#[test]
fn the_chart_lints_and_renders_a_locked_down_operator_with_least_privilege() {
    let chart = chart_dir();
    helm_ok(&["lint", "--strict", &chart]);
    helm_ok(&["lint", "--strict", &chart, "--set", "rbac.scope=namespace"]);
    helm_ok(&["lint", "--strict", &chart, "--set", "tenancy.mode=open"]);
    helm_ok(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "tenancy.mode=open",
        "--set",
        "rbac.scope=namespace",
    ]);

    let docs = documents(&render("kommit", "kommit", &OPEN));
    assert_eq!(
        kinds(&docs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "NetworkPolicy",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ],
        "no webhook Secret unless one is asked for"
    );

    // The pod: non-root, read-only root filesystem, nothing to escalate with.
    let deployment = one(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(pod["serviceAccountName"], "kommit");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 0);
    let c = container(&docs);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    // What scripts/image builds: localhost/kommit tagged with the crate's version.
    assert_eq!(
        c["image"],
        format!("localhost/kommit:{}", env!("CARGO_PKG_VERSION"))
    );

    // Probes on the HTTP server, which is also what the Service exposes.
    assert_eq!(c["ports"][0]["name"], "http");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http");
    let service = one(&docs, "Service");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert_eq!(service["spec"]["ports"][0]["name"], "http");
    assert_eq!(service["spec"]["ports"][0]["port"], 8080);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    for key in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][key][resource].is_string(),
                "resources.{key}.{resource} is set: {}",
                c["resources"]
            );
        }
    }

    // Arguments and environment: every namespace, leader election on the release's Lease, the
    // pod's namespace for the Lease, and writable emptyDirs for git mirrors and /tmp.
    let args = args_of(&docs);
    assert_eq!(args[0], "operator");
    assert_eq!(flag(&args, "--listen"), Some("0.0.0.0:8080"));
    assert_eq!(flag(&args, "--lease-name"), Some("kommit"));
    assert!(!args.contains(&"--watch-namespace".to_string()), "{args:?}");
    assert!(!args.contains(&"--no-leader-election".to_string()));
    assert_eq!(
        env_of(&docs, "POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert!(env_of(&docs, "KOMMIT_WEBHOOK_SECRET").is_none());
    let cache_dir = env_of(&docs, "KOMMIT_CACHE_DIR").unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let volumes = pod["volumes"].as_array().unwrap();
    for path in [cache_dir.as_str(), "/tmp"] {
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{path} is mounted: {mounts:?}"));
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert!(volume["emptyDir"].is_object(), "{path} is an emptyDir");
    }

    // RBAC: a ClusterRole bound to the ServiceAccount, no wildcard anywhere, nothing that could
    // grant more (RBAC objects, impersonation, escalation), the Lease only in the release
    // namespace and, except for create, only by name.
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], "kommit");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "kommit", "namespace": "kommit"}])
    );
    for (role, rule) in rules(&docs) {
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(
                !strings(&rule[field]).iter().any(|s| s.contains('*')),
                "{role} has a wildcard in {field}: {rule}"
            );
        }
        for verb in ["escalate", "bind", "impersonate", "deletecollection"] {
            assert!(
                !strings(&rule["verbs"]).iter().any(|v| v == verb),
                "{role}: {rule}"
            );
        }
        assert!(
            !strings(&rule["apiGroups"])
                .iter()
                .any(|g| g == "rbac.authorization.k8s.io"),
            "{role}: {rule}"
        );
        if strings(&rule["apiGroups"]) == ["coordination.k8s.io"] {
            assert_eq!(role, "Role kommit/kommit-leader-election");
            let verbs = strings(&rule["verbs"]);
            assert!(
                verbs == ["create"] || strings(&rule["resourceNames"]) == ["kommit"],
                "{rule}"
            );
        }
    }
    for (group, resource, verb) in [
        ("kommit.dev", "gitsyncs", "watch"),
        ("kommit.dev", "gitsyncs/status", "patch"),
        ("events.k8s.io", "events", "create"),
        ("apps", "replicasets", "watch"),
        ("apps", "deployments", "patch"),
        ("", "configmaps", "create"),
        ("", "services", "delete"),
        ("coordination.k8s.io", "leases", "create"),
    ] {
        assert!(
            allows(&docs, group, resource, verb),
            "{verb} on {group}/{resource}"
        );
    }
    assert!(!allows(&docs, "", "namespaces", "delete"));
    assert!(!allows(&docs, "", "nodes", "get"));
    assert!(!allows(&docs, "apps", "replicasets", "delete"));

    // Namespaced scope: nothing cluster-wide, one Role per namespace kommit deploys into, and
    // with exactly one namespace the operator watches only that one.
    let docs = documents(&render(
        "kommit",
        "kommit",
        &open_mode(&[
            "--set",
            "rbac.scope=namespace",
            "--set",
            "rbac.namespaces={shop}",
        ]),
    ));
    assert!(of_kind(&docs, "ClusterRole").is_empty());
    assert!(of_kind(&docs, "ClusterRoleBinding").is_empty());
    assert_eq!(flag(&args_of(&docs), "--watch-namespace"), Some("shop"));
    let role_namespaces = |docs: &[Value]| {
        let mut found: Vec<String> = of_kind(docs, "Role")
            .iter()
            .map(|r| {
                format!(
                    "{}/{}",
                    r["metadata"]["namespace"].as_str().unwrap(),
                    r["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        found.sort();
        found
    };
    assert_eq!(
        role_namespaces(&docs),
        [
            "kommit/kommit-leader-election",
            "shop/kommit",
            "shop/kommit-gitsyncs"
        ]
    );
    assert_eq!(of_kind(&docs, "RoleBinding").len(), 3);
    // Several namespaces: the GitSyncs live in the release namespace and deploy into them.
    let docs = documents(&render(
        "kommit",
        "kommit",
        &open_mode(&[
            "--set",
            "rbac.scope=namespace",
            "--set",
            "rbac.namespaces={shop,blog}",
        ]),
    ));
    assert_eq!(flag(&args_of(&docs), "--watch-namespace"), Some("kommit"));
    assert_eq!(
        role_namespaces(&docs),
        [
            "blog/kommit",
            "kommit/kommit-gitsyncs",
            "kommit/kommit-leader-election",
            "shop/kommit"
        ]
    );

    // Webhook secrets: made from webhook.secret, or taken from an existing Secret.
    let docs = documents(&render(
        "kommit",
        "kommit",
        &["--set", "webhook.secret=not-a-real-secret"],
    ));
    let secret = one(&docs, "Secret");
    assert_eq!(secret["metadata"]["name"], "kommit-webhook");
    assert!(secret["data"]["webhook-secret"].is_string());
    assert_eq!(
        env_of(&docs, "KOMMIT_WEBHOOK_SECRET").unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": "kommit-webhook", "key": "webhook-secret"})
    );
    let docs = documents(&render(
        "kommit",
        "kommit",
        &[
            "--set",
            "webhook.secretName=hooks",
            "--set",
            "webhook.secretKey=github",
        ],
    ));
    assert!(of_kind(&docs, "Secret").is_empty());
    assert_eq!(
        env_of(&docs, "KOMMIT_WEBHOOK_SECRET").unwrap()["valueFrom"]["secretKeyRef"],
        json!({"name": "hooks", "key": "github"})
    );

    // Other choices: no leader election, the cluster-admin escape hatch, a bad scope.
    let docs = documents(&render(
        "kommit",
        "kommit",
        &["--set", "leaderElection.enabled=false"],
    ));
    assert!(args_of(&docs).contains(&"--no-leader-election".to_string()));
    assert!(!allows(&docs, "coordination.k8s.io", "leases", "create"));
    let docs = documents(&render(
        "kommit",
        "kommit",
        &open_mode(&["--set", "rbac.clusterAdmin=true"]),
    ));
    assert!(of_kind(&docs, "ClusterRole").is_empty());
    assert_eq!(
        one(&docs, "ClusterRoleBinding")["roleRef"]["name"],
        "cluster-admin"
    );
    let bad = helm(&[
        "template",
        "kommit",
        &chart,
        "--set",
        "rbac.scope=everywhere",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("rbac"));
    for bad_values in [
        ["--set", "tenancy.mode=shared"],
        ["--set", "rbac.clusterAdmin=true"],
    ] {
        let mut args = vec!["template", "kommit", chart.as_str()];
        args.extend(bad_values);
        let bad = helm(&args);
        assert!(!bad.status.success(), "{bad_values:?} is refused");
        assert!(
            String::from_utf8_lossy(&bad.stderr).contains("tenancy"),
            "{}",
            String::from_utf8_lossy(&bad.stderr)
        );
    }
}

#[test]
fn the_locked_chart_gives_the_operator_only_gitsyncs_events_and_impersonation() {
    for (scope, values) in [
        ("cluster", vec![]),
        (
            "namespace",
            vec![
                "--set",
                "rbac.scope=namespace",
                "--set",
                "rbac.namespaces={shop}",
            ],
        ),
    ] {
        let docs = documents(&render("kommit", "kommit", &values));
        let args = args_of(&docs);
        assert_eq!(
            flag(&args, "--default-service-account"),
            Some("default"),
            "{scope}: {args:?}"
        );
        // Nothing to deploy with: every write goes through a GitSync's ServiceAccount.
        for (group, resource, verb) in [
            ("apps", "deployments", "patch"),
            ("", "configmaps", "create"),
            ("", "services", "delete"),
            ("", "pods", "list"),
            ("", "serviceaccounts", "create"),
        ] {
            assert!(
                !allows(&docs, group, resource, verb),
                "{scope}: {verb} on {group}/{resource}"
            );
        }
        for (group, resource, verb) in [
            ("kommit.dev", "gitsyncs", "watch"),
            ("kommit.dev", "gitsyncs/status", "patch"),
            ("", "secrets", "get"),
            ("events.k8s.io", "events", "create"),
            ("", "serviceaccounts", "impersonate"),
            ("coordination.k8s.io", "leases", "create"),
        ] {
            assert!(
                allows(&docs, group, resource, verb),
                "{scope}: {verb} on {group}/{resource}"
            );
        }
        // Impersonating groups or users would reach any of them, system:masters included.
        for resource in ["groups", "users", "userextras", "uids"] {
            assert!(
                !allows(&docs, "", resource, "impersonate")
                    && !allows(&docs, "authentication.k8s.io", resource, "impersonate"),
                "{scope}: impersonate on {resource}"
            );
        }
        for (role, rule) in rules(&docs) {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "{role} has a wildcard in {field}: {rule}"
                );
            }
        }
        if scope == "namespace" {
            assert!(of_kind(&docs, "ClusterRole").is_empty());
            assert!(of_kind(&docs, "ClusterRoleBinding").is_empty());
        }
    }
    let docs = documents(&render(
        "kommit",
        "kommit",
        &["--set", "tenancy.defaultServiceAccount=kommit-deployer"],
    ));
    assert_eq!(
        flag(&args_of(&docs), "--default-service-account"),
        Some("kommit-deployer")
    );
    let docs = documents(&render("kommit", "kommit", &OPEN));
    assert!(flag(&args_of(&docs), "--default-service-account").is_none());
}

#[test]
fn previews_give_the_operator_namespaces_and_bind_on_one_role_only_when_enabled() {
    let off = documents(&render("kommit", "kommit", &[]));
    assert!(
        !allows(&off, "", "namespaces", "create"),
        "previews are off by default"
    );
    let docs = documents(&render(
        "kommit",
        "kommit",
        &["--set", "previews.enabled=true"],
    ));
    for (group, resource, verb) in [
        ("", "namespaces", "create"),
        ("", "namespaces", "delete"),
        ("", "resourcequotas", "patch"),
        ("", "limitranges", "patch"),
        ("networking.k8s.io", "networkpolicies", "patch"),
        ("rbac.authorization.k8s.io", "rolebindings", "create"),
    ] {
        assert!(
            allows(&docs, group, resource, verb),
            "{verb} on {group}/{resource}"
        );
    }
    let bind: Vec<_> = rules(&docs)
        .into_iter()
        .filter(|(_, r)| strings(&r["verbs"]).contains(&"bind".to_string()))
        .collect();
    assert_eq!(bind.len(), 1, "{bind:#?}");
    assert_eq!(
        strings(&bind[0].1["resourceNames"]),
        vec!["edit"],
        "bind on one role only"
    );
    let refused = helm(&[
        "template",
        "kommit",
        &chart_dir(),
        "--set",
        "previews.enabled=true",
        "--set",
        "rbac.scope=namespace",
        "--set",
        "rbac.namespaces={shop}",
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("previews.enabled needs rbac.scope=cluster")
    );
}

#[test]
fn the_rendered_chart_passes_a_server_side_dry_run_under_the_restricted_pod_security_standard() {
    let ns = TestNamespace::new("chart dry run");
    kubectl_ok(&[
        "label",
        "namespace",
        &ns.name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/warn=restricted",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let release = unique_release("dry");
    for (name, values) in [
        ("cluster", vec!["--include-crds"]),
        ("open", vec!["--include-crds", "--set", "tenancy.mode=open"]),
        (
            "namespace",
            vec![
                "--include-crds",
                "--set",
                "rbac.scope=namespace",
                "--set",
                "webhook.secret=not-a-real-secret",
            ],
        ),
    ] {
        let rendered = render(&release, &ns.name, &values);
        let file = write_temp(dir.path(), &format!("{name}.yaml"), &rendered);
        // The CRD may exist already (other tests install it): a dry run of the same manager's
        // apply is idempotent.
        let out = kubectl(&[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--force-conflicts",
            "-f",
            &file,
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "the {name}-scoped chart passes a server-side dry run: {stdout}{stderr}"
        );
        assert!(
            !stderr.contains("PodSecurity"),
            "the Deployment meets the restricted Pod Security Standard: {stderr}"
        );
        for kind in ["customresourcedefinition", "deployment", "service", "role"] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with(&format!("{kind}."))
                        || l.starts_with(&format!("{kind}/"))),
                "{kind} is in the dry run: {stdout}"
            );
        }

        // The pod the Deployment would make is admitted by the enforcing namespace (its
        // ServiceAccount must exist for that, so it is created for real).
        let docs = documents(&rendered);
        let account = write_temp(
            dir.path(),
            "serviceaccount.json",
            &one(&docs, "ServiceAccount").to_string(),
        );
        kubectl_ok(&["apply", "--server-side", "-f", &account]);
        let template = &one(&docs, "Deployment")["spec"]["template"];
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "kommit-pod", "namespace": ns.name, "labels": template["metadata"]["labels"]},
            "spec": template["spec"],
        });
        let file = write_temp(dir.path(), "pod.json", &pod.to_string());
        let out = kubectl(&["create", "--dry-run=server", "-f", &file]);
        assert!(
            out.status.success(),
            "the operator's pod is admitted under pod-security.kubernetes.io/enforce=restricted: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_chart_opens_only_the_http_port_and_keeps_a_replica_through_drains() {
    let docs = documents(&render("kommit", "kommit", &[]));
    let policy = one(&docs, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        one(&docs, "Deployment")["spec"]["selector"]["matchLabels"],
        "the policy selects the operator's pods"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{"ports": [{"port": "http", "protocol": "TCP"}]}]),
        "by default only the HTTP port is open, to any source"
    );
    assert!(
        of_kind(&docs, "PodDisruptionBudget").is_empty(),
        "no PodDisruptionBudget for a single replica (it would block every drain)"
    );

    let peers = r#"networkPolicy.ingressFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#;
    let docs = documents(&render(
        "kommit",
        "kommit",
        &["--set-json", peers, "--set", "replicaCount=2"],
    ));
    let ingress = &one(&docs, "NetworkPolicy")["spec"]["ingress"][0];
    assert_eq!(
        ingress["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert_eq!(ingress["ports"][0]["port"], "http");
    let budget = one(&docs, "PodDisruptionBudget");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert_eq!(
        budget["spec"]["selector"]["matchLabels"],
        one(&docs, "Deployment")["spec"]["selector"]["matchLabels"]
    );

    let docs = documents(&render(
        "kommit",
        "kommit",
        &[
            "--set",
            "networkPolicy.enabled=false",
            "--set",
            "replicaCount=3",
            "--set",
            "podDisruptionBudget.enabled=false",
        ],
    ));
    assert!(of_kind(&docs, "NetworkPolicy").is_empty());
    assert!(of_kind(&docs, "PodDisruptionBudget").is_empty());
}

#[test]
fn install_yaml_is_the_chart_rendered_with_its_default_values() {
    let path = repo_root().join("install.yaml");
    let shipped =
        std::fs::read_to_string(&path).expect("install.yaml exists at the repository root");
    let shipped_docs = documents(&shipped);
    let chart_docs = documents(&render("kommit", "kommit", &["--include-crds"]));
    let (namespace, rest) = shipped_docs
        .split_first()
        .expect("install.yaml holds objects");
    assert_eq!(
        namespace["kind"], "Namespace",
        "install.yaml starts with its namespace"
    );
    assert_eq!(namespace["metadata"]["name"], "kommit");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    let name = |d: &Value| {
        format!(
            "{} {}",
            d["kind"].as_str().unwrap_or_default(),
            d["metadata"]["name"].as_str().unwrap_or_default()
        )
    };
    assert_eq!(
        rest.iter().map(name).collect::<Vec<_>>(),
        chart_docs.iter().map(name).collect::<Vec<_>>(),
        "install.yaml holds the chart's objects: run scripts/install-yaml"
    );
    for (shipped, rendered) in rest.iter().zip(&chart_docs) {
        assert!(
            shipped == rendered,
            "{} in install.yaml differs from the chart rendered with its default values: run \
             scripts/install-yaml",
            name(shipped)
        );
    }
    for doc in rest {
        let kind = doc["kind"].as_str().unwrap();
        if kind != "CustomResourceDefinition" && !kind.starts_with("Cluster") {
            assert_eq!(
                doc["metadata"]["namespace"], "kommit",
                "{kind} lives in kommit"
            );
        }
    }
    // The file says how it is made, for whoever is tempted to edit it.
    assert!(shipped.contains("scripts/install-yaml"));
}

// ---- The operator under the chart's RBAC ----

/// The CRD as the chart ships it (equal to `kommit crd`, see above).
fn install_crd() {
    let crd = repo_root().join("charts/kommit/crds/gitsyncs.yaml");
    kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        crd.to_str().unwrap(),
    ]);
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/gitsyncs.kommit.dev",
        "--timeout=60s",
    ]);
}

/// The chart's ServiceAccount and RBAC, applied for real; cluster-scoped objects are deleted on
/// drop (namespaced ones go with the test namespace).
struct Rbac {
    docs: Vec<Value>,
    cluster_scoped: Vec<String>,
    /// A kubeconfig that acts as the chart's ServiceAccount.
    kubeconfig: PathBuf,
    _kubeconfig_dir: tempfile::TempDir,
}

impl Rbac {
    fn install(release: &str, namespace: &str, values: &[&str]) -> Rbac {
        let docs = documents(&render(release, namespace, values));
        let wanted = [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ];
        let items: Vec<Value> = docs
            .iter()
            .filter(|d| wanted.contains(&d["kind"].as_str().unwrap_or_default()))
            .cloned()
            .collect();
        let cluster_scoped = items
            .iter()
            .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "ClusterRoleBinding")
            .map(|d| {
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap().to_lowercase(),
                    d["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        let service_account = one(&docs, "ServiceAccount")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let kubeconfig_dir = tempfile::tempdir().unwrap();
        let kubeconfig =
            impersonating_kubeconfig(kubeconfig_dir.path(), namespace, &service_account);
        let rbac = Rbac {
            docs,
            cluster_scoped,
            kubeconfig,
            _kubeconfig_dir: kubeconfig_dir,
        };
        let dir = tempfile::tempdir().unwrap();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        let file = write_temp(dir.path(), "rbac.json", &list.to_string());
        kubectl_ok(&["apply", "--server-side", "-f", &file]);
        rbac
    }
}

impl Drop for Rbac {
    fn drop(&mut self) {
        for object in &self.cluster_scoped {
            let _ = kubectl(&["delete", object, "--wait=false", "--ignore-not-found"]);
        }
    }
}

/// A copy of the sandbox's admin kubeconfig that acts as `system:serviceaccount:NS:SA`.
fn impersonating_kubeconfig(dir: &Path, namespace: &str, service_account: &str) -> PathBuf {
    let mut config: Value = serde_json::from_str(&kubectl_ok(&[
        "config", "view", "--raw", "--minify", "-o", "json",
    ]))
    .unwrap();
    let users = config["users"].as_array_mut().unwrap();
    assert_eq!(users.len(), 1);
    users[0]["user"]["as"] = json!(format!(
        "system:serviceaccount:{namespace}:{service_account}"
    ));
    let file = dir.join("impersonating.kubeconfig");
    std::fs::write(&file, config.to_string()).unwrap();
    // It holds the admin's client key, as the sandbox's own kubeconfig does.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    file
}

/// Runs the sandbox's kubectl with another kubeconfig.
fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> Output {
    let bundled = repo_root().join("target/sandbox/bin/kubectl");
    let binary = if bundled.exists() {
        bundled
    } else {
        PathBuf::from("kubectl")
    };
    Command::new(binary)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs")
}

/// `kommit operator` with the arguments of the chart's Deployment (its HTTP server on a free
/// local port instead), as the given kubeconfig, with the pod's namespace in the environment
/// as the chart sets it.
fn start_operator(chart: &[Value], kubeconfig: &Path, namespace: &str) -> OperatorProcess {
    let mut args = args_of(chart);
    assert_eq!(args.remove(0), "operator");
    let listen = args.iter().position(|a| a == "--listen").unwrap();
    args.drain(listen..listen + 2);
    if flag(&args, "--watch-namespace").is_none() {
        // Cluster scope watches every namespace; here only the test's own GitSyncs.
        args.extend(["--watch-namespace".into(), namespace.into()]);
    }
    // The tests' repositories are folders of this machine, which the chart never allows.
    args.push("--allow-local-repos".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    OperatorProcess::start(
        &args,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("POD_NAMESPACE", namespace),
            ("KOMMIT_LOG", "info"),
            // What the chart passes from its webhook Secret.
            ("KOMMIT_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ],
    )
}

/// A made-up shared secret for the webhook signatures of these tests.
const WEBHOOK_SECRET: &str = "chart-test-webhook-secret";

fn log_tail(operator: &OperatorProcess) -> String {
    let log = operator.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn deployment(name: &str, image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - name: {name}\n        image: {image}\n        ports:\n        - containerPort: 80\n"
    )
}

fn service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  selector: {{app: {name}}}\n  ports:\n  - port: 80\n    targetPort: 80\n"
    )
}

fn config_map(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  greeting: hello\n"
    )
}

/// GitSync `shop` with prune and self-heal, and git credentials from a Secret (a file://
/// repository needs none, but the operator reads them all the same). It fetches once an hour:
/// each later change is brought in by a reconcile request, as a push webhook would.
fn apply_gitsync(namespace: &str, repo: &GitRepo) {
    kubectl_apply(
        namespace,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: git-credentials}}\nstringData: {{token: not-a-real-token}}\n---\napiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {{name: shop}}\nspec:\n  repo: file://{}\n  branch: main\n  path: deploy\n  interval: 1h\n  prune: true\n  selfHeal: true\n  secretRef: {{name: git-credentials}}\n",
            repo.path_str()
        ),
        &[],
    );
}

/// A GitHub push event for the repository's head, signed with the test's webhook secret.
fn signed_push(repo: &GitRepo) -> (Vec<u8>, String) {
    let body = json!({
        "ref": "refs/heads/main",
        "after": repo.head(),
        "repository": {"full_name": "acme/shop", "clone_url": format!("file://{}", repo.path_str())},
        "pusher": {"name": "ada"},
    })
    .to_string()
    .into_bytes();
    let signature = kommit::operator::webhook::github_signature(WEBHOOK_SECRET.as_bytes(), &body);
    (body, signature)
}

/// Waits until `check` holds; on timeout the panic shows the GitSync and the operator's log.
fn wait_for(
    operator: &OperatorProcess,
    namespace: &str,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            let gitsync = kubectl(&["get", "gitsync", "shop", "-n", namespace, "-o", "yaml"]);
            panic!(
                "timed out after {timeout:?} waiting until {what}\n--- GitSync\n{}\n--- operator log (tail)\n{}",
                String::from_utf8_lossy(&gitsync.stdout)
                    .split("\nstatus:")
                    .nth(1)
                    .unwrap_or("(no status)"),
                log_tail(operator)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn exists(namespace: &str, object: &str) -> bool {
    kubectl(&["get", "-n", namespace, object, "-o", "name"])
        .status
        .success()
}

/// The whole job of the operator, as the chart's ServiceAccount with the given values: apply,
/// health, status, events, record, lease, HTTP server, prune, self-heal; and no Forbidden
/// anywhere in its log.
fn the_operator_does_its_whole_job(test: &str, values: &[&str]) {
    install_crd();
    let ns = TestNamespace::new(test);
    let release = unique_release("chart");
    let rbac = Rbac::install(&release, &ns.name, values);
    let kubeconfig = rbac.kubeconfig.clone();

    // The kubeconfig really acts as the ServiceAccount: an admin could read nodes.
    let nodes = kubectl_as(&kubeconfig, &["get", "nodes"]);
    assert!(
        !nodes.status.success() && String::from_utf8_lossy(&nodes.stderr).contains("forbidden"),
        "the impersonated ServiceAccount cannot read nodes: {nodes:?}"
    );

    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.25"));
    repo.write("deploy/service.yaml", &service("web"));
    repo.write("deploy/config.yaml", &config_map("web-config"));
    let v1 = repo.commit("Web, its Service and its configuration");

    let operator = start_operator(&rbac.docs, &kubeconfig, &ns.name);
    apply_gitsync(&ns.name, &repo);
    let status = |path: &str| jsonpath(&ns.name, "gitsync/shop", path);

    wait_for(
        &operator,
        &ns.name,
        Duration::from_secs(120),
        "the first commit is applied and healthy",
        || status("{.status.lastAppliedCommit}") == v1 && status("{.status.health}") == "Healthy",
    );
    assert_eq!(
        status("{.status.conditions[?(@.type=='Ready')].status}"),
        "True"
    );
    for object in ["deployment/web", "service/web", "configmap/web-config"] {
        assert_eq!(
            jsonpath(
                &ns.name,
                object,
                "{.metadata.annotations.kommit\\.dev/commit}"
            ),
            v1,
            "{object} is applied and names its commit"
        );
    }
    assert_eq!(
        jsonpath(&ns.name, "deployment/web", "{.status.availableReplicas}"),
        "2"
    );

    // Events (events.k8s.io, reported by kommit) and the record of outcomes.
    wait_for(
        &operator,
        &ns.name,
        Duration::from_secs(30),
        "kommit's events are recorded",
        || {
            kubectl_ok(&[
                "get",
                "events.events.k8s.io",
                "-n",
                &ns.name,
                "-o",
                "jsonpath={range .items[*]}{.reportingController}/{.regarding.name}{\"\\n\"}{end}",
            ])
            .lines()
            .any(|l| l == "kommit/web")
        },
    );
    let config_maps = kubectl_ok(&["get", "configmaps", "-n", &ns.name, "-o", "name"]);
    assert!(
        config_maps.contains("configmap/kommit-record-"),
        "the record ConfigMap is written: {config_maps}"
    );

    // Leader election: the chart's Lease in the pod's namespace, held by this operator.
    let lease = flag(&args_of(&rbac.docs), "--lease-name")
        .expect("the chart names the Lease")
        .to_string();
    let holder = jsonpath(
        &ns.name,
        &format!("lease.coordination.k8s.io/{lease}"),
        "{.spec.holderIdentity}",
    );
    assert!(!holder.is_empty(), "the Lease {lease} has a holder");
    assert_eq!(operator.metric("kommit_leader"), 1.0, "the operator leads");

    // The HTTP server the probes and the Service point at.
    assert_eq!(operator.get("/healthz").0, 200);
    assert_eq!(operator.get("/readyz").0, 200);
    let (code, metrics) = operator.get("/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("kommit_"), "{metrics}");

    // A signed push webhook asks for an immediate fetch by annotating the GitSync.
    let (body, signature) = signed_push(&repo);
    let (code, reply) = operator.request(
        "POST",
        "/webhook",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &signature),
            ("Content-Type", "application/json"),
        ],
        &body,
    );
    assert_eq!(code, 202, "the webhook is accepted: {reply}");
    wait_for(
        &operator,
        &ns.name,
        Duration::from_secs(30),
        "the webhook's request is handled",
        || {
            let requested = status("{.metadata.annotations.kommit\\.dev/reconcile-requested-at}");
            !requested.is_empty() && status("{.status.lastHandledReconcileAt}") == requested
        },
    );

    // Someone edits a synced object: git wins.
    kubectl_ok(&[
        "patch",
        "deployment",
        "web",
        "-n",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":4}}"#,
    ]);
    let asked = request_reconcile(&ns.name, "shop");
    wait_for(
        &operator,
        &ns.name,
        Duration::from_secs(60),
        "the drifted replica count is healed",
        || {
            reconcile_handled(&ns.name, "shop", &asked)
                && jsonpath(&ns.name, "deployment/web", "{.spec.replicas}") == "2"
        },
    );

    // A file leaves git: its object is pruned.
    repo.remove("deploy/config.yaml");
    let v2 = repo.commit("Configuration moves into the image");
    let asked = request_reconcile(&ns.name, "shop");
    wait_for(
        &operator,
        &ns.name,
        Duration::from_secs(90),
        "the second commit is applied and the ConfigMap pruned",
        || {
            reconcile_handled(&ns.name, "shop", &asked)
                && status("{.status.lastAppliedCommit}") == v2
                && !exists(&ns.name, "configmap/web-config")
        },
    );
    assert!(exists(&ns.name, "deployment/web") && exists(&ns.name, "service/web"));

    // A commit whose rollout fails is rolled back to the last healthy one.
    repo.write("deploy/web.yaml", &deployment("web", "nginx:broken"));
    let v3 = repo.commit("Web on a broken build");
    let asked = request_reconcile(&ns.name, "shop");
    wait_for(
        &operator,
        &ns.name,
        Duration::from_secs(120),
        "the broken commit is rolled back",
        || {
            reconcile_handled(&ns.name, "shop", &asked)
                && status("{.status.history[0].commit}") == v3
                && status("{.status.history[0].outcome}") == "rolled-back"
        },
    );
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.spec.template.spec.containers[0].image}"
        ),
        "nginx:1.25"
    );
    assert_eq!(status("{.status.lastHealthyCommit}"), v2);

    let log = operator.log();
    let forbidden: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .collect();
    assert!(
        forbidden.is_empty(),
        "the chart's RBAC is missing a permission the operator used:\n{}",
        forbidden.join("\n")
    );
}

#[test]
fn the_operator_does_its_whole_job_with_the_charts_cluster_role() {
    the_operator_does_its_whole_job("chart cluster role", &OPEN);
}

#[test]
fn the_operator_does_its_whole_job_with_the_charts_namespaced_roles() {
    the_operator_does_its_whole_job(
        "chart namespaced roles",
        &open_mode(&["--set", "rbac.scope=namespace"]),
    );
}

/// A kubeconfig holding a real token of the ServiceAccount (TokenRequest), not an impersonating
/// one: the operator impersonates GitSyncs' ServiceAccounts itself, and impersonation does not
/// chain.
fn token_kubeconfig(dir: &Path, namespace: &str, service_account: &str) -> PathBuf {
    let token = kubectl_ok(&[
        "create",
        "token",
        service_account,
        "-n",
        namespace,
        "--duration=1h",
    ]);
    let mut config: Value = serde_json::from_str(&kubectl_ok(&[
        "config", "view", "--raw", "--minify", "-o", "json",
    ]))
    .unwrap();
    let users = config["users"].as_array_mut().unwrap();
    users[0]["user"] = json!({"token": token.trim()});
    let file = dir.join("token.kubeconfig");
    std::fs::write(&file, config.to_string()).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    file
}

/// The chart's default, tenancy.mode=locked, as a user meets it: a team is onboarded in three
/// commands (its namespace, a RoleBinding for its `default` ServiceAccount, its GitSync), its
/// commits apply within its namespace, and a commit reaching beyond it is refused whole.
#[test]
fn in_locked_mode_a_team_onboards_in_three_commands_and_its_commits_stay_in_its_namespace() {
    install_crd();
    let home = TestNamespace::new("chart locked home");
    let team = TestNamespace::new("chart locked team");
    let elsewhere = TestNamespace::new("chart locked elsewhere");
    let release = unique_release("chart");
    // The operator watches every namespace (cluster scope); here it is told to watch the team's.
    let rbac = Rbac::install(&release, &home.name, &[]);
    let service_account = one(&rbac.docs, "ServiceAccount")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = token_kubeconfig(dir.path(), &home.name, &service_account);
    let nodes = kubectl_as(&kubeconfig, &["get", "nodes"]);
    assert!(
        !nodes.status.success(),
        "the chart's ServiceAccount cannot read nodes: {nodes:?}"
    );
    let deploy = kubectl_as(
        &kubeconfig,
        &["auth", "can-i", "create", "deployments", "-n", &team.name],
    );
    assert_eq!(
        String::from_utf8_lossy(&deploy.stdout).trim(),
        "no",
        "in locked mode the operator itself deploys nothing"
    );

    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.25"));
    repo.write("deploy/config.yaml", &config_map("web-config"));
    let v1 = repo.commit("Web and its configuration");
    let mut args = args_of(&rbac.docs);
    args.remove(0);
    let listen = args.iter().position(|a| a == "--listen").unwrap();
    args.drain(listen..listen + 2);
    args.extend(["--watch-namespace".into(), team.name.clone()]);
    args.push("--allow-local-repos".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let operator = OperatorProcess::start(
        &args,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("POD_NAMESPACE", home.name.as_str()),
            ("KOMMIT_LOG", "info"),
        ],
    );

    // Onboarding, step 3 first: a GitSync whose ServiceAccount has no rights yet is refused.
    // It fetches once an hour; each later attempt is asked for (a reconcile request).
    let gitsync = format!(
        "apiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {{name: shop}}\nspec:\n  repo: file://{}\n  path: deploy\n  interval: 1h\n",
        repo.path_str()
    );
    kubectl_apply(&team.name, &gitsync, &[]);
    let ready = |field: &str| {
        jsonpath(
            &team.name,
            "gitsync/shop",
            &format!("{{.status.conditions[?(@.type=='Ready')].{field}}}"),
        )
    };
    wait_for(
        &operator,
        &team.name,
        Duration::from_secs(60),
        "the GitSync of a team without rights is refused",
        || ready("reason") == "Forbidden",
    );
    let message = ready("message");
    assert!(
        message.contains(&format!("ServiceAccount {}/default may not", team.name))
            && message.contains("kubectl create rolebinding"),
        "{message}"
    );
    assert!(!exists(&team.name, "deployment/web"));

    // Step 2: the team's `default` ServiceAccount becomes admin of its namespace.
    kubectl_ok(&[
        "create",
        "rolebinding",
        "gitsync-admin",
        "-n",
        &team.name,
        "--clusterrole=admin",
        &format!("--serviceaccount={}:default", team.name),
    ]);
    let asked = request_reconcile(&team.name, "shop");
    wait_for(
        &operator,
        &team.name,
        Duration::from_secs(120),
        "the team's commit is applied and healthy",
        || {
            reconcile_handled(&team.name, "shop", &asked)
                && jsonpath(&team.name, "gitsync/shop", "{.status.lastAppliedCommit}") == v1
                && ready("status") == "True"
        },
    );
    assert_eq!(
        jsonpath(&team.name, "deployment/web", "{.status.availableReplicas}"),
        "2"
    );

    // A commit reaching into another namespace is refused as a whole.
    repo.write(
        "deploy/elsewhere.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: intruder\n  namespace: {}\n",
            elsewhere.name
        ),
    );
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.26"));
    repo.commit("Web on nginx 1.26, and a ConfigMap elsewhere");
    let asked = request_reconcile(&team.name, "shop");
    wait_for(
        &operator,
        &team.name,
        Duration::from_secs(60),
        "the commit reaching elsewhere is refused",
        || reconcile_handled(&team.name, "shop", &asked) && ready("reason") == "Forbidden",
    );
    let message = ready("message");
    assert!(
        message.contains(&format!("ConfigMap {}/intruder", elsewhere.name))
            && message.contains(&format!(
                "kubectl create rolebinding default-configmaps -n {}",
                elsewhere.name
            )),
        "{message}"
    );
    assert!(!exists(&elsewhere.name, "configmap/intruder"));
    assert_eq!(
        jsonpath(
            &team.name,
            "deployment/web",
            "{.spec.template.spec.containers[0].image}"
        ),
        "nginx:1.25",
        "nothing of the refused commit is applied"
    );
}

#[test]
fn without_patch_on_deployments_the_operator_cannot_sync_and_says_why() {
    install_crd();
    let ns = TestNamespace::new("chart too little");
    let release = unique_release("chart");
    // The default managed kinds, but Deployments without `patch`.
    let managed = json!([
        {"apiGroups": [""], "resources": ["configmaps", "services"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "create", "delete"]},
    ]);
    let set = format!("rbac.managedResources={managed}");
    let rbac = Rbac::install(&release, &ns.name, &open_mode(&["--set-json", &set]));
    assert!(!allows(&rbac.docs, "apps", "deployments", "patch"));
    let kubeconfig = rbac.kubeconfig.clone();

    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.25"));
    repo.write("deploy/config.yaml", &config_map("web-config"));
    repo.commit("Web and its configuration");
    let operator = start_operator(&rbac.docs, &kubeconfig, &ns.name);
    apply_gitsync(&ns.name, &repo);

    let synced = |field: &str| {
        jsonpath(
            &ns.name,
            "gitsync/shop",
            &format!("{{.status.conditions[?(@.type=='Synced')].{field}}}"),
        )
    };
    wait_for(
        &operator,
        &ns.name,
        Duration::from_secs(90),
        "the GitSync reports that it cannot sync",
        || synced("status") == "False",
    );
    let message = synced("message");
    assert!(
        message.to_lowercase().contains("forbidden") && message.contains("web"),
        "the status names the refusal and the object: {message}"
    );
    assert!(
        !exists(&ns.name, "deployment/web"),
        "nothing of the commit is applied"
    );
    assert!(
        !exists(&ns.name, "configmap/web-config"),
        "nothing of the commit is applied, not even what was allowed"
    );
    assert_eq!(
        jsonpath(&ns.name, "gitsync/shop", "{.status.lastAppliedCommit}"),
        ""
    );
}

#[test]
fn with_namespaced_roles_over_two_namespaces_health_and_prune_reach_both() {
    install_crd();
    let home = TestNamespace::new("chart two namespaces home");
    let other = TestNamespace::new("chart two namespaces other");
    let release = unique_release("chart");
    let namespaces = format!("rbac.namespaces={{{},{}}}", home.name, other.name);
    let rbac = Rbac::install(
        &release,
        &home.name,
        &open_mode(&["--set", "rbac.scope=namespace", "--set", &namespaces]),
    );
    let kubeconfig = rbac.kubeconfig.clone();

    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.25"));
    // The only object of the second namespace: when it leaves git, nothing there names it.
    repo.write(
        "deploy/elsewhere.yaml",
        &deployment("elsewhere", "nginx:1.25").replacen(
            "  name: elsewhere\n",
            &format!("  name: elsewhere\n  namespace: {}\n", other.name),
            1,
        ),
    );
    let v1 = repo.commit("Web here, another app in the other namespace");
    let operator = start_operator(&rbac.docs, &kubeconfig, &home.name);
    apply_gitsync(&home.name, &repo);
    let status = |path: &str| jsonpath(&home.name, "gitsync/shop", path);
    wait_for(
        &operator,
        &home.name,
        Duration::from_secs(120),
        "both Deployments are healthy, watched in each namespace",
        || status("{.status.lastAppliedCommit}") == v1 && status("{.status.health}") == "Healthy",
    );
    assert!(exists(&other.name, "deployment/elsewhere"));

    repo.remove("deploy/elsewhere.yaml");
    let v2 = repo.commit("The other app moves out of this repository");
    let asked = request_reconcile(&home.name, "shop");
    wait_for(
        &operator,
        &home.name,
        Duration::from_secs(90),
        "the object of the emptied namespace is pruned",
        || {
            reconcile_handled(&home.name, "shop", &asked)
                && status("{.status.lastAppliedCommit}") == v2
                && !exists(&other.name, "deployment/elsewhere")
        },
    );
    assert!(exists(&home.name, "deployment/web"));
    assert!(
        !operator.log().to_lowercase().contains("forbidden"),
        "{}",
        log_tail(&operator)
    );
}

#[test]
fn without_list_on_a_kind_it_applies_the_operator_still_syncs_and_warns_that_it_cannot_prune_it() {
    install_crd();
    let ns = TestNamespace::new("chart no list");
    let release = unique_release("chart");
    let managed = json!([
        {"apiGroups": [""], "resources": ["configmaps"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create", "patch", "delete"]},
        {"apiGroups": ["apps"], "resources": ["deployments"]},
    ]);
    let set = format!("rbac.managedResources={managed}");
    let rbac = Rbac::install(&release, &ns.name, &open_mode(&["--set-json", &set]));
    assert!(!allows(&rbac.docs, "", "services", "list"));
    let kubeconfig = rbac.kubeconfig.clone();

    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &deployment("web", "nginx:1.25"));
    repo.write("deploy/service.yaml", &service("web"));
    let v1 = repo.commit("Web and its Service");
    let operator = start_operator(&rbac.docs, &kubeconfig, &ns.name);
    apply_gitsync(&ns.name, &repo);
    let status = |path: &str| jsonpath(&ns.name, "gitsync/shop", path);
    wait_for(
        &operator,
        &ns.name,
        Duration::from_secs(120),
        "the commit is applied without listing Services",
        || status("{.status.lastAppliedCommit}") == v1 && status("{.status.health}") == "Healthy",
    );
    assert!(exists(&ns.name, "service/web"));
    wait_until(
        Duration::from_secs(30),
        "the operator warns that Services cannot be pruned",
        || {
            operator
                .log()
                .contains("may not list services there, so those that left git are not pruned")
        },
    );
}
