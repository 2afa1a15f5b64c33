# Shared by the set-up scripts: find or install the Go toolchain and the
# Debian packages the project needs. Sourced, not run.

GO_VERSION=1.26

die() { echo "error: $*" >&2; exit 1; }

# need_root re-runs nothing: it tells the operator what to do.
need_root() {
	[ "$(id -u)" -eq 0 ] || die "run this as root: it installs Debian packages and, for VM tests, creates network namespaces"
}

# ensure_go puts a Go toolchain of at least $GO_VERSION on PATH.
ensure_go() {
	export PATH="$PATH:/usr/local/go/bin:$HOME/go/bin"
	if go_ok; then return; fi
	# Debian's golang-go (1.21 or later) can fetch the pinned toolchain from
	# the Go module proxy by itself.
	if command -v apt-get >/dev/null; then
		apt_install golang-go
		export GOTOOLCHAIN="go${GO_VERSION}.0+auto"
		if go_ok; then return; fi
	fi
	die "Go ${GO_VERSION} or later is needed: install it from the Go project's release archive to /usr/local/go"
}

go_ok() {
	command -v go >/dev/null || return 1
	local v
	v=$(go env GOVERSION 2>/dev/null) || return 1
	v=${v#go}
	[ "$(printf '%s\n%s\n' "$GO_VERSION" "$v" | sort -V | head -n1)" = "$GO_VERSION" ]
}

APT_UPDATED=
# apt_install installs the named Debian packages that are missing, from the
# machine's own apt sources.
apt_install() {
	local missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	need_root
	if [ -z "$APT_UPDATED" ]; then
		apt-get update -qq
		APT_UPDATED=1
	fi
	echo "installing: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
