//! Library-level tests: in-process, no FUSE, mostly over `store::mem::MemKv`.

mod dag;
mod encoding;
mod fs;
mod gate;
mod keystore;
mod layers;
mod membership;
mod merge;
mod objects;
mod replicas;
mod tamper;

use std::sync::Arc;

use capsulefs::capsule::{Admission, AppendOptions, Capsule, Ingested, NewCapsule};
use capsulefs::crypto::keys::Identity;
use capsulefs::crypto::sign;
use capsulefs::record::codec::FORMAT_VERSION;
use capsulefs::record::{DeviceId, KeyGen, Record, RecordHash, RecordHeader, RecordKind, Seq, merkle};
use capsulefs::store::mem::MemKv;
use capsulefs::store::{Durability, Kv};

/// A capsule owned by `owner` with `other` as a second writer whose key this machine lacks.
pub struct Fixture {
    pub kv: Arc<MemKv>,
    pub owner: Identity,
    pub other: Identity,
    pub cap: Capsule,
}

pub fn fixture() -> Fixture {
    let kv = Arc::new(MemKv::new());
    let owner = Identity::generate("owner").unwrap();
    let other = Identity::generate("other").unwrap();
    let spec = NewCapsule { writers: vec![other.writer()], ..NewCapsule::new("test", &owner) };
    let cap = Capsule::create(kv.clone() as Arc<dyn Kv>, spec, vec![owner.clone()]).unwrap();
    Fixture { kv, owner, other, cap }
}

pub fn signed() -> AppendOptions {
    AppendOptions { sign: true, durability: Durability::Buffered, ..Default::default() }
}

pub fn unsigned() -> AppendOptions {
    AppendOptions { durability: Durability::Buffered, ..Default::default() }
}

impl Fixture {
    pub fn genesis(&self) -> RecordHash {
        RecordHash::genesis(self.cap.id())
    }

    /// Builds a record by hand (any parents, any writer and seq), as a replica would send it.
    pub fn make(&self, by: &Identity, seq: u64, parents: &[RecordHash], payloads: &[&[u8]], sign_it: bool) -> Vec<u8> {
        let leaves: Vec<_> = payloads.iter().map(|p| merkle::leaf_hash(p)).collect();
        let mut parents = parents.to_vec();
        parents.sort();
        let header = RecordHeader {
            version: FORMAT_VERSION,
            capsule: self.cap.id(),
            parents,
            writer: by.writer(),
            device: DeviceId([6; 16]),
            seq: Seq(seq),
            time_ms: 1,
            kind: RecordKind::Data,
            key_gen: KeyGen(0),
            sub_count: payloads.len() as u32,
            merkle_root: merkle::build(&leaves).0,
        };
        let signature = sign_it.then(|| sign::sign_record(by.key(), &header.hash()));
        Record { header, signature }.encode()
    }

    /// Makes and ingests a record, which the gate takes alone only when it is signed (or
    /// already held); returns its hash.
    pub fn put(&self, by: &Identity, seq: u64, parents: &[RecordHash], payload: &[u8], sign_it: bool) -> RecordHash {
        let bytes = self.make(by, seq, parents, &[payload], sign_it);
        match self.cap.ingest(&bytes, &[payload], Durability::Buffered).unwrap() {
            Ingested::Stored(h) => h,
            other => panic!("expected a new record, got {other:?}"),
        }
    }

    /// Offers records made with `make` (each with one payload) as one batch, as a server takes
    /// an upload: all of them, or none.
    pub fn put_all(&self, records: &[(Vec<u8>, &[u8])]) -> capsulefs::Result<Vec<RecordHash>> {
        let batch = records
            .iter()
            .map(|(bytes, payload)| self.cap.check_incoming(bytes, vec![payload.to_vec()]))
            .collect::<capsulefs::Result<Vec<_>>>()?;
        Ok(self.cap.admit(batch, Admission::Whole, Durability::Buffered)?.stored)
    }

    /// The hash of a record made with `make`.
    pub fn hash_of(bytes: &[u8]) -> RecordHash {
        Record::decode(bytes).unwrap().hash()
    }
}
