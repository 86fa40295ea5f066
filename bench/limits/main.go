// Command limits runs the upstream-protection scenarios on loopback, each
// side by side with the same proxy unprotected:
//
//   - Rate: a fake Twilio that allows L requests per second per account (429
//     with Twilio's body above it) and answers in 50 ms, cacheproxy in front
//     of it, and an open-loop load of 300 requests/s for 10 s,
//     Zipf-distributed (s = 1.1) over 3,000 participants of the three APIs,
//     one account: paced with ratelimit.requests_per_second, and unpaced.
//
//   - Concurrency: a fake Twilio that answers 429 (20429) when the account
//     has more than 10 requests in flight and answers in 100 ms; 300
//     concurrent cold reads of distinct participants, with max_concurrent
//     at the limit (10), above it (25, learned from the 429s), and unpaced.
//
//   - Wrong token: on the concurrency-limited upstream, 600 requests with a
//     wrong token for the account (200 at once), and one with the right
//     token in the middle of them.
//
//   - A write during a backlog: a POST 50 ms into 300 cold reads, with
//     writes first and with one queue for every call (the budget before
//     writes went first), side by side (alone: -write).
//
//   - A write flood: 60 writers POSTing one participant in a loop while
//     300 cold reads of others run 20 at a time, beside the same reads
//     alone: the reads' 429s and p99, the writes' p99 (alone: -flood).
//
//     Each paced rate scenario runs -runs times (3); its row is the worst
//     run's.
//
//     go run ./bench/limits [-duration 10s] [-rate 300] [-runs 3] [-rate-only] [-write] [-flood]
package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"cacheproxy/bench/internal/run"
	"cacheproxy/internal/config"
	"cacheproxy/internal/twiliofake"
	"cacheproxy/internal/wire"
)

const perAPI = 1000

type scenario struct {
	name    string
	limit   int     // upstream L per second
	pace    float64 // proxy requests_per_second (0: unpaced)
	maxWait time.Duration
}

func main() {
	duration := flag.Duration("duration", 10*time.Second, "load duration")
	rate := flag.Int("rate", 300, "offered requests per second")
	latency := flag.Duration("latency", 50*time.Millisecond, "upstream latency")
	writeOnly := flag.Bool("write", false, "run only the write-during-a-backlog scenario (side by side)")
	floodOnly := flag.Bool("flood", false, "run only the reads-beside-a-write-flood scenario (side by side)")
	runs := flag.Int("runs", 3, "runs of each paced rate scenario: the worst run's figures are printed")
	rateOnly := flag.Bool("rate-only", false, "run only the rate scenarios")
	flag.Parse()
	if *writeOnly {
		fmt.Println(writeDuringBacklog())
		return
	}
	if *floodOnly {
		fmt.Println(strings.Join(writeFlood(), "\n"))
		return
	}
	scenarios := []scenario{
		{"L=100, paced 90/s", 100, 90, 2 * time.Second},
		{"L=100, unpaced", 100, 0, 2 * time.Second},
		{"L=50, paced 45/s, max_wait 1s", 50, 45, time.Second},
		{"L=50, unpaced", 50, 0, time.Second},
	}
	var results []string
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tclient 200\tclient 429\t429 %\tupstream calls\tupstream 429\tupstream ok/s\tp50 ms\tp90 ms\tp99 ms\tmax ms\twithin bound\t")
	for _, sc := range scenarios {
		bound := sc.maxWait + *latency + 200*time.Millisecond
		n := max(1, *runs)
		if sc.pace == 0 {
			n = 1 // for comparison only
		}
		r, within := worstOf(sc, n, *rate, *duration, *latency, bound)
		if sc.pace > 0 {
			results = append(results, fmt.Sprintf("RESULT\tlimits %s: upstream 429s\t%d\t0\t%v", sc.name, r.up429, r.up429 == 0))
			if sc.limit == 100 { // the budget suffices: nobody may get a 429
				p90 := run.Pct(r.latencies, 90)
				results = append(results, fmt.Sprintf("RESULT\tlimits %s: client 429s\t%d\t0\t%v", sc.name, r.tooMany, r.tooMany == 0),
					fmt.Sprintf("RESULT\tlimits %s: client p50 / p90 / p99\t%.0f / %.0f / %.0f ms\tp90 <= 400 ms\t%v", sc.name,
						run.Ms(run.Pct(r.latencies, 50)), run.Ms(p90), run.Ms(run.Pct(r.latencies, 99)), p90 <= 400*time.Millisecond))
			} else { // demand exceeds the budget: keep the upstream busy, answer in time
				results = append(results,
					fmt.Sprintf("RESULT\tlimits %s: upstream ok/s\t%.1f\t>= %.1f\t%v", sc.name, r.upOKPerSec, 0.9*sc.pace, r.upOKPerSec >= 0.9*sc.pace),
					fmt.Sprintf("RESULT\tlimits %s: answered within %s\t%d/%d\tall\t%v", sc.name, bound, within, len(r.latencies), within == len(r.latencies)))
			}
		} else {
			results = append(results, fmt.Sprintf("RESULT\tlimits %s: client 429s (for comparison)\t%.1f%%\t-\t-", sc.name, 100*float64(r.tooMany)/float64(len(r.latencies))))
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f\t%d\t%d\t%.1f\t%.0f\t%.0f\t%.0f\t%.0f\t%d/%d (≤ %s)\t\n", sc.name, r.ok, r.tooMany,
			100*float64(r.tooMany)/float64(len(r.latencies)), r.upCalls, r.up429, r.upOKPerSec,
			run.Ms(run.Pct(r.latencies, 50)), run.Ms(run.Pct(r.latencies, 90)), run.Ms(run.Pct(r.latencies, 99)), run.Ms(run.Pct(r.latencies, 100)), within, len(r.latencies), bound)
	}
	tw.Flush()
	fmt.Printf("(paced: the worst of %d runs; %d requests/s offered for %s, Zipf s=1.1 over %d participants, upstream latency %s, one account)\n\n",
		max(1, *runs), *rate, *duration, 3*perAPI, *latency)
	if !*rateOnly {
		results = append(results, concurrency()...)
		results = append(results, writeFlood()...)
	}
	for _, r := range results {
		fmt.Println(r)
	}
}

