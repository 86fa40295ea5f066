package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"
	"unsafe"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/load"
	"cacheproxy/internal/route"
)

// reply is one way out of serveCached: what the cache did (the outcome
// counted and logged) and what to send: an entry with its Cache-Status
// and Age values, an error answer, or, with neither, a pass-through.
type reply struct {
	outcome outcome
	status  []string // the Cache-Status value
	entry   *cache.Entry
	age     []string // the Age value; nil: none
	err     error    // instead of an entry: the error answer (statusFor)
}

var (
	bypassStatus    = []string{"cacheproxy; fwd=bypass"}
	collapsedStatus = []string{"cacheproxy; fwd=uri-miss; collapsed; detail=peer"}
)

// serveCached answers a GET or HEAD of a cached read route. The read
// itself is load.Loader's (internal/load: the tiers, the flight, the
// claim, the stale answers); this turns its result into HTTP.
func (p *Proxy) serveCached(w *recordWriter, r *http.Request, rec *record, up *upstream, auth string) {
	noCache, noStore := rec.hdr.cacheDirectives()
	if auth == "" || noStore {
		// Without credentials nothing is served from or put in the cache;
		// no-store asks us to keep nothing.
		p.answer(w, r, rec, up, reply{outcome: outcomeBypass, status: bypassStatus})
		return
	}
	// The key is looked up as a view of rec's buffer (no allocation on a
	// hit); the loader copies it before anything can keep it.
	kb := appendKey(rec.keyBuf[:0], &rec.rt, route.NormalQuery(r.URL.RawQuery), rec.cred)
	q := &rec.query
	*q = load.Query{Key: unsafe.String(unsafe.SliceData(kb), len(kb)), Auth: auth, NoCache: noCache, Now: rec.start,
		Timeout: up.timeout, Arg: r}
	p.answer(w, r, rec, up, p.reply(r, rec, p.load.Load(r.Context(), q)))
}

// setTTLs gives each named route its ttl: cache.routes', else TTL for a
// route cached by default, else none.
func (p *Proxy) setTTLs(f Freshness) {
	for i, row := range route.Named() { // named rows come first, in label order
		ttl, set := f.Routes[row.Name]
		switch {
		case !set && row.Cached:
			ttl = f.TTL
		case set && row.OnRequest && ttl > 0:
			p.onRequest = true
		}
		p.ttls[i] = ttl
	}
}

// variant is a read's Accept and Accept-Language values (load.Config's
// Variant, asked on a miss only): the fetch forwards the first reader's
// (a response may vary on them), so only reads that send the same values
// share it.
func variant(arg any) [2][]string {
	r := arg.(*http.Request)
	return [2][]string{r.Header["Accept"], r.Header["Accept-Language"]}
}

// reply maps a load.Result to the reply: outcome, Cache-Status, Age, and
// what the access line says of the upstream call.
func (p *Proxy) reply(r *http.Request, rec *record, res load.Result) reply {
	now := rec.start
	switch {
	case res.Stale == load.WhileRevalidate:
		ttl := strconv.Itoa(int(res.Entry.Expires.Sub(now) / time.Second))
		return reply{outcome: outcomeStale, entry: res.Entry,
			status: []string{"cacheproxy; hit; ttl=" + ttl + "; detail=stale-while-revalidate"}, age: p.hdrs.age(age(res.Entry, now))}
	case !res.Flight: // L1 at arrival
		return p.hit(res.Entry, load.FromL1, now)
	}
	rec.viaUpstream = true
	info, _ := res.Info.(*fetchInfo)
	if info != nil {
		rec.calls = info.calls
	}
	if res.Stale == load.IfError {
		// Stale-if-error: an older answer beats a 429 or a 5xx.
		fwd := "cacheproxy; fwd=stale"
		if res.Err == nil {
			fwd += "; fwd-status=" + strconv.Itoa(info.status)
			rec.upstreamStatus, rec.upstreamDur = info.status, info.dur
		} else {
			rec.errMsg = res.Err.Error()
		}
		return reply{outcome: outcomeStale, entry: res.Entry, status: []string{fwd}, age: p.hdrs.age(age(res.Entry, now))}
	}
	o := outcomeMiss
	if rec.query.NoCache {
		o = outcomeRefresh
	}
	if res.Err != nil {
		if res.Joined && r.Context().Err() == nil {
			o = outcomeCollapsed
		}
		return reply{outcome: o, err: res.Err}
	}
	switch res.From {
	case load.FromL2: // L2
		rec.viaUpstream = false
		return p.hit(res.Entry, load.FromL2, now)
	case load.FromPeer: // collapsed into another replica's fetch
		rec.viaUpstream = false
		return reply{outcome: outcomeCollapsed, entry: res.Entry, status: collapsedStatus}
	case load.FromL1: // filled by a flight that ended as this one began
		rec.viaUpstream = false
		return p.hit(res.Entry, load.FromL1, p.clock.Now())
	}
	rec.upstreamStatus, rec.upstreamDur = info.status, info.dur
	p.learnKey(rec.cred, info.status, res.Entry.Body)
	fwd := "cacheproxy; fwd=uri-miss"
	if rec.query.NoCache {
		fwd = "cacheproxy; fwd=request"
	}
	switch {
	case res.Joined:
		fwd += "; collapsed"
		o = outcomeCollapsed
	case res.Stored:
		fwd += "; stored"
	}
	if enc := contentCoding(res.Entry.Get("Content-Encoding")); enc != "" && !acceptsCoding(r.Header, enc) {
		// The upstream compressed without being asked (the fetch asks for
		// the plain representation); this client did not ask either.
		return reply{outcome: o, err: &codingError{enc}}
	}
	return reply{outcome: o, entry: res.Entry, status: []string{fwd}}
}

