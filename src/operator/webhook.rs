//! Push webhooks from GitHub, GitLab and Gitea: who sent it, whether it is authentic, and which
//! repository and ref it is about. Pure logic; the HTTP side is in `http.rs`.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The forge a webhook came from, told by its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    GitLab,
    Gitea,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::GitHub => "github",
            Provider::GitLab => "gitlab",
            Provider::Gitea => "gitea",
        }
    }
}

/// What the receiver needs from a request's headers (names lower-case).
pub trait Headers {
    fn get(&self, name: &str) -> Option<&str>;
}

impl Headers for axum::http::HeaderMap {
    fn get(&self, name: &str) -> Option<&str> {
        axum::http::HeaderMap::get(self, name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A push of a branch or tag: the repository's URLs and the full ref (`refs/heads/main`).
    Push { urls: Vec<String>, git_ref: String },
    /// A pull request opened, pushed to, labelled, closed…: the repository's URLs and the
    /// branch it targets.
    PullRequest { urls: Vec<String>, base: String },
    /// GitHub's `ping` and other events that ask for nothing.
    Ignored(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error(
        "not a GitHub, GitLab or Gitea webhook (no X-GitHub-Event, X-Gitlab-Event or X-Gitea-Event header)"
    )]
    UnknownProvider,
    #[error(
        "kommit has no webhook secret configured, so it accepts no webhook: set KOMMIT_WEBHOOK_SECRET (Helm: webhook.secret)"
    )]
    NoSecret,
    #[error("the {provider} webhook carries no signature ({header}): set the webhook's secret")]
    Unsigned {
        provider: &'static str,
        header: &'static str,
    },
    #[error(
        "the {provider} webhook's signature does not match: check that the webhook's secret is kommit's"
    )]
    BadSignature { provider: &'static str },
    #[error("the webhook's body is not a push event kommit understands: {0}")]
    Payload(String),
}

pub fn provider_of(headers: &impl Headers) -> Result<Provider, WebhookError> {
    // Gitea also sends X-GitHub-Event for compatibility; its own header decides.
    if headers.get("x-gitea-event").is_some() {
        Ok(Provider::Gitea)
    } else if headers.get("x-gitlab-event").is_some() {
        Ok(Provider::GitLab)
    } else if headers.get("x-github-event").is_some() {
        Ok(Provider::GitHub)
    } else {
        Err(WebhookError::UnknownProvider)
    }
}

/// Checks that the request was sent by someone who knows `secret`: GitHub and Gitea sign the body
/// with HMAC-SHA256; GitLab sends the secret token itself. Both comparisons take constant time.
pub fn verify(
    provider: Provider,
    headers: &impl Headers,
    body: &[u8],
    secret: Option<&[u8]>,
) -> Result<(), WebhookError> {
    let secret = secret
        .filter(|s| !s.is_empty())
        .ok_or(WebhookError::NoSecret)?;
    let name = provider.as_str();
    match provider {
        Provider::GitLab => {
            let token = headers
                .get("x-gitlab-token")
                .ok_or(WebhookError::Unsigned {
                    provider: name,
                    header: "X-Gitlab-Token",
                })?;
            if constant_time_eq(token.as_bytes(), secret) {
                Ok(())
            } else {
                Err(WebhookError::BadSignature { provider: name })
            }
        }
        Provider::GitHub | Provider::Gitea => {
            let signature = match provider {
                Provider::Gitea => headers.get("x-gitea-signature"),
                _ => None,
            }
            .or_else(|| {
                headers
                    .get("x-hub-signature-256")
                    .map(|s| s.strip_prefix("sha256=").unwrap_or(""))
            })
            .ok_or(WebhookError::Unsigned {
                provider: name,
                header: if provider == Provider::Gitea {
                    "X-Gitea-Signature"
                } else {
                    "X-Hub-Signature-256"
                },
            })?;
            let expected = decode_hex(signature.trim())
                .ok_or(WebhookError::BadSignature { provider: name })?;
            let mut mac = Hmac::<Sha256>::new_from_slice(secret)
                .map_err(|_| WebhookError::BadSignature { provider: name })?;
            mac.update(body);
            // verify_slice compares in constant time.
            mac.verify_slice(&expected)
                .map_err(|_| WebhookError::BadSignature { provider: name })
        }
    }
}

