//! Sealing for one member, HPKE (RFC 9180, base mode) with DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256 and AES-256-GCM: content keys (`wrap`) and anything else (`seal_to`, e.g. an
//! invitation token).
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

/// Seals `plaintext` so that only `member` can open it, bound to `info` and, as associated
/// data, to the member's id. Returns the encapsulated key (32 bytes) then the ciphertext.
pub fn seal_to(member: &WriterId, info: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, WrapError> {
    let bad = || WrapError::BadMemberKey(*member);
    let ed = ed25519_dalek::VerifyingKey::from_bytes(member.as_bytes()).map_err(|_| bad())?;
    let public = KemPublic::from_bytes(&ed.to_montgomery().to_bytes()).map_err(|_| bad())?;
    let (encapped, sealed) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
        &OpModeS::Base,
        &public,
        info,
        plaintext,
        member.as_bytes(),
    )
    .map_err(|_| bad())?;
    Ok([&encapped.to_bytes()[..], &sealed].concat())
}

/// Opens what `seal_to` sealed for `me` under `info`; None if it does not open.
pub fn open_as(me: &Identity, info: &[u8], sealed: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let private = KemPrivate::from_bytes(&zeroize::Zeroizing::new(me.key().to_scalar_bytes())[..]).ok()?;
    let encapped = KemEncapped::from_bytes(sealed.get(..32)?).ok()?;
    let opened = hpke::single_shot_open::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
        &OpModeR::Base,
        &private,
        &encapped,
        info,
        &sealed[32..],
        me.writer().as_bytes(),
    )
    .ok()?;
    Some(zeroize::Zeroizing::new(opened))
}

/// Wraps `key` so that only `member` can unwrap it.
pub fn wrap(key: &ContentKey, capsule: &CapsuleId, member: &WriterId) -> Result<[u8; WRAPPED_LEN], WrapError> {
    let sealed = seal_to(member, &info(capsule, key.generation()), key.secret())?;
    Ok(sealed.try_into().expect("32 bytes of encapsulated key and 48 of sealed content key"))
}

/// Unwraps generation `generation` of the content key with the member's own identity.
pub fn unwrap(
    wrapped: &[u8; WRAPPED_LEN],
    capsule: &CapsuleId,
    generation: KeyGen,
    me: &Identity,
) -> Result<ContentKey, WrapError> {
    let fail = || WrapError::DoesNotOpen { member: me.writer(), generation };
    let opened = open_as(me, &info(capsule, generation), wrapped).ok_or_else(fail)?;
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
