#!/usr/bin/env bash
# Runs the load suite (cmd/alephvm TestLoad, docs/reliability.md) and
# prints its figures: the node with 10 programs under 200 clients for 5
# minutes, slow clients beside them, then programs past its memory. With
# --short, the version CI runs: 2 programs, 50 clients, 30 s. Run as root:
# the node and its VMs run in a network namespace of the test's own.
# ALEPHVM_LOAD_PROGRAMS, ALEPHVM_LOAD_CLIENTS and ALEPHVM_LOAD_DURATION
# (such as 2m) change the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

full=1
case "${1:-}" in
--short) full=0 ;;
"") ;;
*) die "usage: $0 [--short]" ;;
esac

need_root
ensure_go
apt_install qemu-system-x86 qemu-utils nftables iproute2 e2fsprogs squashfs-tools mmdebstrap cpio

export ALEPHVM_LOAD_FULL=$full
# One VM suite at a time on this machine: the others take the same lock.
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
flock -o /tmp/alephvm-vm.lock go test -count=1 -timeout 30m -run '^TestLoad$' -v ./cmd/alephvm >"$out" 2>&1 || status=$?
# The figures, without the test's own prefixes.
sed -n '/load suite:/,/^--- /p' "$out" | sed -E -e 's/^ {4}(load_e2e_test\.go:[0-9]+: ?)?//' -e '/^$/d'
[ "$status" -eq 0 ] || { echo "== the load suite failed; its whole output:"; cat "$out"; }
exit "$status"
