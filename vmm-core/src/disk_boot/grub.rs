//! The part of GRUB's script language that grub-mkconfig (Debian, Ubuntu) and Fedora's
//! grub2-mkconfig write: `set`, `load_env` (grubenv), `search --set=root`, `menuentry` and
//! `submenu` blocks with `linux`/`initrd` (and their `efi`/`16` forms), `set default`
//! (index, `a>b` path, title, id or `saved`), `blscfg` and `configfile`. Conditions are not
//! evaluated: every branch of an `if` runs in order, which is what these generated files need
//! (their `if`s pick between equivalent search commands or set defaults later overridden).
//! Pure: the caller supplies grubenv's content.

use std::collections::HashMap;

use super::{BootEntry, RootHint};

/// A part of a word: literal text or a variable reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Text as written (quotes and escapes removed).
    Lit(String),
    /// `$name` or `${name}`, expanded when the command runs.
    Var(String),
}

/// A word of a command.
pub type Word = Vec<Part>;
/// A command: its words.
pub type Command = Vec<Word>;

/// A menu item.
#[derive(Clone, Debug)]
pub enum Item {
    /// A `menuentry`.
    Entry {
        /// Its title.
        title: String,
        /// Its `--id`.
        id: Option<String>,
        /// Its body.
        body: Vec<Command>,
    },
    /// A `submenu`.
    Submenu {
        /// Its title.
        title: String,
        /// Its `--id`.
        id: Option<String>,
        /// Its items.
        items: Vec<Item>,
    },
}

/// A parsed and run `grub.cfg`.
#[derive(Debug, Default)]
pub struct Menu {
    /// The top-level items.
    pub items: Vec<Item>,
    /// Variables after the top level ran.
    pub vars: HashMap<String, String>,
    /// `blscfg` was called: the entries come from BLS snippets.
    pub blscfg: bool,
    /// `configfile` targets (expanded), for a stub that chains to the real file.
    pub configfile: Vec<String>,
    /// The root hint of the top level (`search ... --set=root`, `set root=`).
    pub root: Option<RootHint>,
}

fn tokenize(text: &str) -> Vec<Command> {
    let mut commands = Vec::new();
    let mut command: Command = Vec::new();
    let mut word: Word = Vec::new();
    let mut lit = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();
    fn flush_lit(lit: &mut String, word: &mut Word) {
        if !lit.is_empty() {
            word.push(Part::Lit(std::mem::take(lit)));
        }
    }
    macro_rules! end_word {
        () => {
            if in_word {
                flush_lit(&mut lit, &mut word);
                command.push(std::mem::take(&mut word));
                in_word = false;
            }
        };
    }
    while let Some(c) = chars.next() {
        match c {
            '#' if !in_word => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                if !command.is_empty() {
                    commands.push(std::mem::take(&mut command));
                }
            }
            '\n' | ';' => {
                end_word!();
                if !command.is_empty() {
                    commands.push(std::mem::take(&mut command));
                }
            }
            ' ' | '\t' | '\r' => end_word!(),
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') | None => {}
                    Some(c) => lit.push(c),
                }
            }
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    lit.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(c) = chars.next() {
                                lit.push(c);
                            }
                        }
                        '$' => {
                            flush_lit(&mut lit, &mut word);
                            word.push(Part::Var(read_var(&mut chars)));
                        }
                        c => lit.push(c),
                    }
                }
            }
            '$' => {
                in_word = true;
                flush_lit(&mut lit, &mut word);
                word.push(Part::Var(read_var(&mut chars)));
            }
            c => {
                in_word = true;
                lit.push(c);
            }
        }
    }
    if in_word {
        flush_lit(&mut lit, &mut word);
        command.push(word);
    }
    if !command.is_empty() {
        commands.push(command);
    }
    split_braces(commands)
}

/// Puts `{` at the end and `}` at the start of commands of their own (`menuentry x { linux
/// /k }` on one line is three commands).
fn split_braces(commands: Vec<Command>) -> Vec<Command> {
    let mut out = Vec::new();
    for command in commands {
        let mut current: Command = Vec::new();
        for word in command {
            match literal(&word) {
                Some("{") => {
                    current.push(word);
                    out.push(std::mem::take(&mut current));
                }
                Some("}") => {
                    if !current.is_empty() {
                        out.push(std::mem::take(&mut current));
                    }
                    out.push(vec![word]);
                }
                _ => current.push(word),
            }
        }
        if !current.is_empty() {
            out.push(current);
        }
    }
    out
}

