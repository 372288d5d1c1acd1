#!/usr/bin/env bash
# The one-command benchmark (issue 11). Every gateway runs in the same network
# namespaces with the same keys; rows print each gateway's median over --rounds
# interleaved rounds and the ratio of sitegate to the best anchor of the run.
#
# 1. Throughput: a stock wireguard-go site in namespace `client` (wg-quick by
#    default, or `wg set` with --client wg-set), the gateway in namespace `gw`, a
#    veth between them; iperf3 to the gateway's tunnel address: one TCP stream up
#    (site -> gateway), one down (-R), then UDP up with 64-byte payloads at
#    unlimited rate. Gateway CPU is utime+stime from /proc/PID/stat (all its
#    threads); "+softirq" adds the machine's softirq ticks (/proc/stat) of the
#    same window: kernel packet work on both sides (an upper bound).
# 2. Handshake load: benches/handshake.sh (1,000 issued keys, 3,000 initiations/s
#    offered): handshakes/s answered and gateway CPU us per handshake.
# 3. Memory: 10,000 issued peers (`sitegate peer add --public-key --address`, in
#    parallel), VmRSS of `sitegate run` once it has loaded them; the anchors get
#    the same 10,000 peers with `wg setconf`.
#
# Gateways: sitegate, wireguard-go, boringtun-cli (when on PATH) and gotatun-cli
# (Mullvad; `cargo install gotatun-cli --root target/anchors` when missing; the
# bench goes on without it if that fails).
#
# Usage: sudo benches/e2e.sh [--rounds N] [--json] [--time SECS] [--bin PATH]
#          [--only NAME[,NAME]] [--client wg-quick|wg-set] [--mtu N]
#          [--skip throughput,handshake,rss] [--hs-time SECS] [--peers N]
#          [--json-file PATH]   (the table on stdout and the JSON into PATH)
#          [--no-firewall]      (investigation only: deletes sitegate's nftables
#                                table once it runs, so the kernel path of its
#                                packets is the stock gateways' one: no conntrack)
#   --rounds 1, --time 10, --hs-time 10, --peers 10000, --client wg-quick by
#   default; --mtu sets the site's tunnel MTU (default: wg-quick's, 1420).
set -euo pipefail
started=$SECONDS

secs=10
hs_secs=10
udp_len=64
json=0
bin=""
only=""
rounds=1
client=wg-quick
mtu=""
skip=""
npeers=10000
json_file=""
nofw=0
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json=1 ;;
    --time) secs="$2"; shift ;;
    --hs-time) hs_secs="$2"; shift ;;
    --bin) bin="$2"; shift ;;
    --only) only="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --client) client="$2"; shift ;;
    --mtu) mtu="$2"; shift ;;
    --skip) skip=",$2,"; shift ;;
    --peers) npeers="$2"; shift ;;
    --json-file) json_file="$2"; shift ;;
    --no-firewall) nofw=1 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for v in "$secs" "$hs_secs" "$rounds" "$npeers" ${mtu:+"$mtu"}; do
  case "$v" in ''|*[!0-9]*|0) echo "--time/--hs-time/--rounds/--peers/--mtu take positive integers" >&2; exit 2 ;; esac
done
[ "$npeers" -le 16000 ] || { echo "--peers: at most 16000 (one /18 of tunnel addresses)" >&2; exit 2; }
case "$client" in wg-quick|wg-set) ;; *) echo "--client: wg-quick or wg-set" >&2; exit 2 ;; esac
want() { case "$skip" in *",$1,"*) return 1 ;; esac; }

[ "$(id -u)" = 0 ] || { echo "e2e.sh needs root (network namespaces)" >&2; exit 1; }
for t in ip wg wg-quick wireguard-go iperf3 python3 ss; do
  command -v "$t" >/dev/null || { echo "e2e.sh needs $t (see .ci/run for the packages)" >&2; exit 1; }
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

