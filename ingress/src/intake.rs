//! The intake journal: every upstream attempt is on disk before the provider sees it, so an
//! ingress killed mid-request (`kill -9`, OOM, a node lost with its disk kept) still leaves a
//! usage event for each attempt a provider may have billed.
//!
//! Before each upstream call the request path appends an **intake** record: the attempt's
//! usage event as it would read if the ingress died now (`status: interrupted`, its input
//! estimated, `token_source: estimated`, Avro-encoded like any event). When the attempt's real
//! event is in the usage spool, the publisher task drops the attempt's [`Hold`], which appends
//! a **done** record naming the intake and acknowledges both. The next start reads every
//! record from the journal's head: each intake without its done record is an attempt the
//! previous process never finished, and its interrupted event goes to the usage spool (and
//! from there to Kafka) before anything else.
//!
//! The journal is a [`Spool`] of its own (`<spool-dir>/intake`): the same segmented,
//! CRC-checked, bounded log with the same durability (one `write` per record, no fsync: a
//! killed process loses nothing that reached the kernel), its head the lowest record not yet
//! paired. A long stream holds the head back and the records after it stay on disk until it
//! ends, so the journal's bound (`--intake-max-bytes`) is what a gateway's longest request
//! times its request rate needs; an attempt that finds the journal full is served anyway,
//! counted in `tollgate_ingress_intake_unjournaled_total`.
//!
//! One narrow window is left: a kill between the real event's append to the usage spool and
//! the done record's append (two consecutive writes of one thread) sends both the real event
//! and the interrupted one under the same event id; the meter's table keeps one row per id.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::usage::UsageEvent;
use tracing::{error, warn};

use crate::metrics;
use crate::spool::{Spool, SpoolOptions};

/// Directory of the journal inside the usage spool's directory.
pub const DIR: &str = "intake";
/// Key of an intake record (its payload is the interrupted event).
const INTAKE: &[u8] = b"i";
/// Key of a done record (its payload is the intake's sequence number, u64 little-endian).
const DONE: &[u8] = b"d";
/// Journal segments are small so that disk is given back soon after the oldest open attempt ends.
const SEGMENT_BYTES: u64 = 4 << 20;

pub struct Journal {
    spool: Mutex<Spool>,
    codec: AvroCodec,
    /// Intakes are refused past this many bytes on disk; the rest of the bound is kept for
    /// the done records of the attempts in flight (~30 bytes each beside intakes of ~500).
    intake_bytes: u64,
}

/// An attempt's open intake; dropping it appends the done record. The publisher task drops it
/// once the attempt's event is in the usage spool (or was dropped and counted there).
pub struct Hold {
    /// `None` once completed (or, in tests, abandoned as a crash would).
    journal: Option<Arc<Journal>>,
    seq: u64,
}

/// Intakes an earlier run left open, read back when the journal is opened.
pub struct Leftover {
    pub events: Vec<UsageEvent>,
    seqs: Vec<u64>,
    /// Open intakes whose payload did not decode (counted as dropped).
    pub undecodable: u64,
}

