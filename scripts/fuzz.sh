#!/usr/bin/env bash
# `make fuzz`: builds the libFuzzer targets of fuzz/ and runs each for FUZZ_SECONDS (default 60).
#
# Stable toolchain only, without cargo-fuzz: cargo-fuzz's one nightly-only ingredient is
# `-Zsanitizer=address`, and Rust code needs no ASan to be memory safe. What libFuzzer needs is
# the coverage instrumentation, and rustc's `-Cpasses=sancov-module` / `-Cllvm-args=-sanitizer-
# coverage-*` flags are stable; libfuzzer-sys builds libFuzzer itself with the C++ compiler.
# These are the flags cargo-fuzz passes with `--sanitizer none`. `--target` keeps them off build
# scripts and proc macros.
#
# Inputs found along the way go to fuzz/work/<target>/ (not committed); crashes to
# fuzz/artifacts/<target>/. A crash input worth keeping goes to fuzz/regressions/<target>/,
# which `make test` replays (tests/fuzz_corpus.rs) together with the seeds in fuzz/corpus/.
#
#   FUZZ_SECONDS=300 make fuzz            # longer
#   FUZZ_TARGETS="usersig state" make fuzz # some targets only
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

if ! command -v c++ >/dev/null 2>&1; then
    echo "fuzz: libfuzzer-sys builds libFuzzer with a C++ compiler: apt-get install g++" >&2
    exit 1
fi

seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"get_ip_list entry config usersig state"}
triple=$(rustc -vV | sed -n 's/^host: //p')

export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# shellcheck disable=SC2086 # the target list is meant to split
cargo build --release --locked --target "$triple" $(printf -- '--bin %s ' $targets)

status=0
for t in $targets; do
    mkdir -p "work/$t" "artifacts/$t"
    echo "== fuzzing $t for ${seconds}s"
    # work/ first: libFuzzer writes new inputs to the first directory only, so the committed
    # seeds stay as they are. -timeout: one input taking 10 s is a finding (a hang).
    if ! "target/$triple/release/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -max_len=65536 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        "work/$t" "corpus/$t" $( [ -d "regressions/$t" ] && echo "regressions/$t" ) >"work/$t.log" 2>&1; then
        echo "!! $t: crashed; input in fuzz/artifacts/$t/, log in fuzz/work/$t.log"
        tail -40 "work/$t.log"
        status=1
    fi
    grep -E '^stat::(number_of_executed_units|peak_rss_mb|new_units_added)' "work/$t.log" || true
done
exit $status
