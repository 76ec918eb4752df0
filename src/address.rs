//! The `?key=value&…` options of an address (`kafka://…`, `kairosdb:http://…`,
//! `gen:PROFILE?…`): one parser for all of them.
//!
//! [`Options::parse`] splits the query at `&` (empty pieces are skipped) and
//! refuses a piece without `=`, a key given twice and a key the address does
//! not take, naming the keys it does. Values are taken as written: no address
//! expmon takes has ever percent-decoded them. Each address reads its values
//! through [`Options::value`], whose errors name the key; the address puts its
//! own name (shown through [`crate::redact::redact`]) before the error. No
//! message of this module shows a value: a piece without `=` that names a
//! secret is shown as `***`.

use crate::redact::{is_secret_key, HIDDEN};

/// The keys an address takes.
#[derive(Debug)]
pub struct Keys {
    /// Its own options, in the order the refusal of an unknown key lists them.
    pub known: &'static [&'static str],
    /// Other keys it takes and passes on as they are (librdkafka's settings
    /// for `kafka://`).
    pub passed_on: Option<PassedOn>,
}

/// Keys an address passes on without reading them.
#[derive(Debug)]
pub struct PassedOn {
    /// Whether a key is one of them.
    pub takes: fn(&str) -> bool,
    /// What the refusal of an unknown key says about them.
    pub described: &'static str,
}

/// Why the options of an address are refused: one line, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("option {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("option {0:?} is given twice")]
    Twice(String),
    #[error("unknown option {key:?} (expected {expected})")]
    Unknown { key: String, expected: String },
    /// A known key with a value it cannot take.
    #[error("{key}: {why}")]
    BadValue { key: &'static str, why: String },
}

impl Keys {
    /// What the refusal of an unknown key lists.
    fn expected(&self) -> String {
        match self.passed_on {
            Some(PassedOn { described, .. }) => format!("{}; {described}", self.known.join(", ")),
            None => self.known.join(", "),
        }
    }
}

/// `spec` split at its first `?`: the address and its query (empty if none).
pub fn split_query(spec: &str) -> (&str, &str) {
    spec.split_once('?').unwrap_or((spec, ""))
}

/// The options of one address, in the order written, each key once.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    keys: &'static Keys,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Options<'a> {
    /// Parses `k=v&k2=v2…` (the part after `?`) against `keys`.
    pub fn parse(query: &'a str, keys: &'static Keys) -> Result<Options<'a>, OptionError> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                let shown = if is_secret_key(kv) { HIDDEN } else { kv };
                return Err(OptionError::NotKeyValue(shown.to_string()));
            };
            let passed_on = keys.passed_on.as_ref().is_some_and(|p| (p.takes)(k));
            if !keys.known.contains(&k) && !passed_on {
                return Err(OptionError::Unknown { key: k.to_string(), expected: keys.expected() });
            }
            if pairs.iter().any(|(seen, _)| *seen == k) {
                return Err(OptionError::Twice(k.to_string()));
            }
            pairs.push((k, v));
        }
        Ok(Options { keys, pairs })
    }

    /// The value of the known option `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        debug_assert!(self.keys.known.contains(&key), "{key} is not a known option");
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The value of the known option `key` read by `read`, if given; its
    /// error (which should not show the value of a secret) names the key.
    pub fn value<T, E: std::fmt::Display>(
        &self,
        key: &'static str,
        read: impl FnOnce(&'a str) -> Result<T, E>,
    ) -> Result<Option<T>, OptionError> {
        self.get(key).map(read).transpose().map_err(|why| OptionError::BadValue { key, why: why.to_string() })
    }

    /// The options that are not the address's own (see [`Keys::passed_on`]),
    /// in the order written.
    pub fn passed_on(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.pairs.iter().copied().filter(|(k, _)| !self.keys.known.contains(k))
    }
}

/// A value [`positive`] refuses (the value as written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a positive number")]
pub struct NotPositive(pub String);

/// Reads a count of at least 1.
pub fn positive<T: std::str::FromStr + PartialOrd + Default>(v: &str) -> Result<T, NotPositive> {
    v.parse::<T>().ok().filter(|n| *n > T::default()).ok_or_else(|| NotPositive(v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    static PLAIN: Keys = Keys { known: &["rate", "events"], passed_on: None };
    static WITH_DOTS: Keys = Keys {
        known: &["group"],
        passed_on: Some(PassedOn { takes: |k| k.contains('.'), described: "settings have a dot in their name" }),
    };

    #[test]
    fn splits_the_query_and_keeps_the_order() {
        assert_eq!(split_query("demo?rate=5&events=2"), ("demo", "rate=5&events=2"));
        assert_eq!(split_query("demo"), ("demo", ""));
        let o = Options::parse("events=2&&rate=5&", &PLAIN).unwrap();
        assert_eq!((o.get("rate"), o.get("events")), (Some("5"), Some("2")));
        assert_eq!(Options::parse("", &PLAIN).unwrap().get("rate"), None);
        // Values are taken as written: `=` after the first, `%`, spaces.
        let o = Options::parse("rate=a=b%20c d", &PLAIN).unwrap();
        assert_eq!(o.get("rate"), Some("a=b%20c d"));
        let o = Options::parse("x.b=2&group=g&a.c=", &WITH_DOTS).unwrap();
        assert_eq!(o.get("group"), Some("g"));
        assert_eq!(o.passed_on().collect::<Vec<_>>(), vec![("x.b", "2"), ("a.c", "")]);
    }

    #[test]
    fn refuses_pieces_without_a_value_twice_given_and_unknown_keys() {
        let err = |q| Options::parse(q, &PLAIN).unwrap_err().to_string();
        assert_eq!(err("rate"), r#"option "rate" is not key=value"#);
        assert_eq!(err("rate=1&events=2&rate=1"), r#"option "rate" is given twice"#);
        assert_eq!(err("rat=1"), r#"unknown option "rat" (expected rate, events)"#);
        let e = Options::parse("grup=1", &WITH_DOTS).unwrap_err().to_string();
        assert_eq!(e, r#"unknown option "grup" (expected group; settings have a dot in their name)"#);
        let e = Options::parse("a.b=1&a.b=2", &WITH_DOTS).unwrap_err().to_string();
        assert_eq!(e, r#"option "a.b" is given twice"#);
    }

    #[test]
    fn a_piece_without_a_value_that_names_a_secret_is_hidden() {
        let e = Options::parse("sasl.password", &WITH_DOTS).unwrap_err().to_string();
        assert_eq!(e, r#"option "***" is not key=value"#);
    }

    #[test]
    fn values_are_read_with_errors_naming_the_key() {
        let o = Options::parse("rate=0&events=7", &PLAIN).unwrap();
        assert_eq!(o.value("events", positive::<u64>), Ok(Some(7)));
        assert_eq!(o.value("rate", positive::<f64>).unwrap_err().to_string(), r#"rate: "0" is not a positive number"#);
        let o = Options::parse("events=x", &PLAIN).unwrap();
        assert_eq!(o.value("rate", positive::<f64>), Ok(None));
        assert_eq!(
            o.value("events", positive::<u64>).unwrap_err().to_string(),
            r#"events: "x" is not a positive number"#
        );
    }
}
