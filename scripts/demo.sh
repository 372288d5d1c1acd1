#!/usr/bin/env bash
# sitegate demo, self-contained, as root on a Debian machine:
#   builds the binary, creates a gateway and a site network namespace joined by a
#   veth, declares a `web` service, issues a peer granted `web` and `sftp`, runs
#   `sitegate run` in the gateway namespace, brings the issued config up in the
#   site namespace with stock wg-quick + wireguard-go, pings 10.8.0.1, fetches a
#   page over HTTP through the tunnel, uploads a file over SFTP (OpenSSH set up
#   from deploy/sshd-sftp.conf, on the tunnel address only) and shows its
#   checksum on both sides, shows that a host on the underlay that routes the
#   tunnel subnet via the gateway gets no answer from the SFTP port, prints
#   `wg show`, and tears everything down on exit (also on failure or Ctrl-C).
#
# Usage: sudo ./scripts/demo.sh [--bin PATH]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=""
[ "${1:-}" = "--bin" ] && bin="$2"

[ "$(id -u)" = 0 ] || { echo "demo.sh needs root (network namespaces); try: sudo $0" >&2; exit 1; }
missing=""
for t in ip wg wg-quick wireguard-go ping curl python3 nft sshd sftp ssh-keygen useradd userdel sha256sum; do
  command -v "$t" >/dev/null || missing="$missing $t"
done
if [ -n "$missing" ]; then
  echo "demo.sh needs:$missing" >&2
  echo "install: apt-get install -y wireguard-go wireguard-tools iproute2 iputils-ping curl python3 nftables openssh-server" >&2
  exit 1
fi

if [ -z "$bin" ]; then
  echo "== building sitegate (cargo build --release)"
  (cd "$root" && cargo build --release --bin sitegate)
  bin="$root/target/release/sitegate"
fi

GW=sgdemo-gw
SITE=sgdemo-site
UNDER=sgdemo-under  # a host on the gateway's LAN, not in the tunnel
GIF=sgdemo0     # the gateway's TUN device
SIF=sgdemo-s1   # the site's WireGuard interface
work=$(mktemp -d /tmp/sitegate-demo.XXXXXX)
gwpid=""
httppid=""
sshdpid=""
SFTP_USER=sftp-sgdemo
created_user=""
# The chroot must not sit below a world-writable directory such as /tmp
# (sshd checks every component), hence /run.
sftproot=/run/sitegate-demo-sftp
export WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1

teardown() {
  local rc=$?
  set +e
  echo "== teardown"
  ip netns exec "$SITE" wg-quick down "$work/$SIF.conf" >/dev/null 2>&1
  [ -n "$httppid" ] && kill "$httppid" 2>/dev/null
  [ -n "$sshdpid" ] && kill "$sshdpid" 2>/dev/null
  if [ -n "$gwpid" ] && kill -0 "$gwpid" 2>/dev/null; then
    kill -TERM "$gwpid"
    for _ in $(seq 50); do kill -0 "$gwpid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$gwpid" 2>/dev/null
  fi
  wait 2>/dev/null
  for ns in "$SITE" "$UNDER" "$GW"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -f "/var/run/wireguard/$GIF.sock" "/var/run/wireguard/$SIF.sock"
  [ -n "$created_user" ] && userdel "$SFTP_USER" 2>/dev/null
  rm -rf "$sftproot"
  [ "$rc" = 0 ] || { echo "-- gateway log (last 20 lines):"; tail -n 20 "$work/gateway.log" 2>/dev/null; }
  rm -rf "$work"
  [ "$rc" = 0 ] && echo "== demo finished" || echo "== demo FAILED (exit $rc)"
}
trap teardown EXIT

# Leftovers of an interrupted earlier demo.
for ns in "$SITE" "$UNDER" "$GW"; do
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

echo "== namespace $UNDER (192.168.78.2) on the gateway's LAN, routing 10.8.0.0/24 via the gateway"
ip netns add "$UNDER"
ip -n "$UNDER" link set lo up
ip link add sgdemo-v2 netns "$GW" type veth peer name sgdemo-v3 netns "$UNDER"
ip -n "$GW" addr add 192.168.78.1/24 dev sgdemo-v2
ip -n "$UNDER" addr add 192.168.78.2/24 dev sgdemo-v3
ip -n "$GW" link set sgdemo-v2 up
ip -n "$UNDER" link set sgdemo-v3 up
ip -n "$UNDER" route add 10.8.0.0/24 via 192.168.78.1

cfg="$work/sitegate.toml"
echo "== sitegate init"
"$bin" --config "$cfg" init --endpoint 192.168.77.1:51820 --interface "$GIF" --subnet 10.8.0.0/24 \
  --egress sgdemo-v0
