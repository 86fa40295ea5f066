package proxy

import (
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/route"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// counters are the process-wide totals behind the summary line.
type counters struct {
	hits, misses, collapsed, stale, passthrough     atomic.Int64
	l2Hits                                          atomic.Int64
	upstreamCalls, upstream429, rejections, retries atomic.Int64
	queueWaitNanos                                  atomic.Int64
	pagesUnrewritten                                atomic.Int64
}

// count adds one answer with outcome o to its counter.
func (c *counters) count(o outcome) {
	switch o {
	case outcomeHit:
		c.hits.Add(1)
	case outcomeL2:
		c.l2Hits.Add(1)
	case outcomeStale:
		c.stale.Add(1)
	case outcomeMiss, outcomeRefresh:
		c.misses.Add(1)
	case outcomeCollapsed:
		c.collapsed.Add(1)
	}
}

// metrics are the proxy's Prometheus series. Counters the summary line
// also needs live in counters and are read at scrape time.
type metrics struct {
	requests  [][numOutcomes]prometheus.Counter // by route label and outcome
	upstream  *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	queueWait prometheus.Histogram
	l2        prometheus.Histogram
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
		l2: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "cacheproxy_l2_latency_seconds", Help: "Time of a lookup in L2, the fleet's tier in Redis (redis.url), hit or miss.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1},
		}),
		queueWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "cacheproxy_queue_wait_seconds", Help: "Time an upstream call waited for its account's turn.",
			Buckets: []float64{0, .001, .01, .05, .1, .25, .5, 1, 2, 5},
		}),
	}
	for u := range route.NumUpstreams {
		m.latency.WithLabelValues(route.Upstream(u).String()) // each upstream's series from the start, at 0
	}
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cacheproxy_requests_total", Help: "Client requests by route and cache outcome.",
	}, []string{"route", "cache"})
	// A route cached on request that is off counts as its upstream's
	// other requests: a series of its own only once it is cached.
	m.requests = make([][numOutcomes]prometheus.Counter, len(route.Labels()))
	named := route.Named()
	for i, r := range route.Labels() {
		if i < len(named) && named[i].OnRequest && p.ttls[i] == 0 {
			continue
		}
		for j, o := range outcomeNames {
			m.requests[i][j] = requests.WithLabelValues(r, o)
		}
	}
	for i := range named {
		if m.requests[i][0] == nil {
			m.requests[i] = m.requests[route.OtherID(named[i].Upstream)]
		}
	}
	counter := func(name, help string, v func() int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(v()) })
	}
	gauge := func(name, help string, v func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, v)
	}
	reg.MustRegister(requests, m.upstream, m.latency, m.queueWait, m.l2,
		counter("cacheproxy_coalesced_requests_total", "Reads answered by another request's upstream call.", p.c.collapsed.Load),
		counter("cacheproxy_rejections_total", "Requests refused because the account's budget was spent (429).", p.c.rejections.Load),
		counter("cacheproxy_retries_total", "Retries of upstream 429s.", p.c.retries.Load),
		counter("cacheproxy_upstream_429_total", "Upstream 429 answers.", p.c.upstream429.Load),
		counter("cacheproxy_budget_reports_ignored_total", "Answers whose Twilio-Concurrent-Requests reported more calls in flight than an account can have (ignored: docs/budget.md).", func() int64 {
			if r, ok := p.budget.(interface{ IgnoredReports() int64 }); ok {
				return r.IgnoredReports()
			}
			return 0
		}),
		counter("cacheproxy_stale_total", "Reads answered with a stale entry.", p.c.stale.Load),
		counter("cacheproxy_l2_hits_total", "Reads answered from L2, the fleet's tier in Redis (redis.url).", p.c.l2Hits.Load),
		counter("cacheproxy_fleet_claims_won_total", "Cold keys this replica fetched for the fleet (it won the key's claim).", func() int64 { return p.load.Stats().ClaimsWon }),
		counter("cacheproxy_fleet_claims_waited_total", "Cold keys this replica waited for another replica to fetch.", func() int64 { return p.load.Stats().ClaimsWaited }),
		counter("cacheproxy_list_pages_unrewritten_total", "List answers to a client that replaced its base URL, too large to buffer: their page URLs point at Twilio.", p.c.pagesUnrewritten.Load),
		counter("cacheproxy_l2_errors_total", "Calls to L2 that failed or timed out (each a miss, never a client error).", func() int64 { return p.load.Stats().TierErrors }),
		gauge("cacheproxy_cache_entries", "Entries in the cache.", func() float64 { return float64(p.store.Stats().Entries) }),
		gauge("cacheproxy_cache_bytes", "Bytes held by the cache (body + headers + key).", func() float64 { return float64(p.store.Stats().Bytes) }),
		counter("cacheproxy_cache_evictions_total", "Entries evicted to make room within cache.max_bytes (not expiries, replacements or invalidations).", func() int64 { return int64(p.store.Stats().Evictions) }),
		counter("cacheproxy_cache_expiries_total", "Entries removed because their time in memory ended.", func() int64 { return int64(p.store.Stats().Expiries) }),
		counter("cacheproxy_cache_rejections_total", "Entries the cache's admission policy refused to store.", func() int64 { return int64(p.store.Stats().Rejections) }),
		budgetCollector{p.budget, p.accounts},
	)
	return m
}

