//! Engine tests: the real receive/transmit handlers and peer table, driven with
//! boringtun client tunnels over a capturing [`Wire`] instead of sockets and a
//! TUN device. Fast, deterministic, no root.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use boringtun::noise::{Tunn, TunnResult};
use sitegate::dataplane::peers::PeerTable;
use sitegate::dataplane::{rx, tx, DropReason, Shared, TunSink, Wire};
use sitegate::events::{CloseReason, HandshakeFailure};
use sitegate::keys::{PresharedKey, PrivateKey};
use sitegate::policy::DenyReason;
use sitegate::registry::store::RevokedKey;
use sitegate::registry::{Peer, PeerName};

#[derive(Default)]
struct Capture {
    datagrams: Mutex<Vec<(Vec<u8>, SocketAddr)>>,
    packets: Mutex<Vec<Vec<u8>>>,
}

struct CaptureWire(Arc<Capture>);

impl Wire for CaptureWire {
    fn send_datagram(&self, datagram: &[u8], dst: SocketAddr) {
        self.0
            .datagrams
            .lock()
            .unwrap()
            .push((datagram.to_vec(), dst));
    }
}

impl TunSink for CaptureWire {
    fn packet(&mut self, ip: &[u8]) {
        self.0.packets.lock().unwrap().push(ip.to_vec());
    }
}

impl Capture {
    fn take_datagrams(&self) -> Vec<(Vec<u8>, SocketAddr)> {
        std::mem::take(&mut *self.datagrams.lock().unwrap())
    }
    fn take_packets(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.packets.lock().unwrap())
    }
}

struct Gateway {
    key: PrivateKey,
    shared: Shared,
    cap: Arc<Capture>,
    next_index: u32,
    out: Vec<u8>,
    revoked: Vec<RevokedKey>,
}

struct Site {
    tunn: Tunn,
    addr: SocketAddr,
    record: Peer,
}

fn peer(id: i64, name: &str, key: &PrivateKey, psk: &PresharedKey, ip: &str) -> Peer {
    Peer {
        id,
        name: PeerName::new(name).unwrap(),
        public_key: key.public_key(),
        preshared_key: Some(psk.clone()),
        addresses: vec![ip.parse().unwrap()],
        created_at: 0,
        expires_at: None,
        revoked_at: None,
        revoked_reason: None,
        admin: false,
        services: vec![],
    }
}

impl Gateway {
    fn new() -> Gateway {
        let key = PrivateKey::generate();
        let cap = Arc::new(Capture::default());
        let shared = Shared::new(Box::new(CaptureWire(Arc::clone(&cap))), &key);
        Gateway {
            key,
            shared,
            cap,
            next_index: 1,
            out: vec![0u8; 65_600],
            revoked: Vec::new(),
        }
    }

    /// Swaps in a table built from `records`; returns who was removed and why.
    fn load(&mut self, records: &[Peer]) -> Vec<(String, CloseReason)> {
        let secret = self.key.to_x25519();
        let old = self.shared.table.load_full();
        let (table, removed): (PeerTable, _) = old.rebuild(
            records,
            &self.revoked,
            1_000,
            &mut self.next_index,
            |i, p| {
                Tunn::new(
                    secret.clone(),
                    p.public_key.to_x25519(),
                    p.preshared_key.as_ref().map(|k| *k.as_bytes()),
                    None,
                    i,
                    None,
                )
            },
        );
        self.shared.table.store(Arc::new(table));
        removed
            .into_iter()
            .map(|r| (r.slot.name.to_string(), r.reason))
            .collect()
    }

    fn receive(&mut self, datagram: &[u8], from: SocketAddr) {
        let mut sink = CaptureWire(Arc::clone(&self.cap));
        rx::handle(&self.shared, datagram, from, &mut self.out, &mut sink);
    }

    fn tun_packet(&mut self, ip: &[u8]) {
        tx::handle(&self.shared, ip, &mut self.out);
    }
}

impl Site {
    fn new(gw: &Gateway, name: &str, ip: &str, port: u16) -> Site {
        let key = PrivateKey::generate();
        let psk = PresharedKey::generate();
        let tunn = Tunn::new(
            key.to_x25519(),
            gw.key.public_key().to_x25519(),
            Some(*psk.as_bytes()),
            None,
            port as u32,
            None,
        );
        Site {
            tunn,
            addr: SocketAddr::new("192.0.2.10".parse().unwrap(), port),
            record: peer(port as i64, name, &key, &psk, ip),
        }
    }

