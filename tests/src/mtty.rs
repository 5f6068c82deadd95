//! What the real-kernel test knows about the kernel's mtty sample driver
//! (`samples/vfio-mdev/mtty.c`): its migration stream layout and a UART register script
//! whose effect is visible both in the saved stream and, after a resume, through BAR reads.
//!
//! Facts from the kernel reference (§3.3); mtty's quirks are checked here, not relied on
//! by the daemon.

/// First eight bytes of every mtty migration stream (native-endian u64).
pub const MAGIC: u64 = 0x7e9d_0989_8c3e_2c4e;
/// magic, major, minor, nr_ports, flags.
pub const HEADER_LEN: usize = 24;
/// One serial port's record after the header.
pub const PORT_RECORD_LEN: usize = 36;

/// UART register offsets inside a port's 8-byte BAR.
pub mod reg {
    /// RX (read) / TX (write); DLL while LCR.DLAB is set.
    pub const DATA: u64 = 0;
    /// IER; DLM while LCR.DLAB is set.
    pub const IER: u64 = 1;
    /// FCR (write) / IIR (read).
    pub const FCR: u64 = 2;
    pub const LCR: u64 = 3;
    pub const MCR: u64 = 4;
    pub const LSR: u64 = 5;
    pub const SCR: u64 = 7;
}

/// LSR bits the script checks.
pub const LSR_DATA_READY: u8 = 0x01;
pub const LSR_TX_IDLE: u8 = 0x60;

/// The two mdev types mtty offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MttyType {
    OnePort,
    TwoPorts,
}

impl MttyType {
    pub fn from_sysfs_name(name: &str) -> Option<MttyType> {
        match name {
            "mtty-1" => Some(MttyType::OnePort),
            "mtty-2" => Some(MttyType::TwoPorts),
            _ => None,
        }
    }

    pub fn sysfs_name(self) -> &'static str {
        match self {
            MttyType::OnePort => "mtty-1",
            MttyType::TwoPorts => "mtty-2",
        }
    }

    /// Ports, one BAR each (BAR0, BAR1).
    pub fn ports(self) -> usize {
        match self {
            MttyType::OnePort => 1,
            MttyType::TwoPorts => 2,
        }
    }

    /// `MIG_DATA_SIZE`, which is also the exact STOP_COPY stream length.
    pub fn image_len(self) -> usize {
        HEADER_LEN + PORT_RECORD_LEN * self.ports()
    }
}

/// Guest-visible state written into one port before saving and read back after resuming.
#[derive(Clone, Copy, Debug)]
pub struct PortScript {
    pub scratch: u8,
    /// Bytes transmitted into the loop-back FIFO.
    pub fifo: [u8; 4],
}

/// Distinct per port, so a stream with swapped ports fails the checks.
pub const PORT_SCRIPTS: [PortScript; 2] =
    [PortScript { scratch: 0xA5, fifo: *b"mtty" }, PortScript { scratch: 0x5A, fifo: *b"MTTY" }];

pub const LCR_8N1: u8 = 0x03;
const LCR_DLAB: u8 = 0x80;
pub const DIVISOR: [u8; 2] = [0x0C, 0x00];
const FCR_ENABLE_AND_CLEAR: u8 = 0x07;
pub const IER_VALUE: u8 = 0x05;
pub const MCR_VALUE: u8 = 0x0B;

impl PortScript {
    /// The 1-byte register writes, in order: divisor (under DLAB), line control, FIFO on,
    /// interrupt enables, modem control, scratch, then the FIFO bytes.
    pub fn writes(&self) -> Vec<(u64, u8)> {
        let mut writes = vec![
            (reg::LCR, LCR_DLAB),
            (reg::DATA, DIVISOR[0]),
            (reg::IER, DIVISOR[1]),
            (reg::LCR, LCR_8N1),
            (reg::FCR, FCR_ENABLE_AND_CLEAR),
            (reg::IER, IER_VALUE),
            (reg::MCR, MCR_VALUE),
            (reg::SCR, self.scratch),
        ];
        writes.extend(self.fifo.iter().map(|&byte| (reg::DATA, byte)));
        writes
    }

    /// Checks this port's record inside a saved stream: the registers, the FIFO bytes, the
    /// FIFO count and the divisor (which cannot be read back through the BAR).
    pub fn check_record(&self, image: &[u8], port: usize) -> Result<(), String> {
        let base = HEADER_LEN + PORT_RECORD_LEN * port;
        let record = image
            .get(base..base + PORT_RECORD_LEN)
            .ok_or_else(|| format!("stream of {} bytes has no record for port {port}", image.len()))?;
        let expect = |what: &str, at: usize, want: &[u8]| -> Result<(), String> {
            let got = &record[at..at + want.len()];
            if got == want {
                Ok(())
            } else {
                Err(format!("port {port} {what}: stream has {got:02x?}, expected {want:02x?}"))
            }
        };
        expect("SCR", reg::SCR as usize, &[self.scratch])?;
        expect("LCR", reg::LCR as usize, &[LCR_8N1])?;
        expect("MCR", reg::MCR as usize, &[MCR_VALUE])?;
        expect("FIFO", 8, &self.fifo)?;
        expect("FIFO count", 26, &[self.fifo.len() as u8])?;
        expect("divisor", 30, &DIVISOR)
    }
}

