// Command stampede measures coalescing: N concurrent cold reads of one
// participant through the real cacheproxy, the upstream answering in 100 ms.
// It reports the upstream calls (target 1) and the waiters' p50/p99 (target
// p99 <= upstream latency + 20 ms; nginx's cache lock polls every 500 ms).
//
//	go run ./bench/stampede [-n 500] [-latency 100ms]
package main

import (
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	"cacheproxy/bench/internal/run"
	"cacheproxy/internal/twiliofake"
)

func main() {
	n := flag.Int("n", 500, "concurrent cold reads")
	latency := flag.Duration("latency", 100*time.Millisecond, "upstream latency")
	flag.Parse()
	if err := stampede(*n, *latency); err != nil {
		fmt.Fprintln(os.Stderr, "stampede:", err)
		os.Exit(1)
	}
}

func stampede(n int, latency time.Duration) error {
	// The upstream runs in a process of its own, as Twilio does: in this
	// one, its goroutines would queue behind the n clients'.
	up, err := run.StartUpstream(latency)
	if err != nil {
		return err
	}
	defer up.Stop()
	p, err := run.Start("CACHEPROXY_UPSTREAMS_CONVERSATIONS_URL="+up.URL, "CACHEPROXY_UPSTREAMS_PROXY_URL="+up.URL)
	if err != nil {
		return err
	}
	defer p.Stop()

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: n}}
	get := func(path string) (time.Duration, int, error) {
		req, _ := http.NewRequest("GET", "http://"+p.Addr+path, nil)
		req.SetBasicAuth(run.Account, run.Token)
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			return 0, 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return time.Since(start), resp.StatusCode, nil
	}
	// Open the n connections first (an unrouted path: answered by the
	// proxy itself), so the measurement is the wait, not TCP set-up.
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() { defer wg.Done(); get("/warm-up") }()
	}
	wg.Wait()

	// A running sidecar keeps warm upstream connections: read another
	// participant first so the stampede's fetch does not pay for a dial.
	paths := twiliofake.SeededPaths(1)
	if _, status, err := get(paths[1]); err != nil || status != 200 {
		return fmt.Errorf("warm-up read: %d %v", status, err)
	}
	path := paths[0]
	before, err := up.Calls()
	if err != nil {
		return err
	}
	start := make(chan struct{})
	lat := make([]time.Duration, n)
	var failed int
	var mu sync.Mutex
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			d, status, err := get(path)
			mu.Lock()
			defer mu.Unlock()
			lat[i] = d
			if err != nil || status != 200 {
				failed++
			}
		}()
	}
	close(start)
	wg.Wait()
	after, err := up.Calls()
	if err != nil {
		return err
	}
	calls := after - before
	slices.Sort(lat)
	p50, p99 := lat[n/2], lat[n*99/100]
	fmt.Printf("%d concurrent cold reads, upstream latency %s: %d upstream call(s), %d failed, p50 %s, p99 %s, max %s\n",
		n, latency, calls, failed, p50.Round(time.Millisecond/10), p99.Round(time.Millisecond/10), lat[n-1].Round(time.Millisecond/10))
	fmt.Printf("RESULT\tstampede: upstream calls for %d cold reads\t%d\t1\t%v\n", n, calls, calls == 1)
	fmt.Printf("RESULT\tstampede: waiters p50 / p99\t%s / %s\tp99 <= %s\t%v\n", p50.Round(time.Millisecond/10), p99.Round(time.Millisecond/10), latency+20*time.Millisecond, p99 <= latency+20*time.Millisecond)
	return nil
}
