//! Extended attributes: the user.* ones stored in the inode, and the read-only provenance.

use super::{Fs, MAX_NAME, shown};
use crate::capsule::EarlierProofs;
use crate::fs::node::{Inode, Time};
use crate::fs::trie::Ref;
use crate::proof::Anchor;
use crate::{Error, Result};

const MAX_XATTR_VALUE: usize = 64 * 1024;
const PROVENANCE_PREFIX: &[u8] = b"user.capsule.";
const PROVENANCE: [&[u8]; 3] = [b"record", b"writer", b"verified"];

/// setxattr's flags: any, XATTR_CREATE (must not exist) or XATTR_REPLACE (must exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    Any,
    Create,
    Replace,
}

impl Fs {
    /// An extended attribute: stored user.* ones, or the read-only provenance of the inode
    /// (`user.capsule.record`, `.writer`, `.verified`).
    pub fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        // Only user.* is stored. Answered before any lookup: the kernel asks for
        // security.capability before every write to a file.
        if !name.starts_with(b"user.") {
            return Err(Error::NoAttribute(shown(name)));
        }
        let inode = self.getattr(ino)?;
        if let Some(field) = name.strip_prefix(PROVENANCE_PREFIX) {
            return self.provenance(&inode, field).and_then(|v| v.ok_or_else(|| Error::NoAttribute(shown(name))));
        }
        inode
            .xattrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| Error::NoAttribute(shown(name)))
    }

    fn provenance(&self, inode: &Inode, field: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(Ref::At(record, _)) = inode.changed_in else {
            return Ok(PROVENANCE.contains(&field).then(|| b"uncommitted".to_vec()));
        };
        Ok(Some(match field {
            b"record" => record.to_hex().into_bytes(),
            b"writer" => self.sealed.capsule.proven_header(record)?.writer.to_hex().into_bytes(),
            b"verified" => match self.sealed.capsule.prove_record(record, EarlierProofs::Ignore)?.anchor {
                Anchor::Signed { record, .. } => format!("signed {record}"),
                Anchor::Cached { record } => format!("proven {record}"),
                Anchor::Attested { record, .. } => format!("attested-locally {record}"),
            }
            .into_bytes(),
            _ => return Ok(None),
        }))
    }

    /// Names of the stored extended attributes. Provenance is readable by name but not
    /// listed, so `cp -a` and `rsync -X` neither copy it out nor fail to set it on copy in.
    pub fn list_xattrs(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        Ok(self.getattr(ino)?.xattrs.into_iter().map(|(n, _)| n).collect())
    }

    /// Sets (or with `value` None, removes) a user.* extended attribute.
    pub fn set_xattr(&mut self, ino: u64, name: &[u8], value: Option<&[u8]>, mode: XattrMode) -> Result<()> {
        self.writable()?;
        if name.starts_with(PROVENANCE_PREFIX) {
            return Err(Error::NotPermitted(shown(name)));
        }
        if !name.starts_with(b"user.") || name.len() > MAX_NAME {
            return Err(Error::Unsupported(format!("extended attribute {} (only user.* is stored)", shown(name))));
        }
        if value.is_some_and(|v| v.len() > MAX_XATTR_VALUE) {
            return Err(Error::Invalid(format!("value of {} is over 64 KiB", shown(name))));
        }
        let mut inode = self.getattr(ino)?;
        let at = inode.xattrs.binary_search_by(|(n, _)| n.as_slice().cmp(name));
        match (at, value, mode) {
            (Ok(_), Some(_), XattrMode::Create) => return Err(Error::Exists(shown(name))),
            (Err(_), _, XattrMode::Replace) | (Err(_), None, _) => return Err(Error::NoAttribute(shown(name))),
            (Ok(i), Some(v), _) => inode.xattrs[i].1 = v.to_vec(),
            (Err(i), Some(v), _) => inode.xattrs.insert(i, (name.to_vec(), v.to_vec())),
            (Ok(i), None, _) => drop(inode.xattrs.remove(i)),
        }
        inode.ctime = Time::now();
        self.put_inode(ino, inode)
    }
}
