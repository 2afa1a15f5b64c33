package api

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"

	"github.com/alephvm/alephvm/auth"
	"github.com/alephvm/alephvm/backup"
	"github.com/alephvm/alephvm/message"
)

// Backups makes, serves and restores instances' backups (backup.Manager).
type Backups interface {
	Create(ctx context.Context, ref message.ItemHash, req backup.Request) (backup.Answer, error)
	Status(ref message.ItemHash) backup.Answer
	Open(ref message.ItemHash, id, signature, expires string) (*backup.Download, error)
	Delete(ref message.ItemHash, id string) error
	Restore(ctx context.Context, ref message.ItemHash, src backup.Restore) error
}

func (s *Server) routeBackups() {
	if s.opts.Backups == nil {
		return
	}
	s.mux.HandleFunc("POST /control/machine/{ref}/backup", cors(s.handleBackup))
	s.mux.HandleFunc("GET /control/machine/{ref}/backup", cors(s.handleBackupStatus))
	s.mux.HandleFunc("GET /control/machine/{ref}/backup/{backup_id}", cors(s.handleBackupDownload))
	s.mux.HandleFunc("DELETE /control/machine/{ref}/backup/{backup_id}", cors(s.handleBackupDelete))
	s.mux.HandleFunc("POST /control/machine/{ref}/restore", cors(s.handleRestore))
}

// handleBackup starts a backup of a running QEMU instance, or answers the
// one made or running (backup.Manager.Create): 202 {"status":
// "in_progress"} while it runs.
func (s *Server) handleBackup(w http.ResponseWriter, r *http.Request) {
	ref, m, _, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	if m.Type == TypeProgram {
		writeText(w, http.StatusBadRequest, backup.ErrNotQEMU.Msg)
		return
	}
	q := r.URL.Query()
	a, err := s.opts.Backups.Create(context.WithoutCancel(r.Context()), ref,
		backup.Request{IncludeVolumes: q.Get("include_volumes") == "true", SkipFreeze: q.Get("skip_fsfreeze") == "true"})
	if err != nil {
		s.writeBackupError(w, ref, "Backup creation failed", err)
		return
	}
	s.writeBackupAnswer(w, a)
}

// handleBackupStatus answers 202 while a backup runs, the last one's
// outcome (its meta, or 500), else the newest backup kept, else 404.
func (s *Server) handleBackupStatus(w http.ResponseWriter, r *http.Request) {
	ref, _, _, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	s.writeBackupAnswer(w, s.opts.Backups.Status(ref))
}

// handleBackupDownload streams a backup's tar to whoever holds its
// presigned URL: it takes no other credentials, as in the reference.
// Range requests are served, so a broken download resumes.
func (s *Server) handleBackupDownload(w http.ResponseWriter, r *http.Request) {
	ref, ok := parseRef(r.PathValue("ref"))
	if !ok {
		writeError(w, http.StatusBadRequest, "Invalid message reference")
		return
	}
	q := r.URL.Query()
	dl, err := s.opts.Backups.Open(ref, r.PathValue("backup_id"), q.Get("signature"), q.Get("expires"))
	if err != nil {
		s.writeBackupError(w, ref, "Backup download failed", err)
		return
	}
	defer dl.Close()
	streaming(w)
	h := w.Header()
	h.Set("Content-Type", "application/x-tar")
	h.Set("Content-Disposition", `attachment; filename="`+dl.Name+`"`)
	if dl.Checksum != "" {
		h.Set("X-Backup-Checksum", "sha256:"+dl.Checksum)
	}
	if dl.SourceSize > 0 {
		h.Set("X-Source-Size", strconv.FormatInt(dl.SourceSize, 10))
	}
	http.ServeContent(w, r, dl.Name, dl.ModTime, dl.File)
}

// handleBackupDelete deletes a backup and its sidecars.
func (s *Server) handleBackupDelete(w http.ResponseWriter, r *http.Request) {
	ref, _, _, ok := s.machineCall(w, r)
	if !ok {
		return
	}
	id := r.PathValue("backup_id")
	if err := s.opts.Backups.Delete(ref, id); err != nil {
		s.writeBackupError(w, ref, "Backup deletion failed", err)
		return
	}
	writeText(w, http.StatusOK, "Deleted backup "+id)
}

