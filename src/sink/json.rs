//! The JSON of a point, in one place for every sink: the head
//! `{"name":…,"tags":{…}` an experiment point or a health point starts with
//! (tags sorted by name), and the file sink's upsert line after it,
//! `,"timestamp":MS,"value":V}` (SPEC §5), which the KairosDB dead-letter file
//! writes too. The KairosDB encoder ends the same head with its type, TTL and
//! data points instead ([`super::kairosdb::encode_batch`]).

use std::fmt::Write;

use crate::aggregate::{Namer, Point};
use crate::metrics::HealthPoint;

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `{"name":NAME,"tags":{"dc":…,"device":…,"login":…}` of the
/// experiment point `p` (the object left open).
pub fn push_point_head(out: &mut String, p: &Point, namer: &Namer) {
    out.push_str("{\"name\":\"");
    let start = out.len();
    namer.write_name(p.key, out);
    // Metric names come from config and input names; escape if needed.
    if out[start..].bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        let name = out.split_off(start);
        out.pop();
        push_json_str(out, &name);
    } else {
        out.push('"');
    }
    out.push_str(",\"tags\":{\"dc\":");
    push_json_str(out, namer.dc());
    out.push_str(",\"device\":");
    push_json_str(out, namer.device(p.key));
    out.push_str(",\"login\":");
    push_json_str(out, namer.login(p.key));
    out.push('}');
}

/// Appends `{"name":NAME,"tags":{TAG:VALUE,…}` of the health point `p`
/// (the object left open).
pub fn push_health_head(out: &mut String, p: &HealthPoint) {
    out.push_str("{\"name\":");
    push_json_str(out, &p.name);
    out.push_str(",\"tags\":{");
    for (i, (k, v)) in p.tags.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, k);
        out.push(':');
        push_json_str(out, v);
    }
    out.push('}');
}

/// Appends one upsert line of the experiment point `p` (with its newline).
pub fn format_point(out: &mut String, p: &Point, namer: &Namer) {
    push_point_head(out, p, namer);
    let _ = writeln!(out, ",\"timestamp\":{},\"value\":{}}}", p.minute, p.value);
}

/// Appends one upsert line of the health point `p` stamped `ts_ms` (with its
/// newline).
pub fn format_health(out: &mut String, p: &HealthPoint, ts_ms: i64) {
    push_health_head(out, p);
    let _ = writeln!(out, ",\"timestamp\":{ts_ms},\"value\":{}}}", p.value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::HealthValue;

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        assert_eq!(serde_json::from_str::<String>(&s).unwrap(), "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn a_point_line_is_the_upsert_of_spec_5() {
        use crate::aggregate::{MetricKind, SeriesKey, NO_MP};
        use crate::config::{Catalog, Config};
        let toml = "[[experiment]]\nid = 1\ntenant = \"t\\\"q\"\nvariations = [11]\n\
                    qualify = [{device = \"d\", login = \"l\"}]\n";
        let c = Config::parse(toml, "t").unwrap();
        let catalog = Catalog::build(&c, std::sync::Arc::default()).unwrap();
        let namer = Namer::new(&catalog);
        let p = Point { key: SeriesKey::new(MetricKind::SessionAssigned, 0, NO_MP, 0, 0), minute: 60_000, value: -3 };
        let mut line = String::new();
        format_point(&mut line, &p, &namer);
        assert_eq!(
            line,
            "{\"name\":\"t\\\"q.session.assigned.11\",\"tags\":{\"dc\":\"dc1\",\"device\":\"d\",\"login\":\"l\"},\
             \"timestamp\":60000,\"value\":-3}\n"
        );
    }

    #[test]
    fn a_health_line_has_its_tags_in_order_and_its_value() {
        let p = HealthPoint {
            name: "expmon.lag\"s".into(),
            tags: vec![("dc", "dc1".into()), ("instance", "i-1".into()), ("reason", "bad\njson".into())],
            value: HealthValue::Float(0.25),
        };
        let mut line = String::new();
        format_health(&mut line, &p, 60_000);
        assert_eq!(
            line,
            "{\"name\":\"expmon.lag\\\"s\",\"tags\":{\"dc\":\"dc1\",\"instance\":\"i-1\",\"reason\":\"bad\\njson\"},\
             \"timestamp\":60000,\"value\":0.25}\n"
        );
    }
}
