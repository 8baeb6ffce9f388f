//! Command line: parse, call `reconcile`, print. No logic of its own.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use anyhow::Context as _;

use crate::cluster::{Cluster, ConnectOptions};
use crate::duration::parse_duration;
use crate::operator::leader::LeaseSettings;
use crate::plan::{self, Action, Plan};
use crate::reconcile::{self, ObjectHealth, Policy, Target, WaitOptions, WaitOutcome};
use crate::rollout::Health;
use crate::source::{AmbientCredentials, GitCredentials, GitSource, SecretString};

/// Exit codes, like `git diff --exit-code` and `kubectl diff`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const CHANGES: u8 = 1;
    pub const ERROR: u8 = 2;
    /// The commit was applied (or skipped) but its rollout failed; rolled back if asked.
    pub const ROLLOUT_FAILED: u8 = 3;
}

#[derive(Debug, Parser)]
#[command(
    name = "kommit",
    // build.rs names the commit (or "unknown" when built without git).
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("KOMMIT_GIT_COMMIT"), ")"),
    about = "GitOps for Kubernetes: the cluster follows the git commit history",
    long_about = "kommit reads the Kubernetes manifests of a git commit, compares them with the \
                  live cluster without noise, and applies them by server-side apply, so that \
                  every change in the cluster traces back to a commit."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, or the in-cluster service account)
    #[arg(long, global = true, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use (default: its current context)
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// More log output on stderr (-v info, -vv debug); KOMMIT_LOG takes tracing filters
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// When to colour the output
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// How long a git server may take to accept a connection or to send the next bytes
    #[arg(long, global = true, env = "KOMMIT_GIT_TIMEOUT", default_value = "60s",
          value_parser = parse_duration, value_name = "DURATION")]
    pub git_timeout: std::time::Duration,
    /// How long an API request may wait for the server's next bytes
    #[arg(long, global = true, env = "KOMMIT_API_TIMEOUT", default_value = "30s",
          value_parser = parse_duration, value_name = "DURATION")]
    pub api_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a sync would change (exit 0: nothing, 1: changes, 2: error)
    Diff {
        #[command(flatten)]
        source: SourceArgs,
        /// Also show objects that would be pruned (no longer in git)
        #[arg(long)]
        prune: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Pull requests: the report kommit gives on one, from any CI
    Pr {
        #[command(subcommand)]
        command: PrCommand,
    },
    /// Make the cluster match the commit (exit 0 when it does)
    Sync {
        #[command(flatten)]
        source: SourceArgs,
        /// Delete objects this source applied earlier that are no longer in git
        #[arg(long)]
        prune: bool,
        /// Plan and validate against the server, change nothing
        #[arg(long)]
        dry_run: bool,
        /// Take over fields another field manager owns
        #[arg(long)]
        force_conflicts: bool,
        /// Take over objects that exist but that kommit did not create
        #[arg(long)]
        adopt: bool,
        /// Refuse to prune more than this many objects
        #[arg(long, default_value_t = 10, value_name = "N")]
        max_prune: usize,
        /// Allow pruning every object of the source, or more than --max-prune
        #[arg(long)]
        allow_mass_prune: bool,
        #[command(flatten)]
        rollout: RolloutArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Keep the cluster on a branch's head: sync each new commit, report (and heal) drift
    Watch {
        #[command(flatten)]
        source: SourceArgs,
        /// Branch to follow (default: the repository's HEAD)
        #[arg(long, value_name = "NAME")]
        branch: Option<String>,
        /// How often to fetch a remote repository and to look for drift
        #[arg(long, default_value = "1m", value_parser = parse_duration, value_name = "DURATION")]
        interval: std::time::Duration,
        /// Re-apply the commit when someone changed a synced object
        #[arg(long)]
        self_heal: bool,
        /// Delete objects that left git
        #[arg(long)]
        prune: bool,
        /// Take over fields another field manager owns
        #[arg(long)]
        force_conflicts: bool,
        /// Take over objects that exist but that kommit did not create
        #[arg(long)]
        adopt: bool,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// Apply an earlier revision and pin the cluster to it (until `sync --unpin`)
    Rollback {
        #[command(flatten)]
        source: SourceArgs,
        /// The revision to go back to (branch, tag, SHA, HEAD~1, ...)
        #[arg(long, value_name = "REV")]
        to: String,
        #[command(flatten)]
        rollout: RolloutArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Commit a `git revert` of REV in a local repository and sync the result
    Revert {
        /// The commit to revert
        #[arg(value_name = "REV")]
        commit: String,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        rollout: RolloutArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Each revision of the source's Deployments with its ReplicaSet, commit, author and outcome
    History {
        /// One Deployment: deploy/NAME (default: all of the source's)
        #[arg(value_name = "deploy/NAME")]
        deployment: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the GitSync CustomResourceDefinition (generated from kommit's types)
    Crd,
    /// Run the GitSync controller (in the cluster, or from here against any cluster)
    #[command(
        after_help = "Webhooks: point a GitHub, Gitea or GitLab push webhook at http://ADDR/webhook \
(content type application/json) with a secret, and give the operator the same secret in the \
environment variable KOMMIT_WEBHOOK_SECRET (never on the command line). A valid push asks the \
GitSyncs that follow the pushed branch to sync at once; `kubectl annotate gitsync NAME \
kommit.dev/reconcile-requested-at=\"$(date +%s)\" --overwrite` does the same by hand."
    )]
    Operator {
        /// Only reconcile GitSyncs of this namespace (default: all namespaces)
        #[arg(long, value_name = "NS")]
        watch_namespace: Option<String>,
        /// Address of the HTTP server: /healthz, /readyz, /metrics and /webhook
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
        listen: String,
        /// Reconcile without a leader lease (only safe with a single replica)
        #[arg(long)]
        no_leader_election: bool,
        /// Namespace of the leader Lease (default: the pod's, else the watched one, else "default")
        #[arg(long, value_name = "NS", env = "KOMMIT_LEADER_ELECTION_NAMESPACE")]
        leader_election_namespace: Option<String>,
        /// Name of the leader Lease
        #[arg(long, value_name = "NAME", default_value = "kommit-operator")]
        lease_name: String,
        /// How long a leader's lease lasts unrenewed: the longest a dead leader delays a takeover
        #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
        lease_duration: std::time::Duration,
        /// GitSyncs without spec.serviceAccountName act as this ServiceAccount of their own
        /// namespace (default: as the operator itself, for a single-team cluster)
        #[arg(long, value_name = "NAME", value_parser = crate::operator::controller::service_account_name)]
        default_service_account: Option<String>,
        /// Let GitSyncs sync local paths and file:// repositories of the operator's machine
        #[arg(long)]
        allow_local_repos: bool,
        /// Lend the operator's own git credentials (KOMMIT_GIT_TOKEN, KOMMIT_GIT_SSH_KEY, ssh
        /// agent, credential helper) to GitSyncs without spec.secretRef
        #[arg(long)]
        use_operator_credentials: bool,
        /// How many GitSyncs are reconciled at once (one waiting for its rollout holds a slot,
        /// doing little but watching: many slots cost little)
        #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
    },
    /// Which commit is live and whether the cluster is in sync with it
    Status {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print a shell completion script, e.g. `source <(kommit completion bash)`
    Completion {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

/// The shells `kommit completion` writes scripts for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args, Clone)]
pub struct RolloutArgs {
    /// Do not wait for the applied objects to become healthy
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for health before calling the rollout failed (e.g. 90s, 5m)
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: std::time::Duration,
    /// How long a pod may crash-loop or fail to pull before the rollout is called failed
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub fail_after: std::time::Duration,
    /// When the rollout fails, re-apply the last commit that was healthy
    #[arg(long)]
    pub auto_rollback: bool,
    /// With a local repository, also commit a `git revert` of a commit whose rollout failed
    #[arg(long)]
    pub revert_on_failure: bool,
    /// Apply a commit even though its rollout failed before
    #[arg(long)]
    pub retry: bool,
    /// Follow the branch again after `kommit rollback` pinned the cluster
    #[arg(long)]
    pub unpin: bool,
    /// Write each outcome as a git note (refs/notes/kommit) in a local repository
    #[arg(long)]
    pub record_notes: bool,
}

impl RolloutArgs {
    fn apply_to(&self, policy: Policy) -> Policy {
        Policy {
            wait: (!self.no_wait).then_some(WaitOptions {
                timeout: self.timeout,
                fail_after: self.fail_after,
            }),
            auto_rollback: self.auto_rollback,
            revert_on_failure: self.revert_on_failure,
            retry_failed: self.retry,
            unpin: self.unpin,
            record_notes: self.record_notes,
            ..policy
        }
    }
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Repository: a local folder (read in place, never checked out) or a URL (mirrored)
    #[arg(
        long,
        env = "KOMMIT_REPO",
        default_value = ".",
        value_name = "PATH_OR_URL"
    )]
    pub repo: String,
    /// Revision: branch, tag, SHA or expression such as HEAD~2 (default: HEAD)
    #[arg(long, value_name = "REV")]
    pub rev: Option<String>,
    /// Folder in the repository holding the manifests (default: the whole repository)
    #[arg(long, default_value = "", value_name = "DIR")]
    pub path: String,
    /// Read only files matching this pattern (gitignore syntax, from the repository root;
    /// repeatable). Dot files and folders, and what .kommitignore names, are never read
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Do not read files matching this pattern (gitignore syntax, from the repository root;
    /// repeatable)
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// The most objects one sync may read
    #[arg(long, default_value_t = crate::budget::DEFAULT_MAX_OBJECTS, value_name = "N")]
    pub max_objects: usize,
    /// The most bytes of manifests one sync may read, and their size once parsed
    #[arg(long, default_value = "256Mi", value_parser = parse_bytes, value_name = "SIZE")]
    pub max_bytes: u64,
    /// Namespace for objects that name none (default: the kubeconfig's, else "default")
    #[arg(long, short, value_name = "NS")]
    pub namespace: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PrCommand {
    /// What a pull request changes, and what merging it would apply to the live cluster
    /// (exit 0: nothing, 1: changes, 2: error); `-o markdown` fits a comment
    Diff {
        #[command(flatten)]
        source: SourceArgs,
        /// The branch the pull request goes into
        #[arg(long, value_name = "REV", default_value = "main")]
        base: String,
        /// The pull request's head (a branch, `refs/pull/N/head`, a SHA)
        #[arg(long, value_name = "REV")]
        head: String,
        /// Also show what merging would prune (objects the head no longer has)
        #[arg(long)]
        prune: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
    Markdown,
}

/// Reads the command line, and sets what must be set before any thread starts (git's network
/// timeout, a libgit2 global).
pub fn parse() -> Cli {
    let cli = Cli::parse();
    // SAFETY: called from `main` before the async runtime, the only spawner of threads.
    if let Err(e) = unsafe { crate::source::set_git_timeout(cli.global.git_timeout) } {
        eprintln!("warning: {e}");
    }
    cli
}

/// Runs the command line on the binary's async runtime; returns the process exit code.
pub async fn main(cli: Cli) -> u8 {
    // A service logs what it does; a command speaks only when asked.
    let service = matches!(
        cli.command,
        Command::Operator { .. } | Command::Watch { .. }
    );
    init_logging(cli.global.verbose.max(u8::from(service)));
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", error_text(&error));
            exit::ERROR
        }
    }
}

fn error_text(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// The namespace this process runs in, when it runs in a pod.
fn own_namespace() -> Option<String> {
    std::env::var("POD_NAMESPACE")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok()
        })
        .map(|ns| ns.trim().to_string())
        .filter(|ns| !ns.is_empty())
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        // Without -v only kommit speaks: its errors are reported as such, and a library's raw
        // log lines (`ERROR kube_client…`) would only repeat them less clearly.
        0 => "kommit=warn",
        1 => "kommit=info,warn",
        _ => "kommit=debug,info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KOMMIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn use_color(choice: ColorChoice) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let connect = ConnectOptions {
        kubeconfig: cli.global.kubeconfig.clone(),
        context: cli.global.context.clone(),
        // Names this process in Events and in the sync lock of a source.
        instance: ["POD_NAME", "HOSTNAME"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            }),
        request_timeout: Some(cli.global.api_timeout),
    };
    let color = use_color(cli.global.color);
    match cli.command {
        Command::Diff {
            source,
            prune,
            output,
        } => {
            let (git, mut cluster, target) = open(&source, &connect).await?;
            let policy = Policy {
                prune,
                dry_run: true,
                ..Policy::default()
            };
            let report =
                reconcile::sync(&git, &mut cluster, &target, &policy, &reconcile::Quiet).await?;
            print_plan(&report.plan, output, color)?;
            Ok(if report.plan.summary().has_changes() {
                exit::CHANGES
            } else {
                exit::OK
            })
        }
        Command::Pr {
            command:
                PrCommand::Diff {
                    source,
                    base,
                    head,
                    prune,
                    output,
                },
        } => {
            let (git, cluster, target) = open(&source, &connect).await?;
            let policy = Policy {
                prune,
                ..Policy::default()
            };
            let review = reconcile::review(&git, &cluster, &target, &base, &head, &policy).await?;
            let text = match output {
                Output::Text => plan::review::render_text(&review, color),
                Output::Json => plan::review::render_json(&review),
                Output::Markdown => {
                    plan::review::render_markdown(&review, plan::review::COMMENT_LIMIT)
                }
            };
            print(&text)?;
            Ok(if review.has_changes() {
                exit::CHANGES
            } else {
                exit::OK
            })
        }
        Command::Sync {
            source,
            prune,
            dry_run,
            force_conflicts,
            adopt,
            max_prune,
            allow_mass_prune,
            rollout,
            output,
        } => {
            let (git, mut cluster, target) = open(&source, &connect).await?;
            let policy = rollout.apply_to(Policy {
                prune,
                dry_run,
                force_conflicts,
                adopt,
                max_prune,
                allow_mass_prune,
                ..Policy::default()
            });
            sync_and_print(&git, &mut cluster, &target, &policy, output, color).await
        }
        Command::Watch {
            source,
            branch,
            interval,
            self_heal,
            prune,
            force_conflicts,
            adopt,
            rollout,
        } => {
            let (git, mut cluster, mut target) = open(&source, &connect).await?;
            if let Some(branch) = branch {
                target.rev = Some(if git.is_local() {
                    format!("refs/heads/{branch}")
                } else {
                    branch
                });
            }
            let policy = rollout.apply_to(Policy {
                prune,
                force_conflicts,
                adopt,
                ..Policy::default()
            });
            let options = reconcile::WatchOptions {
                policy,
                interval,
                self_heal,
            };
            eprintln!(
                "kommit: watching {} ({}), every {}s for drift{}; Ctrl-C stops",
                git.display(),
                target.rev.as_deref().unwrap_or("HEAD"),
                interval.as_secs(),
                if self_heal { ", healing it" } else { "" }
            );
            let progress = ProgressView::new(true);
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            reconcile::watch::watch(
                &git,
                &mut cluster,
                &target,
                &options,
                &progress,
                &|event| print_watch_event(&event, color),
                shutdown,
            )
            .await?;
            Ok(exit::OK)
        }
        Command::Rollback {
            source,
            to,
            rollout,
            output,
        } => {
            let (git, mut cluster, mut target) = open(&source, &connect).await?;
            target.rev = Some(to);
            let policy = rollout.apply_to(Policy::default());
            let progress = ProgressView::new(output == Output::Text);
            let report =
                reconcile::rollback_to(&git, &mut cluster, &target, &policy, &progress).await?;
            progress.finish();
            print_sync(&report, output, color)?;
            if report.failed() {
                return Ok(exit::ROLLOUT_FAILED);
            }
            if output == Output::Text {
                eprintln!(
                    "The cluster is pinned to {}: `kommit sync` of the branch will refuse until you pass --unpin.",
                    report.plan.source.commit.short_sha()
                );
            }
            Ok(exit::OK)
        }
        Command::Revert {
            commit,
            source,
            rollout,
            output,
        } => {
            let (git, mut cluster, target) = open(&source, &connect).await?;
            let bad = git
                .blocking(move |source| source.resolve(Some(&commit)))
                .await?;
            let reverted = reconcile::revert_commit(&git, &bad).await?;
            if output == Output::Text {
                eprintln!(
                    "Committed {} \"{}\"; syncing it.",
                    reverted.short_sha(),
                    reverted.subject
                );
            }
            let target = Target {
                rev: None,
                ..target
            };
            let policy = rollout.apply_to(Policy::default());
            sync_and_print(&git, &mut cluster, &target, &policy, output, color).await
        }
        Command::History {
            deployment,
            source,
            output,
        } => {
            let (git, cluster, target) = open(&source, &connect).await?;
            let only = deployment.as_deref().map(|spec| {
                spec.strip_prefix("deploy/")
                    .or_else(|| spec.strip_prefix("deployment/"))
                    .or_else(|| spec.strip_prefix("deployments/"))
                    .unwrap_or(spec)
                    .to_string()
            });
            let (rows, looked_in) =
                reconcile::history(&git, &cluster, &target, only.as_deref()).await?;
            print_history(&rows, &looked_in, output)?;
            Ok(exit::OK)
        }
        Command::Crd => {
            print(&crate::operator::crd_yaml())?;
            Ok(exit::OK)
        }
        Command::Operator {
            watch_namespace,
            listen,
            no_leader_election,
            leader_election_namespace,
            lease_name,
            lease_duration,
            default_service_account,
            concurrency,
            allow_local_repos,
            use_operator_credentials,
        } => {
            // From the environment only: a secret on the command line shows in `ps`.
            let webhook_secret = std::env::var("KOMMIT_WEBHOOK_SECRET")
                .ok()
                .filter(|s| !s.is_empty());
            let cluster = Cluster::connect(&connect).await?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| {
                    format!("cannot listen on {listen}: choose another address with --listen")
                })?;
            let address = listener.local_addr().context("the listening address")?;
            eprintln!("kommit: listening on {address}");
            let lease = (!no_leader_election).then(|| LeaseSettings {
                namespace: leader_election_namespace
                    .or_else(own_namespace)
                    .or_else(|| watch_namespace.clone())
                    .unwrap_or_else(|| "default".into()),
                name: lease_name,
                identity: crate::operator::leader::identity_for(
                    std::env::var("POD_NAME")
                        .or_else(|_| std::env::var("HOSTNAME"))
                        .ok(),
                ),
                duration: lease_duration,
            });
            eprintln!(
                "kommit: reconciling GitSyncs in {} on {}{}",
                watch_namespace
                    .as_deref()
                    .map_or("all namespaces".to_string(), |ns| format!("namespace {ns}")),
                cluster.server(),
                lease.as_ref().map_or(String::new(), |l| format!(
                    " once leader (Lease {}/{}, identity {})",
                    l.namespace, l.name, l.identity
                ))
            );
            if webhook_secret.is_none() {
                eprintln!(
                    "kommit: no webhook secret (KOMMIT_WEBHOOK_SECRET): webhooks are refused"
                );
            }
            eprintln!(
                "kommit: GitSyncs act as their spec.serviceAccountName, else {}{}{}",
                default_service_account.as_deref().map_or(
                    "as the operator itself (single-team; see --default-service-account)"
                        .to_string(),
                    |sa| format!("as ServiceAccount {sa} of their namespace")
                ),
                if allow_local_repos {
                    "; local repositories allowed"
                } else {
                    ""
                },
                if use_operator_credentials {
                    "; the operator's git credentials are lent to GitSyncs without secretRef"
                } else {
                    ""
                },
            );
            let options = crate::operator::run::OperatorOptions {
                watch_namespace,
                listener,
                lease,
                webhook_secret: webhook_secret.map(String::into_bytes),
                cache_dir: default_cache_dir(),
                ambient: ambient_credentials(),
                tenancy: crate::operator::controller::Tenancy {
                    default_service_account,
                    allow_local_repos,
                    use_operator_credentials,
                },
                concurrency,
            };
            crate::operator::run::run(cluster, options).await?;
            Ok(exit::OK)
        }
        Command::Completion { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "kommit", &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("cannot write the completion script to stdout")?;
            Ok(exit::OK)
        }
        Command::Status { source, output } => {
            let (git, cluster, target) = open(&source, &connect).await?;
            let policy = Policy {
                prune: true,
                dry_run: true,
                ..Policy::default()
            };
            let prepared = reconcile::prepare(&git, &cluster, &target, &policy).await?;
            let health = reconcile::health(&cluster, &prepared).await?;
            let record = reconcile::load_record(&git, &cluster, &target, &prepared.plan).await?;
            let looked_in = record_namespace_words(&target, &prepared.plan, &cluster);
            print_status(&prepared.plan, &health, &record, &looked_in, output, color)?;
            Ok(exit::OK)
        }
    }
}

/// Syncs with progress shown, prints the outcome, and says which exit code it deserves.
async fn sync_and_print(
    git: &GitSource,
    cluster: &mut Cluster,
    target: &Target,
    policy: &Policy,
    output: Output,
    color: bool,
) -> anyhow::Result<u8> {
    let progress = ProgressView::new(output == Output::Text);
    let report = reconcile::sync(git, cluster, target, policy, &progress).await?;
    progress.finish();
    print_sync(&report, output, color)?;
    Ok(if report.failed() {
        exit::ROLLOUT_FAILED
    } else {
        exit::OK
    })
}

/// Shows rollout progress: live lines on a terminal, a log line per change otherwise.
struct ProgressView {
    enabled: bool,
    terminal: bool,
    multi: indicatif::MultiProgress,
    bars: std::sync::Mutex<Vec<(crate::object::ObjectKey, indicatif::ProgressBar, String)>>,
    /// Without a terminal: the last health logged per object (a line only when it changes).
    logged: std::sync::Mutex<std::collections::HashMap<crate::object::ObjectKey, Health>>,
}

impl ProgressView {
    fn new(enabled: bool) -> Self {
        ProgressView {
            enabled,
            terminal: std::io::stderr().is_terminal(),
            multi: indicatif::MultiProgress::with_draw_target(
                indicatif::ProgressDrawTarget::stderr(),
            ),
            bars: std::sync::Mutex::new(Vec::new()),
            logged: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl reconcile::Progress for ProgressView {
    fn show(&self, objects: &[ObjectHealth]) {
        if !self.enabled {
            return;
        }
        if !self.terminal {
            let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
            for object in objects
                .iter()
                .filter(|o| crate::rollout::has_rollout(&o.key.group, &o.key.kind))
            {
                if logged.insert(object.key.clone(), object.health) != Some(object.health) {
                    eprintln!(
                        "kommit: {} {}: {}",
                        object.health, object.key, object.message
                    );
                }
            }
            return;
        }
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for object in objects
            .iter()
            .filter(|o| crate::rollout::has_rollout(&o.key.group, &o.key.kind))
        {
            let line = format!("{}: {}", object.key, object.message);
            match bars.iter_mut().find(|(k, _, _)| k == &object.key) {
                Some((_, bar, last)) => {
                    if *last != line {
                        self.report(bar, object, &line);
                        *last = line;
                    }
                }
                None => {
                    let bar = self.multi.add(indicatif::ProgressBar::new_spinner());
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                    self.report(&bar, object, &line);
                    bars.push((object.key.clone(), bar, line));
                }
            }
        }
    }
}

impl ProgressView {
    fn report(&self, bar: &indicatif::ProgressBar, object: &ObjectHealth, line: &str) {
        let mark = match object.health {
            Health::Healthy => "✓",
            Health::Degraded => "✗",
            _ => "…",
        };
        bar.set_message(format!("{mark} {line}"));
        if object.health.settled() {
            bar.finish();
        }
    }

    fn finish(&self) {
        let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for (_, bar, _) in bars.iter() {
            bar.finish();
        }
    }
}

/// `256Mi`, `1Gi`, `500Ki` or a number of bytes.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let factor = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?}: write a size such as 256Mi, 1Gi or 500Ki"
            ));
        }
    };
    number
        .parse::<u64>()
        .map(|n| n * factor)
        .map_err(|_| format!("{text:?}: write a size such as 256Mi, 1Gi or 500Ki"))
}

