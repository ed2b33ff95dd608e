//! The RocksDB `Kv`: one database per capsule, one column family per job.
//!
//! Crash safety: every batch goes through the WAL; `Durability::Durable` syncs it before
//! returning. On reopen the WAL is replayed in `TolerateCorruptedTailRecords` mode: a record
//! torn by a crash mid-write was never acknowledged and is dropped, while corruption anywhere
//! else fails the open with `StoreError::Corrupted` instead of silently rolling back (which
//! `PointInTimeRecovery` would do). Block checksums are verified on every read.

use std::path::{Path, PathBuf};

use rocksdb::{
    ColumnFamilyDescriptor, DB, DBCompressionType, DBRecoveryMode, Direction, IteratorMode, Options, ReadOptions,
    WriteBatch, WriteOptions,
};

use super::kv::{Batch, Cf, Durability, Entries, Kv, prefix_end};
use crate::{Result, StoreError};

pub struct RocksKv {
    db: DB,
    path: PathBuf,
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
        let cfs = Cf::ALL.iter().map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(*cf)));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| store_error(path, e))?;
        Ok(Self { db, path: path.to_owned() })
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(cf.name()).expect("every column family is opened in RocksKv::open")
    }
}

/// Everything stored is hashes, signatures or ciphertext: compression only costs CPU.
/// Sub-record values (chunks up to 64 KiB) go to blob files at flush, so compactions move
/// only keys and small values instead of rewriting every chunk again.
fn cf_options(cf: Cf) -> Options {
    let mut o = Options::default();
    o.set_compression_type(DBCompressionType::None);
    if cf == Cf::Subs {
        o.set_enable_blob_files(true);
        o.set_min_blob_size(4096);
        o.set_blob_compression_type(DBCompressionType::None);
        o.set_enable_blob_gc(true);
    }
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

/// RocksDB's own checksums guard every read, except sub-record values: each is proven by
/// its Merkle path (blake3) before anyone sees it, so the blob CRC (over a fifth of the time
/// of a 64 KiB chunk read, measured) adds nothing but cost. A damaged one is refused as
/// unverified data instead of reported as store corruption.
fn read_options(cf: Cf) -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_verify_checksums(cf != Cf::Subs);
    ro
}

impl Kv for RocksKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get_cf_opt(self.cf(cf), key, &read_options(cf)).map_err(|e| store_error(&self.path, e))
    }

    fn write(&self, batch: Batch, durability: Durability) -> Result<()> {
        let mut wb = WriteBatch::default();
        for (cf, key, value) in &batch.ops {
            match value {
                Some(v) => wb.put_cf(self.cf(*cf), key, v),
                None => wb.delete_cf(self.cf(*cf), key),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(durability == Durability::Durable);
        self.db.write_opt(wb, &wo).map_err(|e| store_error(&self.path, e))
    }

    fn scan<'a>(&'a self, cf: Cf, prefix: &[u8], reverse: bool) -> Result<Entries<'a>> {
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
            .iterator_cf_opt(self.cf(cf), read_options(cf), mode)
            .map(move |item| item.map_err(|e| store_error(&path, e)))
            // A reverse seek lands on the last key <= end, which may be `end` itself.
            .skip_while(move |item| matches!((item, &end), (Ok((k, _)), Some(end)) if **k >= **end))
            .take_while(move |item| item.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
            .map(|item| item.map(|(k, v)| (k.into_vec(), v.into_vec())));
        Ok(Box::new(iter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemKv;

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
            kv.write(b, Durability::Durable).unwrap();
        }
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
