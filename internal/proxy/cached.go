package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"cacheproxy/internal/cache"

	"golang.org/x/sync/singleflight"
)

var (
	randReader    = rand.Reader
	jsonUnmarshal = json.Unmarshal
)

// fetchResult is what one upstream fetch produced, shared by its waiters.
type fetchResult struct {
	entry    *cache.Entry
	stored   bool
	upStatus int
	upDur    time.Duration
	calls    callStats
}

// serveCached answers a GET or HEAD of a participant read route.
func (p *Proxy) serveCached(w *recordWriter, r *http.Request, rec *record, rt route, auth string) {
	noCache, noStore := cacheControl(r.Header)
	if auth == "" || noStore {
		// Without credentials nothing is served from or put in the cache;
		// no-store asks us to keep nothing.
		rec.cache = "bypass"
		w.Header()["Cache-Status"] = []string{"cacheproxy; fwd=bypass"}
		p.forward(w, r, rec, rt)
		return
	}
	// The key is looked up as a view of rec's buffer (no allocation on a
	// hit) and copied before anything can keep it.
	kb := p.appendKey(rec.keyBuf[:0], rt, r.URL.RawQuery, rec.cred)
	key := unsafe.String(unsafe.SliceData(kb), len(kb))
	// stale is an expired entry still within its stale windows.
	var stale *cache.Entry
	now := rec.start
	if !noCache {
		if e, ok := p.store.Get(key, now); ok {
			if now.Before(e.Expires) {
				p.c.hits.Add(1)
				rec.cache = "hit"
				ttl := int(e.Expires.Sub(now) / time.Second)
				age := int(now.Sub(e.Stored) / time.Second)
				p.writeEntry(w, r, e, p.hdrs.hit(ttl), p.hdrs.age(age))
				return
			}
			stale = e
		}
	}
	key = strings.Clone(key) // past a hit, flights and fetches keep the key
	if stale != nil && now.Before(stale.Expires.Add(p.swr)) {
		// Stale-while-revalidate: answer now, refresh in the background
		// (one fetch per key: it is a flight).
		p.c.stale.Add(1)
		rec.cache = "stale"
		p.revalidate(r, rt, key)
		age := int(now.Sub(stale.Stored) / time.Second)
		p.writeEntry(w, r, stale, []string{"cacheproxy; hit; ttl=" + strconv.Itoa(int(stale.Expires.Sub(now)/time.Second)) + "; detail=stale-while-revalidate"}, p.hdrs.age(age))
		return
	}
	res, leader, err := p.fetchShared(r, rt, key, p.flightKey(key, noCache))
	rec.viaUpstream = true
	if res != nil {
		rec.calls = res.calls
	}
	if upstreamFailed(res, err) && stale != nil && rec.start.Before(stale.Expires.Add(p.staleIfError)) && r.Context().Err() == nil {
		// Stale-if-error: an older answer beats a 429 or a 5xx.
		p.c.stale.Add(1)
		rec.cache = "stale"
		fwd := "cacheproxy; fwd=stale"
		if err == nil {
			fwd += "; fwd-status=" + strconv.Itoa(res.upStatus)
			rec.upstreamStatus, rec.upstreamDur = res.upStatus, res.upDur
		} else {
			rec.errMsg = err.Error()
		}
		p.writeEntry(w, r, stale, []string{fwd}, p.hdrs.age(int(rec.start.Sub(stale.Stored)/time.Second)))
		return
	}
	if err != nil {
		rec.errMsg = err.Error()
		p.fail(w, r, err)
		return
	}
	rec.upstreamStatus, rec.upstreamDur = res.upStatus, res.upDur
	fwd := "cacheproxy; fwd=uri-miss"
	rec.cache = "miss"
	if noCache {
		fwd = "cacheproxy; fwd=request"
		rec.cache = "refresh"
	}
	switch {
	case !leader:
		fwd += "; collapsed"
		rec.cache = "collapsed"
		p.c.collapsed.Add(1)
	case res.stored:
		fwd += "; stored"
		p.c.misses.Add(1)
	default:
		p.c.misses.Add(1)
	}
	p.writeEntry(w, r, res.entry, []string{fwd}, nil)
}

// revalidate starts (or joins) the fetch of key in the background. It is a
// function of its own so that its closure's captures do not move the
// hit path's variables to the heap.
func (p *Proxy) revalidate(r *http.Request, rt route, key string) {
	p.doneLater(p.startFlight(p.flightKey(key, false), func() (any, error) { return p.runFetch(r, rt, key) }))
}

