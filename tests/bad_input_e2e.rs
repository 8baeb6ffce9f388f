//! Bad input, accidental or hostile, is a clear error that names the file (and the line where
//! there is one), exits 2, and writes nothing to the cluster: a corpus of broken commits, each
//! next to a good object that must not be applied either.

mod common;

use common::*;

/// A good object beside each bad input: all or nothing means it is not applied either.
const GOOD: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: good\ndata:\n  k: v\n";

fn config_map(name: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  k: v\n")
}

/// One bad commit: its files (path, bytes), and what the error must name.
struct Case {
    name: &'static str,
    files: Vec<(String, Vec<u8>)>,
    names: Vec<String>,
    extra: Vec<&'static str>,
}

fn case(name: &'static str, file: &str, content: impl Into<Vec<u8>>, names: &[&str]) -> Case {
    Case {
        name,
        files: vec![(file.to_string(), content.into())],
        names: names.iter().map(|s| s.to_string()).collect(),
        extra: Vec::new(),
    }
}

fn corpus() -> Vec<Case> {
    let alias_bomb = {
        let mut text = String::from(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: lol\ndata:\n  a: &a \"lol\"\n",
        );
        let mut previous = "a".to_string();
        for level in 0..9 {
            let name = format!("l{level}");
            let refs = vec![format!("*{previous}"); 9].join(", ");
            text.push_str(&format!("  {name}: &{name} [{refs}]\n"));
            previous = name;
        }
        text
    };
    let spread_bomb: String = (0..200)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b{i}\ndata:\n  a: &a [\"x\", \"x\", \"x\", \"x\", \"x\", \"x\", \"x\", \"x\"]\n  b: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n  c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n  d: &d [*c, *c, *c, *c, *c, *c, *c, *c]\n  e: [*d, *d, *d, *d, *d, *d, *d, *d]\n"
            )
        })
        .collect();
    let many_documents: String = (0..100_000).map(|_| "---\n{}\n").collect();
    let nine_mib = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n  k: \"{}\"\n",
        "x".repeat(9 * 1024 * 1024)
    );
    let mut cases = vec![
        case(
            "broken YAML",
            "deploy/broken.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x\n",
            &["deploy/broken.yaml:"],
        ),
        case(
            "a tab for indentation",
            "deploy/tabs.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n\tname: x\n",
            &["deploy/tabs.yaml:"],
        ),
        case(
            "an alias bomb",
            "deploy/bomb.yaml",
            alias_bomb,
            &["deploy/bomb.yaml"],
        ),
        case(
            "alias bombs spread over many documents",
            "deploy/spread.yaml",
            spread_bomb,
            &["deploy/spread.yaml"],
        ),
        case(
            "100,000 documents",
            "deploy/many.yaml",
            many_documents,
            &["deploy/many.yaml"],
        ),
        case(
            "a 9 MiB file",
            "deploy/big.yaml",
            nine_mib,
            &["deploy/big.yaml"],
        ),
        case(
            "binary data",
            "deploy/binary.yaml",
            vec![0xff, 0xfe, 0x00, 0x01, 0x80, 0x81, b'\n'],
            &["deploy/binary.yaml", "UTF-8"],
        ),
        case(
            "no apiVersion",
            "deploy/noversion.yaml",
            "kind: ConfigMap\nmetadata:\n  name: x\n",
            &["deploy/noversion.yaml:"],
        ),
        case(
            "no kind",
            "deploy/nokind.yaml",
            "apiVersion: v1\nmetadata:\n  name: x\n",
            &["deploy/nokind.yaml:"],
        ),
        case(
            "no name",
            "deploy/noname.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
            &["deploy/noname.yaml:"],
        ),
        case(
            "a scalar document",
            "deploy/scalar.yaml",
            "just some words\n",
            &["deploy/scalar.yaml:"],
        ),
        case(
            "a list at the top",
            "deploy/list.yaml",
            "- a\n- b\n",
            &["deploy/list.yaml:"],
        ),
        case(
            "a kind the cluster does not serve",
            "deploy/widget.yaml",
            "apiVersion: example.com/v1\nkind: Gizmo\nmetadata:\n  name: g\n",
            &["deploy/widget.yaml:", "Gizmo"],
        ),
        case(
            "an API version the cluster does not serve",
            "deploy/old.yaml",
            "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata:\n  name: old\n",
            &["deploy/old.yaml:"],
        ),
        case(
            "a name the API refuses",
            "deploy/badname.yaml",
            config_map("Not_A_Valid_Name"),
            &["deploy/badname.yaml:"],
        ),
        case(
            "an unknown field",
            "deploy/unknown.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  k: v\nsurprise: true\n",
            &["deploy/unknown.yaml:", "surprise"],
        ),
        case(
            "a field of the wrong type",
            "deploy/wrongtype.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: many\n",
            &["deploy/wrongtype.yaml:"],
        ),
        case(
            "a Deployment the API refuses",
            "deploy/invalid.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: other}\n    spec:\n      containers: []\n",
            &["deploy/invalid.yaml:"],
        ),
        case(
            "a kustomization",
            "deploy/kustomization.yaml",
            "resources: [a.yaml]\n",
            &["kustomiz"],
        ),
        case(
            "a namespaced object in a namespace that does not exist",
            "deploy/elsewhere.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: no-such-namespace-here\n",
            &["deploy/elsewhere.yaml:", "no-such-namespace-here"],
        ),
        case(
            "a Secret with data that is not base64",
            "deploy/secret.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  password: \"not base64!\"\n",
            &["deploy/secret.yaml:"],
        ),
        case(
            "a port out of range",
            "deploy/port.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc\nspec:\n  ports:\n  - port: 70000\n",
            &["deploy/port.yaml:"],
        ),
        case(
            "a broken item of a List",
            "deploy/items.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: fine}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {}\n",
            &["deploy/items.yaml:"],
        ),
    ];
    cases.push(Case {
        name: "the same object twice",
        files: vec![
            ("deploy/a.yaml".into(), config_map("twice").into_bytes()),
            ("deploy/b.yaml".into(), config_map("twice").into_bytes()),
        ],
        names: vec!["deploy/b.yaml:".into(), "deploy/a.yaml:".into()],
        extra: Vec::new(),
    });
    cases.push(Case {
        name: "over the object budget",
        files: vec![(
            "deploy/forty.yaml".into(),
            (0..40)
                .map(|i| format!("---\n{}", config_map(&format!("c{i}"))))
                .collect::<String>()
                .into_bytes(),
        )],
        names: vec!["deploy/forty.yaml".into(), "--max-objects".into()],
        extra: vec!["--max-objects", "30"],
    });
    cases
}

