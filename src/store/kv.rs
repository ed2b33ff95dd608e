//! The key-value interface every local store implements: column families and atomic batches.

use crate::Result;
use crate::store::packs::PackLoc;

/// Column families, one per job. Keys and values are described in ARCHITECTURE.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    Meta,
    Records,
    Subs,
    Witness,
    Seqs,
    Order,
    Proven,
    Attest,
    Evidence,
    Heights,
    Frontiers,
    Memberships,
    Aside,
}

impl Cf {
    pub const ALL: [Cf; 13] = [
        Cf::Meta,
        Cf::Records,
        Cf::Subs,
        Cf::Witness,
        Cf::Seqs,
        Cf::Order,
        Cf::Proven,
        Cf::Attest,
        Cf::Evidence,
        Cf::Heights,
        Cf::Frontiers,
        Cf::Memberships,
        Cf::Aside,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Records => "records",
            Cf::Subs => "subs",
            Cf::Witness => "witness",
            Cf::Seqs => "seqs",
            Cf::Order => "order",
            Cf::Proven => "proven",
            Cf::Attest => "attest",
            Cf::Evidence => "evidence",
            Cf::Heights => "heights",
            Cf::Frontiers => "frontiers",
            Cf::Memberships => "memberships",
            Cf::Aside => "aside",
        }
    }
}

/// Whether `write` returns before or after the batch is on stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// In the OS page cache: survives a process crash, not a power cut.
    Buffered,
    /// fsync'ed: survives both.
    Durable,
    /// Bytes that can be fetched again (a sparse replica's sub-records): like `Buffered`,
    /// and a store may keep them where writing costs least, with no sync at all.
    Cache,
}

/// A value written ahead of the batch that will name it (`Kv::stage`), where the store keeps
/// large values; not durable until that batch is written, and given back (`Kv::unstage`) if
/// the batch is refused.
#[derive(Clone, Copy, Debug)]
pub struct Staged {
    pub(crate) loc: PackLoc,
    /// The number of the pack append that wrote it.
    pub(crate) append: u64,
}

/// Writes applied all together or not at all.
#[derive(Default, Debug)]
pub struct Batch {
    pub(crate) ops: Vec<(Cf, Vec<u8>, Option<Vec<u8>>)>,
    /// Puts of values given as pieces, one after another (a received payload between its
    /// length and its path): joined only where the store keeps the value inline.
    pub(crate) pieces: Vec<(Cf, Vec<u8>, Vec<Vec<u8>>)>,
    /// Puts of staged values: the store makes them durable before the batch.
    pub(crate) staged: Vec<(Cf, Vec<u8>, Staged)>,
}

impl Batch {
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((cf, key.into(), Some(value.into())));
    }
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push((cf, key.into(), None));
    }
    pub fn put_pieces(&mut self, cf: Cf, key: impl Into<Vec<u8>>, pieces: Vec<Vec<u8>>) {
        self.pieces.push((cf, key.into(), pieces));
    }
    pub fn put_staged(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: Staged) {
        self.staged.push((cf, key.into(), value));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.pieces.is_empty() && self.staged.is_empty()
    }
}

pub type Entry = (Vec<u8>, Vec<u8>);
pub type Entries<'a> = Box<dyn Iterator<Item = Result<Entry>> + 'a>;

pub trait Kv: Send + Sync {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// The length of the value `get` would return, where the store can tell it without
    /// reading the value (a sub-record kept in a pack).
    fn value_len(&self, cf: Cf, key: &[u8]) -> Result<Option<usize>> {
        Ok(self.get(cf, key)?.map(|v| v.len()))
    }
    fn write(&self, batch: Batch, durability: Durability) -> Result<()>;
    /// Writes the sub-record `values` (each as its pieces, one after another) the store keeps
    /// apart (large ones) now, for a batch to name later (`Batch::put_staged`), so that
    /// copying them overlaps an earlier batch's sync; None for a value the batch must carry
    /// itself, and for every value in a store that keeps none apart.
    fn stage(&self, values: &[Vec<&[u8]>]) -> Result<Vec<Option<Staged>>> {
        Ok(vec![None; values.len()])
    }
    /// Gives back the room of values staged for a batch that was refused (or named none of
    /// them): a refused upload costs no disk.
    fn unstage(&self, staged: &[Staged]) -> Result<()> {
        let _ = staged;
        Ok(())
    }
    /// Makes every write so far durable (as if each had been `Durability::Durable`).
    fn sync(&self) -> Result<()>;
    /// Entries whose key starts with `prefix`, ascending, or descending when `reverse`.
    fn scan<'a>(&'a self, cf: Cf, prefix: &[u8], reverse: bool) -> Result<Entries<'a>>;
}

/// The smallest key greater than every key starting with `prefix`, if one exists.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_carries_past_ff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
