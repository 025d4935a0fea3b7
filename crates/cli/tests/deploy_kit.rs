//! The operations kit (`deploy/`) checked against the code it deploys, so that a renamed
//! metric, port, probe path or configuration key breaks a test rather than a hospital's
//! dashboard or rollout:
//!
//! - the systemd unit passes `systemd-analyze verify` (with no warning) and agrees with the
//!   service configuration and the listeners' drain time;
//! - every metric the Grafana dashboard and the Prometheus alert rules name is exported by
//!   a running `passerelle serve` that has received, rejected, routed, mapped, failed to
//!   map, delivered, retried and dead-lettered messages;
//! - the Kubernetes manifests parse as YAML, their ConfigMap loads with the engine's own
//!   configuration loader and passes `passerelle check`, and their ports, probe paths,
//!   environment overrides and mounts agree with that configuration and a live engine;
//! - the container image's configuration passes `passerelle check`, and the Containerfile's
//!   stages, user, volume, ports and healthcheck agree with it (the healthcheck script is
//!   run against a live engine).
//!
//! No container runtime or cluster runs here: the image and manifests are checked by
//! structure, and every path or port they name is checked against the code that serves it.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use passerelle_engine::config::EngineConfig;
use passerelle_testkit::mllp::PeerProcess;
use passerelle_testkit::workspace_root;
use serde::Deserialize;
use serde_json::Value;

mod common;

fn repo_file(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn passerelle(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_passerelle"));
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

/// How long one listener drains on shutdown (the MLLP listener's default, which `serve
/// --config` keeps): stop timeouts must leave at least that per listener.
fn listener_drain() -> Duration {
    passerelle_mllp::ListenerConfig::new("127.0.0.1:0".parse().unwrap()).shutdown_grace
}

fn port_of(bind: &str) -> u16 {
    bind.rsplit(':').next().unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// A live engine and its admin API.

struct Engine {
    process: PeerProcess,
    mllp: String,
    admin: String,
}

fn start_engine(config: &Path) -> Engine {
    let (process, mllp, admin) = common::start_with_env(config, &[]);
    Engine {
        process,
        mllp,
        admin,
    }
}

/// Whether `/metrics` has a sample of `family` with `label_value` (e.g. `state="dead"`)
/// and a value above zero. Independent of the family's other labels.
fn has_positive_sample(metrics: &str, family: &str, label_value: &str) -> bool {
    metrics.lines().any(|line| {
        line.strip_prefix(family)
            .is_some_and(|rest| rest.starts_with('{') && rest.contains(label_value))
            && line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
    })
}

/// The metric names a scrape exports: the name of every sample (a histogram's samples are
/// its `_bucket`, `_sum` and `_count`). A family declared by `# TYPE` without any sample
/// does not count: a panel on it would stay empty.
fn exported_names(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// Every `passerelle_[a-z_]+` token in a file (PromQL expressions, variable queries): the
/// whole text is scanned, so a metric named anywhere in the file must exist.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("passerelle_") {
        let start = from + at;
        let glued = text[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if !glued {
            names.insert(text[start..end].to_owned());
        }
        from = end;
    }
    names
}

/// Sends one raw MLLP frame and returns the ACK's text.
fn send_frame(addr: &str, payload: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut frame = vec![0x0b];
    frame.extend_from_slice(payload);
    frame.extend_from_slice(&[0x1c, 0x0d]);
    stream.write_all(&frame).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap() == 1 {
        answer.push(byte[0]);
        if answer.ends_with(&[0x1c, 0x0d]) {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// An address nothing listens on: bound, then released.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    addr
}

// ---------------------------------------------------------------------------------------
// Test 1: the systemd unit.

fn unit_value<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .collect()
}

fn seconds(value: &str) -> u64 {
    value.trim_end_matches('s').parse().unwrap()
}

#[test]
fn systemd_unit_verifies_and_matches_the_service_configuration() {
    let unit = repo_file("deploy/systemd/passerelle.service");
    let exec_start = unit_value(&unit, "ExecStart");
    assert_eq!(exec_start.len(), 1, "one ExecStart");
    let binary = exec_start[0].split_whitespace().next().unwrap();

    // `systemd-analyze verify` checks that ExecStart's binary exists and is executable:
    // a copy of the unit, named the same, points at the binary just built.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("passerelle.service");
    std::fs::write(
        &copy,
        unit.replace(binary, env!("CARGO_BIN_EXE_passerelle")),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze is needed (apt-get install systemd; .ci/run does): {e}")
        });
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}",
        verify.status
    );

    // The hardening holds: systemd's own exposure score (0 best, 10 worst) stays at or
    // below 2.0 ("OK").
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        security.status.success(),
        "exposure above 2.0:\n{}",
        String::from_utf8_lossy(&security.stdout)
    );
    for (key, expected) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(unit_value(&unit, key), [expected], "{key}");
    }

    // The unit runs the configuration it is meant for: the service configuration
    // (deploy/container/passerelle.toml, installed as /etc/passerelle/passerelle.toml).
    let service_config = workspace_root().join("deploy/container/passerelle.toml");
    let config = EngineConfig::load_with_env(Some(&service_config), Some(HashMap::new())).unwrap();
    assert!(
        exec_start[0].ends_with("serve --config /etc/passerelle/passerelle.toml"),
        "{}",
        exec_start[0]
    );
    let state = format!("/var/lib/{}", unit_value(&unit, "StateDirectory")[0]);
    let writable = unit_value(&unit, "ReadWritePaths");
    assert!(writable.contains(&state.as_str()), "{writable:?}");
    assert!(
        config.store.path.starts_with(&state),
        "the store ({}) is in the writable state directory {state}",
        config.store.path.display()
    );

    // The stop timeout leaves every listener its drain, and the store its final flush.
    let stop = seconds(unit_value(&unit, "TimeoutStopSec")[0]);
    let drain = listener_drain().as_secs() * config.listeners.len() as u64;
    assert!(
        stop > drain,
        "TimeoutStopSec={stop} must exceed the drain ({drain} s)"
    );

    // The account the unit runs as is the one passerelle.sysusers creates.
    let user = unit_value(&unit, "User")[0];
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let sysusers = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(workspace_root().join("deploy/systemd/passerelle.sysusers"))
        .output()
        .unwrap();
    assert!(
        sysusers.status.success(),
        "{}",
        String::from_utf8_lossy(&sysusers.stderr)
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .unwrap_or_else(|| panic!("sysusers creates {user}: {passwd}"));
    assert!(
        entry.ends_with(&format!(":{state}:/usr/sbin/nologin")),
        "{entry}"
    );
}

