//! [`SimSpec`]: a simulated device as the configuration declares it
//! (`[[device]]` with `kind = "sim"`).
//!
//! ```toml
//! [[device]]
//! kind = "sim"
//! name = "nic0"
//! model = "sim-nic"             # compatibility identity (driver "sim")
//! state_size = "64MiB"          # bytes, or a number
//! seed = 7                      # default: derived from the name
//! caps = "STOP_COPY|P2P|PRE_COPY"
//! dirty_rate = "8MiB"           # bytes of state changed per second while running
//! p2p_writes_per_second = 0     # P2P DMA writes into peer devices while RUNNING/PRE_COPY
//! precopy_end = "zero"          # or "enomsg"
//! arc_log = "/tmp/arcs.tsv"
//! [device.dma_logging]
//! supported = true
//! max_ranges = 256
//! min_page_size = 4096
//! max_page_size = "1GiB"
//! writes = { seed = 1, per_second = 1000, per_report = 0, iovas = [0x1000], granule = 4096 }
//! [device.iommu]                # attached to a HWPT of the simulated IOMMU (optional)
//! hwpt = "vm1"                  # shared by every simulated device naming it
//! dirty_tracking = true         # allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING
//! page_size = 4096              # IOMMU page: dirty granule and IOVA alignment
//! mapped = [{ iova = 0, length = "1GiB" }]   # IOAS mappings; default: everything
//! [[device.faults]]
//! kind = "errno"
//! op = "set_state"
//! state = "STOP_COPY"
//! errno = "EIO"
//! once = true
//! ```

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::fault::Fault;
use super::stream::MAX_MODEL_LEN;
use crate::device::IovaRange;
use crate::fsm::{Caps, State};

/// A simulated migratable device.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimSpec {
    /// The name the daemon knows the device by (API, logs, arc log). No tabs or newlines.
    pub name: String,
    /// Compatibility identity (`DeviceIdentity { driver: "sim", model }`): a destination
    /// accepts only streams of its own model and state size. Default `sim`.
    #[serde(default = "default_model")]
    pub model: String,
    /// Bytes of device state a STOP_COPY stream carries (a number or `"256MiB"`). The
    /// stream adds a little framing (header, record headers, end record);
    /// [`super::SimDevice::data_size`] reports its exact length. Default 1 MiB.
    #[serde(default = "default_state_size", deserialize_with = "de_byte_size")]
    pub state_size: u64,
    /// Seed of the power-on state. Default: derived from `name`, so devices differ.
    #[serde(default)]
    pub seed: Option<u64>,
    /// `vfio_device_feature_migration.flags` in the kernel's spelling, e.g.
    /// `"STOP_COPY|P2P"`. An empty string is a device without migration support (every
    /// migration operation fails with ENOTTY). Default `STOP_COPY|P2P|PRE_COPY`.
    #[serde(default = "default_caps", deserialize_with = "de_caps")]
    pub caps: Caps,
    /// Bytes of state that change per second while the device runs (RUNNING, PRE_COPY and
    /// the P2P-quiesced RUNNING_P2P, PRE_COPY_P2P, which keep running), in 4 KiB pages.
    /// Nothing changes in the stopped states. Default 0.
    #[serde(default, deserialize_with = "de_byte_size")]
    pub dirty_rate: u64,
    /// Peer-to-peer DMA writes per second this device makes into its peers (the other
    /// devices of its VM, connected with [`super::SimDevice::connect_p2p`]) while it may
    /// initiate P2P DMA (RUNNING, PRE_COPY). A write into a running peer changes a page of
    /// the peer's state, as a write into its BAR would; a write into a peer in STOP,
    /// STOP_COPY, RESUMING or ERROR — which the kernel's P2P rules exist to prevent —
    /// corrupts the peer's state and every stream it saves, so the destination rejects
    /// the stream. Default 0 (no P2P DMA).
    #[serde(default)]
    pub p2p_writes_per_second: u64,
    /// What a read at the temporary end of a PRE_COPY stream returns.
    #[serde(default)]
    pub precopy_end: PrecopyEnd,
    /// Device DMA logging (`DMA_LOGGING_*` features).
    #[serde(default)]
    pub dma_logging: DmaLoggingSpec,
    /// The simulated IOMMU HWPT the device is attached to: the dirty source of a device
    /// without DMA logging. None by default.
    #[serde(default)]
    pub iommu: Option<IommuSpec>,
    /// File to append every arc walked to (see [`super::arc_log`]); other processes may
    /// read it while the daemon runs.
    #[serde(default)]
    pub arc_log: Option<PathBuf>,
    /// Faults armed from the start.
    #[serde(default)]
    pub faults: Vec<Fault>,
}

