package hostile

import (
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// apiRow is a row fed to a fresh API rig.
func apiRow(category, input, target string, run func(t *testing.T, r *rig) answer) row {
	return row{category: category, input: input, target: target, run: func(t *testing.T) answer {
		return run(t, newRig(t, rigOptions{}))
	}}
}

// get is a row of one request without credentials.
func get(category, input, method, path string, header http.Header) row {
	return apiRow(category, input, "`api.Server`: `"+method+" "+shorten(path)+"`", func(t *testing.T, r *rig) answer {
		return r.do(t, r.request(t, method, path, "", header))
	})
}

// shorten keeps a long path readable in the table.
func shorten(path string) string {
	path = strings.ReplaceAll(path, string(ownedRef), "{ref}")
	path = strings.ReplaceAll(path, string(strangerRef), "{other ref}")
	if len(path) > 60 {
		path = path[:40] + "…"
	}
	return path
}

func refRows() []row {
	return []row{
		get("Refs", "a ref of 63 hex digits", "GET", "/vm/"+string(ownedRef[:63])+"/", nil),
		get("Refs", "a ref in upper case", "GET", "/vm/"+strings.ToUpper(string(ownedRef))+"/", nil),
		get("Refs", "a ref `..%2F..%2Fetc%2Fpasswd`", "GET", "/vm/..%2F..%2Fetc%2Fpasswd/x", nil),
		get("Refs", "a CIDv0 with a character base58 lacks (`0`)", "GET", "/vm/Qm0000000000000000000000000000000000000000000/", nil),
		apiRow("Refs", "a ref of 100 000 bytes", "`api.Server`: `GET /vm/{100 000 bytes}/`", func(t *testing.T, r *rig) answer {
			return r.do(t, r.request(t, "GET", "/vm/"+strings.Repeat("a", 100000)+"/", "", nil))
		}),
		apiRow("Refs", "a host name whose first label is the base32 of 31 bytes", "`api.Server`: `GET /` on `<label>."+domain+"`", func(t *testing.T, r *rig) answer {
			req := r.request(t, "GET", "/", "", nil)
			req.Host = strings.ToLower(strings.Repeat("a", 50)) + "." + domain
			return r.do(t, req)
		}),
		apiRow("Refs", "an operator's call on the ref `not-a-hash`", "`api.Server`: `POST /control/machine/not-a-hash/stop`", func(t *testing.T, r *rig) answer {
			return r.do(t, r.request(t, "POST", "/control/machine/not-a-hash/stop", "", tokenHeader()))
		}),
	}
}

func headerRows() []row {
	const stop = "/control/machine/" + string(ownedRef) + "/stop"
	const alloc = "/control/allocations"
	body := `{"persistent_vms":[],"instances":[]}`
	post := func(input, path string, header func(r *rig) http.Header) row {
		return apiRow("Headers", input, "`api.Server`: `POST "+shorten(path)+"`", func(t *testing.T, r *rig) answer {
			return r.do(t, r.request(t, "POST", path, body, header(r)))
		})
	}
	owned := func(input string, build func(t *testing.T, r *rig) *http.Request) row {
		return apiRow("Headers", input, "`api.Server` with `auth.Owner`: `POST /control/machine/{ref}/stop`", func(t *testing.T, r *rig) answer {
			return r.do(t, build(t, r))
		})
	}
	signed := func(mutate func(h http.Header)) func(t *testing.T, r *rig) *http.Request {
		return func(t *testing.T, r *rig) *http.Request {
			req := r.ownerRequest(t, r.sdk(owner), "POST", ownedRef, "stop")
			mutate(req.Header)
			return req
		}
	}
	return []row{
		post("no credentials", stop, func(*rig) http.Header { return nil }),
		post("no credentials", "/control/storage/reclaim", func(*rig) http.Header { return nil }),
		post("`X-Auth-Signature` with a wrong token", "/control/storage/reclaim", func(*rig) http.Header {
			return http.Header{"X-Auth-Signature": {"guess"}}
		}),
		post("the operator's token with a path for `dry_run`", "/control/storage/reclaim?dry_run=../../etc", func(*rig) http.Header {
			return tokenHeader()
		}),
		post("`X-Auth-Signature` with a wrong token", stop, func(*rig) http.Header {
			return http.Header{"X-Auth-Signature": {"guess"}}
		}),
		post("`Authorization: Basic YWRtaW46YWRtaW4=`", alloc, func(*rig) http.Header {
			return http.Header{"Authorization": {"Basic YWRtaW46YWRtaW4="}}
		}),
		post("`Authorization: Aleph-EIP191-V1 sig=zz`", alloc, func(*rig) http.Header {
			return http.Header{"Authorization": {"Aleph-EIP191-V1 sig=zz"}}
		}),
		post("an `Aleph-EIP191-V1` call signed by a wallet that is not an allocation signer", alloc, func(*rig) http.Header {
			return schedulerHeader(stranger, "POST", alloc, body, time.Now())
		}),
		apiRow("Headers", "an `Aleph-EIP191-V1` call signed an hour ago", "`api.Server`: `POST /control/allocations`", func(t *testing.T, r *rig) answer {
			a := r.do(t, r.request(t, "POST", alloc, body, schedulerHeader(scheduler, "POST", alloc, body, time.Now().Add(-time.Hour))))
			// The age is rounded to the second, which the clock's
			// fraction of a second decides.
			a.text = strings.Replace(a.text, "1h0m1s", "1h0m0s", 1)
			return a
		}),
		post("an `Aleph-EIP191-V1` call signed for another path", alloc, func(*rig) http.Header {
			return schedulerHeader(scheduler, "POST", "/control/allocation/notify", body, time.Now())
		}),
		post("an `Aleph-EIP191-V1` call signed over another body", alloc, func(*rig) http.Header {
			return schedulerHeader(scheduler, "POST", alloc, `{"instances":["`+string(ownedRef)+`"]}`, time.Now())
		}),
		apiRow("Headers", "an `Aleph-EIP191-V1` call replayed", "`api.Server`: `POST /control/allocations`, twice", func(t *testing.T, r *rig) answer {
			h := schedulerHeader(scheduler, "POST", alloc, body, time.Now())
			resp, err := r.client.Do(r.request(t, "POST", alloc, body, h))
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("first call: %v %v", resp, err)
			}
			resp.Body.Close()
			return r.do(t, r.request(t, "POST", alloc, body, h))
		}),
		apiRow("Headers", "an `Aleph-EIP191-V1` call with a query string", "`api.Server`: `POST /control/allocations?x=1`", func(t *testing.T, r *rig) answer {
			return r.do(t, r.request(t, "POST", alloc+"?x=1", body, schedulerHeader(scheduler, "POST", alloc, body, time.Now())))
		}),
		owned("`X-SignedPubKey: hello` (not JSON)", signed(func(h http.Header) { h.Set("X-SignedPubKey", "hello") })),
		owned("`X-SignedPubKey: {}`", signed(func(h http.Header) { h.Set("X-SignedPubKey", "{}") })),
		owned("`X-SignedPubKey` whose payload is not hex", signed(func(h http.Header) {
			h.Set("X-SignedPubKey", `{"payload":"zz","signature":"00"}`)
		})),
		owned("`X-SignedPubKey` with the owner's address, signed by another wallet", func(t *testing.T, r *rig) *http.Request {
			return r.ownerRequest(t, r.sdk(liar{ETH: stranger, address: owner.Address()}), "POST", ownedRef, "stop")
		}),
		owned("`X-SignedPubKey` that expired an hour ago", func(t *testing.T, r *rig) *http.Request {
			c := r.sdk(owner)
			c.KeyLifetime = -time.Hour
			return r.ownerRequest(t, c, "POST", ownedRef, "stop")
		}),
		owned("`X-SignedPubKey` signed for another node", func(t *testing.T, r *rig) *http.Request {
			c := r.sdk(owner)
			c.KeyDomain = "other-node.example"
			return r.ownerRequest(t, c, "POST", ownedRef, "stop")
		}),
		owned("`X-SignedPubKey` of 512 KiB", signed(func(h http.Header) {
			h.Set("X-SignedPubKey", `{"payload":"`+strings.Repeat("ab", 256<<10)+`","signature":"00"}`)
		})),
		owned("no `X-SignedOperation`", signed(func(h http.Header) { h.Del("X-SignedOperation") })),
		owned("`X-SignedOperation: [1,2,3]`", signed(func(h http.Header) { h.Set("X-SignedOperation", "[1,2,3]") })),
		owned("`X-SignedOperation` whose time is `NaN`", func(t *testing.T, r *rig) *http.Request {
			req := r.ownerRequest(t, r.sdk(owner), "POST", ownedRef, "stop")
			payload := `{"time":"NaN","method":"POST","path":"/control/machine/` + string(ownedRef) + `/stop","domain":"` + domain + `"}`
			req.Header.Set("X-SignedOperation", `{"payload":"`+hex.EncodeToString([]byte(payload))+`","signature":"`+strings.Repeat("00", 64)+`"}`)
			return req
		}),
		owned("`X-SignedOperation` signed ten minutes ago", func(t *testing.T, r *rig) *http.Request {
			c := r.sdk(owner)
			c.Now = func() time.Time { return time.Now().Add(-10 * time.Minute) }
			return r.ownerRequest(t, c, "POST", ownedRef, "stop")
		}),
		owned("`X-SignedOperation` signed for another VM's path", func(t *testing.T, r *rig) *http.Request {
			c := r.sdk(owner)
			req := r.ownerRequest(t, c, "POST", ownedRef, "stop")
			req.Header.Set("X-SignedOperation", c.Operation("POST", "/control/machine/"+string(strangerRef)+"/stop"))
			return req
		}),
		owned("`X-SignedOperation` signed for `erase`, sent to `stop`", func(t *testing.T, r *rig) *http.Request {
			c := r.sdk(owner)
			req := r.ownerRequest(t, c, "POST", ownedRef, "stop")
			req.Header.Set("X-SignedOperation", c.Operation("POST", "/control/machine/"+string(ownedRef)+"/erase"))
			return req
		}),
		apiRow("Headers", "an owner's signed operation replayed", "`api.Server` with `auth.Owner`: `POST /control/machine/{ref}/stop`, twice", func(t *testing.T, r *rig) answer {
			req := r.ownerRequest(t, r.sdk(owner), "POST", ownedRef, "stop")
			resp, err := r.client.Do(req)
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("first call: %v %v", resp, err)
			}
			resp.Body.Close()
			return r.do(t, r.request(t, "POST", req.URL.Path, "", req.Header))
		}),
		owned("a valid signature of a wallet that does not own the VM", func(t *testing.T, r *rig) *http.Request {
			return r.ownerRequest(t, r.sdk(stranger), "POST", ownedRef, "stop")
		}),
		apiRow("Headers", "an owner's call on a VM the node does not host", "`api.Server` with `auth.Owner`: `POST /control/machine/{other ref}/stop`", func(t *testing.T, r *rig) answer {
			return r.do(t, r.ownerRequest(t, r.sdk(owner), "POST", strangerRef, "stop"))
		}),
	}
}

