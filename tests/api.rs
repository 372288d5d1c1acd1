//! The admin API of issue 9 against the running daemon, through the tunnel:
//! who gets an answer (admin peers granted `api` and holding the token; not a
//! plain peer, not a peer without the grant, not the underlay), what every
//! answer carries (security headers, JSON errors naming the field, never a
//! secret), the body cap and the rate limit, issue and revoke with live effect
//! and an audit trail, HTTPS, and the `[api]` settings `run` refuses.
//!
//! ```text
//!  ops site (admin, api)  192.168.1.2 ──┐
//!  other sites            192.168.i.2 ──┼── gateway ns: sitegate run, API on 10.8.0.1:8443
//!  attacker (optional)   192.168.88.2 ──┘   (default route via the gateway, so 10.8.0.0/24 too)
//! ```
//!
//! Requests go out from a thread inside a site's namespace ([`in_netns`]) over a
//! small HTTP/1.1 client on `TcpStream`, so a test controls what is sent when
//! (headers before a body that never comes, 300 requests on one connection);
//! HTTPS goes through curl. Needs root, `/dev/net/tun`, wireguard-go,
//! wireguard-tools, nft, and per test curl and openssl; without them a test
//! prints a skip note, except under `CI=true`, where it fails. All traffic
//! stays inside the test's namespaces. `--nocapture` shows the timings.

mod common;

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// `[api] listen` as `init` writes it.
const API: &str = "10.8.0.1:8443";
/// How long one request may take to be answered.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// A revoke through the API must cut the session within this long (issue 4, 9).
const CUT_WITHIN_SECS: f64 = 1.0;
/// The attacker's underlay link number (`192.168.88.0/24`, see [`Underlay`]).
const ATTACKER_LINK: u8 = 88;
/// The contract's body cap (`src/api` `MAX_BODY`, 64 KiB).
const MAX_BODY: usize = 64 * 1024;

// ---------------------------------------------------------------------------
// A small HTTP/1.1 client

/// One HTTP answer: status, headers (names lowercased) and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    /// A header's value (the first of that name), case-insensitively.
    fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer body is not JSON ({e}): {self:?}"))
    }

    /// The `error` sentence of a JSON error answer.
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("error answer without an `error` string: {self:?}"))
            .to_string()
    }
}

