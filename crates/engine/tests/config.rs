//! Configuration and routes: the repository's own files load; every kind of mistake is
//! reported with file:line:column and the field; routes select as documented.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure with its message

use std::collections::HashMap;
use std::path::Path;

use passerelle_engine::config::EngineConfig;
use passerelle_engine::routes::RouteTable;
use passerelle_engine::{ConfigErrors, known_packs};
use passerelle_hl7::{HeaderSummary, Message};
use passerelle_testkit::workspace_root;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn packs() -> Vec<String> {
    vec!["v2-to-fhir".into(), "fr".into()]
}

fn listeners() -> Vec<String> {
    vec!["main".into()]
}

/// Loads one route file and returns its errors as "file-name:line:column field message".
fn route_errors(text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-r.toml", text);
    let errors = RouteTable::load(dir.path(), &packs(), &listeners()).unwrap_err();
    render(&errors)
}

/// The errors of a passerelle.toml holding `text`, no environment overrides, rendered.
fn config_errors(text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "passerelle.toml", text);
    let errors = EngineConfig::load_with_env(
        Some(&dir.path().join("passerelle.toml")),
        Some(HashMap::new()),
    )
    .unwrap_err();
    render(&errors)
}

/// Each error starts with the wanted prefix at the same place.
fn assert_prefixes(got: &[String], wants: &[&str]) {
    for (i, want) in wants.iter().enumerate() {
        assert!(
            got.get(i).is_some_and(|e| e.starts_with(want)),
            "error {i}: wanted {want}, got {got:?}"
        );
    }
}

/// A folder with a passerelle.toml of `head` and a `[paths]` table: an empty routes.d of
/// its own, the repository's mapping packs.
fn engine_dir(head: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("routes.d")).unwrap();
    let paths = format!(
        "[paths]\nroutes = \"routes.d\"\nmappings = {:?}\n",
        workspace_root().join("mappings")
    );
    write(dir.path(), "passerelle.toml", &format!("{head}{paths}"));
    dir
}

fn render(errors: &ConfigErrors) -> Vec<String> {
    errors
        .0
        .iter()
        .map(|e| {
            format!(
                "{}:{}:{} {} {}",
                e.file.file_name().unwrap().to_string_lossy(),
                e.line,
                e.column,
                e.field.as_deref().unwrap_or("-"),
                e.message
            )
        })
        .collect()
}

const GOOD_ROUTE: &str = r#"name = "adt"
mapping = "v2-to-fhir"

[match]
message_type = "ADT"
trigger_event = ["A01", "A0*"]

[[destinations]]
name = "files"
type = "ndjson"
dir = "./out"
"#;

#[test]
fn the_repository_configuration_loads() {
    let root = workspace_root();
    let config = EngineConfig::load(Some(&root.join("passerelle.toml"))).unwrap();
    assert_eq!(config.listeners[0].bind, "127.0.0.1:2575");
    assert_eq!(
        config.store.path,
        root.join("./data"),
        "relative paths resolve against the file"
    );
    let packs = known_packs(&config.paths.mappings);
    assert!(
        packs.contains(&"v2-to-fhir".to_owned()),
        "packs found: {packs:?}"
    );
    let routes = RouteTable::load(&config.paths.routes, &packs, &config.listener_names()).unwrap();
    assert!(
        routes.routes.iter().any(|r| r.is_default),
        "the embedded default route"
    );
}

