package proxy

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/cache"
)

// refusals remembers, by credential fingerprint, the upstream's 401 for a
// short time (ratelimit.unauthorized_ttl), so that a wrong token is
// answered locally and spends none of its account's budget: a flood of
// wrong tokens for an account cannot queue ahead of its right one. It
// holds Twilio's error answer and the fingerprint, never the credential.
type refusals struct {
	ttl time.Duration
	n   atomic.Int64 // entries, so the request path skips the map while it is empty
	m   sync.Map     // credential fingerprint ([32]byte, hex) -> *refusal
}

type refusal struct {
	until  time.Time
	header cache.Header
	body   []byte
}

// authenticationFailed is Twilio's error code for a wrong credential.
const authenticationFailed = 20003

// maxRefusals bounds the memory of refusals; past it, expired ones are
// swept and new ones are not remembered until there is room.
const maxRefusals = 4096

// remember records the upstream's 401 for c at now, if it is Twilio's
// authentication failure (code 20003: the credential itself is wrong, on
// every path), not some other 401.
func (f *refusals) remember(c *credential, now time.Time, h http.Header, body []byte) {
	if f.ttl <= 0 || c == nil {
		return
	}
	var e struct {
		Code int `json:"code"`
	}
	if json.Unmarshal(body, &e) != nil || e.Code != authenticationFailed {
		return
	}
	if f.n.Load() >= maxRefusals {
		f.sweep(now)
		if f.n.Load() >= maxRefusals {
			return
		}
	}
	r := &refusal{until: now.Add(f.ttl), header: storedHeader(h, len(body)), body: body}
	if _, loaded := f.m.Swap(c.hex, r); !loaded {
		f.n.Add(1)
	}
}

// lookup returns c's remembered 401 if it has not expired at now.
func (f *refusals) lookup(c *credential, now time.Time) *refusal {
	if c == nil || f.n.Load() == 0 {
		return nil
	}
	v, ok := f.m.Load(c.hex)
	if !ok {
		return nil
	}
	r := v.(*refusal)
	if !now.Before(r.until) {
		if f.m.CompareAndDelete(c.hex, v) {
			f.n.Add(-1)
		}
		return nil
	}
	return r
}

func (f *refusals) sweep(now time.Time) {
	f.m.Range(func(k, v any) bool {
		if !now.Before(v.(*refusal).until) && f.m.CompareAndDelete(k, v) {
			f.n.Add(-1)
		}
		return true
	})
}

// write answers with the remembered 401.
func (r *refusal) write(w http.ResponseWriter) {
	h := w.Header()
	for _, f := range r.header {
		h[f.Name] = f.Values
	}
	w.WriteHeader(http.StatusUnauthorized)
	_, _ = w.Write(r.body)
}

// response is the remembered 401 as the upstream's answer to req.
func (r *refusal) response(req *http.Request) *http.Response {
	h := make(http.Header, len(r.header))
	for _, f := range r.header {
		h[f.Name] = f.Values
	}
	return &http.Response{
		Status: "401 Unauthorized", StatusCode: http.StatusUnauthorized, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: h, Body: io.NopCloser(bytes.NewReader(r.body)), ContentLength: int64(len(r.body)), Request: req,
	}
}
