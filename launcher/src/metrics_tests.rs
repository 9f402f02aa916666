//! Tests of the Prometheus exposition: a small parser of the text format checks every line.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rvmm_core::{DiskMetrics, NicMetrics, VmMetrics};

use super::*;

type Labels = Vec<(String, String)>;

/// One sample line, parsed.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

/// What the parser found.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
    }

    fn families(&self) -> HashSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    is_metric_name(name) && !name.contains(':') && !name.starts_with("__")
}

/// Parses `{k="v",...}` starting after the `{`; returns the labels and the rest after `}`.
fn parse_labels(mut rest: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let key = &rest[..eq];
        if !is_label_name(key) {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    other => return Err(format!("bad escape \\{other}")),
                },
                (_, '\n') => return Err("raw newline in a label value".into()),
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Parses the text format strictly enough to catch what Prometheus would reject or
/// misread: every sample follows the TYPE of its family, families are contiguous and typed
/// once, counters end in `_total`, values are floats, labels are well-formed and every
/// series is unique.
fn parse(text: &str) -> Result<Exposition, String> {
    let mut exp = Exposition::default();
    let mut helped = HashSet::new();
    let mut current: Option<String> = None;
    let mut closed = HashSet::new();
    let mut series = HashSet::new();
    if !text.ends_with('\n') {
        return Err("the exposition must end with a line feed".into());
    }
    for line in text.lines() {
        if let Some(help) = line.strip_prefix("# HELP ") {
            let (name, doc) = help.split_once(' ').ok_or("HELP without text")?;
            if !helped.insert(name.to_string()) {
                return Err(format!("second HELP for {name}"));
            }
            if doc.contains("\\\"") || doc.is_empty() {
                return Err(format!("bad HELP text for {name}"));
            }
            continue;
        }
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let (name, kind) = decl.split_once(' ').ok_or("TYPE without a type")?;
            if !is_metric_name(name) {
                return Err(format!("bad metric name {name:?}"));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("unknown type {kind}"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(format!("counter {name} does not end in _total"));
            }
            if exp.types.insert(name.into(), kind.into()).is_some() {
                return Err(format!("second TYPE for {name}"));
            }
            if let Some(previous) = current.replace(name.to_string()) {
                closed.insert(previous);
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(format!("unexpected line {line:?}"));
        }
        let name_end = line.find(['{', ' ']).ok_or("sample without a value")?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(format!("bad metric name {name:?}"));
        }
        if current.as_deref() != Some(name) || closed.contains(name) {
            return Err(format!("sample {name} outside its family's block"));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(after) => parse_labels(after)?,
            None => (Vec::new(), &line[name_end..]),
        };
        let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
        let value: f64 = value
            .parse()
            .map_err(|_| format!("value {value:?} of {name} is not a float"))?;
        let mut key: Vec<_> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        key.sort();
        if !series.insert(format!("{name}{key:?}")) {
            return Err(format!("duplicate series {name}{key:?}"));
        }
        exp.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    if let Some(missing) = exp.types.keys().find(|name| !helped.contains(*name)) {
        return Err(format!("{missing} has no HELP"));
    }
    Ok(exp)
}

fn full_metrics() -> VmMetrics {
    VmMetrics {
        exits: vec![("io_in", 7), ("io_out", 1234), ("mmio_write", 3)],
        disks: vec![
            DiskMetrics {
                id: "root".into(),
                reads: 10,
                writes: 4,
                read_bytes: 5120,
                write_bytes: 2048,
                flushes: 2,
                errors: 1,
                host_errors: 1,
            },
            DiskMetrics {
                id: "disk1".into(),
                ..Default::default()
            },
        ],
        nets: vec![NicMetrics {
            id: "eth0".into(),
            rx_packets: 5,
            rx_bytes: 1500,
            rx_drops: 1,
            rx_errors: 0,
            tx_packets: 6,
            tx_bytes: 1600,
            tx_drops: 2,
            tx_errors: 3,
        }],
        memory_bytes: 256 << 20,
        vcpu_cpu_ns: vec![Some(1_500_000_000)],
        malformed_pci: rvmm_core::metrics::MalformedPciCounts {
            config: 1,
            bar: 2,
            msix: 3,
        },
    }
}

#[test]
fn without_a_vm_only_state_and_uptime_are_reported() {
    let text = render("Created", Duration::from_millis(1500), None);
    let exp = parse(&text).unwrap();
    assert_eq!(
        exp.families(),
        HashSet::from(["rvmm_vm_state", "rvmm_uptime_seconds"])
    );
    assert_eq!(exp.value("rvmm_uptime_seconds", &[]), Some(1.5));
    assert_eq!(
        exp.value("rvmm_vm_state", &[("state", "Created")]),
        Some(1.0)
    );
}

#[test]
fn every_line_of_a_full_exposition_is_well_formed() {
    let vm = full_metrics();
    let text = render("Running", Duration::from_secs(42), Some(&vm));
    let exp = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(exp.types["rvmm_uptime_seconds"], "gauge");
    assert_eq!(exp.types["rvmm_guest_memory_bytes"], "gauge");
    assert_eq!(exp.types["rvmm_vcpu_exits_total"], "counter");
    assert_eq!(
        exp.value("rvmm_guest_memory_bytes", &[]),
        Some(268_435_456.0)
    );
    assert_eq!(
        exp.value("rvmm_vcpu_exits_total", &[("reason", "io_out")]),
        Some(1234.0)
    );
    let pci = |kind: &str| exp.value("rvmm_pci_malformed_accesses_total", &[("kind", kind)]);
    assert_eq!(
        (pci("config"), pci("bar"), pci("msix")),
        (Some(1.0), Some(2.0), Some(3.0))
    );
    let disk = |name: &str, id: &str| exp.value(name, &[("disk", id)]);
    assert_eq!(disk("rvmm_disk_reads_total", "root"), Some(10.0));
    assert_eq!(disk("rvmm_disk_writes_total", "root"), Some(4.0));
    assert_eq!(disk("rvmm_disk_read_bytes_total", "root"), Some(5120.0));
    assert_eq!(disk("rvmm_disk_write_bytes_total", "root"), Some(2048.0));
    assert_eq!(disk("rvmm_disk_flushes_total", "root"), Some(2.0));
    assert_eq!(disk("rvmm_disk_errors_total", "root"), Some(1.0));
    assert_eq!(disk("rvmm_disk_host_errors_total", "root"), Some(1.0));
    assert_eq!(disk("rvmm_disk_reads_total", "disk1"), Some(0.0));
    let nic = |name: &str| exp.value(name, &[("interface", "eth0")]);
    assert_eq!(nic("rvmm_net_rx_packets_total"), Some(5.0));
    assert_eq!(nic("rvmm_net_rx_bytes_total"), Some(1500.0));
    assert_eq!(nic("rvmm_net_rx_dropped_total"), Some(1.0));
    assert_eq!(nic("rvmm_net_rx_errors_total"), Some(0.0));
    assert_eq!(nic("rvmm_net_tx_packets_total"), Some(6.0));
    assert_eq!(nic("rvmm_net_tx_bytes_total"), Some(1600.0));
    assert_eq!(nic("rvmm_net_tx_dropped_total"), Some(2.0));
    assert_eq!(nic("rvmm_net_tx_errors_total"), Some(3.0));
    // 4 state series + uptime + memory + 3 exit reasons + 3 malformed PCI kinds + 7 counters
    // x 2 disks + 8 x 1 NIC.
    assert_eq!(exp.samples.len(), 4 + 1 + 1 + 3 + 3 + 14 + 8);
}

#[test]
fn vm_state_is_one_hot_and_an_unknown_state_gets_its_own_series() {
    let exp = parse(&render("Paused", Duration::ZERO, None)).unwrap();
    for state in VM_STATES {
        let expected = if state == "Paused" { 1.0 } else { 0.0 };
        assert_eq!(
            exp.value("rvmm_vm_state", &[("state", state)]),
            Some(expected)
        );
    }
    let exp = parse(&render("Migrating", Duration::ZERO, None)).unwrap();
    assert_eq!(
        exp.value("rvmm_vm_state", &[("state", "Migrating")]),
        Some(1.0)
    );
    let on: f64 = exp
        .samples
        .iter()
        .filter(|s| s.name == "rvmm_vm_state")
        .map(|s| s.value)
        .sum();
    assert_eq!(on, 1.0);
}

#[test]
fn label_values_escape_backslash_quote_and_newline() {
    let mut vm = full_metrics();
    vm.disks[0].id = "a\\b\"c\nd".into();
    let text = render("Running", Duration::ZERO, Some(&vm));
    assert!(
        text.contains("rvmm_disk_reads_total{disk=\"a\\\\b\\\"c\\nd\"} 10\n"),
        "{text}"
    );
    let exp = parse(&text).unwrap();
    assert_eq!(
        exp.value("rvmm_disk_reads_total", &[("disk", "a\\b\"c\nd")]),
        Some(10.0)
    );
}

#[test]
fn device_families_are_left_out_when_the_vm_has_no_such_device() {
    let vm = VmMetrics {
        exits: vec![("hlt", 0)],
        memory_bytes: 1 << 20,
        ..Default::default()
    };
    let exp = parse(&render("Running", Duration::ZERO, Some(&vm))).unwrap();
    assert!(exp.families().iter().all(|f| !f.starts_with("rvmm_disk_")));
    assert!(!exp.types.keys().any(|f| f.starts_with("rvmm_net_")));
    assert_eq!(
        exp.value("rvmm_vcpu_exits_total", &[("reason", "hlt")]),
        Some(0.0)
    );
}

#[test]
fn the_test_parser_rejects_malformed_expositions() {
    let bad = [
        "rvmm_x 1\n",
        "# HELP rvmm_x_total X.\n# TYPE rvmm_x_total counter\nrvmm_x_total{a=\"1} 1\n",
        "# HELP rvmm_x X.\n# TYPE rvmm_x counter\nrvmm_x 1\n",
        "# HELP rvmm_x X.\n# TYPE rvmm_x gauge\nrvmm_x one\n",
        "# HELP rvmm_x X.\n# TYPE rvmm_x gauge\nrvmm_x{a=\"\\t\"} 1\n",
        "# HELP rvmm_x X.\n# TYPE rvmm_x gauge\nrvmm_x 1\nrvmm_x 2\n",
        "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\nb 1\na 1\n",
    ];
    for text in bad {
        assert!(parse(text).is_err(), "accepted {text:?}");
    }
}
