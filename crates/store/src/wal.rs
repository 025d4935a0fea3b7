//! The journal's write-ahead log: what makes an acknowledged frame durable.
//!
//! `journal` appends the frame and its record to a segment file here, commits the same
//! record to the store's overlay (in memory, on its way to sled: see the `space` module),
//! and returns once group commit has `fdatasync`ed the segment.
//! sled's own flush (slow, and `sync_file_range` only) then runs in the background and at
//! checkpoints; a record is in the log until a sled flush that covers it has finished.
//!
//! - **Records**: `[payload length u32][CRC-32 of payload u32][payload]` (integers
//!   big-endian), of two kinds. A *journal* record's payload is `[id u64][record length
//!   u32][record JSON][frame bytes]`. A *generation* record (the length's top bit set) is
//!   what the store's overlay is about to hand sled, key by key: `[count u32]` then, per
//!   key, `[key length u32][key][value length u32, or u32::MAX for a removal][value]`. It
//!   is synced before sled receives any of it, so a crash while sled takes a generation
//!   (sled takes it without a batch: see the `space` module) leaves the log able to give
//!   it again whole. A crash can leave the last record of the last segment torn: reading
//!   stops there.
//! - **Preallocation**: a segment is filled with zeros ahead of its records
//!   ([`PREALLOCATE`] bytes at a time) and records are written over them. An `fdatasync`
//!   after an append that grows a file must also commit the new size and blocks through
//!   the file system's journal; over bytes already allocated it writes only the data (on
//!   this VM's disk, measured: about 1.1 ms against 1.8 to 3.2 ms per write and sync
//!   while another process wrote). The zeros change nothing for a reader: a record's
//!   length is never 0, so a zero length marks the end of the records.
//! - **Segments**: `<n>.wal`, numbered from 1. A checkpoint starts a new segment (syncing
//!   the old one first), hands the overlay to sled, flushes sled, then deletes the older
//!   segments. A journal record's append and its commit to the overlay happen under the
//!   store's switch lock (shared between appends), which the switch takes alone, so every
//!   record of a retired segment is in the overlay at the switch, in sled after the apply
//!   that follows, and durable after the flush that retires the segment. Appends are not
//!   in id order (ids are drawn before the lock): a segment keeps the lowest id it holds.
//! - **Group commit and switches**: the committer reads the last ticket, then takes the
//!   current segment, then syncs it. A record appended before the ticket was read is in
//!   that segment, or in an older one that the switch synced before retiring it.
//! - **Recovery** (on open): the intact records are applied again in log order (a
//!   journal record only when its message is not there yet), sled is flushed, and the log
//!   starts afresh. A journal record comes before the generation that holds its changes
//!   (appended before its change is committed to the overlay, which happens before that
//!   generation is sealed), so a generation replayed after it sets every value it touched,
//!   counters included, to what the running store had.
//! - **A failed sync** poisons the log: every later sync fails too. Linux reports a
//!   write-back error once; a later sync that succeeds says nothing about the pages the
//!   failed one lost, so nothing written before it may be called durable again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::types::MessageId;

/// Folder of the log, inside the store's folder.
pub(crate) const WAL_DIR: &str = "journal-wal";

/// How far a segment is filled with zeros ahead of its records, at a time.
pub(crate) const PREALLOCATE: u64 = 4 * 1024 * 1024;

/// A journal record read back: the message id, its record (JSON, sealed as stored) and
/// frame.
#[derive(Debug)]
pub(crate) struct WalRecord {
    pub(crate) id: MessageId,
    pub(crate) record: Vec<u8>,
    pub(crate) frame: Vec<u8>,
}

/// A generation's writes: full keys and values (`None`: removed).
pub(crate) type GenerationOps = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A record read back.
#[derive(Debug)]
pub(crate) enum Logged {
    Journal(WalRecord),
    Generation(GenerationOps),
}

/// The length word's top bit: a generation record.
const GENERATION: u32 = 1 << 31;

