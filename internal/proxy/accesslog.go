package proxy

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"cacheproxy/internal/connwatch"
	"cacheproxy/internal/invalidation"
	"cacheproxy/internal/load"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/route"

	"github.com/rs/zerolog"
)

// record collects what one request did, for its access-log line. The
// handler owns it; the reverse proxy's hooks find it through the request
// context (one typed key, checked assertion).
type record struct {
	start   time.Time
	routeID int         // index into route.Labels(): route and upstream, for logs and metrics
	cred    *credential // nil without an Authorization header
	keyBuf  [192]byte   // the cache key of a read, built without allocating
	query   load.Query  // a cached read's query to the loader (Key: a view of keyBuf)
	cache   outcome     // what the cache did (outcomeNone: not a cached route)
	hdr     reqHeaders  // the request headers the proxy reads
	// viaUpstream is set when the answer came from (or waited on) an
	// upstream call; only then does the line carry the upstream fields.
	viaUpstream    bool
	upstreamStatus int
	upstreamDur    time.Duration
	calls          callStats // queue wait, retries, upstream 429s
	// pageBase is the base URL a pass-through GET's client used, when it
	// replaced its base URL: a list answer's page URLs point there.
	pageBase string
	// upstreamCut: the upstream's body failed after the client's answer
	// had begun (a pass-through streamed to the client).
	upstreamCut bool
	// bodyErr is the failure reading the client's request body, if any.
	bodyErr error
	reqID   string // the client's X-Request-Id, or "" and reqNum
	reqNum  uint64
	errMsg  string
	rt      route.Match
	// intent is a write's, announced to the fleet (nil: none).
	intent invalidation.Intent
	// extraTags are the scopes a write names beyond its path's: its
	// form's (route.Match.FormTags), and with routes cached on request,
	// the resources it touches (route.Match.TreeTags).
	extraTags []string
}

type recordKey struct{}

// outcome is what the cache did for a request: a label of
// cacheproxy_requests_total and the access line's "cache" field.
type outcome uint8

const (
	outcomeNone outcome = iota // not a cached route
	outcomeHit
	outcomeMiss
	outcomeCollapsed
	outcomeStale
	outcomeRefresh
	outcomeBypass
	outcomeL2 // answered from L2, the fleet's tier in Redis
	numOutcomes
)

// outcomeNames are the label values, by outcome. outcomeNone's line has
// no "cache" field.
var outcomeNames = [numOutcomes]string{"none", "hit", "miss", "collapsed", "stale", "refresh", "bypass", "l2"}

// accessLoggers returns a logger per route label and outcome, with the
// route, upstream and cache outcome encoded once.
func accessLoggers(l zerolog.Logger) [][numOutcomes]zerolog.Logger {
	labels := route.Labels()
	out := make([][numOutcomes]zerolog.Logger, len(labels))
	for i, name := range labels {
		up, _, _ := strings.Cut(name, ".") // a route's name begins with its upstream's
		if i == route.Unrouted() {
			up = ""
		}
		for j, o := range outcomeNames {
			// Fields are never empty strings: an unrouted line has no
			// upstream, a route that is not cached no cache outcome.
			c := l.With().Str("route", name)
			if up != "" {
				c = c.Str("upstream", up)
			}
			if outcome(j) != outcomeNone {
				c = c.Str("cache", o)
			}
			out[i][j] = c.Logger()
		}
	}
	return out
}

// recordWriter wraps the client's ResponseWriter to learn the status and
// byte count. Unwrap lets http.ResponseController reach Flush.
//
// When the response starts its write is bounded from then: a client that
// stops reading cannot hold the handler (or, through it, an upstream slot)
// for longer. On a watched connection (HTTP/1 through the server's
// connwatch.Watch) the watch is told; otherwise the response sets the
// connection's write deadline to writeTimeout from then. Every response
// starts its bound afresh, so one left by an earlier request on the same
// keep-alive connection never applies.
type recordWriter struct {
	http.ResponseWriter
	status       int
	bytes        int64
	writeErr     error // the first failed write: the client did not take the response
	writeTimeout time.Duration
	watched      *connwatch.Conn
}

// writeDeadliner is what net/http's ResponseWriter offers (as
// http.ResponseController uses it), without allocating a controller.
type writeDeadliner interface{ SetWriteDeadline(time.Time) error }

func (w *recordWriter) begin(code int) {
	w.status = code
	switch {
	case w.watched != nil:
		w.watched.Begin()
	case w.writeTimeout > 0:
		if d, ok := w.ResponseWriter.(writeDeadliner); ok {
			_ = d.SetWriteDeadline(time.Now().Add(w.writeTimeout))
		}
	}
}

