#!/usr/bin/env bash
# Packaging checks, run by `make test` after `make packages` (one release build, the .deb and
# the .rpm). Every check prints what it found; any failure exits non-zero.
#
#   1. systemd-analyze security --offline=true systemd/allowsync.service: exposure <= 1.6
#   2. systemd-analyze verify: nothing to say (on a copy whose ExecStart= points at the built
#      binary, since /usr/bin/allowsync is not installed on a build host)
#   3. the .deb: files, modes, conffile, Depends/Recommends/Suggests, maintainer scripts that neither
#      enable nor start the service
#   4. lintian: no errors (warnings are listed)
#   5. the .rpm: present, and its file list when `rpm` is installed
#
# Under pipefail no producer may be piped into a consumer that stops reading early (`head`,
# `grep -q`, `awk '... exit'`): the producer then dies of SIGPIPE (exit 141) whenever it is still
# writing, which depends on timing and output size. Such consumers read a variable instead
# (tests/scripts.rs checks this).
set -euo pipefail
trap 'echo "packaging: ABORTED at line $LINENO (exit $?)" >&2' ERR
cd "$(dirname "$0")/.."

# 1.5 with CAP_NET_ADMIN alone; CAP_NET_RAW, which the ipset backend's iptables set match needs
# (see the unit), costs 0.1.
MAX_EXPOSURE=1.6
UNIT=systemd/allowsync.service
BIN=target/release/allowsync
ASSETS=target/release/assets

failures=0
ok() { printf '  ok    %s\n' "$*"; }
fail() {
  printf '  FAIL  %s\n' "$*" >&2
  failures=$((failures + 1))
}
section() { printf '\n== %s\n' "$*"; }

section "unit: systemd-analyze security --offline=true $UNIT"
security=$(systemd-analyze security --offline=true "$UNIT" 2>&1) || true
score=$(sed -n 's/.*Overall exposure level for allowsync.service: \([0-9.]*\).*/\1/p' <<<"$security")
printf '%s\n' "$security" | grep -a '✗' || true
if [ -z "$score" ]; then
  printf '%s\n' "$security" >&2
  fail "no exposure score in the output"
elif awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }'; then
  ok "exposure $score (bar: <= $MAX_EXPOSURE)"
else
  fail "exposure $score is above $MAX_EXPOSURE"
fi

