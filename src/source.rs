//! Git access: open a local repository in place or keep a bare mirror of a remote one, resolve a
//! revision to a commit, and read the manifests under a path at that commit without a checkout.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use git2::{ErrorCode, FileMode, ObjectType, Oid, Repository, TreeWalkMode, TreeWalkResult};
use sha2::{Digest, Sha256};

mod credentials;
mod write;

pub use crate::commit::{CommitInfo, SourceFile, format_rfc3339};

pub use credentials::{
    AmbientCredentials, DEFAULT_TOKEN_USERNAME, GitCredentials, GivenCredentials, HostKeyCheck,
    KnownHosts, KnownHostsError, SecretString,
};

/// Largest manifest file we read. The API server stores objects of at most ~1.5 MiB, so anything
/// this large is a mistake (or an attack) rather than a manifest.
pub const MAX_FILE_BYTES: usize = 8 * 1024 * 1024;

const MANIFEST_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];
const MAX_SYMLINK_HOPS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "{path} is not a git repository ({message}); pass the repository's top folder or a URL"
    )]
    NotARepository { path: String, message: String },
    /// `hint` says which credentials were used (never the secrets themselves).
    #[error("cannot fetch {url}: {message}; {hint}")]
    Fetch {
        url: String,
        message: String,
        hint: String,
    },
    #[error(
        "the manifest files reach {read} at {file}, over the budget of {limit} for one sync; \
         narrow --path (or exclude files), or raise --max-bytes (GitSync: spec.maxBytes)"
    )]
    OverBudget {
        file: String,
        read: String,
        limit: String,
    },
    #[error(
        "cannot use the cache folder {path}: {message}; set KOMMIT_CACHE_DIR to a writable folder"
    )]
    Cache { path: String, message: String },
    #[error(
        "revision '{rev}' is not known in {repo}: {message}; use a branch, tag, commit SHA or \
         an expression such as HEAD~2"
    )]
    BadRevision {
        repo: String,
        rev: String,
        message: String,
    },
    #[error("path '{path}' does not exist at commit {commit} of {repo}; {hint}")]
    PathNotFound {
        repo: String,
        commit: String,
        path: String,
        hint: String,
    },
    #[error("path '{path}' must be relative to the repository root and stay inside it")]
    BadPath { path: String },
    #[error(
        "{file} is a symbolic link to '{target}', which points outside the repository; \
         kommit only reads files inside the repository"
    )]
    SymlinkEscapes { file: String, target: String },
    #[error("{file} is a symbolic link to '{target}', which {problem}")]
    BadSymlink {
        file: String,
        target: String,
        problem: String,
    },
    #[error(
        "{file} is {size} bytes, over the {limit}-byte limit for a manifest file; \
         split it or remove it from the synced path"
    )]
    FileTooLarge {
        file: String,
        size: usize,
        limit: usize,
    },
    #[error(
        "{dir} holds a kustomization, and kommit does not run kustomize (its raw files are not \
         what kustomize would apply): commit the output of `kustomize build {dir}` instead, or \
         leave the folder out with --exclude '{dir}/' or a line in .kommitignore"
    )]
    Kustomization { dir: String },
    #[error(transparent)]
    Selection(#[from] crate::select::SelectError),
    #[error("{message}")]
    Revert { message: String },
    #[error("git error in {repo}: {message}")]
    Git { repo: String, message: String },
}

impl SourceError {
    fn git(repo: &str, err: git2::Error) -> Self {
        SourceError::Git {
            repo: repo.to_string(),
            message: err.message().to_string(),
        }
    }
}

/// A repository to read from: either the user's own checkout (read in place, never modified) or a
/// bare mirror of a remote kept in the cache folder. Cloning is cheap and shares the repository,
/// so that blocking git work can move to a thread of its own ([`GitSource::blocking`]).
#[derive(Clone)]
pub struct GitSource {
    // git2's Repository is Send but not Sync; the lock lets async code hold a &GitSource.
    repo: Arc<Mutex<Repository>>,
    /// What the user gave us (path or URL), for messages.
    display: String,
    /// Stable identity of the repository, used for the inventory of what kommit applied.
    identity: String,
    remote_url: Option<String>,
    /// For fetching `remote_url`; held in memory only.
    credentials: GitCredentials,
    /// The mirror's fetch lock (shared with every source of the same mirror in this process).
    gate: Option<MirrorGate>,
}

