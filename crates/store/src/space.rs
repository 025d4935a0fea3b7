//! Key spaces inside one sled tree, atomic changes across them, and the overlay that
//! hands those changes to sled in groups.
//!
//! All of the store's data lives in one sled `Tree`, each kind of record under its own
//! one-byte key prefix (a [`Space`]). A change that touches several records, counters
//! included, is one [`Writes`].
//!
//! **Why an overlay.** sled applying each state change as it happens (one atomic
//! `apply_batch` per change, each rolling sled's I/O buffer) took 37 to 42 % of the
//! engine's CPU. So a committed [`Writes`] goes first into an in-memory overlay
//! ([`Layered`]) that every read looks at before sled, and a background applier hands
//! the overlay to sled every [`APPLY_EVERY`] (or sooner when it passes [`APPLY_BYTES`]),
//! as one *generation*.
//!
//! **Why not as a sled batch.** Once a sled tree has taken a batch, every read of it takes
//! a process-wide lock that `apply_batch` holds for writing while it works: under load a
//! generation took 4.5 ms of every 14.5, and every store call that read sled meanwhile
//! waited, most of them holding the store's write lock, so that the whole engine waited
//! (measured: the mapper spent 100 µs per message in such waits). So a generation is
//! first written to the journal's log and synced (see the `wal` module), and only then
//! given to sled key by key, with plain inserts and removals that never block a reader.
//!
//! **Invariants.**
//! - A `Writes` enters the overlay whole, under the overlay's lock, so a generation holds
//!   whole changes only. A generation is in the log, synced, before sled receives any of
//!   it; a crash while sled takes it leaves sled with part of it, and recovery gives it
//!   again whole from the log, so the store reopens with the changes up to some
//!   generation, never half of one.
//! - Generations reach sled in order: one is applied at a time (the caller holds the
//!   store's apply lock), and while it is applied it stays readable in the overlay
//!   (`sealed`), so a reader never misses a write between the overlay and sled.
//! - Reads: the newest generation (`active`) first, then `sealed`, then sled. Scans merge
//!   a snapshot of the overlay's entries (removals included) with sled's, in key order,
//!   and give each key once: sled's iterator is live, and a generation applied during
//!   the scan would otherwise bring back keys the snapshot already gave (that leased one
//!   delivery twice, once).
//!
//! **Short-lived keys.** A delivery's `ready`, `inflight` and `keys` entries often live
//! for a few milliseconds: written when it is queued or leased, removed when it is leased
//! or delivered. Written with [`Writes::insert_new`] (the caller knows sled has no such
//! key), such an entry is marked *unsent* in the overlay, and its removal within the same
//! generation drops the entry instead of recording a removal: sled never sees either.
//! Half of the writes a delivered message made reached sled only to be undone there.
//!
//! What a crash loses: the writes of the generation not yet in the log, at most
//! [`APPLY_EVERY`] of them (what sled had not flushed of the logged ones is given again
//! from the log). The journal does not depend on this:
//! its records are in the store's own log and are applied again on open (see the `wal`
//! module). A lost state change means a message routed again or a delivery sent again:
//! at least once, never lost.

use std::collections::BTreeMap;
use std::collections::btree_map;
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use sled::{IVec, Tree};

use crate::codec::{be, read_be};

/// How often the applier hands the overlay to sled.
pub(crate) const APPLY_EVERY: Duration = Duration::from_millis(10);

/// Overlay size (keys and values) past which a writer wakes the applier early.
pub(crate) const APPLY_BYTES: usize = 1024 * 1024;

/// A key's newest value in a generation.
#[derive(Debug, Clone)]
struct Slot {
    /// `None`: removed.
    value: Option<IVec>,
    /// Neither sled nor an older generation has the key: a removal just drops the slot.
    unsent: bool,
}

/// Written values by full key.
type Generation = BTreeMap<Vec<u8>, Slot>;

