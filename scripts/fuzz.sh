#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 30), starting from the
# committed seed corpus, and fails on the first crash. Uses cargo-fuzz (installed if missing)
# with libFuzzer and AddressSanitizer on the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable
# rustc take the sanitizer flags cargo-fuzz passes.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
# Env: FUZZ_RUNS=N stops each target after N runs; FUZZ_SANITIZER=none builds without ASan
# (overflow checks and debug assertions stay on), 5-20x faster, for long runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
seconds=${1:-30}
sanitizer=${FUZZ_SANITIZER:-address}
shift || true
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "installing cargo-fuzz" >&2
	cargo install --locked cargo-fuzz
fi
# Each sanitizer builds into its own directory, so that switching does not rebuild the other.
build=(--sanitizer "$sanitizer" --debug-assertions --target-dir "target/$sanitizer")
cargo fuzz build "${build[@]}" >&2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
for target in "${targets[@]}"; do
	mkdir -p "$work/$target"
	cp corpus/"$target"/seed-* "$work/$target/" 2>/dev/null || true
	limit=(-max_total_time="$seconds")
	[ -z "${FUZZ_RUNS:-}" ] || limit+=(-runs="$FUZZ_RUNS")
	if cargo fuzz run "${build[@]}" "$target" "$work/$target" -- "${limit[@]}" -print_final_stats=1 >"$work/$target.log" 2>&1; then
		stats=$(grep -E 'stat::(number_of_executed_units|average_exec_per_sec)' "$work/$target.log" | awk '{print $2}' | paste -sd' ')
		echo "fuzz $target: ok (executions, per second: $stats)"
		passed=$((passed + 1))
	else
		echo "fuzz $target: FAILED"
		grep -E 'ERROR|panicked|SUMMARY|Test unit written' "$work/$target.log" | head -20
		mkdir -p artifacts
		cp -r "$work/$target.log" artifacts/ 2>/dev/null || true
		failed=$((failed + 1))
	fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