impl std::fmt::Debug for GitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitSource")
            .field("display", &self.display)
            .finish()
    }
}

/// A repository URL fit to show or store: credentials in it (`https://user:token@host/…`, or a
/// token as the user name of an http URL) are replaced by `<redacted>`. Other text is returned
/// as it is; an ssh user name such as `git` is kept.
pub fn redact_url(url: &str) -> String {
    match secret_of_url(url) {
        Some(secret) => url.replacen(secret, "<redacted>", 1),
        None => url.to_string(),
    }
}

/// The secret part of a URL's user information, if it has one.
fn secret_of_url(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let (userinfo, _host) = authority.rsplit_once('@')?;
    match userinfo.split_once(':') {
        Some((_, password)) if !password.is_empty() => Some(password),
        // `https://TOKEN@github.com/…`: forges accept a token as the user name over http.
        None if scheme.starts_with("http") && !userinfo.is_empty() => Some(userinfo),
        _ => None,
    }
}

/// The host of a plain `http://` URL that is not this machine: a token must never be sent there,
/// since anyone on the way could read it.
pub(crate) fn plain_http_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| host.to_string())
}

/// `text` with any credentials of `url` replaced by `<redacted>`: for messages of git and of
/// servers, which may quote the URL they were given.
pub fn redact_in(text: &str, url: &str) -> String {
    match secret_of_url(url) {
        Some(secret) => text.replace(secret, "<redacted>"),
        None => text.to_string(),
    }
}

/// True when `spec` names a remote repository rather than a folder on this machine.
pub fn is_remote(spec: &str) -> bool {
    spec.contains("://") || looks_like_scp(spec)
}

fn looks_like_scp(spec: &str) -> bool {
    // git@host:org/repo.git — a colon before any slash, and not a Windows drive letter.
    match (spec.find(':'), spec.find('/')) {
        (Some(colon), slash) => colon > 1 && slash.is_none_or(|s| colon < s) && spec.contains('@'),
        _ => false,
    }
}

/// How long a git server may take to accept a connection, and then to send or take the next
/// bytes (libgit2 waits for ever by default: a server that accepts and never answers would hold
/// a sync, and an operator's worker, for good).
pub const DEFAULT_GIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

static GIT_TIMEOUT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// When the last fetch into each mirror of this process started, behind one lock per mirror:
/// sources that share a mirror (GitSyncs of one repository and the same credentials) fetch
/// into it one at a time, and when many open it at once (a push webhook, an operator starting)
/// one fetch serves them all.
type MirrorGate = Arc<Mutex<Option<std::time::Instant>>>;
static MIRROR_GATES: std::sync::LazyLock<Mutex<HashMap<PathBuf, MirrorGate>>> =
    std::sync::LazyLock::new(Default::default);

fn mirror_gate(dir: &Path) -> MirrorGate {
    MIRROR_GATES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(dir.to_path_buf())
        .or_default()
        .clone()
}

/// Whether a fetch that started at `last_started` (if any) can serve a source asked for at
/// `asked`: only one that began afterwards saw the remote as it was when asked.
fn fetched_since(last_started: Option<std::time::Instant>, asked: std::time::Instant) -> bool {
    last_started.is_some_and(|started| started >= asked)
}

/// Bounds every later connect, read and write of a git fetch by `timeout`.
///
/// # Safety
/// libgit2 keeps this in a global without synchronisation: call it at start-up, before any
/// thread that uses git is spawned (the binary does, before its async runtime starts).
pub unsafe fn set_git_timeout(timeout: std::time::Duration) -> Result<(), SourceError> {
    let millis = i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    let failed = |e: git2::Error| SourceError::Fetch {
        url: String::new(),
        message: format!("cannot set git's network timeout: {}", e.message()),
        hint: String::new(),
    };
    // SAFETY: the caller promises no other thread uses libgit2 yet.
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(millis).map_err(failed)?;
        git2::opts::set_server_timeout_in_milliseconds(millis).map_err(failed)?;
    }
    let _ = GIT_TIMEOUT.set(timeout);
    Ok(())
}

