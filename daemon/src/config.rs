//! The daemon's configuration: TOML through the `config` crate, overridden by
//! `VFIO_MIGD__SECTION__KEY` environment variables. Every struct denies unknown keys, so
//! a typo in a unit file or a DaemonSet fails loudly at start instead of being ignored.
//! `deploy/config.example.toml` documents every key with its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::sim::{SimSpec, parse_byte_size};
use crate::stream::StreamFault;
use crate::tls::PeerTlsConfig;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/vfio-migd/config.toml";
pub const ENV_PREFIX: &str = "VFIO_MIGD";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration {path}: {source}")]
    Load {
        path: String,
        #[source]
        source: config::ConfigError,
    },
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("environment variable {variable}={value:?}: {message}")]
    Environment { variable: String, value: String, message: String },
}

/// The `VFIO_MIGD__…` variable behind a load error, if the error names a key (``for key
/// `peer.listen` ``) that one of `vars` sets: the operator's mistake is in the environment
/// (a unit file, a DaemonSet), not in the file.
fn blamed_environment(
    message: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> Option<(String, String)> {
    let quoted = message.split("for key ").nth(1)?;
    let quote = quoted.chars().next().filter(|c| matches!(c, '\'' | '`'))?;
    let key = quoted[1..].split(quote).next()?;
    let variable = format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_ascii_uppercase());
    vars.into_iter().find(|(name, _)| name.eq_ignore_ascii_case(&variable))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub handoff: HandoffConfig,
    #[serde(default)]
    pub peer: PeerConfig,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub migration: MigrationConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub simulator: SimulatorConfig,
    /// Devices opened at start. `[[device]]` tables with `kind = "sim" | "vfio-group" | "vfio-cdev"`.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Test-only switches; refused unless the daemon runs with `--allow-test-faults`.
    #[serde(default)]
    pub test: TestConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Unix socket of the control API (vfio-migctl, control planes).
    #[serde(default = "default_control_socket")]
    pub socket: PathBuf,
    /// Group (name or number) given to the socket (mode 0660) and to the runtime
    /// directory when the daemon creates it (mode 0750). Unset: the daemon's own group.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Uids that may call the read-only RPCs (see [`ControlConfig::access`]).
    #[serde(default)]
    pub read_uids: Vec<u32>,
    /// Gids (the caller's primary group) that may call the read-only RPCs.
    #[serde(default)]
    pub read_gids: Vec<u32>,
    /// Uids that may call every RPC.
    #[serde(default)]
    pub admin_uids: Vec<u32>,
    /// Gids (the caller's primary group) that may call every RPC.
    #[serde(default)]
    pub admin_gids: Vec<u32>,
}

impl ControlConfig {
    /// Who may call each RPC, checked per call against the caller's `SO_PEERCRED`.
    pub fn access(&self) -> AccessConfig {
        AccessConfig {
            read_uids: self.read_uids.clone(),
            read_gids: self.read_gids.clone(),
            admin_uids: self.admin_uids.clone(),
            admin_gids: self.admin_gids.clone(),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: default_control_socket(),
            socket_group: None,
            read_uids: Vec::new(),
            read_gids: Vec::new(),
            admin_uids: Vec::new(),
            admin_gids: Vec::new(),
        }
    }
}

