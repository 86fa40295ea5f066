package fleet_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/fleet"
	"cacheproxy/internal/redistest"
	"cacheproxy/internal/twiliofake"
	"cacheproxy/internal/wire"
)

// What a read costs in Redis round trips, counted on the request's path
// (CountTrips): a cold miss is one round trip that reads the epoch and the
// entry and claims the key, one for the budget's fleet slot, and one that
// shares the fill and gives the claim back (the slot is given back off the
// path); an L2 hit is one (its marks are checked against the
// invalidations the replica heard); an L1 hit none.
func TestFleetRoundTrips(t *testing.T) {
	const account, token = "AC0000000000000000000000000000000a", "tokenAAAAsecretAAAAAAAAAAAAAAAAA"
	up := httptest.NewServer(twiliofake.Seeded(account, token, 2))
	defer up.Close()
	cfg := config.Default()
	cfg.Upstreams.Conversations.URL, cfg.Upstreams.Proxy.URL = up.URL, up.URL
	srv := redistest.Start(t)
	cfg.Cache.KeySecret, cfg.Redis.URL = "round-trips-secret", srv.URL()
	paths := twiliofake.SeededPaths(2)
	var replicas [2]*wire.Graph
	for i := range replicas {
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
		replicas[i] = g
	}
	read := func(g *wire.Graph, path string) (string, int64) {
		t.Helper()
		var n atomic.Int64
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			g.Proxy.ServeHTTP(w, req.WithContext(fleet.CountTrips(req.Context(), &n)))
		}))
		defer srv.Close()
		req, _ := http.NewRequest("GET", srv.URL+path, nil)
		req.SetBasicAuth(account, token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.Header.Get("Cache-Status"), n.Load()
	}
	for _, step := range []struct {
		g     *wire.Graph
		what  string
		trips int64
	}{{replicas[0], "fwd=uri-miss; stored", 3}, {replicas[1], "detail=l2", 1}, {replicas[1], "hit; ttl=", 0}} {
		cs, n := read(step.g, paths[0])
		if !strings.Contains(cs, step.what) || n != step.trips {
			t.Errorf("%q: %d round trips, want %q in %d", cs, n, step.what, step.trips)
		}
	}
	// A Redis that forgot the scripts (a restart, SCRIPT FLUSH): the
	// pipelined lookup's EVALSHA is answered NOSCRIPT and sent again with
	// the script, one more round trip; the fill is shared as before.
	srv.CLI(t, "SCRIPT", "FLUSH")
	if cs, n := read(replicas[1], paths[3]); !strings.Contains(cs, "fwd=uri-miss; stored") || n != 4 {
		t.Errorf("after SCRIPT FLUSH: %q in %d round trips, want a stored miss in 4", cs, n)
	}
	if cs, _ := read(replicas[0], paths[3]); !strings.Contains(cs, "detail=l2") {
		t.Errorf("the other replica after SCRIPT FLUSH: %q, want the shared fill", cs)
	}
}
