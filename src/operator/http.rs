//! The operator's HTTP server: probes, Prometheus metrics and the push webhook receiver.
//!
//! A webhook does not sync by itself: it stamps the matching GitSyncs with a request annotation
//! (as `kubectl annotate` could), and the leader's controller, which watches GitSyncs, reconciles
//! them at once. So any replica may receive webhooks, leader or not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use super::GitSync;
use super::metrics::{self, Metrics};
use super::webhook::{self, Event};

/// Set on a GitSync to ask for a reconcile now; the value should change with every request.
pub const REQUESTED_AT_ANNOTATION: &str = "kommit.dev/reconcile-requested-at";

/// The largest webhook body read. A push payload is a few KiB per commit; GitHub caps them at
/// 25 MB, but a push that large is better caught by the interval than held in memory.
pub const WEBHOOK_BODY_LIMIT: usize = 4 * 1024 * 1024;
/// How long a webhook's body may take to arrive.
pub const WEBHOOK_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Webhooks handled at once; more are answered 503 at once, and probes are never queued
/// behind them.
pub const WEBHOOK_CONCURRENCY: usize = 16;

pub struct ServerState {
    pub metrics: Arc<Metrics>,
    /// False until the operator is up, and again once it shuts down.
    pub ready: Arc<AtomicBool>,
    pub webhook_secret: Option<Vec<u8>>,
    /// When the runtime last ran the heartbeat task: a wedged runtime fails `/healthz`, so the
    /// kubelet restarts the pod.
    pub heartbeat: Arc<std::sync::Mutex<std::time::Instant>>,
    /// One permit per webhook in flight (see [`WEBHOOK_CONCURRENCY`]).
    pub webhook_slots: tokio::sync::Semaphore,
    pub client: kube::Client,
    pub watch_namespace: Option<String>,
}

pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .route("/webhook", post(receive_webhook))
        .with_state(state)
}

/// How long the heartbeat may be late before the process counts as wedged.
pub const WEDGED_AFTER: Duration = Duration::from_secs(15);

async fn healthz(State(state): State<Arc<ServerState>>) -> Response {
    let late = state
        .heartbeat
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .elapsed();
    if late > WEDGED_AFTER {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "wedged: the async runtime has not run its heartbeat for {}s\n",
                late.as_secs()
            ),
        )
            .into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

