#!/usr/bin/env bash
# Supply-chain policy (deny.toml): licences, banned crates and features, sources, for the daemon
# and for tools/cutfs. Installs cargo-deny (pinned) when missing, about 4 minutes.
# `advisories` is left out: it fetches the RustSec database from GitHub, which CI here cannot
# reach; run `cargo deny check advisories` on a connected machine before a release.
set -euo pipefail
cd "$(dirname "$0")/.."
DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q "$DENY_VERSION"; then
  cargo install cargo-deny --locked --version "$DENY_VERSION"
fi
cargo deny --log-level error check licenses bans sources
cargo deny --log-level error --manifest-path tools/cutfs/Cargo.toml check licenses bans sources
echo "cargo deny: licences, bans and sources pass (daemon and tools/cutfs)"