/// Where bare mirrors of remote repositories live.
fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KOMMIT_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("kommit");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("kommit");
    }
    std::env::temp_dir().join("kommit-cache")
}

/// This machine's git credentials beyond an ssh agent and git's credential helper.
fn ambient_credentials() -> AmbientCredentials {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    AmbientCredentials {
        ssh_key: std::env::var_os("KOMMIT_GIT_SSH_KEY")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        https_token: set("KOMMIT_GIT_TOKEN").map(SecretString::new),
        https_username: set("KOMMIT_GIT_USERNAME"),
    }
}

async fn open(
    args: &SourceArgs,
    connect: &ConnectOptions,
) -> anyhow::Result<(GitSource, Cluster, Target)> {
    let spec = args.repo.clone();
    let cache = default_cache_dir();
    let credentials = GitCredentials::Ambient(ambient_credentials());
    // Opening may clone or fetch: blocking network and disk work, off the async threads.
    let git = tokio::task::spawn_blocking(move || GitSource::open_with(&spec, &cache, credentials))
        .await??;
    let cluster = Cluster::connect(connect).await?;
    let target = Target {
        rev: args.rev.clone(),
        path: args.path.clone(),
        namespace: args.namespace.clone(),
        inventory: None,
        select: crate::select::Selection {
            include: args.include.clone(),
            exclude: args.exclude.clone(),
        },
        budgets: crate::budget::Budgets {
            max_bytes: args.max_bytes,
            max_objects: args.max_objects,
            max_expanded_bytes: args.max_bytes,
        },
        confine: false,
    };
    Ok((git, cluster, target))
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // A closed pipe (`kommit diff | head`) is not an error worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn print_plan(plan: &Plan, output: Output, color: bool) -> anyhow::Result<()> {
    print(&match output {
        Output::Text => plan::render_text(plan, color),
        Output::Json => plan::render_json(plan),
        Output::Markdown => plan::render_markdown(plan),
    })
}