/// Reads the event: pushes ask for a sync, pull-request events for a look at pull requests.
pub fn parse_event(
    provider: Provider,
    headers: &impl Headers,
    body: &[u8],
) -> Result<Event, WebhookError> {
    let kind = match provider {
        Provider::GitHub => headers.get("x-github-event"),
        Provider::GitLab => headers.get("x-gitlab-event"),
        Provider::Gitea => headers.get("x-gitea-event"),
    }
    .unwrap_or_default()
    .to_string();
    let is_push = match provider {
        Provider::GitHub | Provider::Gitea => kind == "push",
        Provider::GitLab => kind == "Push Hook" || kind == "Tag Push Hook",
    };
    // GitHub sends `pull_request` (opened, synchronize, labeled, closed…); Gitea the same, or a
    // narrower `pull_request_sync` / `pull_request_label`. Reviews and comments change nothing.
    let is_pull_request = matches!(provider, Provider::GitHub | Provider::Gitea)
        && kind.starts_with("pull_request")
        && !kind.contains("comment")
        && !kind.contains("review");
    if !is_push && !is_pull_request {
        return Ok(Event::Ignored(kind));
    }
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::Payload(e.to_string()))?;
    if is_pull_request {
        let base = payload
            .pointer("/pull_request/base/ref")
            .and_then(Value::as_str)
            .ok_or_else(|| WebhookError::Payload("no \"pull_request.base.ref\"".into()))?
            .to_string();
        let urls = repository_urls(provider, &payload)?;
        return Ok(Event::PullRequest { urls, base });
    }
    let git_ref = payload
        .get("ref")
        .and_then(Value::as_str)
        .ok_or_else(|| WebhookError::Payload("no \"ref\"".into()))?
        .to_string();
    let urls = repository_urls(provider, &payload)?;
    Ok(Event::Push { urls, git_ref })
}

/// The URLs a payload gives for its repository.
fn repository_urls(provider: Provider, payload: &Value) -> Result<Vec<String>, WebhookError> {
    let url_fields: &[(&str, &[&str])] = match provider {
        Provider::GitHub | Provider::Gitea => &[(
            "repository",
            &["clone_url", "ssh_url", "html_url", "git_url", "url"],
        )],
        Provider::GitLab => &[
            ("project", &["git_http_url", "git_ssh_url", "web_url"]),
            (
                "repository",
                &["git_http_url", "git_ssh_url", "homepage", "url"],
            ),
        ],
    };
    let mut urls = Vec::new();
    for (object, fields) in url_fields {
        for field in *fields {
            if let Some(url) = payload
                .get(object)
                .and_then(|o| o.get(field))
                .and_then(Value::as_str)
                && !urls.iter().any(|u| u == url)
            {
                urls.push(url.to_string());
            }
        }
    }
    if urls.is_empty() {
        return Err(WebhookError::Payload("no repository URL".into()));
    }
    Ok(urls)
}

/// A repository URL reduced to what identifies the repository: `github.com/org/app` for
/// `https://github.com/Org/app.git`, `git@github.com:org/app` and `ssh://git@github.com/org/app`.
pub fn normalize_repo_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    let url = url.strip_suffix(".git").unwrap_or(url);
    let (host, path) = if let Some((_, rest)) = url.split_once("://") {
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        match rest.split_once('/') {
            Some((host, path)) => (host, path),
            None => (rest, ""),
        }
    } else if let Some((user_host, path)) = url.split_once(':') {
        (
            user_host.rsplit_once('@').map_or(user_host, |(_, h)| h),
            path,
        )
    } else {
        ("", url)
    };
    // Ports differ between a forge's https and ssh URLs; the host and path name the repository.
    let host = host.split(':').next().unwrap_or(host).to_ascii_lowercase();
    let path = path.trim_start_matches('/');
    if host.is_empty() {
        format!("/{path}")
    } else {
        // Forges treat owner and repository names case-insensitively.
        format!("{host}/{}", path.to_ascii_lowercase())
    }
}

