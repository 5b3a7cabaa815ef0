#!/usr/bin/env bash
# The shipped unit under a real systemd (run by `make test` after `make packages`): a minimal
# Debian 12 root filesystem, built once with debootstrap and cached under target/, is booted with
# systemd 252 as PID 1 by systemd-nspawn in a private network namespace; the .deb `make test`
# built is installed in it and run against the mock Chat API (examples/mock_chat_api.rs), on
# loopback inside the container. Facts about booting systemd on these machines (nspawn flags,
# cgroups, getting in with nsenter): shared/reference/systemd-under-test.md.
#
# Every check prints PASS or FAIL; the last line is "N passed, M failed", and any failure exits
# non-zero. Every wait is a bounded poll for a condition. On exit, even after a failure, the
# container is stopped and the namespaces, mounts and cgroups it used are removed.
#
# Needs root, debootstrap, systemd-nspawn (systemd-container) and nsenter (util-linux):
# scripts/install-deps.sh installs them. Without root it skips, except under CI=true.
set -uo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
# What the container holds from the start, and what is only fetched into its apt cache (the
# container has no network) for `apt-get install` to find there: procps, which the package
# depends on (the unit's ExecReload= runs /bin/kill), and ipset and iptables, which the ipset
# scenario installs as the operator of an iptables host would.
ROOTFS_PACKAGES=(systemd systemd-sysv dbus nftables iproute2 util-linux libnftnl11 libmnl0 ca-certificates)
PREFETCH_PACKAGES=(procps ipset iptables)
MOCK=target/debug/examples/mock_chat_api

NAME=allowsync-sd-$$
RUN=target/systemd-run/$$
ROOT=$RUN/root
NS_A=$NAME-a    # the allowed client's network namespace
NS_S=$NAME-s    # the stranger's
CG_DIRS=(/sys/fs/cgroup/unified/$NAME /sys/fs/cgroup/systemd/$NAME)
nspawn_pid="" pid1="" overlay=""
passed=0 failed=0 reason=""
started=$SECONDS

log() { printf '   %s\n' "$*"; }
die() {
  printf 'FAIL: %s\n' "$*"
  failed=$((failed + 1))
  exit 1
}
# why TEXT: what the check that is running found wrong (printed with its FAIL line).
why() {
  reason=$*
  return 1
}
# check NAME FUNCTION: runs one check and prints its PASS/FAIL line.
check() {
  local name=$1
  shift
  reason=""
  local t0=$SECONDS
  if "$@"; then
    passed=$((passed + 1))
    printf 'PASS: %s (%ds)\n' "$name" $((SECONDS - t0))
  else
    failed=$((failed + 1))
    printf 'FAIL: %s: %s\n' "$name" "${reason:-failed}"
  fi
}
# wait_until SECONDS COMMAND...: runs COMMAND every 0.2 s until it succeeds; false after SECONDS.
wait_until() {
  local end=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.2
  done
}

if [ "$(id -u)" -ne 0 ]; then
  [ "${CI:-}" = true ] && die "tests/systemd.sh needs root (CI=true: not skipping)"
  echo "systemd: SKIPPED (needs root)"
  exit 0
