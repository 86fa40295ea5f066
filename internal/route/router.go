package route

import (
	"fmt"
	"net/url"
	"strings"
)

// Error is a request that maps to no configured upstream. Msg is the
// client's answer; LogMsg, when set, is what the access log says instead
// (it leaves out the path, which can hold a participant's identity).
type Error struct {
	Status int // an HTTP status: 400, 404, 405 or 421
	Msg    string
	LogMsg string
}

// LogText is what the access log may say of the error.
func (e *Error) LogText() string {
	if e.LogMsg != "" {
		return e.LogMsg
	}
	return e.Msg
}

func (e *Error) Error() string { return e.Msg }

// Router maps requests to upstreams. It never consults anything but its
// configuration: a host the client names that is not configured is an
// error, never a connection.
type Router struct {
	byHost map[string]Upstream
}

// NewRouter returns a Router that sends requests whose Host is one of
// hosts[u] to upstream u. Only Twilio's host names belong there: the
// upstream URL's own host may be anything (127.0.0.1 in tests, a staging
// host), and the sidecar's own Host must fall through to path rules.
func NewRouter(hosts [NumUpstreams][]string) (*Router, error) {
	r := &Router{byHost: map[string]Upstream{}}
	for up, hs := range hosts {
		for _, h := range hs {
			h = strings.ToLower(h)
			if other, dup := r.byHost[h]; dup {
				return nil, fmt.Errorf("host %q is listed by upstreams.%s.hosts and upstreams.%s.hosts", h, other, Upstream(up))
			}
			r.byHost[h] = Upstream(up)
		}
	}
	return r, nil
}

// Resolve maps a request to an upstream and route. host is the Host
// header, urlHost the host of an absolute-URI request target (a client
// using the sidecar as an HTTP proxy), path and rawPath the URL's.
func (r *Router) Resolve(method, host, urlHost, path, rawPath string) (Match, *Error) {
	if method == "CONNECT" {
		return Match{}, &Error{Status: 405, Msg: "CONNECT is not supported: point the client's base URL or transport at cacheproxy over plain HTTP"}
	}
	absolute := urlHost != ""
	if absolute {
		host = urlHost
	}
	host = strings.ToLower(stripPort(host))
	if !strings.HasPrefix(path, "/") { // "OPTIONS *", or an absolute URI with no path
		return Match{}, &Error{Status: 400, Msg: "request target must be an absolute path"}
	}
	up, known := r.byHost[host]
	switch {
	case known:
	case absolute || host == "twilio.com" || strings.HasSuffix(host, ".twilio.com"):
		return Match{}, &Error{Status: 421, Msg: "host " + quoteHost(host) + " is not a configured upstream of cacheproxy"}
	default:
		up, known, path, rawPath = byPrefix(path, rawPath)
	}
	// The path is split once; routing by path, the dot-segment check and
	// classify all read the segments.
	var buf [maxSegments]string
	segs := splitPath(path, &buf)
	if !known {
		var err *Error
		if up, err = byPath(path, segs); err != nil {
			return Match{}, err
		}
	}
	if hasDotSegment(path, segs) {
		return Match{}, &Error{Status: 400, Msg: "path must not contain . or .. segments"}
	}
	m := classify(up, segs)
	m.Path, m.RawPath = path, rawPath
	return m, nil
}

// prefixes name an upstream when a client replaced its base URL.
var prefixes = [NumUpstreams]string{Conversations: "/conversations", Proxy: "/proxy"}

// byPrefix strips a /proxy or /conversations prefix and returns its
// upstream, or false and the path unchanged.
func byPrefix(path, raw string) (Upstream, bool, string, string) {
	for up, pre := range prefixes {
		if len(path) > len(pre) && path[len(pre)] == '/' && strings.HasPrefix(path, pre) {
			if raw != "" {
				raw = strings.TrimPrefix(raw, pre)
			}
			return Upstream(up), true, path[len(pre):], raw
		}
	}
	return 0, false, path, raw
}

// byPath routes a request that arrived with the sidecar's own Host and no
// prefix (the client replaced its base URL): the path itself decides.
// segs is splitPath's result (nil for a path longer than any route).
func byPath(path string, segs []string) (Upstream, *Error) {
	if len(segs) == 0 {
		segs = []string{""}
	}
	switch {
	case segs[0] == "v2":
		return Conversations, nil
	case segs[0] == "v1" && len(segs) > 1 && segs[1] == "Services":
		if len(segs) > 2 && strings.HasPrefix(segs[2], "KS") {
			return Proxy, nil
		}
		if len(segs) > 2 && strings.HasPrefix(segs[2], "IS") {
			return Conversations, nil
		}
		const how = ": send Host: proxy.twilio.com or conversations.twilio.com, or use the /proxy/ or /conversations/ path prefix"
		return 0, &Error{Status: 404, Msg: "cannot tell Proxy from Conversations for " + path + how,
			LogMsg: "cannot tell Proxy from Conversations for this /v1/Services path" + how}
	case segs[0] == "v1" && len(segs) > 1 && segs[1] != "":
		return Conversations, nil
	}
	const expected = ": expected /v1/..., /v2/..., /proxy/v1/... or /conversations/v1/..."
	return 0, &Error{Status: 404, Msg: "no Twilio API route for " + path + expected,
		LogMsg: "no Twilio API route for the path" + expected}
}

// maxSegments is more than any row of Table has; longer paths pass
// through as "<upstream>.other" (they name no scope).
const maxSegments = 9

// splitPath splits "/a/b/c" into buf without allocating; nil if the path
// has more segments than buf holds.
func splitPath(path string, buf *[maxSegments]string) []string {
	path = strings.TrimPrefix(path, "/")
	n := 0
	for n < maxSegments {
		i := strings.IndexByte(path, '/')
		if i < 0 {
			buf[n] = path
			return buf[:n+1]
		}
		buf[n], path = path[:i], path[i+1:]
		n++
	}
	return nil
}

// hasDotSegment reports a "." or ".." segment, reading segs when the path
// fit in them.
func hasDotSegment(path string, segs []string) bool {
	if segs == nil {
		segs = strings.Split(path, "/")
	}
	for _, seg := range segs {
		if seg == "." || seg == ".." {
			return true
		}
	}
	return false
}

// stripPort removes a :port (host:443, [::1]:80) without allocating.
func stripPort(hostport string) string {
	i := strings.LastIndexByte(hostport, ':')
	if i < 0 || i < strings.LastIndexByte(hostport, ']') {
		return hostport
	}
	return strings.TrimSuffix(strings.TrimPrefix(hostport[:i], "["), "]")
}

// quoteHost keeps a client-supplied host printable in an error message.
func quoteHost(h string) string {
	if len(h) > 100 {
		h = h[:100]
	}
	return `"` + url.PathEscape(h) + `"`
}
