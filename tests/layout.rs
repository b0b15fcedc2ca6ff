//! The crate boundary and the test registry hold: `kurier` (what
//! applications link) depends on no Kafka, HTTP, CLI or allocator crate,
//! and every test file in tests/ is a target of daemon/Cargo.toml (none is
//! silently left out of `make test`).

use std::process::Command;

fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("daemon/ is in the workspace")
        .to_path_buf()
}

fn cargo_tree(package: &str, edges: &str) -> String {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            edges,
            "--prefix",
            "none",
        ])
        .current_dir(workspace())
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn crates(tree: &str) -> Vec<String> {
    tree.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_library_links_no_kafka_http_cli_or_allocator() {
    let deps = crates(&cargo_tree("kurier", "normal"));
    assert!(deps.contains(&"sqlx".to_string()), "{deps:?}");
    for banned in [
        "rdkafka",
        "rdkafka-sys",
        "axum",
        "hyper",
        "clap",
        "mimalloc",
        "toml",
    ] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "kurier depends on {banned}"
        );
    }
}

#[test]
fn a_service_on_the_library_alone_builds_nothing_with_cmake() {
    let deps = crates(&cargo_tree("order-service", "normal,build"));
    assert!(deps.contains(&"kurier".to_string()), "{deps:?}");
    for banned in ["cmake", "rdkafka-sys", "libmimalloc-sys", "kurier-daemon"] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "order-service pulls in {banned}"
        );
    }
}

#[test]
fn every_test_file_is_a_target_of_the_daemon_package() {
    let manifest = std::fs::read_to_string(workspace().join("daemon/Cargo.toml")).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(workspace().join("tests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".rs"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    for f in files {
        let entry = format!("path = \"../tests/{f}\"");
        assert!(
            manifest.contains(&entry),
            "tests/{f} is not listed in daemon/Cargo.toml ([[test]] {entry})"
        );
    }
}

/// ARCHITECTURE.md: only `store` modules and `schema` hold SQL; the daemon none.
#[test]
fn only_store_modules_and_schema_run_sql() {
    let mut offenders = Vec::new();
    for dir in ["src", "daemon/src"] {
        let mut stack = vec![workspace().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path
                    .strip_prefix(workspace())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let allowed = rel.starts_with("src/")
                    && (rel.contains("/store") || rel.starts_with("src/schema/"));
                let text = std::fs::read_to_string(&path).unwrap();
                if !allowed && (text.contains("sqlx::query") || text.contains("sqlx::raw_sql")) {
                    offenders.push(rel);
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "SQL outside the store modules: {offenders:?}"
    );
}
