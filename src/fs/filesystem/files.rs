//! File contents and open handles: reading (live, or pinned to an older version), writing
//! and truncating chunks, and counting the handles that keep an unlinked file alive.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Fs, PendingChunk, Reader};
use crate::crypto::aead::SealedKind;
use crate::fs::node::{CHUNK_SIZE, Chunk, Inode, Kind, Piece, Time};
use crate::fs::state::{CHUNK_LEAF, committed_tree, current_tree};
use crate::fs::trie::{Loc, Trie};
use crate::{Error, Result, VerifyError};

/// Which version of a file a read sees.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Version {
    /// As it stands here, writes pending included.
    Live,
    /// As committed at the inode the reader holds.
    Committed,
}

/// A chunk's bytes: pending in memory, or committed (proven and opened, perhaps cached).
enum ChunkBytes<'a> {
    Pending(&'a [u8]),
    Committed(Arc<Vec<u8>>),
}

impl std::ops::Deref for ChunkBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ChunkBytes::Pending(b) => b,
            ChunkBytes::Committed(b) => b,
        }
    }
}

impl ChunkBytes<'_> {
    fn into_owned(self) -> Vec<u8> {
        match self {
            ChunkBytes::Pending(b) => b.to_vec(),
            ChunkBytes::Committed(b) => Arc::unwrap_or_clone(b),
        }
    }
}

/// A piece must hold exactly the bytes its chunk map says: both are proven, so a mismatch is
/// a writer's fault, refused rather than read short or long.
fn check_piece_len(at: Loc, piece: &Piece, actual: usize) -> Result<()> {
    if actual != piece.len as usize {
        return Err(VerifyError::PieceLength { record: at.record, idx: at.idx, expected: piece.len, actual }.into());
    }
    Ok(())
}

impl Fs {
    /// A handle to `ino` that may write was opened.
    pub fn opened(&mut self, ino: u64) {
        *self.open_handles.entry(ino).or_default() += 1;
        *self.writers.entry(ino).or_default() += 1;
    }

    /// Handle `fh` to `ino` was opened for reading only.
    pub fn opened_reader(&mut self, ino: u64, fh: u64) {
        *self.open_handles.entry(ino).or_default() += 1;
        self.readers.insert(fh, Reader { ino, pinned: None });
    }

    /// Whether handles pinned to an older version of `ino` are open (see `Reader`).
    pub fn has_pinned_readers(&self, ino: u64) -> bool {
        self.readers.values().any(|r| r.ino == ino && r.pinned.is_some())
    }

    /// Reading handle `fh` was closed.
    pub fn released_reader(&mut self, fh: u64) -> Result<()> {
        match self.readers.remove(&fh) {
            Some(reader) => self.closed(reader.ino),
            None => Ok(()),
        }
    }

    /// `read` through handle `fh`: the version it is pinned to, if a follow pinned it.
    pub fn read_handle(&self, fh: u64, ino: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
        match self.readers.get(&fh) {
            Some(Reader { ino: i, pinned: Some(inode) }) if *i == ino => {
                self.read_from(ino, inode, offset, len, Version::Committed)
            }
            _ => self.read(ino, offset, len),
        }
    }

    /// A handle to `ino` that may write was closed.
    pub fn released(&mut self, ino: u64) -> Result<()> {
        count_down(&mut self.writers, ino);
        self.closed(ino)
    }

    /// A handle to `ino` was closed; the last close of an unlinked file removes it.
    fn closed(&mut self, ino: u64) -> Result<()> {
        if !count_down(&mut self.open_handles, ino) {
            return Ok(());
        }
        match self.getattr(ino) {
            Ok(inode) if inode.nlink == 0 && self.writer.is_some() => self.remove_inode(ino),
            _ => Ok(()),
        }
    }

