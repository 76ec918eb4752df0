//! The input event (SPEC §1) and its parsing from raw bytes.
//!
//! [`parse_event`] is a pure function from one line (or Kafka message value) to
//! an [`Event`] that borrows its strings from the input where it can, or a
//! [`Reject`] reason. It never panics on any input (fuzzed by a property test).
//!
//! Rules: unknown fields are ignored; `null` is the same as absent; of duplicate
//! keys the last wins (also inside `assign` and `attrs`); empty names are
//! refused because they cannot become a metric name part or a KairosDB tag.
//! The optional `value` is a JSON integer with abs ≤ [`MAX_VALUE`] (absent or
//! null: 0); a float, a string or any other type, or an integer out of range,
//! is [`Reject::BadValue`] on both paths.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

mod fast;

/// Longest tenant, mp, device or login, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest session id, in bytes.
pub const MAX_SESSION_BYTES: usize = 256;
/// Longest attribute name or value, in bytes.
pub const MAX_ATTR_BYTES: usize = 256;
/// Most assignments, and most attributes, on one event.
pub const MAX_ENTRIES: usize = 64;
/// 2000-01-01T00:00:00Z in ms: the earliest valid `ts`.
pub const MIN_TS_MS: i64 = 946_684_800_000;

/// Largest abs(`value`) of an event (SPEC §1).
pub const MAX_VALUE: i64 = 10_000_000;

/// Experiment id of an assignment key too large for `u64`; never configured.
pub const UNKNOWN_EXPERIMENT_ID: u64 = u64::MAX;

/// A valid event, borrowing from the input line where no unescaping was needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub ts: i64,
    pub tenant: Cow<'a, str>,
    pub session: Cow<'a, str>,
    pub mp: Cow<'a, str>,
    pub device: Cow<'a, str>,
    pub login: Cow<'a, str>,
    /// experiment id → variation id, in input order, keys unique (held in
    /// the caller's [`ParseScratch`], so parsing allocates nothing per event).
    pub assign: &'a [(u64, i64)],
    /// attribute name → value, in input order, keys unique.
    pub attrs: SmallVec<[(Cow<'a, str>, Cow<'a, str>); 2]>,
    /// The amount the event carries (0 when absent), abs ≤ [`MAX_VALUE`].
    pub value: i32,
}

/// Why an input was rejected. Each reason is counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// Not valid UTF-8.
    NotUtf8,
    /// Not JSON (syntax error, trailing garbage, truncated).
    NotJson,
    /// JSON, but not an object.
    NotObject,
    /// A required field (`ts`, `tenant`, `session`, `mp`) is absent or null.
    MissingField,
    /// A field has the wrong JSON type (e.g. `ts` a string or a float).
    WrongType,
    /// An `assign` key that is not ASCII digits.
    BadAssignKey,
    /// `ts` before 2000-01-01.
    TsOutOfRange,
    /// `ts` after the wall clock plus `[engine] max_future` (a broken clock):
    /// refused in replays too, or it would drag the watermark past every
    /// event after it.
    TsFuture,
    /// A string over its bound, or an over-long line.
    TooLong,
    /// More than [`MAX_ENTRIES`] assignments or attributes.
    TooMany,
    /// An empty tenant, session, mp, device or login.
    EmptyField,
    /// A `value` that is not an integer (a float, a string, …) or whose
    /// abs exceeds [`MAX_VALUE`].
    BadValue,
}

impl Reject {
    pub const ALL: [Reject; 12] = [
        Reject::NotUtf8,
        Reject::NotJson,
        Reject::NotObject,
        Reject::MissingField,
        Reject::WrongType,
        Reject::BadAssignKey,
        Reject::TsOutOfRange,
        Reject::TsFuture,
        Reject::TooLong,
        Reject::TooMany,
        Reject::EmptyField,
        Reject::BadValue,
    ];

