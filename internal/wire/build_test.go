package wire_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/redistest"
	"cacheproxy/internal/twiliofake"
	"cacheproxy/internal/wire"
)

const (
	account = "AC00000000000000000000000000000001"
	token   = "token-of-the-wire-test-xxxxxxxxx"
)

// upstream is a fake Twilio with one participant, and its read path.
func upstream(t *testing.T) (string, string) {
	t.Helper()
	srv := httptest.NewServer(twiliofake.Seeded(account, token, 1))
	t.Cleanup(srv.Close)
	return srv.URL, twiliofake.SeededPaths(1)[0]
}

func config_(upURL string) config.Config {
	cfg := config.Default()
	cfg.Upstreams.Conversations.URL, cfg.Upstreams.Proxy.URL = upURL, upURL
	cfg.Cache.KeySecret = "wire-test-secret"
	return cfg
}

// read sends one participant read through g's proxy and returns its
// status and Cache-Status.
func read(t *testing.T, g *wire.Graph, path string) (int, string) {
	t.Helper()
	srv := httptest.NewServer(g.Proxy)
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL+path, nil)
	req.SetBasicAuth(account, token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Cache-Status")
}

// metric reports whether the graph's registry has a series of name.
func metric(t *testing.T, g *wire.Graph, name string) bool {
	t.Helper()
	mfs, err := g.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return true
		}
	}
	return false
}

// A replica alone: a read is a miss, then a hit; no fleet parts, always
// trusted, no fleet metrics.
func TestBuildAlone(t *testing.T) {
	upURL, path := upstream(t)
	g, err := wire.Build(config_(upURL), wire.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if s, cs := read(t, g, path); s != 200 || !strings.Contains(cs, "fwd=uri-miss") {
		t.Fatalf("first read: %d %q", s, cs)
	}
	g.Store.Wait()
	if s, cs := read(t, g, path); s != 200 || !strings.Contains(cs, "hit") {
		t.Fatalf("second read: %d %q", s, cs)
	}
	if g.WaitTrusted(context.Background()) != nil || g.Fleet != nil || g.FleetInvalidator != nil || g.Slots != nil || g.Webhooks != nil || !g.Trusted() || g.RedisUp() {
		t.Fatalf("a replica alone has fleet parts or webhooks: %+v", g)
	}
	if !metric(t, g, "cacheproxy_requests_total") || metric(t, g, "cacheproxy_redis_up") {
		t.Fatal("want the proxy's metrics and none of the fleet's")
	}
}

// Two replicas on one Redis: what one fetched the other finds in the
// L2; the fleet's metrics and the webhooks' are registered.
func TestBuildFleet(t *testing.T) {
	upURL, path := upstream(t)
	cfg := config_(upURL)
	cfg.Redis.URL = redistest.Start(t).URL()
	cfg.Webhooks.Listen, cfg.Webhooks.PublicURL, cfg.Webhooks.AuthTokens = "127.0.0.1:0", "https://hooks.example.com", []string{token}
	var gs [2]*wire.Graph
	for i := range gs {
		g, err := wire.Build(cfg, wire.Deps{})
		if err != nil {
			t.Fatal(err)
		}
		defer g.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = g.WaitTrusted(ctx)
		cancel()
		if err != nil {
			t.Fatal("never trusted:", err)
		}
		gs[i] = g
	}
	if s, cs := read(t, gs[0], path); s != 200 || !strings.Contains(cs, "stored") {
		t.Fatalf("read through the first: %d %q", s, cs)
	}
	if s, cs := read(t, gs[1], path); s != 200 || !strings.Contains(cs, "detail=l2") {
		t.Fatalf("read through the second: %d %q", s, cs)
	}
	for _, name := range []string{"cacheproxy_redis_up", "cacheproxy_fleet_trusted", "cacheproxy_fleet_budget_fallbacks_total", "cacheproxy_webhooks_total"} {
		if !metric(t, gs[1], name) {
			t.Errorf("no %s", name)
		}
	}
	if !gs[1].RedisUp() || gs[1].Webhooks == nil {
		t.Fatal("Redis not up, or no webhooks handler")
	}
}

// A graph that cannot be built returns the error and nothing else.
func TestBuildFailsWhole(t *testing.T) {
	upURL, _ := upstream(t)
	cfg := config_(upURL)
	cfg.Webhooks.Listen = "127.0.0.1:0" // no public_url, no tokens
	if g, err := wire.Build(cfg, wire.Deps{}); err == nil || g != nil {
		t.Fatalf("Build without webhooks.public_url: %v, %v", g, err)
	}
}
