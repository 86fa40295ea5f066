package proxy

import (
	"net/http"
	"net/url"
	"strings"
)

// Upstream names; they are also the config keys under [upstreams].
const (
	conversations = "conversations"
	proxyAPI      = "proxy"
)

// Route names of the cached participant reads, used in logs and metrics.
const (
	routeConvParticipant    = "conversations.v1.participant"
	routeConvSvcParticipant = "conversations.v1.service_participant"
	routeConv2Participant   = "conversations.v2.participant"
	routeProxyParticipant   = "proxy.v1.participant"
)

// route is where one request goes and what it means for the cache.
type route struct {
	up *upstream
	// path and rawPath are the request's path with any /proxy or
	// /conversations prefix removed (decoded, and escaped as sent).
	path, rawPath string
	// name is a participant read route, or "<upstream>.other"; id is its
	// index in routeNames.
	name string
	id   int
	// cacheable is true for the four participant read routes (any method).
	cacheable bool
	// ids are the scopes the path names (kind, id), kept inline so the
	// cache-hit path builds no strings; see readTags and writeTags.
	ids  [2][2]string
	nids int
	// resource is true for writes to a conversation or session itself
	// (create, update, delete), whose response's sid and unique_name name
	// further scopes.
	resource bool
}

// routeError is a request that maps to no configured upstream. msg is the
// client's answer; logMsg, when set, is what the access log says instead
// (it leaves out the path, which can hold a participant's identity).
type routeError struct {
	status int
	msg    string
	logMsg string
}

func (e *routeError) logText() string {
	if e.logMsg != "" {
		return e.logMsg
	}
	return e.msg
}

func (e *routeError) Error() string { return e.msg }

// resolve maps a request to an upstream and route. It never consults
// anything but configuration: a host the client names that is not a
// configured upstream is an error, never a connection.
func (p *Proxy) resolve(r *http.Request) (route, *routeError) {
	if r.Method == http.MethodConnect {
		return route{}, &routeError{status: http.StatusMethodNotAllowed, msg: "CONNECT is not supported: point the client's base URL or transport at cacheproxy over plain HTTP"}
	}
	host := r.Host
	if r.URL.Host != "" { // absolute-URI request (client uses us as an HTTP proxy)
		host = r.URL.Host
	}
	host = strings.ToLower(stripPort(host))
	path, raw := r.URL.Path, r.URL.RawPath
	if !strings.HasPrefix(path, "/") { // "OPTIONS *", or an absolute URI with no path
		return route{}, &routeError{status: http.StatusBadRequest, msg: "request target must be an absolute path"}
	}
	var up *upstream
	if u, ok := p.byHost[host]; ok {
		up = u
	} else if r.URL.Host != "" || host == "twilio.com" || strings.HasSuffix(host, ".twilio.com") {
		return route{}, &routeError{status: http.StatusMisdirectedRequest, msg: "host " + quoteHost(host) + " is not a configured upstream of cacheproxy"}
	} else {
		up, path, raw = p.byPrefix(path, raw)
	}
	// The path is split once; routing by path, the dot-segment check and
	// classify all read the segments.
	var buf [maxSegments]string
	segs := splitPath(path, &buf)
	if up == nil {
		var rerr *routeError
		if up, rerr = p.byPath(path, segs); rerr != nil {
			return route{}, rerr
		}
	}
	if hasDotSegment(path, segs) {
		return route{}, &routeError{status: http.StatusBadRequest, msg: "path must not contain . or .. segments"}
	}
	rt := classify(up.name, segs)
	rt.id = routeIndex(rt.name)
	rt.up, rt.path, rt.rawPath = up, path, raw
	return rt, nil
}

// Path prefixes that name an upstream when a client replaced its base URL.
const (
	proxyPrefix         = "/" + proxyAPI
	conversationsPrefix = "/" + conversations
)

