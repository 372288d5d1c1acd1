#!/usr/bin/env bash
# End-to-end throughput: one stock wireguard-go site (wg-quick) in namespace
# `client`, the gateway under test in namespace `gw`, a veth between them, and
# iperf3 between the site and the gateway's tunnel address: one TCP stream up
# (site -> gateway), one down (-R), then UDP up with 64-byte payloads at
# unlimited rate (small packets).
#
# The same namespaces, keys and addresses are used for every gateway:
#   sitegate       `sitegate run` with a config from `sitegate init` + `peer add`
#   wireguard-go   configured with `wg set` from the same keys
#   boringtun-cli  likewise, only when it is on PATH (never installed here)
#
# The site (wireguard-go) is the bottleneck on small machines, so compare gateways
# by gateway CPU seconds per GB (utime+stime from /proc/PID/stat) as well as Mbit/s,
# and by gateway CPU microseconds per received packet for UDP.
#
# Usage: sudo benches/e2e.sh [--json] [--time SECS] [--bin PATH] [--only NAME[,NAME]]
set -euo pipefail

secs=10
udp_len=64
json=0
bin=""
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json=1 ;;
    --time) secs="$2"; shift ;;
    --bin) bin="$2"; shift ;;
    --only) only="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || { echo "e2e.sh needs root (network namespaces)" >&2; exit 1; }
for t in ip wg wg-quick wireguard-go iperf3 python3; do
  command -v "$t" >/dev/null || { echo "e2e.sh needs $t (see .ci/run for the packages)" >&2; exit 1; }
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$bin" ]; then
  (cd "$root" && cargo build --release --quiet --bin sitegate) >&2
  bin="$root/target/release/sitegate"
fi

tag=$$
GW=sgb-gw-$tag
CL=sgb-client-$tag
GIF=sgbg$tag        # gateway wg/TUN interface
CIF=sgbc$tag        # site wg interface
work=$(mktemp -d /tmp/sitegate-bench.XXXXXX)
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
export WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go
gwpid=""

# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"


cleanup() {
  set +e
  ip netns exec "$CL" wg-quick down "$work/$CIF.conf" >/dev/null 2>&1
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
ip link add "sgbv$tag" netns "$GW" type veth peer name "sgbw$tag" netns "$CL"
ip -n "$GW" addr add 172.31.250.1/24 dev "sgbv$tag"
ip -n "$CL" addr add 172.31.250.2/24 dev "sgbw$tag"
ip -n "$GW" link set "sgbv$tag" up
ip -n "$CL" link set "sgbw$tag" up

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
grep -viE '^[[:space:]]*DNS[[:space:]]*=' "$work/issued.conf" >"$work/$CIF.conf"
chmod 600 "$work/$CIF.conf"
conf_get() { sed -nE "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*(.*)$/\1/p" "$work/$CIF.conf" | head -n1; }
conf_get PrivateKey | wg pubkey >"$work/client.pub"
conf_get PresharedKey >"$work/psk"
chmod 600 "$work/psk"
client_ip=$(conf_get Address | cut -d, -f1 | cut -d/ -f1)

# Brings up a stock userspace gateway ($1 = wireguard-go | boringtun-cli) with wg set.
start_stock_gateway() {
  spawn_stock_gateway "$1"
  ip netns exec "$GW" wg set "$GIF" listen-port 51820 private-key "$keyfile" \
    peer "$(cat "$work/client.pub")" preshared-key "$work/psk" allowed-ips "$client_ip/32"
  ip -n "$GW" addr add 10.8.0.1/24 dev "$GIF"
  ip -n "$GW" link set "$GIF" mtu 1420 up
}


# Runs one iperf3 test (client in the site, server on the gateway's tunnel address)
# with extra client ARGS, JSON to $1; prints the gateway's CPU ticks used meanwhile.
iperf_once() {
  local out=$1; shift
  ip netns exec "$GW" iperf3 -s -B 10.8.0.1 -1 >/dev/null 2>&1 &
  local srv=$! t0 t1 rc=0
  for _ in $(seq 50); do
    ip netns exec "$GW" ss -ltnH 'sport = :5201' | grep -q . && break; sleep 0.1
  done
  t0=$(cpu_ticks "$gwpid")
  ip netns exec "$CL" iperf3 -c 10.8.0.1 -t "$secs" -J "$@" >"$out" 2>/dev/null || rc=1
  t1=$(cpu_ticks "$gwpid")
  kill "$srv" 2>/dev/null || true
  wait "$srv" 2>/dev/null || true
  echo $((t1 - t0))
  return $rc
}

results="$work/results.jsonl"
: >"$results"

bench_one() {
  local name=$1
  log "gateway: $name"
  case "$name" in
    sitegate)
      if [ "$have_sitegate" = 0 ]; then
        echo '{"gateway":"sitegate","error":"init or peer add failed"}' >>"$results"; return
      fi
      spawn_sitegate gateway_link_up ;;
    *) start_stock_gateway "$name" ;;
  esac
  if ! kill -0 "$gwpid" 2>/dev/null; then
    log "$name did not start: $(tail -n 3 "$work/gw.log")"
    echo "{\"gateway\":\"$name\",\"error\":\"did not start\"}" >>"$results"
    stop_gateway; return
  fi
  ip netns exec "$CL" wg-quick up "$work/$CIF.conf" >/dev/null 2>&1
  local ok=0
  for _ in $(seq 20); do
    if ip netns exec "$CL" ping -n -c 1 -W 1 10.8.0.1 >/dev/null 2>&1; then ok=1; break; fi
  done
  if [ "$ok" = 1 ]; then
    local tcp_ticks down_ticks udp_ticks
    if tcp_ticks=$(iperf_once "$work/tcp.json") &&
       down_ticks=$(iperf_once "$work/down.json" -R) &&
       udp_ticks=$(iperf_once "$work/udp.json" -u -b 0 -l "$udp_len"); then
      python3 - "$name" "$tcp_ticks" "$udp_ticks" "$(getconf CLK_TCK)" "$udp_len" \
        "$work/tcp.json" "$work/udp.json" "$down_ticks" "$work/down.json" >>"$results" <<'PY'
