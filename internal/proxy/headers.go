package proxy

import (
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"cacheproxy/internal/cache"
)

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

// storedHeader is what is kept of a response's header: its own copy of
// the values (a response's values share one array), which
// cache.Entry.Compact then shares with other entries where they repeat.
func storedHeader(in http.Header, bodyLen int) cache.Header {
	out := make(cache.Header, 0, len(in)+1)
	for k, v := range in {
		if !skipStoredHeader[k] {
			out = append(out, cache.HeaderField{Name: k, Values: slices.Clip(slices.Clone(v))})
		}
	}
	out = append(out, cache.HeaderField{Name: "Content-Length", Values: []string{strconv.Itoa(bodyLen)}})
	return out.Sorted()
}

// reqHeaders are the request headers the proxy reads on every request,
// found in one pass over the header map: on a hit that is cheaper than a
// lookup for each of nine names.
type reqHeaders struct {
	auth, requestID      []string
	cacheControl, pragma []string
	conditional          bool // any If-Match, If-None-Match, If-Modified-Since or If-Unmodified-Since
}

func scanHeaders(h http.Header) (s reqHeaders) {
	for k, v := range h {
		switch k {
		case "Authorization":
			s.auth = v
		case "X-Request-Id":
			s.requestID = v
		case "Cache-Control":
			s.cacheControl = v
		case "Pragma":
			s.pragma = v
		case "If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since":
			s.conditional = s.conditional || len(v) > 0
		}
	}
	return s
}

// cacheControl reads the client's Cache-Control (and HTTP/1.0 Pragma).
func (s *reqHeaders) cacheDirectives() (noCache, noStore bool) {
	for _, v := range s.cacheControl {
		for _, d := range strings.Split(v, ",") {
			switch strings.ToLower(strings.TrimSpace(d)) {
			case "no-cache", "max-age=0":
				noCache = true
			case "no-store":
				noStore = true
			}
		}
	}
	if len(s.cacheControl) == 0 && len(s.pragma) > 0 && strings.EqualFold(s.pragma[0], "no-cache") {
		noCache = true
	}
	return
}

// storable reports an upstream response that one entry may hold for
// every client: it does not forbid storing (Cache-Control: no-store), its
// Vary names nothing but Accept-Encoding (the fetch always asks for the
// plain representation), and it is not content-coded (the transport
// decodes what it asked for; anything else was not asked for).
func storable(h http.Header) bool {
	for _, v := range h["Cache-Control"] {
		for _, d := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(d), "no-store") {
				return false
			}
		}
	}
	for _, v := range h["Vary"] {
		for _, f := range strings.Split(v, ",") {
			if f = strings.TrimSpace(f); f != "" && !strings.EqualFold(f, "Accept-Encoding") {
				return false
			}
		}
	}
	return contentCoding(h["Content-Encoding"]) == ""
}

// contentCoding is a response's Content-Encoding, "" for none or identity.
func contentCoding(encodings []string) string {
	v := strings.TrimSpace(strings.Join(encodings, ","))
	if strings.EqualFold(v, "identity") {
		return ""
	}
	return v
}

// acceptsCoding reports whether the request's Accept-Encoding lists enc
// (or *) with a non-zero weight.
func acceptsCoding(h http.Header, enc string) bool {
	for _, v := range h["Accept-Encoding"] {
		for _, c := range strings.Split(v, ",") {
			name, params, _ := strings.Cut(strings.TrimSpace(c), ";")
			if !strings.EqualFold(strings.TrimSpace(name), enc) && strings.TrimSpace(name) != "*" {
				continue
			}
			if q := strings.ReplaceAll(params, " ", ""); q == "q=0" || q == "q=0.0" || q == "q=0.00" || q == "q=0.000" {
				continue
			}
			return true
		}
	}
	return false
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