/// What a timed-out fetch should say about the bound it hit.
fn explain_timeout(message: String) -> String {
    if !message.contains("timed out") {
        return message;
    }
    match GIT_TIMEOUT.get() {
        Some(timeout) => format!(
            "{message} (the git server did not answer within {}s; --git-timeout or \
             KOMMIT_GIT_TIMEOUT changes it)",
            timeout.as_secs()
        ),
        None => message,
    }
}

impl GitSource {
    /// Opens a local repository in place, or mirrors a remote one into `cache_dir` (fetching it
    /// when the mirror already exists), with an ssh agent or git's credential helper
    /// ([`GitCredentials::Ambient`] with nothing more).
    pub fn open(spec: &str, cache_dir: &Path) -> Result<Self, SourceError> {
        Self::open_with(spec, cache_dir, GitCredentials::default())
    }

    /// Like [`GitSource::open`], fetching a remote with `credentials` (now and on every later
    /// [`GitSource::fetch`]). A local repository needs none and ignores them.
    pub fn open_with(
        spec: &str,
        cache_dir: &Path,
        credentials: GitCredentials,
    ) -> Result<Self, SourceError> {
        if is_remote(spec) {
            Self::mirror(spec, cache_dir, credentials)
        } else {
            Self::open_local(spec)
        }
    }

    fn open_local(spec: &str) -> Result<Self, SourceError> {
        let path = Path::new(spec);
        let repo = Repository::open(path).map_err(|e| SourceError::NotARepository {
            path: spec.to_string(),
            message: e.message().to_string(),
        })?;
        let root = repo
            .workdir()
            .unwrap_or_else(|| repo.path())
            .canonicalize()
            .unwrap_or_else(|_| path.to_path_buf());
        let identity = root.to_string_lossy().trim_end_matches('/').to_string();
        Ok(GitSource {
            repo: Arc::new(Mutex::new(repo)),
            display: spec.to_string(),
            identity,
            remote_url: None,
            credentials: GitCredentials::default(),
            gate: None,
        })
    }

    fn mirror(
        url: &str,
        cache_dir: &Path,
        credentials: GitCredentials,
    ) -> Result<Self, SourceError> {
        let asked = std::time::Instant::now();
        let digest = hex(&Sha256::digest(url.as_bytes()));
        let dir = cache_dir.join("repos").join(&digest[..24]);
        let cache_err = |e: &dyn std::fmt::Display| SourceError::Cache {
            path: dir.display().to_string(),
            message: e.to_string(),
        };
        let gate = mirror_gate(&dir);
        let mut last_fetch = gate.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::create_dir_all(&dir).map_err(|e| cache_err(&e))?;
        let repo = match Repository::open_bare(&dir) {
            Ok(repo) => repo,
            Err(_) => Repository::init_bare(&dir).map_err(|e| cache_err(&e.message()))?,
        };
        let shown = redact_url(url);
        let source = GitSource {
            repo: Arc::new(Mutex::new(repo)),
            // Never the credentials a URL may carry: the display goes into messages, plans and
            // the source annotation, the identity into the inventory.
            identity: shown.trim_end_matches('/').to_string(),
            display: shown,
            remote_url: Some(url.to_string()),
            credentials,
            gate: Some(gate.clone()),
        };
        if !fetched_since(*last_fetch, asked) {
            let started = std::time::Instant::now();
            source.fetch()?;
            *last_fetch = Some(started);
        }
        Ok(source)
    }

    /// Fetches every branch and tag of the remote into the mirror (no-op for a local repository).
    pub fn fetch(&self) -> Result<(), SourceError> {
        self.fetch_refspecs(
            &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
            true,
        )
    }