    /// Runs a full handshake through the gateway; true when a session results.
    fn connect(&mut self, gw: &mut Gateway) -> bool {
        let mut buf = vec![0u8; 2048];
        let init = match self.tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => return false,
        };
        gw.receive(&init, self.addr);
        let replies = gw.cap.take_datagrams();
        let Some((resp, to)) = replies.first() else {
            return false;
        };
        assert_eq!(*to, self.addr, "reply goes back to the initiator's address");
        match self.tunn.decapsulate(None, resp, &mut buf) {
            TunnResult::WriteToNetwork(keepalive) => {
                let k = keepalive.to_vec();
                gw.receive(&k, self.addr);
                true
            }
            _ => false,
        }
    }

    /// Encrypts `ip` and hands the datagram to the gateway.
    fn send(&mut self, gw: &mut Gateway, ip: &[u8]) {
        let mut buf = vec![0u8; 2048];
        match self.tunn.encapsulate(ip, &mut buf) {
            TunnResult::WriteToNetwork(d) => {
                let d = d.to_vec();
                gw.receive(&d, self.addr);
            }
            other => panic!("site has no session: {other:?}"),
        }
    }
}

fn icmp(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = vec![0u8; 28];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&28u16.to_be_bytes());
            p[8] = 64;
            p[9] = 1;
            p[12..16].copy_from_slice(&s.octets());
            p[16..20].copy_from_slice(&d.octets());
            p[20] = 8;
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = vec![0u8; 48];
            p[0] = 0x60;
            p[4..6].copy_from_slice(&8u16.to_be_bytes());
            p[6] = 58;
            p[7] = 255;
            p[8..24].copy_from_slice(&s.octets());
            p[24..40].copy_from_slice(&d.octets());
            p[40] = 133;
            p
        }
        _ => panic!("mixed families"),
    }
}

/// An issued peer handshakes and its own-source packets reach the TUN device intact.
#[test]
fn issued_peer_delivers() {
    let mut gw = Gateway::new();
    let mut site = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(&[site.record.clone()]);
    assert!(site.connect(&mut gw));
    assert!(
        gw.shared.table.load().peers[0].lock().session_up,
        "a shutdown now would log session_closed"
    );
    let ping = icmp("10.8.0.2", "10.8.0.1");
    site.send(&mut gw, &ping);
    assert_eq!(gw.cap.take_packets(), vec![ping]);
}

/// A packet whose source is not the sender's own address is dropped and counted.
#[test]
fn spoofed_source_dropped_and_counted() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    gw.load(&[a.record.clone(), b.record.clone()]);
    assert!(a.connect(&mut gw));
    for src in ["10.8.0.99", "10.8.0.3", "198.51.100.7"] {
        a.send(&mut gw, &icmp(src, "10.8.0.1"));
    }
    assert!(
        gw.cap.take_packets().is_empty(),
        "nothing spoofed reaches the TUN"
    );
    let table = gw.shared.table.load();
    let slot = &table.peers[0];
    assert_eq!(slot.denied[DenyReason::SpoofedSource.index()].total(), 3);
}

/// IPv6 link-local chatter is dropped quietly, not reported as spoofing.
#[test]
fn ipv6_noise_is_not_spoofing() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(&[a.record.clone()]);
    assert!(a.connect(&mut gw));
    a.send(&mut gw, &icmp("fe80::1", "ff02::2"));
    assert!(gw.cap.take_packets().is_empty());
    let table = gw.shared.table.load();
    assert_eq!(
        table.peers[0]
            .noise
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        table.peers[0].denied[DenyReason::SpoofedSource.index()].total(),
        0
    );
}

/// A key the admin never issued gets no reply and an unknown_key count.
#[test]
fn unknown_key_gets_no_reply() {
    let mut gw = Gateway::new();
    let issued = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&issued.record));
    let mut stranger = Site::new(&gw, "stranger", "10.8.0.9", 40009);
    assert!(!stranger.connect(&mut gw));
    assert!(gw.cap.take_datagrams().is_empty());
    assert_eq!(
        gw.shared.anon.throttles[HandshakeFailure::UnknownKey.index()].total(),
        1
    );
}

