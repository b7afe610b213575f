#!/usr/bin/env bash
# cargo deny over the dependency tree (deny.toml): licences, bans (duplicate
# versions listed), sources, then the RustSec advisories. Installs cargo-deny
# from crates.io when it is missing. The advisory database comes from GitHub:
# when it cannot be fetched the advisories check is skipped and the reason
# printed; the other checks never need the network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! cargo deny --version >/dev/null 2>&1; then
    echo "deny.sh: installing cargo-deny from crates.io (once per machine)" >&2
    cargo install --locked --quiet cargo-deny
fi
cargo deny --version

echo "deny.sh: licences, bans, sources"
cargo deny --locked check licenses bans sources

echo "deny.sh: advisories"
if fetch_error=$(cargo deny --locked fetch db 2>&1); then
    cargo deny --locked check --disable-fetch advisories
else
    echo "deny.sh: advisories SKIPPED: the RustSec database could not be fetched:" >&2
    echo "$fetch_error" | tail -n 5 >&2
fi
