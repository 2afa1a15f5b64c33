#!/usr/bin/env bash
# Builds alephvm and shows what it does so far: its version, the
# validation of the reference's example messages, and a round trip through
# the content store (in a temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_go
mkdir -p bin
go build -o bin/alephvm ./cmd/alephvm
# The guest init, static, beside alephvm where "alephvm assets build" looks for it.
CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o bin/alephvm-init ./cmd/alephvm-init
./bin/alephvm version
if [ -d ../shared/fixtures/aleph-message ]; then
	./bin/alephvm message validate --regenerate ../shared/fixtures/aleph-message/*.json
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export ALEPH_VM_CACHE_ROOT="$work/cache" ALEPH_VM_EXECUTION_ROOT="$work/state" ALEPH_VM_LOG_LEVEL=warn
head -c 1048576 /dev/urandom >"$work/volume.squashfs"
./bin/alephvm store add "$work/volume.squashfs" | tee "$work/added"
ref=$(awk '$1 == "ref" {print $2}' "$work/added")
./bin/alephvm store get "$ref" -o "$work/back"
cmp "$work/volume.squashfs" "$work/back" && echo "store get $ref: same bytes back"
./bin/alephvm message get "$ref"
