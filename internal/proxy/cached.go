package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/route"

	"golang.org/x/sync/singleflight"
)

// fetchResult is what one flight produced, shared by its waiters.
type fetchResult struct {
	entry    *cache.Entry
	stored   bool
	from     source // fromUpstream, or the tier that answered instead
	upStatus int
	upDur    time.Duration
	calls    callStats
}

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
	collapsedStatus = []string{"cacheproxy; fwd=uri-miss; collapsed; detail=fleet"}
)

// serveCached answers a GET or HEAD of a participant read route. It makes
// only HTTP decisions; the tiers are sequenced by p.tiers.
func (p *Proxy) serveCached(w *recordWriter, r *http.Request, rec *record, up *upstream, auth string) {
	noCache, noStore := rec.hdr.cacheDirectives()
	if auth == "" || noStore {
		// Without credentials nothing is served from or put in the cache;
		// no-store asks us to keep nothing.
		p.answer(w, r, rec, up, reply{outcome: outcomeBypass, status: bypassStatus})
		return
	}
	// The key is looked up as a view of rec's buffer (no allocation on a
	// hit); lookup copies it before anything can keep it.
	kb := appendKey(rec.keyBuf[:0], &rec.rt, r.URL.RawQuery, rec.cred)
	key := unsafe.String(unsafe.SliceData(kb), len(kb))
	now := rec.start
	var f found
	if noCache {
		f.key = strings.Clone(key)
	} else {
		f = p.tiers.lookup(r.Context(), key, auth, now)
	}
	switch {
	case f.fresh != nil:
		p.answer(w, r, rec, up, p.hit(f.fresh, f.from, now))
	case f.stale != nil && now.Before(f.stale.Expires.Time().Add(p.fresh.StaleWhileRevalidate)):
		// Stale-while-revalidate: answer now, refresh in the background
		// (one fetch per key: it is a flight).
		p.revalidate(r, rec.rt, up, f.key)
		ttl := strconv.Itoa(int(f.stale.Expires.Sub(now) / time.Second))
		p.answer(w, r, rec, up, reply{outcome: outcomeStale, entry: f.stale,
			status: []string{"cacheproxy; hit; ttl=" + ttl + "; detail=stale-while-revalidate"}, age: p.hdrs.age(age(f.stale, now))})
	default:
		p.answer(w, r, rec, up, p.miss(r, rec, up, f, noCache))
	}
}

// hit is the reply for a fresh entry from tier from.
func (p *Proxy) hit(e *cache.Entry, from source, now time.Time) reply {
	ttl := int(e.Expires.Sub(now) / time.Second)
	if from == fromL2 {
		return reply{outcome: outcomeShared, entry: e, status: []string{"cacheproxy; hit; ttl=" + strconv.Itoa(ttl) + "; detail=shared"},
			age: p.hdrs.age(age(e, now))}
	}
	return reply{outcome: outcomeHit, entry: e, status: p.hdrs.hit(ttl), age: p.hdrs.age(age(e, now))}
}

// age is e's age at now in whole seconds, never negative.
func age(e *cache.Entry, now time.Time) int {
	return max(0, int(-e.Stored.Sub(now)/time.Second))
}

