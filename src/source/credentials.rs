//! Credentials for fetching remote repositories, and the check of an ssh server's host key against
//! a known_hosts text.
//!
//! Secrets (tokens, private keys, passphrases) live in memory only: they are handed to libgit2
//! from memory, never written to disk, and never appear in `Debug` or `Display` output, in logs or
//! in error messages (see [`SecretString`]).

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

/// A secret value: readable with [`SecretString::expose`], redacted everywhere else.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        SecretString(value.into())
    }

    /// The secret itself, to hand to libgit2 and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How kommit authenticates to a remote repository.
#[derive(Clone)]
pub enum GitCredentials {
    /// This machine's credentials, what the CLI uses: the token or key the binary read from its
    /// environment at start-up, else an ssh agent for ssh and git's credential helper for https;
    /// ssh host keys are checked against `~/.ssh/known_hosts`.
    Ambient(AmbientCredentials),
    /// Credentials given explicitly, such as those of a GitSync's Secret.
    Given(GivenCredentials),
}

impl Default for GitCredentials {
    fn default() -> Self {
        GitCredentials::Ambient(AmbientCredentials::default())
    }
}

impl GitCredentials {
    /// A name for the mirror of `url` fetched with these credentials (a hash of both, which
    /// reveals neither): sources that name the same repository with the same credentials may
    /// share a mirror; one with other credentials, or none, never reads what these fetched.
    pub fn mirror_key(&self, url: &str) -> String {
        let mut hash = Sha256::new();
        let mut feed = |part: &[u8]| {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        };
        feed(url.as_bytes());
        match self {
            GitCredentials::Ambient(ambient) => {
                feed(b"ambient");
                let key = ambient.ssh_key.as_ref().map(|p| p.to_string_lossy());
                feed(key.as_deref().unwrap_or("").as_bytes());
                let token = ambient.https_token.as_ref().map(SecretString::expose);
                feed(token.unwrap_or("").as_bytes());
                feed(ambient.https_username.as_deref().unwrap_or("").as_bytes());
            }
            GitCredentials::Given(given) => {
                feed(b"given");
                if let Some(https) = &given.https {
                    feed(b"token");
                    feed(https.username.as_bytes());
                    feed(https.token.expose().as_bytes());
                }
                if let Some(ssh) = &given.ssh {
                    feed(b"ssh");
                    feed(ssh.private_key.expose().as_bytes());
                    let passphrase = ssh.passphrase.as_ref().map(SecretString::expose);
                    feed(passphrase.unwrap_or("").as_bytes());
                    for entry in &ssh.known_hosts.entries {
                        feed(&[entry.marker as u8]);
                        match &entry.hosts {
                            HostNames::Patterns(patterns) => {
                                for pattern in patterns {
                                    feed(pattern.as_bytes());
                                }
                            }
                            HostNames::Hashed { salt, hash } => {
                                feed(salt);
                                feed(hash);
                            }
                        }
                        feed(entry.key_type.as_bytes());
                        feed(&entry.key);
                    }
                }
            }
        }
        crate::source::hex(&hash.finalize())[..32].to_string()
    }
}

/// What the machine kommit runs on offers besides an ssh agent and git's credential helper. The
/// binary fills it from `KOMMIT_GIT_TOKEN`, `KOMMIT_GIT_USERNAME` and `KOMMIT_GIT_SSH_KEY`; the
/// library never reads the environment itself.
#[derive(Clone, Default)]
pub struct AmbientCredentials {
    /// A private key file for ssh URLs.
    pub ssh_key: Option<std::path::PathBuf>,
    /// A token for https URLs, with the user name to send it as (`git` when unset).
    pub https_token: Option<SecretString>,
    pub https_username: Option<String>,
}

/// Explicit credentials: a token for https URLs, an ssh key (with the known_hosts to check the
/// server against) for ssh URLs, or both; which one is used depends on what the server asks for.
#[derive(Clone)]
pub struct GivenCredentials {
    origin: String,
    https: Option<HttpsToken>,
    ssh: Option<SshKey>,
}

#[derive(Clone)]
struct HttpsToken {
    username: String,
    token: SecretString,
}

#[derive(Clone)]
struct SshKey {
    private_key: SecretString,
    passphrase: Option<SecretString>,
    known_hosts: KnownHosts,
}

/// The user name sent with a token when none is given. GitHub, GitLab, Gitea and Bitbucket
/// accept any user name with a token (GitHub documents `x-access-token`).
pub const DEFAULT_TOKEN_USERNAME: &str = "git";

impl GivenCredentials {
    /// No credentials yet; `origin` says where they come from in messages, e.g.
    /// `Secret team/git-creds`.
    pub fn new(origin: impl Into<String>) -> Self {
        GivenCredentials {
            origin: origin.into(),
            https: None,
            ssh: None,
        }
    }