/// The uids and gids (besides root and the daemon's own uid, which are always allowed)
/// that may call the read-only RPCs (list, get, watch, plan) and the mutating ones
/// (register, release, define, delete, migrate, incoming, cancel, resolve, dirty
/// tracking). A gid matches the caller's primary group (what `SO_PEERCRED` reports).
/// Mutating implies reading.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessConfig {
    pub read_uids: Vec<u32>,
    pub read_gids: Vec<u32>,
    pub admin_uids: Vec<u32>,
    pub admin_gids: Vec<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffConfig {
    /// Unix socket on which a VMM hands over VFIO device fds (SCM_RIGHTS).
    #[serde(default = "default_handoff_socket")]
    pub socket: PathBuf,
    /// Group (name or number) given to the socket and to a runtime directory the daemon
    /// creates, as `[control] socket_group`.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Uids (besides root and the daemon's own) that may hand devices over (a handoff
    /// registers a device: it needs the mutating class).
    #[serde(default)]
    pub admin_uids: Vec<u32>,
    /// Gids (the caller's primary group) that may hand devices over.
    #[serde(default)]
    pub admin_gids: Vec<u32>,
    /// Handoff connections served at once; more wait in the kernel's backlog.
    #[serde(default = "default_handoff_max_connections")]
    pub max_connections: usize,
    /// A client that has not sent its whole request line by then is dropped.
    #[serde(default = "default_handoff_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

impl HandoffConfig {
    /// Who may hand devices over: the mutating class only.
    pub fn access(&self) -> AccessConfig {
        AccessConfig {
            admin_uids: self.admin_uids.clone(),
            admin_gids: self.admin_gids.clone(),
            ..AccessConfig::default()
        }
    }
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            socket: default_handoff_socket(),
            socket_group: None,
            admin_uids: Vec::new(),
            admin_gids: Vec::new(),
            max_connections: default_handoff_max_connections(),
            request_timeout_ms: default_handoff_request_timeout_ms(),
        }
    }
}

/// `[simulator]`: the simulated device backend. Devices declared in this file
/// (`[[device]]` with `kind = "sim"`) are always allowed; these keys govern the ones that
/// arrive from outside (RegisterDevice, the handoff socket).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Accept simulated devices over RegisterDevice and the handoff socket (tests and
    /// demos only; off in production). Even then, `arc_log` and `faults` are refused.
    #[serde(default)]
    pub allow_remote: bool,
    /// Largest `state_size` of any simulated device (configured or remote): the
    /// simulator holds the whole state in memory. A number or `"1GiB"`.
    #[serde(default = "default_sim_max_state_size", deserialize_with = "de_byte_size")]
    pub max_state_size: u64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig { allow_remote: false, max_state_size: default_sim_max_state_size() }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// gRPC listener for peer daemons. Loopback until peers authenticate with TLS.
    #[serde(default = "default_peer_listen")]
    pub listen: SocketAddr,
    /// Data connections per migration (device streams are spread over them).
    #[serde(default = "default_data_connections")]
    pub data_connections: usize,
    /// Largest frame payload on the data connections.
    #[serde(default = "default_max_frame_payload")]
    pub max_frame_payload: usize,
    /// `host:port` peers reach this daemon at, announced to destinations (which resolve
    /// in-doubt jobs through it) instead of `listen` (e.g. `0.0.0.0:7410`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Serve the peer listener without TLS on a non-loopback address. Anyone who reaches
    /// the port can then read and change device state: lab use only.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// `[peer.tls]`: mutual TLS with the fleet CA, for the peer gRPC and data connections.
    #[serde(default)]
    pub tls: Option<PeerTlsConfig>,
    /// `[peer.limits]`: bounds on what peers may hold on this daemon.
    #[serde(default)]
    pub limits: PeerLimits,
    /// Ports the destination's per-job data listener takes (`"49152-49215"`); unset: an
    /// ephemeral port chosen by the kernel.
    #[serde(default)]
    pub data_ports: Option<crate::stream::ports::PortRange>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            listen: default_peer_listen(),
            data_connections: default_data_connections(),
            max_frame_payload: default_max_frame_payload(),
            advertise: None,
            insecure_plaintext: false,
            tls: None,
            limits: PeerLimits::default(),
            data_ports: None,
        }
    }
}

impl PeerConfig {
    /// The address announced to peers: `advertise`, else `listen`.
    pub fn advertised(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }
}