// miss fetches key (or joins its flight) and replies with the answer, or
// with a stale entry when the upstream failed (stale-if-error).
func (p *Proxy) miss(r *http.Request, rec *record, up *upstream, f found, noCache bool) reply {
	res, leader, err := p.fetchShared(r, rec.rt, up, f.key, p.flightKey(r, f.key, noCache), noCache)
	rec.viaUpstream = true
	if res != nil {
		rec.calls = res.calls
	}
	if s := f.stale; upstreamFailed(res, err) && s != nil && rec.start.Before(s.Expires.Time().Add(p.fresh.StaleIfError)) && r.Context().Err() == nil {
		// Stale-if-error: an older answer beats a 429 or a 5xx.
		fwd := "cacheproxy; fwd=stale"
		if err == nil {
			fwd += "; fwd-status=" + strconv.Itoa(res.upStatus)
			rec.upstreamStatus, rec.upstreamDur = res.upStatus, res.upDur
		} else {
			rec.errMsg = err.Error()
		}
		return reply{outcome: outcomeStale, entry: s, status: []string{fwd}, age: p.hdrs.age(age(s, rec.start))}
	}
	o := outcomeMiss
	if noCache {
		o = outcomeRefresh
	}
	if err != nil {
		if !leader && r.Context().Err() == nil {
			o = outcomeCollapsed
		}
		return reply{outcome: o, err: err}
	}
	switch res.from {
	case fromFleet: // collapsed into another replica's fetch
		rec.viaUpstream = false
		return reply{outcome: outcomeCollapsed, entry: res.entry, status: collapsedStatus}
	case fromL1: // filled by a flight that ended as this one began
		rec.viaUpstream = false
		return p.hit(res.entry, fromL1, p.clock.Now())
	}
	rec.upstreamStatus, rec.upstreamDur = res.upStatus, res.upDur
	p.learnKey(rec.cred, res.upStatus, res.entry.Body)
	fwd := "cacheproxy; fwd=uri-miss"
	if noCache {
		fwd = "cacheproxy; fwd=request"
	}
	switch {
	case !leader:
		fwd += "; collapsed"
		o = outcomeCollapsed
	case res.stored:
		fwd += "; stored"
	}
	if enc := contentCoding(res.entry.Get("Content-Encoding")); enc != "" && !acceptsCoding(r.Header, enc) {
		// The upstream compressed without being asked (the fetch asks for
		// the plain representation); this client did not ask either.
		return reply{outcome: o, err: &codingError{enc}}
	}
	return reply{outcome: o, entry: res.entry, status: []string{fwd}}
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
	p.writeEntry(w, r, rec.hdr.conditional, a.entry, a.status, a.age)
}

// revalidate starts (or joins) the fetch of key in the background. It is a
// function of its own so that its closure's captures do not move the
// hit path's variables to the heap.
func (p *Proxy) revalidate(r *http.Request, m route.Match, up *upstream, key string) {
	r = r.WithContext(ratelimit.WithPriority(r.Context(), ratelimit.Background)) // behind reads a client waits for
	p.doneLater(p.startFlight(p.flightKey(r, key, false), func() (any, error) { return p.runFetch(r, &m, up, key, false) }))
}

// flightKey keys a fetch by the invalidation epoch at arrival: a read that
// arrives after a write's response never joins a fetch that began before
// it (docs/architecture.md, "Freshness"). Reads between writes still share.
//
// The fetch forwards the first caller's Accept and Accept-Language (a
// response may vary on them), so only reads that send the same values
// share it.
func (p *Proxy) flightKey(r *http.Request, key string, noCache bool) string {
	k := key + "@" + strconv.FormatUint(p.inv.Epoch(), 10)
	if a, l := r.Header["Accept"], r.Header["Accept-Language"]; len(a)+len(l) > 0 {
		k += " " + strings.Join(a, ",") + " " + strings.Join(l, ",")
	}
	if noCache {
		k = "no-cache " + k
	}
	return k
}

// upstreamFailed reports a fetch that an older answer should replace: no
// answer at all, a 429 or a 5xx.
func upstreamFailed(res *fetchResult, err error) bool {
	if err != nil {
		return true
	}
	return res.upStatus == http.StatusTooManyRequests || res.upStatus >= 500
}

// fetchShared joins or starts the fetch for flightKey and waits for it or
// for the client to leave. leader reports whether this call ran the fetch.
//
// noCache asks for a fetch: not another replica's, nor an entry that L1
// got meanwhile.
func (p *Proxy) fetchShared(r *http.Request, m route.Match, up *upstream, key, flightKey string, noCache bool) (*fetchResult, bool, error) {
	ran := false // written by the flight goroutine; read only after its result arrives
	ch := p.startFlight(flightKey, func() (any, error) {
		ran = true
		return p.runFetch(r, &m, up, key, noCache)
	})
	select {
	case sr := <-ch:
		p.fetches.Done()
		res, _ := sr.Val.(*fetchResult) // may carry call stats on error; nil after a panic
		return res, ran, sr.Err
	case <-r.Context().Done():
		p.doneLater(ch)
		return nil, false, r.Context().Err()
	}
}