/// The answer at the temporary end of a PRE_COPY stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrecopyEnd {
    /// `read()` returns 0, as hisi_acc, qat and mtty do.
    #[default]
    Zero,
    /// `read()` fails with ENOMSG, as the uAPI says and mlx5 and virtio do.
    Enomsg,
}

/// DMA logging as a driver implements it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaLoggingSpec {
    /// Whether the driver has logging ops; without them every logging operation fails
    /// with ENOTTY and the probe says unsupported. Default true.
    #[serde(default = "yes")]
    pub supported: bool,
    /// Most ranges one START takes; more fail with E2BIG. Default 256 (the kernel's
    /// `LOG_MAX_RANGES` with 4 KiB pages).
    #[serde(default = "default_max_ranges")]
    pub max_ranges: u32,
    /// Smallest page the driver tracks (a power of two ≥ 4096). START's requested page
    /// size is clamped into `[min_page_size, max_page_size]` and returned, as mlx5 does.
    /// Default 4 KiB.
    #[serde(default = "default_min_page", deserialize_with = "de_byte_size")]
    pub min_page_size: u64,
    /// Largest page the driver tracks (a power of two). Default 1 GiB.
    #[serde(default = "default_max_page", deserialize_with = "de_byte_size")]
    pub max_page_size: u64,
    /// The device's own DMA writes while logging.
    #[serde(default)]
    pub writes: DmaWriteSpec,
}

/// Where and when the simulated device writes guest memory by DMA. Random writes land at
/// `granule`-aligned IOVAs in the logged ranges while the device logs, otherwise in its
/// HWPT's `mapped` ranges while the HWPT tracks (with neither, only `iovas` are written).
/// Each write dirties the logging pages and the IOMMU pages it touches, whichever track.
/// Tests that need exact control use [`super::SimDevice::dma_write`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaWriteSpec {
    /// Seed of the pseudo-random write addresses.
    #[serde(default)]
    pub seed: u64,
    /// Writes per second of running time (RUNNING, PRE_COPY).
    #[serde(default)]
    pub per_second: u64,
    /// Writes made right before every REPORT, in any state (deterministic); for a device
    /// that does not log, before every read of its HWPT.
    #[serde(default)]
    pub per_report: u64,
    /// IOVAs written once each (one granule) as soon as logging starts, and as soon as
    /// its HWPT starts tracking.
    #[serde(default)]
    pub iovas: Vec<u64>,
    /// Bytes per write (a power of two). Default 4096.
    #[serde(default = "default_granule", deserialize_with = "de_byte_size")]
    pub granule: u64,
}

/// The HWPT of the simulated IOMMU a device is attached to (`[device.iommu]`). Every
/// simulated device of a daemon that names the same `hwpt` shares it (one SET / GET serves
/// them all) and must describe it identically.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IommuSpec {
    /// The HWPT's name (no tabs or newlines).
    pub hwpt: String,
    /// Whether the HWPT was allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`; without it,
    /// SET_DIRTY_TRACKING and GET_DIRTY_BITMAP fail with EOPNOTSUPP. Default true.
    #[serde(default = "yes")]
    pub dirty_tracking: bool,
    /// The IOMMU page (a power of two ≥ 4096): the granule a DMA write dirties, and the
    /// IOAS alignment every read must start and end on. Default 4 KiB (huge IOPTEs off).
    #[serde(default = "default_min_page", deserialize_with = "de_byte_size")]
    pub page_size: u64,
    /// The IOAS mappings, aligned to `page_size` and disjoint. Writes outside them dirty
    /// nothing, and a read stops at the first unmapped byte without an error, as the
    /// kernel's does. Empty (the default): everything is mapped.
    #[serde(default)]
    pub mapped: Vec<IommuMapping>,
}