root=$(cd "$(dirname "$0")/.." && pwd)
note() { [ "$json" = 1 ] || echo "# $*" >&2; }
if [ -z "$bin" ]; then
  (cd "$root" && cargo build --release --quiet --bin sitegate) >&2
  bin="$root/target/release/sitegate"
fi

# Anchors: gotatun-cli into a local prefix (never system-wide) when missing.
anchors="$root/target/anchors"
export PATH="$anchors/bin:$PATH"
if ! command -v gotatun >/dev/null && { [ -z "$only" ] || [[ ",$only," == *,gotatun-cli,* ]]; }; then
  note "installing gotatun-cli into $anchors (cargo install, once)"
  mkdir -p "$anchors"
  if ! cargo install --quiet gotatun-cli --root "$anchors" >"$anchors/install.log" 2>&1; then
    note "gotatun-cli: cargo install failed ($(grep -m1 -E '^error' "$anchors/install.log" || tail -n1 "$anchors/install.log")); going on without it"
  fi
fi

gateways="sitegate wireguard-go"
command -v boringtun-cli >/dev/null && gateways="$gateways boringtun-cli"
command -v gotatun >/dev/null && gateways="$gateways gotatun-cli"
[ -n "$only" ] && gateways=${only//,/ }
versions=$(for g in $gateways; do
  case "$g" in
    sitegate) v=$("$bin" --version 2>/dev/null) ;;
    wireguard-go) v="wireguard-go $(dpkg-query -W -f '${Version}' wireguard-go 2>/dev/null || true)" ;;
    boringtun-cli) v=$(boringtun-cli --version 2>/dev/null) ;;
    gotatun-cli) v=$(gotatun --version 2>/dev/null) ;;
    *) v="" ;;
  esac
  printf '%s=%s\n' "$g" "$v"
done)

tag=$$
GW=sgb-gw-$tag
CL=sgb-client-$tag
GIF=sgbg$tag        # gateway wg/TUN interface
CIF=sgbc$tag        # site wg interface
VG=sgbv$tag         # veth, gateway side
VC=sgbw$tag         # veth, site side
work=$(mktemp -d /tmp/sitegate-bench.XXXXXX)
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
export WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go
gwpid=""

# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"

client_down() {
  if [ "$client" = wg-quick ]; then
    ip netns exec "$CL" wg-quick down "$work/$CIF.conf" >/dev/null 2>&1
  else
    ip -n "$CL" link del "$CIF" 2>/dev/null
  fi
  rm -f "/var/run/wireguard/$CIF.sock"
  return 0
}