#[test]
fn defaults_without_a_file_and_environment_overrides() {
    let config = EngineConfig::load_with_env(None, Some(HashMap::new())).unwrap();
    assert_eq!(config, EngineConfig::default());
    let env = HashMap::from([
        (
            "PASSERELLE__STORE__PATH".to_owned(),
            "/var/lib/passerelle".to_owned(),
        ),
        ("PASSERELLE__LOGGING__FORMAT".to_owned(), "json".to_owned()),
        (
            "PASSERELLE__STORE__CACHE_CAPACITY_MB".to_owned(),
            "128".to_owned(),
        ),
    ]);
    let config =
        EngineConfig::load_with_env(Some(&workspace_root().join("passerelle.toml")), Some(env))
            .unwrap();
    assert_eq!(config.store.path, Path::new("/var/lib/passerelle"));
    assert_eq!(config.logging.format, "json");
    assert_eq!(config.store.cache_capacity_mb, 128);
    // The PostgreSQL store, its connection string from the environment.
    let env = HashMap::from([
        (
            "PASSERELLE__STORE__BACKEND".to_owned(),
            "postgres".to_owned(),
        ),
        (
            "PASSERELLE__STORE__URL".to_owned(),
            "postgres://passerelle:secret@db.internal:5433/passerelle".to_owned(),
        ),
    ]);
    let config =
        EngineConfig::load_with_env(Some(&workspace_root().join("passerelle.toml")), Some(env))
            .unwrap();
    assert_eq!(config.store.backend, "postgres");
    assert!(config.store.url.starts_with("postgres://"));
    let no_url = HashMap::from([(
        "PASSERELLE__STORE__BACKEND".to_owned(),
        "postgres".to_owned(),
    )]);
    let errors = EngineConfig::load_with_env(None, Some(no_url)).unwrap_err();
    assert_eq!(errors.0[0].field.as_deref(), Some("store.url"));
    assert!(
        errors.0[0].message.contains("PASSERELLE__STORE__URL"),
        "{}",
        errors.0[0].message
    );
    let bad = HashMap::from([("PASSERELLE__LOGGING__FORMAT".to_owned(), "xml".to_owned())]);
    let errors = EngineConfig::load_with_env(None, Some(bad)).unwrap_err();
    assert_eq!(errors.0[0].field.as_deref(), Some("logging.format"));
}

#[test]
fn configuration_errors_are_located() {
    let cases: [(&str, &str); 15] = [
        (
            "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nidle_timeout_s = 0\n",
            "passerelle.toml:4:18 listeners.idle_timeout_s",
        ),
        (
            "[logging]\nlevel = \"verbose\"\n",
            "passerelle.toml:2:9 logging.level",
        ),
        (
            "[logging]\nlevel = \"info,sled=loud\"\n",
            "passerelle.toml:2:9 logging.level",
        ),
        (
            "[store]\npath = \"./data\"\nsize = 3\n",
            "passerelle.toml:3:1",
        ),
        (
            "[store]\nbackend = \"postgres\"\nurl = \"host=db\"\ntls = \"verify\"\n",
            "passerelle.toml:4:7 store.tls",
        ),
        (
            "[store]\nbackend = \"postgres\"\nurl = \"host=db\"\ntls = \"verify-full\"\ntls_ca_file = \"missing-ca.pem\"\n",
            "passerelle.toml:5:15 store.tls_ca_file",
        ),
        (
            "[store]\nbackend = \"postgres\"\nurl = \"host=db sslmode=require\"\ntls = \"verify-full\"\n",
            "passerelle.toml:4:7 store.tls",
        ),
        (
            "[store]\nbackend = \"postgres\"\nurl = \"host=/run/postgresql\"\nop_timeout_s = 0\n",
            "passerelle.toml:4:16 store.op_timeout_s",
        ),
        (
            "[store]\npath = \"./data\"\nbackend = \"mysql\"\n",
            "passerelle.toml:3:11 store.backend",
        ),
        (
            "[store]\nbackend = \"postgres\"\nurl = \"host=/run/postgresql sslmode=maybe\"\n",
            "passerelle.toml:3:7 store.url",
        ),
        (
            "[admin]\nbind = \"localhost\"\n",
            "passerelle.toml:2:8 admin.bind",
        ),
        (
            "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nallow = [\"10.0.0.0/8\", \"nope\"]\n",
            "passerelle.toml:4:24 listeners.allow",
        ),
        (
            "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:2\"\n",
            "passerelle.toml:5:8 listeners.name",
        ),
        (
            "[logging]\nformat = \"xml\"\n",
            "passerelle.toml:2:10 logging.format",
        ),
        ("[store\npath = 1\n", "passerelle.toml:1:"),
    ];
    for (text, want) in cases {
        let got = config_errors(text);
        assert!(
            got.iter().any(|e| e.starts_with(want)),
            "{text:?}: wanted {want}, got {got:?}"
        );
    }
}

