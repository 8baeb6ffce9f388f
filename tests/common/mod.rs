//! The harness every end-to-end test uses: the sandbox's kubeconfig, a fresh namespace per test
//! (removed afterwards), throwaway git repositories with real commits, and runners for `kommit`
//! and the sandbox's own `kubectl`.
#![allow(dead_code)]

pub mod forge;
pub mod git_http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The sandbox's admin kubeconfig. Panics (never skips) when the sandbox is not running.
pub fn kubeconfig() -> PathBuf {
    let path = std::env::var_os("KOMMIT_TEST_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/sandbox/kubeconfig"));
    assert!(
        path.exists(),
        "the sandbox is not running ({} is missing): start it with `scripts/sandbox up`, or run \
         the whole suite with `scripts/test`, which starts it",
        path.display()
    );
    path
}

fn kubectl_binary() -> PathBuf {
    let bundled = repo_root().join("target/sandbox/bin/kubectl");
    if bundled.exists() {
        bundled
    } else {
        PathBuf::from("kubectl")
    }
}

/// Runs the sandbox's kubectl; returns its output whatever the exit code.
pub fn kubectl(args: &[&str]) -> Output {
    Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .output()
        .expect("kubectl runs")
}

/// Runs kubectl and returns stdout, panicking with its stderr when it fails.
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Applies a manifest given as text with kubectl.
pub fn kubectl_apply(namespace: &str, manifest: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("manifest.yaml");
    std::fs::write(&file, manifest).unwrap();
    let mut args = vec!["apply", "-n", namespace, "-f", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    kubectl_ok(&args)
}

/// A JSONPath query on one object.
pub fn jsonpath(namespace: &str, object: &str, path: &str) -> String {
    kubectl_ok(&[
        "get",
        "-n",
        namespace,
        object,
        "-o",
        &format!("jsonpath={path}"),
    ])
}

/// Installs the GitSync CRD as `kommit crd` prints it (idempotent) and waits until it is served.
pub fn install_gitsync_crd() {
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

/// A namespace of its own for one test; deleted (without waiting) when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn new(test: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let slug: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(36)
            .collect();
        let name = format!(
            "t-{}-{}-{}",
            slug.trim_matches('-'),
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        kubectl_ok(&["create", "namespace", &name]);
        // Pods need the namespace's default ServiceAccount, which a controller creates.
        wait_until(
            Duration::from_secs(30),
            "the default ServiceAccount exists",
            || {
                kubectl(&["get", "serviceaccount", "default", "-n", &name])
                    .status
                    .success()
            },
        );
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// Polls `check` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Asks the operator to reconcile GitSync `name` now, as a push webhook does (the
/// `kommit.dev/reconcile-requested-at` annotation), and returns the request's token: the
/// status's `lastHandledReconcileAt` shows it once a reconcile begun after the request is done.
pub fn request_reconcile(namespace: &str, name: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let token = format!(
        "{}-test-{}-{}",
        kommit::audit::now_rfc3339(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    kubectl_ok(&[
        "annotate",
        "--overwrite",
        "-n",
        namespace,
        &format!("gitsync/{name}"),
        &format!(
            "{}={token}",
            kommit::operator::http::REQUESTED_AT_ANNOTATION
        ),
    ]);
    token
}

/// Asks for a reconcile of GitSync `name` and waits until it is done and `check` holds.
pub fn reconcile_and_wait(
    namespace: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl FnMut() -> bool,
) {
    let token = request_reconcile(namespace, name);
    wait_until_handled(namespace, name, &token, timeout, what, check);
}

/// Whether the reconcile asked for with `token` is done (its outcome is in the status).
pub fn reconcile_handled(namespace: &str, name: &str, token: &str) -> bool {
    jsonpath(
        namespace,
        &format!("gitsync/{name}"),
        "{.status.lastHandledReconcileAt}",
    ) == token
}

/// Waits until the reconcile asked for with `token` is done and `check` holds; the panic on
/// timeout says which of the two was missing, and shows the GitSync's status.
pub fn wait_until_handled(
    namespace: &str,
    name: &str,
    token: &str,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let handled = reconcile_handled(namespace, name, token);
        if handled && check() {
            return;
        }
        if Instant::now() >= deadline {
            let status = jsonpath(namespace, &format!("gitsync/{name}"), "{.status}");
            panic!(
                "timed out after {timeout:?} waiting until {what}: {}\n--- status of GitSync {name}\n{status}",
                if handled {
                    "the requested reconcile is done, yet the condition does not hold"
                } else {
                    "the requested reconcile was not done"
                }
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A throwaway git repository with real commits, made by the `git` command line.
pub struct GitRepo {
    dir: tempfile::TempDir,
}

impl GitRepo {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kommit-repo-")
            .tempdir()
            .unwrap();
        let repo = GitRepo { dir };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    /// Runs git in the repository with a fixed identity; returns stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(self.dir.path())
            .env("GIT_AUTHOR_NAME", "Ada Lovelace")
            .env("GIT_AUTHOR_EMAIL", "ada@example.com")
            .env("GIT_COMMITTER_NAME", "Ada Lovelace")
            .env("GIT_COMMITTER_EMAIL", "ada@example.com")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", self.dir.path())
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn write(&self, path: &str, content: &str) -> &Self {
        let file = self.dir.path().join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
        self
    }

    pub fn remove(&self, path: &str) -> &Self {
        self.git(&["rm", "-q", "-r", path]);
        self
    }

    /// Commits everything; returns the new commit's full SHA.
    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        self.head()
    }

    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }
}

/// The outcome of one kommit run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the kommit binary against the sandbox.
pub fn kommit(args: &[&str]) -> Run {
    kommit_with_env(args, &[])
}

pub fn kommit_with_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kommit"));
    command
        .args(args)
        .env("KUBECONFIG", kubeconfig())
        .env("NO_COLOR", "1")
        .env_remove("KOMMIT_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().expect("kommit runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Waits like `kubectl rollout status` for a Deployment.
pub fn rollout_status(namespace: &str, deployment: &str, timeout: &str) -> Output {
    kubectl(&[
        "rollout",
        "status",
        "-n",
        namespace,
        &format!("deployment/{deployment}"),
        &format!("--timeout={timeout}"),
    ])
}

/// A `kommit operator` process run from here against the sandbox, its HTTP server on a free
/// local port; killed when dropped. Its stderr is kept for messages.
pub struct OperatorProcess {
    child: std::process::Child,
    pub address: std::net::SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    _cache: tempfile::TempDir,
}

impl OperatorProcess {
    /// Starts `kommit operator --listen 127.0.0.1:0 ARGS` (env: KUBECONFIG of the sandbox and a
    /// cache folder of its own, unless `env` says otherwise) and waits until it listens.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let cache = tempfile::tempdir().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kommit"));
        command
            .args(["operator", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("KUBECONFIG", kubeconfig())
            .env("KOMMIT_CACHE_DIR", cache.path())
            .env("NO_COLOR", "1")
            .env_remove("KOMMIT_WEBHOOK_SECRET")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("kommit operator starts");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (address_sender, address) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = line.strip_prefix("kommit: listening on ") {
                    let _ = address_sender.send(address.trim().to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let address = match address.recv_timeout(Duration::from_secs(60)) {
            Ok(address) => address.parse().expect("a socket address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the operator did not start listening: {}",
                    log.lock().unwrap()
                );
            }
        };
        OperatorProcess {
            child,
            address,
            log,
            _cache: cache,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one HTTP/1.1 request to the operator; returns the status code and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        http_request(self.address, method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, &[], b"")
    }

    /// The value of one series of /metrics, e.g. `kommit_leader` or
    /// `kommit_reconciles_total{namespace="a",name="b",result="success"}`; 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().unwrap_or(0.0))
    }

    /// The sum of every series of a metric that carries all of `labels` (e.g. `name="shop"`).
    pub fn metric_sum(&self, metric: &str, labels: &[&str]) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|line| {
                line.starts_with(&format!("{metric}{{")) || line.starts_with(&format!("{metric} "))
            })
            .filter(|line| labels.iter().all(|label| line.contains(label)))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGKILL: a crash, with no chance to release anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as Kubernetes stops a pod; waits for the process to exit and returns its code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
        None
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`); returns the status code and body.
pub fn http_request(
    address: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("the operator listens");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}
