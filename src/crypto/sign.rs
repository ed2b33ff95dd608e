//! Signatures over metadata ids and record hashes, and the local attestation of unsigned records.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::record::header::signing_message;
use crate::record::{CapsuleId, RecordHash, Signature, WriterId};

const METADATA_DOMAIN: &[u8] = b"capsulefs metadata signature v1\0";
const HEADS_DOMAIN: &[u8] = b"capsulefs object-store heads v1\0";
const NAME_DOMAIN: &[u8] = b"capsulefs name binding v1\0";
const ATTEST_CONTEXT: &str = "capsulefs 2026 local attestation of unsigned records v1";
const PROVEN_MARK_CONTEXT: &str = "capsulefs 2026 proven mark of a record in a local store v1";

/// A secret of this machine's (kept beside its keys, never in a store) that authenticates the
/// trust state persisted in stores: whoever can write a store but not read the keys cannot
/// forge a proven mark.
#[derive(Clone)]
pub struct TrustKey(zeroize::Zeroizing<[u8; 32]>);

impl TrustKey {
    pub fn generate() -> Self {
        Self::from_bytes(super::random_bytes())
    }

    pub fn from_bytes(secret: [u8; 32]) -> Self {
        Self(zeroize::Zeroizing::new(blake3::derive_key(PROVEN_MARK_CONTEXT, &secret)))
    }

    /// The mark stored for `record` of `capsule` once it is proven.
    pub fn mark(&self, capsule: &CapsuleId, record: &RecordHash) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(capsule.as_bytes());
        h.update(record.as_bytes());
        *h.finalize().as_bytes()
    }

    /// A MAC of `bytes` for purpose `context` (its own key, derived from this one): how other
    /// local notes kept in a store are authenticated.
    pub fn note_mac(&self, context: &str, bytes: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&blake3::derive_key(context, &*self.0), bytes).as_bytes()
    }

    pub fn check_mark(&self, capsule: &CapsuleId, record: &RecordHash, mark: &[u8]) -> bool {
        <[u8; 32]>::try_from(mark)
            .is_ok_and(|m| blake3::Hash::from(m) == blake3::Hash::from(self.mark(capsule, record)))
    }
}

pub fn writer_id(key: &SigningKey) -> WriterId {
    WriterId::from_bytes(key.verifying_key().to_bytes())
}

/// Writers' keys, decompressed once: decompressing a point (a field inversion) was a fifth of
/// every signature check, and a capsule has few writers. Cleared when it grows past a bound,
/// so a stream of strangers' keys cannot grow it without limit.
static VERIFYING_KEYS: LazyLock<Mutex<HashMap<WriterId, VerifyingKey>>> = LazyLock::new(Mutex::default);
const VERIFYING_KEYS_MAX: usize = 4096;

fn verifying_key(writer: &WriterId) -> Option<VerifyingKey> {
    let mut keys = VERIFYING_KEYS.lock().expect("no panics while locked");
    if let Some(vk) = keys.get(writer) {
        return Some(*vk);
    }
    let vk = VerifyingKey::from_bytes(writer.as_bytes()).ok()?;
    if keys.len() >= VERIFYING_KEYS_MAX {
        keys.clear();
    }
    keys.insert(*writer, vk);
    Some(vk)
}

fn verify(writer: &WriterId, msg: &[u8], sig: &Signature) -> bool {
    let Some(vk) = verifying_key(writer) else { return false };
    // verify_strict rejects small-order keys and non-canonical s, so no signature is malleable.
    vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig.0)).is_ok()
}

pub fn sign_record(key: &SigningKey, record: &RecordHash) -> Signature {
    Signature(key.sign(&signing_message(record)).to_bytes())
}

pub fn verify_record(writer: &WriterId, record: &RecordHash, sig: &Signature) -> bool {
    verify(writer, &signing_message(record), sig)
}

fn metadata_message(id: &CapsuleId) -> Vec<u8> {
    [METADATA_DOMAIN, id.as_bytes()].concat()
}

