//! The GitSync operator, run out-of-cluster against the sandbox.

mod common;

use std::time::Duration;

use common::*;

fn web(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: {image}\n"
    )
}

#[test]
fn a_gitsync_follows_its_repository_rolls_back_a_bad_commit_and_can_be_suspended() {
    install_gitsync_crd();
    let ns = TestNamespace::new("operator");
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    let v1 = repo.commit("Web on nginx 1.25");
    let _operator =
        OperatorProcess::start(&["--watch-namespace", &ns.name, "--allow-local-repos"], &[]);
    // An hour between fetches: each new commit is brought in by a reconcile request, as a push
    // webhook would ask for it.
    kubectl_apply(&ns.name, &gitsync("shop", &repo, "  interval: 1h\n"), &[]);
    let status = |path: &str| jsonpath(&ns.name, "gitsync/shop", path);
    let image = || web_image(&ns.name);
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
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(90),
        "the new commit rolls out",
        || status("{.status.lastAppliedCommit}") == v2 && image() == "nginx:1.26",
    );

    repo.write("deploy/web.yaml", &web("nginx:broken"));
    let v3 = repo.commit("Web on a broken build");
    reconcile_and_wait(
        &ns.name,
        "shop",
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
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(30),
        "a reconcile after the commit is done, and still says suspended",
        || status("{.status.conditions[?(@.type=='Ready')].reason}") == "Suspended",
    );
    assert_eq!(image(), "nginx:1.26", "a suspended GitSync changes nothing");
}

/// The image of the `web` Deployment's container.
fn web_image(namespace: &str) -> String {
    jsonpath(
        namespace,
        "deployment/web",
        "{.spec.template.spec.containers[0].image}",
    )
}

fn gitsync(name: &str, repo: &GitRepo, extra: &str) -> String {
    format!(
        "apiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {{name: {name}}}\nspec:\n  repo: file://{}\n  path: deploy\n{extra}",
        repo.path_str()
    )
}

#[test]
fn deleting_a_file_prunes_its_object_and_a_drifted_field_is_healed() {
    install_gitsync_crd();
    let ns = TestNamespace::new("operator-heal");
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    repo.write(
        "deploy/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: from-git\n",
    );
    let v1 = repo.commit("Web and its settings");
    let _operator =
        OperatorProcess::start(&["--watch-namespace", &ns.name, "--allow-local-repos"], &[]);
    kubectl_apply(
        &ns.name,
        &gitsync(
            "shop",
            &repo,
            "  interval: 1h\n  prune: true\n  selfHeal: true\n",
        ),
        &[],
    );
    let status = |path: &str| jsonpath(&ns.name, "gitsync/shop", path);
    let mode = || {
        let out = kubectl(&[
            "get",
            "-n",
            &ns.name,
            "configmap/settings",
            "-o",
            "jsonpath={.data.mode}",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until(Duration::from_secs(90), "the commit is applied", || {
        status("{.status.lastAppliedCommit}") == v1 && status("{.status.health}") == "Healthy"
    });
    assert_eq!(mode(), "from-git");

    kubectl_ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"data":{"mode":"edited-by-hand"}}"#,
    ]);
    kubectl_ok(&["scale", "deployment", "web", "-n", &ns.name, "--replicas=4"]);
    // The next look (here asked for; else the interval's) finds the drift and heals it.
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(60),
        "the hand edits are healed",
        || mode() == "from-git" && jsonpath(&ns.name, "deployment/web", "{.spec.replicas}") == "2",
    );

    repo.remove("deploy/settings.yaml");
    let v2 = repo.commit("Settings are no longer needed");
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(60),
        "the removed file's ConfigMap is pruned",
        || {
            status("{.status.lastAppliedCommit}") == v2
                && !kubectl(&["get", "-n", &ns.name, "configmap/settings"])
                    .status
                    .success()
        },
    );
    assert!(
        !status("{.status.inventory[*].name}").contains("settings"),
        "the inventory no longer lists the pruned ConfigMap"
    );
    assert_eq!(
        jsonpath(&ns.name, "deployment/web", "{.spec.replicas}"),
        "2"
    );
}

