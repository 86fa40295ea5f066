package main

import (
	"net/http"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"cacheproxy/internal/redistest"
)

// servedMetrics runs a fleet replica with webhooks on, makes one read and
// one refused webhook (so that labelled families have series), and
// returns its /metrics page and the cacheproxy_* families it names, with
// their types.
func servedMetrics(t *testing.T) (string, map[string]string) {
	t.Helper()
	srv := redistest.Start(t)
	_, up := newFake(t)
	p := start(t, upstreamConfig(up.URL), "CACHEPROXY_REDIS_URL="+srv.URL(), "CACHEPROXY_CACHE_KEY_SECRET=metrics-secret-0123456789",
		"CACHEPROXY_WEBHOOKS_LISTEN=127.0.0.1:0", "CACHEPROXY_WEBHOOKS_PUBLIC_URL=https://hooks.example.com",
		"CACHEPROXY_WEBHOOKS_AUTH_TOKENS=hook-token-0123456789abcdef")
	waitFor(t, p, "connected to Redis: sharing entries and invalidations")
	if cs := cacheStatus(t, p); !strings.HasPrefix(cs, "cacheproxy; fwd=uri-miss") {
		t.Fatalf("a read: %q", cs)
	}
	resp, err := http.Post("http://"+webhookAddr(t, p)+"/webhooks/conversations", "application/x-www-form-urlencoded", strings.NewReader("EventType=x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	page := scrape(t, p)
	families := map[string]string{}
	for _, m := range regexp.MustCompile(`(?m)^# TYPE (cacheproxy_[a-z0-9_]+) ([a-z]+)$`).FindAllStringSubmatch(page, -1) {
		families[m[1]] = m[2]
	}
	return page, families
}

// Every metric the binary serves is in docs/metrics.md's table, with its
// type, and every row of the table is served; promtool finds nothing to
// lint on the page.
func TestMetricsTableListsEveryMetric(t *testing.T) {
	page, served := servedMetrics(t)
	table := map[string]string{}
	for _, m := range regexp.MustCompile("(?m)^\\| `(cacheproxy_[a-z0-9_]+)` \\| ([a-z]+) \\|").FindAllStringSubmatch(repoFile(t, "docs/metrics.md"), -1) {
		table[m[1]] = m[2]
	}
	if len(served) < 40 {
		t.Fatalf("only %d families served: the scrape missed the fleet's or the webhooks'", len(served))
	}
	for name, typ := range served {
		if table[name] != typ {
			t.Errorf("%s (%s) is served; docs/metrics.md lists it as %q", name, typ, table[name])
		}
	}
	for name := range table {
		if _, ok := served[name]; !ok {
			t.Errorf("docs/metrics.md lists %s, which the binary does not serve", name)
		}
	}
	lint := exec.Command("promtool", "check", "metrics")
	lint.Stdin = strings.NewReader(page)
	if out, err := lint.CombinedOutput(); err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}

// Every series the alert rules and the dashboard query is one the binary
// serves (a histogram's _bucket, _sum and _count included).
func TestAlertsAndDashboardNameServedMetrics(t *testing.T) {
	_, served := servedMetrics(t)
	for _, file := range []string{"deploy/prometheus/alerts.yml", "deploy/grafana/cacheproxy.json"} {
		names := regexp.MustCompile(`cacheproxy_[a-z0-9_]+`).FindAllString(repoFile(t, file), -1)
		if len(names) < 10 {
			t.Fatalf("%s names %d series: want its expressions", file, len(names))
		}
		for _, n := range names {
			family := n
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if f, ok := strings.CutSuffix(n, suffix); ok && served[f] == "histogram" {
					family = f
				}
			}
			if _, ok := served[family]; !ok {
				t.Errorf("%s queries %s, which the binary does not serve", file, n)
			}
		}
	}
}
