//! The RocksDB `Kv`: one database per capsule, one column family per job.
//!
//! Crash safety: every batch (but `Durability::Cache`) goes into the fsync journal
//! (`journal.rs`) and then, on the applier's thread (`applier.rs`), through the WAL, unsynced;
//! `Durability::Durable` syncs the journal before returning, or the WAL when the batch does not
//! fit in the journal's lap. On reopen the WAL is replayed in `TolerateCorruptedTailRecords`
//! mode: a record torn by a crash mid-write is dropped, while corruption anywhere else fails the
//! open with `StoreError::Corrupted` instead of silently rolling back (which
//! `PointInTimeRecovery` would do). Then the journal's entries past the stamp the database
//! holds are written again: what a crash kept from the WAL (a batch not yet applied, or the
//! WAL's unsynced tail after a power cut). Block checksums are verified on every read.
//!
//! Sub-record values of `PACK_MIN` bytes or more live in pack files (`packs.rs`) under
//! `<store>/packs`; the `subs` column family holds a tag byte and either the value itself or
//! its pack location.

use std::path::{Path, PathBuf};

use rocksdb::{
    ColumnFamilyDescriptor, DB, DBCompressionType, DBRecoveryMode, Direction, IteratorMode, Options, ReadOptions,
    WriteBatch, WriteOptions,
};

use std::sync::{Arc, Mutex};

use super::applier::Applier;
use super::journal::{Journal, Stamp};
use super::kv::{Batch, Cf, Durability, Entries, Kv, Staged, prefix_end};
use super::packs::{PackLoc, Packs};
use crate::{Result, StoreError};

/// Sub-record values from this size on go to packs. Smaller ones (small files, most tree
/// nodes) stay in RocksDB, where a commit of them needs no pack fdatasync.
const PACK_MIN: usize = 16 << 10;
/// A durable batch with at most this many bytes of large values (an fsync after a small
/// change: one rewritten chunk, a few nodes) keeps them inline too: one WAL sync is then the
/// whole cost of durability, where a pack would add an fdatasync of its own. 2000 appends
/// each followed by fsync made two disk flushes per fsync before.
const INLINE_DURABLE_MAX: usize = 256 << 10;
const INLINE: u8 = 0;
const IN_PACK: u8 = 1;
/// In `Cf::Meta`: the journal stamp of the last journaled batch, written in that batch.
const JOURNAL_STAMP_KEY: &[u8] = b"journal-stamp";
/// What putting the stamp adds to a `WriteBatch`, at most (tag, column family, lengths, key,
/// value).
const STAMP_PUT_MAX: usize = 16 + JOURNAL_STAMP_KEY.len() + Stamp::ENCODED_LEN;

pub struct RocksKv {
    db: Arc<DB>,
    packs: Packs,
    path: PathBuf,
    /// None when opened read-only (beside a mount), and then writes fail before any pack is
    /// touched.
    journal: Option<Mutex<Journal>>,
    /// Writes journaled batches; every operation waits for it first. None when read-only.
    applier: Option<Applier>,
}