// byPrefix strips a /proxy or /conversations prefix and returns its
// upstream, or nil and the path unchanged.
func (p *Proxy) byPrefix(path, raw string) (*upstream, string, string) {
	for _, pre := range [...]string{proxyPrefix, conversationsPrefix} {
		if len(path) > len(pre) && path[len(pre)] == '/' && strings.HasPrefix(path, pre) {
			if raw != "" {
				raw = strings.TrimPrefix(raw, pre)
			}
			return p.ups[pre[1:]], path[len(pre):], raw
		}
	}
	return nil, path, raw
}

// byPath routes a request that arrived with the sidecar's own Host and no
// prefix (the client replaced its base URL): the path itself decides.
// segs is splitPath's result (nil for a path longer than any route).
func (p *Proxy) byPath(path string, segs []string) (*upstream, *routeError) {
	if len(segs) == 0 {
		segs = []string{""}
	}
	switch {
	case segs[0] == "v2":
		return p.ups[conversations], nil
	case segs[0] == "v1" && len(segs) > 1 && segs[1] == "Services":
		if len(segs) > 2 && strings.HasPrefix(segs[2], "KS") {
			return p.ups[proxyAPI], nil
		}
		if len(segs) > 2 && strings.HasPrefix(segs[2], "IS") {
			return p.ups[conversations], nil
		}
		const how = ": send Host: proxy.twilio.com or conversations.twilio.com, or use the /proxy/ or /conversations/ path prefix"
		return nil, &routeError{status: http.StatusNotFound, msg: "cannot tell Proxy from Conversations for " + path + how,
			logMsg: "cannot tell Proxy from Conversations for this /v1/Services path" + how}
	case segs[0] == "v1" && len(segs) > 1 && segs[1] != "":
		return p.ups[conversations], nil
	}
	const expected = ": expected /v1/..., /v2/..., /proxy/v1/... or /conversations/v1/..."
	return nil, &routeError{status: http.StatusNotFound, msg: "no Twilio API route for " + path + expected,
		logMsg: "no Twilio API route for the path" + expected}
}

// maxSegments is more than any route classify knows; longer paths are
// passed through as "other" (they name no scope).
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

// classify names the route of a path under an upstream and lists its
// invalidation scopes (DESIGN.md "Freshness"). Tags are "<upstream>|<kind>:<id>".
func classify(up string, s []string) route {
	rt := route{name: otherRoute(up)}
	n := len(s) // 0 for a path longer than any route
	if n < 2 || s[0] == "" {
		return rt
	}
	switch {
	case up == conversations && s[0] == "v1":
		// Optional service form: /v1/Services/{IS}/...
		base := s[1:]
		var svc string
		if base[0] == "Services" && n >= 3 {
			svc = s[2]
			base = s[3:]
			if len(base) == 0 {
				rt.scope("svc", svc)
			}
		}
		switch {
		case len(base) == 1 && (base[0] == "Conversations" || base[0] == "ConversationWithParticipants"):
			rt.resource = true
		case len(base) >= 2 && base[0] == "Conversations" && (len(base) == 2 || base[2] == "Participants") && len(base) <= 4:
			rt.scope("conv", base[1])
			rt.resource = len(base) == 2
			if len(base) == 4 {
				rt.cacheable = true
				rt.name = routeConvParticipant
				if svc != "" {
					rt.name = routeConvSvcParticipant
					rt.scope("svc", svc)
				}
			}
		case len(base) == 4 && base[0] == "Users" && base[2] == "Conversations":
			rt.scope("conv", base[3])
		}
	case up == conversations && s[0] == "v2" && s[1] == "Conversations":
		switch {
		case n == 2:
			rt.resource = true
		case n == 3:
			rt.scope("conv", s[2])
			rt.resource = true
		case n == 4 && (s[3] == "Participants" || s[3] == "Actions"):
			rt.scope("conv", s[2])
		case n == 5 && s[3] == "Participants":
			rt.scope("conv", s[2])
			rt.cacheable, rt.name = true, routeConv2Participant
		}
	case up == proxyAPI && s[0] == "v1" && s[1] == "Services" && n >= 3:
		switch {
		case n == 3:
			rt.scope("svc", s[2])
		case n == 4 && s[3] == "Sessions":
			rt.resource = true
		case n >= 5 && s[3] == "Sessions" && (n == 5 || (s[5] == "Participants" && n <= 7)):
			rt.scope("sess", s[4])
			rt.resource = n == 5
			if n == 7 {
				rt.scope("svc", s[2])
				rt.cacheable, rt.name = true, routeProxyParticipant
			}
		}
	}
	return rt
}

