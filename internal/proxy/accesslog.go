package proxy

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// record collects what one request did, for its access-log line. The
// handler owns it; the reverse proxy's hooks find it through the request
// context (one typed key, checked assertion).
type record struct {
	start          time.Time
	route          string
	upstream       string
	account        string
	cache          string // hit, miss, collapsed, bypass, refresh, or "" (not cacheable)
	upstreamStatus int
	upstreamDur    time.Duration
	queueWait      time.Duration
	retries        int
	reqID          string
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

func (g *requestIDs) next() string {
	return g.prefix + strconv.FormatUint(g.n.Add(1), 10)
}

// requestID keeps a sane client-sent X-Request-Id and makes one otherwise.
func (g *requestIDs) from(r *http.Request) string {
	if v := r.Header.Get("X-Request-Id"); v != "" && len(v) <= 64 && printableToken(v) {
		return v
	}
	return g.next()
}

func printableToken(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// accountOf returns the Basic-auth user when it is a Twilio account or API
// key SID (AC… or SK… and 32 hex digits), else "". The password is never
// looked at, so it cannot leak into a log line or a metric label.
func accountOf(auth string) string {
	const prefix = "Basic "
	if len(auth) < len(prefix) || !strings.EqualFold(auth[:len(prefix)], prefix) {
		return ""
	}
	var buf [192]byte
	enc := auth[len(prefix):]
	if base64.StdEncoding.DecodedLen(len(enc)) > len(buf) {
		return ""
	}
	n, err := base64.StdEncoding.Decode(buf[:], []byte(enc))
	if err != nil {
		return ""
	}
	user, _, ok := strings.Cut(string(buf[:min(n, 35)]), ":")
	if !ok || len(user) != 34 || (user[:2] != "AC" && user[:2] != "SK") {
		return ""
	}
	for i := 2; i < 34; i++ {
		c := user[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return ""
		}
	}
	return user
}