/// `[peer.limits]`: every bound of the peer listener, its channels and the data ports.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PeerLimits {
    /// Connections the peer listener keeps at once; more are closed at accept.
    pub max_connections: usize,
    /// HTTP/2 streams (concurrent calls) per peer connection.
    pub max_concurrent_streams: u32,
    /// Calls served at once per peer connection (others wait).
    pub concurrency_per_connection: usize,
    /// Longest a peer call may run (must exceed `migration.phase_timeout_ms`: AwaitLoaded
    /// waits up to a phase timeout).
    pub request_timeout_ms: u64,
    /// A peer connection is closed (gracefully: running calls finish) after this long;
    /// the peer's channel reconnects.
    pub max_connection_age_ms: u64,
    /// Largest peer gRPC message, either direction.
    pub max_message_bytes: usize,
    /// HTTP/2 flow-control window per stream; peer calls are small, bulk data travels
    /// on the data connections.
    pub stream_window_bytes: u32,
    /// HTTP/2 flow-control window per connection.
    pub connection_window_bytes: u32,
    /// HTTP/2 PING interval on peer connections (both sides).
    pub keepalive_interval_ms: u64,
    /// A PING unanswered for this long closes the connection.
    pub keepalive_timeout_ms: u64,
    /// TCP keepalive and TCP_USER_TIMEOUT on every peer socket: a dead peer is noticed
    /// within about this long.
    pub dead_peer_ms: u64,
    /// A connection must finish its TLS handshake (peer listener) or send its preamble
    /// (data port) within this long.
    pub handshake_timeout_ms: u64,
    /// Data-port connections whose preamble is still awaited, per job; more are closed.
    pub max_pending_data_connections: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_connections: 256,
            max_concurrent_streams: 32,
            concurrency_per_connection: 16,
            request_timeout_ms: 120_000,
            max_connection_age_ms: 3_600_000,
            max_message_bytes: 256 << 10,
            stream_window_bytes: 256 << 10,
            connection_window_bytes: 1 << 20,
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 10_000,
            dead_peer_ms: 20_000,
            handshake_timeout_ms: 5_000,
            max_pending_data_connections: 16,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// Default timeout of every phase (handshake, barriers, drain, load, commit).
    #[serde(default = "default_phase_timeout_ms")]
    pub phase_timeout_ms: u64,
    /// Stream the initial state of PRE_COPY-capable devices while the VM still runs.
    #[serde(default = "default_true")]
    pub pre_copy: bool,
    /// Longest time spent in pre-copy before switching over anyway.
    #[serde(default = "default_pre_copy_max_ms")]
    pub pre_copy_max_ms: u64,
    /// How many finished jobs stay queryable.
    #[serde(default = "default_retained_jobs")]
    pub retained_jobs: usize,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            phase_timeout_ms: default_phase_timeout_ms(),
            pre_copy: true,
            pre_copy_max_ms: default_pre_copy_max_ms(),
            retained_jobs: default_retained_jobs(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus metrics over HTTP (`GET /metrics`) on this address; off when unset.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "vfio_migd=debug". `VFIO_MIGD_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: default_log_level(), format: LogFormat::default() }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind")]
pub enum DeviceConfig {
    /// A simulated device (tests, demos); see `SimSpec` for its keys. Boxed: a spec is
    /// several times larger than the other variants.
    #[serde(rename = "sim")]
    Sim(Box<SimSpec>),
    /// A device opened through the legacy group/container path by its sysfs name
    /// (PCI BDF or mdev UUID).
    #[serde(rename = "vfio-group")]
    Group { name: String, sysfs_device: String },
    /// A device opened through its cdev (`/dev/vfio/devices/vfioN`) and iommufd.
    #[serde(rename = "vfio-cdev")]
    Cdev { name: String, path: PathBuf },
}

impl DeviceConfig {
    pub fn name(&self) -> &str {
        match self {
            DeviceConfig::Sim(spec) => &spec.name,
            DeviceConfig::Group { name, .. } | DeviceConfig::Cdev { name, .. } => name,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestConfig {
    /// Corrupts the outgoing device stream (flip a byte, truncate, drop a connection).
    pub stream_fault: Option<StreamFaultConfig>,
}

/// `[test.stream_fault]`: `kind = "flip_byte" | "truncate" | "duplicate_frame" |
/// "reorder_frames"` with `device` and `frame`, or `kind = "drop_connection"` with `frame`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamFaultConfig {
    FlipByte { device: u32, frame: u64 },
    Truncate { device: u32, frame: u64 },
    DropConnection { frame: u64 },
    DuplicateFrame { device: u32, frame: u64 },
    ReorderFrames { device: u32, frame: u64 },
}

