//! The web admin page in a real browser: Debian's `chromium`, headless, runs in
//! a site namespace whose only way to the gateway is a stock wg-quick +
//! wireguard-go tunnel as an admin peer, and drives the page that `sitegate
//! run` serves on its tunnel address over the DevTools protocol
//! (`headless_chrome`).
//!
//! ```text
//!  site ns: chromium ── wg-quick (admin1, --admin --service api) ══UDP══ gateway ns: sitegate run
//!           http://10.8.0.1:8443/  (tunnel only: the API listens on the TUN address)
//! ```
//!
//! Needs root, `/dev/net/tun`, wireguard-go, wireguard-tools and chromium; without
//! them the test prints a skip note, except under `CI=true`, where it fails.
//! Screenshots go to `target/browser/` (kept after the run for a person to look at).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use headless_chrome::protocol::cdp::types::Event;
use headless_chrome::protocol::cdp::{Browser as CdpBrowser, Emulation, Page};
use headless_chrome::{Browser, LaunchOptions, Tab};
use serde_json::Value;

/// Where the page is served: the `[api] listen` that `init` writes.
const API_ADDR: &str = "10.8.0.1:8443";
/// How long one step in the page (a click's effect, an API round trip) may take.
const STEP: Duration = Duration::from_secs(15);
/// The desktop and phone viewports of the screenshots.
const DESKTOP: (u32, u32) = (1280, 860);
const PHONE: (u32, u32) = (390, 844);
/// The peer the test issues and revokes through the page.
const ISSUED: &str = "clinic-b";

/// What the browser part hands back to the main thread.
struct PageRun {
    /// Console errors, uncaught exceptions and CSP reports seen by the page.
    problems: Vec<String>,
    /// The config text the page showed for the issued peer.
    config: String,
    /// Each step and when it finished, for the timing note.
    steps: Vec<(String, Duration)>,
}

/// Logs in with the API token, issues a peer (config text, QR code and `.conf`
/// download shown), sees it in the live list, rotates its key, revokes it
/// through the confirmation dialog and sees it revoked; the token is never a
/// cookie, and the page runs under the server's CSP without a violation or a
/// script error.
#[test]
fn admin_page_issues_lists_and_revokes() {
    if !rig_ready("browser") || !tools_ready("browser", &["chromium"]) {
        return;
    }
    let started = Instant::now();
    let n = names("wb");
    let gw_ns = Netns::new(&n.netns("gw"));
    let site_ns = Netns::new(&n.netns("s1"));
    Underlay::attach(&n, &gw_ns, &site_ns, 1);
    let mut gw = Gateway::init(&gw_ns, &n.name("g"));
    let admin_conf = gw.add_peer_with("admin1", &["--admin", "--service", "api"]);
    gw.start();
    let _site = Site::up(&site_ns, &n.name("w1"), &admin_conf);
    assert!(
        site_ns.ping_until(GATEWAY_TUNNEL_ADDR, CONNECT_DEADLINE),
        "the admin site cannot ping {GATEWAY_TUNNEL_ADDR}; gateway log:\n{}",
        gw.log_tail(40)
    );
    let ns = site_ns.name.clone();
    let mut health = String::new();
    let api_up = poll_until(STEP, || {
        health = http_get_from(&ns, "/healthz");
        health.starts_with("HTTP/1.1 200")
    });
    assert!(
        api_up,
        "GET /healthz through the tunnel did not answer 200 within {STEP:?}: {health:?}; gateway log:\n{}",
        gw.log_tail(40)
    );
    let tunnel_ready = started.elapsed();

    let token = api_token(&gw);
    let shots = screenshot_dir();
    let downloads = gw.dir.path.join("downloads");
    fs::create_dir_all(&downloads).expect("create download dir");
    let run = {
        let (token, shots, downloads) = (token.clone(), shots.clone(), downloads.clone());
        let url = format!("http://{API_ADDR}/");
        in_netns(&site_ns.name, move || {
            drive_page(&url, &token, &shots, &downloads)
        })
        .join()
        .unwrap_or_else(|e| {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "the browser part failed: {msg}\ngateway log:\n{}",
                gw.log_tail(40)
            )
        })
    };

    // The page's view agrees with the registry.
    let show = gw.cli_ok(&["peer", "show", ISSUED, "--json"]);
    let peer: Value = serde_json::from_str(&show).expect("peer show --json");
    assert_eq!(
        peer["state"], "revoked",
        "registry after the page revoked: {peer}"
    );
    assert_eq!(
        peer["revoked_reason"], "lost laptop (browser test)",
        "the reason typed in the dialog reaches the registry: {peer}"
    );
    // A revoked peer's address moves to `former_addresses`.
    let shown = conf_value(&run.config, "Address")
        .and_then(|a| a.split('/').next().map(str::to_string))
        .unwrap_or_default();
    let issued: Vec<&str> = ["addresses", "former_addresses"]
        .iter()
        .filter_map(|k| peer[k].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        issued.contains(&shown.as_str()),
        "the config shown (Address {shown}) is not the issued peer's ({issued:?}):\n{}",
        run.config
    );
    // The downloaded .conf is the config shown.
    let conf_file = downloads.join(format!("{ISSUED}.conf"));
    assert_eq!(
        fs::read_to_string(&conf_file)
            .unwrap_or_else(|e| panic!("read {}: {e}", conf_file.display())),
        run.config,
        "the .conf download differs from the config shown"
    );
    assert!(
        run.problems.is_empty(),
        "the page logged errors (CSP violations, exceptions):\n{}",
        run.problems.join("\n")
    );
    assert!(gw.is_running(), "gateway died; log:\n{}", gw.log_tail(40));

    eprintln!(
        "browser test: tunnel and API up after {:.1} s; page steps:",
        tunnel_ready.as_secs_f64()
    );
    for (step, at) in &run.steps {
        eprintln!("  {:>6.2} s  {step}", at.as_secs_f64());
    }
    eprintln!(
        "  total {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        shots.display()
    );
}

