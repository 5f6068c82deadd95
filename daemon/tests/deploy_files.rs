//! The shipped deployment files agree with the code: the example configuration parses
//! and documents exactly the defaults.

use rustls::pki_types::pem::PemObject;
use vfio_migd::config::Config;

#[test]
fn the_example_configuration_is_valid_and_states_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config.example.toml");
    let text = std::fs::read_to_string(path).expect("deploy/config.example.toml");
    let example = Config::from_toml(&text, false).expect("the example parses");
    let defaults = Config::from_toml("", false).unwrap();
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}

#[test]
fn the_systemd_unit_is_a_notify_service_with_its_directories() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/vfio-migd.service");
    let unit = std::fs::read_to_string(path).expect("systemd/vfio-migd.service");
    for line in ["Type=notify", "RuntimeDirectory=vfio-migd", "StateDirectory=vfio-migd", "KillMode=mixed"] {
        assert!(unit.lines().any(|l| l == line), "missing `{line}`");
    }
}

/// The `VFIO_MIGD__…` overrides the DaemonSet sets, with `$(POD_IP)` as `pod_ip` and the
/// Secret's mount point as `tls_dir`.
fn daemonset_overrides(pod_ip: &str, tls_dir: &std::path::Path) -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
    let manifest = std::fs::read_to_string(path).expect("deploy/daemonset.yaml");
    let lines: Vec<&str> = manifest.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter_map(|pair| {
            let name = pair[0].strip_prefix("- name: ")?.trim_matches('"');
            let value = pair[1].strip_prefix("value: ")?.trim_matches('"');
            let value = value.replace("$(POD_IP)", pod_ip);
            let value = value.replace("/etc/vfio-migd-tls", &tls_dir.display().to_string());
            name.starts_with("VFIO_MIGD__").then(|| (name.to_owned(), value))
        })
        .collect()
}

#[test]
fn the_daemonsets_environment_overrides_are_keys_the_daemon_takes() {
    // The Secret as deploy/make-test-certs.sh and the DaemonSet's comment make it.
    let tls_dir = tempfile::tempdir().unwrap();
    let made = tempfile::tempdir().unwrap();
    make_test_certs(made.path(), &["10.1.2.3"]);
    for (from, to) in [("10.1.2.3.crt", "tls.crt"), ("10.1.2.3.key", "tls.key"), ("ca.crt", "ca.crt")] {
        std::fs::copy(made.path().join(from), tls_dir.path().join(to)).unwrap();
    }
    let overrides = daemonset_overrides("10.1.2.3", tls_dir.path());
    let names: Vec<&str> = overrides.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "VFIO_MIGD__PEER__LISTEN",
            "VFIO_MIGD__PEER__TLS__CERT",
            "VFIO_MIGD__PEER__TLS__KEY",
            "VFIO_MIGD__PEER__TLS__CA",
            "VFIO_MIGD__METRICS__LISTEN",
            "VFIO_MIGD__PEER__DATA_PORTS"
        ]
    );
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config.example.toml");
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_vfio-migd"))
        .args(["--config", example, "--check-config"])
        .envs(overrides)
        .output()
        .expect("run vfio-migd --check-config");
    let summary = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{}{summary}", String::from_utf8_lossy(&checked.stderr));
    for line in [
        "peer.listen               10.1.2.3:7410",
        "metrics.listen            10.1.2.3:7411",
        &format!("peer.tls                  cert {0}/tls.crt ca {0}/ca.crt", tls_dir.path().display()),
        "peer.data_ports           49152-49215",
    ] {
        assert!(summary.lines().any(|l| l == line), "missing `{line}` in:\n{summary}");
    }
}

/// Runs deploy/make-test-certs.sh (openssl) into `out` for `names`.
fn make_test_certs(out: &std::path::Path, names: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/make-test-certs.sh");
    let made =
        std::process::Command::new(script).arg(out).args(names).output().expect("run make-test-certs.sh");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
}

#[test]
fn the_test_certificate_script_makes_a_fleet_the_daemon_accepts() {
    let out = tempfile::tempdir().unwrap();
    make_test_certs(out.path(), &["node-a.example", "127.0.0.1"]);
    let config = |name: &str| vfio_migd::tls::PeerTlsConfig {
        cert: out.path().join(format!("{name}.crt")),
        key: out.path().join(format!("{name}.key")),
        ca: out.path().join("ca.crt"),
    };
    for name in ["node-a.example", "127.0.0.1"] {
        vfio_migd::tls::load_material(&config(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pem = std::fs::read(config(name).cert).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        assert!(vfio_migd::tls::certificate_matches(&der, name), "{name} is in its certificate");
        assert!(!vfio_migd::tls::certificate_matches(&der, "node-b.example"));
    }
    // A key that is not the certificate's is refused with both paths named.
    let mixed = vfio_migd::tls::PeerTlsConfig { key: config("127.0.0.1").key, ..config("node-a.example") };
    let err = vfio_migd::tls::load_material(&mixed).unwrap_err().to_string();
    assert!(err.contains("node-a.example.crt") && err.contains("127.0.0.1.key"), "{err}");
}

#[test]
fn the_data_port_range_is_the_same_in_every_deployment_file() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let read = |path: &str| std::fs::read_to_string(format!("{root}/{path}")).expect(path);
    let daemonset = read("deploy/daemonset.yaml");
    assert!(daemonset.contains("value: \"49152-49215\""), "DaemonSet sets the range");
    assert!(daemonset.contains("port: 49152\n          endPort: 49215"), "NetworkPolicy admits the range");
    assert!(read("deploy/Containerfile").contains("EXPOSE 7410 7411 49152-49215"));
    assert!(read("deploy/config.example.toml").contains("# data_ports = \"49152-49215\""));
    assert!(read("README.md").contains("data_ports"), "README documents the range");
}

#[test]
fn the_manifests_create_their_namespace_and_tolerate_taints() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
    let manifest = std::fs::read_to_string(path).unwrap();
    let documents: Vec<&str> = manifest.split("\n---\n").collect();
    assert!(documents[0].contains("kind: Namespace") && documents[0].contains("name: vfio-migd"));
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(manifest.contains(&format!("operator: Exists\n          effect: {effect}")), "{effect}");
    }
    let ignore =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../.containerignore")).unwrap();
    for excluded in ["target", ".git"] {
        assert!(ignore.lines().any(|l| l.trim_matches('/') == excluded), "{excluded} not ignored");
    }
}

#[test]
fn a_bad_environment_override_names_the_variable_and_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_vfio-migd"))
        .arg("--config")
        .arg(&empty)
        .arg("--check-config")
        .env("VFIO_MIGD__PEER__LISTEN", "garbage")
        .output()
        .expect("run vfio-migd --check-config");
    assert_eq!(checked.status.code(), Some(2));
    let err = String::from_utf8_lossy(&checked.stderr);
    assert!(err.contains("VFIO_MIGD__PEER__LISTEN=\"garbage\""), "{err}");
    assert!(!err.contains("empty.toml"), "the file is not to blame: {err}");
}
