//! Commits: sealing every pending change into one record, chunks first, then the changed
//! tree nodes bottom up, then the superblock.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use super::Fs;
use crate::crypto::aead::SealedKind;
use crate::fs::heads;
use crate::fs::node::{CHUNK_SIZE, Chunk, Inode, MAX_PIECES, Piece, Superblock};
use crate::fs::sealed::{CommitBuilder, Sealed};
use crate::fs::sealer::Sealer;
use crate::fs::state::{CHUNK_LEAF, committed_tree};
use crate::fs::trie::{NodeSource, Ref, Trie, Value, Written};
use crate::record::RecordHash;
use crate::record::codec::FORMAT_VERSION;
use crate::store::Durability;
use crate::{Error, Result};

/// Whether a commit is signed as it is made, or left unsigned for a later signed commit to
/// prove (within the capsule's K-records / T-seconds bound, which `signing::SignPolicy` keeps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signing {
    /// Signed as it is made: the signature proves it and the unsigned commits before it.
    Now,
    /// Unsigned: proven once a later signed commit holds it.
    Later,
}

impl Fs {
    fn set_content(inodes: &mut Trie<Inode>, table: &dyn NodeSource, ino: u64, root: Option<Ref>) -> Result<()> {
        if let Some(mut inode) = inodes.get(table, ino)? {
            inode.content = root;
            inodes.insert(table, ino, inode)?;
        }
        Ok(())
    }

    /// Writes the changed nodes of every file's chunk map or directory's entry tree (`kind`)
    /// to `builder` and points each inode at its tree's new root.
    fn commit_contents<V: Value>(
        trees: &HashMap<u64, Trie<V>>,
        kind: SealedKind,
        builder: &mut CommitBuilder<'_>,
        inodes: &mut Trie<Inode>,
        table: &dyn NodeSource,
    ) -> Result<Vec<(u64, Written)>> {
        let mut written = Vec::with_capacity(trees.len());
        for (&ino, tree) in trees {
            let nodes = tree.commit(&mut builder.tree(kind, ino))?;
            Self::set_content(inodes, table, ino, nodes.root())?;
            written.push((ino, nodes));
        }
        Ok(written)
    }

    /// `Trie::committed` for each tree `commit_contents` wrote into `record`.
    fn contents_committed<V: Value>(
        trees: &mut HashMap<u64, Trie<V>>,
        written: Vec<(u64, Written)>,
        kind: SealedKind,
        record: RecordHash,
        sealed: &Sealed,
    ) {
        for (ino, nodes) in written {
            if let Some(tree) = trees.get_mut(&ino) {
                tree.committed(nodes, record, &sealed.tree(kind, ino));
            }
        }
    }

    /// Seals every change into one record (signed as `sign` says) and makes it the new base.
    /// Returns None when there was nothing to commit.
    pub fn commit(&mut self, sign: Signing, durability: Durability) -> Result<Option<RecordHash>> {
        if !self.is_dirty() {
            return self.writable().map(|()| None);
        }
        self.append_commit(sign, durability).map(Some)
    }

    /// Makes every commit so far durable.
    pub fn sync(&self) -> Result<()> {
        self.sealed.capsule.sync_to_disk()
    }

    /// A signed commit even when nothing changed (a record of one superblock), so that the
    /// unsigned commits before it are proven by a signature within the capsule's T bound.
    pub fn sign_now(&mut self, durability: Durability) -> Result<RecordHash> {
        self.append_commit(Signing::Now, durability)
    }

    fn append_commit(&mut self, sign: Signing, durability: Durability) -> Result<RecordHash> {
        let Some(writer) = self.writer.as_ref() else { return Err(Error::ReadOnlyView) };
        // Work on copies, so a failed append leaves every change in place to retry.
        let mut inodes = self.inodes.clone();
        let mut files = self.files.clone();
        let mut dirs = self.dirs.clone();
        let sealed = &self.sealed;
        let table = sealed.tree(SealedKind::InodeTable, 0);
        let mut builder = CommitBuilder::new(sealed);
        let mut sealed_early = self.sealer.as_ref().map(Sealer::take).unwrap_or_default();
        // Chunks first; their maps then point at them within this record.
        for (&(ino, n), pending) in &self.chunks {
            // The inode is read once per file, to open its chunk map.
            let map = match files.entry(ino) {
                Entry::Occupied(map) => map.into_mut(),
                Entry::Vacant(slot) => {
                    let Some(inode) = inodes.get(&table, ino)? else { continue };
                    slot.insert(committed_tree(inode.content, CHUNK_LEAF))
                }
            };
            let len = pending.data.len();
            let extendable = pending.kept.as_ref().filter(|k| k.pieces.len() < MAX_PIECES && k.len() < len);
            let chunk = match (sealed_early.remove(&(ino, n)), extendable) {
                // Sealed at this place by the sealer, from exactly these bytes.
                (Some((version, sub)), _) if version == pending.version => {
                    Chunk::whole(Ref::Here(builder.push_sealed(sub)), len)
                }
                // The appended bytes as one more piece, joined with the last pieces while they
                // are no longer than it (a binary counter): a chunk appended to line by line
                // keeps about log2(lines) pieces and seals each byte about that many times,
                // where sealing it whole every MAX_PIECES appends cost half a chunk each time.
                (_, Some(kept)) => {
                    let mut pieces = kept.pieces.clone();
                    let mut start = kept.len();
                    while let Some(last) = pieces.last()
                        && last.len as usize <= len - start
                    {
                        start -= last.len as usize;
                        pieces.pop();
                    }
                    let idx = builder.push_kept(&sealed.piece_place(ino, n, start), &pending.data[start..]);
                    pieces.push(Piece { at: Ref::Here(idx), len: (len - start) as u32 });
                    Chunk { pieces }
                }
                _ if len < CHUNK_SIZE as usize => {
                    Chunk::whole(Ref::Here(builder.push_kept(&sealed.chunk_place(ino, n), &pending.data)), len)
                }
                _ => Chunk::whole(Ref::Here(builder.push(&sealed.chunk_place(ino, n), &pending.data)), len),
            };
            map.insert(&sealed.tree(SealedKind::ChunkMap, ino), n, chunk)?;
        }
        let file_nodes = Self::commit_contents(&files, SealedKind::ChunkMap, &mut builder, &mut inodes, &table)?;
        let dir_nodes = Self::commit_contents(&dirs, SealedKind::Directory, &mut builder, &mut inodes, &table)?;
        let inode_nodes = inodes.commit(&mut builder.tree(SealedKind::InodeTable, 0))?;
        let sb = Superblock {
            version: FORMAT_VERSION,
            inodes: inode_nodes.root(),
            allocated: self.allocated.iter().map(|(r, n)| (*r, *n)).collect(),
            chunk_size: CHUNK_SIZE as u32,
        };
        builder.push(&sealed.place(SealedKind::Superblock, 0, 0, 0), &sb.encode());
        let parents = heads::commit_parents(&sealed.capsule, &self.heads)?;
        let record = builder.finish(writer, &parents, sign == Signing::Now, durability)?;
        // Every tree's new nodes go to the cache decoded: the next write reads the same paths.
        Self::contents_committed(&mut files, file_nodes, SealedKind::ChunkMap, record, sealed);
        Self::contents_committed(&mut dirs, dir_nodes, SealedKind::Directory, record, sealed);
        inodes.committed(inode_nodes, record, &table);
        self.inodes = inodes;
        self.files.clear();
        self.dirs.clear();
        self.chunks.clear();
        self.heads = vec![record];
        self.touched = false;
        Ok(record)
    }
}