// startFlight joins or starts the flight for key. Proxy.Wait waits for
// it: the caller is counted before DoChan (so a flight cannot start
// unseen) and must call p.fetches.Done once the result has arrived; a
// caller that leaves first hands that to done, which waits for the result.
func (p *Proxy) startFlight(key string, fn func() (any, error)) <-chan singleflight.Result {
	p.fetches.Add()
	return p.flights.DoChan(key, fn)
}

// doneLater uncounts a caller that left before its flight's result came.
func (p *Proxy) doneLater(ch <-chan singleflight.Result) {
	go func() {
		<-ch
		p.fetches.Done()
	}()
}

// runFetch runs a flight's fetch, panics recovered into an error for its
// waiters.
func (p *Proxy) runFetch(r *http.Request, m *route.Match, up *upstream, key string, noCache bool) (v any, err error) {
	defer func() {
		if x := recover(); x != nil {
			p.events.Error().Str("route", m.Name()).Str("panic", fmt.Sprint(x)).Msg("upstream fetch panicked")
			v, err = nil, errFetchPanic
		}
	}()
	return p.fetch(r, m, up, key, noCache)
}

// fetch fills key for a flight through the tiers. It runs detached from
// the client that started it (context.WithoutCancel), so other waiters get
// their answer if that client leaves. Waiting for another replica's fill
// is bounded by the upstream's timeout, and so is this replica's own
// upstream call, from its start: a replica that takes over the claim of
// one that died mid-fetch still has its whole timeout.
func (p *Proxy) fetch(r *http.Request, m *route.Match, up *upstream, key string, noCache bool) (*fetchResult, error) {
	var calls callStats
	detached := withStats(context.WithoutCancel(r.Context()), &calls)
	ctx, cancel := context.WithTimeout(detached, up.timeout)
	defer cancel()
	res, err := p.tiers.fill(ctx, key, r.Header.Get("Authorization"), noCache, func(epoch uint64) (*fetchResult, error) {
		ctx, cancel := context.WithTimeout(detached, up.timeout)
		defer cancel()
		return p.fetchUpstream(ctx, r, m, up, key, epoch)
	})
	if res != nil {
		res.calls = calls
	}
	return res, err
}

// fetchUpstream makes the one upstream call of a fill. The entry it
// returns has Expires and Keep set when it may be stored.
func (p *Proxy) fetchUpstream(ctx context.Context, r *http.Request, m *route.Match, up *upstream, key string, epoch uint64) (*fetchResult, error) {
	u := *up.target
	u.Path, u.RawPath, u.RawQuery = m.Unescaped(), m.Path, r.URL.RawQuery
	out, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	out.Header = fetchHeader(r.Header)
	res := &fetchResult{}
	start := p.clock.Now()
	resp, err := up.transport.RoundTrip(out)
	if err != nil {
		return res, err
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
		return res, fmt.Errorf("%w: %w", errUpstreamCut, err)
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
		ttl = p.fresh.TTL
		var ids route.BodyIDs
		if json.Unmarshal(body, &ids) == nil {
			e.Tags = append(e.Tags, route.EntryBodyTags(m.Upstream, &ids)...)
		}
	case http.StatusNotFound:
		ttl = p.fresh.NegativeTTL
	}
	e.Compact(storedHeader(resp.Header, len(body)))
	res.entry, res.upStatus, res.upDur = e, resp.StatusCode, now.Sub(start)
	if ttl > 0 && int64(len(body)) <= p.fresh.MaxEntryBytes && storable(resp.Header) {
		e.Expires = cache.At(now.Add(ttl))
		e.Keep = cache.At(now.Add(ttl + max(p.fresh.StaleIfError, p.fresh.StaleWhileRevalidate)))
	}
	return res, nil
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

// writeEntry sends a shared entry, or a 304 or 412 when the request's
// conditional headers say so (a 200 entry only). The entry's header
// slices are shared read-only (stored clipped, so an append elsewhere
// copies).
func (p *Proxy) writeEntry(w http.ResponseWriter, r *http.Request, conditional bool, e *cache.Entry, cacheStatus, age []string) {
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
	w.WriteHeader(status)
	if status != http.StatusNotModified && r.Method != http.MethodHead {
		_, _ = w.Write(e.Body)
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