    /// Fetches the heads of these pull requests (`refs/pull/<n>/head`, which GitHub and Gitea
    /// both serve from the base repository, forks included) into the mirror under the same
    /// names. A local repository is read in place: its refs are already there.
    pub fn fetch_pull_request_heads(&self, numbers: &[u64]) -> Result<(), SourceError> {
        if numbers.is_empty() {
            return Ok(());
        }
        let specs: Vec<String> = numbers
            .iter()
            .map(|n| format!("+refs/pull/{n}/head:refs/pull/{n}/head"))
            .collect();
        let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
        // Taking turns with the fetches of the other sources of this mirror.
        let _turn = self
            .gate
            .as_ref()
            .map(|gate| gate.lock().unwrap_or_else(|e| e.into_inner()));
        self.fetch_refspecs(&specs, false)
    }

    fn fetch_refspecs(&self, refspecs: &[&str], whole: bool) -> Result<(), SourceError> {
        let Some(url) = &self.remote_url else {
            return Ok(());
        };
        let _span = tracing::info_span!("fetch", repo = %self.display).entered();
        let (callbacks, failure) = self.credentials.callbacks(url);
        // What the credential callbacks found wrong is clearer than what libgit2 makes of it.
        let fetch_err = |e: git2::Error| SourceError::Fetch {
            url: self.display.clone(),
            message: explain_timeout(redact_in(
                &failure
                    .borrow_mut()
                    .take()
                    .unwrap_or_else(|| self.credentials.explain(e.message())),
                url,
            )),
            hint: self.credentials.hint(),
        };
        if secret_of_url(url).is_some()
            && let Some(host) = plain_http_host(url)
        {
            return Err(SourceError::Fetch {
                url: self.display.clone(),
                message: format!(
                    "the URL carries credentials and kommit does not send them over plain http \
                     to {host}, where anyone on the way could read them"
                ),
                hint: "use an https URL (and put the token in a Secret, not in the URL)".into(),
            });
        }
        let repo = self.repo();
        let mut remote = repo.remote_anonymous(url).map_err(fetch_err)?;
        let mut options = git2::FetchOptions::new();
        options.remote_callbacks(callbacks);
        if whole {
            options.prune(git2::FetchPrune::On);
            options.download_tags(git2::AutotagOption::All);
        } else {
            options.download_tags(git2::AutotagOption::None);
        }
        remote
            .fetch(refspecs, Some(&mut options), None)
            .map_err(fetch_err)?;
        if !whole {
            return Ok(());
        }
        // Point HEAD at the remote's default branch so that "no --rev" means what it means there.
        if let Ok(default_branch) = remote.default_branch()
            && let Ok(name) = default_branch.as_str()
        {
            repo.set_head(name).map_err(fetch_err)?;
        }
        Ok(())
    }

    /// The path or URL the user gave.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Stable identity of the repository: the canonical folder of a local repo, or the URL.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// True for a repository on this machine that kommit may commit to (revert, notes).
    pub fn is_local(&self) -> bool {
        self.remote_url.is_none()
    }

    fn repo(&self) -> MutexGuard<'_, Repository> {
        self.repo
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs blocking git work (fetch, reading blobs, walking history) on a thread of the blocking
    /// pool, so that async callers never hold up the runtime; the work gets a handle to this same
    /// repository and hands back owned data.
    pub async fn blocking<T, F>(&self, work: F) -> Result<T, SourceError>
    where
        T: Send + 'static,
        F: FnOnce(&GitSource) -> Result<T, SourceError> + Send + 'static,
    {
        let source = self.clone();
        tokio::task::spawn_blocking(move || work(&source))
            .await
            .map_err(|e| SourceError::Git {
                repo: self.display.clone(),
                message: format!("the git task stopped: {e}"),
            })?
    }

    /// The repository's git directory (`.git` of a checkout, or the bare mirror), for watching.
    pub fn git_dir(&self) -> PathBuf {
        self.repo().path().to_path_buf()
    }