impl From<StreamFaultConfig> for StreamFault {
    fn from(f: StreamFaultConfig) -> StreamFault {
        match f {
            StreamFaultConfig::FlipByte { device, frame } => StreamFault::FlipByte { device, frame },
            StreamFaultConfig::Truncate { device, frame } => StreamFault::Truncate { device, frame },
            StreamFaultConfig::DropConnection { frame } => StreamFault::DropConnection { frame },
            StreamFaultConfig::DuplicateFrame { device, frame } => {
                StreamFault::DuplicateFrame { device, frame }
            }
            StreamFaultConfig::ReorderFrames { device, frame } => {
                StreamFault::ReorderFrames { device, frame }
            }
        }
    }
}

#[cfg(test)]
mod environment_tests {
    use super::*;

    #[test]
    fn a_bad_override_is_blamed_on_its_variable_with_its_value() {
        let vars = || {
            [
                ("PATH".to_owned(), "/bin".to_owned()),
                ("VFIO_MIGD__PEER__LISTEN".to_owned(), "garbage".to_owned()),
            ]
            .into_iter()
        };
        assert_eq!(
            blamed_environment(
                "invalid socket address syntax for key 'peer.listen' in the environment",
                vars()
            ),
            Some(("VFIO_MIGD__PEER__LISTEN".to_owned(), "garbage".to_owned()))
        );
        assert_eq!(blamed_environment("invalid type for key 'metrics.listen'", vars()), None);
        assert_eq!(blamed_environment("missing field `name`", vars()), None);
        let shown = ConfigError::Environment {
            variable: "VFIO_MIGD__PEER__LISTEN".into(),
            value: "garbage".into(),
            message: "invalid socket address syntax for key 'peer.listen'".into(),
        }
        .to_string();
        assert!(shown.starts_with("environment variable VFIO_MIGD__PEER__LISTEN=\"garbage\": "), "{shown}");
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/vfio-migd")
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/vfio-migd/control.sock")
}
fn default_handoff_socket() -> PathBuf {
    PathBuf::from("/run/vfio-migd/handoff.sock")
}
fn default_handoff_max_connections() -> usize {
    16
}
fn default_handoff_request_timeout_ms() -> u64 {
    10_000
}
fn default_sim_max_state_size() -> u64 {
    1 << 30
}

/// A byte size: a number or a string such as `"1GiB"`.
fn de_byte_size<'de, D: serde::Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    match Size::deserialize(de)? {
        Size::Number(n) => Ok(n),
        Size::Text(text) => parse_byte_size(&text).ok_or_else(|| {
            serde::de::Error::custom(format!("`{text}` is not a byte size (e.g. 1048576 or \"1GiB\")"))
        }),
    }
}

fn default_peer_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7410))
}
fn default_data_connections() -> usize {
    4
}
fn default_max_frame_payload() -> usize {
    1 << 20
}
fn default_phase_timeout_ms() -> u64 {
    60_000
}
fn default_pre_copy_max_ms() -> u64 {
    10_000
}
fn default_retained_jobs() -> usize {
    64
}
fn default_log_level() -> String {
    "info".to_string()
}
fn default_true() -> bool {
    true
}