// hit is the reply for a fresh entry from tier from.
func (p *Proxy) hit(e *cache.Entry, from load.Source, now time.Time) reply {
	ttl := int(e.Expires.Sub(now) / time.Second)
	if from == load.FromL2 {
		return reply{outcome: outcomeL2, entry: e, status: []string{"cacheproxy; hit; ttl=" + strconv.Itoa(ttl) + "; detail=l2"},
			age: p.hdrs.age(age(e, now))}
	}
	return reply{outcome: outcomeHit, entry: e, status: p.hdrs.hit(ttl), age: p.hdrs.age(age(e, now))}
}

// age is e's age at now in whole seconds, never negative.
func age(e *cache.Entry, now time.Time) int {
	return max(0, int(-e.Stored.Sub(now)/time.Second))
}

// answer sends a reply and counts it: the outcome, the counter and the
// Cache-Status value are set together, here only.
func (p *Proxy) answer(w *recordWriter, r *http.Request, rec *record, up *upstream, a reply) {
	rec.cache = a.outcome
	switch {
	case a.err != nil:
		rec.errMsg = a.err.Error()
		p.fail(w, r, a.err)
		return
	case a.entry == nil:
		w.Header()["Cache-Status"] = a.status
		p.forward(w, r, rec, up)
		return
	}
	p.c.count(a.outcome)
	var body []byte // the entry's own
	if rec.rt.List() != route.NotAList && rec.rt.Replaced && a.entry.Status == http.StatusOK {
		// A page is stored as the upstream sent it; its page URLs point
		// at the base URL this client used, as a pass-through page's do.
		if out, ok := rewritePages(a.entry.Body, p.ups[rec.rt.Upstream].hosts, p.clientBase(r, rec.rt.Base)); ok {
			body = out
		}
	}
	p.writeEntry(w, r, rec.hdr.conditional, a.entry, body, a.status, a.age)
}

// fetchInfo is the proxy's account of a fill's upstream call, for the
// access line (load.Result.Info).
type fetchInfo struct {
	status int
	dur    time.Duration
	calls  callStats
}

// fetch is the loader's Fetcher: the upstream call of a fill, for the
// request that started it.
func (p *Proxy) fetch(ctx context.Context, q *load.Query, epoch uint64) (*cache.Entry, any, error) {
	r := q.Arg.(*http.Request)
	var m route.Match
	if rerr := p.router.ResolveTo(&m, r.Method, r.Host, r.URL.Host, escapedPath(r)); rerr != nil {
		return nil, nil, errors.New(rerr.LogText()) // it was routed a moment ago
	}
	info := &fetchInfo{calls: callStats{arrival: q.Now}}
	e, err := p.fetchUpstream(withStats(ctx, &info.calls), r, &m, p.ups[m.Upstream], q.Key, epoch, info)
	return e, info, err
}

