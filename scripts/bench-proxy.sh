#!/usr/bin/env bash
# bench-proxy.sh: the node's proxy against nginx (keepalive upstream) and
# against the program itself, in one run: wrk -t2 at 32 and 200
# connections, 3 interleaved rounds of 5 s each, medians and ratios.
# It runs BenchmarkProxyVsNginx (api/proxybench_test.go) and installs
# nothing: it says what is missing.
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
echo "load average before: $(cat /proc/loadavg)"
ALEPHVM_PROXYBENCH_ROUNDS="${ROUNDS:-3}" ALEPHVM_PROXYBENCH_SECONDS="${SECONDS_PER_ROUND:-5}" \
	go test -run NONE -bench 'BenchmarkProxyVsNginx$' -benchtime 1x -v ./api |
	awk '/round|Benchmark|^ok|FAIL/ { print } /BenchmarkProxyVsNginx-/ {
		for (i = 3; i < NF; i += 2) printf "  %-22s %s\n", $(i+1), $i }'
echo "load average after: $(cat /proc/loadavg)"