/// The browser session, run on a thread inside the site namespace (chromium
/// inherits it, and the DevTools socket to `127.0.0.1` is the namespace's own).
fn drive_page(url: &str, token: &str, shots: &Path, downloads: &Path) -> PageRun {
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let mut step = |what: &str| steps.push((what.to_string(), t0.elapsed()));

    let browser = Browser::new(LaunchOptions {
        path: Some(PathBuf::from(chromium_path())),
        headless: true,
        // Root in a namespace: chromium's sandbox needs user namespaces it
        // cannot have here (TESTING.md).
        sandbox: false,
        window_size: Some(DESKTOP),
        idle_browser_timeout: Duration::from_secs(120),
        args: vec![
            std::ffi::OsStr::new("--disable-gpu"),
            std::ffi::OsStr::new("--no-proxy-server"),
            std::ffi::OsStr::new("--lang=en-US"),
        ],
        ..LaunchOptions::default()
    })
    .expect("launch chromium");
    let tab = browser.new_tab().expect("open a tab");
    tab.set_default_timeout(STEP);
    step("chromium started");

    let problems = Arc::new(Mutex::new(Vec::new()));
    {
        let problems = problems.clone();
        tab.enable_log().expect("Log.enable");
        tab.enable_runtime().expect("Runtime.enable");
        tab.add_event_listener(Arc::new(move |ev: &Event| {
            let msg = match ev {
                Event::LogEntryAdded(e) => {
                    let entry = &e.params.entry;
                    format!(
                        "{:?} {:?}: {} ({})",
                        entry.source,
                        entry.level,
                        entry.text,
                        entry.url.as_deref().unwrap_or("")
                    )
                }
                Event::RuntimeExceptionThrown(e) => {
                    let d = &e.params.exception_details;
                    format!(
                        "exception at {}:{}: {} {:?}",
                        d.line_number,
                        d.column_number,
                        d.text,
                        d.exception.as_ref().and_then(|x| x.description.clone())
                    )
                }
                _ => return,
            };
            // The gateway answers the wrong token of the login check with
            // 401, which chromium logs as a failed resource load: expected.
            if msg.contains("401") {
                return;
            }
            problems.lock().expect("problems lock").push(msg);
        }))
        .expect("listen to page events");
    }
    tab.call_method(CdpBrowser::SetDownloadBehavior {
        behavior: CdpBrowser::SetDownloadBehaviorBehaviorOption::Allow,
        browser_context_id: None,
        download_path: Some(downloads.display().to_string()),
        events_enabled: None,
    })
    .expect("Browser.setDownloadBehavior");

    tab.navigate_to(url)
        .and_then(|t| t.wait_until_navigated())
        .unwrap_or_else(|e| panic!("open {url}: {e}"));
    wait_js(
        &tab,
        "document.body.dataset.ready === '1'",
        "the page script ran",
    );
    // The page is served under the strict CSP (the page's own fetch may read
    // its headers: connect-src 'self').
    let csp = js_async(
        &tab,
        "fetch('/', {cache: 'no-store'}).then(r => r.headers.get('content-security-policy'))",
    );
    assert!(
        csp.as_str()
            .is_some_and(|c| c.contains("default-src 'none'")
                && c.contains("script-src 'self'")
                && !c.contains("unsafe-inline")),
        "GET / without a strict Content-Security-Policy: {csp}"
    );
    assert!(
        is_true(&tab, "!document.getElementById('login-view').hidden"),
        "the login form is not shown to a fresh tab"
    );
    screenshot(&tab, shots, "01-login");
    step("page loaded, login form shown");

    // A wrong token is refused with a message, and stays out of storage.
    paste_into(&tab, "#token", "not-the-token");
    click(&tab, "#login-submit");
    wait_js(
        &tab,
        "!document.getElementById('login-error').hidden && \
         document.getElementById('login-error').textContent.includes('401')",
        "the login error for a wrong token",
    );
    assert!(
        is_true(&tab, "sessionStorage.getItem('sitegate.token') === null"),
        "a refused token stayed in session storage"
    );
    step("wrong token refused (401 shown)");

    paste_into(&tab, "#token", token);
    click(&tab, "#login-submit");
    wait_js(
        &tab,
        "!document.getElementById('app-view').hidden && \
         document.querySelector('tr[data-peer=\"admin1\"][data-state=\"active\"]') !== null",
        "the peer list with admin1 active",
    );
    // The token: in this tab's session storage, never in a cookie.
    assert_eq!(
        js(&tab, "document.cookie"),
        Value::String(String::new()),
        "document.cookie is not empty"
    );
    let cookies = tab.get_cookies().expect("Network.getCookies");
    assert!(cookies.is_empty(), "the browser holds cookies: {cookies:?}");
    assert_eq!(
        js(&tab, "sessionStorage.getItem('sitegate.token')"),
        Value::String(token.to_string()),
        "the token is not in session storage"
    );
    assert!(
        is_true(&tab, "localStorage.length === 0"),
        "the page wrote to local storage"
    );
    // admin1's live state: its session is up, so its endpoint shows.
    wait_js(
        &tab,
        "(document.querySelector('tr[data-peer=\"admin1\"] td[data-col=\"endpoint\"]') || {})\
         .textContent.startsWith('192.168.1.2:')",
        "admin1's live endpoint",
    );
    screenshot(&tab, shots, "02-list");
    step("logged in, peer list with admin1 live");

    // Issue a peer: the config, its QR code and a .conf download.
    type_into(&tab, "#issue-name", ISSUED);
    type_into(&tab, "#issue-services", "sftp");
    type_into(&tab, "#issue-expires", "30d");
    click(&tab, "#issue-submit");
    wait_js(
        &tab,
        "document.getElementById('config-dialog').open && \
         document.getElementById('config-text').value.includes('[Peer]')",
        "the config dialog of the issued peer",
    );
    let config = js(&tab, "document.getElementById('config-text').value")
        .as_str()
        .unwrap_or_default()
        .to_string();
    for needle in ["PrivateKey", "PresharedKey", "AllowedIPs = 0.0.0.0/0, ::/0"] {
        assert!(
            config.contains(needle),
            "the config shown lacks {needle}:\n{config}"
        );
    }
    wait_js(
        &tab,
        "(() => { const i = document.getElementById('config-qr'); \
           return i.complete && i.naturalWidth > 0 && i.src.startsWith('data:image/svg+xml;base64,'); })()",
        "the QR code image decoded",
    );
    assert_eq!(
        js(
            &tab,
            "[document.getElementById('config-download').getAttribute('download'), \
              document.getElementById('config-download').href.slice(0, 5)]"
        ),
        serde_json::json!([format!("{ISSUED}.conf"), "blob:"]),
        "the download link"
    );
    // The new peer appears in the list behind the dialog.
    wait_js(
        &tab,
        &format!(
            "document.querySelector('tr[data-peer=\"{ISSUED}\"][data-state=\"active\"]') !== null"
        ),
        "the issued peer in the list",
    );
    screenshot(&tab, shots, "03-issued-config-qr");
    click(&tab, "#config-download");
    let conf_file = downloads.join(format!("{ISSUED}.conf"));
    assert!(
        poll_until(STEP, || fs::read_to_string(&conf_file)
            .map(|t| t == config)
            .unwrap_or(false)),
        "the .conf download did not arrive in {} (CSP or blob: URL blocked?)",
        downloads.display()
    );
    step("peer issued: config, QR code, .conf downloaded");

    // Escape closes the dialog, and the page forgets the private key.
    tab.press_key("Escape").expect("press Escape");
    wait_js(
        &tab,
        "!document.getElementById('config-dialog').open && \
         document.getElementById('config-text').value === ''",
        "Escape closes the config dialog and clears it",
    );

    // The filter narrows the list.
    type_into(&tab, "#filter", "clinic");
    wait_js(
        &tab,
        &format!(
            "document.querySelector('tr[data-peer=\"admin1\"]') === null && \
             document.querySelector('tr[data-peer=\"{ISSUED}\"]') !== null"
        ),
        "the filter shows only the clinic",
    );
    js(
        &tab,
        "(() => { const f = document.getElementById('filter'); f.value = ''; \
           f.dispatchEvent(new Event('input')); return true; })()",
    );
    screenshot(&tab, shots, "04-list-issued");
    step("Escape closed the dialog; filter works");

    // Rotate through its confirmation: a new config, shown the same way.
    click(
        &tab,
        &format!("tr[data-peer=\"{ISSUED}\"] button[data-action=\"rotate\"]"),
    );
    wait_js(
        &tab,
        "document.getElementById('confirm-dialog').open && \
         document.getElementById('confirm-dialog').dataset.action === 'rotate'",
        "the rotate confirmation",
    );
    click(&tab, "#confirm-ok");
    wait_js(
        &tab,
        "document.getElementById('config-dialog').open && \
         document.getElementById('config-text').value.includes('[Peer]')",
        "the config dialog after rotate",
    );
    let rotated = js(&tab, "document.getElementById('config-text').value")
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        conf_value(&rotated, "PrivateKey").is_some()
            && conf_value(&rotated, "PrivateKey") != conf_value(&config, "PrivateKey"),
        "rotate showed no new private key:\n{rotated}"
    );
    click(&tab, "#config-close");
    wait_js(
        &tab,
        "!document.getElementById('config-dialog').open",
        "Close closes the config dialog",
    );
    step("key rotated: new config shown");

    // Revoke through the confirmation dialog, with a reason.
    click(
        &tab,
        &format!("tr[data-peer=\"{ISSUED}\"] button[data-action=\"revoke\"]"),
    );
    wait_js(
        &tab,
        "document.getElementById('confirm-dialog').open && \
         document.getElementById('confirm-dialog').dataset.action === 'revoke'",
        "the revoke confirmation",
    );
    assert!(
        is_true(
            &tab,
            &format!(
                "document.querySelector('tr[data-peer=\"{ISSUED}\"]').dataset.state === 'active'"
            ),
        ),
        "the peer changed before the confirmation"
    );
    paste_into(&tab, "#confirm-reason", "lost laptop (browser test)");
    screenshot(&tab, shots, "05-revoke-confirm");
    click(&tab, "#confirm-ok");
    wait_js(
        &tab,
        &format!(
            "!document.getElementById('confirm-dialog').open && \
             document.querySelector('tr[data-peer=\"{ISSUED}\"][data-state=\"revoked\"]') !== null && \
             document.querySelector('tr[data-peer=\"{ISSUED}\"] button[data-action]') === null"
        ),
        "the peer shown revoked",
    );
    assert_eq!(
        js(
            &tab,
            &format!(
                "document.querySelector('tr[data-peer=\"{ISSUED}\"] [data-reason]').textContent"
            )
        )
        .as_str()
        .map(|t| t.ends_with(": lost laptop (browser test)")),
        Some(true),
        "the revoked row shows the reason"
    );
    screenshot(&tab, shots, "06-revoked");
    step("peer revoked through the confirmation");

    // The same list at phone width.
    tab.call_method(Emulation::SetDeviceMetricsOverride {
        width: PHONE.0,
        height: PHONE.1,
        device_scale_factor: 2.0,
        mobile: true,
        scale: None,
        screen_width: None,
        screen_height: None,
        position_x: None,
        position_y: None,
        dont_set_visible_size: None,
        screen_orientation: None,
        viewport: None,
        display_feature: None,
        device_posture: None,
    })
    .expect("Emulation.setDeviceMetricsOverride");
    wait_js(
        &tab,
        &format!("window.innerWidth === {}", PHONE.0),
        "the phone viewport",
    );
    js(
        &tab,
        "(() => { document.getElementById('peers-title').scrollIntoView(); return true; })()",
    );
    wait_js(
        &tab,
        "window.scrollY > 0",
        "the phone view scrolled to the peer list",
    );
    screenshot(&tab, shots, "07-phone-list");

    // Logging out forgets the token.
    click(&tab, "#logout");
    wait_js(
        &tab,
        "!document.getElementById('login-view').hidden && sessionStorage.getItem('sitegate.token') === null",
        "logout clears the token",
    );
    step("phone layout shot; logged out");

    let problems = problems.lock().expect("problems lock").clone();
    PageRun {
        problems,
        config,
        steps,
    }
}

