//! Pull-request rollouts for a GitSync with `spec.pullRequests`: for every open pull request
//! against its branch, one comment kept up to date (what the pull request changes, and what
//! merging it would apply to the live cluster), the commit statuses `kommit/diff` and
//! `kommit/preview` on its head, and optionally a preview namespace running its head.
//!
//! Trust: the forge's answers decide what is open. A preview is removed only when the forge
//! says its pull request is closed or merged (or it no longer qualifies, or it idled past the
//! ttl), never because a request failed. A pull request from a fork is untrusted code: it is
//! looked at only with `allowForks` and an approval label, which holds for the head commit it
//! was seen on. Previews are confined to their namespace: a commit with an object elsewhere is
//! refused for the preview, and the namespace gets a quota, container limits and a default-deny
//! NetworkPolicy. The preview's objects are written as the GitSync's ServiceAccount, bound in
//! the preview namespace only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::controller::Context;
use super::{GitSync, GitSyncStatus, PullRequestStatus, PullRequestsSpec};
use crate::cluster::Cluster;
use crate::duration::parse_duration;
use crate::forge::{
    CommitStatus, Forge, ForgeError, PullRequest, PullState, Repo, StatusState, api_url_for,
};
use crate::object::FIELD_MANAGER;
use crate::plan::review::{COMMENT_LIMIT, render_markdown};
use crate::reconcile::{self, Policy, Target, WaitOptions, WaitOutcome};
use crate::source::{GitSource, redact_url};

/// The label of a preview namespace naming the GitSync (its inventory id) it belongs to.
pub const PREVIEW_OF_LABEL: &str = "kommit.dev/preview-of";
/// The label of a preview namespace with its pull request's number.
pub const PULL_REQUEST_LABEL: &str = "kommit.dev/pull-request";
/// Kept on a GitSync with previews until they are removed.
pub const PREVIEWS_FINALIZER: &str = "kommit.dev/previews";
pub const DIFF_CONTEXT: &str = "kommit/diff";
pub const PREVIEW_CONTEXT: &str = "kommit/preview";
/// How many pull requests a GitSync's status lists.
const STATUS_LIMIT: usize = 50;
/// What a comment's own lines (header, preview section, marker) may take beside the report.
const COMMENT_FRAME: usize = 1_500;

/// What the pull-request work needs of the GitSync's reconcile.
pub struct Work<'a> {
    pub gitsync: &'a GitSync,
    pub spec: &'a PullRequestsSpec,
    pub context: &'a Context,
    pub source: &'a GitSource,
    /// The cluster as the GitSync's identity: reviews and previews are read and written as it.
    pub cluster: &'a Cluster,
    /// The GitSync's target (path, selection, budgets) at its branch.
    pub target: &'a Target,
    /// The commit of the GitSync's branch: what pull requests are compared with.
    pub base_sha: &'a str,
    /// The GitSync's inventory id, which also names its previews.
    pub inventory: &'a str,
}

/// Why the pull requests could not be looked at this time. Nothing is removed for these.
#[derive(Debug, thiserror::Error)]
pub enum PullRequestError {
    #[error("spec.pullRequests: {0}")]
    Config(String),
    #[error("{0}")]
    Token(String),
    #[error("{0}")]
    Forge(#[from] ForgeError),
    #[error("cannot fetch the heads of pull requests {numbers} from {repo}: {message}")]
    Fetch {
        repo: String,
        numbers: String,
        message: String,
    },
    #[error("cannot list the preview namespaces of this GitSync: {0}")]
    Previews(String),
}

/// The forge token of a GitSync: `token` of `pullRequests.secretRef`, else of `secretRef`.
async fn forge_token(context: &Context, gitsync: &GitSync) -> Result<String, PullRequestError> {
    let namespace = gitsync.namespace().unwrap_or_default();
    let pulls = gitsync.spec.pull_requests.as_ref();
    let Some(secret) = pulls
        .and_then(|p| p.secret_ref.as_ref())
        .or(gitsync.spec.secret_ref.as_ref())
    else {
        return Err(PullRequestError::Token(
            "spec.pullRequests needs a token to read pull requests and to comment: name a \
             Secret with a `token` key in spec.pullRequests.secretRef (or spec.secretRef)"
                .into(),
        ));
    };
    let api: Api<Secret> = Api::namespaced(context.cluster.client().clone(), &namespace);
    let found = api.get_opt(&secret.name).await.map_err(|e| {
        PullRequestError::Token(format!(
            "cannot read Secret {namespace}/{} for the forge token: {e}",
            secret.name
        ))
    })?;
    let Some(found) = found else {
        return Err(PullRequestError::Token(format!(
            "Secret {namespace}/{} (the forge token) does not exist: create it with a `token` key",
            secret.name
        )));
    };
    let data = found.data.unwrap_or_default();
    super::credentials::TOKEN_KEYS
        .iter()
        .find_map(|key| data.get(*key))
        .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
        .map(|token| token.trim().to_string())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            PullRequestError::Token(format!(
                "Secret {namespace}/{} has no `token` key with text in it: add the forge token \
                 there",
                secret.name
            ))
        })
}

