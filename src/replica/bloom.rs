//! The DataCapsule poster's anti-entropy filter: a Bloom filter over every record a replica
//! holds, so that a peer can send what the replica definitely lacks. About ten bits a record
//! whatever the difference (125 KB for 100k records, to find one missing record): kept as
//! the baseline `make bench-sync` measures the heads method against, and served by
//! `capsulefs serve` (`GET bloom`) so that the comparison runs over the real protocol.
//!
//! Bit positions come from a keyed hash of each record id under a salt the asker picks per
//! session, so nobody who chooses record ids can make them collide with ones they want
//! hidden. A filter only steers: what it says is present may be absent (false positives), and
//! the caller falls back to the deterministic walk for those.

use borsh::{BorshDeserialize, BorshSerialize};

use crate::record::RecordHash;
use crate::{Error, Result};

/// Most bits per record a replica builds a filter with: bounds the answer's size.
pub const MAX_BITS_PER_RECORD: u8 = 16;
/// The poster's figure.
pub const POSTER_BITS_PER_RECORD: u8 = 10;

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Bloom {
    salt: [u8; 16],
    hashes: u8,
    bits: Vec<u8>,
}

impl Bloom {
    /// An empty filter for about `records` records at `bits_per_record`, with the number of
    /// hash functions that minimises false positives (ln 2 times the bits per record).
    pub fn new(salt: [u8; 16], records: usize, bits_per_record: u8) -> Result<Self> {
        if bits_per_record == 0 || bits_per_record > MAX_BITS_PER_RECORD {
            return Err(Error::Invalid(format!("a Bloom filter takes 1 to {MAX_BITS_PER_RECORD} bits a record")));
        }
        let bytes = (records.max(1) * bits_per_record as usize).div_ceil(8);
        let hashes = ((bits_per_record as f64) * std::f64::consts::LN_2).round().max(1.0) as u8;
        Ok(Self { salt, hashes, bits: vec![0; bytes] })
    }

    /// A filter as a replica sent it, checked for a shape the methods below can use.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bloom: Self =
            borsh::from_slice(bytes).map_err(|e| Error::Replica(format!("an undecodable Bloom filter: {e}")))?;
        if bloom.bits.is_empty() || bloom.hashes == 0 || bloom.hashes > MAX_BITS_PER_RECORD {
            return Err(Error::Replica("a Bloom filter with no bits or a bad number of hashes".into()));
        }
        Ok(bloom)
    }

    pub fn salt(&self) -> [u8; 16] {
        self.salt
    }

    /// Bytes on the wire.
    pub fn size(&self) -> usize {
        16 + 1 + 4 + self.bits.len()
    }

    /// The bit positions of `record`: double hashing (Kirsch and Mitzenmacher) over two 64-bit
    /// halves of a hash keyed by the salt.
    fn positions(&self, record: &RecordHash) -> impl Iterator<Item = usize> + use<> {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&self.salt);
        let keyed = blake3::keyed_hash(&key, record.as_bytes());
        let word = |i: usize| u64::from_le_bytes(keyed.as_bytes()[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (h1, h2) = (word(0), word(1) | 1);
        let m = self.bits.len() as u64 * 8;
        (0..self.hashes as u64).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % m) as usize)
    }

    pub fn insert(&mut self, record: &RecordHash) {
        for bit in self.positions(record) {
            self.bits[bit / 8] |= 1 << (bit % 8);
        }
    }

    /// False: the replica that built it surely lacks `record`. True: it probably holds it.
    pub fn may_hold(&self, record: &RecordHash) -> bool {
        self.positions(record).all(|bit| self.bits[bit / 8] & (1 << (bit % 8)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u64) -> RecordHash {
        RecordHash::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    #[test]
    fn holds_what_was_inserted_and_misses_about_one_percent_of_the_rest() {
        let mut bloom = Bloom::new([7; 16], 10_000, POSTER_BITS_PER_RECORD).unwrap();
        (0..10_000).for_each(|i| bloom.insert(&id(i)));
        assert!((0..10_000).all(|i| bloom.may_hold(&id(i))));
        let false_positives = (10_000..30_000).filter(|&i| bloom.may_hold(&id(i))).count();
        // 10 bits and 7 hashes: about 0.8 %, so 160 of 20 000; far from 0 and from 2 %.
        assert!((40..400).contains(&false_positives), "{false_positives}");
        assert_eq!(bloom.size(), 16 + 1 + 4 + 12_500);
    }

    #[test]
    fn another_salt_moves_every_record_and_bad_filters_are_refused() {
        let (mut a, mut b) = (Bloom::new([1; 16], 100, 10).unwrap(), Bloom::new([2; 16], 100, 10).unwrap());
        a.insert(&id(1));
        b.insert(&id(1));
        assert_ne!(a.bits, b.bits);
        assert!(Bloom::decode(&borsh::to_vec(&a).unwrap()).unwrap().may_hold(&id(1)));
        let empty = Bloom { salt: [0; 16], hashes: 3, bits: vec![] };
        assert!(Bloom::decode(&borsh::to_vec(&empty).unwrap()).is_err());
        assert!(Bloom::new([0; 16], 10, 0).is_err() && Bloom::new([0; 16], 10, 17).is_err());
    }
}