    /// Stable snake_case name, used in health metrics and dead-letter records.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::NotUtf8 => "not_utf8",
            Reject::NotJson => "not_json",
            Reject::NotObject => "not_object",
            Reject::MissingField => "missing_field",
            Reject::WrongType => "wrong_type",
            Reject::BadAssignKey => "bad_assign_key",
            Reject::TsOutOfRange => "ts_out_of_range",
            Reject::TsFuture => "ts_future",
            Reject::TooLong => "too_long",
            Reject::TooMany => "too_many",
            Reject::EmptyField => "empty_field",
            Reject::BadValue => "bad_value",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Storage reused across [`parse_event`] calls: the assignments of the event
/// being parsed.
#[derive(Debug, Default)]
pub struct ParseScratch {
    assign: Vec<(u64, i64)>,
}

/// Parses one event. `latest_ts` is the greatest valid `ts`: the wall clock
/// plus `[engine] max_future`, read by the caller once per batch (the engine
/// always passes it, for live sources and replays alike); `None` sets no upper
/// bound (tests and benchmarks of fixed data).
pub fn parse_event<'a>(
    line: &'a [u8],
    latest_ts: Option<i64>,
    scratch: &'a mut ParseScratch,
) -> Result<Event<'a>, Reject> {
    let assign = &mut scratch.assign;
    assign.clear();
    // An all-ASCII line in the fast subset needs no UTF-8 pass of its own;
    // any other is validated, then read by the fast path (if it has non-ASCII
    // bytes) or serde.
    let raw = match fast::parse_fast_ascii(line, assign) {
        Some(raw) => raw,
        None => {
            let text = std::str::from_utf8(line).map_err(|_| Reject::NotUtf8)?;
            assign.clear();
            let fast = if line.is_ascii() { None } else { fast::parse_fast(text, assign) };
            match fast {
                Some(raw) => raw,
                None => parse_event_serde(text, assign)?,
            }
        }
    };
    finish(raw, &scratch.assign, latest_ts)
}

/// The general path: any JSON, through serde_json, with exact rejection reasons.
fn parse_event_serde<'a>(text: &'a str, assign: &mut Vec<(u64, i64)>) -> Result<RawEvent<'a>, Reject> {
    assign.clear();
    let reason = Cell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = match (EventSeed { reason: &reason, assign }).deserialize(&mut de) {
        Ok(raw) => raw,
        Err(e) => return Err(classify(&e, &reason)),
    };
    if let Err(e) = de.end() {
        return Err(classify(&e, &reason));
    }
    Ok(raw)
}

/// Required fields, defaults, bounds and the ts range, common to both paths
/// (so the fast path and serde cannot disagree on them).
fn finish<'a>(raw: RawEvent<'a>, assign: &'a [(u64, i64)], latest_ts: Option<i64>) -> Result<Event<'a>, Reject> {
    let RawEvent { ts, tenant, session, mp, device, login, attrs, value } = raw;
    let (Some(ts), Some(tenant), Some(session), Some(mp)) = (ts, tenant, session, mp) else {
        return Err(Reject::MissingField);
    };
    let device = device.unwrap_or(Cow::Borrowed("unknown"));
    let login = login.unwrap_or(Cow::Borrowed("unknown"));
    for name in [&tenant, &mp, &device, &login] {
        if name.len() > MAX_NAME_BYTES {
            return Err(Reject::TooLong);
        }
    }
    if session.len() > MAX_SESSION_BYTES {
        return Err(Reject::TooLong);
    }
    if [&tenant, &session, &mp, &device, &login].iter().any(|s| s.is_empty()) {
        return Err(Reject::EmptyField);
    }
    if ts < MIN_TS_MS {
        return Err(Reject::TsOutOfRange);
    }
    if latest_ts.is_some_and(|latest| ts > latest) {
        return Err(Reject::TsFuture);
    }
    let value = value.unwrap_or(0);
    if !(-MAX_VALUE..=MAX_VALUE).contains(&value) {
        return Err(Reject::BadValue);
    }
    Ok(Event { ts, tenant, session, mp, device, login, assign, attrs: attrs.unwrap_or_default(), value: value as i32 })
}

fn classify(e: &serde_json::Error, reason: &Cell<Option<Reject>>) -> Reject {
    if let Some(r) = reason.get() {
        return r;
    }
    match e.classify() {
        serde_json::error::Category::Data => Reject::WrongType,
        _ => Reject::NotJson,
    }
}

type Attrs<'a> = SmallVec<[(Cow<'a, str>, Cow<'a, str>); 2]>;

