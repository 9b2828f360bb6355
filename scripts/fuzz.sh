#!/usr/bin/env bash
# Fuzzing with cargo-fuzz (libFuzzer, nightly): docs/fuzzing.md.
#   scripts/fuzz.sh smoke              every target for $TALLY_FUZZ_SMOKE_S seconds (default 20) over
#                                      the committed corpora; what it finds stays out of the repo
#   scripts/fuzz.sh run TARGET SECONDS one target, adding what it finds to fuzz/corpus/TARGET
#   scripts/fuzz.sh list               the targets
# cargo-fuzz is installed once into ~/.cache/tally/cargo-fuzz; builds go to ~/.cache/tally/fuzz-target.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

CACHE=${TALLY_CACHE:-$HOME/.cache/tally}
CARGO_FUZZ_VERSION=0.13.2
TARGETS=(decode_message signed_note receipt tile token_file budgets_file sql_gate)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz.sh: the nightly toolchain is required (libFuzzer's sanitizer flags): rustup toolchain install nightly" >&2
  exit 1
fi
export PATH="$CACHE/cargo-fuzz/bin:$PATH"
if ! cargo-fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION into $CACHE/cargo-fuzz (once)" >&2
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$CACHE/cargo-fuzz" >&2
fi
# The main build's settings are not the fuzz build's: it has a target directory of its own.
unset CARGO_TARGET_DIR
# `--target-dir` goes right after the subcommand: after `--` libFuzzer would take its path for a
# corpus directory, and write what it finds among the build's files.
fuzz() { local sub=$1; shift; cargo +nightly fuzz "$sub" --target-dir "$CACHE/fuzz-target" "$@"; }

case "${1:-}" in
  list) printf '%s\n' "${TARGETS[@]}" ;;
  smoke)
    seconds=${TALLY_FUZZ_SMOKE_S:-20}
    fuzz build
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/tally-fuzz.XXXXXX")
    trap 'rm -rf "$scratch"' EXIT
    for t in "${TARGETS[@]}"; do
      mkdir -p "$scratch/$t"
      # New inputs go to the scratch directory (the first one); the committed corpus is read only.
      fuzz run "$t" "$scratch/$t" "corpus/$t" -- -max_total_time="$seconds" -max_len=8192 \
        -artifact_prefix="$scratch/$t-" -print_final_stats=1 2>"$scratch/$t.log" || {
        echo "fuzz.sh: $t failed; its log:" >&2
        tail -n 60 "$scratch/$t.log" >&2
        ls "$scratch" | grep -- "^$t-" | sed "s|^|fuzz.sh: crash input $scratch/|" >&2 || true
        trap - EXIT
        exit 1
      }
      runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$scratch/$t.log" | grep -o '[0-9]*$' || echo "?")
      echo "fuzz.sh: $t: $runs runs in ${seconds}s, no crash" >&2
    done
    ;;
  run)
    target=${2:?target}
    seconds=${3:?seconds}
    fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=8192 -print_final_stats=1
    ;;
  *)
    echo "usage: scripts/fuzz.sh smoke | run TARGET SECONDS | list" >&2
    exit 2
    ;;
esac
