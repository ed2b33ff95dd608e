//! Conflict copies and conflict names: where the loser's version of a file goes, and the
//! name that tells which writer's commit it came from.

use std::collections::{HashMap, HashSet, VecDeque};

use super::{Merge, insert_entry, lookup};
use crate::Result;
use crate::crypto::aead::SealedKind;
use crate::fs::node::{Bucket, DirEntry, Inode, Kind, ROOT_INO, conflict_copy_ino};
use crate::fs::trie::{Ref, Trie};
use crate::record::RecordHash;

impl Merge<'_> {
    pub(super) fn changed_in_of(&self, ino: u64) -> Result<RecordHash> {
        Ok(self.out.inode(self.sealed, ino)?.as_ref().map_or(NO_RECORD, changed_in))
    }

    /// Places each conflict copy beside the first name of the file it is a version of (in
    /// tree order from the root), or in the root if no name reaches it.
    pub(super) fn place_copies(&mut self) -> Result<()> {
        if self.copies.is_empty() {
            return Ok(());
        }
        let wanted: HashSet<u64> = self.copies.iter().map(|(ino, _)| *ino).collect();
        let names = self.first_names(&wanted)?;
        for (ino, mut version) in std::mem::take(&mut self.copies) {
            let record = changed_in(&version);
            let copy = conflict_copy_ino(&record, ino);
            // A side that committed an earlier merge of these versions holds this copy
            // already (its number comes from the version alone): it is not made twice.
            if self.out.inode(self.sealed, copy)?.is_some() {
                continue;
            }
            if version.kind == Kind::File {
                version.sealed_as = Some(version.chunks_at(ino));
            }
            // Counted from its one name by `recount_file_links`.
            version.nlink = 0;
            self.fresh_copies.insert(copy);
            let (dir, name) = names.get(&ino).cloned().unwrap_or((ROOT_INO, b"conflict".to_vec()));
            let dir_inode = self.out.inode(self.sealed, dir)?.expect("a directory the walk listed");
            let src = self.sealed.tree(SealedKind::Directory, dir);
            let mut tree = self.out.dir_tree(dir, &dir_inode).into_owned();
            let name = self.conflict_name(dir, &tree, &name, record)?;
            insert_entry(&mut tree, &src, DirEntry { name, ino: copy, kind: version.kind })?;
            self.out.dirs.insert(dir, tree);
            self.put(copy, version)?;
        }
        Ok(())
    }

    /// The first name (directory, name) of each inode in `wanted`, walking the merged tree
    /// breadth first from the root.
    fn first_names(&self, wanted: &HashSet<u64>) -> Result<HashMap<u64, (u64, Vec<u8>)>> {
        let mut found = HashMap::new();
        let mut queue = VecDeque::from([ROOT_INO]);
        let mut seen = HashSet::new();
        while let Some(dir) = queue.pop_front() {
            if found.len() == wanted.len() || !seen.insert(dir) {
                continue;
            }
            let Some(inode) = self.out.inode(self.sealed, dir)? else { continue };
            let src = self.sealed.tree(SealedKind::Directory, dir);
            for (_, bucket) in self.out.dir_tree(dir, &inode).entries(&src)? {
                for e in bucket.0 {
                    if wanted.contains(&e.ino) {
                        found.entry(e.ino).or_insert((dir, e.name.clone()));
                    }
                    if e.kind == Kind::Dir {
                        queue.push_back(e.ino);
                    }
                }
            }
        }
        Ok(found)
    }

    /// A conflict name for `name` from `record`, the commit that last changed the version
    /// it names, unused in `tree` (directory `dir`'s).
    pub(super) fn conflict_name(
        &self,
        dir: u64,
        tree: &Trie<Bucket>,
        name: &[u8],
        record: RecordHash,
    ) -> Result<Vec<u8>> {
        let writer = match self.sealed.capsule.record(record) {
            Ok(r) => r.header.writer.to_hex()[..8].to_owned(),
            Err(_) => "00000000".to_owned(),
        };
        let src = self.sealed.tree(SealedKind::Directory, dir);
        let tag = format!("conflict-{writer}-{}", &record.to_hex()[..8]);
        for n in 1u32.. {
            let name = conflict_name(name, &if n == 1 { tag.clone() } else { format!("{tag}-{n}") });
            if lookup(tree, &src, &name)?.is_none() {
                return Ok(name);
            }
        }
        unreachable!("some numbered name is free")
    }
}

/// Stands for the record of a value that names none (never so in a stored commit).
const NO_RECORD: RecordHash = RecordHash::from_bytes([0; 32]);

pub(super) fn changed_in(inode: &Inode) -> RecordHash {
    match inode.changed_in {
        Some(Ref::At(record, _)) => record,
        _ => NO_RECORD,
    }
}

/// `name` with `tag` put before its extension: `report.txt` → `report.<tag>.txt`, so programs
/// still open the copy; a name with no extension (or a dotfile) gets it at the end. The stem
/// is shortened, never the tag, to stay within 255 bytes.
fn conflict_name(name: &[u8], tag: &str) -> Vec<u8> {
    let dot = name.iter().rposition(|&c| c == b'.').filter(|&i| i > 0);
    let (stem, ext) = match dot {
        Some(i) if name.len() - i <= 16 => name.split_at(i),
        _ => (name, &[][..]),
    };
    let room = 255usize.saturating_sub(tag.len() + 1 + ext.len());
    let mut out = stem[..stem.len().min(room)].to_vec();
    out.push(b'.');
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(ext);
    out
}
