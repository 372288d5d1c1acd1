//! Micro-benchmarks of the per-packet work: encapsulate/decapsulate through
//! boringtun at 64/512/1420-byte payloads, the policy decision, and the
//! allowed-IPs lookup with 10,000 peers. `cargo bench --bench hot_path`.

use std::net::{IpAddr, Ipv4Addr};

use boringtun::noise::{Tunn, TunnResult};
use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput,
};
use ipnet::IpNet;
use sitegate::dataplane::packet::Header;
use sitegate::keys::PrivateKey;
use sitegate::policy;
use sitegate::routing::AllowedIps;

/// Two tunnels with an established session (initiator, responder).
fn session_pair() -> (Tunn, Tunn) {
    let a = PrivateKey::generate();
    let b = PrivateKey::generate();
    let mut ta = Tunn::new(
        a.to_x25519(),
        b.public_key().to_x25519(),
        None,
        None,
        1,
        None,
    );
    let mut tb = Tunn::new(
        b.to_x25519(),
        a.public_key().to_x25519(),
        None,
        None,
        2,
        None,
    );
    let mut buf_a = vec![0u8; 2048];
    let mut buf_b = vec![0u8; 2048];
    let init = match ta.format_handshake_initiation(&mut buf_a, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    };
    let resp = match tb.decapsulate(None, &init, &mut buf_b) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no response"),
    };
    let keepalive = match ta.decapsulate(None, &resp, &mut buf_a) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no keepalive"),
    };
    let _ = tb.decapsulate(None, &keepalive, &mut buf_b);
    (ta, tb)
}

fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 8, 0, 2]);
    p[16..20].copy_from_slice(&[10, 8, 0, 1]);
    p
}

