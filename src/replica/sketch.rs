//! A rateless set-reconciliation sketch (a rateless IBLT, after Yang, Gilad and Alizadeh,
//! "Practical Rateless Set Reconciliation", 2024) over sets of record hashes: two replicas
//! learn the symmetric difference of their head sets in about 1.35–2 cells per differing
//! element, whatever the sets' sizes, where listing the heads costs 32 bytes per head.
//!
//! Every element maps to cell 0 and then to cells further out with probability 1/(1 + i/2),
//! so any prefix of the cell sequence is a usable sketch: the asker sends more cells only
//! when the answerer cannot peel the difference yet. Positions and check values come from a
//! hash keyed by a salt the asker picks per exchange, so nobody who chooses record ids can
//! make two of them cancel out. A decoded difference is a hint like any replica's answer:
//! transfers check what it leads to (every head held in the end, or a walk for the rest).

use borsh::{BorshDeserialize, BorshSerialize};

use crate::record::RecordHash;

/// Most cells one request carries: bounds the work a request can ask of a replica.
pub const MAX_CELLS: usize = 4096;

/// One coded cell: the XOR of the elements mapped to it, the XOR of their keyed checks, and
/// how many there were (asker's count minus answerer's, once subtracted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Cell {
    sum: [u8; 32],
    check: u64,
    count: i32,
}

/// Bytes one cell takes on the wire.
pub const CELL_BYTES: usize = 32 + 8 + 4;

impl Cell {
    fn apply(&mut self, element: &RecordHash, check: u64, sign: i32) {
        self.sum.iter_mut().zip(element.as_bytes()).for_each(|(a, b)| *a ^= b);
        self.check ^= check;
        self.count += sign;
    }

    fn is_empty(&self) -> bool {
        self.count == 0 && self.check == 0 && self.sum == [0; 32]
    }
}

/// The keyed check of an element, which also seeds its cell positions.
fn check_of(key: &[u8; 32], element: &RecordHash) -> u64 {
    let h = blake3::keyed_hash(key, element.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn key_of(salt: &[u8; 16]) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(salt);
    key[16..].copy_from_slice(b"capsulefs sketch");
    key
}

/// The cells an element maps to, from 0 on: each next one is a random distance further,
/// so that cell i holds the element with probability 1/(1 + i/2).
struct Positions {
    prng: u64,
    at: u64,
    started: bool,
}

impl Iterator for Positions {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if !self.started {
            self.started = true;
            return Some(0);
        }
        self.prng = self.prng.wrapping_mul(0xda94_2042_e4dd_58b5);
        let step = ((self.at as f64 + 1.5) * ((1u64 << 32) as f64 / ((self.prng as f64) + 1.0).sqrt() - 1.0)).ceil();
        // A huge step (a tiny random draw) only means "never again" for any sketch we make.
        self.at = self.at.saturating_add(if step.is_finite() && step >= 1.0 { step as u64 } else { 1 });
        Some(self.at)
    }
}

fn positions(check: u64) -> Positions {
    Positions { prng: check, at: 0, started: false }
}

/// The first `cells` cells of the sketch of `set` under `salt`.
pub fn encode(set: &[RecordHash], salt: &[u8; 16], cells: usize) -> Vec<Cell> {
    let key = key_of(salt);
    let mut out = vec![Cell::default(); cells];
    for element in set {
        let check = check_of(&key, element);
        for i in positions(check).take_while(|&i| (i as usize) < cells) {
            out[i as usize].apply(element, check, 1);
        }
    }
    out
}

/// What a decoded difference says.
#[derive(Clone, Debug, Default, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Difference {
    /// In the asker's set only.
    pub asker_only: Vec<RecordHash>,
    /// In the answerer's set only.
    pub answerer_only: Vec<RecordHash>,
}

/// A replica's answer to a sketch of the asker's heads.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum Answer {
    /// Its heads, listed: when the list is no longer than the sketch was.
    Heads(Vec<RecordHash>),
    /// The difference between the two sets of heads.
    Difference(Difference),
    /// These cells were too few; it has this many heads (for the asker's next estimate).
    More { heads: u32 },
}

