// Package proxy is cacheproxy's HTTP front end: it routes each request to a
// configured Twilio upstream, answers participant reads from the cache
// (coalescing identical cold reads), streams everything else through
// httputil.ReverseProxy, and invalidates what writes change.
package proxy

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"hash/maphash"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/config"
	"cacheproxy/internal/inflight"
	"cacheproxy/internal/ratelimit"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"golang.org/x/sync/singleflight"
)

// flightGroup is the part of singleflight.Group the proxy uses, an interface
// so tests may substitute it (as groupcache does).
type flightGroup interface {
	DoChan(key string, fn func() (any, error)) <-chan singleflight.Result
}

// Options are the proxy's dependencies. Config and Store are required.
type Options struct {
	Config config.Config
	Store  *cache.Store
	// Logger receives one JSON line per request, with its own "time" field
	// (so give it no Timestamp()). Zero value: no logs.
	Logger zerolog.Logger
	// Transport carries upstream calls. If nil, NewTransport() is used.
	Transport http.RoundTripper
	// Now is the clock. If nil, time.Now is used.
	Now func() time.Time
	// KeySecret keys credential fingerprints. If empty, a random one.
	KeySecret []byte
	// Limiter paces upstream calls per account. If nil, one is built from
	// Config.RateLimit on the real clock.
	Limiter *ratelimit.Limiter
	// After waits between retries of an upstream 429. If nil, time.After.
	After func(time.Duration) <-chan time.Time
	// Registerer receives the proxy's metrics. If nil, they are kept in a
	// registry of their own that nobody scrapes.
	Registerer prometheus.Registerer
}

// Proxy is the http.Handler clients talk to.
type Proxy struct {
	ups     map[string]*upstream
	byHost  map[string]*upstream
	store   *cache.Store
	flights flightGroup
	log     zerolog.Logger
	// access holds one logger per route and cache outcome with those
	// fields (and the upstream) encoded once, for the access-log lines.
	access  [len(routeNames)][len(outcomeNames)]zerolog.Logger
	now     func() time.Time
	since   func(time.Time) time.Duration
	fp      *fingerprinter
	ids     *requestIDs
	fetches inflight.Tracker // upstream fetches still running (detached ones too)
	hdrs    hitHeaders
	stamp   clockText

	c                 counters
	m                 *metrics
	lim               *ratelimit.Limiter
	ttl, negTTL       time.Duration
	staleIfError, swr time.Duration
	maxEntry, maxBody int64
	maxFetch          int64
}

// upstream is one configured Twilio API host.
type upstream struct {
	name      string
	target    *url.URL
	transport http.RoundTripper
	rp        *httputil.ReverseProxy
	timeout   time.Duration
}

// maxFetchBytes bounds how much of a participant read's response is
// buffered. Larger bodies than cache.max_entry_bytes are served, not stored;
// larger than this they are a 502: no participant is that big.
const maxFetchBytes = 32 << 20

