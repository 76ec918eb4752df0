//! The writer stage's side of checkpointing: it lays out each snapshot from
//! the parts the stages hand it (the router's state, the merged totals, every
//! shard's sessions), writes it as a temporary file, and publishes it only
//! once the sink has acknowledged every flush the snapshot covers. The file
//! format itself (sections, header, checksum) is [`super::write_tmp`]'s and
//! [`super::load`]'s, next door.

use crossbeam_channel::Receiver;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{encode_defs, encode_totals, RouterState};
use crate::aggregate::Totals;
use crate::codec::Enc;
use crate::config::ExperimentDef;
use crate::source::{Offsets, SourceId};

/// Where and how often to checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    pub dir: PathBuf,
    pub interval: Duration,
    /// Of the configuration (see [`super::fingerprint`]).
    pub fingerprint: u64,
    /// What this run reads, recorded in each checkpoint.
    pub source: SourceId,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointWriteError {
    #[error("writing a checkpoint in {dir}: {error}")]
    Write { dir: String, error: std::io::Error },
    #[error("publishing a checkpoint in {dir}: {error}")]
    Publish { dir: String, error: std::io::Error },
    #[error("checkpoint: the {0} part of the snapshot is missing")]
    PartMissing(&'static str),
}

/// One shard's part of a snapshot: its encoded sessions and how long the
/// shard paused to encode them.
pub struct ShardPart<'a> {
    pub shard: usize,
    pub sessions: Option<&'a (Vec<u8>, Duration)>,
}

/// What writing one snapshot cost.
pub struct Written {
    pub bytes: u64,
    /// The longest pause of a shard encoding its sessions.
    pub pause: Duration,
}

pub struct Checkpointer {
    options: Option<CheckpointOptions>,
    router_parts: Receiver<RouterState>,
    /// Written, waiting for the sink to acknowledge flush number `.0`.
    pending: Option<(u64, PathBuf, Offsets)>,
    /// A checkpoint is being written or awaits acknowledgement (the router
    /// starts no other meanwhile).
    in_flight: Arc<AtomicBool>,
    /// Positions of the last published checkpoint, for the source to commit.
    committable: Arc<Mutex<Option<Offsets>>>,
}

impl Checkpointer {
    /// `router_parts` brings the router's part of each snapshot.
    pub fn new(options: Option<CheckpointOptions>, router_parts: Receiver<RouterState>) -> Checkpointer {
        Checkpointer {
            options,
            router_parts,
            pending: None,
            in_flight: Arc::new(AtomicBool::new(false)),
            committable: Arc::new(Mutex::new(None)),
        }
    }

    /// Set while a checkpoint is written or awaits acknowledgement.
    pub fn in_flight(&self) -> Arc<AtomicBool> {
        self.in_flight.clone()
    }

    /// Where published positions appear, for the source to commit.
    pub fn committable(&self) -> Arc<Mutex<Option<Offsets>>> {
        self.committable.clone()
    }

    /// Writes the snapshot of `epoch`, just flushed as flush number
    /// `flush_no`; `None` when checkpoints are off.
    pub fn write(
        &mut self,
        shards: &[ShardPart<'_>],
        defs: &[ExperimentDef],
        totals: &Totals,
        epoch: u64,
        flush_no: u64,
    ) -> Result<Option<Written>, CheckpointWriteError> {
        let Some(opts) = &self.options else { return Ok(None) };
        let router = self.router_parts.recv().map_err(|_| CheckpointWriteError::PartMissing("router"))?;
        let mut r = Enc::default();
        encode_defs(defs, &mut r);
        router.encode(&mut r);
        let mut t = Enc::default();
        encode_totals(&totals.export(), &mut t);
        let mut parts: Vec<&ShardPart<'_>> = shards.iter().collect();
        parts.sort_by_key(|p| p.shard);
        let mut head = Enc::default();
        head.u64(parts.len() as u64);
        let mut sections: Vec<&[u8]> = vec![&r.buf, &t.buf, &head.buf];
        let mut lens = Vec::new();
        let mut pause = Duration::ZERO;
        for p in &parts {
            let (bytes, took) = p.sessions.ok_or(CheckpointWriteError::PartMissing("shard"))?;
            pause = pause.max(*took);
            let mut len = Enc::default();
            len.u32(bytes.len() as u32);
            lens.push((len, bytes));
        }
        for (len, bytes) in &lens {
            sections.push(&len.buf);
            sections.push(bytes);
        }
        let tmp = super::write_tmp(&opts.dir, opts.fingerprint, epoch, crate::clock::now_ms(), &opts.source, &sections)
            .map_err(|error| CheckpointWriteError::Write { dir: opts.dir.display().to_string(), error })?;
        crate::failures::failpoint("checkpoint.written");
        let bytes = sections.iter().map(|s| s.len() as u64).sum();
        self.pending = Some((flush_no, tmp, router.positions));
        Ok(Some(Written { bytes, pause }))
    }

    /// Publishes the pending snapshot once flush `acked_flushes` covers it;
    /// `true` if it did.
    pub fn publish_if_acknowledged(&mut self, acked_flushes: u64) -> Result<bool, CheckpointWriteError> {
        let (Some(opts), Some((flush_no, _, _))) = (&self.options, &self.pending) else { return Ok(false) };
        if acked_flushes < *flush_no {
            return Ok(false);
        }
        let (_, tmp, positions) = self.pending.take().expect("checked above");
        super::publish(&opts.dir, &tmp)
            .map_err(|error| CheckpointWriteError::Publish { dir: opts.dir.display().to_string(), error })?;
        crate::failures::failpoint("checkpoint.published");
        *crate::failures::lock(&self.committable) = Some(positions);
        self.in_flight.store(false, Relaxed);
        Ok(true)
    }
}
