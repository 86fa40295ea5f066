package proxy

import (
	"sync"
	"testing"

	"cacheproxy/internal/twiliofake"

	"github.com/prometheus/client_golang/prometheus"
)

// Hostile input, point 4: account SIDs cost nothing to make up. 20,000
// requests from made-up accounts (each refused upstream) leave per-account
// series only for accounts the upstream accepted a credential of, at most
// metrics.max_accounts of them, the rest summed as account="other": the
// registry stays within 3,000 series (before: five per made-up account).
func TestMadeUpAccountsGetNoSeriesOfTheirOwn(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newHarness(t, func(s *setup) { s.opts.Registerer, s.opts.MaxAccountSeries = reg, 100 })
	if s, _, _ := h.get(pathConv); s != 200 {
		t.Fatalf("the real account: %d", s)
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 50)
	for i := range 20_000 {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			readResp(t, h.do("GET", pathConv, basic(twiliofake.SID("AC", 1000+i), "made-up-token")))
		})
	}
	wg.Wait()
	// An account idle for ratelimit.recover + 2 s is forgotten (a slow run
	// takes that long): the real user's next call, a cold read, names it
	// again.
	if s, _, _ := h.get(pathConv + "?PageSize=7"); s != 200 {
		t.Fatalf("the real account again: %d", s)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series, labels := 0, map[string]bool{}
	for _, f := range families {
		series += len(f.GetMetric())
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "account" {
					labels[l.GetValue()] = true
				}
			}
		}
	}
	if series > 3000 || !labels[acctA] || !labels["other"] || len(labels) > 3 {
		t.Fatalf("%d series, account labels %v: want at most 3,000 series naming %s, none and other only", series, labels, acctA)
	}
	t.Logf("%d series after 20,000 made-up accounts", series)
}
