//! Engine tests: the real receive/transmit handlers and peer table, driven with
//! boringtun client tunnels over a capturing [`DatagramIo`] instead of sockets and a
//! TUN device. Fast, deterministic, no root.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use boringtun::noise::{Tunn, TunnResult};
use sitegate::config::Config;
use sitegate::dataplane::peers::PeerTable;
use sitegate::dataplane::timers::Timers;
use sitegate::dataplane::udp::DatagramIo;
use sitegate::dataplane::{rx, tx, DropReason, Engine, Runtime, TunSink};
use sitegate::events::{CloseReason, HandshakeFailure};
use sitegate::keys::{PresharedKey, PrivateKey};
use sitegate::policy::{DenyReason, Policy};
use sitegate::registry::store::RevokedKey;
use sitegate::registry::{Peer, PeerName};

#[derive(Default)]
struct Capture {
    datagrams: Mutex<Vec<(Vec<u8>, SocketAddr)>>,
    packets: Mutex<Vec<Vec<u8>>>,
    /// Sends fail as on a host with no route to the site, and capture nothing.
    unreachable: std::sync::atomic::AtomicBool,
}

struct CaptureWire(Arc<Capture>);

impl DatagramIo for CaptureWire {
    /// The tests hand datagrams to the handlers directly: nothing to receive.
    fn recv_batch(&self, _: &mut sitegate::dataplane::udp::RecvBatch) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }

    fn send_to(&self, datagram: &[u8], dst: SocketAddr) -> std::io::Result<usize> {
        if self
            .0
            .unreachable
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(std::io::Error::from_raw_os_error(libc::ENETUNREACH));
        }
        self.0
            .datagrams
            .lock()
            .unwrap()
            .push((datagram.to_vec(), dst));
        Ok(datagram.len())
    }

    /// Cut as the kernel cuts a UDP GSO send: one capture per segment.
    fn send_segments(&self, buf: &[u8], segment: u16, dst: SocketAddr) -> std::io::Result<()> {
        for d in buf.chunks(usize::from(segment)) {
            self.send_to(d, dst)?;
        }
        Ok(())
    }
}

/// The TUN side of a capture: lends a buffer like the receive loop's batch
/// and records each committed packet.
struct CaptureTun {
    cap: Arc<Capture>,
    buf: Vec<u8>,
}

impl CaptureTun {
    fn new(cap: &Arc<Capture>) -> CaptureTun {
        CaptureTun {
            cap: Arc::clone(cap),
            buf: vec![0u8; 65_600],
        }
    }
}

impl TunSink for CaptureTun {
    fn next_buf(&mut self) -> &mut [u8] {
        &mut self.buf
    }
    fn commit(&mut self, len: usize) {
        self.cap
            .packets
            .lock()
            .unwrap()
            .push(self.buf[..len].to_vec());
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

/// The engine's gateway: dual-stack, internet allowed, sites isolated, one
/// service (`sftp`, TCP 22 on the gateway address) that no peer is granted
/// unless a test says so.
fn engine_config() -> Config {
    let text = r#"
[interface]
name = "sgeng0"
private_key_file = "server.key"
listen_port = 51820
address = ["10.8.0.1/24", "fd00:8::1/64"]
endpoint = "192.0.2.1:51820"

[egress]
interface = "eth0"
allow_internet = true
peer_to_peer = false

[[service]]
name = "sftp"
address = "10.8.0.1:22"

[store]
url = "sqlite:///nonexistent/engine.db"
"#;
    Config::parse(std::path::Path::new("/engine/sitegate.toml"), text).expect("engine config")
}

struct Gateway {
    key: PrivateKey,
    engine: Engine,
    rt: Runtime,
    cap: Arc<Capture>,
    wire: CaptureWire,
    tx: tx::Transmitter,
    rx: rx::Receiver,
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
        let engine = Engine::new(&key, Policy::from_config(&engine_config()));
        Gateway {
            key,
            engine,
            rt: Runtime::default(),
            wire: CaptureWire(Arc::clone(&cap)),
            cap,
            tx: tx::Transmitter::default(),
            rx: rx::Receiver::default(),
            revoked: Vec::new(),
        }
    }

    /// Swaps in a table built from `records`; returns who was removed and why.
    fn load(&mut self, records: &[Peer]) -> Vec<(String, CloseReason)> {
        let old = self.engine.table.load_full();
        let engine = &self.engine;
        let (table, removed): (PeerTable, _) = old.rebuild(
            records,
            &self.revoked,
            1_000,
            &engine.policy,
            &engine.tunn_seed(),
        );
        self.engine.table.store(Arc::new(table));
        removed
            .into_iter()
            .map(|r| (r.slot.name.to_string(), r.reason))
            .collect()
    }

    fn receive(&mut self, datagram: &[u8], from: SocketAddr) {
        let mut sink = CaptureTun::new(&self.cap);
        rx::handle(
            &self.engine,
            &mut self.rx,
            &self.wire,
            datagram,
            from,
            &mut sink,
        );
    }

    /// One packet read from the TUN device, as a read of its own: the
    /// transmit loop's code, sending through the capture.
    fn tun_packet(&mut self, ip: &[u8]) {
        let table = self.engine.table.load_full();
        tx::handle_packet(&self.engine, &mut self.tx, &self.wire, &table, ip);
        self.tx.end_batch(&self.engine, &self.wire);
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
        gw.engine.table.load().peers[0].lock().session_up,
        "a shutdown now would log session_closed"
    );
    let ping = icmp("10.8.0.2", "10.8.0.1");
    site.send(&mut gw, &ping);
    assert_eq!(gw.cap.take_packets(), vec![ping]);
}

/// Issued peers get their `Tunn` on first contact only, and a reload keeps it.
#[test]
fn tunn_made_on_first_contact() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    let records = [a.record.clone(), b.record.clone()];
    gw.load(&records);
    let has_tunn = |gw: &Gateway, name: &str| gw_slot(gw, name).lock().tunn().is_some();
    assert!(!has_tunn(&gw, "alpha") && !has_tunn(&gw, "beta"));
    assert!(a.connect(&mut gw));
    assert!(has_tunn(&gw, "alpha"), "the handshake made alpha's Tunn");
    assert!(!has_tunn(&gw, "beta"), "beta never spoke");
    gw.load(&records);
    let ping = icmp("10.8.0.2", "10.8.0.1");
    a.send(&mut gw, &ping);
    assert_eq!(
        gw.cap.take_packets(),
        vec![ping],
        "the session survived the reload"
    );
    // A packet routed to beta starts its handshake, which needs its Tunn.
    gw.tun_packet(&icmp("10.8.0.1", "10.8.0.3"));
    assert!(has_tunn(&gw, "beta"));
}