// worstOf runs sc n times and returns the worst run (the most upstream
// 429s, then client 429s, then answers past bound, then the longest
// answer) and how many of its answers came within bound: a promise holds
// run after run, so the table quotes the worst, not the best.
func worstOf(sc scenario, n, rate int, duration, latency, bound time.Duration) (*result, int) {
	var worst *result
	worstWithin := 0
	for range n {
		r, err := runScenario(sc, rate, duration, latency)
		if err != nil {
			fmt.Fprintln(os.Stderr, "limits:", err)
			os.Exit(1)
		}
		within := 0
		for _, l := range r.latencies {
			if l <= bound {
				within++
			}
		}
		late, worstLate := len(r.latencies)-within, 0
		if worst != nil {
			worstLate = len(worst.latencies) - worstWithin
		}
		if worst == nil || cmp.Or(cmp.Compare(r.up429, worst.up429), cmp.Compare(r.tooMany, worst.tooMany), cmp.Compare(late, worstLate),
			cmp.Compare(run.Pct(r.latencies, 100), run.Pct(worst.latencies, 100))) > 0 {
			worst, worstWithin = r, within
		}
	}
	return worst, worstWithin
}

type result struct {
	ok, tooMany, other int
	latencies          []time.Duration
	upCalls, up429     int64
	upOKPerSec         float64
}

// limited wraps the fake with a per-account sliding one-second window.
type limited struct {
	next  http.Handler
	limit int
	mu    sync.Mutex
	seen  map[string][]time.Time
	calls atomic.Int64
	tmr   atomic.Int64
	first atomic.Int64 // unix nanos of the first and last processed call
	last  atomic.Int64
	ok    atomic.Int64
}

func (l *limited) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	l.calls.Add(1)
	user, _, _ := r.BasicAuth()
	now := time.Now()
	l.mu.Lock()
	win := l.seen[user]
	for len(win) > 0 && now.Sub(win[0]) >= time.Second {
		win = win[1:]
	}
	if len(win) >= l.limit {
		l.seen[user] = win
		l.mu.Unlock()
		l.tmr.Add(1)
		twiliofake.Error(w, http.StatusTooManyRequests, 20429, "Too Many Requests")
		return
	}
	l.seen[user] = append(win, now)
	l.mu.Unlock()
	l.first.CompareAndSwap(0, now.UnixNano())
	l.next.ServeHTTP(w, r)
	l.last.Store(time.Now().UnixNano())
	l.ok.Add(1)
}

func runScenario(sc scenario, rate int, duration, latency time.Duration) (*result, error) {
	fake := twiliofake.Seeded(run.Account, run.Token, perAPI)
	fake.Latency = latency
	up := &limited{next: fake, limit: sc.limit, seen: map[string][]time.Time{}}
	upURL, stopUp, err := run.Serve(up)
	if err != nil {
		return nil, err
	}
	defer stopUp()

	cfg := config.Default()
	cfg.Upstreams.Conversations.URL, cfg.Upstreams.Proxy.URL = upURL, upURL
	cfg.RateLimit.MaxWait = config.Duration(sc.maxWait)
	cfg.RateLimit.RequestsPerSecond = int(sc.pace)
	if sc.pace == 0 { // a plain caching proxy: no pacing, no retries
		cfg.RateLimit.RequestsPerSecond, cfg.RateLimit.MaxConcurrent, cfg.RateLimit.MaxRetries = 0, 100_000, 0
		cfg.Cache.StaleIfError = 0
	}
	g, err := wire.Build(cfg, wire.Deps{})
	if err != nil {
		return nil, err
	}
	defer g.Close()
	p := g.Proxy
	pURL, stopP, err := run.Serve(p)
	if err != nil {
		return nil, err
	}
	defer stopP()

	paths := twiliofake.SeededPaths(perAPI)
	zipf := rand.NewZipf(rand.New(rand.NewPCG(1, 2)), 1.1, 1, uint64(len(paths)-1))
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1024}}

	n := int(duration.Seconds() * float64(rate))
	res := &result{latencies: make([]time.Duration, 0, n)}
	var mu sync.Mutex
	var wg sync.WaitGroup
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for i := 0; i < n; i++ {
		<-tick.C
		path := paths[zipf.Uint64()]
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(context.Background(), "GET", pURL+path, nil)
			req.SetBasicAuth(run.Account, run.Token)
			start := time.Now()
			resp, err := client.Do(req)
			status := 0
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				status = resp.StatusCode
			}
			d := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			res.latencies = append(res.latencies, d)
			switch status {
			case 200:
				res.ok++
			case 429:
				res.tooMany++
			default:
				res.other++
			}
		}()
	}
	wg.Wait()
	res.upCalls, res.up429 = up.calls.Load(), up.tmr.Load()
	if span := time.Duration(up.last.Load() - up.first.Load()); span > 0 {
		res.upOKPerSec = float64(up.ok.Load()) / span.Seconds()
	}
	return res, nil
}