#[derive(Debug, Default)]
struct Overlay {
    /// Writes not yet handed to sled: the newest values.
    active: Generation,
    active_bytes: usize,
    /// The generation being applied to sled (empty when none is).
    sealed: Arc<Generation>,
}

impl Overlay {
    fn lookup(&self, key: &[u8]) -> Option<&Option<IVec>> {
        self.active
            .get(key)
            .or_else(|| self.sealed.get(key))
            .map(|slot| &slot.value)
    }

    fn set_counter(&mut self, key: Vec<u8>, value: u64) {
        self.write(key, Some(IVec::from(&be(value)[..])), false);
    }

    /// Puts one write into the active generation. `new`: the writer knows sled has no
    /// such key; it is believed only when no generation in the overlay has one either.
    fn write(&mut self, key: Vec<u8>, value: Option<IVec>, new: bool) {
        let bytes = key.len() + value.as_ref().map_or(0, |v| v.len());
        // One search of the generation per write (this runs for every key of every change).
        match self.active.entry(key) {
            btree_map::Entry::Occupied(mut slot) => {
                if value.is_none() && slot.get().unsent {
                    // Written and removed before sled heard of it.
                    slot.remove();
                    return;
                }
                slot.get_mut().value = value;
            }
            btree_map::Entry::Vacant(slot) => {
                let unsent = new && !self.sealed.contains_key(slot.key());
                if value.is_none() && unsent {
                    return;
                }
                slot.insert(Slot { value, unsent });
            }
        }
        self.active_bytes += bytes;
    }
}

/// A sled tree with the overlay of writes it has not received yet.
#[derive(Debug)]
pub(crate) struct Layered {
    tree: Tree,
    overlay: Mutex<Overlay>,
    /// Wakes the applier early when the overlay grows past [`APPLY_BYTES`].
    grown: Condvar,
    /// The buffer a generation's log record is written into (see [`Layered::apply`]).
    record: Mutex<Vec<u8>>,
}

impl Layered {
    pub(crate) fn new(tree: Tree) -> Arc<Layered> {
        Arc::new(Layered {
            tree,
            overlay: Mutex::new(Overlay::default()),
            grown: Condvar::new(),
            record: Mutex::new(Vec::new()),
        })
    }

