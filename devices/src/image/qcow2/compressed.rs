//! Compressed clusters: raw deflate (QEMU's zlib default) or a zstd frame, which must
//! decompress to exactly one cluster.

use std::io;

use super::header::Compression;

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("compressed cluster: {what}"),
    )
}

/// Decompresses `input` into `out` (one cluster), which must be filled completely; input
/// after the end of the stream is ignored (compressed data is sector-padded).
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> io::Result<()> {
    match kind {
        Compression::Zlib => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    use miniz_oxide::inflate::TINFLStatus;
    use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
    let mut state = DecompressorOxide::new();
    // No zlib header, and `out` is the whole output: no wrapping ring buffer.
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut state, input, out, 0, flags);
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
        TINFLStatus::Done | TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => {
            Err(bad(&format!(
                "inflates to {written} bytes, not {}",
                out.len()
            )))
        }
        _ => Err(bad("not a valid deflate stream")),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    use std::io::Read;
    // The decoder bounds the window (and so its allocation) whatever the frame claims.
    let mut decoder =
        ruzstd::decoding::StreamingDecoder::new(input).map_err(|_| bad("not a zstd frame"))?;
    let mut filled = 0;
    while filled < out.len() {
        match decoder.read(&mut out[filled..]) {
            Ok(0) => {
                return Err(bad(&format!(
                    "decompresses to {filled} bytes, not {}",
                    out.len()
                )));
            }
            Ok(n) => filled += n,
            Err(_) => return Err(bad("invalid zstd data")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_must_fill_the_cluster() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let packed = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut out = vec![0u8; 4096];
        let mut padded = packed.clone();
        padded.extend_from_slice(&[0xAA; 300]);
        decompress(Compression::Zlib, &padded, &mut out).unwrap();
        assert_eq!(out, data);
        let mut big = vec![0u8; 8192];
        assert!(decompress(Compression::Zlib, &packed, &mut big).is_err());
        assert!(decompress(Compression::Zlib, &[0xff; 64], &mut out).is_err());
    }

    #[test]
    fn garbage_zstd_is_an_error() {
        let mut out = vec![0u8; 4096];
        assert!(decompress(Compression::Zstd, &[0x28, 0xb5, 0x2f, 0xfd, 1, 2], &mut out).is_err());
        assert!(decompress(Compression::Zstd, &[], &mut out).is_err());
    }
}
