//! The handoff request as it arrives on the socket: the framing of one request line and
//! its single fd ([`RequestAssembler`]), and the parsing of the line ([`parse_request`]).
//! Pure (no I/O, no daemon types), so it is fuzzed on its own (`fuzz/`, target
//! `handoff_request`) and the socket code in `super` only drives it.
//!
//! Every limit is enforced per received message, before anything is kept: a line is at
//! most [`MAX_REQUEST_BYTES`]; fds are accepted only with the connection's first message
//! and only exactly one; a later message carrying fds ends the connection at once (the
//! caller closes the fds it just received), so a client cannot pile fds up in the
//! daemon's table.

use serde::Deserialize;

/// Longest request line accepted (without its `\n`).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Keys of a remote simulated device's `sim` object. Everything else is refused — above
/// all `arc_log` (a path the daemon would create and append to) and `faults` (fault
/// injection): those exist only for devices declared in the daemon's own configuration.
pub const REMOTE_SIM_KEYS: &[&str] =
    &["model", "state_size", "seed", "caps", "dirty_rate", "precopy_end", "dma_logging", "iommu"];

/// What backs the handed-over fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendHint {
    /// A VFIO device fd (group device fd or bound cdev).
    #[default]
    Vfio,
    /// A simulated device described by `sim`; the fd only anchors its lifetime.
    Sim,
}

/// `identity` of a request: the compatibility identity `{driver, model}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestIdentity {
    pub driver: String,
    pub model: String,
}

/// The request line.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffRequest {
    /// The name the daemon will know the device by.
    pub name: String,
    /// The group (VM) the device joins; created if it does not exist.
    #[serde(default)]
    pub group: Option<String>,
    /// Compatibility identity, for fds that cannot tell it themselves.
    #[serde(default)]
    pub identity: Option<RequestIdentity>,
    #[serde(default)]
    pub backend: BackendHint,
    /// Required with `"backend": "sim"`: [`REMOTE_SIM_KEYS`] of a `[[device]]` table with
    /// `kind = "sim"`.
    #[serde(default)]
    pub sim: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the connection closed before a complete request line")]
    Incomplete,
    #[error("the request line is longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error("data after the request line: send one request per connection")]
    TrailingData,
    #[error("the request carried {0} fds; send exactly one fd with the request line")]
    FdCount(usize),
    #[error("fds arrived after the first message of the request; send the one fd with the first byte")]
    LateFd,
    #[error("the fds were truncated by the kernel (too many sent); send exactly one")]
    FdsTruncated,
    #[error("the request line is not a valid request: {0}")]
    BadRequest(String),
}

/// Assembles the request line from the messages of one connection.
#[derive(Debug, Default)]
pub struct RequestAssembler {
    line: Vec<u8>,
    messages: u64,
}

impl RequestAssembler {
    pub fn new() -> RequestAssembler {
        RequestAssembler::default()
    }

    /// Takes one received message: its bytes (empty at end of stream), how many fds came
    /// with it, and whether the kernel truncated its control data (`MSG_CTRUNC`). Returns
    /// the complete line (without `\n`) once it has arrived, `None` while more is needed,
    /// or why the connection must be refused. After an error the assembler is spent.
    pub fn push(
        &mut self,
        bytes: &[u8],
        fds: usize,
        truncated: bool,
    ) -> Result<Option<Vec<u8>>, RequestError> {
        let first = self.messages == 0;
        self.messages += 1;
        if truncated {
            return Err(RequestError::FdsTruncated);
        }
        if !first && fds > 0 {
            return Err(RequestError::LateFd);
        }
        if bytes.is_empty() {
            return Err(RequestError::Incomplete);
        }
        if first && fds != 1 {
            return Err(RequestError::FdCount(fds));
        }
        match bytes.iter().position(|&b| b == b'\n') {
            Some(end) => {
                if end + 1 != bytes.len() {
                    return Err(RequestError::TrailingData);
                }
                if self.line.len() + end > MAX_REQUEST_BYTES {
                    return Err(RequestError::TooLong);
                }
                self.line.extend_from_slice(&bytes[..end]);
                Ok(Some(std::mem::take(&mut self.line)))
            }
            None => {
                if self.line.len() + bytes.len() > MAX_REQUEST_BYTES {
                    return Err(RequestError::TooLong);
                }
                self.line.extend_from_slice(bytes);
                Ok(None)
            }
        }
    }
}

