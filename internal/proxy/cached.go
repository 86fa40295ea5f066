package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/route"

	"golang.org/x/sync/singleflight"
)

// fetchResult is what one upstream fetch produced, shared by its waiters.
type fetchResult struct {
	entry    *cache.Entry
	stored   bool
	shared   bool // another replica's fetch (its lease), from the shared tier
	upStatus int
	upDur    time.Duration
	calls    callStats
}

// serveCached answers a GET or HEAD of a participant read route.
func (p *Proxy) serveCached(w *recordWriter, r *http.Request, rec *record, up *upstream, auth string) {
	noCache, noStore := rec.hdr.cacheDirectives()
	if auth == "" || noStore {
		// Without credentials nothing is served from or put in the cache;
		// no-store asks us to keep nothing.
		rec.cache = outcomeBypass
		w.Header()["Cache-Status"] = []string{"cacheproxy; fwd=bypass"}
		p.forward(w, r, rec, up)
		return
	}
	// The key is looked up as a view of rec's buffer (no allocation on a
	// hit) and copied before anything can keep it.
	kb := appendKey(rec.keyBuf[:0], &rec.rt, r.URL.RawQuery, rec.cred)
	key := unsafe.String(unsafe.SliceData(kb), len(kb))
	// stale is an expired entry still within its stale windows.
	var stale *cache.Entry
	now := rec.start
	if !noCache {
		if e, ok := p.lookup(key, now); ok {
			if now.Before(e.Expires) {
				p.c.hits.Add(1)
				rec.cache = outcomeHit
				ttl := int(e.Expires.Sub(now) / time.Second)
				age := int(now.Sub(e.Stored) / time.Second)
				p.writeEntry(w, r, rec.hdr.conditional, e, p.hdrs.hit(ttl), p.hdrs.age(age))
				return
			}
			stale = e
		}
	}
	key = strings.Clone(key) // past a hit, flights and fetches keep the key
	if p.shared != nil && !noCache {
		// The local epoch is read before the lookup, as for a fetch: an
		// invalidation that arrives meanwhile makes the copy invalid here.
		e := p.sharedFill(r.Context(), key, auth, p.inv.Epoch())
		if e != nil && !now.Before(e.Expires) && (stale == nil || e.Expires.After(stale.Expires)) {
			stale = e // expired, still within its stale windows: as good as a local one
		}
		if e != nil && now.Before(e.Expires) {
			p.c.shared.Add(1)
			rec.cache = outcomeShared
			ttl := int(e.Expires.Sub(now) / time.Second)
			p.writeEntry(w, r, rec.hdr.conditional, e, []string{"cacheproxy; hit; ttl=" + strconv.Itoa(ttl) + "; detail=shared"},
				p.hdrs.age(max(0, int(now.Sub(e.Stored)/time.Second))))
			return
		}
	}
	if stale != nil && now.Before(stale.Expires.Add(p.fresh.StaleWhileRevalidate)) {
		// Stale-while-revalidate: answer now, refresh in the background
		// (one fetch per key: it is a flight).
		p.c.stale.Add(1)
		rec.cache = outcomeStale
		p.revalidate(r, rec.rt, up, key)
		age := int(now.Sub(stale.Stored) / time.Second)
		p.writeEntry(w, r, rec.hdr.conditional, stale, []string{"cacheproxy; hit; ttl=" + strconv.Itoa(int(stale.Expires.Sub(now)/time.Second)) + "; detail=stale-while-revalidate"}, p.hdrs.age(age))
		return
	}
	res, leader, err := p.fetchShared(r, rec.rt, up, key, p.flightKey(r, key, noCache), !noCache)
	rec.viaUpstream = true
	if res != nil {
		rec.calls = res.calls
	}
	if upstreamFailed(res, err) && stale != nil && rec.start.Before(stale.Expires.Add(p.fresh.StaleIfError)) && r.Context().Err() == nil {
		// Stale-if-error: an older answer beats a 429 or a 5xx.
		p.c.stale.Add(1)
		rec.cache = outcomeStale
		fwd := "cacheproxy; fwd=stale"
		if err == nil {
			fwd += "; fwd-status=" + strconv.Itoa(res.upStatus)
			rec.upstreamStatus, rec.upstreamDur = res.upStatus, res.upDur
		} else {
			rec.errMsg = err.Error()
		}
		p.writeEntry(w, r, rec.hdr.conditional, stale, []string{fwd}, p.hdrs.age(int(rec.start.Sub(stale.Stored)/time.Second)))
		return
	}
	rec.cache = outcomeMiss
	if noCache {
		rec.cache = outcomeRefresh
	}
	if err != nil {
		if !leader && r.Context().Err() == nil {
			rec.cache = outcomeCollapsed
		}
		rec.errMsg = err.Error()
		p.fail(w, r, err)
		return
	}
	if res.shared { // collapsed into another replica's fetch
		p.c.collapsed.Add(1)
		rec.cache, rec.viaUpstream = outcomeCollapsed, false
		p.writeEntry(w, r, rec.hdr.conditional, res.entry, []string{"cacheproxy; fwd=uri-miss; collapsed; detail=fleet"}, nil)
		return
	}
	rec.upstreamStatus, rec.upstreamDur = res.upStatus, res.upDur
	if res.upStatus == http.StatusUnauthorized {
		p.refused.remember(rec.cred, p.clock.Now(), res.entry.Header, res.entry.Body)
	}
	p.learnKey(rec.cred, res.upStatus, res.entry.Body)
	fwd := "cacheproxy; fwd=uri-miss"
	if noCache {
		fwd = "cacheproxy; fwd=request"
	}
	switch {
	case !leader:
		fwd += "; collapsed"
		rec.cache = outcomeCollapsed
		p.c.collapsed.Add(1)
	case res.stored:
		fwd += "; stored"
		p.c.misses.Add(1)
	default:
		p.c.misses.Add(1)
	}
	if enc := contentCoding(res.entry.Header); enc != "" && !acceptsCoding(r.Header, enc) {
		// The upstream compressed without being asked (the fetch asks for
		// the plain representation); this client did not ask either.
		rec.errMsg = "upstream answered with a content-coding the client did not accept"
		twilioError(w, http.StatusBadGateway, "upstream answered with content-coding "+enc+", which the request did not accept")
		return
	}
	p.writeEntry(w, r, rec.hdr.conditional, res.entry, []string{fwd}, nil)
}

