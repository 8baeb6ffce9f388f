//! Git credentials for real: a repository served over smart HTTP by `git http-backend` behind a
//! small server in this test that demands a token (HTTP basic authentication, as GitHub and
//! GitLab do), fetched by `GitSource::open_with` and by the operator from a GitSync's Secret.
//! The tokens must never show in errors, statuses or logs.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::git_http::GitHttpServer;
use common::*;
use kommit::source::{GitCredentials, GitSource, GivenCredentials, SecretString};

const TOKEN: &str = "kommit-test-token-7f3a9c1e";
const WRONG_TOKEN: &str = "kommit-wrong-token-0b8d2e44";

fn web(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: {image}\n"
    )
}

fn token_credentials(username: Option<&str>, token: &str) -> GitCredentials {
    GivenCredentials::new("Secret team/git-creds")
        .with_token(username, SecretString::new(token))
        .into()
}

#[test]
fn a_token_fetches_over_https_and_a_wrong_one_fails_without_showing_it() {
    let server = GitHttpServer::start(TOKEN);
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    let first = repo.commit("Web on nginx 1.25");
    let url = server.publish(&repo, "shop.git");
    let cache = tempfile::tempdir().unwrap();

    let source = GitSource::open_with(
        &url,
        cache.path(),
        token_credentials(Some("x-access-token"), TOKEN),
    )
    .expect("the right token clones the repository");
    let head = source.resolve(None).unwrap();
    assert_eq!(head.sha, first);
    assert_eq!(head.subject, "Web on nginx 1.25");
    let files = source.read_manifests(&head, "deploy").unwrap();
    assert_eq!(files[0].path, "deploy/web.yaml");
    assert!(server.users().iter().all(|u| u == "x-access-token"));
    assert!(!server.users().is_empty());

    // A later fetch of the same source authenticates again with the credentials it was given.
    repo.write("deploy/web.yaml", &web("nginx:1.26"));
    let second = repo.commit("Web on nginx 1.26");
    server.update(&repo, "shop.git");
    source.fetch().expect("fetching again uses the same token");
    assert_eq!(source.resolve(None).unwrap().sha, second);

    // Without a username, `git` is sent; the server only checks the token.
    let other_cache = tempfile::tempdir().unwrap();
    GitSource::open_with(&url, other_cache.path(), token_credentials(None, TOKEN)).unwrap();
    assert!(server.users().contains(&"git".to_string()));

    // A wrong token: a clear error, and not a trace of the token in it.
    let wrong_cache = tempfile::tempdir().unwrap();
    let err = GitSource::open_with(
        &url,
        wrong_cache.path(),
        token_credentials(Some("x-access-token"), WRONG_TOKEN),
    )
    .unwrap_err();
    let (shown, debug) = (err.to_string(), format!("{err:?}"));
    for secret in [TOKEN, WRONG_TOKEN] {
        assert!(
            !shown.contains(secret) && !debug.contains(secret),
            "a token leaked into the error"
        );
    }
    assert!(
        shown.starts_with(&format!("cannot fetch {url}: authentication failed: the server rejected the token of Secret team/git-creds (user x-access-token)")),
        "{shown}"
    );
}

/// A GitSync that fetches once an hour: a later attempt is asked for (a reconcile request), as
/// one would after creating a missing Secret.
fn gitsync(name: &str, url: &str, secret: &str) -> String {
    format!(
        "apiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {{name: {name}}}\nspec:\n  repo: {url}\n  path: deploy\n  interval: 1h\n  secretRef: {{name: {secret}}}\n"
    )
}

/// A Secret given as a manifest, so that the token is on no command line or test output.
fn token_secret(name: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ntype: Opaque\nstringData:\n  username: x-access-token\n  token: {token}\n"
    )
}