/// A removal's value length in a generation record.
const REMOVED: u32 = u32::MAX;

/// Writes a generation record, whole (header and CRC), for [`Wal::log_generation`], into
/// `out` (emptied first: the applier reuses one buffer).
pub(crate) fn generation_record<'a>(
    out: &mut Vec<u8>,
    ops: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
) -> io::Result<()> {
    let too_large = || io::Error::other("generation too large for one log record");
    let size: usize = 4 + ops
        .clone()
        .map(|(k, v)| 8 + k.len() + v.map_or(0, <[u8]>::len))
        .sum::<usize>();
    let len = u32::try_from(size)
        .ok()
        .filter(|&l| l < GENERATION)
        .ok_or_else(too_large)?;
    out.clear();
    out.reserve(8 + size);
    out.extend_from_slice(&(len | GENERATION).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(ops.len() as u32).to_be_bytes());
    for (key, value) in ops {
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key);
        match value {
            Some(v) => {
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&REMOVED.to_be_bytes()),
        }
    }
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

#[derive(Debug)]
struct Current {
    number: u64,
    file: Arc<File>,
    /// Bytes of records in the segment (= since the last checkpoint: a checkpoint starts
    /// a segment); the next record is written at this offset.
    bytes: u64,
    /// The file's length: records, then zeros.
    allocated: u64,
    /// A failed append could not be cut off: nothing more may go into this segment, or
    /// recovery, which stops at the damage, would miss it.
    damaged: bool,
    /// The lowest id appended to a segment still on disk (`None`: none since the last
    /// checkpoint).
    oldest_id: Option<MessageId>,
}

/// The log: the current segment, appended under the store's switch lock.
#[derive(Debug)]
pub(crate) struct Wal {
    dir: PathBuf,
    current: Mutex<Current>,
    /// A sync failed: none may succeed again (see the module doc).
    poisoned: AtomicBool,
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:012}.wal"))
}

/// The segment numbers in `dir`, in order.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".wal").and_then(|n| n.parse().ok()) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates a segment, zero-filled to [`PREALLOCATE`] bytes (made durable by the first
/// sync of a record), and makes its name durable.
fn open_segment(dir: &Path, number: u64) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(segment_path(dir, number))?;
    let allocated = zero_fill(&file, 0, PREALLOCATE)?;
    sync_dir(dir)?;
    Ok((file, allocated))
}

