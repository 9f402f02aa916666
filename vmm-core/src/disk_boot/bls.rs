//! Boot Loader Specification type #1 entries (`loader/entries/*.conf`, as Fedora, RHEL and
//! systemd-boot use them) and extlinux/syslinux configuration files. Pure parsing.

use std::cmp::Ordering;
use std::collections::HashMap;

use super::BootEntry;

/// One BLS entry file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlsEntry {
    /// The file name without `.conf` (what `default`/`saved_entry` name).
    pub id: String,
    /// `title`.
    pub title: String,
    /// `version`.
    pub version: String,
    /// `sort-key`.
    pub sort_key: String,
    /// `linux`.
    pub linux: Option<String>,
    /// `efi`: an EFI program (a UKI), which rvmm cannot start.
    pub efi: Option<String>,
    /// `initrd` lines, in order.
    pub initrds: Vec<String>,
    /// `options` lines, joined.
    pub options: String,
}

/// Parses one entry file named `id`.conf.
pub fn parse_entry(id: &str, text: &str) -> BlsEntry {
    let mut entry = BlsEntry {
        id: id.to_string(),
        ..Default::default()
    };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(k, v)| (k, v.trim()));
        match key {
            "title" => entry.title = value.to_string(),
            "version" => entry.version = value.to_string(),
            "sort-key" => entry.sort_key = value.to_string(),
            "linux" => entry.linux = Some(value.to_string()),
            "efi" | "uki" => entry.efi = Some(value.to_string()),
            "initrd" => entry
                .initrds
                .extend(value.split_whitespace().map(str::to_string)),
            "options" => {
                if !entry.options.is_empty() {
                    entry.options.push(' ');
                }
                entry.options.push_str(value);
            }
            _ => {}
        }
    }
    entry
}

/// Orders entries as the specification's boot menu does: by `sort-key` (entries with one
/// first), then newest `version` first, then by file name (descending, so that
/// `fedora-6.2.conf` comes before `fedora-6.1.conf` without versions too).
pub fn sort(entries: &mut [BlsEntry]) {
    entries.sort_by(|a, b| {
        match (a.sort_key.is_empty(), b.sort_key.is_empty()) {
            (false, true) => return Ordering::Less,
            (true, false) => return Ordering::Greater,
            _ => {}
        }
        a.sort_key
            .cmp(&b.sort_key)
            .then_with(|| version_cmp(&b.version, &a.version))
            .then_with(|| version_cmp(&b.id, &a.id))
    });
}

/// Compares versions the UAPI way (as rpm's vercmp): runs of digits numerically, runs of
/// letters alphabetically, `~` before anything, other characters separate.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        let skip = |s: &mut &[u8]| {
            while let Some(&c) = s.first() {
                if c.is_ascii_alphanumeric() || c == b'~' {
                    break;
                }
                *s = &s[1..];
            }
        };
        skip(&mut a);
        skip(&mut b);
        match (a.first(), b.first()) {
            (Some(b'~'), Some(b'~')) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            _ => {}
        }
        let numeric = a[0].is_ascii_digit();
        let run = |s: &[u8]| {
            s.iter()
                .take_while(|c| {
                    if numeric {
                        c.is_ascii_digit()
                    } else {
                        c.is_ascii_alphabetic()
                    }
                })
                .count()
        };
        let (na, nb) = (run(a), run(b));
        if nb == 0 {
            // Numbers sort after letters.
            return if numeric {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }
        let (ra, rb) = (&a[..na], &b[..nb]);
        let order = if numeric {
            let trim = |r: &[u8]| {
                let z = r.iter().take_while(|&&c| c == b'0').count();
                r[z..].to_vec()
            };
            let (ta, tb) = (trim(ra), trim(rb));
            ta.len().cmp(&tb.len()).then(ta.cmp(&tb))
        } else {
            ra.cmp(rb)
        };
        if order != Ordering::Equal {
            return order;
        }
        a = &a[na..];
        b = &b[nb..];
    }
}

