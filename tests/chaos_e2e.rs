//! When the cluster or a git server misbehaves, kommit gives up on its own, says why, and the
//! next run converges: nothing waits for ever, nothing is duplicated or half-applied for good.
//! These tests hang parts of the shared sandbox, so they take turns.

mod common;

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn sandbox(args: &[&str]) {
    let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/sandbox"))
        .args(args)
        .status()
        .expect("scripts/sandbox runs");
    assert!(status.success(), "scripts/sandbox {args:?} failed");
}

/// Resumes the component when dropped, so a failing test leaves the sandbox usable.
struct Paused(&'static str);

impl Paused {
    fn now(component: &'static str) -> Self {
        sandbox(&["pause", component]);
        Paused(component)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        sandbox(&["resume", self.0]);
    }
}

fn deployment(name: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      containers:\n      - name: app\n        image: nginx:1.25\n"
    )
}

/// Forty Deployments to sync, and the arguments that sync them with a short API timeout.
struct Forty {
    ns: TestNamespace,
    _repo: GitRepo,
    args: Vec<String>,
}

impl Forty {
    fn new(test: &str) -> Self {
        let ns = TestNamespace::new(test);
        let repo = GitRepo::new();
        for i in 0..40 {
            repo.write(
                &format!("deploy/web-{i:02}.yaml"),
                &deployment(&format!("web-{i:02}")),
            );
        }
        repo.commit("Forty Deployments");
        let args = [
            "sync",
            "--repo",
            repo.path_str(),
            "--path",
            "deploy",
            "-n",
            &ns.name,
            "--no-wait",
            "--api-timeout",
            "5s",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        Forty {
            ns,
            _repo: repo,
            args,
        }
    }

    fn sync(&self) -> Run {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        kommit(&args)
    }

    /// The sync, started on its own thread; its outcome arrives on the receiver.
    fn sync_in_background(&self) -> std::sync::mpsc::Receiver<Run> {
        let (done, finished) = std::sync::mpsc::channel();
        let args = self.args.clone();
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = done.send(kommit(&args));
        });
        finished
    }

    /// A run again converges: all forty there, once each, and a further run changes nothing.
    fn converges(&self) {
        let rerun = self.sync();
        assert_eq!(rerun.code, 0, "{rerun:?}");
        let names = kubectl_ok(&[
            "get",
            "deployments",
            "-n",
            &self.ns.name,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}{'\\n'}{end}",
        ]);
        assert_eq!(names.lines().count(), 40, "{names}");
        let again = self.sync();
        assert!(
            again.stdout.contains("40 unchanged"),
            "converged: {again:?}"
        );
    }
}

#[test]
fn an_api_server_that_stops_answering_mid_sync_fails_the_sync_and_a_rerun_converges() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let forty = Forty::new("chaos-api");
    let finished = forty.sync_in_background();
    // Hung, not dead: the process is there and the connection open, and nothing comes back.
    std::thread::sleep(Duration::from_millis(300));
    let paused = Paused::now("apiserver");
    let started = Instant::now();
    let run = finished
        .recv_timeout(Duration::from_secs(120))
        .expect("the sync gives up on its own");
    let waited = started.elapsed();
    drop(paused);
    if run.code == 0 {
        // The sync was quicker than the pause; nothing to learn here but that it converged.
        eprintln!("the sync finished before the API server was paused");
    } else {
        assert_eq!(run.code, 2, "{run:?}");
        assert!(
            run.stderr.contains("--api-timeout"),
            "says what timed out: {run:?}"
        );
        assert!(waited < Duration::from_secs(120));
    }

    wait_until(
        Duration::from_secs(60),
        "the API server answers again",
        || kubectl(&["get", "--raw", "/readyz"]).status.success(),
    );
    forty.converges();
}

#[test]
fn an_api_server_restarted_mid_sync_leaves_nothing_half_done_for_good() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let forty = Forty::new("chaos-restart");
    let finished = forty.sync_in_background();
    std::thread::sleep(Duration::from_millis(300));
    sandbox(&["restart", "apiserver"]);
    let run = finished
        .recv_timeout(Duration::from_secs(120))
        .expect("the sync ends on its own");
    // It either got through or says what failed; either way the next run converges.
    assert!(run.code == 0 || run.code == 2, "{run:?}");
    if run.code == 2 {
        assert!(run.stderr.contains("error:"), "{run:?}");
    }
    forty.converges();
}

/// A GitSync at the 10 s floor: the git-server test needs the periodic look (the healthy
/// GitSync keeps following its branch by itself while the other fails).
fn gitsync(name: &str, repo: &str) -> String {
    format!(
        "apiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {{name: {name}}}\nspec:\n  repo: {repo}\n  branch: main\n  path: deploy\n  interval: 10s\n"
    )
}