    fn overlay(&self) -> MutexGuard<'_, Overlay> {
        self.overlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &[u8]) -> Result<Option<IVec>, sled::Error> {
        if let Some(v) = self.overlay().lookup(key) {
            return Ok(v.clone());
        }
        // Not in the overlay when looked at, so sled has the value (a generation leaves
        // `sealed` only once sled has it).
        self.tree.get(key)
    }

    /// Entries with keys in `[start, end)`, overlay merged over sled, in key order or,
    /// `backward`, from the last.
    fn range(&self, start: Vec<u8>, end: Vec<u8>, backward: bool) -> Entries {
        let bounds = (Bound::Included(start.clone()), Bound::Excluded(end.clone()));
        // Snapshot the overlay's part of the range first: a generation leaves the overlay
        // only after sled has it, so sled read afterwards misses nothing of it.
        let mut overlay: Vec<(Vec<u8>, Option<IVec>)> = {
            let o = self.overlay();
            let mut merged: BTreeMap<Vec<u8>, Option<IVec>> = o
                .sealed
                .range::<Vec<u8>, _>(bounds.clone())
                .map(|(k, slot)| (k.clone(), slot.value.clone()))
                .collect();
            merged.extend(
                o.active
                    .range::<Vec<u8>, _>(bounds)
                    .map(|(k, slot)| (k.clone(), slot.value.clone())),
            );
            merged.into_iter().collect()
        };
        if !backward {
            overlay.reverse();
        }
        Entries {
            sled: self.tree.range(start..end),
            sled_next: None,
            overlay,
            last: None,
            backward,
        }
    }

    /// A counter's value: the overlay's (the caller holds its lock), else sled's.
    fn counter(&self, o: &Overlay, key: &[u8]) -> Result<u64, sled::Error> {
        let value = match o.lookup(key) {
            Some(v) => v.clone(),
            None => self.tree.get(key)?,
        };
        Ok(value.as_deref().and_then(read_be).unwrap_or(0))
    }

    /// Puts a whole change into the overlay: its writes, and its counters' new values.
    fn commit(&self, writes: Writes) -> Result<(), sled::Error> {
        let mut o = self.overlay();
        for (key, delta) in writes.counters {
            if delta == 0 {
                continue;
            }
            let current = self.counter(&o, &key)?;
            o.set_counter(key, current.saturating_add_signed(delta));
        }
        for (key, value, new) in writes.ops {
            o.write(key, value, new);
        }
        if o.active_bytes >= APPLY_BYTES {
            self.grown.notify_one();
        }
        Ok(())
    }

    /// Adds `delta` to a counter at once.
    fn add(&self, key: Vec<u8>, delta: u64) -> Result<(), sled::Error> {
        let mut o = self.overlay();
        let current = self.counter(&o, &key)?;
        o.set_counter(key, current.saturating_add(delta));
        Ok(())
    }

    /// Hands everything committed so far to sled: first to `log` (the journal's log,
    /// which syncs it: see the module doc), as one generation record, then to sled key by
    /// key. The caller holds the store's apply lock (one generation at a time, in order).
    pub(crate) fn apply(
        &self,
        log: impl FnOnce(&[u8]) -> io::Result<()>,
    ) -> Result<(), sled::Error> {
        let sealed = {
            let mut o = self.overlay();
            if o.active.is_empty() {
                return Ok(());
            }
            debug_assert!(o.sealed.is_empty(), "generations are applied one at a time");
            o.active_bytes = 0;
            let generation = Arc::new(std::mem::take(&mut o.active));
            o.sealed = Arc::clone(&generation);
            generation
        };
        let applied = self.log_and_apply(&sealed, log);
        // On failure the generation stays sealed (readable) and is tried again, whole (a
        // part sled took meanwhile is masked by the overlay until then); later writes wait
        // in `active` behind it.
        if applied.is_ok() {
            self.overlay().sealed = Arc::default();
        } else {
            let mut o = self.overlay();
            let newer = std::mem::take(&mut o.active);
            let mut failed = Arc::try_unwrap(std::mem::take(&mut o.sealed))
                .unwrap_or_else(|shared| (*shared).clone());
            // sled may have taken some of it: none of its keys is new to sled any more.
            for slot in failed.values_mut() {
                slot.unsent = false;
            }
            o.active = failed;
            o.active.extend(newer);
        }
        applied
    }

    fn log_and_apply(
        &self,
        generation: &Generation,
        log: impl FnOnce(&[u8]) -> io::Result<()>,
    ) -> Result<(), sled::Error> {
        let ops = generation
            .iter()
            .map(|(key, slot)| (key.as_slice(), slot.value.as_deref()));
        let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
        crate::wal::generation_record(&mut record, ops)?;
        let logged = log(&record);
        // One buffer for every generation (a fresh one each time, a megabyte at a time
        // under load, left the allocator holding as much again as the live heap); not
        // kept larger than a usual generation after a big one.
        if record.capacity() > 4 * APPLY_BYTES {
            *record = Vec::new();
        }
        drop(record);
        logged?;
        for (key, slot) in generation {
            match &slot.value {
                Some(v) => {
                    self.tree.insert(key.as_slice(), v.clone())?;
                }
                None => {
                    self.tree.remove(key.as_slice())?;
                }
            }
        }
        Ok(())
    }

    /// Puts a generation read back from the log into the overlay, as it was (recovery).
    pub(crate) fn replay(&self, ops: crate::wal::GenerationOps) {
        let mut o = self.overlay();
        for (key, value) in ops {
            o.write(key, value.map(IVec::from), false);
        }
    }

    /// Wakes a thread in [`Layered::wait_for_growth`] (at most one wait's worth late).
    pub(crate) fn wake(&self) {
        self.grown.notify_all();
    }

    /// Waits until the overlay has grown past [`APPLY_BYTES`] or `timeout` has passed.
    pub(crate) fn wait_for_growth(&self, timeout: Duration) {
        let o = self.overlay();
        if o.active_bytes < APPLY_BYTES {
            let _ = self.grown.wait_timeout(o, timeout);
        }
    }
}

