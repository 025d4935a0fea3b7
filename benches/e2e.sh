#!/usr/bin/env bash
# End to end (issue 6): 64 MLLP senders over loopback → passerelle's engine (journal with
# ACK after flush → route → map → NDJSON), in the same run as a bare MLLP ACK echo with no
# persistence (`passerelle serve` without --config, answering from the parser).
# Every ACK's MSA-2 is checked by the load generator (crates/mllp/src/bin/mllp-load.rs).
# The messages name 1,000 patients in turn, so that per-patient order does not put them all
# in one ordering key. Each engine run starts on an empty store, and is killed when its
# load ends: the NDJSON lines then written are what it delivered during the run.
#
# usage: bash benches/e2e.sh [SECONDS_PER_RUN]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
cargo build --quiet --release --locked -p passerelle-cli -p passerelle-mllp --bins
target="${CARGO_TARGET_DIR:-target}/release"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The engine's files for one run, in a fresh folder.
engine_dir() {
  local dir="$work/$1"
  mkdir -p "$dir/routes.d"
  cat > "$dir/routes.d/10-all.toml" <<ROUTE
name = "all"
mapping = "v2-to-fhir"
default = true
[[destinations]]
name = "files"
type = "ndjson"
dir = "out"
ROUTE
  cat > "$dir/passerelle.toml" <<CONFIG
[store]
path = "data"
[[listeners]]
name = "main"
bind = "127.0.0.1:0"
max_connections_per_ip = 1000
[admin]
bind = "127.0.0.1:0"
[paths]
routes = "routes.d"
mappings = "$PWD/mappings"
[logging]
level = "warn"
CONFIG
  echo "$dir"
}
for connections in 1 64; do
  run=("$target/mllp-load" --connections "$connections" --window 1 --count 1000000 --duration "$seconds" --patients 1000)
  "${run[@]}" --label "echo (parser only, no persistence)" --spawn "$target/passerelle" serve --listen 127.0.0.1:0 --max-connections-per-ip 1000
  dir="$(engine_dir "engine-$connections")"
  "${run[@]}" --label "engine (journal, map, NDJSON)" --spawn "$target/passerelle" serve --config "$dir/passerelle.toml"
  delivered="$(cat "$dir"/out/MessageHeader.ndjson 2>/dev/null | wc -l)"
  echo "  delivered to NDJSON during that run: $delivered messages ($((delivered / seconds)) msgs/s)"
done
