#!/usr/bin/env bash
# Handshake load (issue 7, "Packet path under attack"): N initiator keys, all
# issued by the gateway, send WireGuard handshake initiations at a fixed offered
# rate from namespace `load` (benches/handshake_load.rs, one boringtun Tunn and
# one UDP source port per key) to the gateway under test in namespace `gw`, over
# a veth. Counts handshake responses (answered) and cookie replies, and gateway
# CPU (utime+stime from /proc/PID/stat) per answered handshake.
#
# The same namespaces, keys and gateway key are used for every gateway:
#   sitegate       `sitegate run`; peers from `sitegate peer add --public-key --no-psk`
#   boringtun-cli  `wg setconf` with the same private key and peers, when on PATH
#   wireguard-go   likewise, only with --only wireguard-go
# Gateways are interleaved: round 1 runs each once, then round 2, and so on.
# The generator needs CPU too (X25519 per initiation and per response); its own
# CPU is reported. Absolute figures drift between days: compare inside one run.
#
# Usage: sudo benches/handshake.sh [--json] [--time SECS] [--rate N] [--keys N]
#          [--rounds N] [--bin PATH] [--gen PATH] [--only NAME[,NAME]] [--wait-quiet SECS]
#   --time 10 --rate 3000 --keys 1000 --rounds 2 by default; --bin: the sitegate
#   binary (default: built from this checkout); --gen: the generator binary
#   (default: built with `cargo bench --no-run`); --wait-quiet: before each run,
#   wait up to SECS for the machine to be idle (shared machines; `bg` column).
set -euo pipefail

secs=10
rate=3000
nkeys=1000
rounds=2
drain=2
warmup=2
idle=2
quiet=0
json=0
bin=""
gen=""
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json=1 ;;
    --time) secs="$2"; shift ;;
    --rate) rate="$2"; shift ;;
    --keys) nkeys="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --bin) bin="$2"; shift ;;
    --gen) gen="$2"; shift ;;
    --only) only="$2"; shift ;;
    --wait-quiet) quiet="$2"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$quiet" in ''|*[!0-9]*) echo "--wait-quiet takes a number of seconds" >&2; exit 2 ;; esac
for v in "$secs" "$rate" "$nkeys" "$rounds"; do
  case "$v" in ''|*[!0-9]*|0) echo "--time/--rate/--keys/--rounds take positive integers" >&2; exit 2 ;; esac
done
[ "$nkeys" -le 4000 ] || { echo "--keys: at most 4000 (one /20 of tunnel addresses)" >&2; exit 2; }
[ "$rounds" -le 10 ] || { echo "--rounds: at most 10" >&2; exit 2; }

[ "$(id -u)" = 0 ] || { echo "handshake.sh needs root (network namespaces)" >&2; exit 1; }
for t in ip wg ss python3; do
  command -v "$t" >/dev/null || { echo "handshake.sh needs $t (see .ci/run for the packages)" >&2; exit 1; }
