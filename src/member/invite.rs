//! Invitations: one copy-pasteable string that lets a new member join a capsule.
//!
//! A token names the capsule, the key of its creator and the replicas to fetch it from:
//! `capsulefs-invite-1:` (the version) then hex of borsh(`Invitation`). It is not secret and carries no
//! key: what lets its holder read is the grant the admin made for their public key, and the
//! creator's key lets `join` check that the metadata a replica sends is the one the admin
//! meant (the capsule id commits to the metadata, which names the creator and carries their
//! signature).

use borsh::{BorshDeserialize, BorshSerialize};

use crate::record::codec::{self, Canonical, DecodeError};
use crate::record::{CapsuleId, WriterId};
use crate::{Error, Result};

pub const TOKEN_PREFIX: &str = "capsulefs-invite-1:";
/// Most replica URLs in one token, and most bytes in one URL.
const MAX_URLS: usize = 16;
const MAX_URL: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Invitation {
    pub capsule: CapsuleId,
    pub creator: WriterId,
    pub replicas: Vec<String>,
}

impl Canonical for Invitation {
    fn check(&self) -> std::result::Result<(), DecodeError> {
        if self.replicas.is_empty() || self.replicas.len() > MAX_URLS {
            return Err(DecodeError::NonCanonical("an invitation names 1..=16 replicas"));
        }
        if self.replicas.iter().any(|u| u.is_empty() || u.len() > MAX_URL) {
            return Err(DecodeError::NonCanonical("a replica URL is 1..=2048 bytes"));
        }
        Ok(())
    }
}

impl Invitation {
    pub fn token(&self) -> String {
        format!("{TOKEN_PREFIX}{}", hex::encode(codec::encode(self)))
    }

    /// Whether `s` is meant as a token (so that commands taking a name or URL can take one).
    pub fn is_token(s: &str) -> bool {
        s.starts_with(TOKEN_PREFIX)
    }

    pub fn from_token(token: &str) -> Result<Self> {
        let bad =
            |why: String| Error::Invalid(format!("this invitation token is damaged ({why}): copy it again whole"));
        let body = token.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(|| bad(format!("no {TOKEN_PREFIX} prefix")))?;
        let bytes = hex::decode(body).map_err(|e| bad(e.to_string()))?;
        codec::decode_unversioned(&bytes).map_err(|e| bad(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_a_damaged_one_is_refused() {
        let invitation = Invitation {
            capsule: CapsuleId::from_bytes([7; 32]),
            creator: WriterId::from_bytes([9; 32]),
            replicas: vec!["http://srv:7070".into(), "s3://bucket/capsules".into()],
        };
        let token = invitation.token();
        assert!(Invitation::is_token(&token));
        assert_eq!(Invitation::from_token(&format!(" {token}\n")).unwrap(), invitation);
        assert!(Invitation::from_token(&token[..token.len() - 2]).is_err(), "cut short");
        assert!(Invitation::from_token(&token.replace(TOKEN_PREFIX, "")).is_err(), "no prefix");
        let none = Invitation { replicas: Vec::new(), ..invitation };
        assert!(Invitation::from_token(&none.token()).is_err(), "no replica to join through");
    }
}
