//! The test forge (a real Gitea, `scripts/forge`): started here when it is not running, and a
//! raw API caller for the set-up steps the kommit client does not do itself (repositories,
//! branches, pull requests, users, forks). Never skips: a forge that cannot be built or started
//! fails the test with the script's message.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// Where the forge answers and who the test is on it.
#[derive(Clone)]
pub struct ForgeEnv {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The admin user.
    pub user: String,
    pub token: String,
}

impl ForgeEnv {
    pub fn api_url(&self) -> String {
        format!("{}/api/v1", self.url)
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The running forge, started with `scripts/forge up` (build included) if it is not running.
pub fn forge() -> ForgeEnv {
    static ENV: OnceLock<ForgeEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let script = repo_root().join("scripts/forge");
        let up = Command::new(&script)
            .arg("up")
            .output()
            .expect("run scripts/forge up");
        assert!(
            up.status.success(),
            "the test forge could not be built or started (scripts/forge up):\n{}",
            String::from_utf8_lossy(&up.stderr)
        );
        let env = Command::new(&script)
            .arg("env")
            .output()
            .expect("run scripts/forge env");
        assert!(
            env.status.success(),
            "scripts/forge env failed:\n{}",
            String::from_utf8_lossy(&env.stderr)
        );
        let text = String::from_utf8(env.stdout).expect("scripts/forge env prints UTF-8");
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("scripts/forge env printed no {name}"))
                .trim_matches('\'')
                .to_string()
        };
        ForgeEnv {
            url: var("FORGE_URL"),
            user: var("FORGE_USER"),
            token: var("FORGE_TOKEN"),
        }
    })
    .clone()
}

/// One API call with the admin token (acting as `sudo` when given); returns the status and the
/// JSON answer (`null` when empty).
pub fn api(
    env: &ForgeEnv,
    method: &str,
    path: &str,
    body: Option<&Value>,
    sudo: Option<&str>,
) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-X", method])
        .args(["-H", &format!("Authorization: token {}", env.token)])
        .args(["-H", "Content-Type: application/json"])
        .args(["-w", "\n%{http_code}"]);
    if let Some(user) = sudo {
        cmd.args(["-H", &format!("Sudo: {user}")]);
    }
    if let Some(body) = body {
        cmd.args(["--data-binary", &body.to_string()]);
    }
    cmd.arg(format!("{}{}", env.api_url(), path));
    let out = cmd.output().expect("run curl");
    assert!(
        out.status.success(),
        "curl {method} {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (json, code) = text.rsplit_once('\n').expect("curl printed a status line");
    let status: u16 = code.trim().parse().expect("an HTTP status");
    let value = if json.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("{method} {path} answered non-JSON ({e}): {json}"))
    };
    (status, value)
}

/// Like [`api`], but the status must be one of `ok`; returns the answer.
pub fn api_ok(
    env: &ForgeEnv,
    method: &str,
    path: &str,
    body: Option<&Value>,
    sudo: Option<&str>,
    ok: &[u16],
) -> Value {
    let (status, value) = api(env, method, path, body, sudo);
    assert!(
        ok.contains(&status),
        "{method} {path} answered {status}, expected {ok:?}: {value}"
    );
    value
}

/// A second user of the forge, who forks `full_name` (the admin acts for it with `Sudo`).
pub fn user_with_fork(env: &ForgeEnv, user: &str, full_name: &str) {
    api_ok(
        env,
        "POST",
        "/admin/users",
        Some(&serde_json::json!({
            "username": user,
            "email": format!("{user}@example.com"),
            "password": "fork-user-password-1",
            "must_change_password": false,
        })),
        None,
        &[201],
    );
    api_ok(
        env,
        "POST",
        &format!("/repos/{full_name}/forks"),
        Some(&serde_json::json!({})),
        Some(user),
        &[201, 202],
    );
}
