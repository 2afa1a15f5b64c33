#!/usr/bin/env bash
# Runs the chaos suite (cmd/alephvm TestChaos, docs/reliability.md): ROUNDS
# rounds (default 50) of an operation killed at a random moment with the
# node, then the invariants checked. SEED replays a run. Run as root: it
# boots VMs in a network namespace of its own, with no uplink.
#   scripts/chaos.sh [ROUNDS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_root
ensure_go
apt_install qemu-system-x86 qemu-utils nftables iproute2 e2fsprogs squashfs-tools util-linux mmdebstrap cpio
export ALEPHVM_CHAOS_ROUNDS="${1:-50}"
[ -z "${2:-}" ] || export ALEPHVM_CHAOS_SEED="$2"
exec go test -count=1 -timeout 4h -run '^TestChaos$' -v ./cmd/alephvm
