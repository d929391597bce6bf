//! Write-ahead spool for usage events: a bounded, segmented, append-only log on local disk.
//!
//! Every usage event is appended here before it is produced to Kafka, and stays until Kafka
//! acknowledges it, so a broker outage or a crash of the ingress does not lose it.
//!
//! **Layout.** `dir/` holds segment files named after the sequence number of their first
//! record (`00000000000000000042.seg`), a `head` file with the lowest sequence number not yet
//! acknowledged, and a `lock` file that keeps a second process out of the directory. A record
//! is
//!
//! ```text
//! len: u32 LE | crc32(seq..payload): u32 LE | seq: u64 LE | key_len: u32 LE | key | payload
//! ```
//!
//! where `len` counts the bytes after the CRC. Sequence numbers increase by one per record.
//! A segment is closed once it reaches `segment_bytes`; a segment whose records all lie below
//! the head is deleted. The head is persisted by write-to-temp + rename when the caller asks
//! (periodically and at shutdown), so after a crash at most the records acknowledged since
//! the last persist are sent again: a duplicate, which the consumer collapses on event id.
//!
//! **Durability.** Records are written with one plain `write` each and never fsynced: a
//! `kill -9` of the process loses nothing that reached the kernel's page cache; a power
//! loss may lose the last seconds. Opening the spool recovers from either: a torn or
//! CRC-failing tail record is cut off, and every record from the head onwards is read again.
//!
//! **Bound.** The segment files together never exceed `max_bytes`; an append past it is
//! refused and the caller counts and logs the drop.
//!
//! **Why hand-written.** The crates that offer a disk-backed queue were considered: `yaque`
//! (0.6) hands out one receive guard at a time (it borrows the receiver mutably), so
//! thousands of records in flight to Kafka, acknowledged out of order and rewound to the
//! lowest unacknowledged one, cannot be expressed, and it has no bound on disk use. Raft-style
//! WAL crates (`okaywal`, `raft-engine`) are built for checkpoints of a state machine, not for
//! acking a queue by sequence number. What is needed here is ~400 lines with one invariant
//! (the head is the lowest unacknowledged sequence), so it is written out and tested below.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

/// Bytes before the key: length, CRC, sequence number, key length.
const HEADER: usize = 4 + 4 + 8 + 4;
/// Bytes after the length and CRC that are not key or payload: sequence number, key length.
const FIXED_BODY: usize = 8 + 4;
/// Largest record accepted (and believed when recovering); usage events are ~1 KiB.
pub const MAX_RECORD_BYTES: usize = 16 << 20;
const SEGMENT_SUFFIX: &str = ".seg";
const HEAD_FILE: &str = "head";
const HEAD_TEMP: &str = "head.tmp";
const LOCK_FILE: &str = "lock";
/// Records appended and not yet read kept in memory as well, so that while Kafka keeps up
/// `read_next` hands them out without reading the file back (two `pread`s and a CRC check per
/// record). Past this many, records are read from the file as before.
const RECENT_MAX: usize = 4096;

#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// Most bytes the segment files may hold together.
    pub max_bytes: u64,
    /// A segment is closed once it holds this many bytes (capped at a quarter of `max_bytes`).
    pub segment_bytes: u64,
}

impl SpoolOptions {
    pub fn new(max_bytes: u64) -> Self {
        Self { max_bytes, segment_bytes: 64 << 20 }
    }

