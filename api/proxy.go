package api

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"

	"github.com/alephvm/alephvm/pool"
)

// proxy forwards requests to program VMs, streaming bodies both ways
// (websockets included), and turns failures into the reference's errors.
type proxy struct {
	rp  *httputil.ReverseProxy
	log *slog.Logger
}

type leaseKey struct{}

// errProgramTimeout marks a program that sent no response headers within
// its resources.seconds.
var errProgramTimeout = errors.New("program did not respond within resources.seconds")

func newProxy(log *slog.Logger) *proxy {
	transport := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
	}
	p := &proxy{log: log}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			lease := pr.In.Context().Value(leaseKey{}).(*pool.Lease)
			pr.SetURL(lease.Program().Target())
			pr.Out.URL.Path, pr.Out.URL.RawPath = pr.In.URL.Path, pr.In.URL.RawPath
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		Transport: timeoutTransport{base: transport},
		// Responses of unknown length (chunked, event streams) are flushed as
		// the program writes them; others are written in as few writes as
		// possible.
		FlushInterval: 0,
		ModifyResponse: func(resp *http.Response) error {
			plan := resp.Request.Context().Value(leaseKey{}).(*pool.Lease).Plan()
			resp.Header.Set("Aleph-Program-ItemHash", string(plan.Ref))
			if plan.CodeRef != "" {
				resp.Header.Set("Aleph-Program-Code-Ref", string(plan.CodeRef))
			}
			return nil
		},
		ErrorHandler: p.writeError,
	}
	return p
}

func (p *proxy) serve(w http.ResponseWriter, r *http.Request, lease *pool.Lease, path string) {
	out := r.Clone(context.WithValue(r.Context(), leaseKey{}, lease))
	unescaped, err := url.PathUnescape(path)
	if err != nil {
		writeError(w, http.StatusBadRequest, "Invalid path")
		return
	}
	out.URL.Path, out.URL.RawPath = unescaped, path
	p.rp.ServeHTTP(w, out)
}

func (p *proxy) writeError(w http.ResponseWriter, r *http.Request, err error) {
	lease := r.Context().Value(leaseKey{}).(*pool.Lease)
	var tooLarge *http.MaxBytesError
	switch {
	case errors.Is(err, errProgramTimeout):
		writeError(w, http.StatusGatewayTimeout, "Program did not respond within resources.seconds")
	case errors.As(err, &tooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, "Request body is larger than the node accepts")
	case errors.Is(err, context.Canceled):
		// The client went away.
	default:
		p.log.Warn("program did not answer", "ref", lease.Plan().Ref, "err", err)
		writeError(w, http.StatusBadGateway, "VM did not respond: "+err.Error())
	}
}

// timeoutTransport gives each request until its program's
// resources.seconds to send response headers; the body may then stream for
// as long as it takes.
type timeoutTransport struct {
	base http.RoundTripper
}

func (t timeoutTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	timeout := req.Context().Value(leaseKey{}).(*pool.Lease).Plan().Timeout
	if timeout <= 0 {
		return t.base.RoundTrip(req)
	}
	ctx, cancel := context.WithCancelCause(req.Context())
	timer := time.AfterFunc(timeout, func() { cancel(errProgramTimeout) })
	resp, err := t.base.RoundTrip(req.WithContext(ctx))
	if !timer.Stop() && context.Cause(ctx) == errProgramTimeout {
		if resp != nil {
			resp.Body.Close()
		}
		cancel(nil)
		return nil, errProgramTimeout
	}
	if err != nil {
		cancel(nil)
		return nil, err
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// The proxy needs the upgraded connection's writable body; the
		// context ends with the request.
		return resp, nil
	}
	resp.Body = cancelOnClose{ReadCloser: resp.Body, cancel: func() { cancel(nil) }}
	return resp, nil
}

type cancelOnClose struct {
	io.ReadCloser
	cancel func()
}

func (c cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}
