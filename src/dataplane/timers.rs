//! The periodic work of the data plane: boringtun's timers (rekey, keepalive,
//! handshake retries, session expiry), the end-of-session event, and draining
//! throttled event summaries. Called every [`TICK`] by the daemon.

use std::time::Duration;

use boringtun::noise::TunnResult;

use super::peers::PeerSlot;
use super::{DropReason, Shared, MAX_PACKET};
use crate::events::{CloseReason, HandshakeFailure};
use crate::policy::DenyReason;

/// Timer resolution: boringtun's timers are second-granular; 250 ms keeps
/// handshake retries and keepalives on time (boringtun's own device uses the same).
pub const TICK: Duration = Duration::from_millis(250);

/// Owns the timer loop's scratch buffer.
pub struct Timers {
    buf: Vec<u8>,
    ticks: u64,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            buf: vec![0u8; MAX_PACKET],
            ticks: 0,
        }
    }
}

impl Timers {
    /// One tick over every peer.
    pub fn tick(&mut self, shared: &Shared) {
        self.ticks += 1;
        if self.ticks.is_multiple_of(4) {
            shared.rate_limiter.reset_count();
        }
        let now_ms = shared.clock.now_ms();
        let table = shared.table.load();
        for peer in table.peers.iter() {
            self.update(shared, peer);
            summarise_peer(peer, now_ms);
        }
        summarise_anon(shared, now_ms);
    }

    fn update(&mut self, shared: &Shared, peer: &PeerSlot) {
        let mut state = peer.lock();
        let result = state.tunn.update_timers(&mut self.buf);
        let usable = state.tunn.time_since_last_handshake().is_some();
        let mut ended = false;
        if usable {
            state.confirmed = true;
            state.session_up = true;
        } else if std::mem::replace(&mut state.confirmed, false) {
            ended = std::mem::replace(&mut state.session_up, false);
        }
        let endpoint = state.endpoint;
        drop(state);
        if let (TunnResult::WriteToNetwork(packet), Some(ep)) = (result, endpoint) {
            shared.wire.send_datagram(packet, ep);
        }
        if ended {
            session_closed(peer, CloseReason::Timeout);
        }
    }
}

/// Logs the end of a peer's session.
pub fn session_closed(peer: &PeerSlot, reason: CloseReason) {
    let endpoint = peer.lock().endpoint;
    match endpoint {
        Some(ep) => tracing::info!(
            event = "session_closed",
            reason = reason.as_str(),
            peer = %peer.name,
            public_key = %peer.public_key,
            endpoint = %ep,
        ),
        None => tracing::info!(
            event = "session_closed",
            reason = reason.as_str(),
            peer = %peer.name,
            public_key = %peer.public_key,
        ),
    }
}

fn summarise_peer(peer: &PeerSlot, now_ms: u64) {
    for reason in DenyReason::ALL {
        if let Some(count) = peer.denied[reason.index()].take_summary(now_ms) {
            tracing::warn!(
                event = "packet_denied",
                reason = reason.as_str(),
                peer = %peer.name,
                public_key = %peer.public_key,
                count,
                summary = true,
            );
        }
    }
    for reason in HandshakeFailure::ALL {
        if let Some(count) = peer.handshake_failures[reason.index()].take_summary(now_ms) {
            tracing::warn!(
                event = "handshake_failed",
                reason = reason.as_str(),
                peer = %peer.name,
                public_key = %peer.public_key,
                count,
                summary = true,
            );
        }
    }
}

fn summarise_anon(shared: &Shared, now_ms: u64) {
    for reason in HandshakeFailure::ALL {
        let Some(count) = shared.anon.throttles[reason.index()].take_summary(now_ms) else {
            continue;
        };
        let last = shared.anon.last.lock().ok().and_then(|l| l[reason.index()]);
        let key = last.and_then(|(k, _)| k).map(|k| k.to_base64());
        let endpoint = last.map(|(_, ep)| ep.to_string());
        tracing::warn!(
            event = "handshake_failed",
            reason = reason.as_str(),
            public_key = key.as_deref().unwrap_or(""),
            endpoint = endpoint.as_deref().unwrap_or(""),
            count,
            summary = true,
        );
    }
    for reason in DropReason::ALL {
        let Some(count) = shared.anon.dropped[reason.index()].take_summary(now_ms) else {
            continue;
        };
        let endpoint = shared
            .anon
            .dropped_last
            .lock()
            .ok()
            .and_then(|l| l[reason.index()])
            .map(|ep| ep.to_string());
        tracing::warn!(
            event = "datagram_dropped",
            reason = reason.as_str(),
            endpoint = endpoint.as_deref().unwrap_or(""),
            count,
            summary = true,
        );
    }
}