func bodyRows() []row {
	const alloc = "/control/allocations"
	const expire = "/control/machine/" + string(ownedRef) + "/expire"
	operator := func(input, method, path, body string) row {
		return apiRow("Bodies", input, "`api.Server`: `"+method+" "+shorten(path)+"` (operator's token)", func(t *testing.T, r *rig) answer {
			return r.do(t, r.request(t, method, path, body, tokenHeader()))
		})
	}
	return []row{
		operator("an allocation that is not JSON", "POST", alloc, "persistent_vms=all"),
		operator("an allocation of 2 MiB", "POST", alloc, `{"instances":[`+strings.Repeat(`"`+string(ownedRef)+`",`, 2<<20/67)+`"`+string(ownedRef)+`"]}`),
		operator("an allocation listing `../../etc`", "POST", alloc, `{"instances":["../../etc"]}`),
		operator("an allocation whose `instances` is a string", "POST", alloc, `{"instances":"`+string(ownedRef)+`"}`),
		operator("a notification whose `instance` is a number", "POST", "/control/allocation/notify", `{"instance":5}`),
		operator("an expiry `?timeout=NaN`", "POST", expire+"?timeout=NaN", ""),
		operator("an expiry `?timeout=Infinity`", "POST", expire+"?timeout=Infinity", ""),
		operator("an expiry `{\"timeout\": 1e300}`", "POST", expire, `{"timeout": 1e300}`),
		operator("an expiry `{\"timeout\": -1}`", "POST", expire, `{"timeout": -1}`),
		operator("an expiry `{\"timeout\": \"60\"}`", "POST", expire, `{"timeout": "60"}`),
		operator("a reinstall `{\"erase_volumes\": \"no\"}`", "POST", "/control/machine/"+string(ownedRef)+"/reinstall", `{"erase_volumes": "no"}`),
		apiRow("Bodies", "an owner's expiry with a body of 1 MiB", "`api.Server` with `auth.Owner`: `POST /control/machine/{ref}/expire`", func(t *testing.T, r *rig) answer {
			req := r.ownerRequest(t, r.sdk(owner), "POST", ownedRef, "expire")
			return r.do(t, r.request(t, "POST", req.URL.Path, `{"timeout":1,"pad":"`+strings.Repeat("x", 1<<20)+`"}`, req.Header))
		}),
		apiRow("Bodies", "a program request announcing a body of 2 GiB (`MAX_REQUEST_BODY` 1 MiB here)", "`api.Server`: `POST /vm/{ref}/upload`", func(t *testing.T, r *rig) answer {
			return r.raw(t, []byte(fmt.Sprintf("POST /vm/%s/upload HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n", ownedRef, domain, int64(2)<<30)), 0)
		}),
	}
}

