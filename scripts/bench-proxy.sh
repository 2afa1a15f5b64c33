#!/usr/bin/env bash
# bench-proxy.sh: the node's proxy against nginx (keepalive upstream) and
# against the program itself, in one run: wrk -t2 at 32 and 200
# connections, 5 interleaved rounds of 5 s each, medians and ratios
# (ROUNDS, SECONDS_PER_ROUND and ALEPHVM_PROXYBENCH_CONNS="32,200" size it).
# It runs BenchmarkProxyVsNginx (api/proxybench_test.go: an in-process
# program) or, with --vm, BenchmarkProgramProxyVsNginx (cmd/alephvm:
# examples/go-hello in a VM under QEMU; as root). It installs nothing: it
# says what is missing.
#   scripts/bench-proxy.sh [--vm]
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in go wrk nginx; do
	command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
	echo "bench-proxy: missing ${missing[*]} (Debian: apt-get install -y wrk nginx-light; Go from go.dev)" >&2
	exit 1
fi
export PATH="$PATH:/usr/sbin"
bench='BenchmarkProxyVsNginx$' pkg=./api
if [ "${1:-}" = --vm ]; then
	bench='BenchmarkProgramProxyVsNginx$' pkg=./cmd/alephvm
fi
echo "load average before: $(cat /proc/loadavg)"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
ALEPHVM_PROXYBENCH_ROUNDS="${ROUNDS:-5}" ALEPHVM_PROXYBENCH_SECONDS="${SECONDS_PER_ROUND:-5}" \
	go test -run NONE -bench "$bench" -benchtime 1x -timeout 30m -v "$pkg" 2>&1 | tee "$out" |
	awk '/round|Benchmark|^ok|FAIL/ { print } /Benchmark(Program)?ProxyVsNginx-/ {
		for (i = 3; i < NF; i += 2) printf "  %-22s %s\n", $(i+1), $i }'
status=${PIPESTATUS[0]}
set -e
echo "load average after: $(cat /proc/loadavg)"
# A failed run says why: its whole output (wrk's errors, the node's log).
[ "$status" -eq 0 ] || { echo "== the benchmark failed; its whole output:"; cat "$out"; }
exit "$status"
