package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"text/tabwriter"
	"time"

	"cacheproxy/bench/internal/run"
	"cacheproxy/internal/config"
	"cacheproxy/internal/proxy"
	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/twiliofake"
	"cacheproxy/internal/wire"
)

// Twilio's concurrency limit in these scenarios, and its latency.
const (
	twilioLimit   = 10
	twilioLatency = 100 * time.Millisecond
	burstReads    = 300
)

// limitedProxy is cacheproxy in front of a fake Twilio that allows
// twilioLimit requests in flight per account.
type limitedProxy struct {
	url  string
	fake *twiliofake.Fake
	lim  *ratelimit.Limiter
	cuts []string
	mu   sync.Mutex
	stop func()
}

// startLimited starts the fake and the proxy; maxConcurrent 0 is the
// unprotected proxy (no cap, no retries).
func startLimited(maxConcurrent int) (*limitedProxy, error) {
	return startLimitedQueue(maxConcurrent, false)
}

// oneQueue is a budget whose calls all wait as client reads: the budget
// before writes went first (a write queued behind the reads of its
// credential).
type oneQueue struct{ *ratelimit.Limiter }

func (b oneQueue) Acquire(ctx context.Context, user, credential string) (ratelimit.Turn, error) {
	return b.Limiter.Acquire(ratelimit.WithPriority(ctx, ratelimit.Read), user, credential)
}

// startLimitedQueue is startLimited, with one queue for every call when
// one is set (oneQueue).
func startLimitedQueue(maxConcurrent int, one bool) (*limitedProxy, error) {
	return startLimitedWait(maxConcurrent, one, 30*time.Second)
}

// startLimitedWait is startLimitedQueue with ratelimit.max_wait maxWait.
func startLimitedWait(maxConcurrent int, one bool, maxWait time.Duration) (*limitedProxy, error) {
	fake := twiliofake.Seeded(run.Account, run.Token, burstReads)
	fake.Latency, fake.MaxInFlight = twilioLatency, twilioLimit
	upURL, stopUp, err := run.Serve(fake)
	if err != nil {
		return nil, err
	}
	cfg := config.Default()
	cfg.Upstreams.Conversations.URL, cfg.Upstreams.Proxy.URL = upURL, upURL
	cfg.RateLimit.MaxWait = config.Duration(maxWait)
	cfg.RateLimit.MaxConcurrent, cfg.RateLimit.MaxRetries = maxConcurrent, 10
	if maxConcurrent == 0 {
		cfg.RateLimit.MaxConcurrent, cfg.RateLimit.MaxRetries = 100_000, 0
		cfg.Cache.StaleIfError = 0
	}
	lp := &limitedProxy{fake: fake}
	d := wire.Deps{OnBudgetEvent: func(e ratelimit.Event) {
		if e.Kind == ratelimit.CapCut {
			lp.mu.Lock()
			lp.cuts = append(lp.cuts, fmt.Sprintf("%d→%d", e.From, e.To))
			lp.mu.Unlock()
		}
	}}
	if one {
		d.WrapBudget = func(l *ratelimit.Limiter) proxy.Budget { return oneQueue{l} }
	}
	g, err := wire.Build(cfg, d)
	if err != nil {
		stopUp()
		return nil, err
	}
	lp.lim = g.Budget
	p := g.Proxy
	pURL, stopP, err := run.Serve(p)
	if err != nil {
		g.Close()
		stopUp()
		return nil, err
	}
	lp.url, lp.stop = pURL, func() { stopP(); g.Close(); stopUp() }
	return lp, nil
}

var client = &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1024, MaxConnsPerHost: 0}}

func get(url, user, pass string) (int, time.Duration) {
	req, _ := http.NewRequestWithContext(context.Background(), "GET", url, nil)
	req.SetBasicAuth(user, pass)
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, time.Since(start)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, time.Since(start)
}

