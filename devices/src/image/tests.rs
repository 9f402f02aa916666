use super::*;

#[test]
fn format_names_round_trip() {
    for f in [ImageFormat::Raw, ImageFormat::Qcow2] {
        assert_eq!(ImageFormat::from_name(f.name()), Some(f));
    }
    assert_eq!(ImageFormat::from_name("vmdk"), None);
}