/// The forge client of a GitSync, kept between reconciles so that its conditional requests
/// (ETags) spare the rate limit; made anew when the API URL or the token changes.
async fn forge_for(work: &Work<'_>) -> Result<Forge, PullRequestError> {
    let provider = work.spec.provider.into();
    let api_url = match &work.spec.api_url {
        Some(url) => url.clone(),
        None => api_url_for(provider, &work.gitsync.spec.repo)?,
    };
    let token = forge_token(work.context, work.gitsync).await?;
    let key = format!(
        "{}/{}",
        work.gitsync.namespace().unwrap_or_default(),
        work.gitsync.name_any()
    );
    let fingerprint = crate::source::hex(&Sha256::digest(
        format!("{provider}\n{api_url}\n{token}").as_bytes(),
    ));
    let mut forges = work
        .context
        .forges
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((known, forge)) = forges.get(&key)
        && *known == fingerprint
    {
        return Ok(forge.clone());
    }
    let forge = Forge::new(provider, &api_url, token)?;
    forges.insert(key, (fingerprint, forge.clone()));
    Ok(forge)
}

/// What becomes of a pull request's preview this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewPlan {
    /// `previews` is off.
    Off,
    /// Made or kept up to date.
    Deploy,
    /// No push for `ttl`: removed until the next push.
    Expired,
    /// `maxPreviews` older pull requests have one.
    OverLimit,
}

/// The preview plan of `pr` given what was recorded of it; takes a slot from `slots` when it
/// gets a preview (expired ones give theirs to younger pull requests).
pub fn preview_plan(
    previews: bool,
    before: Option<&PullRequestStatus>,
    pr: &PullRequest,
    ttl: Duration,
    slots: &mut usize,
) -> PreviewPlan {
    if !previews {
        return PreviewPlan::Off;
    }
    let idle = before
        .filter(|b| b.head_sha == pr.head_sha)
        .and_then(|b| age_of(&b.last_push))
        .is_some_and(|age| age > ttl);
    if idle {
        return PreviewPlan::Expired;
    }
    if *slots == 0 {
        return PreviewPlan::OverLimit;
    }
    *slots -= 1;
    PreviewPlan::Deploy
}

/// The namespace of pull request `number`'s preview: `<gitsync>-pr-<number>`, shortened with a
/// hash of the GitSync's namespace and name when it would be over 63 characters.
pub fn preview_namespace(gitsync_namespace: &str, gitsync: &str, number: u64) -> String {
    let suffix = format!("-pr-{number}");
    let name = format!("{gitsync}{suffix}");
    if name.len() <= 63 {
        return name;
    }
    let digest = crate::source::hex(&Sha256::digest(
        format!("{gitsync_namespace}/{gitsync}").as_bytes(),
    ));
    let keep = 63 - suffix.len() - 9;
    let prefix = gitsync[..keep].trim_end_matches('-');
    format!("{prefix}-{}{suffix}", &digest[..8])
}

/// The inventory id of a preview: the GitSync's, with the pull request's number.
fn preview_inventory(inventory: &str, number: u64) -> String {
    let id = format!("{inventory}.pr-{number}");
    if id.len() <= 63 {
        return id;
    }
    let digest = crate::source::hex(&Sha256::digest(id.as_bytes()));
    format!("pr.{}", &digest[..40])
}

/// Which pull requests kommit acts on, and for a fork what its approval is.
#[derive(Debug, PartialEq, Eq)]
pub enum Eligibility {
    Eligible,
    /// Lacks one of `labels`.
    Unlabelled,
    /// A fork's pull request and `allowForks` is false.
    ForksNotAllowed,
    /// A fork's pull request without the approval label (on this head).
    AwaitingApproval,
    /// A fork's approval was given on an earlier head: kommit takes the label off.
    ApprovalOutdated,
}

