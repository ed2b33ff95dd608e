//! Where a sparse replica's missing sub-records come from, read ahead: a program reading a
//! file front to back asks for one chunk after another, and chunks written in order sit one
//! after another in their record. So sub-records are fetched in aligned runs of `RUN` (one
//! request each where the replica can answer so: `Replica::sub_record_run`), and on a miss the
//! run holding it and the next few are asked for at once, in parallel, while the reader
//! proves and keeps the first.

use std::sync::Arc;

use super::Replica;
use super::ahead::ReadAhead;
use crate::Result;
use crate::capsule::SubRecordFill;
use crate::record::{RecordHash, SubIdx};

/// Sub-records per run (16 chunks of 64 KiB: 1 MiB), runs asked for from the one read, and
/// requests in flight at once (a server takes 16 at once from one address).
const RUN: u32 = 16;
const RUNS_AHEAD: u32 = 4;
const AT_ONCE: usize = 4;
const HELD_BYTES: usize = 16 << 20;

/// A sparse capsule's source of the sub-records it does not hold (`Capsule::fill_from`).
pub struct SubRecordSource {
    replica: Arc<dyn Replica>,
    /// Runs by record and first sub-record.
    ahead: ReadAhead<(RecordHash, u32), Vec<Vec<u8>>>,
}

impl SubRecordSource {
    pub fn new(replica: Arc<dyn Replica>) -> Self {
        let source = replica.clone();
        let fetch = move |&(record, first): &(RecordHash, u32)| {
            let run = source.sub_record_run(record, SubIdx(first), RUN)?;
            Ok((!run.is_empty()).then_some(run))
        };
        Self { replica, ahead: ReadAhead::new(Arc::new(fetch), AT_ONCE, HELD_BYTES) }
    }
}

impl SubRecordFill for SubRecordSource {
    fn describe(&self) -> String {
        self.replica.describe()
    }

    /// The runs after the one asked for are asked for meanwhile; a record's last runs, past
    /// its end, come back empty.
    fn run_holding(&self, record: RecordHash, idx: SubIdx) -> Result<Vec<(SubIdx, Vec<u8>)>> {
        let first = idx.0 - idx.0 % RUN;
        // This one first: planned, it is kept if already fetched, and fetched now if not.
        self.ahead.plan((0..RUNS_AHEAD).map_while(|n| Some((record, first.checked_add(n * RUN)?))));
        let run = self.ahead.get(&(record, first))?.unwrap_or_default();
        Ok(run.into_iter().zip(first..).map(|(bytes, i)| (SubIdx(i), bytes)).collect())
    }
}
