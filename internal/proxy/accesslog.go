package proxy

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/connwatch"
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
	outcomeShared // answered from the fleet's shared tier (L2)
	numOutcomes
)

// outcomeNames are the label values, by outcome. outcomeNone's line has
// no "cache" field.
var outcomeNames = [numOutcomes]string{"none", "hit", "miss", "collapsed", "stale", "refresh", "bypass", "shared"}

// accessLevels are the levels an access line is written at.
var accessLevels = [...]zerolog.Level{zerolog.InfoLevel, zerolog.WarnLevel, zerolog.ErrorLevel}

const (
	accessInfo = iota
	accessWarn
	accessError
)

// accessLogs are the loggers of one route and outcome: info's context
// begins with the level, where zerolog writes it, and its lines are
// written with Log (no level of zerolog's own: the level check is the
// caller's); warnings and errors go through zerolog's levels, so that a
// level writer (logbuf) still writes them at once.
//
// prefix is info's line up to the end of its context (`{"level":"info",
// "route":…`), encoded by zerolog once: with Options.LogOutput an info
// line is that, the fields, and its end, appended to the writer directly.
type accessLogs struct {
	info, leveled zerolog.Logger
	prefix        []byte
}

// accessLoggers returns loggers per route label and outcome, with the
// route, upstream and cache outcome encoded once.
func accessLoggers(l zerolog.Logger) [][numOutcomes]accessLogs {
	labels := route.Labels()
	out := make([][numOutcomes]accessLogs, len(labels))
	for i, name := range labels {
		up, _, _ := strings.Cut(name, ".") // a route's name begins with its upstream's
		if i == route.Unrouted() {
			up = ""
		}
		for j, o := range outcomeNames {
			ctx := func(c zerolog.Context) zerolog.Logger {
				// Fields are never empty strings: an unrouted line has no
				// upstream, a route that is not cached no cache outcome.
				c = c.Str("route", name)
				if up != "" {
					c = c.Str("upstream", up)
				}
				if outcome(j) != outcomeNone {
					c = c.Str("cache", o)
				}
				return c.Logger()
			}
			info := func(l zerolog.Logger) zerolog.Logger {
				return ctx(l.With().Str(zerolog.LevelFieldName, zerolog.LevelFieldMarshalFunc(zerolog.InfoLevel)))
			}
			out[i][j] = accessLogs{info: info(l), leveled: ctx(l.With()), prefix: linePrefix(info)}
		}
	}
	return out
}

