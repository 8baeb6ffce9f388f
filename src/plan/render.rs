//! A plan as a person reads it (text, optionally coloured), as a script reads it (JSON), and as a
//! pull-request comment (markdown).

use std::fmt::Write as _;

use super::{Action, Change, Plan};
use crate::object::apply_tier;

/// The changes that write, in the order a sync makes them: by tier (what others depend on
/// first, file order within a tier), then prunes in reverse tier order.
pub(crate) fn in_apply_order(plan: &Plan) -> Vec<&Change> {
    let tier = |c: &Change| apply_tier(&c.key.group, &c.key.kind);
    let mut writes: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| c.action.writes() && c.action != Action::Prune)
        .collect();
    writes.sort_by_key(|c| tier(c));
    let mut prunes: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| c.action == Action::Prune)
        .collect();
    prunes.sort_by_key(|c| std::cmp::Reverse(tier(c)));
    writes.extend(prunes);
    writes
}

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const MAGENTA: &str = "\x1b[35m";
const CYAN: &str = "\x1b[36m";
const DIM: &str = "\x1b[2m";

fn symbol(action: Action) -> &'static str {
    match action {
        Action::Create => "+",
        Action::Update => "~",
        Action::Adopt => "&",
        Action::Replace => "±",
        Action::Prune => "-",
        Action::Unchanged => "=",
    }
}

fn colour(action: Action) -> &'static str {
    match action {
        Action::Create => GREEN,
        Action::Update => YELLOW,
        Action::Adopt => MAGENTA,
        Action::Replace => CYAN,
        Action::Prune => RED,
        Action::Unchanged => DIM,
    }
}

fn object_name(change: &Change) -> String {
    change.key.to_string()
}

fn location(change: &Change) -> String {
    change
        .source
        .as_ref()
        .map(|origin| format!(" ({origin})"))
        .unwrap_or_default()
}

/// Text for a terminal or a log: the changed objects with their diffs, then the summary line.
pub fn render_text(plan: &Plan, color: bool) -> String {
    let paint = |code: &str, text: &str| -> String {
        if color {
            format!("{code}{text}{RESET}")
        } else {
            text.to_string()
        }
    };
    let mut out = String::new();
    let commit = &plan.source.commit;
    let _ = writeln!(
        out,
        "{} {} @ {} ({} \"{}\"){}",
        paint(BOLD, "kommit plan:"),
        plan.source.repo,
        plan.source.rev,
        commit.short_sha(),
        commit.subject,
        if plan.source.path.is_empty() {
            String::new()
        } else {
            format!(", path {}", plan.source.path)
        }
    );
    for change in in_apply_order(plan) {
        let _ = writeln!(
            out,
            "{}  {}{}",
            paint(
                colour(change.action),
                &format!("{} {:<9}", symbol(change.action), change.action.verb())
            ),
            paint(BOLD, &object_name(change)),
            location(change)
        );
        if let Some(reason) = &change.reason {
            let _ = writeln!(out, "    {}", paint(DIM, reason));
        }
        for line in change.diff.lines() {
            let painted = if line.starts_with("+++") || line.starts_with("---") {
                paint(BOLD, line)
            } else if line.starts_with('+') {
                paint(GREEN, line)
            } else if line.starts_with('-') {
                paint(RED, line)
            } else if line.starts_with("@@") {
                paint(CYAN, line)
            } else {
                line.to_string()
            };
            let _ = writeln!(out, "    {painted}");
        }
    }
    let summary = plan.summary();
    let line = format!("Plan: {summary}");
    let _ = writeln!(
        out,
        "{}",
        if summary.has_changes() {
            paint(BOLD, &line)
        } else {
            paint(GREEN, &format!("{line} — the cluster matches the commit"))
        }
    );
    out
}

/// The stable JSON form for scripts (`"kommit": "plan/v1"`).
pub fn render_json(plan: &Plan) -> String {
    let report = serde_json::json!({
        "kommit": "plan/v1",
        "source": plan.source,
        "summary": plan.summary(),
        "changes": plan.changes,
    });
    serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
}