    /// Resolves a revision (branch, tag, SHA, `HEAD~2`; `None` means HEAD) to a commit.
    pub fn resolve(&self, rev: Option<&str>) -> Result<CommitInfo, SourceError> {
        let rev = rev.unwrap_or("HEAD");
        let bad = |message: String| SourceError::BadRevision {
            repo: self.display.clone(),
            rev: rev.to_string(),
            message,
        };
        let repo = self.repo();
        let object = repo.revparse_single(rev).map_err(|e| {
            if e.code() == ErrorCode::UnbornBranch
                || e.code() == ErrorCode::NotFound && rev == "HEAD"
            {
                bad("the repository has no commits yet".to_string())
            } else {
                bad(e.message().to_string())
            }
        })?;
        let commit = object
            .peel_to_commit()
            .map_err(|e| bad(format!("it does not name a commit ({})", e.message())))?;
        Ok(commit_info(&commit))
    }

    /// The branch HEAD names (for a mirror: the remote's default branch), if it names one.
    pub fn default_branch(&self) -> Option<String> {
        let repo = self.repo();
        let head = repo.find_reference("HEAD").ok()?;
        let target = head.symbolic_target().ok().flatten()?;
        target.strip_prefix("refs/heads/").map(str::to_string)
    }

    /// Looks up a commit by its full SHA.
    pub fn commit(&self, sha: &str) -> Result<CommitInfo, SourceError> {
        self.resolve(Some(sha))
    }

    /// Every manifest file (`*.yaml`, `*.yml`, `*.json`) under `path` at `commit`, recursively,
    /// sorted by path. Symbolic links are followed inside the repository and refused outside it.
    pub fn read_manifests(
        &self,
        commit: &CommitInfo,
        path: &str,
    ) -> Result<Vec<SourceFile>, SourceError> {
        self.read_selected_manifests(
            commit,
            path,
            &crate::select::Selection::default(),
            &crate::budget::Budgets::default(),
        )
    }

    /// The manifest files under `path`, narrowed by the rules of [`crate::select`].
    pub fn read_selected_manifests(
        &self,
        commit: &CommitInfo,
        path: &str,
        selection: &crate::select::Selection,
        budgets: &crate::budget::Budgets,
    ) -> Result<Vec<SourceFile>, SourceError> {
        let _span =
            tracing::info_span!("read_manifests", repo = %self.display, commit = %commit.short_sha(), path)
                .entered();
        let prefix = normalize_repo_path(path)?;
        let repo = self.repo();
        let git = |e| SourceError::git(&self.display, e);
        let root = repo
            .find_commit(Oid::from_str(&commit.sha).map_err(git)?)
            .and_then(|c| c.tree())
            .map_err(git)?;
        let mut found: Vec<(String, Oid, i32)> = Vec::new();
        let not_found = |hint: String| SourceError::PathNotFound {
            repo: self.display.clone(),
            commit: commit.short_sha().to_string(),
            path: path.to_string(),
            hint,
        };
        if prefix.is_empty() {
            collect_tree(&root, "", &mut found).map_err(git)?;
        } else {
            let entry = root
                .get_path(Path::new(&prefix))
                .map_err(|_| not_found(top_level_hint(&root)))?;
            match entry.kind() {
                Some(ObjectType::Tree) => {
                    let tree = repo.find_tree(entry.id()).map_err(git)?;
                    collect_tree(&tree, &format!("{prefix}/"), &mut found).map_err(git)?;
                }
                Some(ObjectType::Blob) => {
                    found.push((prefix.clone(), entry.id(), entry.filemode()))
                }
                _ => return Err(not_found("it is not a file or folder".to_string())),
            }
        }
        let reader = BlobReader {
            repo: &repo,
            display: &self.display,
        };
        let ignore_file = match root.get_path(Path::new(crate::select::IGNORE_FILE)) {
            Ok(entry) if entry.kind() == Some(ObjectType::Blob) => Some(
                String::from_utf8_lossy(&reader.read(crate::select::IGNORE_FILE, entry.id())?)
                    .into_owned(),
            ),
            _ => None,
        };
        let filter = crate::select::FileFilter::new(selection, ignore_file.as_deref(), &prefix)?;
        found.retain(|(name, _, _)| filter.keeps(name));
        if let Some(dir) = found
            .iter()
            .find_map(|(name, _, _)| crate::select::kustomization_dir(name))
        {
            return Err(SourceError::Kustomization {
                dir: dir.to_string(),
            });
        }
        found.retain(|(name, _, _)| has_manifest_extension(name));
        found.sort_by(|a, b| a.0.cmp(&b.0));

        // The budget is checked from the object headers, before the blobs are loaded; a blob
        // reached by many paths counts each time.
        let odb = repo.odb().map_err(git)?;
        let mut total: u64 = 0;
        for (name, oid, _) in &found {
            let (size, _) = odb.read_header(*oid).map_err(git)?;
            total += size as u64;
            if total > budgets.max_bytes {
                return Err(SourceError::OverBudget {
                    file: name.clone(),
                    read: crate::budget::human_bytes(total),
                    limit: crate::budget::human_bytes(budgets.max_bytes),
                });
            }
        }
        let mut files = Vec::with_capacity(found.len());
        for (name, oid, mode) in found {
            let content = if mode == i32::from(FileMode::Link) {
                reader.read_symlinked(&root, &name, oid)?
            } else {
                reader.read(&name, oid)?
            };
            files.push(SourceFile {
                path: name,
                content,
            });
        }
        Ok(files)
    }

