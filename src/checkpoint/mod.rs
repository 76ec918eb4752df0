//! Checkpoints: a consistent snapshot of all engine state plus the source
//! position, so that a restart ends exactly where an uninterrupted run would.
//!
//! Consistency comes from the flush protocol: a snapshot is taken at a flush
//! marker. The router encodes its state (watermark clocks, interned names,
//! source position) when it sends the marker; each shard encodes its sessions
//! when the marker reaches it (its counters are empty then); the writer encodes
//! the merged totals after applying that epoch. All three describe the same cut
//! of the input.
//!
//! Durability and ordering:
//! 1. the writer writes `checkpoint.bin.tmp` and fsyncs it;
//! 2. once the sink has acknowledged every point of that epoch (so the totals
//!    the snapshot says were written really are in the sink), it renames the
//!    file to `checkpoint.bin` and fsyncs the directory;
//! 3. only then may the source commit the snapshot's position (Kafka offsets).
//!
//! A restart restores the state, seeks the source to the saved position and
//! replays. The sink receives absolute totals, so replayed output overwrites
//! with the same values; for the rest of the run the writer also rewrites every
//! point a replayed event touches, even when its net change is zero (the
//! crashed process may have written an intermediate value after the snapshot).
//!
//! File format (little-endian): magic `EXPMONCP`, format version (u32),
//! config fingerprint (u64), epoch (u64), creation time (ms), the identity of
//! the source it was reading ([`SourceId`]: kind, name, group, and for a
//! regular file its size and the hash of its first bytes), then sections
//! (router, totals, one per shard), then an xxh3-64 checksum of everything
//! before it. A file with another magic, another version, a wrong checksum, a
//! truncation or another config's fingerprint is refused with a message saying
//! so; `--checkpoint-reset` sets it aside and starts fresh on purpose. The
//! caller refuses a snapshot whose source the new run's does not continue
//! ([`crate::source::Source::continues`]): its position means nothing there.

mod writer;

pub use writer::{CheckpointOptions, CheckpointWriteError, Checkpointer, ShardPart, Written};

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::aggregate::TotalRecord;
use crate::codec::{Dec, Enc};
use crate::config::Config;
use crate::names::Names;
use crate::source::{FileMark, Offsets, SourceId, SourceKind};

/// Why a checkpoint directory or its checkpoint cannot be used (writing one
/// fails with a [`CheckpointWriteError`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("checkpoint {path} is unusable: {why} (use --checkpoint-reset to set it aside and start fresh)")]
    Unusable { path: String, why: Unusable },
    #[error("cannot open {path}: {error}")]
    OpenLock { path: String, error: std::io::Error },
    #[error("checkpoint directory {dir} is in use by another expmon run")]
    InUse { dir: String },
    #[error("cannot lock {path}: {error}")]
    Lock { path: String, error: std::io::Error },
}

/// What is wrong with a checkpoint file's contents.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    #[error("not an expmon checkpoint")]
    NotACheckpoint,
    #[error("format version {0} is newer than this build's {VERSION}")]
    Newer(u32),
    #[error("format version {0} is older than this build reads ({VERSION})")]
    Older(u32),
    #[error("checksum mismatch (corrupt or truncated)")]
    Checksum,
    #[error("it was written under other engine settings (dc, allowed_lateness or session_gap)")]
    OtherSettings,
    #[error(transparent)]
    Bytes(#[from] crate::codec::DecodeError),
    #[error("unknown source kind {0}")]
    SourceKind(u8),
    /// `.0` names the text: "a name", "the source name".
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("experiments section: {0}")]
    Experiments(serde_json::Error),
    #[error("trailing bytes")]
    TrailingBytes,
}

pub const MAGIC: &[u8; 8] = b"EXPMONCP";
/// 3: the source identity after the creation time; a session's event cells
/// hold device ids in 12 bits and login ids in 4 (they were a byte each).
/// 4: sessions carry the values of their events; totals are `i128`; series
/// keys have a 4-bit kind (the value metrics).
pub const VERSION: u32 = 4;
pub const FILE: &str = "checkpoint.bin";