func serverRows() []row {
	rawRow := func(input string, data string, slow time.Duration) row {
		return apiRow("HTTP server", input, "`api.Server.HTTPServer`", func(t *testing.T, r *rig) answer {
			return r.raw(t, []byte(data), slow)
		})
	}
	// Program routes are served by the fast path (api.Front), which hands
	// any head outside its strict subset to net/http.
	programRow := func(input string, data string) row {
		return apiRow("HTTP server", input, "`api.Front`, which hands it to `api.Server.HTTPServer`", func(t *testing.T, r *rig) answer {
			return r.raw(t, []byte(data), 0)
		})
	}
	return []row{
		rawRow("2 MiB of headers", "GET /about/executions/list HTTP/1.1\r\nHost: "+domain+"\r\nX-Pad: "+strings.Repeat("a", 2<<20)+"\r\n\r\n", 0),
		rawRow("headers sent one byte every 50 ms (the header timeout is 0.3 s here)", "GET / HTTP/1.1\r\nHost: "+domain+"\r\nX-Slow: "+strings.Repeat("a", 100)+"\r\n\r\n", 50*time.Millisecond),
		rawRow("`Host: a b` (not a host name)", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 0),
		rawRow("a request line that is not HTTP", "HELLO\r\n\r\n", 0),
		rawRow("both `Content-Length` and `Transfer-Encoding: chunked`", "POST /control/allocations HTTP/1.1\r\nHost: "+domain+"\r\nX-Auth-Signature: "+operatorToken+
			"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0),
		rawRow("two different `Content-Length` headers", "POST /control/allocations HTTP/1.1\r\nHost: "+domain+"\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 0),
		rawRow("a program request with both `Content-Length` and `Transfer-Encoding: chunked`", "POST /vm/"+string(ownedRef)+"/ HTTP/1.1\r\nHost: "+domain+
			"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0),
		programRow("a program request with two different `Content-Length` headers", "POST /vm/"+string(ownedRef)+"/ HTTP/1.1\r\nHost: "+domain+"\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
		programRow("a program request with a folded header line", "GET /vm/"+string(ownedRef)+"/ HTTP/1.1\r\nHost: "+domain+"\r\nX-A: b\r\n c\r\n\r\n"),
		programRow("a program request with a space before a header's colon", "GET /vm/"+string(ownedRef)+"/ HTTP/1.1\r\nHost: "+domain+"\r\nX-A : b\r\n\r\n"),
		programRow("a program request with two `Host` headers", "GET /vm/"+string(ownedRef)+"/ HTTP/1.1\r\nHost: "+domain+"\r\nHost: other.example\r\n\r\n"),
		programRow("a program request with a NUL in a header", "GET /vm/"+string(ownedRef)+"/ HTTP/1.1\r\nHost: "+domain+"\r\nX-A: b\x00c\r\n\r\n"),
		programRow("a program request with 64 KiB of headers", "GET /vm/"+string(ownedRef)+"/ HTTP/1.1\r\nHost: "+domain+"\r\nX-Pad: "+strings.Repeat("a", 64<<10)+"\r\n\r\n"),
		get("HTTP server", "`DELETE` on a control route", "DELETE", "/control/machine/"+string(ownedRef)+"/stop", tokenHeader()),
		get("HTTP server", "a route the node does not serve (`/control/machine/{ref}/backup`)", "POST", "/control/machine/"+string(ownedRef)+"/backup", tokenHeader()),
	}
}
