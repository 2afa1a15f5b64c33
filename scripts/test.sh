#!/usr/bin/env bash
# Runs every test of the project on a Debian machine, installing what the
# tests need first. Run as root: later tests boot VMs in network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_go
echo "== $(go version)"

# The VM tests boot QEMU (TCG) in network namespaces of their own, with
# assets built by package assets: Debian roots with mmdebstrap, images
# with mksquashfs and mkfs.ext4, checked with e2fsck and debugfs.
apt_install qemu-system-x86 qemu-utils squashfs-tools mmdebstrap e2fsprogs iproute2

echo "== static checks"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
[ -z "$unformatted" ] || die "not gofmt'ed: $unformatted"
go vet ./...

echo "== tests"
# The first run builds the VM assets (a few minutes) before booting VMs.
go test -count=1 -timeout 60m ./...
