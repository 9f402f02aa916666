//! Where a value sits in a VM's configuration ([`FieldPath`]), and what is wrong with it
//! ([`Reason`]), named in the terms of the entry point that gave it ([`Terms`]): one validator,
//! errors that read `disks[1].path: ...` for a JSON file or body and `--disk[1] path: ...` for
//! `rvmm run`'s flags.

/// One step of a [`FieldPath`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A field of [`super::VmConfigFile`], as its JSON path (`disks[1].path`); the empty path is
/// the top level.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<Step>);

/// The entry point whose names an error uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Terms {
    /// The JSON of `rvmm run --config` and `vm.create`: `disks[1].path`.
    Json,
    /// `rvmm run`'s flags: `--disk[1] path` (the second `--disk`'s `path=`).
    Flags,
}

impl FieldPath {
    /// The top level.
    pub fn root() -> Self {
        Self::default()
    }

    /// A dotted JSON path such as `disks[1].path` (`.` is the top level).
    pub fn parse(path: &str) -> Self {
        let mut steps = Vec::new();
        for part in path.split('.').filter(|p| !p.is_empty()) {
            let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
            if !key.is_empty() {
                steps.push(Step::Key(key.to_string()));
            }
            while let Some(index) = rest
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .and_then(|(n, r)| Some((n.parse().ok()?, r)))
            {
                steps.push(Step::Index(index.0));
                rest = index.1;
            }
            if !rest.is_empty() {
                steps.push(Step::Key(rest.to_string()));
            }
        }
        Self(steps)
    }

    /// The path of serde's error position.
    pub fn from_serde(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment;
        Self(
            path.iter()
                .map(|segment| match segment {
                    Segment::Seq { index } => Step::Index(*index),
                    Segment::Map { key } => Step::Key(key.clone()),
                    Segment::Enum { variant } => Step::Key(variant.clone()),
                    Segment::Unknown => Step::Key("?".into()),
                })
                .collect(),
        )
    }

    /// This path's field `key`.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.0.push(Step::Key(key.into()));
        self
    }

    /// This path's element `index`.
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Step::Index(index));
        self
    }

    /// `relative` (a dotted path such as `search[1]`) below this path.
    pub fn join(mut self, relative: &str) -> Self {
        self.0.extend(Self::parse(relative).0);
        self
    }

    /// The first key (`disks` for `disks[1].path`), if the path has one.
    pub fn top_level(&self) -> Option<&str> {
        match self.0.first()? {
            Step::Key(key) => Some(key),
            Step::Index(_) => None,
        }
    }

    /// The path as the entry point names it.
    pub fn render(&self, terms: Terms) -> String {
        match terms {
            Terms::Json => json_path(&self.0),
            Terms::Flags => flag_path(&self.0).unwrap_or_else(|| json_path(&self.0)),
        }
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(Terms::Json))
    }
}

/// `disks[1].path`, as serde_path_to_error writes it (`.` for the top level).
fn json_path(steps: &[Step]) -> String {
    if steps.is_empty() {
        return ".".into();
    }
    let mut text = String::new();
    for step in steps {
        match step {
            Step::Key(key) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Step::Index(i) => text.push_str(&format!("[{i}]")),
        }
    }
    text
}

/// The flag (and key of a `key=value` entry) that sets the field, if a flag does.
fn flag_path(steps: &[Step]) -> Option<String> {
    let key = |i: usize| match steps.get(i) {
        Some(Step::Key(key)) => Some(key.as_str()),
        _ => None,
    };
    let entry = |flag: &str| -> Option<String> {
        let Some(Step::Index(i)) = steps.get(1) else {
            return (steps.len() == 1).then(|| format!("--{flag}"));
        };
        let rest = &steps[2..];
        if rest.is_empty() {
            return Some(format!("--{flag}[{i}]"));
        }
        let rest = match (flag, key(2)) {
            // The DHCP settings are the NIC entry's own keys.
            ("net", Some("dhcp")) => dhcp_key(&rest[1..]),
            _ => json_path(rest),
        };
        Some(format!("--{flag}[{i}] {rest}"))
    };
    Some(match key(0)? {
        "cpus" if key(1) == Some("boot_vcpus") => "--vcpus".into(),
        "memory" => "--memory".into(),
        "payload" => match key(1)? {
            "kernel" => "--kernel".into(),
            "initramfs" => "--initrd".into(),
            "cmdline" => "--cmdline".into(),
            _ => return None,
        },
        "disks" => entry("disk")?,
        "net" => entry("net")?,
        "rng" => "--rng".into(),
        "serial" => match key(1) {
            Some(path @ ("file" | "socket")) => format!("--serial {path}"),
            _ => "--serial".into(),
        },
        "transport" => "--transport".into(),
        "acpi" => "--acpi".into(),
        _ => return None,
    })
}

