# allowsync: every entry point a developer or CI needs. See README.md.
#   make demo   installs what it needs, builds, runs the daemon against the mock Chat API
#   make test   installs what it needs, then fmt, clippy and every test (the fuzz corpora too)
#   make fuzz   runs each fuzz target for FUZZ_SECONDS (default 60) on the stable toolchain
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build lint test fuzz demo clean

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

fuzz: deps
	@scripts/fuzz.sh

demo: deps
	$(CARGO) build --release --locked --features mock --bin allowsync --example mock_chat_api
	@scripts/demo.sh

clean:
	$(CARGO) clean