echo "== a [[service]] for the demo's web page: peers reach only the services granted to them"
web='[[service]]
name = "web"
address = "10.8.0.1:8080"
protocol = "tcp"
default = false
'
grep -q '^\[api\]' "$cfg" || { echo "no [api] section in $cfg"; exit 1; }
awk -v svc="$web" '/^\[api\]/ { print svc } { print }' "$cfg" >"$cfg.new" && mv "$cfg.new" "$cfg"
chmod 640 "$cfg"
grep -A4 'name = "web"' "$cfg"
echo "== sitegate peer add site1 --service web --service sftp"
"$bin" --config "$cfg" peer add site1 --service web --service sftp --output "$work/site1.conf"
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

echo "== SFTP (OpenSSH with deploy/sshd-sftp.conf, listening on 10.8.0.1:22 in $GW)"
mkdir -p -m 0755 /run/sshd
if ! id "$SFTP_USER" >/dev/null 2>&1; then
  # '*': no password, yet not a locked account (which sshd refuses).
  useradd --no-create-home --home-dir /upload --shell /usr/sbin/nologin --password '*' "$SFTP_USER"
  created_user=1
fi
rm -rf "$sftproot"
install -d -m 0755 "$sftproot" "$sftproot/chroot" "$sftproot/chroot/$SFTP_USER" "$sftproot/keys"
install -d -m 0755 -o "$SFTP_USER" -g "$(id -gn "$SFTP_USER")" "$sftproot/chroot/$SFTP_USER/upload"
ssh-keygen -q -t ed25519 -N '' -f "$work/host_ed25519"
ssh-keygen -q -t ed25519 -N '' -f "$work/site_ed25519"
install -m 0644 "$work/site_ed25519.pub" "$sftproot/keys/$SFTP_USER"
{
  echo "HostKey $work/host_ed25519"
  echo "PidFile none"
  echo "StrictModes no"
  echo "UsePAM no"
  echo "AuthorizedKeysFile $sftproot/keys/%u"
  echo "Subsystem sftp internal-sftp"
  sed "s#/srv/sftp/%u#$sftproot/chroot/%u#" "$root/deploy/sshd-sftp.conf"
} >"$work/sshd_config"
ip netns exec "$GW" "$(command -v sshd)" -t -f "$work/sshd_config"
ip netns exec "$GW" "$(command -v sshd)" -D -e -f "$work/sshd_config" 2>"$work/sshd.log" &
sshdpid=$!
for i in $(seq 50); do
  ip netns exec "$GW" ss -ltnH 'sport = :22' | grep -q '10.8.0.1:22' && break
  kill -0 "$sshdpid" 2>/dev/null || { echo "sshd exited:"; cat "$work/sshd.log"; exit 1; }
  [ "$i" = 50 ] && { echo "sshd is not listening on 10.8.0.1:22"; cat "$work/sshd.log"; exit 1; }
  sleep 0.1
done
ip netns exec "$GW" ss -ltnH 'sport = :22'
head -c 1048576 /dev/urandom >"$work/report.bin"
echo "put $work/report.bin /upload/report.bin" >"$work/sftp.batch"
ip netns exec "$SITE" sftp -F /dev/null -b "$work/sftp.batch" -i "$work/site_ed25519" \
  -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
  -o ConnectTimeout=10 "$SFTP_USER@10.8.0.1"
sent=$(sha256sum <"$work/report.bin" | cut -d' ' -f1)
got=$(sha256sum <"$sftproot/chroot/$SFTP_USER/upload/report.bin" | cut -d' ' -f1)
echo "sha256 at the site:    $sent"
echo "sha256 on the gateway: $got"
[ "$sent" = "$got" ] || { echo "checksums differ"; exit 1; }

echo "== from $UNDER (underlay, routing 10.8.0.0/24 via the gateway) to 10.8.0.1:22"
if ip netns exec "$UNDER" timeout 3 bash -c 'exec 3<>/dev/tcp/10.8.0.1/22' 2>/dev/null; then
  echo "the underlay reached the SFTP port: the firewall is not doing its job"
  exit 1
fi
echo "refused: no answer within 3 s (nftables table inet sitegate drops the tunnel subnet off the TUN device)"

echo "== wg show $GIF (stock wireguard-tools against sitegate's UAPI socket)"
ip netns exec "$GW" wg show "$GIF"

echo "== gateway events"
grep -E '"event":"(handshake|handshake_failed|session_closed|packet_denied)"' "$work/gateway.log" || true
