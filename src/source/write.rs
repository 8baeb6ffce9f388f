//! The two things kommit writes to git, only ever in a local repository the user pointed it at:
//! a revert commit of a commit whose rollout failed, and notes under `refs/notes/kommit`.

use git2::Oid;

use super::{CommitInfo, GitSource, SourceError};

const NOTES_REF: &str = "refs/notes/kommit";

impl GitSource {
    /// Makes a `git revert` commit of `commit` on the checked-out branch and brings the work
    /// tree to it; `why` is added to the message.
    pub fn revert(
        &self,
        commit: &CommitInfo,
        why: Option<&str>,
    ) -> Result<CommitInfo, SourceError> {
        let refuse = |message: String| SourceError::Revert { message };
        if !self.is_local() {
            return Err(refuse(format!(
                "{} is not a local repository; revert the commit where the repository lives and push it",
                self.display()
            )));
        }
        let repo = self.repo();
        let git = |e: git2::Error| {
            refuse(format!(
                "cannot revert {}: {}",
                commit.short_sha(),
                e.message()
            ))
        };
        if repo.is_bare() {
            return Err(refuse(format!(
                "{} has no work tree to revert in",
                self.display()
            )));
        }
        let mut status_options = git2::StatusOptions::new();
        status_options.include_untracked(false);
        let dirty = repo
            .statuses(Some(&mut status_options))
            .map_err(git)?
            .iter()
            .any(|s| {
                s.status().intersects(
                    git2::Status::INDEX_NEW
                        | git2::Status::INDEX_MODIFIED
                        | git2::Status::INDEX_DELETED
                        | git2::Status::WT_MODIFIED
                        | git2::Status::WT_DELETED,
                )
            });
        if dirty {
            return Err(refuse(format!(
                "the work tree of {} has uncommitted changes; commit or stash them, then revert",
                self.display()
            )));
        }
        let target = repo
            .find_commit(Oid::from_str(&commit.sha).map_err(git)?)
            .map_err(git)?;
        let head = repo.head().map_err(git)?.peel_to_commit().map_err(git)?;
        let mut index = repo.revert_commit(&target, &head, 0, None).map_err(git)?;
        if index.has_conflicts() {
            return Err(refuse(format!(
                "reverting {} conflicts with later commits; revert it by hand (git revert {})",
                commit.short_sha(),
                commit.short_sha()
            )));
        }
        let tree_id = index.write_tree_to(&repo).map_err(git)?;
        let tree = repo.find_tree(tree_id).map_err(git)?;
        let signature = repo
            .signature()
            .or_else(|_| git2::Signature::now("kommit", "kommit@localhost"))
            .map_err(git)?;
        let mut message = format!(
            "Revert \"{}\"\n\nThis reverts commit {}.\n",
            commit.subject, commit.sha
        );
        if let Some(why) = why {
            message.push_str(&format!("\nkommit: its rollout failed: {why}\n"));
        }
        let new = repo
            .commit(
                Some("HEAD"),
                &signature,
                &signature,
                &message,
                &tree,
                &[&head],
            )
            .map_err(git)?;
        // Bring the work tree to the new commit, like `git revert` does.
        repo.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))
            .map_err(git)?;
        let new = repo.find_commit(new).map_err(git)?;
        Ok(super::commit_info(&new))
    }

    /// Adds a line to the note of `commit` under `refs/notes/kommit` (earlier lines are kept).
    pub fn add_note(&self, commit: &CommitInfo, text: &str) -> Result<(), SourceError> {
        let repo = self.repo();
        let git = |e: git2::Error| SourceError::git(self.display(), e);
        let signature = repo
            .signature()
            .or_else(|_| git2::Signature::now("kommit", "kommit@localhost"))
            .map_err(git)?;
        let oid = Oid::from_str(&commit.sha).map_err(git)?;
        let existing = repo
            .find_note(Some(NOTES_REF), oid)
            .ok()
            .and_then(|n| n.message().ok().map(str::to_string));
        let message = match existing {
            Some(old) => format!("{}\n{text}", old.trim_end()),
            None => text.to_string(),
        };
        repo.note(&signature, &signature, Some(NOTES_REF), oid, &message, true)
            .map_err(git)?;
        Ok(())
    }
}
