# allowsync: every entry point a developer or CI needs. See README.md.
#   make demo   installs what it needs, builds, runs the daemon against the mock Chat API
#   make test   installs what it needs, then fmt, clippy and every test
#   make bench  (root) performance figures in a private network namespace -> target/bench/results.json
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build lint test demo bench clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release --locked

lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --all-features --locked -- -D warnings

test: lint
	$(CARGO) test --all-features --locked

demo: deps
	$(CARGO) build --release --locked --features mock --bin allowsync --example mock_chat_api
	@scripts/demo.sh

bench: deps
	$(CARGO) build --release --locked --bin allowsync
	mkdir -p target/bench && cp target/release/allowsync target/bench/allowsync
	$(CARGO) bench --locked --features mock --bench bench

clean:
	$(CARGO) clean