// ---------------------------------------------------------------------------------------
// Test 2: the dashboard's and alert rules' metrics exist.

const ADT_ROUTE: &str = r#"name = "adt"
mapping = "v2-to-fhir"
[match]
message_type = "ADT"
[[destinations]]
name = "files"
type = "ndjson"
dir = "out"
[[destinations]]
name = "downstream"
type = "mllp"
peer = "PEER"
connect_timeout_s = 1
[destinations.retry]
initial_backoff_ms = 20
max_backoff_ms = 40
max_attempts = 2
"#;

/// A route whose messages the pack has no message map for: they fail to map.
const UNMAPPABLE_ROUTE: &str = "name = \"zz\"\nmapping = \"v2-to-fhir\"\n[match]\nmessage_type = \"ZZZ\"\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";

const UNMAPPABLE: &str = "MSH|^~\\&|TESTAPP|TESTFAC|RCV|RCVFAC|20250101120000||ZZZ^Z01|ZZ0001|P|2.5\rEVN|Z01|20250101120000\r";

#[test]
fn dashboard_and_alerts_use_only_metrics_a_running_engine_exports() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::setup(dir.path(), &ADT_ROUTE.replace("PEER", &closed_port()), "");
    std::fs::write(dir.path().join("routes.d/20-zz.toml"), UNMAPPABLE_ROUTE).unwrap();
    let engine = start_engine(&config);

    // Received, mapped, delivered to the files, retried then dead on the closed peer.
    let adt = workspace_root().join("fixtures/hl7/adt_a01_admit.hl7");
    let sent = passerelle(&["send", adt.to_str().unwrap(), "--to", &engine.mllp], &[]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    // Unrouted (no route takes ORU; accepted, as [defaults] unrouted says by default).
    let oru = workspace_root().join("fixtures/hl7/oru_r01_v23.hl7");
    let sent = passerelle(&["send", oru.to_str().unwrap(), "--to", &engine.mllp], &[]);
    assert!(sent.status.success());
    // Routed, but no message map: mapping failed.
    assert!(send_frame(&engine.mllp, UNMAPPABLE.as_bytes()).contains("MSA|AA|ZZ0001"));
    // Not HL7 at all: rejected.
    assert!(send_frame(&engine.mllp, b"this is not an HL7 message").contains("MSA|AR"));

    // The store's gauges say when all of that has happened.
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let (status, body) = common::http_get(&engine.admin, "/metrics", None);
        assert_eq!(status, 200);
        if has_positive_sample(&body, "passerelle_deliveries", "state=\"delivered\"")
            && has_positive_sample(&body, "passerelle_deliveries", "state=\"dead\"")
            && has_positive_sample(&body, "passerelle_messages", "state=\"mapping_failed\"")
            && has_positive_sample(&body, "passerelle_messages", "state=\"rejected\"")
            && has_positive_sample(&body, "passerelle_messages", "state=\"unrouted\"")
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the engine never delivered, dead-lettered, rejected, left unrouted and failed to map:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50)); // polls the observable gauges
    };
    common::stop(engine.process);

    let exported = exported_names(&metrics);
    let mut missing = BTreeMap::new();
    for file in [
        "deploy/grafana/passerelle.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let used = metric_names_in(&repo_file(file));
        assert!(used.len() >= 8, "{file} names only {used:?}");
        let absent: Vec<String> = used.difference(&exported).cloned().collect();
        if !absent.is_empty() {
            missing.insert(file, absent);
        }
    }
    assert!(
        missing.is_empty(),
        "metrics used but not exported: {missing:#?}\nexported: {exported:#?}"
    );
}