/// Parses and checks a request line (without `\n`): the JSON, a usable `name`, and that
/// `backend` and `sim` agree. A `sim` object may hold only [`REMOTE_SIM_KEYS`].
pub fn parse_request(line: &[u8]) -> Result<HandoffRequest, RequestError> {
    let request: HandoffRequest =
        serde_json::from_slice(line).map_err(|e| RequestError::BadRequest(e.to_string()))?;
    if request.name.trim().is_empty() {
        return Err(RequestError::BadRequest("`name` must not be empty".into()));
    }
    if request.name.len() > 255 || request.name.contains(|c: char| c.is_control()) {
        return Err(RequestError::BadRequest(
            "`name` must be at most 255 bytes without control characters".into(),
        ));
    }
    match (request.backend, &request.sim) {
        (BackendHint::Vfio, None) => {}
        (BackendHint::Sim, Some(keys)) => {
            if let Some(key) = keys.keys().find(|k| !REMOTE_SIM_KEYS.contains(&k.as_str())) {
                let why = match key.as_str() {
                    "arc_log" | "faults" => "is accepted only for devices in the daemon's configuration file",
                    "name" => "is the request's `name`",
                    _ => "is not a simulated device parameter",
                };
                return Err(RequestError::BadRequest(format!(
                    "`sim` key `{key}` {why} (allowed over the socket: {})",
                    REMOTE_SIM_KEYS.join(", ")
                )));
            }
        }
        (BackendHint::Sim, None) => {
            return Err(RequestError::BadRequest("`\"backend\": \"sim\"` needs a `sim` object".into()));
        }
        (BackendHint::Vfio, Some(_)) => {
            return Err(RequestError::BadRequest("a `sim` object needs `\"backend\": \"sim\"`".into()));
        }
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_in_one_message_with_one_fd_is_accepted() {
        let mut a = RequestAssembler::new();
        assert_eq!(a.push(b"{\"name\":\"x\"}\n", 1, false), Ok(Some(b"{\"name\":\"x\"}".to_vec())));
    }

    #[test]
    fn a_line_may_continue_in_plain_messages() {
        let mut a = RequestAssembler::new();
        assert_eq!(a.push(b"{\"name\":", 1, false), Ok(None));
        assert_eq!(a.push(b"\"x\"}\n", 0, false), Ok(Some(b"{\"name\":\"x\"}".to_vec())));
    }

    #[test]
    fn framing_refusals() {
        // (messages as (bytes, fds, truncated), the error of the last one)
        /// One received message: bytes, fds, control data truncated.
        type Message<'a> = (&'a [u8], usize, bool);
        let table: [(&[Message<'_>], RequestError); 8] = [
            (&[(b"{}\n", 0, false)], RequestError::FdCount(0)),
            (&[(b"{}\n", 2, false)], RequestError::FdCount(2)),
            (&[(b"{", 1, false), (b"}", 1, false)], RequestError::LateFd),
            // The fd flood: 1-byte messages with fds after the first.
            (&[(b"{", 1, false), (b"x", 8, false)], RequestError::LateFd),
            (&[(b"{", 1, true)], RequestError::FdsTruncated),
            (&[(b"{", 1, false), (b"", 0, false)], RequestError::Incomplete),
            (&[(b"{}\n{}\n", 1, false)], RequestError::TrailingData),
            (&[(b"", 0, false)], RequestError::Incomplete),
        ];
        for (messages, expected) in table {
            let mut a = RequestAssembler::new();
            let (last, before) = messages.split_last().unwrap();
            for (bytes, fds, truncated) in before {
                assert_eq!(a.push(bytes, *fds, *truncated), Ok(None), "{messages:?}");
            }
            assert_eq!(a.push(last.0, last.1, last.2), Err(expected), "{messages:?}");
        }
    }

    #[test]
    fn the_line_is_bounded_before_it_is_stored() {
        let mut a = RequestAssembler::new();
        let chunk = vec![b'x'; 4096];
        let mut result = a.push(&chunk, 1, false);
        let mut stored = chunk.len();
        while result == Ok(None) {
            result = a.push(&chunk, 0, false);
            stored += chunk.len();
            assert!(stored <= MAX_REQUEST_BYTES + chunk.len());
        }
        assert_eq!(result, Err(RequestError::TooLong));
        assert!(a.line.len() <= MAX_REQUEST_BYTES);
        // Exactly at the limit is fine.
        let mut a = RequestAssembler::new();
        let mut line = vec![b'x'; MAX_REQUEST_BYTES];
        line.push(b'\n');
        assert_eq!(a.push(&line, 1, false).unwrap().unwrap().len(), MAX_REQUEST_BYTES);
    }

    #[test]
    fn remote_sim_objects_never_carry_arc_log_or_faults() {
        for key in ["arc_log", "faults"] {
            let line = format!("{{\"name\":\"s\",\"backend\":\"sim\",\"sim\":{{\"{key}\":\"/etc/x\"}}}}");
            let err = parse_request(line.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("configuration file"), "{err}");
        }
        let ok =
            parse_request(br#"{"name":"s","backend":"sim","sim":{"state_size":"1MiB","caps":"STOP_COPY"}}"#);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn request_refusals_say_why() {
        let table: [(&[u8], &str); 6] = [
            (b"not json", "not a valid request"),
            (br#"{"name":"n","colour":1}"#, "colour"),
            (br#"{"name":" "}"#, "must not be empty"),
            (br#"{"name":"a\tb"}"#, "control characters"),
            (br#"{"name":"n","backend":"sim"}"#, "needs a `sim` object"),
            (br#"{"name":"n","sim":{}}"#, "needs `\"backend\": \"sim\"`"),
        ];
        for (line, expected) in table {
            let err = parse_request(line).unwrap_err().to_string();
            assert!(err.contains(expected), "{}: {err}", String::from_utf8_lossy(line));
        }
    }
}