    fn effective_segment_bytes(&self) -> u64 {
        self.segment_bytes.min(self.max_bytes / 4).max(1024)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The bound is reached; retrying helps once Kafka has acknowledged older records.
    #[error("spool is full: {used} of {max} bytes in use, record needs {needed}")]
    Full { used: u64, max: u64, needed: u64 },
    /// The record can never fit; retrying does not help.
    #[error("record of {0} bytes is larger than the spool accepts")]
    TooLarge(usize),
    /// The disk refused the write (the spool rolled the partial write back).
    #[error("spool write failed: {0}")]
    Io(#[from] io::Error),
}

/// One record read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// What opening the spool found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records from the head onwards: left by an earlier run, to be sent again.
    pub records: u64,
    /// Bytes of a torn or corrupt tail cut off (a crash in the middle of a write).
    pub truncated_bytes: u64,
    /// Records lost to corruption inside the log (not at its tail).
    pub lost_records: u64,
}

/// Where a record starts: its segment (by first sequence number) and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    segment: u64,
    offset: u64,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    opts: SpoolOptions,
    /// First sequence number → segment; the last one is the one appended to.
    segments: BTreeMap<u64, Segment>,
    writer: File,
    /// Set when a failed write could not be rolled back: further appends are refused.
    broken: bool,
    next_seq: u64,
    total_bytes: u64,
    /// Lowest sequence number not acknowledged.
    head: u64,
    persisted_head: Option<u64>,
    /// Acknowledged sequence numbers above the head.
    acked: BTreeSet<u64>,
    /// Ranges `[start, end)` of sequence numbers lost to corruption; the head skips them.
    gaps: BTreeMap<u64, u64>,
    /// Records handed out by `read_next` and not yet acknowledged, with their positions.
    handed: BTreeMap<u64, Pos>,
    /// The next record `read_next` returns.
    cursor: Pos,
    reader: Option<(u64, File)>,
    scratch: Vec<u8>,
    /// Copies of records appended since the cursor passed them, in log order, with their
    /// positions and on-disk lengths (see [`RECENT_MAX`]).
    recent: VecDeque<(Pos, u64, Record)>,
    _lock: File,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn encode(seq: u64, key: &[u8], payload: &[u8], out: &mut Vec<u8>) -> Result<(), AppendError> {
    let body = FIXED_BODY + key.len() + payload.len();
    if body > MAX_RECORD_BYTES {
        return Err(AppendError::TooLarge(body + 8));
    }
    let key_len = u32::try_from(key.len()).map_err(|_| AppendError::TooLarge(body + 8))?;
    let len = u32::try_from(body).map_err(|_| AppendError::TooLarge(body + 8))?;
    out.clear();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes one record from `bytes` (which start at a record); `None` if torn or corrupt.
/// Returns the record and its length on disk.
fn decode(bytes: &[u8]) -> Option<(Record, usize)> {
    if bytes.len() < 8 {
        return None;
    }
    let len = u32_at(bytes, 0) as usize;
    if !(FIXED_BODY..=MAX_RECORD_BYTES).contains(&len) || bytes.len() < 8 + len {
        return None;
    }
    let body = &bytes[8..8 + len];
    if crc32fast::hash(body) != u32_at(bytes, 4) {
        return None;
    }
    let seq = u64_at(body, 0);
    let key_len = u32_at(body, 8) as usize;
    if FIXED_BODY + key_len > len {
        return None;
    }
    let key = body[FIXED_BODY..FIXED_BODY + key_len].to_vec();
    let payload = body[FIXED_BODY + key_len..].to_vec();
    Some((Record { seq, key, payload }, 8 + len))
}

fn lock_dir(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("spool directory {} is in use by another process ({e})", dir.display()),
        )
    })?;
    Ok(file)
}

fn read_head(dir: &Path) -> Option<u64> {
    let text = fs::read_to_string(dir.join(HEAD_FILE)).ok()?;
    match text.trim().parse() {
        Ok(h) => Some(h),
        Err(_) => {
            warn!(dir = %dir.display(), "spool head file is unreadable; resending every record on disk");
            None
        }
    }
}

