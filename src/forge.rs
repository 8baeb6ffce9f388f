//! A small client for the forge a GitSync's repository lives on: the GitHub-shaped REST API that
//! GitHub serves at `https://api.github.com` and Gitea under `/api/v1`. It does the three things
//! pull-request rollouts need: list the open pull requests against a branch, keep ONE comment per
//! pull request up to date (found by a hidden marker), and set commit statuses.
//!
//! Every failure is typed so that callers can never mistake an error for an answer: a forge that
//! answered with an error ([`ForgeError::Api`]) and a forge that could not be reached
//! ([`ForgeError::Unreachable`], [`ForgeError::Timeout`]) are distinct from an empty list. The
//! token never appears in an error or in `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// GitHub refuses comments longer than this many characters; Gitea accepts more, so the smaller
/// limit is the one to stay under.
pub const MAX_COMMENT_CHARS: usize = 65_536;
/// GitHub refuses a commit status description longer than this.
pub const MAX_STATUS_DESCRIPTION_CHARS: usize = 140;
/// How long one request may take, connect to last byte, unless [`Forge::with_timeout`] says else.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Larger answers are refused rather than buffered: a forge page of pull requests is far smaller.
const MAX_RESPONSE_BYTES: usize = 32 << 20;
/// Items asked for per page; Gitea's default `MAX_RESPONSE_ITEMS` is 50, GitHub allows 100.
const PAGE_SIZE: usize = 50;
/// A guard against a forge that keeps saying there is a next page.
const MAX_PAGES: usize = 200;

/// Which forge: they share the API shape but differ in a few field names and webhook actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    Gitea,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::GitHub => "GitHub",
            Provider::Gitea => "Gitea",
        })
    }
}

impl std::str::FromStr for Provider {
    type Err = ForgeError;
    fn from_str(s: &str) -> Result<Self, ForgeError> {
        match s {
            "github" => Ok(Provider::GitHub),
            "gitea" => Ok(Provider::Gitea),
            other => Err(ForgeError::Config(format!(
                "unknown pull-request provider {other:?}: use github or gitea"
            ))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    /// The forge answered, with an error status. Never read this as "nothing there".
    #[error(
        "{provider} answered {status} to {method} {path}: {message} (check the token's access to the repository, and the repository name)"
    )]
    Api {
        provider: Provider,
        method: Method,
        path: String,
        status: u16,
        message: String,
    },
    /// No answer: connection refused, DNS, TLS. The forge's state is unknown.
    #[error(
        "could not reach {provider} for {method} {path} at {base}: {cause} (check the API URL and the network)"
    )]
    Unreachable {
        provider: Provider,
        method: Method,
        base: String,
        path: String,
        cause: String,
    },
    /// No full answer in time. The forge's state is unknown.
    #[error("{provider} did not answer {method} {path} within {after:?}; retry later")]
    Timeout {
        provider: Provider,
        method: Method,
        path: String,
        after: Duration,
    },
    /// An answer kommit cannot read: not the API shape it expects (a wrong API URL often gives
    /// an HTML page).
    #[error(
        "{provider} answered {method} {path} with something that is not the expected JSON: {cause} (is the API URL right?)"
    )]
    Decode {
        provider: Provider,
        method: Method,
        path: String,
        cause: String,
    },
    /// Bad settings, found before any request.
    #[error("forge settings: {0}")]
    Config(String),
    /// A comment that the forge would refuse for its length; the caller must shorten it.
    #[error(
        "the comment is {chars} characters with its marker, over the forge limit of {MAX_COMMENT_CHARS}; truncate the report"
    )]
    CommentTooLong { chars: usize },
}

impl ForgeError {
    /// True when the forge's state is unknown (no answer), as opposed to an answered error.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ForgeError::Unreachable { .. } | ForgeError::Timeout { .. }
        )
    }

    /// The HTTP status the forge answered with, if it answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ForgeError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A repository on the forge, `owner/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    pub owner: String,
    pub name: String,
}

impl Repo {
    pub fn new(owner: impl Into<String>, name: impl Into<String>) -> Self {
        Repo {
            owner: owner.into(),
            name: name.into(),
        }
    }

