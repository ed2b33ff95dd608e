//! Every call to ed25519, AES-GCM, HPKE and key derivation lives here; nothing else imports
//! those crates.

pub mod aead;
pub mod keys;
pub mod sign;
pub mod wrap;

/// Fresh bytes from the OS random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).expect("the OS random source is available on every supported platform");
    out
}
