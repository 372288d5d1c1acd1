#!/usr/bin/env bash
# The shared registry at scale (README, "The path to internet scale"). As root:
#
#   sudo benches/registry.sh [--peers N] [--changes N]   (default 100000, 5)
#
# Starts a throwaway PostgreSQL cluster (Debian's initdb/pg_ctl, unix socket
# only, in a temp dir), creates the schema with sitegate, fills it with N peers
# in one SQL statement per table, and measures:
#   - `peer add` (allocation under the registry's write lock), median of 5;
#   - a full registry read through the CLI (`peer list --json`);
#   - `sitegate run` on the registry, in its own namespace: start time, RSS,
#     the follower's read after each change (`registry_synced read_ms`, a
#     delta from the change log), the control loop's table rebuild
#     (`registry_applied apply_ms`), medians over the changes, and the RSS
#     after them.
# Everything it made is removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

peers=100000
changes=5
while [ $# -gt 0 ]; do
  case "$1" in
    --peers) peers="$2"; shift 2 ;;
    --changes) changes="$2"; shift 2 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (namespaces, the postgres user)" >&2; exit 1; }
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$pgbin/initdb" ] || { echo "PostgreSQL server binaries not found (apt install postgresql)" >&2; exit 1; }

cargo build --release --quiet
bin=$PWD/target/release/sitegate
work=$(mktemp -d /tmp/sgreg.XXXXXX)
chmod 0755 "$work"
chown postgres "$work"   # the server writes its socket and log here
ns=sgreg-$$
gwpid=""
cleanup() {
  [ -n "$gwpid" ] && kill -TERM "$gwpid" 2>/dev/null && wait "$gwpid" 2>/dev/null
  ip netns del "$ns" 2>/dev/null || true
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

install -d -o postgres -m 0700 "$work/data"
runuser -u postgres -- "$pgbin/initdb" -D "$work/data" -A trust -U postgres --no-sync >/dev/null
cat >>"$work/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$work'
fsync = off
EOF
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
sql() { psql -h "$work" -U postgres -d sitegate -v ON_ERROR_STOP=1 -Atq "$@"; }
psql -h "$work" -U postgres -d postgres -Atq -c "CREATE DATABASE sitegate"
url="postgres://postgres@$(printf %s "$work" | sed 's|/|%2F|g')/sitegate"

cfg=$work/gw/sitegate.toml
mkdir -p "$work/gw"
"$bin" --config "$cfg" init --endpoint 192.0.2.1:51820 --interface sgreg0 \
  --subnet 10.0.0.0/8 --egress lo >/dev/null
sed -i "s|^url = .*|url = \"$url\"|" "$cfg"
"$bin" --config "$cfg" peer list >/dev/null   # creates the schema, seals nothing yet

echo "# filling the registry with $peers peers" >&2
t0=$(date +%s.%N)
# Without the change-log triggers (a bulk load, not N admin actions); the
# daemon starts with a full read anyway.
sql <<EOF
SET session_replication_role = replica;
INSERT INTO peers (name, public_key, created_at)
  SELECT 'p' || i, encode(sha256(i::text::bytea), 'base64'), 1700000000
  FROM generate_series(1, $peers) AS i;
INSERT INTO peer_addresses (peer_id, address)
  SELECT id, '10.' || ((id + 1) / 65536) || '.' || ((id + 1) / 256 % 256) || '.' || ((id + 1) % 256)
  FROM peers;
INSERT INTO peer_services (peer_id, service) SELECT id, 'sftp' FROM peers;
ANALYZE;
EOF
fill=$(echo "$(date +%s.%N) - $t0" | bc)

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ms_of() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); }

adds=$(for i in 1 2 3 4 5; do ms_of "$bin" --config "$cfg" peer add "bench$i" 2>/dev/null; done | median)
list=$(ms_of "$bin" --config "$cfg" peer list --json)
size=$(sql -c "SELECT pg_size_pretty(pg_database_size('sitegate'))")

ip netns add "$ns"
ip -n "$ns" link set lo up
t0=$(date +%s%N)
ip netns exec "$ns" env RUST_LOG=info,sitegate::registry::follow=debug,sitegate::daemon=debug \
  "$bin" --config "$cfg" run 2>"$work/gw.log" >/dev/null &
gwpid=$!
for _ in $(seq 600); do
  grep -q '"event":"started"' "$work/gw.log" 2>/dev/null && break
  kill -0 "$gwpid" 2>/dev/null || { cat "$work/gw.log" >&2; exit 1; }
  sleep 0.1
done
start_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
rss_kib=$(awk '/^VmRSS/ {print $2}' "/proc/$gwpid/status")
for i in $(seq "$changes"); do
  before=$(grep -c '"registry_synced"' "$work/gw.log" || true)
  "$bin" --config "$cfg" peer add "live$i" >/dev/null 2>&1
  for _ in $(seq 300); do
    [ "$(grep -c '"registry_synced"' "$work/gw.log" || true)" -gt "$before" ] && break
    sleep 0.1
  done
done
reads=$(grep '"registry_synced"' "$work/gw.log" | tail -n "$changes" | sed 's/.*"read_ms":\([0-9]*\).*/\1/' | median)
applies=$(grep '"registry_applied"' "$work/gw.log" | tail -n "$changes" | sed 's/.*"apply_ms":\([0-9]*\).*/\1/' | median)
rss_after=$(awk '/^VmRSS/ {print $2}' "/proc/$gwpid/status")

printf '| what (%s peers) | figure |\n|---|---|\n' "$peers"
printf '| fill by SQL | %.1f s |\n' "$fill"
printf '| database size | %s |\n' "$size"
printf '| `peer add`, median of 5 | %s ms |\n' "$adds"
printf '| `peer list --json` (a full read plus JSON) | %s ms |\n' "$list"
printf '| `sitegate run` start to `started` | %s ms |\n' "$start_ms"
printf '| daemon RSS after start / after %s changes | %s / %s MiB |\n' "$changes" "$((rss_kib / 1024))" "$((rss_after / 1024))"
printf '| follower snapshot read per change, median of %s | %s ms |\n' "$changes" "$reads"
printf '| control loop applying it (table rebuild), median of %s | %s ms |\n' "$changes" "$applies"