#[test]
fn metric_names_are_read_from_promql_and_from_the_exposition_format() {
    let used = metric_names_in(
        "sum by (le) (rate(passerelle_ack_latency_seconds_bucket{listener=~\"$l\"}[5m])) / passerelle_up and my_passerelle_x",
    );
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["passerelle_ack_latency_seconds_bucket", "passerelle_up"]
    );
    let exported = exported_names(
        "# HELP h a histogram\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 0.5\nh_count 1\n# TYPE g gauge\ng{a=\"b\"} 2\nc_total 3\n# TYPE empty counter\n",
    );
    assert_eq!(
        exported.into_iter().collect::<Vec<_>>(),
        ["c_total", "g", "h_bucket", "h_count", "h_sum"]
    );
}

#[test]
fn the_dashboard_takes_its_datasource_from_a_variable() {
    let dashboard: Value =
        serde_json::from_str(&repo_file("deploy/grafana/passerelle.json")).unwrap();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let reference = format!("${{{}}}", datasource["name"].as_str().unwrap());
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], reference,
            "panel {}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], reference);
            let expr = target["expr"].as_str().unwrap();
            assert!(balanced(expr), "unbalanced brackets: {expr}");
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
}

/// Whether (), [] and {} nest properly outside quoted strings: a cheap syntax check.
fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut in_string = false;
    for c in expr.chars() {
        match c {
            '"' => in_string = !in_string,
            _ if in_string => {}
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = stack.pop();
                if open
                    != Some(match c {
                        ')' => '(',
                        ']' => '[',
                        _ => '{',
                    })
                {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && !in_string
}

#[test]
fn alert_rules_are_well_formed() {
    let docs = yaml_documents(&repo_file("deploy/prometheus/alerts.yml"));
    assert_eq!(docs.len(), 1);
    let mut alerts = BTreeSet::new();
    for group in docs[0]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(alerts.insert(name.to_owned()), "{name} twice");
            let expr = rule["expr"].as_str().unwrap();
            assert!(balanced(expr), "{name}: {expr}");
            assert!(
                matches!(
                    rule["labels"]["severity"].as_str(),
                    Some("critical" | "warning" | "info")
                ),
                "{name}"
            );
            assert!(rule["annotations"]["summary"].is_string(), "{name}");
            let runbook = rule["annotations"]["runbook_url"].as_str().unwrap();
            let anchor = runbook.split_once('#').unwrap().1;
            assert!(
                runbook_anchors().contains(anchor),
                "{name}: no section #{anchor} in docs/runbook.md"
            );
        }
    }
    for needed in [
        "PasserelleDown",
        "PasserelleNotReady",
        "PasserelleDeadLetterGrowing",
        "PasserelleQueueStale",
        "PasserelleDestinationFailing",
        "PasserelleStoreGrowing",
    ] {
        assert!(alerts.contains(needed), "{needed}");
    }
}