/// The variable name after a `$`: `{name}` or a run of letters, digits and `_`.
pub fn read_var(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let mut name = String::new();
    if chars.peek() == Some(&'{') {
        chars.next();
        for c in chars.by_ref() {
            if c == '}' {
                break;
            }
            name.push(c);
        }
    } else {
        while let Some(&c) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                chars.next();
            } else {
                break;
            }
        }
    }
    name
}

fn literal(word: &Word) -> Option<&str> {
    match word.as_slice() {
        [Part::Lit(s)] => Some(s),
        _ => None,
    }
}

fn expand(word: &Word, vars: &HashMap<String, String>) -> String {
    word.iter()
        .map(|p| match p {
            Part::Lit(s) => s.as_str(),
            Part::Var(v) => vars.get(v).map_or("", String::as_str),
        })
        .collect()
}

/// Splits expanded words again at whitespace (an unquoted `$kernelopts` becomes several
/// arguments, as in GRUB).
fn expand_args(words: &[Word], vars: &HashMap<String, String>) -> Vec<String> {
    words
        .iter()
        .flat_map(|w| {
            let text = expand(w, vars);
            if w.iter().any(|p| matches!(p, Part::Var(_))) {
                text.split_whitespace().map(str::to_string).collect()
            } else {
                vec![text]
            }
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// Blocks deeper than this are refused (generated files nest two or three levels).
const MAX_DEPTH: usize = 16;

/// Loads a grubenv file (`None`: the default one beside grub.cfg) for `load_env`.
pub type EnvLoader<'a> = dyn FnMut(Option<&str>) -> HashMap<String, String> + 'a;

/// Parses `text` and runs its top level; `load_env` asks `env` for the variables.
pub fn parse(text: &str, env: &mut EnvLoader<'_>) -> Menu {
    let commands = tokenize(text);
    let mut menu = Menu::default();
    let mut pos = 0;
    let items = block(&commands, &mut pos, &mut menu, env, 0);
    menu.items = items;
    menu
}

/// The commands of a `{ ... }` body starting at `pos` (after the `{`), up to the matching
/// `}`; nested bodies are kept whole.
fn body(commands: &[Command], pos: &mut usize) -> Vec<Command> {
    let mut out = Vec::new();
    let mut depth = 1usize;
    while *pos < commands.len() {
        let command = &commands[*pos];
        *pos += 1;
        let opens = command.last().and_then(literal) == Some("{");
        let closes = command.first().and_then(literal) == Some("}");
        if closes {
            depth -= 1;
            if depth == 0 {
                return out;
            }
        }
        if opens {
            depth += 1;
        }
        out.push(command.clone());
    }
    out
}

/// Runs a block: menu items are collected, top-level commands executed.
fn block(
    commands: &[Command],
    pos: &mut usize,
    menu: &mut Menu,
    env: &mut EnvLoader<'_>,
    depth: usize,
) -> Vec<Item> {
    let mut items = Vec::new();
    while *pos < commands.len() {
        let mut command = commands[*pos].clone();
        *pos += 1;
        // Control-flow keywords: run every branch (see the module's documentation).
        while let Some(first) = command.first().and_then(literal) {
            match first {
                "then" | "else" | "do" => {
                    command.remove(0);
                }
                _ => break,
            }
        }
        if let Some((key, value)) = assignment(&command, &menu.vars) {
            menu.vars.insert(key, value);
            continue;
        }
        let Some(name) = command.first().and_then(literal).map(str::to_string) else {
            continue;
        };
        match name.as_str() {
            "if" | "elif" | "while" | "until" | "for" | "fi" | "done" => {}
            "}" => return items,
            "function" => {
                if command.last().and_then(literal) == Some("{") {
                    body(commands, pos);
                }
            }
            "menuentry" | "submenu" => {
                let (title, id) = title_and_id(&command, &menu.vars);
                if command.last().and_then(literal) != Some("{") {
                    continue;
                }
                if name == "menuentry" {
                    items.push(Item::Entry {
                        title,
                        id,
                        body: body(commands, pos),
                    });
                } else if depth < MAX_DEPTH {
                    let inner = body(commands, pos);
                    let mut sub_pos = 0;
                    let sub_items = block(&inner, &mut sub_pos, menu, env, depth + 1);
                    items.push(Item::Submenu {
                        title,
                        id,
                        items: sub_items,
                    });
                } else {
                    body(commands, pos);
                }
            }
            _ => run_top(&command, menu, env),
        }
    }
    items
}

fn title_and_id(command: &Command, vars: &HashMap<String, String>) -> (String, Option<String>) {
    let mut title = None;
    let mut id = None;
    let mut i = 1;
    while i < command.len() {
        let word = &command[i];
        let text = expand(word, vars);
        let is_id_option = text == "--id"
            || matches!(word.as_slice(), [Part::Var(v)] if v == "menuentry_id_option");
        if is_id_option {
            id = command.get(i + 1).map(|w| expand(w, vars));
            i += 2;
            continue;
        }
        if text.starts_with("--") {
            // --class X, --users X, --unrestricted, --hotkey X.
            if matches!(text.as_str(), "--class" | "--users" | "--hotkey") {
                i += 1;
            }
        } else if text != "{" && title.is_none() {
            title = Some(text);
        }
        i += 1;
    }
    (title.unwrap_or_default(), id)
}

/// `set`, `load_env`, `search`, `blscfg`, `configfile` at the top level.
fn run_top(command: &Command, menu: &mut Menu, env: &mut EnvLoader<'_>) {
    let name = command.first().and_then(literal).unwrap_or_default();
    let args: Vec<String> = command[1..].iter().map(|w| expand(w, &menu.vars)).collect();
    match name {
        "set" => {
            if let Some((k, v)) = args.first().and_then(|a| a.split_once('=')) {
                menu.vars.insert(k.to_string(), v.to_string());
            }
        }
        "load_env" => {
            let file = args
                .iter()
                .position(|a| a == "-f" || a == "--file")
                .and_then(|i| args.get(i + 1).cloned());
            menu.vars.extend(env(file.as_deref()));
        }
        "blscfg" => menu.blscfg = true,
        "configfile" | "source" => menu.configfile.extend(args.first().cloned()),
        _ if name.starts_with("search") => {
            if let Some(hint) = search_hint(name, &args) {
                menu.root = Some(hint);
            }
        }
        _ => {}
    }
}

/// `name=value` without `set` (a one-word command whose literal start is `name=`).
fn assignment(command: &Command, vars: &HashMap<String, String>) -> Option<(String, String)> {
    let [word] = command.as_slice() else {
        return None;
    };
    let Some(Part::Lit(first)) = word.first() else {
        return None;
    };
    let (key, _) = first.split_once('=')?;
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let full = expand(word, vars);
    let (k, v) = full.split_once('=')?;
    Some((k.to_string(), v.to_string()))
}

/// The root a `search` command sets (`search --fs-uuid --set=root X`, `search.fs_uuid X
/// root`, `--label`, `--file`).
fn search_hint(name: &str, args: &[String]) -> Option<RootHint> {
    let mut kind = match name {
        "search.fs_uuid" => "uuid",
        "search.fs_label" => "label",
        "search.file" => "file",
        _ => "file",
    };
    let mut target = "root".to_string();
    let mut positional = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        match a.as_str() {
            "--fs-uuid" | "-u" => kind = "uuid",
            "--label" | "-l" => kind = "label",
            "--file" | "-f" => kind = "file",
            "--set" | "-s" => {
                if let Some(v) = args.get(i + 1).filter(|v| !v.starts_with('-')) {
                    target = v.clone();
                    i += 1;
                }
            }
            "--hint" => i += 1,
            _ if a.starts_with("--set=") => target = a["--set=".len()..].to_string(),
            _ if a.starts_with("--hint") || a.starts_with('-') => {}
            _ => positional.push(a.clone()),
        }
        i += 1;
    }
    // `search.fs_uuid UUID VAR`.
    if name.starts_with("search.") && positional.len() >= 2 {
        target = positional[1].clone();
    }
    if target != "root" {
        return None;
    }
    let value = positional.first()?.clone();
    Some(match kind {
        "uuid" => RootHint::FsUuid(value),
        "label" => RootHint::Label(value),
        _ => RootHint::File(value),
    })
}

/// `(hd0,gpt2)` / `hd0,msdos1` as a partition number.
pub fn device_partition(device: &str) -> Option<u32> {
    let inner = device.trim_start_matches('(').trim_end_matches(')');
    let part = inner.split(',').nth(1)?;
    let digits: String = part.chars().filter(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Runs a menu entry's body with the menu's variables: the kernel, initrds, arguments and
/// root. `None` when it loads no Linux kernel (chainloader, firmware setup, ...).
pub fn entry_boot(title: &str, body: &[Command], menu: &Menu) -> Option<BootEntry> {
    let mut vars = menu.vars.clone();
    let mut root = menu.root.clone();
    if let Some(device) = vars.get("root").and_then(|r| device_partition(r)) {
        root.get_or_insert(RootHint::Partition(device));
    }
    let mut kernel = None;
    let mut args = String::new();
    let mut initrds = Vec::new();
    for command in body {
        let mut command = command.clone();
        while let Some("then" | "else" | "do") = command.first().and_then(literal) {
            command.remove(0);
        }
        let Some(name) = command.first().and_then(literal).map(str::to_string) else {
            continue;
        };
        let words = expand_args(&command[1..], &vars);
        match name.as_str() {
            "set" => {
                if let Some((k, v)) = command
                    .get(1)
                    .map(|w| expand(w, &vars))
                    .as_deref()
                    .and_then(|a| a.split_once('='))
                {
                    if k == "root"
                        && let Some(n) = device_partition(v)
                    {
                        root = Some(RootHint::Partition(n));
                    }
                    vars.insert(k.to_string(), v.to_string());
                }
            }
            "linux" | "linuxefi" | "linux16" => {
                let mut words = words.into_iter().filter(|w| w != "--");
                kernel = words.next();
                args = words.collect::<Vec<_>>().join(" ");
            }
            "initrd" | "initrdefi" | "initrd16" => initrds = words,
            _ if name.starts_with("search") => {
                let plain: Vec<String> = command[1..].iter().map(|w| expand(w, &vars)).collect();
                if let Some(hint) = search_hint(&name, &plain) {
                    root = Some(hint);
                }
            }
            _ => {}
        }
    }
    let kernel = kernel?;
    Some(BootEntry {
        title: title.to_string(),
        kernel,
        initrds,
        args,
        root,
    })
}

/// The item `default` names: an index path (`2`, `1>0`), `saved`, a title or an id (or a
/// `>`-path of them). Returns the entry's title and body, or `None` when nothing matches.
pub fn find_default<'m>(menu: &'m Menu, default: &str) -> Option<(&'m str, &'m [Command])> {
    let mut items = menu.items.as_slice();
    let parts: Vec<&str> = default.split('>').collect();
    for (i, part) in parts.iter().enumerate() {
        let item = match part.parse::<usize>() {
            Ok(n) => items.get(n)?,
            Err(_) => items.iter().find(|it| match it {
                Item::Entry { title, id, .. } | Item::Submenu { title, id, .. } => {
                    title == part || id.as_deref() == Some(part)
                }
            })?,
        };
        let last = i + 1 == parts.len();
        match item {
            Item::Entry { title, body, .. } if last => return Some((title, body)),
            Item::Submenu { items: inner, .. } if !last => items = inner,
            // A submenu named as the default boots its first entry.
            Item::Submenu { items: inner, .. } => return first_entry(inner),
            _ => return None,
        }
    }
    None
}

/// The first entry, descending into submenus.
pub fn first_entry(items: &[Item]) -> Option<(&str, &[Command])> {
    match items.first()? {
        Item::Entry { title, body, .. } => Some((title, body)),
        Item::Submenu { items, .. } => first_entry(items),
    }
}

/// The entry GRUB boots: the one `default` names (`saved`: grubenv's `saved_entry`), else
/// the first. Returns its title and what it boots (`None`: no Linux kernel), or `None` when
/// the menu is empty.
pub fn default_boot(menu: &Menu) -> Option<(String, Option<BootEntry>)> {
    let mut default = menu.vars.get("default").cloned().unwrap_or_default();
    if default == "saved" {
        default = menu.vars.get("saved_entry").cloned().unwrap_or_default();
    }
    let chosen = if default.is_empty() {
        first_entry(&menu.items)
    } else {
        find_default(menu, &default).or_else(|| {
            log::warn!("GRUB default entry '{default}' not found; booting the first entry");
            first_entry(&menu.items)
        })
    };
    let (title, body) = chosen?;
    Some((title.to_string(), entry_boot(title, body, menu)))
}

/// `key=value` lines of a grubenv block.
pub fn parse_grubenv(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
#[path = "grub_tests.rs"]
mod tests;