    /// `owner/name` from a clone URL (`https://host/owner/name(.git)`, `git@host:owner/name.git`)
    /// or from `owner/name` itself.
    pub fn parse(url_or_name: &str) -> Result<Repo, ForgeError> {
        let s = url_or_name.trim().trim_end_matches('/');
        let s = s.strip_suffix(".git").unwrap_or(s);
        let path = if let Some((_, rest)) = s.split_once("://") {
            rest.split_once('/').map(|(_, p)| p).unwrap_or("")
        } else if let Some((host, rest)) = s.split_once(':') {
            if host.contains('/') { s } else { rest }
        } else {
            s
        };
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        match parts.as_slice() {
            [.., owner, name] => Ok(Repo::new(*owner, *name)),
            _ => Err(ForgeError::Config(format!(
                "cannot tell owner/name from {url_or_name:?}: give a URL like https://host/owner/name.git"
            ))),
        }
    }

    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

impl fmt::Display for Repo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// The API base URL for a repository URL: GitHub's API host for github.com, `/api/v1` on the
/// repository's host for Gitea. Anything else (GitHub Enterprise, a Gitea under a sub-path)
/// needs an explicit API URL.
pub fn api_url_for(provider: Provider, repo_url: &str) -> Result<String, ForgeError> {
    let (scheme, rest) = repo_url.split_once("://").ok_or_else(|| {
        ForgeError::Config(format!(
            "cannot derive the API URL from {repo_url:?} (not http(s)): set pullRequests.apiURL"
        ))
    })?;
    let host = rest.split('/').next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or(host);
    if !matches!(scheme, "http" | "https") || host.is_empty() {
        return Err(ForgeError::Config(format!(
            "cannot derive the API URL from {repo_url:?}: set pullRequests.apiURL"
        )));
    }
    Ok(match provider {
        Provider::GitHub if host == "github.com" => "https://api.github.com".to_string(),
        Provider::GitHub => format!("{scheme}://{host}/api/v3"),
        Provider::Gitea => format!("{scheme}://{host}/api/v1"),
    })
}

/// An open pull request, as the rollout logic needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub number: u64,
    pub title: String,
    pub author: String,
    pub head_sha: String,
    pub head_ref: String,
    /// `owner/name` of the head repository; `None` when the fork was deleted.
    pub head_repo: Option<String>,
    pub base_ref: String,
    pub base_repo: String,
    pub labels: Vec<String>,
    /// The head lives in another repository than the base (or in a deleted one): its code is
    /// untrusted until approved.
    pub from_fork: bool,
    pub state: PullState,
}

/// Whether a pull request is still open, as the forge says it (never inferred from an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullState {
    Open,
    Closed,
    Merged,
}

/// What [`Forge::upsert_comment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommentOutcome {
    Created {
        id: u64,
    },
    Updated {
        id: u64,
    },
    /// The comment already said exactly this; nothing was sent.
    Unchanged {
        id: u64,
    },
}

/// A commit status state, as both forges name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusState {
    Pending,
    Success,
    Failure,
    Error,
}

impl StatusState {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusState::Pending => "pending",
            StatusState::Success => "success",
            StatusState::Failure => "failure",
            StatusState::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<StatusState> {
        Some(match s {
            "pending" => StatusState::Pending,
            "success" => StatusState::Success,
            "failure" => StatusState::Failure,
            "error" => StatusState::Error,
            _ => return None,
        })
    }
}

/// A commit status, to set or as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStatus {
    pub state: StatusState,
    /// The check's name, such as `kommit/diff`.
    pub context: String,
    pub description: String,
    pub target_url: Option<String>,
}

/// A pull-request webhook action, with the providers' spellings made one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullRequestAction {
    Opened,
    Reopened,
    Closed,
    /// New commits on the head: GitHub says `synchronize`, Gitea `synchronized`.
    Synchronize,
    Edited,
    Labeled,
    Unlabeled,
    Other(String),
}

impl PullRequestAction {
    pub fn parse(action: &str) -> PullRequestAction {
        match action {
            "opened" => PullRequestAction::Opened,
            "reopened" => PullRequestAction::Reopened,
            "closed" => PullRequestAction::Closed,
            "synchronize" | "synchronized" => PullRequestAction::Synchronize,
            "edited" => PullRequestAction::Edited,
            "labeled" | "label_updated" => PullRequestAction::Labeled,
            "unlabeled" | "label_cleared" => PullRequestAction::Unlabeled,
            other => PullRequestAction::Other(other.to_string()),
        }
    }
}

/// A `pull_request` webhook delivery, as GitHub and Gitea send it (same shape, different action
/// spellings). The HMAC check is the caller's, before this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestEvent {
    pub action: PullRequestAction,
    /// `owner/name` of the repository the pull request is against.
    pub repository: String,
    /// Who caused the event: kommit's own comments and statuses come back as events too.
    pub sender: String,
    pub pull_request: PullRequest,
}

impl PullRequestEvent {
    /// Parses a delivery's body; a body of another shape is an error naming what is missing.
    pub fn parse(provider: Provider, body: &[u8]) -> Result<PullRequestEvent, ForgeError> {
        #[derive(Deserialize)]
        struct Raw {
            action: String,
            pull_request: RawPull,
            repository: RawRepo,
            sender: Option<RawUser>,
        }
        let raw: Raw = serde_json::from_slice(body).map_err(|e| ForgeError::Decode {
            provider,
            method: Method::POST,
            path: "(pull_request webhook)".into(),
            cause: e.to_string(),
        })?;
        Ok(PullRequestEvent {
            action: PullRequestAction::parse(&raw.action),
            repository: raw.repository.full_name,
            sender: raw.sender.map(|u| u.login).unwrap_or_default(),
            pull_request: PullRequest::from(raw.pull_request),
        })
    }
}

/// The hidden line that identifies kommit's comment for one GitSync on a pull request.
pub fn comment_marker(key: &str) -> String {
    // A `>` in the key could end the HTML comment early and show the rest.
    let key = key.replace('>', "_");
    format!("<!-- kommit:{key} -->")
}

/// `text` cut to `max` characters, ending in `…` when it was cut.
pub fn truncate_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A token that never shows itself.
#[derive(Clone)]
struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A client for one forge's API with one token.
#[derive(Clone)]
pub struct Forge {
    provider: Provider,
    api: String,
    token: Token,
    timeout: Duration,
    client: HttpsClient,
    /// GET answers by path with their ETag: asked again with `If-None-Match`, an unchanged list
    /// costs GitHub no rate limit (Gitea sends no ETag for lists, so it is always asked anew).
    cache: Arc<Mutex<HashMap<String, Cached>>>,
}

