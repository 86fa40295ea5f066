package proxy

import (
	"net"
	"strings"
)

// pageHosts are the addresses a list answer's page URLs may name: the
// sidecar's listen address (the default) and the names the operator lists
// (public_hosts). A client's Host is copied into page URLs only when it is
// one of them, so no Host a client sends (evil.example.com, an IPv6
// literal with a zone) makes the sidecar hand out URLs pointing elsewhere.
type pageHosts struct {
	def   string
	known map[string]string // by canonical form
}

// AnswerOn sets what page URLs may name: listen, the listener's address
// (with its port: the bound one when listen asked for port 0), under its
// loopback names too when it is on loopback or on every address, and
// public, the other names clients reach it by. Until it is called, page
// URLs name the Host each request came with (tests that serve the proxy
// on a port of their own).
func (p *Proxy) AnswerOn(listen string, public []string) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		host, port = listen, ""
	}
	join := func(h string) string {
		if port == "" {
			return h
		}
		return net.JoinHostPort(h, port)
	}
	h := &pageHosts{known: map[string]string{}}
	ip := net.ParseIP(host)
	switch {
	case host == "" || ip != nil && ip.IsUnspecified():
		h.def = join("127.0.0.1")
		h.add(join("localhost"), join("127.0.0.1"), join("::1"))
	case ip != nil && ip.IsLoopback():
		h.def = join(host)
		h.add(join("localhost"), h.def)
	default:
		h.def = join(host)
		h.add(h.def)
	}
	h.add(public...)
	p.hosts.Store(h)
}

func (h *pageHosts) add(names ...string) {
	for _, n := range names {
		h.known[canonicalHost(n)] = canonicalHost(n)
	}
}

// pick is what page URLs name for a request with Host host.
func (h *pageHosts) pick(host string) string {
	if h == nil {
		return host
	}
	if n, ok := h.known[canonicalHost(host)]; ok {
		return n
	}
	return h.def
}

// canonicalHost is host (or host:port) in lower case, without a fully
// qualified name's final dot: LOCALHOST:8080 and localhost.:8080 are
// localhost:8080.
func canonicalHost(host string) string {
	host = strings.ToLower(host)
	if h, port, err := net.SplitHostPort(host); err == nil {
		return net.JoinHostPort(strings.TrimSuffix(h, "."), port)
	}
	return strings.TrimSuffix(host, ".")
}
