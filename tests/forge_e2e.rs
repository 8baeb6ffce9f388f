//! The forge client against a real Gitea (`scripts/forge`, started here if it is not running):
//! pull requests listed with their head, labels and fork-ness, one marked comment kept up to date,
//! commit statuses set and read back, and errors that are errors, never empty lists.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::forge::{ForgeEnv, api_ok, forge, user_with_fork};
use kommit::forge::{
    CommentOutcome, CommitStatus, Forge, ForgeError, Provider, Repo, StatusState, comment_marker,
};
use serde_json::{Value, json};

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn client(env: &ForgeEnv) -> Forge {
    Forge::new(Provider::Gitea, &env.api_url(), env.token.clone()).expect("a forge client")
}

/// Commits one file to `full_name` (`owner/repo`) onto a new branch `branch` made from `from`; returns the commit's SHA.
fn commit_file(
    env: &ForgeEnv,
    full_name: &str,
    from: &str,
    branch: &str,
    path: &str,
    text: &str,
    sudo: Option<&str>,
) -> String {
    let body = json!({
        "content": base64::engine::general_purpose::STANDARD.encode(text),
        "message": format!("add {path}"),
        "branch": from,
        "new_branch": branch,
    });
    let answer = api_ok(
        env,
        "POST",
        &format!("/repos/{full_name}/contents/{path}"),
        Some(&body),
        sudo,
        &[201],
    );
    answer["commit"]["sha"]
        .as_str()
        .expect("the new commit's sha")
        .to_string()
}

/// A repository of the admin user with `main`, a labelled same-repo PR, a fork PR from a second
/// user, and a PR against another branch. Returns (repo, same-repo PR number and head SHA, fork
/// user, fork PR number).
struct Scene {
    repo: Repo,
    pr: u64,
    pr_sha: String,
    fork_user: String,
    fork_pr: u64,
    other_base_pr: u64,
}

fn scene(env: &ForgeEnv) -> Scene {
    let name = unique("forge-e2e");
    let owner = env.user.clone();
    api_ok(
        env,
        "POST",
        "/user/repos",
        Some(&json!({"name": name, "auto_init": true, "default_branch": "main"})),
        None,
        &[201],
    );
    let label = api_ok(
        env,
        "POST",
        &format!("/repos/{owner}/{name}/labels"),
        Some(&json!({"name": "kommit/preview", "color": "#00aabb"})),
        None,
        &[201],
    );
    let pr_sha = commit_file(
        env,
        &format!("{owner}/{name}"),
        "main",
        "change-image",
        "app.yaml",
        "image: app:v2\n",
        None,
    );
    let pr = api_ok(
        env,
        "POST",
        &format!("/repos/{owner}/{name}/pulls"),
        Some(
            &json!({"head": "change-image", "base": "main", "title": "app v2",
                     "labels": [label["id"]]}),
        ),
        None,
        &[201],
    );

    // Another base: a PR into `release` must not be listed for `main`.
    api_ok(
        env,
        "POST",
        &format!("/repos/{owner}/{name}/branches"),
        Some(&json!({"new_branch_name": "release", "old_branch_name": "main"})),
        None,
        &[201],
    );
    commit_file(
        env,
        &format!("{owner}/{name}"),
        "release",
        "hotfix",
        "fix.yaml",
        "fix: 1\n",
        None,
    );
    let other = api_ok(
        env,
        "POST",
        &format!("/repos/{owner}/{name}/pulls"),
        Some(&json!({"head": "hotfix", "base": "release", "title": "hotfix"})),
        None,
        &[201],
    );

    // A second user forks and opens a PR from the fork (the admin acts for it with `Sudo`).
    let fork_user = unique("mallory").replace('-', "");
    user_with_fork(env, &fork_user, &format!("{owner}/{name}"));
    commit_file(
        env,
        &format!("{fork_user}/{name}"),
        "main",
        "from-fork",
        "evil.yaml",
        "image: evil:latest\n",
        Some(&fork_user),
    );
    let fork_pr = api_ok(
        env,
        "POST",
        &format!("/repos/{owner}/{name}/pulls"),
        Some(
            &json!({"head": format!("{fork_user}:from-fork"), "base": "main",
                     "title": "from a fork"}),
        ),
        Some(&fork_user),
        &[201],
    );
    let number = |v: &Value| v["number"].as_u64().expect("a PR number");
    Scene {
        repo: Repo::new(owner, name),
        pr: number(&pr),
        pr_sha,
        fork_user,
        fork_pr: number(&fork_pr),
        other_base_pr: number(&other),
    }
}

