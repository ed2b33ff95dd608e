//! The fsync journal: durable batches made durable by overwriting a preallocated file.
//!
//! A RocksDB WAL sync is an fdatasync of a file that grows, which writes the file's new size
//! as well as its bytes (measured on this VM: 215–240 us for a 2 KiB append plus fdatasync,
//! 145–155 us for the same bytes written over blocks already on disk). Each
//! batch `RocksKv` writes is appended here first (so a process crash loses nothing) and then
//! goes to its WAL unsynced (`applier.rs`, so that a read-only opener sees it); a durable
//! batch syncs this file alone. After a crash the database may lack a batch written here (the
//! process died before its WAL write, or a power cut took the WAL's unsynced tail):
//! `RocksKv::open` replays the entries here that the database does not hold yet, found by the
//! stamp each batch writes into the database along with its own keys.
//!
//! Layout: `FILE_BYTES` bytes, zero-filled and synced at creation, holding entries back to
//! back from offset 0: payload length (u32 LE), epoch (u64 LE), sequence number (u64 LE), the
//! first 16 bytes of blake3 over those three fields and the payload, then the payload (a
//! RocksDB `WriteBatch` as its bytes). A lap is one epoch: sequence numbers 0, 1, 2, ... from
//! offset 0. An entry that does not fit ends the lap: its batch is written with a WAL sync
//! instead, after which every earlier entry is in the database for good and the next lap
//! starts over at offset 0 with the next epoch. Reading stops at the first entry that is torn,
//! from an older lap, or out of sequence.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Size of the journal file: some 400 one-append commits per lap.
const FILE_BYTES: u64 = 1 << 20;
const HEADER: usize = 4 + 8 + 8 + 16;

/// Where a batch stands in the journal: epochs, then sequence numbers within one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    pub epoch: u64,
    pub seq: u64,
}

impl Stamp {
    pub const ENCODED_LEN: usize = 16;

    /// Big-endian, so that stamps compare as their encodings do.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.epoch.to_be_bytes());
        out[8..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED_LEN] = bytes.try_into().ok()?;
        Some(Self {
            epoch: u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            seq: u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes")),
        })
    }
}

/// One entry of the current lap, as read back at open.
pub struct Entry {
    pub stamp: Stamp,
    pub payload: Vec<u8>,
}

pub struct Journal {
    file: File,
    path: PathBuf,
    /// Where the next entry goes.
    pos: u64,
    next: Stamp,
    /// A batch too large for the lap was written without a sync: the entries here no longer
    /// hold every batch since the lap began, so the next durable batch syncs the WAL instead.
    gap: bool,
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_owned(), source }
}

fn checksum(len: u32, stamp: Stamp, payload: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&stamp.epoch.to_le_bytes());
    h.update(&stamp.seq.to_le_bytes());
    h.update(payload);
    h.finalize().as_bytes()[..16].try_into().expect("16 of 32 bytes")
}

impl Journal {
    /// Opens the journal at `path`, creating it (zero-filled, synced) when absent, and returns
    /// the entries of its current lap. Appends may start once the caller has put those entries
    /// beyond reach of a crash and called `restart`.
    pub fn open(path: &Path) -> Result<(Self, Vec<Entry>)> {
        if !path.exists() {
            create_zeroed(path)?;
        }
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| io_error(path, e))?;
        let mut bytes = vec![0; FILE_BYTES as usize];
        let read = file.read_at(&mut bytes, 0).map_err(|e| io_error(path, e))?;
        bytes.truncate(read);
        let entries = read_lap(&bytes);
        // Only the lap's epoch matters to `restart`; until it, the gap refuses every append.
        let next = Stamp { epoch: entries.last().map_or(1, |e| e.stamp.epoch), seq: 0 };
        let journal = Self { file, path: path.to_owned(), pos: 0, next, gap: true };
        Ok((journal, entries))
    }

    /// Starts a new lap after everything journaled so far (and `at_least`) is durable in the
    /// database.
    pub fn restart(&mut self, at_least: Option<Stamp>) {
        let epoch = self.next.epoch.max(at_least.map_or(0, |s| s.epoch)) + 1;
        self.next = Stamp { epoch, seq: 0 };
        self.pos = 0;
        self.gap = false;
    }

    /// The stamp the next journaled batch carries, when a payload of `len` bytes still fits
    /// in this lap (and no unjournaled batch came before it in the lap).
    pub fn stamp_for(&self, len: usize) -> Option<Stamp> {
        let fits = self.pos + (HEADER + len) as u64 <= FILE_BYTES;
        (fits && !self.gap).then_some(self.next)
    }

    /// A batch written to the WAL without an entry here; until the next `restart`, durable
    /// batches must sync the WAL.
    pub fn skip(&mut self) {
        self.gap = true;
    }

    /// Writes the entry for `stamp` (from `stamp_for`); `sync` makes it durable.
    pub fn append(&mut self, stamp: Stamp, payload: &[u8]) -> Result<()> {
        debug_assert_eq!(Some(stamp), self.stamp_for(payload.len()));
        let len = u32::try_from(payload.len()).expect("an entry fits in the journal");
        let mut entry = Vec::with_capacity(HEADER + payload.len());
        entry.extend_from_slice(&len.to_le_bytes());
        entry.extend_from_slice(&stamp.epoch.to_le_bytes());
        entry.extend_from_slice(&stamp.seq.to_le_bytes());
        entry.extend_from_slice(&checksum(len, stamp, payload));
        entry.extend_from_slice(payload);
        self.file.write_all_at(&entry, self.pos).map_err(|e| io_error(&self.path, e))?;
        self.pos += entry.len() as u64;
        self.next.seq += 1;
        Ok(())
    }

    /// Makes every entry written so far durable.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| io_error(&self.path, e))
    }
}

