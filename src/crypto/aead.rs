//! Sealing payloads with AES-256-GCM under a capsule's content key, bound to their place.
//!
//! Nonces never repeat, crash or not, because there is no counter to lose: every seal draws a
//! fresh 24-byte salt and derives a one-time AES key as `blake3_keyed(content key, domain ‖
//! salt)`. That key encrypts exactly one message, under the all-zero nonce. Two seals share a
//! key only if two random 192-bit salts collide (birthday bound: 2^96 seals per key generation).
//!
//! Sealed layout: `salt (24) ‖ ciphertext ‖ GCM tag (16)`: 40 bytes over the plaintext.
//! Associated data (`Place`) binds each payload to its capsule, key generation, kind, object,
//! offset and tree level, so a chunk moved to another file or offset, a node moved within its
//! tree, or a payload replayed under another generation does not open.

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use zeroize::Zeroizing;

use crate::record::{CapsuleId, KeyGen};

const SALT_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a sealed payload adds to its plaintext.
pub const SEAL_OVERHEAD: usize = SALT_LEN + TAG_LEN;
const SUBKEY_DOMAIN: &[u8] = b"capsulefs seal one-time key v1\0";

/// One generation of a capsule's content key. A generation changes when a member is removed.
#[derive(Clone)]
pub struct ContentKey {
    generation: KeyGen,
    bytes: Zeroizing<[u8; 32]>,
}

impl ContentKey {
    pub fn generate(generation: KeyGen) -> Self {
        Self { generation, bytes: Zeroizing::new(super::random_bytes()) }
    }

    pub fn from_bytes(generation: KeyGen, bytes: [u8; 32]) -> Self {
        Self { generation, bytes: Zeroizing::new(bytes) }
    }

    pub fn generation(&self) -> KeyGen {
        self.generation
    }

    pub(in crate::crypto) fn secret(&self) -> &[u8; 32] {
        &self.bytes
    }

    fn one_time_cipher(&self, salt: &[u8]) -> Aes256Gcm {
        let mut h = blake3::Hasher::new_keyed(&self.bytes);
        h.update(SUBKEY_DOMAIN);
        h.update(salt);
        let key = Zeroizing::new(*h.finalize().as_bytes());
        Aes256Gcm::new_from_slice(&*key).expect("a 32-byte key fits AES-256")
    }
}

/// What kind of object a sealed payload is, as far as the associated data is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SealedKind {
    /// File bytes; `offset` is their byte offset.
    Chunk = 1,
    /// A node of a file's chunk map.
    ChunkMap = 2,
    /// A node of a directory.
    Directory = 3,
    /// A node of the inode table.
    InodeTable = 4,
    /// The root of one commit.
    Superblock = 5,
    /// The previous generation of the content key, sealed under the next (`seal_previous`).
    PreviousKey = 6,
}

/// Where a sealed payload belongs; it is the associated data of its seal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Place {
    pub capsule: CapsuleId,
    pub kind: SealedKind,
    /// The file or directory (inode number) the payload belongs to.
    pub object: u64,
    /// Byte offset of a chunk in its file; the key prefix of a tree node.
    pub offset: u64,
    /// Depth of a tree node; 0 for other kinds.
    pub level: u8,
}

