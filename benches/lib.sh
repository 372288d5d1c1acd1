# shellcheck shell=bash disable=SC2154 # the caller sets json, work, bin, cfg, GW, GIF
# Shared by the end-to-end benchmarks (sourced, not run). The caller sets
# $json, $GW (gateway namespace), $GIF (gateway interface), $work (scratch
# directory), $bin and $cfg (sitegate binary and config); gateways started here
# leave their pid in $gwpid and their log in $work/gw.log.

log() { [ "$json" = 1 ] || echo "# $*" >&2; }

# utime+stime of process $1, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Stops the gateway under test (SIGTERM, SIGKILL after 5 s) and removes its
# interface and UAPI socket.
stop_gateway() {
  if [ -n "$gwpid" ] && kill -0 "$gwpid" 2>/dev/null; then
    kill -TERM "$gwpid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$gwpid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$gwpid" 2>/dev/null || true
    wait "$gwpid" 2>/dev/null || true
  fi
  gwpid=""
  ip -n "$GW" link del "$GIF" 2>/dev/null || true
  rm -f "/var/run/wireguard/$GIF.sock"
}

# Ends every process in the namespaces given and deletes them.
remove_namespaces() {
  for ns in "$@"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
}

# Starts a stock userspace gateway ($1 = wireguard-go | boringtun-cli |
# gotatun-cli, whose binary is `gotatun`) in $GW and waits (up to 10 s) for its
# UAPI socket; the caller configures it.
spawn_stock_gateway() {
  case "$1" in
    wireguard-go) ip netns exec "$GW" wireguard-go -f "$GIF" >"$work/gw.log" 2>&1 & ;;
    boringtun-cli) ip netns exec "$GW" env WG_SUDO=1 boringtun-cli --foreground \
                     --disable-drop-privileges "$GIF" >"$work/gw.log" 2>&1 & ;;
    gotatun-cli) ip netns exec "$GW" gotatun --foreground --disable-drop-privileges \
                   --log "$work/gotatun.log" "$GIF" >"$work/gw.log" 2>&1 & ;;
  esac
  gwpid=$!
  for _ in $(seq 100); do [ -S "/var/run/wireguard/$GIF.sock" ] && break; sleep 0.1; done
}

# Whether the gateway's interface exists in $GW.
gateway_link_up() { ip -n "$GW" link show "$GIF" >/dev/null 2>&1; }

# Starts `sitegate run` in $GW and waits (up to 10 s) until the command given
# succeeds, or the daemon died.
spawn_sitegate() {
  ip netns exec "$GW" "$bin" --config "$cfg" run 2>"$work/gw.log" >/dev/null &
  gwpid=$!
  for _ in $(seq 100); do
    "$@" && break
    kill -0 "$gwpid" 2>/dev/null || break
    sleep 0.1
  done
}

# Resident set size of process $1 in KiB (VmRSS from /proc/PID/status).
rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

# Waits (up to $2 s) until process $1's RSS has stopped growing (two reads
# 0.5 s apart within 0.5%), then prints it in KiB.
settled_rss_kib() {
  local a b n=0
  a=$(rss_kib "$1")
  while [ "$n" -lt $(($2 * 2)) ]; do
    sleep 0.5; n=$((n + 1))
    b=$(rss_kib "$1")
    [ $(( (b - a) * 200 )) -le "$b" ] && break
    a=$b
  done
  echo "$b"
}