#[test]
fn the_operator_fetches_with_the_secret_of_a_gitsync() {
    install_gitsync_crd();
    let ns = TestNamespace::new("credentials");
    let server = GitHttpServer::start(TOKEN);
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    let commit = repo.commit("Web on nginx 1.25");
    let url = server.publish(&repo, "shop.git");
    let operator = OperatorProcess::start(
        &["--watch-namespace", &ns.name, "--no-leader-election"],
        &[("KOMMIT_LOG", "kommit=debug,info")],
    );
    let condition = |gitsync: &str, kind: &str, field: &str| {
        jsonpath(
            &ns.name,
            &format!("gitsync/{gitsync}"),
            &format!("{{.status.conditions[?(@.type=='{kind}')].{field}}}"),
        )
    };

    // The Secret does not exist yet: the GitSync says so, and how to create it.
    kubectl_apply(&ns.name, &gitsync("shop", &url, "git-creds"), &[]);
    wait_until(
        Duration::from_secs(60),
        "the GitSync reports its missing Secret",
        || condition("shop", "Ready", "reason") == "CredentialsUnavailable",
    );
    assert_eq!(condition("shop", "Ready", "status"), "False");
    assert_eq!(condition("shop", "Stalled", "status"), "True");
    let message = condition("shop", "Ready", "message");
    assert!(
        message.starts_with(&format!(
            "GitSync {ns}/shop: Secret git-creds not found in namespace {ns}: create it with \
             `kubectl create secret generic git-creds -n {ns} --from-literal=token=TOKEN`",
            ns = ns.name
        )),
        "{message}"
    );

    // With the Secret, the next attempt fetches with its token and applies the commit.
    kubectl_apply(&ns.name, &token_secret("git-creds", TOKEN), &[]);
    reconcile_and_wait(
        &ns.name,
        "shop",
        Duration::from_secs(90),
        "the commit is applied with the Secret's token",
        || jsonpath(&ns.name, "gitsync/shop", "{.status.lastAppliedCommit}") == commit,
    );
    assert_eq!(
        jsonpath(
            &ns.name,
            "deployment/web",
            "{.spec.template.spec.containers[0].image}"
        ),
        "nginx:1.25"
    );
    wait_until(Duration::from_secs(60), "the GitSync is Ready", || {
        condition("shop", "Ready", "status") == "True"
    });
    assert_eq!(condition("shop", "Stalled", "status"), "False");
    assert!(server.users().iter().any(|u| u == "x-access-token"));

    // A Secret with a wrong token: the fetch fails, and the status says the token was rejected.
    kubectl_apply(&ns.name, &token_secret("stale-creds", WRONG_TOKEN), &[]);
    kubectl_apply(&ns.name, &gitsync("stale", &url, "stale-creds"), &[]);
    wait_until(
        Duration::from_secs(60),
        "the GitSync with a wrong token reports it",
        || condition("stale", "Ready", "reason") == "SourceUnavailable",
    );
    let message = condition("stale", "Ready", "message");
    assert!(
        message.contains(&format!(
            "authentication failed: the server rejected the token of Secret {}/stale-creds \
             (user x-access-token)",
            ns.name
        )),
        "{message}"
    );

    // A Secret without credentials names its keys, not its values.
    kubectl_apply(
        &ns.name,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: empty-creds}\nstringData: {tokn: x}\n",
        &[],
    );
    kubectl_apply(&ns.name, &gitsync("typo", &url, "empty-creds"), &[]);
    wait_until(
        Duration::from_secs(60),
        "the GitSync with a useless Secret reports it",
        || condition("typo", "Ready", "reason") == "CredentialsUnavailable",
    );
    assert!(
        condition("typo", "Ready", "message").ends_with("and it has only tokn"),
        "{}",
        condition("typo", "Ready", "message")
    );

    // No token anywhere: not in the statuses, not in the operator's debug log.
    let statuses = kubectl_ok(&["get", "gitsyncs", "-n", &ns.name, "-o", "yaml"]);
    let log = operator.log();
    for secret in [TOKEN, WRONG_TOKEN] {
        assert!(!statuses.contains(secret), "a token leaked into a status");
        assert!(
            !log.contains(secret),
            "a token leaked into the operator's log"
        );
    }
    assert!(
        log.contains("rejected the token"),
        "the operator logs the failure (without the token)"
    );
}

/// An OpenSSH server of its own on a free local port, for the user running the tests, that
/// accepts one client key; stopped when dropped.
struct SshServer {
    dir: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

const SSHD: &str = "/usr/sbin/sshd";

impl SshServer {
    fn start(authorized_key: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kommit-sshd-")
            .tempdir()
            .unwrap();
        keygen(&dir.path().join("host_ed25519"), "");
        std::fs::write(dir.path().join("authorized_keys"), authorized_key).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let user = whoami();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_ed25519\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPermitRootLogin prohibit-password\nAllowUsers {user}\n\
             PidFile {dir}/sshd.pid\nLogLevel ERROR\n",
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("sshd_config"), config).unwrap();
        // As root, sshd separates privileges into a directory it insists on.
        if user == "root" {
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd starts");
        wait_until(Duration::from_secs(20), "sshd listens", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        SshServer { dir, port, child }
    }

    /// The server's host key as a known_hosts line.
    fn known_hosts_line(&self) -> String {
        let public = std::fs::read_to_string(self.dir.path().join("host_ed25519.pub")).unwrap();
        let mut fields = public.split_whitespace();
        let (kind, key) = (fields.next().unwrap(), fields.next().unwrap());
        format!("[127.0.0.1]:{} {kind} {key}\n", self.port)
    }

    fn url(&self, repo: &GitRepo) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}/.git",
            whoami(),
            self.port,
            repo.path_str()
        )
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Makes an ed25519 key pair at `path` (and `path.pub`); returns the private key's text.
fn keygen(path: &Path, passphrase: &str) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-C", "", "-N", passphrase, "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen runs");
    assert!(out.status.success(), "ssh-keygen failed");
    std::fs::read_to_string(path).unwrap()
}

