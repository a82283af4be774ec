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

echo "== cargo test"
cargo test --locked