func (w *recordWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.begin(code)
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recordWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.begin(http.StatusOK)
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	if err != nil && w.writeErr == nil {
		w.writeErr = err
	}
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
	return s != "" && len(s) <= 64 && !strings.Contains(s, " ") && plainJSON(s)
}

// clockText formats the access log's "time" field (RFC 3339, seconds, as
// zerolog's default) once per second instead of once per request.
type clockText struct {
	cur atomic.Pointer[stampText]
}

type stampText struct {
	sec  int64
	text string
}

func (c *clockText) format(t time.Time) string {
	sec := t.Unix()
	if s := c.cur.Load(); s != nil && s.sec == sec {
		return s.text
	}
	s := &stampText{sec: sec, text: t.UTC().Format(time.RFC3339)}
	c.cur.Store(s)
	return s.text
}

// logRequest writes the access-log line. It never logs a header value.
func (p *Proxy) logRequest(r *http.Request, rec *record, w *recordWriter) {
	p.m.requests[rec.routeID][rec.cache].Inc()
	status := w.status
	lvl := zerolog.InfoLevel
	switch {
	case rec.upstreamCut:
		lvl = zerolog.ErrorLevel // the upstream failed mid-body after the answer began
	case w.writeErr != nil:
		lvl = zerolog.WarnLevel // an interrupted transfer: bytes says how much was sent
		if rec.errMsg == "" || rec.errMsg == http.ErrAbortHandler.Error() {
			rec.errMsg = "response interrupted: the client did not take it: " + w.writeErr.Error()
		}
	case status == 0:
		status = 499 // client went away before an answer: nothing was sent
	case status >= 500:
		lvl = zerolog.ErrorLevel
	case status == http.StatusTooManyRequests:
		lvl = zerolog.WarnLevel
	}
	ev := p.access[rec.routeID][rec.cache].WithLevel(lvl)
	if ev == nil {
		return
	}
	dur := p.clock.Since(rec.start)
	ev.Str("time", p.stamp.format(rec.start.Add(dur)))
	if rec.reqID != "" {
		ev.Str("request_id", rec.reqID)
	} else { // the id's bytes are copied into the line
		var b [48]byte
		id := strconv.AppendUint(append(b[:0], p.ids.prefix...), rec.reqNum, 10)
		ev.Str("request_id", unsafe.String(unsafe.SliceData(id), len(id)))
	}
	ev.Str("method", r.Method).Int("status", status)
	if rec.viaUpstream {
		// A hit, or an answer the sidecar gave itself, made no upstream
		// call: its line has no upstream fields rather than zeros.
		ev.Int("upstream_status", rec.upstreamStatus).Int64("upstream_us", rec.upstreamDur.Microseconds()).
			Int64("queue_wait_us", rec.calls.queueWait.Microseconds()).Int("retries", rec.calls.retries).Int("upstream_429s", rec.calls.tooMany)
	}
	ev.Int64("bytes", w.bytes).Int64("duration_us", dur.Microseconds())
	if acct := rec.cred.accountJSON(); len(acct) > 2 { // no field rather than ""
		ev.RawJSON("account", acct)
	}
	if rec.errMsg != "" {
		ev.Str("error", rec.errMsg)
	}
	ev.Msg("request")
}

// plainJSON reports whether s is printable ASCII with no quote or
// backslash: a JSON string of itself.
func plainJSON(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// BudgetLog logs the budget's decisions: cuts and learned keys at info,
// growth at debug, impossible reports of Twilio's header at warn (at most
// one line a minute); never a credential.
func BudgetLog(log zerolog.Logger) func(ratelimit.Event) {
	return func(e ratelimit.Event) {
		ev := log.Info()
		if e.Kind == ratelimit.CapGrown {
			ev = log.Debug()
		}
		if e.Kind == ratelimit.ReportIgnored {
			ev = log.Warn()
		}
		ev = ev.Str("component", "budget").Str("decision", e.Kind.String()).Str("account", e.Account)
		switch e.Kind {
		case ratelimit.KeyLearned:
			ev = ev.Str("key", e.Key)
		case ratelimit.ReportIgnored:
			ev = ev.Int("reported", e.InFlight).Int("ignored", e.To).Int("max_reported", ratelimit.MaxReported)
		default:
			ev = ev.Int("from", e.From).Int("to", e.To).Int("in_flight", e.InFlight)
		}
		ev.Msg("budget")
	}
}
