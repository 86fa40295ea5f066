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
	// The shortest and longest listed hosts: a host outside them (the
	// sidecar's own, most often) is not looked up.
	minLen, maxLen int
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
			if len(r.byHost) == 0 || len(h) < r.minLen {
				r.minLen = len(h)
			}
			r.maxLen = max(r.maxLen, len(h))
			r.byHost[h] = Upstream(up)
		}
	}
	return r, nil
}

// listed looks up a host as listed: as given, else in lower case and
// without a final dot (proxy.twilio.com. is the same host). It returns the
// host in that form.
func (r *Router) listed(host string) (Upstream, string, bool) {
	if r.mayList(host) {
		if up, ok := r.byHost[host]; ok {
			return up, host, true
		}
	}
	if !needsFold(host) { // as listed already: the sidecar's own Host
		return 0, host, false
	}
	h := strings.TrimSuffix(strings.ToLower(host), ".")
	if h == host || !r.mayList(h) {
		return 0, h, false
	}
	up, ok := r.byHost[h]
	return up, h, ok
}

// needsFold reports whether host may differ from its lower-case form
// without a final dot: it has an upper-case or non-ASCII byte, or ends
// in a dot. It costs a hit less than strings.ToLower's own check.
func needsFold(host string) bool {
	for i := 0; i < len(host); i++ {
		if c := host[i]; c-'A' <= 'Z'-'A' || c >= 0x80 {
			return true
		}
	}
	return strings.HasSuffix(host, ".")
}

func (r *Router) mayList(host string) bool {
	return len(host) >= r.minLen && len(host) <= r.maxLen
}

// Resolve maps a request to an upstream and route. host is the Host
// header, urlHost the host of an absolute-URI request target (a client
// using the sidecar as an HTTP proxy), and path the request's path as it
// was escaped (url.URL.EscapedPath): routing, keys and the upstream all
// see the path as it is sent upstream, so an escaped "/" (%2F) or "?"
// (%3F) inside a segment never becomes a separator. Percent-encoded
// unreserved characters are decoded (RFC 3986 6.2.2.2).
func (r *Router) Resolve(method, host, urlHost, path string) (Match, *Error) {
	var m Match
	err := r.ResolveTo(&m, method, host, urlHost, path)
	return m, err
}

// ResolveTo is Resolve into m (a Match is large: the hit path resolves
// into the request's record rather than copying it there). On an error m
// is the zero Match.
func (r *Router) ResolveTo(m *Match, method, host, urlHost, path string) *Error {
	*m = Match{}
	if method == "CONNECT" {
		return &Error{Status: 405, Msg: "CONNECT is not supported: point the client's base URL or transport at cacheproxy over plain HTTP"}
	}
	absolute := urlHost != ""
	if absolute {
		host = urlHost
	}
	host = stripPort(host)
	if !strings.HasPrefix(path, "/") { // "OPTIONS *", or an absolute URI with no path
		return &Error{Status: 400, Msg: "request target must be an absolute path"}
	}
	path, ok := normalize(path)
	if !ok {
		return &Error{Status: 400, Msg: "malformed percent-encoding in the path"}
	}
	up, host, known := r.listed(host)
	replaced, base := false, ""
	switch {
	case known:
	case absolute || host == "twilio.com" || strings.HasSuffix(host, ".twilio.com"):
		return &Error{Status: 421, Msg: "host " + quoteHost(host) + " is not a configured upstream of cacheproxy"}
	default:
		replaced = true
		trimmed := path
		up, known, path = byPrefix(path)
		base = trimmed[:len(trimmed)-len(path)]
	}
	// The path is split once; routing by path, the dot-segment check and
	// classify all read the segments.
	var buf [maxSegments]string
	segs := splitPath(path, &buf)
	if !known {
		var err *Error
		if up, err = byPath(path, segs); err != nil {
			return err
		}
	}
	if hasDotSegment(path, segs) {
		return &Error{Status: 400, Msg: "path must not contain . or .. segments"}
	}
	classify(m, up, segs)
	m.Path, m.Replaced, m.Base = path, replaced, base
	return nil
}

// prefixes name an upstream when a client replaced its base URL.
var prefixes = [NumUpstreams]string{Conversations: "/conversations", Proxy: "/proxy"}

// byPrefix strips a /proxy or /conversations prefix and returns its
// upstream, or false and the path unchanged.
func byPrefix(path string) (Upstream, bool, string) {
	for up, pre := range prefixes {
		if len(path) > len(pre) && path[len(pre)] == '/' && strings.HasPrefix(path, pre) {
			return Upstream(up), true, path[len(pre):]
		}
	}
	return 0, false, path
}

// byPath routes a request that arrived with the sidecar's own Host and no
// prefix (the client replaced its base URL): the path itself decides.
// segs is splitPath's result (nil for a path longer than any route).
func byPath(path string, segs []string) (Upstream, *Error) {
	if segs == nil { // longer than any row: only the first segments decide
		segs = strings.SplitN(strings.TrimPrefix(path, "/"), "/", 4)
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
	const expected = ": expected /v1/..., /v2/..., /proxy/v1/..., /conversations/v1/... or /conversations/v2/..."
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

// normalize decodes the percent-encoded unreserved characters of an
// escaped path (RFC 3986 2.3: letters, digits, "-", ".", "_", "~") and
// writes every other escape in upper case, so that equivalent spellings of
// one path are one string; an escaped "/" or "?" stays escaped. It reports
// false for a malformed escape. A path without "%" is returned as it is.
func normalize(p string) (string, bool) {
	i := strings.IndexByte(p, '%')
	if i < 0 {
		return p, true
	}
	b := make([]byte, 0, len(p))
	b = append(b, p[:i]...)
	for ; i < len(p); i++ {
		if p[i] != '%' {
			b = append(b, p[i])
			continue
		}
		if i+2 >= len(p) || !isHex(p[i+1]) || !isHex(p[i+2]) {
			return "", false
		}
		c := unhex(p[i+1])<<4 | unhex(p[i+2])
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~' {
			b = append(b, c)
		} else {
			const upper = "0123456789ABCDEF"
			b = append(b, '%', upper[c>>4], upper[c&15])
		}
		i += 2
	}
	return string(b), true
}

// IsSID reports whether s is a Twilio SID: two capital letters and 32
// hex digits.
func IsSID(s string) bool {
	if len(s) != 34 || s[0] < 'A' || s[0] > 'Z' || s[1] < 'A' || s[1] > 'Z' {
		return false
	}
	for i := 2; i < len(s); i++ {
		if !isHex(s[i]) {
			return false
		}
	}
	return true
}

func isHex(c byte) bool { return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F' }

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

// unescape decodes one escaped segment (or path); an escape that does not
// decode leaves it as it is.
func unescape(s string) string {
	if strings.IndexByte(s, '%') < 0 {
		return s
	}
	if u, err := url.PathUnescape(s); err == nil {
		return u
	}
	return s
}

// quoteHost keeps a client-supplied host printable in an error message.
func quoteHost(h string) string {
	if len(h) > 100 {
		h = h[:100]
	}
	return `"` + url.PathEscape(h) + `"`
}
