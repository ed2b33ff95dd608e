//! Damage to a real on-disk store: caught by `verify`, never returned by `cat`.

use std::sync::Arc;

use capsulefs::record::RecordHash;
use capsulefs::store::rocks::RocksKv;
use capsulefs::store::{Batch, Cf, Durability, Kv};

use super::{Home, last_line};

fn flip_bit_in_record(home: &Home, id: &str, record: &str) {
    let kv = Arc::new(RocksKv::open(&home.store_path(id), false).unwrap());
    let h = RecordHash::from_hex(record).unwrap();
    let mut bytes = kv.get(Cf::Records, h.as_bytes()).unwrap().unwrap();
    let last = bytes.len() - 70; // inside the header, before the signature
    bytes[last] ^= 0x04;
    let mut b = Batch::default();
    b.put(Cf::Records, h.as_bytes().to_vec(), bytes);
    kv.write(b, Durability::Durable).unwrap();
}

#[test]
fn a_flipped_bit_in_a_stored_record_is_caught_and_never_returned() {
    let home = Home::default();
    let id = home.ok(&["create", "c"]);
    let (a, b) = (home.file("a", b"alpha"), home.file("b", b"beta"));
    let good = last_line(&home.ok(&["append", "c", "--sign", a.to_str().unwrap()]));
    let bad = last_line(&home.ok(&["append", "c", "--sign", b.to_str().unwrap()]));
    flip_bit_in_record(&home, &id, &bad);

    let out = home.run(&["cat", "c", &format!("{bad}:0")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing reaches stdout");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&bad[..12]), "the error names the record");

    assert_eq!(home.run(&["cat", "c", &format!("{good}:0")]).stdout, b"alpha");

    let out = home.run(&["verify", "c"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("verify failed") && err.contains(&bad[..12]), "{err}");
}

/// A capsule of four signed appends of five 64 KiB sub-records each, reopened once so its
/// index lives in table files (the values are in pack files from the start: a durable batch
/// keeps only up to 256 KiB of them inline); returns its id.
fn capsule_on_disk(home: &Home) -> String {
    let id = home.ok(&["create", "c"]);
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let f = home.file("p", &payload);
    let f = f.to_str().unwrap();
    for _ in 0..4 {
        home.ok(&["append", "c", "--sign", f, f, f, f, f]);
    }
    // Reopening replays the WAL into table files.
    home.ok(&["verify", "c"]);
    id
}

/// Inverts every `step`th byte from `from` to `until(file length)` of every file named
/// *.`extension` in the store folder `under` (relative to the store); returns how many files
/// it damaged.
fn damage_files(
    home: &Home,
    id: &str,
    (under, extension): (&str, &str),
    (from, until, step): (usize, fn(usize) -> usize, usize),
) -> usize {
    let mut damaged = 0;
    for entry in std::fs::read_dir(home.store_path(id).join(under)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == extension) {
            let mut bytes = std::fs::read(&path).unwrap();
            for i in (from..until(bytes.len())).step_by(step) {
                bytes[i] ^= 0xff;
            }
            std::fs::write(&path, bytes).unwrap();
            damaged += 1;
        }
    }
    damaged
}

#[test]
fn damaged_table_files_are_reported_not_repaired() {
    let home = Home::default();
    let id = capsule_on_disk(&home);
    assert!(damage_files(&home, &id, ("", "sst"), (64, |len| len / 2, 97)) > 0, "expected table files in the store");
    let out = home.run(&["verify", "c"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupted"));
    let out = home.run(&["cat", "c", "head:0"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn damaged_pack_files_are_refused_by_the_proofs() {
    let home = Home::default();
    let id = capsule_on_disk(&home);
    assert!(damage_files(&home, &id, ("packs", "pack"), (200, |len| len, 997)) > 0, "expected pack files in the store");
    // Packs carry no checksum of their own; the Merkle proof refuses the damaged values.
    let out = home.run(&["verify", "c"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Merkle path"));
    let out = home.run(&["cat", "c", "head:0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
}
