//! A pull request's report, in two parts: what the pull request changes (the manifests of its
//! base against those of its head, no cluster needed to read it) and what merging it would
//! apply to the live cluster (the head planned as `kommit diff` plans it). Secrets are masked in
//! both; the Markdown form fits a forge's comment limit, saying what it cut. Pure: plans in,
//! text out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::decide::Desired;
use super::{
    Action, Change, Plan, PlanSource, Summary, mask_secrets, normalize, to_yaml, unified_diff,
};
use crate::object::ObjectKey;

/// GitHub refuses comments over 65,536 characters; a little room is kept for the marker.
pub const COMMENT_LIMIT: usize = 65_000;

/// The report of one pull request.
#[derive(Debug, Clone, Serialize)]
pub struct Review {
    pub base: PlanSource,
    pub head: PlanSource,
    /// Base → head, object by object (unchanged objects left out).
    pub changes: Vec<Change>,
    /// Live → head: what merging would apply.
    pub live: Plan,
}

impl Review {
    /// The changes of the pull request, as a summary.
    pub fn summary(&self) -> Summary {
        Summary::of(&self.changes)
    }

    /// Whether the pull request changes anything, in git or in the cluster.
    pub fn has_changes(&self) -> bool {
        self.summary().has_changes() || self.live.summary().has_changes()
    }
}

/// What the head changes against the base: created, updated and removed objects, each with the
/// diff of its manifest as kommit would apply it (Secrets masked).
pub fn changes_between(base: &[Desired], head: &[Desired], base_label: &str) -> Vec<Change> {
    let before: BTreeMap<&ObjectKey, &Desired> = base.iter().map(|d| (&d.key, d)).collect();
    let after: BTreeMap<&ObjectKey, &Desired> = head.iter().map(|d| (&d.key, d)).collect();
    let mut changes = Vec::new();
    for (key, new) in &after {
        let to_label = format!("head {}", new.origin);
        let mut after_value = normalize(&new.body);
        let (action, from_label, mut before_value) = match before.get(key) {
            Some(old) => {
                let old_value = normalize(&old.body);
                if old_value == after_value {
                    continue;
                }
                (
                    Action::Update,
                    format!("{base_label} {}", old.origin),
                    Some(old_value),
                )
            }
            None => (Action::Create, "/dev/null".to_string(), None),
        };
        mask_secrets(key, before_value.as_mut(), Some(&mut after_value));
        let diff = unified_diff(
            &before_value.as_ref().map(to_yaml).unwrap_or_default(),
            &to_yaml(&after_value),
            &from_label,
            &to_label,
        );
        changes.push(change(action, new, diff));
    }
    for (key, old) in &before {
        if after.contains_key(key) {
            continue;
        }
        let mut before_value = normalize(&old.body);
        mask_secrets(key, Some(&mut before_value), None);
        let diff = unified_diff(
            &to_yaml(&before_value),
            "",
            &format!("{base_label} {}", old.origin),
            "/dev/null",
        );
        let mut removed = change(Action::Prune, old, diff);
        removed.reason = Some("removed from git by this pull request".to_string());
        changes.push(removed);
    }
    changes
}

fn change(action: Action, desired: &Desired, diff: String) -> Change {
    Change {
        action,
        api_version: desired.api_version.clone(),
        kind: desired.key.kind.clone(),
        namespace: desired.key.namespace.clone(),
        name: desired.key.name.clone(),
        source: Some(desired.origin.clone()),
        diff,
        reason: None,
        live_commit: None,
        key: desired.key.clone(),
    }
}

/// One object's entry in the Markdown report: a table row and its collapsible diff.
struct Entry {
    row: String,
    details: String,
}

fn entries(changes: &[Change]) -> Vec<Entry> {
    changes
        .iter()
        .filter(|c| c.action != Action::Unchanged)
        .map(|c| {
            let defined = c
                .source
                .as_ref()
                .map(|o| format!("`{o}`"))
                .unwrap_or_else(|| "—".to_string());
            let mut details = format!(
                "<details><summary>{} <code>{}</code></summary>\n\n",
                c.action.verb(),
                c.key
            );
            if let Some(reason) = &c.reason {
                let _ = writeln!(details, "{reason}\n");
            }
            let _ = writeln!(details, "```diff\n{}```\n</details>\n", c.diff);
            Entry {
                row: format!("| {} | `{}` | {defined} |\n", c.action.verb(), c.key),
                details,
            }
        })
        .collect()
}