/// Markdown meant to be pasted into a pull-request comment.
pub fn render_markdown(plan: &Plan) -> String {
    let mut out = String::new();
    let commit = &plan.source.commit;
    let _ = writeln!(
        out,
        "### kommit plan for `{}`{} at `{}`\n",
        plan.source.repo,
        if plan.source.path.is_empty() {
            String::new()
        } else {
            format!(" (path `{}`)", plan.source.path)
        },
        commit.short_sha()
    );
    let _ = writeln!(out, "> {}\n", commit.subject.replace('\n', " "));
    let summary = plan.summary();
    let _ = writeln!(out, "**{summary}**\n");
    let changed: Vec<&Change> = in_apply_order(plan);
    if changed.is_empty() {
        let _ = writeln!(out, "The cluster matches this commit; nothing to apply.");
        return out;
    }
    let _ = writeln!(out, "| Action | Object | Defined in |\n|---|---|---|");
    for change in &changed {
        let _ = writeln!(
            out,
            "| {} {} | `{}` | {} |",
            symbol(change.action),
            change.action.verb(),
            object_name(change),
            change
                .source
                .as_ref()
                .map(|o| format!("`{o}`"))
                .unwrap_or_else(|| "—".to_string())
        );
    }
    out.push('\n');
    for change in changed {
        let _ = writeln!(
            out,
            "<details><summary>{} <code>{}</code></summary>\n",
            change.action.verb(),
            object_name(change)
        );
        if let Some(reason) = &change.reason {
            let _ = writeln!(out, "{reason}\n");
        }
        let _ = writeln!(out, "```diff\n{}```\n</details>\n", change.diff);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::CommitInfo;
    use crate::manifest::Origin;
    use crate::object::ObjectKey;
    use crate::plan::PlanSource;

    fn plan() -> Plan {
        let change = |action, kind: &str, name: &str, diff: &str| {
            let key = ObjectKey::new("apps", kind, Some("shop"), name);
            Change {
                action,
                api_version: "apps/v1".into(),
                kind: kind.into(),
                namespace: Some("shop".into()),
                name: name.into(),
                source: Some(Origin {
                    file: "deploy/web.yaml".into(),
                    document: 0,
                    line: 1,
                }),
                diff: diff.into(),
                reason: None,
                live_commit: None,
                key,
            }
        };
        Plan {
            source: PlanSource {
                repo: "/srv/app".into(),
                path: "deploy".into(),
                rev: "main".into(),
                commit: CommitInfo {
                    sha: "0123456789abcdef0123456789abcdef01234567".into(),
                    author: "Ada".into(),
                    email: "ada@example.com".into(),
                    time: 0,
                    subject: "Bump web to 1.26".into(),
                },
            },
            changes: vec![
                change(
                    Action::Update,
                    "Deployment",
                    "web",
                    "--- live\n+++ git\n@@ -1 +1 @@\n-image: a\n+image: b\n",
                ),
                change(Action::Unchanged, "Deployment", "api", ""),
            ],
        }
    }

    #[test]
    fn text_lists_changes_and_ends_with_the_summary() {
        insta::assert_snapshot!(render_text(&plan(), false));
    }

    #[test]
    fn colour_only_when_asked() {
        assert!(!render_text(&plan(), false).contains('\x1b'));
        assert!(render_text(&plan(), true).contains("\x1b[32m+image: b"));
    }

    #[test]
    fn json_is_stable_for_scripts() {
        let parsed: serde_json::Value = serde_json::from_str(&render_json(&plan())).unwrap();
        assert_eq!(parsed["kommit"], "plan/v1");
        assert_eq!(parsed["summary"]["update"], 1);
        assert_eq!(parsed["summary"]["unchanged"], 1);
        assert_eq!(parsed["changes"][0]["action"], "update");
        assert_eq!(parsed["changes"][0]["source"]["file"], "deploy/web.yaml");
        assert_eq!(
            parsed["source"]["commit"]["sha"],
            "0123456789abcdef0123456789abcdef01234567"
        );
    }

    #[test]
    fn markdown_is_ready_for_a_pull_request() {
        insta::assert_snapshot!(render_markdown(&plan()));
    }

    #[test]
    fn the_text_plan_lists_objects_in_the_order_sync_applies_them() {
        let mut plan = plan();
        let template = plan.changes[0].clone();
        let change = |action, group: &str, kind: &str, name: &str| Change {
            action,
            key: ObjectKey::new(group, kind, None, name),
            ..template.clone()
        };
        // File order: a Deployment, a custom resource, its CRD, the Namespace, and two prunes.
        plan.changes = vec![
            change(Action::Create, "apps", "Deployment", "web"),
            change(Action::Prune, "", "Namespace", "old"),
            change(Action::Create, "example.com", "Widget", "w"),
            change(Action::Prune, "apps", "Deployment", "gone"),
            change(
                Action::Create,
                "apiextensions.k8s.io",
                "CustomResourceDefinition",
                "widgets.example.com",
            ),
            change(Action::Create, "", "Namespace", "shop"),
        ];
        let order: Vec<&str> = in_apply_order(&plan)
            .iter()
            .map(|c| c.key.name.as_str())
            .collect();
        assert_eq!(
            order,
            ["shop", "widgets.example.com", "web", "w", "gone", "old"]
        );
        let text = render_text(&plan, false);
        let at = |name: &str| {
            text.find(&format!(" {name} ("))
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        assert!(
            at("shop") < at("widgets.example.com") && at("widgets.example.com") < at("web"),
            "{text}"
        );
    }
}