async fn readyz(State(state): State<Arc<ServerState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics_page(State(state): State<Arc<ServerState>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

fn too_large() -> Response {
    reply(
        StatusCode::PAYLOAD_TOO_LARGE,
        json!({"error": format!(
            "the body is larger than {} MiB; kommit reads no more (the next interval syncs anyway)",
            WEBHOOK_BODY_LIMIT / (1024 * 1024)
        )}),
    )
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn receive_webhook(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(_slot) = state.webhook_slots.try_acquire() else {
        state.metrics.webhook("unknown", "busy");
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "too many webhooks at once; the next interval syncs anyway"}),
        );
    };
    let provider = match webhook::provider_of(&headers) {
        Ok(provider) => provider,
        Err(e) => {
            state.metrics.webhook("unknown", "invalid");
            return reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}));
        }
    };
    let name = provider.as_str();
    // Refused before a byte of the body is read: no secret here, or no signature there.
    if let Err(e @ (webhook::WebhookError::NoSecret | webhook::WebhookError::Unsigned { .. })) =
        webhook::verify(provider, &headers, &[], state.webhook_secret.as_deref())
    {
        state.metrics.webhook(name, "unauthorized");
        return reply(StatusCode::UNAUTHORIZED, json!({"error": e.to_string()}));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > WEBHOOK_BODY_LIMIT) {
        state.metrics.webhook(name, "invalid");
        return too_large();
    }
    let body = match tokio::time::timeout(
        WEBHOOK_READ_TIMEOUT,
        axum::body::to_bytes(body, WEBHOOK_BODY_LIMIT),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            state.metrics.webhook(name, "invalid");
            return too_large();
        }
        Err(_) => {
            state.metrics.webhook(name, "invalid");
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                json!({"error": format!(
                    "the body did not arrive within {}s", WEBHOOK_READ_TIMEOUT.as_secs()
                )}),
            );
        }
    };
    if let Err(e) = webhook::verify(provider, &headers, &body, state.webhook_secret.as_deref()) {
        tracing::warn!(provider = name, error = %e, "refused a webhook");
        state.metrics.webhook(name, "unauthorized");
        return reply(StatusCode::UNAUTHORIZED, json!({"error": e.to_string()}));
    }
    let (urls, git_ref, pull_request) = match webhook::parse_event(provider, &headers, &body) {
        Ok(Event::Push { urls, git_ref }) => (urls, git_ref, false),
        Ok(Event::PullRequest { urls, base }) => (urls, format!("refs/heads/{base}"), true),
        Ok(Event::Ignored(kind)) => {
            state.metrics.webhook(name, "ignored");
            return reply(
                StatusCode::OK,
                json!({"ignored": format!("{kind} events ask for no sync")}),
            );
        }
        Err(e) => {
            state.metrics.webhook(name, "invalid");
            return reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}));
        }
    };
    let _span = tracing::info_span!("webhook", provider = name, repo = %crate::source::redact_url(&urls[0]), git_ref = %git_ref);
    match request_reconciles(&state, &urls, &git_ref, pull_request).await {
        Ok(triggered) if triggered.is_empty() => {
            state.metrics.webhook(name, "ignored");
            reply(
                StatusCode::OK,
                json!({"triggered": [], "message": format!("no GitSync follows {} at {git_ref}", urls[0])}),
            )
        }
        Ok(triggered) => {
            tracing::info!(gitsyncs = ?triggered, "webhook requested reconciles");
            state.metrics.webhook(name, "triggered");
            reply(StatusCode::ACCEPTED, json!({"triggered": triggered}))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot request reconciles");
            state.metrics.webhook(name, "error");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": format!("cannot reach the GitSyncs: {e}")}),
            )
        }
    }
}

/// Stamps every GitSync that follows the pushed ref (for a pull-request event: that follows
/// pull requests against it); returns their `namespace/name`.
async fn request_reconciles(
    state: &ServerState,
    urls: &[String],
    git_ref: &str,
    pull_request: bool,
) -> Result<Vec<String>, kube::Error> {
    let all: Api<GitSync> = match &state.watch_namespace {
        Some(ns) => Api::namespaced(state.client.clone(), ns),
        None => Api::all(state.client.clone()),
    };
    let gitsyncs = all.list(&ListParams::default()).await?;
    let requested_at = request_stamp();
    let mut triggered = Vec::new();
    for gitsync in gitsyncs {
        let spec = &gitsync.spec;
        if pull_request && spec.pull_requests.is_none() {
            continue;
        }
        if !webhook::push_concerns(
            urls,
            git_ref,
            &spec.repo,
            spec.branch.as_deref(),
            spec.rev.as_deref(),
        ) {
            continue;
        }
        let namespace = gitsync.namespace().unwrap_or_default();
        let api: Api<GitSync> = Api::namespaced(state.client.clone(), &namespace);
        let patch = json!({"metadata": {"annotations": {REQUESTED_AT_ANNOTATION: requested_at}}});
        api.patch(
            &gitsync.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        triggered.push(format!("{namespace}/{}", gitsync.name_any()));
    }
    Ok(triggered)
}

/// An RFC 3339 time with nanoseconds, so two pushes in one second are two requests.
fn request_stamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = crate::source::format_rfc3339(now.as_secs() as i64);
    format!(
        "{}.{:09}Z",
        seconds.trim_end_matches('Z'),
        now.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_stamps_are_rfc3339_with_nanoseconds() {
        let stamp = request_stamp();
        assert_eq!(
            stamp.len(),
            "2026-11-25T10:00:00.123456789Z".len(),
            "{stamp}"
        );
        assert!(stamp.ends_with('Z') && stamp.contains('T') && stamp.contains('.'));
    }
}
