#!/usr/bin/env bash
# Installs what building, testing and the demo need, when it is missing. Debian 12 / Ubuntu,
# as root. Safe to run again: it installs nothing that is already there.
set -euo pipefail

packages=(pkg-config libnftnl-dev libmnl-dev nftables ipset iptables iproute2 util-linux procps)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages: ${missing[*]}; run as root or install them yourself" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found: install Rust 1.85 or newer (https://rustup.rs), then run make again" >&2
  exit 1
fi