/// A DHCP setting's `--net` key: `address` is `dhcp`, `interface` and `server` are
/// `dhcp-interface` and `dhcp-server`, the rest keep their names.
fn dhcp_key(steps: &[Step]) -> String {
    let (first, rest) = match steps.split_first() {
        None => return "dhcp".into(),
        Some((Step::Key(key), rest)) => (key.as_str(), rest),
        Some((Step::Index(_), _)) => return json_path(steps),
    };
    let key = match first {
        "address" => "dhcp",
        "interface" => "dhcp-interface",
        "server" => "dhcp-server",
        other => other,
    };
    let mut steps = vec![Step::Key(key.into())];
    steps.extend_from_slice(rest);
    json_path(&steps)
}

/// What is wrong with a field's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The value itself (`0 is out of range 1 to 32`).
    Value(String),
    /// The field is given together with `other`, which excludes it.
    Excludes {
        /// The other field.
        other: FieldPath,
        /// What to do instead.
        hint: &'static str,
    },
    /// The field needs `other`, which is not given.
    Needs {
        /// The other field.
        other: FieldPath,
        /// Why.
        hint: &'static str,
    },
    /// Neither a kernel nor a disk to boot from; on the command line the VM may also come
    /// from `--config` or, later, the API.
    NoBootSource,
}

impl Reason {
    /// The reason as the entry point names the other field.
    pub fn render(&self, terms: Terms) -> String {
        match self {
            Self::Value(text) => text.clone(),
            Self::Excludes { other, hint } => {
                format!("conflicts with {}: {hint}", other.render(terms))
            }
            Self::Needs { other, hint } => format!("needs {} ({hint})", other.render(terms)),
            Self::NoBootSource => match terms {
                Terms::Json => "required (or a disk to boot from)".into(),
                Terms::Flags => {
                    "required (or a --disk to boot from, --config FILE, or --api-socket PATH)"
                        .into()
                }
            },
        }
    }
}

impl From<String> for Reason {
    fn from(text: String) -> Self {
        Self::Value(text)
    }
}

impl From<&str> for Reason {
    fn from(text: &str) -> Self {
        Self::Value(text.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_parse_and_render_back() {
        for path in [
            ".",
            "cpus.boot_vcpus",
            "disks[1].path",
            "net[0].dhcp.search[1]",
            "net[2].dhcp.routes[0].gateway",
        ] {
            assert_eq!(FieldPath::parse(path).render(Terms::Json), path);
        }
        assert_eq!(FieldPath::parse("."), FieldPath::root());
        let built = FieldPath::root().key("disks").index(1).key("path");
        assert_eq!(built, FieldPath::parse("disks[1].path"));
        assert_eq!(built.top_level(), Some("disks"));
    }

    #[test]
    fn flags_name_the_flag_and_the_entrys_key() {
        for (path, flag) in [
            ("cpus.boot_vcpus", "--vcpus"),
            ("memory.size", "--memory"),
            ("payload.kernel", "--kernel"),
            ("payload.initramfs", "--initrd"),
            ("payload.cmdline", "--cmdline"),
            ("disks", "--disk"),
            ("disks[1]", "--disk[1]"),
            ("disks[1].path", "--disk[1] path"),
            ("net[0].mac", "--net[0] mac"),
            ("net[0].dhcp", "--net[0] dhcp"),
            ("net[0].dhcp.address", "--net[0] dhcp"),
            ("net[0].dhcp.interface", "--net[0] dhcp-interface"),
            ("net[0].dhcp.server", "--net[0] dhcp-server"),
            ("net[0].dhcp.search[1]", "--net[0] search[1]"),
            ("rng.src", "--rng"),
            ("serial.mode", "--serial"),
            ("serial.file", "--serial file"),
            ("transport", "--transport"),
            ("acpi", "--acpi"),
            // No flag sets these: the JSON path.
            ("cpus.max_vcpus", "cpus.max_vcpus"),
            ("net[0].dhcp.ipv6.address", "--net[0] ipv6.address"),
        ] {
            assert_eq!(FieldPath::parse(path).render(Terms::Flags), flag, "{path}");
        }
    }

    #[test]
    fn reasons_name_the_other_field_in_the_same_terms() {
        let needs = Reason::Needs {
            other: FieldPath::parse("payload.kernel"),
            hint: "a disk boot takes its initrd from the disk",
        };
        assert_eq!(
            needs.render(Terms::Json),
            "needs payload.kernel (a disk boot takes its initrd from the disk)"
        );
        assert_eq!(
            needs.render(Terms::Flags),
            "needs --kernel (a disk boot takes its initrd from the disk)"
        );
    }
}
