//! Leader election on a coordination Lease, so that several operator replicas are safe: only the
//! holder reconciles; the others check the lease every few seconds and take it over when it is
//! released or goes unrenewed for its duration.
//!
//! The rules are client-go's: expiry is judged by when this replica last saw the lease change
//! (not by the holder's clock), writes are guarded by the resourceVersion, and a leader that
//! could not renew for two thirds of the duration stops before anyone may take over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

use crate::cluster::Fence;
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

impl LeaseSettings {
    /// How often a standby looks at the lease and a leader renews it.
    fn retry_period(&self) -> Duration {
        (self.duration / 4).min(Duration::from_secs(2))
    }

    /// A leader that could not renew for this long stops, before the lease can expire.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
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

/// This replica's part in the election, running in the background.
pub struct Campaign {
    elector: Elector,
    state: watch::Receiver<Leadership>,
    task: JoinHandle<()>,
}

/// A replica's identity: its pod name (or host name, as the caller read them) and a suffix that
/// tells restarts apart.
pub fn identity_for(host: Option<String>) -> String {
    let host = host
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
    /// Makes a first attempt at the lease (so that missing permissions are an error at once),
    /// then keeps competing for it in the background.
    /// `fence` is opened while this replica holds the lease, never past the time another
    /// could take it over, and closed when it loses it.
    pub async fn start(
        client: kube::Client,
        settings: LeaseSettings,
        fence: Fence,
    ) -> Result<Self, LeaderError> {
        let mut elector = Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        };
        let asked = Instant::now();
        let first = elector
            .try_acquire_or_renew()
            .await
            .map_err(|e| elector.error(e))?;
        let initial = if first {
            fence.open_until(asked + elector.settings.renew_deadline());
            Leadership::Leader
        } else {
            Leadership::Standby
        };
        let (sender, state) = watch::channel(initial);
        let task = tokio::spawn(keep_campaigning(elector.clone(), sender, fence));
        Ok(Campaign {
            elector,
            state,
            task,
        })
    }

    /// A receiver of leadership changes.
    pub fn watch(&self) -> watch::Receiver<Leadership> {
        self.state.clone()
    }

    /// Stops renewing and frees the lease so that a standby takes over at its next look.
    pub async fn release(self) {
        self.task.abort();
        let _ = self.task.await;
        if let Err(e) = self.elector.release().await {
            tracing::warn!(error = %e, lease = %self.elector.settings.name, "could not release the lease; it expires by itself");
        }
    }
}

async fn keep_campaigning(mut elector: Elector, sender: watch::Sender<Leadership>, fence: Fence) {
    let retry = elector.settings.retry_period();
    let deadline = elector.settings.renew_deadline();
    let mut last_renewal = (*sender.borrow() == Leadership::Leader).then(Instant::now);
    let lose = |sender: &watch::Sender<Leadership>| {
        fence.close();
        sender.send_replace(Leadership::Lost);
    };
    loop {
        tokio::time::sleep(retry).await;
        let leading = *sender.borrow() == Leadership::Leader;
        let asked = Instant::now();
        // A renewal may take only the time left before the deadline: a hung API server must
        // not keep this replica waiting past the point another may take over.
        let budget = match last_renewal {
            Some(at) if leading => deadline.saturating_sub(at.elapsed()).max(retry),
            _ => deadline,
        };
        let attempt = match tokio::time::timeout(budget, elector.try_acquire_or_renew()).await {
            Ok(attempt) => attempt,
            Err(_) => Err(kube::Error::Service(
                format!("no answer within {}s", budget.as_secs()).into(),
            )),
        };
        match attempt {
            Ok(true) => {
                if !leading {
                    tracing::info!(identity = %elector.settings.identity, "became the leader");
                    sender.send_replace(Leadership::Leader);
                }
                // Counted from before the request: the lease was renewed no earlier than that.
                fence.open_until(asked + deadline);
                last_renewal = Some(asked);
            }
            Ok(false) if leading => {
                tracing::error!("another replica holds the leader lease now");
                lose(&sender);
                return;
            }
            Ok(false) => {}
            Err(e) => {
                // A leader that cannot renew may be replaced once the lease expires: it stops
                // before that, rather than risk two writers.
                if leading && last_renewal.is_none_or(|at| at.elapsed() >= deadline) {
                    tracing::error!(error = %e, "cannot renew the leader lease");
                    lose(&sender);
                    return;
                }
                tracing::warn!(error = %e, "cannot reach the leader lease; retrying");
            }
        }
    }
}

/// The lease as this replica last saw it, and when it first saw it so.
#[derive(Clone, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    duration: Duration,
    since: Instant,
}

#[derive(Clone)]
struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observed>,
}

impl Elector {
    fn error(&self, error: kube::Error) -> LeaderError {
        LeaderError {
            namespace: self.settings.namespace.clone(),
            name: self.settings.name.clone(),
            message: error.to_string(),
        }
    }

    fn now() -> MicroTime {
        MicroTime(Timestamp::now())
    }

    fn our_spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let ours = previous
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| h == self.settings.identity);
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(self.settings.duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                previous.and_then(|s| s.acquire_time.clone())
            } else {
                Some(Self::now())
            },
            renew_time: Some(Self::now()),
            lease_transitions: Some(if ours || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// One look at the lease: takes it when free or expired, renews it when ours. Returns
    /// whether this replica holds it afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let name = &self.settings.name;
        let Some(mut lease) = self.api.get_opt(name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.our_spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let seen = Observed {
            holder: holder.clone(),
            renew_time: spec.renew_time.clone(),
            duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
            since: Instant::now(),
        };
        let changed = self.observed.as_ref().is_none_or(|o| {
            (&o.holder, &o.renew_time, o.duration)
                != (&seen.holder, &seen.renew_time, seen.duration)
        });
        if changed {
            self.observed = Some(seen);
        }
        let observed = self.observed.as_ref().expect("set above");
        let ours = holder.as_deref() == Some(self.settings.identity.as_str());
        let expired = observed.since.elapsed() > observed.duration;
        if holder.is_some() && !ours && !expired {
            return Ok(false);
        }
        lease.spec = Some(self.our_spec(Some(&spec)));
        // The resourceVersion we read guards the write: of two replicas, one wins.
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Frees the lease if this replica holds it.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(Self::now());
        self.api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_gives_up_before_its_lease_can_expire_and_standbys_look_often() {
        let settings = LeaseSettings {
            namespace: "kommit".into(),
            name: "kommit-operator".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        assert!(settings.renew_deadline() < settings.duration);
        assert!(settings.retry_period() < settings.renew_deadline());
        assert_eq!(settings.retry_period(), Duration::from_secs(2));
        let short = LeaseSettings {
            duration: Duration::from_secs(4),
            ..settings
        };
        assert_eq!(short.retry_period(), Duration::from_secs(1));
        assert!(short.retry_period() < short.renew_deadline());
    }
}