/// One IOAS mapping of an [`IommuSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IommuMapping {
    #[serde(deserialize_with = "de_byte_size")]
    pub iova: u64,
    #[serde(deserialize_with = "de_byte_size")]
    pub length: u64,
}

impl IommuSpec {
    /// A dirty-tracking HWPT named `hwpt` with 4 KiB pages, everything mapped.
    pub fn new(hwpt: impl Into<String>) -> IommuSpec {
        IommuSpec {
            hwpt: hwpt.into(),
            dirty_tracking: true,
            page_size: default_min_page(),
            mapped: Vec::new(),
        }
    }

    /// The mappings, sorted.
    pub fn mapped_ranges(&self) -> Vec<IovaRange> {
        let mut ranges: Vec<IovaRange> =
            self.mapped.iter().map(|m| IovaRange { iova: m.iova, length: m.length }).collect();
        ranges.sort();
        ranges
    }

    fn validate(&self) -> Result<(), String> {
        if self.hwpt.is_empty() || self.hwpt.contains(['\t', '\n', '\r']) {
            return Err(format!(
                "iommu.hwpt {:?} must be non-empty and free of tabs and newlines",
                self.hwpt
            ));
        }
        if !self.page_size.is_power_of_two() || self.page_size < 4096 {
            return Err(format!("iommu.page_size {} is not a power of two >= 4096", self.page_size));
        }
        let ranges = self.mapped_ranges();
        for range in &ranges {
            let aligned =
                range.iova.is_multiple_of(self.page_size) && range.length.is_multiple_of(self.page_size);
            if range.length == 0 || !aligned || range.iova.checked_add(range.length).is_none() {
                return Err(format!(
                    "iommu.mapped range {range:x?} is empty, overflows or is not aligned to {}",
                    self.page_size
                ));
            }
        }
        if let Some(pair) = ranges.windows(2).find(|w| w[0].end() > w[1].iova) {
            return Err(format!("iommu.mapped ranges {:x?} and {:x?} overlap", pair[0], pair[1]));
        }
        Ok(())
    }
}

impl Default for DmaLoggingSpec {
    fn default() -> DmaLoggingSpec {
        DmaLoggingSpec {
            supported: true,
            max_ranges: default_max_ranges(),
            min_page_size: default_min_page(),
            max_page_size: default_max_page(),
            writes: DmaWriteSpec::default(),
        }
    }
}

impl Default for DmaWriteSpec {
    fn default() -> DmaWriteSpec {
        DmaWriteSpec { seed: 0, per_second: 0, per_report: 0, iovas: Vec::new(), granule: default_granule() }
    }
}

/// A [`SimSpec`] the simulator cannot build.
#[derive(Debug, thiserror::Error)]
pub enum SimSpecError {
    #[error("device name {0:?} must be non-empty and free of tabs and newlines")]
    Name(String),
    #[error("device {name}: model {model:?} must be 1..={MAX_MODEL_LEN} bytes without tabs or newlines")]
    Model { name: String, model: String },
    #[error(
        "device {name}: capabilities {caps} lack STOP_COPY (the kernel refuses to register such a driver)"
    )]
    Caps { name: String, caps: Caps },
    #[error("device {name}: {what}")]
    DmaLogging { name: String, what: String },
    #[error("device {name}: {what}")]
    Iommu { name: String, what: String },
    #[error("device {name}: cannot open arc log {path}: {source}")]
    ArcLog { name: String, path: PathBuf, source: std::io::Error },
}

fn default_model() -> String {
    "sim".to_string()
}
fn default_state_size() -> u64 {
    1 << 20
}
fn default_caps() -> Caps {
    Caps::MIGRATABLE[3]
}
fn yes() -> bool {
    true
}
fn default_max_ranges() -> u32 {
    256
}
fn default_min_page() -> u64 {
    4096
}
fn default_max_page() -> u64 {
    1 << 30
}
fn default_granule() -> u64 {
    4096
}

