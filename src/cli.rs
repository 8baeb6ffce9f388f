//! Command line: parse, call `reconcile`, print. No logic of its own.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cluster::{Cluster, ConnectOptions};
use crate::plan::{self, Action, Plan};
use crate::reconcile::{self, Policy, Target};
use crate::source::{GitSource, default_cache_dir};

/// Exit codes, like `git diff --exit-code` and `kubectl diff`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const CHANGES: u8 = 1;
    pub const ERROR: u8 = 2;
}

#[derive(Debug, Parser)]
#[command(
    name = "kommit",
    version,
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
        /// Refuse to prune more than this many objects
        #[arg(long, default_value_t = 10, value_name = "N")]
        max_prune: usize,
        /// Allow pruning every object of the source, or more than --max-prune
        #[arg(long)]
        allow_mass_prune: bool,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Which commit is live and whether the cluster is in sync with it
    Status {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
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
    /// Namespace for objects that name none (default: the kubeconfig's, else "default")
    #[arg(long, short, value_name = "NS")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
    Markdown,
}

/// Runs the command line; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {}", error_text(&error));
            ExitCode::from(exit::ERROR)
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

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
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
            let report = reconcile::sync(&git, &mut cluster, &target, &policy).await?;
            print_plan(&report.plan, output, color)?;
            Ok(if report.plan.summary().has_changes() {
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
            max_prune,
            allow_mass_prune,
            output,
        } => {
            let (git, mut cluster, target) = open(&source, &connect).await?;
            let policy = Policy {
                prune,
                dry_run,
                force_conflicts,
                max_prune,
                allow_mass_prune,
            };
            let report = reconcile::sync(&git, &mut cluster, &target, &policy).await?;
            print_sync(&report, output, color)?;
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
            print_status(&prepared.plan, output, color)?;
            Ok(exit::OK)
        }
    }
}

async fn open(
    args: &SourceArgs,
    connect: &ConnectOptions,
) -> anyhow::Result<(GitSource, Cluster, Target)> {
    let spec = args.repo.clone();
    let cache = default_cache_dir();
    // Opening may clone or fetch: blocking network and disk work, off the async threads.
    let git = tokio::task::spawn_blocking(move || GitSource::open(&spec, &cache)).await??;
    let cluster = Cluster::connect(connect).await?;
    let target = Target {
        rev: args.rev.clone(),
        path: args.path.clone(),
        namespace: args.namespace.clone(),
        inventory: None,
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
            });
            print(&(serde_json::to_string_pretty(&value)? + "\n"))
        }
        Output::Markdown => print(&plan::render_markdown(&report.plan)),
        Output::Text => {
            let mut text = plan::render_text(&report.plan, color);
            if report.dry_run {
                text.push_str("Dry run: nothing was changed.\n");
            } else if report.applied.is_empty() {
                text.push_str(
                    "Nothing to do: the cluster already matches the commit (no writes).\n",
                );
            } else {
                let commit = &report.plan.source.commit;
                text.push_str(&format!(
                    "Synced {} ({}): {} change{} made.\n",
                    commit.short_sha(),
                    commit.subject,
                    report.applied.len(),
                    if report.applied.len() == 1 { "" } else { "s" }
                ));
            }
            print(&text)
        }
    }
}

fn print_status(plan: &Plan, output: Output, color: bool) -> anyhow::Result<()> {
    let state = |action: Action| match action {
        Action::Unchanged => "Synced",
        Action::Create => "Missing",
        Action::Update | Action::Replace => "OutOfSync",
        Action::Prune => "Extra",
    };
    let summary = plan.summary();
    let in_sync = !summary.has_changes();
    if output == Output::Json {
        let objects: Vec<serde_json::Value> = plan
            .changes
            .iter()
            .map(|c| {
                serde_json::json!({
                    "apiVersion": c.api_version, "kind": c.kind, "namespace": c.namespace,
                    "name": c.name, "state": state(c.action), "liveCommit": c.live_commit,
                    "source": c.source,
                })
            })
            .collect();
        let value = serde_json::json!({
            "kommit": "status/v1",
            "source": plan.source,
            "inSync": in_sync,
            "summary": summary,
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
        [one] => one[..7.min(one.len())].to_string(),
        many => format!(
            "{} commits ({})",
            many.len(),
            many.iter()
                .map(|c| &c[..7.min(c.len())])
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    text.push_str(&format!("Live:       {live}\n"));
    let verdict = if in_sync {
        "Synced: the cluster matches the commit".to_string()
    } else {
        format!("OutOfSync: {summary}")
    };
    let painted = match (color, in_sync) {
        (true, true) => format!("\x1b[32m{verdict}\x1b[0m"),
        (true, false) => format!("\x1b[33m{verdict}\x1b[0m"),
        _ => verdict,
    };
    text.push_str(&format!("Sync:       {painted}\n\n"));
    let rows: Vec<[String; 4]> = plan
        .changes
        .iter()
        .map(|c| {
            [
                c.key.to_string(),
                state(c.action).to_string(),
                c.live_commit
                    .as_deref()
                    .map(|s| s[..7.min(s.len())].to_string())
                    .unwrap_or_else(|| "-".into()),
                c.source
                    .as_ref()
                    .map(ToString::to_string)
                    .or_else(|| c.reason.clone())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let headers = ["OBJECT", "STATE", "COMMIT", "SOURCE"];
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: [&str; 4]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        )
    };
    text.push_str(&line(headers));
    for row in &rows {
        text.push_str(&line([&row[0], &row[1], &row[2], &row[3]]));
    }
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