/// With a handshake worker, the receive loop only queues initiations: the
/// worker answers them, a full queue refuses them as `rate_limited` without a
/// reply, and data of existing sessions goes on meanwhile.
#[test]
fn handshake_worker_answers_queued_initiations() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let mut b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    let mut c = Site::new(&gw, "gamma", "10.8.0.4", 40003);
    gw.load(&[a.record.clone(), b.record.clone(), c.record.clone()]);
    assert!(a.connect(&mut gw), "inline, as without a worker");

    let (queue, queued) = std::sync::mpsc::sync_channel(1);
    gw.rx = rx::Receiver::with_handshakes(queue);
    let mut buf = vec![0u8; 2048];
    let mut init = |site: &mut Site| match site.tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no initiation: {other:?}"),
    };
    let (init_b, init_c) = (init(&mut b), init(&mut c));
    gw.receive(&init_b, b.addr);
    gw.receive(&init_c, c.addr);
    assert!(gw.cap.take_datagrams().is_empty(), "the loop answers none");
    let ping = icmp("10.8.0.2", "10.8.0.1");
    a.send(&mut gw, &ping);
    assert_eq!(gw.cap.take_packets(), vec![ping], "data goes on");

    // The loop's receiver gone, the worker answers what was queued and ends.
    gw.rx = rx::Receiver::default();
    rx::run_handshakes(&gw.engine, &gw.rt, queued, &gw.wire).unwrap();
    let replies = gw.cap.take_datagrams();
    assert_eq!(replies.len(), 1, "beta's initiation, queued, answered");
    assert_eq!(replies[0].1, b.addr);
    assert!(matches!(
        b.tunn
            .decapsulate(None, &replies[0].0, &mut vec![0u8; 2048]),
        TunnResult::WriteToNetwork(_)
    ));
    let failures = gw.engine.anon.throttles[HandshakeFailure::RateLimited.index()].total();
    assert_eq!(
        failures, 1,
        "gamma's, over the queue, refused as under load"
    );
}

/// What a test hands a loop's stand-in, taken as a blocking read takes it.
struct Inbox<T> {
    queue: Mutex<std::collections::VecDeque<T>>,
    arrived: std::sync::Condvar,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Inbox {
            queue: Mutex::default(),
            arrived: std::sync::Condvar::new(),
        }
    }
}

impl<T> Inbox<T> {
    fn put(&self, item: T) {
        self.queue.lock().unwrap().push_back(item);
        self.arrived.notify_all();
    }

    /// Up to `max` items, waiting up to 20 ms for the first (then
    /// `WouldBlock`, as a read with a timeout), so a loop sees its stop flag.
    fn take(&self, max: usize) -> std::io::Result<Vec<T>> {
        let queue = self.queue.lock().unwrap();
        let (mut queue, _) = self
            .arrived
            .wait_timeout_while(queue, std::time::Duration::from_millis(20), |q| {
                q.is_empty()
            })
            .unwrap();
        let n = queue.len().min(max);
        if n == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(queue.drain(..n).collect())
    }
}

/// A socket stand-in fed by the test: datagrams wait in `inbox` until the
/// loop's next receive; what the gateway sends lands in `sent`.
#[derive(Default)]
struct ChannelUdp {
    inbox: Inbox<(Vec<u8>, SocketAddr)>,
    sent: Mutex<Vec<(Vec<u8>, SocketAddr)>>,
}

impl DatagramIo for ChannelUdp {
    fn recv_batch(
        &self,
        batch: &mut sitegate::dataplane::udp::RecvBatch,
    ) -> std::io::Result<usize> {
        let datagrams = self.inbox.take(sitegate::dataplane::udp::RECV_BATCH)?;
        for (i, (d, src)) in datagrams.iter().enumerate() {
            batch.put(i, d, *src);
        }
        Ok(datagrams.len())
    }
    fn send_to(&self, datagram: &[u8], dst: SocketAddr) -> std::io::Result<usize> {
        self.sent.lock().unwrap().push((datagram.to_vec(), dst));
        Ok(datagram.len())
    }
    fn send_segments(&self, buf: &[u8], segment: u16, dst: SocketAddr) -> std::io::Result<()> {
        for d in buf.chunks(usize::from(segment)) {
            self.send_to(d, dst)?;
        }
        Ok(())
    }
}

