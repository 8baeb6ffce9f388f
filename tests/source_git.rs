//! Reading manifests from real git repositories (no cluster needed).

mod common;

use common::GitRepo;
use kommit::source::{GitSource, MAX_FILE_BYTES, SourceError};

fn open(repo: &GitRepo) -> GitSource {
    GitSource::open(repo.path_str(), &std::env::temp_dir()).expect("the repository opens")
}

fn names(source: &GitSource, rev: Option<&str>, path: &str) -> Vec<String> {
    let commit = source.resolve(rev).unwrap();
    source
        .read_manifests(&commit, path)
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect()
}

#[test]
fn reads_the_commit_not_the_work_tree() {
    let repo = GitRepo::new();
    repo.write("deploy/b.yaml", "b: 1\n")
        .write("deploy/a.yml", "a: 1\n")
        .write("deploy/nested/c.json", "{}\n")
        .write("deploy/README.md", "not a manifest\n")
        .write("other/x.yaml", "x: 1\n");
    let first = repo.commit("First");
    repo.write("deploy/d.yaml", "d: 1\n");
    repo.commit("Second");
    // Uncommitted edits are not what git says; kommit never looks at them.
    repo.write("deploy/e.yaml", "uncommitted: true\n");
    std::fs::write(repo.path().join("deploy/a.yml"), "edited: true\n").unwrap();

    let source = open(&repo);
    assert_eq!(
        names(&source, None, "deploy"),
        [
            "deploy/a.yml",
            "deploy/b.yaml",
            "deploy/d.yaml",
            "deploy/nested/c.json"
        ]
    );
    assert_eq!(
        names(&source, Some(&first), "./deploy/"),
        ["deploy/a.yml", "deploy/b.yaml", "deploy/nested/c.json"]
    );
    assert_eq!(names(&source, Some("HEAD~1"), "").len(), 4);
    let head = source.resolve(None).unwrap();
    let files = source.read_manifests(&head, "deploy/a.yml").unwrap();
    assert_eq!(files[0].content, b"a: 1\n");
    assert_eq!(head.subject, "Second");
    assert_eq!(head.author, "Ada Lovelace");
    // The work tree is exactly as the user left it.
    assert_eq!(
        std::fs::read_to_string(repo.path().join("deploy/a.yml")).unwrap(),
        "edited: true\n"
    );
}

#[test]
fn bad_revisions_and_paths_say_what_to_do() {
    let repo = GitRepo::new();
    repo.write("deploy/a.yaml", "a: 1\n");
    repo.commit("First");
    let source = open(&repo);
    let err = source.resolve(Some("nope")).unwrap_err();
    assert!(matches!(err, SourceError::BadRevision { .. }));
    assert!(
        err.to_string().contains("use a branch, tag, commit SHA"),
        "{err}"
    );
    let commit = source.resolve(None).unwrap();
    let err = source.read_manifests(&commit, "deplyo").unwrap_err();
    assert!(
        err.to_string().contains("folders at the root: deploy"),
        "{err}"
    );
    let err = source.read_manifests(&commit, "../outside").unwrap_err();
    assert!(matches!(err, SourceError::BadPath { .. }), "{err}");

    let empty = GitRepo::new();
    let err = open(&empty).resolve(None).unwrap_err();
    assert!(err.to_string().contains("no commits yet"), "{err}");
    let not_a_repo = tempfile::tempdir().unwrap();
    let err =
        GitSource::open(not_a_repo.path().to_str().unwrap(), &std::env::temp_dir()).unwrap_err();
    assert!(err.to_string().contains("is not a git repository"), "{err}");
}

#[test]
fn symlinks_are_followed_inside_and_refused_outside() {
    let repo = GitRepo::new();
    repo.write("shared/base.yaml", "base: 1\n");
    std::fs::create_dir_all(repo.path().join("deploy")).unwrap();
    std::os::unix::fs::symlink("../shared/base.yaml", repo.path().join("deploy/base.yaml"))
        .unwrap();
    repo.commit("Share a manifest");
    let source = open(&repo);
    let commit = source.resolve(None).unwrap();
    let files = source.read_manifests(&commit, "deploy").unwrap();
    assert_eq!(files[0].content, b"base: 1\n");

    std::os::unix::fs::symlink("/etc/passwd", repo.path().join("deploy/passwd.yaml")).unwrap();
    repo.commit("Sneak a file in");
    let commit = source.resolve(None).unwrap();
    let err = source.read_manifests(&commit, "deploy").unwrap_err();
    assert!(matches!(err, SourceError::SymlinkEscapes { .. }), "{err}");
    assert!(err.to_string().contains("deploy/passwd.yaml"), "{err}");
}

#[test]
fn oversized_files_are_refused_before_they_are_read() {
    let repo = GitRepo::new();
    repo.write(
        "deploy/huge.yaml",
        &"# padding\n".repeat(MAX_FILE_BYTES / 10 + 1),
    );
    repo.commit("A huge file");
    let source = open(&repo);
    let commit = source.resolve(None).unwrap();
    let err = source.read_manifests(&commit, "deploy").unwrap_err();
    assert!(matches!(err, SourceError::FileTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("deploy/huge.yaml"), "{err}");
}

#[test]
fn a_url_is_mirrored_and_fetched_again_later() {
    let upstream = GitRepo::new();
    upstream.write("deploy/a.yaml", "a: 1\n");
    upstream.commit("First");
    upstream.git(&["branch", "release"]);
    let cache = tempfile::tempdir().unwrap();
    let url = format!("file://{}", upstream.path_str());

    let mirror = GitSource::open(&url, cache.path()).unwrap();
    assert!(!mirror.is_local());
    assert_eq!(names(&mirror, None, "deploy"), ["deploy/a.yaml"]);
    assert_eq!(names(&mirror, Some("release"), "deploy"), ["deploy/a.yaml"]);

    upstream.write("deploy/b.yaml", "b: 1\n");
    let second = upstream.commit("Second");
    // Opening again fetches: the new commit is there, and HEAD follows the default branch.
    let mirror = GitSource::open(&url, cache.path()).unwrap();
    assert_eq!(mirror.resolve(None).unwrap().sha, second);
    assert_eq!(
        names(&mirror, Some("main"), "deploy"),
        ["deploy/a.yaml", "deploy/b.yaml"]
    );
    // The user's repository was only read.
    assert_eq!(upstream.head(), second);

    let err = GitSource::open("file:///no/such/repo", cache.path()).unwrap_err();
    assert!(matches!(err, SourceError::Fetch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("cannot fetch file:///no/such/repo"),
        "{err}"
    );
}

#[test]
fn each_file_is_attributed_to_the_commit_that_last_changed_it() {
    let repo = GitRepo::new();
    repo.write("deploy/web.yaml", "image: 1\n")
        .write("deploy/db.yaml", "image: 1\n");
    let first = repo.commit("Add web and db");
    repo.write("deploy/web.yaml", "image: 2\n");
    let second = repo.commit("Bump web");
    repo.write("README.md", "docs\n");
    repo.commit("Docs only");
    let source = open(&repo);
    let head = source.resolve(None).unwrap();
    let found = source
        .last_changes(
            &head,
            &["deploy/web.yaml".into(), "deploy/db.yaml".into()],
            100,
        )
        .unwrap();
    assert_eq!(found["deploy/web.yaml"].sha, second);
    assert_eq!(found["deploy/web.yaml"].subject, "Bump web");
    assert_eq!(found["deploy/db.yaml"].sha, first);
}