/// The report as a pull-request comment, at most `limit` characters: diffs are dropped from
/// the last one back (then table rows) until it fits, and the comment says how many.
pub fn render_markdown(review: &Review, limit: usize) -> String {
    let head = &review.head.commit;
    let base = &review.base.commit;
    let mut top = String::new();
    let _ = writeln!(
        top,
        "### kommit: `{}`{} at `{}`\n",
        review.head.repo,
        if review.head.path.is_empty() {
            String::new()
        } else {
            format!(" (path `{}`)", review.head.path)
        },
        head.short_sha()
    );
    let _ = writeln!(top, "> {}\n", head.subject.replace('\n', " "));
    let ours = review.summary();
    let live = review.live.summary();
    let _ = writeln!(
        top,
        "| | create | update | adopt | replace | remove / prune | unchanged |\n|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        top,
        "| **This pull request** (`{}` → `{}`) | {} | {} | — | — | {} | — |",
        base.short_sha(),
        head.short_sha(),
        ours.create,
        ours.update,
        ours.prune
    );
    let _ = writeln!(
        top,
        "| **Merging it** (live cluster → `{}`) | {} | {} | {} | {} | {} | {} |\n",
        head.short_sha(),
        live.create,
        live.update,
        live.adopt,
        live.replace,
        live.prune,
        live.unchanged
    );

    let sections = [
        (
            format!(
                "#### What this pull request changes (`{}` → `{}`)\n\n",
                base.short_sha(),
                head.short_sha()
            ),
            entries(&review.changes),
            "The manifests are the same in both commits.\n\n",
        ),
        (
            "#### What merging would apply to the live cluster\n\n".to_string(),
            entries(
                &super::render::in_apply_order(&review.live)
                    .into_iter()
                    .cloned()
                    .collect::<Vec<_>>(),
            ),
            "The cluster already matches the head; merging applies nothing.\n\n",
        ),
    ];
    // Everything first; then, from the end, diffs go, then rows, until it fits.
    let total_entries: usize = sections.iter().map(|s| s.1.len()).sum();
    let mut keep_details = total_entries;
    let mut keep_rows = total_entries;
    loop {
        let text = assemble(&top, &sections, keep_rows, keep_details, total_entries);
        if text.chars().count() <= limit || keep_rows == 0 {
            return text;
        }
        if keep_details > 0 {
            keep_details -= 1;
        } else {
            keep_rows -= 1;
        }
    }
}

fn assemble(
    top: &str,
    sections: &[(String, Vec<Entry>, &str)],
    keep_rows: usize,
    keep_details: usize,
    total: usize,
) -> String {
    let mut out = top.to_string();
    let mut index = 0;
    for (title, entries, when_empty) in sections {
        out.push_str(title);
        if entries.is_empty() {
            out.push_str(when_empty);
            continue;
        }
        out.push_str("| Action | Object | Defined in |\n|---|---|---|\n");
        let start = index;
        for entry in entries {
            if index < keep_rows {
                out.push_str(&entry.row);
            }
            index += 1;
        }
        out.push('\n');
        for (offset, entry) in entries.iter().enumerate() {
            if start + offset < keep_details {
                out.push_str(&entry.details);
            }
        }
    }
    let cut_details = total - keep_details.min(total);
    let cut_rows = total - keep_rows.min(total);
    if cut_details > 0 {
        let _ = writeln!(
            out,
            "_Cut to fit a comment: {cut_details} of {total} diffs{} left out. Run `kommit pr \
             diff` for all of it._",
            if cut_rows > 0 {
                format!(" and {cut_rows} table rows")
            } else {
                String::new()
            }
        );
    }
    out
}

/// The report for a terminal: both parts, each as the text plan renders changes.
pub fn render_text(review: &Review, color: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "What this pull request changes ({} → {}):",
        review.base.commit.short_sha(),
        review.head.commit.short_sha()
    );
    let ours = Plan {
        source: review.head.clone(),
        changes: review.changes.clone(),
    };
    if review.changes.is_empty() {
        let _ = writeln!(
            out,
            "  nothing: the manifests are the same in both commits\n"
        );
    } else {
        out.push_str(&super::render::render_text(&ours, color));
        out.push('\n');
    }
    let _ = writeln!(out, "What merging would apply to the live cluster:");
    out.push_str(&super::render::render_text(&review.live, color));
    out
}