#[test]
fn a_plain_logging_level_keeps_libraries_at_warn() {
    use passerelle_engine::config::LoggingSection;
    let filter = |level: &str| {
        LoggingSection {
            level: level.to_owned(),
            ..LoggingSection::default()
        }
        .filter()
    };
    assert_eq!(filter("debug").as_deref(), Some("warn,passerelle=debug"));
    assert_eq!(filter("error").as_deref(), Some("error"));
    assert_eq!(
        filter("info,passerelle_store=trace").as_deref(),
        Some("info,passerelle_store=trace")
    );
    assert_eq!(filter("verbose"), None);
    assert_eq!(filter("info,"), None);
}

#[test]
fn route_errors_are_located_one_per_kind() {
    let cases: [(&str, &str); 16] = [
        (
            "name = \"r\"\nmapping = \"fr\"\n[match]\ntrigger_event = [\"A01\", \"\"]\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:4:17 match.trigger_event an empty pattern",
        ),
        (
            "name = \"a.b\"\nmapping = \"fr\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:1:8 name a route needs a name, without '.'",
        ),
        (
            "name = \"a\"\nmapping = \"fr\"\n[[destinations]]\nname = \"b.c\"\ntype = \"ndjson\"\n",
            "10-r.toml:4:8 destinations.name a destination needs a name, without '.'",
        ),
        (
            "name = \"r\"\nmapping = \"nope\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:2:11 mapping no mapping pack",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\nlisteners = [\"main\", \"lab\"]\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:3:22 listeners no listener",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\nordering_key = [\"PID-0\"]\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:3:17 ordering_key invalid path",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\nordering_key = [\"PID-3[*].1\"]\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:3:17 ordering_key",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\nordering_key = [{ identifier = \"PID-3.1\", type = \"PI\" }]\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:3:17 ordering_key { identifier = \"PID-3.1\", type = \"PI\" }: the identifier must name a whole field",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\n[match]\nmessage_typ = \"ADT\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:4:15 match.message_typ unknown field",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\n[match]\nmessage_type = []\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:4:16 match.message_type",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\n",
            "10-r.toml:1:1 destinations",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\n[[destinations]]\nname = \"d\"\ntype = \"kafka\"\n",
            "10-r.toml:5:8 destinations.type",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\nconcurrency = 0\n",
            "10-r.toml:6:15 destinations.concurrency",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\n[[destinations]]\nname = \"d\"\ntype = \"fhir\"\n[destinations.retry]\njitter = 2.0\n",
            "10-r.toml:7:10 destinations.retry.jitter",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\n[[destinations]]\nname = \"d\"\ntype = \"fhir\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
            "10-r.toml:7:8 destinations.name destination \"d\" appears twice",
        ),
        (
            "name = \"r\"\nmapping = \"fr\"\nretries = 3\n",
            "10-r.toml:3:1 retries unknown field",
        ),
    ];
    for (text, want) in cases {
        let got = route_errors(text);
        assert!(
            got.iter().any(|e| e.starts_with(want)),
            "{text:?}: wanted {want}, got {got:?}"
        );
    }
}

#[test]
fn errors_across_route_files() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-a.toml", GOOD_ROUTE);
    write(dir.path(), "20-b.toml", GOOD_ROUTE);
    let default_route = |name: &str| {
        format!(
            "name = \"{name}\"\nmapping = \"fr\"\ndefault = true\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n"
        )
    };
    write(dir.path(), "30-c.toml", &default_route("c"));
    write(dir.path(), "40-d.toml", &default_route("d"));
    let got = render(&RouteTable::load(dir.path(), &packs(), &listeners()).unwrap_err());
    assert!(
        got.iter()
            .any(|e| e.starts_with("20-b.toml:1:1 name") && e.contains("10-a.toml")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|e| e.starts_with("40-d.toml:1:1 default a second default route")),
        "{got:?}"
    );

    let empty = tempfile::tempdir().unwrap();
    let got = render(&RouteTable::load(empty.path(), &packs(), &listeners()).unwrap_err());
    assert!(got[0].contains("no route"), "{got:?}");
}

fn header(msh: &str) -> HeaderSummary {
    let bytes = format!("{msh}\rPID|1||123^^^HOSP&1.2.3&ISO^PI\r");
    HeaderSummary::of(&Message::parse(bytes.as_bytes()).unwrap())
}

#[test]
fn first_matching_route_wins_then_the_default() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-adt.toml", GOOD_ROUTE);
    write(
        dir.path(),
        "20-lab.toml",
        "name = \"lab\"\nmapping = \"v2-to-fhir\"\nlisteners = [\"main\"]\n[match]\nsending_facility = \"LAB_*\"\nversion = \"2.5*\"\n[[destinations]]\nname = \"d\"\ntype = \"fhir\"\nurl = \"http://127.0.0.1:1/fhir\"\n",
    );
    write(
        dir.path(),
        "99-default.toml",
        "name = \"rest\"\nmapping = \"v2-to-fhir\"\ndefault = true\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
    );
    let table = RouteTable::load(dir.path(), &packs(), &listeners()).unwrap();
    let pick =
        |msh: &str, listener: &str| table.select(&header(msh), listener).map(|r| r.name.clone());
    assert_eq!(
        pick("MSH|^~\\&|APP|FAC|||20240101||ADT^A08|1|P|2.5", "main").as_deref(),
        Some("adt")
    );
    assert_eq!(
        pick("MSH|^~\\&|APP|FAC|||20240101||ADT^A11|1|P|2.5", "main").as_deref(),
        Some("rest"),
        "A11 does not match A0*"
    );
    assert_eq!(
        pick(
            "MSH|^~\\&|APP|LAB_NORD^1.2.3^ISO|||20240101||ORU^R01|1|P|2.5.1",
            "main"
        )
        .as_deref(),
        Some("lab"),
        "HD matched on its namespace"
    );
    assert_eq!(
        pick(
            "MSH|^~\\&|APP|LAB_NORD|||20240101||ORU^R01|1|P|2.5.1",
            "other"
        )
        .as_deref(),
        Some("rest"),
        "lab only listens on main"
    );
    assert_eq!(
        pick("MSH|^~\\&|APP|LAB_NORD|||20240101||ORU^R01|1|P|2.3", "main").as_deref(),
        Some("rest")
    );
    let lab = table.routes.iter().find(|r| r.name == "lab").unwrap();
    assert_eq!(
        lab.destinations[0]
            .settings
            .get("url")
            .and_then(|v| v.as_str()),
        Some("http://127.0.0.1:1/fhir")
    );
}

#[test]
fn french_feeds_are_told_by_msh_12_2_or_msh_21() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "10-fr.toml",
        "name = \"fr\"\nmapping = \"v2-to-fhir\"\n[match]\ninternationalization_code = \"FRA\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
    );
    write(
        dir.path(),
        "20-profile.toml",
        "name = \"pam\"\nmapping = \"v2-to-fhir\"\n[match]\nprofile = \"*IHE_FRANCE-2.11-PAM*\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\n",
    );
    let table = RouteTable::load(dir.path(), &packs(), &listeners()).unwrap();
    let pick = |msh: &str| table.select(&header(msh), "main").map(|r| r.name.clone());
    assert_eq!(
        pick("MSH|^~\\&|GAM|CHSA|||20250101||ADT^A28^ADT_A05|1|P|2.5^FRA^2.11").as_deref(),
        Some("fr")
    );
    assert_eq!(
        pick("MSH|^~\\&|GAM|CHSA|||20250101||ADT^A28^ADT_A05|1|P|2.5|||||||||FR~2.11^IHE_FRANCE-2.11-PAM")
            .as_deref(),
        Some("pam"),
        "any MSH-21 repetition, matched whole"
    );
    assert_eq!(
        pick("MSH|^~\\&|GAM|CHSA|||20250101||ADT^A28^ADT_A05|1|P|2.5^USA").as_deref(),
        None,
        "neither: no route, no default"
    );
}

#[test]
fn default_ordering_key_is_facility_and_patient_identifier() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-adt.toml", GOOD_ROUTE);
    let table = RouteTable::load(dir.path(), &packs(), &listeners()).unwrap();
    let bytes = b"MSH|^~\\&|APP|FAC^9.9^ISO|||20240101||ADT^A01|1|P|2.5\rPID|1||123^^^HOSP&1.2.3&ISO^PI~456^^^NAT^NH\r";
    let message = Message::parse(bytes).unwrap();
    assert_eq!(table.routes[0].ordering_key(&message), "FAC|123|HOSP");
}

