//! rvmm's migration protocol: requests from the sender, one answer each from the receiver,
//! over one stream (a unix socket or TCP).
//!
//! ```text
//! request:  magic "RVMG" (4) | command u16 | reserved u16 | payload length u64 | payload
//! answer:   magic "RVMA" (4) | status u16 (1 ok, 2 error) | reserved u16 | length u64 | message
//! ```
//! All integers little-endian. The sender's requests, in order (the shape of Cloud
//! Hypervisor's protocol):
//!
//! 1. `Start`: protocol version u32, state format version u32. A receiver that speaks
//!    neither answers with an error naming both.
//! 2. `Config`: the VM's configuration as JSON (what `vm.info` shows).
//! 3. `Memory`, any number of times: a range count u64, that many (guest address u64, length
//!    u64) ranges, then their bytes in the same order. The first carries every non-zero page;
//!    each later one the pages written since (KVM's dirty log and the VMM's own writes).
//! 4. `State`: the paused VM's state, exactly as a snapshot's `state.bin` holds it.
//! 5. `Complete`: the receiver resumes the VM; once it answers, the sender's VM is gone.
//!
//! `Abandon` (at any point) tells the receiver to drop what it received; the sender's VM goes
//! on running. A connection that ends before `Complete` is an abandoned migration.

use std::io::{self, Read, Write};

/// This build's protocol version.
pub const PROTOCOL_VERSION: u32 = 1;
const REQUEST_MAGIC: &[u8; 4] = b"RVMG";
const ANSWER_MAGIC: &[u8; 4] = b"RVMA";
/// Largest `Config` payload.
pub const MAX_CONFIG: u64 = 1 << 20;
/// Largest error message in an answer.
const MAX_MESSAGE: u64 = 64 << 10;

/// A request's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Versions.
    Start,
    /// The VM's configuration.
    Config,
    /// Guest memory ranges.
    Memory,
    /// The VM's state.
    State,
    /// Resume at the receiver.
    Complete,
    /// Give up.
    Abandon,
}

impl Command {
    fn code(self) -> u16 {
        match self {
            Self::Start => 1,
            Self::Config => 2,
            Self::Memory => 3,
            Self::State => 4,
            Self::Complete => 5,
            Self::Abandon => 6,
        }
    }

    fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Start,
            2 => Self::Config,
            3 => Self::Memory,
            4 => Self::State,
            5 => Self::Complete,
            6 => Self::Abandon,
            _ => return None,
        })
    }
}

/// Errors of the protocol itself.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed or ended.
    #[error("Migration connection failed")]
    Io(#[from] io::Error),
    /// Not an rvmm migration peer.
    #[error("The peer does not speak rvmm's migration protocol")]
    BadMagic,
    /// An unknown command.
    #[error("Unknown migration command {0}")]
    UnknownCommand(u16),
    /// A payload larger than the command allows.
    #[error("{command:?} payload of {len} bytes is larger than {max}")]
    TooLarge {
        /// The command.
        command: Command,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The receiver refused a request.
    #[error("The receiver refused {command:?}: {message}")]
    Refused {
        /// The request.
        command: Command,
        /// Its error.
        message: String,
    },
}

/// A request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What is asked.
    pub command: Command,
    /// Payload bytes that follow.
    pub len: u64,
}

/// Writes a request header.
pub fn write_header(out: &mut (impl Write + ?Sized), command: Command, len: u64) -> io::Result<()> {
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(REQUEST_MAGIC);
    head[4..6].copy_from_slice(&command.code().to_le_bytes());
    head[8..16].copy_from_slice(&len.to_le_bytes());
    out.write_all(&head)
}

/// Reads a request header; `None` when the stream ended cleanly before one.
pub fn read_header(input: &mut (impl Read + ?Sized)) -> Result<Option<Header>, ProtocolError> {
    let mut head = [0u8; 16];
    match input.read(&mut head[..1])? {
        0 => return Ok(None),
        _ => input.read_exact(&mut head[1..])?,
    }
    if &head[..4] != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let code = u16::from_le_bytes([head[4], head[5]]);
    let command = Command::from_code(code).ok_or(ProtocolError::UnknownCommand(code))?;
    let len = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    Ok(Some(Header { command, len }))
}

/// Sends a whole request.
pub fn send_request(
    out: &mut (impl Write + ?Sized),
    command: Command,
    payload: &[u8],
) -> io::Result<()> {
    write_header(out, command, payload.len() as u64)?;
    out.write_all(payload)?;
    out.flush()
}