/// `chromium` from `PATH` (Debian's wrapper script).
fn chromium_path() -> String {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("chromium"))
                .find(|c| c.is_file())
        })
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "chromium".to_string())
}

/// `target/browser/`, created if needed.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("browser");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// The API token `init` wrote: the trimmed contents of `[api] token_file`.
fn api_token(gw: &Gateway) -> String {
    let text = fs::read_to_string(&gw.config).expect("read config");
    let cfg: toml::Value = toml::from_str(&text).expect("parse config");
    let path = cfg["api"]["token_file"]
        .as_str()
        .expect("[api] token_file in the config init wrote");
    let token = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let token = token.trim().to_string();
    assert!(!token.is_empty(), "empty API token in {path}");
    token
}

/// A plain `GET PATH` to the API from namespace `ns`: the raw response, or the
/// error as text.
fn http_get_from(ns: &str, path: &str) -> String {
    let addr: SocketAddr = API_ADDR.parse().expect("API address");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {API_ADDR}\r\nConnection: close\r\n\r\n");
    in_netns(ns, move || {
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => s,
            Err(e) => return format!("connect: {e}"),
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if let Err(e) = s.write_all(req.as_bytes()) {
            return format!("send: {e}");
        }
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) => out,
            Err(e) => format!("receive: {e} (after {out:?})"),
        }
    })
    .join()
    .expect("http thread")
}