/// The runbook's section anchors, as GitHub-style renderers make them.
fn runbook_anchors() -> BTreeSet<String> {
    repo_file("docs/runbook.md")
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|title| {
            title
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Test 3: the Kubernetes manifests.

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kubernetes_objects() -> Vec<(String, Value)> {
    let dir = workspace_root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for doc in yaml_documents(&std::fs::read_to_string(&file).unwrap()) {
            objects.push((name.clone(), doc));
        }
    }
    objects
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && (name.is_empty() || o["metadata"]["name"] == name))
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn array<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("{what} is a list"))
}

/// The files a ConfigMap volume puts in its mount: (path under the mount, content).
fn configmap_files(volume: &Value, configmap: &Value) -> Vec<(String, String)> {
    let items = array(&volume["configMap"]["items"], "configMap.items");
    let data = configmap["data"].as_object().unwrap();
    assert_eq!(
        items.len(),
        data.len(),
        "every ConfigMap key is placed by the volume's items"
    );
    items
        .iter()
        .map(|item| {
            let key = item["key"].as_str().unwrap();
            let content = data[key].as_str().unwrap_or_else(|| panic!("no key {key}"));
            (
                item["path"].as_str().unwrap().to_owned(),
                content.to_owned(),
            )
        })
        .collect()
}