fn crypto(c: &mut Criterion) {
    let mut group = c.benchmark_group("tunn");
    for size in [64usize, 512, 1420] {
        let (mut ta, mut tb) = session_pair();
        let packet = ipv4_packet(size);
        let mut out = vec![0u8; 2048];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encapsulate", size), &size, |bench, _| {
            bench.iter(|| match ta.encapsulate(black_box(&packet), &mut out) {
                TunnResult::WriteToNetwork(d) => d.len(),
                _ => 0,
            })
        });
        // Each decapsulation needs a fresh counter: encrypt in the untimed setup.
        let mut plain = vec![0u8; 2048];
        let mut enc_out = vec![0u8; 2048];
        group.bench_with_input(BenchmarkId::new("decapsulate", size), &size, |bench, _| {
            bench.iter_batched(
                || match ta.encapsulate(&packet, &mut enc_out) {
                    TunnResult::WriteToNetwork(d) => d.to_vec(),
                    _ => panic!("no session"),
                },
                |d| match tb.decapsulate(None, black_box(&d), &mut plain) {
                    TunnResult::WriteToTunnelV4(p, _) => p.len(),
                    _ => panic!("decapsulation failed"),
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// A gateway for 10,000 peers with eight services, the granted ones last,
/// so that `decide` scans them all.
fn bench_config() -> sitegate::config::Config {
    let mut text = String::from(
        r#"
[interface]
name = "sgbench0"
private_key_file = "server.key"
listen_port = 51820
address = "10.128.0.1/16"
endpoint = "192.0.2.1:51820"

[store]
url = "sqlite:///nonexistent/bench.db"
"#,
    );
    for i in 0..6 {
        text.push_str(&format!(
            "\n[[service]]\nname = \"s{i}\"\naddress = \"172.30.0.{}:{}\"\n",
            10 + i,
            1000 + i
        ));
    }
    text.push_str("\n[[service]]\nname = \"db\"\naddress = \"172.30.0.10:5432\"\n");
    text.push_str("\n[[service]]\nname = \"sftp\"\naddress = \"10.128.0.1:22\"\n");
    sitegate::config::Config::parse(std::path::Path::new("/bench/sitegate.toml"), &text)
        .expect("bench config")
}

fn table_10k() -> AllowedIps<usize> {
    let mut t = AllowedIps::new();
    for i in 0..10_000u32 {
        let a = Ipv4Addr::from(0x0a80_0000 + i);
        t.insert(IpNet::from(IpAddr::V4(a)), i as usize);
    }
    t
}

fn lookup_and_policy(c: &mut Criterion) {
    let table = table_10k();
    let addrs: Vec<IpAddr> = (0..1024u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + (i * 9) % 10_000)))
        .collect();
    let mut i = 0usize;
    c.bench_function("allowed_ips_lookup_10k", |b| {
        b.iter(|| {
            i += 1;
            table.lookup(black_box(addrs[i % addrs.len()]))
        })
    });
    let mut packet = ipv4_packet(64);
    packet[12..16].copy_from_slice(&Ipv4Addr::from(0x0a80_0000 + 77).octets());
    let policy = policy::Policy::from_config(&bench_config());
    let grants = policy.grants(&["sftp", "db"]);
    // One packet per path through `decide`, each from peer 77 of 10,000.
    let cases: [(&str, [u8; 4], u8, u16); 4] = [
        ("service", [10, 128, 0, 1], 6, 22),
        ("internet", [203, 0, 113, 10], 6, 443),
        ("denied_acl", [172, 30, 0, 99], 6, 80),
        ("denied_isolation", [10, 128, 0, 9], 6, 22),
    ];
    let mut group = c.benchmark_group("policy_decide_10k");
    for (name, dst, proto, port) in cases {
        let mut p = packet.clone();
        p[9] = proto;
        p[16..20].copy_from_slice(&dst);
        p[22..24].copy_from_slice(&port.to_be_bytes());
        let header = Header::parse(&p).expect("valid header");
        group.bench_function(name, |b| {
            b.iter(|| {
                policy::decide(
                    &policy,
                    black_box(&77usize),
                    grants,
                    black_box(&header),
                    &table,
                )
            })
        });
    }
    group.finish();
    c.bench_function("header_parse", |b| {
        b.iter(|| Header::parse(black_box(&packet)))
    });
}

/// The per-packet cost of the `/metrics` packet counters: one batch of 64
/// packets from 4 peers of 10,000, counted in a loop's `Tally` and flushed
/// (what the loops do), against one relaxed `fetch_add` per packet.
fn packet_counters(c: &mut Criterion) {
    use sitegate::dataplane::peers::PeerTable;
    use sitegate::dataplane::tally::{Direction, Tally};
    use std::sync::Arc;
    let gw = PrivateKey::generate();
    let records: Vec<sitegate::registry::Peer> = (0..10_000u32)
        .map(|i| sitegate::registry::Peer {
            id: i64::from(i),
            name: sitegate::registry::PeerName::new(&format!("p{i}")).unwrap(),
            public_key: PrivateKey::generate().public_key(),
            preshared_key: None,
            addresses: vec![IpAddr::V4(Ipv4Addr::from(0x0a80_0002 + i))],
            created_at: 0,
            expires_at: None,
            revoked_at: None,
            revoked_reason: None,
            admin: false,
            services: vec![],
        })
        .collect();
    let policy = policy::Policy::from_config(&bench_config());
    let seed = Arc::new(sitegate::dataplane::peers::TunnSeed::new(
        gw.to_x25519(),
        None,
    ));
    let (table, _) = PeerTable::default().rebuild(&records, &[], 0, &policy, &seed);
    let table = Arc::new(table);
    let batch: Vec<usize> = (0..64)
        .map(|i| [7, 7, 7, 7, 42, 999, 7, 5_000][i % 8])
        .collect();
    let mut group = c.benchmark_group("packet_counters_batch_64");
    group.throughput(Throughput::Elements(batch.len() as u64));
    let mut tally = Tally::new(Direction::Rx);
    group.bench_function("tally_per_batch", |b| {
        b.iter(|| {
            for &pos in &batch {
                tally.count(&table, black_box(pos));
            }
            tally.flush();
        })
    });
    group.bench_function("fetch_add_per_packet", |b| {
        b.iter(|| {
            for &pos in &batch {
                table.peers[black_box(pos)].packets.add(Direction::Rx, 1);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, crypto, lookup_and_policy, packet_counters);
criterion_main!(benches);
