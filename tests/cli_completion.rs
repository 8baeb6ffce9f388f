//! `kommit completion bash|zsh|fish` prints a script that completes kommit's subcommands and
//! flags, and `kommit --version` names the version and the commit (no cluster needed).

use std::process::Command;

fn kommit(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kommit"))
        .args(args)
        .output()
        .expect("kommit runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn completion_scripts_name_every_subcommand_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _kommit"),
        ("zsh", "#compdef kommit"),
        ("fish", "complete -c kommit"),
    ] {
        let (ok, script, stderr) = kommit(&["completion", shell]);
        assert!(ok, "kommit completion {shell} fails: {stderr}");
        assert!(
            script.contains(marker),
            "{shell}: no `{marker}` in\n{script}"
        );
        for word in ["sync", "diff", "operator", "completion", "watch-namespace"] {
            assert!(script.contains(word), "{shell}: {word} is not completed");
        }
    }
    let (ok, _, stderr) = kommit(&["completion", "tcsh"]);
    assert!(!ok, "an unknown shell is refused");
    assert!(stderr.contains("bash, zsh, fish"), "{stderr}");
}

#[test]
fn version_names_the_commit() {
    let (ok, version, _) = kommit(&["--version"]);
    assert!(ok);
    let expected = format!("kommit {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(version.starts_with(&expected), "{version}");
    let commit = version
        .trim()
        .strip_prefix(&expected)
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap();
    assert!(
        commit == "unknown"
            || commit
                .trim_end_matches("-dirty")
                .chars()
                .all(|c| c.is_ascii_hexdigit()),
        "{commit}"
    );
}
