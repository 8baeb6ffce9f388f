//! The operator's Prometheus metrics, every one prefixed `kommit_`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct GitSyncLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub namespace: String,
    pub name: String,
    /// success or failure
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub provider: String,
    /// triggered, ignored, unauthorized or invalid
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForgeLabels {
    /// list, get, comment, status or label
    pub operation: String,
    /// ok or error
    pub result: String,
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<GitSyncLabels, Histogram>,
    rollbacks: Family<GitSyncLabels, Counter>,
    webhooks: Family<WebhookLabels, Counter>,
    forge_calls: Family<ForgeLabels, Counter>,
    leader: Gauge,
    synced_commits: Arc<SyncedCommits>,
}

/// When each GitSync's last synced commit was made; its age is computed at each scrape.
#[derive(Debug, Default)]
struct SyncedCommits(Mutex<BTreeMap<GitSyncLabels, i64>>);

impl Collector for SyncedCommits {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let commits = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if commits.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut family = encoder.encode_descriptor(
            "last_synced_commit_age_seconds",
            "Seconds since the commit a GitSync last synced was made",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (labels, commit_time) in &commits {
            let gauge = ConstGauge::new((now - commit_time).max(0));
            gauge.encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kommit");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "GitSync reconciles by outcome",
            reconciles.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Failed GitSync reconciles by reason",
            failures.clone(),
        );
        let duration = Family::<GitSyncLabels, Histogram>::new_with_constructor(|| {
            // From a no-op check (well under a second) to a rollout waited for minutes.
            Histogram::new([
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ])
        });
        registry.register(
            "reconcile_duration_seconds",
            "How long a GitSync reconcile took, waiting for the rollout included",
            duration.clone(),
        );
        let rollbacks = Family::<GitSyncLabels, Counter>::default();
        registry.register(
            "rollbacks",
            "Failed rollouts rolled back to the last healthy commit",
            rollbacks.clone(),
        );
        let webhooks = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhooks",
            "Webhook deliveries by provider and result",
            webhooks.clone(),
        );
        let forge_calls = Family::<ForgeLabels, Counter>::default();
        registry.register(
            "forge_calls",
            "Pull-request work on the forge (list, get, comment, status, label) by result",
            forge_calls.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and reconciles, else 0",
            leader.clone(),
        );
        let synced_commits = Arc::new(SyncedCommits::default());
        registry.register_collector(Box::new(synced_commits.clone()));
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            rollbacks,
            webhooks,
            forge_calls,
            leader,
            synced_commits,
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    pub fn reconciled(
        &self,
        gitsync: &GitSyncLabels,
        took: Duration,
        failure_reason: Option<&str>,
    ) {
        let result = if failure_reason.is_some() {
            "failure"
        } else {
            "success"
        };
        self.reconciles
            .get_or_create(&ResultLabels {
                namespace: gitsync.namespace.clone(),
                name: gitsync.name.clone(),
                result: result.into(),
            })
            .inc();
        if let Some(reason) = failure_reason {
            self.failures
                .get_or_create(&FailureLabels {
                    namespace: gitsync.namespace.clone(),
                    name: gitsync.name.clone(),
                    reason: reason.into(),
                })
                .inc();
        }
        self.duration
            .get_or_create(gitsync)
            .observe(took.as_secs_f64());
    }

    /// One piece of pull-request work on the forge and whether it succeeded.
    pub fn forge_call(&self, operation: &str, ok: bool) {
        self.forge_calls
            .get_or_create(&ForgeLabels {
                operation: operation.into(),
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }

    pub fn rolled_back(&self, gitsync: &GitSyncLabels) {
        self.rollbacks.get_or_create(gitsync).inc();
    }

    /// The commit a GitSync is now on, by its commit time (seconds since the epoch).
    pub fn synced_commit(&self, gitsync: &GitSyncLabels, commit_time: i64) {
        self.synced_commits
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(gitsync.clone(), commit_time);
    }

    /// Keeps the commit ages of the GitSyncs that still exist.
    pub fn retain_synced(&self, exists: impl Fn(&GitSyncLabels) -> bool) {
        self.synced_commits
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|labels, _| exists(labels));
    }

    pub fn webhook(&self, provider: &str, result: &str) {
        self.webhooks
            .get_or_create(&WebhookLabels {
                provider: provider.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_prefixed_and_rendered_in_prometheus_text() {
        let metrics = Metrics::new();
        let shop = GitSyncLabels {
            namespace: "team".into(),
            name: "shop".into(),
        };
        metrics.reconciled(&shop, Duration::from_millis(300), None);
        metrics.reconciled(&shop, Duration::from_secs(40), Some("RolloutFailed"));
        metrics.rolled_back(&shop);
        metrics.webhook("github", "triggered");
        metrics.set_leader(true);
        let an_hour_ago = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - 3600;
        metrics.synced_commit(&shop, an_hour_ago);
        let text = metrics.render();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("kommit_"), "unprefixed metric: {line}");
        }
        for expected in [
            r#"kommit_reconciles_total{namespace="team",name="shop",result="success"} 1"#,
            r#"kommit_reconcile_failures_total{namespace="team",name="shop",reason="RolloutFailed"} 1"#,
            r#"kommit_reconcile_duration_seconds_count{namespace="team",name="shop"} 2"#,
            r#"kommit_rollbacks_total{namespace="team",name="shop"} 1"#,
            r#"kommit_webhooks_total{provider="github",result="triggered"} 1"#,
            "kommit_leader 1",
        ] {
            assert!(text.contains(expected), "missing {expected} in:\n{text}");
        }
        let age_line = text
            .lines()
            .find(|l| l.starts_with("kommit_last_synced_commit_age_seconds{"))
            .expect("commit age");
        let age: i64 = age_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((3600..3700).contains(&age), "{age_line}");
        metrics.retain_synced(|labels| labels.name != "shop");
        assert!(!metrics.render().contains("last_synced_commit_age"));
    }
}