fn ssh_credentials(key: &str, passphrase: Option<&str>, known_hosts: &str) -> GitCredentials {
    GivenCredentials::new("Secret team/git-ssh")
        .with_ssh_key(
            SecretString::new(key),
            passphrase.map(SecretString::new),
            kommit::source::KnownHosts::parse(known_hosts).expect("valid known_hosts"),
        )
        .into()
}

#[test]
fn an_ssh_key_from_memory_fetches_only_from_a_host_in_known_hosts() {
    assert!(
        Path::new(SSHD).exists(),
        "{SSHD} is missing: install openssh-server (scripts/setup does, as root)"
    );
    let keys = tempfile::tempdir().unwrap();
    const PASSPHRASE: &str = "kommit passphrase 5e1d";
    let client_key = keygen(&keys.path().join("client"), PASSPHRASE);
    let client_public = std::fs::read_to_string(keys.path().join("client.pub")).unwrap();
    let stranger_key = keygen(&keys.path().join("stranger"), "");
    let server = SshServer::start(&client_public);
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", &web("nginx:1.25"));
    let commit = repo.commit("Web on nginx 1.25");
    let url = server.url(&repo);
    let known = server.known_hosts_line();
    let leaks = |err: &kommit::source::SourceError| {
        let shown = format!("{err} {err:?}");
        [
            "PRIVATE KEY",
            PASSPHRASE,
            client_key.lines().nth(1).unwrap(),
        ]
        .iter()
        .any(|secret| shown.contains(secret))
    };

    // The right key (with its passphrase) and the host in known_hosts: the commit is read.
    let cache = tempfile::tempdir().unwrap();
    let source = GitSource::open_with(
        &url,
        cache.path(),
        ssh_credentials(&client_key, Some(PASSPHRASE), &known),
    )
    .expect("the key clones over ssh");
    assert_eq!(source.resolve(Some("main")).unwrap().sha, commit);
    source.fetch().expect("and fetches again");

    // Hashed the way `ssh-keygen -H` does it, the entry still matches.
    let hashed = keys.path().join("known_hosts");
    std::fs::write(&hashed, &known).unwrap();
    let out = Command::new("ssh-keygen")
        .args(["-q", "-H", "-f"])
        .arg(&hashed)
        .output()
        .unwrap();
    assert!(out.status.success());
    let hashed = std::fs::read_to_string(&hashed).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    GitSource::open_with(
        &url,
        tempfile::tempdir().unwrap().path(),
        ssh_credentials(&client_key, Some(PASSPHRASE), &hashed),
    )
    .expect("a hashed known_hosts entry matches");

    // The host is not in known_hosts: refused before any key is offered.
    let elsewhere = format!("github.com {}", known.split_once(' ').unwrap().1);
    let err = GitSource::open_with(
        &url,
        tempfile::tempdir().unwrap().path(),
        ssh_credentials(&client_key, Some(PASSPHRASE), &elsewhere),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "host key for [127.0.0.1]:{} is not in the known_hosts of Secret team/git-ssh; add \
             it with `ssh-keyscan -p {} 127.0.0.1 >> known_hosts`",
            server.port, server.port
        )),
        "{err}"
    );
    assert!(!leaks(&err));

    // known_hosts lists another key for the host: a changed key, refused.
    let stranger_public = std::fs::read_to_string(keys.path().join("stranger.pub")).unwrap();
    let impostor = format!(
        "[127.0.0.1]:{} {}",
        server.port,
        stranger_public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let err = GitSource::open_with(
        &url,
        tempfile::tempdir().unwrap().path(),
        ssh_credentials(&client_key, Some(PASSPHRASE), &impostor),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "the ssh-ed25519 host key of [127.0.0.1]:{} does not match the known_hosts of \
             Secret team/git-ssh",
            server.port
        )),
        "{err}"
    );

    // A key the server does not accept, and a wrong passphrase: authentication fails.
    let err = GitSource::open_with(
        &url,
        tempfile::tempdir().unwrap().path(),
        ssh_credentials(&stranger_key, None, &known),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains(
            "authentication failed: the server refused the ssh key of Secret team/git-ssh"
        ),
        "{err}"
    );
    assert!(!leaks(&err));
    let err = GitSource::open_with(
        &url,
        tempfile::tempdir().unwrap().path(),
        ssh_credentials(&client_key, Some("not the passphrase"), &known),
    )
    .unwrap_err();
    assert!(!leaks(&err), "{err}");
    assert!(
        err.to_string().contains(
            "check that ssh-privatekey of Secret team/git-ssh is a whole private key and \
             ssh-passphrase its passphrase"
        ),
        "{err}"
    );
}
