//! What crosses Kafka between the two stages, and how it is encoded (with the
//! checkpoint codec, [`crate::checkpoint::Enc`]).
//!
//! Everything here names points by **names** (tenant through the variation
//! id, mp, device, login), never by a process's interned ids, so that any
//! instance can read what any other wrote. Three kinds of records:
//! - [`DeltaRecord`] (`<group>.deltas`, keyed by input partition): one per
//!   trigger, input partition and delta partition; the input partition's
//!   watermark mark and the **absolute** contribution of that partition to
//!   each point it touched, stamped with the input offset it is valid at.
//!   Contributions at a later offset replace earlier ones (see
//!   `crate::scale`, "Why it is exact"), so a record read twice, or one of an
//!   aborted transaction, cannot change a total.
//! - snapshot chunks (`<group>.state`, partition = input partition): a stage-1
//!   task's whole state at one input offset.
//! - changelog records (`<group>.totals`, partition = delta partition, keyed
//!   by point and input partition): stage 2's state, one record per entry.

use super::ScaleError;
use crate::aggregate::{MetricKind, SeriesKey, NO_MP};
use crate::codec::{Dec, Enc};
use crate::config::Catalog;

/// The identity of a point across instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointId {
    pub kind: u8,
    pub variation_id: i64,
    /// `None` for session-level metrics.
    pub mp: Option<String>,
    pub device: String,
    pub login: String,
    pub minute: i64,
}

impl PointId {
    /// The names of `key` in `catalog` (whose name tables interned it).
    pub fn of(catalog: &Catalog, key: SeriesKey, minute: i64) -> PointId {
        let names = &catalog.names;
        PointId {
            kind: key.kind() as u8,
            variation_id: catalog.variations[key.variation() as usize].id,
            mp: (key.mp() != NO_MP).then(|| names.mp.get(key.mp()).to_string()),
            device: names.device.get(key.device()).to_string(),
            login: names.login.get(key.login()).to_string(),
            minute,
        }
    }

    pub fn encode(&self, e: &mut Enc) {
        e.u8(self.kind);
        e.i64(self.variation_id);
        e.u8(self.mp.is_some() as u8);
        e.bytes(self.mp.as_deref().unwrap_or("").as_bytes());
        e.bytes(self.device.as_bytes());
        e.bytes(self.login.as_bytes());
        e.i64(self.minute);
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<PointId, ScaleError> {
        let kind = d.u8()?;
        if kind > MetricKind::ValueSqFm as u8 {
            return Err(ScaleError::Wire(format!("unknown metric kind {kind}")));
        }
        let variation_id = d.i64()?;
        let has_mp = d.u8()? != 0;
        let mp = text(d)?;
        Ok(PointId {
            kind,
            variation_id,
            mp: has_mp.then_some(mp),
            device: text(d)?,
            login: text(d)?,
            minute: d.i64()?,
        })
    }

    /// The delta partition that owns this point: every stage-1 task sends a
    /// point to the same stage-2 task.
    pub fn partition(&self, partitions: usize) -> i32 {
        let mut e = Enc::default();
        self.encode(&mut e);
        (xxhash_rust::xxh3::xxh3_64(&e.buf) % partitions.max(1) as u64) as i32
    }
}

fn text(d: &mut Dec<'_>) -> Result<String, ScaleError> {
    String::from_utf8(d.bytes()?.to_vec()).map_err(|_| ScaleError::Wire("a name is not UTF-8".into()))
}

const DELTA_VERSION: u8 = 1;

/// A stage-1 task's output for one delta partition at one trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaRecord {
    /// The input partition.
    pub partition: u32,
    /// The input offset after the last event this record reflects.
    pub offset: i64,
    /// The partition's watermark at that offset (`i64::MIN` before any event).
    pub watermark: i64,
    /// `(point, the partition's absolute contribution to it)`.
    pub entries: Vec<(PointId, i64)>,
}

impl DeltaRecord {
    pub fn encode(&self) -> Vec<u8> {
        self.encode_pieces(usize::MAX).pop().expect("at least one piece")
    }

    /// The record as one or more records of at most about `max_bytes` each
    /// (the broker's message size bounds a record), each with the same
    /// partition, offset and watermark; always at least one (the mark).
    pub fn encode_pieces(&self, max_bytes: usize) -> Vec<Vec<u8>> {
        let start = |e: &mut Enc| {
            e.u8(DELTA_VERSION);
            e.u32(self.partition);
            e.i64(self.offset);
            e.i64(self.watermark);
            e.u64(0); // the entry count, set when the piece is done
        };
        const COUNT_AT: usize = 1 + 4 + 8 + 8;
        let finish = |e: &mut Enc, n: u64| e.buf[COUNT_AT..COUNT_AT + 8].copy_from_slice(&n.to_le_bytes());
        let mut pieces = Vec::new();
        let mut e = Enc::default();
        start(&mut e);
        let mut n = 0u64;
        for (id, v) in &self.entries {
            if n > 0 && e.len() >= max_bytes {
                finish(&mut e, n);
                pieces.push(std::mem::take(&mut e.buf));
                start(&mut e);
                n = 0;
            }
            id.encode(&mut e);
            e.i64(*v);
            n += 1;
        }
        finish(&mut e, n);
        pieces.push(e.buf);
        pieces
    }

