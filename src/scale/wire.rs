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

    /// The point's identity as fixed-width bytes: what
    /// [`PointId::partition`] hashes (the records encode it compactly).
    pub fn encode(&self, e: &mut Enc) {
        e.u8(self.kind);
        e.i64(self.variation_id);
        e.u8(self.mp.is_some() as u8);
        e.bytes(self.mp.as_deref().unwrap_or("").as_bytes());
        e.bytes(self.device.as_bytes());
        e.bytes(self.login.as_bytes());
        e.i64(self.minute);
    }

    /// The delta partition that owns this point: every stage-1 task sends a
    /// point to the same stage-2 task.
    pub fn partition(&self, partitions: usize) -> i32 {
        let mut e = Enc::default();
        self.encode(&mut e);
        (xxhash_rust::xxh3::xxh3_64(&e.buf) % partitions.max(1) as u64) as i32
    }
}

/// Version 2: a per-record name table and varints (version 1 repeated every
/// name in every entry, at ~5× the bytes).
const DELTA_VERSION: u8 = 2;

/// Appends `v` as a LEB128 varint (7 bits a byte, low first).
fn put_var(e: &mut Enc, mut v: u64) {
    while v >= 0x80 {
        e.u8(v as u8 | 0x80);
        v >>= 7;
    }
    e.u8(v as u8);
}

fn get_var(d: &mut Dec<'_>) -> Result<u64, ScaleError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = d.u8()?;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ScaleError::Wire("a varint longer than 10 bytes".into()))
}

/// A metric kind's byte, refused unless some [`MetricKind`] has it.
fn get_kind(d: &mut Dec<'_>) -> Result<u8, ScaleError> {
    let kind = d.u8()?;
    if kind > MetricKind::ValueSqFm as u8 {
        return Err(ScaleError::Wire(format!("unknown metric kind {kind}")));
    }
    Ok(kind)
}

/// A signed varint (zigzag: small magnitudes are short either side of 0).
fn put_ivar(e: &mut Enc, v: i64) {
    put_var(e, ((v << 1) ^ (v >> 63)) as u64);
}

fn get_ivar(d: &mut Dec<'_>) -> Result<i64, ScaleError> {
    let u = get_var(d)?;
    Ok((u >> 1) as i64 ^ -((u & 1) as i64))
}

fn put_text(e: &mut Enc, s: &str) {
    put_var(e, s.len() as u64);
    e.buf.extend_from_slice(s.as_bytes());
}

fn get_text(d: &mut Dec<'_>) -> Result<String, ScaleError> {
    let n = get_var(d)?;
    let mut bytes = Vec::with_capacity(n.min(4096) as usize);
    for _ in 0..n {
        bytes.push(d.u8()?);
    }
    String::from_utf8(bytes).map_err(|_| ScaleError::Wire("a name is not UTF-8".into()))
}

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

/// One piece of a delta record being encoded: its entries, and the table
/// of the names they index (each name once per piece).
#[derive(Default)]
struct Piece<'a> {
    names: Vec<&'a str>,
    index: ahash::AHashMap<&'a str, u64>,
    /// Bytes the name table will take (about: one length byte a name).
    table_bytes: usize,
    body: Enc,
    entries: u64,
}

impl<'a> Piece<'a> {
    fn name(&mut self, s: &'a str) -> u64 {
        let next = self.names.len() as u64;
        *self.index.entry(s).or_insert_with(|| {
            self.names.push(s);
            self.table_bytes += s.len() + 1;
            next
        })
    }

    fn len(&self) -> usize {
        self.body.len() + self.table_bytes
    }
}

impl DeltaRecord {
    pub fn encode(&self) -> Vec<u8> {
        self.encode_pieces(usize::MAX).pop().expect("at least one piece")
    }