    /// The commits reachable from `commit` that changed `file`, newest first (like
    /// `git log -- FILE`), at most `limit` of them; history is walked along first parents.
    pub fn log_for_path(
        &self,
        commit: &CommitInfo,
        file: &str,
        limit: usize,
    ) -> Result<Vec<CommitInfo>, SourceError> {
        let repo = self.repo();
        let git = |e| SourceError::git(&self.display, e);
        let path = Path::new(file);
        let mut out = Vec::new();
        let mut current = Some(
            repo.find_commit(Oid::from_str(&commit.sha).map_err(git)?)
                .map_err(git)?,
        );
        while let Some(here) = current {
            let parent = here.parent(0).ok();
            let blob = |c: &git2::Commit<'_>| c.tree().ok()?.get_path(path).ok().map(|e| e.id());
            if blob(&here) != parent.as_ref().and_then(blob) {
                out.push(commit_info(&here));
                if out.len() >= limit {
                    break;
                }
            }
            current = parent;
        }
        Ok(out)
    }

    /// For each file, the newest commit reachable from `commit` that changed it (what
    /// `git log -1 -- FILE` shows), in one walk of the history. Files not settled within
    /// `max_commits` are attributed to `commit` itself.
    pub fn last_changes(
        &self,
        commit: &CommitInfo,
        files: &[String],
        max_commits: usize,
    ) -> Result<HashMap<String, CommitInfo>, SourceError> {
        let repo = self.repo();
        let git = |e| SourceError::git(&self.display, e);
        let mut pending: HashSet<&str> = files.iter().map(String::as_str).collect();
        let mut found = HashMap::new();
        let mut walk = repo.revwalk().map_err(git)?;
        walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::TIME)
            .map_err(git)?;
        walk.push(Oid::from_str(&commit.sha).map_err(git)?)
            .map_err(git)?;
        for oid in walk.take(max_commits) {
            if pending.is_empty() {
                break;
            }
            let current = repo.find_commit(oid.map_err(git)?).map_err(git)?;
            let tree = current.tree().map_err(git)?;
            let parent_tree = current.parent(0).ok().and_then(|p| p.tree().ok());
            let changed: Vec<&str> = pending
                .iter()
                .copied()
                .filter(|file| {
                    let here = tree.get_path(Path::new(file)).ok().map(|e| e.id());
                    let before = parent_tree
                        .as_ref()
                        .and_then(|t| t.get_path(Path::new(file)).ok())
                        .map(|e| e.id());
                    here != before
                })
                .collect();
            for file in changed {
                pending.remove(file);
                found.insert(file.to_string(), commit_info(&current));
            }
        }
        for file in pending {
            found.insert(file.to_string(), commit.clone());
        }
        Ok(found)
    }
}

struct BlobReader<'r> {
    repo: &'r Repository,
    display: &'r str,
}