/// A PAM FR feed lists the INS first once the identity is qualified: one patient's A28
/// (IPP only) and A31 (INS, then IPP) must share a key, which `PID-3[1]` does not give
/// and a part by identifier type does. The repository's French route uses it.
#[test]
fn an_ordering_key_part_by_identifier_type_ignores_the_order_of_repetitions() {
    let ipp_only = "PID|1||8842^^^CHSA&1.2.250.1.9&ISO^PI\r";
    let ins_first = "PID|1||1234567890123^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS~\
                     8842^^^CHSA&1.2.250.1.9&ISO^PI\r";
    let no_ipp = "PID|1||1234567890123^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS\r";
    let message = |pid: &str| {
        format!("MSH|^~\\&|GAM|CHSA|||20250101||ADT^A31^ADT_A05|1|P|2.5^FRA^2.11\r{pid}")
    };
    let key = |table: &RouteTable, pid: &str| {
        let text = message(pid);
        let parsed = Message::parse(text.as_bytes()).unwrap();
        table.routes[0].ordering_key(&parsed)
    };
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "10-r.toml",
        "name = \"r\"\nmapping = \"fr\"\ndefault = true\n\
         ordering_key = [\"MSH-4.1\", { identifier = \"PID-3\", type = \"PI\" }]\n\
         [[destinations]]\nname = \"d\"\ntype = \"ndjson\"\ndir = \"out\"\n",
    );
    let by_type = RouteTable::load(dir.path(), &packs(), &listeners()).unwrap();
    assert_eq!(key(&by_type, ipp_only), "CHSA|8842^CHSA");
    assert_eq!(key(&by_type, ins_first), "CHSA|8842^CHSA");
    assert_eq!(
        key(&by_type, no_ipp),
        "CHSA|",
        "no IPP: one shared key, in order"
    );

    let default_dir = tempfile::tempdir().unwrap();
    write(default_dir.path(), "10-adt.toml", GOOD_ROUTE);
    let default = RouteTable::load(default_dir.path(), &packs(), &listeners()).unwrap();
    assert_ne!(key(&default, ipp_only), key(&default, ins_first));

    let repository =
        RouteTable::load(&workspace_root().join("routes.d"), &packs(), &listeners()).unwrap();
    let fr = repository
        .routes
        .iter()
        .find(|r| r.name == "fr-pam")
        .unwrap();
    let text = message(ins_first);
    assert_eq!(
        fr.ordering_key(&Message::parse(text.as_bytes()).unwrap()),
        "CHSA|8842^CHSA"
    );
}

