//! Bakes the git commit the binary is built from into `KOMMIT_GIT_COMMIT`, which
//! `kommit --version` prints.
//!
//! Sources, in order: the `KOMMIT_GIT_COMMIT` environment variable (what `scripts/image` passes,
//! and what a build from a source tarball without `.git` can set), else `git rev-parse HEAD`
//! of the checkout, else `unknown`: a build never fails for want of git.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=KOMMIT_GIT_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = match std::env::var("KOMMIT_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_string(),
        _ => {
            // Run again when HEAD moves: HEAD itself (a branch switch), the branch's ref file (a
            // commit) and packed-refs (a ref that git packed). Paths come from git, so worktrees
            // (where .git is a file) work too.
            let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watched.push(branch);
            }
            for name in watched {
                let path = git(&["rev-parse", "--path-format=absolute", "--git-path", &name]);
                if let Some(path) = path.filter(|p| PathBuf::from(p).exists()) {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=KOMMIT_GIT_COMMIT={commit}");
}