impl RocksKv {
    /// Opens the store at `path`, creating it when `create` is set.
    pub fn open(path: &Path, create: bool) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(create);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        opts.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
        opts.set_max_background_jobs(2);
        // Payloads live in packs, so memtables hold indexes: 16 MiB for all of a store's
        // column families bounds the memory of each open store (a server keeps many open) and
        // the space RocksDB preallocates for its log (1.1 x the largest memtable, 70 MiB by
        // default, on disk for every open store).
        opts.set_db_write_buffer_size(16 << 20);
        // RocksDB's own text log: a new file each open (a server reopens stores as they go
        // idle and come back), 1000 kept by default.
        opts.set_keep_log_file_num(2);
        opts.set_max_log_file_size(1 << 20);
        let cfs = Cf::ALL.iter().map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| store_error(path, e))?;
        let packs = Packs::open(&path.join("packs"), create)?;
        let (mut journal, entries) = Journal::open(&path.join("journal"))?;
        let mut kv = Self { db: Arc::new(db), packs, path: path.to_owned(), journal: None, applier: None };
        let stored = kv.db.get_cf(kv.cf(Cf::Meta), JOURNAL_STAMP_KEY).map_err(|e| store_error(path, e))?;
        let stored = stored.as_deref().and_then(Stamp::decode);
        let lost: Vec<_> = entries.iter().filter(|e| Some(e.stamp) > stored).collect();
        for entry in &lost {
            let batch = WriteBatch::from_data(&entry.payload);
            kv.db.write_opt(batch, &WriteOptions::default()).map_err(|e| store_error(path, e))?;
        }
        if !lost.is_empty() {
            tracing::warn!(
                "{}: {} batches the WAL had lost came back from the fsync journal",
                path.display(),
                lost.len()
            );
        }
        // The lap about to be overwritten must be in the database for good first, replayed or
        // left unsynced in the WAL by a process that was killed.
        kv.sync()?;
        journal.restart(stored);
        kv.journal = Some(Mutex::new(journal));
        kv.applier = Some(Applier::start(kv.db.clone(), path)?);
        Ok(kv)
    }

    /// Opens the store at `path` read-only, beside a process that has it open for writing (a
    /// mount): no lock is taken, and the write-ahead log is replayed into memory, so every
    /// batch written before this call (durable or not) is seen. Writes fail.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.set_paranoid_checks(true);
        opts.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
        let cfs = Cf::ALL.iter().map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options()));
        let db = DB::open_cf_descriptors_read_only(&opts, path, cfs, false).map_err(|e| store_error(path, e))?;
        let packs = Packs::open(&path.join("packs"), false)?;
        Ok(Self { db: Arc::new(db), packs, path: path.to_owned(), journal: None, applier: None })
    }

    /// A `subs` value as stored: the tag, then the value or its location.
    fn decode_sub(&self, stored: &[u8]) -> Result<Vec<u8>> {
        match stored.split_first() {
            Some((&INLINE, value)) => Ok(value.to_vec()),
            Some((&IN_PACK, loc)) => match PackLoc::decode(loc) {
                Some(loc) => self.packs.read(loc),
                None => {
                    Err(StoreError::BadIndex { cf: Cf::Subs.name(), detail: "malformed pack location".into() }.into())
                }
            },
            _ => Err(StoreError::BadIndex { cf: Cf::Subs.name(), detail: "unknown value tag".into() }.into()),
        }
    }

    /// Waits for the journaled batch still being written, if any.
    fn settle(&self) -> Result<()> {
        self.applier.as_ref().map_or(Ok(()), Applier::settle)
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(cf.name()).expect("every column family is opened in RocksKv::open")
    }
}

/// Everything stored is hashes, signatures or ciphertext: compression only costs CPU.
fn cf_options() -> Options {
    let mut o = Options::default();
    o.set_compression_type(DBCompressionType::None);
    o
}

fn store_error(path: &Path, e: rocksdb::Error) -> crate::Error {
    let msg = format!("{}: {}", path.display(), e.clone().into_string());
    match e.kind() {
        rocksdb::ErrorKind::Corruption => StoreError::Corrupted(msg),
        _ => StoreError::Backend(msg),
    }
    .into()
}

