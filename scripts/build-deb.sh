#!/usr/bin/env bash
# Builds the Debian package of alephvm with dpkg-deb: the node and CLI
# (/usr/bin/alephvm), the guest init (/usr/lib/alephvm/alephvm-init), the
# systemd unit, the logrotate rule of qemu.log, the commented config file
# (made by "alephvm config example") and the maintainer scripts of
# packaging/deb/. See docs/packaging.md.
#
#   scripts/build-deb.sh [-v VERSION] [-o DIR]
#
# VERSION defaults to one made from the last commit (0.0~git<date>.<hash>,
# +dirty when the tree has changes); DIR to dist/. Prints the .deb's path.
# Needs Go and dpkg-deb, not root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }
version= out=dist
while getopts "v:o:h" opt; do
	case $opt in
	v) version=$OPTARG ;;
	o) out=$OPTARG ;;
	h) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || die "unexpected arguments: $* (see $0 -h)"

if [ -z "$version" ]; then
	rev=$(git rev-parse --short=12 HEAD 2>/dev/null) || die "not a git checkout: give the version with -v"
	version="0.0~git$(TZ=UTC git log -1 --date=format-local:%Y%m%d%H%M%S --format=%cd).$rev"
	[ -z "$(git status --porcelain 2>/dev/null)" ] || version="$version+dirty"
fi
# Debian policy 5.6.12: digits first, then alphanumerics and . + ~ (no
# revision: this is a native package).
[[ $version =~ ^[0-9][A-Za-z0-9.+~]*$ ]] || die "version $version is not a Debian version (want e.g. 1.2.3 or 1.2.3~rc1)"

command -v dpkg-deb >/dev/null || die "dpkg-deb is not installed (Debian package dpkg)"
ensure_go
arch=$(dpkg --print-architecture 2>/dev/null || go env GOARCH)
# The node runs qemu-system-x86_64 and the package depends on qemu-system-x86.
[ "$arch" = amd64 ] || die "the package is built for amd64 only, this machine is $arch"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root

echo "== building alephvm $version" >&2
export CGO_ENABLED=0 GOOS=linux GOARCH=amd64
go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$root/usr/bin/alephvm" ./cmd/alephvm
go build -trimpath -ldflags "-s -w" -o "$root/usr/lib/alephvm/alephvm-init" ./cmd/alephvm-init

install -D -m 0644 packaging/deb/alephvm.service "$root/lib/systemd/system/alephvm.service"
install -D -m 0644 packaging/deb/alephvm.logrotate "$root/etc/logrotate.d/alephvm"
mkdir -p "$root/etc/alephvm"
"$root/usr/bin/alephvm" config example >"$root/etc/alephvm/config.yaml"
chmod 0644 "$root/etc/alephvm/config.yaml"
for doc in README.md docs/packaging.md docs/configuration.md; do
	install -D -m 0644 "$doc" "$root/usr/share/doc/alephvm/$(basename "$doc")"
done

mkdir -p "$root/DEBIAN"
for script in postinst prerm postrm; do
	install -m 0755 "packaging/deb/$script" "$root/DEBIAN/$script"
done
printf '%s\n' /etc/alephvm/config.yaml /etc/logrotate.d/alephvm >"$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
maintainer=${DEB_MAINTAINER:-alephvm developers <alephvm@localhost>}
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@INSTALLED_SIZE@/$size/" \
	-e "s|@MAINTAINER@|$maintainer|" packaging/deb/control >"$root/DEBIAN/control"

mkdir -p "$out"
deb="$out/alephvm_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