#[test]
fn every_bad_input_is_a_clear_error_that_writes_nothing() {
    let ns = TestNamespace::new("bad-input");
    let corpus = corpus();
    assert!(
        corpus.len() >= 25,
        "a corpus of at least 25: {}",
        corpus.len()
    );
    let mut failures = Vec::new();
    for case in &corpus {
        let repo = GitRepo::new();
        repo.write("deploy/good.yaml", GOOD);
        for (path, content) in &case.files {
            let file = repo.path().join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, content).unwrap();
        }
        repo.commit(case.name);
        let mut args = vec![
            "sync",
            "--repo",
            repo.path_str(),
            "--path",
            "deploy",
            "-n",
            &ns.name,
            "--no-wait",
        ];
        args.extend(case.extra.iter().copied());
        let run = kommit(&args);
        let named = case.names.iter().all(|n| run.stderr.contains(n.as_str()));
        if run.code != 2 || !named {
            failures.push(format!(
                "{}: wanted exit 2 naming {:?}; {run:?}",
                case.name, case.names
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // Nothing at all was written, by any of them.
    let written = kubectl_ok(&[
        "get",
        "configmaps,deployments,pods,secrets,services",
        "-n",
        &ns.name,
        "-l",
        "kommit.dev/inventory",
        "-o",
        "name",
    ]);
    assert!(written.trim().is_empty(), "written: {written}");
}

#[test]
fn a_symlink_loop_and_a_link_out_of_the_repository_are_refused() {
    let ns = TestNamespace::new("bad-links");
    for (name, target) in [
        ("deploy/loop.yaml", "loop.yaml"),
        ("deploy/out.yaml", "/etc/passwd"),
    ] {
        let repo = GitRepo::new();
        repo.write("deploy/good.yaml", GOOD);
        std::os::unix::fs::symlink(target, repo.path().join(name)).unwrap();
        repo.commit("A bad link");
        let run = kommit(&[
            "sync",
            "--repo",
            repo.path_str(),
            "--path",
            "deploy",
            "-n",
            &ns.name,
        ]);
        assert_eq!(run.code, 2, "{run:?}");
        assert!(run.stderr.contains(name), "{run:?}");
    }
    let written = kubectl_ok(&[
        "get",
        "configmaps",
        "-n",
        &ns.name,
        "-l",
        "kommit.dev/inventory",
        "-o",
        "name",
    ]);
    assert!(written.trim().is_empty(), "written: {written}");
}
