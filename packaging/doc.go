// Package packaging holds the Debian package of alephvm: its systemd unit
// and maintainer scripts (deb/, assembled by scripts/build-deb.sh with the
// binaries and the config file "alephvm config example" prints), and the
// test that installs, upgrades and removes the package in a throwaway
// systemd-nspawn container while an instance runs. See docs/packaging.md.
package packaging
