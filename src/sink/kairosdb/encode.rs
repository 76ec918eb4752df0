//! Encoding a batch for `POST /api/v1/datapoints`: one entry per series (same
//! name and tags) with all its points, an explicit `"type":"long"` (a long and
//! a double at one timestamp would be two points), the configured TTL, then
//! gzip. Each entry starts with the point's name and tags as every sink
//! writes them ([`crate::sink::json`]).
//!
//! ```json
//! [{"name":"uswm.visit.fm.1231.item_page.beta","tags":{"dc":"dc1","device":"desktop","login":"in"},
//!   "type":"long","ttl":2592000,"datapoints":[[1525356120000,10000],[1525356180000,9000]]}]
//! ```

use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::Write;

use crate::aggregate::{Namer, Point};
use crate::metrics::HealthPoint;
use crate::sink::json::{push_health_head, push_point_head};

/// Encodes health points, all stamped `ts_ms`: the gzipped body and the
/// length of the JSON before compression.
pub fn encode_health(points: &[HealthPoint], ts_ms: i64, ttl_s: u64) -> (Vec<u8>, usize) {
    let mut json = String::from("[");
    for (i, p) in points.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        push_health_head(&mut json, p);
        json.push_str(&format!(
            ",\"type\":\"{}\",\"ttl\":{ttl_s},\"datapoints\":[[{ts_ms},{}]]}}",
            p.value.kairos_type(),
            p.value
        ));
    }
    json.push(']');
    (gzip(&json), json.len())
}

fn gzip(json: &str) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::with_capacity(json.len() / 8 + 64), Compression::fast());
    gz.write_all(json.as_bytes()).expect("writing to memory");
    gz.finish().expect("writing to memory")
}

/// Returns the gzipped body and the length of the JSON before compression.
pub fn encode_batch(points: &[Point], namer: &Namer, ttl_s: u64) -> (Vec<u8>, usize) {
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_unstable_by_key(|p| (p.key, p.minute));
    let mut json = String::with_capacity(points.len() * 64 + 64);
    json.push('[');
    let mut i = 0;
    while i < sorted.len() {
        let key = sorted[i].key;
        if i > 0 {
            json.push(',');
        }
        push_point_head(&mut json, sorted[i], namer);
        json.push_str(",\"type\":\"long\",\"ttl\":");
        json.push_str(&ttl_s.to_string());
        json.push_str(",\"datapoints\":[");
        let mut first = true;
        while i < sorted.len() && sorted[i].key == key {
            if !first {
                json.push(',');
            }
            first = false;
            json.push('[');
            json.push_str(&sorted[i].minute.to_string());
            json.push(',');
            json.push_str(&sorted[i].value.to_string());
            json.push(']');
            i += 1;
        }
        json.push_str("]}");
    }
    json.push(']');
    (gzip(&json), json.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{MetricKind, SeriesKey, NO_MP};
    use crate::config::{Catalog, Config};
    use crate::names::Names;
    use std::io::Read;
    use std::sync::Arc;

    #[test]
    fn one_entry_per_series_with_type_ttl_and_all_its_points() {
        let c = Config::parse("[[experiment]]\nid = 1\ntenant = \"t\"\nvariations = [11, 12]\nqualify = [{device = \"d\", login = \"l\"}]\n", "t")
            .unwrap();
        let catalog = Catalog::build(&c, Arc::new(Names::default())).unwrap();
        let namer = Namer::new(&catalog);
        let k = SeriesKey::new(MetricKind::SessionAssigned, 0, NO_MP, 0, 0);
        let k2 = SeriesKey::new(MetricKind::SessionAssigned, 1, NO_MP, 0, 0);
        let points = [
            Point { key: k, minute: 120_000, value: 2 },
            Point { key: k2, minute: 60_000, value: 0 },
            Point { key: k, minute: 60_000, value: 5 },
        ];
        let (gz, raw) = encode_batch(&points, &namer, 86_400);
        let mut json = String::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut json).unwrap();
        assert_eq!(json.len(), raw);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!([
                {"name": "t.session.assigned.11", "tags": {"dc": "dc1", "device": "d", "login": "l"}, "type": "long", "ttl": 86400,
                 "datapoints": [[60000, 5], [120000, 2]]},
                {"name": "t.session.assigned.12", "tags": {"dc": "dc1", "device": "d", "login": "l"}, "type": "long", "ttl": 86400,
                 "datapoints": [[60000, 0]]}
            ])
        );
    }
}