/// Answers a request: `Ok` or the error's text.
pub fn answer(out: &mut (impl Write + ?Sized), result: Result<(), String>) -> io::Result<()> {
    let (status, message) = match &result {
        Ok(()) => (1u16, ""),
        Err(e) => (2, e.as_str()),
    };
    let message = &message.as_bytes()[..message.len().min(MAX_MESSAGE as usize)];
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(ANSWER_MAGIC);
    head[4..6].copy_from_slice(&status.to_le_bytes());
    head[8..16].copy_from_slice(&(message.len() as u64).to_le_bytes());
    out.write_all(&head)?;
    out.write_all(message)?;
    out.flush()
}

/// Waits for the answer to `command`.
pub fn read_answer(
    input: &mut (impl Read + ?Sized),
    command: Command,
) -> Result<(), ProtocolError> {
    let mut head = [0u8; 16];
    input.read_exact(&mut head)?;
    if &head[..4] != ANSWER_MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let status = u16::from_le_bytes([head[4], head[5]]);
    let len = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    if len > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge {
            command,
            len,
            max: MAX_MESSAGE,
        });
    }
    let mut message = vec![0u8; len as usize];
    input.read_exact(&mut message)?;
    match status {
        1 => Ok(()),
        _ => Err(ProtocolError::Refused {
            command,
            message: String::from_utf8_lossy(&message).into_owned(),
        }),
    }
}

/// Reads a payload of `header.len` bytes, at most `max`.
pub fn read_payload(
    input: &mut (impl Read + ?Sized),
    header: Header,
    max: u64,
) -> Result<Vec<u8>, ProtocolError> {
    if header.len > max {
        return Err(ProtocolError::TooLarge {
            command: header.command,
            len: header.len,
            max,
        });
    }
    let mut payload = vec![0u8; header.len as usize];
    input.read_exact(&mut payload)?;
    Ok(payload)
}

/// `Start`'s payload.
pub fn start_payload() -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p[4..].copy_from_slice(&rvmm_core::snapshot::FORMAT_VERSION.to_le_bytes());
    p
}

/// Checks a `Start` payload against this build.
pub fn check_start(payload: &[u8]) -> Result<(), String> {
    let Ok::<[u8; 8], _>(p) = payload.try_into() else {
        return Err(format!(
            "Start payload of {} bytes, expected 8",
            payload.len()
        ));
    };
    let protocol = u32::from_le_bytes(p[..4].try_into().expect("4 bytes"));
    let format = u32::from_le_bytes(p[4..].try_into().expect("4 bytes"));
    if protocol != PROTOCOL_VERSION {
        return Err(format!(
            "migration protocol version {protocol} is not this rvmm's ({PROTOCOL_VERSION})"
        ));
    }
    if !rvmm_core::snapshot::READABLE_VERSIONS.contains(&format) {
        return Err(format!(
            "state format version {format} cannot be read by this rvmm (it reads {:?})",
            rvmm_core::snapshot::READABLE_VERSIONS
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip_and_strangers_are_refused() {
        let mut wire = Vec::new();
        send_request(&mut wire, Command::Config, b"{}").unwrap();
        let mut input = wire.as_slice();
        let header = read_header(&mut input).unwrap().unwrap();
        assert_eq!(
            header,
            Header {
                command: Command::Config,
                len: 2
            }
        );
        assert_eq!(read_payload(&mut input, header, 2).unwrap(), b"{}");
        assert!(read_header(&mut input).unwrap().is_none(), "clean end");

        let mut wire = Vec::new();
        answer(&mut wire, Err("no room".into())).unwrap();
        let err = read_answer(&mut wire.as_slice(), Command::State).unwrap_err();
        assert_eq!(err.to_string(), "The receiver refused State: no room");

        let mut wire = Vec::new();
        send_request(&mut wire, Command::Config, &[0; 10]).unwrap();
        let mut input = wire.as_slice();
        let header = read_header(&mut input).unwrap().unwrap();
        assert!(matches!(
            read_payload(&mut input, header, 4),
            Err(ProtocolError::TooLarge { len: 10, .. })
        ));
        assert!(matches!(
            read_header(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(ProtocolError::BadMagic)
        ));
        let mut bad = Vec::new();
        write_header(&mut bad, Command::Start, 0).unwrap();
        bad[4] = 99;
        assert!(matches!(
            read_header(&mut bad.as_slice()),
            Err(ProtocolError::UnknownCommand(99))
        ));
    }

    #[test]
    fn start_names_versions_this_build_cannot_take() {
        assert_eq!(check_start(&start_payload()), Ok(()));
        let mut other = start_payload();
        other[..4].copy_from_slice(&7u32.to_le_bytes());
        assert!(
            check_start(&other)
                .unwrap_err()
                .contains("protocol version 7")
        );
        let mut other = start_payload();
        other[4..].copy_from_slice(&9u32.to_le_bytes());
        assert!(
            check_start(&other)
                .unwrap_err()
                .contains("state format version 9")
        );
        assert!(check_start(b"short").is_err());
    }
}
