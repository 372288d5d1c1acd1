#!/usr/bin/env bash
# sitegate demo, self-contained, as root on a Debian machine:
#   builds the binary, creates a gateway and a site network namespace joined by a
#   veth, issues a peer, runs `sitegate run` in the gateway namespace, brings the
#   issued config up in the site namespace with stock wg-quick + wireguard-go,
#   pings 10.8.0.1, fetches a page over HTTP through the tunnel, prints `wg show`,
#   and tears everything down on exit (also on failure or Ctrl-C).
#
# Usage: sudo ./scripts/demo.sh [--bin PATH]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=""
[ "${1:-}" = "--bin" ] && bin="$2"

[ "$(id -u)" = 0 ] || { echo "demo.sh needs root (network namespaces); try: sudo $0" >&2; exit 1; }
missing=""
for t in ip wg wg-quick wireguard-go ping curl python3 nft; do
  command -v "$t" >/dev/null || missing="$missing $t"
done
if [ -n "$missing" ]; then
  echo "demo.sh needs:$missing" >&2
  echo "install: apt-get install -y wireguard-go wireguard-tools iproute2 iputils-ping curl python3 nftables" >&2
  exit 1
fi

if [ -z "$bin" ]; then
  echo "== building sitegate (cargo build --release)"
  (cd "$root" && cargo build --release --bin sitegate)
  bin="$root/target/release/sitegate"
fi

GW=sgdemo-gw
SITE=sgdemo-site
GIF=sgdemo0     # the gateway's TUN device
SIF=sgdemo-s1   # the site's WireGuard interface
work=$(mktemp -d /tmp/sitegate-demo.XXXXXX)
gwpid=""
httppid=""
export WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1

teardown() {
  local rc=$?
  set +e
  echo "== teardown"
  ip netns exec "$SITE" wg-quick down "$work/$SIF.conf" >/dev/null 2>&1
  [ -n "$httppid" ] && kill "$httppid" 2>/dev/null
  if [ -n "$gwpid" ] && kill -0 "$gwpid" 2>/dev/null; then
    kill -TERM "$gwpid"
    for _ in $(seq 50); do kill -0 "$gwpid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$gwpid" 2>/dev/null
  fi
  wait 2>/dev/null
  for ns in "$SITE" "$GW"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -f "/var/run/wireguard/$GIF.sock" "/var/run/wireguard/$SIF.sock"
  [ "$rc" = 0 ] || { echo "-- gateway log (last 20 lines):"; tail -n 20 "$work/gateway.log" 2>/dev/null; }
  rm -rf "$work"
  [ "$rc" = 0 ] && echo "== demo finished" || echo "== demo FAILED (exit $rc)"
}
trap teardown EXIT

# Leftovers of an interrupted earlier demo.
for ns in "$SITE" "$GW"; do
  if ip netns list | grep -qw "$ns"; then
    for p in $(ip netns pids "$ns"); do kill -KILL "$p" 2>/dev/null || true; done
    ip netns del "$ns"
  fi
done

echo "== namespaces $GW (192.168.77.1) <-veth-> $SITE (192.168.77.2)"
ip netns add "$GW"
ip netns add "$SITE"
ip -n "$GW" link set lo up
ip -n "$SITE" link set lo up
ip link add sgdemo-v0 netns "$GW" type veth peer name sgdemo-v1 netns "$SITE"
ip -n "$GW" addr add 192.168.77.1/24 dev sgdemo-v0
ip -n "$SITE" addr add 192.168.77.2/24 dev sgdemo-v1
ip -n "$GW" link set sgdemo-v0 up
ip -n "$SITE" link set sgdemo-v1 up

cfg="$work/sitegate.toml"
echo "== sitegate init"
"$bin" --config "$cfg" init --endpoint 192.168.77.1:51820 --interface "$GIF" --subnet 10.8.0.0/24
echo "== sitegate peer add site1"
"$bin" --config "$cfg" peer add site1 --output "$work/site1.conf"
sed -E 's/^(PrivateKey|PresharedKey)( *= *).*/\1\2(secret)/' "$work/site1.conf"

echo "== sitegate run (in $GW; log in JSON lines)"
ip netns exec "$GW" "$bin" --config "$cfg" run 2>"$work/gateway.log" &
gwpid=$!
for _ in $(seq 100); do
  ip -n "$GW" link show "$GIF" >/dev/null 2>&1 && break
  kill -0 "$gwpid" 2>/dev/null || { echo "sitegate run exited"; exit 1; }
  sleep 0.1
done
ip -n "$GW" -brief addr show "$GIF"

echo "== wg-quick up (wireguard-go) in $SITE"
# No resolvconf in a namespace demo: drop the DNS line from the issued config.
grep -viE '^[[:space:]]*DNS[[:space:]]*=' "$work/site1.conf" >"$work/$SIF.conf"
chmod 600 "$work/$SIF.conf"
ip netns exec "$SITE" wg-quick up "$work/$SIF.conf"

echo "== ping 10.8.0.1 through the tunnel"
# wireguard-go handshakes on the first packet: allow a few tries.
for i in $(seq 20); do
  ip netns exec "$SITE" ping -n -c 1 -W 1 10.8.0.1 >/dev/null 2>&1 && break
  [ "$i" = 20 ] && { echo "no reply from 10.8.0.1"; exit 1; }
done
ip netns exec "$SITE" ping -n -c 3 -i 0.2 10.8.0.1

echo "== HTTP through the tunnel (python3 http.server on 10.8.0.1:8080 in $GW)"
mkdir -p "$work/www"
echo "hello from the gateway side of the tunnel" >"$work/www/hello.txt"
ip netns exec "$GW" python3 -m http.server 8080 --bind 10.8.0.1 --directory "$work/www" \
  >/dev/null 2>&1 &
httppid=$!
for i in $(seq 50); do
  ip netns exec "$GW" ss -ltnH 'sport = :8080' | grep -q . && break
  sleep 0.1
done
ip netns exec "$SITE" curl -sS --max-time 10 http://10.8.0.1:8080/hello.txt

echo "== wg show $GIF (stock wireguard-tools against sitegate's UAPI socket)"
ip netns exec "$GW" wg show "$GIF"

echo "== gateway events"
grep -E '"event":"(handshake|handshake_failed|session_closed|packet_denied)"' "$work/gateway.log" || true
