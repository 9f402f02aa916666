use super::*;

fn no_env(_: Option<&str>) -> HashMap<String, String> {
    HashMap::new()
}

#[test]
fn quotes_variables_and_comments_tokenize_like_grub() {
    let menu = parse(
        "set a='x y' # comment\nset b=\"$a z\"\nc=${b}!\nmenuentry \"T $a\" {\n linux /k $b \"q r\"\n}\n",
        &mut no_env,
    );
    assert_eq!(menu.vars["a"], "x y");
    assert_eq!(menu.vars["b"], "x y z");
    assert_eq!(menu.vars["c"], "x y z!");
    let (title, entry) = default_boot(&menu).unwrap();
    assert_eq!(title, "T x y");
    let entry = entry.unwrap();
    // An unquoted variable splits into words; a quoted string stays one.
    assert_eq!(entry.args, "x y z q r");
}

#[test]
fn defaults_by_index_path_title_id_and_saved() {
    let cfg = "menuentry A --id a { linux /a }\nsubmenu S --id s {\n menuentry B --id b { linux /b }\n menuentry C { linux /c }\n}\nmenuentry D { chainloader +1 }\n";
    for (default, kernel) in [
        ("0", "/a"),
        ("1>1", "/c"),
        ("C", "/a"),
        ("s>b", "/b"),
        ("S>C", "/c"),
        ("s", "/b"),
        ("9", "/a"),
    ] {
        let mut menu = parse(cfg, &mut no_env);
        menu.vars.insert("default".into(), default.into());
        let (_, entry) = default_boot(&menu).unwrap();
        assert_eq!(entry.unwrap().kernel, kernel, "default {default}");
    }
    let mut menu = parse(cfg, &mut no_env);
    menu.vars.insert("default".into(), "saved".into());
    menu.vars.insert("saved_entry".into(), "2".into());
    assert_eq!(default_boot(&menu).unwrap(), ("D".to_string(), None));
}

#[test]
fn load_env_reads_grubenv_and_search_sets_the_root() {
    let mut asked = Vec::new();
    let menu = parse(
        "load_env -f (hd0,gpt2)/grub2/grubenv\nset default=\"${saved_entry}\"\nsearch --no-floppy --fs-uuid --set=root 1234-ABCD\nblscfg\n",
        &mut |f: Option<&str>| {
            asked.push(f.map(str::to_string));
            parse_grubenv(
                "# GRUB Environment Block\nsaved_entry=fedora-6.1\nkernelopts=ro quiet\n####",
            )
        },
    );
    assert_eq!(asked, vec![Some("(hd0,gpt2)/grub2/grubenv".to_string())]);
    assert_eq!(menu.vars["default"], "fedora-6.1");
    assert_eq!(menu.vars["kernelopts"], "ro quiet");
    assert!(menu.blscfg);
    assert_eq!(menu.root, Some(RootHint::FsUuid("1234-ABCD".into())));
}

#[test]
fn entry_root_from_set_root_and_search_variants() {
    let menu = parse(
        "menuentry X {\n set root='hd0,gpt3'\n linuxefi /vmlinuz ro\n initrdefi /a /b\n}\nmenuentry Y {\n search.fs_uuid 0ab-cd root\n linux16 /k\n}\n",
        &mut no_env,
    );
    let (_, x) = default_boot(&menu).unwrap();
    let x = x.unwrap();
    assert_eq!(x.root, Some(RootHint::Partition(3)));
    assert_eq!(x.initrds, vec!["/a", "/b"]);
    let mut menu = menu;
    menu.vars.insert("default".into(), "1".into());
    let (_, y) = default_boot(&menu).unwrap();
    assert_eq!(y.unwrap().root, Some(RootHint::FsUuid("0ab-cd".into())));
    assert_eq!(device_partition("(hd0,msdos5)"), Some(5));
}

#[test]
fn unbalanced_and_garbage_input_never_panics() {
    for text in [
        "menuentry {",
        "}}}}",
        "submenu a {\nsubmenu b {\n",
        "\"unterminated",
        "$",
        "${",
        "set =",
        "menuentry 'x' { linux }",
    ] {
        let menu = parse(text, &mut no_env);
        let _ = default_boot(&menu);
    }
}
