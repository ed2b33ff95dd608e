//! Names bound on first use: a capsule's creator signs "this name means this capsule", and an
//! honest replica keeps the first binding of a name it is given and refuses any other (BFTKV's
//! trust-on-first-use slots). The binding carries the capsule's signed metadata, so a replica
//! that does not hold the capsule can check it too.

use borsh::{BorshDeserialize, BorshSerialize};

use crate::crypto::keys::Identity;
use crate::crypto::sign;
use crate::record::{CapsuleId, Signature, SignedMetadata, WriterId};
use crate::{Error, Result, VerifyError};

/// Longest name.
pub const MAX_NAME: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct NameBinding {
    pub name: String,
    /// The capsule's signed metadata (its id is the hash of the metadata).
    pub metadata: Vec<u8>,
    /// The creator's signature over blake3(name ‖ 0 ‖ capsule id).
    pub signature: Signature,
}

/// Whether `name` can be bound: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit,
/// and not 64 hex digits (that reads as a capsule id).
pub fn check_bound_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
    let looks_like_id = name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit());
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name.chars().all(ok_char)
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || looks_like_id
    {
        return Err(Error::Invalid(format!(
            "'{name}' cannot be a capsule name: use 1 to {MAX_NAME} of a-z, 0-9, '.', '_' and '-', starting with a letter \
             or digit"
        )));
    }
    Ok(())
}

fn digest(name: &str, capsule: &CapsuleId) -> [u8; 32] {
    *blake3::hash(&[name.as_bytes(), &[0], capsule.as_bytes()].concat()).as_bytes()
}

impl NameBinding {
    /// `name` bound to the capsule of `metadata` by its creator, `creator`.
    pub fn make(name: &str, metadata: &[u8], creator: &Identity) -> Result<Self> {
        check_bound_name(name)?;
        let signed = crate::capsule::check_metadata(metadata)?;
        if signed.metadata.creator != creator.writer() {
            return Err(Error::Invalid(format!(
                "only the capsule's creator ({:?}) can name it; this key is {:?}",
                signed.metadata.creator,
                creator.writer()
            )));
        }
        let signature = sign::sign_name(creator.key(), &digest(name, &signed.metadata.id()));
        Ok(Self { name: name.to_owned(), metadata: metadata.to_vec(), signature })
    }

    /// The capsule and creator it binds the name to, once the metadata and the signature check.
    pub fn check(&self) -> Result<(CapsuleId, WriterId)> {
        check_bound_name(&self.name)?;
        let signed: SignedMetadata = crate::capsule::check_metadata(&self.metadata)?;
        let (id, creator) = (signed.metadata.id(), signed.metadata.creator);
        if !sign::verify_name(&creator, &digest(&self.name, &id), &self.signature) {
            return Err(
                VerifyError::Metadata(format!("the binding of '{}' is not signed by its creator", self.name)).into()
            );
        }
        Ok((id, creator))
    }
}

#[cfg(test)]
mod tests {
    use super::check_bound_name;

    #[test]
    fn names_are_short_plain_and_never_an_id() {
        for ok in ["notes", "team-wiki.2026", "a", "0day_x"] {
            assert!(check_bound_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Notes", "-x", ".hidden", "a/b", "a b", &"ab".repeat(33), &"0a".repeat(32)] {
            assert!(check_bound_name(bad).is_err(), "{bad}");
        }
    }
}
