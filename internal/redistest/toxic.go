package redistest

import (
	"context"
	"fmt"
	"strings"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/toxics"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// Link is a Toxiproxy proxy between one replica and a redis-server, on
// loopback: faults are injected on it (latency, a link down) by the real
// tool, used as a library.
type Link struct {
	p *toxiproxy.Proxy
	// Addr is where the replica connects instead of the server.
	Addr string
}

// NewLink starts a Toxiproxy link to target (host:port) on a free
// loopback port; the test's cleanup stops it.
func NewLink(t T, target string) *Link {
	t.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	addr := freeAddr(t)
	p := toxiproxy.NewProxy(srv, "redis-"+addr, addr, target)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return &Link{p: p, Addr: addr}
}

// URL is a redis:// URL through the link.
func (l *Link) URL() string { return "redis://" + l.Addr }

// Latency adds ms of latency to what Redis sends back, until Clear.
func (l *Link) Latency(t T, ms int) {
	t.Helper()
	l.add(t, fmt.Sprintf(`{"name":"latency","type":"latency","stream":"downstream","attributes":{"latency":%d}}`, ms))
}

// Reset resets every connection on the link (TCP RST) until Clear.
func (l *Link) Reset(t T) {
	t.Helper()
	l.add(t, `{"name":"reset","type":"reset_peer","stream":"downstream","attributes":{"timeout":0}}`)
}

// Silence lets nothing Redis sends through, and never closes the
// replica's side, until Clear: the replica hears nothing, not even Redis
// closing its end (a path gone dark, as when a firewall or NAT drops the
// flow).
func (l *Link) Silence(t T) {
	t.Helper()
	l.add(t, `{"name":"silence","type":"silence","stream":"downstream","attributes":{}}`)
}

// silence is the toxic of Silence. Toxiproxy's own timeout toxic closes
// the replica's side once Redis closes its end.
type silence struct{}

func (*silence) Pipe(stub *toxics.ToxicStub) {
	for {
		select {
		case <-stub.Interrupt:
			return
		case c := <-stub.Input:
			if c == nil { // Redis closed its end: keep the replica's open
				<-stub.Interrupt
				return
			}
		}
	}
}

func init() { toxics.Register("silence", new(silence)) }

// Down closes the link and every connection on it; Up opens it again.
func (l *Link) Down() { l.p.Stop() }

// Up reopens a link closed by Down.
func (l *Link) Up(t T) {
	t.Helper()
	if err := l.p.Start(); err != nil {
		t.Fatal(err)
	}
}

// Clear removes every toxic.
func (l *Link) Clear() { l.p.Toxics.ResetToxics(context.Background()) }

func (l *Link) add(t T, js string) {
	t.Helper()
	if _, err := l.p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
		t.Fatal(err)
	}
}