#[derive(Default, Debug, PartialEq)]
struct RawEvent<'a> {
    ts: Option<i64>,
    tenant: Option<Cow<'a, str>>,
    session: Option<Cow<'a, str>>,
    mp: Option<Cow<'a, str>>,
    device: Option<Cow<'a, str>>,
    login: Option<Cow<'a, str>>,
    attrs: Option<Attrs<'a>>,
    /// `value` as read: any integer (range checked in `finish`; one beyond
    /// `i64` reads as `i64::MAX`, out of range too), `None` if absent or null.
    value: Option<i64>,
}

/// Deserializes the top-level object; records our own rejection reasons in
/// `reason` so they are not confused with serde's type errors.
struct EventSeed<'r> {
    reason: &'r Cell<Option<Reject>>,
    /// Where the assignments go.
    assign: &'r mut Vec<(u64, i64)>,
}

impl EventSeed<'_> {
    fn fail<E: de::Error>(&self, r: Reject) -> E {
        self.reason.set(Some(r));
        E::custom(r.as_str())
    }
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_> {
    type Value = RawEvent<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! not_object {
    ($($name:ident: $t:ty),*) => {$(
        fn $name<E: de::Error>(self, _: $t) -> Result<Self::Value, E> {
            Err(self.fail(Reject::NotObject))
        }
    )*};
}

impl<'de> Visitor<'de> for EventSeed<'_> {
    type Value = RawEvent<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }

    not_object!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(self.fail(Reject::NotObject))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(self.fail(Reject::NotObject))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut ev = RawEvent::default();
        while let Some(key) = map.next_key::<Str<'de>>()? {
            match &*key.0 {
                "ts" => ev.ts = map.next_value()?,
                "tenant" => ev.tenant = map.next_value::<Option<Str>>()?.map(|s| s.0),
                "session" => ev.session = map.next_value::<Option<Str>>()?.map(|s| s.0),
                "mp" => ev.mp = map.next_value::<Option<Str>>()?.map(|s| s.0),
                "device" => ev.device = map.next_value::<Option<Str>>()?.map(|s| s.0),
                "login" => ev.login = map.next_value::<Option<Str>>()?.map(|s| s.0),
                "assign" => {
                    // A later `assign` key replaces an earlier one; null empties it.
                    self.assign.clear();
                    map.next_value_seed(OptionSeed(AssignSeed { reason: self.reason, out: &mut *self.assign }))?;
                }
                "attrs" => ev.attrs = map.next_value_seed(OptionSeed(AttrsSeed { reason: self.reason }))?,
                "value" => ev.value = map.next_value_seed(ValueSeed { reason: self.reason })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(ev)
    }
}

/// A string that borrows from the input when it contains no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Str<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// `null` → `None`, otherwise the inner seed.
struct OptionSeed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for OptionSeed<S> {
    type Value = Option<S::Value>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct V<S>(S);
        impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for V<S> {
            type Value = Option<S::Value>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object or null")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                self.0.deserialize(d).map(Some)
            }
        }
        d.deserialize_option(V(self.0))
    }
}

/// Parses an `assign` key: ASCII digits, leading zeros allowed. Keys too large
/// for `u64` are valid but can never name a configured experiment.
fn parse_experiment_id(key: &str) -> Option<u64> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(key.parse::<u64>().unwrap_or(UNKNOWN_EXPERIMENT_ID))
}

/// A JSON integer of any size; those outside `i64` can never be configured.
struct Variation(Option<i64>);

