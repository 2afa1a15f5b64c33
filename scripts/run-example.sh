#!/usr/bin/env bash
# Runs the node with both examples on a Debian machine: installs what it
# needs, builds alephvm, the guest init and the VM assets (once), starts the
# node in a network namespace of its own (so it touches nothing on the
# host), deploys examples/asgi-hello and examples/go-hello, and shows their
# answers. Run as root. ALEPHVM_EXAMPLE_DIR keeps the node's state and
# assets between runs (default /var/tmp/alephvm-example).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_root
ensure_go
# Everything the commands this leads to need too (README): the node and its
# VM assets, "alephvm base-image build" (mmdebstrap, e2fsprogs) and the
# instances of its UEFI form (ovmf, the firmware QEMU boots them with).
apt_install qemu-system-x86 qemu-utils nftables iproute2 e2fsprogs squashfs-tools mmdebstrap ovmf curl ca-certificates

echo "== building alephvm, the guest init and the Go example"
mkdir -p bin
go build -o bin/alephvm ./cmd/alephvm
# The guest init, static, beside alephvm where "alephvm assets build" looks for it.
CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o bin/alephvm-init ./cmd/alephvm-init
./bin/alephvm version

dir=${ALEPHVM_EXAMPLE_DIR:-/var/tmp/alephvm-example}
mkdir -p "$dir/go-hello"
CGO_ENABLED=0 go build -o "$dir/go-hello/hello" ./examples/go-hello
export ALEPH_VM_CACHE_ROOT="$dir/cache" ALEPH_VM_EXECUTION_ROOT="$dir/state" ALEPH_VM_LOG_LEVEL=warn
# Inside the namespace there is no uplink: the example VMs reach nothing
# beyond the node, and nothing on the host is changed.
export ALEPH_VM_NETWORK_INTERFACE=lo ALEPH_VM_DNS_NAMESERVERS=127.0.0.1 ALEPH_VM_SUPERVISOR_PORT=4020

echo "== building the VM assets (kernel, initramfs, runtime; cached)"
./bin/alephvm assets build --init bin/alephvm-init

ns=alephvm-example
ip netns del "$ns" 2>/dev/null || true
ip netns add "$ns"
ip -n "$ns" link set lo up
node_pid=
cleanup() {
	[ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null && wait "$node_pid" 2>/dev/null
	ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT

echo "== starting the node in network namespace $ns"
ip netns exec "$ns" ./bin/alephvm serve >"$dir/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 100); do
	ip netns exec "$ns" curl -fs -o /dev/null http://127.0.0.1:4020/about/executions/list && break
	sleep 0.2
done

echo "== deploying the examples"
asgi=$(./bin/alephvm program create examples/asgi-hello --entrypoint main:app --env GREETING=Hello | sed -n 1p)
gohello=$(./bin/alephvm program create "$dir/go-hello" --entrypoint hello --interface binary | sed -n 1p)

for ref in "$asgi" "$gohello"; do
	echo "== GET /vm/$ref/ (the first request boots the VM)"
	ip netns exec "$ns" curl -fsS --max-time 300 "http://127.0.0.1:4020/vm/$ref/"
done
echo "== the node's executions"
ip netns exec "$ns" ./bin/alephvm vm list
echo "== what this host can run"
./bin/alephvm doctor || true
echo "== done; the node's log is $dir/node.log"