#[tokio::test]
async fn pull_requests_comments_and_statuses_on_a_real_forge() {
    let env = forge();
    let s = scene(&env);
    let forge = client(&env);

    // --- The open PRs against main: the same-repo one and the fork one, not the release one.
    let pulls = forge.open_pull_requests(&s.repo, "main").await.unwrap();
    let numbers: Vec<u64> = pulls.iter().map(|p| p.number).collect();
    assert_eq!(numbers, vec![s.pr, s.fork_pr], "{pulls:#?}");
    assert!(!numbers.contains(&s.other_base_pr));
    let pr = &pulls[0];
    assert_eq!(pr.head_sha, s.pr_sha);
    assert_eq!(pr.head_ref, "change-image");
    assert_eq!(pr.base_ref, "main");
    assert_eq!(pr.head_repo.as_deref(), Some(s.repo.full_name().as_str()));
    assert_eq!(pr.base_repo, s.repo.full_name());
    assert_eq!(pr.labels, vec!["kommit/preview"]);
    assert!(!pr.from_fork);
    let fork = &pulls[1];
    assert!(fork.from_fork, "{fork:#?}");
    assert_eq!(
        fork.head_repo.as_deref(),
        Some(format!("{}/{}", s.fork_user, s.repo.name).as_str())
    );
    assert_eq!(fork.base_repo, s.repo.full_name());
    assert_eq!(fork.head_ref, "from-fork");
    let release = forge.open_pull_requests(&s.repo, "release").await.unwrap();
    assert_eq!(
        release.iter().map(|p| p.number).collect::<Vec<_>>(),
        vec![s.other_base_pr]
    );

    // --- One comment per PR and key, edited in place.
    let key = "production/app";
    let marker = comment_marker(key);
    // Someone else's comment quoting the marker must be left alone.
    let impostor = format!("{marker}\nnot kommit's");
    api_ok(
        &env,
        "POST",
        &format!(
            "/repos/{}/{}/issues/{}/comments",
            s.repo.owner, s.repo.name, s.pr
        ),
        Some(&json!({ "body": impostor })),
        Some(&s.fork_user),
        &[201],
    );
    let first = forge
        .upsert_comment(&s.repo, s.pr, key, "diff: one change")
        .await
        .unwrap();
    let CommentOutcome::Created { id } = first else {
        panic!("the first upsert must create: {first:?}")
    };
    let second = forge
        .upsert_comment(&s.repo, s.pr, key, "diff: two changes")
        .await
        .unwrap();
    assert_eq!(second, CommentOutcome::Updated { id });
    let third = forge
        .upsert_comment(&s.repo, s.pr, key, "diff: two changes")
        .await
        .unwrap();
    assert_eq!(third, CommentOutcome::Unchanged { id });
    let bodies = forge.comments(&s.repo, s.pr).await.unwrap();
    let ours: Vec<&String> = bodies
        .iter()
        .filter(|b| b.contains(&marker) && **b != impostor)
        .collect();
    assert_eq!(
        ours,
        vec![&format!("{marker}\ndiff: two changes")],
        "{bodies:#?}"
    );
    assert!(
        bodies.contains(&impostor),
        "the other user's comment is untouched: {bodies:#?}"
    );
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    // Another key on the same PR is another comment.
    let other = forge
        .upsert_comment(&s.repo, s.pr, "staging/app", "staging diff")
        .await
        .unwrap();
    assert!(matches!(other, CommentOutcome::Created { id: o } if o != id));

    // --- Commit statuses on the head SHA, description cut to 140 characters.
    let long = "x".repeat(300);
    forge
        .set_status(
            &s.repo,
            &pr.head_sha,
            &CommitStatus {
                state: StatusState::Pending,
                context: "kommit/diff".into(),
                description: long,
                target_url: Some("http://127.0.0.1:9/pr/1".into()),
            },
        )
        .await
        .unwrap();
    let read = forge
        .status(&s.repo, &pr.head_sha, "kommit/diff")
        .await
        .unwrap()
        .expect("the status just set");
    assert_eq!(read.state, StatusState::Pending);
    assert_eq!(read.description.chars().count(), 140, "{read:?}");
    assert_eq!(read.target_url.as_deref(), Some("http://127.0.0.1:9/pr/1"));
    forge
        .set_status(
            &s.repo,
            &pr.head_sha,
            &CommitStatus {
                state: StatusState::Failure,
                context: "kommit/diff".into(),
                description: "2 problems: Deployment/app refused".into(),
                target_url: None,
            },
        )
        .await
        .unwrap();
    let newest = forge
        .status(&s.repo, &pr.head_sha, "kommit/diff")
        .await
        .unwrap()
        .expect("the newest status");
    assert_eq!(newest.state, StatusState::Failure);
    assert_eq!(newest.description, "2 problems: Deployment/app refused");
    assert_eq!(
        forge
            .status(&s.repo, &pr.head_sha, "kommit/preview")
            .await
            .unwrap(),
        None
    );

    // --- A closed PR is no longer listed.
    api_ok(
        &env,
        "PATCH",
        &format!(
            "/repos/{}/{}/pulls/{}",
            s.repo.owner, s.repo.name, s.fork_pr
        ),
        Some(&json!({"state": "closed"})),
        None,
        &[200, 201],
    );
    let open = forge.open_pull_requests(&s.repo, "main").await.unwrap();
    assert_eq!(
        open.iter().map(|p| p.number).collect::<Vec<_>>(),
        vec![s.pr]
    );
}

