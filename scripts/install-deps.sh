#!/usr/bin/env bash
# Installs what building, testing and the demo need, when it is missing. Debian 12 / Ubuntu,
# as root. Safe to run again: it installs nothing that is already there.
set -euo pipefail

# lintian, rpm (to inspect the .rpm), binutils (readelf, strip) and man-db: the packaging checks
# (tests/packaging.sh). debootstrap, debian-archive-keyring, systemd-container (systemd-nspawn)
# and util-linux (nsenter): the packages under a real systemd (tests/systemd.sh). strace: the
# file backend's crash test stops a process at its rename (tests/file_backend.rs).
packages=(pkg-config libnftnl-dev libmnl-dev nftables ipset iptables iproute2 util-linux procps strace
  lintian rpm binutils man-db debootstrap debian-archive-keyring systemd-container)
# dpkg-query's whole answer is captured, then matched: no consumer in a pipe that could stop early.
installed() { [[ "$(dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null)" == *"install ok installed"* ]]; }
missing=()
for p in "${packages[@]}"; do
  installed "$p" || missing+=("$p")
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

# The packagers, from crates.io, pinned (both build with Rust 1.85+), only when missing.
cargo_tool() {
  local bin=$1 crate=$2 version=$3
  if ! command -v "$bin" >/dev/null 2>&1; then
    echo "install-deps: cargo install $crate $version"
    cargo install --locked --quiet --version "$version" "$crate"
  fi
}
cargo_tool cargo-deb cargo-deb 3.8.0
cargo_tool cargo-generate-rpm cargo-generate-rpm 0.21.1
