//! The git credentials of a GitSync: read from the Secret its `spec.secretRef` names, in the
//! GitSync's own namespace.
//!
//! The Secret holds `token` (https; with an optional `username`, default `git`), or
//! `ssh-privatekey` (with an optional `ssh-passphrase`) and `known_hosts` (ssh). Flux's key
//! names (`password`, `identity`) are read too. The values stay in memory; messages name keys,
//! never values.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::SecretRef;
use crate::source::{
    AmbientCredentials, GitCredentials, GivenCredentials, KnownHosts, KnownHostsError, SecretString,
};

/// Keys holding an https token, in order of preference.
pub(super) const TOKEN_KEYS: [&str; 2] = ["token", "password"];
const USERNAME_KEY: &str = "username";
/// Keys holding an ssh private key (`ssh-privatekey` is what `kubernetes.io/ssh-auth` uses).
const SSH_KEY_KEYS: [&str; 2] = ["ssh-privatekey", "identity"];
const PASSPHRASE_KEYS: [&str; 2] = ["ssh-passphrase", "passphrase"];
const KNOWN_HOSTS_KEY: &str = "known_hosts";

/// Why a GitSync's credentials cannot be had; its message says what to do.
#[derive(Debug)]
pub struct CredentialsError {
    /// `namespace/name` of the GitSync.
    pub gitsync: String,
    pub namespace: String,
    pub secret: String,
    pub problem: CredentialsProblem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsProblem {
    NotFound,
    Forbidden,
    Unreadable(String),
    /// None of the expected keys; the keys it has (names only).
    NoCredentials(Vec<String>),
    NoKnownHosts,
    BadKnownHosts(KnownHostsError),
    NotText(String),
}

impl std::error::Error for CredentialsError {}

impl fmt::Display for CredentialsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (gitsync, namespace, secret) = (&self.gitsync, &self.namespace, &self.secret);
        write!(f, "GitSync {gitsync}: ")?;
        let create = format!("kubectl create secret generic {secret} -n {namespace}");
        match &self.problem {
            CredentialsProblem::NotFound => write!(
                f,
                "Secret {secret} not found in namespace {namespace}: create it with \
                 `{create} --from-literal=token=TOKEN` (https) or `{create} \
                 --from-file=ssh-privatekey=KEY_FILE --from-file=known_hosts=KNOWN_HOSTS_FILE` \
                 (ssh)"
            ),
            CredentialsProblem::Forbidden => write!(
                f,
                "the operator may not read Secret {secret} in namespace {namespace}: grant its \
                 ServiceAccount `get` on secrets there"
            ),
            CredentialsProblem::Unreadable(message) => write!(
                f,
                "cannot read Secret {secret} in namespace {namespace}: {message}"
            ),
            CredentialsProblem::NoCredentials(keys) => write!(
                f,
                "Secret {namespace}/{secret} has no git credentials: it needs `token` (https, \
                 with an optional `username`) or `ssh-privatekey` and `known_hosts` (ssh), and \
                 it has {}",
                if keys.is_empty() {
                    "no keys".to_string()
                } else {
                    format!("only {}", keys.join(", "))
                }
            ),
            CredentialsProblem::NoKnownHosts => write!(
                f,
                "Secret {namespace}/{secret} has an ssh-privatekey but no known_hosts, and \
                 kommit does not trust an ssh host blindly: add the host's keys with \
                 `ssh-keyscan HOST > known_hosts` (check the fingerprints with the provider), \
                 then `{create} --from-file=ssh-privatekey=KEY_FILE \
                 --from-file=known_hosts=known_hosts --dry-run=client -o yaml | kubectl apply -f -`"
            ),
            CredentialsProblem::BadKnownHosts(error) => write!(
                f,
                "the known_hosts of Secret {namespace}/{secret} cannot be read: {error}"
            ),
            CredentialsProblem::NotText(key) => write!(
                f,
                "key {key} of Secret {namespace}/{secret} is not UTF-8 text"
            ),
        }
    }
}