/// The router's part: watermark, per-partition clocks, names, position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterState {
    pub watermark: i64,
    pub max_ts: Option<i64>,
    /// `(max ts, counts)` per input partition.
    pub clocks: Vec<(Option<i64>, bool)>,
    pub positions: Offsets,
    /// Interned mp, device and login names, in id order.
    pub names: [Vec<String>; 3],
}

impl RouterState {
    pub fn encode(&self, e: &mut Enc) {
        e.i64(self.watermark);
        e.opt_i64(self.max_ts);
        e.u64(self.clocks.len() as u64);
        for &(m, counts) in &self.clocks {
            e.opt_i64(m);
            e.u8(counts as u8);
        }
        e.u64(self.positions.len() as u64);
        for &(p, o) in &self.positions {
            e.u32(p as u32);
            e.i64(o);
        }
        for table in &self.names {
            e.u64(table.len() as u64);
            for n in table {
                e.bytes(n.as_bytes());
            }
        }
    }

    pub fn decode(d: &mut Dec<'_>) -> Result<RouterState, Unusable> {
        let mut r = RouterState { watermark: d.i64()?, max_ts: d.opt_i64()?, ..RouterState::default() };
        for _ in 0..d.count(10)? {
            let m = d.opt_i64()?;
            r.clocks.push((m, d.u8()? != 0));
        }
        for _ in 0..d.count(12)? {
            r.positions.push((d.u32()? as i32, d.i64()?));
        }
        for table in r.names.iter_mut() {
            for _ in 0..d.count(4)? {
                let b = d.bytes()?;
                table.push(String::from_utf8(b.to_vec()).map_err(|_| Unusable::NotUtf8("a name"))?);
            }
        }
        Ok(r)
    }

    /// The names tables, for building the catalog of the restored run.
    pub fn names(&self) -> Names {
        Names::from_lists(&self.names)
    }
}

pub fn encode_totals(totals: &[TotalRecord], e: &mut Enc) {
    e.u64(totals.len() as u64);
    for &(k, m, t, w) in totals {
        e.u64(k);
        e.i64(m);
        e.i128(t);
        e.opt_i64(w);
    }
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Snapshot {
    pub epoch: u64,
    pub created_ms: i64,
    /// What the run that wrote it was reading.
    pub source: SourceId,
    /// The experiments of the run that wrote it, by index (reloads included):
    /// the restored state refers to these indices.
    pub defs: Vec<crate::config::ExperimentDef>,
    pub router: RouterState,
    pub totals: Vec<TotalRecord>,
    /// One encoded `SessionTable` per shard of the run that wrote it.
    pub shards: Vec<Vec<u8>>,
}

/// What the engine settings a checkpoint belongs to hash to: state kept under
/// other watermark rules or another `dc` is meaningless. (Experiments may
/// differ: the checkpoint carries its own, and the file's are applied to them
/// as a reload.)
pub fn fingerprint(config: &Config) -> u64 {
    let e = &config.engine;
    let text = format!("{}|{}|{}", e.dc, e.allowed_lateness_ms, e.session_gap_ms);
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// The experiments section: the catalog's definitions as JSON.
pub fn encode_defs(defs: &[crate::config::ExperimentDef], e: &mut Enc) {
    e.bytes(&serde_json::to_vec(defs).expect("definitions serialize"));
}

/// Writes `sections` as `DIR/checkpoint.bin.tmp`, fsynced; returns its path.
pub fn write_tmp(
    dir: &Path,
    fingerprint: u64,
    epoch: u64,
    created_ms: i64,
    source: &SourceId,
    sections: &[&[u8]],
) -> std::io::Result<PathBuf> {
    let mut head = Enc::default();
    head.buf.extend_from_slice(MAGIC);
    head.u32(VERSION);
    head.u64(fingerprint);
    head.u64(epoch);
    head.i64(created_ms);
    encode_source(source, &mut head);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&head.buf);
    for s in sections {
        hasher.update(s);
    }
    let path = dir.join(format!("{FILE}.tmp"));
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
    f.write_all(&head.buf)?;
    for s in sections {
        f.write_all(s)?;
    }
    f.write_all(&hasher.digest().to_le_bytes())?;
    let f = f.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok(path)
}

fn encode_source(s: &SourceId, e: &mut Enc) {
    e.u8(s.kind.code());
    e.bytes(s.name.as_bytes());
    e.bytes(s.group.as_bytes());
    e.u8(s.file.is_some() as u8);
    let m = s.file.unwrap_or(FileMark { len: 0, head_len: 0, head_hash: 0 });
    e.u64(m.len);
    e.u32(m.head_len);
    e.u64(m.head_hash);
}

fn decode_source(d: &mut Dec<'_>) -> Result<SourceId, Unusable> {
    let code = d.u8()?;
    let kind = SourceKind::from_code(code).ok_or(Unusable::SourceKind(code))?;
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| Unusable::NotUtf8("the source name"));
    let (name, group) = (text(d.bytes()?)?, text(d.bytes()?)?);
    let has_file = d.u8()? != 0;
    let m = FileMark { len: d.u64()?, head_len: d.u32()?, head_hash: d.u64()? };
    Ok(SourceId { kind, name, group, file: has_file.then_some(m) })
}