    /// The record as one or more records of at most about `max_bytes` each
    /// (the broker's message size bounds a record), each with the same
    /// partition, offset and watermark; always at least one (the mark).
    ///
    /// Layout: version, partition (u32), offset, watermark (i64), the base
    /// minute (i64) and the minute unit (varint: 60,000 when every minute
    /// is a whole minute from the base, else 1), the name table (varint
    /// count, then each name as varint length and bytes), then the entries
    /// (varint count; each: kind byte, zigzag variation id, mp as its name
    /// index + 1 or 0 for none, device and login name indices, zigzag
    /// minute from the base in units, zigzag value).
    pub fn encode_pieces(&self, max_bytes: usize) -> Vec<Vec<u8>> {
        let base = self.entries.first().map_or(0, |(id, _)| id.minute);
        let unit: i64 =
            if self.entries.iter().all(|(id, _)| id.minute.wrapping_sub(base) % 60_000 == 0) { 60_000 } else { 1 };
        let finish = |piece: Piece<'_>| {
            let mut e = Enc::default();
            e.u8(DELTA_VERSION);
            e.u32(self.partition);
            e.i64(self.offset);
            e.i64(self.watermark);
            e.i64(base);
            put_var(&mut e, unit as u64);
            put_var(&mut e, piece.names.len() as u64);
            for n in &piece.names {
                put_text(&mut e, n);
            }
            put_var(&mut e, piece.entries);
            e.buf.extend_from_slice(&piece.body.buf);
            e.buf
        };
        let mut pieces = Vec::new();
        let mut piece = Piece::default();
        for (id, v) in &self.entries {
            if piece.entries > 0 && piece.len() >= max_bytes {
                pieces.push(finish(std::mem::take(&mut piece)));
            }
            let mp = id.mp.as_deref().map_or(0, |m| piece.name(m) + 1);
            let (device, login) = (piece.name(&id.device), piece.name(&id.login));
            let b = &mut piece.body;
            b.u8(id.kind);
            put_ivar(b, id.variation_id);
            put_var(b, mp);
            put_var(b, device);
            put_var(b, login);
            put_ivar(b, id.minute.wrapping_sub(base) / unit);
            put_ivar(b, *v);
            piece.entries += 1;
        }
        pieces.push(finish(piece));
        pieces
    }

    pub fn decode(bytes: &[u8]) -> Result<DeltaRecord, ScaleError> {
        let mut d = Dec::new(bytes);
        let v = d.u8()?;
        if v != DELTA_VERSION {
            return Err(ScaleError::Wire(format!("delta record version {v}, this build reads {DELTA_VERSION}")));
        }
        let (partition, offset, watermark, base) = (d.u32()?, d.i64()?, d.i64()?, d.i64()?);
        let unit = get_var(&mut d)? as i64;
        let left = |d: &Dec<'_>| bytes.len() - d.clone_position();
        let n = get_var(&mut d)?;
        if n > left(&d) as u64 {
            return Err(ScaleError::Wire(format!("a delta record's name table of {n} names exceeds its bytes")));
        }
        let names = (0..n).map(|_| get_text(&mut d)).collect::<Result<Vec<String>, _>>()?;
        let name =
            |i: u64| names.get(i as usize).cloned().ok_or_else(|| ScaleError::Wire(format!("name index {i} of {n}")));
        let n = get_var(&mut d)?;
        // Every entry is at least 7 bytes: a corrupt count cannot allocate wildly.
        if n.saturating_mul(7) > left(&d) as u64 {
            return Err(ScaleError::Wire(format!("a delta record's {n} entries exceed its bytes")));
        }
        let mut entries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let kind = get_kind(&mut d)?;
            let variation_id = get_ivar(&mut d)?;
            let mp = match get_var(&mut d)? {
                0 => None,
                i => Some(name(i - 1)?),
            };
            let (device, login) = (name(get_var(&mut d)?)?, name(get_var(&mut d)?)?);
            let minute = base.wrapping_add(get_ivar(&mut d)?.wrapping_mul(unit));
            let id = PointId { kind, variation_id, mp, device, login, minute };
            entries.push((id, get_ivar(&mut d)?));
        }
        if !d.is_done() {
            return Err(ScaleError::Wire("a delta record has bytes after its entries".into()));
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

/// First byte of changelog keys and values (format 2: varints; format 1
/// began with a fixed-width partition or offset).
const CHANGELOG_FORMAT: u8 = 0xC2;

/// The key of a changelog entry: a point's contribution from one input
/// partition, or (no point) that partition's watermark mark. Layout: format
/// byte, varint partition, then for a point: kind byte, zigzag variation id,
/// mp (varint length + 1, 0 for none) and bytes, device and login (varint
/// length and bytes), zigzag minute.
pub fn changelog_key(point: Option<&PointId>, partition: u32) -> Vec<u8> {
    let mut e = Enc::default();
    e.u8(CHANGELOG_FORMAT);
    put_var(&mut e, partition.into());
    if let Some(p) = point {
        e.u8(p.kind);
        put_ivar(&mut e, p.variation_id);
        match &p.mp {
            None => put_var(&mut e, 0),
            Some(m) => {
                put_var(&mut e, m.len() as u64 + 1);
                e.buf.extend_from_slice(m.as_bytes());
            }
        }
        put_text(&mut e, &p.device);
        put_text(&mut e, &p.login);
        put_ivar(&mut e, p.minute);
    }
    e.buf
}

fn format_byte(d: &mut Dec<'_>, what: &str) -> Result<(), ScaleError> {
    match d.u8()? {
        CHANGELOG_FORMAT => Ok(()),
        b => {
            Err(ScaleError::Wire(format!("changelog {what} of another format (first byte {b:#x}): start a new group")))
        }
    }
}

pub fn decode_changelog_key(bytes: &[u8]) -> Result<(Option<PointId>, u32), ScaleError> {
    let mut d = Dec::new(bytes);
    format_byte(&mut d, "key")?;
    let partition = u32::try_from(get_var(&mut d)?)
        .map_err(|_| ScaleError::Wire("a changelog key's partition is out of range".into()))?;
    if d.is_done() {
        return Ok((None, partition));
    }
    let kind = get_kind(&mut d)?;
    let variation_id = get_ivar(&mut d)?;
    let mp = match get_var(&mut d)? {
        0 => None,
        n => {
            let bytes = (0..n - 1).map(|_| d.u8()).collect::<Result<Vec<u8>, _>>()?;
            Some(String::from_utf8(bytes).map_err(|_| ScaleError::Wire("a name is not UTF-8".into()))?)
        }
    };
    let (device, login, minute) = (get_text(&mut d)?, get_text(&mut d)?, get_ivar(&mut d)?);
    if !d.is_done() {
        return Err(ScaleError::Wire("a changelog key has bytes after its point".into()));
    }
    Ok((Some(PointId { kind, variation_id, mp, device, login, minute }), partition))
}

/// A changelog value: `(offset, value)` (a mark's value is its watermark).
pub fn changelog_value(offset: i64, value: i64) -> Vec<u8> {
    let mut e = Enc::default();
    e.u8(CHANGELOG_FORMAT);
    put_ivar(&mut e, offset);
    put_ivar(&mut e, value);
    e.buf
}

pub fn decode_changelog_value(bytes: &[u8]) -> Result<(i64, i64), ScaleError> {
    let mut d = Dec::new(bytes);
    format_byte(&mut d, "value")?;
    Ok((get_ivar(&mut d)?, get_ivar(&mut d)?))
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
        let none = PointId { mp: None, ..id(-60_000) };
        assert_eq!(decode_changelog_key(&changelog_key(Some(&none), 70_000)).unwrap(), (Some(none), 70_000));
        assert!(k.len() < 32, "{} bytes", k.len());
        // A changelog of the first format (fixed-width, no format byte): refused, not misread.
        let mut v1 = Vec::new();
        v1.extend_from_slice(&5u32.to_le_bytes());
        assert!(decode_changelog_key(&v1).unwrap_err().to_string().contains("another format"));
        assert!(decode_changelog_value(&[0; 16]).is_err());
        let c = encode_chunk(1, 2, 42, 0, 1, b"abc");
        let c = decode_chunk(&c).unwrap();
        assert_eq!((c.partition, c.offset, c.id, c.index, c.count, c.bytes), (1, 2, 42, 0, 1, &b"abc"[..]));
    }

    #[test]
    fn records_name_each_name_once_and_stay_small() {
        // A trigger's record: 2,000 points over 4 mps, 3 devices, 2 logins, 10 minutes.
        let (mps, devices, logins) =
            (["home_page", "checkout", "search", "basket"], ["desktop", "mobile", "tablet"], ["in", "out"]);
        let entries: Vec<(PointId, i64)> = (0..2_000i64)
            .map(|i| {
                let id = PointId {
                    kind: (i % MetricKind::ALL.len() as i64) as u8,
                    variation_id: 1_000 + i % 7,
                    mp: (i % 5 != 0).then(|| mps[i as usize % 4].to_string()),
                    device: devices[i as usize % 3].into(),
                    login: logins[i as usize % 2].into(),
                    minute: 1_767_225_600_000 + (i % 10) * 60_000,
                };
                (id, i * 37 - 5_000)
            })
            .collect();
        let r = DeltaRecord { partition: 7, offset: 1 << 40, watermark: i64::MIN, entries };
        let bytes = r.encode();
        assert_eq!(DeltaRecord::decode(&bytes).unwrap(), r);
        assert!(bytes.len() < 2_000 * 12, "{} bytes for 2,000 entries", bytes.len());
        // Pieces under a bound each carry the names they use.
        let pieces = r.encode_pieces(4_096);
        assert!(pieces.len() > 1 && pieces.iter().all(|p| p.len() < 4_096 + 64), "{}", pieces.len());
        let back: Vec<(PointId, i64)> = pieces.iter().flat_map(|p| DeltaRecord::decode(p).unwrap().entries).collect();
        assert_eq!(back, r.entries);
        // A minute off the whole-minute grid is carried exactly too.
        let odd = DeltaRecord { entries: vec![(id(60_000), 1), (id(60_001), -2)], ..r.clone() };
        assert_eq!(DeltaRecord::decode(&odd.encode()).unwrap(), odd);
        // A name index past the table, or trailing bytes: refused.
        let mut bad = odd.encode();
        bad.push(0);
        assert!(DeltaRecord::decode(&bad).is_err());
        let one = DeltaRecord { entries: vec![(id(0), 1)], ..r };
        let mut bad = one.encode();
        let at = bad.len() - 4; // the entry's device index
        bad[at] = 9;
        assert!(DeltaRecord::decode(&bad).unwrap_err().to_string().contains("name index"), "{bad:?}");
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