cleanup() {
  set +e
  client_down
  stop_gateway
  remove_namespaces "$CL" "$GW"
  rm -f "/var/run/wireguard/$CIF.sock" "/var/run/wireguard/$GIF.sock"
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$GW"
ip netns add "$CL"
ip -n "$GW" link set lo up
ip -n "$CL" link set lo up
ip link add "$VG" netns "$GW" type veth peer name "$VC" netns "$CL"
ip -n "$GW" addr add 172.31.250.1/24 dev "$VG"
ip -n "$CL" addr add 172.31.250.2/24 dev "$VC"
ip -n "$GW" link set "$VG" up
ip -n "$CL" link set "$VC" up

results="$work/results.jsonl"
: >"$results"

# ---------------------------------------------------------------- throughput
if want throughput; then
# Keys and addresses: issued by sitegate, reused for every gateway.
cfg="$work/sitegate.toml"
have_sitegate=1
if "$bin" --config "$cfg" init --endpoint 172.31.250.1:51820 --interface "$GIF" \
     --subnet 10.8.0.0/24 >/dev/null 2>"$work/init.err" &&
   # iperf3 on the gateway is a service the bench peer is granted (TCP control
   # and bulk, UDP small packets), as the policy requires.
   printf '\n[[service]]\nname = "iperf"\naddress = "10.8.0.1:5201"\nprotocol = "tcp"\n\n[[service]]\nname = "iperf-udp"\naddress = "10.8.0.1:5201"\nprotocol = "udp"\n' >>"$cfg" &&
   "$bin" --config "$cfg" peer add bench --service iperf --service iperf-udp --output "$work/issued.conf" >/dev/null 2>>"$work/init.err" &&
   [ -s "$cfg" ] && grep -q '^\[Peer\]' "$work/issued.conf" 2>/dev/null; then
  keyfile=$(sed -nE 's/^[[:space:]]*private_key_file[[:space:]]*=[[:space:]]*"(.*)".*/\1/p' "$cfg" | head -n1)
  case "$keyfile" in /*) ;; *) keyfile="$(dirname "$cfg")/$keyfile" ;; esac
else
  # No working `init`/`peer add`: same shape of config from wg, sitegate row skipped.
  log "sitegate init/peer add failed ($(head -n1 "$work/init.err")); keys from wg genkey"
  have_sitegate=0
  keyfile="$work/server.key"
  (umask 077; wg genkey >"$keyfile")
  cat >"$work/issued.conf" <<EOF
[Interface]
PrivateKey = $(wg genkey)
Address = 10.8.0.2/32

[Peer]
PublicKey = $(wg pubkey <"$keyfile")
PresharedKey = $(wg genpsk)
Endpoint = 172.31.250.1:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25
EOF
fi
grep -viE '^[[:space:]]*(DNS|MTU)[[:space:]]*=' "$work/issued.conf" |
  if [ -n "$mtu" ]; then sed "/^\[Interface\]/a MTU = $mtu"; else cat; fi >"$work/$CIF.conf"
chmod 600 "$work/$CIF.conf"
conf_get() { sed -nE "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*(.*)$/\1/p" "$work/$CIF.conf" | head -n1; }
(umask 077; conf_get PrivateKey >"$work/client.key"; conf_get PresharedKey >"$work/psk")
wg pubkey <"$work/client.key" >"$work/client.pub"
client_ip=$(conf_get Address | cut -d, -f1 | cut -d/ -f1)

# The site: wg-quick (full tunnel, as a real site) or a bare wireguard-go
# configured with `wg set` (only the gateway's subnet routed), MTU 1420 unless
# --mtu says otherwise.
client_up() {
  if [ "$client" = wg-quick ]; then
    ip netns exec "$CL" wg-quick up "$work/$CIF.conf" >/dev/null 2>&1
  else
    ip netns exec "$CL" wireguard-go "$CIF" >/dev/null 2>&1 &&
    ip netns exec "$CL" wg set "$CIF" private-key "$work/client.key" \
      peer "$(wg pubkey <"$keyfile")" preshared-key "$work/psk" \
      endpoint 172.31.250.1:51820 allowed-ips 10.8.0.0/24 persistent-keepalive 25 &&
    ip -n "$CL" addr add "$client_ip/32" dev "$CIF" &&
    ip -n "$CL" link set "$CIF" mtu "${mtu:-1420}" up &&
    ip -n "$CL" route add 10.8.0.0/24 dev "$CIF"
  fi
}

# Brings up a stock userspace gateway ($1 = wireguard-go | boringtun-cli | gotatun-cli) with wg set.
start_stock_gateway() {
  spawn_stock_gateway "$1"
  ip netns exec "$GW" wg set "$GIF" listen-port 51820 private-key "$keyfile" \
    peer "$(cat "$work/client.pub")" preshared-key "$work/psk" allowed-ips "$client_ip/32"
  ip -n "$GW" addr add 10.8.0.1/24 dev "$GIF"
  ip -n "$GW" link set "$GIF" mtu 1420 up
}

# Busy ticks of all CPUs (user nice system irq softirq steal), then softirq ticks alone.
machine_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9, $8; exit}' /proc/stat; }

# The offloads of interface $2 in namespace $1, for the record.
offloads() {
  command -v ethtool >/dev/null || { echo "ethtool not installed"; return 0; }
  ip netns exec "$1" ethtool -k "$2" 2>/dev/null |
    awk -F': ' '/^(tcp-segmentation-offload|generic-segmentation-offload|generic-receive-offload|tx-udp-segmentation):/{
      split($2, a, " "); printf "%s%s %s", sep, $1, a[1]; sep=", "}'
}

# Runs one iperf3 test (client in the site, server on the gateway's tunnel address)
# with extra client ARGS, JSON to $1; prints the gateway's CPU ticks used meanwhile,
# the machine's busy ticks and its softirq ticks.
iperf_once() {
  local out=$1; shift
  ip netns exec "$GW" iperf3 -s -B 10.8.0.1 -1 >/dev/null 2>&1 &
  local srv=$! t0 t1 m0 s0 m1 s1 rc=0
  for _ in $(seq 50); do
    ip netns exec "$GW" ss -ltnH 'sport = :5201' | grep -q . && break; sleep 0.1
  done
  read -r m0 s0 < <(machine_ticks); t0=$(cpu_ticks "$gwpid")
  ip netns exec "$CL" iperf3 -c 10.8.0.1 -t "$secs" -J "$@" >"$out" 2>/dev/null || rc=1
  t1=$(cpu_ticks "$gwpid"); read -r m1 s1 < <(machine_ticks)
  kill "$srv" 2>/dev/null || true
  wait "$srv" 2>/dev/null || true
  echo "$((t1 - t0)) $((m1 - m0)) $((s1 - s0))"
  return $rc
}

bench_one() {
  local name=$1 round=$2
  log "round $round, gateway: $name"
  case "$name" in
    sitegate)
      if [ "$have_sitegate" = 0 ]; then
        echo "{\"phase\":\"throughput\",\"gateway\":\"sitegate\",\"round\":$round,\"error\":\"init or peer add failed\"}" >>"$results"; return
      fi
      spawn_sitegate gateway_link_up
      if [ "$nofw" = 1 ]; then
        sleep 0.5
        ip netns exec "$GW" nft delete table inet sitegate || log "no nftables table to delete"
      fi ;;
    *) start_stock_gateway "$name" ;;
  esac
  if ! kill -0 "$gwpid" 2>/dev/null; then
    log "$name did not start: $(tail -n 3 "$work/gw.log")"
    echo "{\"phase\":\"throughput\",\"gateway\":\"$name\",\"round\":$round,\"error\":\"did not start\"}" >>"$results"
    stop_gateway; return
  fi
  client_up || log "$client: site setup failed"
  local ok=0
  for _ in $(seq 20); do
    if ip netns exec "$CL" ping -n -c 1 -W 1 10.8.0.1 >/dev/null 2>&1; then ok=1; break; fi
  done
  if [ "$ok" = 1 ]; then
    local tcp down udp
    if tcp=$(iperf_once "$work/tcp.json") &&
       down=$(iperf_once "$work/down.json" -R) &&
       udp=$(iperf_once "$work/udp.json" -u -b 0 -l "$udp_len"); then
      python3 - "$name" "$round" "$(getconf CLK_TCK)" "$udp_len" "$tcp" "$down" "$udp" \
        "$work/tcp.json" "$work/down.json" "$work/udp.json" \
        "$(offloads "$GW" "$GIF")" "$(offloads "$GW" "$VG")" "$(offloads "$CL" "$CIF")" >>"$results" <<'PY'
import json, sys
name, rnd, hz, udp_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tcp_t, down_t, udp_t = ([int(x) for x in a.split()] for a in sys.argv[5:8])
tcp = json.load(open(sys.argv[8]))["end"]
down = json.load(open(sys.argv[9]))["end"]["sum_received"]
udp = json.load(open(sys.argv[10]))["end"]["sum_received"]
recv = tcp["sum_received"]
gb, down_gb = recv["bytes"] / 1e9, down["bytes"] / 1e9
udp_pkts = udp["bytes"] / udp_len
def per(ticks, q, scale=1):
    return round(ticks / hz / q * scale, 2) if q else None
print(json.dumps({"phase": "throughput", "gateway": name, "round": rnd,
    "up_mbit_s": round(recv["bits_per_second"] / 1e6, 1),
    "up_retransmits": tcp.get("sum_sent", {}).get("retransmits"),
    "up_cpu_s_per_gb": per(tcp_t[0], gb),
    "up_cpu_softirq_s_per_gb": per(tcp_t[0] + tcp_t[2], gb),
    "up_machine_cpu_s_per_gb": per(tcp_t[1], gb),
    "down_mbit_s": round(down["bits_per_second"] / 1e6, 1),
    "down_cpu_s_per_gb": per(down_t[0], down_gb),
    "down_cpu_softirq_s_per_gb": per(down_t[0] + down_t[2], down_gb),
    "udp_pps": round(udp_pkts / udp["seconds"]),
    "udp_lost_percent": round(udp.get("lost_percent", 0), 1),
    "udp_cpu_us_per_packet": per(udp_t[0], udp_pkts, 1e6),
    "offloads": {"gateway_tun": sys.argv[11], "gateway_veth": sys.argv[12], "site_tun": sys.argv[13]}}))
PY
    else
      echo "{\"phase\":\"throughput\",\"gateway\":\"$name\",\"round\":$round,\"error\":\"iperf3 failed\"}" >>"$results"
    fi
  else
    log "$name: no ping through the tunnel; gateway log tail:"
    [ "$json" = 1 ] || tail -n 5 "$work/gw.log" >&2
    echo "{\"phase\":\"throughput\",\"gateway\":\"$name\",\"round\":$round,\"error\":\"no connectivity\"}" >>"$results"
  fi
  client_down
  stop_gateway
}

# Interleaved rounds; the order rotates from round to round.
# shellcheck disable=SC2086 # word splitting of the gateway list is intended
set -- $gateways
for r in $(seq "$rounds"); do
  for g in "$@"; do bench_one "$g" "$r"; done
  set -- "${@:2}" "$1"
done
fi

# ------------------------------------------------------------ handshake load
if want handshake; then
  log "handshake load: benches/handshake.sh --rounds $rounds --time $hs_secs (1000 keys, 3000/s offered)"
  if "$root/benches/handshake.sh" --json --rounds "$rounds" --time "$hs_secs" --bin "$bin" \
       --only "${gateways// /,}" >"$work/hs.json" 2>"$work/hs.err"; then
    python3 - "$work/hs.json" >>"$results" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(json.dumps(dict(r, phase="handshake")))
PY
  else
    log "handshake.sh failed: $(tail -n 2 "$work/hs.err")"
    echo '{"phase":"handshake","gateway":"-","error":"handshake.sh failed"}' >>"$results"
  fi
fi

# ---------------------------------------------------------------- memory
if want rss; then
  rcfg="$work/rss/sitegate.toml"
  mkdir -p "$work/rss"
  gen=$(cd "$root" && cargo bench --quiet --bench handshake_load --no-run --message-format=json |
        python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "handshake_load" and m.get("executable"):
        print(m["executable"])')
  "$gen" keygen --count "$npeers" --out "$work/rss/keys.txt" >"$work/rss/keys.pub"
  "$bin" --config "$rcfg" init --endpoint 172.31.250.1:51820 --interface "$GIF" \
    --subnet 10.10.0.0/18 >/dev/null
  rkey=$(sed -nE 's/^[[:space:]]*private_key_file[[:space:]]*=[[:space:]]*"(.*)".*/\1/p' "$rcfg" | head -n1)
  case "$rkey" in /*) ;; *) rkey="$(dirname "$rcfg")/$rkey" ;; esac
  # Peer i gets 10.10.x.y, skipping .0 and .255 and the gateway's 10.10.0.1.
  python3 - "$work/rss/keys.pub" >"$work/rss/plan" <<'PY'
import sys
h = 2
for i, k in enumerate(open(sys.argv[1]).read().split(), 1):
    while h & 255 in (0, 255):
        h += 1
    print(f"{k} rss{i} 10.10.{h >> 8}.{h & 255}")
    h += 1
PY
  log "issuing $npeers peers (sitegate peer add --public-key --address --no-psk, 4 in parallel)"
  t_issue=$SECONDS
  # Each prints "no daemon running" on stderr; failures are counted below.
  # shellcheck disable=SC2016 # the script is for sh -c
  xargs -P 4 -n 3 sh -c '"$0" --config "$1" peer add "$4" --public-key "$3" --address "$5" --no-psk >/dev/null 2>&1 || echo "$4" >>"$2"' \
    "$bin" "$rcfg" "$work/rss/failed" <"$work/rss/plan" 2>/dev/null || true
  issue_s=$((SECONDS - t_issue))
  issued=$("$bin" --config "$rcfg" peer list 2>/dev/null | grep -c ' active' || true)
  log "issued $issued of $npeers peers in $issue_s s"
  {
    echo "[Interface]"; echo "PrivateKey = $(cat "$rkey")"; echo "ListenPort = 51820"
    while read -r pub _ addr; do printf '[Peer]\nPublicKey = %s\nAllowedIPs = %s/32\n' "$pub" "$addr"; done <"$work/rss/plan"
  } >"$work/rss/stock.conf"
  chmod 600 "$work/rss/stock.conf"
  rss_ready() { gateway_link_up && ip netns exec "$GW" ss -ulnH 'sport = :51820' | grep -q .; }
  for g in $gateways; do
    log "memory, gateway: $g ($npeers peers)"
    n=""
    case "$g" in
      sitegate) cfg=$rcfg spawn_sitegate rss_ready ;;
      *) spawn_stock_gateway "$g"
         ip netns exec "$GW" wg setconf "$GIF" "$work/rss/stock.conf" 2>>"$work/gw.log" || true
         ip -n "$GW" link set "$GIF" up 2>/dev/null || true
         n=$(ip netns exec "$GW" wg show "$GIF" peers 2>/dev/null | wc -l) ;;
    esac
    if kill -0 "$gwpid" 2>/dev/null && rss_ready; then
      # sitegate: the peer count of its `started` event (the table it loaded).
      [ -n "$n" ] || n=$(grep -m1 '"event":"started"' "$work/gw.log" | grep -oE '"peers":[0-9]+' | cut -d: -f2 || true)
      kib=$(settled_rss_kib "$gwpid" 20)
      threads=$(awk '/^Threads:/{print $2}' "/proc/$gwpid/status")
      echo "{\"phase\":\"rss\",\"gateway\":\"$g\",\"peers_configured\":${n:-$issued},\"rss_kib\":$kib,\"threads\":$threads,\"issue_s\":$issue_s}" >>"$results"
    else
      log "$g did not start with $npeers peers: $(tail -n 3 "$work/gw.log")"
      echo "{\"phase\":\"rss\",\"gateway\":\"$g\",\"error\":\"did not start\"}" >>"$results"
    fi
    stop_gateway
  done
fi

machine="$(nproc) CPUs, $(sed -nE 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | head -n1), Linux $(uname -r)"
report() {
  python3 "$root/benches/e2e_report.py" "$1" "$results" "$secs" "$hs_secs" "$rounds" "$client" \
    "${mtu:-1420}" "$npeers" "$machine" "$((SECONDS - started))" "$versions"
}
[ -z "$json_file" ] || report 1 >"$json_file"
report "$json"
