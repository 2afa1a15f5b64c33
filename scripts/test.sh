#!/usr/bin/env bash
# Runs every test of the project on a Debian machine, installing what the
# tests need first. Run as root: later tests boot VMs in network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_go
echo "== $(go version)"

# The tools the VM, network and disk tests drive. Without root they are
# not installed and those tests skip, saying why.
if [ "$(id -u)" -eq 0 ]; then
	echo "== system packages"
	apt_install qemu-system-x86 qemu-utils nftables iproute2 e2fsprogs xfsprogs \
		squashfs-tools genisoimage util-linux mmdebstrap ovmf openssh-client cpio dmsetup strace \
		systemd-container logrotate chromium \
		grub-pc-bin fdisk
fi

echo "== static checks"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
[ -z "$unformatted" ] || die "not gofmt'ed: $unformatted"
go vet ./...

echo "== tests"
# Screenshots and other files the tests leave for a person to look at.
export ALEPHVM_TEST_ARTIFACTS="${ALEPHVM_TEST_ARTIFACTS:-$PWD/test-artifacts}"
# The first run builds the VM assets (a few minutes) before booting VMs.
# Two more builds of the base image check it is reproducible (3 minutes).
export ALEPHVM_TEST_REPRODUCIBLE_BASE_IMAGE="${ALEPHVM_TEST_REPRODUCIBLE_BASE_IMAGE:-1}"
go test -count=1 -timeout 60m ./...