/// A TUN stand-in: records every packet of every write pass, and hands the
/// transmit loop the packets the test puts in `inbox`, one per read.
#[derive(Default)]
struct RecordTun {
    written: Mutex<Vec<Vec<u8>>>,
    inbox: Inbox<Vec<u8>>,
}

impl sitegate::dataplane::batch::TunWrite for RecordTun {
    fn write_batch(
        &self,
        _: &mut tun_rs::GROTable,
        bufs: &mut [sitegate::dataplane::batch::PacketBuf],
        offset: usize,
    ) -> std::io::Result<usize> {
        let mut written = self.written.lock().unwrap();
        for b in bufs.iter() {
            written.push(b.as_ref()[offset..].to_vec());
        }
        Ok(bufs.len())
    }
}

impl sitegate::dataplane::batch::TunRead for RecordTun {
    fn read_batch(
        &self,
        _: &mut [u8],
        segments: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> std::io::Result<usize> {
        let ip = self.inbox.take(1)?.remove(0);
        segments[0][..ip.len()].copy_from_slice(&ip);
        sizes[0] = ip.len();
        Ok(1)
    }
}

/// Polls `probe` until it yields, for at most 5 s.
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The daemon's three loops, on their own threads over stand-in I/O: a
/// site's initiation is answered by the handshake worker, its ping is written
/// to the TUN side by the receive loop, the reply read from the TUN side
/// reaches the site through the transmit loop, and all end when the gateway
/// stops.
#[test]
fn loops_run_over_stand_in_io() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&a.record));
    let udp = ChannelUdp::default();
    let tun = RecordTun::default();
    let (queue, queued) = std::sync::mpsc::sync_channel(rx::HANDSHAKE_QUEUE);
    let (engine, rt) = (&gw.engine, &gw.rt);
    std::thread::scope(|s| {
        let rx_loop = s.spawn(|| rx::run(engine, rt, &udp, &tun, false, queue));
        let worker = s.spawn(|| rx::run_handshakes(engine, rt, queued, &udp));
        let tx_loop = s.spawn(|| tx::run(engine, rt, &udp, &tun, 1420));
        let mut buf = vec![0u8; 2048];
        let init = match a.tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no initiation: {other:?}"),
        };
        udp.inbox.put((init.clone(), a.addr));
        let (response, to) = wait_for("the response", || udp.sent.lock().unwrap().pop());
        assert_eq!(to, a.addr);
        let keepalive = match a.tunn.decapsulate(None, &response, &mut buf) {
            TunnResult::WriteToNetwork(k) => k.to_vec(),
            other => panic!("response refused: {other:?}"),
        };
        udp.inbox.put((keepalive, a.addr));
        let ping = icmp("10.8.0.2", "10.8.0.1");
        let data = match a.tunn.encapsulate(&ping, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("no session: {other:?}"),
        };
        udp.inbox.put((data, a.addr));
        wait_for("the ping on the TUN side", || {
            tun.written.lock().unwrap().contains(&ping).then_some(())
        });
        let pong = icmp("10.8.0.1", "10.8.0.2");
        tun.inbox.put(pong.clone());
        let (datagram, to) = wait_for("the reply datagram", || udp.sent.lock().unwrap().pop());
        assert_eq!(to, a.addr);
        match a.tunn.decapsulate(None, &datagram, &mut buf) {
            TunnResult::WriteToTunnelV4(ip, _) => assert_eq!(ip, &pong[..]),
            other => panic!("the site cannot read the reply: {other:?}"),
        }
        rt.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        rx_loop.join().unwrap().unwrap();
        worker.join().unwrap().unwrap();
        tx_loop.join().unwrap().unwrap();
    });
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
    let table = gw.engine.table.load();
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
    let table = gw.engine.table.load();
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

/// A TCP SYN-sized IPv4 packet from `src` to `dst:port`.
fn tcp(src: &str, dst: &str, port: u16) -> Vec<u8> {
    let (s, d): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&s.octets());
    p[16..20].copy_from_slice(&d.octets());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p
}

/// The policy on the real receive path: a service needs its grant (given on
/// reload to a live session), other sites are isolated, internet traffic is
/// delivered and stamps "internet seen", and drops are counted per reason.
#[test]
fn policy_on_the_receive_path() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    gw.load(&[a.record.clone(), b.record.clone()]);
    assert!(a.connect(&mut gw));

    a.send(&mut gw, &tcp("10.8.0.2", "10.8.0.1", 22));
    a.send(&mut gw, &tcp("10.8.0.2", "10.8.0.3", 22));
    a.send(&mut gw, &tcp("10.8.0.2", "172.30.0.9", 80));
    assert!(
        gw.cap.take_packets().is_empty(),
        "nothing denied reaches the TUN"
    );
    let s = gw_slot(&gw, "alpha");
    assert_eq!(s.denied[DenyReason::Acl.index()].total(), 2);
    assert_eq!(s.denied[DenyReason::PeerIsolation.index()].total(), 1);
    assert_eq!(
        s.internet_seen_ms.load(Relaxed),
        0,
        "nothing internet-bound yet"
    );

    // Grant sftp: the reload carries the session over and updates the grant.
    let mut granted = a.record.clone();
    granted.services = vec!["sftp".into()];
    assert!(
        gw.load(&[granted, b.record.clone()]).is_empty(),
        "session kept"
    );
    let syn = tcp("10.8.0.2", "10.8.0.1", 22);
    a.send(&mut gw, &syn);
    assert_eq!(gw.cap.take_packets(), vec![syn]);

    let web = tcp("10.8.0.2", "203.0.113.10", 443);
    a.send(&mut gw, &web);
    assert_eq!(gw.cap.take_packets(), vec![web]);
    let s = gw_slot(&gw, "alpha");
    assert_ne!(s.internet_seen_ms.load(Relaxed), 0, "internet seen");
    assert_eq!(s.denied[DenyReason::Acl.index()].total(), 2);
}

