//! The operator image, run the way the chart's Deployment runs it in a pod: `scripts/image`
//! builds it, `install.yaml` (the chart with its default values) is applied as the README's
//! install says, and podman starts the image with what the kubelet would give the pod: a token
//! of the chart's ServiceAccount, the cluster CA and the namespace at
//! /var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST/PORT, the Deployment's
//! arguments, environment and emptyDirs, user 65532 and a read-only root filesystem. It must
//! reconcile a GitSync with no `forbidden` in its log, serve /metrics, lead on the chart's Lease
//! and stop cleanly on SIGTERM.
//!
//! Needs the sandbox, podman and a builder (`scripts/setup` installs buildah, podman and runc as
//! root on Debian; `scripts/test` runs it). Skips, saying so, only when podman is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use common::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the chart (and install.yaml) puts the operator, and the Lease it leads on.
const INSTALL_NAMESPACE: &str = "kommit";

/// podman with this project's containers.conf (no default ulimits, runc), which
/// `scripts/setup` writes.
fn podman(args: &[&str]) -> Output {
    let conf = repo_root().join("target/containers/containers.conf");
    assert!(
        conf.exists(),
        "{} is missing: run scripts/setup (it writes podman's settings for this machine)",
        conf.display()
    );
    Command::new("podman")
        .env("CONTAINERS_CONF", conf)
        .args(args)
        .output()
        .expect("podman runs")
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds the image with `scripts/image` around the binary these tests run (the same image as a
/// release, without a release build in CI) and returns its reference, the script's last line.
fn build_image() -> String {
    let started = Instant::now();
    let out = Command::new(repo_root().join("scripts/image"))
        .args(["--binary", env!("CARGO_BIN_EXE_kommit")])
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/image runs");
    assert!(
        out.status.success(),
        "scripts/image failed (its output is above)"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let image = stdout.lines().last().unwrap_or_default().trim().to_string();
    assert_eq!(
        image,
        format!("localhost/kommit:{}", env!("CARGO_PKG_VERSION")),
        "the last line of scripts/image is the image reference"
    );
    eprintln!("image_e2e: {image} built in {:?}", started.elapsed());
    image
}

/// The documents of a multi-document YAML file.
fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("install.yaml is valid YAML")
        .into_iter()
        .filter(Value::is_object)
        .collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The sandbox API server's port and CA certificate (PEM), from its admin kubeconfig.
fn api_server() -> (u16, Vec<u8>) {
    let cluster: Value = serde_json::from_str(&kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster}",
    ]))
    .unwrap();
    let server = cluster["server"].as_str().unwrap();
    let port = server
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in the sandbox's server {server}"));
    let ca = match (
        cluster["certificate-authority-data"].as_str(),
        cluster["certificate-authority"].as_str(),
    ) {
        (Some(data), _) => base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
        (None, Some(file)) => std::fs::read(file).unwrap(),
        _ => panic!("the sandbox's kubeconfig names no CA"),
    };
    (port, ca)
}

/// A running container; removed (forcibly) when dropped.
struct Container {
    name: String,
}

impl Container {
    fn log(&self) -> String {
        let out = podman(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn state(&self) -> String {
        podman_ok(&["inspect", "--format", "{{.State.Status}}", &self.name])
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.name]);
    }
}

