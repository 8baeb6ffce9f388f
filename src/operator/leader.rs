//! Leader election on a coordination Lease, so that several operator replicas are safe: only the
//! holder reconciles; the others wait and take over when its lease expires or is released.

use std::sync::Arc;
use std::time::Duration;

use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// Unique per replica: the pod name plus a random suffix.
    pub identity: String,
    /// How long a lease lasts without renewal: the longest a dead leader blocks a takeover.
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    Standby,
    Leader,
    /// This replica held the lease and can no longer be sure it does; it must stop reconciling.
    Lost,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot use the leader election Lease {namespace}/{name}: {message} (the operator needs get, create and update on leases.coordination.k8s.io there; or run a single replica with --no-leader-election)"
)]
pub struct LeaderError {
    namespace: String,
    name: String,
    message: String,
}

pub struct Campaign {
    manager: Arc<LeaseManager>,
    state: watch::Receiver<Leadership>,
    task: JoinHandle<()>,
    settings: LeaseSettings,
}

/// A replica's identity: its pod name (or host name) and a suffix that tells restarts apart.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "kommit".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}-{:06x}", (nanos ^ std::process::id()) & 0xff_ffff)
}

impl Campaign {
    /// Starts competing for the lease (creating it if needed) in the background.
    pub async fn start(client: kube::Client, settings: LeaseSettings) -> Result<Self, LeaderError> {
        let duration = settings.duration.as_secs().max(2);
        // Renew with a third of the lease left, like client-go's renew deadline.
        let grace = (duration / 3).max(1);
        let params = LeaseParams::new(settings.identity.clone(), duration, grace);
        let manager = LeaseManager::new(
            client,
            settings.name.clone(),
            settings.namespace.clone(),
            params,
            LeaseCreateMode::AutoCreate,
        )
        .await
        .map_err(|e| LeaderError {
            namespace: settings.namespace.clone(),
            name: settings.name.clone(),
            message: e.to_string(),
        })?;
        let manager = Arc::new(manager);
        let (sender, state) = watch::channel(Leadership::Standby);
        let task = tokio::spawn(keep_campaigning(manager.clone(), sender));
        Ok(Campaign {
            manager,
            state,
            task,
            settings,
        })
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// A receiver of leadership changes.
    pub fn watch(&self) -> watch::Receiver<Leadership> {
        self.state.clone()
    }

    /// Stops renewing and frees the lease so that another replica takes over at once.
    pub async fn release(self) {
        self.task.abort();
        let _ = self.task.await;
        if let Err(e) = self.manager.release().await {
            tracing::warn!(error = %e, lease = %self.settings.name, "could not release the lease; it expires by itself");
        }
    }
}

async fn keep_campaigning(manager: Arc<LeaseManager>, sender: watch::Sender<Leadership>) {
    loop {
        match manager.changed().await {
            Ok(true) => {
                tracing::info!("became the leader");
                sender.send_replace(Leadership::Leader);
            }
            Ok(false) => {
                let was_leader = *sender.borrow() == Leadership::Leader;
                sender.send_replace(if was_leader {
                    Leadership::Lost
                } else {
                    Leadership::Standby
                });
                if was_leader {
                    return;
                }
            }
            Err(e) => {
                // A leader that cannot renew may already have been replaced: it stops, as
                // client-go's leader election does, rather than risk two writers.
                if *sender.borrow() == Leadership::Leader {
                    tracing::error!(error = %e, "cannot renew the leader lease");
                    sender.send_replace(Leadership::Lost);
                    return;
                }
                tracing::warn!(error = %e, "cannot reach the leader lease; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}