#[test]
fn concurrency_defaults_by_destination_kind_and_a_route_can_set_it() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "10-r.toml",
        "name = \"r\"\nmapping = \"v2-to-fhir\"\ndefault = true\n\
         [[destinations]]\nname = \"files\"\ntype = \"ndjson\"\ndir = \"out\"\n\
         [[destinations]]\nname = \"few-files\"\ntype = \"ndjson\"\ndir = \"out2\"\nconcurrency = 4\n\
         [[destinations]]\nname = \"fhir\"\ntype = \"fhir\"\nurl = \"http://127.0.0.1:1/fhir\"\n\
         [[destinations]]\nname = \"peer\"\ntype = \"mllp\"\npeer = \"127.0.0.1:1\"\n",
    );
    let table = RouteTable::load(dir.path(), &packs(), &listeners()).unwrap();
    let concurrency: Vec<(&str, usize)> = table.routes[0]
        .destinations
        .iter()
        .map(|d| (d.name.as_str(), d.concurrency))
        .collect();
    assert_eq!(
        concurrency,
        [("files", 128), ("few-files", 4), ("fhir", 16), ("peer", 1)]
    );
}

/// `dead_holds_key` in a destination's `[destinations.retry]` reaches its policy, with
/// which a dead delivery holds its ordering key in the store the engine opens.
#[tokio::test]
async fn a_destination_can_hold_its_keys_behind_a_dead_delivery() {
    let dir = engine_dir("[store]\npath = \"store\"\n");
    write(
        &dir.path().join("routes.d"),
        "10-r.toml",
        "name = \"r\"\nmapping = \"v2-to-fhir\"\ndefault = true\n[[destinations]]\nname = \"mpi\"\ntype = \"ndjson\"\ndir = \"out\"\n[destinations.retry]\ndead_holds_key = true\n[[destinations]]\nname = \"lake\"\ntype = \"ndjson\"\ndir = \"lake\"\n",
    );
    let loaded = passerelle_engine::Loaded::load(&dir.path().join("passerelle.toml")).unwrap();
    let destinations = &loaded.routes.routes[0].destinations;
    assert!(destinations[0].retry.dead_holds_key);
    assert!(!destinations[1].retry.dead_holds_key, "off unless asked");
    passerelle_store::contract::a_dead_delivery_holds_its_key(
        loaded.config.open_store().unwrap(),
        &destinations[0].retry,
    )
    .await;
}