// New builds a Proxy. It starts no goroutines and listens nowhere.
func New(o Options) (*Proxy, error) {
	if o.Store == nil {
		return nil, errors.New("proxy: Options.Store is required")
	}
	if o.Transport == nil {
		o.Transport = NewTransport()
	}
	since := time.Since // one monotonic clock read, not time.Now's two
	if o.Now == nil {
		o.Now = time.Now
	} else {
		now := o.Now
		since = func(t time.Time) time.Duration { return now().Sub(t) }
	}
	if o.After == nil {
		o.After = time.After
	}
	rl := o.Config.RateLimit
	if o.Limiter == nil {
		o.Limiter = ratelimit.New(ratelimit.Config{
			Rate: float64(rl.RequestsPerSecond), MaxConcurrent: rl.MaxConcurrent,
			MaxWait: rl.MaxWait.D(), Recover: rl.Recover.D(),
		}, nil)
	}
	if len(o.KeySecret) == 0 {
		o.KeySecret = make([]byte, 32)
		if _, err := io.ReadFull(randReader, o.KeySecret); err != nil {
			return nil, fmt.Errorf("proxy: key secret: %w", err)
		}
	}
	c := o.Config
	p := &Proxy{
		ups:          map[string]*upstream{},
		byHost:       map[string]*upstream{},
		store:        o.Store,
		flights:      new(singleflight.Group),
		log:          o.Logger,
		now:          o.Now,
		since:        since,
		fp:           newFingerprinter(o.KeySecret),
		ids:          newRequestIDs(),
		ttl:          c.Cache.TTL.D(),
		negTTL:       c.Cache.NegativeTTL.D(),
		lim:          o.Limiter,
		staleIfError: c.Cache.StaleIfError.D(),
		swr:          c.Cache.StaleWhileRevalidate.D(),
		maxEntry:     int64(c.Cache.MaxEntryBytes),
		maxBody:      int64(c.Server.MaxBodyBytes),
		maxFetch:     max(maxFetchBytes, int64(c.Cache.MaxEntryBytes)),
		hdrs:         newHitHeaders(max(c.Cache.TTL.D(), c.Cache.NegativeTTL.D())),
	}
	if o.Registerer == nil {
		o.Registerer = prometheus.NewRegistry()
	}
	p.m = newMetrics(o.Registerer, p)
	for i, route := range routeNames {
		up, _, _ := strings.Cut(route, ".") // a route's name begins with its upstream's
		if i == len(routeNames)-1 {
			up = "" // unrouted
		}
		for j, outcome := range outcomeNames {
			if j == 0 {
				outcome = "" // not a cacheable route
			}
			p.access[i][j] = p.log.With().Str("route", route).Str("upstream", up).Str("cache", outcome).Logger()
		}
	}
	errLog := log.New(p.log.With().Str("component", "reverseproxy").Logger(), "", 0)
	for name, uc := range map[string]config.Upstream{conversations: c.Upstreams.Conversations, proxyAPI: c.Upstreams.Proxy} {
		target, err := url.Parse(uc.URL)
		if err != nil {
			return nil, fmt.Errorf("proxy: upstreams.%s.url: %w", name, err)
		}
		paced := &pacedTransport{
			next: o.Transport, lim: o.Limiter, maxRetries: rl.MaxRetries,
			base: rl.BackoffBase.D(), cap: rl.BackoffMax.D(), replayBytes: int64(rl.ReplayBytes),
			after: o.After, now: o.Now, c: &p.c, m: p.m, upstream: name,
		}
		up := &upstream{name: name, target: target, transport: paced, timeout: uc.Timeout.D()}
		up.rp = &httputil.ReverseProxy{
			Rewrite:        func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
			Transport:      timeoutTransport{paced, up.timeout},
			FlushInterval:  -1, // Twilio answers are small JSON: pass bytes on as they come
			ErrorLog:       errLog,
			ModifyResponse: p.modifyResponse,
			ErrorHandler:   p.errorHandler,
		}
		p.ups[name] = up
		// Only the configured Twilio host names select an upstream by Host:
		// the upstream URL's own host may be anything (127.0.0.1 in tests,
		// a staging host), and the sidecar's own Host must fall through to
		// path rules.
		for _, h := range uc.Hosts {
			if other, dup := p.byHost[strings.ToLower(h)]; dup {
				return nil, fmt.Errorf("proxy: host %q is listed by upstreams.%s.hosts and upstreams.%s.hosts", h, other.name, name)
			}
			p.byHost[strings.ToLower(h)] = up
		}
	}
	return p, nil
}

