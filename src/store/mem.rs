//! An in-memory `Kv` for tests and tools: same semantics as RocksDB, nothing on disk.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::kv::{Batch, Cf, Durability, Entries, Kv};
use crate::{Result, StoreError};

type Map = BTreeMap<(Cf, Vec<u8>), Vec<u8>>;

#[derive(Default)]
pub struct MemKv {
    map: Mutex<Map>,
}

impl MemKv {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Kv for MemKv {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.map.lock().expect("no panics while locked").get(&(cf, key.to_vec())).cloned())
    }

    fn write(&self, batch: Batch, _durability: Durability) -> Result<()> {
        if !batch.staged.is_empty() {
            return Err(
                StoreError::Backend("a batch names staged values, which a memory store never stages".into()).into()
            );
        }
        let mut map = self.map.lock().expect("no panics while locked");
        for (cf, key, pieces) in batch.pieces {
            map.insert((cf, key), pieces.concat());
        }
        for (cf, key, value) in batch.ops {
            match value {
                Some(v) => map.insert((cf, key), v),
                None => map.remove(&(cf, key)),
            };
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn scan<'a>(&'a self, cf: Cf, prefix: &[u8], reverse: bool) -> Result<Entries<'a>> {
        let map = self.map.lock().expect("no panics while locked");
        let mut items: Vec<_> = map
            .range((cf, prefix.to_vec())..)
            .take_while(|((c, k), _)| *c == cf && k.starts_with(prefix))
            .map(|((_, k), v)| Ok((k.clone(), v.clone())))
            .collect();
        if reverse {
            items.reverse();
        }
        Ok(Box::new(items.into_iter()))
    }
}
