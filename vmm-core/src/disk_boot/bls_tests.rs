use super::*;

#[test]
fn versions_compare_like_uapi() {
    use std::cmp::Ordering::*;
    for (a, b, order) in [
        ("6.10.1", "6.2.9", Greater),
        ("6.1.0-13", "6.1.0-9", Greater),
        ("1.0~rc1", "1.0", Less),
        ("1.0a", "1.0", Greater),
        ("2", "2", Equal),
        ("fc38", "fc9", Greater),
        ("a", "1", Less),
        ("010", "9", Greater),
    ] {
        assert_eq!(version_cmp(a, b), order, "{a} vs {b}");
    }
}

#[test]
fn newest_version_first_unless_a_default_matches() {
    let mut entries = vec![
        parse_entry("a-5.14", "version 5.14\nlinux /v5\n"),
        parse_entry(
            "a-6.2",
            "version 6.2\nlinux /v6\noptions ro\noptions quiet\n",
        ),
        parse_entry("rescue", "linux /r\nsort-key zz\n"),
    ];
    sort(&mut entries);
    assert_eq!(
        entries[0].id, "rescue",
        "entries with a sort-key come first"
    );
    entries.retain(|e| e.id != "rescue");
    assert_eq!(choose(&entries, None).unwrap().id, "a-6.2");
    assert_eq!(choose(&entries, Some("a-5*")).unwrap().id, "a-5.14");
    assert_eq!(choose(&entries, Some("nothing")).unwrap().id, "a-6.2");
    assert_eq!(entries[0].options, "ro quiet");
}

#[test]
fn kernelopts_expand_and_uki_entries_have_no_linux() {
    let vars = HashMap::from([("kernelopts".to_string(), "root=/dev/x ro".to_string())]);
    let e = parse_entry("f", "linux /k\noptions $kernelopts ${extra} quiet\n");
    assert_eq!(to_boot(&e, &vars).unwrap().args, "root=/dev/x ro quiet");
    let uki = parse_entry("u", "efi /EFI/Linux/x.efi\n");
    assert!(to_boot(&uki, &vars).is_none());
    assert_eq!(uki.efi.as_deref(), Some("/EFI/Linux/x.efi"));
}

#[test]
fn extlinux_default_menu_default_and_initrd_in_append() {
    let e =
        extlinux("default b\nlabel a\n kernel /a\nlabel b\n linux /b\n append initrd=/i1,/i2 ro\n")
            .unwrap();
    assert_eq!((e.kernel.as_str(), e.args.as_str()), ("/b", "ro"));
    assert_eq!(e.initrds, vec!["/i1", "/i2"]);
    let e =
        extlinux("LABEL a\n KERNEL /a\nLABEL b\n MENU DEFAULT\n KERNEL /b\n APPEND -\n").unwrap();
    assert_eq!((e.kernel.as_str(), e.args.as_str()), ("/b", ""));
    let e = extlinux("DEFAULT /vmlinuz root=/dev/sda1\n").unwrap();
    assert_eq!(
        (e.kernel.as_str(), e.args.as_str()),
        ("/vmlinuz", "root=/dev/sda1")
    );
    assert!(extlinux("TIMEOUT 5\n").is_none());
}
