//! Batched TUN writes. With offload on, the kernel takes a virtio-net header in
//! front of every packet, and consecutive TCP/UDP segments of one flow are
//! coalesced (GRO, tun-rs's port of wireguard-go's `tun/offload_linux.go`) into
//! one large packet: one write and one pass up the kernel's stack for many
//! segments, which is where a gateway's receive path spends most of its time.

use tun_rs::{GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::udp::RECV_BATCH;
use super::{IoTally, TunSink};

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

    /// Writes and empties the batch. A failed write drops packets, as a full
    /// device queue would; the failure is counted in `failures`.
    pub fn flush(&mut self, tun: &impl TunWrite, failures: &mut IoTally) {
        if self.len > 0 {
            if let Err(e) = tun.write_batch(&mut self.gro, &mut self.bufs[..self.len], self.offset)
            {
                failures.tun_failed(&e);
            }
            self.len = 0;
        }
    }
}

/// The TUN device's batch write, as a trait so that a failing device can
/// stand in for it in tests.
pub trait TunWrite {
    /// Writes `bufs` (each with `offset` bytes of room for a virtio-net
    /// header in front), coalescing with `gro` where the device takes
    /// offloads.
    ///
    /// # Errors
    /// Some write of the pass failed; others may have succeeded.
    fn write_batch(
        &self,
        gro: &mut GROTable,
        bufs: &mut [Vec<u8>],
        offset: usize,
    ) -> std::io::Result<usize>;
}

impl TunWrite for SyncDevice {
    #[inline]
    fn write_batch(
        &self,
        gro: &mut GROTable,
        bufs: &mut [Vec<u8>],
        offset: usize,
    ) -> std::io::Result<usize> {
        self.send_multiple(gro, bufs, offset)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::IoErrors;

    /// A TUN device whose writes fail, counting the passes it was given.
    struct DownTun(std::cell::Cell<usize>);

    impl TunWrite for DownTun {
        fn write_batch(
            &self,
            _: &mut GROTable,
            bufs: &mut [Vec<u8>],
            _: usize,
        ) -> std::io::Result<usize> {
            assert!(!bufs.is_empty(), "no empty pass");
            self.0.set(self.0.get() + 1);
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        }
    }

    /// A failed write pass is counted once per batch, reaches the shared
    /// counters at the flush, and an empty batch writes nothing.
    #[test]
    fn failed_tun_write_is_counted() {
        let tun = DownTun(std::cell::Cell::new(0));
        let mut batch = TunBatch::new(false);
        let mut tally = IoTally::default();
        let shared = IoErrors::default();
        batch.flush(&tun, &mut tally);
        assert_eq!(tun.0.get(), 0, "nothing to write");
        for _ in 0..3 {
            batch.packet(&[0x45; 40]);
        }
        batch.flush(&tun, &mut tally);
        batch.packet(&[0x45; 40]);
        batch.flush(&tun, &mut tally);
        assert_eq!(tun.0.get(), 2);
        assert_eq!(shared.tun_write_errors(), 0, "not before the batch ends");
        tally.flush(&shared);
        assert_eq!(shared.tun_write_errors(), 2);
        assert_eq!(shared.udp_send_errors(), 0);
        assert_eq!(shared.last_errno(), (0, libc::EIO));
        tally.flush(&shared);
        assert_eq!(shared.tun_write_errors(), 2, "the tally started over");
    }
}
