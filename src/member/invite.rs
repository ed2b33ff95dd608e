//! Invitations: one copy-pasteable string that lets a new member join a capsule.
//!
//! A token names the capsule, the key of its creator and the replicas to fetch it from:
//! `capsulefs-invite-1:` (the version) then hex of borsh(`Invitation`). It carries no key:
//! what lets its holder read is the grant the admin made for their public key, and the
//! creator's key lets `join` check that the metadata a replica sends is the one the admin
//! meant (the capsule id commits to the metadata, which names the creator and carries their
//! signature). A sealed token (`capsulefs-invite-1s:`, then hex of `crypto::wrap::seal_to`
//! for the member) keeps the capsule and its replicas to the member alone.

use borsh::{BorshDeserialize, BorshSerialize};

use crate::crypto::keys::Identity;
use crate::crypto::wrap;
use crate::record::codec::{self, Canonical, DecodeError};
use crate::record::{CapsuleId, WriterId};
use crate::{Error, Result};

pub const TOKEN_PREFIX: &str = "capsulefs-invite-1:";
pub const SEALED_PREFIX: &str = "capsulefs-invite-1s:";
const SEAL_INFO: &[u8] = b"capsulefs invitation v1\0";
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

    /// The token sealed for `member`: only their identity opens it.
    pub fn sealed_token(&self, member: &WriterId) -> Result<String> {
        let sealed =
            wrap::seal_to(member, SEAL_INFO, &codec::encode(self)).map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(format!("{SEALED_PREFIX}{}", hex::encode(sealed)))
    }

    /// Whether `s` is meant as a token (so that commands taking a name or URL can take one).
    pub fn is_token(s: &str) -> bool {
        s.starts_with(TOKEN_PREFIX) || s.starts_with(SEALED_PREFIX)
    }

    /// Reads a plain token, or a sealed one with whichever of `identities` it was sealed for.
    pub fn from_token(token: &str, identities: &[Identity]) -> Result<Self> {
        let bad =
            |why: String| Error::Invalid(format!("this invitation token is damaged ({why}): copy it again whole"));
        let token = token.trim();
        let bytes = match (token.strip_prefix(TOKEN_PREFIX), token.strip_prefix(SEALED_PREFIX)) {
            (Some(body), _) => hex::decode(body).map_err(|e| bad(e.to_string()))?,
            (_, Some(body)) => {
                let sealed = hex::decode(body).map_err(|e| bad(e.to_string()))?;
                let opened = identities.iter().find_map(|me| wrap::open_as(me, SEAL_INFO, &sealed));
                let opened = opened.ok_or_else(|| {
                    Error::Invalid(
                        "this invitation is sealed for another key: join with the identity whose public key \
                         you gave (--key NAME; `capsulefs key list`)"
                            .into(),
                    )
                })?;
                opened.to_vec()
            }
            _ => return Err(bad(format!("no {TOKEN_PREFIX} prefix"))),
        };
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
        assert_eq!(Invitation::from_token(&format!(" {token}\n"), &[]).unwrap(), invitation);
        assert!(Invitation::from_token(&token[..token.len() - 2], &[]).is_err(), "cut short");
        assert!(Invitation::from_token(&token.replace(TOKEN_PREFIX, ""), &[]).is_err(), "no prefix");
        let none = Invitation { replicas: Vec::new(), ..invitation };
        assert!(Invitation::from_token(&none.token(), &[]).is_err(), "no replica to join through");
    }

    #[test]
    fn a_sealed_token_opens_only_for_its_member() {
        let (carol, eve) = (Identity::generate("carol").unwrap(), Identity::generate("eve").unwrap());
        let invitation = Invitation {
            capsule: CapsuleId::from_bytes([7; 32]),
            creator: WriterId::from_bytes([9; 32]),
            replicas: vec!["http://srv:7070".into()],
        };
        let sealed = invitation.sealed_token(&carol.writer()).unwrap();
        assert!(Invitation::is_token(&sealed) && !sealed.contains("srv"));
        assert_eq!(Invitation::from_token(&sealed, &[eve.clone(), carol]).unwrap(), invitation);
        let refused = Invitation::from_token(&sealed, &[eve]).unwrap_err().to_string();
        assert!(refused.contains("sealed for another key"), "{refused}");
    }
}
