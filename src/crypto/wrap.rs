//! Wrapping a content key for one member: HPKE (RFC 9180, base mode) with
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and AES-256-GCM.
//!
//! Members are named by their ed25519 keys, so a member's X25519 key is the birationally
//! equivalent Montgomery point of its ed25519 key (the conversion age uses for ssh-ed25519
//! recipients); no second key pair to distribute. `info` binds a wrap to its capsule and key
//! generation and `aad` to the member, so a wrapped key cannot be moved to another capsule,
//! generation or member entry.

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};

use super::aead::ContentKey;
use super::keys::Identity;
use crate::record::{CapsuleId, KeyGen, WriterId};

const INFO_DOMAIN: &[u8] = b"capsulefs keystore v1\0";
/// The encapsulated key (32) and the wrapped content key with its tag (32 + 16).
pub const WRAPPED_LEN: usize = 32 + 48;

type KemPublic = <X25519HkdfSha256 as Kem>::PublicKey;
type KemPrivate = <X25519HkdfSha256 as Kem>::PrivateKey;
type KemEncapped = <X25519HkdfSha256 as Kem>::EncappedKey;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WrapError {
    #[error("{0:?} is not a usable member key")]
    BadMemberKey(WriterId),
    #[error("the wrapped key of generation {} does not open for {member:?}", generation.0)]
    DoesNotOpen { member: WriterId, generation: KeyGen },
}

fn info(capsule: &CapsuleId, generation: KeyGen) -> Vec<u8> {
    [INFO_DOMAIN, capsule.as_bytes(), &generation.0.to_le_bytes()].concat()
}

/// Wraps `key` so that only `member` can unwrap it.
pub fn wrap(key: &ContentKey, capsule: &CapsuleId, member: &WriterId) -> Result<[u8; WRAPPED_LEN], WrapError> {
    let ed =
        ed25519_dalek::VerifyingKey::from_bytes(member.as_bytes()).map_err(|_| WrapError::BadMemberKey(*member))?;
    let public = KemPublic::from_bytes(&ed.to_montgomery().to_bytes()).map_err(|_| WrapError::BadMemberKey(*member))?;
    let (encapped, wrapped) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
        &OpModeS::Base,
        &public,
        &info(capsule, key.generation()),
        key.secret(),
        member.as_bytes(),
    )
    .map_err(|_| WrapError::BadMemberKey(*member))?;
    let mut out = [0u8; WRAPPED_LEN];
    out[..32].copy_from_slice(&encapped.to_bytes());
    out[32..].copy_from_slice(&wrapped);
    Ok(out)
}

/// Unwraps generation `generation` of the content key with the member's own identity.
pub fn unwrap(
    wrapped: &[u8; WRAPPED_LEN],
    capsule: &CapsuleId,
    generation: KeyGen,
    me: &Identity,
) -> Result<ContentKey, WrapError> {
    let member = me.writer();
    let fail = || WrapError::DoesNotOpen { member, generation };
    let private =
        KemPrivate::from_bytes(&zeroize::Zeroizing::new(me.key().to_scalar_bytes())[..]).map_err(|_| fail())?;
    let encapped = KemEncapped::from_bytes(&wrapped[..32]).map_err(|_| fail())?;
    let opened = zeroize::Zeroizing::new(
        hpke::single_shot_open::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &private,
            &encapped,
            &info(capsule, generation),
            &wrapped[32..],
            member.as_bytes(),
        )
        .map_err(|_| fail())?,
    );
    let bytes: [u8; 32] = opened.as_slice().try_into().map_err(|_| fail())?;
    Ok(ContentKey::from_bytes(generation, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::aead::{Place, SealedKind, open, seal};

    #[test]
    fn only_the_member_unwraps_and_only_for_its_capsule_and_generation() {
        let (alice, bob) = (Identity::generate("alice").unwrap(), Identity::generate("bob").unwrap());
        let capsule = CapsuleId::from_bytes([3; 32]);
        let key = ContentKey::generate(KeyGen(4));
        let wrapped = wrap(&key, &capsule, &alice.writer()).unwrap();
        let back = unwrap(&wrapped, &capsule, KeyGen(4), &alice).unwrap();
        let place = Place { capsule, kind: SealedKind::Chunk, object: 1, offset: 0, level: 0 };
        assert_eq!(open(&back, &place, &seal(&key, &place, b"x")).unwrap(), b"x");
        assert!(unwrap(&wrapped, &capsule, KeyGen(4), &bob).is_err(), "another member");
        assert!(unwrap(&wrapped, &CapsuleId::from_bytes([9; 32]), KeyGen(4), &alice).is_err(), "another capsule");
        assert!(unwrap(&wrapped, &capsule, KeyGen(5), &alice).is_err(), "another generation");
        let mut tampered = wrapped;
        tampered[40] ^= 1;
        assert!(unwrap(&tampered, &capsule, KeyGen(4), &alice).is_err());
    }
}