fn print_sync(report: &reconcile::SyncReport, output: Output, color: bool) -> anyhow::Result<()> {
    match output {
        Output::Json => {
            let applied: Vec<serde_json::Value> = report
                .applied
                .iter()
                .map(|(action, key)| {
                    serde_json::json!({"action": action, "kind": key.kind, "namespace": key.namespace, "name": key.name})
                })
                .collect();
            let value = serde_json::json!({
                "kommit": "sync/v1",
                "dryRun": report.dry_run,
                "source": report.plan.source,
                "summary": report.plan.summary(),
                "changes": report.plan.changes,
                "applied": applied,
                "rollout": report.rollout,
                "skipped": report.skipped,
                "rollback": report.rollback.as_ref().map(|r| serde_json::json!({
                    "to": r.to, "rollout": r.outcome,
                })),
                "returnedTo": report.returned_to.iter().map(|(key, commit)| serde_json::json!({
                    "object": key.to_string(), "firstCommit": commit,
                })).collect::<Vec<_>>(),
                "reverted": report.reverted,
            });
            print(&(serde_json::to_string_pretty(&value)? + "\n"))
        }
        Output::Markdown => print(&plan::render_markdown(&report.plan)),
        Output::Text => {
            let commit = &report.plan.source.commit;
            if let Some(skipped) = &report.skipped {
                return print(&format!("{skipped}\n"));
            }
            let mut text = plan::render_text(&report.plan, color);
            if report.dry_run {
                text.push_str("Dry run: nothing was changed.\n");
            } else if report.applied.is_empty() {
                text.push_str(
                    "Nothing to do: the cluster already matches the commit (no writes).\n",
                );
            } else {
                text.push_str(&format!(
                    "Synced {} ({}): {} change{} made.\n",
                    commit.short_sha(),
                    commit.subject,
                    report.applied.len(),
                    if report.applied.len() == 1 { "" } else { "s" }
                ));
            }
            for (key, first) in &report.returned_to {
                text.push_str(&format!(
                    "{key} went back to an earlier revision: the one commit {} first rolled out (a rollback; its old ReplicaSet was reused).\n",
                    crate::commit::short(first)
                ));
            }
            match &report.rollout {
                Some(WaitOutcome::Healthy { .. }) => {
                    text.push_str("Healthy: every applied object is ready.\n")
                }
                Some(WaitOutcome::Failed { object, reason, .. }) => {
                    text.push_str(&format!(
                        "Rollout of {} failed: {object}: {reason}\n",
                        commit.short_sha()
                    ));
                    match &report.rollback {
                        Some(rollback) => {
                            let state = match &rollback.outcome {
                                Some(WaitOutcome::Healthy { .. }) => "healthy again",
                                Some(WaitOutcome::Failed { .. }) => "NOT healthy either",
                                None => "applied",
                            };
                            text.push_str(&format!(
                                "Rolled back to {} (\"{}\"), the last healthy commit: {state}. Commit {} is marked failed and will not be retried until git moves on (or --retry).\n",
                                rollback.to.short_sha(),
                                rollback.to.subject,
                                commit.short_sha()
                            ));
                        }
                        None => text.push_str(
                            "Not rolled back (pass --auto-rollback to re-apply the last healthy commit).\n",
                        ),
                    }
                }
                None => {}
            }
            if let Some(reverted) = &report.reverted {
                text.push_str(&format!(
                    "Committed {} \"{}\" so that git agrees with the cluster again.\n",
                    reverted.short_sha(),
                    reverted.subject
                ));
            }
            print(&text)
        }
    }
}

