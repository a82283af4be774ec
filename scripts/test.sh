#!/usr/bin/env bash
# The whole test run, as CI runs it: dependencies, format, module boundaries, lints, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== module boundaries"
# proto/ is sans-IO: no runtime, TLS, store or web crates in it.
if grep -rnE '^\s*[^/[:space:]].*\b(tokio|tokio_rustls|rustls|sled|axum)::' src/proto/; then
  echo "src/proto/ must not use tokio, rustls, sled or axum" >&2; exit 1
fi
# Only store/ talks to sled.
if grep -rlE '^\s*[^/[:space:]].*\bsled::' src/ | grep -v '^src/store/'; then
  echo "only src/store/ may use sled" >&2; exit 1
fi

echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
# The same with the test-only library code the integration tests use (store::conformance).
cargo clippy --locked --all-targets --features test-support -- -D warnings

echo "== cargo test"
# Every test binary runs even when an earlier one fails (--no-fail-fast), and the run ends
# with one line over all of them: "N passed, N failed, N skipped" (CI tooling reads it;
# ignored tests count as skipped). cargo's own output is shown as it comes.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
# --features test-support: the integration tests run the store conformance suite on
# PostgreSQL, test code the library has only with that feature (never in a release build).
cargo test --locked --no-fail-fast --features test-support 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
read -r passed failed skipped < <(
  awk '/^test result: /{
         for (i = 1; i <= NF; i++) {
           n = $i + 0
           if ($(i + 1) ~ /^passed/) p += n
           if ($(i + 1) ~ /^failed/) f += n
           if ($(i + 1) ~ /^ignored/) s += n
         }
       }
       END { print p + 0, f + 0, s + 0 }' "$log"
)
# A binary that crashed or did not build reports no "test result:" line: count it failed.
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
  failed=1
  echo "cargo test exited with $rc without a failing test result (a build error or a crashed test binary)" >&2
fi
echo
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
[ "$rc" -eq 0 ] && [ "$failed" -eq 0 ]