/// Type errors are all reported at once, each with its line and its field, not just the
/// first.
#[test]
fn every_type_error_is_reported_with_its_field() {
    let got = config_errors(
        "[store]\npool_size = \"x\"\n\n[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nmax_connections = -5\n\n[defaults]\nunrouted = 3\n",
    );
    for want in [
        "passerelle.toml:2:13 store.pool_size",
        "passerelle.toml:7:19 listeners.max_connections",
        "passerelle.toml:10:12 defaults.unrouted",
    ] {
        assert!(
            got.iter().any(|e| e.starts_with(want)),
            "wanted {want}, got {got:?}"
        );
    }
    assert_eq!(got.len(), 3, "{got:?}");

    // In a route file too.
    let got = route_errors(
        "name = \"r\"\nmapping = \"fr\"\nconcurrency = \"many\"\n[[destinations]]\nname = \"d\"\ntype = 5\n",
    );
    assert!(got.len() >= 2, "{got:?}");
    assert_prefixes(&got, &["10-r.toml:3:", "10-r.toml:6:8 destinations.type"]);
}

/// A wrong type does not hide the other mistakes of the file: the values that are wrong
/// only in meaning are reported in the same run (an operator fixing the file at night
/// should not discover its problems one `check` at a time).
#[test]
fn type_errors_and_other_mistakes_of_passerelle_toml_are_reported_together() {
    let got = config_errors(
        "[store]\nmax_queue_depth = \"lots\"\n\n[admin]\nbind = \"nowhere\"\n\n[logging]\nformat = \"yaml\"\n",
    );
    assert_eq!(
        got,
        [
            "passerelle.toml:2:19 store.max_queue_depth invalid type: string \"lots\", expected u64",
            "passerelle.toml:5:8 admin.bind \"nowhere\" is not an address:port",
            "passerelle.toml:8:10 logging.format must be \"text\" or \"json\"",
        ],
        "in file order"
    );
}

/// The same in a route file: a retry setting of the wrong type and an unknown mapping
/// pack, in one run.
#[test]
fn type_errors_and_other_mistakes_of_a_route_are_reported_together() {
    let got = route_errors(
        "name = \"r\"\nmapping = \"nope\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\ndir = \"out\"\n[destinations.retry]\nmax_attempts = \"3\"\njitter = 2.0\n",
    );
    assert_eq!(got.len(), 3, "{got:?}");
    assert_prefixes(
        &got,
        &[
            "10-r.toml:2:11 mapping no mapping pack \"nope\"",
            "10-r.toml:8:16 destinations.retry.max_attempts invalid type",
            "10-r.toml:9:10 destinations.retry.jitter must be between 0 and 1",
        ],
    );
}

