//! Installs every third-party test peer up front (CI calls this from `.ci/run`), with
//! the same code the tests use to install them on demand.

fn main() {
    let python = passerelle_testkit::python();
    println!("python peers ready: {}", python.display());
    println!(
        "FHIR validators ready: {}",
        passerelle_testkit::fhir::validator_dir().display()
    );
    println!(
        "FHIR server ready: {}",
        passerelle_testkit::fhir_server::server_dir().display()
    );
    println!(
        "OAuth authorization server ready: {}",
        passerelle_testkit::smart_auth::server_dir().display()
    );
    println!(
        "MLLP node peers ready: {}",
        passerelle_testkit::mllp::node_dir().display()
    );
}
