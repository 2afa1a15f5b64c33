package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/alephvm/alephvm/guest"
)

// user is who runs the workload or an exec'd command.
type user struct {
	name     string
	uid, gid int
	home     string
}

// nobody runs the workload when the default user is missing.
var nobody = user{name: "nobody", uid: 65534, gid: 65534, home: "/"}

// lookupUser resolves spec ("name", "uid" or "uid:gid"; empty for
// guest.DefaultUser, or nobody when the runtime lacks it) against the
// passwd file of the root filesystem at root.
func lookupUser(root, spec string) (user, error) {
	users, err := readPasswd(filepath.Join(root, "etc/passwd"))
	if err != nil && !os.IsNotExist(err) {
		return user{}, err
	}
	if spec == "" {
		if u, ok := users[guest.DefaultUser]; ok {
			return u, nil
		}
		return nobody, nil
	}
	name, group, hasGroup := strings.Cut(spec, ":")
	u, ok := users[name]
	if !ok {
		uid, err := strconv.Atoi(name)
		if err != nil || uid < 0 {
			return user{}, fmt.Errorf("no user %q in the runtime's /etc/passwd", name)
		}
		u = user{name: name, uid: uid, gid: uid, home: "/"}
		for _, known := range users {
			if known.uid == uid {
				u = known
			}
		}
	}
	if hasGroup {
		gid, err := strconv.Atoi(group)
		if err != nil || gid < 0 {
			return user{}, fmt.Errorf("group %q: want a number", group)
		}
		u.gid = gid
	}
	return u, nil
}

func readPasswd(file string) (map[string]user, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parsePasswd(f)
}

// parsePasswd reads name:password:uid:gid:gecos:home:shell lines.
func parsePasswd(r io.Reader) (map[string]user, error) {
	users := map[string]user{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) < 7 || strings.HasPrefix(f[0], "#") {
			continue
		}
		uid, err1 := strconv.Atoi(f[2])
		gid, err2 := strconv.Atoi(f[3])
		if err1 != nil || err2 != nil {
			continue
		}
		users[f[0]] = user{name: f[0], uid: uid, gid: gid, home: f[5]}
	}
	return users, sc.Err()
}