// fetchUpstream makes the one upstream call of a fill. The entry it
// returns has Expires and Keep set when it may be stored.
func (p *Proxy) fetchUpstream(ctx context.Context, r *http.Request, m *route.Match, up *upstream, key string, epoch uint64, res *fetchInfo) (*cache.Entry, error) {
	u := *up.target
	u.Path, u.RawPath, u.RawQuery = m.Unescaped(), m.Path, r.URL.RawQuery
	out, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	out.Header = fetchHeader(r.Header)
	start := p.clock.Now()
	resp, err := up.transport.RoundTrip(out)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	// The body is read into a pooled buffer: Compact copies it into the
	// entry's block, and nothing else keeps it past this call.
	buf := fetchBufs.Get().(*bytes.Buffer)
	defer putFetchBuf(buf)
	_, err = buf.ReadFrom(io.LimitReader(resp.Body, p.maxFetch+1))
	body := buf.Bytes()
	if err != nil {
		// The answer had begun: a timeout stays a timeout (504), anything
		// else is a cut, not an unreachable upstream.
		return nil, fmt.Errorf("%w: %w", errUpstreamCut, err)
	}
	if int64(len(body)) > p.maxFetch {
		return nil, errResponseLarge
	}
	now := p.clock.Now()
	e := &cache.Entry{
		Key:    key,
		Status: resp.StatusCode,
		Body:   body,
		Stored: cache.At(now),
		Epoch:  epoch,
		Tags:   m.ReadTags(),
	}
	var ttl time.Duration
	switch resp.StatusCode {
	case http.StatusOK:
		ttl = p.ttls[m.ID()]
		var ids route.BodyIDs
		if m.List() != route.NotAList {
			e.Tags = append(e.Tags, m.ListTags(r.URL.Query(), body)...)
		} else if json.Unmarshal(body, &ids) == nil {
			e.Tags = append(e.Tags, route.EntryBodyTags(m.Upstream, &ids)...)
		}
	case http.StatusNotFound:
		ttl = p.fresh.NegativeTTL
		if p.fresh.WriteLag > 0 && p.writtenWithin(e.Tags, p.fresh.WriteLag) {
			ttl = 0 // Twilio may not show what was just written yet: ask again next time
		}
	}
	e.Compact(storedHeader(resp.Header, len(body)))
	res.status, res.dur = resp.StatusCode, now.Sub(start)
	if ttl > 0 && int64(len(body)) <= p.fresh.MaxEntryBytes && storable(resp.Header) {
		e.Expires = cache.At(now.Add(ttl))
		e.Keep = cache.At(now.Add(ttl + max(p.fresh.StaleIfError, p.fresh.StaleWhileRevalidate)))
	}
	return e, nil
}

// writtenWithin reports whether the invalidator heard of a write to any
// of tags less than d ago (false if it keeps no times).
func (p *Proxy) writtenWithin(tags []string, d time.Duration) bool {
	w, ok := p.inv.(interface {
		WrittenWithin(tags []string, d time.Duration) bool
	})
	return ok && w.WrittenWithin(tags, d)
}

// fetchPanicked logs a fetch's panic (the loader answers its readers
// with load.ErrPanic).
func (p *Proxy) fetchPanicked(q *load.Query, v any) {
	name := "unknown"
	if r, ok := q.Arg.(*http.Request); ok {
		var m route.Match
		if p.router.ResolveTo(&m, r.Method, r.Host, r.URL.Host, escapedPath(r)) == nil {
			name = m.Name()
		}
	}
	p.events.Error().Str("route", name).Str("panic", fmt.Sprint(v)).Msg("upstream fetch panicked")
}

// fetchBufs are the buffers fetchUpstream reads bodies into.
var fetchBufs = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// maxPooledFetchBuf bounds a pooled buffer: one that grew past it for a
// large body goes to the GC.
const maxPooledFetchBuf = 64 << 10

func putFetchBuf(b *bytes.Buffer) {
	if b.Cap() <= maxPooledFetchBuf {
		b.Reset()
		fetchBufs.Put(b)
	}
}

// writeEntry sends a shared entry with body (nil: its own; else its
// page URLs rewritten), or a 304 or 412 when the request's conditional headers say
// so (a 200 entry only). The entry's header slices are shared read-only
// (stored clipped, so an append elsewhere copies).
func (p *Proxy) writeEntry(w http.ResponseWriter, r *http.Request, conditional bool, e *cache.Entry, body []byte, cacheStatus, age []string) {
	status := e.Status
	if status == http.StatusOK && conditional {
		switch code := precondition(r.Method, r.Header, e); code {
		case http.StatusPreconditionFailed:
			twilioError(w, code, "precondition failed: the stored representation does not match If-Match or If-Unmodified-Since")
			return
		case http.StatusNotModified:
			status = code
		}
	}
	h := w.Header()
	for name, values := range e.Fields() {
		if status != http.StatusNotModified || (name != "Content-Length" && name != "Content-Type") {
			h[name] = values
		}
	}
	h["Cache-Status"] = cacheStatus
	if age != nil {
		h["Age"] = age
	}
	if body == nil {
		body = e.Body
	} else if status != http.StatusNotModified {
		h["Content-Length"] = []string{strconv.Itoa(len(body))}
	}
	w.WriteHeader(status)
	if status != http.StatusNotModified && r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
}

// appendKey appends the cache key: upstream + path + query + credential
// fingerprint. The path is the one sent upstream (escaped, normalised):
// two requests share an entry only if the upstream would see the same
// resource, and an escaped "/" or "?" never makes two paths one. The key
// begins with the path's scope tag (route.PathTag), so that an entry's
// own tag is a view of its key (cache.Entry.Compact), not a copy.
func appendKey(b []byte, m *route.Match, query string, c *credential) []byte {
	b = route.AppendPathTag(b, m.Upstream, m.Path)
	b = append(b, '?')
	b = append(b, query...)
	b = append(b, ' ')
	return append(b, c.hex[:]...)
}
