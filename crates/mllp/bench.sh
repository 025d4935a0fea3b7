#!/usr/bin/env bash
# ACK round trips over loopback: passerelle's listener (`passerelle serve`, parser-only
# handler) against txHL7 and python hl7's asyncio server as baselines, with 1 and 64
# connections, one message in flight per connection, in one run. Each receiver is started
# by mllp-load (--spawn) and killed after its run; every ACK's MSA-2 is checked.
#
# usage: bash crates/mllp/bench.sh [SECONDS_PER_RUN]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-10}"
cargo build --quiet --release --locked -p passerelle-cli -p passerelle-mllp --bins
cargo run --quiet --release --locked -p passerelle-testkit --bin provision-peers >/dev/null
target="${CARGO_TARGET_DIR:-target}/release"
py=target/peers/py/bin
[ -n "${PASSERELLE_PEERS_DIR:-}" ] && py="$PASSERELLE_PEERS_DIR/py/bin"
for connections in 1 64; do
  run=("$target/mllp-load" --connections "$connections" --window 1 --count 1000000 --duration "$seconds")
  "${run[@]}" --label passerelle --spawn "$target/passerelle" serve --listen 127.0.0.1:0 --max-connections-per-ip 1000
  "${run[@]}" --label txhl7 --spawn "$py/twistd" -n --pidfile= mllp -e tcp:0:interface=127.0.0.1
  "${run[@]}" --label python-hl7-asyncio --spawn "$py/python" crates/testkit/peers/hl7_asyncio_server.py
done
