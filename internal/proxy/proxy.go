// Package proxy is cacheproxy's HTTP front end: it routes each request to a
// configured Twilio upstream, answers participant reads from the cache
// (coalescing identical cold reads), streams everything else through
// httputil.ReverseProxy, and invalidates what writes change.
//
// It composes parts it does not own, through the small interfaces below
// (docs/architecture.md, "Seams"): a Store of entries, an Invalidator that
// keeps the freshness guarantee, and a Budget that keeps each account under
// Twilio's limits.
package proxy

import (
	"cmp"
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/connwatch"
	"cacheproxy/internal/invalidation"
	"cacheproxy/internal/load"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/route"
	"cacheproxy/internal/tier"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"go.opentelemetry.io/otel/trace"
)

// Store holds cached responses. Entries are immutable once set.
type Store interface {
	// Get returns the entry under key unless it is absent or past its
	// Keep time at now. Whether it is still valid is the Invalidator's
	// question.
	Get(key string, now time.Time) (*cache.Entry, bool)
	// Set stores e until e.Keep and reports whether it was kept; an entry
	// set is found by any Get that starts after Set returns.
	Set(e *cache.Entry) bool
	// Stats is for the summary line and metrics, never the request path.
	Stats() cache.Stats
}

// Invalidator keeps the freshness guarantee: a read that starts after a
// write's response was sent never returns data fetched before the write.
type Invalidator interface {
	// Epoch is the current epoch; a fetch records it before it starts,
	// and coalesced reads share a fetch only within one epoch. Every
	// invalidation of the epoch it returns is already visible to Valid.
	Epoch() uint64
	// Invalidate makes everything tagged with any of tags and fetched
	// before the call invalid, and returns the new epoch. It is applied
	// when it returns.
	Invalidate(ctx context.Context, tags []string) uint64
	// Valid reports whether data fetched at epoch is still good for tags.
	Valid(epoch uint64, tags []string) bool
}

// Intender announces a write to the fleet before it is sent
// (docs/fleet.md, "Read-your-writes across replicas"): a write whose intent cannot be recorded is
// refused, nothing sent upstream.
type Intender interface {
	Intend(ctx context.Context, tags []string) (invalidation.Intent, error)
}

// Budget keeps each account's upstream calls within Twilio's limits.
type Budget interface {
	// Acquire waits for a turn to call upstream as user (the Basic-auth
	// account or API key SID, or "") with credential (a fingerprint that
	// tells callers of one account apart), bounded, and until ctx ends. On
	// success the caller must end the turn with the call's outcome. A
	// refusal is a *ratelimit.RejectedError.
	Acquire(ctx context.Context, user, credential string) (ratelimit.Turn, error)
	// Learn records that API key key belongs to account acct; Knows
	// reports whether key's account is known.
	Learn(key, acct string)
	Knows(key string) bool
	// Verify records that the upstream accepted credential of user (it
	// answered a 2xx): a real account, that metrics may name.
	Verify(user, credential string)
	// Accounts reports each account's budget, for metrics and the summary.
	Accounts() []ratelimit.State
}

// Proxy is the http.Handler clients talk to.
type Proxy struct {
	ups     [route.NumUpstreams]*upstream
	tracer  *tracer // nil: tracing off
	router  *route.Router
	store   Store
	inv     Invalidator
	intents Intender     // nil: writes are not announced
	load    *load.Loader // the cached read path (internal/load)
	budget  Budget
	summary func(*zerolog.Event)
	log     zerolog.Logger
	events  zerolog.Logger // lines other than the access log: timestamped
	// access holds one logger per route and cache outcome with those
	// fields (and the upstream) encoded once, for the access-log lines.
	access [][numOutcomes]zerolog.Logger
	clock  clock.Clock
	fp     *fingerprinter
	ids    *requestIDs
	hdrs   hitHeaders
	stamp  clockText

	refused refusals
	c       counters
	m       *metrics
	fresh   Freshness
	// ttls is each route's ttl by its label index (0: not cached), and
	// onRequest whether any route cached on request is on (writes then
	// name the scopes of the resources they touch: route.TreeTags).
	ttls      []time.Duration
	onRequest bool
	maxBody   int64
	maxFetch  int64
	writeTO   time.Duration
	accounts  int // accounts named in metrics and the summary (MaxAccountSeries)

	hosts atomic.Pointer[pageHosts] // what page URLs may name (AnswerOn); nil: the request's Host
}