/// A revoked peer is removed with reason revoked; its data and new handshakes are refused.
#[test]
fn revocation_ends_session_and_refuses() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let mut b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    gw.load(&[a.record.clone(), b.record.clone()]);
    assert!(a.connect(&mut gw));
    assert!(b.connect(&mut gw));
    let mut revoked = a.record.clone();
    revoked.revoked_at = Some(500);
    let removed = gw.load(&[revoked, b.record.clone()]);
    assert_eq!(removed, vec![("alpha".to_string(), CloseReason::Revoked)]);
    a.send(&mut gw, &icmp("10.8.0.2", "10.8.0.1"));
    assert!(gw.cap.take_packets().is_empty(), "old session is gone");
    // The site retries with the same, now revoked, key.
    assert!(!a.connect(&mut gw));
    assert_eq!(
        gw.shared.anon.throttles[HandshakeFailure::Revoked.index()].total(),
        1
    );
    // The other peer's session survived the rebuild untouched.
    b.send(&mut gw, &icmp("10.8.0.3", "10.8.0.1"));
    assert_eq!(gw.cap.take_packets().len(), 1);
}

/// Expired peers are refused with reason expired.
#[test]
fn expired_peer_refused() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let mut rec = a.record.clone();
    rec.expires_at = Some(999); // the test clock (`load`) is at 1000
    gw.load(&[rec]);
    assert!(!a.connect(&mut gw));
    assert_eq!(
        gw.shared.anon.throttles[HandshakeFailure::Expired.index()].total(),
        1
    );
}

/// Packets from the TUN device are encrypted to the owning peer's endpoint;
/// unknown destinations are counted and dropped.
#[test]
fn transmit_routes_by_destination() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let mut b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    gw.load(&[a.record.clone(), b.record.clone()]);
    assert!(a.connect(&mut gw));
    assert!(b.connect(&mut gw));
    let reply = icmp("10.8.0.1", "10.8.0.3");
    gw.tun_packet(&reply);
    let sent = gw.cap.take_datagrams();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, b.addr);
    let mut buf = vec![0u8; 2048];
    match b.tunn.decapsulate(None, &sent[0].0, &mut buf) {
        TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p, &reply[..]),
        other => panic!("beta could not decrypt: {other:?}"),
    }
    gw.tun_packet(&icmp("10.8.0.1", "10.8.0.77"));
    assert!(gw.cap.take_datagrams().is_empty());
    assert_eq!(
        gw.shared
            .no_route
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// An authenticated packet from a new address moves the peer's endpoint (roaming).
#[test]
fn endpoint_roams() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(&[a.record.clone()]);
    assert!(a.connect(&mut gw));
    a.addr = "192.0.2.99:5555".parse().unwrap();
    a.send(&mut gw, &icmp("10.8.0.2", "10.8.0.1"));
    gw.tun_packet(&icmp("10.8.0.1", "10.8.0.2"));
    let sent = gw.cap.take_datagrams();
    assert_eq!(sent.last().map(|d| d.1), Some(a.addr));
}

/// Junk of every WireGuard type and random length changes nothing and is counted.
#[test]
fn junk_is_harmless() {
    use rand::{Rng, SeedableRng};
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(&[a.record.clone()]);
    assert!(a.connect(&mut gw));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..20_000 {
        let len = rng.gen_range(0..=200);
        let mut d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if len >= 4 {
            d[..4].copy_from_slice(&rng.gen_range(1u32..=4).to_le_bytes());
        }
        gw.receive(&d, "192.0.2.66:666".parse().unwrap());
    }
    assert!(gw.cap.take_packets().is_empty());
    assert!(gw.cap.take_datagrams().is_empty(), "junk gets no answer");
    let dropped = |r: DropReason| gw.shared.anon.dropped[r.index()].total();
    assert!(dropped(DropReason::Malformed) > 0);
    assert!(
        dropped(DropReason::UnknownSession) > 0,
        "data/response junk names no session"
    );
    a.send(&mut gw, &icmp("10.8.0.2", "10.8.0.1"));
    assert_eq!(
        gw.cap.take_packets().len(),
        1,
        "the live session still works"
    );
}

