#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use super::*;
use crate::image::qcow2::create::overlay_bytes;

#[test]
fn overlay_header_parses_with_backing_name_and_format() {
    let bytes = overlay_bytes(b"/images/base.img", "raw", 10 << 30).unwrap();
    let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.size, 10 << 30);
    assert_eq!(h.backing_file.as_deref(), Some(&b"/images/base.img"[..]));
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
    assert_eq!(h.refcount_bits(), 16);
}

#[test]
fn unknown_incompatible_features_are_named_from_the_feature_table() {
    let mut bytes = overlay_bytes(b"b", "raw", 1 << 20).unwrap();
    // Replace the extensions with a feature name table naming incompatible bit 9.
    let at = V3_HEADER_LEN;
    bytes[8..20].fill(0); // no backing file
    bytes[at..at + 4].copy_from_slice(&0x6803_f857u32.to_be_bytes());
    bytes[at + 4..at + 8].copy_from_slice(&48u32.to_be_bytes());
    bytes[at + 8] = 0;
    bytes[at + 9] = 9;
    bytes[at + 10..at + 15].copy_from_slice(b"shiny");
    bytes[at + 56..at + 64].fill(0);
    bytes[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
    let err = Header::parse(&bytes, bytes.len() as u64).unwrap_err();
    assert_eq!(
        err.to_string(),
        "incompatible feature 'shiny' (bit 9) is not supported"
    );
}

#[test]
fn extensions_without_an_end_marker_are_refused() {
    let mut bytes = overlay_bytes(b"b", "raw", 1 << 20).unwrap();
    bytes[8..20].fill(0);
    let cluster = 65536;
    // One extension whose length runs past the first cluster.
    bytes[V3_HEADER_LEN + 4..V3_HEADER_LEN + 8].copy_from_slice(&(cluster as u32).to_be_bytes());
    bytes[V3_HEADER_LEN..V3_HEADER_LEN + 4].copy_from_slice(&0x1234u32.to_be_bytes());
    assert!(matches!(
        Header::parse(&bytes, bytes.len() as u64),
        Err(HeaderError::Field {
            field: "header extensions",
            ..
        })
    ));
}

#[test]
fn overlay_with_a_backing_format_too_long_for_the_header_cluster_is_refused() {
    let format = "f".repeat(70_000);
    let err = overlay_bytes(b"base", &format, 1 << 20).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(err.to_string(), "the backing format name is too long");
    // The longest name still fits with a format that leaves room for it.
    let name = vec![b'n'; 1023];
    assert!(overlay_bytes(&name, "qcow2", 1 << 20).is_ok());
}
