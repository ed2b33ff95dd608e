//! Directory listings: a folder's entries, taken by a handle's first readdir and kept for
//! its later ones.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use fuser::FileType;

use super::control::{self, Node};
use super::kernel::file_type;
use super::{CapsuleFs, Listing};
use crate::fs::node::ROOT_INO;
use crate::{Error, Result};

impl CapsuleFs {
    pub(super) fn listings(&self) -> MutexGuard<'_, HashMap<u64, Arc<Listing>>> {
        self.listings.lock().expect("no panics while locked")
    }

    fn entries(&self, ino: u64) -> Result<Listing> {
        match Node::decode(ino) {
            Node::ControlDir => Ok(vec![
                (Node::Status.encode(), FileType::RegularFile, b"status".to_vec()),
                (Node::History.encode(), FileType::Directory, b"history".to_vec()),
            ]),
            // Oldest first, so offsets stay valid while new commits arrive, and named so that
            // `ls` sorts them that way too.
            Node::History => {
                let commits = self.fs().commits()?;
                let mut views = self.views();
                (1..)
                    .zip(commits)
                    .map(|(n, h)| {
                        let root = Node::View { slot: views.slot_for(h)?, ino: ROOT_INO };
                        Ok((root.encode(), FileType::Directory, control::history_name(n, h).into_bytes()))
                    })
                    .collect()
            }
            Node::Status => Err(Error::NotADirectory("status".into())),
            _ => self.on_tree(ino, |fs, dir, encode| {
                Ok(fs.readdir(dir)?.into_iter().map(|e| (encode(e.ino), file_type(e.kind), e.name)).collect())
            }),
        }
    }

    /// The listing of folder `ino` for directory handle `fh`. Offset 0 starts a pass
    /// (rewinddir included) and takes the folder as it is now; later offsets reuse it.
    pub(super) fn listing(&self, ino: u64, fh: u64, offset: u64) -> Result<Arc<Listing>> {
        if offset != 0
            && let Some(listing) = self.listings().get(&fh).cloned()
        {
            return Ok(listing);
        }
        let listing = Arc::new(self.entries(ino)?);
        if let Some(kept) = self.listings().get_mut(&fh) {
            *kept = listing.clone();
        }
        Ok(listing)
    }
}

/// `.`, `..` and then `entries`, each with its offset: its position plus one, which the
/// kernel passes back to continue after it.
pub(super) fn with_dots(ino: u64, entries: &Listing) -> impl Iterator<Item = (u64, (u64, FileType, &[u8]))> {
    let dots = [(ino, FileType::Directory, &b"."[..]), (ino, FileType::Directory, &b".."[..])];
    let all = dots.into_iter().chain(entries.iter().map(|(i, kind, name)| (*i, *kind, name.as_slice())));
    (1..).zip(all)
}