// handleRestore replaces a QEMU instance's root disk with an uploaded
// qcow2 (multipart field rootfs, streamed to disk) or a stored one (JSON
// {"volume_ref": hash}), then restarts it.
func (s *Server) handleRestore(w http.ResponseWriter, r *http.Request) {
	streaming(w)
	ref, m, body, ok := s.restoreCall(w, r)
	if !ok {
		return
	}
	if m.Type == TypeProgram {
		writeText(w, http.StatusBadRequest, backup.RestoreNotQEMU.Msg)
		return
	}
	src := backup.Restore{ContentLength: r.ContentLength}
	if isMultipart(r) {
		mr, err := r.MultipartReader()
		if err != nil {
			writeText(w, http.StatusBadRequest, "Invalid multipart upload: "+err.Error())
			return
		}
		for {
			part, err := mr.NextPart()
			if errors.Is(err, io.EOF) {
				writeText(w, http.StatusBadRequest, "Missing 'rootfs' field in multipart upload")
				return
			}
			if err != nil {
				writeText(w, http.StatusBadRequest, "Invalid multipart upload: "+err.Error())
				return
			}
			if part.FormName() == "rootfs" {
				src.Upload = part
				break
			}
		}
	} else {
		var req struct {
			VolumeRef any `json:"volume_ref"`
		}
		if err := json.Unmarshal(body, &req); err != nil {
			writeText(w, http.StatusBadRequest, "Expected multipart upload or JSON with volume_ref")
			return
		}
		if ref, isString := req.VolumeRef.(string); isString {
			src.VolumeRef = ref
		} else if req.VolumeRef != nil {
			writeText(w, http.StatusBadRequest, "Invalid volume_ref format")
			return
		}
	}
	if err := s.opts.Backups.Restore(context.WithoutCancel(r.Context()), ref, src); err != nil {
		s.writeBackupError(w, ref, "Restore failed", err)
		return
	}
	s.writePythonJSON(w, http.StatusOK, struct {
		Status string `json:"status"`
		VMHash string `json:"vm_hash"`
	}{"restored", string(ref)})
}

func isMultipart(r *http.Request) bool {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	return err == nil && strings.HasPrefix(mt, "multipart/")
}

// restoreCall is machineCall for a restore, whose upload is streamed, not
// read here: an owner's headers are verified alone; the operator's token
// too (it signs no body); a scheduler call signed with its body
// (Aleph-EIP191-V1) is read and verified whole, so it can carry JSON only.
func (s *Server) restoreCall(w http.ResponseWriter, r *http.Request) (ref message.ItemHash, m Machine, body []byte, ok bool) {
	if !isMultipart(r) {
		return s.machineCall(w, r)
	}
	if auth.HasCredentials(r) {
		if s.opts.OwnerAuth == nil {
			writeError(w, http.StatusForbidden, "This node accepts no owner calls")
			return "", Machine{}, nil, false
		}
		id, err := s.opts.OwnerAuth.Verify(r)
		if err != nil {
			writeAuthError(w, err)
			return "", Machine{}, nil, false
		}
		if ref, ok = parseRef(r.PathValue("ref")); !ok {
			writeError(w, http.StatusBadRequest, "Invalid message reference")
			return "", Machine{}, nil, false
		}
		m, ok = s.authorize(w, r, ref, id)
		return ref, m, nil, ok
	}
	if s.opts.Auth == nil {
		writeError(w, http.StatusForbidden, "This node accepts no scheduler calls: no allocation token or signer is configured")
		return "", Machine{}, nil, false
	}
	// Only the headers are verified: a body-signed call fails here.
	headers := r.Clone(r.Context())
	headers.Body, headers.ContentLength = http.NoBody, 0
	if _, err := s.opts.Auth.Verify(headers); err != nil {
		writeAuthError(w, err)
		return "", Machine{}, nil, false
	}
	if ref, ok = parseRef(r.PathValue("ref")); !ok {
		writeError(w, http.StatusBadRequest, "Invalid message reference")
		return "", Machine{}, nil, false
	}
	m, _ = s.machine(r.Context(), ref)
	return ref, m, nil, true
}

// writeBackupAnswer writes a backup route's answer: the reference's JSON
// (json.dumps) for 200 and 202, its plain text otherwise.
func (s *Server) writeBackupAnswer(w http.ResponseWriter, a backup.Answer) {
	switch {
	case a.Status == http.StatusAccepted:
		s.writePythonJSON(w, a.Status, map[string]string{"status": "in_progress"})
	case a.Meta != nil:
		s.writePythonJSON(w, a.Status, a.Meta)
	default:
		writeText(w, a.Status, a.Text)
	}
}

func (s *Server) writePythonJSON(w http.ResponseWriter, status int, v any) {
	b, err := pythonJSON(v)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// writeBackupError answers a refusal with its status and text; another
// failure is logged and answered 500 with what, as in the reference.
func (s *Server) writeBackupError(w http.ResponseWriter, ref message.ItemHash, what string, err error) {
	var se StatusError
	if errors.As(err, &se) {
		if status := se.HTTPStatus(); status < 500 || status == http.StatusInsufficientStorage {
			writeText(w, status, se.Error())
			return
		}
	}
	s.log.Error(strings.ToLower(what), "ref", ref, "err", err)
	writeText(w, http.StatusInternalServerError, what)
}