// NewTransport returns the upstream transport: no proxy from the
// environment (only configured upstreams are ever contacted), bounded dials
// and handshakes, and keep-alive pools sized for a busy sidecar.
func NewTransport() *http.Transport {
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   128,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// timeoutTransport bounds each pass-through call by the upstream's timeout.
type timeoutTransport struct {
	rt      http.RoundTripper
	timeout time.Duration
}

func (t timeoutTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(r.Context(), t.timeout)
	resp, err := t.rt.RoundTrip(r.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = cancelBody{resp.Body, cancel}
	return resp, nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b cancelBody) Close() error { err := b.ReadCloser.Close(); b.cancel(); return err }

// Wait blocks until detached fetches (those whose clients all left) and
// the limiter's dispatchers finish, or ctx ends. Call it after
// http.Server.Shutdown, before closing the store.
func (p *Proxy) Wait(ctx context.Context) error {
	if err := p.fetches.Wait(ctx); err != nil {
		return err
	}
	return p.lim.Wait(ctx)
}

// ServeHTTP routes, serves and logs one request.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	st := statePool.Get().(*state)
	*st = state{}
	st.rw.ResponseWriter = w
	rec := &st.rec
	rec.start = p.now()
	if id := r.Header["X-Request-Id"]; len(id) == 1 && validRequestID(id[0]) {
		rec.reqID = id[0]
		w.Header()["X-Request-Id"] = id // echoed for correlation
	} else {
		rec.reqNum = p.ids.n.Add(1)
	}
	var auth string // indexed directly: Header.Get would canonicalise the name
	if v := r.Header["Authorization"]; len(v) > 0 {
		auth = v[0]
	}
	if auth != "" {
		rec.cred = p.fp.lookup(auth)
	}
	defer func() {
		if v := recover(); v != nil {
			// http.ErrAbortHandler: the reverse proxy lost the upstream
			// mid-body; the connection is cut. Log it, then let net/http
			// do the cutting.
			rec.errMsg = fmt.Sprint(v)
			p.logRequest(r, rec, &st.rw)
			panic(v)
		}
		p.logRequest(r, rec, &st.rw)
		statePool.Put(st)
	}()
	p.serve(&st.rw, r, rec, auth)
}

func (p *Proxy) serve(w *recordWriter, r *http.Request, rec *record, auth string) {
	rt, rerr := p.resolve(r)
	if rerr != nil {
		rec.routeID = len(routeNames) - 1 // unrouted
		rec.errMsg = rerr.logText()
		twilioError(w, rerr.status, rerr.msg)
		return
	}
	rec.routeID, rec.rt = rt.id, rt
	if rt.cacheable && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		p.serveCached(w, r, rec, rt, auth)
		return
	}
	p.forward(w, r, rec, rt)
}

// forward streams a request through the upstream's ReverseProxy.
func (p *Proxy) forward(w http.ResponseWriter, r *http.Request, rec *record, rt route) {
	if r.ContentLength > p.maxBody {
		rec.errMsg = "request body too large"
		twilioError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", p.maxBody))
		return
	}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = http.MaxBytesReader(w, r.Body, p.maxBody)
	}
	p.c.passthrough.Add(1)
	rec.viaUpstream = true
	out := r.WithContext(withStats(context.WithValue(r.Context(), recordKey{}, rec), &rec.calls))
	if rt.path != r.URL.Path {
		u := *r.URL
		u.Path, u.RawPath = rt.path, rt.rawPath
		out.URL = &u
	}
	rt.up.rp.ServeHTTP(w, out)
}

func isWrite(method string) bool {
	return method != http.MethodGet && method != http.MethodHead && method != http.MethodOptions
}

// modifyResponse records the upstream's answer and, for a write, invalidates
// its scopes before the client sees the response (read-your-writes).
func (p *Proxy) modifyResponse(resp *http.Response) error {
	rec, ok := resp.Request.Context().Value(recordKey{}).(*record)
	if !ok {
		return nil
	}
	rec.upstreamStatus = resp.StatusCode
	rec.upstreamDur = p.now().Sub(rec.start)
	if isWrite(resp.Request.Method) {
		tags := rec.rt.writeTags()
		if resp.StatusCode < 300 {
			tags = append(tags, p.writeBodyTags(rec.rt, resp)...)
		}
		if len(tags) > 0 {
			p.store.Invalidate(tags...)
		}
	}
	return nil
}

// maxWriteBodyPeek bounds how much of a write's response is read to learn
// the scopes it names; larger bodies stream on untouched.
const maxWriteBodyPeek = 64 << 10

// writeBodyTags reads (up to maxWriteBodyPeek of) a write's JSON response
// for the ids it names, and puts the bytes back for the client.
func (p *Proxy) writeBodyTags(rt route, resp *http.Response) []string {
	if resp.Body == nil || resp.Body == http.NoBody || !strings.Contains(resp.Header.Get("Content-Type"), "json") {
		return nil
	}
	head, err := io.ReadAll(io.LimitReader(resp.Body, maxWriteBodyPeek+1))
	resp.Body = readCloser{io.MultiReader(bytesReader(head), errReader(err), resp.Body), resp.Body}
	if err != nil || len(head) > maxWriteBodyPeek {
		return nil
	}
	var ids bodyIDs
	if jsonUnmarshal(head, &ids) != nil {
		return nil
	}
	return bodyTags(rt.up.name, &ids, rt.resource)
}

