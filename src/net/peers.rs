//! Anti-entropy with other servers (`capsulefs serve --peer URL`): every capsule held is
//! pulled from and pushed to each peer every `PEER_ROUND`, and soon after records arrive.
//! Capsules are taken one at a time through the registry, so a round opens no more stores
//! than the registry allows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::shared::Server;
use crate::replica::Replica;
use crate::replica::remote::Remote;
use crate::sync::transfer;

/// How often a server reconciles with its peers when nothing new arrived.
const PEER_ROUND: Duration = Duration::from_secs(2);

impl Server {
    /// One anti-entropy round with every peer, for every capsule held here: pull what the
    /// peer has (through the gate, like any replica's records), then push what it lacks. A
    /// peer that does not hold a capsule yet gets it whole.
    fn reconcile(&self, peers: &[String]) {
        for id in self.registry.ids() {
            let capsule = match self.registry.capsule(id) {
                Ok(Some(capsule)) => capsule,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("opening {id:?} for a round with the peers: {e}");
                    continue;
                }
            };
            for peer in peers {
                let round = Remote::new(peer, id).and_then(|remote| {
                    if remote.metadata()?.is_some() {
                        let pulled = transfer::pull(&capsule, &remote, &())?;
                        self.registry.stored(id, pulled.bytes);
                    }
                    transfer::push(&capsule, &remote, &())
                });
                match round {
                    Ok(r) if r.records > 0 => tracing::info!("sent {} records of {id:?} to {peer}", r.records),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("anti-entropy with {peer} for {id:?}: {e} (retried next round)"),
                }
            }
        }
    }

    /// Reconciles with `peers` every `PEER_ROUND`, and soon after new records arrive, until
    /// `stop` is set.
    pub(super) fn peer_loop(&self, peers: &[String], stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            self.reconcile(peers);
            let (news, arrived) = &self.news;
            let mut waiting = news.lock().expect("no panics while locked");
            if !*waiting {
                waiting = arrived.wait_timeout(waiting, PEER_ROUND).expect("no panics while locked").0;
            }
            *waiting = false;
        }
    }
}
