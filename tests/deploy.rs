//! The deploy/ examples cannot run here (no Docker engine, no cluster, no
//! systemd), so this checks what can drift: every command is a subcommand the
//! binary accepts, every environment variable is one Kurier reads and its
//! value is accepted, ports and probe paths match the HTTP listener, the
//! stop timeouts exceed the shutdown grace, and the container runs as non-root.

use std::collections::BTreeMap;
use std::process::Command;

use kurier_daemon::config::{Config, Overrides};
use yaml_rust2::{Yaml, YamlLoader};

const EXAMPLE: &str = include_str!("../config.example.toml");

fn deploy(file: &str) -> String {
    let path = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(file: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&deploy(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The binary accepts `args` (checked with `--help`, which parses them first).
fn assert_subcommand(args: &[&str], origin: &str) {
    assert!(!args.is_empty(), "{origin}: no command");
    let ok = Command::new(env!("CARGO_BIN_EXE_kurier"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        ok,
        "{origin}: `kurier {}` is not a command of the binary",
        args.join(" ")
    );
}

/// Every name is read by Kurier (documented in config.example.toml), and the
/// values together form a configuration the daemon accepts.
fn assert_env(env: &BTreeMap<String, String>, origin: &str) -> Config {
    for name in env.keys() {
        let known = ["DATABASE_URL", "KAFKA_BROKERS", "KURIER_CONFIG"].contains(&name.as_str())
            || (name.starts_with("KURIER_") && EXAMPLE.contains(name.as_str()));
        assert!(
            known,
            "{origin}: environment variable {name} is not read by Kurier"
        );
    }
    let config = Config::from_toml("", env, &Overrides::default())
        .unwrap_or_else(|e| panic!("{origin}: configuration refused: {e}"));
    config
        .require_kafka()
        .unwrap_or_else(|e| panic!("{origin}: {e}"));
    config
}

fn http_port(config: &Config, origin: &str) -> u16 {
    config
        .http_addr
        .unwrap_or_else(|| panic!("{origin}: KURIER_HTTP_ADDR not set: no probes or metrics"))
        .port()
}

fn str_list(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| v.iter().map(scalar).collect())
        .unwrap_or_default()
}

fn scalar(y: &Yaml) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

#[test]
fn docker_compose_matches_the_binary() {
    let doc = &yaml("docker-compose.yml")[0];
    let services = doc["services"].as_hash().expect("services");
    for want in ["postgres", "kafka", "kurier", "kurier-migrate"] {
        assert!(
            services.contains_key(&Yaml::from_str(want)),
            "service {want} missing"
        );
    }
    let kafka_roles = scalar(&doc["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]);
    assert_eq!(
        kafka_roles, "broker,controller",
        "Kafka runs in KRaft mode, no ZooKeeper"
    );
    let mut kurier_services = 0;
    for (name, svc) in services {
        let name = scalar(name);
        let image = svc["image"].as_str().unwrap_or_default();
        if !image.starts_with("kurier") {
            continue;
        }
        kurier_services += 1;
        let origin = format!("docker-compose.yml service {name}");
        let args = str_list(&svc["command"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_subcommand(&args, &origin);
        let env: BTreeMap<String, String> = svc["environment"]
            .as_hash()
            .expect("environment map")
            .iter()
            .map(|(k, v)| (scalar(k), scalar(v)))
            .collect();
        if args == ["run"] {
            let config = assert_env(&env, &origin);
            let port = http_port(&config, &origin);
            let published = str_list(&svc["ports"]);
            assert!(
                published.iter().any(|p| p.ends_with(&format!(":{port}"))),
                "{origin}: HTTP port {port} not published ({published:?})"
            );
            let grace = svc["stop_grace_period"]
                .as_str()
                .expect("stop_grace_period");
            let secs: u64 = grace.trim_end_matches('s').parse().unwrap();
            assert!(
                secs * 1000 > config.shutdown_grace.as_millis() as u64,
                "{origin}: stop_grace_period must exceed the shutdown grace"
            );
            let deps = svc["depends_on"].as_hash().expect("depends_on");
            assert!(
                deps.contains_key(&Yaml::from_str("kurier-migrate")),
                "{origin}: runs after migrate"
            );
        } else {
            assert!(env.contains_key("DATABASE_URL"), "{origin}: DATABASE_URL");
        }
    }
    assert_eq!(kurier_services, 2);
}

#[test]
fn kubernetes_sidecar_matches_the_binary() {
    let docs = yaml("kubernetes/sidecar.yaml");
    let pod = &docs[0]["spec"]["template"]["spec"];
    let grace_secs = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let init = pod["initContainers"].as_vec().expect("initContainers");
    let containers = pod["containers"].as_vec().expect("containers");
    assert!(
        containers.len() >= 2,
        "a sidecar runs next to the application"
    );
    let mut checked = 0;
    for c in init.iter().chain(containers) {
        if !c["image"].as_str().unwrap_or_default().contains("/kurier:") {
            continue;
        }
        checked += 1;
        let origin = format!("sidecar.yaml container {}", c["name"].as_str().unwrap());
        let args = str_list(&c["args"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_subcommand(&args, &origin);
        let env: BTreeMap<String, String> = c["env"]
            .as_vec()
            .expect("env")
            .iter()
            .map(|e| {
                let name = e["name"].as_str().unwrap().to_owned();
                let value = match &e["value"] {
                    Yaml::BadValue => {
                        assert!(
                            e["valueFrom"]["secretKeyRef"]["name"].as_str().is_some(),
                            "{origin}: {name} has no value"
                        );
                        "postgres://kurier:from-secret@db:5432/app".to_owned()
                    }
                    v => scalar(v),
                };
                (name, value)
            })
            .collect();
        if args != ["run"] {
            assert!(env.contains_key("DATABASE_URL"), "{origin}: DATABASE_URL");
            continue;
        }
        let config = assert_env(&env, &origin);
        let port = http_port(&config, &origin);
        let declared: Vec<i64> = c["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .filter_map(|p| p["containerPort"].as_i64())
            .collect();
        assert!(
            declared.contains(&(port as i64)),
            "{origin}: containerPort {port} missing"
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{origin}: {probe} path");
            assert!(kurier_daemon::http::PATHS.contains(&path));
            assert_eq!(
                get["port"].as_i64(),
                Some(port as i64),
                "{origin}: {probe} port"
            );
        }
        for limit in ["cpu", "memory"] {
            assert!(
                c["resources"]["limits"][limit].as_str().is_some(),
                "{origin}: limits.{limit}"
            );
        }
        assert!(
            grace_secs * 1000 > config.shutdown_grace.as_millis() as i64,
            "{origin}: terminationGracePeriodSeconds must exceed the shutdown grace"
        );
    }
    assert_eq!(checked, 2, "the migrate init container and the sidecar");
}

#[test]
fn dockerfile_and_systemd_unit_match_the_binary() {
    let dockerfile = deploy("Dockerfile");
    let line = |instr: &str| -> Vec<String> {
        dockerfile
            .lines()
            .filter(|l| l.starts_with(instr))
            .map(|l| l[instr.len()..].trim().to_owned())
            .collect()
    };
    assert!(line("FROM ").len() >= 2, "multi-stage");
    let user = line("USER ").pop().expect("USER");
    assert!(
        user != "root" && user != "0",
        "runs as non-root, not {user}"
    );
    let env: BTreeMap<String, String> = line("ENV ")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .chain([
            ("DATABASE_URL".to_owned(), "postgres://u@db/app".to_owned()),
            ("KAFKA_BROKERS".to_owned(), "kafka:9092".to_owned()),
        ])
        .collect();
    let config = assert_env(&env, "Dockerfile");
    let port = http_port(&config, "Dockerfile");
    assert_eq!(
        line("EXPOSE ").pop(),
        Some(port.to_string()),
        "EXPOSE matches KURIER_HTTP_ADDR"
    );
    let cmd: Vec<String> = serde_json::from_str(&line("CMD ").pop().unwrap()).unwrap();
    assert_subcommand(
        &cmd.iter().map(String::as_str).collect::<Vec<_>>(),
        "Dockerfile CMD",
    );
    let entry: Vec<String> = serde_json::from_str(&line("ENTRYPOINT ").pop().unwrap()).unwrap();
    assert!(
        line("COPY ").iter().any(|c| c.ends_with(&entry[0])),
        "ENTRYPOINT {} is where the binary is copied",
        entry[0]
    );

    let unit = deploy("kurier.service");
    for l in unit.lines() {
        if let Some(cmd) = l
            .strip_prefix("ExecStartPre=")
            .or_else(|| l.strip_prefix("ExecStart="))
        {
            let mut words = cmd.split_whitespace();
            assert_eq!(words.next(), Some(entry[0].as_str()), "{l}");
            assert_subcommand(&words.collect::<Vec<_>>(), "kurier.service");
        }
        if let Some(kv) = l.strip_prefix("Environment=") {
            let (k, v) = kv.split_once('=').unwrap();
            let mut env = BTreeMap::from([
                ("DATABASE_URL".to_owned(), "postgres://u@db/app".to_owned()),
                ("KAFKA_BROKERS".to_owned(), "kafka:9092".to_owned()),
            ]);
            env.insert(k.to_owned(), v.to_owned());
            assert_env(&env, "kurier.service");
        }
        if let Some(secs) = l.strip_prefix("TimeoutStopSec=") {
            assert!(
                secs.parse::<u64>().unwrap() * 1000 > 10_000,
                "exceeds the default shutdown grace"
            );
        }
    }
    assert!(unit.contains("ExecStart=/usr/local/bin/kurier run"));
}