    /// A token (or password) for https, sent as HTTP basic authentication.
    pub fn with_token(mut self, username: Option<&str>, token: SecretString) -> Self {
        self.https = Some(HttpsToken {
            username: username
                .filter(|u| !u.is_empty())
                .unwrap_or(DEFAULT_TOKEN_USERNAME)
                .to_string(),
            token,
        });
        self
    }

    /// A private key (PEM or OpenSSH format) for ssh, and the known_hosts its servers must match.
    pub fn with_ssh_key(
        mut self,
        private_key: SecretString,
        passphrase: Option<SecretString>,
        known_hosts: KnownHosts,
    ) -> Self {
        self.ssh = Some(SshKey {
            private_key,
            passphrase,
            known_hosts,
        });
        self
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn has_token(&self) -> bool {
        self.https.is_some()
    }

    pub fn has_ssh_key(&self) -> bool {
        self.ssh.is_some()
    }
}

impl From<GivenCredentials> for GitCredentials {
    fn from(given: GivenCredentials) -> Self {
        GitCredentials::Given(given)
    }
}

impl fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitCredentials::Ambient(ambient) => f
                .debug_struct("Ambient")
                .field("ssh_key", &ambient.ssh_key)
                .field("https_token", &ambient.https_token)
                .field("https_username", &ambient.https_username)
                .finish(),
            GitCredentials::Given(given) => f.debug_tuple("Given").field(given).finish(),
        }
    }
}

impl fmt::Debug for GivenCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("GivenCredentials");
        s.field("origin", &self.origin);
        if let Some(https) = &self.https {
            s.field("username", &https.username)
                .field("token", &https.token);
        }
        if let Some(ssh) = &self.ssh {
            s.field("ssh_private_key", &ssh.private_key);
            if let Some(passphrase) = &ssh.passphrase {
                s.field("ssh_passphrase", passphrase);
            }
            s.field("known_hosts", &ssh.known_hosts);
        }
        s.finish()
    }
}

impl fmt::Display for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitCredentials::Ambient(_) => f.write_str("this machine's git credentials"),
            GitCredentials::Given(given) => {
                let mut kinds = Vec::new();
                if let Some(https) = &given.https {
                    kinds.push(format!("a token for user {}", https.username));
                }
                if given.ssh.is_some() {
                    kinds.push("an ssh key".to_string());
                }
                if kinds.is_empty() {
                    kinds.push("no credentials".to_string());
                }
                write!(f, "{} from {}", kinds.join(" and "), given.origin)
            }
        }
    }
}

impl GitCredentials {
    /// What to check when a fetch fails, for the end of its error message.
    pub(crate) fn hint(&self) -> String {
        match self {
            GitCredentials::Ambient(_) => "check the URL, the network and the credentials \
                (KOMMIT_GIT_TOKEN for https, an ssh agent or KOMMIT_GIT_SSH_KEY for ssh)"
                .to_string(),
            GitCredentials::Given(given) => format!(
                "check the URL, the network and the credentials in {}",
                given.origin
            ),
        }
    }

    /// libgit2's message for a failed fetch, with what to check when it is about the key.
    pub(crate) fn explain(&self, message: &str) -> String {
        match self {
            GitCredentials::Given(given)
                if given.ssh.is_some() && message.contains("private key") =>
            {
                format!(
                    "{message} (check that ssh-privatekey of {} is a whole private key and \
                     ssh-passphrase its passphrase)",
                    given.origin
                )
            }
            _ => message.to_string(),
        }
    }

    /// Callbacks for fetching `url`. A failure the callbacks detect is also written to the
    /// returned cell, because libgit2 replaces some callback errors (a refused host key) with a
    /// generic message.
    pub(crate) fn callbacks(
        &self,
        url: &str,
    ) -> (git2::RemoteCallbacks<'_>, Rc<RefCell<Option<String>>>) {
        let failure = Rc::new(RefCell::new(None));
        let callbacks = match self {
            GitCredentials::Ambient(ambient) => ambient_callbacks(ambient.clone()),
            GitCredentials::Given(given) => given.callbacks(url, failure.clone()),
        };
        (callbacks, failure)
    }
}

