package storage

// Error is a disk or image the node refuses to make or use, with the HTTP
// status a client gets for it (it implements api.StatusError). Kind is
// the sentinel it matches with errors.Is: ErrImageRefused, ErrNoSpace.
type Error struct {
	Status int
	Kind   error
	Msg    string
}

func (e *Error) Error() string { return e.Msg }

func (e *Error) Unwrap() error { return e.Kind }

// HTTPStatus implements api.StatusError.
func (e *Error) HTTPStatus() int { return e.Status }
