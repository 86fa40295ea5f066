// Command fleet runs the fleet scenarios on loopback, each side by side in
// one run. First, three replicas sharing one redis-server (started here),
// and three independent sidecars (no Redis), each set in front of a fake
// Twilio that answers 429 (20429) above 10 requests in flight per account
// and answers in 50 ms. The load is the limits benchmark's: 300
// requests/s for 10 s, Zipf (s = 1.1) over 3,000 participants of the three
// APIs, one account, spread round-robin over the three replicas. Then an
// API key across replicas (keys.go), with the fleet's key book and with
// each replica learning keys by itself.
//
//	go run ./bench/fleet [-duration 10s] [-rate 300]
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"cacheproxy/bench/internal/run"
	"cacheproxy/internal/config"
	"cacheproxy/internal/twiliofake"
	"cacheproxy/internal/wire"
)

const (
	perAPI      = 1000
	twilioLimit = 10
)

type sample struct {
	status int
	cache  string
	took   time.Duration
}

type result struct {
	samples        []sample
	upCalls, up429 int64
	peak           int
}

func main() {
	duration := flag.Duration("duration", 10*time.Second, "load duration")
	rate := flag.Int("rate", 300, "offered requests per second")
	flag.Parse()
	redisURL, stopRedis, err := run.StartRedis()
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		os.Exit(1)
	}
	defer stopRedis()
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "replicas\tclient 200\tclient 429\tupstream calls\tupstream 429\tpeak in flight\thit ratio\tp50 ms\tp99 ms\tL1 hit p50/p99 ms\tL2 hit p50/p99 ms\t")
	var lines []string
	res := map[string]*result{}
	for _, name := range []string{"fleet (Redis)", "independent"} {
		url := ""
		if name == "fleet (Redis)" {
			url = redisURL
		}
		r, err := scenario(url, *rate, *duration)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fleet:", err)
			os.Exit(1)
		}
		res[name] = r
		var ok, tooMany, hits int
		var all, l1, l2 []time.Duration
		for _, s := range r.samples {
			all = append(all, s.took)
			switch {
			case s.status == 200:
				ok++
			case s.status == 429:
				tooMany++
			}
			switch {
			case strings.HasSuffix(s.cache, "detail=l2"):
				hits++
				l2 = append(l2, s.took)
			case strings.HasPrefix(s.cache, "cacheproxy; hit"):
				hits++
				l1 = append(l1, s.took)
			}
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%.3f\t%.2f\t%.2f\t%.2f / %.2f\t%.2f / %.2f\t\n", name, ok, tooMany, r.upCalls, r.up429, r.peak,
			float64(hits)/float64(len(r.samples)), run.Ms(run.Pct(all, 50)), run.Ms(run.Pct(all, 99)), run.Ms(run.Pct(l1, 50)), run.Ms(run.Pct(l1, 99)), run.Ms(run.Pct(l2, 50)), run.Ms(run.Pct(l2, 99)))
		if name == "fleet (Redis)" {
			lines = append(lines,
				fmt.Sprintf("RESULT\tfleet: upstream 429s\t%d\t0\t%v", r.up429, r.up429 == 0),
				fmt.Sprintf("RESULT\tfleet: L2 hit p99 over loopback\t%.2f ms\t<= 1 ms\t%v", run.Ms(run.Pct(l2, 99)), len(l2) > 0 && run.Pct(l2, 99) <= time.Millisecond))
		}
	}
	tw.Flush()
	f, ind := res["fleet (Redis)"], res["independent"]
	lines = append(lines, fmt.Sprintf("RESULT\tfleet: upstream calls, fleet / independent\t%d / %d = %.2f\t<= 0.5\t%v", f.upCalls, ind.upCalls,
		float64(f.upCalls)/float64(ind.upCalls), 2*f.upCalls <= ind.upCalls))
	fmt.Printf("(%d requests/s for %s over 3 replicas, Zipf s=1.1 over %d participants; Twilio fake: 50 ms, 429 above %d in flight per account)\n",
		*rate, *duration, 3*perAPI, twilioLimit)
	lines = append(lines, keys(redisURL)...)
	for _, l := range lines {
		fmt.Println(l)
	}
}

