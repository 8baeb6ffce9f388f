//! `kommit operator` from start to stop: the HTTP server, the leader election, the controller, and
//! a graceful shutdown that frees the lease so that a standby replica takes over at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::controller;
use super::http::{self, ServerState};
use super::leader::{Campaign, LeaderError, Leadership, LeaseSettings};
use super::metrics::Metrics;
use crate::cluster::{Cluster, Fence};
use crate::source::AmbientCredentials;

/// How long a stopping operator lets the reconciles in flight finish. A cut one is safe: the
/// next leader sees the applied commit and waits for its rollout without applying it again.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

pub struct OperatorOptions {
    pub watch_namespace: Option<String>,
    /// Bound by the caller, so that it can say where it listens before anything else happens.
    pub listener: TcpListener,
    /// None: this is the only replica and reconciles without a lease.
    pub lease: Option<LeaseSettings>,
    pub webhook_secret: Option<Vec<u8>>,
    pub cache_dir: PathBuf,
    /// The operator's own git credentials (lent to GitSyncs only as `tenancy` says).
    pub ambient: AmbientCredentials,
    /// What GitSyncs may borrow from the operator.
    pub tenancy: controller::Tenancy,
    /// How many GitSyncs are reconciled at once.
    pub concurrency: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error(
        "lost the leader lease {namespace}/{name}: stopping so that only one replica reconciles (a restarted operator rejoins as a standby)"
    )]
    LostLeadership { namespace: String, name: String },
    #[error("the HTTP server failed: {0}")]
    Server(std::io::Error),
}

/// Runs until SIGTERM or SIGINT (or until leadership is lost, which is an error).
pub async fn run(cluster: Cluster, options: OperatorOptions) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_sender, stop) = watch::channel(false);
    let stop_sender = Arc::new(stop_sender);
    let on_signal = stop_sender.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        on_signal.send_replace(true);
    });

    let heartbeat = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
    let beat = heartbeat.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            *beat.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        }
    });
    let state = Arc::new(ServerState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        webhook_secret: options.webhook_secret,
        webhook_slots: tokio::sync::Semaphore::new(http::WEBHOOK_CONCURRENCY),
        heartbeat: heartbeat.clone(),
        client: cluster.client().clone(),
        watch_namespace: options.watch_namespace.clone(),
    });
    let server = axum::serve(options.listener, http::router(state))
        .with_graceful_shutdown(stopped(stop.clone()));
    let server = tokio::spawn(async move { server.await });
    ready.store(true, Ordering::Relaxed);

    // With a lease, every write of a sync goes out only while this replica surely holds it.
    let fence = options.lease.as_ref().map(|_| Fence::closed());
    let cluster = match &fence {
        Some(fence) => cluster.fenced(fence.clone()),
        None => cluster,
    };
    let context = Arc::new(controller::Context {
        cluster,
        cache_dir: options.cache_dir,
        ambient: options.ambient,
        tenancy: options.tenancy,
        concurrency: options.concurrency,
        metrics: metrics.clone(),
        forges: Default::default(),
    });
    let outcome = match options.lease {
        None => {
            metrics.set_leader(true);
            reconcile_until(context, options.watch_namespace, stop.clone(), None).await;
            Ok(())
        }
        Some(settings) => {
            lead(
                context,
                options.watch_namespace,
                settings,
                fence.unwrap_or_else(Fence::closed),
                stop.clone(),
                &metrics,
            )
            .await
        }
    };
    metrics.set_leader(false);
    ready.store(false, Ordering::Relaxed);
    // After a lost lease there was no signal: stop the server too.
    stop_sender.send_replace(true);
    match server.await {
        Ok(Err(e)) => outcome.and(Err(RunError::Server(e))),
        _ => outcome,
    }
}

async fn lead(
    context: Arc<controller::Context>,
    watch_namespace: Option<String>,
    settings: LeaseSettings,
    fence: Fence,
    stop: watch::Receiver<bool>,
    metrics: &Metrics,
) -> Result<(), RunError> {
    let campaign =
        Campaign::start(context.cluster.client().clone(), settings.clone(), fence).await?;
    tracing::info!(lease = %settings.name, namespace = %settings.namespace, identity = %settings.identity, "waiting to become the leader");
    let mut leadership = campaign.watch();
    tokio::select! {
        _ = leadership.wait_for(|l| *l == Leadership::Leader) => {}
        _ = stopped(stop.clone()) => {
            campaign.release().await;
            return Ok(());
        }
    }
    metrics.set_leader(true);
    let lost = {
        let mut leadership = leadership.clone();
        async move {
            let _ = leadership.wait_for(|l| *l == Leadership::Lost).await;
        }
    };
    reconcile_until(context, watch_namespace, stop, Some(Box::pin(lost))).await;
    metrics.set_leader(false);
    if *leadership.borrow() == Leadership::Lost {
        return Err(RunError::LostLeadership {
            namespace: settings.namespace,
            name: settings.name,
        });
    }
    campaign.release().await;
    Ok(())
}

type Abort = std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// Runs the controller until `stop` (finishing what is in flight, within SHUTDOWN_GRACE) or
/// `abort` (at once: another replica may already be reconciling).
async fn reconcile_until(
    context: Arc<controller::Context>,
    watch_namespace: Option<String>,
    stop: watch::Receiver<bool>,
    abort: Option<Abort>,
) {
    let controller = controller::run(context, watch_namespace.as_deref(), stopped(stop.clone()));
    let abort = async move {
        match abort {
            Some(abort) => abort.await,
            None => std::future::pending().await,
        }
    };
    let grace_expired = async {
        stopped(stop).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!("stopping with reconciles still in flight; the next leader resumes them");
    };
    tokio::select! {
        _ = controller => {}
        _ = abort => {}
        _ = grace_expired => {}
    }
}

/// Resolves once the stop flag is raised.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
