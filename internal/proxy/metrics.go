package proxy

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Route and cache-outcome label values, in index order.
var (
	routeNames = [...]string{routeConvParticipant, routeConvSvcParticipant, routeConv2Participant, routeProxyParticipant,
		"conversations.other", "proxy.other", "unrouted"}
	outcomeNames = [...]string{"none", "hit", "miss", "collapsed", "stale", "refresh", "bypass"}
)

func routeIndex(name string) int {
	for i, n := range routeNames {
		if n == name {
			return i
		}
	}
	return len(routeNames) - 1
}

func outcomeIndex(cache string) int {
	for i, n := range outcomeNames[1:] {
		if n == cache {
			return i + 1
		}
	}
	return 0
}

// metrics are the proxy's Prometheus series. Counters the summary line
// also needs live in counters and are read at scrape time.
type metrics struct {
	requests  [len(routeNames)][len(outcomeNames)]prometheus.Counter
	upstream  *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	queueWait prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer, p *Proxy) *metrics {
	m := &metrics{
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cacheproxy_upstream_requests_total", Help: "Upstream calls by upstream and status (error: no response).",
		}, []string{"upstream", "status"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cacheproxy_upstream_latency_seconds", Help: "Time to the upstream's response headers.",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"upstream"}),
		queueWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "cacheproxy_queue_wait_seconds", Help: "Time an upstream call waited for its account's turn.",
			Buckets: []float64{0, .001, .01, .05, .1, .25, .5, 1, 2, 5},
		}),
	}
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cacheproxy_requests_total", Help: "Client requests by route and cache outcome.",
	}, []string{"route", "cache"})
	for i, r := range routeNames {
		for j, o := range outcomeNames {
			m.requests[i][j] = requests.WithLabelValues(r, o)
		}
	}
	counter := func(name, help string, v func() int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(v()) })
	}
	gauge := func(name, help string, v func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, v)
	}
	reg.MustRegister(requests, m.upstream, m.latency, m.queueWait,
		counter("cacheproxy_coalesced_requests_total", "Reads answered by another request's upstream call.", p.c.collapsed.Load),
		counter("cacheproxy_rejections_total", "Requests refused because the account's budget was spent (429).", p.c.rejections.Load),
		counter("cacheproxy_retries_total", "Retries of upstream 429s.", p.c.retries.Load),
		counter("cacheproxy_upstream_429_total", "Upstream 429 answers.", p.c.upstream429.Load),
		counter("cacheproxy_stale_total", "Reads answered with a stale entry.", p.c.stale.Load),
		gauge("cacheproxy_cache_entries", "Entries in the cache.", func() float64 { return float64(p.store.Stats().Entries) }),
		gauge("cacheproxy_cache_bytes", "Bytes held by the cache (body + headers + key).", func() float64 { return float64(p.store.Stats().Bytes) }),
		counter("cacheproxy_cache_evictions_total", "Entries evicted to stay within cache.max_bytes.", func() int64 { return int64(p.store.Stats().Evictions) }),
	)
	return m
}

// observeUpstream records one upstream call.
func (m *metrics) observeUpstream(upstream string, status int, d time.Duration) {
	label := "error"
	if status > 0 {
		label = strconv.Itoa(status)
	}
	m.upstream.WithLabelValues(upstream, label).Inc()
	if status > 0 {
		m.latency.WithLabelValues(upstream).Observe(d.Seconds())
	}
}
