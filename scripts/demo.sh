#!/usr/bin/env bash
# `make demo`: allowsync for real, against the bundled mock Chat API, inside a throwaway network
# namespace (the host's firewall is never touched). Expects `make demo` to have built
# target/release/allowsync and the mock_chat_api example.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/release/allowsync
mock=target/release/examples/mock_chat_api
ns="allowsync-demo-$$"
work=$(mktemp -d)
state_dir=/run/allowsync-demo   # config/demo.yaml keeps its state here
daemon_pid="" mock_pid=""

cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null || true
  [ -n "$mock_pid" ] && kill "$mock_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true   # the namespace takes its nftables tables with it
  rm -rf "$work" "$state_dir"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_ns() { ip netns exec "$ns" "$@"; }
show_sets() {
  in_ns nft list set inet allowsync allow_v4 | sed -n '/elements/,/}/p'
  in_ns nft list set inet allowsync allow_v6 | sed -n '/elements/,/}/p'
}
# Waits until the daemon's log has at least $1 "sync" lines.
wait_syncs() {
  for _ in $(seq 100); do
    [ "$(grep -c ' sync ' "$work/allowsync.log" 2>/dev/null || true)" -ge "$1" ] && return 0
    sleep 0.1
  done
  echo "demo: the daemon did not sync; its log:" >&2
  cat "$work/allowsync.log" >&2
  exit 1
}

rm -rf "$state_dir"        # start from nothing, as on a fresh host
chmod 600 config/demo.key   # git does not keep modes; allowsync warns about a loose key file
ip netns add "$ns"
in_ns ip link set lo up

say "starting the mock Chat API (GetIPList) on 127.0.0.1:8089 inside network namespace $ns"
cat > "$work/lists" <<'LISTS'
# nettype=ENTRY,... : what the mock serves; edited below while everything runs
5=203.0.113.0/25,203.0.113.128/25,198.51.100.7
6=192.0.2.0/24,2001:db8:6::/56
LISTS
cat "$work/lists"
# `ip netns exec` execs the program: $! is the program's own pid, so signals reach it.
ip netns exec "$ns" "$mock" --listen 127.0.0.1:8089 --key-file config/demo.key --list-file "$work/lists" > "$work/mock.out" &
mock_pid=$!
for _ in $(seq 50); do grep -q listening "$work/mock.out" 2>/dev/null && break; sleep 0.1; done

say "allowsync run -c config/demo.yaml (in the background)"
ip netns exec "$ns" "$bin" -c config/demo.yaml run 2> "$work/allowsync.log" &
daemon_pid=$!
wait_syncs 1
show_sets
echo "and the enforcement chain (enforce: { tcp_ports: [443] }):"
in_ns nft list chain inet allowsync enforce | sed -n '/chain/,/}/p'

say "the Chat list changes: 198.51.100.7 goes, 198.51.100.64/26 arrives; SIGUSR1 asks for a sync now"
sed -i 's/198.51.100.7/198.51.100.64\/26/' "$work/lists"
kill -USR1 "$daemon_pid"
wait_syncs 2
show_sets

say "what allowsync logged"
cat "$work/allowsync.log"

say "allowsync status"
in_ns "$bin" -c config/demo.yaml status || true

say "SIGTERM: the daemon stops and the set stays in place"
kill -TERM "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=""
in_ns nft list set inet allowsync allow_v4 | grep -c 'elements' >/dev/null && echo "allow_v4 still holds its elements"

cat <<'EOF2'

== what you just saw
- allowsync minted a usersig from the app's secret key, called GetIPList for nettypes 5 and 6,
  merged the lists with the static entries (203.0.113.0/25 and .128/25 became one /24), and loaded
  them into the interval sets inet allowsync allow_v4 / allow_v6 in one netlink transaction;
- with `enforce: { tcp_ports: [443] }` it also keeps a chain that drops port 443 from anyone else;
- when the list changed, SIGUSR1 made it diff against the kernel's set and apply only the change;
- on SIGTERM it left the sets in place: a firewall must not open up because its manager stopped.
Everything ran in a network namespace that is now deleted. To configure the real thing, start
from config/allowsync.yaml (fully commented) and check it with `allowsync check-config`.
EOF2