impl SimSpec {
    /// A device with every default: 1 MiB of state, all capabilities, DMA logging.
    pub fn new(name: impl Into<String>) -> SimSpec {
        SimSpec {
            name: name.into(),
            model: default_model(),
            state_size: default_state_size(),
            seed: None,
            caps: default_caps(),
            dirty_rate: 0,
            p2p_writes_per_second: 0,
            precopy_end: PrecopyEnd::Zero,
            dma_logging: DmaLoggingSpec::default(),
            iommu: None,
            arc_log: None,
            faults: Vec::new(),
        }
    }

    /// The seed of the power-on state (explicit, or FNV-1a of the name).
    pub fn effective_seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            self.name
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
        })
    }

    pub fn validate(&self) -> Result<(), SimSpecError> {
        let clean = |s: &str| !s.is_empty() && !s.contains(['\t', '\n', '\r']);
        if !clean(&self.name) {
            return Err(SimSpecError::Name(self.name.clone()));
        }
        if !clean(&self.model) || self.model.len() > MAX_MODEL_LEN {
            return Err(SimSpecError::Model { name: self.name.clone(), model: self.model.clone() });
        }
        if self.caps != Caps::default() && !self.caps.is_migratable() {
            return Err(SimSpecError::Caps { name: self.name.clone(), caps: self.caps });
        }
        let log = &self.dma_logging;
        let bad = |what: String| Err(SimSpecError::DmaLogging { name: self.name.clone(), what });
        if !log.min_page_size.is_power_of_two() || log.min_page_size < 4096 {
            return bad(format!("min_page_size {} is not a power of two >= 4096", log.min_page_size));
        }
        if !log.max_page_size.is_power_of_two() || log.max_page_size < log.min_page_size {
            return bad(format!(
                "max_page_size {} is not a power of two >= min_page_size",
                log.max_page_size
            ));
        }
        if log.max_ranges == 0 {
            return bad("max_ranges must be at least 1".into());
        }
        if !log.writes.granule.is_power_of_two() {
            return bad(format!("writes.granule {} is not a power of two", log.writes.granule));
        }
        if let Some(iommu) = &self.iommu {
            iommu.validate().map_err(|what| SimSpecError::Iommu { name: self.name.clone(), what })?;
        }
        Ok(())
    }
}

/// Parses `4096`, `"4KiB"`, `"256 MiB"`, `"1GiB"`, `"2M"` (binary multiples).
pub fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '_').unwrap_or(text.len());
    let number: u64 = text[..split].replace('_', "").parse().ok()?;
    let shift = match text[split..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

struct ByteSize;

impl serde::de::Visitor<'_> for ByteSize {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte count: a number or a string such as \"64MiB\"")
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom("a byte count cannot be negative"))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
        parse_byte_size(v).ok_or_else(|| E::custom(format!("not a byte count: {v:?}")))
    }
}

pub(crate) fn de_byte_size<'de, D: Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    de.deserialize_any(ByteSize)
}

pub(crate) fn de_opt_byte_size<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    de.deserialize_any(ByteSize).map(Some)
}

fn de_caps<'de, D: Deserializer<'de>>(de: D) -> Result<Caps, D::Error> {
    let text = String::deserialize(de)?;
    Caps::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("unknown capability in {text:?}")))
}

