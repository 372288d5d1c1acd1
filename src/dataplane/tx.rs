//! TUN → UDP: route by destination to the owning peer, encrypt, send.

use std::sync::atomic::Ordering;

use boringtun::noise::TunnResult;

use super::{packet, Shared, MAX_PACKET};

/// Reads the TUN device until shutdown. Owns its buffers.
pub fn run(shared: &Shared, tun: &tun_rs::SyncDevice, interrupt: &tun_rs::InterruptEvent) {
    let mut ip = vec![0u8; MAX_PACKET];
    let mut out = vec![0u8; MAX_PACKET];
    while !shared.is_stopping() {
        match tun.recv_intr(&mut ip, interrupt) {
            Ok(n) => handle(shared, &ip[..n], &mut out),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                if shared.is_stopping() {
                    return;
                }
                tracing::error!(event = "tun_error", error = %e);
                std::thread::sleep(super::udp::RECV_TIMEOUT);
            }
        }
    }
}

/// Encrypts one IP packet from the TUN device for the peer owning its destination.
#[inline]
pub fn handle(shared: &Shared, ip: &[u8], out: &mut [u8]) {
    let Some(dst) = packet::destination(ip) else {
        return;
    };
    let table = shared.table.load();
    let Some(&pos) = table.routes.lookup(dst) else {
        shared.no_route.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let peer = &table.peers[pos];
    let mut state = peer.lock();
    let result = state.tunn.encapsulate(ip, out);
    let endpoint = state.endpoint;
    drop(state);
    if let (TunnResult::WriteToNetwork(datagram), Some(ep)) = (result, endpoint) {
        shared.wire.send_datagram(datagram, ep);
    }
}