impl BlobReader<'_> {
    fn read(&self, name: &str, oid: Oid) -> Result<Vec<u8>, SourceError> {
        let git = |e| SourceError::git(self.display, e);
        // Check the size from the object header before loading a huge blob into memory.
        let (size, _) = self
            .repo
            .odb()
            .and_then(|odb| odb.read_header(oid))
            .map_err(git)?;
        if size > MAX_FILE_BYTES {
            return Err(SourceError::FileTooLarge {
                file: name.to_string(),
                size,
                limit: MAX_FILE_BYTES,
            });
        }
        Ok(self.repo.find_blob(oid).map_err(git)?.content().to_vec())
    }

    fn read_symlinked(
        &self,
        root: &git2::Tree<'_>,
        name: &str,
        link_oid: Oid,
    ) -> Result<Vec<u8>, SourceError> {
        let mut current_name = name.to_string();
        let mut current_oid = link_oid;
        for _ in 0..MAX_SYMLINK_HOPS {
            let target_bytes = self.read(&current_name, current_oid)?;
            let target = String::from_utf8_lossy(&target_bytes).into_owned();
            let resolved = resolve_link(&current_name, &target).ok_or_else(|| {
                SourceError::SymlinkEscapes {
                    file: name.to_string(),
                    target: target.clone(),
                }
            })?;
            let entry =
                root.get_path(Path::new(&resolved))
                    .map_err(|_| SourceError::BadSymlink {
                        file: name.to_string(),
                        target: target.clone(),
                        problem: "does not exist in this commit".to_string(),
                    })?;
            match entry.kind() {
                Some(ObjectType::Blob) if entry.filemode() == i32::from(FileMode::Link) => {
                    current_name = resolved;
                    current_oid = entry.id();
                }
                Some(ObjectType::Blob) => return self.read(&resolved, entry.id()),
                _ => {
                    return Err(SourceError::BadSymlink {
                        file: name.to_string(),
                        target,
                        problem: "is not a file (links to folders are not followed)".to_string(),
                    });
                }
            }
        }
        Err(SourceError::BadSymlink {
            file: name.to_string(),
            target: String::new(),
            problem: format!("takes more than {MAX_SYMLINK_HOPS} hops to resolve"),
        })
    }
}

fn collect_tree(
    tree: &git2::Tree<'_>,
    prefix: &str,
    out: &mut Vec<(String, Oid, i32)>,
) -> Result<(), git2::Error> {
    tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
        if entry.kind() == Some(ObjectType::Blob)
            && let Ok(name) = entry.name()
        {
            out.push((format!("{prefix}{dir}{name}"), entry.id(), entry.filemode()));
        }
        TreeWalkResult::Ok
    })
}

fn has_manifest_extension(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|ext| MANIFEST_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

fn top_level_hint(root: &git2::Tree<'_>) -> String {
    let dirs: Vec<String> = root
        .iter()
        .filter(|e| e.kind() == Some(ObjectType::Tree))
        .filter_map(|e| e.name().ok().map(str::to_string))
        .take(10)
        .collect();
    if dirs.is_empty() {
        "the repository root has no folders; omit --path".to_string()
    } else {
        format!("folders at the root: {}", dirs.join(", "))
    }
}

/// `deploy/`, `./deploy`, `deploy//apps` → `deploy`, `deploy/apps`; `.` and `` → ``.
pub fn normalize_repo_path(path: &str) -> Result<String, SourceError> {
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::CurDir => {}
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            _ => {
                return Err(SourceError::BadPath {
                    path: path.to_string(),
                });
            }
        }
    }
    Ok(parts.join("/"))
}

