package main

import (
	"fmt"
	"os"
	"path"
	"strconv"

	"github.com/alephvm/alephvm/guest"
)

// user is who runs the workload or an exec'd command.
type user struct {
	name     string
	uid, gid int
	home     string
}

var rootUser = user{name: "root", uid: 0, gid: 0, home: "/root"}

// workloadUser returns who runs the workload: the uid and gid of spec
// (Workload.User; guest.WorkloadUID and guest.WorkloadGID when empty),
// never root. The runtime's /etc/passwd is not read: the runtime is the
// program owner's, and could say that the workload's name is uid 0.
func workloadUser(spec string) (user, error) {
	uid, gid, err := guest.ParseWorkloadUser(spec)
	if err != nil {
		return user{}, err
	}
	name := guest.DefaultUser
	if uid != guest.WorkloadUID {
		name = strconv.Itoa(uid)
	}
	return user{name: name, uid: uid, gid: gid, home: path.Join("/home", name)}, nil
}

// setupWorkloadUser chooses the workload's user and makes its home in the
// root filesystem mounted at newRoot, owned by it. The home is made
// through an os.Root, so that a runtime's symlinks cannot make the init
// create or chown anything outside that root; a home that cannot be made
// is replaced by / (and said on the console).
func setupWorkloadUser(newRoot, spec string) (user, error) {
	u, err := workloadUser(spec)
	if err != nil {
		return user{}, err
	}
	if err := makeHome(newRoot, u); err != nil {
		logf("workload home %s: %v; HOME is /", u.home, err)
		u.home = "/"
	}
	return u, nil
}

func makeHome(newRoot string, u user) error {
	r, err := os.OpenRoot(newRoot)
	if err != nil {
		return err
	}
	defer r.Close()
	rel := u.home[1:]
	if err := r.MkdirAll(rel, 0o755); err != nil {
		return err
	}
	st, err := r.Lstat(rel)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("not a directory (%s)", st.Mode().Type())
	}
	return r.Lchown(rel, u.uid, u.gid)
}

// execUser returns who runs an exec'd command: the host's choice (the
// host is trusted), from "" or guest.DefaultUser (the workload's user),
// "root", or "uid[:gid]". Other names are refused: they would be looked
// up in the runtime's /etc/passwd.
func execUser(workload user, spec string) (user, error) {
	switch spec {
	case "", guest.DefaultUser:
		return workload, nil
	case "root", "0", "0:0":
		return rootUser, nil
	}
	uid, gid, err := guest.ParseWorkloadUser(spec)
	if err != nil {
		return user{}, fmt.Errorf("exec user: %w (use root, %s or uid[:gid])", err, guest.DefaultUser)
	}
	return user{name: strconv.Itoa(uid), uid: uid, gid: gid, home: "/"}, nil
}