/// A syntax error on a key's line is one problem: the "missing field" that blanking the
/// line makes is its consequence, not a second mistake.
#[test]
fn a_broken_required_key_is_one_error_not_two() {
    let got = route_errors(
        "name = \"broken\nmapping = \"fr\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\ndir = \"out\"\n",
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("10-r.toml:1:"), "{got:?}");
}

/// Everything `passerelle.toml` leads to is checked in one run: its own mistakes, every
/// route file's, and each destination's settings, located at the key (`url`), not just
/// named by the route file.
#[test]
fn the_configuration_its_routes_and_their_destinations_are_reported_together() {
    let dir = engine_dir("[admin]\nbind = \"nowhere\"\n");
    let routes = dir.path().join("routes.d");
    write(
        &routes,
        "10-adt.toml",
        "name = \"adt\"\nmapping = \"v2-to-fhirr\"\n[[destinations]]\nname = \"d\"\ntype = \"ndjson\"\ndir = \"out\"\n",
    );
    write(
        &routes,
        "20-lab.toml",
        "name = \"lab\"\nmapping = \"v2-to-fhir\"\n[[destinations]]\nname = \"fhir\"\ntype = \"fhir\"\nurl = \"not a url\"\n",
    );
    let lines = passerelle_engine::Loaded::load(&dir.path().join("passerelle.toml")).unwrap_err();
    let has = |want: &str| lines.iter().any(|l| l.contains(want));
    assert!(has("passerelle.toml:2:8: admin.bind:"), "{lines:?}");
    assert!(
        has("10-adt.toml:2:11: mapping: no mapping pack"),
        "{lines:?}"
    );
    assert!(
        has("20-lab.toml:6:7: destinations.url: invalid setting `url`"),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 3, "{lines:?}");
}

/// A wrong value set by an environment variable is reported as that variable's, not at
/// the line of the file it overrides (which holds a sound value: the operator would stare
/// at it); and an environment error has no made-up line and column.
#[test]
fn a_wrong_value_from_the_environment_names_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "passerelle.toml",
        "[store]\nbackend = \"sled\"\n[admin]\nbind = \"nowhere\"\n",
    );
    let file = dir.path().join("passerelle.toml");
    let env = HashMap::from([(
        "PASSERELLE__STORE__BACKEND".to_owned(),
        "postgress".to_owned(),
    )]);
    let errors = EngineConfig::load_with_env(Some(&file), Some(env)).unwrap_err();
    let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert!(
        lines.contains(
            &"PASSERELLE__STORE__BACKEND: store.backend: \"postgress\" is not a store backend: \"sled\" or \"postgres\"".to_owned()
        ),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l
                .ends_with("passerelle.toml:4:8: admin.bind: \"nowhere\" is not an address:port")),
        "the file's own mistakes stay located: {lines:?}"
    );
    assert_eq!(lines.len(), 2, "{lines:?}");

    let env = HashMap::from([(
        "PASSERELLE__STORE__MAX_QUEUE_DEPTH".to_owned(),
        "lots".to_owned(),
    )]);
    let errors = EngineConfig::load_with_env(Some(&file), Some(env)).unwrap_err();
    let text = errors.to_string();
    assert!(
        text.starts_with("environment: ") && text.contains("store.max_queue_depth"),
        "{text}"
    );
}

#[test]
fn the_resubmit_listener_name_is_reserved() {
    let errors = config_errors(
        "[store]\npath = \"data\"\n[[listeners]]\nname = \"resubmit\"\nbind = \"127.0.0.1:2575\"\n",
    );
    assert!(
        errors.iter().any(|e| e.starts_with("passerelle.toml:4:")
            && e.contains("listeners.name")
            && e.contains("\"resubmit\" is reserved")),
        "{errors:?}"
    );
}
