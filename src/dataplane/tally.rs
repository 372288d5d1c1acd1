//! Per-peer packet counters for `/metrics`, kept off the per-packet cost.
//!
//! Each [`PeerSlot`] holds one relaxed atomic per [`Direction`]. The packet
//! loops do not touch it per packet: a loop owns a [`Tally`] that counts in
//! plain memory while it works through a batch (a `recvmmsg` batch, a TUN
//! read split into segments) and adds each peer's count to its atomic once at
//! the end of the batch. A batch of 64 segments of one flow costs one
//! `fetch_add` instead of 64, and the receive and transmit threads, which
//! count into the same slot, meet on its cache line once per batch rather than
//! once per packet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::peers::{PeerSlot, PeerTable};

/// Which way a packet went through a peer's tunnel, as the gateway sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Decrypted from the peer and forwarded to the TUN device.
    Rx,
    /// Read from the TUN device and encrypted to the peer.
    Tx,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Rx, Direction::Tx];

    /// The `direction` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Packets per direction: the counters a [`PeerSlot`] carries.
#[derive(Debug, Default)]
pub struct PacketCounters([AtomicU64; Direction::ALL.len()]);

impl PacketCounters {
    /// Adds `n` packets: one relaxed `fetch_add`, no ordering with anything
    /// else (a scrape may see a count a batch behind, never a torn one).
    #[inline]
    pub fn add(&self, dir: Direction, n: u64) {
        self.0[dir.index()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, dir: Direction) -> u64 {
        self.0[dir.index()].load(Ordering::Relaxed)
    }
}

/// One loop's packet counts over its current batch, by position in the peer
/// table the batch was counted against.
///
/// The tally holds that table (an `Arc`) only from the first packet of a batch
/// to [`Tally::flush`], so a table swapped out mid-batch still gets its counts
/// and no old table (with the keys of peers since removed) outlives the batch.
/// Memory: one `u64` per peer of the largest table seen, kept zeroed between
/// batches, so neither counting nor flushing allocates once it has grown.
pub struct Tally {
    dir: Direction,
    table: Option<Arc<PeerTable>>,
    /// Zero everywhere except at the positions in `touched`.
    counts: Vec<u64>,
    touched: Vec<usize>,
}

impl Tally {
    pub fn new(dir: Direction) -> Tally {
        Tally {
            dir,
            table: None,
            counts: Vec::new(),
            touched: Vec::with_capacity(super::udp::RECV_BATCH),
        }
    }

    /// Counts one packet for `table.peers[pos]`: a pointer comparison and an
    /// add in memory this loop owns, except for the first packet of a batch
    /// or after a table swap.
    ///
    /// # Panics
    /// When `pos` is not a position in `table` (a bug in the caller).
    #[inline]
    pub fn count(&mut self, table: &Arc<PeerTable>, pos: usize) {
        if !self.table.as_ref().is_some_and(|t| Arc::ptr_eq(t, table)) {
            self.switch(table);
        }
        let c = &mut self.counts[pos];
        if *c == 0 {
            self.touched.push(pos);
        }
        *c += 1;
    }

    #[cold]
    fn switch(&mut self, table: &Arc<PeerTable>) {
        self.flush();
        if self.counts.len() < table.peers.len() {
            self.counts.resize(table.peers.len(), 0);
        }
        self.table = Some(Arc::clone(table));
    }

    /// Adds the batch's counts to the peers' counters (one `fetch_add` per
    /// peer that had packets) and lets go of the table.
    pub fn flush(&mut self) {
        let Some(table) = self.table.take() else {
            return;
        };
        for pos in self.touched.drain(..) {
            let n = std::mem::take(&mut self.counts[pos]);
            let slot: &PeerSlot = &table.peers[pos];
            slot.packets.add(self.dir, n);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use crate::policy::Policy;
    use crate::registry::{Peer, PeerName};

    fn table(names: &[&str]) -> Arc<PeerTable> {
        let cfg = crate::config::Config::parse(
            std::path::Path::new("/t/sitegate.toml"),
            r#"
[interface]
name = "sgt0"
private_key_file = "k"
listen_port = 51820
address = "10.8.0.1/24"
endpoint = "192.0.2.1:51820"
[store]
url = "sqlite:///nonexistent/t.db"
"#,
        )
        .unwrap();
        let gw = PrivateKey::generate();
        let records: Vec<Peer> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Peer {
                id: i as i64,
                name: PeerName::new(n).unwrap(),
                public_key: PrivateKey::generate().public_key(),
                preshared_key: None,
                addresses: vec![format!("10.8.0.{}", i + 2).parse().unwrap()],
                created_at: 0,
                expires_at: None,
                revoked_at: None,
                revoked_reason: None,
                admin: false,
                services: vec![],
            })
            .collect();
        let seed = Arc::new(super::super::peers::TunnSeed::new(gw.to_x25519(), None));
        let (t, _) =
            PeerTable::default().rebuild(&records, &[], 0, &Policy::from_config(&cfg), &seed);
        Arc::new(t)
    }

    /// Counts stay in the tally until the batch ends, then reach each peer once.
    #[test]
    fn counts_reach_peers_at_flush() {
        let t = table(&["a", "b", "c"]);
        let mut tally = Tally::new(Direction::Rx);
        for pos in [0, 0, 2, 0, 2] {
            tally.count(&t, pos);
        }
        assert_eq!(
            t.peers[0].packets.get(Direction::Rx),
            0,
            "not before the flush"
        );
        tally.flush();
        let rx = |i: usize| t.peers[i].packets.get(Direction::Rx);
        assert_eq!((rx(0), rx(1), rx(2)), (3, 0, 2));
        assert_eq!(
            t.peers[0].packets.get(Direction::Tx),
            0,
            "only its direction"
        );
        assert!(tally.table.is_none(), "no table held between batches");
        tally.count(&t, 1);
        tally.flush();
        assert_eq!((rx(0), rx(1), rx(2)), (3, 1, 2), "counts were zeroed");
    }

    /// A table swapped in mid-batch: the old table's peers get their counts
    /// at the swap, the new one's at the end.
    #[test]
    fn table_swap_mid_batch() {
        let old = table(&["a"]);
        let new = table(&["a", "b", "c", "d"]);
        let mut tally = Tally::new(Direction::Tx);
        tally.count(&old, 0);
        tally.count(&old, 0);
        tally.count(&new, 3);
        assert_eq!(old.peers[0].packets.get(Direction::Tx), 2);
        drop(tally);
        assert_eq!(
            new.peers[3].packets.get(Direction::Tx),
            1,
            "flushed on drop"
        );
        assert_eq!(new.peers[0].packets.get(Direction::Tx), 0);
    }
}