/// The configuration file `container` runs (`serve --config FILE`), rebuilt from the
/// ConfigMap `configmap` as the `config` volume places it under the container's mount:
/// the folder that holds the files, and FILE in it.
fn mounted_config(
    container: &Value,
    config_volume: &Value,
    configmap: &Value,
) -> (tempfile::TempDir, PathBuf) {
    let args: Vec<&str> = array(&container["args"], "args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..2], ["serve", "--config"]);
    let mount_path = array(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap()["mountPath"]
        .as_str()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in configmap_files(config_volume, configmap) {
        let file = dir.path().join(&path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
    }
    let config_file = dir
        .path()
        .join(Path::new(args[2]).strip_prefix(mount_path).unwrap());
    (dir, config_file)
}

/// Runs `passerelle check` with `args`, the container's `overrides` and the packs the
/// image ships taken from the repository; it must pass.
fn assert_check_passes(args: &[&str], overrides: &HashMap<String, String>) {
    let mappings = workspace_root().join("mappings");
    let mut check_env: Vec<(&str, &str)> = overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    check_env.push(("PASSERELLE__PATHS__MAPPINGS", mappings.to_str().unwrap()));
    let check = passerelle(args, &check_env);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The container's ports by name, each over TCP.
fn container_ports(container: &Value) -> BTreeMap<String, u64> {
    array(&container["ports"], "ports")
        .iter()
        .map(|p| {
            assert_eq!(p["protocol"], "TCP");
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The probes: liveness and startup on /health, readiness on /ready, on the admin port.
/// Returns the paths they ask.
fn assert_probes(container: &Value) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    for (probe, path) in [
        ("livenessProbe", "/health"),
        ("readinessProbe", "/ready"),
        ("startupProbe", "/health"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "admin", "{probe}");
        paths.insert(path.to_owned());
    }
    paths
}

#[test]
fn kubernetes_manifests_agree_with_the_engine() {
    let objects = kubernetes_objects();

    // kustomization.yaml lists every manifest but the maintenance pod.
    let kustomization = find(&objects, "Kustomization", "");
    let listed: BTreeSet<String> = array(&kustomization["resources"], "resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let files: BTreeSet<String> = objects
        .iter()
        .map(|(f, _)| f.clone())
        .filter(|f| f != "kustomization.yaml" && f != "ops-pod.yaml")
        .collect();
    assert_eq!(listed, files);

    let sts = find(&objects, "StatefulSet", "passerelle");
    let spec = &sts["spec"];
    assert_eq!(spec["replicas"], 1, "one writer per sled store");
    let pod = &spec["template"]["spec"];
    let containers = array(&pod["containers"], "containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // The configuration the pod mounts, rebuilt as files and loaded by the engine.
    let volumes = array(&pod["volumes"], "volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let config_volume = volume("config");
    let configmap = find(
        &objects,
        "ConfigMap",
        config_volume["configMap"]["name"].as_str().unwrap(),
    );
    let (_dir, config_file) = mounted_config(container, config_volume, configmap);

    // The container's PASSERELLE__SECTION__KEY overrides name keys that exist (the loader
    // refuses unknown ones, as the negative case shows).
    let env = array(&container["env"], "env");
    let overrides: HashMap<String, String> = env
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with("PASSERELLE__"))
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(!overrides.is_empty());
    let config = EngineConfig::load_with_env(Some(&config_file), Some(overrides.clone()))
        .unwrap_or_else(|e| panic!("the ConfigMap's passerelle.toml with the pod's env: {e}"));
    let mut unknown = overrides.clone();
    unknown.insert("PASSERELLE__STORE__NO_SUCH_KEY".into(), "1".into());
    assert!(EngineConfig::load_with_env(Some(&config_file), Some(unknown)).is_err());
    let token_variable = env
        .iter()
        .find(|e| e["valueFrom"]["secretKeyRef"].is_object())
        .unwrap();
    assert_eq!(token_variable["name"], config.admin.token_env.as_str());

    // `passerelle check` agrees (routes, packs, destinations), with the packs the image
    // ships taken from the repository.
    assert_eq!(
        config.paths.mappings,
        image_destination_of("mappings"),
        "the config reads the packs where the image puts them"
    );
    let mappings = workspace_root().join("mappings");
    assert_check_passes(
        &[
            "check",
            "--mappings",
            mappings.to_str().unwrap(),
            "--config",
            config_file.to_str().unwrap(),
        ],
        &overrides,
    );

    // Ports: one containerPort per listener and one for the admin API, at the config's.
    let ports = container_ports(container);
    let admin_port = u64::from(port_of(&config.admin.bind));
    assert_eq!(ports["admin"], admin_port);
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(ports["mllp"], u64::from(port_of(&config.listeners[0].bind)));
    assert_eq!(ports.len(), 1 + config.listeners.len());

    // Probes: liveness and startup on /health, readiness on /ready, on the admin port.
    let mut probe_paths = assert_probes(container);
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    probe_paths.insert(
        annotations["prometheus.io/path"]
            .as_str()
            .unwrap()
            .to_owned(),
    );

    // Services: each targets a named container port, at the same number, and selects the
    // pod; the StatefulSet's serviceName is one of them.
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels);
    let services: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == "Service")
        .collect();
    let mut served = BTreeSet::new();
    for service in &services {
        assert_eq!(&service["spec"]["selector"], labels);
        for p in array(&service["spec"]["ports"], "service ports") {
            let target = p["targetPort"].as_str().unwrap();
            assert_eq!(p["port"].as_u64(), Some(ports[target]), "{target}");
            assert_eq!(p["protocol"], "TCP");
            served.insert(target.to_owned());
        }
    }
    assert_eq!(
        served,
        BTreeSet::from(["admin".to_owned(), "mllp".to_owned()])
    );
    assert!(
        services
            .iter()
            .any(|s| s["metadata"]["name"] == spec["serviceName"])
    );

    // The store and the NDJSON output are on the persistent volume.
    let claim = &array(&spec["volumeClaimTemplates"], "volumeClaimTemplates")[0];
    let claim_name = claim["metadata"]["name"].as_str().unwrap();
    let data_mount = array(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["name"] == claim_name)
        .unwrap()["mountPath"]
        .as_str()
        .unwrap();
    assert!(config.store.path.starts_with(data_mount));
    for (path, content) in configmap_files(config_volume, configmap) {
        if path.starts_with("routes.d/") {
            let route: toml::Table = toml::from_str(&content).unwrap();
            for d in route["destinations"].as_array().unwrap() {
                if let Some(out) = d.get("dir").and_then(|v| v.as_str()) {
                    assert!(out.starts_with(data_mount), "{path}: {out}");
                }
            }
        }
    }

    // Non-root, read-only root filesystem, no privilege escalation, a drain-long grace.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > listener_drain().as_secs() * config.listeners.len() as u64);

    // The TLS Secret the pod mounts exists.
    let tls = volume("tls");
    find(
        &objects,
        "Secret",
        tls["secret"]["secretName"].as_str().unwrap(),
    );

    // The maintenance pod opens the StatefulSet's claim with the same configuration.
    let ops = find(&objects, "Pod", "passerelle-ops");
    let ops_volumes = array(&ops["spec"]["volumes"], "ops volumes");
    let ops_claim = ops_volumes.iter().find(|v| v["name"] == "data").unwrap();
    assert_eq!(
        ops_claim["persistentVolumeClaim"]["claimName"],
        format!(
            "{claim_name}-{}-0",
            sts["metadata"]["name"].as_str().unwrap()
        )
    );
    let ops_config = ops_volumes.iter().find(|v| v["name"] == "config").unwrap();
    assert_eq!(ops_config["configMap"], config_volume["configMap"]);

    // Every HTTP path the manifests probe or scrape answers 200 on a live engine.
    let dir = tempfile::tempdir().unwrap();
    let route = "name = \"r\"\nmapping = \"v2-to-fhir\"\ndefault = true\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";
    let engine = start_engine(&common::setup(dir.path(), route, ""));
    for path in &probe_paths {
        assert_eq!(common::http_get(&engine.admin, path, None).0, 200, "{path}");
    }
    common::stop(engine.process);
}

/// The overlay's objects, by file, and its kustomization.
fn overlay_objects() -> (Vec<(String, Value)>, Value) {
    let dir = workspace_root().join("deploy/kubernetes-postgres");
    let mut objects = Vec::new();
    let mut kustomization = Value::Null;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for doc in yaml_documents(&std::fs::read_to_string(&path).unwrap()) {
            if name == "kustomization.yaml" {
                kustomization = doc;
            } else {
                objects.push((name.clone(), doc));
            }
        }
    }
    (objects, kustomization)
}

#[test]
fn kubernetes_postgres_overlay_agrees_with_the_engine() {
    let base = kubernetes_objects();
    let (objects, kustomization) = overlay_objects();

    // Every file of the overlay is a resource or a patch, and the base is its first
    // resource; it deletes the base's StatefulSet (the sled volume goes with it).
    let resources: Vec<&str> = array(&kustomization["resources"], "resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(resources[0], "../kubernetes");
    let patches = array(&kustomization["patches"], "patches");
    let mut used: BTreeSet<&str> = resources[1..].iter().copied().collect();
    used.extend(patches.iter().filter_map(|p| p["path"].as_str()));
    let files: BTreeSet<&str> = objects.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(used, files);
    let sts = find(&base, "StatefulSet", "");
    assert!(patches.iter().any(|p| {
        p["patch"].as_str().is_some_and(|text| {
            let doc = &yaml_documents(text)[0];
            doc["$patch"] == "delete"
                && doc["kind"] == "StatefulSet"
                && doc["metadata"]["name"] == sts["metadata"]["name"]
        })
    }));
    assert_eq!(
        kustomization["namespace"],
        find(&base, "Kustomization", "")["namespace"]
    );

    // The ConfigMap as kustomize merges it: the patch's keys over the base's, null drops.
    let patch = &objects
        .iter()
        .find(|(f, _)| f == "configmap-patch.yaml")
        .unwrap()
        .1;
    let mut configmap = find(
        &base,
        "ConfigMap",
        patch["metadata"]["name"].as_str().unwrap(),
    )
    .clone();
    let data = configmap["data"].as_object_mut().unwrap();
    for (key, value) in patch["data"].as_object().unwrap() {
        if value.is_null() {
            assert!(
                data.remove(key).is_some(),
                "the patch drops {key}, absent from the base"
            );
        } else {
            data.insert(key.clone(), value.clone());
        }
    }

    let deployment = &objects
        .iter()
        .find(|(_, o)| o["kind"] == "Deployment")
        .unwrap()
        .1;
    let spec = &deployment["spec"];
    assert!(spec["replicas"].as_u64().unwrap() >= 2, "several nodes");
    let pod = &spec["template"]["spec"];
    let container = &array(&pod["containers"], "containers")[0];
    let volumes = array(&pod["volumes"], "volumes");
    let config_volume = volumes.iter().find(|v| v["name"] == "config").unwrap();
    assert!(
        volumes
            .iter()
            .all(|v| v.get("persistentVolumeClaim").is_none()),
        "the nodes keep nothing"
    );
    let (_dir, config_file) = mounted_config(container, config_volume, &configmap);

    // The environment: literal values, and Secret keys that the overlay's Secrets hold.
    let mut env: HashMap<String, String> = HashMap::new();
    for e in array(&container["env"], "env") {
        let name = e["name"].as_str().unwrap().to_owned();
        if let Some(value) = e["value"].as_str() {
            env.insert(name, value.to_owned());
            continue;
        }
        let reference = &e["valueFrom"]["secretKeyRef"];
        let secret = objects
            .iter()
            .chain(base.iter())
            .map(|(_, o)| o)
            .find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == reference["name"]);
        match secret {
            Some(secret) => {
                let value = secret["stringData"][reference["key"].as_str().unwrap()]
                    .as_str()
                    .unwrap_or_else(|| panic!("{reference}: no such key"));
                env.insert(name, value.to_owned());
            }
            None => assert_eq!(reference["optional"], true, "{reference}: no such Secret"),
        }
    }
    assert!(env.contains_key("PASSERELLE__STORE__URL"));
    assert!(env.contains_key("PGPASSWORD"));
    let overrides: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("PASSERELLE__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let config = EngineConfig::load_with_env(Some(&config_file), Some(overrides.clone()))
        .unwrap_or_else(|e| panic!("the overlay's passerelle.toml with the pod's env: {e}"));
    assert_eq!(config.store.backend, "postgres");

    // `passerelle check` accepts it, routes and destinations included (it does not
    // connect to the database).
    assert_check_passes(
        &["check", "--config", config_file.to_str().unwrap()],
        &overrides,
    );

    // Ports, probes, the drain and the hardening, as in the base.
    let ports = container_ports(container);
    assert_eq!(ports["admin"], u64::from(port_of(&config.admin.bind)));
    assert_eq!(ports["mllp"], u64::from(port_of(&config.listeners[0].bind)));
    assert_probes(container);
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels);
    for service in base
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == "Service")
    {
        assert_eq!(
            &service["spec"]["selector"], labels,
            "the base's Services select the pods"
        );
    }
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > listener_drain().as_secs() * config.listeners.len() as u64);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let images = array(&kustomization["images"], "images");
    assert_eq!(images[0]["name"], container["image"]);
}

// ---------------------------------------------------------------------------------------
// Test 4: the container image.

/// The Containerfile's instructions (continuation lines joined, comments dropped), by
/// stage.
fn containerfile_stages() -> Vec<Vec<(String, String)>> {
    let text = repo_file("deploy/container/Containerfile");
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(part) = line.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
        } else {
            current.push_str(line);
            if !current.trim().is_empty() {
                joined.push(std::mem::take(&mut current));
            }
            current.clear();
        }
    }
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for instruction in joined {
        let (keyword, rest) = instruction.split_once(' ').unwrap();
        let keyword = keyword.to_uppercase();
        if keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Containerfile starts with FROM")
            .push((keyword, rest.trim().to_owned()));
    }
    stages
}

fn instructions<'a>(stage: &'a [(String, String)], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, r)| r.as_str())
        .collect()
}