fn gw_slot(gw: &Gateway, name: &str) -> Arc<sitegate::dataplane::peers::PeerSlot> {
    let table = gw.engine.table.load();
    let slot = table
        .peers
        .iter()
        .find(|p| p.name.as_str() == name)
        .expect("peer in table");
    Arc::clone(slot)
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
        gw.engine.anon.throttles[HandshakeFailure::UnknownKey.index()].total(),
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
        gw.engine.anon.throttles[HandshakeFailure::Revoked.index()].total(),
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
        gw.engine.anon.throttles[HandshakeFailure::Expired.index()].total(),
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
        gw.engine
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
    let dropped = |r: DropReason| gw.engine.anon.dropped[r.index()].total();
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
        gw.engine.anon.throttles[HandshakeFailure::Revoked.index()].total(),
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
        let index = gw.engine.table.load().peers[0].index;
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

/// The gateway's reply to one initiation from `site`: its first datagram.
fn initiate(gw: &mut Gateway, site: &mut Site) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let init = match site.tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no initiation: {other:?}"),
    };
    gw.receive(&init, site.addr);
    gw.cap
        .take_datagrams()
        .into_iter()
        .next()
        .map(|(d, _)| d)
        .unwrap_or_default()
}

/// 200 initiations in a burst for one key: the first ones are answered, the
/// rest get cookie replies once the gateway-wide limit is reached; a cookie fed
/// back to the site lets its next initiation through under load.
#[test]
fn initiation_burst_gets_cookies_past_the_limit() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&a.record));
    let (mut answered, mut cookies, mut first_cookie) = (0, 0, None);
    let mut last_cookie = Vec::new();
    for i in 0..200 {
        let reply = initiate(&mut gw, &mut a);
        match reply.first() {
            Some(2) => answered += 1,
            Some(3) => {
                cookies += 1;
                first_cookie.get_or_insert(i);
                last_cookie = reply;
            }
            other => panic!("initiation {i}: unexpected reply {other:?}"),
        }
    }
    let limit = sitegate::dataplane::HANDSHAKE_RATE_LIMIT as usize;
    assert!(
        answered >= limit / 2 - 1,
        "answered {answered} before the limit"
    );
    assert!(cookies >= 200 - limit / 2 - 1, "cookies {cookies}");
    assert!(first_cookie.is_some_and(|i| i >= limit / 2 - 1));
    // The site takes the cookie; its next initiation carries mac2 and is answered.
    let mut buf = vec![0u8; 256];
    assert!(matches!(
        a.tunn.decapsulate(None, &last_cookie, &mut buf),
        TunnResult::Done
    ));
    assert_eq!(initiate(&mut gw, &mut a).first(), Some(&2));
    // A cookie reply to another address does not let that address through.
    let mut b = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    b.tunn = std::mem::replace(&mut a.tunn, b.tunn);
    b.addr = "203.0.113.5:1".parse().unwrap();
    assert_eq!(initiate(&mut gw, &mut b).first(), Some(&3));
}