fn print_watch_event(event: &reconcile::WatchEvent, color: bool) {
    match event {
        reconcile::WatchEvent::Synced(report) => {
            let _ = print_sync(report, Output::Text, color);
        }
        reconcile::WatchEvent::Drift { plan, healed } => {
            let changed: Vec<String> = plan
                .changes
                .iter()
                .filter(|c| c.action.writes())
                .map(|c| c.key.to_string())
                .collect();
            eprintln!(
                "kommit: drift: {} differ{} from commit {}: {}",
                changed.len(),
                if changed.len() == 1 { "s" } else { "" },
                plan.source.commit.short_sha(),
                changed.join(", ")
            );
            eprintln!(
                "kommit: {}",
                if *healed {
                    "healed: the commit was applied again"
                } else {
                    "not healed (pass --self-heal to re-apply the commit)"
                }
            );
        }
        reconcile::WatchEvent::Error { message, retry_in } => {
            eprintln!(
                "kommit: error: {message} (next try in {}s)",
                retry_in.as_secs()
            );
        }
    }
}

fn short(sha: &str) -> String {
    crate::commit::short(sha)
}

fn print_history(
    rows: &[reconcile::Revision],
    looked_in: &reconcile::RecordNamespace,
    output: Output,
) -> anyhow::Result<()> {
    if output == Output::Json {
        let value = serde_json::json!({"kommit": "history/v1", "revisions": rows});
        return print(&(serde_json::to_string_pretty(&value)? + "\n"));
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.deployment.clone(),
                r.revision
                    .map(|n| format!("{n}{}", if r.current { "*" } else { "" }))
                    .unwrap_or_else(|| "-".into()),
                r.replica_set.clone().unwrap_or_else(|| "-".into()),
                r.commit.as_deref().map_or_else(|| "-".to_string(), short),
                r.author.clone().unwrap_or_else(|| "-".into()),
                r.time.clone().unwrap_or_else(|| "-".into()),
                r.outcome.clone().unwrap_or_else(|| "-".into()),
                r.subject.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut text = render_table(
        &[
            "DEPLOYMENT",
            "REVISION",
            "REPLICASET",
            "COMMIT",
            "AUTHOR",
            "TIME",
            "OUTCOME",
            "SUBJECT",
        ],
        &table,
    );
    text.push_str(
        "(* the current revision; - a commit that changed the file without a new revision)\n",
    );
    text.push_str(&format!("Record in:  {looked_in}\n"));
    print(&text)
}

fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut text = line(headers.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

/// Where `status` read the source's record, and why there, in the words of the rule
/// `reconcile::load_record` follows (so that a user without -n is never left guessing).
fn record_namespace_words(target: &Target, plan: &Plan, cluster: &Cluster) -> String {
    reconcile::RecordNamespace::of(target, plan, cluster).to_string()
}

fn print_status(
    plan: &Plan,
    health: &[ObjectHealth],
    record: &crate::audit::Record,
    looked_in: &str,
    output: Output,
    color: bool,
) -> anyhow::Result<()> {
    let state = |action: Action| match action {
        Action::Unchanged => "Synced",
        Action::Create => "Missing",
        Action::Update | Action::Adopt | Action::Replace => "OutOfSync",
        Action::Prune => "Extra",
    };
    let health_of = |key: &crate::object::ObjectKey| health.iter().find(|h| &h.key == key);
    let summary = plan.summary();
    let in_sync = !summary.has_changes();
    let overall = health
        .iter()
        .map(|h| h.health)
        .max()
        .unwrap_or(Health::Healthy);
    if output == Output::Json {
        let objects: Vec<serde_json::Value> = plan
            .changes
            .iter()
            .map(|c| {
                let h = health_of(&c.key);
                serde_json::json!({
                    "apiVersion": c.api_version, "kind": c.kind, "namespace": c.namespace,
                    "name": c.name, "state": state(c.action), "liveCommit": c.live_commit,
                    "health": h.map(|h| h.health), "message": h.map(|h| h.message.clone()),
                    "source": c.source,
                })
            })
            .collect();
        let value = serde_json::json!({
            "kommit": "status/v1",
            "source": plan.source,
            "inSync": in_sync,
            "health": overall,
            "summary": summary,
            "lastHealthy": record.last_healthy,
            "pinned": record.pinned,
            "history": record.history.iter().take(10).collect::<Vec<_>>(),
            "objects": objects,
        });
        return print(&(serde_json::to_string_pretty(&value)? + "\n"));
    }
    let commit = &plan.source.commit;
    let mut text = format!(
        "Repository: {}{}\nRevision:   {} = {} \"{}\" ({}, {})\n",
        plan.source.repo,
        if plan.source.path.is_empty() {
            String::new()
        } else {
            format!(" (path {})", plan.source.path)
        },
        plan.source.rev,
        commit.short_sha(),
        commit.subject,
        commit.author,
        commit.time_rfc3339(),
    );
    let mut live_commits: Vec<&str> = plan
        .changes
        .iter()
        .filter_map(|c| c.live_commit.as_deref())
        .collect();
    live_commits.sort_unstable();
    live_commits.dedup();
    let live = match live_commits.as_slice() {
        [] => "none (nothing applied by kommit yet)".to_string(),
        [one] => short(one).to_string(),
        many => format!(
            "{} commits ({})",
            many.len(),
            many.iter().map(|c| short(c)).collect::<Vec<_>>().join(", ")
        ),
    };
    text.push_str(&format!("Live:       {live}\n"));
    text.push_str(&format!("Record in:  {looked_in}\n"));
    if let Some(last) = &record.last_healthy {
        text.push_str(&format!("Healthy at: {}\n", short(last)));
    }
    if let Some(pin) = &record.pinned {
        text.push_str(&format!(
            "Pinned:     {} \"{}\" by `kommit rollback` (sync --unpin to follow the branch)\n",
            short(&pin.commit),
            pin.subject
        ));
    }
    let verdict = if in_sync {
        "Synced: the cluster matches the commit".to_string()
    } else {
        format!("OutOfSync: {summary}")
    };
    let paint = |code: &str, text: String| {
        if color {
            format!("{code}{text}\x1b[0m")
        } else {
            text
        }
    };
    text.push_str(&format!(
        "Sync:       {}\n",
        paint(if in_sync { "\x1b[32m" } else { "\x1b[33m" }, verdict)
    ));
    text.push_str(&format!(
        "Health:     {}\n\n",
        paint(
            if overall == Health::Healthy {
                "\x1b[32m"
            } else {
                "\x1b[33m"
            },
            overall.to_string()
        )
    ));
    let rows: Vec<Vec<String>> = plan
        .changes
        .iter()
        .map(|c| {
            let h = health_of(&c.key);
            vec![
                c.key.to_string(),
                state(c.action).to_string(),
                h.map(|h| h.health.to_string())
                    .unwrap_or_else(|| "-".into()),
                c.live_commit
                    .as_deref()
                    .map_or_else(|| "-".to_string(), short),
                c.source
                    .as_ref()
                    .map(ToString::to_string)
                    .or_else(|| c.reason.clone())
                    .unwrap_or_default(),
                h.filter(|h| h.health != Health::Healthy)
                    .map(|h| h.message.clone())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    text.push_str(&render_table(
        &["OBJECT", "STATE", "HEALTH", "COMMIT", "SOURCE", "DETAIL"],
        &rows,
    ));
    print(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sync_flags_parse() {
        let cli = Cli::try_parse_from([
            "kommit",
            "sync",
            "--repo",
            "/srv/app",
            "--rev",
            "HEAD~2",
            "--path",
            "deploy",
            "--prune",
            "--max-prune",
            "3",
            "--force-conflicts",
            "--kubeconfig",
            "/k",
            "-o",
            "json",
        ])
        .unwrap();
        match cli.command {
            Command::Sync {
                source,
                prune,
                max_prune,
                force_conflicts,
                output,
                ..
            } => {
                assert_eq!(source.rev.as_deref(), Some("HEAD~2"));
                assert!(prune && force_conflicts);
                assert_eq!(max_prune, 3);
                assert_eq!(output, Output::Json);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert_eq!(
            cli.global.kubeconfig.as_deref(),
            Some(std::path::Path::new("/k"))
        );
    }
}