// revalidate starts (or joins) the fetch of key in the background. It is a
// function of its own so that its closure's captures do not move the
// hit path's variables to the heap.
func (p *Proxy) revalidate(r *http.Request, m route.Match, up *upstream, key string) {
	p.doneLater(p.startFlight(p.flightKey(r, key, false), func() (any, error) { return p.runFetch(r, &m, up, key, true) }))
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
// fleetWide lets the fetch wait for another replica's fetch of the same key
// instead of making its own (not for no-cache, which asks for a fetch).
func (p *Proxy) fetchShared(r *http.Request, m route.Match, up *upstream, key, flightKey string, fleetWide bool) (*fetchResult, bool, error) {
	ran := false // written by the flight goroutine; read only after its result arrives
	ch := p.startFlight(flightKey, func() (any, error) {
		ran = true
		return p.runFetch(r, &m, up, key, fleetWide)
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
func (p *Proxy) runFetch(r *http.Request, m *route.Match, up *upstream, key string, fleetWide bool) (v any, err error) {
	defer func() {
		if x := recover(); x != nil {
			p.events.Error().Str("route", m.Name()).Str("panic", fmt.Sprint(x)).Msg("upstream fetch panicked")
			v, err = nil, errFetchPanic
		}
	}()
	return p.fetch(r, m, up, key, fleetWide)
}

// fetch makes the one upstream call of a flight. It runs detached from the
// client that started it (context.WithoutCancel) under the upstream's own
// timeout, so other waiters get their answer if that client leaves.
func (p *Proxy) fetch(r *http.Request, m *route.Match, up *upstream, key string, fleetWide bool) (*fetchResult, error) {
	res := &fetchResult{}
	ctx, cancel := context.WithTimeout(withStats(context.WithoutCancel(r.Context()), &res.calls), up.timeout)
	defer cancel()
	epoch := p.inv.Epoch()
	var fleetEpoch uint64
	fleetErr := errNoShared
	if p.shared != nil {
		if fleetEpoch, fleetErr = p.shared.Epoch(ctx); fleetErr != nil {
			p.c.sharedErrors.Add(1)
		}
	}
	if fleetWide && fleetErr == nil {
		// One upstream call per cold key across the fleet: take the key's
		// lease, or wait for the replica that holds it to share its fill.
		e, release := p.fleetFill(ctx, key, r.Header.Get("Authorization"), epoch, up.timeout)
		if e != nil {
			res.entry, res.upStatus, res.stored, res.shared = e, e.Status, true, true
			return res, nil
		}
		defer release()
	}
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
		return res, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, p.maxFetch+1))
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
		Header: storedHeader(resp.Header, len(body)),
		Body:   body,
		Stored: now,
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
	res.entry, res.upStatus, res.upDur = e, resp.StatusCode, now.Sub(start)
	if ttl > 0 && int64(len(body)) <= p.fresh.MaxEntryBytes && storable(resp.Header) {
		e.Expires = now.Add(ttl)
		e.Keep = e.Expires.Add(max(p.fresh.StaleIfError, p.fresh.StaleWhileRevalidate))
		res.stored = p.keep(e)
		if res.stored && fleetErr == nil {
			// Shared before the waiters are answered: a read through
			// another replica that starts after this one's answer finds it.
			if p.shared.Set(ctx, e, r.Header.Get("Authorization"), fleetEpoch, now) != nil {
				p.c.sharedErrors.Add(1)
			}
		}
	}
	return res, nil
}

// fleetPoll is how often a replica waiting for another's fetch looks for
// its fill (a wait on another process, on the real clock).
const fleetPoll = 5 * time.Millisecond

// fleetFill takes key's fleet-wide lease, or waits for the replica that
// holds it to share its fill, bounded by ctx (the upstream timeout). It
// returns the shared entry (kept in L1 too), or nil and the function that
// gives the lease back after this replica's own fetch. Any Redis trouble
// means fetching here.
func (p *Proxy) fleetFill(ctx context.Context, key, auth string, epoch uint64, ttl time.Duration) (*cache.Entry, func()) {
	none := func() {}
	waited := false
	tick := time.NewTicker(fleetPoll)
	defer tick.Stop()
	for {
		token, err := p.shared.Lease(ctx, key, ttl)
		if err != nil {
			p.c.sharedErrors.Add(1)
			return nil, none
		}
		unlease := func() { _ = p.shared.Unlease(context.WithoutCancel(ctx), key, token) }
		// The fill may have come just before the lease was free (the
		// holder shares it, then lets go): look before fetching. Only a
		// fresh one will do.
		if e := p.sharedFill(ctx, key, auth, epoch); e != nil && p.clock.Now().Before(e.Expires) {
			if token != "" {
				unlease()
			}
			return e, none
		}
		if token != "" {
			p.c.leasesWon.Add(1)
			return nil, unlease
		}
		if !waited {
			waited = true
			p.c.leasesWaited.Add(1)
		}
		select {
		case <-ctx.Done():
			return nil, none
		case <-tick.C:
		}
	}
}

// sharedFill is key's shared entry for auth, if valid here too for data
// fetched from the local epoch on (then kept in L1).
func (p *Proxy) sharedFill(ctx context.Context, key, auth string, epoch uint64) *cache.Entry {
	start := p.clock.Now()
	e, err := p.shared.Get(ctx, key, auth)
	p.m.l2.Observe(p.clock.Since(start).Seconds())
	if err != nil {
		p.c.sharedErrors.Add(1)
	}
	if e == nil {
		return nil
	}
	e.Epoch = epoch
	if !p.inv.Valid(epoch, e.Tags) {
		return nil
	}
	p.store.Set(e)
	return e
}

// errNoShared: no shared tier to fill.
var errNoShared = errors.New("no shared tier")

// writeEntry sends a shared entry, or a 304 or 412 when the request's
// conditional headers say so (a 200 entry only). The entry's header
// slices are shared read-only (stored clipped, so an append elsewhere
// copies).
func (p *Proxy) writeEntry(w http.ResponseWriter, r *http.Request, conditional bool, e *cache.Entry, cacheStatus, age []string) {
	status := e.Status
	if status == http.StatusOK && conditional {
		switch code := precondition(r.Method, r.Header, e.Header); code {
		case http.StatusPreconditionFailed:
			twilioError(w, code, "precondition failed: the stored representation does not match If-Match or If-Unmodified-Since")
			return
		case http.StatusNotModified:
			status = code
		}
	}
	h := w.Header()
	for k, v := range e.Header {
		if status != http.StatusNotModified || (k != "Content-Length" && k != "Content-Type") {
			h[k] = v
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
// resource, and an escaped "/" or "?" never makes two paths one.
func appendKey(b []byte, m *route.Match, query string, c *credential) []byte {
	b = append(b, m.Upstream.String()...)
	b = append(b, ' ')
	b = append(b, m.Path...)
	b = append(b, '?')
	b = append(b, query...)
	b = append(b, ' ')
	return append(b, c.hex[:]...)
}
