//! Key spaces inside one sled tree, and atomic batches across them.
//!
//! All of the store's data lives in one sled `Tree`, each kind of record under its own
//! one-byte key prefix (a [`Space`]). A change that touches several records, counters
//! included, is one [`Writes`] batch applied with `Tree::apply_batch`, which sled makes
//! atomic: after a crash, all of it or none of it is there. This is also much cheaper than
//! sled's multi-tree transactions (measured: the journal ran 3× faster without them).

use std::collections::BTreeMap;

use sled::{Batch, IVec, Tree};

use crate::codec::{be, read_be};

/// One kind of record: keys are `prefix ++ key`.
#[derive(Debug, Clone)]
pub(crate) struct Space {
    tree: Tree,
    prefix: u8,
}

/// A key (without the space prefix) and its value.
pub(crate) type Entry = (Vec<u8>, IVec);
type Strip = fn(Result<(IVec, IVec), sled::Error>) -> Result<Entry, sled::Error>;
/// Entries of a space, in key order.
pub(crate) type Entries = std::iter::Map<sled::Iter, Strip>;

impl Space {
    pub(crate) fn new(tree: &Tree, prefix: u8) -> Self {
        Space {
            tree: tree.clone(),
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

    pub(crate) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<IVec>, sled::Error> {
        self.tree.get(self.full_key(key))
    }

    fn strip(item: Result<(IVec, IVec), sled::Error>) -> Result<Entry, sled::Error> {
        item.map(|(k, v)| (k[1..].to_vec(), v))
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub(crate) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Entries {
        self.tree
            .scan_prefix(self.full_key(prefix))
            .map(Self::strip as Strip)
    }

    /// Every entry, in key order.
    pub(crate) fn iter(&self) -> Entries {
        self.tree
            .scan_prefix([self.prefix])
            .map(Self::strip as Strip)
    }

    /// Adds `delta` to a counter at once (outside a batch).
    pub(crate) fn add(&self, name: impl AsRef<[u8]>, delta: u64) -> Result<(), sled::Error> {
        self.tree
            .update_and_fetch(self.full_key(name), |v| {
                Some(be(v.and_then(read_be).unwrap_or(0).saturating_add(delta)).to_vec())
            })
            .map(|_| ())
    }

    /// Entries from `start` (inclusive) to the end of the space.
    pub(crate) fn range_from(&self, start: impl AsRef<[u8]>) -> Entries {
        let end = vec![self.prefix + 1];
        self.tree
            .range(self.full_key(start)..end)
            .map(Self::strip as Strip)
    }

    /// A write of one record outside a batch (an update that stands alone).
    pub(crate) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<(), sled::Error> {
        self.tree
            .insert(self.full_key(key), value.as_ref())
            .map(|_| ())
    }

    pub(crate) fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), sled::Error> {
        self.tree.remove(self.full_key(key)).map(|_| ())
    }
}

/// Writes to apply together, counters included.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    batch: Batch,
    /// Counter deltas by full counter key, summed, applied at commit.
    counters: BTreeMap<Vec<u8>, i64>,
}

impl Writes {
    pub(crate) fn insert(&mut self, space: &Space, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.batch.insert(space.full_key(key), value.as_ref());
    }

    pub(crate) fn remove(&mut self, space: &Space, key: impl AsRef<[u8]>) {
        self.batch.remove(space.full_key(key));
    }

    pub(crate) fn bump(&mut self, counters: &Space, name: &[u8], delta: i64) {
        *self.counters.entry(counters.full_key(name)).or_insert(0) += delta;
    }

    /// Applies everything atomically. Counter read-modify-writes are only safe because
    /// every caller holds the store's write lock.
    pub(crate) fn commit(mut self, tree: &Tree) -> Result<(), sled::Error> {
        for (key, delta) in std::mem::take(&mut self.counters) {
            if delta == 0 {
                continue;
            }
            let current = tree.get(&key)?.and_then(|v| read_be(&v)).unwrap_or(0);
            self.batch
                .insert(key, &be(current.saturating_add_signed(delta)));
        }
        tree.apply_batch(self.batch)
    }
}