/// Resolves a symlink's target relative to the folder holding the link; `None` when the result
/// would leave the repository (absolute target or too many `..`).
fn resolve_link(link_path: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = link_path.split('/').collect();
    parts.pop();
    for piece in target.split('/') {
        match piece {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

/// What `git log` shows of a commit.
fn commit_info(commit: &git2::Commit<'_>) -> CommitInfo {
    let author = commit.author();
    CommitInfo {
        sha: commit.id().to_string(),
        author: String::from_utf8_lossy(author.name_bytes()).into_owned(),
        email: String::from_utf8_lossy(author.email_bytes()).into_owned(),
        time: commit.time().seconds(),
        subject: String::from_utf8_lossy(commit.summary_bytes().unwrap_or_default()).into_owned(),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_fetch_serves_those_who_asked_before_it_started() {
        use super::fetched_since;
        let asked = std::time::Instant::now();
        assert!(!fetched_since(None, asked));
        let later = asked + std::time::Duration::from_millis(5);
        assert!(fetched_since(Some(later), asked));
        assert!(fetched_since(Some(asked), asked));
        assert!(
            !fetched_since(Some(asked), later),
            "an older fetch may miss a newer push"
        );
    }

    #[test]
    fn credentials_in_urls_are_redacted_and_other_urls_kept() {
        use super::{redact_in, redact_url};
        for (url, shown) in [
            (
                "https://ada:ghp_s3cret@github.com/acme/shop.git",
                "https://ada:<redacted>@github.com/acme/shop.git",
            ),
            (
                "https://ghp_s3cret@github.com/acme/shop.git",
                "https://<redacted>@github.com/acme/shop.git",
            ),
            (
                "http://x:y@127.0.0.1:3000/a/b.git",
                "http://x:<redacted>@127.0.0.1:3000/a/b.git",
            ),
            (
                "ssh://git@github.com/acme/shop.git",
                "ssh://git@github.com/acme/shop.git",
            ),
            (
                "git@github.com:acme/shop.git",
                "git@github.com:acme/shop.git",
            ),
            (
                "https://github.com/a@b/c.git",
                "https://github.com/a@b/c.git",
            ),
            ("/srv/git/shop", "/srv/git/shop"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let url = "https://ada:ghp_s3cret@github.com/acme/shop.git";
        assert_eq!(
            redact_in("fetching https://ada:ghp_s3cret@host failed", url),
            "fetching https://ada:<redacted>@host failed"
        );
    }

    #[test]
    fn plain_http_is_only_for_loopback() {
        use super::plain_http_host;
        assert_eq!(
            plain_http_host("http://t@git.example.com:80/a.git").as_deref(),
            Some("git.example.com")
        );
        assert_eq!(plain_http_host("http://127.0.0.1:3000/a.git"), None);
        assert_eq!(plain_http_host("http://localhost/a.git"), None);
        assert_eq!(plain_http_host("http://[::1]:8080/a.git"), None);
        assert_eq!(plain_http_host("https://git.example.com/a.git"), None);
    }

    use super::*;

    #[test]
    fn remote_specs_are_told_from_paths() {
        assert!(is_remote("https://example.com/org/repo.git"));
        assert!(is_remote("file:///srv/git/app"));
        assert!(is_remote("git@example.com:org/repo.git"));
        assert!(!is_remote("/home/me/repo"));
        assert!(!is_remote("./repo"));
        assert!(!is_remote("repo:with-colon/but-no-at"));
    }

    #[test]
    fn repo_paths_are_normalized_and_kept_inside() {
        assert_eq!(normalize_repo_path("./deploy/").unwrap(), "deploy");
        assert_eq!(normalize_repo_path("deploy//apps").unwrap(), "deploy/apps");
        assert_eq!(normalize_repo_path(".").unwrap(), "");
        assert_eq!(normalize_repo_path("").unwrap(), "");
        assert!(normalize_repo_path("../elsewhere").is_err());
        assert!(normalize_repo_path("/etc").is_err());
    }

    #[test]
    fn symlinks_resolve_inside_and_refuse_outside() {
        assert_eq!(
            resolve_link("a/b/link.yaml", "../c/real.yaml").as_deref(),
            Some("a/c/real.yaml")
        );
        assert_eq!(
            resolve_link("link.yaml", "real.yaml").as_deref(),
            Some("real.yaml")
        );
        assert_eq!(resolve_link("a/link.yaml", "../../etc/passwd"), None);
        assert_eq!(resolve_link("a/link.yaml", "/etc/passwd"), None);
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