// concurrency runs the concurrency and wrong-token scenarios, prints their
// table and returns RESULT lines.
func concurrency() []string {
	var results []string
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "300 cold reads at once\tclient 200\tclient 429\tupstream calls\tupstream 429\t429 share\tpeak in flight\ttook\tcap cuts\t")
	paths := twiliofake.SeededPaths(burstReads / 3)
	for _, mc := range []int{twilioLimit, 25, 0} {
		lp, err := startLimited(mc)
		if err != nil {
			fmt.Fprintln(os.Stderr, "limits:", err)
			os.Exit(1)
		}
		statuses := map[int]int{}
		var mu sync.Mutex
		var wg sync.WaitGroup
		start := time.Now()
		for _, path := range paths {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, _ := get(lp.url+path, run.Account, run.Token)
				mu.Lock()
				statuses[s]++
				mu.Unlock()
			}()
		}
		wg.Wait()
		took := time.Since(start)
		lp.stop()
		calls, tooMany := lp.fake.Total(), lp.fake.TooMany()
		share := 100 * float64(tooMany) / float64(calls)
		name, cuts := fmt.Sprintf("max_concurrent %d", mc), fmt.Sprint(lp.cuts)
		if mc == 0 {
			name, cuts = "unpaced", "-"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%.1f%%\t%d\t%.2f s\t%s\t\n", name, statuses[200], statuses[429], calls, tooMany, share,
			lp.fake.Peak(run.Account), took.Seconds(), cuts)
		switch mc {
		case twilioLimit:
			results = append(results,
				fmt.Sprintf("RESULT\tlimits C=10, max_concurrent 10: upstream 429s / peak in flight\t%d / %d\t0 / <= 10\t%v", tooMany, lp.fake.Peak(run.Account), tooMany == 0 && lp.fake.Peak(run.Account) <= 10),
				fmt.Sprintf("RESULT\tlimits C=10, max_concurrent 10: 300 reads took\t%.2f s\t<= 3.6 s\t%v", took.Seconds(), took <= 3600*time.Millisecond))
		case 25:
			results = append(results,
				fmt.Sprintf("RESULT\tlimits C=10, max_concurrent 25: client 429s / upstream 429 share\t%d / %.1f%%\t0 / < 5%%\t%v", statuses[429], share, statuses[429] == 0 && share < 5))
		default:
			results = append(results, fmt.Sprintf("RESULT\tlimits C=10, unpaced: client 429s (for comparison)\t%d\t-\t-", statuses[429]))
		}
	}
	tw.Flush()
	fmt.Printf("(Twilio fake: 429 above %d in flight per account, %s per request)\n\n", twilioLimit, twilioLatency)
	results = append(results, others()...)
	return append(results, wrongToken(), distinctTokens(), writeDuringBacklog())
}

// wrongToken floods the account with a wrong token and times the right
// token's request sent in the middle of the flood.
func wrongToken() string {
	lp, err := startLimited(twilioLimit)
	if err != nil {
		fmt.Fprintln(os.Stderr, "limits:", err)
		os.Exit(1)
	}
	defer lp.stop()
	path := lp.url + twiliofake.SeededPaths(1)[0]
	const flood, atOnce = 600, 200
	sem := make(chan struct{}, atOnce)
	var wg sync.WaitGroup
	var mu sync.Mutex
	statuses := map[int]int{}
	var right int
	var rightTook time.Duration
	for i := range flood {
		if i == flood/4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				right, rightTook = get(path, run.Account, run.Token)
			}()
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			s, _ := get(lp.url+"/v1/Conversations", run.Account, "wrongtokenxxxxxxxxxxxxxxxxxxxxxx")
			mu.Lock()
			statuses[s]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	bound := twilioLatency + 200*time.Millisecond
	fmt.Printf("wrong token: %d requests (%d at once): %v; upstream calls %d; the right token's read: %d in %.0f ms (bound %s)\n",
		flood, atOnce, statuses, lp.fake.Total(), right, float64(rightTook.Microseconds())/1000, bound)
	return fmt.Sprintf("RESULT\tlimits wrong-token flood: the right token's read\t%d in %.0f ms\t200 within %s\t%v",
		right, float64(rightTook.Microseconds())/1000, bound, right == 200 && rightTook <= bound)
}

// distinctTokens floods a verified account with 6,000 requests, each with
// a wrong token of its own, 300 at once, and times the real user's 20 cold
// reads sent meanwhile (their credential was accepted before the flood).
func distinctTokens() string {
	lp, err := startLimited(twilioLimit)
	if err != nil {
		fmt.Fprintln(os.Stderr, "limits:", err)
		os.Exit(1)
	}
	defer lp.stop()
	paths := twiliofake.SeededPaths(21)
	if s, _ := get(lp.url+paths[0], run.Account, run.Token); s != 200 {
		fmt.Fprintln(os.Stderr, "limits: the real user's first read:", s)
		os.Exit(1)
	}
	const flood, atOnce = 6000, 300
	sem := make(chan struct{}, atOnce)
	var wg sync.WaitGroup
	var mu sync.Mutex
	statuses := map[int]int{}
	var took []time.Duration
	ok := 0
	for i := range flood {
		if i == flood/10 {
			for _, p := range paths[1:21] {
				wg.Add(1)
				go func() {
					defer wg.Done()
					s, d := get(lp.url+p, run.Account, run.Token)
					mu.Lock()
					took = append(took, d)
					if s == 200 {
						ok++
					}
					mu.Unlock()
				}()
			}
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			s, _ := get(lp.url+"/v1/Conversations", run.Account, fmt.Sprintf("made-up-token-%05d", i))
			mu.Lock()
			statuses[s]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	slices.Sort(took)
	p50 := took[len(took)/2]
	fmt.Printf("distinct wrong tokens: %d requests (%d at once): %v; upstream calls %d; the real user's 20 cold reads: %d of 20 got 200, p50 %.0f ms\n",
		flood, atOnce, statuses, lp.fake.Total(), ok, float64(p50.Microseconds())/1000)
	return fmt.Sprintf("RESULT\tlimits distinct wrong tokens (6,000, 300 at once): the real user's 20 cold reads\t%d of 20 200, p50 %.0f ms\t20, p50 <= 300 ms\t%v",
		ok, float64(p50.Microseconds())/1000, ok == 20 && p50 <= 300*time.Millisecond)
}
