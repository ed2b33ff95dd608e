//! Pack files: large sub-record values written once, beside RocksDB instead of through it.
//!
//! Through RocksDB a 64 KiB chunk was copied into the WAL, then into a blob file at flush,
//! each with a CRC, and again by blob garbage collection: well over half of a sequential
//! write's CPU time (perf). A pack is an append-only file; RocksDB keeps only a 17-byte
//! `PackLoc` for the value. Nothing in a pack is checksummed here: every sub-record is proven
//! by its Merkle path (blake3) before use, so a damaged value is refused as unverified.
//!
//! Ordering: `Packs::sync` (fdatasync) runs before any RocksDB write that names a new value,
//! so a location that reaches disk never points at bytes that did not. A crash may leave
//! bytes past the last named value; later appends simply start after them.
//!
//! Appends are numbered, and a sync says how far it reached (`sync_through`), so one thread
//! can append while another waits for the disk: a server copies the next batch's values in
//! while the batch before is synced and indexed. One fdatasync runs at a time; a caller
//! whose appends an earlier sync already covered does not wait for another.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use crate::{Error, Result, StoreError};

/// A new pack is started once the current one passes this size.
const PACK_LIMIT: u64 = 1 << 30;
const MAGIC: &[u8; 8] = b"cfspack1";

/// Where one value lives: pack number, byte offset, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackLoc {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

impl PackLoc {
    pub const ENCODED_LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0; Self::ENCODED_LEN];
        out[..4].copy_from_slice(&self.pack.to_be_bytes());
        out[4..12].copy_from_slice(&self.offset.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED_LEN] = bytes.try_into().ok()?;
        Some(Self {
            pack: u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")),
            offset: u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(bytes[12..].try_into().expect("4 bytes")),
        })
    }
}

struct Writer {
    pack: u32,
    file: Arc<File>,
    end: u64,
    /// Appends so far (this process), numbered from 1.
    appended: u64,
}

/// How far syncs reached: every append numbered up to `through` is durable.
#[derive(Default)]
struct Synced {
    through: u64,
    running: bool,
}

pub struct Packs {
    dir: PathBuf,
    writer: Mutex<Writer>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    synced: Mutex<Synced>,
    sync_done: Condvar,
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_owned(), source }
}

fn pack_path(dir: &Path, pack: u32) -> PathBuf {
    dir.join(format!("{pack:08}.pack"))
}

fn pack_number(path: &Path) -> Option<u32> {
    path.file_name()?.to_str()?.strip_suffix(".pack")?.parse().ok()
}

/// Continues appending to an existing pack, or starts the next one if it is full.
fn resume(dir: &Path, pack: u32) -> Result<Writer> {
    let path = pack_path(dir, pack);
    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| io_error(&path, e))?;
    let end = file.metadata().map_err(|e| io_error(&path, e))?.len();
    let mut magic = [0; MAGIC.len()];
    if file.read_exact_at(&mut magic, 0).is_err() || &magic != MAGIC {
        let detail = format!("{} does not start as a pack file", path.display());
        return Err(StoreError::Corrupted(detail).into());
    }
    if end >= PACK_LIMIT {
        return start(dir, pack + 1);
    }
    Ok(Writer { pack, file: Arc::new(file), end, appended: 0 })
}

/// Creates pack `pack` durably (file and directory entry) before any location in it can be
/// written to RocksDB.
fn start(dir: &Path, pack: u32) -> Result<Writer> {
    let path = pack_path(dir, pack);
    let file =
        OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| io_error(&path, e))?;
    file.write_all_at(MAGIC, 0).map_err(|e| io_error(&path, e))?;
    file.sync_all().map_err(|e| io_error(&path, e))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))?;
    Ok(Writer { pack, file: Arc::new(file), end: MAGIC.len() as u64, appended: 0 })
}

impl Packs {
    /// Opens the packs in `dir`, creating the folder and a first pack when `create` is set.
    pub fn open(dir: &Path, create: bool) -> Result<Self> {
        if create {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
        let mut newest = None;
        for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
            let path = entry.map_err(|e| io_error(dir, e))?.path();
            newest = newest.max(pack_number(&path));
        }
        let writer = match newest {
            Some(n) => resume(dir, n)?,
            None => start(dir, 1)?,
        };
        let readers = RwLock::new(HashMap::from([(writer.pack, writer.file.clone())]));
        let (writer, synced) = (Mutex::new(writer), Mutex::new(Synced::default()));
        Ok(Self { dir: dir.to_owned(), writer, readers, synced, sync_done: Condvar::new() })
    }