impl GivenCredentials {
    fn callbacks(
        &self,
        url: &str,
        failure: Rc<RefCell<Option<String>>>,
    ) -> git2::RemoteCallbacks<'_> {
        let mut callbacks = git2::RemoteCallbacks::new();
        let port = ssh_port(url);
        let fail = {
            let failure = failure.clone();
            move |message: String| {
                failure.borrow_mut().get_or_insert(message.clone());
                git2::Error::from_str(&message)
            }
        };
        let fail_cert = fail.clone();
        let (mut token_attempts, mut key_attempts) = (0, 0);
        callbacks.credentials(move |asked_url, username, allowed| {
            let origin = &self.origin;
            if allowed.contains(git2::CredentialType::USERNAME) {
                return git2::Cred::username(username.unwrap_or("git"));
            }
            if allowed.contains(git2::CredentialType::SSH_KEY) {
                let Some(ssh) = &self.ssh else {
                    return Err(fail(format!(
                        "{origin} has no ssh-privatekey, which an ssh URL needs{}",
                        if self.https.is_some() {
                            " (its token only works for https URLs)"
                        } else {
                            ""
                        }
                    )));
                };
                // libgit2 asks again after the server refused a key: do not loop.
                key_attempts += 1;
                if key_attempts > 1 {
                    return Err(fail(format!(
                        "authentication failed: the server refused the ssh key of {origin}; \
                         check that its public key is registered (as a deploy key) with \
                         access to the repository"
                    )));
                }
                return git2::Cred::ssh_key_from_memory(
                    username.unwrap_or("git"),
                    None,
                    ssh.private_key.expose(),
                    ssh.passphrase.as_ref().map(SecretString::expose),
                )
                .map_err(|e| {
                    fail(format!(
                        "cannot use the ssh-privatekey of {origin}: {}",
                        e.message()
                    ))
                });
            }
            if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) {
                let Some(https) = &self.https else {
                    return Err(fail(format!(
                        "{origin} has no token, which an https URL needs{}",
                        if self.ssh.is_some() {
                            " (its ssh key only works for ssh URLs)"
                        } else {
                            ""
                        }
                    )));
                };
                if let Some(host) = super::plain_http_host(asked_url) {
                    return Err(fail(format!(
                        "the server at {host} asks for the token of {origin} over plain http, \
                         where anyone on the way could read it; kommit sends tokens over https \
                         only (or to a loopback address): use an https URL"
                    )));
                }
                token_attempts += 1;
                if token_attempts > 1 {
                    return Err(fail(format!(
                        "authentication failed: the server rejected the token of {origin} \
                         (user {}); check that it is valid, not expired, and can read the \
                         repository",
                        https.username
                    )));
                }
                return git2::Cred::userpass_plaintext(&https.username, https.token.expose());
            }
            Err(fail(format!(
                "the server asks for a kind of credentials kommit does not support \
                 ({allowed:?}); {origin} can give a token (https) or an ssh key"
            )))
        });
        callbacks.certificate_check(move |cert, host| {
            let Some(hostkey) = cert.as_hostkey() else {
                // A TLS certificate: the system's certificate authorities decide.
                return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
            };
            let origin = &self.origin;
            let Some(ssh) = &self.ssh else {
                return Err(fail_cert(format!(
                    "{origin} has no ssh-privatekey and known_hosts, which an ssh URL needs"
                )));
            };
            let Some(key) = hostkey.hostkey() else {
                return Err(fail_cert(format!(
                    "the ssh server {host} did not show its host key; kommit only connects to \
                     hosts whose key is in the known_hosts of {origin}"
                )));
            };
            let offered = key_type_of(key)
                .or_else(|| hostkey.hostkey_type().map(|t| t.name().to_string()))
                .unwrap_or_else(|| "unknown".to_string());
            match ssh.known_hosts.check(host, port, key) {
                HostKeyCheck::Trusted => Ok(git2::CertificateCheckStatus::CertificateOk),
                verdict => Err(fail_cert(verdict.explain(host, port, &offered, origin))),
            }
        });
        callbacks
    }
}

/// The behaviour kommit always had on the command line: environment, ssh agent, credential helper.
fn ambient_callbacks(ambient: AmbientCredentials) -> git2::RemoteCallbacks<'static> {
    let mut callbacks = git2::RemoteCallbacks::new();
    let mut attempts = 0;
    callbacks.credentials(move |url, username, allowed| {
        // libgit2 asks again after a rejected credential; give up rather than loop.
        attempts += 1;
        if attempts > 3 {
            return Err(git2::Error::from_str(
                "authentication failed (credentials were rejected)",
            ));
        }
        let user = username.unwrap_or("git");
        if allowed.contains(git2::CredentialType::SSH_KEY) {
            if let Some(key) = &ambient.ssh_key {
                return git2::Cred::ssh_key(user, None, key, None);
            }
            return git2::Cred::ssh_key_from_agent(user);
        }
        if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) {
            if let Some(host) = super::plain_http_host(url) {
                return Err(git2::Error::from_str(&format!(
                    "the server at {host} asks for credentials over plain http, where anyone on \
                     the way could read them; kommit sends them over https only (or to a loopback \
                     address): use an https URL"
                )));
            }
            if let Some(token) = &ambient.https_token {
                let name = ambient
                    .https_username
                    .as_deref()
                    .unwrap_or(DEFAULT_TOKEN_USERNAME);
                return git2::Cred::userpass_plaintext(name, token.expose());
            }
            if let Ok(config) = git2::Config::open_default() {
                return git2::Cred::credential_helper(&config, url, username);
            }
        }
        git2::Cred::default()
    });
    callbacks
}

