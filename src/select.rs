//! Which files of a repository are manifests. Repositories hold more than manifests (CI
//! workflows, kustomizations, editor settings), so by default nothing whose path has a part
//! starting with `.` is read (`.github/`, `.gitlab-ci.yml`), a `.kommitignore` at the
//! repository root leaves out more (gitignore syntax, as Flux's `.sourceignore`), and the CLI's
//! `--include`/`--exclude` and a GitSync's `include`/`exclude` name patterns of the same syntax.
//! Every pattern is relative to the repository root. A folder with a `kustomization.yaml` is an
//! error: kommit does not run kustomize, and applying its raw bases would be wrong.

use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// The file at the repository root whose patterns leave files out.
pub const IGNORE_FILE: &str = ".kommitignore";

/// Names kustomize reads as a kustomization.
const KUSTOMIZATIONS: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Patterns that narrow the files read (gitignore syntax, relative to the repository root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// When not empty, only files matching one of these are read.
    pub include: Vec<String>,
    /// Files matching one of these are not read.
    pub exclude: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("{origin}: the pattern '{pattern}' is not valid: {message}; fix or remove it")]
    BadPattern {
        origin: String,
        pattern: String,
        message: String,
    },
}

/// Decides file by file; built once per read of a commit.
pub struct FileFilter {
    prefix: String,
    ignore: Gitignore,
    include: Option<Gitignore>,
    exclude: Gitignore,
}

fn matcher<'a>(
    origin: impl Fn(usize) -> String,
    lines: impl Iterator<Item = &'a str>,
) -> Result<Gitignore, SelectError> {
    let mut builder = GitignoreBuilder::new("");
    for (index, line) in lines.enumerate() {
        builder
            .add_line(None, line)
            .map_err(|e| SelectError::BadPattern {
                origin: origin(index),
                pattern: line.to_string(),
                message: e.to_string(),
            })?;
    }
    builder.build().map_err(|e| SelectError::BadPattern {
        origin: origin(0),
        pattern: String::new(),
        message: e.to_string(),
    })
}

impl FileFilter {
    /// `prefix` is the synced path (normalised, empty for the whole repository): the dot rule
    /// applies below it, so `--path .deploy` still reads that folder.
    pub fn new(
        selection: &Selection,
        ignore_file: Option<&str>,
        prefix: &str,
    ) -> Result<Self, SelectError> {
        let ignore = matcher(
            |i| format!("{IGNORE_FILE}:{}", i + 1),
            ignore_file.unwrap_or("").lines(),
        )?;
        let include = if selection.include.is_empty() {
            None
        } else {
            Some(matcher(
                |_| "--include".to_string(),
                selection.include.iter().map(String::as_str),
            )?)
        };
        let exclude = matcher(
            |_| "--exclude".to_string(),
            selection.exclude.iter().map(String::as_str),
        )?;
        Ok(FileFilter {
            prefix: prefix.trim_end_matches('/').to_string(),
            ignore,
            include,
            exclude,
        })
    }

    /// Whether the file (a path from the repository root) is read as manifests.
    pub fn keeps(&self, path: &str) -> bool {
        let below = if path == self.prefix {
            ""
        } else if self.prefix.is_empty() {
            path
        } else {
            path.strip_prefix(&format!("{}/", self.prefix))
                .unwrap_or(path)
        };
        if below.split('/').any(|part| part.starts_with('.')) {
            return false;
        }
        let matched = |m: &Gitignore| {
            m.matched_path_or_any_parents(Path::new(path), false)
                .is_ignore()
        };
        if matched(&self.ignore) || matched(&self.exclude) {
            return false;
        }
        self.include.as_ref().is_none_or(matched)
    }
}

/// The folder of a kustomization file, if `path` is one.
pub fn kustomization_dir(path: &str) -> Option<&str> {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    KUSTOMIZATIONS
        .contains(&name)
        .then_some(if dir.is_empty() { "." } else { dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(
        ignore: Option<&str>,
        include: &[&str],
        exclude: &[&str],
        prefix: &str,
    ) -> FileFilter {
        let selection = Selection {
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
        };
        FileFilter::new(&selection, ignore, prefix).unwrap()
    }

    #[test]
    fn dot_files_and_folders_are_not_manifests() {
        let f = filter(None, &[], &[], "");
        assert!(!f.keeps(".github/workflows/ci.yml"));
        assert!(!f.keeps(".gitlab-ci.yml"));
        assert!(!f.keeps("apps/.hidden/x.yaml"));
        assert!(f.keeps("apps/web.yaml"));
        // The synced path itself may be a dot folder.
        let f = filter(None, &[], &[], ".deploy");
        assert!(f.keeps(".deploy/web.yaml"));
        assert!(!f.keeps(".deploy/.ci/x.yaml"));
        assert!(filter(None, &[], &[], ".deploy/web.yaml").keeps(".deploy/web.yaml"));
    }

    #[test]
    fn kommitignore_uses_gitignore_syntax() {
        let f = filter(
            Some("# tooling\ntests/\n*.schema.json\n!keep.schema.json\n/top.yaml\n"),
            &[],
            &[],
            "",
        );
        assert!(!f.keeps("tests/fixture.yaml"));
        assert!(!f.keeps("apps/tests/deep/x.yaml"));
        assert!(!f.keeps("apps/values.schema.json"));
        assert!(f.keeps("apps/keep.schema.json"));
        assert!(!f.keeps("top.yaml"));
        assert!(f.keeps("apps/top.yaml"));
        assert!(f.keeps("apps/web.yaml"));
    }

    #[test]
    fn include_and_exclude_narrow_the_files() {
        let f = filter(None, &["apps/", "base/*.yaml"], &["apps/legacy/"], "");
        assert!(f.keeps("apps/web/deploy.yaml"));
        assert!(f.keeps("base/ns.yaml"));
        assert!(!f.keeps("other/x.yaml"));
        assert!(!f.keeps("apps/legacy/old.yaml"));
    }

    #[test]
    fn bad_patterns_name_where_they_come_from() {
        let err = FileFilter::new(&Selection::default(), Some("ok/\nbad[z-a].yaml\n"), "")
            .err()
            .expect("an invalid glob is refused");
        assert!(err.to_string().starts_with(".kommitignore:2:"), "{err}");
    }

    #[test]
    fn kustomizations_are_recognised() {
        assert_eq!(
            kustomization_dir("overlays/prod/kustomization.yaml"),
            Some("overlays/prod")
        );
        assert_eq!(kustomization_dir("kustomization.yml"), Some("."));
        assert_eq!(kustomization_dir("apps/web.yaml"), None);
    }
}