// scenario runs the load against three replicas, sharing Redis at
// redisURL (a key prefix of their own) or independent when it is "".
func scenario(redisURL string, rate int, duration time.Duration) (*result, error) {
	fake := twiliofake.Seeded(run.Account, run.Token, perAPI)
	fake.Latency, fake.MaxInFlight = 50*time.Millisecond, twilioLimit
	upURL, stopUp, err := run.Serve(fake)
	if err != nil {
		return nil, err
	}
	defer stopUp()
	urls, stop, err := replicas(upURL, redisURL, true)
	if err != nil {
		return nil, err
	}
	defer stop()
	paths := twiliofake.SeededPaths(perAPI)
	zipf := rand.NewZipf(rand.New(rand.NewPCG(1, 2)), 1.1, 1, uint64(len(paths)-1))
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1024}}
	n := int(duration.Seconds() * float64(rate))
	res := &result{samples: make([]sample, 0, n)}
	var mu sync.Mutex
	var wg sync.WaitGroup
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for i := range n {
		<-tick.C
		url := urls[i%len(urls)] + paths[zipf.Uint64()]
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(context.Background(), "GET", url, nil)
			req.SetBasicAuth(run.Account, run.Token)
			start := time.Now()
			s := sample{}
			if resp, err := client.Do(req); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				s.status, s.cache = resp.StatusCode, resp.Header.Get("Cache-Status")
			}
			s.took = time.Since(start)
			mu.Lock()
			res.samples = append(res.samples, s)
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.upCalls, res.up429, res.peak = fake.Total(), fake.TooMany(), fake.Peak(run.Account)
	return res, nil
}

// replicas starts three replicas in front of upURL (sharing Redis at
// redisURL under a key prefix of their own, with the key book when book
// is set) and returns their URLs; stop stops them.
func replicas(upURL, redisURL string, book bool) (urls []string, stop func(), err error) {
	prefix := "bench" + strconv.FormatInt(time.Now().UnixNano(), 36) + ":"
	var stops []func()
	stop = func() {
		for _, s := range stops {
			s()
		}
	}
	for range 3 {
		u, s, err := replica(upURL, redisURL, prefix, book)
		if err != nil {
			stop()
			return nil, nil, err
		}
		stops, urls = append(stops, s), append(urls, u)
	}
	return urls, stop, nil
}

// replica starts one cacheproxy in process with the defaults (max_concurrent
// at Twilio's limit of 10), sharing Redis when redisURL is set, and the
// fleet's key book with it when book is set (else it learns API keys'
// accounts by itself, as before the key book). A fleet replica is ready
// once it is trusted (/readyz), as a deployment waits for it.
func replica(upURL, redisURL, prefix string, book bool) (string, func(), error) {
	cfg := config.Default()
	cfg.Upstreams.Conversations.URL, cfg.Upstreams.Proxy.URL = upURL, upURL
	cfg.RateLimit.MaxConcurrent, cfg.RateLimit.MaxWait = twilioLimit, config.Duration(5*time.Second)
	cfg.Cache.KeySecret = "bench-fleet-secret"
	cfg.Redis.URL, cfg.Redis.KeyPrefix = redisURL, prefix
	g, err := wire.Build(cfg, wire.Deps{SoloKeys: !book})
	if err != nil {
		return "", nil, err
	}
	stops := []func(){g.Close}
	stop := func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	err = g.WaitTrusted(ctx)
	cancel()
	if err != nil {
		stop()
		return "", nil, err
	}
	p := g.Proxy
	u, stopP, err := run.Serve(p)
	if err != nil {
		stop()
		return "", nil, err
	}
	stops = append(stops, stopP)
	return u, stop, nil
}
