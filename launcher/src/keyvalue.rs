//! `key=value,key=value` option strings, as Cloud Hypervisor's `--disk` and `--net` take them.

use std::collections::BTreeMap;

/// A parsed option string: each known key at most once.
#[derive(Debug)]
pub struct KeyValues<'a> {
    values: BTreeMap<&'a str, &'a str>,
}

/// Why an option string was rejected (the caller prefixes the flag and entry).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyValueError {
    /// Not `key=value`.
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    /// A key the flag does not know.
    #[error("unknown key '{key}' (expected {expected})")]
    UnknownKey {
        /// The key.
        key: String,
        /// The keys accepted.
        expected: String,
    },
    /// A key given twice.
    #[error("'{0}' given twice")]
    Duplicate(String),
    /// A required key is missing.
    #[error("'{0}' is required")]
    Missing(&'static str),
    /// A value out of its set.
    #[error("{key}={value}: expected {expected}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
}

impl<'a> KeyValues<'a> {
    /// Splits `entry` into keys and values, accepting only `known` keys.
    pub fn parse(entry: &'a str, known: &[&str]) -> Result<Self, KeyValueError> {
        let mut values = BTreeMap::new();
        for item in entry.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| KeyValueError::NotKeyValue(item.to_string()))?;
            if !known.contains(&key) {
                return Err(KeyValueError::UnknownKey {
                    key: key.to_string(),
                    expected: known.join(", "),
                });
            }
            if values.insert(key, value).is_some() {
                return Err(KeyValueError::Duplicate(key.to_string()));
            }
        }
        Ok(Self { values })
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.values.get(key).copied()
    }

    /// The value of a required `key`.
    pub fn required(&self, key: &'static str) -> Result<&'a str, KeyValueError> {
        self.get(key)
            .filter(|v| !v.is_empty())
            .ok_or(KeyValueError::Missing(key))
    }

    /// An `on|off` (or `true|false`) switch, `default` when absent.
    pub fn switch(&self, key: &'static str, default: bool) -> Result<bool, KeyValueError> {
        match self.get(key) {
            None => Ok(default),
            Some("on" | "true") => Ok(true),
            Some("off" | "false") => Ok(false),
            Some(other) => Err(KeyValueError::BadValue {
                key,
                value: other.to_string(),
                expected: "on or off",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["path", "readonly", "id"];

    #[test]
    fn known_keys_are_read_and_switches_parsed() {
        let kv = KeyValues::parse("path=/a/b,readonly=on,id=d0", KEYS).unwrap();
        assert_eq!(kv.required("path").unwrap(), "/a/b");
        assert!(kv.switch("readonly", false).unwrap());
        assert_eq!(kv.get("id"), Some("d0"));
        let kv = KeyValues::parse("path=/x", KEYS).unwrap();
        assert!(!kv.switch("readonly", false).unwrap());
    }

    #[test]
    fn malformed_entries_say_what_is_wrong() {
        assert_eq!(
            KeyValues::parse("path", KEYS).unwrap_err(),
            KeyValueError::NotKeyValue("path".into())
        );
        assert!(matches!(
            KeyValues::parse("path=/x,size=1", KEYS).unwrap_err(),
            KeyValueError::UnknownKey { .. }
        ));
        assert_eq!(
            KeyValues::parse("path=/x,path=/y", KEYS).unwrap_err(),
            KeyValueError::Duplicate("path".into())
        );
        let kv = KeyValues::parse("id=x", KEYS).unwrap();
        assert_eq!(
            kv.required("path").unwrap_err(),
            KeyValueError::Missing("path")
        );
        let kv = KeyValues::parse("path=/x,readonly=yes", KEYS).unwrap();
        assert!(matches!(
            kv.switch("readonly", false),
            Err(KeyValueError::BadValue { .. })
        ));
    }
}