#[tokio::test]
async fn forge_errors_are_typed_never_empty_lists() {
    let env = forge();
    let repo_name = unique("forge-errors");
    api_ok(
        &env,
        "POST",
        "/user/repos",
        Some(&json!({"name": repo_name, "auto_init": true, "default_branch": "main"})),
        None,
        &[201],
    );
    let repo = Repo::new(env.user.clone(), repo_name);
    // The repository has no PRs: the right token gives an empty list...
    assert_eq!(
        client(&env)
            .open_pull_requests(&repo, "main")
            .await
            .unwrap(),
        vec![]
    );

    // ...a wrong token gives an answered error, which names no token.
    let wrong = "0123456789abcdef0123456789abcdef01234567";
    let bad = Forge::new(Provider::Gitea, &env.api_url(), wrong).unwrap();
    let err = bad.open_pull_requests(&repo, "main").await.unwrap_err();
    assert!(
        matches!(err, ForgeError::Api { status: 401, .. }),
        "a wrong token must be an API error 401: {err:?}"
    );
    assert!(!err.is_unreachable());
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(wrong), "{text}");
        assert!(!text.contains(&env.token), "{text}");
    }
    let err = bad.upsert_comment(&repo, 1, "k", "body").await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");

    // A repository that does not exist is a 404, not "no pull requests".
    let err = client(&env)
        .open_pull_requests(&Repo::new(env.user.clone(), "no-such-repo-here"), "main")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");

    // An API URL that is not the API (the web root) answers HTML: a decode error, not a list.
    let web = Forge::new(Provider::Gitea, &env.url, env.token.clone()).unwrap();
    let err = web.open_pull_requests(&repo, "main").await.unwrap_err();
    assert!(
        matches!(err, ForgeError::Api { .. } | ForgeError::Decode { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_push_to_a_pull_request_is_a_synchronize_event() {
    use axum::body::Bytes;
    use axum::routing::post;
    use kommit::forge::{PullRequestAction, PullRequestEvent};

    let env = forge();
    let name = unique("forge-hook");
    let owner = env.user.clone();
    let full = format!("{owner}/{name}");
    api_ok(
        &env,
        "POST",
        "/user/repos",
        Some(&json!({"name": name, "auto_init": true, "default_branch": "main"})),
        None,
        &[201],
    );
    commit_file(&env, &full, "main", "topic", "a.yaml", "a: 1\n", None);
    let pr = api_ok(
        &env,
        "POST",
        &format!("/repos/{full}/pulls"),
        Some(&json!({"head": "topic", "base": "main", "title": "topic"})),
        None,
        &[201],
    );
    let number = pr["number"].as_u64().unwrap();

    // A receiver on loopback (the forge allows loopback deliveries), then the hook.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    api_ok(
        &env,
        "POST",
        &format!("/repos/{full}/hooks"),
        Some(
            &json!({"type": "gitea", "active": true, "events": ["pull_request"],
                     "config": {"url": hook_url, "content_type": "json", "secret": "s"}}),
        ),
        None,
        &[201],
    );

    // A new commit on the PR's branch.
    let body = json!({
        "content": base64::engine::general_purpose::STANDARD.encode("b: 2\n"),
        "message": "add b.yaml",
        "branch": "topic",
    });
    let pushed = api_ok(
        &env,
        "POST",
        &format!("/repos/{full}/contents/b.yaml"),
        Some(&body),
        None,
        &[201],
    );
    let new_sha = pushed["commit"]["sha"].as_str().unwrap().to_string();

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let delivery = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no synchronize delivery within 60 s; got {seen:#?}"))
            .expect("the receiver runs");
        let event = PullRequestEvent::parse(Provider::Gitea, &delivery)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&delivery)));
        if event.action == PullRequestAction::Synchronize {
            assert_eq!(event.pull_request.number, number);
            assert_eq!(event.pull_request.head_sha, new_sha);
            assert_eq!(event.repository, full);
            assert_eq!(event.sender, owner);
            assert!(!event.pull_request.from_fork);
            break;
        }
        seen.push(event);
    }
}