done
# One UDP socket per key in the generator, one connected socket per peer in
# boringtun-cli: both need more descriptors than the usual 1024.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $((nkeys + 256)) ] ||
  { echo "handshake.sh: ulimit -n $(ulimit -n) is too low for $nkeys keys" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$bin" ]; then
  (cd "$root" && cargo build --release --quiet --bin sitegate) >&2
  bin="$root/target/release/sitegate"
fi
if [ -z "$gen" ]; then
  gen=$(cd "$root" && cargo bench --quiet --bench handshake_load --no-run --message-format=json |
        python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "handshake_load" and m.get("executable"):
        print(m["executable"])')
fi
[ -x "$bin" ] || { echo "handshake.sh: no sitegate binary at $bin" >&2; exit 1; }
{ [ -n "$gen" ] && [ -x "$gen" ]; } || { echo "handshake.sh: no generator binary (--gen)" >&2; exit 1; }

tag=$$
GW=sghs-gw-$tag
LD=sghs-load-$tag
GIF=sghg$tag        # gateway wg/TUN interface
GW_IP=172.31.251.1
LD_IP=172.31.251.2
PORT=51820
work=$(mktemp -d /tmp/sitegate-hsbench.XXXXXX)
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
gwpid=""

# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"


cleanup() {
  set +e
  stop_gateway
  remove_namespaces "$LD" "$GW"
  rm -f "/var/run/wireguard/$GIF.sock"
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$GW"
ip netns add "$LD"
ip -n "$GW" link set lo up
ip -n "$LD" link set lo up
ip link add "sghv$tag" netns "$GW" type veth peer name "sghw$tag" netns "$LD"
ip -n "$GW" addr add "$GW_IP/24" dev "sghv$tag"
ip -n "$LD" addr add "$LD_IP/24" dev "sghw$tag"
ip -n "$GW" link set "sghv$tag" up
ip -n "$LD" link set "sghw$tag" up

# Initiator keys: private keys for the generator, public keys issued as peers.
"$gen" keygen --count "$nkeys" --out "$work/keys.txt" >"$work/keys.pub"

cfg="$work/sitegate.toml"
"$bin" --config "$cfg" init --endpoint "$GW_IP:$PORT" --interface "$GIF" \
  --subnet 10.9.0.0/20 >/dev/null
keyfile=$(sed -nE 's/^[[:space:]]*private_key_file[[:space:]]*=[[:space:]]*"(.*)".*/\1/p' "$cfg" | head -n1)
case "$keyfile" in /*) ;; *) keyfile="$(dirname "$cfg")/$keyfile" ;; esac
gwpub=$(wg pubkey <"$keyfile")
log "issuing $nkeys peers (sitegate peer add --public-key --no-psk)"
t_issue=$SECONDS
i=0
while read -r pub; do
  i=$((i + 1))
  # Each prints "no daemon running" on stderr: kept in a file, shown on failure.
  "$bin" --config "$cfg" peer add "hs$i" --public-key "$pub" --no-psk >/dev/null 2>"$work/issue.err" ||
    { cat "$work/issue.err" >&2; exit 1; }
done <"$work/keys.pub"
[ "$i" = "$nkeys" ] || { echo "handshake.sh: issued $i of $nkeys peers" >&2; exit 1; }
log "issued $nkeys peers in $((SECONDS - t_issue)) s"

# The same gateway key and peers for the stock gateways (addresses are only
# there to make each peer's allowed-ips unique; no traffic flows).
{
  echo "[Interface]"
  echo "PrivateKey = $(cat "$keyfile")"
  echo "ListenPort = $PORT"
  i=0
  while read -r pub; do
    i=$((i + 1)); h=$((i + 1))
    printf '[Peer]\nPublicKey = %s\nAllowedIPs = 10.9.%d.%d/32\n' "$pub" $((h >> 8)) $((h & 255))
  done <"$work/keys.pub"
} >"$work/stock.conf"
chmod 600 "$work/stock.conf"

udp_bound() { ip netns exec "$GW" ss -ulnH "sport = :$PORT" | grep -q .; }
sitegate_ready() { gateway_link_up && udp_bound; }

# Brings up a stock userspace gateway ($1 = wireguard-go | boringtun-cli).
start_stock_gateway() {
  spawn_stock_gateway "$1"
  ip netns exec "$GW" wg setconf "$GIF" "$work/stock.conf"
  ip -n "$GW" addr add 10.9.0.1/20 dev "$GIF"
  ip -n "$GW" link set "$GIF" mtu 1420 up
  local n
  n=$(ip netns exec "$GW" wg show "$GIF" peers | wc -l)
  [ "$n" = "$nkeys" ] || log "$1 has $n peers, not $nkeys"
  for _ in $(seq 50); do udp_bound && break; sleep 0.1; done
}


# Busy ticks of all CPUs: user nice system irq softirq steal.
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }

# Waits (at most $quiet seconds) until the machine's other load is under 10% of
# one core over a second.
wait_quiet() {
  local a b waited=0
  while [ "$waited" -lt "$quiet" ]; do
    a=$(machine_ticks); sleep 1; b=$(machine_ticks)
    [ $(( (b - a) * 100 / $(getconf CLK_TCK) )) -lt 10 ] && return 0
    waited=$((waited + 1))
  done
  [ "$quiet" = 0 ] || log "machine still busy after ${quiet} s; running anyway (see the bg column)"
}

results="$work/results.jsonl"
: >"$results"

bench_one() {
  local name=$1 round=$2
  wait_quiet
  log "round $round, gateway: $name"
  case "$name" in
    sitegate) spawn_sitegate sitegate_ready ;;
    *) start_stock_gateway "$name" ;;
  esac
  if ! kill -0 "$gwpid" 2>/dev/null || ! udp_bound; then
    log "$name did not start: $(tail -n 3 "$work/gw.log")"
    echo "{\"gateway\":\"$name\",\"round\":$round,\"error\":\"did not start\"}" >>"$results"
    stop_gateway; return
  fi
  sleep 0.5   # let it settle (peer table loaded, threads up)
  local i0 i1 b0 b1 t0 t1 m0 m1 w0 w1 rc=0
  # Idle baseline: what the gateway burns with $nkeys peers and no traffic, and
  # what the rest of the machine burns (another build, say: then say so).
  b0=$(machine_ticks); i0=$(cpu_ticks "$gwpid")
  sleep "$idle"
  i1=$(cpu_ticks "$gwpid"); b1=$(machine_ticks)
  w0=$(date +%s.%N); m0=$(machine_ticks); t0=$(cpu_ticks "$gwpid")
  ip netns exec "$LD" "$gen" run --endpoint "$GW_IP:$PORT" --gateway-key "$gwpub" \
    --keys "$work/keys.txt" --rate "$rate" --time "$secs" --warmup "$warmup" --drain "$drain" \
    --gateway-pid "$gwpid" --json \
    >"$work/run.json" 2>"$work/gen.err" || rc=1
  if ! kill -0 "$gwpid" 2>/dev/null; then
    log "$name exited during the run: $(tail -n 3 "$work/gw.log")"
    echo "{\"gateway\":\"$name\",\"round\":$round,\"error\":\"exited during the run\"}" >>"$results"
    gwpid=""; stop_gateway; return
  fi
  t1=$(cpu_ticks "$gwpid"); m1=$(machine_ticks); w1=$(date +%s.%N)
  if [ "$rc" = 0 ]; then
    python3 - "$name" "$round" "$((t1 - t0))" "$(getconf CLK_TCK)" "$work/run.json" \
      "$((i1 - i0))" "$idle" "$((b1 - b0))" "$((m1 - m0))" "$w0" "$w1" >>"$results" <<'PY'
import json, sys
name, rnd, ticks, hz, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
idle_ticks, idle_s, bg_ticks, busy_ticks = int(sys.argv[6]), float(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
whole = float(sys.argv[11]) - float(sys.argv[10])
g = json.load(open(path))
gw = g["gateway"]
row = {"gateway": name, "round": rnd}
row.update({k: g[k] for k in ("offered_per_s", "answered_per_s", "completed_per_s", "cookie_replies_per_s",
                              "initiations", "initiations_with_mac2", "responses",
                              "responses_accepted", "cookie_replies", "unanswered",
                              "seconds", "warmup_s", "warmup", "drain_s", "latency_ms", "generator_cpu_s",
                              "generator_cpu_percent", "generator_cpu_us_per_initiation",
                              "send_errors", "lag_resets")})
# The gateway's work for the window (from the first to the last reply to a
# window initiation), read by the generator from /proc/PID/task/*/stat every
# 50 ms; the whole run (warm-up too) read here as a check.
row["gateway_cpu_s"] = gw["cpu_s"]
row["gateway_cpu_percent"] = round(gw["cpu_percent"], 1)
row["gateway_cpu_interval_s"] = gw["interval_s"]
row["gateway_cpu_us_per_handshake"] = gw["cpu_us_per_answered"]
row["gateway_threads_cpu_s"] = gw["threads_cpu_s"]
row["gateway_cpu_s_whole_run"] = round(ticks / hz, 2)
row["gateway_idle_cpu_percent"] = round(100 * idle_ticks / hz / idle_s, 1)
# All CPUs, % of one core: before the run with the gateway idle (other load),
# and during the whole run minus gateway and generator (kernel network work,
# other load).
row["machine_idle_busy_percent"] = round(100 * (bg_ticks - idle_ticks) / hz / idle_s, 1)
row["machine_other_percent"] = round(
    100 * ((busy_ticks - ticks) / hz - g["generator_cpu_s_whole_run"]) / whole, 1)
print(json.dumps(row))
PY
  else
    log "generator failed: $(tail -n 3 "$work/gen.err")"
    echo "{\"gateway\":\"$name\",\"round\":$round,\"error\":\"generator failed\"}" >>"$results"
  fi
  stop_gateway
}

gateways="sitegate"
command -v boringtun-cli >/dev/null && gateways="$gateways boringtun-cli"
[ -n "$only" ] && gateways=${only//,/ }
for r in $(seq "$rounds"); do
  for g in $gateways; do bench_one "$g" "$r"; done
done

python3 - "$json" "$secs" "$rate" "$nkeys" "$results" "$warmup" <<'PY'
import json, sys
as_json, secs, rate, nkeys, path, warmup = sys.argv[1] == "1", *sys.argv[2:7]
rows = [json.loads(l) for l in open(path) if l.strip()]
for r in rows:
    if "error" not in r:
        r["latency_p50_ms"] = r["latency_ms"]["p50"]
        r["latency_p99_ms"] = r["latency_ms"]["p99"]
keys = ("offered_per_s", "answered_per_s", "completed_per_s", "cookie_replies_per_s", "latency_p50_ms",
        "latency_p99_ms", "gateway_cpu_us_per_handshake", "gateway_cpu_percent",
        "gateway_idle_cpu_percent", "generator_cpu_percent", "machine_other_percent",
        "machine_idle_busy_percent")
# A round shared the CPUs with another job when the machine was busy just before
# (bg) or, beyond the kernel's own network work, during it (other): means are
# taken over the clean rounds of a gateway when it has any.
for r in rows:
    if "error" not in r:
        r["clean"] = r["machine_idle_busy_percent"] < 10 and r["machine_other_percent"] < 15
summary = {}
for g in dict.fromkeys(r["gateway"] for r in rows if "error" not in r):
    ok = [r for r in rows if r["gateway"] == g and "error" not in r]
    clean = [r for r in ok if r["clean"]]
    use = clean or ok
    s = {"rounds": len(use), "clean": bool(clean)}
    for k in keys:
        s[k] = round(sum(r[k] or 0 for r in use) / len(use), 2 if k.startswith("latency") else 1)
    summary[g] = s
ratios = {}
if "sitegate" in summary and "boringtun-cli" in summary:
    a, b = summary["sitegate"], summary["boringtun-cli"]
    ratios = {f"sitegate/boringtun-cli {k}": round(a[k] / b[k], 2)
              for k in ("answered_per_s", "completed_per_s", "cookie_replies_per_s",
                        "gateway_cpu_us_per_handshake")
              if b[k]}
test = (f"{nkeys} initiator keys, {rate} initiations/s offered for {secs} s after a {warmup} s"
        " warm-up, round-robin, one UDP source port per key")
if as_json:
    print(json.dumps({"test": test, "results": rows, "mean": summary, "ratios": ratios}, indent=2))
    sys.exit(0)
def pct(x):
    return f"{x}%"
def line(name, rnd, r):
    return (f"{name:<14} {rnd:>5} {r['offered_per_s']:>9.1f} {r['answered_per_s']:>10.1f} {r['completed_per_s']:>11.1f}"
            f" {r['cookie_replies_per_s']:>9.1f} {'-' if r['latency_p50_ms'] is None else r['latency_p50_ms']:>8}"
            f" {'-' if r['latency_p99_ms'] is None else r['latency_p99_ms']:>8}"
            f" {str(r['gateway_cpu_us_per_handshake']):>9} {pct(r['gateway_cpu_percent']):>7}"
            f" {pct(r['gateway_idle_cpu_percent']):>7} {pct(r['generator_cpu_percent']):>7}"
            f" {pct(r['machine_other_percent']):>6} {pct(r['machine_idle_busy_percent']):>6}")
print(test)
print(f"{'gateway':<14} {'round':>5} {'offered/s':>9} {'answered/s':>10} {'completed/s':>11} {'cookies/s':>9} {'p50 ms':>8}"
      f" {'p99 ms':>8} {'us/hs':>9} {'gw CPU':>7} {'gw idle':>7} {'gen CPU':>7} {'other':>6} {'bg':>6}")
for r in rows:
    if "error" in r:
        print(f"{r['gateway']:<14} {r['round']:>5}  ({r['error']})")
        continue
    print(line(r["gateway"], r["round"], r) + ("" if r["clean"] else "  busy"))
    threads = ", ".join(f"{n} {t}" for n, t in list(r["gateway_threads_cpu_s"].items())[:5])
    w = r["warmup"]
    print(f"{'':<14} {'':>5}   warm-up: {w['initiations']} initiations, {w['responses']} answered,"
          f" {w['cookie_replies']} cookie replies; gateway threads, CPU s: {threads}")
for g, s in summary.items():
    print(line(g, "mean", s) + f"  {s['rounds']} {'clean ' if s['clean'] else ''}round(s)")
for k, v in ratios.items():
    print(f"{k}: {v}")
print("answered: handshake responses to initiations sent in the window (arriving before the drain ends);")
print("completed: those the initiator could still use (answering its current or previous initiation: each")
print("key re-initiates every keys/rate s); p50/p99: initiation to response, every answered one;")
print("us/hs: gateway utime+stime from the first to the last reply to a window initiation (sampled every")
print("50 ms) per answered handshake, idle CPU not subtracted; gw CPU: the same as % of one core; gw idle:")
print("the gateway with no traffic, just before; gen CPU: the generator's own (X25519 for each initiation")
print("and response); other: the rest of")
print("the machine's busy CPU during the run (kernel network work, other jobs; tick-sampled, +-10%); bg:")
print("the machine's busy CPU just before, with no generator. busy: bg >= 10% or other >= 15%, another job")
print("shared the CPUs; the means leave such rounds out when a gateway has clean ones.")
PY