fn push_payload(repo: &GitRepo) -> Vec<u8> {
    serde_json::json!({
        "ref": "refs/heads/main",
        "after": repo.head(),
        "repository": {
            "full_name": "acme/shop",
            "clone_url": format!("file://{}", repo.path_str()),
        },
        "pusher": {"name": "ada"},
    })
    .to_string()
    .into_bytes()
}

#[test]
fn a_signed_push_webhook_syncs_before_the_interval_and_a_forged_one_changes_nothing() {
    install_gitsync_crd();
    let ns = TestNamespace::new("operator-webhook");
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    let v1 = repo.commit("Web on nginx 1.25");
    let secret = "webhook-secret-for-the-test";
    let operator = OperatorProcess::start(
        &[
            "--watch-namespace",
            &ns.name,
            "--no-leader-election",
            "--allow-local-repos",
        ],
        &[("KOMMIT_WEBHOOK_SECRET", secret)],
    );
    assert_eq!(operator.get("/healthz").0, 200);
    wait_until(Duration::from_secs(30), "the operator is ready", || {
        operator.get("/readyz").0 == 200
    });
    // An hour between fetches: only a webhook can bring the next commit in time.
    kubectl_apply(
        &ns.name,
        &gitsync("shop", &repo, "  branch: main\n  interval: 1h\n"),
        &[],
    );
    let status = |path: &str| jsonpath(&ns.name, "gitsync/shop", path);
    let image = || web_image(&ns.name);
    wait_until(
        Duration::from_secs(90),
        "the first commit is healthy",
        || status("{.status.lastAppliedCommit}") == v1 && status("{.status.health}") == "Healthy",
    );
    // Let the first reconcile's status writes settle before the next commit.
    std::thread::sleep(Duration::from_secs(3));

    repo.write("deploy/web.yaml", &web("nginx:1.26"));
    let v2 = repo.commit("Web on nginx 1.26");
    let body = push_payload(&repo);
    let forged = kommit::operator::webhook::github_signature(b"a guessed secret", &body);
    let (code, reply) = operator.request(
        "POST",
        "/webhook",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &forged),
            ("Content-Type", "application/json"),
        ],
        &body,
    );
    assert_eq!(code, 401, "{reply}");
    assert!(!reply.contains(secret), "the reply never shows the secret");
    let (code, _) = operator.request("POST", "/webhook", &[("X-GitHub-Event", "push")], &body);
    assert_eq!(code, 401, "an unsigned push is refused too");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(status("{.status.lastAppliedCommit}"), v1);
    assert_eq!(image(), "nginx:1.25", "a forged webhook changes nothing");
    assert_eq!(
        status("{.metadata.annotations.kommit\\.dev/reconcile-requested-at}"),
        "",
        "a forged webhook does not even touch the GitSync"
    );

    let signature = kommit::operator::webhook::github_signature(secret.as_bytes(), &body);
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
    assert_eq!(code, 202, "{reply}");
    assert!(reply.contains(&format!("{}/shop", ns.name)), "{reply}");
    wait_until(
        Duration::from_secs(90),
        "the pushed commit rolls out, long before the interval",
        || status("{.status.lastAppliedCommit}") == v2 && image() == "nginx:1.26",
    );
    let requested = status("{.metadata.annotations.kommit\\.dev/reconcile-requested-at}");
    assert!(!requested.is_empty());
    assert_eq!(status("{.status.lastHandledReconcileAt}"), requested);

    let (code, reply) = operator.request(
        "POST",
        "/webhook",
        &[
            ("X-GitHub-Event", "ping"),
            (
                "X-Hub-Signature-256",
                &kommit::operator::webhook::github_signature(secret.as_bytes(), b"{}"),
            ),
        ],
        b"{}",
    );
    assert_eq!(code, 200, "{reply}");
    assert_eq!(
        operator.metric(r#"kommit_webhooks_total{provider="github",result="unauthorized"}"#),
        2.0
    );
    assert_eq!(
        operator.metric(r#"kommit_webhooks_total{provider="github",result="triggered"}"#),
        1.0
    );
    assert!(operator.metric_sum("kommit_reconciles_total", &[r#"name="shop""#, "success"]) >= 2.0);
    assert!(
        operator.metric_sum(
            "kommit_reconcile_duration_seconds_count",
            &[r#"name="shop""#]
        ) >= 2.0
    );
    let (_, metrics) = operator.get("/metrics");
    assert!(
        metrics.contains("kommit_last_synced_commit_age_seconds{"),
        "{metrics}"
    );

    kubectl_ok(&["delete", "gitsync", "shop", "-n", &ns.name]);
    wait_until(
        Duration::from_secs(60),
        "a deleted GitSync's commit age is no longer reported",
        || {
            !operator
                .get("/metrics")
                .1
                .contains("kommit_last_synced_commit_age_seconds{")
        },
    );
}

fn lease_holder(namespace: &str) -> String {
    let out = kubectl(&[
        "get",
        "lease",
        "kommit-operator",
        "-n",
        namespace,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn of_two_operators_only_the_leader_reconciles_and_the_other_takes_over() {
    install_gitsync_crd();
    let ns = TestNamespace::new("operator-leader");
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    let v1 = repo.commit("Web on nginx 1.25");
    // The lease lives in the watched namespace; a short one makes the takeover after a crash quick.
    let args = [
        "--watch-namespace",
        ns.name.as_str(),
        "--lease-duration",
        "6s",
        "--allow-local-repos",
    ];
    let mut first = OperatorProcess::start(&args, &[]);
    wait_until(Duration::from_secs(30), "the first operator leads", || {
        first.metric("kommit_leader") == 1.0
    });
    let second = OperatorProcess::start(&args, &[]);
    kubectl_apply(&ns.name, &gitsync("shop", &repo, "  interval: 1h\n"), &[]);
    let status = |path: &str| jsonpath(&ns.name, "gitsync/shop", path);
    wait_until(Duration::from_secs(90), "the commit is applied", || {
        status("{.status.lastAppliedCommit}") == v1
    });
    // A second reconcile, asked for: the leader does it, the standby still nothing.
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(60),
        "the requested reconcile is done",
        || true,
    );
    assert!(first.metric_sum("kommit_reconciles_total", &[r#"name="shop""#]) >= 2.0);
    assert_eq!(second.metric("kommit_leader"), 0.0);
    assert_eq!(
        second.metric_sum("kommit_reconciles_total", &[]),
        0.0,
        "the standby reconciles nothing"
    );
    let first_holder = lease_holder(&ns.name);
    assert!(!first_holder.is_empty());

    first.kill();
    repo.write("deploy/web.yaml", &web("nginx:1.26"));
    let v2 = repo.commit("Web on nginx 1.26");
    // Asked while no replica leads: the standby handles it once it does.
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(90),
        "the standby takes over and applies the next commit",
        || status("{.status.lastAppliedCommit}") == v2,
    );
    assert_eq!(second.metric("kommit_leader"), 1.0);
    assert_ne!(lease_holder(&ns.name), first_holder);
    assert_eq!(web_image(&ns.name), "nginx:1.26");
}

#[test]
fn a_stopping_leader_releases_its_lease_so_a_standby_takes_over_at_once() {
    install_gitsync_crd();
    let ns = TestNamespace::new("operator-release");
    // A lease of five minutes: a takeover within a minute proves it was released, not expired.
    let args = [
        "--watch-namespace",
        ns.name.as_str(),
        "--lease-duration",
        "300s",
        "--allow-local-repos",
    ];
    let mut leader = OperatorProcess::start(&args, &[]);
    wait_until(Duration::from_secs(30), "the first operator leads", || {
        leader.metric("kommit_leader") == 1.0
    });
    let standby = OperatorProcess::start(&args, &[]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(standby.metric("kommit_leader"), 0.0);
    assert_eq!(standby.get("/readyz").0, 200, "a standby serves webhooks");
    let code = leader.terminate();
    assert_eq!(code, Some(0), "SIGTERM is a clean stop: {}", leader.log());
    wait_until(
        Duration::from_secs(60),
        "the standby leads well before the old lease would expire",
        || standby.metric("kommit_leader") == 1.0,
    );
}

/// Someone scales the Deployment and sets its image by hand; the GitSync (self-heal off) says
/// exactly what drifted and who holds it, and writes nothing.
#[test]
fn hand_edits_without_self_heal_are_reported_as_drift_naming_fields_and_managers() {
    install_gitsync_crd();
    let ns = TestNamespace::new("operator-drift");
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    let v1 = repo.commit("Web on nginx 1.25");
    let _operator =
        OperatorProcess::start(&["--watch-namespace", &ns.name, "--allow-local-repos"], &[]);
    kubectl_apply(
        &ns.name,
        &gitsync("shop", &repo, "  interval: 1h\n  selfHeal: false\n"),
        &[],
    );
    let status = |path: &str| jsonpath(&ns.name, "gitsync/shop", path);
    wait_until(Duration::from_secs(90), "the commit is applied", || {
        status("{.status.lastAppliedCommit}") == v1 && status("{.status.health}") == "Healthy"
    });

    kubectl_ok(&["scale", "deploy/web", "-n", &ns.name, "--replicas=5"]);
    kubectl_ok(&[
        "set",
        "image",
        "deploy/web",
        "-n",
        &ns.name,
        "web=nginx:hacked",
    ]);
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(60),
        "the GitSync reports drift",
        || status("{.status.conditions[?(@.type=='Synced')].reason}") == "Drift",
    );
    let synced = status("{.status.conditions[?(@.type=='Synced')].status}");
    let message = status("{.status.conditions[?(@.type=='Synced')].message}");
    assert_eq!(synced, "False");
    assert!(
        message.contains("Deployment web: ")
            && message.contains(".spec.replicas (kubectl")
            && message.contains(".spec.template.spec.containers[web].image (kubectl-set)"),
        "{message}"
    );
    assert!(!message.contains("--force-conflicts"), "{message}");
    assert_eq!(
        status("{.status.conditions[?(@.type=='Ready')].reason}"),
        "Drift"
    );
    // Nothing was written: the hand edits stand through a further check.
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(60),
        "a further drift check is done and still reports drift",
        || status("{.status.conditions[?(@.type=='Synced')].reason}") == "Drift",
    );
    assert_eq!(web_image(&ns.name), "nginx:hacked");
    assert_eq!(
        jsonpath(&ns.name, "deployment/web", "{.spec.replicas}"),
        "5"
    );

    // A new commit that touches the drifted fields is not applied over them either.
    repo.write("deploy/web.yaml", &web("nginx:1.26"));
    repo.commit("Web on nginx 1.26");
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(60),
        "the new commit is held back by the drift",
        || {
            let message = status("{.status.conditions[?(@.type=='Synced')].message}");
            status("{.status.conditions[?(@.type=='Synced')].reason}") == "Drift"
                && message.contains("kubectl-set")
                && status("{.status.lastAppliedCommit}") == v1
        },
    );
    assert_eq!(web_image(&ns.name), "nginx:hacked");
}

/// The same hand edits with self-heal on: git takes its fields back, at the next interval, with
/// nobody asking (the one operator test of the periodic look: 10 s, the floor).
#[test]
fn hand_edits_with_self_heal_are_taken_back() {
    install_gitsync_crd();
    let ns = TestNamespace::new("operator-selfheal");
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    let v1 = repo.commit("Web on nginx 1.25");
    let _operator =
        OperatorProcess::start(&["--watch-namespace", &ns.name, "--allow-local-repos"], &[]);
    kubectl_apply(
        &ns.name,
        &gitsync("shop", &repo, "  interval: 10s\n  selfHeal: true\n"),
        &[],
    );
    let status = |path: &str| jsonpath(&ns.name, "gitsync/shop", path);
    wait_until(Duration::from_secs(90), "the commit is applied", || {
        status("{.status.lastAppliedCommit}") == v1 && status("{.status.health}") == "Healthy"
    });
    kubectl_ok(&["scale", "deploy/web", "-n", &ns.name, "--replicas=5"]);
    kubectl_ok(&[
        "set",
        "image",
        "deploy/web",
        "-n",
        &ns.name,
        "web=nginx:hacked",
    ]);
    wait_until(Duration::from_secs(60), "git's values are back", || {
        web_image(&ns.name) == "nginx:1.25"
            && jsonpath(&ns.name, "deployment/web", "{.spec.replicas}") == "2"
    });
    wait_until(
        Duration::from_secs(60),
        "the GitSync is ready again",
        || status("{.status.conditions[?(@.type=='Ready')].status}") == "True",
    );
}

/// Sends a webhook's headers (and `body_start`, of a body said to be `length` bytes) and leaves
/// the connection open; `answer` reads the reply.
struct RawWebhook(std::net::TcpStream);

impl RawWebhook {
    fn send(
        operator: &OperatorProcess,
        headers: &[(&str, &str)],
        length: usize,
        body_start: &[u8],
    ) -> Self {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(operator.address).unwrap();
        let mut head = format!(
            "POST /webhook HTTP/1.1\r\nHost: kommit\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body_start).unwrap();
        RawWebhook(stream)
    }

    fn answer(mut self) -> u16 {
        use std::io::Read;
        self.0
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut first = [0u8; 12];
        self.0.read_exact(&mut first).expect("an HTTP answer");
        String::from_utf8_lossy(&first[9..12]).parse().unwrap()
    }
}

#[test]
fn huge_and_dawdling_webhooks_are_cut_off_and_the_probes_keep_answering() {
    install_gitsync_crd();
    let ns = TestNamespace::new("operator-flood");
    let operator = OperatorProcess::start(
        &["--watch-namespace", &ns.name, "--no-leader-election"],
        &[("KOMMIT_WEBHOOK_SECRET", "flood-secret")],
    );
    let push = ("X-GitHub-Event", "push");
    let forged = ("X-Hub-Signature-256", "sha256=00");
    const MIB: usize = 1024 * 1024;

    // 30 MiB, unsigned or over the limit: answered before a byte of the body is sent.
    assert_eq!(
        RawWebhook::send(&operator, &[push], 30 * MIB, b"").answer(),
        401
    );
    assert_eq!(
        RawWebhook::send(&operator, &[push, forged], 30 * MIB, b"").answer(),
        413
    );

    // 50 webhooks that never finish their body: 16 are held, the rest refused at once, and the
    // probes answer meanwhile.
    let dawdlers: Vec<RawWebhook> = (0..50)
        .map(|_| RawWebhook::send(&operator, &[push, forged], 1_000, b"{\"ref\":"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(operator.get("/healthz").0, 200);
    assert_eq!(operator.get("/readyz").0, 200);
    let answers: Vec<u16> = dawdlers.into_iter().map(RawWebhook::answer).collect();
    let busy = answers.iter().filter(|&&code| code == 503).count();
    let timed_out = answers.iter().filter(|&&code| code == 408).count();
    assert_eq!((busy, timed_out), (34, 16), "{answers:?}");
    assert_eq!(operator.get("/healthz").0, 200);
}

#[test]
fn a_crd_installed_after_the_operator_started_is_seen_at_the_next_reconcile() {
    install_gitsync_crd();
    let ns = TestNamespace::new("operator-late-crd");
    let group = format!("{}.example.com", ns.name);
    let repo = GitRepo::new();
    repo.write(
        "deploy/gadget.yaml",
        &format!("apiVersion: {group}/v1\nkind: Gadget\nmetadata:\n  name: g\nspec:\n  size: 2\n"),
    );
    repo.commit("A Gadget, whose kind the platform team installs");
    let _operator = OperatorProcess::start(
        &[
            "--watch-namespace",
            &ns.name,
            "--no-leader-election",
            "--allow-local-repos",
        ],
        &[],
    );
    kubectl_apply(&ns.name, &gitsync("shop", &repo, "  interval: 1h\n"), &[]);
    let reason = || {
        jsonpath(
            &ns.name,
            "gitsync/shop",
            "{.status.conditions[?(@.type=='Synced')].reason}",
        )
    };
    wait_until(
        Duration::from_secs(60),
        "the unknown kind is refused",
        || reason() == "InvalidCommit",
    );
    let crd = format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: gadgets.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: gadgets, singular: gadget, kind: Gadget}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        x-kubernetes-preserve-unknown-fields: true\n"
    );
    kubectl_apply(&ns.name, &crd, &[]);
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/gadgets.{group}"),
        "--timeout=60s",
    ]);
    let gadget = format!("gadget.{group}/g");
    let found = std::panic::catch_unwind(|| {
        reconcile_and_wait(
            &ns.name,
            "shop",
            Duration::from_secs(60),
            "the Gadget is synced",
            || kubectl(&["get", "-n", &ns.name, &gadget]).status.success(),
        )
    });
    let _ = kubectl(&["delete", &format!("crd/gadgets.{group}"), "--wait=false"]);
    assert!(
        found.is_ok(),
        "the operator never saw the new kind: {}",
        reason()
    );
}