impl Kv for RocksKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.settle()?;
        let stored = self
            .db
            .get_pinned_cf_opt(self.cf(cf), key, &ReadOptions::default())
            .map_err(|e| store_error(&self.path, e))?;
        match stored {
            Some(v) if cf == Cf::Subs => self.decode_sub(&v).map(Some),
            v => Ok(v.map(|v| v.to_vec())),
        }
    }

    fn value_len(&self, cf: Cf, key: &[u8]) -> Result<Option<usize>> {
        self.settle()?;
        let stored = self
            .db
            .get_pinned_cf_opt(self.cf(cf), key, &ReadOptions::default())
            .map_err(|e| store_error(&self.path, e))?;
        Ok(match stored {
            Some(v) if cf == Cf::Subs => match v.split_first() {
                Some((&IN_PACK, loc)) => PackLoc::decode(loc).map(|loc| loc.len as usize),
                _ => Some(v.len().saturating_sub(1)),
            },
            v => v.map(|v| v.len()),
        })
    }

    /// Pack values are appended and synced first, so no location RocksDB persists (by WAL
    /// sync, a memtable flush or the kernel's writeback) can name bytes that are not on disk;
    /// `Durability::Cache` alone skips the sync (bytes that can be fetched again).
    fn write(&self, batch: Batch, durability: Durability) -> Result<()> {
        let Some(journal) = &self.journal else {
            return Err(StoreError::Backend(format!("{}: opened read-only", self.path.display())).into());
        };
        let is_large = |cf: &Cf, len: usize| *cf == Cf::Subs && len >= PACK_MIN;
        let op_len = |v: &Option<Vec<u8>>| v.as_ref().map_or(0, Vec::len);
        let pieces_len = |p: &[Vec<u8>]| p.iter().map(Vec::len).sum::<usize>();
        let sizes = batch.ops.iter().map(|(cf, _, v)| (cf, op_len(v)));
        let sizes = sizes.chain(batch.pieces.iter().map(|(cf, _, p)| (cf, pieces_len(p))));
        let large_bytes: usize = sizes.filter(|(cf, len)| is_large(cf, *len)).map(|(_, len)| len).sum();
        let packing = match durability {
            Durability::Cache | Durability::Buffered => true,
            Durability::Durable => large_bytes > INLINE_DURABLE_MAX,
        };
        let op_packed = |cf: &Cf, v: &Option<Vec<u8>>| packing && is_large(cf, op_len(v));
        let pieces_packed = |cf: &Cf, p: &[Vec<u8>]| packing && is_large(cf, pieces_len(p));
        // Packed values in order: the ops' first, then the pieces'.
        let mut large: Vec<Vec<&[u8]>> = batch
            .ops
            .iter()
            .filter(|(cf, _, v)| op_packed(cf, v))
            .filter_map(|(_, _, v)| v.as_deref())
            .map(|v| vec![v])
            .collect();
        large.extend(
            batch
                .pieces
                .iter()
                .filter(|(cf, _, p)| pieces_packed(cf, p))
                .map(|(_, _, p)| p.iter().map(Vec::as_slice).collect()),
        );
        let mut locs = Vec::new().into_iter();
        if !large.is_empty() {
            let (appended, append) = self.packs.append(&large)?;
            locs = appended.into_iter();
            // Cached bytes can be fetched again: they are not synced, so a power cut may leave
            // a kept location naming bytes that never reached the disk. The sparse replica's
            // read finds them unproven and fetches them again (`Capsule::read_sub_record`).
            if durability != Durability::Cache {
                self.packs.sync_through(append)?;
            }
        }
        if let Some(append) = batch.staged.iter().map(|(_, _, staged)| staged.append).max() {
            self.packs.sync_through(append)?;
        }
        let mut wb = WriteBatch::default();
        for (cf, key, staged) in &batch.staged {
            wb.put_cf(self.cf(*cf), key, [&[IN_PACK][..], &staged.loc.encode()].concat());
        }
        for (cf, key, value) in &batch.ops {
            match value {
                Some(_) if op_packed(cf, value) => {
                    let loc = locs.next().expect("one location per packed value");
                    wb.put_cf(self.cf(*cf), key, [&[IN_PACK][..], &loc.encode()].concat())
                }
                Some(v) if *cf == Cf::Subs => wb.put_cf(self.cf(*cf), key, [&[INLINE][..], v].concat()),
                Some(v) => wb.put_cf(self.cf(*cf), key, v),
                None => wb.delete_cf(self.cf(*cf), key),
            }
        }
        for (cf, key, pieces) in &batch.pieces {
            if pieces_packed(cf, pieces) {
                let loc = locs.next().expect("one location per packed value");
                wb.put_cf(self.cf(*cf), key, [&[IN_PACK][..], &loc.encode()].concat());
            } else {
                let tag: &[u8] = if *cf == Cf::Subs { &[INLINE] } else { &[] };
                let joined: Vec<&[u8]> = std::iter::once(tag).chain(pieces.iter().map(Vec::as_slice)).collect();
                wb.put_cf(self.cf(*cf), key, joined.concat());
            }
        }
        let mut wo = WriteOptions::default();
        let applier = self.applier.as_ref().expect("a store with a journal has an applier");
        if durability == Durability::Cache {
            applier.settle()?;
            // Fetched sub-records skip the WAL and the journal: a crash loses them whole, to be
            // fetched again.
            wo.disable_wal(true);
            return self.db.write_opt(wb, &wo).map_err(|e| store_error(&self.path, e));
        }
        let durable = durability == Durability::Durable;
        // Held across both writes, so the journal holds batches in the WAL's order.
        let mut journal = journal.lock().expect("no panics while locked");
        // Before the entry is written: a store that failed to apply a batch takes no more.
        applier.settle()?;
        match journal.stamp_for(wb.size_in_bytes() + STAMP_PUT_MAX) {
            Some(stamp) => {
                wb.put_cf(self.cf(Cf::Meta), JOURNAL_STAMP_KEY, stamp.encode());
                journal.append(stamp, wb.data())?;
                if !durable {
                    return applier.write_now(wb);
                }
                // Safe from a process crash now; the database takes it while the disk flushes.
                applier.apply(wb)?;
                journal.sync()
            }
            None => {
                wo.set_sync(durable);
                self.db.write_opt(wb, &wo).map_err(|e| store_error(&self.path, e))?;
                if durable {
                    journal.restart(None);
                } else {
                    journal.skip();
                }
                Ok(())
            }
        }
    }

    fn stage(&self, values: &[Vec<&[u8]>]) -> Result<Vec<Option<Staged>>> {
        let is_large = |pieces: &Vec<&[u8]>| pieces.iter().map(|p| p.len()).sum::<usize>() >= PACK_MIN;
        let large: Vec<&Vec<&[u8]>> = values.iter().filter(|v| is_large(v)).collect();
        if large.is_empty() {
            return Ok(vec![None; values.len()]);
        }
        let (locs, append) = self.packs.append(&large)?;
        let mut locs = locs.into_iter();
        Ok(values
            .iter()
            .map(|v| is_large(v).then(|| Staged { loc: locs.next().expect("one location a value"), append }))
            .collect())
    }

    fn unstage(&self, staged: &[Staged]) -> Result<()> {
        let locs: Vec<PackLoc> = staged.iter().map(|s| s.loc).collect();
        self.packs.reclaim(&locs)
    }

    /// Pack values are synced before any batch names them, so only the WAL is left.
    fn sync(&self) -> Result<()> {
        self.settle()?;
        self.db.flush_wal(true).map_err(|e| store_error(&self.path, e))
    }

    fn scan<'a>(&'a self, cf: Cf, prefix: &[u8], reverse: bool) -> Result<Entries<'a>> {
        self.settle()?;
        let end = prefix_end(prefix);
        let mode = match (reverse, &end) {
            (false, _) => IteratorMode::From(prefix, Direction::Forward),
            (true, Some(end)) => IteratorMode::From(end, Direction::Reverse),
            (true, None) => IteratorMode::End,
        };
        let prefix = prefix.to_vec();
        let path = self.path.clone();
        let iter = self
            .db
            .iterator_cf_opt(self.cf(cf), ReadOptions::default(), mode)
            .map(move |item| item.map_err(|e| store_error(&path, e)))
            // A reverse seek lands on the last key <= end, which may be `end` itself.
            .skip_while(move |item| matches!((item, &end), (Ok((k, _)), Some(end)) if **k >= **end))
            .take_while(move |item| item.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
            .map(move |item| {
                let (k, v) = item?;
                let v = if cf == Cf::Subs { self.decode_sub(&v)? } else { v.into_vec() };
                Ok((k.into_vec(), v))
            });
        Ok(Box::new(iter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemKv;

    /// A copy of the store taken while it is open, with every WAL file cut to nothing: what a
    /// power cut leaves when the WAL was never synced.
    fn after_power_cut(live: &Path, journal: bool) -> tempfile::TempDir {
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(live).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir(copy.path().join(&name)).unwrap();
                continue;
            }
            if !journal && name == "journal" {
                continue;
            }
            std::fs::copy(entry.path(), copy.path().join(&name)).unwrap();
            if name.to_string_lossy().ends_with(".log") {
                std::fs::File::options().write(true).open(copy.path().join(&name)).unwrap().set_len(0).unwrap();
            }
        }
        copy
    }

    #[test]
    fn durable_batches_outlive_a_lost_wal_through_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let rocks = RocksKv::open(dir.path(), true).unwrap();
        for i in 0..5u8 {
            let mut b = Batch::default();
            b.put(Cf::Order, vec![i], vec![i; 100]);
            let durability = if i % 2 == 0 { Durability::Durable } else { Durability::Buffered };
            rocks.write(b, durability).unwrap();
        }
        // The copy without the journal shows what the cut WAL alone loses...
        let bare = after_power_cut(dir.path(), false);
        assert_eq!(RocksKv::open(bare.path(), false).unwrap().get(Cf::Order, &[4]).unwrap(), None);
        // ...and with it, every batch up to the last durable one comes back.
        let cut = after_power_cut(dir.path(), true);
        let reopened = RocksKv::open(cut.path(), false).unwrap();
        for i in 0..5u8 {
            assert_eq!(reopened.get(Cf::Order, &[i]).unwrap(), Some(vec![i; 100]), "batch {i}");
        }
        // A batch larger than the journal's lap is synced through the WAL instead.
        let mut b = Batch::default();
        b.put(Cf::Order, vec![9], vec![9; 2 << 20]);
        reopened.write(b, Durability::Durable).unwrap();
        drop(reopened);
        assert_eq!(RocksKv::open(cut.path(), false).unwrap().get(Cf::Order, &[9]).unwrap(), Some(vec![9; 2 << 20]));
    }

    /// RocksKv and MemKv must agree on scans, including prefixes that end in 0xff.
    #[test]
    fn scans_match_the_memory_store() {
        let dir = tempfile::tempdir().unwrap();
        let rocks = RocksKv::open(dir.path(), true).unwrap();
        let mem = MemKv::new();
        let keys: Vec<Vec<u8>> =
            vec![vec![1], vec![1, 0], vec![1, 0xff], vec![1, 0xff, 3], vec![2], vec![0xff], vec![0xff, 0xff]];
        for kv in [&rocks as &dyn Kv, &mem] {
            let mut b = Batch::default();
            keys.iter().for_each(|k| b.put(Cf::Order, k.clone(), b"v".to_vec()));
            b.put(Cf::Seqs, vec![1, 5], b"other cf".to_vec());
            // Sub-record values on both sides of PACK_MIN: inline and in a pack.
            b.put(Cf::Subs, vec![1], vec![3; PACK_MIN - 1]);
            b.put(Cf::Subs, vec![2], vec![4; PACK_MIN]);
            b.put(Cf::Subs, vec![3], Vec::new());
            kv.write(b, Durability::Durable).unwrap();
        }
        let subs = |kv: &dyn Kv| kv.scan(Cf::Subs, &[], false).unwrap().map(Result::unwrap).collect::<Vec<_>>();
        assert_eq!(subs(&rocks), subs(&mem));
        assert_eq!(rocks.get(Cf::Subs, &[2]).unwrap(), Some(vec![4; PACK_MIN]));
        for key in [[1], [2], [3], [4]] {
            let len = rocks.get(Cf::Subs, &key).unwrap().map(|v| v.len());
            assert_eq!(rocks.value_len(Cf::Subs, &key).unwrap(), len, "told without reading the pack");
        }
        assert!(dir.path().join("packs").join("00000001.pack").exists());
        for prefix in [&[][..], &[1], &[1, 0xff], &[0xff], &[3]] {
            for reverse in [false, true] {
                let got = |kv: &dyn Kv| {
                    kv.scan(Cf::Order, prefix, reverse).unwrap().map(|r| r.unwrap().0).collect::<Vec<_>>()
                };
                assert_eq!(got(&rocks), got(&mem), "prefix {prefix:?} reverse {reverse}");
            }
        }
    }
}