// flightKey keys a fetch by the invalidation epoch at arrival: a read that
// arrives after a write's response never joins a fetch that began before
// it (DESIGN.md "Freshness"). Reads between writes still share.
func (p *Proxy) flightKey(key string, noCache bool) string {
	k := key + "@" + strconv.FormatUint(p.store.Epoch(), 10)
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
func (p *Proxy) fetchShared(r *http.Request, rt route, key, flightKey string) (*fetchResult, bool, error) {
	ran := false // written by the flight goroutine; read only after its result arrives
	ch := p.startFlight(flightKey, func() (any, error) {
		ran = true
		return p.runFetch(r, rt, key)
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
func (p *Proxy) runFetch(r *http.Request, rt route, key string) (v any, err error) {
	defer func() {
		if x := recover(); x != nil {
			p.log.Error().Str("route", rt.name).Str("panic", fmt.Sprint(x)).Msg("upstream fetch panicked")
			v, err = nil, errFetchPanic
		}
	}()
	return p.fetch(r, rt, key)
}

// fetch makes the one upstream call of a flight. It runs detached from the
// client that started it (context.WithoutCancel) under the upstream's own
// timeout, so other waiters get their answer if that client leaves.
func (p *Proxy) fetch(r *http.Request, rt route, key string) (*fetchResult, error) {
	res := &fetchResult{}
	ctx, cancel := context.WithTimeout(withStats(context.WithoutCancel(r.Context()), &res.calls), rt.up.timeout)
	defer cancel()
	epoch := p.store.Epoch()
	u := *rt.up.target
	u.Path, u.RawPath, u.RawQuery = rt.path, rt.rawPath, r.URL.RawQuery
	out, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	out.Header = fetchHeader(r.Header)
	start := p.now()
	resp, err := rt.up.transport.RoundTrip(out)
	if err != nil {
		return res, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, p.maxFetch+1))
	if err != nil {
		return nil, err
	}
	if int64(len(body)) > p.maxFetch {
		return nil, errResponseLarge
	}
	now := p.now()
	e := &cache.Entry{
		Key:    key,
		Status: resp.StatusCode,
		Header: storedHeader(resp.Header, len(body)),
		Body:   body,
		Stored: now,
		Epoch:  epoch,
		Tags:   rt.readTags(),
	}
	var ttl time.Duration
	switch resp.StatusCode {
	case http.StatusOK:
		ttl = p.ttl
		var ids bodyIDs
		if jsonUnmarshal(body, &ids) == nil {
			e.Tags = append(e.Tags, bodyTags(rt.up.name, &ids, false)...)
		}
	case http.StatusNotFound:
		ttl = p.negTTL
	}
	res.entry, res.upStatus, res.upDur = e, resp.StatusCode, now.Sub(start)
	if ttl > 0 && int64(len(body)) <= p.maxEntry && !noStoreResponse(resp.Header) {
		e.Expires = now.Add(ttl)
		e.Keep = e.Expires.Add(max(p.staleIfError, p.swr))
		res.stored = p.store.Set(e)
	}
	return res, nil
}

// writeEntry sends a shared entry. The entry's header slices are shared
// read-only (stored clipped, so an append elsewhere copies).
func (p *Proxy) writeEntry(w http.ResponseWriter, r *http.Request, e *cache.Entry, cacheStatus, age []string) {
	h := w.Header()
	for k, v := range e.Header {
		h[k] = v
	}
	h["Cache-Status"] = cacheStatus
	if age != nil {
		h["Age"] = age
	}
	w.WriteHeader(e.Status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(e.Body)
	}
}

// hitHeaders holds the Cache-Status and Age values of hits, one per second
// up to the longest TTL (at most an hour), built once so a hit formats
// nothing. Each table is one array of strings that are substrings of one
// block: a few objects for the GC to mark, not two per second of TTL. A
// hit's header value is a one-element, capacity-clipped view of the array,
// shared read-only (an append elsewhere copies).
type hitHeaders struct {
	hits, ages []string
}

const maxHitHeaders = 3600 + 1

func newHitHeaders(maxTTL time.Duration) hitHeaders {
	n := min(int(maxTTL/time.Second)+1, maxHitHeaders)
	return hitHeaders{
		hits: table(n, func(b []byte, i int) []byte {
			return strconv.AppendInt(append(b, "cacheproxy; hit; ttl="...), int64(i), 10)
		}),
		ages: table(n, func(b []byte, i int) []byte { return strconv.AppendInt(b, int64(i), 10) }),
	}
}

// table returns the n strings format(nil, i), all cut from one string.
func table(n int, format func([]byte, int) []byte) []string {
	var block []byte
	ends := make([]int, n)
	for i := range n {
		block = format(block, i)
		ends[i] = len(block)
	}
	all, out, start := string(block), make([]string, n), 0
	for i, end := range ends {
		out[i], start = all[start:end], end
	}
	return out
}

func (h hitHeaders) hit(ttl int) []string {
	if ttl >= 0 && ttl < len(h.hits) {
		return h.hits[ttl : ttl+1 : ttl+1]
	}
	return []string{"cacheproxy; hit; ttl=" + strconv.Itoa(ttl)}
}

func (h hitHeaders) age(age int) []string {
	if age >= 0 && age < len(h.ages) {
		return h.ages[age : age+1 : age+1]
	}
	return []string{strconv.Itoa(age)}
}

// appendKey appends the cache key: upstream + path + query + credential
// fingerprint. The decoded path is used, so two spellings of one identity
// share an entry.
func (p *Proxy) appendKey(b []byte, rt route, query string, c *credential) []byte {
	b = append(b, rt.up.name...)
	b = append(b, ' ')
	b = append(b, rt.path...)
	b = append(b, '?')
	b = append(b, query...)
	b = append(b, ' ')
	return append(b, c.hex[:]...)
}

// Hop-by-hop headers (RFC 9110 7.6.1) and headers that would make a shared
// fetch depend on one client: the fetch asks for the plain representation.
var skipFetchHeader = map[string]bool{
	"Connection": true, "Proxy-Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
	"Accept-Encoding": true, "Cache-Control": true, "Pragma": true, "Range": true, "If-Range": true,
	"If-Match": true, "If-None-Match": true, "If-Modified-Since": true, "If-Unmodified-Since": true,
	"Cookie": true, "Content-Length": true, "X-Request-Id": true,
	"Forwarded": true, "X-Forwarded-For": true, "X-Forwarded-Host": true, "X-Forwarded-Proto": true,
}

func fetchHeader(in http.Header) http.Header {
	out := make(http.Header, len(in))
	for k, v := range in {
		if !skipFetchHeader[k] {
			out[k] = slices.Clone(v)
		}
	}
	return out
}

// Response headers never stored: hop-by-hop ones, cookies, and those the
// proxy sets itself per response.
var skipStoredHeader = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true, "Te": true, "Trailer": true,
	"Transfer-Encoding": true, "Upgrade": true, "Set-Cookie": true, "Content-Length": true,
	"Age": true, "Cache-Status": true, "X-Request-Id": true,
}

func storedHeader(in http.Header, bodyLen int) map[string][]string {
	out := make(map[string][]string, len(in)+1)
	for k, v := range in {
		if !skipStoredHeader[k] {
			out[k] = slices.Clip(slices.Clone(v))
		}
	}
	out["Content-Length"] = []string{strconv.Itoa(bodyLen)}
	return out
}

// cacheControl reads the client's Cache-Control (and HTTP/1.0 Pragma).
func cacheControl(h http.Header) (noCache, noStore bool) {
	for _, v := range h["Cache-Control"] {
		for _, d := range strings.Split(v, ",") {
			switch strings.ToLower(strings.TrimSpace(d)) {
			case "no-cache", "max-age=0":
				noCache = true
			case "no-store":
				noStore = true
			}
		}
	}
	if len(h["Cache-Control"]) == 0 && len(h["Pragma"]) > 0 && strings.EqualFold(h["Pragma"][0], "no-cache") {
		noCache = true
	}
	return
}

// noStoreResponse reports an upstream response that forbids storing.
func noStoreResponse(h http.Header) bool {
	for _, v := range h["Cache-Control"] {
		for _, d := range strings.Split(v, ",") {
			switch strings.ToLower(strings.TrimSpace(d)) {
			case "no-store":
				return true
			}
		}
	}
	return false
}

type readCloser struct {
	io.Reader
	io.Closer
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

// errReader returns err (if not nil) once the bytes before it are read.
func errReader(err error) io.Reader {
	if err == nil {
		return strings.NewReader("")
	}
	return &failReader{err}
}

type failReader struct{ err error }

func (f *failReader) Read([]byte) (int, error) { return 0, f.err }