/// The port an ssh URL connects to: `ssh://[user@]host[:port]/path` names it, `user@host:path`
/// always uses 22.
fn ssh_port(url: &str) -> u16 {
    let Some((scheme, rest)) = url.split_once("://") else {
        return 22;
    };
    if !scheme.contains("ssh") {
        return 22;
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let port = match host_port.rfind(']') {
        // [::1]:2222
        Some(end) => host_port[end + 1..].strip_prefix(':'),
        None => host_port.rsplit_once(':').map(|(_, p)| p),
    };
    port.and_then(|p| p.parse().ok()).unwrap_or(22)
}

/// The key type named inside an ssh public key blob (a length-prefixed string first).
fn key_type_of(blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4 + len)?;
    std::str::from_utf8(name).ok().map(str::to_string)
}

/// The entries of a known_hosts file (OpenSSH format): plain host patterns (`host`,
/// `[host]:port`, `*` and `?` wildcards, `!` negations, comma-separated), hashed host names
/// (`|1|salt|hash`), and the `@revoked` marker. `@cert-authority` lines are ignored: kommit does
/// not check host certificates.
#[derive(Clone, PartialEq, Eq)]
pub struct KnownHosts {
    entries: Vec<KnownHost>,
}

#[derive(Clone, PartialEq, Eq)]
struct KnownHost {
    marker: Marker,
    hosts: HostNames,
    key_type: String,
    key: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Clone, PartialEq, Eq)]
enum HostNames {
    Patterns(Vec<String>),
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

impl fmt::Debug for KnownHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KnownHosts({} entries)", self.entries.len())
    }
}

/// What a known_hosts says about a host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// The key is listed for the host.
    Trusted,
    /// The host is not in the known_hosts at all.
    Unknown,
    /// The host is listed, but with other keys: of these types.
    Mismatch { known_types: Vec<String> },
    /// The key is marked `@revoked`.
    Revoked,
}

impl HostKeyCheck {
    /// A message for the user; `offered` is the type of the key the server showed.
    pub fn explain(&self, host: &str, port: u16, offered: &str, origin: &str) -> String {
        let keyscan = if port == 22 {
            format!("ssh-keyscan {host}")
        } else {
            format!("ssh-keyscan -p {port} {host}")
        };
        let name = host_lookup_name(host, port);
        match self {
            HostKeyCheck::Trusted => format!("the host key of {name} is trusted"),
            HostKeyCheck::Unknown => format!(
                "host key for {name} is not in the known_hosts of {origin}; add it with \
                 `{keyscan} >> known_hosts` (check the fingerprints with the provider) and \
                 update the Secret's known_hosts"
            ),
            HostKeyCheck::Mismatch { known_types } if !known_types.iter().any(|t| t == offered) => {
                format!(
                    "{name} showed a {offered} host key, but the known_hosts of {origin} only \
                     has {} keys for it; add all of its keys with `{keyscan} >> known_hosts` \
                     and update the Secret's known_hosts",
                    known_types.join(", ")
                )
            }
            HostKeyCheck::Mismatch { .. } => format!(
                "the {offered} host key of {name} does not match the known_hosts of {origin}: \
                 the server's key changed, or someone is intercepting the connection; refusing \
                 to connect. If the provider announced a new key, replace the entry with \
                 `{keyscan}` (check the fingerprints with the provider)"
            ),
            HostKeyCheck::Revoked => format!(
                "the {offered} host key of {name} is marked @revoked in the known_hosts of \
                 {origin}; refusing to connect"
            ),
        }
    }
}

/// How a host appears in known_hosts: `host` on port 22, `[host]:port` otherwise.
fn host_lookup_name(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

/// A known_hosts line kommit cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnownHostsError {
    #[error("line {line}: {problem}")]
    BadLine { line: usize, problem: String },
    #[error(
        "it has no host keys; fill it with `ssh-keyscan HOST` (check the fingerprints with the \
         provider)"
    )]
    Empty,
}

