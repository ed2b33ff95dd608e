//! Where a sparse replica's missing sub-records come from, read ahead: a program reading a
//! file front to back asks for one chunk after another, and chunks written in order sit one
//! after another in their record, so on a miss the next few are asked for at once, in
//! parallel, while the reader proves and uses the first.

use std::sync::Arc;

use super::Replica;
use super::ahead::ReadAhead;
use crate::Result;
use crate::record::{RecordHash, SubIdx};

/// Sub-records asked for after each one read, and requests in flight at once (a server
/// takes 16 at once from one address).
const AHEAD: u32 = 16;
const AT_ONCE: usize = 8;
const HELD_BYTES: usize = 16 << 20;

/// A sparse capsule's source of the sub-records it does not hold (`Capsule::fill_from`).
pub struct SubRecordSource {
    replica: Arc<dyn Replica>,
    ahead: ReadAhead<(RecordHash, SubIdx)>,
}

impl SubRecordSource {
    pub fn new(replica: Arc<dyn Replica>) -> Self {
        let source = replica.clone();
        let fetch = move |&(record, idx): &(RecordHash, SubIdx)| source.sub_record(record, idx);
        Self { replica, ahead: ReadAhead::new(Arc::new(fetch), AT_ONCE, HELD_BYTES) }
    }

    pub fn describe(&self) -> String {
        self.replica.describe()
    }

    /// Sub-record `idx` of `record` as the replica stores it; the ones after it are asked for
    /// meanwhile (a record's last ones, past its end, come back None and cost one request).
    pub fn sub_record(&self, record: RecordHash, idx: SubIdx) -> Result<Option<Vec<u8>>> {
        // This one first: planned, it is kept if already fetched, and fetched now if not.
        self.ahead.plan((idx.0..idx.0.saturating_add(AHEAD)).map(|i| (record, SubIdx(i))));
        self.ahead.get(&(record, idx))
    }
}