/// What the migration test writes into the ports of one VM's two devices (`[device][port]`:
/// the 1-port device first, then the 2-port one). Distinct everywhere, so that a stream
/// delivered to the wrong device or port fails the checks.
pub const VM_SCRIPTS: [[PortScript; 2]; 2] = [
    [PortScript { scratch: 0x1A, fifo: *b"vm1a" }, PortScript { scratch: 0x1B, fifo: *b"vm1b" }],
    [PortScript { scratch: 0x2A, fifo: *b"vm2a" }, PortScript { scratch: 0x2B, fifo: *b"vm2b" }],
];

impl PortScript {
    /// The THR writes that push this script's bytes into the loop-back FIFO again, after a
    /// check drained them.
    pub fn fifo_writes(&self) -> Vec<(u64, u8)> {
        self.fifo.iter().map(|&byte| (reg::DATA, byte)).collect()
    }
}

/// The guest-visible registers of one port that reading leaves alone (an RX read drains
/// the FIFO, so it is not among them). LSR tells whether the FIFO holds data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UartView {
    pub scr: u8,
    pub lcr: u8,
    pub mcr: u8,
    /// As read: the low four bits (the enables).
    pub ier: u8,
    pub lsr: u8,
}

impl UartView {
    /// The offsets [`UartView::from_registers`] expects, in order.
    pub const REGISTERS: [u64; 5] = [reg::SCR, reg::LCR, reg::MCR, reg::IER, reg::LSR];

    pub fn from_registers([scr, lcr, mcr, ier, lsr]: [u8; 5]) -> UartView {
        UartView { scr, lcr, mcr, ier, lsr }
    }

    /// What a port shows after [`PortScript::writes`]: data waiting, nothing overran.
    pub fn after(script: &PortScript) -> UartView {
        UartView { scr: script.scratch, lcr: LCR_8N1, mcr: MCR_VALUE, ier: IER_VALUE, lsr: LSR_DATA_READY }
    }

    /// `Ok` when equal, otherwise every register that differs.
    pub fn compare(&self, want: &UartView) -> Result<(), String> {
        let fields = [
            ("SCR", self.scr, want.scr),
            ("LCR", self.lcr, want.lcr),
            ("MCR", self.mcr, want.mcr),
            ("IER", self.ier, want.ier),
            ("LSR", self.lsr, want.lsr),
        ];
        let differ: Vec<String> = fields
            .iter()
            .filter(|(_, got, want)| got != want)
            .map(|(name, got, want)| format!("{name} = {got:#04x}, expected {want:#04x}"))
            .collect();
        if differ.is_empty() { Ok(()) } else { Err(differ.join(", ")) }
    }

    /// Whether any register holds what `script` put there, or the FIFO holds data: a
    /// device that shows none of it received none of the script's state.
    pub fn shows_any_of(&self, script: &PortScript) -> bool {
        self.scr == script.scratch || self.lsr & LSR_DATA_READY != 0
    }
}

/// Checks a stream's 24-byte header against the device type it came from.
pub fn check_header(header: &[u8], mtty: MttyType) -> Result<(), String> {
    let header = header
        .get(..HEADER_LEN)
        .ok_or_else(|| format!("{} bytes are shorter than the {HEADER_LEN}-byte header", header.len()))?;
    let word = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let magic = u64::from_ne_bytes(header[..8].try_into().expect("8 bytes"));
    if magic != MAGIC {
        return Err(format!("magic {magic:#018x}, expected {MAGIC:#018x}"));
    }
    let fields = [("major", word(8), 1), ("minor", word(12), 0), ("nr_ports", word(16), mtty.ports() as u32)];
    for (name, got, want) in fields {
        if got != want {
            return Err(format!("header {name} = {got}, expected {want}"));
        }
    }
    Ok(())
}

/// mdevs named on a guest program's command line as `TYPE:UUID`, grouped by type in
/// argument order.
pub type MdevsByType = std::collections::BTreeMap<&'static str, (MttyType, Vec<String>)>;