// errorHandler answers upstream failures of pass-through requests.
func (p *Proxy) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	rec, ok := r.Context().Value(recordKey{}).(*record)
	if ok {
		rec.errMsg = err.Error()
		rec.upstreamDur = p.now().Sub(rec.start)
		if tags := rec.rt.writeTags(); isWrite(r.Method) && len(tags) > 0 {
			// The write may have been applied before the failure.
			p.store.Invalidate(tags...)
		}
	}
	p.fail(w, r, err)
}

// fail answers an upstream failure (nothing if the client went away).
func (p *Proxy) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, msg := statusFor(r.Context(), err)
	if status == 0 {
		return
	}
	var rej *ratelimit.RejectedError
	if errors.As(err, &rej) {
		w.Header().Set("Retry-After", strconv.Itoa(int(max(1, (rej.RetryAfter+time.Second-1)/time.Second))))
	}
	twilioError(w, status, msg)
}

// Summary is the totals since the process started.
type Summary struct {
	Hits, Misses, Collapsed, Stale, Passthrough     int64
	UpstreamCalls, Upstream429, Rejections, Retries int64
	QueueWait                                       time.Duration
	Cache                                           cache.Stats
}

// Summary reports the proxy's totals (it walks the cache: not for the
// request path).
func (p *Proxy) Summary() Summary {
	return Summary{
		Hits: p.c.hits.Load(), Misses: p.c.misses.Load(), Collapsed: p.c.collapsed.Load(),
		Stale: p.c.stale.Load(), Passthrough: p.c.passthrough.Load(),
		UpstreamCalls: p.c.upstreamCalls.Load(), Upstream429: p.c.upstream429.Load(),
		Rejections: p.c.rejections.Load(), Retries: p.c.retries.Load(),
		QueueWait: time.Duration(p.c.queueWaitNanos.Load()),
		Cache:     p.store.Stats(),
	}
}

// LogSummary writes the periodic summary line: what happened since prev
// (the previous call's result), and the cache's state now.
func (p *Proxy) LogSummary(prev Summary) Summary {
	s := p.Summary()
	reads := (s.Hits - prev.Hits) + (s.Misses - prev.Misses) + (s.Collapsed - prev.Collapsed) + (s.Stale - prev.Stale)
	ratio := 0.0
	if reads > 0 {
		ratio = float64(s.Hits-prev.Hits) / float64(reads)
	}
	// Summaries are never sampled or filtered below warn: they carry 429s.
	p.log.WithLevel(zerolog.NoLevel).Str("time", p.stamp.format(p.now())).
		Float64("hit_ratio", ratio).
		Int64("hits", s.Hits-prev.Hits).Int64("misses", s.Misses-prev.Misses).
		Int64("collapsed", s.Collapsed-prev.Collapsed).Int64("stale", s.Stale-prev.Stale).
		Int64("passthrough", s.Passthrough-prev.Passthrough).
		Int64("upstream_calls", s.UpstreamCalls-prev.UpstreamCalls).
		Int64("upstream_429s", s.Upstream429-prev.Upstream429).
		Int64("rejections", s.Rejections-prev.Rejections).
		Int64("retries", s.Retries-prev.Retries).
		Int64("queue_wait_us", (s.QueueWait-prev.QueueWait).Microseconds()).
		Int64("entries", s.Cache.Entries).Int64("bytes", s.Cache.Bytes).
		Uint64("evictions", s.Cache.Evictions).
		Msg("summary")
	return s
}

