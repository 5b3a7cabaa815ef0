# allowsync: every entry point a developer or CI needs. See README.md.
#   make demo   installs what it needs, builds, runs the daemon against the mock Chat API
#   make test   installs what it needs, then fmt, clippy, every test (the fuzz corpora too), the
#               packaging checks and the packages under a real systemd (tests/systemd.sh)
#   make deb    builds target/debian/allowsync_*.deb (make rpm: target/generate-rpm/*.rpm)
#   make fuzz   runs each fuzz target for FUZZ_SECONDS (default 60) on the stable toolchain
#   make bench  (root) performance figures in a private network namespace -> target/bench/results.json
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build lint test fuzz demo bench clean man deb rpm packages test-packaging test-systemd

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release --locked

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features --locked -- -D warnings

test: lint
	$(CARGO) test --all-features --locked
	$(MAKE) test-packaging
	$(MAKE) test-systemd

# Packaging. `build` (one release build) also generates the man page and completions into
# $(ASSETS) (build.rs); the packages are made from that build, never a second one.
ASSETS := target/release/assets

man: build
	gzip -9n -c $(ASSETS)/allowsync.8 > $(ASSETS)/allowsync.8.gz

deb: man
	$(CARGO) deb --no-build

rpm: man
	$(CARGO) generate-rpm

packages: deb rpm

# The unit's hardening score and verify, the packages' contents, lintian: tests/packaging.sh.
test-packaging: packages
	tests/packaging.sh

# The .deb installed and run under systemd 252 as PID 1 in a Debian 12 container (root; the root
# filesystem is built once and cached under target/), against the mock Chat API: tests/systemd.sh.
# The mock is the debug build `cargo test --all-features` already made.
test-systemd: deb
	$(CARGO) build --all-features --locked --example mock_chat_api
	tests/systemd.sh

fuzz: deps
	@scripts/fuzz.sh

demo: deps
	$(CARGO) build --release --locked --bin allowsync --example mock_chat_api
	@scripts/demo.sh

bench: deps
	$(CARGO) build --release --locked --bin allowsync
	mkdir -p target/bench && cp target/release/allowsync target/bench/allowsync
	$(CARGO) bench --locked --bench bench

clean:
	$(CARGO) clean