/// Rebuilding the table with an added peer keeps existing sessions.
#[test]
fn rebuild_keeps_sessions() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(&[a.record.clone()]);
    assert!(a.connect(&mut gw));
    let b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    let removed = gw.load(&[a.record.clone(), b.record.clone()]);
    assert!(removed.is_empty());
    a.send(&mut gw, &icmp("10.8.0.2", "10.8.0.1"));
    assert_eq!(gw.cap.take_packets().len(), 1);
}

/// A new key under the same name (rotation) closes the old session as rotated,
/// and the old key is refused as revoked from then on.
#[test]
fn rotation_is_reported_as_rotated() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(&[a.record.clone()]);
    assert!(a.connect(&mut gw));
    let rotated = Site::new(&gw, "alpha", "10.8.0.2", 40003);
    gw.revoked.push(RevokedKey {
        public_key: a.record.public_key,
        peer: "alpha".into(),
        reason: Some("rotated".into()),
        revoked_at: 900,
    });
    let removed = gw.load(std::slice::from_ref(&rotated.record));
    assert_eq!(removed, vec![("alpha".to_string(), CloseReason::Rotated)]);
    assert!(!a.connect(&mut gw), "the rotated-away key is refused");
    assert_eq!(
        gw.shared.anon.throttles[HandshakeFailure::Revoked.index()].total(),
        1
    );
}

/// A packet for a peer whose session is not usable yet is queued, the gateway
/// initiates a handshake, and the queued packet follows once it completes.
#[test]
fn queued_packet_flushed_after_handshake() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&a.record));
    let mut buf = vec![0u8; 2048];
    // The site initiates; the gateway answers but has no confirmed session yet.
    let init = match a.tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no initiation: {other:?}"),
    };
    gw.receive(&init, a.addr);
    let response = gw.cap.take_datagrams().remove(0).0;
    // A packet for the site arrives from the TUN device before any data from it.
    let reply = icmp("10.8.0.1", "10.8.0.2");
    gw.tun_packet(&reply);
    let sent = gw.cap.take_datagrams();
    assert_eq!(
        sent.len(),
        1,
        "the gateway initiates instead of sending data"
    );
    assert_eq!(sent[0].0.first(), Some(&1u8), "a handshake initiation");
    // The site completes its own handshake, then answers the gateway's.
    let _ = a.tunn.decapsulate(None, &response, &mut buf);
    let answer = match a.tunn.decapsulate(None, &sent[0].0, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("site did not answer the gateway's initiation: {other:?}"),
    };
    gw.receive(&answer, a.addr);
    let delivered: Vec<Vec<u8>> = gw
        .cap
        .take_datagrams()
        .into_iter()
        .filter_map(|(d, _)| match a.tunn.decapsulate(None, &d, &mut buf) {
            TunnResult::WriteToTunnelV4(p, _) => Some(p.to_vec()),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![reply], "the queued packet reached the site");
}

/// Event names logged while `f` runs on this thread.
fn events_during(f: impl FnOnce()) -> Vec<String> {
    use tracing_subscriber::layer::SubscriberExt;
    struct Names(Arc<Mutex<Vec<String>>>);
    struct Visitor(Option<String>);
    impl tracing::field::Visit for Visitor {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            if field.name() == "event" {
                self.0 = Some(value.to_string());
            }
        }
        fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
    }
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Names {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let mut v = Visitor(None);
            event.record(&mut v);
            if let Some(name) = v.0 {
                self.0.lock().unwrap().push(name);
            }
        }
    }
    let names = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Names(Arc::clone(&names)));
    tracing::subscriber::with_default(subscriber, f);
    let out = names.lock().unwrap().clone();
    out
}

/// WireGuard's mac1 over `msg` (everything before the two MACs) for `responder`.
fn mac1(responder: &sitegate::keys::PublicKey, msg: &[u8]) -> [u8; 16] {
    use blake2::digest::{FixedOutput, KeyInit, Update};
    use blake2::{Blake2s256, Blake2sMac, Digest};
    let key: [u8; 32] = Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(responder.as_bytes())
        .finalize()
        .into();
    let mut mac = <Blake2sMac<blake2::digest::consts::U16>>::new_from_slice(&key).unwrap();
    mac.update(msg);
    mac.finalize_fixed().into()
}