impl Journal {
    /// Opens the journal in `dir` and reads back the intakes an earlier run never finished.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<(Arc<Journal>, Leftover)> {
        let opts = SpoolOptions { max_bytes, segment_bytes: SEGMENT_BYTES };
        let (mut spool, _) = Spool::open(dir, opts)?;
        let codec = UsageEvent::codec().map_err(std::io::Error::other)?;
        let mut open = std::collections::BTreeMap::new();
        let mut done = Vec::new();
        while let Some(rec) = spool.read_next()? {
            match rec.key.as_slice() {
                INTAKE => {
                    open.insert(rec.seq, rec.payload);
                }
                DONE => {
                    done.push(rec.seq);
                    if let Ok(bytes) = <[u8; 8]>::try_from(rec.payload.as_slice()) {
                        // Its intake is settled too (a no-op when it lies below the head).
                        let intake = u64::from_le_bytes(bytes);
                        open.remove(&intake);
                        done.push(intake);
                    }
                }
                other => warn!(key = ?other, seq = rec.seq, "intake journal record of unknown kind skipped"),
            }
        }
        // Done records and their intakes are settled now; the open intakes once the caller
        // has put their events in the usage spool (`settle_leftover`).
        for seq in done {
            spool.ack(seq)?;
        }
        let mut left = Leftover { events: Vec::with_capacity(open.len()), seqs: Vec::new(), undecodable: 0 };
        for (seq, payload) in open {
            match codec.decode::<UsageEvent>(&payload) {
                Ok(ev) => left.events.push(ev),
                Err(e) => {
                    error!(seq, error = %e, "an interrupted attempt's intake record does not decode; its usage is lost");
                    left.undecodable += 1;
                }
            }
            left.seqs.push(seq);
        }
        let journal = Journal { spool: Mutex::new(spool), codec, intake_bytes: max_bytes - max_bytes / 8 };
        Ok((Arc::new(journal), left))
    }

    /// Marks the intakes of `left` as recorded (their events are in the usage spool).
    pub fn settle_leftover(&self, left: &Leftover) {
        let mut spool = self.spool.lock().unwrap_or_else(PoisonError::into_inner);
        for seq in &left.seqs {
            if let Err(e) = spool.ack(*seq) {
                warn!(error = %e, "intake journal not trimmed");
            }
        }
        if let Err(e) = spool.persist_head() {
            warn!(error = %e, "intake journal head not persisted");
        }
    }

    /// Writes the attempt's interrupted event to the journal before its upstream call. `None`
    /// when it could not be written (the attempt is served anyway; counted and logged).
    pub fn begin(self: &Arc<Self>, interrupted: &UsageEvent) -> Option<Hold> {
        let payload = match self.codec.encode(interrupted) {
            Ok(p) => p,
            Err(e) => {
                error!(event_id = %interrupted.event_id, error = %e, "intake record not encoded");
                metrics::intake_unjournaled("encode");
                return None;
            }
        };
        let appended = {
            let mut spool = self.spool.lock().unwrap_or_else(PoisonError::into_inner);
            let used = spool.disk_bytes();
            if used + payload.len() as u64 > self.intake_bytes {
                Err(crate::spool::AppendError::Full { used, max: self.intake_bytes, needed: payload.len() as u64 })
            } else {
                spool.append(INTAKE, &payload)
            }
        };
        match appended {
            Ok(seq) => Some(Hold { journal: Some(self.clone()), seq }),
            Err(e) => {
                let reason = match e {
                    crate::spool::AppendError::Full { .. } => "full",
                    crate::spool::AppendError::TooLarge(_) => "too_large",
                    crate::spool::AppendError::Io(_) => "io",
                };
                warn!(event_id = %interrupted.event_id, error = %e, "attempt not journaled before its upstream call");
                metrics::intake_unjournaled(reason);
                None
            }
        }
    }

    fn done(&self, seq: u64) {
        let mut spool = self.spool.lock().unwrap_or_else(PoisonError::into_inner);
        let paired = spool.append(DONE, &seq.to_le_bytes()).and_then(|d| Ok(spool.ack(d)?));
        if let Err(e) = paired {
            // Acknowledged all the same, so the journal cannot fill up with finished attempts;
            // should a crash come before the head passes it, the next start records an
            // interrupted event under the real event's id, and the meter keeps one row per id.
            warn!(seq, error = %e, "intake journal: done record not written");
        }
        if let Err(e) = spool.ack(seq) {
            warn!(error = %e, "intake journal not trimmed");
        }
    }

    /// Persists the head (periodically, from the publisher task) and reports the journal's size.
    pub fn housekeeping(&self) {
        let mut spool = self.spool.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = spool.persist_head() {
            warn!(error = %e, "intake journal head not persisted");
        }
        metrics::intake_depth(spool.disk_bytes());
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(j) = self.journal.take() {
            j.done(self.seq);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tollgate_schemas::usage::{Status, TokenSource};

    fn event(id: &str) -> UsageEvent {
        UsageEvent {
            status: Status::Interrupted,
            input_tokens: 10,
            reference_input_tokens: Some(10),
            token_source: TokenSource::Estimated,
            cost_nanos: 5,
            ..UsageEvent::example(id.into(), None, 1)
        }
    }

    #[test]
    fn open_intakes_come_back_and_finished_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, left) = Journal::open(dir.path(), 1 << 20).unwrap();
            assert!(left.events.is_empty());
            let a = j.begin(&event("a")).unwrap();
            let b = j.begin(&event("b")).unwrap();
            let c = j.begin(&event("c")).unwrap();
            drop(b);
            // `a` and `c` never finish: the process "dies" with them open.
            for mut h in [a, c] {
                drop(h.journal.take());
            }
            j.housekeeping();
        }
        let (j, left) = Journal::open(dir.path(), 1 << 20).unwrap();
        let ids: Vec<&str> = left.events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        j.settle_leftover(&left);
        drop(j);
        let (_, left) = Journal::open(dir.path(), 1 << 20).unwrap();
        assert!(left.events.is_empty(), "settled intakes are not recovered twice");
    }

    #[test]
    fn a_full_journal_refuses_and_frees_space_as_attempts_end() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), 4096).unwrap();
        let mut held = Vec::new();
        while let Some(h) = j.begin(&event("x")) {
            held.push(h);
            assert!(held.len() < 1000, "the bound holds");
        }
        held.clear();
        assert!(j.begin(&event("y")).is_some(), "space comes back once attempts end");
    }
}
