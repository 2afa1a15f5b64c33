package api

import (
	"crypto/subtle"
	"net/http"
)

// The reference's /about pages for the operator: /about/login?token=
// (the token the node writes to EXECUTION_ROOT/login_token at each start)
// sets a cookie, with which /about/config shows the settings and
// /about/executions/details the executions.

// loginCookie is the cookie /about/login sets.
const loginCookie = "token"

func (s *Server) loggedIn(r *http.Request) bool {
	if s.opts.LoginToken == "" {
		return false
	}
	c, err := r.Cookie(loginCookie)
	return err == nil && subtle.ConstantTimeCompare([]byte(c.Value), []byte(s.opts.LoginToken)) == 1
}

func (s *Server) handleLogin(w http.ResponseWriter, r *http.Request) {
	token := r.URL.Query().Get("token")
	if s.opts.LoginToken == "" || subtle.ConstantTimeCompare([]byte(token), []byte(s.opts.LoginToken)) != 1 {
		writeJSON(w, http.StatusUnauthorized, map[string]bool{"success": false})
		return
	}
	http.SetCookie(w, &http.Cookie{Name: loginCookie, Value: token, Path: "/about", HttpOnly: true, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, "/about/config", http.StatusFound)
}

func (s *Server) handleAboutConfig(w http.ResponseWriter, r *http.Request) {
	if !s.loggedIn(r) {
		writeJSON(w, http.StatusUnauthorized, map[string]bool{"success": false})
		return
	}
	var settings map[string]string
	if s.opts.Settings != nil {
		settings = s.opts.Settings()
	}
	writeJSON(w, http.StatusOK, settings)
}

func (s *Server) handleExecutionDetails(w http.ResponseWriter, r *http.Request) {
	if !s.loggedIn(r) {
		writeJSON(w, http.StatusUnauthorized, map[string]bool{"success": false})
		return
	}
	execs, err := s.executions(r.Context())
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	type detail struct {
		VMType    string                `json:"vm_type"`
		Running   bool                  `json:"running"`
		StartedAt *string               `json:"started_at"`
		VCPUs     int                   `json:"vcpus"`
		MemoryMiB int                   `json:"memory"`
		Network   any                   `json:"networking"`
		Ports     map[string]MappedPort `json:"mapped_ports,omitempty"`
	}
	out := []map[string]detail{}
	for _, e := range execs {
		out = append(out, map[string]detail{string(e.ref): {VMType: e.vmType, Running: e.running, StartedAt: RecordTime(e.startedAt),
			VCPUs: e.vcpus, MemoryMiB: e.memoryMiB, Network: e.networking, Ports: e.mappedPorts}})
	}
	writeJSON(w, http.StatusOK, out)
}
