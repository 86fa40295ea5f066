package proxy

import (
	"net/http"
	"strings"
	"time"

	"cacheproxy/internal/cache"
)

// precondition evaluates a request's conditional headers against a stored
// 200 (RFC 9110 13.2.2): 412 when If-Match or If-Unmodified-Since fails,
// 304 when If-None-Match or If-Modified-Since says the client's copy is
// current, 0 to send the entry. Range is not evaluated: a full 200 is a
// valid answer to it.
func precondition(method string, req http.Header, stored *cache.Entry) int {
	etag, lastMod := first(stored.Get("Etag")), first(stored.Get("Last-Modified"))
	if im := req["If-Match"]; len(im) > 0 {
		if !etagListMatches(im, etag, false) {
			return http.StatusPreconditionFailed
		}
	} else if ius := first(req["If-Unmodified-Since"]); ius != "" {
		if t, ok := parseDate(ius); ok {
			if lm, ok := parseDate(lastMod); !ok || lm.After(t) {
				return http.StatusPreconditionFailed
			}
		}
	}
	if method != http.MethodGet && method != http.MethodHead {
		return 0
	}
	if inm := req["If-None-Match"]; len(inm) > 0 {
		if etagListMatches(inm, etag, true) {
			return http.StatusNotModified
		}
	} else if ims := first(req["If-Modified-Since"]); ims != "" {
		if t, ok := parseDate(ims); ok {
			if lm, ok := parseDate(lastMod); ok && !lm.After(t) {
				return http.StatusNotModified
			}
		}
	}
	return 0
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

func parseDate(s string) (time.Time, bool) {
	if s == "" {
		return time.Time{}, false
	}
	t, err := http.ParseTime(s)
	return t, err == nil
}

// etagListMatches reports whether a list of entity tags (If-Match or
// If-None-Match values) names etag: "*" matches any current representation;
// weak comparison ignores W/ prefixes, strong comparison refuses weak tags.
func etagListMatches(values []string, etag string, weak bool) bool {
	for _, v := range values {
		for _, t := range strings.Split(v, ",") {
			t = strings.TrimSpace(t)
			switch {
			case t == "*":
				return true
			case etag == "":
			case weak && strings.TrimPrefix(t, "W/") == strings.TrimPrefix(etag, "W/"):
				return true
			case !weak && t == etag && !strings.HasPrefix(t, "W/"):
				return true
			}
		}
	}
	return false
}
