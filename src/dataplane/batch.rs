//! Batched TUN writes. With offload on, the kernel takes a virtio-net header in
//! front of every packet, and consecutive TCP/UDP segments of one flow are
//! coalesced (GRO, tun-rs's port of wireguard-go's `tun/offload_linux.go`) into
//! one large packet: one write and one pass up the kernel's stack for many
//! segments, which is where a gateway's receive path spends most of its time.

use tun_rs::{GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::udp::RECV_BATCH;
use super::TunSink;

/// Decrypted packets from one receive batch, waiting for one TUN write pass.
pub struct TunBatch {
    bufs: Vec<Vec<u8>>,
    len: usize,
    offset: usize,
    gro: GROTable,
}

impl TunBatch {
    /// `offload`: whether the TUN device was opened with virtio-net headers.
    pub fn new(offload: bool) -> TunBatch {
        TunBatch {
            // Capacity grows once to the largest coalesced packet, then stays.
            bufs: (0..RECV_BATCH).map(|_| Vec::with_capacity(2048)).collect(),
            len: 0,
            offset: if offload { VIRTIO_NET_HDR_LEN } else { 0 },
            gro: GROTable::new(),
        }
    }

    /// Writes and empties the batch; write errors drop packets, as a full
    /// device queue would.
    pub fn flush(&mut self, tun: &SyncDevice) {
        if self.len > 0 {
            let _ = tun.send_multiple(&mut self.gro, &mut self.bufs[..self.len], self.offset);
            self.len = 0;
        }
    }
}

impl TunSink for TunBatch {
    #[inline]
    fn packet(&mut self, ip: &[u8]) {
        // One datagram yields at most one packet, so a batch never overflows;
        // the guard keeps that an invariant rather than a crash.
        if let Some(buf) = self.bufs.get_mut(self.len) {
            buf.clear();
            buf.resize(self.offset, 0);
            buf.extend_from_slice(ip);
            self.len += 1;
        }
    }
}