impl Place {
    fn associated_data(&self, generation: KeyGen) -> [u8; 54] {
        let mut aad = [0u8; 54];
        aad[..32].copy_from_slice(self.capsule.as_bytes());
        aad[32..36].copy_from_slice(&generation.0.to_le_bytes());
        aad[36] = self.kind as u8;
        aad[37..45].copy_from_slice(&self.object.to_le_bytes());
        aad[45..53].copy_from_slice(&self.offset.to_le_bytes());
        aad[53] = self.level;
        aad
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sealed payload does not open with content key generation {} at {place:?}", generation.0)]
pub struct OpenError {
    pub generation: KeyGen,
    pub place: Place,
}

/// Length of `plain_len` bytes once sealed.
pub fn sealed_len(plain_len: usize) -> usize {
    SALT_LEN + plain_len + TAG_LEN
}

pub fn seal(key: &ContentKey, place: &Place, plaintext: &[u8]) -> Vec<u8> {
    let mut sealed = vec![0; sealed_len(plaintext.len())];
    seal_into(key, place, plaintext, &mut sealed);
    sealed
}

/// Writes `salt ‖ ciphertext ‖ tag` into `out` (`sealed_len` bytes), encrypting straight from
/// `plaintext` into its place (one pass; encrypting in place would first need a copy).
pub fn seal_into(key: &ContentKey, place: &Place, plaintext: &[u8], out: &mut [u8]) {
    assert_eq!(out.len(), sealed_len(plaintext.len()), "seal_into needs sealed_len bytes");
    let salt: [u8; SALT_LEN] = super::random_bytes();
    let aad = place.associated_data(key.generation);
    let (head, tag_out) = out.split_at_mut(SALT_LEN + plaintext.len());
    let (salt_out, ciphertext) = head.split_at_mut(SALT_LEN);
    salt_out.copy_from_slice(&salt);
    let buf = InOutBuf::new(plaintext, ciphertext).expect("output sized to the plaintext");
    let tag = key
        .one_time_cipher(&salt)
        .encrypt_inout_detached(&Nonce::default(), &aad, buf)
        .expect("AES-GCM encrypts any message below 64 GiB");
    tag_out.copy_from_slice(&tag);
}

/// The key of generation `key - 1`, sealed under `key`: whoever is given a generation can open
/// every earlier one, so a member added after a rotation reads the history granted to them.
pub fn seal_previous(key: &ContentKey, previous: &ContentKey, capsule: CapsuleId) -> Vec<u8> {
    seal(key, &previous_place(capsule, previous.generation), &previous.bytes[..])
}

/// Opens what `seal_previous` made under `key`.
pub fn open_previous(key: &ContentKey, capsule: CapsuleId, sealed: &[u8]) -> Result<ContentKey, OpenError> {
    let generation = KeyGen(key.generation.0.saturating_sub(1));
    let place = previous_place(capsule, generation);
    let plain = Zeroizing::new(open(key, &place, sealed)?);
    let bytes: [u8; 32] = plain[..].try_into().map_err(|_| OpenError { generation: key.generation, place })?;
    Ok(ContentKey::from_bytes(generation, bytes))
}

/// Whether two keys are the same key of the same generation.
pub fn same_key(a: &ContentKey, b: &ContentKey) -> bool {
    a.generation == b.generation && a.bytes[..] == b.bytes[..]
}

fn previous_place(capsule: CapsuleId, generation: KeyGen) -> Place {
    Place { capsule, kind: SealedKind::PreviousKey, object: u64::from(generation.0), offset: 0, level: 0 }
}

pub fn open(key: &ContentKey, place: &Place, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    let mut plaintext = vec![0; sealed.len().saturating_sub(SEAL_OVERHEAD)];
    open_into(key, place, sealed, &mut plaintext)?;
    Ok(plaintext)
}

/// `open`, decrypting straight into `out`, which holds `sealed.len() - SEAL_OVERHEAD` bytes.
pub fn open_into(key: &ContentKey, place: &Place, sealed: &[u8], out: &mut [u8]) -> Result<(), OpenError> {
    let err = || OpenError { generation: key.generation, place: *place };
    if sealed.len() < SEAL_OVERHEAD {
        return Err(err());
    }
    let (salt, rest) = sealed.split_at(SALT_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let tag: Tag = Tag::try_from(tag).expect("TAG_LEN bytes");
    let aad = place.associated_data(key.generation);
    let buf = InOutBuf::new(ciphertext, out).expect("open_into needs sealed.len() - SEAL_OVERHEAD bytes");
    key.one_time_cipher(salt).decrypt_inout_detached(&Nonce::default(), &aad, buf, &tag).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(object: u64, offset: u64) -> Place {
        Place { capsule: CapsuleId::from_bytes([1; 32]), kind: SealedKind::Chunk, object, offset, level: 0 }
    }

    #[test]
    fn seals_open_only_with_their_key_generation_and_place() {
        let key = ContentKey::generate(KeyGen(1));
        let here = place(7, 65536);
        let sealed = seal(&key, &here, b"secret bytes");
        assert_eq!(sealed.len(), 12 + SEAL_OVERHEAD);
        assert_eq!(open(&key, &here, &sealed).unwrap(), b"secret bytes");
        assert!(open(&key, &place(8, 65536), &sealed).is_err(), "moved to another file");
        assert!(open(&key, &place(7, 0), &sealed).is_err(), "moved to another offset");
        let node = Place { kind: SealedKind::ChunkMap, ..here };
        assert!(open(&key, &node, &sealed).is_err(), "read as another kind");
        let node = Place { level: 1, ..here };
        assert!(open(&key, &node, &sealed).is_err(), "read as another kind");
        let same_bytes_next_gen = ContentKey::from_bytes(KeyGen(2), *key.secret());
        assert!(open(&same_bytes_next_gen, &here, &sealed).is_err(), "replayed under another generation");
        assert!(open(&ContentKey::generate(KeyGen(1)), &here, &sealed).is_err(), "another key");
    }

    #[test]
    fn any_flipped_bit_or_truncation_fails() {
        let key = ContentKey::generate(KeyGen(1));
        let here = place(1, 0);
        let sealed = seal(&key, &here, &[0xaa; 100]);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(&key, &here, &bad).is_err(), "bit flip at {i}");
        }
        assert!(open(&key, &here, &sealed[..sealed.len() - 1]).is_err());
        assert!(open(&key, &here, &sealed[..SEAL_OVERHEAD - 1]).is_err());
    }

    #[test]
    fn equal_plaintexts_seal_differently() {
        let key = ContentKey::generate(KeyGen(1));
        let here = place(1, 0);
        let (a, b) = (seal(&key, &here, b"same"), seal(&key, &here, b"same"));
        assert_ne!(a, b);
        assert_ne!(a[SALT_LEN..], b[SALT_LEN..], "fresh one-time key, so fresh ciphertext");
        assert_eq!(open(&key, &here, &seal(&key, &here, b"")).unwrap(), b"");
    }
}