// logRequest writes the access-log line. It never logs a header value.
func (p *Proxy) logRequest(r *http.Request, rec *record, w *recordWriter) {
	outcome := outcomeIndex(rec.cache)
	p.m.requests[rec.routeID][outcome].Inc()
	status := w.status
	var ev *zerolog.Event
	switch l := &p.access[rec.routeID][outcome]; {
	case status == 0:
		status = 499 // client went away before an answer: nothing was sent
		ev = l.Info()
	case status >= 500:
		ev = l.Error()
	case status == http.StatusTooManyRequests:
		ev = l.Warn()
	default:
		ev = l.Info()
	}
	if ev == nil {
		return
	}
	dur := p.since(rec.start)
	ev.RawJSON("time", p.stamp.json(rec.start.Add(dur)))
	var buf [64]byte
	if rec.reqID != "" {
		ev.Str("request_id", rec.reqID)
	} else { // the prefix is hex and the counter digits: nothing to escape
		id := append(append(buf[:0], '"'), p.ids.prefix...)
		ev.RawJSON("request_id", append(strconv.AppendUint(id, rec.reqNum, 10), '"'))
	}
	ev.Str("method", r.Method).
		Int("status", status)
	if rec.viaUpstream {
		// A hit, or an answer the sidecar gave itself, made no upstream
		// call: its line has no upstream fields rather than zeros.
		ev.Int("upstream_status", rec.upstreamStatus).
			Int64("upstream_us", rec.upstreamDur.Microseconds()).
			Int64("queue_wait_us", rec.calls.queueWait.Microseconds()).
			Int("retries", rec.calls.retries).
			Int("upstream_429s", rec.calls.tooMany)
	}
	ev.Int64("bytes", w.bytes).
		Int64("duration_us", dur.Microseconds()).
		RawJSON("account", rec.cred.accountJSON())
	if rec.errMsg != "" {
		ev.Str("error", rec.errMsg)
	}
	ev.Msg("request")
}

// fingerprinter computes what a request's credentials contribute to its
// handling: the keyed hash that goes into cache keys (HMAC-SHA256 under a
// per-process or configured secret, so keys, logs and memory never hold a
// usable token) and the account SID for logs (see accountOf).
//
// HMAC and base64 cost a cache hit about 0.7 µs, so results are memoised in
// a fixed-size, lock-free, direct-mapped table indexed by two independently
// seeded maphash digests of the header (128 bits: a false match is as
// unlikely as a collision of the truncated HMAC itself). The table holds
// only those digests, the fingerprint and the account SID, never the header.
type fingerprinter struct {
	pool         sync.Pool
	seed1, seed2 maphash.Seed
	memo         [fpMemoSize]atomic.Pointer[credential]
}

const fpMemoSize = 1024

// credential is what one Authorization value yields; immutable once made.
type credential struct {
	h1, h2 uint64
	hex    [32]byte // first 16 bytes of the HMAC, hex-encoded
	// account is the account or API-key SID (see accountOf) as a JSON
	// string: `"AC…"`, or `""`.
	account    [36]byte
	accountLen int
}

var noAccountJSON = []byte(`""`)

// Account is the account or API-key SID, or empty.
func (c *credential) Account() []byte {
	j := c.accountJSON()
	return j[1 : len(j)-1]
}

// accountJSON is Account as a JSON string (SIDs need no escaping).
func (c *credential) accountJSON() []byte {
	if c == nil {
		return noAccountJSON
	}
	return c.account[:c.accountLen]
}

// hmacState is one pooled HMAC with its scratch space, so hashing a header
// allocates nothing.
type hmacState struct {
	h   hash.Hash
	in  []byte
	sum [sha256.Size]byte
}

func newFingerprinter(secret []byte) *fingerprinter {
	f := &fingerprinter{seed1: maphash.MakeSeed(), seed2: maphash.MakeSeed()}
	f.pool.New = func() any { return &hmacState{h: hmac.New(sha256.New, secret)} }
	return f
}

// lookup returns the credential of an Authorization value.
func (f *fingerprinter) lookup(auth string) *credential {
	h1, h2 := maphash.String(f.seed1, auth), maphash.String(f.seed2, auth)
	slot := &f.memo[h1%fpMemoSize]
	if c := slot.Load(); c != nil && c.h1 == h1 && c.h2 == h2 {
		return c
	}
	st := f.pool.Get().(*hmacState)
	st.h.Reset()
	st.in = append(st.in[:0], auth...)
	st.h.Write(st.in)
	c := &credential{h1: h1, h2: h2}
	hex.Encode(c.hex[:], st.h.Sum(st.sum[:0])[:16])
	clear(st.in) // the pooled scratch must not keep a credential
	f.pool.Put(st)
	var sid [34]byte
	n := accountOf(auth, &sid)
	c.account[0] = '"'
	copy(c.account[1:], sid[:n])
	c.account[n+1] = '"'
	c.accountLen = n + 2
	slot.Store(c)
	return c
}