// upstream is one configured Twilio API host.
type upstream struct {
	id        route.Upstream
	target    *url.URL
	transport http.RoundTripper
	rp        *httputil.ReverseProxy
	timeout   time.Duration
	hosts     []string // its public hosts (upstreams.*.hosts), lower case
}

func lower(hosts []string) []string {
	out := make([]string, len(hosts))
	for i, h := range hosts {
		out[i] = strings.ToLower(h)
	}
	return out
}

// maxFetchBytes bounds how much of a participant read's response is
// buffered. Larger bodies than Freshness.MaxEntryBytes are served, not
// stored; larger than this they are a 502: no participant is that big.
const maxFetchBytes = 32 << 20

// New builds a Proxy. It starts no goroutines and listens nowhere.
func New(o Options) (*Proxy, error) {
	if o.Store == nil || o.Invalidator == nil || o.Budget == nil {
		return nil, fmt.Errorf("proxy: Options.Store, Invalidator and Budget are required")
	}
	if o.Transport == nil {
		o.Transport = NewTransport()
	}
	o.Transport = tracedTransport(o.Transport, o.Tracing)
	if len(o.KeySecret) == 0 {
		o.KeySecret = make([]byte, 32)
		if _, err := rand.Read(o.KeySecret); err != nil {
			return nil, fmt.Errorf("proxy: key secret: %w", err)
		}
	}
	if o.Registerer == nil {
		o.Registerer = prometheus.NewRegistry()
	}
	var hosts [route.NumUpstreams][]string
	for i, u := range o.Upstreams {
		hosts[i] = u.Hosts
	}
	router, err := route.NewRouter(hosts)
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	f := o.Freshness
	p := &Proxy{
		router:   router,
		store:    o.Store,
		inv:      o.Invalidator,
		intents:  o.Intents,
		budget:   o.Budget,
		summary:  o.SummaryFields,
		log:      o.Logger,
		clock:    clock.Or(o.Clock),
		fp:       newFingerprinter(o.KeySecret),
		ids:      newRequestIDs(),
		fresh:    f,
		maxBody:  o.MaxBodyBytes,
		writeTO:  o.WriteTimeout,
		refused:  refusals{ttl: o.UnauthorizedTTL},
		accounts: cmp.Or(o.MaxAccountSeries, 100),
		maxFetch: max(maxFetchBytes, f.MaxEntryBytes),
		hdrs:     newHitHeaders(max(f.TTL, f.NegativeTTL)),
		ttls:     make([]time.Duration, len(route.Labels())),
		tracer:   newTracer(o.Tracing),
	}
	p.events = p.log.With().Timestamp().Logger()
	p.setTTLs(f)
	p.m = newMetrics(o.Registerer, p)
	var l2 tier.Tier = tier.None{}
	if o.L2 != nil {
		l2 = timedTier{Tier: o.L2, clock: p.clock, latency: p.m.l2}
	}
	p.load = load.New(load.Config{L1: o.Store, L2: l2, Inv: o.Invalidator, Fetch: p.fetch, Variant: variant, Clock: p.clock, Flights: o.flights,
		Windows: load.Windows{WhileRevalidate: f.StaleWhileRevalidate, IfError: f.StaleIfError},
		Hooks:   load.Hooks{Claim: p.tracer.claim, Panic: p.fetchPanicked}})
	p.access = accessLoggers(p.log)
	// The reverse proxy's own lines (a body copy that failed) are complete
	// log lines: level, time, component.
	errLog := StdLog(p.events, "reverseproxy")
	for i, uc := range o.Upstreams {
		id := route.Upstream(i)
		target, err := url.Parse(uc.URL)
		if err != nil || target.Scheme == "" || target.Host == "" {
			return nil, fmt.Errorf("proxy: upstreams.%s.url %q is not an absolute URL", id, uc.URL)
		}
		paced := &pacedTransport{
			next: o.Transport, budget: o.Budget, retry: o.Retry,
			clock: p.clock, c: &p.c, m: p.m, upstream: id.String(),
			fp: p.fp, refused: &p.refused, tracer: p.tracer,
		}
		up := &upstream{id: id, target: target, transport: paced, timeout: uc.Timeout, hosts: lower(uc.Hosts)}
		up.rp = &httputil.ReverseProxy{
			Rewrite:        func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
			Transport:      timeoutTransport{paced, up.timeout},
			FlushInterval:  -1, // Twilio answers are small JSON: pass bytes on as they come
			ErrorLog:       errLog,
			ModifyResponse: p.modifyResponse,
			ErrorHandler:   p.errorHandler,
		}
		p.ups[id] = up
	}
	return p, nil
}