/// The bytes of one request; with a body, `Content-Type: application/json`.
fn request(
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    close: bool,
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: {API}\r\nAccept: */*\r\n");
    if let Some(t) = token {
        r.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    if close {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("\r\n");
    r.push_str(body.unwrap_or(""));
    r.into_bytes()
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads one answer: status line, headers, then a `Content-Length` or chunked
/// body, or (neither) everything up to the end of the connection.
fn read_answer(r: &mut impl BufRead) -> io::Result<Answer> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without an answer",
        ));
    }
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("not an HTTP/1 status line: {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(invalid("connection closed inside the headers".into()));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {l:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = get("content-length") {
        let n: usize = len
            .parse()
            .map_err(|_| invalid(format!("bad Content-Length {len:?}")))?;
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if !(status < 200 || status == 204 || status == 304) {
        r.read_to_end(&mut body)?;
    }
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A TCP connection to the API with read and write timeouts (call it on a
/// thread inside the client's namespace).
fn connect_api() -> io::Result<TcpStream> {
    let addr: SocketAddr = API.parse().expect("API address");
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(ANSWER_WITHIN))?;
    s.set_write_timeout(Some(ANSWER_WITHIN))?;
    Ok(s)
}

/// One request on its own connection from namespace `ns`.
fn try_call(
    ns: &Netns,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> io::Result<Answer> {
    let req = request(method, path, token, body, true);
    in_netns(&ns.name, move || {
        let mut s = connect_api()?;
        s.write_all(&req)?;
        read_answer(&mut BufReader::new(s))
    })
    .join()
    .expect("client thread")
}

/// [`try_call`] that must get an answer; panics with the gateway log otherwise.
fn call(
    ns: &Netns,
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    try_call(ns, method, path, token, body).unwrap_or_else(|e| {
        panic!(
            "{method} {path} from {}: no answer ({e}); gateway log:\n{}",
            ns.name,
            gw.log_tail(30)
        )
    })
}

/// Asserts the status, naming the request and showing the answer otherwise.
fn expect_status(a: &Answer, status: u16, what: &str) {
    assert_eq!(a.status, status, "{what}: answered {a:?}");
}

/// Asserts the headers the contract puts on every answer, errors included.
fn assert_security_headers(a: &Answer, what: &str) {
    for (name, want) in [
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert_eq!(a.header(name), Some(want), "{what}: header {name} in {a:?}");
    }
    let csp = a
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy in {a:?}"));
    for directive in ["default-src 'none'", "frame-ancestors 'none'"] {
        assert!(
            csp.split(';').any(|d| d.trim() == directive),
            "{what}: CSP `{csp}` lacks `{directive}`"
        );
    }
}

/// Asserts a JSON error answer: the status, the security headers, and an
/// `error` sentence containing every one of `needles`.
fn assert_error(a: &Answer, status: u16, needles: &[&str], what: &str) {
    expect_status(a, status, what);
    assert_security_headers(a, what);
    assert!(
        a.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{what}: error not JSON: {a:?}"
    );
    let e = a.error();
    for n in needles {
        assert!(e.contains(n), "{what}: error `{e}` does not name `{n}`");
    }
}

// ---------------------------------------------------------------------------
// The rig

/// A string value of the config file (`key = "value"`, first occurrence).
fn config_value(gw: &Gateway, key: &str) -> String {
    let text = fs::read_to_string(&gw.config).expect("read config");
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| {
                v.split('#')
                    .next()
                    .unwrap()
                    .trim()
                    .trim_matches('"')
                    .to_string()
            })
        })
        .unwrap_or_else(|| panic!("no `{key}` in {}:\n{text}", gw.config.display()))
}

/// The API token `init` wrote (`[api] token_file`).
fn token_path(gw: &Gateway) -> PathBuf {
    PathBuf::from(config_value(gw, "token_file"))
}

fn read_token(gw: &Gateway) -> String {
    let t = fs::read_to_string(token_path(gw)).expect("read the API token");
    t.trim().to_string()
}

/// The namespaces of one test: the gateway, `sites` sites on underlay links
/// 1.., and optionally an attacker on link 88. Declared before the gateway
/// and the sites, so it drops after them.
struct Net {
    gw: Netns,
    sites: Vec<Netns>,
    attacker: Option<Netns>,
}

impl Net {
    fn build(n: &Names, sites: u8, attacker: bool) -> Net {
        let gw = Netns::new(&n.netns("gw"));
        let sites = (1..=sites)
            .map(|i| {
                let ns = Netns::new(&n.netns(&format!("s{i}")));
                Underlay::attach(n, &gw, &ns, i);
                ns
            })
            .collect();
        let attacker = attacker.then(|| {
            let ns = Netns::new(&n.netns("at"));
            Underlay::attach(n, &gw, &ns, ATTACKER_LINK);
            ns
        });
        Net {
            gw,
            sites,
            attacker,
        }
    }
}

/// `peer add ops --admin --service api`: the admin peer of every test.
/// The start most tests share: one site, a running gateway, the admin peer
/// `ops` (granted `api`) up on that site, and the API token. Destructure it in
/// field order (`n, net, gw, ops, token`) so that the site goes down before
/// the gateway, and the gateway before the namespaces.
struct OpsRig {
    n: Names,
    net: Net,
    gw: Gateway,
    ops: Site,
    token: String,
}

impl OpsRig {
    fn start(code: &str) -> OpsRig {
        let n = names(code);
        let net = Net::build(&n, 1, false);
        let mut gw = Gateway::init(&net.gw, &n.name("g"));
        let ops_conf = add_ops(&gw);
        gw.start();
        let ops = site_with_api(&net.sites[0], &n.name("w1"), &ops_conf, &gw, "ops");
        let token = read_token(&gw);
        OpsRig {
            n,
            net,
            gw,
            ops,
            token,
        }
    }
}

fn add_ops(gw: &Gateway) -> String {
    gw.add_peer_with("ops", &["--admin", "--service", "api"])
}

/// Brings a site up and waits until its tunnel carries a ping to the gateway
/// and a TCP connection to the API port opens.
fn site_with_api(ns: &Netns, ifname: &str, conf: &str, gw: &Gateway, who: &str) -> Site {
    let site = Site::up(ns, ifname, conf);
    assert!(
        ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "{who} cannot ping {GATEWAY_TUNNEL_ADDR}; gateway log:\n{}",
        gw.log_tail(40)
    );
    if let Err(kind) = tcp_connect_from(&ns.name, API, Duration::from_secs(5)) {
        panic!(
            "{who} cannot connect to the API at {API} ({kind:?}); gateway log:\n{}",
            gw.log_tail(40)
        );
    }
    site
}

/// The peer called `name` in a JSON array of peer objects.
fn find_peer<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no peer `{name}` in {list}"))
}

/// `peer list --json` without the live counters: what the store holds.
fn stored_peers(gw: &Gateway) -> Value {
    let out = gw.cli_ok(&["peer", "list", "--json"]);
    let mut list: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("peer list --json ({e}):\n{out}"));
    for p in list.as_array_mut().expect("a peer array") {
        p.as_object_mut().expect("a peer object").remove("live");
    }
    list
}

/// The audit log's records, one JSON object a line.
fn audit_records(gw: &Gateway) -> Vec<Value> {
    fs::read_to_string(audit_path(gw))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line not JSON ({e}): {l}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests

/// An admin peer granted `api` with the token reads `/v1/status` (running, its
/// own peer listed with a handshake), `/v1/peers`, `/v1/peers/ops` and
/// `/healthz`, and every answer, a success or an error, carries the security
/// headers (no HSTS over plain HTTP).
#[test]
fn admin_reads_with_token_and_every_answer_has_security_headers() {
    if !rig_ready("api_reads") || !tools_ready("api_reads", &["nft"]) {
        return;
    }
    let OpsRig {
        n: _n,
        net,
        mut gw,
        ops,
        token,
    } = OpsRig::start("qa");
    let ns = &net.sites[0];
    let ops_key = ops.public_key();

    let a = call(ns, &gw, "GET", "/v1/status", Some(&token), None);
    expect_status(&a, 200, "GET /v1/status");
    assert_security_headers(&a, "GET /v1/status");
    assert!(
        a.header("strict-transport-security").is_none(),
        "HSTS over plain HTTP: {a:?}"
    );
    assert!(
        a.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "status not JSON: {a:?}"
    );
    let status = a.json();
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(status["interface"], gw.ifname.as_str(), "{status}");
    let me = find_peer(&status["peers"], "ops");
    assert_eq!(me["public_key"], ops_key.as_str(), "{me}");
    assert!(
        !me["latest_handshake"].is_null(),
        "ops is connected yet has no handshake in /v1/status: {me}"
    );

    let a = call(ns, &gw, "GET", "/v1/peers", Some(&token), None);
    expect_status(&a, 200, "GET /v1/peers");
    assert_security_headers(&a, "GET /v1/peers");
    let peers = a.json();
    assert_eq!(peers.as_array().map(Vec::len), Some(1), "{peers}");
    let listed = find_peer(&peers, "ops");
    assert_eq!(listed["admin"], true, "{listed}");
    assert_eq!(listed["state"], "active", "{listed}");
    assert!(
        listed["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|v| v == "api")),
        "ops is not listed with its `api` grant: {listed}"
    );
    assert!(
        listed["live"].is_object(),
        "ops has no live state: {listed}"
    );

    let a = call(ns, &gw, "GET", "/v1/peers/ops", Some(&token), None);
    expect_status(&a, 200, "GET /v1/peers/ops");
    assert_security_headers(&a, "GET /v1/peers/ops");
    let one = a.json();
    assert_eq!(one["name"], "ops", "{one}");
    assert_eq!(one["public_key"], ops_key.as_str(), "{one}");
    assert_eq!(one["addresses"], listed["addresses"], "{one}");

    let a = call(ns, &gw, "GET", "/healthz", None, None);
    expect_status(&a, 200, "GET /healthz without a token");
    assert_security_headers(&a, "GET /healthz");
    assert_eq!(a.json(), json!({"status": "ok"}));

    // Errors carry them too: an unknown peer, an unknown endpoint, a wrong method.
    let a = call(ns, &gw, "GET", "/v1/peers/nosuch", Some(&token), None);
    assert_error(&a, 404, &["nosuch"], "GET /v1/peers/nosuch");
    let a = call(ns, &gw, "GET", "/v1/nothing-here", Some(&token), None);
    expect_status(&a, 404, "GET /v1/nothing-here");
    assert_security_headers(&a, "GET /v1/nothing-here");
    let a = call(ns, &gw, "PUT", "/v1/status", Some(&token), Some("{}"));
    expect_status(&a, 405, "PUT /v1/status");
    assert_security_headers(&a, "PUT /v1/status");
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// Without a token the API answers 401 with `WWW-Authenticate: Bearer`; a
/// wrong token (same length, or another scheme) gets 401 too, and neither the
/// answer nor the gateway's log contains the wrong token or the real one.
#[test]
fn missing_or_wrong_token_is_401_and_never_echoed() {
    if !rig_ready("api_token") || !tools_ready("api_token", &["nft"]) {
        return;
    }
    let OpsRig {
        n: _n,
        net,
        mut gw,
        ops: _ops,
        token,
    } = OpsRig::start("qk");
    let ns = &net.sites[0];
    // As long as the real one and unlike it in every position.
    let wrong: String = token
        .chars()
        .map(|c| if c == 'Z' { 'Y' } else { 'Z' })
        .collect();

    for path in ["/v1/status", "/v1/peers", "/v1/peers/ops"] {
        let a = call(ns, &gw, "GET", path, None, None);
        assert_error(&a, 401, &["token"], &format!("GET {path} without a token"));
        assert_eq!(
            a.header("www-authenticate"),
            Some("Bearer"),
            "GET {path}: {a:?}"
        );
    }
    let a = call(ns, &gw, "GET", "/v1/status", Some(&wrong), None);
    assert_error(&a, 401, &[], "GET /v1/status with a wrong token");
    assert_eq!(a.header("www-authenticate"), Some("Bearer"), "{a:?}");
    let a = call(
        ns,
        &gw,
        "POST",
        "/v1/peers",
        Some(&wrong),
        Some(r#"{"name":"intruder"}"#),
    );
    assert_error(&a, 401, &[], "POST /v1/peers with a wrong token");
    let text = format!("{a:?}");
    assert!(
        !text.contains(&wrong),
        "the answer echoes the wrong token: {text}"
    );
    assert!(
        !text.contains(&token),
        "the answer contains the real token: {text}"
    );
    // The right token under another scheme is no bearer token.
    let raw = request("GET", "/v1/status", None, None, true);
    let basic = String::from_utf8(raw).unwrap().replacen(
        "\r\n\r\n",
        &format!("\r\nAuthorization: Basic {token}\r\n\r\n"),
        1,
    );
    let a = in_netns(&ns.name, move || {
        let mut s = connect_api()?;
        s.write_all(basic.as_bytes())?;
        read_answer(&mut BufReader::new(s))
    })
    .join()
    .expect("client thread")
    .expect("an answer to the Basic request");
    assert_error(&a, 401, &[], "GET /v1/status with Basic <token>");
    assert!(!format!("{a:?}").contains(&token), "{a:?}");

    // Nothing was issued, and no token reached the log.
    let list = gw.cli_ok(&["peer", "list", "--json"]);
    assert!(
        !list.contains("intruder"),
        "a 401 request issued a peer: {list}"
    );
    let log = gw.log_text();
    assert!(
        !log.contains(&token),
        "the gateway log contains the API token"
    );
    assert!(
        !log.contains(&wrong),
        "the gateway log contains the wrong token"
    );
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// Who is answered at all: a non-admin peer granted `api` with the right token
/// gets 403 (an admin peer exists), on `/healthz` too; a peer without the
/// `api` grant gets no SYN-ACK (`packet_denied reason=acl`); and an attacker on
/// the underlay that routes 10.8.0.0/24 via the gateway gets no answer on the
/// API port, though it reaches the gateway's underlay address.
#[test]
fn non_admin_403_ungranted_and_underlay_unanswered() {
    if !rig_ready("api_who") || !tools_ready("api_who", &["nft"]) {
        return;
    }
    let n = names("qf");
    let net = Net::build(&n, 2, true);
    let mut gw = Gateway::init(&net.gw, &n.name("g"));
    add_ops(&gw); // the admin that exists; its site stays down
    let viewer_conf = gw.add_peer_with("viewer", &["--service", "api"]);
    let plain_conf = gw.add_peer("plain"); // default grants only: sftp
    gw.start();
    let (ns_v, ns_p) = (&net.sites[0], &net.sites[1]);
    let _viewer = site_with_api(ns_v, &n.name("w1"), &viewer_conf, &gw, "viewer");
    let _plain = Site::up(ns_p, &n.name("w2"), &plain_conf);
    assert!(
        ns_p.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "plain cannot ping {GATEWAY_TUNNEL_ADDR}; gateway log:\n{}",
        gw.log_tail(40)
    );
    let token = read_token(&gw);

    for path in ["/v1/status", "/v1/peers", "/healthz"] {
        let a = call(ns_v, &gw, "GET", path, Some(&token), None);
        assert_error(&a, 403, &["admin"], &format!("viewer GET {path}"));
    }
    let a = call(
        ns_v,
        &gw,
        "POST",
        "/v1/peers",
        Some(&token),
        Some(r#"{"name":"sneaky"}"#),
    );
    assert_error(&a, 403, &[], "viewer POST /v1/peers");
    assert!(
        !gw.cli_ok(&["peer", "list", "--json"]).contains("sneaky"),
        "a 403 request issued a peer"
    );

    assert_unanswered(ns_p, "plain (not granted api)", API);
    gw.wait_event("packet_denied acl for plain", Duration::from_secs(5), |e| {
        is_event(e, "packet_denied", "acl") && field_str(e, "peer") == "plain"
    });

    let attacker = net.attacker.as_ref().expect("attacker namespace");
    let control = format!("192.168.{ATTACKER_LINK}.1:2222");
    let control_addr: SocketAddr = control.parse().unwrap();
    let _control = in_netns(&net.gw.name, move || {
        TcpListener::bind(control_addr).unwrap_or_else(|e| panic!("bind {control_addr}: {e}"))
    })
    .join()
    .expect("listener thread");
    if let Err(kind) = tcp_connect_from(&attacker.name, &control, Duration::from_secs(5)) {
        panic!(
            "the attacker cannot reach the gateway's underlay ({kind:?}): this test proves nothing"
        );
    }
    assert_unanswered(attacker, "the attacker on the underlay", API);
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// A 2 MB upload is refused with 413 as soon as its headers arrive (no body
/// byte sent), and 300 rapid requests from one site meet the rate limit: at
/// least one 429 with a `Retry-After` of whole seconds, after a burst that
/// passed; the site is served again once it waits that long.
#[test]
fn oversized_body_413_early_and_rapid_requests_429() {
    if !rig_ready("api_limits") || !tools_ready("api_limits", &["nft"]) {
        return;
    }
    let OpsRig {
        n: _n,
        net,
        mut gw,
        ops: _ops,
        token,
    } = OpsRig::start("ql");
    let ns = &net.sites[0];

    // The headers of a 2 MB POST, and not one byte of its body: the answer
    // must come anyway (TESTING.md: an answer racing the upload may be lost to
    // a reset, so the test sends nothing more).
    let declared = 2 * 1024 * 1024;
    let head = format!(
        "POST /v1/peers HTTP/1.1\r\nHost: {API}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    let (early, took) = in_netns(&ns.name, move || {
        let mut s = connect_api()?;
        let t0 = Instant::now();
        s.write_all(head.as_bytes())?;
        let a = read_answer(&mut BufReader::new(s))?;
        Ok::<_, io::Error>((a, t0.elapsed()))
    })
    .join()
    .expect("client thread")
    .unwrap_or_else(|e| {
        panic!(
            "no early answer to the headers of a {declared}-byte POST ({e}); gateway log:\n{}",
            gw.log_tail(30)
        )
    });
    eprintln!(
        "413: answered {:.1} ms after the headers",
        took.as_secs_f64() * 1e3
    );
    assert_error(&early, 413, &[&MAX_BODY.to_string()], "2 MB POST /v1/peers");
    let listed: Value = serde_json::from_str(&gw.cli_ok(&["peer", "list", "--json"])).unwrap();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "the refused upload issued a peer: {listed}"
    );

    // 300 requests as fast as one keep-alive connection carries them.
    let burst_token = token.clone();
    let (statuses, retry_after, limited, took) = in_netns(&ns.name, move || {
        let mut statuses = Vec::new();
        let mut retry_after = None;
        let mut limited = None;
        let mut conn: Option<BufReader<TcpStream>> = None;
        let t0 = Instant::now();
        for _ in 0..300 {
            let req = request("GET", "/v1/peers/ops", Some(&burst_token), None, false);
            let mut answer = None;
            for _attempt in 0..2 {
                if conn.is_none() {
                    conn = Some(BufReader::new(connect_api().expect("connect to the API")));
                }
                let c = conn.as_mut().unwrap();
                match c.get_mut().write_all(&req).and_then(|()| read_answer(c)) {
                    Ok(a) => {
                        if a.header("connection")
                            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                        {
                            conn = None;
                        }
                        answer = Some(a);
                        break;
                    }
                    // The server may close an idle keep-alive: reconnect once.
                    Err(_) => conn = None,
                }
            }
            let a = answer.expect("an answer within two connections");
            if a.status == 429 && retry_after.is_none() {
                retry_after = a.header("retry-after").map(str::to_string);
                limited = Some(a.status);
                assert_security_headers(&a, "429");
                assert!(a.error().contains("too many"), "{a:?}");
            }
            statuses.push(a.status);
        }
        (statuses, retry_after, limited, t0.elapsed())
    })
    .join()
    .expect("burst thread");
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let too_many = statuses.iter().filter(|&&s| s == 429).count();
    let first_429 = statuses.iter().position(|&s| s == 429);
    eprintln!(
        "rate limit: 300 requests in {:.2} s: {ok} × 200, {too_many} × 429, first 429 at #{:?}, Retry-After {retry_after:?}",
        took.as_secs_f64(),
        first_429.map(|i| i + 1)
    );
    assert_eq!(ok + too_many, 300, "other statuses among {statuses:?}");
    assert_eq!(limited, Some(429), "no 429 among 300 rapid requests");
    let first = first_429.unwrap();
    assert!(
        first >= 50,
        "limited after only {first} requests: the burst should pass ({statuses:?})"
    );
    let secs: u64 = retry_after
        .as_deref()
        .unwrap_or_else(|| panic!("429 without Retry-After"))
        .parse()
        .unwrap_or_else(|e| panic!("Retry-After {retry_after:?} is not whole seconds: {e}"));
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    // Waiting as told is enough.
    let wait = Duration::from_secs(secs) + Duration::from_millis(200);
    let waited = poll_until(wait + Duration::from_secs(2), || {
        try_call(ns, "GET", "/v1/status", Some(&token), None).is_ok_and(|a| a.status == 200)
    });
    assert!(waited, "still limited {wait:?} after the burst");
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// Bad input gets a JSON error naming the field or value and changes nothing:
/// a bad name → 400/422 naming `name`, an unknown field → 422, a wrong type →
/// 422, an unknown service → 422, malformed JSON → 400, a bad name in the path
/// → 400, an unknown peer → 404 (GET and DELETE), a taken name → 409.
#[test]
fn bad_requests_get_named_errors_and_change_nothing() {
    if !rig_ready("api_bad_input") || !tools_ready("api_bad_input", &["nft"]) {
        return;
    }
    let OpsRig {
        n: _n,
        net,
        mut gw,
        ops: _ops,
        token,
    } = OpsRig::start("qv");
    let ns = &net.sites[0];
    let peers_before = stored_peers(&gw);
    let audit_before = fs::read_to_string(audit_path(&gw)).unwrap_or_default();

    let post = |body: &str| call(ns, &gw, "POST", "/v1/peers", Some(&token), Some(body));
    let a = post(r#"{"name":"Bad Name"}"#);
    assert!(
        matches!(a.status, 400 | 422),
        "bad name: expected 400 or 422, got {a:?}"
    );
    assert_error(&a, a.status, &["name"], "POST a bad name");
    let a = post(r#"{"name":"good-name","colour":"red"}"#);
    assert_error(&a, 422, &["colour"], "POST an unknown field");
    let a = post(r#"{"name":5}"#);
    assert_error(&a, 422, &[], "POST a number as the name");
    let a = post(r#"{"name":"good-name","services":["no-such-service"]}"#);
    assert_error(&a, 422, &["services"], "POST an unknown service");
    let a = post(r#"{"name": "good-name""#);
    assert_error(&a, 400, &[], "POST malformed JSON");
    let a = post(r#"{"name":"ops"}"#);
    assert_error(&a, 409, &["ops"], "POST a taken name");

    let a = call(ns, &gw, "GET", "/v1/peers/NoSuch..", Some(&token), None);
    assert_error(&a, 400, &[], "GET a bad name in the path");
    let a = call(ns, &gw, "GET", "/v1/peers/nosuch", Some(&token), None);
    assert_error(&a, 404, &["nosuch"], "GET an unknown peer");
    let a = call(
        ns,
        &gw,
        "DELETE",
        "/v1/peers/nosuch",
        Some(&token),
        Some(r#"{"reason":"gone"}"#),
    );
    assert_error(&a, 404, &["nosuch"], "DELETE an unknown peer");

    assert_eq!(
        stored_peers(&gw),
        peers_before,
        "refused requests changed the store"
    );
    assert_eq!(
        fs::read_to_string(audit_path(&gw)).unwrap_or_default(),
        audit_before,
        "refused requests wrote to the audit log"
    );
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// `POST /v1/peers` issues a peer whose `config` brings a stock wg-quick site
/// up (DNS line stripped) that pings 10.8.0.1, with a `qr_svg` beside it;
/// `DELETE /v1/peers/{name}` with a reason cuts that live session within 1 s
/// (pings stop, `session_closed reason=revoked`), a second DELETE is 409;
/// both actions are in the audit chain with `actor = "api:ops"`, without the
/// issued secrets, and `sitegate audit verify` exits 0.
#[test]
fn issued_peer_connects_and_revoke_cuts_within_1s_audited() {
    if !rig_ready("api_issue_revoke") || !tools_ready("api_issue_revoke", &["nft"]) {
        return;
    }
    let n = names("qi");
    let net = Net::build(&n, 2, false);
    let mut gw = Gateway::init(&net.gw, &n.name("g"));
    let ops_conf = add_ops(&gw);
    gw.start();
    let _ops = site_with_api(&net.sites[0], &n.name("w1"), &ops_conf, &gw, "ops");
    let (ns_ops, ns_branch) = (&net.sites[0], &net.sites[1]);
    let token = read_token(&gw);

    let a = call(
        ns_ops,
        &gw,
        "POST",
        "/v1/peers",
        Some(&token),
        Some(r#"{"name":"branch"}"#),
    );
    expect_status(&a, 201, "POST /v1/peers branch");
    assert_security_headers(&a, "POST /v1/peers");
    let issued = a.json();
    assert_eq!(issued["peer"]["name"], "branch", "{issued}");
    assert_eq!(issued["peer"]["state"], "active", "{issued}");
    let config = issued["config"].as_str().expect("config text").to_string();
    assert!(
        config.contains("[Interface]")
            && config.contains("[Peer]")
            && config.contains("PrivateKey"),
        "issued config:\n{config}"
    );
    let qr = issued["qr_svg"].as_str().expect("qr_svg text");
    assert!(
        qr.starts_with("<?xml") || qr.starts_with("<svg"),
        "qr_svg is no SVG: {}",
        &qr[..qr.len().min(80)]
    );
    // The daemon has the peer before the site dials (a too-early dial is
    // refused and retried only 5 s later).
    let in_daemon = poll_until(Duration::from_secs(5), || {
        try_call(ns_ops, "GET", "/v1/status", Some(&token), None)
            .is_ok_and(|a| a.status == 200 && a.body.contains("\"branch\""))
    });
    assert!(
        in_daemon,
        "the daemon does not list branch; log:\n{}",
        gw.log_tail(30)
    );

    let branch = Site::up(ns_branch, &n.name("w2"), &config);
    assert!(
        ns_branch.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "the API-issued config does not connect; gateway log:\n{}",
        gw.log_tail(40)
    );
    let branch_key = branch.public_key();
    assert_eq!(issued["peer"]["public_key"], branch_key.as_str());

    let mut ping = Pinger::start(ns_branch, GATEWAY_TUNNEL_ADDR, "0.05", "branch");
    ping.wait_replies(20, Duration::from_secs(10));
    let started = now_unix();
    let a = call(
        ns_ops,
        &gw,
        "DELETE",
        "/v1/peers/branch",
        Some(&token),
        Some(r#"{"reason":"laptop lost"}"#),
    );
    let returned = now_unix();
    expect_status(&a, 200, "DELETE /v1/peers/branch");
    let revoked = a.json();
    assert_eq!(revoked["peer"]["state"], "revoked", "{revoked}");
    assert_eq!(
        revoked["peer"]["revoked_reason"], "laptop lost",
        "{revoked}"
    );
    let last = wait_silence(&ping, Duration::from_secs(5)).expect("branch had replies");
    let failed = ping
        .first_failed_sent(&last)
        .expect("ping reported the request after the last reply unanswered");
    eprintln!(
        "api revoke: request took {:.3} s; branch's last reply {:+.3} s after it started; \
         first unanswered ping sent {:+.3} s after it started",
        returned - started,
        last.at - started,
        failed - started
    );
    assert!(
        last.at - started < CUT_WITHIN_SECS && failed - started < CUT_WITHIN_SECS,
        "branch still answered {:.3} s after DELETE started",
        last.at - started
    );
    let closed = gw.wait_event(
        "session_closed reason=revoked",
        Duration::from_secs(2),
        |e| is_event(e, "session_closed", "revoked") && field_str(e, "peer") == "branch",
    );
    let closed_lag = event_time(&closed) - started;
    eprintln!("api revoke: session_closed logged {closed_lag:+.3} s after DELETE started");
    assert!(
        closed_lag < CUT_WITHIN_SECS,
        "session_closed {closed_lag:.3} s after DELETE"
    );
    let replies = ping.stop();
    assert!(
        replies.iter().all(|r| r.at <= last.at),
        "branch answered again after the cut"
    );
    let a = call(
        ns_ops,
        &gw,
        "DELETE",
        "/v1/peers/branch",
        Some(&token),
        None,
    );
    assert_error(&a, 409, &["branch"], "DELETE branch again");

    // The audit trail names the API caller.
    let records = audit_records(&gw);
    let find = |event: &str| {
        records
            .iter()
            .find(|r| r["event"] == event && r["peer"] == "branch")
            .unwrap_or_else(|| panic!("no {event} for branch in the audit log: {records:?}"))
    };
    let added = find("peer_added");
    assert_eq!(added["actor"], "api:ops", "{added}");
    assert_eq!(added["public_key"], branch_key.as_str(), "{added}");
    let gone = find("peer_revoked");
    assert_eq!(gone["actor"], "api:ops", "{gone}");
    assert_eq!(gone["reason"], "laptop lost", "{gone}");
    let audit_text = fs::read_to_string(audit_path(&gw)).unwrap();
    for key in ["PrivateKey", "PresharedKey"] {
        if let Some(secret) = conf_value(&config, key) {
            assert!(!audit_text.contains(&secret), "{key} in the audit log");
            assert!(!gw.log_text().contains(&secret), "{key} in the gateway log");
        }
    }
    let (code, out) = audit_verify(&gw, None);
    assert_eq!(code, 0, "audit verify: {out}");
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// A self-signed P-256 certificate for 10.8.0.1 (`CN` and `subjectAltName`)
/// valid one day, as `DIR/STEM.crt` and `DIR/STEM.key` (mode 0600).
fn self_signed(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args([
                "-nodes",
                "-subj",
                "/CN=10.8.0.1",
                "-addext",
                "subjectAltName=IP:10.8.0.1",
            ])
            .args(["-days", "1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null()),
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod key");
    (cert, key)
}

/// The `[api]` lines naming a certificate and a key (either may be absent).
fn tls_lines(cert: Option<&Path>, key: Option<&Path>) -> String {
    let mut s = String::from("[api]\n");
    if let Some(c) = cert {
        s.push_str(&format!("tls_cert_file = \"{}\"\n", c.display()));
    }
    if let Some(k) = key {
        s.push_str(&format!("tls_key_file = \"{}\"\n", k.display()));
    }
    s
}

/// With `[api] tls_cert_file`/`tls_key_file` the API speaks HTTPS: curl
/// trusting that certificate gets `/healthz` and, with the token,
/// `/v1/status`, each with `Strict-Transport-Security` beside the other
/// headers; plain HTTP to the same port gets no HTTP answer.
#[test]
fn tls_serves_https_with_hsts_and_refuses_plain_http() {
    if !rig_ready("api_tls") || !tools_ready("api_tls", &["nft", "curl", "openssl"]) {
        return;
    }
    let n = names("qt");
    let net = Net::build(&n, 1, false);
    let mut gw = Gateway::init(&net.gw, &n.name("g"));
    let ops_conf = add_ops(&gw);
    let (cert, key) = self_signed(&gw.dir.path, "api");
    gw.edit_config("[api]\n", &tls_lines(Some(&cert), Some(&key)));
    gw.start();
    let _ops = site_with_api(&net.sites[0], &n.name("w1"), &ops_conf, &gw, "ops");
    let ns = &net.sites[0];
    let token = read_token(&gw);
    gw.wait_event("api_listening tls=true", Duration::from_secs(5), |e| {
        field_str(e, "event") == "api_listening" && field(e, "tls") == Some(&Value::Bool(true))
    });

    let curl = |path: &str, auth: Option<&str>| {
        let mut args = vec![
            "curl".to_string(),
            "-sS".into(),
            "--max-time".into(),
            "10".into(),
            "--cacert".into(),
            cert.display().to_string(),
            "-i".into(),
            format!("https://{API}{path}"),
        ];
        if let Some(t) = auth {
            args.extend(["-H".into(), format!("Authorization: Bearer {t}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&mut ns.cmd(&args));
        assert!(
            out.status.success(),
            "curl https://{API}{path} failed ({}): {}\ngateway log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            gw.log_tail(20)
        );
        read_answer(&mut out.stdout.as_slice())
            .unwrap_or_else(|e| panic!("curl -i output unreadable ({e})"))
    };
    for (path, auth) in [("/healthz", None), ("/v1/status", Some(token.as_str()))] {
        let a = curl(path, auth);
        expect_status(&a, 200, &format!("https GET {path}"));
        assert_security_headers(&a, &format!("https GET {path}"));
        assert_eq!(
            a.header("strict-transport-security"),
            Some("max-age=31536000"),
            "https GET {path}: {a:?}"
        );
    }
    let a = curl("/v1/status", None);
    assert_error(&a, 401, &[], "https GET /v1/status without a token");
    assert!(a.header("strict-transport-security").is_some(), "{a:?}");

    // Plain HTTP to the TLS port: no HTTP answer from our client nor curl.
    let plain = try_call(ns, "GET", "/healthz", None, None);
    assert!(
        plain.is_err(),
        "plain HTTP answered on the TLS port: {plain:?}"
    );
    let out = run(&mut ns.cmd(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        &format!("http://{API}/healthz"),
    ]));
    assert!(
        !out.status.success(),
        "curl http:// to the TLS port succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// Runs `sitegate run` in `ns` expecting a refusal: returns its exit code and
/// stderr; panics (after killing it) if it is still running after 20 s.
fn run_refused(ns: &Netns, gw: &Gateway, what: &str) -> (i32, String) {
    let err_path = gw.dir.path.join("refused.stderr");
    let err = fs::File::create(&err_path).expect("create stderr file");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, sitegate_bin(), "--config"])
        .arg(&gw.config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn sitegate run");
    let mut status = None;
    poll_until(Duration::from_secs(20), || {
        status = child.try_wait().expect("wait for run");
        status.is_some()
    });
    let text = fs::read_to_string(&err_path).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what}: `run` did not refuse, still running after 20 s:\n{text}");
    };
    (status.code().unwrap_or(-1), text)
}

/// Bad `[api]` settings each stop `run` with an error naming the key, and
/// lose nothing: a token file readable by others (`api.token_file`, mode
/// 0644), a token under 16 characters, a certificate without a key (config
/// validation, `api.tls_key_file`), a key that does not fit the certificate,
/// a key or a certificate that is not PEM, a TLS key readable by others. After
/// each, the store, the audit chain and the token are as before, no
/// interface, firewall table or socket is left, and the restored config runs.
#[test]
fn bad_api_config_refused_at_run_naming_the_key() {
    if !rig_ready("api_config") || !tools_ready("api_config", &["nft", "openssl"]) {
        return;
    }
    let n = names("qc");
    let net = Net::build(&n, 0, false);
    let mut gw = Gateway::init(&net.gw, &n.name("g"));
    add_ops(&gw);
    let dir = gw.dir.path.clone();
    let (cert, key) = self_signed(&dir, "api");
    let (_other_cert, other_key) = self_signed(&dir, "other");
    let not_pem = dir.join("not-pem.key");
    fs::write(&not_pem, "this is not a PEM file\n").unwrap();
    fs::set_permissions(&not_pem, fs::Permissions::from_mode(0o600)).unwrap();
    let open_key = dir.join("open.key");
    fs::copy(&key, &open_key).unwrap();
    fs::set_permissions(&open_key, fs::Permissions::from_mode(0o644)).unwrap();
    let token_file = token_path(&gw);
    let token = fs::read(&token_file).unwrap();
    let config = fs::read_to_string(&gw.config).unwrap();
    let peers = gw.cli_ok(&["peer", "list", "--json"]);
    let audit = fs::read_to_string(audit_path(&gw)).unwrap_or_default();
    let sockets = [
        format!("/var/run/wireguard/{}.sock", gw.ifname),
        format!("/run/sitegate/{}.sock", gw.ifname),
    ];

    type Setup<'a> = Box<dyn Fn() + 'a>;
    let with_tls = |c: Option<&Path>, k: Option<&Path>| {
        fs::write(&gw.config, config.replacen("[api]\n", &tls_lines(c, k), 1)).unwrap();
    };
    let cases: Vec<(&str, Setup, &[&str])> = vec![
        (
            "token file mode 0644",
            Box::new(|| {
                fs::set_permissions(&token_file, fs::Permissions::from_mode(0o644)).unwrap()
            }),
            &["api.token_file", "0644"],
        ),
        (
            "token of 11 characters",
            Box::new(|| fs::write(&token_file, "short-token\n").unwrap()),
            &["api.token_file", "shorter than 16"],
        ),
        (
            "tls_cert_file without tls_key_file",
            Box::new(|| with_tls(Some(&cert), None)),
            &["api.tls_key_file"],
        ),
        (
            "a key that does not fit the certificate",
            Box::new(|| with_tls(Some(&cert), Some(&other_key))),
            &["api.tls_key_file", "api.tls_cert_file", "does not fit"],
        ),
        (
            "a key that is not PEM",
            Box::new(|| with_tls(Some(&cert), Some(&not_pem))),
            &["api.tls_key_file"],
        ),
        (
            "a certificate that is not PEM",
            Box::new(|| with_tls(Some(&not_pem), Some(&key))),
            &["api.tls_cert_file"],
        ),
        (
            "a TLS key readable by others",
            Box::new(|| with_tls(Some(&cert), Some(&open_key))),
            &["api.tls_key_file", "0644"],
        ),
    ];
    for (what, setup, needles) in &cases {
        setup();
        let t0 = Instant::now();
        let (code, err) = run_refused(&net.gw, &gw, what);
        let said = err
            .lines()
            .filter(|l| l.starts_with("error"))
            .collect::<Vec<_>>();
        eprintln!(
            "{what}: refused in {:.2} s: {}",
            t0.elapsed().as_secs_f64(),
            said.join(" | ")
        );
        assert_ne!(code, 0, "{what}: `run` exited 0:\n{err}");
        for needle in *needles {
            assert!(
                err.contains(needle),
                "{what}: the refusal does not name `{needle}`:\n{err}"
            );
        }
        assert!(
            !err.contains(&String::from_utf8_lossy(&token).trim().to_string()),
            "{what}: the token in stderr"
        );

        // Restore, then check that nothing was lost or left behind.
        fs::write(&gw.config, &config).unwrap();
        fs::write(&token_file, &token).unwrap();
        fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            gw.cli_ok(&["peer", "list", "--json"]),
            peers,
            "{what}: the store changed"
        );
        let now = fs::read_to_string(audit_path(&gw)).unwrap_or_default();
        assert!(now.starts_with(&audit), "{what}: the audit log lost lines");
        let (code, out) = audit_verify(&gw, None);
        assert_eq!(code, 0, "{what}: audit verify: {out}");
        assert!(
            !link_exists(&net.gw.name, &gw.ifname),
            "{what}: the TUN device was left"
        );
        assert!(
            !net.gw
                .succeeds(&["nft", "list", "table", "inet", "sitegate"]),
            "{what}: the firewall table was left"
        );
        for sock in &sockets {
            assert!(!Path::new(sock).exists(), "{what}: {sock} was left");
        }
    }

    // The restored config starts and serves the API port.
    drop(cases);
    gw.start();
    gw.wait_event("api_listening", Duration::from_secs(5), |e| {
        field_str(e, "event") == "api_listening"
    });
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}

/// `GET /metrics` is Prometheus text for an admin with the token (with
/// `sitegate_handshakes_total`, the ops site having handshaken, and the
/// gateway-wide send and TUN write failure counters) and 401
/// without the token.
#[test]
fn metrics_need_the_token() {
    if !rig_ready("api_metrics") || !tools_ready("api_metrics", &["nft"]) {
        return;
    }
    let OpsRig {
        n: _n,
        net,
        mut gw,
        ops: _ops,
        token,
    } = OpsRig::start("qm");
    let ns = &net.sites[0];

    let a = call(ns, &gw, "GET", "/metrics", Some(&token), None);
    expect_status(&a, 200, "GET /metrics");
    assert_security_headers(&a, "GET /metrics");
    assert!(
        a.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "metrics content type: {a:?}"
    );
    // The ops site's handshake is counted under its name.
    let handshakes = a
        .body
        .lines()
        .find_map(|l| l.strip_prefix("sitegate_handshakes_total{peer=\"ops\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no sitegate_handshakes_total for ops in:\n{}", a.body));
    assert!(handshakes >= 1.0, "ops handshook, yet {handshakes} counted");
    // The data plane's output failures are served as gateway-wide counters.
    for name in [
        "sitegate_udp_send_errors_total",
        "sitegate_tun_write_errors_total",
    ] {
        let value = a
            .body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert!(value.is_some(), "no {name} in:\n{}", a.body);
    }
    let a = call(ns, &gw, "GET", "/metrics", None, None);
    assert_error(&a, 401, &[], "GET /metrics without a token");
    assert_eq!(a.header("www-authenticate"), Some("Bearer"), "{a:?}");
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));
}