// budgetCollector reports each account's budget at scrape time, labelled
// by account SID (an API key's SID until its account is known; "none" for
// requests without credentials), never by credential: only accounts the
// upstream accepted a credential of, at most max of them; the others
// (made-up SIDs cost nothing to send) summed as "other".
type budgetCollector struct {
	b   Budget
	max int
}

var budgetDescs = [...]*prometheus.Desc{
	prometheus.NewDesc("cacheproxy_budget_concurrency_cap", "Upstream calls the account may have in flight now (adaptive, at most ratelimit.max_concurrent).", []string{"account"}, nil),
	prometheus.NewDesc("cacheproxy_budget_in_flight", "The account's upstream calls in flight.", []string{"account"}, nil),
	prometheus.NewDesc("cacheproxy_budget_queued", "The account's requests waiting for a turn.", []string{"account"}, nil),
	prometheus.NewDesc("cacheproxy_budget_rate_limit", "Upstream calls the account may start per second (0: no rate limit).", []string{"account"}, nil),
	prometheus.NewDesc("cacheproxy_budget_learned_keys", "API keys known to count against the account.", []string{"account"}, nil),
	prometheus.NewDesc("cacheproxy_budget_account_limit", "The account's concurrency limit as a 429's Twilio-Concurrent-Requests told it (0: not known).", []string{"account"}, nil),
	prometheus.NewDesc("cacheproxy_budget_others_in_flight", "The account's calls in flight from its other clients, as Twilio-Concurrent-Requests last reported them (0: none or not known).", []string{"account"}, nil),
	prometheus.NewDesc("cacheproxy_budget_taking", "The account's calls granted a turn and taking their place in the fleet's slots.", []string{"account"}, nil),
}

func (c budgetCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range budgetDescs {
		ch <- d
	}
}

func (c budgetCollector) Collect(ch chan<- prometheus.Metric) {
	for _, st := range bounded(c.b.Accounts(), c.max) {
		acct := budgetLabel(st.Account)
		for i, v := range [...]int{st.Cap, st.InFlight, st.Queued, st.Rate, st.Keys, st.Limit, st.Others, st.Taking} {
			ch <- prometheus.MustNewConstMetric(budgetDescs[i], prometheus.GaugeValue, float64(v), acct)
		}
	}
}

