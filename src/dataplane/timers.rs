//! The periodic work of the data plane: boringtun's timers (rekey, keepalive,
//! handshake retries, session expiry), the end-of-session event, and draining
//! throttled event summaries. Called every [`TICK`] by the daemon.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::TunnResult;

use super::peers::PeerSlot;
use super::udp::DatagramIo;
use super::{DropReason, Engine, IoTally, LoopError, Runtime, MAX_PACKET};
use crate::events::{CloseReason, HandshakeFailure, SUMMARY_INTERVAL_MS};
use crate::policy::DenyReason;

/// Timer resolution: boringtun's timers are second-granular; 250 ms keeps
/// handshake retries and keepalives on time (boringtun's own device uses the same).
pub const TICK: Duration = Duration::from_millis(250);

/// Owns the timer loop's scratch buffer.
pub struct Timers {
    buf: Vec<u8>,
    sources_summarised_ms: u64,
    named: Vec<(IpAddr, u64)>,
    /// Failed sends of this tick (keepalives, handshake initiations).
    failures: IoTally,
    /// The output failure totals as of the last `io_errors` line, and when.
    io_reported: (u64, u64),
    io_reported_ms: u64,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            buf: vec![0u8; MAX_PACKET],
            sources_summarised_ms: 0,
            named: Vec::with_capacity(SUMMARY_SOURCES * 4),
            failures: IoTally::default(),
            io_reported: (0, 0),
            io_reported_ms: 0,
        }
    }
}

impl Timers {
    /// One tick over every peer.
    pub fn tick(&mut self, engine: &Engine, rt: &Runtime, io: &impl DatagramIo) {
        // boringtun resets the count only when a second has passed since the
        // last reset, so calling every tick resets it once a second.
        engine.rate_limiter.reset_count();
        let now_ms = engine.clock.now_ms();
        engine
            .coarse_ms
            .store(now_ms, std::sync::atomic::Ordering::Relaxed);
        let table = engine.table.load();
        let mut live = HashSet::with_capacity(table.peers.len());
        for peer in table.peers.iter() {
            if let Some(ep) = self.update(io, peer) {
                live.insert(ep.ip());
            }
            summarise_peer(peer, now_ms);
        }
        engine.live_endpoints.store(Arc::new(live));
        self.failures.flush(&engine.io_errors);
        self.summarise_io_errors(engine, now_ms);
        summarise_anon(engine, now_ms);
        self.summarise_sources(engine, now_ms);
        summarise_loop_errors(rt, now_ms);
    }

    /// Runs one peer's timers; returns its endpoint while it has a session.
    fn update(&mut self, io: &impl DatagramIo, peer: &PeerSlot) -> Option<SocketAddr> {
        let mut state = peer.lock();
        // A peer never heard from has no timers to run.
        let tunn = state.tunn()?;
        let result = tunn.update_timers(&mut self.buf);
        let usable = tunn.time_since_last_handshake().is_some();
        let mut ended = false;
        if usable {
            state.confirmed = true;
            state.session_up = true;
        } else if std::mem::replace(&mut state.confirmed, false) {
            ended = std::mem::replace(&mut state.session_up, false);
        }
        let endpoint = state.endpoint;
        let session = state.session_up;
        drop(state);
        if let (TunnResult::WriteToNetwork(packet), Some(ep)) = (result, endpoint) {
            if let Err(e) = io.send_to(packet, ep) {
                self.failures.udp_failed(&e);
            }
        }
        if ended {
            session_closed(peer, CloseReason::Timeout);
        }
        endpoint.filter(|_| session)
    }

