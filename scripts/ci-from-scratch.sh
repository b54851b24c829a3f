#!/usr/bin/env bash
# Time `.ci/run` as a brand-new CI machine would see it: a clean clone of HEAD, with the cargo
# registry, the cargo tools (cargo-deny, cargo-fuzz, cargo-deb), the npm tools and the bare Debian
# root of the fresh-machine check all absent (a new CARGO_HOME whose bin holds only rustup's
# proxies, new MENSHEN_TOOLS and MENSHEN_FRESH_CACHE). apt packages already installed stay.
# ../shared must be beside this clone; the run happens in $WORK (default /tmp/ci-scratch) and ends
# with .ci/run's table of seconds per step. Needs root (as .ci/run does).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/ci-scratch}
rustup_bin=$(readlink -f "$(command -v rustup)")
rm -rf "$work"
mkdir -p "$work/home/cargo/bin" "$work/home/tools"
for n in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt rustup; do
  ln -s "$rustup_bin" "$work/home/cargo/bin/$n"
done
git clone -q "$here" "$work/menshen"
ln -sfn "$(cd "$here/.." && pwd)/shared" "$work/shared"
cd "$work/menshen"
export CARGO_HOME=$work/home/cargo RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
export MENSHEN_TOOLS=$work/home/tools MENSHEN_FRESH_CACHE=$work/home/fresh-root
PATH=$work/home/cargo/bin:$(printf '%s' "$PATH" | tr ':' '\n' | grep -v '/\.cargo/bin$' | paste -sd:)
export PATH
if command -v cargo-deny >/dev/null || command -v cargo-deb >/dev/null || command -v cargo-fuzz >/dev/null; then
  echo "ci-from-scratch: a cargo tool is still on PATH" >&2; exit 1
fi
CI=true exec bash .ci/run