/// Connects `site`, taking a cookie reply and retrying as a stock client does.
fn connect_with_cookie(gw: &mut Gateway, site: &mut Site) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    for _ in 0..3 {
        let reply = initiate(gw, site);
        match reply.first() {
            Some(3) => {
                let _ = site.tunn.decapsulate(None, &reply, &mut buf);
            }
            Some(2) => {
                if let TunnResult::WriteToNetwork(k) = site.tunn.decapsulate(None, &reply, &mut buf)
                {
                    let k = k.to_vec();
                    gw.receive(&k, site.addr);
                }
                return reply;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    panic!("no response after a cookie");
}

/// 1,000 peers get random, distinct, nonzero 24-bit indices, and the gateway's
/// handshake responses carry them as the upper bits of its session index.
#[test]
fn indices_are_random_and_unique() {
    let mut gw = Gateway::new();
    let mut sites: Vec<Site> = (0..1_000u32)
        .map(|i| {
            let ip = format!("10.8.{}.{}", 1 + i / 250, 2 + i % 250);
            Site::new(&gw, &format!("site{}x", i), &ip, 20_000 + i as u16)
        })
        .collect();
    let records: Vec<Peer> = sites.iter().map(|s| s.record.clone()).collect();
    gw.load(&records);
    let table = gw.engine.table.load_full();
    let indices: Vec<u32> = table.peers.iter().map(|p| p.index).collect();
    let distinct: std::collections::HashSet<u32> = indices.iter().copied().collect();
    assert_eq!(distinct.len(), 1_000, "no collision");
    assert!(indices.iter().all(|&i| i != 0 && i < 1 << 24));
    let steps = indices
        .windows(2)
        .filter(|w| w[1].wrapping_sub(w[0]) == 1)
        .count();
    assert!(
        steps < 5,
        "{steps} of 999 consecutive indices are sequential"
    );
    // A rebuild with 1,000 more peers keeps the live indices and collides with none.
    let more: Vec<Site> = (0..1_000u32)
        .map(|i| {
            let ip = format!("10.9.{}.{}", 1 + i / 250, 2 + i % 250);
            Site::new(&gw, &format!("more{}x", i), &ip, 30_000 + i as u16)
        })
        .collect();
    let all: Vec<Peer> = records
        .iter()
        .cloned()
        .chain(more.iter().map(|s| s.record.clone()))
        .collect();
    gw.load(&all);
    let after: Vec<u32> = gw
        .engine
        .table
        .load()
        .peers
        .iter()
        .map(|p| p.index)
        .collect();
    assert_eq!(
        &after[..1_000],
        &indices[..],
        "live sessions keep their index"
    );
    let distinct: std::collections::HashSet<u32> = after.iter().copied().collect();
    assert_eq!(distinct.len(), 2_000);
    // On the wire: each response's sender index belongs to that peer.
    let mut wire = std::collections::HashSet::new();
    for (site, &index) in sites.iter_mut().zip(&indices).take(300) {
        let resp = connect_with_cookie(&mut gw, site);
        let sender = u32::from_le_bytes(resp[4..8].try_into().unwrap());
        assert_eq!(sender >> 8, index);
        assert!(wire.insert(sender));
    }
}

/// An initiation with a valid mac1 from a fresh key the gateway never issued.
fn unknown_initiation(gw: &Gateway) -> Vec<u8> {
    let gw_pub = gw.key.public_key().to_x25519();
    let mut t = Tunn::new(
        PrivateKey::generate().to_x25519(),
        gw_pub,
        None,
        None,
        1,
        None,
    );
    let mut buf = vec![0u8; 2048];
    match t.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(init) => init.to_vec(),
        other => panic!("no initiation: {other:?}"),
    }
}

/// A source that fails more than the threshold is ignored for the backoff:
/// its handshakes go unprocessed, but a live session's transport packets from
/// the same address still pass, and a live site's own address is never blocked.
#[test]
fn failing_source_is_backed_off() {
    use sitegate::dataplane::sources::FAILURE_THRESHOLD;
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let mut b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    b.addr = "203.0.113.9:4000".parse().unwrap();
    gw.load(&[a.record.clone(), b.record.clone()]);
    assert!(b.connect(&mut gw), "beta connects from the attacker's host");
    let attacker: SocketAddr = "203.0.113.9:5000".parse().unwrap();
    let unknown_total =
        |gw: &Gateway| gw.engine.anon.throttles[HandshakeFailure::UnknownKey.index()].total();
    for _ in 0..FAILURE_THRESHOLD + 20 {
        let init = unknown_initiation(&gw);
        gw.receive(&init, attacker);
    }
    assert_eq!(
        unknown_total(&gw),
        u64::from(FAILURE_THRESHOLD),
        "past the threshold the source is not even decrypted"
    );
    // beta's handshakes from the blocked address are ignored too...
    assert!(initiate(&mut gw, &mut b).is_empty());
    // ...but its live session's packets pass.
    b.send(&mut gw, &icmp("10.8.0.3", "10.8.0.1"));
    assert_eq!(gw.cap.take_packets().len(), 1);

    // alpha has a session; the timer notes its address; forging that address
    // with failing handshakes does not block it.
    assert!(a.connect(&mut gw));
    gw.engine
        .poll_timers(&mut Timers::default(), &gw.rt, &gw.wire);
    for _ in 0..FAILURE_THRESHOLD + 20 {
        let init = unknown_initiation(&gw);
        gw.receive(&init, a.addr);
    }
    assert_eq!(initiate(&mut gw, &mut a).first(), Some(&2), "alpha renews");
}

/// Refused-key failures remember the distinct keys tried (the first few plus a
/// count) for the summary line.
#[test]
fn refused_keys_are_listed() {
    let mut gw = Gateway::new();
    let gw_pub = gw.key.public_key().to_x25519();
    let mut buf = vec![0u8; 2048];
    let mut keys = Vec::new();
    for i in 0..8u16 {
        let k = PrivateKey::generate();
        keys.push(k.public_key());
        let mut t = Tunn::new(k.to_x25519(), gw_pub, None, None, 1, None);
        for _ in 0..2 {
            if let TunnResult::WriteToNetwork(init) = t.format_handshake_initiation(&mut buf, true)
            {
                let init = init.to_vec();
                gw.receive(
                    &init,
                    SocketAddr::new("192.0.2.50".parse().unwrap(), 100 + i),
                );
            }
        }
    }
    let seen = gw.engine.anon.seen.lock().unwrap()[HandshakeFailure::UnknownKey.index()];
    // The first attempt was logged at once with its key; the summary lists the
    // distinct keys tried after it in order (the first again, for its second
    // try), then counts the attempts with other keys: two each for four keys.
    let listed: Vec<_> = seen.keys.iter().flatten().copied().collect();
    assert_eq!(listed, keys[..sitegate::dataplane::SUMMARY_KEYS].to_vec());
    assert_eq!(seen.other_keys, 8);
    assert_eq!(seen.key_list().split(',').count(), 4);
}

/// An expired peer is dropped from the table in memory, with no store, and
/// then refused as expired.
#[test]
fn expiry_from_memory() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    a.record.expires_at = Some(1_500);
    let b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    gw.load(&[a.record.clone(), b.record.clone()]);
    assert!(a.connect(&mut gw));
    let table = gw.engine.table.load_full();
    assert!(table.without_expired(1_499).is_none());
    let (next, removed) = table.without_expired(1_500).expect("alpha expired");
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].reason, CloseReason::Expired);
    assert_eq!(next.peers.len(), 1);
    assert_eq!(next.peers[0].name.to_string(), "beta");
    gw.engine.table.store(Arc::new(next));
    a.send(&mut gw, &icmp("10.8.0.2", "10.8.0.1"));
    assert!(gw.cap.take_packets().is_empty(), "the session is gone");
    assert!(
        initiate(&mut gw, &mut a).is_empty(),
        "no reply to an expired key"
    );
    assert_eq!(
        gw.engine.anon.throttles[HandshakeFailure::Expired.index()].total(),
        1
    );
}

