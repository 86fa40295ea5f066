package proxy

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// record collects what one request did, for its access-log line. The
// handler owns it; the reverse proxy's hooks find it through the request
// context (one typed key, checked assertion).
type record struct {
	start   time.Time
	routeID int         // index into routeNames: route and upstream, for logs and metrics
	cred    *credential // nil without an Authorization header
	keyBuf  [192]byte   // the cache key of a read, built without allocating
	cache   string      // hit, miss, collapsed, bypass, refresh, or "" (not cacheable)
	// viaUpstream is set when the answer came from (or waited on) an
	// upstream call; only then does the line carry the upstream fields.
	viaUpstream    bool
	upstreamStatus int
	upstreamDur    time.Duration
	calls          callStats // queue wait, retries, upstream 429s
	reqID          string    // the client's X-Request-Id, or "" and reqNum
	reqNum         uint64
	errMsg         string
	rt             route
}

type recordKey struct{}

// recordWriter wraps the client's ResponseWriter to learn the status and
// byte count. Unwrap lets http.ResponseController reach Flush.
type recordWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (w *recordWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recordWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

func (w *recordWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// state is the per-request pair, pooled to keep the hit path cheap.
type state struct {
	rec record
	rw  recordWriter
}

var statePool = sync.Pool{New: func() any { return new(state) }}

// requestIDs makes process-unique request ids: a random prefix and a counter.
type requestIDs struct {
	prefix string
	n      atomic.Uint64
}

func newRequestIDs() *requestIDs {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return &requestIDs{prefix: hex.EncodeToString(b[:]) + "-"}
}

// validRequestID accepts a client's X-Request-Id that is short and printable.
func validRequestID(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// accountOf copies into dst the Basic-auth user when it is a Twilio account
// or API key SID (AC… or SK… and 32 hex digits) and returns its length, else
// 0. Only the first 48 base64 characters are decoded (the user, the colon and
// one password byte, discarded), so the password cannot reach a log line or
// a metric label.
func accountOf(auth string, dst *[34]byte) int {
	const prefix = "Basic "
	if len(auth) < len(prefix)+48 || !strings.EqualFold(auth[:len(prefix)], prefix) {
		return 0
	}
	var enc [48]byte
	var dec [36]byte
	copy(enc[:], auth[len(prefix):])
	if _, err := base64.StdEncoding.Decode(dec[:], enc[:]); err != nil {
		return 0
	}
	if dec[34] != ':' || (string(dec[:2]) != "AC" && string(dec[:2]) != "SK") {
		return 0
	}
	for _, c := range dec[2:34] {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return 0
		}
	}
	copy(dst[:], dec[:34])
	return 34
}

// clockText formats the access log's "time" field (RFC 3339, seconds, as
// zerolog's default) once per second instead of once per request.
type clockText struct {
	cur atomic.Pointer[stampText]
}

type stampText struct {
	sec  int64
	text string
	json []byte // text as a JSON string
}

func (c *clockText) format(t time.Time) string { return c.stamp(t).text }

// json is format's result as a JSON string.
func (c *clockText) json(t time.Time) []byte { return c.stamp(t).json }

func (c *clockText) stamp(t time.Time) *stampText {
	sec := t.Unix()
	if s := c.cur.Load(); s != nil && s.sec == sec {
		return s
	}
	text := t.UTC().Format(time.RFC3339)
	s := &stampText{sec: sec, text: text, json: []byte(`"` + text + `"`)}
	c.cur.Store(s)
	return s
}