section "unit: systemd-analyze verify"
[ -x "$BIN" ] || { fail "$BIN is missing: run make packages first"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# verify checks that every Exec*= binary exists: point them at the build. The copy keeps the
# unit's name, which LoadCredential= and the credential path depend on.
sed "s#/usr/bin/allowsync#$PWD/$BIN#g" "$UNIT" >"$tmp/allowsync.service"
# verify also runs `man` for Documentation=man:allowsync(8): show it the generated page.
mkdir -p "$tmp/man/man8"
cp "$ASSETS/allowsync.8" "$tmp/man/man8/"
verify_args=()
command -v man >/dev/null 2>&1 || verify_args+=(--man=no)
verify_out=$(cd "$tmp" && MANPATH="$tmp/man" systemd-analyze verify "${verify_args[@]}" ./allowsync.service 2>&1) || {
  printf '%s\n' "$verify_out" >&2
  fail "systemd-analyze verify failed"
}
if [ -n "$verify_out" ]; then
  printf '%s\n' "$verify_out" >&2
  fail "systemd-analyze verify has something to say"
else
  ok "verify: no findings${verify_args:+ (${verify_args[*]}: man is not installed)}"
fi
for key in "Type=notify" "WatchdogSec=" "TimeoutStopSec=" "ExecReload=/bin/kill -HUP \$MAINPID" \
  "Restart=on-failure" "RestartPreventExitStatus=2" "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW" \
  "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW" \
  "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6" "StateDirectory=allowsync" \
  "LoadCredential=chat-sgp.key:/etc/allowsync/chat-sgp.key" "SetCredential=chat-sgp.key:\\n" \
  "Before=network-pre.target"; do
  if grep -qF -- "$key" "$UNIT"; then ok "unit has $key"; else fail "unit lacks $key"; fi
done
# What tests/systemd.sh found wrong under a real systemd: a check-config pre-step is restarted
# despite RestartPreventExitStatus=2 (main process only); ConfigurationDirectory= mounts
# /etc/allowsync read-write under ProtectSystem=strict.
for key in "ExecStartPre=/usr/bin/allowsync" "ConfigurationDirectory="; do
  if grep -q "^$key" "$UNIT"; then fail "unit has $key"; else ok "unit has no $key"; fi
done
if grep -q '^PrivateNetwork=yes\|^PrivateUsers=yes' "$UNIT"; then
  fail "PrivateNetwork=/PrivateUsers= would hide the host's firewall from netlink"
fi
# The unit's credential must carry the file name of the example's secret_key_file: allowsync
# reads $CREDENTIALS_DIRECTORY/<that name> in its place under systemd.
if grep -q 'secret_key_file: /etc/allowsync/chat-sgp.key' config/allowsync.yaml &&
   grep -q '^LoadCredential=chat-sgp.key:/etc/allowsync/chat-sgp.key' "$UNIT"; then
  ok "config/allowsync.yaml's key file is the unit's credential chat-sgp.key"
else
  fail "config/allowsync.yaml's secret_key_file and the unit's LoadCredential= do not match"
fi

section "deb"
shopt -s nullglob
debs=(target/debian/allowsync_*.deb)
[ ${#debs[@]} -eq 1 ] || { fail "expected one target/debian/allowsync_*.deb, found ${#debs[@]}"; exit 1; }
deb=${debs[0]}
echo "$deb ($(du -h "$deb" | cut -f1))"
contents=$(dpkg-deb -c "$deb")
info=$(dpkg-deb -I "$deb")
printf '%s\n' "$contents" | awk '{ print "  " $1, $2, $6 }'
printf '%s\n' "$info" | grep -E '^ (Package|Version|Depends|Recommends|Installed-Size):'

# path, expected permissions
expect=(
  "./usr/bin/allowsync -rwxr-xr-x"
  "./usr/lib/systemd/system/allowsync.service -rw-r--r--"
  "./usr/lib/sysusers.d/allowsync.conf -rw-r--r--"
  "./etc/allowsync/config.yaml -rw-r-----"
  "./usr/share/man/man8/allowsync.8.gz -rw-r--r--"
  "./usr/share/bash-completion/completions/allowsync -rw-r--r--"
  "./usr/share/zsh/vendor-completions/_allowsync -rw-r--r--"
  "./usr/share/fish/vendor_completions.d/allowsync.fish -rw-r--r--"
  "./usr/share/doc/allowsync/copyright -rw-r--r--"
)
for e in "${expect[@]}"; do
  path=${e% *}
  mode=${e##* }
  got=$(printf '%s\n' "$contents" | awk -v p="$path" '$6 == p { print $1 }')
  if [ -z "$got" ]; then
    fail "$path is not in the package"
  elif [ "$got" != "$mode" ]; then
    fail "$path has mode $got, want $mode"
  else
    ok "$path $got"
  fi
done
if awk '$6 == "./etc/allowsync/config.yaml" { exit !($1 ~ /---$/) }' <<<"$contents"; then
  ok "the configuration is not world-readable"
else
  fail "the configuration is world-readable"
fi

ctl="$tmp/control"
dpkg-deb -e "$deb" "$ctl"
if grep -qx /etc/allowsync/config.yaml "$ctl/conffiles"; then
  ok "conffile /etc/allowsync/config.yaml"
else
  fail "/etc/allowsync/config.yaml is not a conffile"
fi
# The packaged unit and configuration are the repository's.
x="$tmp/x"
dpkg-deb -x "$deb" "$x"
cmp -s "$x/usr/lib/systemd/system/allowsync.service" "$UNIT" && ok "the packaged unit is $UNIT" ||
  fail "the packaged unit differs from $UNIT"
cmp -s "$x/etc/allowsync/config.yaml" config/allowsync.yaml && ok "the packaged configuration is config/allowsync.yaml" ||
  fail "the packaged configuration differs from config/allowsync.yaml"
man_page=$(zcat "$x/usr/share/man/man8/allowsync.8.gz")
if grep -q '^\.TH allowsync 8' <<<"$man_page"; then
  ok "allowsync(8): section 8"
else
  fail "the man page is not allowsync(8)"
fi
for s in "EXIT STATUS" FILES COMMANDS; do
  grep -q "^\.SH \"*$s" <<<"$man_page" && ok "allowsync(8) has $s" ||
    fail "allowsync(8) lacks a $s section"
done
bash -n "$x/usr/share/bash-completion/completions/allowsync" && ok "bash completion parses" ||
  fail "the bash completion does not parse"
for c in "$x/usr/share/bash-completion/completions/allowsync" "$x/usr/share/zsh/vendor-completions/_allowsync" \
  "$x/usr/share/fish/vendor_completions.d/allowsync.fish"; do
  grep -q check-config "$c" && ok "$(basename "$c") completes check-config" || fail "$c lacks check-config"
done

depends=$(sed -n 's/^Depends: //p' "$ctl/control")
recommends=$(sed -n 's/^Recommends: //p' "$ctl/control")
suggests=$(sed -n 's/^Suggests: //p' "$ctl/control")
# Every shared library the binary links must come from a package in Depends, or one that a
# package in Depends itself depends on (libgcc-s1 comes with libc6).
needed=$(readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
provided=$depends
for p in $(tr ',|' '\n\n' <<<"$depends" | awk '{ print $1 }'); do
  provided+=", $(dpkg-query -W -f='${Depends}, ${Pre-Depends}' "$p" 2>/dev/null || true)"
done
ld_cache=$(ldconfig -p)
for lib in $needed; do
  path=$(awk -v l="$lib" '$1 == l { print $NF; exit }' <<<"$ld_cache")
  # On merged-/usr systems ldconfig may name /lib/... while dpkg knows /usr/lib/...: try both.
  pkg=""
  for candidate in "$path" "/usr$path" "$(readlink -f "$path")"; do
    # "libc6:amd64: /usr/lib/x86_64-linux-gnu/libm.so.6": the package is up to the first colon.
    if owner=$(dpkg -S "$candidate" 2>/dev/null); then
      pkg=${owner%%:*}
      break
    fi
  done
  if [ -z "$pkg" ]; then
    fail "cannot find the package of $lib ($path)"
  elif grep -qw -- "$pkg" <<<"$depends"; then
    ok "links $lib: Depends has $pkg"
  elif grep -qw -- "$pkg" <<<"$provided"; then
    ok "links $lib: $pkg comes with a package in Depends"
  else
    fail "links $lib from $pkg, which Depends ($depends) lacks"
  fi
done
if grep -q libnftnl <<<"$needed"; then
  grep -q libnftnl <<<"$depends" && ok "Depends includes libnftnl" || fail "Depends lacks libnftnl"
else
  echo "  note  this build does not link libnftnl (no nftables backend compiled in): nothing to require"
fi
# ExecReload= runs /bin/kill, which comes with procps (tests/systemd.sh: a minimal Debian has none).
grep -qw procps <<<"$depends" && ok "Depends includes procps (/bin/kill)" || fail "Depends lacks procps (/bin/kill)"
# The ipset backend needs no `ipset` program (netlink), only iptables for its enforcement rules.
[ "$recommends" = "nftables | iptables" ] && ok "Recommends: $recommends" || fail "Recommends is '$recommends', want 'nftables | iptables'"
[ "$suggests" = "ipset" ] && ok "Suggests: $suggests" || fail "Suggests is '$suggests', want 'ipset'"

# Installing must not enable or start the service: the only enable is the one that restores a
# previous enablement, the only restart a try-restart on upgrade.
scripts=$(cat "$ctl"/preinst "$ctl"/postinst "$ctl"/prerm "$ctl"/postrm 2>/dev/null || true)
if grep -nE 'deb-systemd-invoke +(start|restart|reload)|systemctl[^|]* (start|enable|restart)' <<<"$scripts"; then
  fail "a maintainer script starts or enables the service"
else
  ok "no maintainer script starts the service"
fi
enables=$(grep -c 'deb-systemd-helper enable' <<<"$scripts" || true)
guards=$(grep -c 'deb-systemd-helper --quiet was-enabled' <<<"$scripts" || true)
if [ "$enables" -eq "$guards" ]; then
  ok "enable only where it was enabled before ($enables)"
else
  fail "deb-systemd-helper enable without a was-enabled guard"
fi
grep -q 'systemd-sysusers' "$ctl/postinst" && ok "postinst creates the allowsync user" ||
  fail "postinst does not run systemd-sysusers"

section "lintian"
lintian_out=$(lintian --fail-on none "$deb" 2>&1)
printf '%s\n' "${lintian_out:-  (nothing)}"
errors=$(grep -c '^E:' <<<"$lintian_out" || true)
warnings=$(grep -c '^W:' <<<"$lintian_out" || true)
if [ "$errors" -eq 0 ]; then
  ok "lintian: $errors errors, $warnings warnings"
else
  fail "lintian: $errors errors, $warnings warnings"
fi

section "rpm"
rpms=(target/generate-rpm/allowsync-*.rpm)
if [ ${#rpms[@]} -ne 1 ]; then
  fail "expected one target/generate-rpm/allowsync-*.rpm, found ${#rpms[@]}"
else
  rpmfile=${rpms[0]}
  if [ "$(head -c 4 "$rpmfile" | od -An -tx1 | tr -d ' \n')" = "edabeedb" ]; then
    ok "$rpmfile ($(du -h "$rpmfile" | cut -f1)) is an RPM"
  else
    fail "$rpmfile is not an RPM"
  fi
  if command -v rpm >/dev/null 2>&1; then
    rpm_files=$(rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpmfile")
    printf '%s\n' "$rpm_files" | sed 's/^/  /'
    for e in "-rwxr-xr-x root:root /usr/bin/allowsync" \
      "-rw-r--r-- root:root /usr/lib/systemd/system/allowsync.service" \
      "-rw-r----- root:allowsync /etc/allowsync/config.yaml" \
      "-rw-r--r-- root:root /usr/share/man/man8/allowsync.8.gz"; do
      read -r mode owner path <<<"$e"
      if awk -v m="$mode" -v o="$owner" -v p="$path" '$1 == m && $2 == o && $NF == p { f = 1 } END { exit !f }' <<<"$rpm_files"; then
        ok "rpm: $e"
      else
        fail "rpm: want $e"
      fi
    done
    grep -q ' cn /etc/allowsync/config.yaml$' <<<"$rpm_files" && ok "rpm: config(noreplace) /etc/allowsync/config.yaml" ||
      fail "rpm: /etc/allowsync/config.yaml is not %config(noreplace)"
    rpm_requires=$(rpm -qpR "$rpmfile")
    rpm_recommends=$(rpm -qp --recommends "$rpmfile")
    rpm_suggests=$(rpm -qp --suggests "$rpmfile")
    grep -q '^libc.so.6' <<<"$rpm_requires" && ok "rpm: auto-req found the shared libraries" ||
      fail "rpm: no shared-library Requires"
    grep -qx '(nftables or iptables)' <<<"$rpm_recommends" && ok "rpm: Recommends (nftables or iptables)" ||
      fail "rpm: Recommends lacks (nftables or iptables)"
    grep -qx 'ipset' <<<"$rpm_suggests" && ok "rpm: Suggests ipset" || fail "rpm: Suggests lacks ipset"
    if rpm -qp --scripts "$rpmfile" | grep -nE 'systemctl[^|]* (start|enable|preset)'; then
      fail "an rpm scriptlet starts or enables the service"
    else
      ok "rpm: no scriptlet starts or enables the service"
    fi
  else
    echo "  note  rpm is not installed: the RPM's file list is not inspected"
  fi
fi

echo
if [ "$failures" -ne 0 ]; then
  echo "packaging: $failures check(s) FAILED" >&2
  exit 1
fi
echo "packaging: all checks passed (exposure $score)"