/// Makes a written temp file the checkpoint: rename, then fsync the folder.
pub fn publish(dir: &Path, tmp: &Path) -> std::io::Result<()> {
    std::fs::rename(tmp, dir.join(FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Loads `DIR/checkpoint.bin`: `Ok(None)` if there is none; `Err` with a
/// complete message if it cannot be used.
pub fn load(dir: &Path, fingerprint: u64) -> Result<Option<Snapshot>, CheckpointError> {
    let path = dir.join(FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(CheckpointError::Read { path: path.display().to_string(), error }),
    };
    let bad = |why: Unusable| CheckpointError::Unusable { path: path.display().to_string(), why };
    if data.len() < MAGIC.len() + 4 + 8 || &data[..8] != MAGIC {
        return Err(bad(Unusable::NotACheckpoint));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if version > VERSION {
        return Err(bad(Unusable::Newer(version)));
    }
    if version < VERSION {
        return Err(bad(Unusable::Older(version)));
    }
    let (body, sum) = data.split_at(data.len() - 8);
    if xxhash_rust::xxh3::xxh3_64(body) != u64::from_le_bytes(sum.try_into().expect("8 bytes")) {
        return Err(bad(Unusable::Checksum));
    }
    let mut d = Dec::new(&body[12..]);
    let decoded = (|| -> Result<Snapshot, Unusable> {
        let fp = d.u64()?;
        if fp != fingerprint {
            return Err(Unusable::OtherSettings);
        }
        let (epoch, created_ms) = (d.u64()?, d.i64()?);
        let source = decode_source(&mut d)?;
        let defs = serde_json::from_slice(d.bytes()?).map_err(Unusable::Experiments)?;
        let router = RouterState::decode(&mut d)?;
        let mut totals = Vec::new();
        for _ in 0..d.count(41)? {
            totals.push((d.u64()?, d.i64()?, d.i128()?, d.opt_i64()?));
        }
        let mut shards = Vec::new();
        for _ in 0..d.count(4)? {
            shards.push(d.bytes()?.to_vec());
        }
        if !d.is_done() {
            return Err(Unusable::TrailingBytes);
        }
        Ok(Snapshot { epoch, created_ms, source, defs, router, totals, shards })
    })();
    decoded.map(Some).map_err(bad)
}

/// Holds `DIR/lock` locked for as long as the returned file lives: two runs
/// on one checkpoint directory would overwrite each other's checkpoints (and
/// their file sink's lines), so the second is refused. The lock is the
/// kernel's (`flock`): a killed run releases it.
pub fn lock_dir(dir: &Path) -> Result<std::fs::File, CheckpointError> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| CheckpointError::OpenLock { path: path.display().to_string(), error })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(CheckpointError::InUse { dir: dir.display().to_string() }),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(CheckpointError::Lock { path: path.display().to_string(), error })
        }
    }
}