pub fn sign_metadata(key: &SigningKey, id: &CapsuleId) -> Signature {
    Signature(key.sign(&metadata_message(id)).to_bytes())
}

pub fn verify_metadata(creator: &WriterId, id: &CapsuleId, sig: &Signature) -> bool {
    verify(creator, &metadata_message(id), sig)
}

/// A device's statement of the heads it pushed to a bucket or folder (`replica::objects`), as
/// the blake3 digest of its encoding.
pub fn sign_heads(key: &SigningKey, statement: &[u8; 32]) -> Signature {
    Signature(key.sign(&[HEADS_DOMAIN, &statement[..]].concat()).to_bytes())
}

pub fn verify_heads(writer: &WriterId, statement: &[u8; 32], sig: &Signature) -> bool {
    verify(writer, &[HEADS_DOMAIN, &statement[..]].concat(), sig)
}

/// A capsule's creator binding a human-readable name to it (`member::name`), as the blake3
/// digest of the name and the capsule id.
pub fn sign_name(key: &SigningKey, binding: &[u8; 32]) -> Signature {
    Signature(key.sign(&[NAME_DOMAIN, &binding[..]].concat()).to_bytes())
}

pub fn verify_name(creator: &WriterId, binding: &[u8; 32], sig: &Signature) -> bool {
    verify(creator, &[NAME_DOMAIN, &binding[..]].concat(), sig)
}

/// A MAC only the holder of `key` can make: it proves, on the writer's own machine, that the
/// writer stored this unsigned record, at ~1/100 of a signature's cost. It never leaves the machine.
pub fn attest(key: &SigningKey, capsule: &CapsuleId, record: &RecordHash) -> [u8; 32] {
    let mac_key = blake3::derive_key(ATTEST_CONTEXT, key.as_bytes());
    let mut h = blake3::Hasher::new_keyed(&mac_key);
    h.update(capsule.as_bytes());
    h.update(record.as_bytes());
    *h.finalize().as_bytes()
}

pub fn check_attestation(key: &SigningKey, capsule: &CapsuleId, record: &RecordHash, mac: &[u8]) -> bool {
    // blake3::Hash's PartialEq is constant-time.
    <[u8; 32]>::try_from(mac).is_ok_and(|m| blake3::Hash::from(m) == blake3::Hash::from(attest(key, capsule, record)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_key_and_message() {
        let (a, b) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        let r = RecordHash::from_bytes([9; 32]);
        let sig = sign_record(&a, &r);
        assert!(verify_record(&writer_id(&a), &r, &sig));
        assert!(!verify_record(&writer_id(&b), &r, &sig));
        assert!(!verify_record(&writer_id(&a), &RecordHash::from_bytes([8; 32]), &sig));
        // A record signature is not a metadata signature over the same 32 bytes.
        assert!(!verify_metadata(&writer_id(&a), &CapsuleId::from_bytes([9; 32]), &sig));
    }

    #[test]
    fn proven_marks_need_the_trust_key() {
        let (a, b) = (TrustKey::generate(), TrustKey::generate());
        let (c, r) = (CapsuleId::from_bytes([3; 32]), RecordHash::from_bytes([4; 32]));
        let mark = a.mark(&c, &r);
        assert!(a.check_mark(&c, &r, &mark));
        assert!(!b.check_mark(&c, &r, &mark));
        assert!(!a.check_mark(&c, &RecordHash::from_bytes([5; 32]), &mark));
        assert!(!a.check_mark(&CapsuleId::from_bytes([6; 32]), &r, &mark));
        assert!(!a.check_mark(&c, &r, &[]), "the unauthenticated empty mark of older stores");
    }

    #[test]
    fn attestation_needs_the_key() {
        let (a, b) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        let (c, r) = (CapsuleId::from_bytes([3; 32]), RecordHash::from_bytes([4; 32]));
        let mac = attest(&a, &c, &r);
        assert!(check_attestation(&a, &c, &r, &mac));
        assert!(!check_attestation(&b, &c, &r, &mac));
        assert!(!check_attestation(&a, &c, &r, &mac[..31]));
    }
}