// otherRoute names the pass-through route of an upstream without allocating.
func otherRoute(up string) string {
	if up == proxyAPI {
		return "proxy.other"
	}
	return "conversations.other"
}

func (rt *route) scope(kind, id string) {
	rt.ids[rt.nids] = [2]string{kind, id}
	rt.nids++
}

// readTags are the scopes a read's entry belongs to: its path (for purge),
// the ids in its path, and a wildcard per kind.
func (rt *route) readTags() []string {
	out := make([]string, 0, 2*rt.nids+1)
	out = append(out, pathTag(rt.up.name, rt.path))
	for _, kv := range rt.ids[:rt.nids] {
		out = append(out, scopeTag(rt.up.name, kv[0], kv[1]), scopeTag(rt.up.name, kv[0], "*"))
	}
	return out
}

// writeTags are the scopes a write invalidates: the ids in its path, plus
// the kind's wildcard when an id is not a SID (a unique name may name what
// entries know only by SID).
func (rt *route) writeTags() []string {
	var out []string
	for _, kv := range rt.ids[:rt.nids] {
		out = append(out, scopeTag(rt.up.name, kv[0], kv[1]))
		if !sidLike(kv[1]) {
			out = append(out, scopeTag(rt.up.name, kv[0], "*"))
		}
	}
	return out
}

func scopeTag(up, kind, id string) string { return up + "|" + kind + ":" + id }

// sidLike reports an id Twilio assigned (two capital letters and 32 hex
// digits, or a v2 conv_… id) rather than a unique name.
func sidLike(id string) bool {
	if strings.HasPrefix(id, "conv_") {
		return true
	}
	if len(id) != 34 || id[0] < 'A' || id[0] > 'Z' || id[1] < 'A' || id[1] > 'Z' {
		return false
	}
	for i := 2; i < 34; i++ {
		c := id[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// bodyTags returns the scopes named inside a JSON response of upstream up:
// the conversation or session a participant belongs to, and for writes to a
// conversation or session resource, its sid and unique name (a client may
// address it by either).
func bodyTags(up string, b *bodyIDs, resource bool) []string {
	var out []string
	add := func(kind, id string) {
		if id != "" {
			out = append(out, scopeTag(up, kind, id))
		}
	}
	if up == conversations {
		add("conv", b.ConversationSid)
		add("conv", b.ConversationID)
		add("svc", b.ChatServiceSid)
	} else {
		add("sess", b.SessionSid)
		add("svc", b.ServiceSid)
	}
	if resource {
		kind := "conv"
		if up == proxyAPI {
			kind = "sess"
		}
		add(kind, b.Sid)
		add(kind, b.ID)
		add(kind, b.UniqueName)
	}
	return out
}

// bodyIDs are the fields of Twilio resources that name scopes.
type bodyIDs struct {
	Sid             string `json:"sid"`
	ID              string `json:"id"`
	UniqueName      string `json:"unique_name"`
	ConversationSid string `json:"conversation_sid"`
	ConversationID  string `json:"conversationId"`
	ChatServiceSid  string `json:"chat_service_sid"`
	SessionSid      string `json:"session_sid"`
	ServiceSid      string `json:"service_sid"`
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