/// Writes zeros from `from` up to `from + len` (real blocks, not a hole, so that later
/// writes there change no metadata); returns the new end.
fn zero_fill(file: &File, from: u64, len: u64) -> io::Result<u64> {
    const CHUNK: usize = 256 * 1024;
    let zeros = vec![0u8; CHUNK];
    let mut at = from;
    while at < from + len {
        let n = (from + len - at).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(at)
}

impl Wal {
    /// Reads every intact record left in `store_dir`'s log, oldest first, and hands them
    /// to `apply`; then, once `flushed` (sled made durable) succeeds, deletes them and
    /// opens a fresh log.
    /// Returns the log and how many journal records it gave back.
    pub(crate) fn recover(
        store_dir: &Path,
        mut apply: impl FnMut(Logged) -> io::Result<()>,
        flushed: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<(Wal, usize)> {
        let dir = store_dir.join(WAL_DIR);
        fs::create_dir_all(&dir)?;
        let numbers = segments(&dir)?;
        let mut applied = 0;
        for &n in &numbers {
            let mut bytes = Vec::new();
            File::open(segment_path(&dir, n))?.read_to_end(&mut bytes)?;
            let (records, torn) = parse(&bytes);
            if torn {
                tracing::warn!(
                    segment = n,
                    "the journal log ends with a torn record (a crash during a write that was never acknowledged)"
                );
            }
            for r in records {
                if matches!(r, Logged::Journal(_)) {
                    applied += 1;
                }
                apply(r)?;
            }
        }
        flushed()?;
        let next = numbers.last().map_or(1, |n| n + 1);
        let (file, allocated) = open_segment(&dir, next)?;
        for n in numbers {
            fs::remove_file(segment_path(&dir, n))?;
        }
        sync_dir(&dir)?;
        Ok((
            Wal {
                dir,
                current: Mutex::new(Current {
                    number: next,
                    file: Arc::new(file),
                    bytes: 0,
                    allocated,
                    damaged: false,
                    oldest_id: None,
                }),
                poisoned: AtomicBool::new(false),
            },
            applied,
        ))
    }

    fn current(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one record (not yet durable: see [`Wal::sync`]). Call under the store's
    /// switch lock, shared.
    pub(crate) fn append(&self, id: MessageId, record: &[u8], frame: &[u8]) -> io::Result<()> {
        let record_len =
            u32::try_from(record.len()).map_err(|_| io::Error::other("record too large"))?;
        let len = u32::try_from(12 + record.len() + frame.len())
            .ok()
            .filter(|&l| l < GENERATION)
            .ok_or_else(|| io::Error::other("frame too large"))?;
        // One buffer, header first: the CRC is filled in once the payload is in place.
        let mut out = Vec::with_capacity(8 + len as usize);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&record_len.to_be_bytes());
        out.extend_from_slice(record);
        out.extend_from_slice(frame);
        let crc = crc32fast::hash(&out[8..]);
        out[4..8].copy_from_slice(&crc.to_be_bytes());
        self.write(&out, Some(id))
    }

    /// Appends a generation record (from [`generation_record`]) and syncs it: once this
    /// returns, sled may receive the generation.
    pub(crate) fn log_generation(&self, record: &[u8]) -> io::Result<()> {
        self.write(record, None)?;
        self.sync()
    }

    /// Appends one whole record; `id`: a journal record's message.
    fn write(&self, out: &[u8], id: Option<MessageId>) -> io::Result<()> {
        let mut current = self.current();
        if current.damaged {
            return Err(io::Error::other(
                "the journal log is damaged until the next checkpoint",
            ));
        }
        let at = current.bytes;
        let end = at + out.len() as u64;
        let written = (|| {
            if end > current.allocated {
                let more = (end - current.allocated).max(PREALLOCATE);
                current.allocated = zero_fill(&current.file, current.allocated, more)?;
            }
            current.file.write_all_at(out, at)
        })();
        if let Err(e) = written {
            // A partial record would hide every later one from recovery: cut it off.
            match current.file.set_len(at) {
                Ok(()) => current.allocated = at,
                Err(_) => current.damaged = true,
            }
            return Err(e);
        }
        current.bytes = end;
        if let Some(id) = id {
            current.oldest_id = Some(current.oldest_id.map_or(id, |oldest| oldest.min(id)));
        }
        Ok(())
    }

    /// Makes every record appended before this call durable (see the module doc for why
    /// taking the current segment here is enough).
    pub(crate) fn sync(&self) -> io::Result<()> {
        let file = Arc::clone(&self.current().file);
        self.sync_file(&file)
    }

    /// `fdatasync`s a segment, unless the log is poisoned; poisons it if that fails.
    fn sync_file(&self, file: &File) -> io::Result<()> {
        let poisoned = || io::Error::other("an earlier sync of the journal log failed");
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(poisoned());
        }
        let synced = file.sync_data();
        if synced.is_err() {
            self.poisoned.store(true, Ordering::SeqCst);
        }
        // Another sync may have failed while this one ran: its lost pages may be ours.
        if self.poisoned.load(Ordering::SeqCst) {
            return synced.and(Err(poisoned()));
        }
        synced
    }

    /// Whether the current segment refused a record it could not cut off again: it takes
    /// no more until a checkpoint starts a new one.
    pub(crate) fn is_damaged(&self) -> bool {
        self.current().damaged
    }

    /// Bytes appended since the last checkpoint.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.current().bytes
    }

    /// The oldest message id a crash now would recover from the log.
    pub(crate) fn oldest_id(&self) -> Option<MessageId> {
        self.current().oldest_id
    }

    /// Starts a new segment; returns the numbers below it, to delete once sled is flushed.
    /// Call under the store's switch lock, alone.
    pub(crate) fn switch(&self) -> io::Result<u64> {
        let mut current = self.current();
        self.sync_file(&current.file)?;
        let next = current.number + 1;
        let (file, allocated) = open_segment(&self.dir, next)?;
        current.number = next;
        current.file = Arc::new(file);
        current.bytes = 0;
        current.allocated = allocated;
        current.damaged = false;
        current.oldest_id = None;
        Ok(next)
    }

    /// Deletes the segments below `keep_from` (sled holds their records durably now).
    pub(crate) fn retire_before(&self, keep_from: u64) -> io::Result<()> {
        for n in segments(&self.dir)? {
            if n < keep_from {
                fs::remove_file(segment_path(&self.dir, n))?;
            }
        }
        sync_dir(&self.dir)
    }
}