    /// One `io_errors` line when UDP sends or TUN writes failed since the
    /// last one: the first at once (within a tick), then at most one per
    /// [`SUMMARY_INTERVAL_MS`], whatever the rate of failures. The packet
    /// loops only count; the log line is made here.
    fn summarise_io_errors(&mut self, engine: &Engine, now_ms: u64) {
        let io = &engine.io_errors;
        let totals = (io.udp_send_errors(), io.tun_write_errors());
        if totals == self.io_reported
            || (self.io_reported_ms != 0
                && now_ms.saturating_sub(self.io_reported_ms) < SUMMARY_INTERVAL_MS)
        {
            return;
        }
        let (udp_errno, tun_errno) = io.last_errno();
        let text = |errno: i32, new: u64| {
            if new > 0 && errno != 0 {
                std::io::Error::from_raw_os_error(errno).to_string()
            } else {
                String::new()
            }
        };
        let udp_new = totals.0.saturating_sub(self.io_reported.0);
        let tun_new = totals.1.saturating_sub(self.io_reported.1);
        tracing::warn!(
            event = "io_errors",
            udp_send_errors = udp_new,
            udp_error = text(udp_errno, udp_new),
            tun_write_errors = tun_new,
            tun_error = text(tun_errno, tun_new),
            udp_send_errors_total = totals.0,
            tun_write_errors_total = totals.1,
            count = udp_new + tun_new,
        );
        self.io_reported = totals;
        self.io_reported_ms = now_ms;
    }

    /// Sources in backoff that kept sending: the worst by name, then a total.
    /// At most [`SUMMARY_SOURCES`] + 1 lines per interval, whatever the flood.
    fn summarise_sources(&mut self, engine: &Engine, now_ms: u64) {
        if now_ms.saturating_sub(self.sources_summarised_ms) < SUMMARY_INTERVAL_MS {
            return;
        }
        self.sources_summarised_ms = now_ms;
        let (others, other_count) = match engine.sources.lock() {
            Ok(mut t) => t.take_ignored(SUMMARY_SOURCES, &mut self.named),
            Err(_) => return,
        };
        for (source, count) in &self.named {
            tracing::warn!(
                event = "handshake_failed",
                reason = HandshakeFailure::RateLimited.as_str(),
                source = %source,
                count = *count,
                backoff = true,
                summary = true,
            );
        }
        if others > 0 {
            tracing::warn!(
                event = "handshake_failed",
                reason = HandshakeFailure::RateLimited.as_str(),
                other_sources = others as u64,
                count = other_count,
                backoff = true,
                summary = true,
            );
        }
        if let Some(count) = engine.source_blocks.take_summary(now_ms) {
            tracing::warn!(
                event = "handshake_failed",
                reason = HandshakeFailure::RateLimited.as_str(),
                sources_blocked = count,
                count,
                backoff = true,
                summary = true,
            );
        }
    }
}

/// Sources named one by one in a backoff summary.
pub const SUMMARY_SOURCES: usize = 8;

fn summarise_loop_errors(rt: &Runtime, now_ms: u64) {
    for which in LoopError::ALL {
        if let Some(count) = rt.loop_errors[which.index()].take_summary(now_ms) {
            tracing::error!(event = which.as_str(), count, summary = true);
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

fn summarise_anon(engine: &Engine, now_ms: u64) {
    for reason in HandshakeFailure::ALL {
        let Some(count) = engine.anon.throttles[reason.index()].take_summary(now_ms) else {
            continue;
        };
        let seen = engine
            .anon
            .seen
            .lock()
            .ok()
            .map(|mut s| std::mem::take(&mut s[reason.index()]))
            .unwrap_or_default();
        let key = seen.last.and_then(|(k, _)| k).map(|k| k.to_base64());
        let endpoint = seen.last.map(|(_, ep)| ep.to_string());
        let source = seen.last.map(|(_, ep)| ep.ip().to_string());
        tracing::warn!(
            event = "handshake_failed",
            reason = reason.as_str(),
            public_key = key.as_deref().unwrap_or(""),
            public_keys = seen.key_list(),
            other_keys = seen.other_keys,
            endpoint = endpoint.as_deref().unwrap_or(""),
            source = source.as_deref().unwrap_or(""),
            count,
            summary = true,
        );
    }
    for reason in DropReason::ALL {
        let Some(count) = engine.anon.dropped[reason.index()].take_summary(now_ms) else {
            continue;
        };
        let endpoint = engine
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