// linePrefix is what the logger made by info writes before an event's
// own fields: its empty line less the end ("}" and a newline).
func linePrefix(info func(zerolog.Logger) zerolog.Logger) []byte {
	var b bytes.Buffer
	l := info(zerolog.New(&b))
	l.Log().Msg("")
	return bytes.TrimSuffix(b.Bytes(), []byte("}\n"))
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

// state is the per-request pair, pooled to keep the hit path cheap, and
// the buffer its access line is built in (not cleared between requests:
// a line is built from its start).
type state struct {
	rec  record
	rw   recordWriter
	line [512]byte
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

// logRequest writes the access-log line, built in line. It never logs a
// header value.
func (p *Proxy) logRequest(r *http.Request, rec *record, w *recordWriter, line *[512]byte) {
	p.m.requests[rec.routeID][rec.cache].Inc()
	status := w.status
	lvl := accessInfo
	switch {
	case rec.upstreamCut:
		lvl = accessError // the upstream failed mid-body after the answer began
	case w.writeErr != nil:
		lvl = accessWarn // an interrupted transfer: bytes says how much was sent
		if rec.errMsg == "" || rec.errMsg == http.ErrAbortHandler.Error() {
			rec.errMsg = "response interrupted: the client did not take it: " + w.writeErr.Error()
		}
	case status == 0:
		status = 499 // client went away before an answer: nothing was sent
	case status >= 500:
		lvl = accessError
	case status == http.StatusTooManyRequests:
		lvl = accessWarn
	}
	logs := &p.access[rec.routeID][rec.cache]
	var ev *zerolog.Event
	switch {
	case lvl != accessInfo:
		if ev = logs.leveled.WithLevel(accessLevels[lvl]); ev == nil {
			return
		}
	case zerolog.InfoLevel < p.log.GetLevel() || zerolog.InfoLevel < zerolog.GlobalLevel():
		return
	case rec.errMsg != "" || p.out == nil:
		if ev = logs.info.Log(); ev == nil { // a zero Logger
			return
		}
	}
	dur := p.clock.Since(rec.start)
	stamp := p.stamp.json(rec.start.Add(dur))
	// The fields after the context are encoded here, in one value: zerolog
	// spends more on each field's call and key than on its bytes (a fifth
	// of a hit's instructions went to the access line). The line is the
	// same JSON, field for field and in the same order.
	if ev == nil {
		// An info line without an error, given the logger's writer, skips
		// zerolog's event too: its context is logs.prefix, and what the
		// event would add is `,"time":`, the value and the line's end.
		b := append(append(line[:0], logs.prefix...), `,"time":`...)
		b = appendAccessFields(b, stamp, r.Method, status, rec, w.bytes, dur, p.ids.prefix)
		_, _ = p.out.Write(append(b, `,"message":"request"}`+"\n"...))
		return
	}
	b := appendAccessFields(line[:0], stamp, r.Method, status, rec, w.bytes, dur, p.ids.prefix)
	if rec.errMsg != "" { // zerolog escapes it
		ev.RawJSON("time", b).Str("error", rec.errMsg).Msg("request")
		return
	}
	ev.RawJSON("time", append(b, `,"message":"request"`...)).Msg("")
}

// appendAccessFields appends the access line's value of "time" and the
// fields after it up to "account": request_id, method, status, the upstream
// fields of an answer that came through the upstream, bytes, duration_us,
// and account when the request had credentials. A method with a byte JSON
// would escape (never one net/http accepts) is written as an escaped
// string.
func appendAccessFields(b, stamp []byte, method string, status int, rec *record, bytes int64, dur time.Duration, idPrefix string) []byte {
	b = append(b, stamp...)
	b = append(b, `,"request_id":"`...)
	if rec.reqID != "" { // validRequestID: nothing to escape
		b = append(b, rec.reqID...)
	} else { // the prefix is hex and the counter digits
		b = strconv.AppendUint(append(b, idPrefix...), rec.reqNum, 10)
	}
	b = append(b, `","method":`...)
	if plainJSON(method) {
		b = append(append(append(b, '"'), method...), '"')
	} else {
		q, _ := json.Marshal(method) // a string always encodes
		b = append(b, q...)
	}
	b = appendInt(append(b, `,"status":`...), int64(status))
	if rec.viaUpstream {
		// A hit, or an answer the sidecar gave itself, made no upstream
		// call: its line has no upstream fields rather than zeros.
		b = appendInt(append(b, `,"upstream_status":`...), int64(rec.upstreamStatus))
		b = appendInt(append(b, `,"upstream_us":`...), rec.upstreamDur.Microseconds())
		b = appendInt(append(b, `,"queue_wait_us":`...), rec.calls.queueWait.Microseconds())
		b = appendInt(append(b, `,"retries":`...), int64(rec.calls.retries))
		b = appendInt(append(b, `,"upstream_429s":`...), int64(rec.calls.tooMany))
	}
	b = appendInt(append(b, `,"bytes":`...), bytes)
	b = appendInt(append(b, `,"duration_us":`...), dur.Microseconds())
	if acct := rec.cred.accountJSON(); len(acct) > 2 { // no field rather than ""
		b = append(append(b, `,"account":`...), acct...)
	}
	return b
}

// digits3 is "000" to "999", three bytes each.
var digits3 = func() (d [3000]byte) {
	for i := range 1000 {
		d[3*i], d[3*i+1], d[3*i+2] = byte('0'+i/100), byte('0'+i/10%10), byte('0'+i%10)
	}
	return d
}()

// appendInt is strconv.AppendInt in base 10, from a table below 1000 (a
// status, a participant's byte count, most durations): a hit's line has
// three such numbers, and strconv's general loop cost each about 60
// instructions more.
func appendInt(b []byte, v int64) []byte {
	switch {
	case v < 0 || v >= 1000:
		return strconv.AppendInt(b, v, 10)
	case v >= 100:
		return append(b, digits3[3*v], digits3[3*v+1], digits3[3*v+2])
	case v >= 10:
		return append(b, digits3[3*v+1], digits3[3*v+2])
	}
	return append(b, byte('0'+v))
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
// growth at debug; never a credential.
func BudgetLog(log zerolog.Logger) func(ratelimit.Event) {
	return func(e ratelimit.Event) {
		ev := log.Info()
		if e.Kind == ratelimit.CapGrown {
			ev = log.Debug()
		}
		ev = ev.Str("component", "budget").Str("decision", e.Kind.String()).Str("account", e.Account)
		if e.Kind == ratelimit.KeyLearned {
			ev = ev.Str("key", e.Key)
		} else {
			ev = ev.Int("from", e.From).Int("to", e.To).Int("in_flight", e.InFlight)
		}
		ev.Msg("budget")
	}
}