/// The intact records of a segment, and whether it ends with a torn or damaged one.
fn parse(bytes: &[u8]) -> (Vec<Logged>, bool) {
    let mut records = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        // The zeros a segment is preallocated with: no more records (anything else after
        // them is a record whose first bytes never reached the disk).
        if be_u32(rest) == Some(0) {
            return (records, rest.iter().any(|&b| b != 0));
        }
        let Some(record) = next_record(rest) else {
            return (records, true);
        };
        rest = &rest[8 + record.0..];
        records.push(record.1);
    }
    (records, false)
}

fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// One record at the start of `bytes`: its payload length and the record.
fn next_record(bytes: &[u8]) -> Option<(usize, Logged)> {
    let word = be_u32(bytes)?;
    let len = (word & !GENERATION) as usize;
    let crc = be_u32(bytes.get(4..)?)?;
    let payload = bytes.get(8..8 + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    if word & GENERATION != 0 {
        return Some((len, Logged::Generation(generation_ops(payload)?)));
    }
    let id = be_u64(payload)?;
    let record_len = be_u32(payload.get(8..)?)? as usize;
    let record = payload.get(12..12 + record_len)?.to_vec();
    let frame = payload.get(12 + record_len..)?.to_vec();
    Some((len, Logged::Journal(WalRecord { id, record, frame })))
}

/// A generation record's writes (its CRC already checked).
fn generation_ops(payload: &[u8]) -> Option<GenerationOps> {
    let count = be_u32(payload)? as usize;
    let mut rest = payload.get(4..)?;
    // Each write takes at least 8 bytes: a count larger than that is damage.
    let mut ops = Vec::with_capacity(count.min(rest.len() / 8));
    for _ in 0..count {
        let key_len = be_u32(rest)? as usize;
        let key = rest.get(4..4 + key_len)?.to_vec();
        rest = rest.get(4 + key_len..)?;
        let value_len = be_u32(rest)?;
        rest = rest.get(4..)?;
        let value = if value_len == REMOVED {
            None
        } else {
            let v = rest.get(..value_len as usize)?.to_vec();
            rest = rest.get(value_len as usize..)?;
            Some(v)
        };
        ops.push((key, value));
    }
    rest.is_empty().then_some(ops)
}

/// For the store's tests: a log whose disk refuses writes.
#[cfg(test)]
pub(crate) mod tests_support {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Makes the current segment's file refuse writes and truncation (a read-only
    /// handle), as a failing disk would; returns the segment's number.
    pub(crate) fn refuse_writes(wal: &Wal) -> u64 {
        let mut current = wal.current();
        let path = segment_path(&wal.dir, current.number);
        current.file = Arc::new(File::open(path).unwrap());
        current.number
    }

    pub(crate) fn segment_number(wal: &Wal) -> u64 {
        wal.current().number
    }

    /// The records in `bytes` (a segment's), and whether they end torn.
    pub(crate) fn parse(bytes: &[u8]) -> (Vec<Logged>, bool) {
        super::parse(bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The journal records of a log, and its generations.
    fn recover_both(dir: &Path) -> (Wal, Vec<WalRecord>, Vec<GenerationOps>) {
        let (mut journal, mut generations) = (Vec::new(), Vec::new());
        let (wal, n) = Wal::recover(
            dir,
            |r| {
                match r {
                    Logged::Journal(r) => journal.push(r),
                    Logged::Generation(ops) => generations.push(ops),
                }
                Ok(())
            },
            || Ok(()),
        )
        .unwrap();
        assert_eq!(n, journal.len());
        (wal, journal, generations)
    }

    fn recover_all(dir: &Path) -> (Wal, Vec<WalRecord>) {
        let (wal, journal, _) = recover_both(dir);
        (wal, journal)
    }

    fn journal_ids(records: &[Logged]) -> Vec<u64> {
        records
            .iter()
            .filter_map(|r| match r {
                Logged::Journal(r) => Some(r.id),
                Logged::Generation(_) => None,
            })
            .collect()
    }

    #[test]
    fn generations_are_read_back_in_log_order_among_journal_records() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = recover_all(dir.path());
        wal.append(1, b"{}", b"MSH|one").unwrap();
        let ops: Vec<(&[u8], Option<&[u8]>)> = vec![
            (b"m1", Some(b"record")),
            (b"q1", None),
            (b"empty", Some(b"")),
        ];
        let mut record = Vec::new();
        generation_record(&mut record, ops.iter().copied()).unwrap();
        wal.log_generation(&record).unwrap();
        wal.append(2, b"{}", b"MSH|two").unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.oldest_id(), Some(1), "a generation names no message");
        drop(wal);
        let segment = segments(&dir.path().join(WAL_DIR)).unwrap()[0];
        let bytes = fs::read(segment_path(&dir.path().join(WAL_DIR), segment)).unwrap();
        let (records, torn) = parse(&bytes);
        assert!(!torn);
        assert_eq!(journal_ids(&records), [1, 2]);
        let Logged::Generation(got) = &records[1] else {
            panic!("the second record is the generation");
        };
        let want: GenerationOps = ops
            .iter()
            .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(got, &want);
        let (_, journal, generations) = recover_both(dir.path());
        assert_eq!(journal.len(), 2);
        assert_eq!(generations, [want]);
    }

    #[test]
    fn a_failed_sync_fails_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = recover_all(dir.path());
        wal.append(1, b"{}", b"MSH|one").unwrap();
        wal.sync().unwrap();
        wal.poisoned.store(true, Ordering::SeqCst);
        assert!(wal.sync().is_err());
        assert!(
            wal.log_generation(&{
                let mut record = Vec::new();
                generation_record(&mut record, std::iter::empty()).unwrap();
                record
            })
            .is_err()
        );
        assert!(wal.switch().is_err());
    }

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, none) = recover_all(dir.path());
        assert!(none.is_empty());
        wal.append(1, b"{\"a\":1}", b"MSH|one").unwrap();
        wal.append(2, b"{}", b"MSH|two").unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.oldest_id(), Some(1));
        let end = wal.pending_bytes();
        drop(wal);
        // A crash in the middle of a third record, written over the preallocated zeros.
        let segment = segments(&dir.path().join(WAL_DIR)).unwrap()[0];
        let path = segment_path(&dir.path().join(WAL_DIR), segment);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            PREALLOCATE,
            "the segment is preallocated"
        );
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0, 0, 0, 40, 1, 2], end).unwrap();
        let (wal, got) = recover_all(dir.path());
        let summary: Vec<(u64, &[u8], &[u8])> = got
            .iter()
            .map(|r| (r.id, r.record.as_slice(), r.frame.as_slice()))
            .collect();
        assert_eq!(
            summary,
            [
                (1, &b"{\"a\":1}"[..], &b"MSH|one"[..]),
                (2, &b"{}"[..], &b"MSH|two"[..])
            ]
        );
        drop(wal);
        let (_, again) = recover_all(dir.path());
        assert!(again.is_empty(), "recovered records are not applied twice");
    }

    #[test]
    fn a_switch_keeps_new_records_and_retires_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = recover_all(dir.path());
        wal.append(1, b"{}", b"old").unwrap();
        let keep = wal.switch().unwrap();
        assert_eq!(wal.pending_bytes(), 0);
        assert_eq!(wal.oldest_id(), None);
        wal.append(2, b"{}", b"new").unwrap();
        wal.retire_before(keep).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, got) = recover_all(dir.path());
        assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_damaged_record_stops_the_segment() {
        let mut bytes = Vec::new();
        for (id, frame) in [(1u64, &b"a"[..]), (2, b"b")] {
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(&0u32.to_be_bytes());
            payload.extend_from_slice(frame);
            bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
            bytes.extend_from_slice(&payload);
        }
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        let (records, torn) = parse(&bytes);
        assert!(torn);
        assert_eq!(journal_ids(&records), [1]);
    }

    #[test]
    fn preallocated_zeros_end_the_records_cleanly_and_grow_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = recover_all(dir.path());
        let big = vec![b'x'; PREALLOCATE as usize];
        wal.append(1, b"{}", b"small").unwrap();
        wal.append(2, b"{}", &big).unwrap();
        wal.append(3, b"{}", b"after").unwrap();
        wal.sync().unwrap();
        let end = wal.pending_bytes();
        drop(wal);
        let segment = segments(&dir.path().join(WAL_DIR)).unwrap()[0];
        let bytes = fs::read(segment_path(&dir.path().join(WAL_DIR), segment)).unwrap();
        assert!(bytes.len() as u64 > end, "zeros ahead of the records");
        assert!(bytes[end as usize..].iter().all(|&b| b == 0));
        let (records, torn) = parse(&bytes);
        assert!(!torn, "zeros after the last record are not damage");
        assert_eq!(journal_ids(&records), [1, 2, 3]);
        assert!(matches!(&records[1], Logged::Journal(r) if r.frame == big));
        // Bytes past a zero header: a record whose start never reached the disk.
        let mut damaged = bytes.clone();
        damaged[end as usize + 9] = 7;
        let (records, torn) = parse(&damaged);
        assert!(torn);
        assert_eq!(records.len(), 3);
    }

    /// An append the disk refuses: the journal call fails (its frame is NAKed, never
    /// acknowledged), nothing more goes into that segment while it cannot be cut back to
    /// its last whole record, and the next checkpoint's new segment takes records again.
    /// Recovery then gives back every record acknowledged before and after, and not the
    /// failed one.
    #[test]
    fn a_refused_append_fails_and_the_next_segment_takes_records_again() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = recover_all(dir.path());
        wal.append(1, b"{}", b"before").unwrap();
        let good = wal.pending_bytes();
        // The segment's file as one that refuses writes, and truncation too (a read-only
        // handle: writes fail with EBADF, set_len with EINVAL), as a failing disk would.
        tests_support::refuse_writes(&wal);
        assert!(!wal.is_damaged());
        assert!(wal.append(2, b"{}", b"refused").is_err());
        assert!(wal.is_damaged());
        assert_eq!(
            wal.pending_bytes(),
            good,
            "the failed record is not counted"
        );
        let again = wal.append(3, b"{}", b"while damaged").unwrap_err();
        assert!(again.to_string().contains("damaged"), "{again}");
        // A checkpoint starts a new segment: records go in again.
        wal.switch().unwrap();
        wal.append(4, b"{}", b"after").unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, got) = recover_all(dir.path());
        let ids: Vec<u64> = got.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 4]);
    }
}