/// The receive loop remembers which key last initiated from an address: a
/// renewal from there, another key at that address (a second device behind
/// the same NAT port, a rotated key) and a replay all get the right answer.
#[test]
fn initiator_memory_follows_key_changes() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let mut b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    b.addr = a.addr;
    gw.load(&[a.record.clone(), b.record.clone()]);
    assert!(a.connect(&mut gw));
    assert!(a.connect(&mut gw), "a renewal through the remembered key");
    assert!(b.connect(&mut gw), "another key at the same address");
    assert!(a.connect(&mut gw), "and back");
    let mut buf = vec![0u8; 2048];
    let init = match a.tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no initiation: {other:?}"),
    };
    gw.receive(&init, a.addr);
    assert_eq!(gw.cap.take_datagrams().len(), 1, "answered once");
    gw.receive(&init, a.addr);
    assert!(gw.cap.take_datagrams().is_empty(), "the replay is not");
    let table = gw.engine.table.load();
    let alpha = table
        .peers
        .iter()
        .find(|p| p.name.to_string() == "alpha")
        .unwrap();
    assert_eq!(
        alpha.handshake_failures[HandshakeFailure::Replay.index()].total(),
        1
    );
}

/// The shared limiter is reset by the timer: once the burst that tripped it is
/// a second old, a plain initiation (no mac2) is answered again.
#[test]
fn limiter_resets_every_second() {
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&a.record));
    fill_limiter(&mut gw, sitegate::dataplane::HANDSHAKE_RATE_LIMIT + 1);
    assert_eq!(initiate(&mut gw, &mut a).first(), Some(&3), "under load");
    let mut timers = sitegate::dataplane::timers::Timers::default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(4);
    let mut answered = false;
    while !answered && std::time::Instant::now() < deadline {
        gw.engine.poll_timers(&mut timers, &gw.rt, &gw.wire);
        // The site never takes the cookie replies: no initiation carries mac2.
        answered = initiate(&mut gw, &mut a).first() == Some(&2);
        if !answered {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    assert!(answered, "no initiation answered within 4 s of the burst");
}

/// Errors of the packet loops are throttled like every other failure: a
/// hundred in a row give one log line, the rest wait for the summary.
#[test]
fn loop_errors_are_throttled() {
    use sitegate::dataplane::LoopError;
    let gw = Gateway::new();
    let err = std::io::Error::other("device gone");
    let events = events_during(|| {
        for _ in 0..100 {
            let now = gw.engine.clock.now_ms();
            gw.rt.loop_error(now, LoopError::Tun, &err);
            gw.rt.loop_error(now, LoopError::Udp, &err);
        }
    });
    assert_eq!(
        events,
        vec!["tun_error".to_string(), "udp_error".to_string()]
    );
    assert_eq!(gw.rt.loop_errors[LoopError::Tun.index()].total(), 100);
}

/// A key's text form (43 base64 characters and `=`) anywhere in `line`.
fn looks_like_key(line: &str) -> bool {
    let b = line.as_bytes();
    let is_b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'+' || c == b'/';
    (0..b.len().saturating_sub(43)).any(|i| {
        b[i..i + 43].iter().all(|&c| is_b64(c))
            && b[i + 43] == b'='
            && (i == 0 || !is_b64(b[i - 1]))
    })
}

/// The value of the series `name{labels}` in a `/metrics` text, by a real
/// text-format parser.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::{Scrape, Value};
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let hit = scrape.samples.into_iter().find(|s| {
        s.metric == name
            && s.labels.len() == labels.len()
            && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    })?;
    match hit.value {
        Value::Counter(v) | Value::Gauge(v) => Some(v),
        other => panic!("{name}: {other:?}"),
    }
}