/// A handshake response anyone can write: the gateway's public key (in every
/// client config) gives a valid mac1; the rest is random.
fn forged_response(gw: &Gateway, receiver_idx: u32, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut m = vec![0u8; 92];
    m[0] = 2;
    rng.fill(&mut m[4..60]);
    m[8..12].copy_from_slice(&receiver_idx.to_le_bytes());
    let mac = mac1(&gw.key.public_key(), &m[..60]);
    m[60..76].copy_from_slice(&mac);
    m
}

/// Sends `n` handshake messages with a valid mac1 for no session from a third
/// address: each counts once against the gateway's handshake limiter.
fn fill_limiter(gw: &mut Gateway, n: u64) {
    let filler: SocketAddr = "198.51.100.7:7".parse().unwrap();
    for i in 0..n {
        let m = forged_response(gw, 0x00ab_cd00, 1_000 + i);
        gw.receive(&m, filler);
    }
    gw.cap.take_datagrams();
}

/// How full the limiter is before an attack: empty (a per-peer limit used to
/// answer the 11th message with a cookie), one short of the limit (the peer's
/// `Tunn` is the one to answer with a cookie), and far over it (the gateway
/// answers with a cookie before any peer is involved).
fn limiter_fills() -> [u64; 3] {
    let limit = sitegate::dataplane::HANDSHAKE_RATE_LIMIT;
    [0, limit - 1, 2 * limit]
}

/// Where the gateway now sends the site's traffic.
fn endpoint_of_site(gw: &mut Gateway) -> Option<SocketAddr> {
    gw.tun_packet(&icmp("10.8.0.1", "10.8.0.2"));
    gw.cap.take_datagrams().last().map(|d| d.1)
}

/// A forged handshake response (valid mac1, the peer's real index) sent 12 times
/// from another address never moves the endpoint and never logs `handshake`,
/// whatever the load.
#[test]
fn forged_response_does_not_roam() {
    for fill in limiter_fills() {
        let mut gw = Gateway::new();
        let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
        gw.load(std::slice::from_ref(&a.record));
        assert!(a.connect(&mut gw));
        let index = gw.shared.table.load().peers[0].index;
        let attacker: SocketAddr = "203.0.113.66:6666".parse().unwrap();
        let events = events_during(|| {
            fill_limiter(&mut gw, fill);
            for i in 0..12u32 {
                let m = forged_response(&gw, (index << 8) | (i & 0xff), u64::from(i));
                gw.receive(&m, attacker);
            }
        });
        assert!(
            !events.iter().any(|e| e == "handshake"),
            "fill {fill}: {events:?}"
        );
        gw.cap.take_datagrams();
        assert_eq!(endpoint_of_site(&mut gw), Some(a.addr), "fill {fill}");
        a.send(&mut gw, &icmp("10.8.0.2", "10.8.0.1"));
        assert_eq!(gw.cap.take_packets().len(), 1, "the session still works");
    }
}

/// A site's initiation captured and replayed 12 times from another address
/// never moves the endpoint nor logs `handshake`, whatever the load.
#[test]
fn replayed_initiation_does_not_roam() {
    for fill in limiter_fills() {
        let mut gw = Gateway::new();
        let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
        gw.load(std::slice::from_ref(&a.record));
        let mut buf = vec![0u8; 2048];
        let init = match a.tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no initiation: {other:?}"),
        };
        gw.receive(&init, a.addr);
        let (resp, _) = gw.cap.take_datagrams().remove(0);
        match a.tunn.decapsulate(None, &resp, &mut buf) {
            TunnResult::WriteToNetwork(k) => {
                let k = k.to_vec();
                gw.receive(&k, a.addr);
            }
            other => panic!("no keepalive: {other:?}"),
        }
        let attacker: SocketAddr = "203.0.113.66:6666".parse().unwrap();
        let events = events_during(|| {
            fill_limiter(&mut gw, fill);
            for _ in 0..12 {
                gw.receive(&init, attacker);
            }
        });
        assert!(
            !events.iter().any(|e| e == "handshake"),
            "fill {fill}: {events:?}"
        );
        gw.cap.take_datagrams();
        assert_eq!(endpoint_of_site(&mut gw), Some(a.addr), "fill {fill}");
        a.send(&mut gw, &icmp("10.8.0.2", "10.8.0.1"));
        assert_eq!(gw.cap.take_packets().len(), 1, "the session still works");
    }
}