/// `--checkpoint-reset`: moves an existing checkpoint aside (never deletes it).
pub fn set_aside(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    let path = dir.join(FILE);
    if !path.exists() {
        return Ok(None);
    }
    let aside = dir.join(format!("{FILE}.discarded-{}", crate::clock::now_ms()));
    std::fs::rename(&path, &aside)?;
    Ok(Some(aside))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> RouterState {
        RouterState {
            watermark: 5,
            max_ts: Some(9),
            clocks: vec![(Some(9), true), (None, false)],
            positions: vec![(0, 17), (3, 4)],
            names: [vec!["home".into()], vec!["desktop".into(), "mobile".into()], vec![]],
        }
    }

    fn source() -> SourceId {
        let file = Some(FileMark { len: 52_000, head_len: 4096, head_hash: 0x1234 });
        SourceId { kind: SourceKind::File, name: "/data/a.jsonl".into(), group: String::new(), file }
    }

    fn write(dir: &Path, fp: u64) -> PathBuf {
        let mut r = Enc::default();
        encode_defs(&[], &mut r);
        state().encode(&mut r);
        let mut t = Enc::default();
        encode_totals(&[(1, 60_000, 3, Some(2))], &mut t);
        let mut shards = Enc::default();
        shards.u64(1);
        shards.bytes(&[1, 2, 3]);
        let tmp = write_tmp(dir, fp, 7, 1000, &source(), &[&r.buf, &t.buf, &shards.buf]).unwrap();
        publish(dir, &tmp).unwrap();
        dir.join(FILE)
    }

    #[test]
    fn round_trips_and_refuses_damage_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), 1).unwrap().is_none());
        let path = write(dir.path(), 42);
        let s = load(dir.path(), 42).unwrap().unwrap();
        assert_eq!((s.epoch, s.created_ms, s.router.clone(), s.source.clone()), (7, 1000, state(), source()));
        assert_eq!(s.totals, vec![(1, 60_000, 3, Some(2))]);
        assert_eq!(s.shards, vec![vec![1, 2, 3]]);

        let e = load(dir.path(), 43).unwrap_err().to_string();
        assert!(e.contains("other engine settings") && e.contains("--checkpoint-reset"), "{e}");

        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..good.len() - 5]).unwrap();
        assert!(load(dir.path(), 42).unwrap_err().to_string().contains("checksum"));
        let mut flipped = good.clone();
        flipped[40] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(load(dir.path(), 42).unwrap_err().to_string().contains("checksum"));
        let mut newer = good.clone();
        newer[8] = 9;
        std::fs::write(&path, &newer).unwrap();
        assert!(load(dir.path(), 42).unwrap_err().to_string().contains("newer"));
        // A checkpoint of the format before source identities (version 2).
        let mut older = good.clone();
        older[8] = 2;
        std::fs::write(&path, &older).unwrap();
        let e = load(dir.path(), 42).unwrap_err().to_string();
        assert!(e.contains("older") && e.contains("--checkpoint-reset") && !e.contains('\n'), "{e}");
        std::fs::write(&path, b"hello").unwrap();
        assert!(load(dir.path(), 42).unwrap_err().to_string().contains("not an expmon checkpoint"));

        let aside = set_aside(dir.path()).unwrap().unwrap();
        assert!(aside.exists() && !path.exists());
        assert!(load(dir.path(), 42).unwrap().is_none());
    }
}