    /// Appends `values`, each given as its pieces (not yet durable: see `sync_through`), and
    /// returns where each one went, and the number of this append.
    pub fn append<'a, V: AsRef<[&'a [u8]]>>(&self, values: &[V]) -> Result<(Vec<PackLoc>, u64)> {
        let mut w = self.writer.lock().expect("no panics while locked");
        let mut locs = Vec::with_capacity(values.len());
        for value in values.iter().map(AsRef::as_ref) {
            if w.end >= PACK_LIMIT {
                // The full pack is synced here, so a later sync of the new one covers both.
                w.file.sync_data().map_err(|e| io_error(&pack_path(&self.dir, w.pack), e))?;
                let appended = w.appended;
                *w = start(&self.dir, w.pack + 1)?;
                w.appended = appended;
                self.readers.write().expect("no panics while locked").insert(w.pack, w.file.clone());
            }
            let total: usize = value.iter().map(|piece| piece.len()).sum();
            let len = u32::try_from(total)
                .map_err(|_| Error::Invalid(format!("a value of {total} bytes is too large for a pack")))?;
            let mut at = w.end;
            for piece in value {
                w.file.write_all_at(piece, at).map_err(|e| io_error(&pack_path(&self.dir, w.pack), e))?;
                at += piece.len() as u64;
            }
            locs.push(PackLoc { pack: w.pack, offset: w.end, len });
            w.end += u64::from(len);
        }
        w.appended += 1;
        Ok((locs, w.appended))
    }

    /// Makes every appended value durable.
    pub fn sync(&self) -> Result<()> {
        let appended = self.writer.lock().expect("no panics while locked").appended;
        self.sync_through(appended)
    }

    /// Makes the values of append number `through` and every one before it durable: at once
    /// if a sync reached them already, else after the sync running now, or by one of its own.
    pub fn sync_through(&self, through: u64) -> Result<()> {
        let mut synced = self.synced.lock().expect("no panics while locked");
        loop {
            if synced.through >= through {
                return Ok(());
            }
            if !synced.running {
                break;
            }
            synced = self.sync_done.wait(synced).expect("no panics while locked");
        }
        synced.running = true;
        drop(synced);
        // Every append numbered up to `reached` finished before the fdatasync starts.
        let (file, pack, reached) = {
            let w = self.writer.lock().expect("no panics while locked");
            (w.file.clone(), w.pack, w.appended)
        };
        let done = file.sync_data();
        let mut synced = self.synced.lock().expect("no panics while locked");
        synced.running = false;
        if done.is_ok() {
            synced.through = synced.through.max(reached);
        }
        self.sync_done.notify_all();
        done.map_err(|e| io_error(&pack_path(&self.dir, pack), e))
    }

    /// Gives back the room of values written but named by no batch (staged for a batch that
    /// was refused): the pack is cut back when they are its last bytes, else their range is
    /// punched out, so the disk keeps nothing of them either way.
    pub fn reclaim(&self, locs: &[PackLoc]) -> Result<()> {
        let mut w = self.writer.lock().expect("no panics while locked");
        let in_current: Vec<&PackLoc> = locs.iter().filter(|l| l.pack == w.pack).collect();
        let start = in_current.iter().map(|l| l.offset).min();
        let end = in_current.iter().map(|l| l.offset + u64::from(l.len)).max();
        let mut holes: Vec<&PackLoc> = locs.iter().filter(|l| l.pack != w.pack).collect();
        match (start, end) {
            (Some(start), Some(end)) if end == w.end => {
                let path = pack_path(&self.dir, w.pack);
                w.file.set_len(start).map_err(|e| io_error(&path, e))?;
                w.end = start;
            }
            _ => holes.extend(in_current),
        }
        drop(w);
        for loc in holes {
            let path = pack_path(&self.dir, loc.pack);
            let file = OpenOptions::new().write(true).open(&path).map_err(|e| io_error(&path, e))?;
            let punched = nix::fcntl::fallocate(
                &file,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                loc.offset as libc::off_t,
                libc::off_t::from(loc.len),
            );
            punched.map_err(|e| io_error(&path, e.into()))?;
        }
        Ok(())
    }

    /// The value at `loc`. A location past the end of its pack is store corruption: RocksDB
    /// never names bytes that were not synced first.
    pub fn read(&self, loc: PackLoc) -> Result<Vec<u8>> {
        let file = self.reader(loc.pack)?;
        let mut value = vec![0; loc.len as usize];
        file.read_exact_at(&mut value, loc.offset).map_err(|e| {
            let detail =
                format!("{} bytes at {} in {}: {e}", loc.len, loc.offset, pack_path(&self.dir, loc.pack).display());
            Error::from(StoreError::Corrupted(detail))
        })?;
        Ok(value)
    }

    fn reader(&self, pack: u32) -> Result<Arc<File>> {
        if let Some(file) = self.readers.read().expect("no panics while locked").get(&pack) {
            return Ok(file.clone());
        }
        let path = pack_path(&self.dir, pack);
        let file = File::open(&path).map_err(|e| {
            Error::from(StoreError::Corrupted(format!("pack {} cannot be opened: {e}", path.display())))
        })?;
        let file = Arc::new(file);
        self.readers.write().expect("no panics while locked").insert(pack, file.clone());
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_reopen_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(dir.path(), true).unwrap();
        let (locs, _) = packs.append(&[vec![&b"first"[..]], vec![&[7; 30_000][..], &[7; 40_000][..]]]).unwrap();
        packs.sync().unwrap();
        drop(packs);
        // A crash mid-append leaves bytes that no location names.
        let path = pack_path(dir.path(), 1);
        let torn_end = std::fs::metadata(&path).unwrap().len() + 3;
        std::io::Write::write_all(&mut std::fs::OpenOptions::new().append(true).open(&path).unwrap(), b"xyz").unwrap();
        let packs = Packs::open(dir.path(), false).unwrap();
        assert_eq!(packs.read(locs[0]).unwrap(), b"first");
        assert_eq!(packs.read(locs[1]).unwrap(), vec![7; 70_000]);
        let after = packs.append(&[[&b"later"[..]]]).unwrap().0[0];
        assert_eq!(after.offset, torn_end, "appends start after the torn bytes");
        assert_eq!(packs.read(after).unwrap(), b"later");
    }

    #[test]
    fn a_location_past_the_end_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(dir.path(), true).unwrap();
        let loc = packs.append(&[[&b"value"[..]]]).unwrap().0[0];
        let err = packs.read(PackLoc { len: 100, ..loc }).unwrap_err();
        assert!(matches!(err, Error::Store(StoreError::Corrupted(_))), "{err}");
        let err = packs.read(PackLoc { pack: 9, ..loc }).unwrap_err();
        assert!(matches!(err, Error::Store(StoreError::Corrupted(_))), "{err}");
        assert_eq!(PackLoc::decode(&loc.encode()), Some(loc));
    }

    #[test]
    fn a_file_that_is_not_a_pack_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(pack_path(dir.path(), 4), b"not a pack").unwrap();
        assert!(matches!(Packs::open(dir.path(), false), Err(Error::Store(StoreError::Corrupted(_)))));
    }

    #[test]
    fn appends_and_syncs_from_several_threads_cover_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(dir.path(), true).unwrap();
        let written: Vec<Vec<(PackLoc, Vec<u8>)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..3u8)
                .map(|t| {
                    let packs = &packs;
                    s.spawn(move || {
                        (0..40u8)
                            .map(|i| {
                                let value = vec![t * 64 + i; 20_000 + usize::from(i)];
                                let (locs, append) = packs.append(&[[&value[..]]]).unwrap();
                                packs.sync_through(append).unwrap();
                                (locs[0], value)
                            })
                            .collect()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let synced = packs.synced.lock().unwrap().through;
        assert_eq!(synced, 120, "every append was covered by some sync");
        for (loc, value) in written.into_iter().flatten() {
            assert_eq!(packs.read(loc).unwrap(), value);
        }
    }

    #[test]
    fn reclaimed_values_leave_no_bytes_on_disk() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(dir.path(), true).unwrap();
        let kept = packs.append(&[[&[1u8; 100][..]]]).unwrap().0[0];
        let path = pack_path(dir.path(), kept.pack);
        let len = std::fs::metadata(&path).unwrap().len();
        // The last values: the pack is cut back to where they began.
        let (tail, _) = packs.append(&[[&[2u8; 1 << 20][..]], [&[3u8; 1 << 20][..]]]).unwrap();
        packs.reclaim(&tail).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(packs.read(kept).unwrap(), vec![1u8; 100]);
        // Values with others after them: their blocks are punched out.
        let (middle, _) = packs.append(&[[&[4u8; 1 << 20][..]]]).unwrap();
        let after = packs.append(&[[&[5u8; 100][..]]]).unwrap().0[0];
        let blocks = std::fs::metadata(&path).unwrap().blocks();
        packs.reclaim(&middle).unwrap();
        assert!(std::fs::metadata(&path).unwrap().blocks() < blocks, "the room is given back");
        assert_eq!(packs.read(after).unwrap(), vec![5u8; 100]);
    }
}