import json, sys
name, tcp_ticks, udp_ticks, hz, udp_len = sys.argv[1], *map(int, sys.argv[2:6])
tcp = json.load(open(sys.argv[6]))["end"]
udp = json.load(open(sys.argv[7]))["end"]["sum_received"]
down_ticks = int(sys.argv[8])
down = json.load(open(sys.argv[9]))["end"]["sum_received"]
down_gb = down["bytes"] / 1e9
recv = tcp["sum_received"]
cpu = tcp_ticks / hz
gb = recv["bytes"] / 1e9
udp_pkts = udp["bytes"] / udp_len
print(json.dumps({"gateway": name, "mbit_s": round(recv["bits_per_second"] / 1e6, 1),
                  "bytes": recv["bytes"], "seconds": round(recv["seconds"], 2),
                  "retransmits": tcp.get("sum_sent", {}).get("retransmits"),
                  "gateway_cpu_s": round(cpu, 2),
                  "gateway_cpu_s_per_gb": round(cpu / gb, 2) if gb else None,
                  "down_mbit_s": round(down["bits_per_second"] / 1e6, 1),
                  "down_gateway_cpu_s_per_gb":
                      round(down_ticks / hz / down_gb, 2) if down_gb else None,
                  "udp_payload_bytes": udp_len,
                  "udp_pps": round(udp_pkts / udp["seconds"]),
                  "udp_lost_percent": round(udp.get("lost_percent", 0), 1),
                  "udp_gateway_cpu_us_per_packet":
                      round(udp_ticks / hz / udp_pkts * 1e6, 2) if udp_pkts else None}))
PY
    else
      echo "{\"gateway\":\"$name\",\"error\":\"iperf3 failed\"}" >>"$results"
    fi
  else
    log "$name: no ping through the tunnel; gateway log tail:"
    [ "$json" = 1 ] || tail -n 5 "$work/gw.log" >&2
    echo "{\"gateway\":\"$name\",\"error\":\"no connectivity\"}" >>"$results"
  fi
  ip netns exec "$CL" wg-quick down "$work/$CIF.conf" >/dev/null 2>&1 || true
  stop_gateway
}

gateways="sitegate wireguard-go"
command -v boringtun-cli >/dev/null && gateways="$gateways boringtun-cli"
[ -n "$only" ] && gateways=${only//,/ }
for g in $gateways; do bench_one "$g"; done

python3 - "$json" "$secs" "$results" <<'PY'
import json, sys
as_json, secs, path = sys.argv[1] == "1", sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(path) if l.strip()]
if as_json:
    print(json.dumps({"test": f"iperf3 -t {secs}: one TCP stream; UDP 64-byte payloads, -b 0",
                  "results": rows}, indent=2))
    sys.exit(0)
print(f"site (wireguard-go) <-> gateway, iperf3 -t {secs}: one TCP stream up (site -> gateway) and down (-R); UDP up, 64-byte payloads, unlimited rate")
print(f"{'gateway':<15} {'up Mbit/s':>10} {'CPU s/GB':>9} {'retrans':>8} {'down Mbit/s':>11} {'CPU s/GB':>9} {'UDP pkt/s':>10} {'UDP lost':>9} {'CPU us/pkt':>10}")
for r in rows:
    if "error" in r:
        print(f"{r['gateway']:<15} {'-':>10} {'-':>9} {'-':>8} {'-':>11} {'-':>9} {'-':>10} {'-':>9} {'-':>10}  ({r['error']})")
    else:
        print(f"{r['gateway']:<15} {r['mbit_s']:>10} {r['gateway_cpu_s_per_gb']:>9} {str(r['retransmits']):>8}"
              f" {r['down_mbit_s']:>11} {r['down_gateway_cpu_s_per_gb']:>9}"
              f" {r['udp_pps']:>10} {str(r['udp_lost_percent']) + '%':>9} {r['udp_gateway_cpu_us_per_packet']:>10}")
PY