/// Evaluates `expr` in the page and returns its value (through JSON, so
/// objects and arrays come back whole).
fn js(tab: &Tab, expr: &str) -> Value {
    let wrapped = format!("JSON.stringify({expr})");
    let r = tab
        .evaluate(&wrapped, false)
        .unwrap_or_else(|e| panic!("evaluate {expr}: {e}"));
    match r.value {
        Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// Like [`js`] for an expression that yields a promise: its resolved value.
fn js_async(tab: &Tab, expr: &str) -> Value {
    let wrapped = format!("Promise.resolve({expr}).then(v => JSON.stringify(v))");
    let r = tab
        .evaluate(&wrapped, true)
        .unwrap_or_else(|e| panic!("evaluate {expr}: {e}"));
    match r.value {
        Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn is_true(tab: &Tab, expr: &str) -> bool {
    js(tab, expr) == Value::Bool(true)
}

/// Waits until `expr` is true in the page; panics naming `what`, with the
/// page's visible error messages.
fn wait_js(tab: &Tab, expr: &str, what: &str) {
    if !poll_until(STEP, || is_true(tab, expr)) {
        let errors = js(
            tab,
            "['login-error', 'error-text'].map(id => (document.getElementById(id) || {}).textContent)",
        );
        panic!("{what}: not within {STEP:?} ({expr}); page messages: {errors}");
    }
}

fn click(tab: &Tab, selector: &str) {
    tab.wait_for_element(selector)
        .and_then(|e| e.click().map(|_| ()))
        .unwrap_or_else(|e| panic!("click {selector}: {e}"));
}

/// Clears the field `selector` and types `text` into it as key strokes.
fn type_into(tab: &Tab, selector: &str, text: &str) {
    let el = tab
        .wait_for_element(selector)
        .unwrap_or_else(|e| panic!("find {selector}: {e}"));
    el.call_js_fn("function () { this.value = ''; }", vec![], false)
        .unwrap_or_else(|e| panic!("clear {selector}: {e}"));
    el.type_into(text)
        .unwrap_or_else(|e| panic!("type into {selector}: {e}"));
}

/// Clears the field `selector`, clicks it and inserts `text` at once, as a
/// paste does (key strokes cost two DevTools round trips per character).
fn paste_into(tab: &Tab, selector: &str, text: &str) {
    let el = tab
        .wait_for_element(selector)
        .unwrap_or_else(|e| panic!("find {selector}: {e}"));
    el.call_js_fn("function () { this.value = ''; }", vec![], false)
        .unwrap_or_else(|e| panic!("clear {selector}: {e}"));
    el.click()
        .and_then(|_| tab.send_character(text))
        .unwrap_or_else(|e| panic!("paste into {selector}: {e}"));
}

/// Saves a PNG of the viewport as `target/browser/NAME.png`.
fn screenshot(tab: &Tab, dir: &Path, name: &str) {
    let png = tab
        .capture_screenshot(Page::CaptureScreenshotFormatOption::Png, None, None, true)
        .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
    let path = dir.join(format!("{name}.png"));
    fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