pub fn mdevs_by_type(args: impl IntoIterator<Item = String>) -> Result<MdevsByType, String> {
    let mut by_type = MdevsByType::new();
    for arg in args {
        let (name, uuid) = arg.split_once(':').ok_or_else(|| format!("argument `{arg}` is not TYPE:UUID"))?;
        let mtty = MttyType::from_sysfs_name(name).ok_or_else(|| format!("unknown mdev type `{name}`"))?;
        by_type.entry(mtty.sysfs_name()).or_insert((mtty, Vec::new())).1.push(uuid.to_string());
    }
    if by_type.is_empty() {
        return Err("no TYPE:UUID arguments".to_string());
    }
    Ok(by_type)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mdev_arguments_are_grouped_by_type_in_order_and_bad_ones_are_named() {
        let args = ["mtty-2:b", "mtty-1:a", "mtty-2:c"].map(String::from);
        let by_type = mdevs_by_type(args).unwrap();
        assert_eq!(by_type["mtty-1"].1, ["a"]);
        assert_eq!(by_type["mtty-2"].1, ["b", "c"]);
        assert_eq!(by_type["mtty-2"].0, MttyType::TwoPorts);
        assert!(mdevs_by_type(["mtty-1".to_string()]).unwrap_err().contains("`mtty-1`"));
        assert!(mdevs_by_type(["mtty-9:x".to_string()]).unwrap_err().contains("unknown mdev type"));
        assert!(mdevs_by_type(Vec::new()).unwrap_err().contains("no TYPE:UUID"));
    }

    use super::*;

    /// A stream laid out the way mtty saves one port after [`PortScript::writes`].
    fn scripted_image(mtty: MttyType) -> Vec<u8> {
        let mut image = vec![0u8; mtty.image_len()];
        image[..8].copy_from_slice(&MAGIC.to_ne_bytes());
        image[8..12].copy_from_slice(&1u32.to_ne_bytes());
        image[16..20].copy_from_slice(&(mtty.ports() as u32).to_ne_bytes());
        for (port, script) in PORT_SCRIPTS.iter().take(mtty.ports()).enumerate() {
            let record = &mut image[HEADER_LEN + PORT_RECORD_LEN * port..][..PORT_RECORD_LEN];
            record[reg::SCR as usize] = script.scratch;
            record[reg::LCR as usize] = LCR_8N1;
            record[reg::MCR as usize] = MCR_VALUE;
            record[8..12].copy_from_slice(&script.fifo);
            record[26] = 4;
            record[30..32].copy_from_slice(&DIVISOR);
        }
        image
    }

    #[test]
    fn image_lengths_match_the_driver() {
        assert_eq!(MttyType::OnePort.image_len(), 60);
        assert_eq!(MttyType::TwoPorts.image_len(), 96);
        assert_eq!(MttyType::from_sysfs_name("mtty-2"), Some(MttyType::TwoPorts));
        assert_eq!(MttyType::from_sysfs_name("mtty-3"), None);
    }

    #[test]
    fn header_checks_magic_version_and_ports() {
        let image = scripted_image(MttyType::TwoPorts);
        check_header(&image, MttyType::TwoPorts).unwrap();
        let err = check_header(&image, MttyType::OnePort).unwrap_err();
        assert!(err.contains("nr_ports = 2"), "{err}");
        let mut bad = image.clone();
        bad[0] ^= 1;
        assert!(check_header(&bad, MttyType::TwoPorts).unwrap_err().contains("magic"));
        assert!(check_header(&image[..10], MttyType::TwoPorts).is_err());
    }

    #[test]
    fn record_checks_find_each_field() {
        let image = scripted_image(MttyType::TwoPorts);
        for (port, script) in PORT_SCRIPTS.iter().enumerate() {
            script.check_record(&image, port).unwrap();
        }
        // Swapped ports are caught by the distinct scratch values.
        assert!(PORT_SCRIPTS[0].check_record(&image, 1).unwrap_err().contains("SCR"));
        let mut bad = image.clone();
        bad[HEADER_LEN + 30] = 0x0D;
        assert!(PORT_SCRIPTS[0].check_record(&bad, 0).unwrap_err().contains("divisor"));
        assert!(PORT_SCRIPTS[1].check_record(&image[..60], 1).is_err());
    }

    #[test]
    fn vm_scripts_differ_on_every_port() {
        let all: Vec<&PortScript> = VM_SCRIPTS.iter().flatten().collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.scratch, b.scratch);
                assert_ne!(a.fifo, b.fifo);
            }
        }
        assert_eq!(VM_SCRIPTS[1][0].fifo_writes(), [(0, b'v'), (0, b'm'), (0, b'2'), (0, b'a')]);
    }

    #[test]
    fn uart_views_compare_register_by_register() {
        let script = &VM_SCRIPTS[0][0];
        let after = UartView::after(script);
        assert_eq!(after, UartView::from_registers([0x1A, LCR_8N1, MCR_VALUE, IER_VALUE, LSR_DATA_READY]));
        after.compare(&after).unwrap();
        let power_on = UartView::from_registers([0, 0, 0, 0, LSR_TX_IDLE]);
        let err = power_on.compare(&after).unwrap_err();
        for name in ["SCR", "LCR", "MCR", "IER", "LSR"] {
            assert!(err.contains(name), "{err}");
        }
        assert!(after.shows_any_of(script));
        assert!(!power_on.shows_any_of(script));
        // Data in the FIFO alone gives the state away.
        assert!(UartView { lsr: LSR_DATA_READY, ..power_on }.shows_any_of(script));
    }

    #[test]
    fn script_sets_the_divisor_under_dlab_first() {
        let writes = PORT_SCRIPTS[0].writes();
        assert_eq!(writes[0], (reg::LCR, LCR_DLAB));
        assert_eq!(writes[3], (reg::LCR, LCR_8N1));
        assert_eq!(&writes[writes.len() - 4..], &[(0, b'm'), (0, b't'), (0, b't'), (0, b'y')]);
    }
}
