//! The shipped deployment files agree with the code: the example configuration parses
//! and documents exactly the defaults.

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