/// The credentials for a GitSync in `namespace` named `gitsync`: those of the Secret
/// `secret_ref` names; without one, the operator's own ([`GitCredentials::Ambient`]) when it
/// lends them (`--use-operator-credentials`), else none at all (public repositories only).
pub async fn credentials_for(
    client: &kube::Client,
    namespace: &str,
    gitsync: &str,
    secret_ref: Option<&SecretRef>,
    ambient: Option<&AmbientCredentials>,
) -> Result<GitCredentials, CredentialsError> {
    let Some(secret_ref) = secret_ref else {
        return Ok(match ambient {
            Some(ambient) => GitCredentials::Ambient(ambient.clone()),
            None => without_credentials(namespace, gitsync),
        });
    };
    let error = |problem| CredentialsError {
        gitsync: format!("{namespace}/{gitsync}"),
        namespace: namespace.to_string(),
        secret: secret_ref.name.clone(),
        problem,
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match api.get_opt(&secret_ref.name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => return Err(error(CredentialsProblem::NotFound)),
        Err(kube::Error::Api(status)) if status.code == 403 => {
            return Err(error(CredentialsProblem::Forbidden));
        }
        Err(e) => return Err(error(CredentialsProblem::Unreadable(e.to_string()))),
    };
    from_secret_data(
        namespace,
        &secret_ref.name,
        &secret.data.unwrap_or_default(),
    )
    .map_err(error)
}

/// No credentials: what a GitSync without `secretRef` fetches with when the operator keeps its
/// own to itself. The origin names what to do, since it ends up in the fetch error.
fn without_credentials(namespace: &str, gitsync: &str) -> GitCredentials {
    GivenCredentials::new(format!(
        "GitSync {namespace}/{gitsync}, which has no spec.secretRef (the operator lends its own \
         credentials only when started with --use-operator-credentials)"
    ))
    .into()
}

/// Turns a Secret's data into credentials (see the module's documentation for the keys).
pub fn from_secret_data(
    namespace: &str,
    secret: &str,
    data: &BTreeMap<String, ByteString>,
) -> Result<GitCredentials, CredentialsProblem> {
    // A value read from a file often ends with a newline; an empty value counts as absent.
    let text = |key: &str| -> Result<Option<String>, CredentialsProblem> {
        match data.get(key) {
            None => Ok(None),
            Some(ByteString(bytes)) => {
                let value = String::from_utf8(bytes.clone())
                    .map_err(|_| CredentialsProblem::NotText(key.to_string()))?;
                Ok(Some(value).filter(|v| !v.trim().is_empty()))
            }
        }
    };
    let first = |keys: &[&str]| -> Result<Option<String>, CredentialsProblem> {
        for key in keys {
            if let Some(value) = text(key)? {
                return Ok(Some(value));
            }
        }
        Ok(None)
    };
    let token = first(&TOKEN_KEYS)?;
    let private_key = first(&SSH_KEY_KEYS)?;
    if token.is_none() && private_key.is_none() {
        return Err(CredentialsProblem::NoCredentials(
            data.keys().cloned().collect(),
        ));
    }
    let mut given = GivenCredentials::new(format!("Secret {namespace}/{secret}"));
    if let Some(token) = token {
        let username = text(USERNAME_KEY)?;
        given = given.with_token(
            username.as_deref().map(str::trim),
            SecretString::new(token.trim()),
        );
    }
    if let Some(mut private_key) = private_key {
        let known_hosts = text(KNOWN_HOSTS_KEY)?.ok_or(CredentialsProblem::NoKnownHosts)?;
        let known_hosts =
            KnownHosts::parse(&known_hosts).map_err(CredentialsProblem::BadKnownHosts)?;
        // PEM and OpenSSH keys end with a newline; some parsers insist on it.
        if !private_key.ends_with('\n') {
            private_key.push('\n');
        }
        let passphrase =
            first(&PASSPHRASE_KEYS)?.map(|p| SecretString::new(p.trim_end_matches(['\r', '\n'])));
        given = given.with_ssh_key(SecretString::new(private_key), passphrase, known_hosts);
    }
    Ok(given.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "ghp_0123456789SuperSecret";
    const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----";
    const KNOWN_HOSTS: &str = "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n";

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    fn error(problem: CredentialsProblem) -> String {
        CredentialsError {
            gitsync: "team/shop".into(),
            namespace: "team".into(),
            secret: "git-creds".into(),
            problem,
        }
        .to_string()
    }

    fn given(result: Result<GitCredentials, CredentialsProblem>) -> GivenCredentials {
        match result.unwrap() {
            GitCredentials::Given(given) => given,
            other => panic!("expected given credentials, got {other:?}"),
        }
    }

    #[test]
    fn a_token_with_or_without_a_username() {
        let creds = from_secret_data("team", "git-creds", &data(&[("token", "ghp_x\n")])).unwrap();
        assert_eq!(
            creds.to_string(),
            "a token for user git from Secret team/git-creds"
        );
        let creds = from_secret_data(
            "team",
            "git-creds",
            &data(&[("username", "x-access-token\n"), ("token", TOKEN)]),
        )
        .unwrap();
        assert_eq!(
            creds.to_string(),
            "a token for user x-access-token from Secret team/git-creds"
        );
        // Flux's basic-auth keys work too.
        let flux = given(from_secret_data(
            "team",
            "git-creds",
            &data(&[("username", "bot"), ("password", TOKEN)]),
        ));
        assert!(flux.has_token() && !flux.has_ssh_key());
    }

    #[test]
    fn an_ssh_key_needs_known_hosts() {
        let creds = given(from_secret_data(
            "team",
            "git-creds",
            &data(&[
                ("ssh-privatekey", KEY),
                ("known_hosts", KNOWN_HOSTS),
                ("ssh-passphrase", "hunter2\n"),
            ]),
        ));
        assert!(creds.has_ssh_key() && !creds.has_token());
        let problem =
            from_secret_data("team", "git-creds", &data(&[("ssh-privatekey", KEY)])).unwrap_err();
        assert_eq!(problem, CredentialsProblem::NoKnownHosts);
        let message = error(problem);
        assert!(
            message.starts_with(
                "GitSync team/shop: Secret team/git-creds has an ssh-privatekey but no \
                 known_hosts, and kommit does not trust an ssh host blindly"
            ),
            "{message}"
        );
        assert!(
            message.contains("ssh-keyscan HOST > known_hosts"),
            "{message}"
        );
        let empty = from_secret_data(
            "team",
            "git-creds",
            &data(&[("identity", KEY), ("known_hosts", "  \n")]),
        )
        .unwrap_err();
        assert_eq!(empty, CredentialsProblem::NoKnownHosts);
        let bad = from_secret_data(
            "team",
            "git-creds",
            &data(&[
                ("identity", KEY),
                ("known_hosts", "github.com ssh-ed25519\n"),
            ]),
        )
        .unwrap_err();
        assert!(
            error(bad).contains("the known_hosts of Secret team/git-creds cannot be read: line 1:")
        );
    }

    #[test]
    fn both_kinds_in_one_secret_serve_either_url() {
        let creds = given(from_secret_data(
            "team",
            "git-creds",
            &data(&[
                ("token", TOKEN),
                ("ssh-privatekey", KEY),
                ("known_hosts", KNOWN_HOSTS),
            ]),
        ));
        assert!(creds.has_token() && creds.has_ssh_key());
    }

    #[test]
    fn a_secret_without_credentials_names_its_keys_not_its_values() {
        let problem = from_secret_data(
            "team",
            "git-creds",
            &data(&[("tokn", TOKEN), ("user", "me")]),
        )
        .unwrap_err();
        let message = error(problem);
        assert_eq!(
            message,
            "GitSync team/shop: Secret team/git-creds has no git credentials: it needs `token` \
             (https, with an optional `username`) or `ssh-privatekey` and `known_hosts` (ssh), \
             and it has only tokn, user"
        );
        assert!(!message.contains(TOKEN));
        let empty = error(from_secret_data("team", "git-creds", &BTreeMap::new()).unwrap_err());
        assert!(empty.ends_with("and it has no keys"), "{empty}");
        let blank = from_secret_data("team", "git-creds", &data(&[("token", " \n")])).unwrap_err();
        assert_eq!(
            blank,
            CredentialsProblem::NoCredentials(vec!["token".into()])
        );
        let mut binary = BTreeMap::new();
        binary.insert("token".to_string(), ByteString(vec![0xff, 0xfe]));
        let problem = from_secret_data("team", "git-creds", &binary).unwrap_err();
        assert_eq!(
            error(problem),
            "GitSync team/shop: key token of Secret team/git-creds is not UTF-8 text"
        );
    }

    #[test]
    fn a_missing_secret_says_how_to_create_it() {
        let message = error(CredentialsProblem::NotFound);
        assert!(
            message.starts_with(
                "GitSync team/shop: Secret git-creds not found in namespace team: create it with \
                 `kubectl create secret generic git-creds -n team --from-literal=token=TOKEN`"
            ),
            "{message}"
        );
        assert!(message.contains("--from-file=known_hosts="), "{message}");
        assert!(error(CredentialsProblem::Forbidden).contains("grant its ServiceAccount `get`"));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let creds = from_secret_data(
            "team",
            "git-creds",
            &data(&[
                ("token", TOKEN),
                ("ssh-privatekey", KEY),
                ("known_hosts", KNOWN_HOSTS),
                ("ssh-passphrase", "hunter2"),
            ]),
        )
        .unwrap();
        let shown = format!("{creds:?} {creds:#?} {creds}");
        for secret in [TOKEN, "b3BlbnNzaC1rZXktdjEAAAAA", "hunter2"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
}