/// Real traffic moves the counters, and snapshot and render show them:
/// handshakes (a renewal counts again), forwarded and sent packets per peer
/// and direction (a denied packet is not forwarded but is counted denied),
/// boringtun's bytes, the handshake time, failures by reason and the states
/// the caller passes; no key appears anywhere in the text.
#[test]
fn metrics_follow_real_traffic() {
    use sitegate::dataplane::tally::Direction::{Rx, Tx};
    use sitegate::metrics::{self, PeerStates};
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    let b = Site::new(&gw, "beta", "10.8.0.3", 40002);
    gw.load(&[a.record.clone(), b.record.clone()]);
    let before = metrics::snapshot(&gw.engine, PeerStates::default());
    assert_eq!(before.peers.len(), 2);
    assert!(before
        .peers
        .iter()
        .all(|p| p.handshakes == 0 && p.packets == [0, 0] && p.last_handshake.is_none()));

    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let t0 = wall();
    assert!(a.connect(&mut gw));
    let sent = [
        icmp("10.8.0.2", "10.8.0.1"),
        tcp("10.8.0.2", "203.0.113.10", 443),
        icmp("10.8.0.2", "10.8.0.1"),
    ];
    for p in &sent {
        a.send(&mut gw, p);
    }
    let denied = tcp("10.8.0.2", "10.8.0.1", 22); // sftp, not granted
    a.send(&mut gw, &denied);
    assert_eq!(gw.cap.take_packets().len(), 3);
    for _ in 0..2 {
        gw.tun_packet(&icmp("10.8.0.1", "10.8.0.2"));
    }
    // beta has neither session nor endpoint: boringtun queues the packet.
    gw.tun_packet(&icmp("10.8.0.1", "10.8.0.3"));
    assert_eq!(gw.cap.take_datagrams().len(), 2, "alpha's two");
    assert!(a.connect(&mut gw), "alpha renews");
    let mut stranger = Site::new(&gw, "stranger", "10.8.0.9", 40009);
    assert!(!stranger.connect(&mut gw));

    let states = PeerStates {
        active: 2,
        expired: 0,
        revoked: 1,
    };
    let snap = metrics::snapshot(&gw.engine, states);
    let names: Vec<&str> = snap.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"], "sorted by name");
    let alpha = &snap.peers[0];
    assert_eq!(alpha.handshakes, 2);
    assert_eq!(alpha.packets[Rx.index()], 3, "forwarded only");
    assert_eq!(alpha.packets[Tx.index()], 2);
    let inner: usize = sent.iter().map(Vec::len).sum::<usize>() + denied.len();
    assert_eq!(
        alpha.bytes[Rx.index()],
        inner as u64,
        "every decrypted byte"
    );
    assert_eq!(alpha.bytes[Tx.index()], 2 * 28);
    assert_eq!(alpha.denied[DenyReason::Acl.index()], 1);
    let when = alpha.last_handshake.expect("a handshake time");
    assert!((t0 - 1..=wall() + 1).contains(&when), "{when} vs {t0}");
    let beta = &snap.peers[1];
    assert_eq!((beta.handshakes, beta.packets), (0, [0, 0]));
    assert_eq!(
        beta.packets[Tx.index()],
        0,
        "a packet queued for a handshake is not sent yet"
    );
    assert_eq!(
        snap.handshake_failures[HandshakeFailure::UnknownKey.index()],
        1
    );
    assert_eq!(snap.states, states);

    let text = metrics::render(&snap);
    let alpha_l = ("peer", "alpha");
    assert_eq!(
        metric(&text, "sitegate_handshakes_total", &[alpha_l]),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "sitegate_handshakes_total", &[("peer", "beta")]),
        Some(0.0)
    );
    for (dir, packets) in [("rx", 3.0), ("tx", 2.0)] {
        let labels = [alpha_l, ("direction", dir)];
        assert_eq!(
            metric(&text, "sitegate_peer_packets_total", &labels),
            Some(packets)
        );
        assert!(metric(&text, "sitegate_peer_bytes_total", &labels).unwrap() > 0.0);
    }
    assert_eq!(
        metric(
            &text,
            "sitegate_packets_denied_total",
            &[alpha_l, ("reason", "acl")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "sitegate_handshake_failures_total",
            &[("reason", "unknown_key")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "sitegate_peer_last_handshake_timestamp_seconds",
            &[alpha_l]
        ),
        Some(when as f64)
    );
    assert_eq!(
        metric(
            &text,
            "sitegate_peer_last_handshake_timestamp_seconds",
            &[("peer", "beta")]
        ),
        None,
        "no handshake, no timestamp"
    );
    assert_eq!(
        metric(&text, "sitegate_peers", &[("state", "revoked")]),
        Some(1.0)
    );
    let keys = [
        gw.key.public_key().to_base64(),
        a.record.public_key.to_base64(),
        b.record.public_key.to_base64(),
    ];
    for line in text.lines() {
        assert!(!looks_like_key(line), "{line}");
        assert!(!keys.iter().any(|k| line.contains(k.as_str())), "{line}");
        assert!(!line.contains("192.0.2.10"), "no endpoint: {line}");
    }
}

/// The receive loop's counting: packets of a batch reach the peer's counter
/// at the end of the batch, in one add, not before.
#[test]
fn rx_packets_counted_per_batch() {
    use sitegate::dataplane::tally::Direction::Rx;
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&a.record));
    assert!(a.connect(&mut gw));
    let mut buf = vec![0u8; 2048];
    let mut sink = CaptureTun::new(&gw.cap);
    // The loop loads the table once per batch and hands it down.
    let table = gw.engine.table.load_full();
    for _ in 0..5 {
        let d = match a.tunn.encapsulate(&icmp("10.8.0.2", "10.8.0.1"), &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("no session: {other:?}"),
        };
        rx::handle_in_batch(
            &gw.engine, &mut gw.rx, &gw.wire, &table, &d, a.addr, &mut sink,
        );
    }
    assert_eq!(gw.cap.take_packets().len(), 5, "delivered at once");
    let slot = gw_slot(&gw, "alpha");
    assert_eq!(slot.packets.get(Rx), 0, "counted at the end of the batch");
    gw.rx.end_batch(&gw.engine);
    assert_eq!(slot.packets.get(Rx), 5);
}

/// A batch is handled against the table loaded at its start: a reload that
/// lands mid-batch (here: the peer revoked) takes effect from the next batch,
/// and the batch's counts still reach the slot they were counted for.
#[test]
fn table_loaded_once_per_batch() {
    use sitegate::dataplane::tally::Direction::Rx;
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&a.record));
    assert!(a.connect(&mut gw));
    let slot = gw_slot(&gw, "alpha");
    let mut buf = vec![0u8; 2048];
    let mut sink = CaptureTun::new(&gw.cap);
    let mut datagram =
        |a: &mut Site| match a.tunn.encapsulate(&icmp("10.8.0.2", "10.8.0.1"), &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("no session: {other:?}"),
        };
    let table = gw.engine.table.load_full();
    let first = datagram(&mut a);
    rx::handle_in_batch(
        &gw.engine, &mut gw.rx, &gw.wire, &table, &first, a.addr, &mut sink,
    );
    let removed = gw.load(&[]);
    assert_eq!(removed.len(), 1, "alpha left the live table");
    let second = datagram(&mut a);
    rx::handle_in_batch(
        &gw.engine, &mut gw.rx, &gw.wire, &table, &second, a.addr, &mut sink,
    );
    drop(table);
    gw.rx.end_batch(&gw.engine);
    assert_eq!(gw.cap.take_packets().len(), 2, "the batch kept its table");
    assert_eq!(slot.packets.get(Rx), 2);
    let third = datagram(&mut a);
    gw.receive(&third, a.addr);
    assert!(
        gw.cap.take_packets().is_empty(),
        "the next batch sees the reload"
    );
}