    pub fn decode(bytes: &[u8]) -> Result<DeltaRecord, ScaleError> {
        let mut d = Dec::new(bytes);
        let v = d.u8()?;
        if v != DELTA_VERSION {
            return Err(ScaleError::Wire(format!("delta record version {v}, this build reads {DELTA_VERSION}")));
        }
        let (partition, offset, watermark) = (d.u32()?, d.i64()?, d.i64()?);
        let n = d.count(8 + 1 + 4 * 3 + 8 + 8)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push((PointId::decode(&mut d)?, d.i64()?));
        }
        Ok(DeltaRecord { partition, offset, watermark, entries })
    }
}

/// Largest snapshot chunk: under the broker's default 1 MB message size.
pub const CHUNK_BYTES: usize = 512 * 1024;

/// One chunk of a stage-1 snapshot: `(input partition, offset, snapshot id,
/// index, count, bytes)`. The id tells apart two snapshots at one offset (a
/// zombie's and the new owner's), whose chunks must not be mixed.
pub fn encode_chunk(partition: u32, offset: i64, id: u64, index: u32, count: u32, bytes: &[u8]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u32(partition);
    e.i64(offset);
    e.u64(id);
    e.u32(index);
    e.u32(count);
    e.bytes(bytes);
    e.buf
}

pub struct Chunk<'a> {
    pub partition: u32,
    pub offset: i64,
    pub id: u64,
    pub index: u32,
    pub count: u32,
    pub bytes: &'a [u8],
}

pub fn decode_chunk(bytes: &[u8]) -> Result<Chunk<'_>, ScaleError> {
    let mut d = Dec::new(bytes);
    Ok(Chunk {
        partition: d.u32()?,
        offset: d.i64()?,
        id: d.u64()?,
        index: d.u32()?,
        count: d.u32()?,
        bytes: d.bytes()?,
    })
}

/// The key of a changelog entry: a point's contribution from one input
/// partition, or (no point) that partition's watermark mark.
pub fn changelog_key(point: Option<&PointId>, partition: u32) -> Vec<u8> {
    let mut e = Enc::default();
    e.u32(partition);
    if let Some(p) = point {
        p.encode(&mut e);
    }
    e.buf
}

pub fn decode_changelog_key(bytes: &[u8]) -> Result<(Option<PointId>, u32), ScaleError> {
    let mut d = Dec::new(bytes);
    let partition = d.u32()?;
    if d.is_done() {
        return Ok((None, partition));
    }
    Ok((Some(PointId::decode(&mut d)?), partition))
}

/// A changelog value: `(offset, value)` (a mark's value is its watermark).
pub fn changelog_value(offset: i64, value: i64) -> Vec<u8> {
    let mut e = Enc::default();
    e.i64(offset);
    e.i64(value);
    e.buf
}

pub fn decode_changelog_value(bytes: &[u8]) -> Result<(i64, i64), ScaleError> {
    let mut d = Dec::new(bytes);
    Ok((d.i64()?, d.i64()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(minute: i64) -> PointId {
        PointId {
            kind: MetricKind::VisitFm as u8,
            variation_id: 1231,
            mp: Some("home_page".into()),
            device: "desktop".into(),
            login: "in".into(),
            minute,
        }
    }

    #[test]
    fn records_round_trip_and_refuse_garbage() {
        let r = DeltaRecord {
            partition: 3,
            offset: 77,
            watermark: -5,
            entries: vec![(id(60_000), 4), (PointId { mp: None, ..id(0) }, -1)],
        };
        assert_eq!(DeltaRecord::decode(&r.encode()).unwrap(), r);
        // Split under a size bound: every piece decodes, with the same header.
        let pieces = r.encode_pieces(1);
        assert_eq!(pieces.len(), 2);
        let back: Vec<DeltaRecord> = pieces.iter().map(|p| DeltaRecord::decode(p).unwrap()).collect();
        assert!(back.iter().all(|b| (b.partition, b.offset, b.watermark) == (3, 77, -5)));
        assert_eq!(back.iter().flat_map(|b| b.entries.clone()).collect::<Vec<_>>(), r.entries);
        let mark = DeltaRecord { entries: Vec::new(), ..r.clone() };
        assert_eq!(mark.encode_pieces(1).len(), 1, "a mark alone is one record");
        assert!(DeltaRecord::decode(&r.encode()[..20]).is_err());
        assert!(DeltaRecord::decode(&[9]).is_err(), "another version");
        let k = changelog_key(Some(&id(0)), 5);
        assert_eq!(decode_changelog_key(&k).unwrap(), (Some(id(0)), 5));
        assert_eq!(decode_changelog_key(&changelog_key(None, 2)).unwrap(), (None, 2));
        assert_eq!(decode_changelog_value(&changelog_value(9, -3)).unwrap(), (9, -3));
        let c = encode_chunk(1, 2, 42, 0, 1, b"abc");
        let c = decode_chunk(&c).unwrap();
        assert_eq!((c.partition, c.offset, c.id, c.index, c.count, c.bytes), (1, 2, 42, 0, 1, &b"abc"[..]));
    }

    #[test]
    fn a_point_always_goes_to_the_same_partition() {
        let p = id(0).partition(16);
        assert!((0..16).contains(&p));
        assert_eq!(id(0).partition(16), p);
        let spread: std::collections::BTreeSet<i32> = (0..64).map(|m| id(m * 60_000).partition(16)).collect();
        assert!(spread.len() > 8, "minutes spread over partitions: {spread:?}");
    }
}