impl KnownHosts {
    /// Parses known_hosts text. Blank lines and `#` comments are skipped; any other line that is
    /// not `[marker] hosts key-type base64-key [comment]` is an error (a silently dropped line
    /// would be a host that mysteriously fails).
    pub fn parse(text: &str) -> Result<Self, KnownHostsError> {
        let mut entries = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem: &str| KnownHostsError::BadLine {
                line: index + 1,
                problem: problem.to_string(),
            };
            let mut fields = line.split_whitespace();
            let mut first = fields.next().unwrap_or_default();
            let marker = match first {
                "@revoked" => Marker::Revoked,
                "@cert-authority" => Marker::CertAuthority,
                other if other.starts_with('@') => {
                    return Err(bad(&format!("unknown marker {other}")));
                }
                _ => Marker::None,
            };
            if marker != Marker::None {
                first = fields.next().ok_or_else(|| bad("no host names"))?;
            }
            let (Some(key_type), Some(key)) = (fields.next(), fields.next()) else {
                return Err(bad("expected host names, a key type and a base64 key"));
            };
            let key = BASE64
                .decode(key)
                .map_err(|_| bad("the key is not valid base64"))?;
            if key_type_of(&key).as_deref() != Some(key_type) {
                return Err(bad(&format!("the key is not a {key_type} key")));
            }
            let hosts = if let Some(hashed) = first.strip_prefix("|1|") {
                let (salt, hash) = hashed
                    .split_once('|')
                    .ok_or_else(|| bad("a hashed host name is |1|salt|hash"))?;
                let decode = |s: &str| {
                    BASE64
                        .decode(s)
                        .map_err(|_| bad("the hashed host name is not valid base64"))
                };
                HostNames::Hashed {
                    salt: decode(salt)?,
                    hash: decode(hash)?,
                }
            } else if first.starts_with('|') {
                return Err(bad("unknown host name hash (only |1| is known)"));
            } else {
                HostNames::Patterns(first.split(',').map(str::to_ascii_lowercase).collect())
            };
            entries.push(KnownHost {
                marker,
                hosts,
                key_type: key_type.to_string(),
                key,
            });
        }
        if entries.iter().all(|e| e.marker != Marker::None) {
            return Err(KnownHostsError::Empty);
        }
        Ok(KnownHosts { entries })
    }

    /// Whether `key` (an ssh public key blob, as the server sent it) is known for `host` on
    /// `port`.
    pub fn check(&self, host: &str, port: u16, key: &[u8]) -> HostKeyCheck {
        let name = host_lookup_name(host, port);
        let mut known_types: Vec<String> = Vec::new();
        let mut trusted = false;
        for entry in &self.entries {
            if entry.marker == Marker::Revoked {
                // OpenSSH applies @revoked whatever host the line names.
                if entry.key == key {
                    return HostKeyCheck::Revoked;
                }
                continue;
            }
            if entry.marker == Marker::CertAuthority || !entry.hosts.matches(&name) {
                continue;
            }
            if entry.key == key {
                trusted = true;
            } else if !known_types.contains(&entry.key_type) {
                known_types.push(entry.key_type.clone());
            }
        }
        if trusted {
            HostKeyCheck::Trusted
        } else if known_types.is_empty() {
            HostKeyCheck::Unknown
        } else {
            HostKeyCheck::Mismatch { known_types }
        }
    }
}

impl HostNames {
    fn matches(&self, name: &str) -> bool {
        match self {
            HostNames::Hashed { salt, hash } => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
                ring::hmac::verify(&key, name.as_bytes(), hash).is_ok()
            }
            HostNames::Patterns(patterns) => {
                let mut matched = false;
                for pattern in patterns {
                    if let Some(negated) = pattern.strip_prefix('!') {
                        if wildcard_match(negated, name) {
                            return false;
                        }
                    } else if wildcard_match(pattern, name) {
                        matched = true;
                    }
                }
                matched
            }
        }
    }
}