/// Whether a push of `git_ref` to a repository at one of `urls` concerns a GitSync that follows
/// `repo` at `branch` or `rev` (neither: the default branch, which a push payload cannot name
/// reliably, so any branch push counts).
pub fn push_concerns(
    urls: &[String],
    git_ref: &str,
    repo: &str,
    branch: Option<&str>,
    rev: Option<&str>,
) -> bool {
    let wanted = normalize_repo_url(repo);
    if !urls.iter().any(|u| normalize_repo_url(u) == wanted) {
        return false;
    }
    match (branch, rev) {
        (Some(branch), _) => git_ref == format!("refs/heads/{branch}"),
        // A fixed rev only moves when it is a tag or branch name that was pushed.
        (None, Some(rev)) => {
            git_ref == format!("refs/tags/{rev}") || git_ref == format!("refs/heads/{rev}")
        }
        (None, None) => git_ref.starts_with("refs/heads/"),
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Equal lengths are compared without an early exit; only the length can leak.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `sha256=...` value GitHub would send for `body` (for tests and tools that send webhooks).
pub fn github_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!(
        "sha256={}",
        crate::source::hex(&mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct H(HashMap<&'static str, String>);
    impl Headers for H {
        fn get(&self, name: &str) -> Option<&str> {
            self.0.get(name).map(String::as_str)
        }
    }
    fn headers(pairs: &[(&'static str, &str)]) -> H {
        H(pairs.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }

    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";

    #[test]
    fn github_signatures_are_checked_with_hmac_sha256() {
        // The example from GitHub's documentation on validating webhook deliveries.
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(github_signature(SECRET, BODY), good);
        let h = headers(&[("x-github-event", "push"), ("x-hub-signature-256", good)]);
        assert_eq!(verify(Provider::GitHub, &h, BODY, Some(SECRET)), Ok(()));
        assert_eq!(
            verify(Provider::GitHub, &h, b"Hello, World?", Some(SECRET)),
            Err(WebhookError::BadSignature { provider: "github" })
        );
        assert_eq!(
            verify(Provider::GitHub, &h, BODY, Some(b"another secret")),
            Err(WebhookError::BadSignature { provider: "github" })
        );
        let forged = headers(&[("x-hub-signature-256", "sha256=zz")]);
        assert!(verify(Provider::GitHub, &forged, BODY, Some(SECRET)).is_err());
        let unsigned = headers(&[("x-github-event", "push")]);
        assert!(matches!(
            verify(Provider::GitHub, &unsigned, BODY, Some(SECRET)),
            Err(WebhookError::Unsigned { .. })
        ));
        assert_eq!(
            verify(Provider::GitHub, &h, BODY, None),
            Err(WebhookError::NoSecret)
        );
        assert_eq!(
            verify(Provider::GitHub, &h, BODY, Some(b"")),
            Err(WebhookError::NoSecret)
        );
    }

    #[test]
    fn gitea_signs_without_a_prefix_and_gitlab_sends_its_token() {
        let hex = github_signature(SECRET, BODY)["sha256=".len()..].to_string();
        let gitea = headers(&[("x-gitea-event", "push"), ("x-gitea-signature", &hex)]);
        assert_eq!(provider_of(&gitea), Ok(Provider::Gitea));
        assert_eq!(verify(Provider::Gitea, &gitea, BODY, Some(SECRET)), Ok(()));

        let gitlab = headers(&[
            ("x-gitlab-event", "Push Hook"),
            ("x-gitlab-token", "It's a Secret to Everybody"),
        ]);
        assert_eq!(provider_of(&gitlab), Ok(Provider::GitLab));
        assert_eq!(
            verify(Provider::GitLab, &gitlab, BODY, Some(SECRET)),
            Ok(())
        );
        let wrong = headers(&[("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "guess")]);
        assert!(verify(Provider::GitLab, &wrong, BODY, Some(SECRET)).is_err());
        assert_eq!(
            provider_of(&headers(&[("user-agent", "curl")])),
            Err(WebhookError::UnknownProvider)
        );
    }

    #[test]
    fn push_payloads_yield_the_repository_urls_and_ref() {
        let github = br#"{"ref":"refs/heads/main","repository":{"clone_url":"https://github.com/acme/shop.git","ssh_url":"git@github.com:acme/shop.git","html_url":"https://github.com/acme/shop"}}"#;
        let h = headers(&[("x-github-event", "push")]);
        let Event::Push { urls, git_ref } = parse_event(Provider::GitHub, &h, github).unwrap()
        else {
            panic!("a push")
        };
        assert_eq!(git_ref, "refs/heads/main");
        assert_eq!(urls.len(), 3);

        let gitlab = br#"{"ref":"refs/tags/v1","project":{"git_http_url":"https://gitlab.com/acme/shop.git","git_ssh_url":"git@gitlab.com:acme/shop.git"}}"#;
        let h = headers(&[("x-gitlab-event", "Tag Push Hook")]);
        assert!(matches!(
            parse_event(Provider::GitLab, &h, gitlab),
            Ok(Event::Push { .. })
        ));

        let ping = headers(&[("x-github-event", "ping")]);
        assert_eq!(
            parse_event(Provider::GitHub, &ping, b"{}"),
            Ok(Event::Ignored("ping".into()))
        );
        assert!(parse_event(Provider::GitHub, &h_push(), b"not json").is_err());
        assert!(parse_event(Provider::GitHub, &h_push(), br#"{"ref":"refs/heads/x"}"#).is_err());
    }

    fn h_push() -> H {
        headers(&[("x-github-event", "push")])
    }

    #[test]
    fn pull_request_events_name_the_repository_and_the_base_branch() {
        let body = br#"{"action":"synchronize","pull_request":{"number":3,"base":{"ref":"main"}},
            "repository":{"clone_url":"https://github.com/org/app.git"}}"#;
        let h = headers(&[("x-github-event", "pull_request")]);
        assert_eq!(
            parse_event(Provider::GitHub, &h, body).unwrap(),
            Event::PullRequest {
                urls: vec!["https://github.com/org/app.git".into()],
                base: "main".into()
            }
        );
        let sync = headers(&[("x-gitea-event", "pull_request_sync")]);
        assert!(matches!(
            parse_event(Provider::Gitea, &sync, body).unwrap(),
            Event::PullRequest { .. }
        ));
        let comment = headers(&[("x-github-event", "pull_request_review_comment")]);
        assert!(matches!(
            parse_event(Provider::GitHub, &comment, body).unwrap(),
            Event::Ignored(_)
        ));
        assert!(parse_event(Provider::GitHub, &h, br#"{"pull_request":{}}"#).is_err());
    }

    #[test]
    fn the_forms_of_one_repository_url_normalize_alike() {
        let forms = [
            "https://github.com/Acme/Shop.git",
            "https://github.com/acme/shop",
            "https://token@github.com/acme/shop/",
            "git@github.com:acme/shop.git",
            "ssh://git@github.com/acme/shop.git",
            "ssh://git@GitHub.com:22/acme/shop",
        ];
        for form in forms {
            assert_eq!(normalize_repo_url(form), "github.com/acme/shop", "{form}");
        }
        assert_eq!(
            normalize_repo_url("file:///srv/git/shop.git"),
            "/srv/git/shop"
        );
        assert_ne!(
            normalize_repo_url("https://github.com/acme/shop"),
            normalize_repo_url("https://github.com/acme/shop-config")
        );
    }

    #[test]
    fn pushes_concern_the_gitsyncs_that_follow_the_pushed_ref() {
        let urls = vec!["https://github.com/acme/shop.git".to_string()];
        let repo = "git@github.com:acme/shop.git";
        assert!(push_concerns(
            &urls,
            "refs/heads/main",
            repo,
            Some("main"),
            None
        ));
        assert!(!push_concerns(
            &urls,
            "refs/heads/dev",
            repo,
            Some("main"),
            None
        ));
        assert!(push_concerns(&urls, "refs/heads/dev", repo, None, None));
        assert!(!push_concerns(&urls, "refs/tags/v1", repo, None, None));
        assert!(push_concerns(&urls, "refs/tags/v1", repo, None, Some("v1")));
        assert!(!push_concerns(
            &urls,
            "refs/heads/main",
            "https://github.com/acme/other",
            None,
            None
        ));
    }
}
