#!/usr/bin/env bash
# Builds alephvm and shows what it does so far: its version, and the
# validation of the reference's example messages.
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