/// A JSON-array (exec form) instruction argument.
fn exec_form(rest: &str) -> Vec<String> {
    serde_json::from_str(rest).unwrap_or_else(|e| panic!("{rest}: not exec form: {e}"))
}

/// Where the final stage's `COPY <source> <dest>` puts a repository path.
fn image_destination_of(source: &str) -> PathBuf {
    let stages = containerfile_stages();
    instructions(stages.last().unwrap(), "COPY")
        .into_iter()
        .filter(|c| !c.starts_with("--from"))
        .find_map(|c| {
            let parts: Vec<&str> = c.split_whitespace().collect();
            (parts.len() == 2 && parts[0] == source).then(|| PathBuf::from(parts[1]))
        })
        .unwrap_or_else(|| panic!("the image does not COPY {source}"))
}

#[test]
fn container_image_structure_matches_its_configuration() {
    let stages = containerfile_stages();
    assert!(stages.len() >= 2, "multi-stage");
    let builder = &stages[0];
    let builder_from = instructions(builder, "FROM")[0];
    assert!(
        builder_from.starts_with("rust:") && builder_from.ends_with("AS builder"),
        "{builder_from}"
    );
    assert!(
        instructions(builder, "RUN")
            .iter()
            .any(|r| r.contains("cargo build --release --locked -p passerelle-cli")),
        "the builder compiles the release binary from the lock file"
    );
    let runtime = stages.last().unwrap();
    let runtime_from = instructions(runtime, "FROM")[0];
    assert!(
        runtime_from.starts_with("debian:") && runtime_from.contains("-slim"),
        "{runtime_from}"
    );
    assert!(
        instructions(runtime, "COPY")
            .iter()
            .any(|c| c.starts_with("--from=builder ")),
        "the binary comes from the builder"
    );
    // Every repository path the image copies exists.
    for stage in &stages {
        for copy in instructions(stage, "COPY") {
            if copy.starts_with("--from") {
                continue;
            }
            let parts: Vec<&str> = copy.split_whitespace().collect();
            for source in &parts[..parts.len() - 1] {
                assert!(workspace_root().join(source).exists(), "COPY {source}");
            }
        }
    }

    // A non-root user, by number (Kubernetes' runAsNonRoot checks numbers).
    let user = instructions(runtime, "USER");
    assert_eq!(user.len(), 1);
    let uid: u32 = user[0].split(':').next().unwrap().parse().unwrap();
    assert_ne!(uid, 0);

    // The baked-in configuration: CMD runs it, it passes `passerelle check`, and its
    // store, output, ports and packs agree with the image.
    let cmd = exec_form(instructions(runtime, "CMD")[0]);
    assert_eq!(cmd[..2], ["serve", "--config"]);
    assert_eq!(
        PathBuf::from(&cmd[2]),
        image_destination_of("deploy/container/passerelle.toml")
    );
    let source = workspace_root().join("deploy/container/passerelle.toml");
    let config = EngineConfig::load_with_env(Some(&source), Some(HashMap::new())).unwrap();
    let mappings = workspace_root().join("mappings");
    let check = passerelle(
        &[
            "check",
            "--mappings",
            mappings.to_str().unwrap(),
            "--config",
            source.to_str().unwrap(),
        ],
        &[("PASSERELLE__PATHS__MAPPINGS", mappings.to_str().unwrap())],
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(config.paths.mappings, image_destination_of("mappings"));
    let config_dir = Path::new(&cmd[2]).parent().unwrap();
    assert_eq!(
        config_dir.join(
            config
                .paths
                .routes
                .strip_prefix(source.parent().unwrap())
                .unwrap()
        ),
        image_destination_of("deploy/container/routes.d")
    );

    let volumes = exec_form(instructions(runtime, "VOLUME")[0]);
    assert_eq!(volumes, ["/var/lib/passerelle"]);
    assert!(config.store.path.starts_with(&volumes[0]));
    for route in std::fs::read_dir(workspace_root().join("deploy/container/routes.d")).unwrap() {
        let route: toml::Table =
            toml::from_str(&std::fs::read_to_string(route.unwrap().path()).unwrap()).unwrap();
        for d in route["destinations"].as_array().unwrap() {
            if let Some(out) = d.get("dir").and_then(|v| v.as_str()) {
                assert!(out.starts_with(&volumes[0]), "{out} is in the volume");
            }
        }
    }

    let exposed: BTreeSet<u16> = instructions(runtime, "EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    let mut configured: BTreeSet<u16> = config.listeners.iter().map(|l| port_of(&l.bind)).collect();
    configured.insert(port_of(&config.admin.bind));
    assert_eq!(exposed, configured);
    for l in &config.listeners {
        assert!(l.bind.starts_with("0.0.0.0:"), "reachable from outside");
    }
    assert!(config.admin.bind.starts_with("0.0.0.0:"));

    // The healthcheck is the script the image installs, run against a live engine: it
    // passes while the engine runs and fails once it has stopped.
    let healthcheck = instructions(runtime, "HEALTHCHECK")[0];
    let (_, command) = healthcheck.split_once("CMD ").unwrap();
    let command = exec_form(command);
    assert_eq!(
        PathBuf::from(&command[0]),
        image_destination_of("deploy/container/healthcheck.sh")
    );
    let script = workspace_root().join("deploy/container/healthcheck.sh");
    let mode = std::os::unix::fs::PermissionsExt::mode(&script.metadata().unwrap().permissions());
    assert_ne!(mode & 0o111, 0, "the script is executable");
    let dir = tempfile::tempdir().unwrap();
    let route = "name = \"r\"\nmapping = \"v2-to-fhir\"\ndefault = true\n[[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n";
    let engine = start_engine(&common::setup(dir.path(), route, ""));
    let run_healthcheck = |admin: &str| {
        Command::new(&script)
            .env("PASSERELLE__ADMIN__BIND", admin)
            .output()
            .unwrap()
    };
    let healthy = run_healthcheck(&engine.admin);
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    let admin = engine.admin.clone();
    common::stop(engine.process);
    assert!(!run_healthcheck(&admin).status.success());
}