/// The report for scripts.
pub fn render_json(review: &Review) -> String {
    let report = serde_json::json!({
        "kommit": "review/v1",
        "base": review.base,
        "head": review.head,
        "summary": review.summary(),
        "changes": review.changes,
        "live": {
            "summary": review.live.summary(),
            "changes": review.live.changes,
        },
    });
    serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::CommitInfo;
    use crate::manifest::Origin;
    use serde_json::{Value, json};

    fn desired(kind: &str, name: &str, body: Value) -> Desired {
        Desired {
            key: ObjectKey::new("", kind, Some("shop"), name),
            api_version: "v1".into(),
            origin: Origin {
                file: format!("deploy/{name}.yaml"),
                document: 0,
                line: 1,
            },
            resource: None,
            body,
        }
    }

    fn config_map(name: &str, value: &str) -> Desired {
        desired(
            "ConfigMap",
            name,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": "shop"}, "data": {"k": value}}),
        )
    }

    fn secret(value: &str) -> Desired {
        desired(
            "Secret",
            "db",
            json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "db", "namespace": "shop"}, "data": {"password": value}}),
        )
    }

    fn source(sha: char, subject: &str) -> PlanSource {
        PlanSource {
            repo: "git@example.com:shop.git".into(),
            path: "deploy".into(),
            rev: sha.to_string(),
            commit: CommitInfo {
                sha: sha.to_string().repeat(40),
                author: "Ada".into(),
                email: "ada@x".into(),
                time: 0,
                subject: subject.into(),
            },
        }
    }

    #[test]
    fn a_pull_request_shows_what_it_adds_changes_and_removes_with_secrets_masked() {
        let base = [
            config_map("kept", "1"),
            config_map("gone", "1"),
            secret("b2xk"),
        ];
        let head = [
            config_map("kept", "1"),
            config_map("new", "2"),
            secret("bmV3"),
        ];
        let changes = changes_between(&base, &head, "base");
        let actions: Vec<(Action, &str)> = changes
            .iter()
            .map(|c| (c.action, c.name.as_str()))
            .collect();
        assert_eq!(
            actions,
            vec![
                (Action::Create, "new"),
                (Action::Update, "db"),
                (Action::Prune, "gone")
            ]
        );
        let secret_diff = &changes[1].diff;
        assert!(
            !secret_diff.contains("b2xk") && !secret_diff.contains("bmV3"),
            "{secret_diff}"
        );
    }

    fn review(changes: Vec<Change>) -> Review {
        Review {
            base: source('a', "Base"),
            head: source('b', "Bump web"),
            changes,
            live: Plan {
                source: source('b', "Bump web"),
                changes: Vec::new(),
            },
        }
    }

    #[test]
    fn the_comment_has_a_summary_then_both_parts() {
        let base = [config_map("app", "1")];
        let head = [config_map("app", "2")];
        let text = render_markdown(
            &review(changes_between(&base, &head, "base")),
            COMMENT_LIMIT,
        );
        let summary = text.find("| **This pull request**").unwrap();
        let ours = text.find("#### What this pull request changes").unwrap();
        let live = text.find("#### What merging would apply").unwrap();
        assert!(summary < ours && ours < live, "{text}");
        assert!(
            text.contains("-  k: \"1\"") || text.contains("-  k: '1'"),
            "{text}"
        );
        assert!(text.contains("merging applies nothing"), "{text}");
    }

    #[test]
    fn a_huge_report_is_cut_to_fit_a_comment_and_says_so() {
        let base: Vec<Desired> = Vec::new();
        let head: Vec<Desired> = (0..400)
            .map(|i| config_map(&format!("cm-{i:03}"), &"x".repeat(500)))
            .collect();
        let full = render_markdown(&review(changes_between(&base, &head, "base")), usize::MAX);
        assert!(full.chars().count() > COMMENT_LIMIT);
        let cut = render_markdown(
            &review(changes_between(&base, &head, "base")),
            COMMENT_LIMIT,
        );
        assert!(cut.chars().count() <= COMMENT_LIMIT, "{}", cut.len());
        assert!(cut.contains("Cut to fit a comment"), "says what was cut");
        assert!(
            cut.contains("`ConfigMap shop/cm-399`"),
            "the table keeps every row"
        );
    }
}
