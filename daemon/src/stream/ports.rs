//! The destination's data listener port: by default the kernel picks an ephemeral port
//! per job; with `[peer] data_ports = "49152-49215"` every job takes a free port of that
//! range, so a firewall between hosts opens the peer port and this range only. A job that
//! finds every port of the range taken fails with an error naming the range.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Deserialize;
use tokio::net::TcpListener;

/// An inclusive range of TCP ports, written `first-last` (or one port alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortRangeError {
    #[error("`{0}` is not a port range: write FIRST-LAST, e.g. 49152-49215")]
    Syntax(String),
    #[error("`{0}`: ports are 1 to 65535, and the first may not exceed the last")]
    Bounds(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    #[error(
        "every data port of {range} on {addr} is in use ({ports} ports): widen [peer] data_ports or wait for jobs to end"
    )]
    Exhausted { range: PortRange, addr: IpAddr, ports: u32 },
    #[error("cannot bind a data port on {addr}: {source}")]
    Bind {
        addr: IpAddr,
        #[source]
        source: std::io::Error,
    },
}

impl PortRange {
    pub fn new(first: u16, last: u16) -> Result<PortRange, PortRangeError> {
        if first == 0 || first > last {
            return Err(PortRangeError::Bounds(format!("{first}-{last}")));
        }
        Ok(PortRange { first, last })
    }

    pub fn len(self) -> u32 {
        u32::from(self.last - self.first) + 1
    }

    pub fn is_empty(self) -> bool {
        false
    }

    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;
    fn from_str(text: &str) -> Result<PortRange, PortRangeError> {
        let text = text.trim();
        let syntax = || PortRangeError::Syntax(text.to_owned());
        let (first, last) = text.split_once('-').unwrap_or((text, text));
        let port = |s: &str| s.trim().parse::<u16>().map_err(|_| syntax());
        PortRange::new(port(first)?, port(last)?).map_err(|_| PortRangeError::Bounds(text.to_owned()))
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<PortRange, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Binds a listener on `addr`: on a kernel-chosen port without a range, else on the
/// first free port of `range` (a port in use by anything, a running job or another
/// program, is skipped).
pub async fn bind_data_listener(addr: IpAddr, range: Option<PortRange>) -> Result<TcpListener, PortsError> {
    let Some(range) = range else {
        return TcpListener::bind((addr, 0)).await.map_err(|source| PortsError::Bind { addr, source });
    };
    for port in range.ports() {
        match TcpListener::bind((addr, port)).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(source) => return Err(PortsError::Bind { addr, source }),
        }
    }
    Err(PortsError::Exhausted { range, addr, ports: range.len() })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn ranges_parse_or_say_how_to_write_them() {
        assert_eq!("49152-49215".parse(), Ok(PortRange { first: 49152, last: 49215 }));
        assert_eq!(" 7412 ".parse(), Ok(PortRange { first: 7412, last: 7412 }));
        assert_eq!("49152-49215".parse::<PortRange>().unwrap().len(), 64);
        for bad in ["", "a-b", "49152-", "1-2-3", "70000-70001"] {
            let err = bad.parse::<PortRange>().unwrap_err().to_string();
            assert!(err.contains("FIRST-LAST") || err.contains("1 to 65535"), "{bad}: {err}");
        }
        for bad in ["0-10", "500-400"] {
            assert!(bad.parse::<PortRange>().unwrap_err().to_string().contains("1 to 65535"), "{bad}");
        }
    }

    /// A range of `n` ports on loopback that were free a moment ago.
    fn free_range(n: u16) -> PortRange {
        for _ in 0..50 {
            let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let first = probe.local_addr().unwrap().port();
            drop(probe);
            let Some(last) = first.checked_add(n - 1) else { continue };
            let all_free =
                (first..=last).all(|p| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok());
            if all_free {
                return PortRange::new(first, last).unwrap();
            }
        }
        panic!("no {n} consecutive free ports on loopback");
    }

    #[tokio::test]
    async fn jobs_take_ports_of_the_range_until_it_is_exhausted() {
        let loopback = IpAddr::from(Ipv4Addr::LOCALHOST);
        let range = free_range(3);
        let mut held = Vec::new();
        for _ in 0..3 {
            let listener = bind_data_listener(loopback, Some(range)).await.unwrap();
            let port = listener.local_addr().unwrap().port();
            assert!(range.contains(port), "{port} outside {range}");
            held.push(listener);
        }
        let ports: std::collections::BTreeSet<u16> =
            held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        assert_eq!(ports.len(), 3, "each job has its own port");
        let err = bind_data_listener(loopback, Some(range)).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("every data port of {range}")) && err.contains("[peer] data_ports"),
            "{err}"
        );
        // A port freed by a job that ended is taken again.
        let freed = held.remove(1).local_addr().unwrap().port();
        let again = bind_data_listener(loopback, Some(range)).await.unwrap();
        assert_eq!(again.local_addr().unwrap().port(), freed);
        // Without a range the kernel picks.
        assert!(bind_data_listener(loopback, None).await.is_ok());
    }
}
