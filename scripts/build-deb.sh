#!/usr/bin/env bash
# Builds the Debian package target/debian/sitegate_VERSION-1_ARCH.deb:
#   1. the release binary (`cargo build --release --locked`), or with
#      --no-build the one already there (e.g. from `cargo test --release`);
#   2. from that binary, the bash/zsh/fish completions and the man pages
#      (`sitegate generate ...`) into target/assets/, so they match it exactly;
#   3. `cargo deb --no-build --strip` (a stripped copy goes in the package;
#      target/release stays as cargo built it), with the file list in Cargo.toml
#      ([package.metadata.deb]).
# Needs cargo-deb (.ci/run installs it). Prints the path of the .deb last.
set -euo pipefail
export PATH="${HOME:-/root}/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."

usage() { echo "usage: scripts/build-deb.sh [--no-build]" >&2; }
build=1
case "${1:-}" in
  "") ;;
  --no-build) build=0 ;;
  -h | --help) usage; exit 0 ;;
  *) usage; exit 2 ;;
esac

if ! cargo deb --version >/dev/null 2>&1; then
  echo "cargo-deb is missing: cargo install cargo-deb --version 3.8.0 --locked" >&2
  exit 1
fi

bin="${CARGO_TARGET_DIR:-target}/release/sitegate"
if [ "$build" = 1 ]; then
  cargo build --release --locked --bin sitegate
fi
if [ ! -x "$bin" ]; then
  echo "$bin does not exist; build it first or drop --no-build" >&2
  exit 1
fi

# The asset paths Cargo.toml names (relative to the package, not CARGO_TARGET_DIR).
assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/completions" "$assets/man"
"$bin" generate completions bash >"$assets/completions/sitegate.bash"
"$bin" generate completions zsh >"$assets/completions/_sitegate"
"$bin" generate completions fish >"$assets/completions/sitegate.fish"
"$bin" generate man --out-dir "$assets/man" >/dev/null
# -n: no name or timestamp in the gzip header, so the same binary gives the same pages.
gzip -9n "$assets"/man/*.1

# --no-build: cargo-deb only reads `cargo metadata --no-deps`, which takes no
# build lock, so this runs while another cargo holds the target directory.
cargo deb --no-build --locked --strip --output target/debian/
