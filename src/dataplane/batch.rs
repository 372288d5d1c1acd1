//! Batched TUN writes. With offload on, the kernel takes a virtio-net header in
//! front of every packet, and consecutive TCP/UDP segments of one flow are
//! coalesced (GRO, tun-rs's port of wireguard-go's `tun/offload_linux.go`) into
//! one large packet: one write and one pass up the kernel's stack for many
//! segments, which is where a gateway's receive path spends most of its time.

use tun_rs::{ExpandBuffer, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::udp::RECV_BATCH;
use super::{IoTally, TunSink, MAX_PACKET};

/// A packet buffer whose memory is initialised once and whose length is only
/// a number: boringtun decrypts into the whole buffer, then the length is set
/// to the packet's, and tun-rs's GRO grows it in place. A `Vec<u8>` would
/// have to be zero-filled up to its capacity before every decryption.
pub struct PacketBuf {
    data: Box<[u8]>,
    len: usize,
}

impl PacketBuf {
    /// `capacity` bytes, zeroed by the allocator (untouched pages cost no RSS).
    fn new(capacity: usize) -> PacketBuf {
        PacketBuf {
            data: vec![0u8; capacity].into_boxed_slice(),
            len: 0,
        }
    }

    fn grow(&mut self, capacity: usize) {
        if capacity > self.data.len() {
            let mut data = vec![0u8; capacity].into_boxed_slice();
            data[..self.len].copy_from_slice(&self.data[..self.len]);
            self.data = data;
        }
    }
}

impl AsRef<[u8]> for PacketBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsMut<[u8]> for PacketBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl ExpandBuffer for PacketBuf {
    fn buf_capacity(&self) -> usize {
        self.data.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        self.grow(new_len);
        if new_len > self.len {
            self.data[self.len..new_len].fill(value);
        }
        self.len = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let end = self.len + src.len();
        self.grow(end);
        self.data[self.len..end].copy_from_slice(src);
        self.len = end;
    }
}

/// Decrypted packets from one receive batch, waiting for one TUN write pass.
pub struct TunBatch {
    bufs: Vec<PacketBuf>,
    len: usize,
    offset: usize,
    gro: GROTable,
}

impl TunBatch {
    /// `offload`: whether the TUN device was opened with virtio-net headers.
    pub fn new(offload: bool) -> TunBatch {
        // tun-rs coalesces a segment into a buffer only if the buffer already
        // has the capacity (it never reallocates during GRO), so with offload
        // every buffer holds a whole 64 KiB packet. Pages are touched only as
        // packets grow, so this costs address space, not RSS.
        let offset = if offload { VIRTIO_NET_HDR_LEN } else { 0 };
        let capacity = if offload {
            2 * VIRTIO_NET_HDR_LEN + usize::from(u16::MAX)
        } else {
            MAX_PACKET
        };
        TunBatch {
            bufs: (0..RECV_BATCH)
                .map(|_| PacketBuf::new(capacity.max(offset + MAX_PACKET)))
                .collect(),
            len: 0,
            offset,
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

/// The TUN device as the receive loop sees it: a batch write, as a trait so
/// that stand-ins take its place in tests.
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
        bufs: &mut [PacketBuf],
        offset: usize,
    ) -> std::io::Result<usize>;
}

/// The TUN device as the transmit loop sees it.
pub trait TunRead {
    /// Reads one packet, or one offloaded super-packet cut into segments,
    /// into `segments` with their lengths in `sizes` (`raw` is scratch space
    /// for the super-packet); returns how many. Waits for a packet, or until
    /// the loop is told to stop.
    ///
    /// # Errors
    /// As `read(2)`; woken without a packet is `Interrupted` or `WouldBlock`.
    fn read_batch(
        &self,
        raw: &mut [u8],
        segments: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> std::io::Result<usize>;
}

/// The daemon's TUN device with the event that wakes a blocked read at
/// shutdown.
pub struct DeviceTun<'a> {
    pub tun: &'a SyncDevice,
    pub interrupt: &'a tun_rs::InterruptEvent,
}

impl TunWrite for DeviceTun<'_> {
    #[inline]
    fn write_batch(
        &self,
        gro: &mut GROTable,
        bufs: &mut [PacketBuf],
        offset: usize,
    ) -> std::io::Result<usize> {
        self.tun.send_multiple(gro, bufs, offset)
    }
}

impl TunRead for DeviceTun<'_> {
    #[inline]
    fn read_batch(
        &self,
        raw: &mut [u8],
        segments: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> std::io::Result<usize> {
        self.tun
            .recv_multiple_intr(raw, segments, sizes, 0, self.interrupt)
    }
}

impl TunSink for TunBatch {
    #[inline]
    fn next_buf(&mut self) -> &mut [u8] {
        // One datagram yields at most one packet, so the loop flushes before a
        // batch could overflow; the last buffer stands in rather than a crash.
        let i = self.len.min(self.bufs.len() - 1);
        &mut self.bufs[i].data[self.offset..]
    }

    #[inline]
    fn commit(&mut self, len: usize) {
        if let Some(buf) = self.bufs.get_mut(self.len) {
            // A virtio-net header of zeros: no offload asked for this packet
            // (tun-rs fills it in for the packets it coalesces).
            buf.data[..self.offset].fill(0);
            buf.len = self.offset + len;
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
            bufs: &mut [PacketBuf],
            _: usize,
        ) -> std::io::Result<usize> {
            assert!(!bufs.is_empty(), "no empty pass");
            self.0.set(self.0.get() + 1);
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        }
    }

    /// Puts `ip` into the batch as the receive path does: decrypted into the
    /// lent buffer, then committed.
    fn push(batch: &mut TunBatch, ip: &[u8]) {
        batch.next_buf()[..ip.len()].copy_from_slice(ip);
        batch.commit(ip.len());
    }

    /// Coalesces like the kernel would see it: records the first buffer's
    /// length after GRO, which is where every segment of one flow lands.
    struct GroTun(std::cell::Cell<usize>);

    impl TunWrite for GroTun {
        fn write_batch(
            &self,
            gro: &mut GROTable,
            bufs: &mut [PacketBuf],
            offset: usize,
        ) -> std::io::Result<usize> {
            gro.apply_gro(bufs, offset, true)?;
            self.0.set(bufs[0].as_ref().len() - offset);
            Ok(0)
        }
    }

    fn fold(mut sum: u32) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn sum(bytes: &[u8]) -> u32 {
        bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum()
    }

    /// One full-sized IPv4 TCP segment of a bulk flow, checksums valid.
    fn segment(n: u32, payload: usize) -> Vec<u8> {
        let len = 40 + payload;
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&(100 + n as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 8, 0, 2]);
        p[16..20].copy_from_slice(&[10, 8, 0, 1]);
        let c = fold(sum(&p[..20]));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&(1_000 + n * payload as u32).to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x10; // ACK
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let pseudo = sum(&p[12..20]) + 6 + (len as u32 - 20);
        let c = fold(pseudo + sum(&p[20..]));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// Ten full-sized segments of one TCP flow leave one batch as one
    /// coalesced packet: the buffers have room to grow (tun-rs does not
    /// reallocate, and with 2 KiB buffers nothing of MTU size ever merged).
    #[test]
    fn full_sized_tcp_segments_coalesce() {
        let tun = GroTun(std::cell::Cell::new(0));
        let mut batch = TunBatch::new(true);
        let mut tally = IoTally::default();
        for n in 0..10 {
            push(&mut batch, &segment(n, 1368));
        }
        batch.flush(&tun, &mut tally);
        assert_eq!(tun.0.get(), 40 + 10 * 1368, "all ten in the first buffer");
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
            push(&mut batch, &[0x45; 40]);
        }
        batch.flush(&tun, &mut tally);
        push(&mut batch, &[0x45; 40]);
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