impl Answer {
    /// A replica's answer to `cells` from its `heads`.
    pub fn to(cells: &[Cell], heads: Vec<RecordHash>, salt: &[u8; 16]) -> Self {
        let cells = &cells[..cells.len().min(MAX_CELLS)];
        if 32 * heads.len() <= CELL_BYTES * cells.len() {
            return Answer::Heads(heads);
        }
        match decode(cells, &heads, salt) {
            Some(d) => Answer::Difference(d),
            None => Answer::More { heads: heads.len() as u32 },
        }
    }

    /// Bytes on the wire.
    pub fn size(&self) -> u64 {
        let list = |v: &Vec<RecordHash>| 4 + 32 * v.len() as u64;
        1 + match self {
            Answer::Heads(h) => list(h),
            Answer::Difference(d) => list(&d.asker_only) + list(&d.answerer_only),
            Answer::More { .. } => 4,
        }
    }
}

/// A sketch of the asker's heads, as sent.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Request {
    pub salt: [u8; 16],
    pub cells: Vec<Cell>,
}

/// Subtracts the sketch of `ours` from the asker's `cells` and peels the difference; None
/// when these cells are too few to peel it all (the asker then sends more).
pub fn decode(cells: &[Cell], ours: &[RecordHash], salt: &[u8; 16]) -> Option<Difference> {
    let key = key_of(salt);
    let mut cells = cells.to_vec();
    let n = cells.len();
    for element in ours {
        let check = check_of(&key, element);
        for i in positions(check).take_while(|&i| (i as usize) < n) {
            cells[i as usize].apply(element, check, -1);
        }
    }
    let mut diff = Difference::default();
    let mut pure: Vec<usize> = (0..n).collect();
    while let Some(i) = pure.pop() {
        let cell = cells[i];
        if cell.count.abs() != 1 {
            continue;
        }
        let element = RecordHash::from_bytes(cell.sum);
        let check = check_of(&key, &element);
        if check != cell.check {
            continue;
        }
        // A pure cell: the element is on one side only; take it out everywhere.
        for j in positions(check).take_while(|&j| (j as usize) < n) {
            cells[j as usize].apply(&element, check, -cell.count);
            pure.push(j as usize);
        }
        if cell.count == 1 {
            diff.asker_only.push(element)
        } else {
            diff.answerer_only.push(element)
        }
        // A bound on the work a request can cause, whatever its cells say.
        if diff.asker_only.len() + diff.answerer_only.len() > n {
            return None;
        }
    }
    cells.iter().all(Cell::is_empty).then_some(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(range: std::ops::Range<u64>) -> Vec<RecordHash> {
        range.map(|i| RecordHash::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())).collect()
    }

    /// Cells needed, doubling from 8, until the difference of `a` and `b` decodes.
    fn cells_needed(a: &[RecordHash], b: &[RecordHash], salt: [u8; 16]) -> (usize, Difference) {
        let mut cells = 8;
        loop {
            if let Some(d) = decode(&encode(a, &salt, cells), b, &salt) {
                return (cells, d);
            }
            cells *= 2;
            assert!(cells <= MAX_CELLS, "never decoded");
        }
    }

    #[test]
    fn the_difference_decodes_exactly_in_cells_that_grow_with_it_not_with_the_sets() {
        let shared = ids(0..5000);
        for d in [0u64, 1, 10, 100] {
            let mut a = shared.clone();
            a.extend(ids(10_000..10_000 + d));
            let mut b = shared.clone();
            b.extend(ids(20_000..20_000 + d / 2));
            let (cells, mut diff) = cells_needed(&a, &b, [d as u8; 16]);
            diff.asker_only.sort();
            diff.answerer_only.sort();
            let mut want_a = ids(10_000..10_000 + d);
            want_a.sort();
            let mut want_b = ids(20_000..20_000 + d / 2);
            want_b.sort();
            assert_eq!((diff.asker_only, diff.answerer_only), (want_a, want_b));
            let differing = (d + d / 2) as usize;
            assert!(cells <= 8.max(4 * differing), "{cells} cells for {differing} differences among 5000");
        }
    }

    #[test]
    fn too_few_cells_say_so_and_garbage_cells_decode_to_nothing() {
        let a = ids(0..200);
        assert_eq!(decode(&encode(&a, &[1; 16], 8), &[], &[1; 16]), None);
        let garbage: Vec<Cell> =
            (0..64u8).map(|i| Cell { sum: [i; 32], check: u64::from(i) * 977, count: i32::from(i % 3) - 1 }).collect();
        assert_eq!(decode(&garbage, &a, &[1; 16]), None);
    }
}