impl Config {
    /// Loads `path` (which must exist unless it is the default path), then the
    /// environment overrides, then checks what serde cannot.
    pub fn load(path: Option<&Path>, allow_test_faults: bool) -> Result<Config, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let shown = path.display().to_string();
        let settings = config::Config::builder()
            .add_source(
                config::File::from(path.as_path()).format(config::FileFormat::Toml).required(required),
            )
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .map_err(|source| ConfigError::Load { path: shown.clone(), source })?;
        let config: Config = settings.try_deserialize().map_err(|source| {
            match blamed_environment(&source.to_string(), std::env::vars()) {
                Some((variable, value)) => {
                    ConfigError::Environment { variable, value, message: source.to_string() }
                }
                None => ConfigError::Load { path: shown, source },
            }
        })?;
        config.validate(allow_test_faults)?;
        Ok(config)
    }

    /// Parses a TOML document without environment overrides (tests, `--check-config`).
    pub fn from_toml(text: &str, allow_test_faults: bool) -> Result<Config, ConfigError> {
        let settings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|source| ConfigError::Load { path: "<inline>".into(), source })?;
        let config: Config = settings
            .try_deserialize()
            .map_err(|source| ConfigError::Load { path: "<inline>".into(), source })?;
        config.validate(allow_test_faults)?;
        Ok(config)
    }

    fn validate(&self, allow_test_faults: bool) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, message: &str| ConfigError::Invalid { key: key.into(), message: message.into() };
        if self.test.stream_fault.is_some() && !allow_test_faults {
            return Err(invalid(
                "test.stream_fault",
                "test-only fault injection is refused unless vfio-migd runs with --allow-test-faults",
            ));
        }
        if self.peer.data_connections == 0 || self.peer.data_connections > 64 {
            return Err(invalid("peer.data_connections", "must be between 1 and 64"));
        }
        if !(4096..=16 << 20).contains(&self.peer.max_frame_payload) {
            return Err(invalid("peer.max_frame_payload", "must be between 4096 and 16777216 bytes"));
        }
        if self.migration.phase_timeout_ms == 0 {
            return Err(invalid("migration.phase_timeout_ms", "must be positive"));
        }
        if self.handoff.max_connections == 0 {
            return Err(invalid("handoff.max_connections", "must be at least 1"));
        }
        if self.handoff.request_timeout_ms == 0 {
            return Err(invalid("handoff.request_timeout_ms", "must be positive"));
        }
        self.validate_peer()?;
        let mut seen = std::collections::HashSet::new();
        for (i, device) in self.devices.iter().enumerate() {
            if device.name().is_empty() {
                return Err(invalid(&format!("device[{i}].name"), "must not be empty"));
            }
            if let DeviceConfig::Sim(spec) = device {
                spec.validate()
                    .map_err(|e| invalid(&format!("device[{i}] ({})", device.name()), &e.to_string()))?;
                if spec.state_size > self.simulator.max_state_size {
                    return Err(invalid(
                        &format!("device[{i}].state_size"),
                        &format!(
                            "{} bytes is more than simulator.max_state_size ({} bytes)",
                            spec.state_size, self.simulator.max_state_size
                        ),
                    ));
                }
            }
            if !seen.insert(device.name()) {
                return Err(invalid(
                    &format!("device[{i}].name"),
                    &format!("duplicate device name `{}`", device.name()),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// The peer listener's security and limits: plaintext only on loopback unless
    /// explicitly allowed, every limit positive and consistent.
    fn validate_peer(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid { key: key.into(), message };
        let peer = &self.peer;
        if peer.tls.is_none() && !peer.listen.ip().is_loopback() && !peer.insecure_plaintext {
            return Err(invalid(
                "peer.listen",
                format!(
                    "{} is not a loopback address and no [peer.tls] is configured: peers would be \
                     unauthenticated and device state unencrypted. Configure [peer.tls] (cert, key, ca), \
                     listen on loopback, or set [peer] insecure_plaintext = true (lab use only)",
                    peer.listen
                ),
            ));
        }
        if let Some(advertise) = &peer.advertise
            && (advertise.is_empty() || !advertise.contains(':'))
        {
            return Err(invalid("peer.advertise", format!("`{advertise}` is not a host:port address")));
        }
        let l = &peer.limits;
        let positive: [(&str, u64); 11] = [
            ("max_connections", l.max_connections as u64),
            ("max_concurrent_streams", u64::from(l.max_concurrent_streams)),
            ("concurrency_per_connection", l.concurrency_per_connection as u64),
            ("request_timeout_ms", l.request_timeout_ms),
            ("max_connection_age_ms", l.max_connection_age_ms),
            ("keepalive_interval_ms", l.keepalive_interval_ms),
            ("keepalive_timeout_ms", l.keepalive_timeout_ms),
            ("dead_peer_ms", l.dead_peer_ms),
            ("handshake_timeout_ms", l.handshake_timeout_ms),
            ("max_pending_data_connections", l.max_pending_data_connections as u64),
            ("max_message_bytes", l.max_message_bytes as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(&format!("peer.limits.{key}"), "must be positive".into()));
            }
        }
        if l.request_timeout_ms <= self.migration.phase_timeout_ms {
            return Err(invalid(
                "peer.limits.request_timeout_ms",
                format!(
                    "{} ms must exceed migration.phase_timeout_ms ({} ms): AwaitLoaded waits up to a phase timeout",
                    l.request_timeout_ms, self.migration.phase_timeout_ms
                ),
            ));
        }
        if l.max_message_bytes < 16 << 10 {
            return Err(invalid("peer.limits.max_message_bytes", "must be at least 16384 bytes".into()));
        }
        // HTTP/2 windows are 65535..2^31-1 (RFC 9113 §6.9.2 allows smaller, but a window
        // below the default 64 KiB only slows calls down).
        for (key, value) in [
            ("stream_window_bytes", l.stream_window_bytes),
            ("connection_window_bytes", l.connection_window_bytes),
        ] {
            if !(65_535..=i32::MAX as u32).contains(&value) {
                return Err(invalid(
                    &format!("peer.limits.{key}"),
                    "must be between 65535 and 2147483647".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_contract() {
        let config = Config::from_toml("", false).unwrap();
        assert_eq!(config.control.socket, Path::new("/run/vfio-migd/control.sock"));
        assert_eq!(config.handoff.socket, Path::new("/run/vfio-migd/handoff.sock"));
        assert_eq!(config.peer.listen, "127.0.0.1:7410".parse().unwrap());
        assert_eq!(config.state_dir, Path::new("/var/lib/vfio-migd"));
        assert!(config.devices.is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::from_toml("[peer]\nlisten = \"127.0.0.1:1\"\nlsten = 3\n", false).unwrap_err();
        assert!(err.to_string().contains("lsten"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::from_toml("[peer]\ndata_connections = 0\n", false).unwrap_err();
        assert!(err.to_string().contains("peer.data_connections"), "{err}");
        let err = Config::from_toml("[peer]\nlisten = \"not an address\"\n", false).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn plaintext_on_a_non_loopback_listener_needs_the_explicit_key() {
        let err = Config::from_toml("[peer]\nlisten = \"0.0.0.0:7410\"\n", false).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("peer.listen") && text.contains("insecure_plaintext"), "{text}");
        let config =
            Config::from_toml("[peer]\nlisten = \"0.0.0.0:7410\"\ninsecure_plaintext = true\n", false)
                .unwrap();
        assert!(config.peer.insecure_plaintext);
        let tls = "[peer]\nlisten = \"0.0.0.0:7410\"\n[peer.tls]\ncert = \"/c\"\nkey = \"/k\"\nca = \"/a\"\n";
        assert_eq!(Config::from_toml(tls, false).unwrap().peer.tls.unwrap().ca, Path::new("/a"));
        Config::from_toml("[peer]\nlisten = \"[::1]:7410\"\n", false).unwrap();
    }

    #[test]
    fn peer_limits_have_defaults_and_are_checked() {
        let config = Config::from_toml("", false).unwrap();
        assert_eq!(config.peer.limits, PeerLimits::default());
        assert_eq!(config.peer.advertised(), "127.0.0.1:7410");
        let err = Config::from_toml("[peer.limits]\nmax_connections = 0\n", false).unwrap_err();
        assert!(err.to_string().contains("peer.limits.max_connections"), "{err}");
        let err = Config::from_toml("[peer.limits]\nrequest_timeout_ms = 1000\n", false).unwrap_err();
        assert!(err.to_string().contains("phase_timeout_ms"), "{err}");
        let err = Config::from_toml("[peer.limits]\nstream_window_bytes = 10\n", false).unwrap_err();
        assert!(err.to_string().contains("stream_window_bytes"), "{err}");
        let config = Config::from_toml("[peer]\nadvertise = \"node-a.fleet:7410\"\n", false).unwrap();
        assert_eq!(config.peer.advertised(), "node-a.fleet:7410");
    }

    #[test]
    fn test_faults_need_the_explicit_flag() {
        let text = "[test.stream_fault]\nkind = \"truncate\"\ndevice = 0\nframe = 1\n";
        let err = Config::from_toml(text, false).unwrap_err();
        assert!(err.to_string().contains("--allow-test-faults"), "{err}");
        let config = Config::from_toml(text, true).unwrap();
        assert_eq!(config.test.stream_fault, Some(StreamFaultConfig::Truncate { device: 0, frame: 1 }));
    }

    #[test]
    fn simulated_devices_parse_and_are_checked() {
        let text = "[[device]]\nkind = \"sim\"\nname = \"nic0\"\nmodel = \"sim-nic\"\nstate_size = \"4MiB\"\n\
                    caps = \"STOP_COPY|P2P\"\nseed = 7\n";
        let config = Config::from_toml(text, false).unwrap();
        match &config.devices[0] {
            DeviceConfig::Sim(spec) => {
                assert_eq!(spec.state_size, 4 << 20);
                assert_eq!(spec.caps, crate::fsm::Caps::MIGRATABLE[1]);
            }
            other => panic!("expected a simulated device, got {other:?}"),
        }
        let err =
            Config::from_toml("[[device]]\nkind = \"sim\"\nname = \"x\"\ncolour = 1\n", false).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn real_devices_parse() {
        let text = "[[device]]\nkind = \"vfio-group\"\nname = \"uart0\"\nsysfs_device = \"83b8f4f2-509f-382f-3c1e-e6bfe0fa1001\"\n\
                    [[device]]\nkind = \"vfio-cdev\"\nname = \"nic0\"\npath = \"/dev/vfio/devices/vfio0\"\n";
        let config = Config::from_toml(text, false).unwrap();
        assert_eq!(config.devices.len(), 2);
        assert_eq!(config.devices[1].name(), "nic0");
        let dup = format!("{text}[[device]]\nkind = \"vfio-cdev\"\nname = \"nic0\"\npath = \"/x\"\n");
        let err = Config::from_toml(&dup, false).unwrap_err();
        assert!(err.to_string().contains("duplicate device name"), "{err}");
    }

    #[test]
    fn configured_simulated_devices_are_bounded_by_max_state_size() {
        let device = "[[device]]\nkind = \"sim\"\nname = \"big\"\nstate_size = \"2GiB\"\n";
        let err = Config::from_toml(device, false).unwrap_err().to_string();
        assert!(err.contains("device[0].state_size") && err.contains("max_state_size"), "{err}");
        let raised = format!("[simulator]\nmax_state_size = \"4GiB\"\n{device}");
        assert_eq!(Config::from_toml(&raised, false).unwrap().simulator.max_state_size, 4 << 30);
    }

    #[test]
    fn access_and_simulator_defaults_are_closed() {
        let config = Config::from_toml("", false).unwrap();
        assert!(!config.simulator.allow_remote);
        assert_eq!(config.simulator.max_state_size, 1 << 30);
        assert_eq!(config.control.access(), AccessConfig::default());
        assert_eq!(config.handoff.max_connections, 16);
        let err = Config::from_toml("[handoff]\nmax_connections = 0\n", false).unwrap_err();
        assert!(err.to_string().contains("handoff.max_connections"), "{err}");
    }
}