/// The entries of a range, overlay merged over sled, in key order. Keys keep their space
/// prefix here; [`Space`] strips it.
pub(crate) struct Entries {
    sled: sled::Iter,
    sled_next: Option<(IVec, IVec)>,
    /// The overlay's entries of the range, the next one last.
    overlay: Vec<(Vec<u8>, Option<IVec>)>,
    /// The last key yielded or skipped as removed. sled's iterator is live, not a
    /// snapshot: when the applier hands sled a generation during the scan, sled can come
    /// up with a key the overlay already gave (even after it once ran out), so nothing at
    /// or before this key (at or after it, going backward) is taken from sled again.
    last: Option<Vec<u8>>,
    /// From the last key to the first.
    backward: bool,
}

impl Entries {
    fn next_full(&mut self) -> Option<Result<(Vec<u8>, IVec), sled::Error>> {
        loop {
            while self.sled_next.is_none() {
                let next = if self.backward {
                    self.sled.next_back()
                } else {
                    self.sled.next()
                };
                match next {
                    Some(Ok(kv)) => {
                        let seen = self.last.as_deref().is_some_and(|l| {
                            if self.backward {
                                kv.0.as_ref() >= l
                            } else {
                                kv.0.as_ref() <= l
                            }
                        });
                        if !seen {
                            self.sled_next = Some(kv);
                        }
                    }
                    Some(Err(e)) => return Some(Err(e)),
                    None => break,
                }
            }
            let take_overlay = match (&self.sled_next, self.overlay.last()) {
                (None, None) => return None,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (Some((sk, _)), Some((ok, _))) => {
                    if ok.as_slice() == sk.as_ref() {
                        // The overlay's value is the newer one.
                        self.sled_next = None;
                        true
                    } else {
                        // The overlay's key comes first in the direction of the scan.
                        (ok.as_slice() < sk.as_ref()) != self.backward
                    }
                }
            };
            if take_overlay {
                let (k, v) = self.overlay.pop()?;
                self.last = Some(k.clone());
                match v {
                    Some(v) => return Some(Ok((k, v))),
                    None => continue, // removed
                }
            }
            let (k, v) = self.sled_next.take()?;
            let k = k.to_vec();
            self.last = Some(k.clone());
            return Some(Ok((k, v)));
        }
    }
}

impl std::fmt::Debug for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entries")
            .field("overlay_left", &self.overlay.len())
            .finish()
    }
}

/// A key (without the space prefix) and its value.
pub(crate) type Entry = (Vec<u8>, IVec);

/// Entries of a space, in key order, without the space prefix.
#[derive(Debug)]
pub(crate) struct SpaceEntries(Entries);

impl Iterator for SpaceEntries {
    type Item = Result<Entry, sled::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0
            .next_full()
            .map(|r| r.map(|(mut k, v)| (k.split_off(1), v)))
    }
}

/// One kind of record: keys are `prefix ++ key`.
#[derive(Debug, Clone)]
pub(crate) struct Space {
    layer: Arc<Layered>,
    prefix: u8,
}

impl Space {
    pub(crate) fn new(layer: &Arc<Layered>, prefix: u8) -> Self {
        Space {
            layer: Arc::clone(layer),
            prefix,
        }
    }

    pub(crate) fn full_key(&self, key: impl AsRef<[u8]>) -> Vec<u8> {
        let key = key.as_ref();
        let mut k = Vec::with_capacity(key.len() + 1);
        k.push(self.prefix);
        k.extend_from_slice(key);
        k
    }