pub(crate) fn de_opt_state<'de, D: Deserializer<'de>>(de: D) -> Result<Option<State>, D::Error> {
    let text = String::deserialize(de)?;
    State::from_kernel_name(&text.trim().to_ascii_uppercase())
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown device state {text:?}")))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nix::errno::Errno;

    use super::*;
    use crate::device::sim::fault::{FaultAction, FaultOp};

    /// How the daemon's configuration embeds the spec: an internally tagged list.
    #[derive(Debug, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum DeviceEntry {
        Sim(SimSpec),
    }

    #[derive(Debug, Deserialize)]
    struct File {
        device: Vec<DeviceEntry>,
    }

    fn load(toml: &str) -> Result<File, config::ConfigError> {
        config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()?
            .try_deserialize()
    }

    #[test]
    fn a_full_toml_entry_deserializes_through_the_config_crate() {
        let file = load(
            r#"
            [[device]]
            kind = "sim"
            name = "nic0"
            model = "sim-nic"
            state_size = "64MiB"
            seed = 7
            caps = "STOP_COPY|P2P"
            dirty_rate = 8192
            precopy_end = "enomsg"
            arc_log = "/tmp/arcs.tsv"
            [device.dma_logging]
            supported = true
            max_ranges = 8
            min_page_size = "8KiB"
            max_page_size = "2MiB"
            writes = { seed = 3, per_report = 2, iovas = [0x1000, 0x200000] }
            [[device.faults]]
            kind = "errno"
            op = "set_state"
            state = "STOP_COPY"
            errno = "EIO"
            once = true
            [[device.faults]]
            kind = "stall"
            op = "data_read"
            ms = 5
            nth = 2
            [[device.faults]]
            kind = "corrupt"
            bytes = 100

            [[device]]
            kind = "sim"
            name = "gpu0"
            "#,
        )
        .unwrap();
        let [DeviceEntry::Sim(nic), DeviceEntry::Sim(gpu)] = &file.device[..] else {
            panic!("two sim devices expected: {file:?}")
        };
        assert_eq!(nic.name, "nic0");
        assert_eq!(nic.model, "sim-nic");
        assert_eq!(nic.state_size, 64 << 20);
        assert_eq!(nic.effective_seed(), 7);
        assert_eq!(nic.caps, Caps::MIGRATABLE[1]);
        assert_eq!(nic.dirty_rate, 8192);
        assert_eq!(nic.precopy_end, PrecopyEnd::Enomsg);
        assert_eq!(nic.arc_log.as_deref(), Some(std::path::Path::new("/tmp/arcs.tsv")));
        assert_eq!(nic.dma_logging.max_ranges, 8);
        assert_eq!(nic.dma_logging.min_page_size, 8192);
        assert_eq!(nic.dma_logging.max_page_size, 2 << 20);
        assert_eq!(nic.dma_logging.writes.iovas, vec![0x1000, 0x200000]);
        assert_eq!(nic.dma_logging.writes.per_report, 2);
        assert_eq!(nic.dma_logging.writes.granule, 4096);
        assert_eq!(nic.faults.len(), 3);
        assert_eq!(nic.faults[0].action, FaultAction::Errno { op: FaultOp::SetState, errno: Errno::EIO });
        assert_eq!(nic.faults[0].state, Some(State::StopCopy));
        assert!(nic.faults[0].once);
        assert_eq!(
            nic.faults[1].action,
            FaultAction::Stall { op: FaultOp::DataRead, duration: Duration::from_millis(5) }
        );
        assert_eq!(nic.faults[1].nth, Some(2));
        assert_eq!(nic.faults[2].action, FaultAction::Corrupt { offset: 100 });
        nic.validate().unwrap();

        assert_eq!(gpu, &SimSpec::new("gpu0"));
        assert_ne!(gpu.effective_seed(), SimSpec::new("gpu1").effective_seed());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        let bad = [
            "[[device]]\nkind = \"sim\"\nname = \"a\"\nstate_sise = 1",
            "[[device]]\nkind = \"sim\"\nname = \"a\"\ncaps = \"STOP_COPY|TURBO\"",
            "[[device]]\nkind = \"sim\"\nname = \"a\"\nstate_size = \"12 parsecs\"",
            "[[device]]\nkind = \"sim\"\nname = \"a\"\n[device.dma_logging]\nmax_range = 1",
            "[[device]]\nkind = \"sim\"\nname = \"a\"\n[[device.faults]]\nkind = \"errno\"\nop = \"reset\"",
            "[[device]]\nkind = \"sim\"\nname = \"a\"\n[[device.faults]]\nkind = \"corrupt\"\nbytes = 1\nms = 3",
            "[[device]]\nkind = \"sim\"\nname = \"a\"\n[[device.faults]]\nkind = \"errno\"\nop = \"reset\"\nerrno = \"EWHAT\"",
            "[[device]]\nkind = \"sim\"\nname = \"a\"\n[[device.faults]]\nkind = \"stall\"\nop = \"reset\"\nms = 1\nstate = \"FLYING\"",
        ];
        for toml in bad {
            assert!(load(toml).is_err(), "accepted: {toml}");
        }
    }

    #[test]
    fn an_iommu_table_deserializes_and_is_checked() {
        let file = load(
            r#"
            [[device]]
            kind = "sim"
            name = "virtio0"
            [device.dma_logging]
            supported = false
            [device.iommu]
            hwpt = "vm1"
            page_size = "8KiB"
            mapped = [{ iova = 0, length = "1GiB" }, { iova = 0x100000000, length = "2GiB" }]
            [[device.faults]]
            kind = "errno"
            op = "hwpt_get_dirty_bitmap"
            errno = "EIO"
            [[device.faults]]
            kind = "stall"
            op = "hwpt_set_dirty_tracking"
            ms = 3

            [[device]]
            kind = "sim"
            name = "qat0"
            iommu = { hwpt = "vm1", dirty_tracking = false }
            "#,
        )
        .unwrap();
        let [DeviceEntry::Sim(virtio), DeviceEntry::Sim(qat)] = &file.device[..] else {
            panic!("two sim devices expected: {file:?}")
        };
        let iommu = virtio.iommu.as_ref().unwrap();
        assert_eq!((iommu.hwpt.as_str(), iommu.dirty_tracking, iommu.page_size), ("vm1", true, 8192));
        assert_eq!(
            iommu.mapped_ranges(),
            [IovaRange { iova: 0, length: 1 << 30 }, IovaRange { iova: 1 << 32, length: 2 << 30 }]
        );
        virtio.validate().unwrap();
        assert_eq!(
            virtio.faults[0].action,
            FaultAction::Errno { op: FaultOp::HwptGetDirtyBitmap, errno: Errno::EIO }
        );
        assert_eq!(
            virtio.faults[1].action,
            FaultAction::Stall { op: FaultOp::HwptSetDirtyTracking, duration: Duration::from_millis(3) }
        );
        assert_eq!(qat.iommu, Some(IommuSpec { dirty_tracking: false, ..IommuSpec::new("vm1") }));
        assert_eq!(SimSpec::new("x").iommu, None);

        let unknown = "[[device]]\nkind = \"sim\"\nname = \"a\"\n[device.iommu]\nhwpt = \"v\"\nhuge = true";
        assert!(load(unknown).is_err(), "unknown keys are refused");
        assert!(load("[[device]]\nkind = \"sim\"\nname = \"a\"\n[device.iommu]\npage_size = 4096").is_err());
        let invalid = [
            IommuSpec::new(""),
            IommuSpec { page_size: 2048, ..IommuSpec::new("v") },
            IommuSpec { mapped: vec![IommuMapping { iova: 0x800, length: 4096 }], ..IommuSpec::new("v") },
            IommuSpec { mapped: vec![IommuMapping { iova: 0, length: 0 }], ..IommuSpec::new("v") },
            IommuSpec {
                mapped: vec![
                    IommuMapping { iova: 0, length: 8192 },
                    IommuMapping { iova: 4096, length: 4096 },
                ],
                ..IommuSpec::new("v")
            },
        ];
        for iommu in invalid {
            let spec = SimSpec { iommu: Some(iommu.clone()), ..SimSpec::new("a") };
            assert!(matches!(spec.validate(), Err(SimSpecError::Iommu { .. })), "accepted {iommu:?}");
        }
    }

    #[test]
    fn validation_catches_what_types_cannot() {
        let mut spec = SimSpec::new("a\tb");
        assert!(matches!(spec.validate(), Err(SimSpecError::Name(_))));
        spec = SimSpec { caps: Caps::P2P, ..SimSpec::new("a") };
        assert!(matches!(spec.validate(), Err(SimSpecError::Caps { .. })));
        spec = SimSpec { caps: Caps::default(), ..SimSpec::new("a") };
        spec.validate().unwrap();
        spec.dma_logging.min_page_size = 1024;
        assert!(matches!(spec.validate(), Err(SimSpecError::DmaLogging { .. })));
        assert_eq!(parse_byte_size("4 KiB"), Some(4096));
        assert_eq!(parse_byte_size("1_000"), Some(1000));
        assert_eq!(parse_byte_size("2M"), Some(2 << 20));
        assert_eq!(parse_byte_size("x"), None);
    }
}