    /// The bytes of chunk `n` of file `ino`: pending (borrowed), committed (proven, opened
    /// and kept in the payload cache: it is read only in part here, and the rest of it is
    /// likely asked for next), or None for a hole.
    fn chunk(&self, ino: u64, inode: &Inode, n: u64, version: Version) -> Result<Option<ChunkBytes<'_>>> {
        if let Some(c) = self.chunks.get(&(ino, n)).filter(|_| version == Version::Live) {
            return Ok(Some(ChunkBytes::Pending(&c.data)));
        }
        let Some(chunk) = self.stored_chunk(ino, inode, n, version)? else { return Ok(None) };
        Ok(Some(ChunkBytes::Committed(self.committed_bytes(inode.chunks_at(ino), n, &chunk)?)))
    }

    /// `committed_chunk` of the live file, or of exactly the version `inode` names.
    fn stored_chunk(&self, ino: u64, inode: &Inode, n: u64, version: Version) -> Result<Option<Chunk>> {
        match version {
            Version::Live => self.committed_chunk(ino, inode, n),
            Version::Committed => {
                let src = self.sealed.tree(SealedKind::ChunkMap, inode.chunks_at(ino));
                committed_tree(inode.content, CHUNK_LEAF).get(&src, n)
            }
        }
    }

    /// Where committed chunk `n` of file `ino` is stored, or None for a hole.
    fn committed_chunk(&self, ino: u64, inode: &Inode, n: u64) -> Result<Option<Chunk>> {
        let src = self.sealed.tree(SealedKind::ChunkMap, inode.chunks_at(ino));
        current_tree(&self.files, ino, inode, CHUNK_LEAF).get(&src, n)
    }

    /// The bytes of committed chunk `n` of the file whose chunks are sealed at inode number
    /// `ino` (`Inode::chunks_at`): its pieces, each proven and opened.
    fn committed_bytes(&self, ino: u64, n: u64, chunk: &Chunk) -> Result<Arc<Vec<u8>>> {
        if let [only] = chunk.pieces.as_slice() {
            return self.piece(ino, n, 0, only);
        }
        self.committed_copy(ino, n, chunk, chunk.len()).map(Arc::new)
    }

    /// Committed chunk `n`'s bytes in a buffer of its own with room for `capacity` bytes,
    /// each piece copied once (a write that grows the chunk would otherwise copy it again).
    fn committed_copy(&self, ino: u64, n: u64, chunk: &Chunk, capacity: usize) -> Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(capacity.max(chunk.len()));
        for (start, piece) in chunk.with_offsets() {
            bytes.extend_from_slice(&self.piece(ino, n, start, piece)?);
        }
        Ok(bytes)
    }

    /// One piece of committed chunk `n` of the file sealed at `ino`, starting `start` bytes
    /// into it.
    fn piece(&self, ino: u64, n: u64, start: usize, piece: &Piece) -> Result<Arc<Vec<u8>>> {
        let at = piece.at.absolute();
        let plain = self.sealed.read(at, &self.sealed.piece_place(ino, n, start))?;
        check_piece_len(at, piece, plain.len())?;
        Ok(plain)
    }

    fn file_inode(&self, ino: u64) -> Result<Inode> {
        let inode = self.getattr(ino)?;
        match inode.kind {
            Kind::File => Ok(inode),
            Kind::Dir => Err(Error::IsADirectory(format!("inode {ino}"))),
            other => Err(Error::Invalid(format!("inode {ino} is a {other:?}, not a regular file"))),
        }
    }

    /// The version a pending chunk takes when it changes (see `PendingChunk`).
    fn next_chunk_version(&mut self) -> u64 {
        self.chunk_version += 1;
        self.chunk_version
    }

    /// Up to `len` bytes from `offset`; holes read as zeros.
    pub fn read(&self, ino: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.read_from(ino, &self.file_inode(ino)?, offset, len, Version::Live)
    }

    /// Reads `inode`'s bytes: with the writes pending here (`Live`), or as `inode` names them
    /// (`Committed`: a pinned reader's older version of the file).
    fn read_from(&self, ino: u64, inode: &Inode, offset: u64, len: u32, version: Version) -> Result<Vec<u8>> {
        let end = inode.size.min(offset.saturating_add(u64::from(len)));
        let mut out = vec![0; end.saturating_sub(offset) as usize];
        let mut pos = offset;
        while pos < end {
            let n = pos / CHUNK_SIZE;
            let within = (pos % CHUNK_SIZE) as usize;
            let take = (end - pos).min(CHUNK_SIZE - within as u64) as usize;
            let dst = &mut out[(pos - offset) as usize..][..take];
            let pending = version == Version::Live && self.chunks.contains_key(&(ino, n));
            if take == CHUNK_SIZE as usize && !pending {
                // A committed chunk of one piece read whole is opened straight into the reply.
                match self.stored_chunk(ino, inode, n, version)? {
                    Some(Chunk { pieces }) if pieces.len() == 1 => {
                        let at = pieces[0].at.absolute();
                        let place = self.sealed.chunk_place(inode.chunks_at(ino), n);
                        let len = self.sealed.read_into(at, &place, dst)?;
                        check_piece_len(at, &pieces[0], len)?;
                    }
                    Some(chunk) => {
                        let bytes = self.committed_bytes(inode.chunks_at(ino), n, &chunk)?;
                        let have = bytes.len().min(take);
                        dst[..have].copy_from_slice(&bytes[..have]);
                    }
                    None => {}
                }
            } else if let Some(chunk) = self.chunk(ino, inode, n, version)? {
                let start = within.min(chunk.len());
                let have = (chunk.len() - start).min(take);
                dst[..have].copy_from_slice(&chunk[start..start + have]);
            }
            pos += take as u64;
        }
        Ok(out)
    }

    /// A conflict copy's first change: its chunks were sealed at another inode's number (see
    /// `Inode::sealed_as`), so they are read and made pending here, to be sealed at its own.
    fn unshare(&mut self, ino: u64, inode: &mut Inode) -> Result<()> {
        let Some(at) = inode.sealed_as else { return Ok(()) };
        let src = self.sealed.tree(SealedKind::ChunkMap, at);
        for (n, chunk) in committed_tree::<Chunk>(inode.content, CHUNK_LEAF).entries(&src)? {
            let data = self.committed_bytes(at, n, &chunk)?;
            let version = self.next_chunk_version();
            self.chunks.insert((ino, n), PendingChunk { data, version, kept: None });
        }
        self.files.insert(ino, Trie::empty(CHUNK_LEAF));
        (inode.content, inode.sealed_as) = (None, None);
        Ok(())
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        self.write_clearing(ino, offset, data, false)
    }

    /// `write` by a process without CAP_FSETID: it also clears the file's set-user-ID and
    /// set-group-ID bits (`Inode::drop_set_ids`), in the same inode update.
    pub fn write_unprivileged(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        self.write_clearing(ino, offset, data, true)
    }

    fn write_clearing(&mut self, ino: u64, offset: u64, data: &[u8], drop_set_ids: bool) -> Result<()> {
        self.writable()?;
        let mut inode = self.file_inode(ino)?;
        self.unshare(ino, &mut inode)?;
        if drop_set_ids {
            inode.drop_set_ids();
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let n = pos / CHUNK_SIZE;
            let within = (pos % CHUNK_SIZE) as usize;
            let take = rest.len().min(CHUNK_SIZE as usize - within);
            // Edit a pending chunk in place; load a committed one only the first time, and only
            // if some of its bytes survive: not for a whole-chunk write, nor past the end.
            if !self.chunks.contains_key(&(ino, n)) {
                let keeps_old = take < CHUNK_SIZE as usize && n * CHUNK_SIZE < inode.size;
                let kept = if keeps_old { self.committed_chunk(ino, &inode, n)? } else { None };
                let data = match &kept {
                    Some(chunk) => self.committed_copy(ino, n, chunk, within + take)?,
                    None => Vec::new(),
                };
                self.chunks.insert((ino, n), PendingChunk { data: Arc::new(data), version: 0, kept });
            }
            let version = self.next_chunk_version();
            let pending = self.chunks.get_mut(&(ino, n)).expect("inserted just above");
            pending.version = version;
            if pending.kept.as_ref().is_some_and(|k| within < k.len()) {
                pending.kept = None; // rewritten below the committed pieces' end
            }
            // Copies only if the sealer still holds this chunk's bytes from an earlier write.
            let chunk = Arc::make_mut(&mut pending.data);
            if chunk.len() <= within {
                // Appending (the common case): no zero-fill of bytes about to be overwritten.
                chunk.resize(within, 0);
                chunk.extend_from_slice(&rest[..take]);
            } else {
                if chunk.len() < within + take {
                    chunk.resize(within + take, 0);
                }
                chunk[within..within + take].copy_from_slice(&rest[..take]);
            }
            // A write that reaches a chunk's end has most likely finished it.
            if within + take == CHUNK_SIZE as usize
                && let Some(sealer) = &self.sealer
            {
                let place = self.sealed.chunk_place(ino, n);
                sealer.submit((ino, n), pending.version, pending.data.clone(), place);
            }
            pos += take as u64;
            rest = &rest[take..];
        }
        let now = Time::now();
        inode.size = inode.size.max(offset + data.len() as u64);
        inode.mtime = now;
        inode.ctime = now;
        self.put_inode(ino, inode)
    }

    pub fn truncate(&mut self, ino: u64, size: u64) -> Result<()> {
        self.writable()?;
        let mut inode = self.file_inode(ino)?;
        self.unshare(ino, &mut inode)?;
        if size < inode.size {
            let keep = size.div_ceil(CHUNK_SIZE);
            // Trim the new last chunk so the cut bytes cannot come back if the file grows again.
            if !size.is_multiple_of(CHUNK_SIZE)
                && let Some(mut last) = self.chunk(ino, &inode, keep - 1, Version::Live)?.map(ChunkBytes::into_owned)
            {
                last.truncate((size % CHUNK_SIZE) as usize);
                let version = self.next_chunk_version();
                self.chunks.insert((ino, keep - 1), PendingChunk { data: Arc::new(last), version, kept: None });
            }
            self.chunks.retain(|(i, n), _| *i != ino || *n < keep);
            let sealed = &self.sealed;
            let src = sealed.tree(SealedKind::ChunkMap, ino);
            let map = self.files.entry(ino).or_insert_with(|| committed_tree(inode.content, CHUNK_LEAF));
            for (n, _) in map.entries(&src)? {
                if n >= keep {
                    map.remove(&src, n)?;
                }
            }
        }
        let now = Time::now();
        inode.size = size;
        inode.mtime = now;
        inode.ctime = now;
        self.put_inode(ino, inode)
    }
}

/// One handle fewer to `ino` in `counts`; true when that was its last (it leaves the map).
fn count_down(counts: &mut HashMap<u64, u32>, ino: u64) -> bool {
    let Some(count) = counts.get_mut(&ino) else { return false };
    *count -= 1;
    if *count > 0 {
        return false;
    }
    counts.remove(&ino);
    true
}