// bounded is states with at most max verified accounts named (the first
// by SID), "none" kept, and every other summed into one "other".
func bounded(states []ratelimit.State, max int) []ratelimit.State {
	out := make([]ratelimit.State, 0, min(len(states), max+2))
	other := ratelimit.State{Account: "other"}
	named, others := 0, 0
	for _, st := range states {
		if st.Account == "" || st.Verified && named < max {
			named += b2i(st.Account != "")
			out = append(out, st)
			continue
		}
		others++
		other.Cap, other.InFlight, other.Queued, other.Rate, other.Keys = other.Cap+st.Cap, other.InFlight+st.InFlight,
			other.Queued+st.Queued, other.Rate+st.Rate, other.Keys+st.Keys
		other.Limit, other.Others, other.Taking = other.Limit+st.Limit, other.Others+st.Others, other.Taking+st.Taking
	}
	if others > 0 {
		out = append(out, other)
	}
	return out
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func budgetLabel(account string) string {
	if account == "" {
		return "none"
	}
	return account
}

// maxSummaryBudgets bounds the accounts listed in a summary line.
const maxSummaryBudgets = 20

// budgetStates is the summary line's list of account budgets.
type budgetStates []ratelimit.State

func (b budgetStates) MarshalZerologArray(a *zerolog.Array) {
	for _, st := range b {
		a.Dict(zerolog.Dict().Str("account", budgetLabel(st.Account)).Int("cap", st.Cap).Int("in_flight", st.InFlight).
			Int("queued", st.Queued).Int("rate", st.Rate).Int("keys", st.Keys).Int("limit", st.Limit).Int("others", st.Others))
	}
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

// Summary is the totals since the process started.
type Summary struct {
	Hits, Misses, Collapsed, Stale, Passthrough     int64
	UpstreamCalls, Upstream429, Rejections, Retries int64
	L2Hits, L2Errors                                int64 // L2 hits, failed L2 calls
	ClaimsWon, ClaimsWaited                         int64 // cold keys fetched for the fleet, waited for
	QueueWait                                       time.Duration
	Cache                                           cache.Stats
}

// Summary reports the proxy's totals (it walks the cache: not for the
// request path).
func (p *Proxy) Summary() Summary {
	ls := p.load.Stats()
	return Summary{
		Hits: p.c.hits.Load(), Misses: p.c.misses.Load(), Collapsed: p.c.collapsed.Load(),
		Stale: p.c.stale.Load(), Passthrough: p.c.passthrough.Load(),
		UpstreamCalls: p.c.upstreamCalls.Load(), Upstream429: p.c.upstream429.Load(),
		Rejections: p.c.rejections.Load(), Retries: p.c.retries.Load(),
		L2Hits: p.c.l2Hits.Load(), L2Errors: ls.TierErrors,
		ClaimsWon: ls.ClaimsWon, ClaimsWaited: ls.ClaimsWaited,
		QueueWait: time.Duration(p.c.queueWaitNanos.Load()),
		Cache:     p.store.Stats(),
	}
}

// LogSummary writes the periodic summary line: what happened since prev
// (the previous call's result: every count of the line is of the interval,
// except fields named _total, which count since start), and the state now
// (entries, bytes, budgets and, with Redis, redis_up and replicas).
func (p *Proxy) LogSummary(prev Summary) Summary {
	s := p.Summary()
	budgets := p.budget.Accounts()
	shown := bounded(budgets, p.accounts)
	// The busiest accounts first.
	slices.SortStableFunc(budgets, func(a, b ratelimit.State) int { return (b.InFlight + b.Queued) - (a.InFlight + a.Queued) })
	hits := (s.Hits - prev.Hits) + (s.L2Hits - prev.L2Hits) // L1 and L2
	reads := hits + (s.Misses - prev.Misses) + (s.Collapsed - prev.Collapsed) + (s.Stale - prev.Stale)
	ratio := 0.0
	if reads > 0 {
		ratio = float64(hits) / float64(reads)
	}
	// Summaries carry 429s: they are info lines that no log.level filters.
	l := p.log.Level(zerolog.TraceLevel)
	ev := l.Info()
	if p.summary != nil {
		p.summary(ev)
	}
	ev.Str("time", p.stamp.format(p.clock.Now())).
		Float64("hit_ratio", ratio).
		Int64("hits", s.Hits-prev.Hits).Int64("misses", s.Misses-prev.Misses).
		Int64("collapsed", s.Collapsed-prev.Collapsed).Int64("stale", s.Stale-prev.Stale).
		Int64("passthrough", s.Passthrough-prev.Passthrough).
		Int64("upstream_calls", s.UpstreamCalls-prev.UpstreamCalls).
		Int64("upstream_429s", s.Upstream429-prev.Upstream429).
		Int64("rejections", s.Rejections-prev.Rejections).
		Int64("retries", s.Retries-prev.Retries).
		Int64("l2_hits", s.L2Hits-prev.L2Hits).Int64("l2_errors", s.L2Errors-prev.L2Errors).
		Int64("claims_won", s.ClaimsWon-prev.ClaimsWon).Int64("claims_waited", s.ClaimsWaited-prev.ClaimsWaited).
		Int64("queue_wait_us", (s.QueueWait-prev.QueueWait).Microseconds()).
		Uint64("evictions", s.Cache.Evictions-prev.Cache.Evictions).Uint64("expiries", s.Cache.Expiries-prev.Cache.Expiries).
		Uint64("cache_rejections", s.Cache.Rejections-prev.Cache.Rejections).
		Int64("entries", s.Cache.Entries).Int64("bytes", s.Cache.Bytes).
		Int("budgets_total", len(budgets)).Array("budgets", budgetStates(shown[:min(len(shown), maxSummaryBudgets)])).
		Msg("summary")
	return s
}
