// sitegate admin page. Plain JavaScript, no framework, nothing loaded from
// elsewhere: the gateway embeds this file and serves it under a strict CSP
// (script-src 'self', no inline code, no eval).
//
// Rules this file keeps:
// - The API token lives in sessionStorage (this tab only) and is sent only as
//   `Authorization: Bearer`; never a cookie, never in a URL.
// - Text from the server or the user goes into the DOM with textContent or
//   attribute setters, never as HTML. The QR code (an SVG string) is shown as
//   an <img> with a data: URL, which renders it as an image without scripts.
"use strict";

(function () {
  const TOKEN_KEY = "sitegate.token";
  const REFRESH_MS = 5000;

  const $ = (id) => document.getElementById(id);

  const state = {
    peers: [],
    timer: null,
    loading: false,
    downloadUrl: null,
    confirmAction: null,
  };

  // ---- token -------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  // ---- API ---------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // Calls the API with the bearer token. Resolves to the parsed JSON body;
  // rejects with an ApiError carrying the server's `error` sentence. A 401
  // ends the session and returns to the login form.
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    const init = { method, headers, credentials: "omit", cache: "no-store", redirect: "error" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "The gateway did not answer (" + e.message + "). Is the tunnel up?");
    }
    let data = null;
    const text = await resp.text();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (e) {
        data = null;
      }
    }
    if (resp.ok) return data;
    let msg = data && typeof data.error === "string" ? data.error : resp.status + " " + resp.statusText;
    if (resp.status === 401) {
      endSession("The gateway did not accept the token (401).");
      msg = "The gateway did not accept the token.";
    } else if (resp.status === 403) {
      msg = "Forbidden (403): " + msg;
    } else if (resp.status === 429) {
      const wait = resp.headers.get("Retry-After");
      msg = "Too many requests (429)" + (wait ? ": try again in " + wait + " s." : ".");
    }
    throw new ApiError(resp.status, msg);
  }

  // ---- messages ----------------------------------------------------------

  function showError(msg) {
    $("error-text").textContent = msg;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  let noticeTimer = null;
  function showNotice(msg) {
    const n = $("notice");
    n.textContent = msg;
    n.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => {
      n.hidden = true;
    }, 8000);
  }

  // ---- formatting --------------------------------------------------------

  function isoTime(secs) {
    return new Date(secs * 1000).toISOString().replace(".000Z", "Z");
  }

  function ago(secs) {
    const d = Math.round(Date.now() / 1000 - secs);
    const future = d < 0;
    const a = Math.abs(d);
    let s;
    if (a < 5) return "just now";
    if (a < 60) s = a + " s";
    else if (a < 3600) s = Math.floor(a / 60) + " min";
    else if (a < 86400) s = Math.floor(a / 3600) + " h";
    else s = Math.floor(a / 86400) + " d";
    return future ? "in " + s : s + " ago";
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i++;
    }
    return (i === 0 ? String(v) : v.toFixed(1)) + " " + units[i];
  }

  // ---- views -------------------------------------------------------------

  function showLogin(message) {
    stopTimer();
    $("app-view").hidden = true;
    $("logout").hidden = true;
    $("login-view").hidden = false;
    $("gateway-info").textContent = "";
    const err = $("login-error");
    err.textContent = message || "";
    err.hidden = !message;
    $("token").value = "";
    $("token").focus();
  }

  function showApp() {
    $("login-view").hidden = true;
    $("login-error").hidden = true;
    $("app-view").hidden = false;
    $("logout").hidden = false;
    startTimer();
  }

  function endSession(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.peers = [];
    $("peer-rows").replaceChildren();
    closeDialog($("config-dialog"));
    closeDialog($("confirm-dialog"));
    showLogin(message);
  }

  function closeDialog(d) {
    if (d.open) d.close();
  }

  // ---- peers -------------------------------------------------------------

  // One table cell; its content goes into an inner <div> (returned), so the
  // phone layout can set the label beside it as a two-column grid.
  function cell(tr, label, col, text, title) {
    const td = document.createElement("td");
    td.dataset.label = label;
    td.dataset.col = col;
    const v = document.createElement("div");
    v.textContent = text;
    td.appendChild(v);
    if (title) td.title = title;
    tr.appendChild(td);
    return v;
  }

  function matches(p, q) {
    if (!q) return true;
    const live = p.live || {};
    const hay = [p.name, p.state, p.public_key, live.endpoint || "", (p.addresses || []).join(" "),
      (p.services || []).join(" "), p.admin ? "admin" : ""].join(" ").toLowerCase();
    return q.split(/\s+/).every((w) => hay.includes(w));
  }

  function renderPeers() {
    const q = $("filter").value.trim().toLowerCase();
    const tbody = $("peer-rows");
    // Keep keyboard focus on the same action across a refresh.
    const focused = document.activeElement;
    let refocus = null;
    if (focused && tbody.contains(focused) && focused.dataset.action) {
      refocus = { peer: focused.closest("tr").dataset.peer, action: focused.dataset.action };
    }
    const rows = [];
    let shown = 0;
    for (const p of state.peers) {
      if (!matches(p, q)) continue;
      shown++;
      const live = p.live;
      const tr = document.createElement("tr");
      tr.dataset.peer = p.name;
      tr.dataset.state = p.state;

      const name = cell(tr, "Name", "name", "");
      const strong = document.createElement("strong");
      strong.textContent = p.name;
      name.appendChild(strong);
      const extra = [];
      if (p.admin) extra.push("admin");
      if (p.services && p.services.length) extra.push(p.services.join(", "));
      if (extra.length) {
        const s = document.createElement("span");
        s.className = "sub muted";
        s.textContent = extra.join(" · ");
        name.appendChild(s);
      }
      name.parentNode.title = "public key " + p.public_key;

      const addrs = p.addresses || [];
      const former = p.former_addresses || [];
      // A revoked peer's address goes back to the pool: show what it was.
      cell(tr, "Addresses", "addresses",
        addrs.length ? addrs.join(", ") : former.length ? "was " + former.join(", ") : "—");

      const st = cell(tr, "State", "state", "");
      const badge = document.createElement("span");
      badge.className = "state state-" + p.state;
      badge.textContent = p.state;
      st.appendChild(badge);
      if (p.state === "revoked") {
        st.parentNode.title = "revoked " + (p.revoked_at ? isoTime(p.revoked_at) : "") +
          (p.revoked_reason ? ": " + p.revoked_reason : "");
        const s = document.createElement("span");
        s.className = "sub muted";
        s.dataset.reason = "";
        s.textContent = (p.revoked_at ? ago(p.revoked_at) : "") +
          (p.revoked_reason ? ": " + p.revoked_reason : "");
        st.appendChild(s);
      }
      if (live && live.session) {
        const s = document.createElement("span");
        s.className = "sub muted";
        s.textContent = "session up";
        st.appendChild(s);
      }

      cell(tr, "Endpoint", "endpoint", live && live.endpoint ? live.endpoint : "—");

      const hs = live && live.latest_handshake;
      cell(tr, "Last handshake", "handshake", hs ? ago(hs) : "—", hs ? isoTime(hs) : "");

      const io = cell(tr, "Received / sent", "bytes", live ? "" : "—");
      if (live) {
        const dirs = [["↓ ", live.rx_bytes, " bytes received from the peer"],
          ["↑ ", live.tx_bytes, " bytes sent to the peer"]];
        for (const [arrow, n, what] of dirs) {
          const s = document.createElement("span");
          s.textContent = arrow + bytes(n);
          s.title = n + what;
          io.appendChild(s);
        }
      }

      let denied = "—";
      let deniedTitle = "";
      if (live && live.denied) {
        const entries = Object.entries(live.denied);
        denied = String(entries.reduce((n, [, c]) => n + c, 0));
        deniedTitle = entries.map(([r, c]) => r + " " + c).join(", ");
      }
      cell(tr, "Denied", "denied", denied, deniedTitle);

      const exp = p.expires_at;
      cell(tr, "Expires", "expires", exp ? ago(exp) : "never", exp ? isoTime(exp) : "");

      let inet = "—";
      let inetTitle = "no live state (daemon not running or peer inactive)";
      if (live) {
        if (live.internet_seen_at) {
          inet = ago(live.internet_seen_at);
          inetTitle = "internet-bound traffic last seen through the tunnel at " + isoTime(live.internet_seen_at);
        } else {
          inet = "no";
          inetTitle = "no internet-bound traffic through the tunnel since the gateway started";
        }
      }
      cell(tr, "Internet seen", "internet", inet, inetTitle);

      const actions = cell(tr, "Actions", "actions", "");
      actions.parentNode.className = "row-actions";
      if (p.state !== "revoked") {
        for (const [action, label, cls] of [["rotate", "Rotate", "secondary"], ["revoke", "Revoke", "danger"]]) {
          const b = document.createElement("button");
          b.type = "button";
          b.className = cls;
          b.dataset.action = action;
          b.textContent = label;
          b.setAttribute("aria-label", label + " " + p.name);
          actions.appendChild(b);
        }
      }
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
    $("peers-empty").hidden = shown > 0;
    $("peer-count").textContent = q
      ? "(" + shown + " of " + state.peers.length + ")"
      : "(" + state.peers.length + ")";
    if (refocus) {
      for (const tr of tbody.children) {
        if (tr.dataset.peer === refocus.peer) {
          const b = tr.querySelector('[data-action="' + refocus.action + '"]');
          if (b) b.focus();
        }
      }
    }
  }

  async function loadPeers() {
    if (state.loading || !token()) return;
    state.loading = true;
    try {
      const peers = await api("GET", "/v1/peers");
      state.peers = Array.isArray(peers) ? peers : [];
      renderPeers();
      $("last-refresh").textContent = "Updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "1";
    } catch (e) {
      if (e.status !== 401) showError(e.message);
    } finally {
      state.loading = false;
    }
  }

  async function loadStatus() {
    try {
      const s = await api("GET", "/v1/status");
      if (s && s.interface) {
        const parts = [s.interface];
        if (s.listen_port) parts.push("UDP " + s.listen_port);
        if (s.public_key) parts.push("key " + s.public_key.slice(0, 10) + "…");
        $("gateway-info").textContent = parts.join(" · ");
        $("gateway-info").title = s.public_key || "";
      }
    } catch (e) {
      // The peer list shows the errors that matter; the header stays empty.
    }
  }

  function startTimer() {
    stopTimer();
    if (!$("auto-refresh").checked) return;
    state.timer = setInterval(() => {
      if (!document.hidden) loadPeers();
    }, REFRESH_MS);
  }

  function stopTimer() {
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
  }

  // ---- config dialog -----------------------------------------------------

  function base64Utf8(s) {
    const bytes = new TextEncoder().encode(s);
    let bin = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(bin);
  }

  function showConfig(title, peerName, resp) {
    const d = $("config-dialog");
    $("config-title").textContent = title;
    $("config-text").value = resp.config || "";
    const img = $("config-qr");
    if (resp.qr_svg) {
      img.src = "data:image/svg+xml;base64," + base64Utf8(resp.qr_svg);
      img.hidden = false;
    } else {
      img.removeAttribute("src");
      img.hidden = true;
    }
    if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
    state.downloadUrl = URL.createObjectURL(new Blob([resp.config || ""], { type: "text/plain" }));
    const a = $("config-download");
    a.href = state.downloadUrl;
    a.download = peerName + ".conf";
    d.dataset.peer = peerName;
    d.showModal();
    $("config-text").focus();
  }

  // The config holds a private key: drop every copy the page has when the
  // dialog closes (Close, Escape, logout).
  function forgetConfig() {
    $("config-text").value = "";
    $("config-qr").removeAttribute("src");
    if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
    state.downloadUrl = null;
    $("config-download").href = "#";
  }

  function copyConfig() {
    const ta = $("config-text");
    const text = ta.value;
    const done = () => showNotice("Config copied to the clipboard.");
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => showError("Copying was refused by the browser."));
      return;
    }
    ta.select();
    if (document.execCommand("copy")) done();
    else showError("Copying is not available here: select the text and copy it.");
  }

  // ---- confirm dialog ----------------------------------------------------

  function confirmAction(opts) {
    $("confirm-title").textContent = opts.title;
    $("confirm-text").textContent = opts.text;
    $("confirm-reason").value = "";
    $("confirm-reason-row").hidden = !opts.reason;
    $("confirm-ok").textContent = opts.ok;
    $("confirm-ok").disabled = false;
    const d = $("confirm-dialog");
    d.dataset.action = opts.action;
    d.dataset.peer = opts.peer;
    state.confirmAction = opts.run;
    d.showModal();
    (opts.reason ? $("confirm-reason") : $("confirm-cancel")).focus();
  }

  async function onConfirm(ev) {
    ev.preventDefault();
    const run = state.confirmAction;
    if (!run) return;
    const ok = $("confirm-ok");
    ok.disabled = true;
    const reason = $("confirm-reason").value.trim();
    try {
      await run(reason);
      state.confirmAction = null;
      closeDialog($("confirm-dialog"));
    } catch (e) {
      closeDialog($("confirm-dialog"));
      if (e.status !== 401) showError(e.message);
    } finally {
      ok.disabled = false;
    }
  }

  function askRevoke(name) {
    confirmAction({
      action: "revoke",
      peer: name,
      title: "Revoke " + name + "?",
      text: "The peer's key stops working within a second and its session is torn down. " +
        "This cannot be undone: issue a new peer to let the site back in.",
      reason: true,
      ok: "Revoke",
      run: async (reason) => {
        clearError();
        await api("DELETE", "/v1/peers/" + encodeURIComponent(name), reason ? { reason } : undefined);
        showNotice("Revoked " + name + ".");
        await loadPeers();
      },
    });
  }

  function askRotate(name) {
    confirmAction({
      action: "rotate",
      peer: name,
      title: "Rotate the key of " + name + "?",
      text: "A new key pair and preshared key replace the old ones, which stop working at once. " +
        "The site needs the new config.",
      reason: false,
      ok: "Rotate",
      run: async () => {
        clearError();
        const resp = await api("POST", "/v1/peers/" + encodeURIComponent(name) + "/rotate", {});
        closeDialog($("confirm-dialog"));
        showConfig("New config for " + name, name, resp);
        await loadPeers();
      },
    });
  }

  // ---- forms -------------------------------------------------------------

  async function onLogin(ev) {
    ev.preventDefault();
    const t = $("token").value.trim();
    const err = $("login-error");
    if (!t) {
      err.textContent = "Enter the API token.";
      err.hidden = false;
      $("token").focus();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, t);
    const btn = $("login-submit");
    btn.disabled = true;
    try {
      const peers = await api("GET", "/v1/peers");
      state.peers = Array.isArray(peers) ? peers : [];
      $("token").value = "";
      showApp();
      clearError();
      renderPeers();
      $("last-refresh").textContent = "Updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "1";
      loadStatus();
      $("issue-name").focus();
    } catch (e) {
      if (e.status !== 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        err.textContent = e.message;
        err.hidden = false;
      }
    } finally {
      btn.disabled = false;
    }
  }

  async function onIssue(ev) {
    ev.preventDefault();
    clearError();
    const name = $("issue-name").value.trim();
    if (!name) {
      showError("Give the peer a name.");
      $("issue-name").focus();
      return;
    }
    const body = { name };
    const services = $("issue-services").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (services.length) body.services = services;
    const expires = $("issue-expires").value.trim();
    if (expires) body.expires = expires;
    if ($("issue-admin").checked) body.admin = true;
    const btn = $("issue-submit");
    btn.disabled = true;
    try {
      const resp = await api("POST", "/v1/peers", body);
      $("issue-form").reset();
      showConfig("Config for " + name, name, resp);
      await loadPeers();
    } catch (e) {
      if (e.status !== 401) showError(e.message);
    } finally {
      btn.disabled = false;
    }
  }

  function onRowAction(ev) {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    const name = b.closest("tr").dataset.peer;
    if (b.dataset.action === "revoke") askRevoke(name);
    else if (b.dataset.action === "rotate") askRotate(name);
  }

  // ---- wiring ------------------------------------------------------------

  function init() {
    $("login-form").addEventListener("submit", onLogin);
    $("logout").addEventListener("click", () => endSession("Logged out."));
    $("issue-form").addEventListener("submit", onIssue);
    $("filter").addEventListener("input", renderPeers);
    $("refresh").addEventListener("click", () => {
      clearError();
      loadPeers();
    });
    $("auto-refresh").addEventListener("change", () => {
      if ($("auto-refresh").checked) {
        startTimer();
        loadPeers();
      } else {
        stopTimer();
      }
    });
    $("peer-rows").addEventListener("click", onRowAction);
    $("error-dismiss").addEventListener("click", clearError);

    const cfg = $("config-dialog");
    $("config-close").addEventListener("click", () => cfg.close());
    $("config-copy").addEventListener("click", copyConfig);
    cfg.addEventListener("close", forgetConfig);

    const conf = $("confirm-dialog");
    $("confirm-form").addEventListener("submit", onConfirm);
    $("confirm-cancel").addEventListener("click", () => conf.close());
    conf.addEventListener("close", () => {
      state.confirmAction = null;
    });

    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && token() && $("auto-refresh").checked) loadPeers();
    });

    if (token()) {
      showApp();
      loadPeers();
      loadStatus();
    } else {
      showLogin("");
    }
    document.body.dataset.ready = "1";
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