// Wait blocks until detached fetches (those whose clients all left)
// finish, or ctx ends. Call it after http.Server.Shutdown, before closing
// the store.
func (p *Proxy) Wait(ctx context.Context) error {
	return p.load.Wait(ctx)
}

// ServeHTTP routes, serves and logs one request.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	st := statePool.Get().(*state)
	st.rec, st.rw = record{}, recordWriter{}
	st.rw.ResponseWriter, st.rw.writeTimeout, st.rw.watched = w, p.writeTO, connwatch.Of(r)
	rec := &st.rec
	rec.start = p.clock.Now()
	rec.hdr = scanHeaders(r.Header)
	if id := rec.hdr.requestID; len(id) == 1 && validRequestID(id[0]) {
		rec.reqID = id[0]
		w.Header()["X-Request-Id"] = id // echoed for correlation
	} else {
		rec.reqNum = p.ids.n.Add(1)
	}
	var auth string
	if v := rec.hdr.auth; len(v) > 0 {
		auth = v[0]
	}
	if auth != "" {
		rec.cred = p.fp.lookup(auth)
	}
	var span trace.Span
	if p.tracer != nil {
		r, span = p.tracer.serverSpan(r)
	}
	defer func() {
		if v := recover(); v != nil {
			// http.ErrAbortHandler: the reverse proxy lost the upstream
			// mid-body; the connection is cut. Log it, then let net/http
			// do the cutting.
			if rec.errMsg == "" {
				rec.errMsg = fmt.Sprint(v)
			}
			p.logRequest(r, rec, &st.rw)
			if span != nil {
				endServerSpan(span, rec, &st.rw)
			}
			panic(v)
		}
		p.logRequest(r, rec, &st.rw)
		if span != nil {
			endServerSpan(span, rec, &st.rw)
		}
		rec.hdr = reqHeaders{} // a pooled state keeps no reference to a request's credentials
		statePool.Put(st)
	}()
	p.serve(&st.rw, r, rec, auth)
}

func (p *Proxy) serve(w *recordWriter, r *http.Request, rec *record, auth string) {
	m := &rec.rt
	if rerr := p.router.ResolveTo(m, r.Method, r.Host, r.URL.Host, escapedPath(r)); rerr != nil {
		rec.routeID = route.Unrouted()
		rec.errMsg = rerr.LogText()
		twilioError(w, rerr.Status, rerr.Msg)
		return
	}
	rec.routeID = m.ID()
	if len(rec.hdr.auth) > 1 {
		// Which one would the upstream honour? An entry stored under one
		// credential's key must hold only what that credential may read.
		rec.errMsg = "more than one Authorization header"
		twilioError(w, http.StatusBadRequest, "send one Authorization header, not several")
		return
	}
	if ref := p.refused.lookup(rec.cred, rec.start); ref != nil {
		rec.errMsg = "credential refused by the upstream within ratelimit.unauthorized_ttl: answered locally"
		ref.write(w)
		return
	}
	up := p.ups[m.Upstream]
	if p.ttls[m.ID()] > 0 && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		p.serveCached(w, r, rec, up, auth)
		return
	}
	p.forward(w, r, rec, up)
}

// escapedPath is the request's path as the client sent it: for an
// origin-form request the part of RequestURI before any query (one
// IndexByte, where url.URL.EscapedPath re-escapes the decoded path byte by
// byte on every hit); otherwise (an absolute URI, or a request built in
// process) url.URL.EscapedPath.
func escapedPath(r *http.Request) string {
	if uri := r.RequestURI; len(uri) > 0 && uri[0] == '/' {
		if i := strings.IndexByte(uri, '?'); i >= 0 {
			uri = uri[:i]
		}
		return uri
	}
	return r.URL.EscapedPath()
}
