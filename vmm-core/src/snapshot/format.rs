//! The state file's format and its compatibility rule.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "RVMMSNAP"
//!      8     4  format version, u32 little-endian (this build writes FORMAT_VERSION)
//!     12     4  reserved, 0
//!     16     8  payload length in bytes, u64 little-endian
//!     24     4  CRC-32 (IEEE 802.3) of the payload, u32 little-endian
//!     28     4  reserved, 0
//!     32     n  payload: VmState in postcard's wire format (varint integers, length-prefixed
//!               sequences and byte strings, enums as a varint variant index, fields in
//!               declaration order; KVM structures as their raw bytes)
//! ```
//!
//! Compatibility: the payload is not self-describing, so any change to a state structure
//! (a field added, removed or retyped) makes a new format version. A build reads the versions
//! in [`READABLE_VERSIONS`] and refuses any other with an error naming both. Migration
//! carries the same encoding, so the receiver must read the sender's version.
//!
//! Versions:
//!
//! - 1: vCPUs, KVM clock/irqchips/PIT, serial, i8042, virtio devices on virtio-mmio.
//! - 2: adds virtio-pci transports (`TransportState::Pci`, a new last variant, so a version 1
//!   payload's devices decode unchanged) and the ACPI PM1 registers (`VmState::acpi_pm`, a
//!   new last field: a version 1 payload is decoded without it and restores the registers as
//!   at boot).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rvmm_devices::cast::usize_from;

use super::VmState;
use super::vm_state::VmStateV1;

/// The version this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The versions this build reads.
pub const READABLE_VERSIONS: &[u32] = &[1, 2];
/// What every state file starts with.
pub const MAGIC: &[u8; 8] = b"RVMMSNAP";
/// Header length.
pub const HEADER_LEN: usize = 32;
/// Largest payload accepted (a state holds registers and device state, not memory).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors reading or writing a state file (or a state received over a migration).
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file cannot be read or written.
    #[error("Cannot access {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a state file.
    #[error("Not an rvmm snapshot state (no RVMMSNAP header)")]
    BadMagic,
    /// Written by a build with another format.
    #[error(
        "Snapshot state format version {found} cannot be read by this rvmm (it reads versions {})",
        readable()
    )]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
    },
    /// Shorter than its header says.
    #[error("Snapshot state is truncated: {got} of {expected} bytes")]
    Truncated {
        /// Bytes the header announces (header included).
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// Longer than any state.
    #[error("Snapshot state payload of {0} bytes is larger than the {MAX_PAYLOAD} allowed")]
    TooLarge(u64),
    /// The payload does not match its checksum.
    #[error("Snapshot state is corrupt: CRC-32 {found:#010x}, expected {expected:#010x}")]
    Checksum {
        /// Computed.
        found: u32,
        /// In the header.
        expected: u32,
    },
    /// The payload does not decode as this version's state.
    #[error("Snapshot state does not decode")]
    Decode(#[source] postcard::Error),
    /// The state cannot be encoded.
    #[error("Cannot encode the VM state")]
    Encode(#[source] postcard::Error),
}

fn readable() -> String {
    let list: Vec<String> = READABLE_VERSIONS.iter().map(u32::to_string).collect();
    list.join(", ")
}

/// The state as header + payload.
pub fn encode_state(state: &VmState) -> Result<Vec<u8>, StateFileError> {
    let payload = postcard::to_stdvec(state).map_err(StateFileError::Encode)?;
    Ok(frame(FORMAT_VERSION, &payload))
}

/// `payload` behind the header of format `version` (its length and CRC-32 filled in).
pub fn frame(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the header and decodes the state. Untrusted input: every field is checked before
/// use, and nothing is allocated from a length the checksum has not covered.
pub fn decode_state(bytes: &[u8]) -> Result<VmState, StateFileError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(StateFileError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateFileError::Truncated {
            expected: HEADER_LEN as u64,
            got: bytes.len() as u64,
        });
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let version = word(8);
    if !READABLE_VERSIONS.contains(&version) {
        return Err(StateFileError::UnsupportedVersion { found: version });
    }
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(StateFileError::TooLarge(len));
    }
    let payload = &bytes[HEADER_LEN..];
    if (payload.len() as u64) < len {
        return Err(StateFileError::Truncated {
            expected: HEADER_LEN as u64 + len,
            got: bytes.len() as u64,
        });
    }
    let payload = &payload[..usize_from(len)];
    let expected = word(24);
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(StateFileError::Checksum { found, expected });
    }
    let state = match version {
        1 => postcard::from_bytes::<VmStateV1>(payload).map(VmState::from),
        _ => postcard::from_bytes(payload),
    };
    state.map_err(StateFileError::Decode)
}

/// Writes `state` to `path` (created or truncated) and makes it durable; returns its size.
pub fn write_state(path: &Path, state: &VmState) -> Result<u64, StateFileError> {
    let bytes = encode_state(state)?;
    let io = |source| StateFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::create(path).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(bytes.len() as u64)
}

/// Reads and decodes the state file at `path`.
pub fn read_state(path: &Path) -> Result<VmState, StateFileError> {
    let io = |source| StateFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // A state is small: never read more than the largest one allowed.
    let mut bytes = Vec::new();
    file.take(HEADER_LEN as u64 + MAX_PAYLOAD + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    decode_state(&bytes)
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