/// Whether `pr` qualifies, given the head commit its fork approval was last seen on.
pub fn eligibility(
    spec: &PullRequestsSpec,
    pr: &PullRequest,
    approved_sha: Option<&str>,
) -> Eligibility {
    if !spec.labels.iter().all(|l| pr.labels.contains(l)) {
        return Eligibility::Unlabelled;
    }
    if !pr.from_fork {
        return Eligibility::Eligible;
    }
    if !spec.allow_forks {
        return Eligibility::ForksNotAllowed;
    }
    if !pr.labels.contains(&spec.approval_label) {
        return Eligibility::AwaitingApproval;
    }
    match approved_sha {
        Some(sha) if sha != pr.head_sha => Eligibility::ApprovalOutdated,
        _ => Eligibility::Eligible,
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn age_of(rfc3339: &str) -> Option<Duration> {
    let then: k8s_openapi::jiff::Timestamp = rfc3339.parse().ok()?;
    let then = SystemTime::from(then);
    SystemTime::now().duration_since(then).ok()
}

/// Looks at the open pull requests once: comments, statuses, previews and their clean-up.
/// Writes what it did into `status`. An error leaves every preview where it is.
pub async fn reconcile(
    work: &Work<'_>,
    status: &mut GitSyncStatus,
) -> Result<(), PullRequestError> {
    let metrics = &work.context.metrics;
    let forge = forge_for(work).await?;
    let repo = Repo::parse(&work.gitsync.spec.repo)?;
    let branch = match (&work.gitsync.spec.branch, &work.gitsync.spec.rev) {
        (Some(branch), _) => branch.clone(),
        (None, Some(_)) => {
            return Err(PullRequestError::Config(
                "a GitSync pinned to spec.rev has no branch for pull requests to target: set \
                 spec.branch"
                    .into(),
            ));
        }
        (None, None) => work.source.default_branch().ok_or_else(|| {
            PullRequestError::Config(
                "the repository's default branch is unknown: set spec.branch".into(),
            )
        })?,
    };
    let listed = forge.open_pull_requests(&repo, &branch).await;
    metrics.forge_call("list", listed.is_ok());
    let open = listed?;
    // Read, not taken: an error below leaves the recorded pull requests (and the uids of their
    // namespaces) as they were.
    let known: HashMap<u64, PullRequestStatus> = status
        .pull_requests
        .iter()
        .map(|p| (p.number, p.clone()))
        .collect();
    let previews = existing_previews(work, &known).await?;
    let mut next: Vec<PullRequestStatus> = Vec::new();
    let mut eligible = Vec::new();
    for pr in &open {
        let before = known.get(&pr.number);
        let approved = before.and_then(|b| b.approved_sha.as_deref());
        match eligibility(work.spec, pr, approved) {
            Eligibility::Eligible => eligible.push(pr),
            Eligibility::Unlabelled | Eligibility::ForksNotAllowed => {}
            Eligibility::AwaitingApproval => match before {
                // Already said for this head: not said again on every look.
                Some(b) if b.head_sha == pr.head_sha && b.health == "Waiting" => {
                    next.push(b.clone())
                }
                _ => next.push(awaiting(work, &forge, &repo, pr).await),
            },
            Eligibility::ApprovalOutdated => {
                // The approval was for the code as it was: a new push needs a new look.
                let removed = forge
                    .remove_label(&repo, pr.number, &work.spec.approval_label)
                    .await;
                metrics.forge_call("label", removed.is_ok());
                removed?;
                next.push(awaiting(work, &forge, &repo, pr).await);
            }
        }
    }

    let numbers: Vec<u64> = eligible.iter().map(|pr| pr.number).collect();
    let fetch_numbers = numbers.clone();
    work.source
        .blocking(move |git| git.fetch_pull_request_heads(&fetch_numbers))
        .await
        .map_err(|e| PullRequestError::Fetch {
            repo: redact_url(&work.gitsync.spec.repo),
            numbers: numbers
                .iter()
                .map(|n| format!("#{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            message: e.to_string(),
        })?;

    let ttl = parse_duration(&work.spec.ttl).unwrap_or(Duration::from_secs(72 * 3600));
    let mut slots = work.spec.max_previews as usize;
    for pr in &eligible {
        let before = known.get(&pr.number).cloned();
        let wants_preview = preview_plan(work.spec.previews, before.as_ref(), pr, ttl, &mut slots);
        let span =
            tracing::info_span!("pull_request", number = pr.number, head = %short(&pr.head_sha));
        let entry = tracing::Instrument::instrument(
            pull_request(work, &forge, &repo, pr, before, wants_preview, &previews),
            span,
        )
        .await;
        next.push(entry);
    }

    // Previews of pull requests no longer eligible: removed only on the forge's word.
    let eligible_numbers: HashSet<u64> = numbers.iter().copied().collect();
    for (number, (namespace, uid)) in &previews {
        if eligible_numbers.contains(number) {
            continue;
        }
        let pr = forge.pull_request(&repo, *number).await;
        metrics.forge_call("get", pr.is_ok());
        let pr = pr?;
        let why = match pr.state {
            PullState::Merged => "was merged",
            PullState::Closed => "was closed",
            PullState::Open => "no longer qualifies for a preview",
        };
        delete_preview(work, namespace, uid).await?;
        tracing::info!(pull_request = number, namespace = %namespace, "preview removed: the pull request {why}");
        if work.spec.comment {
            let body = format!(
                "### kommit: {}\n\nThe pull request {why}: its preview namespace `{namespace}` \
                 was removed.\n",
                gitsync_label(work.gitsync)
            );
            let done = forge
                .upsert_comment(&repo, *number, work.inventory, &body)
                .await;
            metrics.forge_call("comment", done.is_ok());
            done?;
        }
    }
    next.sort_by_key(|p| p.number);
    next.truncate(STATUS_LIMIT);
    status.previews = Some(next.iter().filter(|p| p.namespace.is_some()).count() as u32);
    status.pull_requests = next;
    status.pull_requests_error = None;
    Ok(())
}

/// The preview namespaces of this GitSync still there, by pull request number, with their
/// uids: those `known` records kommit made. A label anyone could copy proves nothing.
async fn existing_previews(
    work: &Work<'_>,
    known: &HashMap<u64, PullRequestStatus>,
) -> Result<BTreeMap<u64, (String, String)>, PullRequestError> {
    let api: Api<Namespace> = Api::all(work.context.cluster.client().clone());
    let listed = api
        .list(&ListParams::default().labels(&format!("{PREVIEW_OF_LABEL}={}", work.inventory)))
        .await
        .map_err(|e| PullRequestError::Previews(e.to_string()))?;
    Ok(listed
        .items
        .into_iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter_map(|ns| {
            let (name, uid) = (ns.name_any(), ns.uid()?);
            let (number, _) = known.iter().find(|(_, p)| {
                p.namespace.as_deref() == Some(name.as_str())
                    && p.namespace_uid.as_deref() == Some(uid.as_str())
            })?;
            Some((*number, (name, uid)))
        })
        .collect())
}

fn gitsync_label(gitsync: &GitSync) -> String {
    format!(
        "GitSync `{}/{}`",
        gitsync.namespace().unwrap_or_default(),
        gitsync.name_any()
    )
}

/// A fork's pull request waiting for its approval label: a pending `kommit/diff`, nothing else.
async fn awaiting(
    work: &Work<'_>,
    forge: &Forge,
    repo: &Repo,
    pr: &PullRequest,
) -> PullRequestStatus {
    let message = format!(
        "from a fork: waiting for someone who may label it to add {} to commit {}",
        work.spec.approval_label,
        short(&pr.head_sha)
    );
    let set = forge
        .set_status(
            repo,
            &pr.head_sha,
            &CommitStatus {
                state: StatusState::Pending,
                context: DIFF_CONTEXT.into(),
                description: message.clone(),
                target_url: None,
            },
        )
        .await;
    work.context.metrics.forge_call("status", set.is_ok());
    PullRequestStatus {
        number: pr.number,
        head_sha: pr.head_sha.clone(),
        health: "Waiting".into(),
        message,
        last_update: now_rfc3339(),
        ..Default::default()
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(7)]
}

/// One eligible pull request: its comment and statuses when its head or the base moved, and
/// its preview (made, updated, expired or removed).
#[allow(clippy::too_many_arguments)]
async fn pull_request(
    work: &Work<'_>,
    forge: &Forge,
    repo: &Repo,
    pr: &PullRequest,
    before: Option<PullRequestStatus>,
    plan: PreviewPlan,
    previews: &BTreeMap<u64, (String, String)>,
) -> PullRequestStatus {
    let pushed = before.as_ref().is_none_or(|b| b.head_sha != pr.head_sha);
    let mut entry = before.unwrap_or_default();
    entry.number = pr.number;
    if pushed || entry.last_push.is_empty() {
        entry.last_push = now_rfc3339();
    }
    if pr.from_fork {
        entry.approved_sha = Some(pr.head_sha.clone());
    }
    let existing = previews.get(&pr.number).cloned();
    let base_moved = entry.base_sha != work.base_sha;
    // What is already said about this head and base is not said again.
    let settled = !pushed
        && !base_moved
        && matches!(
            entry.health.as_str(),
            "Healthy" | "Degraded" | "Refused" | "NoPreview" | "Expired"
        )
        && (existing.is_some() == (plan == PreviewPlan::Deploy));
    entry.head_sha = pr.head_sha.clone();
    entry.base_sha = work.base_sha.to_string();
    if settled {
        return entry;
    }

    // The report: what the pull request changes, and what merging it would do to the cluster.
    let policy = Policy {
        dry_run: true,
        prune: work.gitsync.spec.prune,
        adopt: work.gitsync.spec.adopt,
        ..Policy::default()
    };
    let review = reconcile::review(
        work.source,
        work.cluster,
        work.target,
        work.base_sha,
        &pr.head_sha,
        &policy,
    )
    .await;
    let (diff_state, diff_description, report) = match &review {
        Ok(review) => {
            let summary = review.live.summary();
            (
                StatusState::Success,
                format!(
                    "plans cleanly: {} to create, {} to update, {} to remove",
                    summary.create,
                    summary.update + summary.replace,
                    summary.prune
                ),
                render_markdown(review, COMMENT_LIMIT - COMMENT_FRAME),
            )
        }
        Err(e) => (
            StatusState::Failure,
            format!("would be refused: {}", first_line(&e.to_string())),
            format!(
                "### kommit: the head commit `{}` would be refused\n\n```\n{}\n```\n",
                short(&pr.head_sha),
                crate::forge::truncate_chars(&e.to_string(), COMMENT_LIMIT - COMMENT_FRAME)
            ),
        ),
    };
    set_status(
        work,
        forge,
        repo,
        &pr.head_sha,
        DIFF_CONTEXT,
        diff_state,
        &diff_description,
    )
    .await;

    // The preview.
    let namespace = preview_namespace(
        &work.gitsync.namespace().unwrap_or_default(),
        &work.gitsync.name_any(),
        pr.number,
    );
    let preview_section;
    if plan == PreviewPlan::Off {
        // Previews turned off: the controller removed them with the finalizer.
        entry.namespace = None;
        entry.namespace_uid = None;
        entry.health = "NoPreview".into();
        entry.message = String::new();
        preview_section = String::new();
    } else if plan != PreviewPlan::Deploy {
        if let Some((existing, uid)) = &existing
            && let Err(e) = delete_preview(work, existing, uid).await
        {
            tracing::warn!(error = %e, "cannot remove the preview");
        }
        entry.namespace = None;
        entry.namespace_uid = None;
        let (health, message) = if plan == PreviewPlan::Expired {
            (
                "Expired",
                format!(
                    "no push for {}: the preview was removed; push again to get it back",
                    work.spec.ttl
                ),
            )
        } else {
            (
                "NoPreview",
                format!(
                    "maxPreviews ({}) reached: older pull requests have the previews",
                    work.spec.max_previews
                ),
            )
        };
        entry.health = health.into();
        entry.message = message.clone();
        preview_section = format!("\n#### Preview\n\n{message}.\n");
        set_status(
            work,
            forge,
            repo,
            &pr.head_sha,
            PREVIEW_CONTEXT,
            StatusState::Success,
            &message,
        )
        .await;
    } else {
        // Say so first: a preview can take minutes to become healthy.
        entry.health = "Progressing".into();
        let pending = format!("deploying into namespace {namespace}");
        set_status(
            work,
            forge,
            repo,
            &pr.head_sha,
            PREVIEW_CONTEXT,
            StatusState::Pending,
            &pending,
        )
        .await;
        post_comment(
            work,
            forge,
            repo,
            pr,
            &report,
            &format!("\n#### Preview\n\n⏳ Deploying into namespace `{namespace}` …\n"),
        )
        .await;
        let recorded_uid = existing.as_ref().map(|(_, uid)| uid.as_str());
        let prepared = prepare_namespace(work, pr.number, &namespace, recorded_uid).await;
        let deployed = match prepared {
            Ok(uid) => {
                entry.namespace = Some(namespace.clone());
                entry.namespace_uid = Some(uid);
                deploy_preview(work, pr, &namespace).await
            }
            Err(message) => Err(message),
        };
        let (health, message) = match deployed {
            Ok(outcome) => outcome,
            Err(message) => ("Refused".to_string(), message),
        };
        let state = if health == "Healthy" {
            StatusState::Success
        } else {
            StatusState::Failure
        };
        let description = if message.is_empty() {
            format!("healthy in namespace {namespace}")
        } else {
            message.clone()
        };
        set_status(
            work,
            forge,
            repo,
            &pr.head_sha,
            PREVIEW_CONTEXT,
            state,
            &description,
        )
        .await;
        preview_section = format!(
            "\n#### Preview\n\n{} Namespace `{namespace}`: **{health}**{}\n",
            if health == "Healthy" { "✅" } else { "❌" },
            if message.is_empty() {
                String::new()
            } else {
                format!(
                    "\n\n```\n{}\n```",
                    crate::forge::truncate_chars(&message, 800)
                )
            }
        );
        entry.health = health;
        entry.message = message;
    }
    post_comment(work, forge, repo, pr, &report, &preview_section).await;
    entry.last_update = now_rfc3339();
    entry
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

async fn set_status(
    work: &Work<'_>,
    forge: &Forge,
    repo: &Repo,
    sha: &str,
    context: &str,
    state: StatusState,
    description: &str,
) {
    let set = forge
        .set_status(
            repo,
            sha,
            &CommitStatus {
                state,
                context: context.into(),
                description: description.into(),
                target_url: None,
            },
        )
        .await;
    work.context.metrics.forge_call("status", set.is_ok());
    if let Err(e) = set {
        tracing::warn!(error = %e, context, "cannot set the commit status");
    }
}

/// Edits the pull request's one comment, unless the pull request moved on meanwhile: a report
/// on an older head never overwrites one on a newer.
async fn post_comment(
    work: &Work<'_>,
    forge: &Forge,
    repo: &Repo,
    pr: &PullRequest,
    report: &str,
    preview: &str,
) {
    if !work.spec.comment {
        return;
    }
    let now = forge.pull_request(repo, pr.number).await;
    work.context.metrics.forge_call("get", now.is_ok());
    match now {
        Ok(now) if now.head_sha != pr.head_sha || now.state != PullState::Open => {
            tracing::info!("the pull request moved on; its comment is left to the next look");
            return;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the pull request; its comment is not updated");
            return;
        }
    }
    let body = format!(
        "_{} · head `{}` · base `{}`_\n\n{report}{preview}",
        gitsync_label(work.gitsync),
        short(&pr.head_sha),
        short(work.base_sha)
    );
    let done = forge
        .upsert_comment(repo, pr.number, work.inventory, &body)
        .await;
    work.context.metrics.forge_call("comment", done.is_ok());
    if let Err(e) = done {
        tracing::warn!(error = %e, "cannot update the pull request's comment");
    }
}

/// Syncs the pull request's head into its prepared preview namespace, confined to it.
/// Returns the health and why it is not healthy.
async fn deploy_preview(
    work: &Work<'_>,
    pr: &PullRequest,
    namespace: &str,
) -> Result<(String, String), String> {
    let target = Target {
        rev: Some(pr.head_sha.clone()),
        namespace: Some(namespace.to_string()),
        inventory: Some(preview_inventory(work.inventory, pr.number)),
        confine: true,
        ..work.target.clone()
    };
    let policy = Policy {
        prune: true,
        // The namespace is the preview's own: git wins over any hand edit there.
        force_conflicts: true,
        auto_rollback: false,
        // A preview is deployed again only when something changed (or its status was lost):
        // then its head is tried again, so the status tells the rollout's own cause.
        retry_failed: true,
        wait: Some(WaitOptions::default()),
        prune_namespaces: vec![namespace.to_string()],
        ..Policy::default()
    };
    let mut cluster = work.cluster.clone();
    let report = reconcile::sync(
        work.source,
        &mut cluster,
        &target,
        &policy,
        &reconcile::Quiet,
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(match (&report.rollout, &report.skipped) {
        (_, Some(skipped)) => ("Degraded".into(), skipped.clone()),
        (Some(WaitOutcome::Failed { object, reason, .. }), _) => {
            ("Degraded".into(), format!("{object}: {reason}"))
        }
        _ => ("Healthy".into(), String::new()),
    })
}

/// The preview namespace (made here, or the one kommit made before: `recorded_uid`) and what
/// confines it: quota, limits, default-deny network policy, and the GitSync's ServiceAccount
/// bound to `previewRole`. Written as the operator: they are kommit's own. Returns the
/// namespace's uid.
async fn prepare_namespace(
    work: &Work<'_>,
    number: u64,
    namespace: &str,
    recorded_uid: Option<&str>,
) -> Result<String, String> {
    let cluster = &work.context.cluster;
    let client = cluster.client().clone();
    cluster
        .check_fence(&format!("Namespace {namespace}"))
        .map_err(|e| e.to_string())?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let labels = json!({
        PREVIEW_OF_LABEL: work.inventory,
        PULL_REQUEST_LABEL: number.to_string(),
        "app.kubernetes.io/managed-by": "kommit",
    });
    let not_ours = || {
        format!(
            "namespace {namespace} exists and kommit has no record of making it for {}: kommit \
             does not write into a namespace it did not make; remove that namespace (or rename \
             the GitSync)",
            gitsync_label(work.gitsync)
        )
    };
    let found = namespaces
        .get_opt(namespace)
        .await
        .map_err(|e| e.to_string())?;
    let uid = match found {
        Some(found) => match (found.uid(), recorded_uid) {
            (Some(uid), Some(recorded)) if uid == recorded => uid,
            _ => return Err(not_ours()),
        },
        // Created, not applied: a namespace someone makes meanwhile is refused, not taken over.
        None => {
            let new: Namespace = serde_json::from_value(json!({
                "metadata": {"name": namespace, "labels": labels},
            }))
            .map_err(|e| e.to_string())?;
            match namespaces.create(&Default::default(), &new).await {
                Ok(made) => made.uid().unwrap_or_default(),
                Err(kube::Error::Api(e)) if e.code == 409 => return Err(not_ours()),
                Err(e) => return Err(format!("cannot make namespace {namespace}: {e}")),
            }
        }
    };
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let spec = work.spec;
    let defaults = &spec.container_defaults;
    let confinement = [
        (
            "v1",
            "ResourceQuota",
            "resourcequotas",
            json!({"hard": spec.quota}),
        ),
        (
            "v1",
            "LimitRange",
            "limitranges",
            json!({"limits": [{
                "type": "Container",
                "defaultRequest": {"cpu": defaults.request_cpu, "memory": defaults.request_memory},
                "default": {"cpu": defaults.limit_cpu, "memory": defaults.limit_memory},
            }]}),
        ),
        (
            "networking.k8s.io/v1",
            "NetworkPolicy",
            "networkpolicies",
            // Pods of the preview reach each other and DNS; nothing else in or out.
            json!({
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {}}]}],
                "egress": [
                    {"to": [{"podSelector": {}}]},
                    {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                ],
            }),
        ),
    ];
    for (api_version, kind, plural, body) in confinement {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let resource = kube::discovery::ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &resource);
        api.patch(
            "kommit-preview",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": api_version, "kind": kind,
                "metadata": {"name": "kommit-preview", "namespace": namespace, "labels": labels},
                "spec": body,
            })),
        )
        .await
        .map_err(|e| format!("cannot write the {kind} of namespace {namespace}: {e}"))?;
    }
    // The GitSync's ServiceAccount gets its rights here, and only here.
    if let Some(identity) = work.cluster.acting_as()
        && let Some((sa_namespace, sa_name)) = identity.service_account_parts()
    {
        let resource = kube::discovery::ApiResource {
            group: "rbac.authorization.k8s.io".into(),
            version: "v1".into(),
            api_version: "rbac.authorization.k8s.io/v1".into(),
            kind: "RoleBinding".into(),
            plural: "rolebindings".into(),
        };
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &resource);
        api.patch(
            "kommit-preview",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "kommit-preview", "namespace": namespace, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": spec.preview_role},
                "subjects": [{"kind": "ServiceAccount", "namespace": sa_namespace, "name": sa_name}],
            })),
        )
        .await
        .map_err(|e| {
            format!(
                "cannot bind ServiceAccount {sa_namespace}/{sa_name} to ClusterRole {} in \
                 namespace {namespace} (the operator needs the `bind` verb on that role): {e}",
                spec.preview_role
            )
        })?;
    }
    Ok(uid)
}

