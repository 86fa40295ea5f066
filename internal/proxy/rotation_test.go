package proxy

import (
	"strconv"
	"strings"
	"testing"

	"cacheproxy/internal/redistest"
)

// previousSecrets sets a replica's cache.key_secret and
// cache.previous_key_secrets.
func previousSecrets(secret string, previous ...string) harnessOpt {
	return func(s *setup) {
		s.opts.KeySecret, s.previous = []byte(secret), nil
		for _, p := range previous {
			s.previous = append(s.previous, []byte(p))
		}
	}
}

// Point 3: cache.key_secret rolls from one secret to another, one replica
// at a time, under reads and writes, as the README's procedure says: each
// of three replicas is replaced by one that learns the new secret (in
// cache.previous_key_secrets), then by one that writes under it (the old
// one in previous_key_secrets), then by one with the new secret alone.
// After every write, through any replica, every replica reads it (twice:
// the second from its L1); a replica that has the old secret among its
// secrets reads what the others shared; no replica ever drops its memory
// for an invalidation it cannot open, and no write waits for an
// acknowledgement that does not come.
func TestFleetKeySecretRotation(t *testing.T) {
	srv := redistest.Start(t)
	const oldSecret, newSecret = "test-secret", "the-new-secret"
	r := replicas(t, 3, srv)
	upstream := r[0] // its fake Twilio serves every replica, rolled or not
	v, l2Reads := 0, 0
	writeEverywhere := func(step string) {
		t.Helper()
		for w := range r {
			v++
			r[w].update("POST", pathConv, `{"v":`+strconv.Itoa(v)+`}`)
			want := `{\"v\":` + strconv.Itoa(v) + `}`
			for i, h := range r {
				for range 2 {
					if got := attrs(t, h); got != want {
						t.Fatalf("%s: replica %d after a write through replica %d: %s, want %s", step, i, w, got, want)
					}
				}
			}
		}
	}
	replace := func(i int, opt harnessOpt) {
		t.Helper()
		old := r[i]
		old.inv.Close() // leaves the fleet, as a replica stopped for the roll does
		old.budget.Close()
		old.fleet.Close()
		h := newHarness(t, withFleet(srv.URL()), opt, func(s *setup) {
			s.cfg.Upstreams.Conversations.URL, s.cfg.Upstreams.Proxy.URL = upstream.convSrv.URL, upstream.proxSrv.URL
		})
		h.conv, h.prox = upstream.conv, upstream.prox
		waitTrusted(t, h.inv)
		r[i] = h
	}
	var all []*harness
	count := func() {
		for i, h := range all {
			if n := h.inv.Stats().Unacked; n != 0 {
				t.Errorf("replica %d: %d acknowledgements never came", i, n)
			}
			if n := h.inv.Stats().Unopened; n != 0 {
				t.Errorf("replica %d could not open %d invalidations", i, n)
			}
		}
	}
	writeEverywhere("before")
	steps := []struct {
		name string
		opt  harnessOpt
	}{
		{"learns the new secret", previousSecrets(oldSecret, newSecret)},
		{"writes under the new secret", previousSecrets(newSecret, oldSecret)},
		{"has the new secret alone", previousSecrets(newSecret)},
	}
	for _, step := range steps {
		for i := range r {
			all = append(all, r[i])
			replace(i, step.opt)
			// Its first read: what the others shared, under either secret.
			if _, cs, _ := r[i].get(pathConv); strings.HasSuffix(cs, "detail=l2") {
				l2Reads++
			} else if step.name != "has the new secret alone" { // the entry may be under the old secret
				t.Errorf("replica %d, which %s: first read %q, want a shared hit", i, step.name, cs)
			}
			writeEverywhere("replica " + strconv.Itoa(i) + " " + step.name)
		}
	}
	all = append(all, r...)
	count()
	t.Logf("%d writes, each read twice through each of 3 replicas; %d of 9 rolled replicas' first reads were shared hits", v, l2Reads)
}