/// The entries of the lap that starts at offset 0, up to the first that does not belong.
fn read_lap(bytes: &[u8]) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut pos = 0;
    while let Some(header) = bytes.get(pos..pos + HEADER) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let stamp = Stamp {
            epoch: u64::from_le_bytes(header[4..12].try_into().expect("8 bytes")),
            seq: u64::from_le_bytes(header[12..20].try_into().expect("8 bytes")),
        };
        let expected = entries.last().map_or(0, |e| e.stamp.seq + 1);
        let same_lap = entries.last().is_none_or(|e| e.stamp.epoch == stamp.epoch);
        let Some(payload) = bytes.get(pos + HEADER..pos + HEADER + len as usize) else { break };
        if stamp.seq != expected || !same_lap || header[20..] != checksum(len, stamp, payload) {
            break;
        }
        entries.push(Entry { stamp, payload: payload.to_vec() });
        pos += HEADER + len as usize;
    }
    entries
}

/// Writes `FILE_BYTES` zeros and syncs them and the directory entry, so later entries
/// overwrite blocks already on disk.
fn create_zeroed(path: &Path) -> Result<()> {
    let partial = path.with_extension("new");
    let file = File::create(&partial).map_err(|e| io_error(&partial, e))?;
    file.write_all_at(&vec![0; FILE_BYTES as usize], 0).map_err(|e| io_error(&partial, e))?;
    file.sync_all().map_err(|e| io_error(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| io_error(path, e))?;
    let dir = path.parent().expect("the journal lives in the store directory");
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lap_reads_back_until_a_torn_or_stale_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, found) = Journal::open(&path).unwrap();
        assert!(found.is_empty());
        j.restart(None);
        for i in 0..3u8 {
            let s = j.stamp_for(10).unwrap();
            j.append(s, &[i; 10]).unwrap();
        }
        j.sync().unwrap();
        let (_, found) = Journal::open(&path).unwrap();
        assert_eq!(found.iter().map(|e| e.payload[0]).collect::<Vec<_>>(), [0, 1, 2]);
        // A new lap overwrites the start; the old lap's later entries no longer count.
        let (mut j, _) = Journal::open(&path).unwrap();
        j.restart(None);
        let s = j.stamp_for(10).unwrap();
        j.append(s, &[9; 10]).unwrap();
        j.sync().unwrap();
        let (_, found) = Journal::open(&path).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].payload, [9; 10]);
        // A torn entry ends the lap.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff], HEADER as u64 + 3).unwrap();
        assert!(Journal::open(&path).unwrap().1.is_empty());
    }

    #[test]
    fn a_batch_that_does_not_fit_ends_the_lap() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(&dir.path().join("journal")).unwrap();
        assert_eq!(j.stamp_for(1), None, "no appends before the lap is restarted");
        j.restart(Some(Stamp { epoch: 7, seq: 3 }));
        assert_eq!(j.stamp_for(1), Some(Stamp { epoch: 8, seq: 0 }));
        assert_eq!(j.stamp_for(FILE_BYTES as usize), None);
        j.skip();
        assert_eq!(j.stamp_for(1), None, "after a skipped batch, until the next restart");
    }
}