#[derive(Clone)]
struct Cached {
    etag: HeaderValue,
    body: Bytes,
    link: Option<String>,
}

/// Entries kept in the ETag cache before it starts over (a GitSync polls a handful of paths).
const MAX_CACHED: usize = 256;

impl fmt::Debug for Forge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forge")
            .field("provider", &self.provider)
            .field("api", &self.api)
            .field("token", &self.token)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Forge {
    /// A client for the API at `api_url` (e.g. `https://api.github.com`,
    /// `http://127.0.0.1:3000/api/v1`), authenticated by `token`.
    pub fn new(
        provider: Provider,
        api_url: &str,
        token: impl Into<String>,
    ) -> Result<Forge, ForgeError> {
        let api = api_url.trim_end_matches('/').to_string();
        if !(api.starts_with("https://") || api.starts_with("http://")) {
            return Err(ForgeError::Config(format!(
                "the API URL {api:?} must start with https:// (or http:// for a local forge)"
            )));
        }
        let token = token.into();
        if token.trim().is_empty() || token.contains(['\r', '\n']) {
            return Err(ForgeError::Config(
                "the forge token is empty or has a line break: check the Secret it comes from"
                    .into(),
            ));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| ForgeError::Config(format!("cannot load the system's CA roots: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Forge {
            provider,
            api,
            token: Token(token.trim().to_string()),
            timeout: DEFAULT_TIMEOUT,
            client,
            cache: Arc::default(),
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Forge {
        self.timeout = timeout;
        self
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn api_url(&self) -> &str {
        &self.api
    }

    /// The login the token belongs to.
    pub async fn current_user(&self) -> Result<String, ForgeError> {
        #[derive(Deserialize)]
        struct Me {
            login: String,
        }
        let me: Me = self.get_json("/user").await?;
        Ok(me.login)
    }

    /// The open pull requests whose base is `base_branch`, oldest first. An error is always an
    /// error, never an empty list.
    pub async fn open_pull_requests(
        &self,
        repo: &Repo,
        base_branch: &str,
    ) -> Result<Vec<PullRequest>, ForgeError> {
        let path = format!(
            "/repos/{}/{}/pulls?state=open&base={}&sort=created&direction=asc",
            seg(&repo.owner),
            seg(&repo.name),
            query(base_branch)
        );
        let raw: Vec<RawPull> = self.get_all(&path).await?;
        let mut pulls: Vec<PullRequest> = raw
            .into_iter()
            // Gitea has no `base` filter: filter here for both.
            .filter(|p| {
                p.state.as_deref().is_none_or(|s| s == "open") && p.base.ref_ == base_branch
            })
            .map(PullRequest::from)
            .collect();
        pulls.sort_by_key(|p| p.number);
        Ok(pulls)
    }

    /// One pull request, whatever its state: how kommit learns that a pull request it no longer
    /// sees in the open list was closed or merged.
    pub async fn pull_request(&self, repo: &Repo, number: u64) -> Result<PullRequest, ForgeError> {
        let path = format!(
            "/repos/{}/{}/pulls/{number}",
            seg(&repo.owner),
            seg(&repo.name)
        );
        let raw: RawPull = self.get_json(&path).await?;
        Ok(raw.into())
    }

    /// Takes `label` off a pull request (a fork's approval, when new commits were pushed after
    /// it). A label that is not there is not an error.
    pub async fn remove_label(
        &self,
        repo: &Repo,
        number: u64,
        label: &str,
    ) -> Result<(), ForgeError> {
        let path = format!(
            "/repos/{}/{}/issues/{number}/labels/{}",
            seg(&repo.owner),
            seg(&repo.name),
            seg(&self.label_identifier(repo, label).await?)
        );
        match self.request(Method::DELETE, &path, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// GitHub names a label in the path by its name, Gitea by its id.
    async fn label_identifier(&self, repo: &Repo, label: &str) -> Result<String, ForgeError> {
        if self.provider == Provider::GitHub {
            return Ok(label.to_string());
        }
        #[derive(Deserialize)]
        struct RawRepoLabel {
            id: u64,
            name: String,
        }
        let path = format!("/repos/{}/{}/labels", seg(&repo.owner), seg(&repo.name));
        let labels: Vec<RawRepoLabel> = self.get_all(&path).await?;
        Ok(labels
            .into_iter()
            .find(|l| l.name == label)
            .map(|l| l.id.to_string())
            .unwrap_or_else(|| label.to_string()))
    }

    /// Makes sure the pull request has exactly one comment of this token's user carrying the
    /// marker for `key`, saying `body`: edits it if there is one, creates it if there is none.
    pub async fn upsert_comment(
        &self,
        repo: &Repo,
        number: u64,
        key: &str,
        body: &str,
    ) -> Result<CommentOutcome, ForgeError> {
        let marker = comment_marker(key);
        let full = format!("{marker}\n{body}");
        let chars = full.chars().count();
        if chars > MAX_COMMENT_CHARS {
            return Err(ForgeError::CommentTooLong { chars });
        }
        let me = self.current_user().await?;
        let path = format!(
            "/repos/{}/{}/issues/{number}/comments",
            seg(&repo.owner),
            seg(&repo.name)
        );
        let comments: Vec<RawComment> = self.get_all(&path).await?;
        // Only our own comments: anyone can paste the marker into theirs.
        let existing = comments
            .iter()
            .filter(|c| {
                c.user.as_ref().is_some_and(|u| u.login == me)
                    && c.body.as_deref().is_some_and(|b| b.contains(&marker))
            })
            .min_by_key(|c| c.id);
        let payload = serde_json::json!({ "body": full });
        match existing {
            Some(c) if c.body.as_deref() == Some(full.as_str()) => {
                Ok(CommentOutcome::Unchanged { id: c.id })
            }
            Some(c) => {
                let edit = format!(
                    "/repos/{}/{}/issues/comments/{}",
                    seg(&repo.owner),
                    seg(&repo.name),
                    c.id
                );
                let _: RawComment = self.send_json(Method::PATCH, &edit, &payload).await?;
                Ok(CommentOutcome::Updated { id: c.id })
            }
            None => {
                let created: RawComment = self.send_json(Method::POST, &path, &payload).await?;
                Ok(CommentOutcome::Created { id: created.id })
            }
        }
    }

    /// The bodies of all comments on a pull request, oldest first (for tests and diagnostics).
    pub async fn comments(&self, repo: &Repo, number: u64) -> Result<Vec<String>, ForgeError> {
        let path = format!(
            "/repos/{}/{}/issues/{number}/comments",
            seg(&repo.owner),
            seg(&repo.name)
        );
        let mut comments: Vec<RawComment> = self.get_all(&path).await?;
        comments.sort_by_key(|c| c.id);
        Ok(comments
            .into_iter()
            .map(|c| c.body.unwrap_or_default())
            .collect())
    }

    /// Sets a commit status on `sha`; the description is cut to the forge's 140 characters.
    pub async fn set_status(
        &self,
        repo: &Repo,
        sha: &str,
        status: &CommitStatus,
    ) -> Result<(), ForgeError> {
        let path = format!(
            "/repos/{}/{}/statuses/{}",
            seg(&repo.owner),
            seg(&repo.name),
            seg(sha)
        );
        let mut payload = serde_json::json!({
            "state": status.state.as_str(),
            "context": status.context,
            "description": truncate_chars(&status.description, MAX_STATUS_DESCRIPTION_CHARS),
        });
        if let Some(url) = &status.target_url {
            payload["target_url"] = serde_json::Value::String(url.clone());
        }
        let _: serde_json::Value = self.send_json(Method::POST, &path, &payload).await?;
        Ok(())
    }

    /// The statuses on `sha`, newest first.
    pub async fn statuses(&self, repo: &Repo, sha: &str) -> Result<Vec<CommitStatus>, ForgeError> {
        let path = format!(
            "/repos/{}/{}/commits/{}/statuses",
            seg(&repo.owner),
            seg(&repo.name),
            seg(sha)
        );
        let mut raw: Vec<RawStatus> = self.get_all(&path).await?;
        // GitHub lists newest first, Gitea oldest first: the id orders both.
        raw.sort_by_key(|s| std::cmp::Reverse(s.id));
        raw.into_iter()
            .map(|s| s.into_status(self.provider, &path))
            .collect()
    }

    /// The newest status of one context on `sha`, if any.
    pub async fn status(
        &self,
        repo: &Repo,
        sha: &str,
        context: &str,
    ) -> Result<Option<CommitStatus>, ForgeError> {
        Ok(self
            .statuses(repo, sha)
            .await?
            .into_iter()
            .find(|s| s.context == context))
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ForgeError> {
        let (bytes, _) = self.request(Method::GET, path, None).await?;
        self.decode(&Method::GET, path, &bytes)
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ForgeError> {
        let (bytes, _) = self
            .request(method.clone(), path, Some(body.to_string()))
            .await?;
        self.decode(&method, path, &bytes)
    }

    /// Every page of a list. Pages are followed by number until a short or empty page; both
    /// forges also send a `Link` header, which is trusted when present.
    async fn get_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, ForgeError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut all = Vec::new();
        for page in 1..=MAX_PAGES {
            let paged = format!("{path}{sep}per_page={PAGE_SIZE}&limit={PAGE_SIZE}&page={page}");
            let (bytes, link) = self.request(Method::GET, &paged, None).await?;
            let items: Vec<T> = self.decode(&Method::GET, &paged, &bytes)?;
            let count = items.len();
            all.extend(items);
            let more = match link {
                Some(link) => link.split(',').any(|l| l.contains("rel=\"next\"")),
                None => count >= PAGE_SIZE,
            };
            if !more || count == 0 {
                return Ok(all);
            }
        }
        Err(ForgeError::Decode {
            provider: self.provider,
            method: Method::GET,
            path: path.to_string(),
            cause: format!("still more pages after {MAX_PAGES} pages of {PAGE_SIZE}"),
        })
    }

    fn decode<T: DeserializeOwned>(
        &self,
        method: &Method,
        path: &str,
        bytes: &[u8],
    ) -> Result<T, ForgeError> {
        serde_json::from_slice(bytes).map_err(|e| ForgeError::Decode {
            provider: self.provider,
            method: method.clone(),
            path: path.to_string(),
            cause: format!("{e} (answer starts {:?})", preview(bytes)),
        })
    }

    /// One request with the token, whole within the timeout; an error status is an error.
    /// Returns the body and the `Link` header.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(Bytes, Option<String>), ForgeError> {
        let uri = format!("{}{}", self.api, path);
        let unreachable = |cause: String| ForgeError::Unreachable {
            provider: self.provider,
            method: method.clone(),
            base: self.api.clone(),
            path: path.to_string(),
            cause,
        };
        let mut auth = HeaderValue::from_str(&format!("token {}", self.token.0))
            .map_err(|_| ForgeError::Config("the forge token has characters a header cannot carry: check the Secret it comes from".into()))?;
        auth.set_sensitive(true);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .header(header::AUTHORIZATION, auth)
            .header(
                header::ACCEPT,
                "application/vnd.github+json, application/json",
            )
            .header(
                header::USER_AGENT,
                concat!("kommit/", env!("CARGO_PKG_VERSION")),
            );
        if self.provider == Provider::GitHub {
            req = req.header("X-GitHub-Api-Version", "2022-11-28");
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let cached = if method == Method::GET {
            self.cache.lock().expect("cache lock").get(path).cloned()
        } else {
            None
        };
        if let Some(c) = &cached {
            req = req.header(header::IF_NONE_MATCH, c.etag.clone());
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ForgeError::Config(format!("cannot make a request for {uri}: {e}")))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unreachable(error_chain(&e)))?;
            let status = resp.status();
            let etag = resp.headers().get(header::ETAG).cloned();
            let link = resp
                .headers()
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, ForgeError>((status, etag, link, bytes))
        };
        let (status, etag, link, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ForgeError::Timeout {
                provider: self.provider,
                method: method.clone(),
                path: path.to_string(),
                after: self.timeout,
            })??;
        if status == hyper::StatusCode::NOT_MODIFIED
            && let Some(c) = cached
        {
            return Ok((c.body, c.link));
        }
        if !status.is_success() {
            return Err(ForgeError::Api {
                provider: self.provider,
                method,
                path: path.to_string(),
                status: status.as_u16(),
                message: api_message(&bytes),
            });
        }
        if method == Method::GET
            && let Some(etag) = etag
        {
            let mut cache = self.cache.lock().expect("cache lock");
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(
                path.to_string(),
                Cached {
                    etag,
                    body: bytes.clone(),
                    link: link.clone(),
                },
            );
        }
        Ok((bytes, link))
    }
}

/// The `message` of an API error body, or the start of the body.
fn api_message(bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Msg {
        message: Option<String>,
    }
    match serde_json::from_slice::<Msg>(bytes) {
        Ok(Msg { message: Some(m) }) if !m.is_empty() => truncate_chars(&m, 300),
        _ => format!("{:?}", preview(bytes)),
    }
}

fn preview(bytes: &[u8]) -> String {
    truncate_chars(String::from_utf8_lossy(bytes).trim(), 200)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A path segment, percent-encoded.
fn seg(s: &str) -> String {
    encode(s, |b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// A query value, percent-encoded (a branch may hold `/`, `&`, `+`).
fn query(s: &str) -> String {
    encode(s, |b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b))
}

fn encode(s: &str, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Deserialize)]
struct RawUser {
    login: String,
}

#[derive(Deserialize)]
struct RawRepo {
    full_name: String,
}

#[derive(Deserialize)]
struct RawBranch {
    #[serde(rename = "ref")]
    ref_: String,
    sha: String,
    repo: Option<RawRepo>,
}

#[derive(Deserialize)]
struct RawLabel {
    name: String,
}

#[derive(Deserialize)]
struct RawPull {
    number: u64,
    #[serde(default)]
    title: String,
    state: Option<String>,
    #[serde(default)]
    merged: Option<bool>,
    #[serde(default)]
    merged_at: Option<String>,
    user: Option<RawUser>,
    #[serde(default)]
    labels: Vec<RawLabel>,
    head: RawBranch,
    base: RawBranch,
}

impl From<RawPull> for PullRequest {
    fn from(p: RawPull) -> PullRequest {
        let head_repo = p.head.repo.map(|r| r.full_name);
        let base_repo = p.base.repo.map(|r| r.full_name).unwrap_or_default();
        let from_fork = head_repo
            .as_deref()
            .is_none_or(|h| !h.eq_ignore_ascii_case(&base_repo));
        PullRequest {
            number: p.number,
            title: p.title,
            author: p.user.map(|u| u.login).unwrap_or_default(),
            head_sha: p.head.sha,
            head_ref: p.head.ref_,
            head_repo,
            base_ref: p.base.ref_,
            base_repo,
            labels: p.labels.into_iter().map(|l| l.name).collect(),
            from_fork,
            state: match p.state.as_deref() {
                Some("closed") if p.merged == Some(true) || p.merged_at.is_some() => {
                    PullState::Merged
                }
                Some("closed") => PullState::Closed,
                _ => PullState::Open,
            },
        }
    }
}

#[derive(Deserialize)]
struct RawComment {
    id: u64,
    body: Option<String>,
    user: Option<RawUser>,
}

#[derive(Deserialize)]
struct RawStatus {
    #[serde(default)]
    id: u64,
    /// GitHub's name for the state.
    state: Option<String>,
    /// Gitea's name for it in status lists.
    status: Option<String>,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    target_url: Option<String>,
}

impl RawStatus {
    fn into_status(self, provider: Provider, path: &str) -> Result<CommitStatus, ForgeError> {
        let raw = self.state.or(self.status).unwrap_or_default();
        let state = StatusState::parse(&raw).ok_or_else(|| ForgeError::Decode {
            provider,
            method: Method::GET,
            path: path.to_string(),
            cause: format!("a commit status with state {raw:?}"),
        })?;
        Ok(CommitStatus {
            state,
            context: self.context.unwrap_or_default(),
            description: self.description.unwrap_or_default(),
            target_url: self.target_url.filter(|u| !u.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pull request as GitHub's REST documentation shows it (trimmed to the fields used, plus
    /// a few neighbours so that unknown fields are seen to be ignored).
    const GITHUB_PULL: &str = r#"{
      "url": "https://api.github.com/repos/octocat/Hello-World/pulls/1347",
      "id": 1, "number": 1347, "state": "open", "locked": true,
      "title": "Amazing new feature",
      "user": {"login": "octocat", "id": 1, "type": "User", "site_admin": false},
      "labels": [{"id": 208045946, "name": "bug", "color": "f29513", "default": true}],
      "head": {"label": "octocat:new-topic", "ref": "new-topic",
               "sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e",
               "user": {"login": "octocat"},
               "repo": {"id": 1296269, "name": "Hello-World", "full_name": "octocat/Hello-World",
                        "fork": false}},
      "base": {"label": "octocat:master", "ref": "master",
               "sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e",
               "repo": {"id": 1296269, "name": "Hello-World", "full_name": "octocat/Hello-World",
                        "fork": false}},
      "draft": false
    }"#;

    #[test]
    fn github_pull_reads_as_same_repo() {
        let raw: RawPull = serde_json::from_str(GITHUB_PULL).unwrap();
        let pr = PullRequest::from(raw);
        assert_eq!(pr.number, 1347);
        assert_eq!(pr.head_sha, "6dcb09b5b57875f334f61aebed695e2e4193db5e");
        assert_eq!(pr.head_ref, "new-topic");
        assert_eq!(pr.head_repo.as_deref(), Some("octocat/Hello-World"));
        assert_eq!(pr.base_repo, "octocat/Hello-World");
        assert_eq!(pr.base_ref, "master");
        assert_eq!(pr.labels, vec!["bug"]);
        assert_eq!(pr.author, "octocat");
        assert!(!pr.from_fork);
    }

    #[test]
    fn a_pull_request_is_open_closed_or_merged_as_the_forge_says() {
        let at = |changes: serde_json::Value| {
            let mut v: serde_json::Value = serde_json::from_str(GITHUB_PULL).unwrap();
            for (key, value) in changes.as_object().unwrap() {
                v[key] = value.clone();
            }
            PullRequest::from(serde_json::from_value::<RawPull>(v).unwrap()).state
        };
        assert_eq!(at(serde_json::json!({"state": "open"})), PullState::Open);
        // GitHub's list and single-PR answers carry `merged_at`; its single answer and Gitea's
        // carry `merged` too.
        assert_eq!(
            at(serde_json::json!({"state": "closed", "merged_at": null})),
            PullState::Closed
        );
        assert_eq!(
            at(serde_json::json!({"state": "closed", "merged_at": "2011-01-26T19:01:12Z"})),
            PullState::Merged
        );
        assert_eq!(
            at(serde_json::json!({"state": "closed", "merged": true})),
            PullState::Merged
        );
    }

    #[test]
    fn fork_and_deleted_fork_pulls_are_forks() {
        let fork = GITHUB_PULL.replacen(
            r#""full_name": "octocat/Hello-World",
                        "fork": false}},
      "base""#,
            r#""full_name": "mallory/Hello-World", "fork": true}},
      "base""#,
            1,
        );
        assert_ne!(fork, GITHUB_PULL, "the test must change the head repo");
        let pr = PullRequest::from(serde_json::from_str::<RawPull>(&fork).unwrap());
        assert_eq!(pr.head_repo.as_deref(), Some("mallory/Hello-World"));
        assert!(pr.from_fork);

        let mut v: serde_json::Value = serde_json::from_str(GITHUB_PULL).unwrap();
        v["head"]["repo"] = serde_json::Value::Null;
        let pr = PullRequest::from(serde_json::from_value::<RawPull>(v).unwrap());
        assert_eq!(pr.head_repo, None);
        assert!(pr.from_fork, "a deleted head repository is not trusted");
    }

    #[test]
    fn statuses_read_github_state_and_gitea_status() {
        // GitHub: GET /repos/{owner}/{repo}/commits/{ref}/statuses
        let github = r#"[{"url": "https://api.github.com/repos/octocat/Hello-World/statuses/6dcb09b5b57875f334f61aebed695e2e4193db5e",
            "id": 1, "state": "success", "description": "Build has completed successfully",
            "target_url": "https://ci.example.com/1000/output", "context": "continuous-integration/jenkins",
            "created_at": "2012-07-20T01:19:13Z", "creator": {"login": "octocat"}}]"#;
        // Gitea: the same list names the state `status`.
        let gitea = r#"[{"id": 3, "status": "failure", "target_url": "", "description": "2 problems",
            "url": "", "context": "kommit/diff", "creator": {"login": "kommit"}}]"#;
        let gh: Vec<RawStatus> = serde_json::from_str(github).unwrap();
        let gh = gh
            .into_iter()
            .next()
            .unwrap()
            .into_status(Provider::GitHub, "/x")
            .unwrap();
        assert_eq!(gh.state, StatusState::Success);
        assert_eq!(gh.context, "continuous-integration/jenkins");
        assert_eq!(
            gh.target_url.as_deref(),
            Some("https://ci.example.com/1000/output")
        );
        let gt: Vec<RawStatus> = serde_json::from_str(gitea).unwrap();
        let gt = gt
            .into_iter()
            .next()
            .unwrap()
            .into_status(Provider::Gitea, "/x")
            .unwrap();
        assert_eq!(gt.state, StatusState::Failure);
        assert_eq!(gt.target_url, None, "Gitea's empty URL is no URL");

        let odd: RawStatus = serde_json::from_str(r#"{"state": "warning"}"#).unwrap();
        let err = odd.into_status(Provider::GitHub, "/x").unwrap_err();
        assert!(matches!(err, ForgeError::Decode { .. }), "{err}");
    }

    #[test]
    fn github_comment_shape_reads() {
        // GitHub: GET /repos/{owner}/{repo}/issues/{issue_number}/comments
        let json = r#"[{"id": 1, "node_id": "MDEyOklzc3VlQ29tbWVudDE=",
            "url": "https://api.github.com/repos/octocat/Hello-World/issues/comments/1",
            "body": "Me too", "user": {"login": "octocat", "id": 1},
            "created_at": "2011-04-14T16:00:49Z", "author_association": "COLLABORATOR"}]"#;
        let c: Vec<RawComment> = serde_json::from_str(json).unwrap();
        assert_eq!(c[0].id, 1);
        assert_eq!(c[0].body.as_deref(), Some("Me too"));
        assert_eq!(c[0].user.as_ref().unwrap().login, "octocat");
    }

    #[test]
    fn webhook_actions_are_one_vocabulary() {
        assert_eq!(
            PullRequestAction::parse("synchronize"),
            PullRequestAction::Synchronize
        );
        assert_eq!(
            PullRequestAction::parse("synchronized"),
            PullRequestAction::Synchronize
        );
        assert_eq!(
            PullRequestAction::parse("closed"),
            PullRequestAction::Closed
        );
        assert_eq!(
            PullRequestAction::parse("assigned"),
            PullRequestAction::Other("assigned".into())
        );
    }

    #[test]
    fn webhook_deliveries_parse_for_both_providers() {
        let pull: serde_json::Value = serde_json::from_str(GITHUB_PULL).unwrap();
        for (provider, action) in [
            (Provider::GitHub, "synchronize"),
            (Provider::Gitea, "synchronized"),
        ] {
            let body = serde_json::json!({
                "action": action, "number": 1347, "pull_request": pull,
                "repository": {"id": 1296269, "full_name": "octocat/Hello-World"},
                "sender": {"login": "octocat"}
            });
            let event = PullRequestEvent::parse(provider, body.to_string().as_bytes()).unwrap();
            assert_eq!(event.action, PullRequestAction::Synchronize, "{provider}");
            assert_eq!(event.repository, "octocat/Hello-World");
            assert_eq!(event.sender, "octocat");
            assert_eq!(event.pull_request.number, 1347);
            assert_eq!(
                event.pull_request.head_sha,
                "6dcb09b5b57875f334f61aebed695e2e4193db5e"
            );
        }
        let err =
            PullRequestEvent::parse(Provider::GitHub, br#"{"action": "opened"}"#).unwrap_err();
        assert!(err.to_string().contains("pull_request"), "{err}");
    }

    #[test]
    fn descriptions_are_cut_to_140_characters() {
        let long = "é".repeat(300);
        let cut = truncate_chars(&long, MAX_STATUS_DESCRIPTION_CHARS);
        assert_eq!(cut.chars().count(), 140);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate_chars("short", 140), "short");
    }

    #[test]
    fn markers_cannot_close_the_html_comment() {
        assert_eq!(
            comment_marker("prod/app"),
            "<!-- kommit:prod/app -->".to_string()
        );
        let m = comment_marker("a-->b");
        assert_eq!(m.matches("-->").count(), 1, "{m}");
        assert!(m.ends_with(" -->"));
    }

    #[test]
    fn the_token_never_shows() {
        let forge =
            Forge::new(Provider::Gitea, "http://127.0.0.1:1/api/v1", "s3cr3t-t0ken").unwrap();
        let debug = format!("{forge:?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
        assert!(debug.contains("redacted"));
    }

    #[tokio::test]
    async fn an_unreachable_forge_is_an_error_not_an_empty_list() {
        // A port nothing listens on: bind one, then drop it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let forge = Forge::new(
            Provider::Gitea,
            &format!("http://127.0.0.1:{port}/api/v1"),
            "s3cr3t-t0ken",
        )
        .unwrap()
        .with_timeout(Duration::from_secs(5));
        let err = forge
            .open_pull_requests(&Repo::new("o", "r"), "main")
            .await
            .unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        assert!(!format!("{err:?}").contains("s3cr3t"), "{err:?}");
    }

    #[test]
    fn repos_and_api_urls_from_clone_urls() {
        for url in [
            "https://github.com/octocat/Hello-World.git",
            "https://github.com/octocat/Hello-World",
            "git@github.com:octocat/Hello-World.git",
            "octocat/Hello-World",
        ] {
            assert_eq!(
                Repo::parse(url).unwrap(),
                Repo::new("octocat", "Hello-World"),
                "{url}"
            );
        }
        assert!(Repo::parse("https://github.com/").is_err());
        assert_eq!(
            api_url_for(Provider::GitHub, "https://github.com/o/r.git").unwrap(),
            "https://api.github.com"
        );
        assert_eq!(
            api_url_for(Provider::Gitea, "http://127.0.0.1:3000/o/r.git").unwrap(),
            "http://127.0.0.1:3000/api/v1"
        );
        assert!(api_url_for(Provider::Gitea, "git@host:o/r.git").is_err());
    }

    /// A GitHub-shaped server on loopback: pulls over two pages linked by `Link`, an ETag that
    /// turns a repeated list into a 304, and statuses listed newest first.
    async fn github_like() -> (String, Arc<Mutex<Vec<String>>>) {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        use axum::routing::get;

        type Seen = Arc<Mutex<Vec<String>>>;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen: Seen = Arc::default();
        let pulls = {
            let base = base.clone();
            move |State(seen): State<Seen>, uri: axum::http::Uri, headers: HeaderMap| async move {
                let page = uri
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("page="))
                    .unwrap_or("")
                    .to_string();
                let inm = headers
                    .get("if-none-match")
                    .map(|v| v.to_str().unwrap().to_string());
                seen.lock().unwrap().push(format!(
                    "pulls page={page} auth={} inm={inm:?}",
                    headers.get("authorization").is_some()
                ));
                let etag = format!("\"p{page}\"");
                if inm.as_deref() == Some(etag.as_str()) {
                    return StatusCode::NOT_MODIFIED.into_response();
                }
                let mut pull: serde_json::Value = serde_json::from_str(GITHUB_PULL).unwrap();
                let body = if page == "1" {
                    pull["base"]["ref"] = "main".into();
                    let link = format!(
                        "<{base}/repos/o/r/pulls?state=open&page=2>; rel=\"next\", <{base}/repos/o/r/pulls?state=open&page=2>; rel=\"last\""
                    );
                    return (
                        [("etag", etag), ("link", link)],
                        axum::Json(serde_json::json!([pull])),
                    )
                        .into_response();
                } else {
                    // Another base (the server ignores `base`, as Gitea does): filtered out.
                    pull["number"] = 7.into();
                    serde_json::json!([pull])
                };
                ([("etag", etag)], axum::Json(body)).into_response()
            }
        };
        let statuses = |State(seen): State<Seen>| async move {
            seen.lock().unwrap().push("statuses".into());
            axum::Json(serde_json::json!([
                {"id": 2, "state": "failure", "context": "kommit/diff", "description": "newer"},
                {"id": 1, "state": "success", "context": "kommit/diff", "description": "older"}
            ]))
        };
        let unauthorized = || async {
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"message": "Bad credentials",
                    "documentation_url": "https://docs.github.com/rest"})),
            )
        };
        let app = axum::Router::new()
            .route("/repos/o/r/pulls", get(pulls))
            .route("/repos/o/r/commits/{sha}/statuses", get(statuses))
            .route("/repos/o/private/pulls", get(unauthorized))
            .with_state(seen.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (base, seen)
    }

    #[tokio::test]
    async fn github_pages_etags_and_status_order() {
        let (base, seen) = github_like().await;
        let forge = Forge::new(Provider::GitHub, &base, "s3cr3t-t0ken").unwrap();
        let repo = Repo::new("o", "r");
        let first = forge.open_pull_requests(&repo, "main").await.unwrap();
        assert_eq!(
            first.iter().map(|p| p.number).collect::<Vec<_>>(),
            vec![1347]
        );
        let again = forge.open_pull_requests(&repo, "main").await.unwrap();
        assert_eq!(again, first, "a 304 answers with the cached list");
        let seen_now = seen.lock().unwrap().clone();
        assert_eq!(
            seen_now,
            vec![
                "pulls page=1 auth=true inm=None",
                "pulls page=2 auth=true inm=None",
                "pulls page=1 auth=true inm=Some(\"\\\"p1\\\"\")",
                "pulls page=2 auth=true inm=Some(\"\\\"p2\\\"\")",
            ]
        );

        let newest = forge
            .status(&repo, "abc", "kommit/diff")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(newest.state, StatusState::Failure);
        assert_eq!(newest.description, "newer");

        let err = forge
            .open_pull_requests(&Repo::new("o", "private"), "main")
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(401), "{err}");
        assert!(err.to_string().contains("Bad credentials"), "{err}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn branch_names_are_encoded_in_queries() {
        assert_eq!(query("release/1.0&x"), "release/1.0%26x");
        assert_eq!(seg("a b"), "a%20b");
    }
}