fn ready(namespace: &str, gitsync: &str, field: &str) -> String {
    jsonpath(
        namespace,
        &format!("gitsync/{gitsync}"),
        &format!("{{.status.conditions[?(@.type=='Ready')].{field}}}"),
    )
}

#[test]
fn a_git_server_that_never_answers_costs_one_gitsync_and_the_others_go_on() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    install_gitsync_crd();
    let ns = TestNamespace::new("chaos-git");
    // Accepts connections and never says a word.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/shop.git", server.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in server.incoming() {
            held.push(stream);
        }
    });
    let repo = GitRepo::new();
    repo.write(
        "deploy/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  v: \"1\"\n",
    );
    repo.commit("Settings v1");
    repo.git(&["branch", "-M", "main"]);
    let _operator = OperatorProcess::start(
        &[
            "--watch-namespace",
            &ns.name,
            "--no-leader-election",
            "--allow-local-repos",
            "--git-timeout",
            "2s",
        ],
        &[],
    );
    kubectl_apply(&ns.name, &gitsync("stuck", &dead), &[]);
    kubectl_apply(
        &ns.name,
        &gitsync("fine", &format!("file://{}", repo.path_str())),
        &[],
    );
    wait_until(
        Duration::from_secs(90),
        "the GitSync of the dead server says it timed out",
        || {
            ready(&ns.name, "stuck", "reason") == "SourceUnavailable"
                && ready(&ns.name, "stuck", "message").contains("did not answer within 2s")
        },
    );
    wait_until(Duration::from_secs(90), "the other GitSync syncs", || {
        kubectl(&["get", "-n", &ns.name, "configmap/settings"])
            .status
            .success()
    });
    // And keeps following its branch while the first one keeps failing.
    repo.write(
        "deploy/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  v: \"2\"\n",
    );
    repo.commit("Settings v2");
    wait_until(Duration::from_secs(90), "the next commit is synced", || {
        jsonpath(&ns.name, "configmap/settings", "{.data.v}") == "2"
    });
    assert_eq!(ready(&ns.name, "stuck", "reason"), "SourceUnavailable");
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_leader_paused_past_its_lease_is_replaced_and_writes_nothing_when_it_wakes() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    install_gitsync_crd();
    let ns = TestNamespace::new("chaos-leader");
    let repo = GitRepo::new();
    let settings = |v: u32| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  v: \"{v}\"\n"
        )
    };
    repo.write("deploy/settings.yaml", &settings(1));
    repo.commit("Settings v1");
    repo.git(&["branch", "-M", "main"]);
    let args = [
        "--watch-namespace",
        &ns.name,
        "--leader-election-namespace",
        &ns.name,
        "--lease-name",
        "chaos",
        "--lease-duration",
        "3s",
        "--allow-local-repos",
    ];
    let first = OperatorProcess::start(&args, &[]);
    wait_until(Duration::from_secs(30), "the first replica leads", || {
        first.metric("kommit_leader") == 1.0
    });
    let second = OperatorProcess::start(&args, &[]);
    kubectl_apply(
        &ns.name,
        &gitsync("shop", &format!("file://{}", repo.path_str())),
        &[],
    );
    // Not there yet is not an error: the first sync may still be on its way.
    let value = || {
        let out = kubectl(&[
            "get",
            "-n",
            &ns.name,
            "configmap/settings",
            "-o",
            "jsonpath={.data.v}",
        ]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    wait_until(Duration::from_secs(60), "v1 is synced", || value() == "1");

    // Hung, not dead: it holds its lease until the lease runs out.
    signal(first.pid(), "STOP");
    let woken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(60), "the standby takes over", || {
            second.metric("kommit_leader") == 1.0
        });
        repo.write("deploy/settings.yaml", &settings(2));
        repo.commit("Settings v2");
        reconcile_and_wait(
            &ns.name,
            "shop",
            Duration::from_secs(60),
            "the new leader syncs v2",
            || value() == "2",
        );
        // Something for the old leader to do when it wakes: a commit it has not seen, and a
        // reconcile request its watch delivers on waking.
        repo.write("deploy/settings.yaml", &settings(3));
        repo.commit("Settings v3");
        request_reconcile(&ns.name, "shop")
    }));
    let before = first.log().len();
    signal(first.pid(), "CONT");
    let asked = woken.unwrap();
    wait_until_handled(
        &ns.name,
        "shop",
        &asked,
        Duration::from_secs(60),
        "v3 is synced",
        || value() == "3",
    );
    std::thread::sleep(Duration::from_secs(5));
    let after_waking = first.log()[before..].to_string();
    assert!(
        !after_waking.contains("applied object="),
        "the old leader wrote after waking:\n{after_waking}"
    );
}