/// Expands `$var` and `${var}` from grubenv (Fedora's `options $kernelopts`).
pub fn expand_vars(text: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let name = super::grub::read_var(&mut chars);
        out.push_str(vars.get(&name).map_or("", String::as_str));
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The entry to boot: the one `default` names (an id, or a glob with `*`), else the first
/// in menu order.
pub fn choose<'e>(entries: &'e [BlsEntry], default: Option<&str>) -> Option<&'e BlsEntry> {
    if let Some(pattern) = default.filter(|d| !d.is_empty())
        && let Some(e) = entries
            .iter()
            .find(|e| glob(pattern, &e.id) || glob(pattern, &format!("{}.conf", e.id)))
    {
        return Some(e);
    }
    entries.first()
}

/// Whether `name` matches `pattern`, where `*` matches any run (the greedy two-pointer
/// match: linear time whatever the pattern).
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// A BLS entry as a boot entry (`None` for an EFI program entry).
pub fn to_boot(entry: &BlsEntry, vars: &HashMap<String, String>) -> Option<BootEntry> {
    Some(BootEntry {
        title: if entry.title.is_empty() {
            entry.id.clone()
        } else {
            entry.title.clone()
        },
        kernel: entry.linux.clone()?,
        initrds: entry.initrds.clone(),
        args: expand_vars(&entry.options, vars),
        root: None,
    })
}

/// An extlinux/syslinux configuration's default entry: `DEFAULT label`, else the label with
/// `MENU DEFAULT`, else the first label. Paths stay as written (relative ones are relative to
/// the configuration file's directory).
pub fn extlinux(text: &str) -> Option<BootEntry> {
    #[derive(Default)]
    struct Label {
        name: String,
        kernel: Option<String>,
        append: String,
        initrds: Vec<String>,
        menu_default: bool,
    }
    let mut labels: Vec<Label> = Vec::new();
    let mut default = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(k, v)| (k, v.trim()));
        let key = key.to_ascii_lowercase();
        match key.as_str() {
            "default" => default = Some(value.to_string()),
            "label" => labels.push(Label {
                name: value.to_string(),
                ..Default::default()
            }),
            "menu" => {
                let mut words = value.split_whitespace();
                if words
                    .next()
                    .is_some_and(|w| w.eq_ignore_ascii_case("default"))
                    && let Some(l) = labels.last_mut()
                {
                    l.menu_default = true;
                }
            }
            "kernel" | "linux" => {
                if let Some(l) = labels.last_mut() {
                    l.kernel = Some(value.to_string());
                }
            }
            "append" => {
                if let Some(l) = labels.last_mut() {
                    l.append = if value == "-" {
                        String::new()
                    } else {
                        value.to_string()
                    };
                }
            }
            "initrd" => {
                if let Some(l) = labels.last_mut() {
                    l.initrds = value
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect();
                }
            }
            _ => {}
        }
    }
    let chosen = default
        .as_deref()
        .and_then(|d| labels.iter().find(|l| l.name == d))
        .or_else(|| labels.iter().find(|l| l.menu_default))
        .or_else(|| labels.first());
    let Some(label) = chosen else {
        // `DEFAULT kernel args` without labels.
        let d = default?;
        let mut words = d.split_whitespace();
        return Some(BootEntry {
            title: "default".into(),
            kernel: words.next()?.to_string(),
            initrds: Vec::new(),
            args: words.collect::<Vec<_>>().join(" "),
            root: None,
        });
    };
    // syslinux also takes `initrd=` inside APPEND.
    let mut initrds = label.initrds.clone();
    let mut args = Vec::new();
    for word in label.append.split_whitespace() {
        match word.strip_prefix("initrd=") {
            Some(list) => initrds.extend(list.split(',').map(str::to_string)),
            None => args.push(word),
        }
    }
    Some(BootEntry {
        title: label.name.clone(),
        kernel: label.kernel.clone()?,
        initrds,
        args: args.join(" "),
        root: None,
    })
}

#[cfg(test)]
#[path = "bls_tests.rs"]
mod tests;