/// OpenSSH's pattern match: `*` is any run of characters, `?` any one character.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with ssh-keygen: two host keys, listed for git.example.com and [git.example.com]:2222,
    // then hashed with `ssh-keygen -H`.
    const ED25519: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIKP/NuhDkAcED92DzXebnnI4qpi0UDeCOk/DN/3AAJJd";
    const ECDSA: &str = "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJma90lc6mf/wyOaCwziPoihbgbS8ein6cX0iwwnxjAA1YkQDpYlxQAl9S0F2qCbil2nBoIZZuh7nP0R8Rk2sbk=";
    const HASHED: &str = "\
|1|zGARe5gh2nJcGu1Vwje3urduRZI=|eSfz14a7YjZLdoPLIVbK1RgELh8= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKP/NuhDkAcED92DzXebnnI4qpi0UDeCOk/DN/3AAJJd
|1|Odi6EcQYyrWDObdOthKaQn34b8A=|2q9D7aGmZvKKisGnud3edoRJ4Ig= ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJma90lc6mf/wyOaCwziPoihbgbS8ein6cX0iwwnxjAA1YkQDpYlxQAl9S0F2qCbil2nBoIZZuh7nP0R8Rk2sbk=
";

    fn blob(b64: &str) -> Vec<u8> {
        BASE64.decode(b64).unwrap()
    }

    #[test]
    fn a_mirror_is_shared_only_by_the_same_url_and_the_same_credentials() {
        let url = "https://git.example.com/acme/shop.git";
        let token = |t: &str| {
            GitCredentials::Given(
                GivenCredentials::new("Secret a/git").with_token(None, SecretString::new(t)),
            )
        };
        let none = GitCredentials::Given(GivenCredentials::new("Secret a/git"));
        assert_eq!(token("t1").mirror_key(url), token("t1").mirror_key(url));
        // Where the Secret lives does not matter, what it holds does.
        let elsewhere = GitCredentials::Given(
            GivenCredentials::new("Secret b/other").with_token(None, SecretString::new("t1")),
        );
        assert_eq!(elsewhere.mirror_key(url), token("t1").mirror_key(url));
        assert_ne!(token("t1").mirror_key(url), token("t2").mirror_key(url));
        assert_ne!(token("t1").mirror_key(url), none.mirror_key(url));
        assert_ne!(
            none.mirror_key(url),
            GitCredentials::default().mirror_key(url)
        );
        assert_ne!(
            token("t1").mirror_key(url),
            token("t1").mirror_key("https://git.example.com/acme/other.git")
        );
        let key = token("t1").mirror_key(url);
        assert!(!key.contains("t1") && key.len() == 32, "{key}");
        let known = KnownHosts::parse(HASHED).unwrap();
        let ssh = |k: &str| {
            GitCredentials::Given(GivenCredentials::new("Secret a/git").with_ssh_key(
                SecretString::new(k),
                None,
                known.clone(),
            ))
        };
        assert_ne!(ssh("key-1").mirror_key(url), ssh("key-2").mirror_key(url));
        assert_eq!(ssh("key-1").mirror_key(url), ssh("key-1").mirror_key(url));
    }

    /// An ed25519 key blob other than ED25519.
    fn other_ed25519() -> Vec<u8> {
        let mut key = blob(ED25519);
        *key.last_mut().unwrap() ^= 0xff;
        key
    }

    #[test]
    fn plain_host_names_and_ports_match_like_openssh() {
        let known = KnownHosts::parse(&format!(
            "# from ssh-keyscan\n\ngit.example.com ssh-ed25519 {ED25519}\n\
             [git.example.com]:2222 ecdsa-sha2-nistp256 {ECDSA} the comment\n"
        ))
        .unwrap();
        assert_eq!(
            known.check("git.example.com", 22, &blob(ED25519)),
            HostKeyCheck::Trusted
        );
        assert_eq!(
            known.check("GIT.Example.COM", 22, &blob(ED25519)),
            HostKeyCheck::Trusted,
            "host names are case-insensitive"
        );
        assert_eq!(
            known.check("git.example.com", 2222, &blob(ECDSA)),
            HostKeyCheck::Trusted
        );
        // A key listed for port 22 is not trusted on another port, and the other way round.
        assert_eq!(
            known.check("git.example.com", 2222, &blob(ED25519)),
            HostKeyCheck::Mismatch {
                known_types: vec!["ecdsa-sha2-nistp256".into()]
            }
        );
        assert_eq!(
            known.check("git.example.com", 22, &blob(ECDSA)),
            HostKeyCheck::Mismatch {
                known_types: vec!["ssh-ed25519".into()]
            }
        );
        assert_eq!(
            known.check("git.example.com", 22, &other_ed25519()),
            HostKeyCheck::Mismatch {
                known_types: vec!["ssh-ed25519".into()]
            }
        );
        assert_eq!(
            known.check("github.com", 22, &blob(ED25519)),
            HostKeyCheck::Unknown
        );
        assert_eq!(
            known.check("git.example.com", 2200, &blob(ECDSA)),
            HostKeyCheck::Unknown
        );
    }

    #[test]
    fn hashed_host_names_made_by_ssh_keygen_match() {
        let known = KnownHosts::parse(HASHED).unwrap();
        assert_eq!(
            known.check("git.example.com", 22, &blob(ED25519)),
            HostKeyCheck::Trusted
        );
        assert_eq!(
            known.check("git.example.com", 2222, &blob(ECDSA)),
            HostKeyCheck::Trusted
        );
        assert_eq!(
            known.check("git.example.com", 22, &other_ed25519()),
            HostKeyCheck::Mismatch {
                known_types: vec!["ssh-ed25519".into()]
            }
        );
        assert_eq!(
            known.check("git.example.org", 22, &blob(ED25519)),
            HostKeyCheck::Unknown
        );
        assert_eq!(
            known.check("git.example.com", 2223, &blob(ECDSA)),
            HostKeyCheck::Unknown
        );
    }

    #[test]
    fn patterns_lists_wildcards_and_negations() {
        let known = KnownHosts::parse(&format!(
            "git.example.com,10.0.0.7 ssh-ed25519 {ED25519}\n\
             *.corp.example,!bad.corp.example ecdsa-sha2-nistp256 {ECDSA}\n\
             git?.example.net ecdsa-sha2-nistp256 {ECDSA}\n"
        ))
        .unwrap();
        let check = |host: &str, key: &str| known.check(host, 22, &blob(key));
        assert_eq!(check("10.0.0.7", ED25519), HostKeyCheck::Trusted);
        assert_eq!(check("git.example.com", ED25519), HostKeyCheck::Trusted);
        assert_eq!(check("git.corp.example", ECDSA), HostKeyCheck::Trusted);
        assert_eq!(check("a.b.corp.example", ECDSA), HostKeyCheck::Trusted);
        assert_eq!(check("bad.corp.example", ECDSA), HostKeyCheck::Unknown);
        assert_eq!(check("corp.example", ECDSA), HostKeyCheck::Unknown);
        assert_eq!(check("git1.example.net", ECDSA), HostKeyCheck::Trusted);
        assert_eq!(check("git12.example.net", ECDSA), HostKeyCheck::Unknown);
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b*c", "axxbyy"));
        assert!(wildcard_match("[*]:2222", "[git.example.com]:2222"));
    }

    #[test]
    fn revoked_keys_are_refused_and_cert_authorities_ignored() {
        let known = KnownHosts::parse(&format!(
            "git.example.com ssh-ed25519 {ED25519}\n\
             @revoked * ssh-ed25519 {ED25519}\n\
             @cert-authority *.example.com ecdsa-sha2-nistp256 {ECDSA}\n\
             other.example.com ecdsa-sha2-nistp256 {ECDSA}\n"
        ))
        .unwrap();
        assert_eq!(
            known.check("git.example.com", 22, &blob(ED25519)),
            HostKeyCheck::Revoked
        );
        // A CA line does not make its key a host key of the hosts it names.
        assert_eq!(
            known.check("git.example.com", 22, &blob(ECDSA)),
            HostKeyCheck::Mismatch {
                known_types: vec!["ssh-ed25519".into()]
            }
        );
        assert_eq!(
            known.check("ca.example.com", 22, &blob(ECDSA)),
            HostKeyCheck::Unknown
        );
        assert_eq!(
            known.check("other.example.com", 22, &blob(ECDSA)),
            HostKeyCheck::Trusted
        );
    }

    #[test]
    fn malformed_known_hosts_say_which_line() {
        let err = |text: &str| KnownHosts::parse(text).unwrap_err().to_string();
        assert_eq!(
            err(&format!(
                "# ok\ngit.example.com ssh-ed25519 {ED25519}\ngarbage\n"
            )),
            "line 3: expected host names, a key type and a base64 key"
        );
        assert!(err("h ssh-ed25519 not*base64").contains("line 1: the key is not valid base64"));
        assert!(
            err(&format!("h ssh-rsa {ED25519}")).contains("the key is not a ssh-rsa key"),
            "the key type must match the key"
        );
        assert!(err(&format!("|1|nosplit ssh-ed25519 {ED25519}")).contains("|1|salt|hash"));
        assert!(err(&format!("|2|a|b ssh-ed25519 {ED25519}")).contains("only |1|"));
        assert!(err(&format!("@bogus h ssh-ed25519 {ED25519}")).contains("unknown marker"));
        assert!(err("# only comments\n\n").contains("no host keys"));
        assert!(err("").contains("ssh-keyscan"));
        assert!(err(&format!("@revoked * ssh-ed25519 {ED25519}")).contains("no host keys"));
    }

    #[test]
    fn messages_tell_unknown_from_changed_from_another_type() {
        let origin = "Secret team/git-creds";
        let unknown = HostKeyCheck::Unknown.explain("github.com", 22, "ssh-ed25519", origin);
        assert!(
            unknown.starts_with(
                "host key for github.com is not in the known_hosts of Secret team/git-creds"
            ),
            "{unknown}"
        );
        assert!(unknown.contains("`ssh-keyscan github.com >> known_hosts`"));
        let port = HostKeyCheck::Unknown.explain("git.example.com", 2222, "ssh-rsa", origin);
        assert!(port.contains("[git.example.com]:2222"), "{port}");
        assert!(
            port.contains("ssh-keyscan -p 2222 git.example.com"),
            "{port}"
        );
        let changed = HostKeyCheck::Mismatch {
            known_types: vec!["ssh-ed25519".into()],
        }
        .explain("github.com", 22, "ssh-ed25519", origin);
        assert!(changed.contains("does not match"), "{changed}");
        assert!(changed.contains("intercepting"), "{changed}");
        let other_type = HostKeyCheck::Mismatch {
            known_types: vec!["ssh-ed25519".into()],
        }
        .explain("github.com", 22, "ecdsa-sha2-nistp256", origin);
        assert!(
            other_type.contains("showed a ecdsa-sha2-nistp256 host key")
                && other_type.contains("only has ssh-ed25519 keys"),
            "{other_type}"
        );
    }

    #[test]
    fn ssh_ports_come_from_the_url() {
        assert_eq!(ssh_port("git@github.com:org/repo.git"), 22);
        assert_eq!(ssh_port("ssh://git@github.com/org/repo.git"), 22);
        assert_eq!(
            ssh_port("ssh://git@git.example.com:2222/org/repo.git"),
            2222
        );
        assert_eq!(ssh_port("ssh://git.example.com:2222/repo"), 2222);
        assert_eq!(ssh_port("ssh://git@[::1]:2200/repo"), 2200);
        assert_eq!(ssh_port("ssh://[::1]/repo"), 22);
        assert_eq!(ssh_port("git+ssh://h:23/repo"), 23);
        assert_eq!(ssh_port("https://h:8443/repo"), 22);
    }

    #[test]
    fn key_types_are_read_from_the_blob() {
        assert_eq!(key_type_of(&blob(ED25519)).as_deref(), Some("ssh-ed25519"));
        assert_eq!(
            key_type_of(&blob(ECDSA)).as_deref(),
            Some("ecdsa-sha2-nistp256")
        );
        assert_eq!(key_type_of(&[0, 0, 0, 9, b'x']), None);
        assert_eq!(key_type_of(&[]), None);
    }

    const TOKEN: &str = "ghp_SuperSecretToken123";
    const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
    const PASSPHRASE: &str = "correct horse battery staple";

    fn given() -> GitCredentials {
        GivenCredentials::new("Secret team/git-creds")
            .with_token(Some("x-access-token"), SecretString::new(TOKEN))
            .with_ssh_key(
                SecretString::new(KEY),
                Some(SecretString::new(PASSPHRASE)),
                KnownHosts::parse(HASHED).unwrap(),
            )
            .into()
    }

    #[test]
    fn secrets_never_show_in_debug_or_display() {
        let credentials = given();
        for shown in [
            format!("{credentials:?}"),
            format!("{credentials:#?}"),
            format!("{credentials}"),
            format!("{:?}", SecretString::new(TOKEN)),
            SecretString::new(TOKEN).to_string(),
        ] {
            for secret in [
                TOKEN,
                "OPENSSH PRIVATE",
                "b3BlbnNzaC1rZXktdjEAAAAA",
                PASSPHRASE,
            ] {
                assert!(!shown.contains(secret), "{secret} leaked into: {shown}");
            }
        }
        let debug = format!("{credentials:?}");
        assert!(debug.contains("Secret team/git-creds") && debug.contains("x-access-token"));
        assert!(debug.contains("<redacted>"), "{debug}");
        assert_eq!(
            credentials.to_string(),
            "a token for user x-access-token and an ssh key from Secret team/git-creds"
        );
        assert!(credentials.hint().contains("Secret team/git-creds"));
        let explained = credentials.explain("Unable to extract public key from private key");
        assert!(
            explained.ends_with(
                "(check that ssh-privatekey of Secret team/git-creds is a whole private key \
                 and ssh-passphrase its passphrase)"
            ),
            "{explained}"
        );
        assert_eq!(
            GitCredentials::default().explain("private key"),
            "private key"
        );
        assert!(!credentials.hint().contains(TOKEN));
    }

    /// A server that refuses every request with 401, as a git host does for a bad token.
    fn refusing_server() -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/team/app.git", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = (&stream).write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
                      Content-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        url
    }

    #[test]
    fn a_rejected_token_is_named_but_never_shown() {
        let url = refusing_server();
        let cache = tempfile::tempdir().unwrap();
        let credentials: GitCredentials = GivenCredentials::new("Secret team/git-creds")
            .with_token(None, SecretString::new(TOKEN))
            .into();
        let err = crate::source::GitSource::open_with(&url, cache.path(), credentials).unwrap_err();
        let (shown, debug) = (err.to_string(), format!("{err:?}"));
        assert!(!shown.contains(TOKEN) && !debug.contains(TOKEN), "{shown}");
        assert!(
            shown.contains(
                "authentication failed: the server rejected the token of Secret \
                 team/git-creds (user git)"
            ),
            "{shown}"
        );
        assert!(shown.contains("check the URL, the network and the credentials in Secret"));

        // Only a token: an ssh key is what an ssh URL would need, and it says so.
        let key_only: GitCredentials = GivenCredentials::new("Secret team/git-creds")
            .with_ssh_key(
                SecretString::new(KEY),
                None,
                KnownHosts::parse(HASHED).unwrap(),
            )
            .into();
        let err = crate::source::GitSource::open_with(&url, cache.path(), key_only).unwrap_err();
        assert!(
            err.to_string().contains(
                "Secret team/git-creds has no token, which an https URL needs (its \
                     ssh key only works for ssh URLs)"
            ),
            "{err}"
        );
        assert!(!format!("{err:?}").contains("OPENSSH"));
    }

    #[test]
    fn tokens_default_to_a_user_name() {
        let only_token: GitCredentials = GivenCredentials::new("Secret a/b")
            .with_token(None, SecretString::new(TOKEN))
            .into();
        assert_eq!(
            only_token.to_string(),
            "a token for user git from Secret a/b"
        );
        let empty_user: GitCredentials = GivenCredentials::new("Secret a/b")
            .with_token(Some(""), SecretString::new(TOKEN))
            .into();
        assert_eq!(
            empty_user.to_string(),
            "a token for user git from Secret a/b"
        );
    }
}