impl<'de> de::Deserialize<'de> for Variation {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Variation;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer variation id")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Variation, E> {
                Ok(Variation(Some(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Variation, E> {
                Ok(Variation(i64::try_from(v).ok().or(Some(i64::MIN))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Variation, E> {
                Ok(Variation(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Variation, E> {
                Ok(Variation(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// The `value` field: an integer, or null; anything else is [`Reject::BadValue`].
struct ValueSeed<'r> {
    reason: &'r Cell<Option<Reject>>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Option<i64>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<i64>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Option<i64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer value")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<i64>, E> {
        Ok(Some(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<i64>, E> {
        Ok(Some(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<i64>, E> {
        Ok(None)
    }
    fn visit_none<E: de::Error>(self) -> Result<Option<i64>, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<i64>, E> {
        Err(self.bad())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<i64>, E> {
        Err(self.bad())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Option<i64>, E> {
        Err(self.bad())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Option<i64>, A::Error> {
        Err(self.bad())
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Option<i64>, A::Error> {
        Err(self.bad())
    }
}

impl ValueSeed<'_> {
    fn bad<E: de::Error>(&self) -> E {
        self.reason.set(Some(Reject::BadValue));
        E::custom(Reject::BadValue.as_str())
    }
}

struct AssignSeed<'r> {
    reason: &'r Cell<Option<Reject>>,
    out: &'r mut Vec<(u64, i64)>,
}

impl<'de> DeserializeSeed<'de> for AssignSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for AssignSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of experiment id to variation id")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.out;
        while let Some(key) = map.next_key::<Str<'de>>()? {
            let Some(exp) = parse_experiment_id(&key.0) else {
                self.reason.set(Some(Reject::BadAssignKey));
                return Err(de::Error::custom(Reject::BadAssignKey.as_str()));
            };
            let Variation(var) = map.next_value()?;
            out.retain(|(e, _)| *e != exp || exp == UNKNOWN_EXPERIMENT_ID);
            if let Some(var) = var {
                if out.len() == MAX_ENTRIES {
                    self.reason.set(Some(Reject::TooMany));
                    return Err(de::Error::custom(Reject::TooMany.as_str()));
                }
                out.push((exp, var));
            }
        }
        Ok(())
    }
}

struct AttrsSeed<'r> {
    reason: &'r Cell<Option<Reject>>,
}

impl<'de> DeserializeSeed<'de> for AttrsSeed<'_> {
    type Value = Attrs<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for AttrsSeed<'_> {
    type Value = Attrs<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of string to string")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Attrs::new();
        while let Some(key) = map.next_key::<Str<'de>>()? {
            let value: Option<Str<'de>> = map.next_value()?;
            let fail = |r: Reject| {
                self.reason.set(Some(r));
                de::Error::custom(r.as_str())
            };
            if key.0.len() > MAX_ATTR_BYTES || value.as_ref().is_some_and(|v| v.0.len() > MAX_ATTR_BYTES) {
                return Err(fail(Reject::TooLong));
            }
            out.retain(|(k, _)| *k != key.0);
            if let Some(v) = value {
                if out.len() == MAX_ENTRIES {
                    return Err(fail(Reject::TooMany));
                }
                out.push((key.0, v.0));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Event<'_> {
        let scratch = Box::leak(Box::default());
        parse_event(s.as_bytes(), None, scratch).unwrap()
    }
    fn rej(s: &[u8]) -> Reject {
        parse_event(s, None, &mut ParseScratch::default()).unwrap_err()
    }

    #[test]
    fn spec_example() {
        let e = ok(
            r#"{"ts":1525356185123,"tenant":"uswm","session":"s-9f2c","mp":"home_page","device":"desktop","login":"in","assign":{"123":1231,"77":771}}"#,
        );
        assert_eq!(e.ts, 1525356185123);
        assert_eq!(e.tenant, "uswm");
        assert!(matches!(e.tenant, Cow::Borrowed(_)));
        assert_eq!(e.assign, &[(123, 1231), (77, 771)]);
    }

    #[test]
    fn defaults_nulls_duplicates_unknown_fields() {
        let e = ok(
            r#"{"ts":1525356185123,"tenant":"a","session":"s","mp":"x","mp":"y","device":null,"extra":{"deep":[1,2]},"assign":{"0123":5,"123":6,"9":null},"attrs":{"k":"v","k":"w","z":null}}"#,
        );
        assert_eq!(e.mp, "y");
        assert_eq!(e.device, "unknown");
        assert_eq!(e.login, "unknown");
        assert_eq!(e.assign, &[(123, 6)]);
        assert_eq!(e.attrs.len(), 1);
        assert_eq!(e.attrs[0].1, "w");
    }

    #[test]
    fn escapes_are_unescaped() {
        let e = ok(r#"{"ts":1525356185123,"tenant":"a","session":"s\"1","mp":"caf\u00e9"}"#);
        assert_eq!(e.session, "s\"1");
        assert_eq!(e.mp, "café");
    }

    #[test]
    fn every_rejection_reason() {
        let base = |rest: &str| format!(r#"{{"ts":1525356185123,"tenant":"a","session":"s","mp":"m"{rest}}}"#);
        assert_eq!(rej(b"\xff\xfe{}"), Reject::NotUtf8);
        assert_eq!(rej(b"{\"ts\":"), Reject::NotJson);
        assert_eq!(rej(b"not json"), Reject::NotJson);
        assert_eq!(rej(base("").replace('}', "}}").as_bytes()), Reject::NotJson);
        assert_eq!(rej(b"[1,2]"), Reject::NotObject);
        assert_eq!(rej(b"42"), Reject::NotObject);
        assert_eq!(rej(br#"{"tenant":"a","session":"s","mp":"m"}"#), Reject::MissingField);
        assert_eq!(rej(br#"{"ts":null,"tenant":"a","session":"s","mp":"m"}"#), Reject::MissingField);
        assert_eq!(rej(br#"{"ts":"1525356185123","tenant":"a","session":"s","mp":"m"}"#), Reject::WrongType);
        assert_eq!(rej(br#"{"ts":1525356185123.5,"tenant":"a","session":"s","mp":"m"}"#), Reject::WrongType);
        assert_eq!(rej(base(r#","device":7"#).as_bytes()), Reject::WrongType);
        assert_eq!(rej(base(r#","assign":{"1":"x"}"#).as_bytes()), Reject::WrongType);
        assert_eq!(rej(base(r#","assign":{"1":1.5}"#).as_bytes()), Reject::WrongType);
        assert_eq!(rej(base(r#","assign":[1]"#).as_bytes()), Reject::WrongType);
        assert_eq!(rej(base(r#","attrs":{"k":1}"#).as_bytes()), Reject::WrongType);
        assert_eq!(rej(base(r#","assign":{"x1":1}"#).as_bytes()), Reject::BadAssignKey);
        assert_eq!(rej(base(r#","assign":{"":1}"#).as_bytes()), Reject::BadAssignKey);
        assert_eq!(rej(br#"{"ts":946684799999,"tenant":"a","session":"s","mp":"m"}"#), Reject::TsOutOfRange);
        let long = "x".repeat(65);
        assert_eq!(rej(base(&format!(r#","device":"{long}""#)).as_bytes()), Reject::TooLong);
        let many: Vec<String> = (0..65).map(|i| format!("\"{i}\":1")).collect();
        assert_eq!(rej(base(&format!(r#","assign":{{{}}}"#, many.join(","))).as_bytes()), Reject::TooMany);
        assert_eq!(rej(base(r#","login":"""#).as_bytes()), Reject::EmptyField);
        for bad in
            ["12.5", "12.0", "1e3", r#""12""#, "true", "[1]", "{}", "20000000", "-10000001", "12345678901234567890"]
        {
            assert_eq!(rej(base(&format!(r#","value":{bad}"#)).as_bytes()), Reject::BadValue, "{bad}");
        }
    }

    #[test]
    fn value_is_an_integer_within_its_range_absent_or_null_is_zero() {
        let line = |v: &str| format!(r#"{{"ts":1525356185123,"tenant":"a","session":"s","mp":"m"{v}}}"#);
        for (v, want) in [("", 0), (r#","value":null"#, 0), (r#","value":1299"#, 1299), (r#","value":-500"#, -500)] {
            let l = line(v);
            assert_eq!(parse_event(l.as_bytes(), None, &mut ParseScratch::default()).unwrap().value, want, "{l}");
        }
        for bound in [10_000_000i64, -10_000_000] {
            let l = line(&format!(r#","value":{bound}"#));
            assert!(fast::parse_fast(&l, &mut Vec::new()).is_some());
            assert_eq!(parse_event(l.as_bytes(), None, &mut ParseScratch::default()).unwrap().value as i64, bound);
        }
        // Duplicates: the last wins, on both paths.
        let l = line(r#","value":5,"value":7"#);
        same_as_serde(&l);
        assert_eq!(parse_event(l.as_bytes(), None, &mut ParseScratch::default()).unwrap().value, 7);
    }

    #[test]
    fn future_ts_refused_beyond_the_latest_valid_ts() {
        let line = br#"{"ts":1800000000000,"tenant":"a","session":"s","mp":"m"}"#;
        let mut scratch = ParseScratch::default();
        assert!(parse_event(line, None, &mut scratch).is_ok());
        assert!(parse_event(line, Some(1_800_000_000_000), &mut scratch).is_ok(), "the bound itself is valid");
        assert_eq!(parse_event(line, Some(1_799_999_999_999), &mut scratch), Err(Reject::TsFuture));
        // i64::MAX on both paths: the fast path takes 18 digits at most, serde the rest.
        let max = br#"{"ts":9223372036854775807,"tenant":"a","session":"s","mp":"m"}"#;
        assert_eq!(parse_event(max, Some(1_800_000_000_000), &mut scratch), Err(Reject::TsFuture));
        let max = br#"{"ts":999999999999999999,"tenant":"a","session":"s","mp":"m"}"#;
        assert!(fast::parse_fast(std::str::from_utf8(max).unwrap(), &mut Vec::new()).is_some());
        assert_eq!(parse_event(max, Some(1_800_000_000_000), &mut scratch), Err(Reject::TsFuture));
    }

    /// The fast path's contract: when it accepts, serde agrees exactly; its
    /// reading of unchecked bytes takes an ASCII line as it would, no other.
    fn same_as_serde(line: &str) {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        let fast = fast::parse_fast(line, &mut a);
        if let Some(fast) = &fast {
            assert_eq!(Ok(fast), parse_event_serde(line, &mut b).as_ref(), "{line}");
            assert_eq!(a, b, "{line}");
        }
        let ascii = fast::parse_fast_ascii(line.as_bytes(), &mut c);
        if line.is_ascii() {
            assert_eq!(ascii, fast, "{line}");
            assert_eq!(a, c, "{line}");
        } else {
            assert_eq!(ascii, None, "{line}");
        }
    }

    #[test]
    fn fast_path_takes_common_events_and_agrees_with_serde() {
        let common = r#"{"ts":1525356185123,"tenant":"uswm","session":"s-9f2c","mp":"home_page","device":"desktop","login":"in","assign":{"123":1231,"77":771},"attrs":{"payment":"paypal"}}"#;
        assert!(fast::parse_fast(common, &mut Vec::new()).is_some());
        same_as_serde(common);
        for line in [
            r#" { "ts" : 1525356185123 , "tenant":"a","session":"s","mp":"m","x":true,"y":null,"z":-5,"w":"q" } "#,
            r#"{"ts":1525356185123,"tenant":"a","session":"s","mp":"m","assign":{"0123":5,"123":6,"9":null},"attrs":{"k":"v","k":"w","z":null}}"#,
            r#"{"ts":null,"tenant":"a","session":"s","mp":"m","assign":null,"attrs":{}}"#,
            r#"{"ts":1525356185123,"tenant":"a","session":"s","mp":"checkout","value":-1299}"#,
            r#"{"ts":1525356185123,"tenant":"a","session":"s","mp":"m","value":null}"#,
            r#"{"value":20000000}"#,
            r#"{}"#,
        ] {
            assert!(fast::parse_fast(line, &mut Vec::new()).is_some(), "{line}");
            same_as_serde(line);
        }
        for line in [
            r#"{"ts":1.5,"tenant":"a"}"#,
            r#"{"ts":01,"tenant":"a"}"#,
            r#"{"ts":-0,"tenant":"a"}"#,
            r#"{"tenant":"a\"b"}"#,
            r#"{"x":{"nested":1}}"#,
            r#"{"assign":{"x":1}}"#,
            r#"{"ts":1,}"#,
            r#"{"ts":1} x"#,
            r#"{"ts":12345678901234567890}"#,
            r#"{"value":12.5}"#,
            r#"{"value":"12"}"#,
        ] {
            assert!(fast::parse_fast(line, &mut Vec::new()).is_none(), "{line}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]
        /// Generated JSON-ish events: whenever the fast path accepts, serde agrees.
        #[test]
        fn fast_path_contract(s in r#" ?\{ ?(("(ts|tenant|session|mp|device|login|assign|attrs|value|x)" ?: ?(-?[0-9]{1,20}(\.5)?|"[a-z0-9\\"\t]{0,5}"|null|true|\{ ?("[0-9a-z]{0,3}" ?: ?(-?0?[0-9]{1,20}|"[a-z]{0,3}"|null|1e3) ?,? ?){0,3}\}|\[\]) ?,? ?){0,9})\} ?x?"#) {
            same_as_serde(&s);
        }
    }

    #[test]
    fn huge_assign_key_is_valid_but_unknown() {
        let e = ok(
            r#"{"ts":1525356185123,"tenant":"a","session":"s","mp":"m","assign":{"123456789012345678901234567890":1}}"#,
        );
        assert_eq!(e.assign[0].0, UNKNOWN_EXPERIMENT_ID);
    }
}