impl Spool {
    /// Opens (or creates) the spool in `dir` and recovers what an earlier run left there.
    pub fn open(dir: &Path, opts: SpoolOptions) -> io::Result<(Spool, Recovery)> {
        fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        let _ = fs::remove_file(dir.join(HEAD_TEMP));
        let mut firsts = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(first) = name.strip_suffix(SEGMENT_SUFFIX).and_then(|s| s.parse::<u64>().ok()) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let stored_head = read_head(dir);
        let mut recovery = Recovery::default();
        let mut segments = BTreeMap::new();
        let mut gaps = BTreeMap::new();
        // The sequence number the next record must carry.
        let mut expect: Option<u64> = None;
        let last_index = firsts.len().saturating_sub(1);
        for (i, first) in firsts.iter().copied().enumerate() {
            let path = dir.join(segment_name(first));
            let data = fs::read(&path)?;
            if let Some(e) = expect
                && first != e
            {
                if first < e {
                    // Overlaps what came before: the file cannot be trusted.
                    warn!(segment = %path.display(), "spool segment overlaps the previous one; removing it");
                    fs::remove_file(&path)?;
                    continue;
                }
                warn!(from = e, to = first, "spool records missing between segments");
                recovery.lost_records += first - e;
                gaps.insert(e, first);
            }
            let mut offset = 0usize;
            let mut seq = first;
            while offset < data.len() {
                match decode(&data[offset..]) {
                    Some((rec, n)) if rec.seq == seq => {
                        offset += n;
                        seq += 1;
                    }
                    _ => break,
                }
            }
            if offset < data.len() {
                let cut = (data.len() - offset) as u64;
                recovery.truncated_bytes += cut;
                if i == last_index {
                    warn!(segment = %path.display(), bytes = cut, "spool tail is torn (crash during a write); cutting it off");
                } else {
                    warn!(segment = %path.display(), bytes = cut, "spool segment is corrupt; cutting it off at the first bad record");
                }
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(offset as u64)?;
            }
            if offset == 0 && i != last_index {
                fs::remove_file(&path)?;
                expect = Some(seq);
                continue;
            }
            segments.insert(first, Segment { path, bytes: offset as u64 });
            expect = Some(seq);
        }
        let first_on_disk = segments.keys().next().copied();
        let end = expect.unwrap_or(0);
        // Without a head file every record on disk is unacknowledged.
        let mut head = stored_head.or(first_on_disk).unwrap_or(0);
        let next_seq = end.max(head);
        if let Some(first) = first_on_disk
            && head < first
        {
            head = first;
        }
        if segments.is_empty() || next_seq > end {
            // Nothing on disk, or the head is past it all: start a fresh segment at next_seq.
            let path = dir.join(segment_name(next_seq));
            File::create(&path)?;
            segments.insert(next_seq, Segment { path, bytes: 0 });
        }
        let (&active, active_seg) = segments.iter().next_back().ok_or_else(|| invalid("no segment".into()))?;
        let writer = OpenOptions::new().append(true).open(&active_seg.path)?;
        let total_bytes = segments.values().map(|s| s.bytes).sum();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            opts,
            segments,
            writer,
            broken: false,
            next_seq,
            total_bytes,
            head,
            persisted_head: stored_head,
            acked: BTreeSet::new(),
            gaps,
            handed: BTreeMap::new(),
            cursor: Pos { segment: active, offset: 0 },
            reader: None,
            scratch: Vec::new(),
            recent: VecDeque::new(),
            _lock: lock,
        };
        spool.skip_gaps();
        spool.cursor = spool.locate(spool.head)?;
        spool.delete_below_head();
        recovery.records = spool.pending_records();
        debug!(dir = %dir.display(), head = spool.head, next_seq, records = recovery.records, "spool opened");
        Ok((spool, recovery))
    }

    /// Position of record `seq` (or the end of the log if `seq` is not on disk yet).
    fn locate(&mut self, seq: u64) -> io::Result<Pos> {
        let Some((&segment, _)) = self.segments.range(..=seq).next_back() else {
            let first = self.segments.keys().next().copied().unwrap_or(seq);
            return Ok(Pos { segment: first, offset: 0 });
        };
        let mut pos = Pos { segment, offset: 0 };
        loop {
            let bytes = self.segments.get(&pos.segment).map_or(0, |s| s.bytes);
            if pos.offset >= bytes {
                return Ok(pos);
            }
            let (rec_seq, len) = self.peek_header(pos)?;
            if rec_seq >= seq {
                return Ok(pos);
            }
            pos.offset += len;
        }
    }

    fn reader_for(&mut self, segment: u64) -> io::Result<&File> {
        let stale = self.reader.as_ref().is_none_or(|(s, _)| *s != segment);
        if stale {
            let path = self
                .segments
                .get(&segment)
                .map(|s| s.path.clone())
                .ok_or_else(|| invalid(format!("spool segment {segment} is gone")))?;
            self.reader = Some((segment, File::open(path)?));
        }
        match &self.reader {
            Some((_, f)) => Ok(f),
            None => Err(invalid("no reader".into())),
        }
    }

    /// Sequence number and on-disk length of the record at `pos`.
    fn peek_header(&mut self, pos: Pos) -> io::Result<(u64, u64)> {
        let mut h = [0u8; HEADER];
        self.reader_for(pos.segment)?.read_exact_at(&mut h, pos.offset)?;
        Ok((u64_at(&h, 8), 8 + u64::from(u32_at(&h, 0))))
    }

    /// Appends one record; returns its sequence number.
    pub fn append(&mut self, key: &[u8], payload: &[u8]) -> Result<u64, AppendError> {
        if self.broken {
            return Err(AppendError::Io(io::Error::other("spool is broken after a failed write")));
        }
        let seq = self.next_seq;
        let mut buf = std::mem::take(&mut self.scratch);
        let result = self.append_encoded(seq, key, payload, &mut buf);
        self.scratch = buf;
        result
    }

    fn append_encoded(&mut self, seq: u64, key: &[u8], payload: &[u8], buf: &mut Vec<u8>) -> Result<u64, AppendError> {
        encode(seq, key, payload, buf)?;
        let needed = buf.len() as u64;
        if self.total_bytes + needed > self.opts.max_bytes {
            return Err(AppendError::Full { used: self.total_bytes, max: self.opts.max_bytes, needed });
        }
        let active = self.active();
        let active_bytes = self.segments.get(&active).map_or(0, |s| s.bytes);
        if active_bytes >= self.opts.effective_segment_bytes() {
            self.roll(seq)?;
        }
        let active = self.active();
        let at = Pos { segment: active, offset: self.segments.get(&active).map_or(0, |s| s.bytes) };
        if let Err(e) = self.writer.write_all(buf) {
            // Roll back a partial write so the log stays a sequence of whole records.
            let bytes = self.segments.get(&active).map_or(0, |s| s.bytes);
            if let Err(e2) = self.writer.set_len(bytes) {
                warn!(error = %e2, "spool could not roll back a failed write; refusing further appends");
                self.broken = true;
            }
            return Err(AppendError::Io(e));
        }
        if let Some(s) = self.segments.get_mut(&active) {
            s.bytes += needed;
        }
        self.total_bytes += needed;
        self.next_seq = seq + 1;
        if self.recent.len() < RECENT_MAX {
            self.recent.push_back((at, needed, Record { seq, key: key.to_vec(), payload: payload.to_vec() }));
        }
        Ok(seq)
    }

    fn active(&self) -> u64 {
        self.segments.keys().next_back().copied().unwrap_or(self.next_seq)
    }

    fn roll(&mut self, first_seq: u64) -> io::Result<()> {
        let path = self.dir.join(segment_name(first_seq));
        let writer = OpenOptions::new().create(true).append(true).open(&path)?;
        self.writer = writer;
        self.segments.insert(first_seq, Segment { path, bytes: 0 });
        debug!(first_seq, "spool segment opened");
        Ok(())
    }

    /// The next record after the cursor that is not acknowledged yet; `None` when caught up.
    pub fn read_next(&mut self) -> io::Result<Option<Record>> {
        loop {
            let bytes = self.segments.get(&self.cursor.segment).map_or(0, |s| s.bytes);
            if self.cursor.offset >= bytes {
                match self.segments.range(self.cursor.segment + 1..).next() {
                    Some((&next, _)) => {
                        self.cursor = Pos { segment: next, offset: 0 };
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            let pos = self.cursor;
            while self.recent.front().is_some_and(|(at, _, _)| *at < pos) {
                self.recent.pop_front();
            }
            let (rec, len) = match self.recent.front() {
                Some((at, _, _)) if *at == pos => match self.recent.pop_front() {
                    Some((_, len, rec)) => (rec, len),
                    None => continue,
                },
                _ => {
                    let (_, len) = self.peek_header(pos)?;
                    let len_usize = usize::try_from(len).map_err(|_| invalid("record length".into()))?;
                    let mut buf = vec![0u8; len_usize];
                    self.reader_for(pos.segment)?.read_exact_at(&mut buf, pos.offset)?;
                    let (rec, _) = decode(&buf)
                        .ok_or_else(|| invalid(format!("spool record at {}:{} is corrupt", pos.segment, pos.offset)))?;
                    (rec, len)
                }
            };
            self.cursor.offset += len;
            if rec.seq < self.head || self.acked.contains(&rec.seq) {
                continue;
            }
            self.handed.insert(rec.seq, pos);
            return Ok(Some(rec));
        }
    }

    /// Marks `seq` as delivered; the head moves past every acknowledged record at its front,
    /// and segments wholly below it are deleted.
    pub fn ack(&mut self, seq: u64) -> io::Result<()> {
        self.handed.remove(&seq);
        if seq < self.head || seq >= self.next_seq {
            return Ok(());
        }
        self.acked.insert(seq);
        let before = self.head;
        while self.acked.remove(&self.head) {
            self.head += 1;
            self.skip_gaps();
        }
        if self.head != before {
            self.delete_below_head();
        }
        Ok(())
    }

    fn skip_gaps(&mut self) {
        // Gaps are disjoint: only the one starting last at or before the head can hold it.
        while let Some(end) = self.gaps.range(..=self.head).next_back().map(|(_, e)| *e).filter(|e| *e > self.head) {
            self.head = end;
        }
        // Gaps wholly below the head are behind us.
        self.gaps.retain(|_, end| *end > self.head);
    }

    fn delete_below_head(&mut self) {
        loop {
            let mut keys = self.segments.keys();
            let (Some(&first), Some(&second)) = (keys.next(), keys.next()) else { return };
            if second > self.head {
                return;
            }
            if let Some(seg) = self.segments.remove(&first) {
                self.total_bytes -= seg.bytes;
                if self.reader.as_ref().is_some_and(|(s, _)| *s == first) {
                    self.reader = None;
                }
                if let Err(e) = fs::remove_file(&seg.path) {
                    warn!(segment = %seg.path.display(), error = %e, "spool segment not deleted");
                }
                debug!(first_seq = first, "spool segment deleted");
            }
        }
    }

    /// Moves the cursor back to the head: every unacknowledged record is read again, in order.
    pub fn rewind(&mut self) -> io::Result<()> {
        let pos = match self.handed.get(&self.head) {
            Some(p) => *p,
            None => self.locate(self.head)?,
        };
        self.handed.clear();
        self.cursor = pos;
        Ok(())
    }

    /// Writes the head to disk (temp file + rename) if it moved since the last time.
    pub fn persist_head(&mut self) -> io::Result<()> {
        if self.persisted_head == Some(self.head) {
            return Ok(());
        }
        let tmp = self.dir.join(HEAD_TEMP);
        fs::write(&tmp, format!("{}\n", self.head))?;
        fs::rename(&tmp, self.dir.join(HEAD_FILE))?;
        self.persisted_head = Some(self.head);
        Ok(())
    }

    /// Lowest sequence number not acknowledged.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records appended and not acknowledged.
    pub fn pending_records(&self) -> u64 {
        let lost: u64 =
            self.gaps.iter().map(|(s, e)| (*e).min(self.next_seq).saturating_sub((*s).max(self.head))).sum();
        (self.next_seq - self.head).saturating_sub(self.acked.len() as u64 + lost)
    }

    /// Bytes the segment files hold (acknowledged records stay until their segment goes).
    pub fn disk_bytes(&self) -> u64 {
        self.total_bytes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn opts(max_bytes: u64, segment_bytes: u64) -> SpoolOptions {
        SpoolOptions { max_bytes, segment_bytes }
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("event-{i}-{}", "x".repeat((i % 50) as usize)).into_bytes()
    }

    fn drain(spool: &mut Spool) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(r) = spool.read_next().unwrap() {
            out.push(r);
        }
        out
    }

    fn segment_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(SEGMENT_SUFFIX))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn appends_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, rec) = Spool::open(dir.path(), opts(1 << 20, 4096)).unwrap();
        assert_eq!(rec, Recovery::default());
        for i in 0..100 {
            assert_eq!(s.append(format!("k{i}").as_bytes(), &payload(i)).unwrap(), i);
        }
        let got = drain(&mut s);
        assert_eq!(got.len(), 100);
        for (i, r) in got.iter().enumerate() {
            let i = i as u64;
            assert_eq!(r, &Record { seq: i, key: format!("k{i}").into_bytes(), payload: payload(i) });
        }
        assert_eq!(s.pending_records(), 100);
        // Caught up; a later append is the next read.
        s.append(b"k", b"late").unwrap();
        assert_eq!(s.read_next().unwrap().unwrap().payload, b"late");
        assert!(s.read_next().unwrap().is_none());
        assert!(segment_files(dir.path()).len() > 1, "4 KiB segments rolled");
    }

    /// Records handed out from memory and from the file are the same records: past the
    /// in-memory bound, across segment rolls, after a rewind and interleaved with appends.
    #[test]
    fn reads_from_memory_and_from_disk_agree() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), opts(64 << 20, 64 << 10)).unwrap();
        let n = RECENT_MAX as u64 + 500;
        let expect = |i: u64| Record { seq: i, key: format!("k{i}").into_bytes(), payload: payload(i) };
        for i in 0..n {
            s.append(format!("k{i}").as_bytes(), &payload(i)).unwrap();
        }
        // The first RECENT_MAX come from memory, the rest from the file.
        let first = drain(&mut s);
        assert_eq!(first, (0..n).map(expect).collect::<Vec<_>>());
        for r in &first[..10] {
            s.ack(r.seq).unwrap();
        }
        s.rewind().unwrap();
        // Appends while re-reading from the file: the new ones are met in memory, in order.
        let mut again = Vec::new();
        for i in n..n + 20 {
            again.push(s.read_next().unwrap().unwrap());
            s.append(format!("k{i}").as_bytes(), &payload(i)).unwrap();
        }
        again.extend(drain(&mut s));
        assert_eq!(again, (10..n + 20).map(expect).collect::<Vec<_>>());
        assert!(segment_files(dir.path()).len() > 1, "segments rolled");
    }

    #[test]
    fn reopen_after_a_crash_resends_everything_unacknowledged() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path(), opts(1 << 20, 4096)).unwrap();
            for i in 0..50 {
                s.append(b"k", &payload(i)).unwrap();
            }
            let first = drain(&mut s);
            for r in &first[..20] {
                s.ack(r.seq).unwrap();
            }
            s.persist_head().unwrap();
            for r in &first[20..30] {
                s.ack(r.seq).unwrap();
            }
            // Dropped without persisting the head again: a kill -9.
        }
        let (mut s, rec) = Spool::open(dir.path(), opts(1 << 20, 4096)).unwrap();
        assert_eq!(rec.records, 30, "records 20..50 come back (20..30 as duplicates)");
        assert_eq!(rec.truncated_bytes, 0);
        let seqs: Vec<u64> = drain(&mut s).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (20..50).collect::<Vec<_>>());
        assert_eq!(drain(&mut s), vec![]);
        assert_eq!(s.append(b"k", b"next").unwrap(), 50, "sequence numbers continue");
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path(), opts(1 << 20, 1 << 20)).unwrap();
            for i in 0..10 {
                s.append(b"k", &payload(i)).unwrap();
            }
        }
        let seg = dir.path().join(segment_name(0));
        let full = fs::read(&seg).unwrap();
        // A crash half-way through an 11th record.
        let mut torn = Vec::new();
        encode(10, b"k", &payload(10), &mut torn).unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(f);
        let (mut s, rec) = Spool::open(dir.path(), opts(1 << 20, 1 << 20)).unwrap();
        assert_eq!(rec.records, 10);
        assert_eq!(rec.truncated_bytes, (torn.len() / 2) as u64);
        assert_eq!(fs::read(&seg).unwrap(), full, "file cut back to the last whole record");
        assert_eq!(drain(&mut s).len(), 10);
        assert_eq!(s.append(b"k", &payload(10)).unwrap(), 10);
        drop(s);
        let (mut s, rec) = Spool::open(dir.path(), opts(1 << 20, 1 << 20)).unwrap();
        assert_eq!(rec, Recovery { records: 11, truncated_bytes: 0, lost_records: 0 });
        assert_eq!(drain(&mut s).last().unwrap().payload, payload(10));
    }

    #[test]
    fn a_crc_failure_in_the_last_record_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let last_len;
        {
            let (mut s, _) = Spool::open(dir.path(), opts(1 << 20, 1 << 20)).unwrap();
            for i in 0..5 {
                s.append(b"k", &payload(i)).unwrap();
            }
            let mut buf = Vec::new();
            encode(4, b"k", &payload(4), &mut buf).unwrap();
            last_len = buf.len();
        }
        let seg = dir.path().join(segment_name(0));
        let mut bytes = fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        let (mut s, rec) = Spool::open(dir.path(), opts(1 << 20, 1 << 20)).unwrap();
        assert_eq!(rec.records, 4);
        assert_eq!(rec.truncated_bytes, last_len as u64);
        assert_eq!(drain(&mut s).len(), 4);
    }

    #[test]
    fn acks_out_of_order_move_the_head_and_delete_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), opts(1 << 20, 2048)).unwrap();
        for i in 0..200 {
            s.append(b"key", &payload(i)).unwrap();
        }
        let recs = drain(&mut s);
        let segments_before = segment_files(dir.path()).len();
        assert!(segments_before >= 4, "{segments_before} segments");
        let bytes_before = s.disk_bytes();
        // Acknowledge everything but record 0, in reverse order: the head cannot move.
        for r in recs.iter().skip(1).rev() {
            s.ack(r.seq).unwrap();
        }
        assert_eq!(s.head(), 0);
        assert_eq!(s.pending_records(), 1);
        assert_eq!(segment_files(dir.path()).len(), segments_before);
        s.ack(0).unwrap();
        assert_eq!(s.head(), 200);
        assert_eq!(s.pending_records(), 0);
        assert_eq!(segment_files(dir.path()).len(), 1, "only the active segment is left");
        assert!(s.disk_bytes() < bytes_before);
        s.persist_head().unwrap();
        assert_eq!(fs::read_to_string(dir.path().join(HEAD_FILE)).unwrap().trim(), "200");
        drop(s);
        let (mut s, rec) = Spool::open(dir.path(), opts(1 << 20, 2048)).unwrap();
        assert_eq!(rec.records, 0);
        assert_eq!(drain(&mut s), vec![]);
        assert_eq!(s.append(b"k", b"x").unwrap(), 200);
    }

    #[test]
    fn rewind_resends_from_the_lowest_unacknowledged_skipping_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = Spool::open(dir.path(), opts(1 << 20, 2048)).unwrap();
        for i in 0..60 {
            s.append(b"k", &payload(i)).unwrap();
        }
        let recs = drain(&mut s);
        for r in &recs[..10] {
            s.ack(r.seq).unwrap();
        }
        // 10 fails; 11..=20 delivered; 21.. fail.
        for r in &recs[11..=20] {
            s.ack(r.seq).unwrap();
        }
        assert_eq!(s.head(), 10);
        s.rewind().unwrap();
        let again: Vec<u64> = drain(&mut s).iter().map(|r| r.seq).collect();
        let mut want = vec![10];
        want.extend(21..60);
        assert_eq!(again, want);
        // Rewind again before anything is acknowledged: the same again.
        s.rewind().unwrap();
        assert_eq!(drain(&mut s).iter().map(|r| r.seq).collect::<Vec<_>>(), want);
        for seq in want {
            s.ack(seq).unwrap();
        }
        assert_eq!(s.head(), 60);
        s.rewind().unwrap();
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn the_bound_refuses_appends_until_acks_free_space() {
        let dir = tempfile::tempdir().unwrap();
        // 16 KiB bound → 4 KiB segments.
        let (mut s, _) = Spool::open(dir.path(), opts(16 << 10, 1 << 20)).unwrap();
        let body = vec![7u8; 500];
        let mut appended = 0u64;
        let err = loop {
            match s.append(b"k", &body) {
                Ok(_) => appended += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, AppendError::Full { .. }), "{err}");
        assert!(s.disk_bytes() <= 16 << 10);
        assert!(appended >= 28, "{appended} records of ~0.5 KiB in 16 KiB");
        assert!(matches!(s.append(b"k", &body), Err(AppendError::Full { .. })));
        // Kafka catches up: acknowledged segments go, and appends are accepted again.
        for r in drain(&mut s) {
            s.ack(r.seq).unwrap();
        }
        s.append(b"k", &body).unwrap();
        assert!(matches!(s.append(b"k", &vec![0; MAX_RECORD_BYTES]), Err(AppendError::TooLarge(_))));
    }

    #[test]
    fn order_is_kept_across_segments_reopens_and_rewinds() {
        let dir = tempfile::tempdir().unwrap();
        let mut expected = Vec::new();
        let mut delivered = Vec::new();
        for round in 0..5u64 {
            let (mut s, _) = Spool::open(dir.path(), opts(1 << 20, 1024)).unwrap();
            for i in 0..40 {
                let seq = s.append(b"k", &payload(round * 100 + i)).unwrap();
                expected.push(seq);
            }
            // Deliver a prefix in order, fail the rest, rewind, deliver some more.
            let mut got = drain(&mut s);
            let keep = 15 + round as usize;
            for r in got.drain(..keep.min(got.len())) {
                s.ack(r.seq).unwrap();
                delivered.push(r.seq);
            }
            s.persist_head().unwrap();
            s.rewind().unwrap();
            if let Some(r) = s.read_next().unwrap() {
                s.ack(r.seq).unwrap();
                delivered.push(r.seq);
            }
        }
        let (mut s, _) = Spool::open(dir.path(), opts(1 << 20, 1024)).unwrap();
        let rest = drain(&mut s);
        // The last acknowledgement of each round was not persisted: it comes back once.
        let mut all: Vec<u64> = delivered.clone();
        all.extend(rest.iter().map(|r| r.seq));
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, expected, "every record delivered or still spooled");
        let seqs: Vec<u64> = rest.iter().map(|r| r.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    }

    #[test]
    fn a_second_process_cannot_open_the_same_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, _) = Spool::open(dir.path(), SpoolOptions::new(1 << 20)).unwrap();
        let err = Spool::open(dir.path(), SpoolOptions::new(1 << 20)).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn a_missing_head_file_resends_everything_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path(), opts(1 << 20, 4096)).unwrap();
            for i in 0..30 {
                s.append(b"k", &payload(i)).unwrap();
            }
            for r in drain(&mut s) {
                s.ack(r.seq).unwrap();
            }
            s.persist_head().unwrap();
        }
        fs::write(dir.path().join(HEAD_FILE), "garbage").unwrap();
        let (mut s, rec) = Spool::open(dir.path(), opts(1 << 20, 4096)).unwrap();
        let first = s.head();
        assert_eq!(rec.records, 30 - first);
        assert_eq!(drain(&mut s).len() as u64, 30 - first);
        assert_eq!(s.append(b"k", b"x").unwrap(), 30);
    }

    #[test]
    fn corruption_inside_the_log_skips_the_lost_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path(), opts(1 << 20, 1024)).unwrap();
            for i in 0..60 {
                s.append(b"k", &payload(i)).unwrap();
            }
        }
        let segs = segment_files(dir.path());
        assert!(segs.len() >= 3);
        // Flip a byte in the middle of the first segment.
        let first = dir.path().join(&segs[0]);
        let mut bytes = fs::read(&first).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&first, &bytes).unwrap();
        let (mut s, rec) = Spool::open(dir.path(), opts(1 << 20, 1024)).unwrap();
        assert!(rec.lost_records > 0);
        assert_eq!(rec.records + rec.lost_records, 60);
        let recs = drain(&mut s);
        assert_eq!(recs.len() as u64, rec.records);
        for r in &recs {
            s.ack(r.seq).unwrap();
        }
        assert_eq!(s.head(), 60, "the head moves past the lost records");
        assert_eq!(s.pending_records(), 0);
    }
}