    /// The first key after every key that starts with `start`.
    fn end_of(mut start: Vec<u8>) -> Vec<u8> {
        while let Some(last) = start.pop() {
            if last < u8::MAX {
                start.push(last + 1);
                return start;
            }
        }
        // Only 0xff bytes: nothing sorts after them in this space; the next space's
        // prefix bounds it (spaces never use the prefix 0xff).
        vec![u8::MAX]
    }

    pub(crate) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<IVec>, sled::Error> {
        self.layer.get(&self.full_key(key))
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub(crate) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> SpaceEntries {
        let start = self.full_key(prefix);
        let end = Self::end_of(start.clone());
        SpaceEntries(self.layer.range(start, end, false))
    }

    /// Every entry, in key order.
    pub(crate) fn iter(&self) -> SpaceEntries {
        SpaceEntries(
            self.layer
                .range(vec![self.prefix], vec![self.prefix + 1], false),
        )
    }

    /// Adds `delta` to a counter at once (outside a [`Writes`]).
    pub(crate) fn add(&self, name: impl AsRef<[u8]>, delta: u64) -> Result<(), sled::Error> {
        self.layer.add(self.full_key(name), delta)
    }

    /// Entries from `start` (inclusive) to the end of the space.
    pub(crate) fn range_from(&self, start: impl AsRef<[u8]>) -> SpaceEntries {
        SpaceEntries(
            self.layer
                .range(self.full_key(start), vec![self.prefix + 1], false),
        )
    }

    /// Entries in `[start, end)`, from the last key down to the first.
    pub(crate) fn range_backward(
        &self,
        start: impl AsRef<[u8]>,
        end: impl AsRef<[u8]>,
    ) -> SpaceEntries {
        SpaceEntries(
            self.layer
                .range(self.full_key(start), self.full_key(end), true),
        )
    }

    /// A write of one record outside a [`Writes`] (an update that stands alone).
    pub(crate) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<(), sled::Error> {
        let mut w = Writes::default();
        w.insert(self, key, value);
        self.layer.commit(w)
    }

    pub(crate) fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), sled::Error> {
        let mut w = Writes::default();
        w.remove(self, key);
        self.layer.commit(w)
    }
}

/// Writes to apply together, counters included.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    /// Full keys, new values (`None`: removed), and whether the writer knows the key is
    /// new to sled; in order (a later write wins).
    ops: Vec<(Vec<u8>, Option<IVec>, bool)>,
    /// Counter deltas by full counter key, summed, applied at commit.
    counters: BTreeMap<Vec<u8>, i64>,
}

impl Writes {
    pub(crate) fn insert(&mut self, space: &Space, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.ops
            .push((space.full_key(key), Some(IVec::from(value.as_ref())), false));
    }

    /// An insert of a key that sled does not have, nor will have once the overlay is
    /// applied, because it names something that did not exist before this change (a
    /// delivery sequence number just drawn, a lease just taken). Removed before the next
    /// apply, the key never reaches sled (see the module doc). Wrongly used on a key
    /// sled has, a removal in the same generation would leave sled's copy behind.
    pub(crate) fn insert_new(
        &mut self,
        space: &Space,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) {
        self.ops
            .push((space.full_key(key), Some(IVec::from(value.as_ref())), true));
    }

    pub(crate) fn remove(&mut self, space: &Space, key: impl AsRef<[u8]>) {
        self.ops.push((space.full_key(key), None, false));
    }

    pub(crate) fn bump(&mut self, counters: &Space, name: &[u8], delta: i64) {
        *self.counters.entry(counters.full_key(name)).or_insert(0) += delta;
    }