/// Deletes a preview namespace kommit made.
async fn delete_preview(
    work: &Work<'_>,
    namespace: &str,
    uid: &str,
) -> Result<(), PullRequestError> {
    delete_preview_namespace(work.context, namespace, uid)
        .await
        .map_err(PullRequestError::Previews)
}

/// Deletes `namespace` only if it is still the one of `uid` kommit made (a uid precondition):
/// one made since under the same name is left alone.
async fn delete_preview_namespace(
    context: &Context,
    namespace: &str,
    uid: &str,
) -> Result<(), String> {
    context
        .cluster
        .check_fence(&format!("Namespace {namespace}"))
        .map_err(|e| e.to_string())?;
    let api: Api<Namespace> = Api::all(context.cluster.client().clone());
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(namespace, &params).await {
        Ok(_) => Ok(()),
        // Gone already, or another namespace of that name now: nothing of kommit's to delete.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(format!("cannot delete preview namespace {namespace}: {e}")),
    }
}

/// Removes every preview `status` records (the GitSync is being deleted, or no longer has
/// previews); returns how many were asked to go.
pub async fn remove_all_previews(
    context: &Context,
    status: &GitSyncStatus,
) -> Result<usize, String> {
    let mut removed = 0;
    for pr in &status.pull_requests {
        if let (Some(namespace), Some(uid)) = (&pr.namespace, &pr.namespace_uid) {
            delete_preview_namespace(context, namespace, uid).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Adds or removes the previews finalizer so that the GitSync has it exactly while it may
/// have previews. Returns whether it changed anything.
pub async fn keep_finalizer(
    context: &Context,
    gitsync: &GitSync,
    wanted: bool,
) -> Result<bool, String> {
    let has = gitsync.finalizers().iter().any(|f| f == PREVIEWS_FINALIZER);
    if has == wanted {
        return Ok(false);
    }
    context
        .cluster
        .check_fence("the GitSync's finalizers")
        .map_err(|e| e.to_string())?;
    let mut finalizers: Vec<String> = gitsync
        .finalizers()
        .iter()
        .filter(|f| *f != PREVIEWS_FINALIZER)
        .cloned()
        .collect();
    if wanted {
        finalizers.push(PREVIEWS_FINALIZER.to_string());
    }
    let api: Api<GitSync> = Api::namespaced(
        context.cluster.client().clone(),
        &gitsync.namespace().unwrap_or_default(),
    );
    // Guarded by the resourceVersion: another writer's finalizer is never lost.
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": gitsync.meta().resource_version,
    }});
    api.patch(
        &gitsync.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|e| format!("cannot update the finalizers of the GitSync: {e}"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> PullRequestsSpec {
        let mut base = json!({"provider": "gitea"});
        if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
        serde_json::from_value(base).unwrap()
    }

    fn pr(labels: &[&str], from_fork: bool, head: &str) -> PullRequest {
        PullRequest {
            number: 7,
            title: "t".into(),
            author: "someone".into(),
            head_sha: head.into(),
            head_ref: "feature".into(),
            head_repo: Some(if from_fork { "fork/app" } else { "org/app" }.into()),
            base_ref: "main".into(),
            base_repo: "org/app".into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            from_fork,
            state: PullState::Open,
        }
    }

    #[test]
    fn the_defaults_are_those_of_the_docs() {
        let spec = spec(json!({}));
        assert!(spec.comment && !spec.previews && !spec.allow_forks);
        assert_eq!(spec.approval_label, "kommit/preview");
        assert_eq!(spec.ttl, "72h");
        assert_eq!(spec.max_previews, 10);
        assert_eq!(spec.quota.get("pods").map(String::as_str), Some("20"));
        assert_eq!(spec.preview_role, "edit");
    }

    #[test]
    fn labels_filter_and_forks_need_an_approval_for_their_head() {
        let plain = spec(json!({}));
        assert_eq!(
            eligibility(&plain, &pr(&[], false, "a"), None),
            Eligibility::Eligible
        );
        assert_eq!(
            eligibility(&plain, &pr(&[], true, "a"), None),
            Eligibility::ForksNotAllowed
        );
        let labelled = spec(json!({"labels": ["preview"]}));
        assert_eq!(
            eligibility(&labelled, &pr(&[], false, "a"), None),
            Eligibility::Unlabelled
        );
        assert_eq!(
            eligibility(&labelled, &pr(&["preview"], false, "a"), None),
            Eligibility::Eligible
        );
        let forks = spec(json!({"allowForks": true}));
        assert_eq!(
            eligibility(&forks, &pr(&[], true, "a"), None),
            Eligibility::AwaitingApproval
        );
        assert_eq!(
            eligibility(&forks, &pr(&["kommit/preview"], true, "a"), None),
            Eligibility::Eligible
        );
        assert_eq!(
            eligibility(&forks, &pr(&["kommit/preview"], true, "a"), Some("a")),
            Eligibility::Eligible
        );
        assert_eq!(
            eligibility(&forks, &pr(&["kommit/preview"], true, "b"), Some("a")),
            Eligibility::ApprovalOutdated,
            "a push after the approval needs a new one"
        );
    }

    #[test]
    fn previews_go_to_the_oldest_pull_requests_and_expire_without_pushes() {
        let ttl = Duration::from_secs(3600);
        let mut slots = 1;
        let first = pr(&[], false, "a");
        assert_eq!(
            preview_plan(true, None, &first, ttl, &mut slots),
            PreviewPlan::Deploy
        );
        assert_eq!(
            preview_plan(true, None, &first, ttl, &mut slots),
            PreviewPlan::OverLimit
        );
        assert_eq!(
            preview_plan(false, None, &first, ttl, &mut 5),
            PreviewPlan::Off
        );
        let long_ago = PullRequestStatus {
            head_sha: "a".into(),
            last_push: "2020-01-01T00:00:00Z".into(),
            ..Default::default()
        };
        let mut slots = 1;
        assert_eq!(
            preview_plan(true, Some(&long_ago), &first, ttl, &mut slots),
            PreviewPlan::Expired
        );
        assert_eq!(slots, 1, "an expired preview frees its slot");
        let pushed = pr(&[], false, "b");
        assert_eq!(
            preview_plan(true, Some(&long_ago), &pushed, ttl, &mut slots),
            PreviewPlan::Deploy,
            "a push brings an expired preview back"
        );
        let recent = PullRequestStatus {
            last_push: now_rfc3339(),
            ..long_ago
        };
        assert_eq!(
            preview_plan(true, Some(&recent), &first, ttl, &mut 1),
            PreviewPlan::Deploy
        );
    }

    #[test]
    fn preview_namespaces_are_named_after_the_gitsync_and_stay_valid() {
        assert_eq!(preview_namespace("team", "shop", 12), "shop-pr-12");
        let long = "a".repeat(60);
        let name = preview_namespace("team", &long, 12345);
        assert!(name.len() <= 63, "{name}");
        assert!(name.ends_with("-pr-12345"), "{name}");
        assert_ne!(
            name,
            preview_namespace("other", &long, 12345),
            "two GitSyncs of the same long name in two namespaces get two previews"
        );
        assert!(preview_inventory(&"gs.x".repeat(20), 3).len() <= 63);
    }
}