fi
for tool in debootstrap systemd-nspawn nsenter ip; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing: run scripts/install-deps.sh"
done
shopt -s nullglob
debs=(target/debian/allowsync_*.deb)
[ ${#debs[@]} -eq 1 ] || die "expected one target/debian/allowsync_*.deb (make deb), found ${#debs[@]}"
[ -x "$MOCK" ] || die "$MOCK is missing: cargo build --all-features --example mock_chat_api"

# ---- the root filesystem ------------------------------------------------------------------

# The Debian archive this host's apt uses (deb822 .sources first, then sources.list): the URI
# of the first entry that is not the security archive.
debian_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    uri=$(awk 'BEGIN { RS = ""; FS = "\n" }
      { u = ""; s = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { u = $i; sub(/^URIs:[ \t]*/, "", u); sub(/[ \t].*/, "", u) }
          if ($i ~ /^Types:/ && $i !~ /[ \t]deb([ \t]|$)/) u = "-"
        }
        if (u != "" && u != "-" && u !~ /security/) { print u; exit } }' "$f")
    [ -n "$uri" ] && { echo "$uri"; return 0; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" { sub(/\[[^]]*\][ \t]*/, ""); if ($2 !~ /security/) { print $2; exit } }' "$f")
    [ -n "$uri" ] && { echo "$uri"; return 0; }
  done
  return 1
}

build_rootfs() {
  local dir=$1 mirror=$2 include
  include=$(IFS=,; echo "${ROOTFS_PACKAGES[*]}")
  debootstrap --variant=minbase --include="$include" "$SUITE" "$dir" "$mirror" ||
    return 1
  chroot "$dir" apt-get clean &&
    chroot "$dir" apt-get update -qq &&
    chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --download-only \
      --no-install-recommends "${PREFETCH_PACKAGES[@]}" || return 1
  # A fixed machine id and a persistent journal: the journal of every boot stays readable.
  tr -d '-' </proc/sys/kernel/random/uuid >"$dir/etc/machine-id" && mkdir -p "$dir/var/log/journal"
}

# The cache is keyed by the package lists and the recipe above: a change to either rebuilds it.
key=$( (printf '%s\n' "$SUITE" "${ROOTFS_PACKAGES[*]}" "${PREFETCH_PACKAGES[*]}"; declare -f build_rootfs) |
  sha256sum)
key=${key:0:16}
CACHE=target/systemd-rootfs-$key
if [ ! -d "$CACHE" ]; then
  mirror=$(debian_mirror) || die "no Debian archive in /etc/apt/sources.list.d/*.sources or sources.list"
  log "building the $SUITE root filesystem from $mirror into $CACHE (once)"
  mkdir -p target
  tmp=$(mktemp -d "target/systemd-rootfs.tmp.XXXXXX")
  if ! build_rootfs "$tmp" "$mirror" >"$tmp.log" 2>&1; then
    cat "$tmp.log"
    rm -rf "$tmp" "$tmp.log"
    die "debootstrap failed"
  fi
  rm -f "$tmp.log"
  for old in target/systemd-rootfs-*; do rm -rf "$old"; done
  mv "$tmp" "$CACHE"   # only a finished tree ever has the cache's name
fi

# ---- the container ------------------------------------------------------------------------

cleanup() {
  local rc=$?
  stop_container
  for ns in "$NS_A" "$NS_S"; do ip netns del "$ns" 2>/dev/null; done
  if [ -n "$overlay" ]; then
    umount "$ROOT" 2>/dev/null || umount -l "$ROOT" 2>/dev/null
  fi
  for cg in "${CG_DIRS[@]}"; do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  rm -rf "$RUN"
  rmdir target/systemd-run 2>/dev/null
  echo
  echo "systemd: $((SECONDS - started)) s"
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ] && [ "$rc" -eq 0 ] && exit 0
  exit 1
}
trap cleanup EXIT
trap 'die interrupted' INT TERM

mkdir -p "$RUN/upper" "$RUN/work" "$ROOT"
# A copy-on-write view of the cache; a plain copy where overlayfs is not available.
if mount -t overlay overlay -o "lowerdir=$PWD/$CACHE,upperdir=$PWD/$RUN/upper,workdir=$PWD/$RUN/work" "$ROOT" 2>/dev/null; then
  overlay=1
else
  cp -a "$CACHE/." "$ROOT/" || die "cannot copy $CACHE"
fi

# c COMMAND...: runs COMMAND inside the container (all its namespaces, a clean environment).
c() {
  nsenter -t "$pid1" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
find_pid1() {
  local p
  for p in $(pgrep -P "$nspawn_pid" -x systemd); do pid1=$p; return 0; done
  return 1
}
booted() {
  local s
  s=$(c systemctl is-system-running 2>/dev/null)
  [ "$s" = running ] || [ "$s" = degraded ]
}
# Gone, or a zombie. The status file is read whole (it may vanish meanwhile: then it is gone).
exited() {
  local status
  status=$(cat "/proc/$1/status" 2>/dev/null) || return 0
  [[ $status =~ (^|$'\n')State:[^$'\n']*Z ]]
}

boot() {
  local cg
  for cg in "${CG_DIRS[@]}"; do mkdir -p "$cg" || die "cannot create cgroup $cg"; done
  # cgroup v2 inside needs nspawn in a cgroup of its own (v2 and the v1 name=systemd tree);
  # bpf() lets IPAddressDeny= work. See the reference for why each flag is there.
  (
    for cg in "${CG_DIRS[@]}"; do echo "$BASHPID" >"$cg/cgroup.procs"; done
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 exec systemd-nspawn -b -D "$ROOT" -M "$NAME" \
      --private-network --register=no --keep-unit --console=read-only --system-call-filter=bpf
  ) >>"$RUN/console.log" 2>&1 </dev/null &
  nspawn_pid=$!
  pid1=""
  wait_until 30 find_pid1 || die "the container's systemd did not start: $(tail -5 "$RUN/console.log")"
  wait_until 90 booted || die "the container did not finish booting: $(c systemctl --failed --no-legend)"
  [ "$(c systemctl is-system-running)" = running ] ||
    log "booted degraded; failed units: $(c systemctl --failed --no-legend --plain)"
}

stop_container() {
  [ -n "$nspawn_pid" ] || return 0
  if ! exited "$nspawn_pid"; then
    kill -TERM "$nspawn_pid" 2>/dev/null   # nspawn asks the container's systemd to power off
    if ! wait_until 60 exited "$nspawn_pid"; then
      log "the container did not power off: killing it"
      kill -KILL "$nspawn_pid" 2>/dev/null
    fi
  fi
  wait "$nspawn_pid" 2>/dev/null
  nspawn_pid="" pid1=""
}

# ---- what the checks share ----------------------------------------------------------------

KEY=sd-test-key-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
CONF=/etc/allowsync/config.yaml
LISTS=/etc/mock-chat/lists
USERSIGS=/var/lib/mock-chat/usersigs
V4=(203.0.113.0/24 198.51.100.7)   # what the mock serves (nettype 5), aggregated
V6=(2001:db8:6::/48)                 # nettype 6
STATIC=198.51.100.200                # the static source the reload adds
ALLOWED=198.51.100.7                 # the allowed client (in the list)
STRANGER=192.0.2.99                  # not in any list

# The daemon's configuration: the mock on loopback, BACKEND (YAML) as the backend.
write_config() {
  local backend=$1 extra=${2:-}
  cat >"$ROOT$CONF" <<EOF
# tests/systemd.sh
interval: 1h
jitter: 1s
state_file: /var/lib/allowsync/state.json
sources:
  - name: chat-sgp
    tencent_chat:
      endpoint: http://127.0.0.1:8089
      sdkappid: 1400000000
      identifier: administrator
      secret_key_file: /etc/allowsync/chat-sgp.key
      nettypes: [5, 6]
      timeout: 3s
$extra
backend:
$backend
log:
  format: text
  level: info
EOF
  c chgrp allowsync "$CONF" && c chmod 0640 "$CONF"
}
NFT_BACKEND='  nftables:
    table: allowsync
    set_v4: allow_v4
    set_v6: allow_v6
    enforce: { tcp_ports: [8089] }'
IPSET_BACKEND='  ipset:
    set_v4: allowsync_v4
    set_v6: allowsync_v6
    enforce: { tcp_ports: [8089] }'
STATIC_SOURCE="  - name: office
    static: [$STATIC]"

prop() { c systemctl show -p "$1" --value allowsync; }
active() { [ "$(prop ActiveState)" = active ]; }
# A journal cursor: the checks read only what was logged after it.
cursor() { c journalctl -n 1 --show-cursor -o cat -q | sed -n 's/^-- cursor: //p'; }
# logged CURSOR TEXT [journalctl options]: allowsync's journal after CURSOR (all of it for "-")
# holds TEXT.
logged() {
  local cur=$1 text=$2 out
  shift 2
  [ "$cur" = - ] || set -- --after-cursor="$cur" "$@"
  out=$(c journalctl -u allowsync -o cat --no-pager "$@") || return 1
  [[ $out == *"$text"* ]]
}
# The elements of nftables set $1 (of table inet allowsync), one per line.
nft_elements() {
  local out
  out=$(c nft list set inet allowsync "$1" 2>/dev/null) || return 1
  [[ $out == *"elements = {"* ]] || return 0
  out=${out#*elements = \{}
  out=${out%%\}*}
  tr -s ', \t\n' '\n\n\n\n' <<<"$out" | sed '/^$/d'
}
# The prefixes of ipset $1, one per line.
ipset_elements() {
  local out
  out=$(c ipset list -o save "$1" 2>/dev/null) || return 1
  awk '$1 == "add" { sub(/\/(32|128)$/, "", $3); print $3 }' <<<"$out"
}
# holds LISTER SET ELEMENT...: the set holds every ELEMENT (exactly as the lister prints it).
holds() {
  local lister=$1 set=$2 have e
  shift 2
  have=$("$lister" "$set") || return 1
  for e; do grep -qxF -- "$e" <<<"$have" || return 1; done
}
# count LISTER SET: how many elements the set holds.
count() {
  local have
  have=$("$1" "$2") || return 1
  grep -c . <<<"$have"
}
nft_full() { holds nft_elements allow_v4 "${V4[@]}" && holds nft_elements allow_v6 "${V6[@]}"; }
enforce_chain() { c nft list chain inet allowsync enforce >/dev/null 2>&1; }
mock_listening() { c bash -c 'exec 3<>/dev/tcp/127.0.0.1/8089' 2>/dev/null; }
start_mock() {
  c systemd-run --quiet --unit=mock-chat /usr/local/bin/mock_chat_api --listen 0.0.0.0:8089 \
    --key-file /etc/allowsync/chat-sgp.key --list-file "$LISTS" --record "$USERSIGS" ||
    die "cannot start the mock Chat API"
  wait_until 20 mock_listening || die "the mock Chat API does not listen: $(c journalctl -u mock-chat -o cat)"
}
stop_mock() { c systemctl stop mock-chat 2>/dev/null; }
# start_clean: a manual start from a clean slate (resets the failed state and the start limit).
start_clean() {
  c systemctl reset-failed allowsync 2>/dev/null
  c systemctl start allowsync
}
# apt-get in the container, which has no network: it finds only what its cache holds.
# (Not --no-download: with it, apt 2.6 cannot install a local .deb.)
c_apt() { c env DEBIAN_FRONTEND=noninteractive apt-get -y -q --no-install-recommends "$@"; }
usr1() { c systemctl kill -s USR1 --kill-who=main allowsync; }

# ---- the checks ---------------------------------------------------------------------------

check_start() {
  start_clean || why "systemctl start allowsync failed: $(c systemctl status allowsync --no-pager -l)" || return 1
  # Type=notify: `systemctl start` returns once READY=1 came, and STATUS= came with it.
  active || why "ActiveState is $(prop ActiveState) after start" || return 1
  [ -n "$(prop StatusText)" ] || why "no STATUS= after READY=1" || return 1
  nft_full || why "the sets do not hold the list: v4 [$(nft_elements allow_v4 | tr '\n' ' ')] v6 [$(nft_elements allow_v6 | tr '\n' ' ')]" || return 1
  enforce_chain || why "no enforcement chain" || return 1
  log "status: $(prop StatusText)"
}

# /etc/allowsync is read-only in the service's mount namespace, even to root.
check_config_dir_read_only() {
  local pid out
  pid=$(prop MainPID)
  [ "$pid" -gt 0 ] || why "no main pid" || return 1
  if out=$(c nsenter -t "$pid" -m -- touch /etc/allowsync/.write-probe 2>&1); then
    c nsenter -t "$pid" -m -- rm -f /etc/allowsync/.write-probe
    why "/etc/allowsync is writable inside the service"
    return 1
  fi
  [[ $out == *"Read-only file system"* ]] || why "unexpected: $out"
}

check_reload() {
  local cur pid
  cur=$(cursor) pid=$(prop MainPID)
  write_config "$NFT_BACKEND" "$STATIC_SOURCE"
  c systemctl reload allowsync || why "systemctl reload failed" || return 1
  wait_until 20 holds nft_elements allow_v4 "$STATIC" || why "the reloaded configuration's static entry is not in the set" || return 1
  logged "$cur" "SIGHUP: configuration reloaded" || why "no 'configuration reloaded' in the journal" || return 1
  [ "$(prop MainPID)" = "$pid" ] && active || why "the daemon was restarted or is not active"
}

check_broken_reload() {
  write_config "$NFT_BACKEND" "$STATIC_SOURCE
intervall: 5m"
  broken_reload
  local rc=$?
  write_config "$NFT_BACKEND" "$STATIC_SOURCE"
  return $rc
}
broken_reload() {
  local cur pid
  cur=$(cursor) pid=$(prop MainPID)
  c systemctl reload allowsync || why "systemctl reload failed" || return 1
  wait_until 20 logged "$cur" "the new configuration is invalid; keeping the old one" ||
    why "no 'keeping the old one' in the journal" || return 1
  [ "$(prop MainPID)" = "$pid" ] && active || why "the daemon was restarted or is not active" || return 1
  nft_full && holds nft_elements allow_v4 "$STATIC" || why "the sets changed"
}

# STATUS= says what the kernel holds, not what the state file says was last applied: entries
# added behind allowsync's back make the next sync a refused mass removal, which leaves them.
check_status_is_the_kernel() {
  local extra=(192.0.2.10 192.0.2.20 192.0.2.30 192.0.2.40 192.0.2.50 192.0.2.60 192.0.2.70
    192.0.2.80 192.0.2.90 192.0.2.110) cur want status
  cur=$(cursor)
  c nft add element inet allowsync allow_v4 "{ $(IFS=,; echo "${extra[*]}") }" || why "nft add element failed" || return 1
  want=$(count nft_elements allow_v4)
  usr1 || return 1
  wait_until 20 logged "$cur" "outcome=\"refused\"" || why "the sync was not refused" || return 1
  status=$(prop StatusText)
  log "status: $status"
  [[ $status == *"allow_v4 $want,"* ]] || why "STATUS= '$status' does not say allow_v4 $want (the kernel)" || return 1
  c nft delete element inet allowsync allow_v4 "{ $(IFS=,; echo "${extra[*]}") }" || why "nft delete element failed" || return 1
  cur=$(cursor)
  usr1 && wait_until 20 logged "$cur" "outcome=\"in-sync\"" || why "no in-sync sync after removing the extra entries"
}

# `nft flush ruleset`, no signal: allowsync notices it (nf_tables notifications) and puts the
# table, sets and enforcement chain back from memory, logged as a repair. The interval is
# minutes: only the notification can have done it within the wait.
check_flush_ruleset_repaired() {
  local cur
  cur=$(cursor)
  c nft flush ruleset || why "nft flush ruleset failed" || return 1
  repaired "$cur"
}

# `systemctl restart nftables` runs /etc/nftables.conf, which starts with `flush ruleset`: the
# same repair, without a signal.
check_nftables_restart_repaired() {
  local cur
  c systemctl enable --now nftables >/dev/null 2>&1 || why "cannot enable nftables.service" || return 1
  cur=$(cursor)
  c systemctl restart nftables || why "systemctl restart nftables failed" || return 1
  repaired "$cur"
}

# repaired CURSOR: the sets and the enforcement chain are back, and the journal since CURSOR
# has allowsync's repair line.
repaired() {
  wait_until 20 nft_full || why "the sets were not refilled" || return 1
  wait_until 20 enforce_chain || why "the enforcement chain was not put back" || return 1
  wait_until 20 logged "$1" "repaired allowsync's objects from memory" || why "no repair line in the journal"
}

status_says() { [[ $(prop StatusText) == *"$1"* ]]; }
restarted() { [ "$(prop NRestarts)" -gt "$1" ] && [ "$(prop MainPID)" != "$2" ] && [ "$(prop MainPID)" != 0 ] && active; }

check_watchdog() {
  local dropin=$ROOT/etc/systemd/system/allowsync.service.d
  mkdir -p "$dropin"
  printf '[Service]\nWatchdogSec=3s\nTimeoutAbortSec=3s\nRestartSec=1s\n' >"$dropin/watchdog.conf"
  watchdog
  local rc=$?
  rm -f "$dropin/watchdog.conf"
  c systemctl daemon-reload && c systemctl restart allowsync || why "restart without the drop-in failed" || return 1
  return $rc
}
watchdog() {
  c systemctl daemon-reload && c systemctl restart allowsync || why "restart with the watchdog drop-in failed" || return 1
  local cur n pid
  cur=$(cursor) n=$(prop NRestarts) pid=$(prop MainPID)
  c systemctl kill -s STOP --kill-who=main allowsync || why "cannot SIGSTOP $pid" || return 1
  wait_until 40 restarted "$n" "$pid" || why "not restarted after the watchdog expired: $(prop ActiveState)/$(prop SubState)" || return 1
  logged "$cur" "Watchdog timeout" ||
    why "no 'Watchdog timeout' in the journal" || return 1
  nft_full || why "the sets do not hold the list after the restart"
}

auto_restarting() { [ "$(prop SubState)" = auto-restart ]; }
check_kill_9() {
  local n pid
  n=$(prop NRestarts) pid=$(prop MainPID)
  c systemctl kill -s KILL --kill-who=main allowsync || why "cannot kill $pid" || return 1
  # The sets stay while the daemon is down (RestartSec=5s).
  if wait_until 10 auto_restarting; then
    nft_full || why "the sets were emptied while the daemon was down" || return 1
  fi
  wait_until 30 restarted "$n" "$pid" || why "not restarted after kill -9: $(prop ActiveState)/$(prop SubState)" || return 1
  nft_full || why "the sets do not hold the list after the restart"
}

# allowsync's warnings and errors reach the journal at their priority.
check_priorities() {
  local cur
  cur=$(cursor)
  stop_mock   # the API is down from here on
  usr1 || return 1
  if ! wait_until 20 logged "$cur" "source failed"; then
    why "no 'source failed' in the journal at all"
    return 1
  fi
  logged "$cur" "source failed" -p warning ||
    why "journalctl -p warning -u allowsync shows no 'source failed': it was stored at a lower priority" || return 1
  if logged "$cur" "source failed" -p err; then
    why "a warning was stored as an error"
    return 1
  fi
  wait_until 10 status_says "a source failed" || why "STATUS= '$(prop StatusText)' does not say a source failed" || return 1
  # The broken reload's error, logged earlier, at priority err.
  logged - "the new configuration is invalid" -p err ||
    why "journalctl -p err -u allowsync shows no 'the new configuration is invalid'"
}

check_reboot_restores() {
  c systemctl enable allowsync >/dev/null 2>&1 || why "cannot enable allowsync" || return 1
  stop_container
  boot   # the mock is not started again: the API is down
  wait_until 60 active || why "allowsync is not active after the reboot: $(prop ActiveState)/$(prop SubState)" || return 1
  nft_full || why "the allowlist was not restored: v4 [$(nft_elements allow_v4 | tr '\n' ' ')]" || return 1
  holds nft_elements allow_v4 "$STATIC" || why "the static entry was not restored" || return 1
  logged - "restored the last good allowlist from the state file" -b ||
    why "no 'restored the last good allowlist' in this boot's journal"
}

# fails_once TEXT: `systemctl start` fails, no restart is scheduled, and status shows TEXT.
fails_once() {
  local text=$1 n status
  c systemctl stop allowsync
  n=$(prop NRestarts)
  if start_clean 2>/dev/null; then why "systemctl start succeeded"; return 1; fi
  [ "$(prop ActiveState)/$(prop SubState)" = failed/failed ] ||
    why "the unit is $(prop ActiveState)/$(prop SubState) (a restart is scheduled), not failed/failed" || return 1
  [ "$(prop NRestarts)" = "$n" ] || why "NRestarts went from $n to $(prop NRestarts)" || return 1
  status=$(c systemctl status allowsync --no-pager -l -n 20 2>&1)
  grep -qE -- "$text" <<<"$status" || why "systemctl status does not show /$text/: $status" || return 1
  log "status: $(grep -m1 -E -- "$text" <<<"$status")"
}

check_config_error_fails_once() {
  write_config "$NFT_BACKEND" "$STATIC_SOURCE
intervall: 5m"
  fails_once "$CONF:[0-9]+:[0-9]+"
  local rc=$?
  write_config "$NFT_BACKEND" "$STATIC_SOURCE"
  return $rc
}

check_missing_key_fails_once() {
  mv "$ROOT/etc/allowsync/chat-sgp.key" "$RUN/key.aside" || return 1
  fails_once "/etc/allowsync/chat-sgp.key"
  local rc=$?
  mv "$RUN/key.aside" "$ROOT/etc/allowsync/chat-sgp.key"
  return $rc
}

# connects NS ADDR: a TCP connection from namespace NS to ADDR:8089 (the mock) completes within
# 3 s (a dropped SYN never does).
connects() { ip netns exec "$1" timeout 3 bash -c "exec 3<>/dev/tcp/$2/8089" 2>/dev/null; }
# A client namespace NS with address ADDR/24, on a veth into the container (which gets .1).
add_peer() {
  local ns=$1 addr=$2 dev=$3 host=${2%.*}.1
  ip netns add "$ns" && ip -n "$ns" link set lo up &&
    ip -n "$ns" link add "p$dev" type veth peer name "c$dev" netns "$pid1" &&
    ip -n "$ns" addr add "$addr/24" dev "p$dev" && ip -n "$ns" link set "p$dev" up &&
    c ip addr add "$host/24" dev "c$dev" && c ip link set "c$dev" up
}
ipset_full() { holds ipset_elements allowsync_v4 "${V4[@]}" "$STATIC" && holds ipset_elements allowsync_v6 "${V6[@]}"; }
ipset_rules() {
  local out
  out=$(c iptables -t mangle -S 2>/dev/null) || return 1
  # Every rule allowsync writes carries its mark (a comment match).
  [[ $out == *'-A PREROUTING -m comment --comment "managed by allowsync" -j ALLOWSYNC'* &&
     $out == *'--match-set allowsync_v4 src -m comment --comment "managed by allowsync" -j DROP'* ]]
}

# The ipset backend with enforce under the unit: the sets are filled even while the rules
# cannot be installed (a foreign ALLOWSYNC chain), then the rules drop a stranger's TCP
# connection and let the allowed client's through.
check_ipset_enforce() {
  c systemctl stop allowsync
  c allowsync -c "$CONF" teardown >/dev/null || why "allowsync teardown (nftables) failed" || return 1
  c_apt install ipset iptables >"$RUN/apt-ipset.log" 2>&1 ||
    why "installing ipset and iptables failed: $(tail -5 "$RUN/apt-ipset.log")" || return 1
  start_mock
  write_config "$IPSET_BACKEND" "$STATIC_SOURCE"
  add_peer "$NS_A" "$ALLOWED" a && add_peer "$NS_S" "$STRANGER" s || why "cannot set up the client namespaces" || return 1
  c iptables -t mangle -N ALLOWSYNC && c iptables -t mangle -A ALLOWSYNC -j ACCEPT || why "cannot create the foreign chain" || return 1
  local cur
  cur=$(cursor)
  start_clean || why "systemctl start failed: $(c systemctl status allowsync --no-pager -l)" || return 1
  ipset_full || why "the ipsets were not filled while the rules failed: v4 [$(ipset_elements allowsync_v4 | tr '\n' ' ')]" || return 1
  wait_until 20 logged "$cur" "holds rules allowsync did not write" -p err ||
    why "the rule failure is not logged as an error" || return 1
  wait_until 20 connects "$NS_S" "${STRANGER%.*}.1" || why "the stranger cannot connect even without enforcement" || return 1
  c iptables -t mangle -F ALLOWSYNC && c iptables -t mangle -X ALLOWSYNC || why "cannot remove the foreign chain" || return 1
  usr1 || return 1
  wait_until 20 ipset_rules || why "the enforcement rules were not installed: $(c journalctl -u allowsync --after-cursor="$cur" -o cat -p warning | tail -3)" || return 1
  ipset_full || why "the ipsets do not hold the list" || return 1
  wait_until 20 connects "$NS_A" "${ALLOWED%.*}.1" || why "the allowed client $ALLOWED cannot connect" || return 1
  if connects "$NS_S" "${STRANGER%.*}.1"; then why "the stranger $STRANGER connected"; return 1; fi
}

# The key, every usersig the daemon sent and each one's TLS.sig are nowhere in the journal.
check_secrets_absent() {
  stop_mock   # writes the usersigs it received
  local secrets=() s found=0
  [ -s "$ROOT$USERSIGS" ] || why "the mock recorded no usersig" || return 1
  mapfile -t secrets <"$ROOT$USERSIGS"
  secrets+=("$KEY")
  c journalctl -o export --no-pager >"$RUN/journal.export" || why "cannot export the journal" || return 1
  grep -aq "allowsync" "$RUN/journal.export" || why "the exported journal has no allowsync entries" || return 1
  for s in "${secrets[@]}"; do
    [ -n "$s" ] || continue
    if grep -aqF -- "$s" "$RUN/journal.export"; then found=$((found + 1)); fi
  done
  log "${#secrets[@]} secrets (the key, usersigs and TLS.sigs) looked for in $(wc -l <"$RUN/journal.export") journal lines"
  [ "$found" -eq 0 ] || why "$found of ${#secrets[@]} secrets are in the journal"
}

# ---- the run ------------------------------------------------------------------------------

log "booting $CACHE as $NAME"
boot
cp "${debs[0]}" "$ROOT/root/allowsync.deb" && install -m 0755 "$MOCK" "$ROOT/usr/local/bin/mock_chat_api" ||
  die "cannot copy the package and the mock into the container"
# As the README says, from the apt cache: Depends are resolved, maintainer scripts run.
c_apt install /root/allowsync.deb >"$RUN/apt.log" 2>&1 || die "apt-get install failed: $(cat "$RUN/apt.log")"
install -m 0600 /dev/null "$ROOT/etc/allowsync/chat-sgp.key" && printf '%s\n' "$KEY" >"$ROOT/etc/allowsync/chat-sgp.key"
mkdir -p "$ROOT/etc/mock-chat" "$ROOT/var/lib/mock-chat"
printf '5=203.0.113.0/25,203.0.113.128/25,198.51.100.7\n6=2001:db8:6::/48\n' >"$ROOT$LISTS"
write_config "$NFT_BACKEND"
start_mock

check "start reaches active on READY=1 and the sets hold the list" check_start
check "/etc/allowsync is read-only inside the service" check_config_dir_read_only
check "reload applies the new configuration" check_reload
check "a broken reload keeps the old configuration" check_broken_reload
check "STATUS= reports what the kernel holds" check_status_is_the_kernel
check "nft flush ruleset is repaired without a signal" check_flush_ruleset_repaired
check "systemctl restart nftables is repaired without a signal" check_nftables_restart_repaired
check "the watchdog kills a hung daemon and systemd restarts it" check_watchdog
check "kill -9 is restarted, the sets stay" check_kill_9
check "journalctl -p warning / -p err show allowsync's warnings and errors" check_priorities
check "a reboot with the API down restores the allowlist from the state file" check_reboot_restores
check "a configuration error fails once, status shows file:line:column" check_config_error_fails_once
check "a missing key fails once, status names the file" check_missing_key_fails_once
check "ipset + enforce: sets filled despite a rule failure, stranger dropped, client allowed" check_ipset_enforce
check "the key and the usersigs are absent from the whole journal" check_secrets_absent