    /// Commits the change: it becomes visible to every read at once, whole, and reaches
    /// sled whole (see the module doc). Counters are read and updated under the overlay's
    /// lock; a change that reads a record to write it back needs the store's queue lock.
    pub(crate) fn commit(self, layer: &Layered) -> Result<(), sled::Error> {
        layer.commit(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The log step of an apply, for tests of the overlay alone.
    fn unlogged(_: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn layer() -> (tempfile::TempDir, Arc<Layered>) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let layer = Layered::new(db.open_tree("t").unwrap());
        (dir, layer)
    }

    fn keys(entries: SpaceEntries) -> Vec<(Vec<u8>, Vec<u8>)> {
        entries
            .map(|e| {
                let (k, v) = e.unwrap();
                (k, v.to_vec())
            })
            .collect()
    }

    #[test]
    fn reads_see_the_overlay_before_and_sled_after_an_apply() {
        let (_dir, layer) = layer();
        let a = Space::new(&layer, b'a');
        let b = Space::new(&layer, b'b');
        a.insert(b"1", b"old").unwrap();
        a.insert(b"3", b"three").unwrap();
        b.insert(b"1", b"other space").unwrap();
        layer.apply(unlogged).unwrap();
        // Newer writes over what sled has: a change, a removal and an addition.
        let mut w = Writes::default();
        w.insert(&a, b"1", b"new");
        w.remove(&a, b"3");
        w.insert(&a, b"2", b"two");
        w.commit(&layer).unwrap();
        let expected = vec![
            (b"1".to_vec(), b"new".to_vec()),
            (b"2".to_vec(), b"two".to_vec()),
        ];
        assert_eq!(a.get(b"1").unwrap().unwrap().as_ref(), b"new");
        assert_eq!(a.get(b"3").unwrap(), None);
        assert_eq!(keys(a.iter()), expected);
        assert!(
            layer.tree.get(b"a3").unwrap().is_some(),
            "sled not yet told"
        );
        layer.apply(unlogged).unwrap();
        assert_eq!(keys(a.iter()), expected);
        assert_eq!(layer.tree.get(b"a3").unwrap(), None);
        assert_eq!(
            keys(b.iter()),
            vec![(b"1".to_vec(), b"other space".to_vec())]
        );
    }

    #[test]
    fn prefix_scans_and_ranges_merge_in_key_order() {
        let (_dir, layer) = layer();
        let s = Space::new(&layer, b's');
        for k in [&b"x\x01"[..], b"x\x03", b"x\xff", b"y\x00"] {
            s.insert(k, b"sled").unwrap();
        }
        layer.apply(unlogged).unwrap();
        for k in [&b"x\x00"[..], b"x\x02", b"x\x04"] {
            s.insert(k, b"overlay").unwrap();
        }
        s.remove(b"x\x03").unwrap();
        let got: Vec<Vec<u8>> = s.scan_prefix(b"x").map(|e| e.unwrap().0).collect();
        assert_eq!(
            got,
            vec![
                b"x\x00".to_vec(),
                b"x\x01".to_vec(),
                b"x\x02".to_vec(),
                b"x\x04".to_vec(),
                b"x\xff".to_vec()
            ]
        );
        let from: Vec<Vec<u8>> = s.range_from(b"x\x02").map(|e| e.unwrap().0).collect();
        assert_eq!(from.first().unwrap(), b"x\x02");
        assert_eq!(from.last().unwrap(), b"y\x00");
        assert_eq!(from.len(), 4);
    }

    /// Backward, the same merge from the last key: the overlay's newer values and
    /// removals win, sled's keys come in between, the bounds hold.
    #[test]
    fn a_backward_range_merges_from_the_last_key() {
        let (_dir, layer) = layer();
        let s = Space::new(&layer, b's');
        for k in [&b"a"[..], b"c", b"e", b"g"] {
            s.insert(k, b"sled").unwrap();
        }
        layer.apply(unlogged).unwrap();
        for k in [&b"b"[..], b"e", b"f"] {
            s.insert(k, b"overlay").unwrap();
        }
        s.remove(b"c").unwrap();
        let got: Vec<(Vec<u8>, Vec<u8>)> = s
            .range_backward(b"b", b"g")
            .map(|e| {
                let (k, v) = e.unwrap();
                (k, v.to_vec())
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (b"f".to_vec(), b"overlay".to_vec()),
                (b"e".to_vec(), b"overlay".to_vec()),
                (b"b".to_vec(), b"overlay".to_vec()),
            ]
        );
        // A generation applied in the middle of a backward scan gives no key twice.
        let mut scan = s.range_backward(b"a", b"z");
        assert_eq!(scan.next().unwrap().unwrap().0, b"g");
        layer.apply(unlogged).unwrap();
        let rest: Vec<Vec<u8>> = scan.map(|e| e.unwrap().0).collect();
        assert_eq!(
            rest,
            vec![b"f".to_vec(), b"e".to_vec(), b"b".to_vec(), b"a".to_vec()]
        );
    }

    /// The applier hands sled a generation in the middle of a scan: sled's live iterator
    /// then comes up with keys the overlay already gave; they are not given twice.
    #[test]
    fn a_scan_gives_each_key_once_while_the_overlay_is_applied() {
        let (_dir, layer) = layer();
        let s = Space::new(&layer, b's');
        s.insert(b"a", b"sled").unwrap();
        layer.apply(unlogged).unwrap();
        s.insert(b"b", b"overlay").unwrap();
        s.insert(b"c", b"overlay").unwrap();
        s.remove(b"a").unwrap();
        let mut scan = s.iter();
        assert_eq!(scan.next().unwrap().unwrap().0, b"b");
        layer.apply(unlogged).unwrap(); // b and c now in sled too, a gone from it
        s.insert(b"d", b"written after the scan began").unwrap();
        layer.apply(unlogged).unwrap();
        let rest: Vec<Vec<u8>> = scan.map(|e| e.unwrap().0).collect();
        assert!(
            rest == [b"c".to_vec()] || rest == [b"c".to_vec(), b"d".to_vec()],
            "{rest:?}"
        );

        // Also when sled had run out before the apply.
        let t = Space::new(&layer, b't');
        t.insert(b"x", b"overlay").unwrap();
        let mut scan = t.iter();
        assert_eq!(scan.next().unwrap().unwrap().0, b"x");
        layer.apply(unlogged).unwrap();
        assert!(scan.next().is_none());
    }

    #[test]
    fn counters_add_up_across_the_overlay_and_sled() {
        let (_dir, layer) = layer();
        let c = Space::new(&layer, b'c');
        let mut w = Writes::default();
        w.bump(&c, b"n", 5);
        w.commit(&layer).unwrap();
        layer.apply(unlogged).unwrap();
        let mut w = Writes::default();
        w.bump(&c, b"n", -2);
        w.commit(&layer).unwrap();
        c.add(b"n", 10).unwrap();
        assert_eq!(read_be(&c.get(b"n").unwrap().unwrap()), Some(13));
        layer.apply(unlogged).unwrap();
        assert_eq!(read_be(&layer.tree.get(b"cn").unwrap().unwrap()), Some(13));
    }

    #[test]
    fn a_new_key_removed_before_the_apply_never_reaches_sled() {
        let (_dir, layer) = layer();
        let s = Space::new(&layer, b's');
        let mut w = Writes::default();
        w.insert_new(&s, b"short", b"lived");
        w.insert_new(&s, b"kept", b"v");
        w.commit(&layer).unwrap();
        assert_eq!(keys(s.iter()).len(), 2);
        s.remove(b"short").unwrap();
        assert_eq!(s.get(b"short").unwrap(), None);
        assert_eq!(keys(s.iter()), vec![(b"kept".to_vec(), b"v".to_vec())]);
        assert_eq!(
            layer.overlay().active.len(),
            1,
            "the pair left no removal behind"
        );
        layer.apply(unlogged).unwrap();
        assert_eq!(layer.tree.len(), 1);

        // Once sled has it, a removal goes to sled, even of a key written as new.
        s.remove(b"kept").unwrap();
        layer.apply(unlogged).unwrap();
        assert_eq!(layer.tree.len(), 0);
    }

    #[test]
    fn a_key_the_overlay_has_is_not_taken_for_new() {
        let (_dir, layer) = layer();
        let s = Space::new(&layer, b's');
        // In sled, then removed in the overlay: written again "as new", then removed
        // again, the removal must still reach sled.
        s.insert(b"k", b"old").unwrap();
        layer.apply(unlogged).unwrap();
        s.remove(b"k").unwrap();
        let mut w = Writes::default();
        w.insert_new(&s, b"k", b"again");
        w.commit(&layer).unwrap();
        s.remove(b"k").unwrap();
        layer.apply(unlogged).unwrap();
        assert_eq!(layer.tree.get(b"sk").unwrap(), None);

        // Being applied (sealed) when written "as new": not new to sled after all.
        s.insert(b"j", b"sealed").unwrap();
        {
            let mut o = layer.overlay();
            let generation = Arc::new(std::mem::take(&mut o.active));
            o.sealed = generation;
        }
        let mut w = Writes::default();
        w.insert_new(&s, b"j", b"newer");
        w.commit(&layer).unwrap();
        s.remove(b"j").unwrap();
        assert!(
            layer.overlay().active.contains_key(&b"sj"[..]),
            "the removal is kept"
        );
    }

    /// The log refuses a generation: sled receives none of it, reads still see it, and
    /// the next apply hands it over whole with what was written since.
    #[test]
    fn a_generation_the_log_refuses_stays_in_the_overlay() {
        let (_dir, layer) = layer();
        let s = Space::new(&layer, b's');
        s.insert(b"1", b"one").unwrap();
        let mut w = Writes::default();
        w.insert_new(&s, b"new", b"short-lived");
        w.commit(&layer).unwrap();
        let refused = layer.apply(|_| Err(io::Error::other("disk full")));
        assert!(refused.is_err());
        assert_eq!(layer.tree.len(), 0);
        assert_eq!(s.get(b"1").unwrap().unwrap().as_ref(), b"one");
        // A failed apply may have reached sled in part: its new keys are new no more, and
        // their removal must reach sled.
        s.remove(b"new").unwrap();
        assert!(layer.overlay().active.contains_key(&b"snew"[..]));
        s.insert(b"2", b"two").unwrap();
        let mut logged = Vec::new();
        layer
            .apply(|record| {
                logged = record.to_vec();
                Ok(())
            })
            .unwrap();
        assert_eq!(layer.tree.len(), 2);
        // What was logged is what sled received, read back as the log reads it.
        let (_dir2, layer2) = self::layer();
        let (records, torn) = crate::wal::tests_support::parse(&logged);
        assert!(!torn);
        for r in records {
            let crate::wal::Logged::Generation(ops) = r else {
                panic!("a generation record")
            };
            layer2.replay(ops);
        }
        layer2.apply(unlogged).unwrap();
        let in_sled = |l: &Layered| -> Vec<(Vec<u8>, Vec<u8>)> {
            l.tree
                .iter()
                .map(|e| {
                    let (k, v) = e.unwrap();
                    (k.to_vec(), v.to_vec())
                })
                .collect()
        };
        assert_eq!(in_sled(&layer), in_sled(&layer2));
    }

    #[test]
    fn a_generation_reaches_sled_whole() {
        let (_dir, layer) = layer();
        let s = Space::new(&layer, b's');
        let mut w = Writes::default();
        for i in 0..100u64 {
            w.insert(&s, be(i), b"v");
        }
        w.commit(&layer).unwrap();
        assert_eq!(layer.tree.len(), 0, "nothing reaches sled before an apply");
        layer.apply(unlogged).unwrap();
        assert_eq!(layer.tree.len(), 100);
    }
}
