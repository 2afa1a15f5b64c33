package assets

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// AptSources returns sources.list lines for suite (and its -updates and
// -security companions) taken from the machine's own apt configuration,
// as apt itself sees it (apt-get indextargets), so that no mirror host is
// ever written in the project.
func AptSources(ctx context.Context, suite string) (string, error) {
	out, err := output(ctx, "apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(COMPONENT)", "Identifier: Packages")
	if err != nil {
		return "", fmt.Errorf("read the machine's apt sources: %w", err)
	}
	return sourcesFor(out, suite)
}

// sourcesFor turns "URI RELEASE COMPONENT" lines into sources.list lines
// for suite, one per repository and release, with sorted components.
func sourcesFor(targets, suite string) (string, error) {
	type repo struct{ uri, release string }
	comps := map[repo][]string{}
	var order []repo
	for _, line := range strings.Split(targets, "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			continue
		}
		r := repo{f[0], f[1]}
		if r.release != suite && !strings.HasPrefix(r.release, suite+"-") && !strings.HasPrefix(r.release, suite+"/") {
			continue
		}
		if _, ok := comps[r]; !ok {
			order = append(order, r)
		}
		if !slices.Contains(comps[r], f[2]) {
			comps[r] = append(comps[r], f[2])
		}
	}
	if len(order) == 0 {
		return "", fmt.Errorf("the machine's apt sources have no %s repository (add one and run apt-get update)", suite)
	}
	slices.SortFunc(order, func(a, b repo) int {
		if c := strings.Compare(a.release, b.release); c != 0 {
			return c
		}
		return strings.Compare(a.uri, b.uri)
	})
	var b strings.Builder
	for _, r := range order {
		c := comps[r]
		slices.Sort(c)
		fmt.Fprintf(&b, "deb %s %s %s\n", r.uri, r.release, strings.Join(c, " "))
	}
	return b.String(), nil
}

// debootstrap is one mmdebstrap run.
type debootstrap struct {
	suite, sources string
	variant        string
	packages       []string
	hooks          []string // --customize-hook shell commands, "$1" is the root
	target         string   // a directory
	// packageCache, when set, is a directory of .deb files shared by
	// builds: the packages found there are not downloaded again, and those
	// downloaded are added to it. It does not change what is built.
	packageCache string
}

// dpkgExcludes keep documentation out of the images.
var dpkgExcludes = []string{
	"path-exclude=/usr/share/man/*",
	"path-exclude=/usr/share/doc/*",
	"path-include=/usr/share/doc/*/copyright",
	"path-exclude=/usr/share/info/*",
	"path-exclude=/usr/share/locale/*",
	"path-include=/usr/share/locale/locale.alias",
}

func (d debootstrap) run(ctx context.Context, p *progress, step string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%s: building a Debian root needs root (mmdebstrap runs package scripts in a chroot)", step)
	}
	args := []string{"--variant=" + d.variant, "--include=" + strings.Join(d.packages, ","), "--aptopt=Acquire::Retries=3"}
	for _, e := range dpkgExcludes {
		args = append(args, "--dpkgopt="+e)
	}
	if d.packageCache != "" {
		cache, err := PackageCacheArgs(d.packageCache)
		if err != nil {
			return fmt.Errorf("%s: %w", step, err)
		}
		args = append(args, cache...)
	}
	for _, h := range d.hooks {
		args = append(args, "--customize-hook="+h)
	}
	// The sources come on standard input ("-" as the mirror): mmdebstrap
	// writes them to the root's /etc/apt/sources.list, a name that does
	// not change from one build to the next (a temporary file's would).
	args = append(args, d.suite, d.target, "-")
	if err := os.MkdirAll(filepath.Dir(d.target), 0o755); err != nil {
		return err
	}
	cmd := command(ctx, "mmdebstrap", args...)
	cmd.Stdin = strings.NewReader(d.sources)
	cmd.Env = append(os.Environ(), sourceDateEpochEnv())
	return p.runCmd(step, cmd)
}

// PackageCacheArgs are the mmdebstrap options that build a root from the
// .deb files of dir, a directory shared by builds, where they have the
// version apt wants, and add the packages downloaded to it: mmdebstrap's
// own recipe (the cache copied in before the download, the archives
// copied out before its cleanup empties them, the essential packages left
// in the archives). They do not change what is built.
func PackageCacheArgs(dir string) ([]string, error) {
	if strings.ContainsAny(dir, " \t\n") {
		return nil, fmt.Errorf("package cache %q: mmdebstrap's sync hooks take no blanks in a path", dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	return []string{"--skip=essential/unlink",
		`--setup-hook=mkdir -p "$1/var/cache/apt/archives"`,
		"--setup-hook=sync-in " + dir + " /var/cache/apt/archives/",
		"--customize-hook=sync-out /var/cache/apt/archives " + dir}, nil
}