/// Every failed send on the data path is counted, gateway-wide: a handshake
/// response the receive path could not send, a packet the transmit path
/// could not send, a keepalive the timer could not send. They show in the
/// metrics snapshot, and the timer logs one `io_errors` line, not one per
/// failure.
#[test]
fn failed_sends_are_counted() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&a.record));
    let errors = |gw: &Gateway| gw.engine.io_errors.udp_send_errors();
    assert_eq!(errors(&gw), 0);

    gw.cap.unreachable.store(true, Relaxed);
    assert!(!a.connect(&mut gw), "the response could not leave");
    assert_eq!(errors(&gw), 1, "the lost handshake response");

    gw.cap.unreachable.store(false, Relaxed);
    assert!(a.connect(&mut gw));
    gw.cap.unreachable.store(true, Relaxed);
    for _ in 0..3 {
        gw.tun_packet(&icmp("10.8.0.1", "10.8.0.2"));
    }
    assert_eq!(errors(&gw), 4, "three packets to the site lost");
    assert!(gw.cap.take_datagrams().is_empty());
    assert_eq!(gw.engine.io_errors.tun_write_errors(), 0);

    let mut timers = sitegate::dataplane::timers::Timers::default();
    let events = events_during(|| gw.engine.poll_timers(&mut timers, &gw.rt, &gw.wire));
    assert_eq!(
        events.iter().filter(|e| *e == "io_errors").count(),
        1,
        "one line for the failures so far: {events:?}"
    );
    for _ in 0..50 {
        gw.tun_packet(&icmp("10.8.0.1", "10.8.0.2"));
    }
    let events = events_during(|| gw.engine.poll_timers(&mut timers, &gw.rt, &gw.wire));
    assert!(
        !events.iter().any(|e| e == "io_errors"),
        "no second line within the summary interval: {events:?}"
    );
    assert_eq!(errors(&gw), 54);
    let snapshot =
        sitegate::metrics::snapshot(&gw.engine, sitegate::metrics::PeerStates::default());
    assert_eq!(snapshot.udp_send_errors, 54);
    let text = sitegate::metrics::render(&snapshot);
    assert_eq!(
        metric(&text, "sitegate_udp_send_errors_total", &[]),
        Some(54.0)
    );
    assert_eq!(
        metric(&text, "sitegate_tun_write_errors_total", &[]),
        Some(0.0)
    );
}

/// A handshake the gateway initiates (data queued for a site with no
/// session) counts like one it answers, and the queued packet counts as sent
/// once, when it finally leaves.
#[test]
fn gateway_initiated_handshake_counts() {
    use sitegate::dataplane::tally::Direction::Tx;
    use std::sync::atomic::Ordering::Relaxed;
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&a.record));
    let mut buf = vec![0u8; 2048];
    let init = match a.tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no initiation: {other:?}"),
    };
    gw.receive(&init, a.addr);
    let response = gw.cap.take_datagrams().remove(0).0;
    gw.tun_packet(&icmp("10.8.0.1", "10.8.0.2"));
    let gw_init = gw.cap.take_datagrams().remove(0).0;
    let slot = gw_slot(&gw, "alpha");
    assert_eq!(slot.handshakes.load(Relaxed), 1, "the site's, answered");
    assert_eq!(slot.packets.get(Tx), 0, "queued, not sent");
    let _ = a.tunn.decapsulate(None, &response, &mut buf);
    let answer = match a.tunn.decapsulate(None, &gw_init, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no answer: {other:?}"),
    };
    gw.receive(&answer, a.addr);
    assert!(!gw.cap.take_datagrams().is_empty());
    assert_eq!(slot.handshakes.load(Relaxed), 2, "the gateway's, completed");
    assert_eq!(slot.packets.get(Tx), 1, "the queued packet, sent");
}

/// Failures charged to a peer stay in the gateway-wide count after the peer
/// leaves the table, so the counter never goes down.
#[test]
fn peer_failures_outlive_the_peer() {
    use sitegate::metrics::{self, PeerStates};
    let mut gw = Gateway::new();
    let mut a = Site::new(&gw, "alpha", "10.8.0.2", 40001);
    gw.load(std::slice::from_ref(&a.record));
    let mut buf = vec![0u8; 2048];
    let init = match a.tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no initiation: {other:?}"),
    };
    gw.receive(&init, a.addr);
    gw.receive(&init, a.addr); // a replay
    let replays = |gw: &Gateway| {
        metrics::snapshot(&gw.engine, PeerStates::default()).handshake_failures
            [HandshakeFailure::Replay.index()]
    };
    assert_eq!(replays(&gw), 1);
    let mut revoked = a.record.clone();
    revoked.revoked_at = Some(500);
    gw.load(&[revoked]);
    assert!(gw.engine.table.load().peers.is_empty());
    assert_eq!(replays(&gw), 1, "still counted");
}