/// Waits until `check` holds; on timeout the panic shows the GitSync and the container's log.
fn wait_for(
    container: &Container,
    namespace: &str,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting until {what}\n--- GitSync\n{}\n--- container log\n{}",
                String::from_utf8_lossy(
                    &kubectl(&["get", "gitsync", "shop", "-n", namespace, "-o", "yaml"]).stdout
                ),
                container.log()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A folder the container's user (65532) can read: the test's temp folders are private.
fn open_to_everyone(path: &Path) {
    let status = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn the_image_runs_as_the_charts_pod_reconciles_a_gitsync_leads_and_stops_on_sigterm() {
    if !have("podman") {
        eprintln!(
            "SKIPPED image_e2e: podman is missing and could not be installed (scripts/setup \
             installs buildah, podman and runc as root on Debian; elsewhere install podman)"
        );
        return;
    }
    let image = build_image();

    // The image: `kommit --version` names the version and commit, non-root, small.
    let version = podman_ok(&["run", "--rm", "--runtime", "runc", &image, "--version"]);
    let expected = format!("kommit {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(
        version.starts_with(&expected),
        "kommit --version says {version:?}"
    );
    // The commit the binary inside was built from, as build.rs saw it for this build.
    let built_from = env!("KOMMIT_GIT_COMMIT");
    assert!(
        built_from.len() >= 40 && built_from[..40].bytes().all(|b| b.is_ascii_hexdigit()),
        "built from a checkout, the binary knows its commit: {built_from:?}"
    );
    assert!(
        version.contains(built_from),
        "the image names the commit it was built from ({built_from}): {version}"
    );
    assert_eq!(
        podman_ok(&["image", "inspect", "--format", "{{.Config.User}}", &image]),
        "65532:65532"
    );
    let size: u64 = podman_ok(&["image", "inspect", "--format", "{{.Size}}", &image])
        .parse()
        .unwrap();
    assert!(
        size < 100 << 20,
        "the image is {size} bytes: well under 100 MiB expected"
    );

    // The install, as the README says: install.yaml applied server-side. The sandbox's nodes are
    // kwok's (pods there run no process), so the Deployment's pod is run here, by podman.
    let install = repo_root().join("install.yaml");
    kubectl_ok(&["apply", "--server-side", "-f", install.to_str().unwrap()]);
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/gitsyncs.kommit.dev",
        "--timeout=60s",
    ]);
    let docs = documents(&std::fs::read_to_string(&install).unwrap());
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("install.yaml has the operator's Deployment");
    assert_eq!(deployment["metadata"]["namespace"], INSTALL_NAMESPACE);
    let pod = &deployment["spec"]["template"]["spec"];
    let spec = &pod["containers"][0];
    assert_eq!(
        spec["image"],
        image.as_str(),
        "install.yaml runs what scripts/image builds"
    );
    let service_account = pod["serviceAccountName"].as_str().unwrap();

    // What the kubelet mounts for the ServiceAccount: a token, the cluster CA, the namespace.
    let (api_port, ca) = api_server();
    let secrets = tempfile::tempdir().unwrap();
    let token = kubectl_ok(&[
        "create",
        "token",
        service_account,
        "-n",
        INSTALL_NAMESPACE,
        "--duration=1h",
    ]);
    std::fs::write(secrets.path().join("token"), token.trim()).unwrap();
    std::fs::write(secrets.path().join("ca.crt"), ca).unwrap();
    std::fs::write(secrets.path().join("namespace"), INSTALL_NAMESPACE).unwrap();
    open_to_everyone(secrets.path());

    // A GitSync in a namespace of the test's, following a repository mounted into the container.
    let ns = TestNamespace::new("image e2e");
    let repo = GitRepo::new();
    repo.write(
        "deploy/config.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop-config\ndata:\n  greeting: hello from the image\n",
    );
    let head = repo.commit("The shop's configuration");
    // git refuses a repository its user does not own, so the container gets a bare copy owned
    // by the pod's user, as a repository served to the operator would be.
    let served = tempfile::tempdir().unwrap();
    let bare = served.path().join("shop.git");
    repo.git(&[
        "clone",
        "-q",
        "--bare",
        repo.path_str(),
        bare.to_str().unwrap(),
    ]);
    open_to_everyone(served.path());
    let status = Command::new("chown")
        .args(["-R", "65532:65532"])
        .arg(&bare)
        .status()
        .unwrap();
    assert!(status.success(), "chown of the served repository");
    let repo_in_container = "/srv/git/shop";
    // Tenancy is locked by default: the GitSync acts as a ServiceAccount of its namespace, which
    // its team bound to what it may deploy.
    kubectl_ok(&["create", "serviceaccount", "deployer", "-n", &ns.name]);
    kubectl_ok(&[
        "create",
        "rolebinding",
        "deployer",
        "--clusterrole=edit",
        &format!("--serviceaccount={}:deployer", ns.name),
        "-n",
        &ns.name,
    ]);
    kubectl_apply(
        &ns.name,
        &format!(
            "apiVersion: kommit.dev/v1alpha1\nkind: GitSync\nmetadata: {{name: shop}}\nspec:\n  repo: file://{repo_in_container}\n  branch: main\n  path: deploy\n  prune: true\n  serviceAccountName: deployer\n"
        ),
        &[],
    );

    // The container, as the Deployment's pod: its arguments (with --listen on a free port of the
    // host network instead of the pod's own 8080, and --allow-local-repos), environment,
    // emptyDirs and security context.
    let port = free_port();
    let pod_name = format!("kommit-image-e2e-{}", std::process::id());
    let mut args = strings(&spec["args"]);
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .expect("the Deployment passes --listen");
    args[listen + 1] = format!("127.0.0.1:{port}");
    let security = &spec["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    let user = format!(
        "{}:{}",
        pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
    );
    let mut run: Vec<String> = [
        "run",
        "--detach",
        "--name",
        &pod_name,
        "--hostname",
        &pod_name,
        "--runtime",
        "runc",
        "--network",
        "host",
        "--user",
        &user,
        "--read-only",
        // Only the pod's emptyDirs are writable, as in the cluster.
        "--read-only-tmpfs=false",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    .map(String::from)
    .to_vec();
    for mount in spec["volumeMounts"].as_array().unwrap() {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert!(
            volume["emptyDir"].is_object(),
            "only emptyDirs to mount: {volume}"
        );
        run.push("--mount".into());
        run.push(format!(
            "type=tmpfs,destination={},tmpfs-mode=1777",
            mount["mountPath"].as_str().unwrap()
        ));
    }
    run.push("--volume".into());
    run.push(format!(
        "{}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
        secrets.path().display()
    ));
    run.push("--volume".into());
    run.push(format!("{}:{repo_in_container}:ro", bare.display()));
    let mut env = vec![
        "KUBERNETES_SERVICE_HOST=127.0.0.1".to_string(),
        format!("KUBERNETES_SERVICE_PORT={api_port}"),
    ];
    for var in spec["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        let value = if let Some(value) = var["value"].as_str() {
            value.to_string()
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.namespace") => INSTALL_NAMESPACE.to_string(),
                Some("metadata.name") => pod_name.clone(),
                _ => panic!("the test does not know how the kubelet fills {var}"),
            }
        };
        env.push(format!("{name}={value}"));
    }
    for var in &env {
        run.push("--env".into());
        run.push(var.clone());
    }
    run.push(image.clone());
    run.extend(args);
    // The one argument beyond the chart's defaults: a file:// repository is refused unless the
    // operator allows local repositories (operator.extraArgs in the chart).
    run.push("--allow-local-repos".into());
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let container = Container {
        name: podman_ok(&run).lines().last().unwrap().to_string(),
    };
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for(
        &container,
        &ns.name,
        Duration::from_secs(60),
        "the operator listens",
        || container.log().contains("kommit: listening on"),
    );

    // It reconciles the GitSync: the commit is applied and the ConfigMap is there.
    wait_for(
        &container,
        &ns.name,
        Duration::from_secs(120),
        "the GitSync's commit is applied",
        || {
            kubectl(&[
                "get",
                "gitsync",
                "shop",
                "-n",
                &ns.name,
                "-o",
                "jsonpath={.status.lastAppliedCommit}",
            ])
            .stdout
                == head.as_bytes()
        },
    );
    assert_eq!(
        jsonpath(&ns.name, "configmap/shop-config", "{.data.greeting}"),
        "hello from the image"
    );

    // It leads on the chart's Lease in its own namespace and says so in /metrics.
    let lease = deployment_lease(&strings(&spec["args"]));
    let holder = jsonpath(
        INSTALL_NAMESPACE,
        &format!("lease/{lease}"),
        "{.spec.holderIdentity}",
    );
    assert!(
        holder.starts_with(&pod_name),
        "the Lease {INSTALL_NAMESPACE}/{lease} is held by {holder:?}, not by {pod_name}"
    );
    let (code, metrics) = http_request(address, "GET", "/metrics", &[], b"");
    assert_eq!(code, 200);
    assert!(metrics.contains("kommit_leader 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("namespace=\"{}\"", ns.name)),
        "/metrics counts the GitSync's reconciles: {metrics}"
    );
    assert_eq!(http_request(address, "GET", "/readyz", &[], b"").0, 200);

    // SIGTERM, as the kubelet stops a pod: a clean exit that hands the Lease back.
    podman_ok(&["kill", "--signal", "TERM", &container.name]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while container.state() != "exited" {
        assert!(
            Instant::now() < deadline,
            "the operator did not stop within 60 s of SIGTERM:\n{}",
            container.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = container.log();
    assert_eq!(
        podman_ok(&[
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            &container.name
        ]),
        "0",
        "SIGTERM is a clean stop:\n{log}"
    );
    assert_eq!(
        jsonpath(
            INSTALL_NAMESPACE,
            &format!("lease/{lease}"),
            "{.spec.holderIdentity}"
        ),
        "",
        "the stopped leader released its Lease"
    );
    // Only about its own GitSync: this operator watches every namespace, and the GitSyncs of
    // stories running beside it may ask for what the chart does not grant by default
    // (pull-request previews).
    let others = "GitSync.v1alpha1.kommit.dev/";
    let own = format!("{others}shop.{}", ns.name);
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .filter(|l| !l.contains(others) || l.contains(&own))
        .collect();
    assert!(
        refused.is_empty(),
        "the chart's RBAC is missing a permission the operator used:\n{log}"
    );
}

/// The Lease the Deployment's arguments name.
fn deployment_lease(args: &[String]) -> String {
    args.iter()
        .position(|a| a == "--lease-name")
        .and_then(|i| args.get(i + 1))
        .expect("the Deployment names its Lease")
        .clone()
}
