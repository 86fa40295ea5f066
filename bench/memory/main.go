// Command memory measures cacheproxy's resident memory after it has read
// 100,000 distinct participants through a fake upstream on loopback, against
// cache.max_bytes. It builds and runs the real binary.
//
//	go run ./bench/memory [-entries 100000] [-max-bytes 64MiB]
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/bench/internal/run"
	"cacheproxy/internal/twiliofake"
)

func main() {
	entries := flag.Int("entries", 100_000, "distinct participants to read")
	maxBytes := flag.String("max-bytes", "64MiB", "cache.max_bytes")
	flag.Parse()
	if err := measure(*entries, *maxBytes); err != nil {
		fmt.Fprintln(os.Stderr, "memory:", err)
		os.Exit(1)
	}
}

func measure(entries int, maxBytes string) error {
	perAPI := (entries + 2) / 3
	upURL, stopUp, err := run.Serve(twiliofake.Seeded(run.Account, run.Token, perAPI))
	if err != nil {
		return err
	}
	defer stopUp()

	p, err := run.Start(
		"CACHEPROXY_UPSTREAMS_CONVERSATIONS_URL="+upURL, "CACHEPROXY_UPSTREAMS_PROXY_URL="+upURL,
		"CACHEPROXY_CACHE_TTL=1h", "CACHEPROXY_CACHE_MAX_BYTES="+maxBytes,
		"CACHEPROXY_RATELIMIT_REQUESTS_PER_SECOND=0", "CACHEPROXY_RATELIMIT_MAX_CONCURRENT=100000")
	if err != nil {
		return err
	}
	defer p.Stop()
	addr, admin := p.Addr, p.Admin
	baseRSS := rss(p.Pid())

	paths := twiliofake.SeededPaths(perAPI)[:entries]
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 30 * time.Second}
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(len(paths)) {
					return
				}
				req, _ := http.NewRequest("GET", "http://"+addr+paths[i], nil)
				req.SetBasicAuth(run.Account, run.Token)
				resp, err := client.Do(req)
				if err != nil {
					failed.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	metrics := scrape("http://" + admin + "/metrics")
	after := rss(p.Pid())
	fmt.Printf("reads: %d distinct participants in %s (%d failed)\n", len(paths), elapsed.Round(time.Millisecond), failed.Load())
	fmt.Printf("cache.max_bytes: %s; cache holds %s entries, %s bytes\n", maxBytes, metrics["cacheproxy_cache_entries"], metrics["cacheproxy_cache_bytes"])
	fmt.Printf("resident memory: %s at start, %s after (VmHWM %s); Go heap in use %s bytes\n",
		baseRSS["VmRSS"], after["VmRSS"], after["VmHWM"], metrics["go_memstats_heap_inuse_bytes"])
	fmt.Printf("cacheproxy: %s s of CPU, %s GC cycles, %s bytes allocated\n",
		metrics["process_cpu_seconds_total"], metrics["go_gc_duration_seconds_count"], metrics["go_memstats_alloc_bytes_total"])
	// Where resident memory goes: live objects and garbage (heap_alloc),
	// the rest of the spans in use (heap_inuse - heap_alloc: fragmentation),
	// free spans not yet returned (heap_idle - heap_released).
	fmt.Printf("Go heap: %s alloc, %s in use, %s idle, %s released; GC metadata %s, spans %s, stacks %s\n",
		metrics["go_memstats_heap_alloc_bytes"], metrics["go_memstats_heap_inuse_bytes"], metrics["go_memstats_heap_idle_bytes"],
		metrics["go_memstats_heap_released_bytes"], metrics["go_memstats_gc_sys_bytes"], metrics["go_memstats_mspan_sys_bytes"], metrics["go_memstats_stack_sys_bytes"])
	var hwmKB int64
	fmt.Sscan(strings.TrimSuffix(after["VmHWM"], " kB"), &hwmKB)
	limit := parseSize(maxBytes) + 32<<20
	fmt.Printf("RESULT\tmemory: peak resident after %d distinct reads\t%d MiB\t<= max_bytes + 32 MiB = %d MiB\t%v\n",
		len(paths), hwmKB/1024, limit>>20, hwmKB*1024 <= limit)
	var n, accounted float64
	var baseKB, afterKB int64
	fmt.Sscan(metrics["cacheproxy_cache_entries"], &n)
	fmt.Sscan(metrics["cacheproxy_cache_bytes"], &accounted)
	fmt.Sscan(strings.TrimSuffix(baseRSS["VmRSS"], " kB"), &baseKB)
	fmt.Sscan(strings.TrimSuffix(after["VmRSS"], " kB"), &afterKB)
	if n > 0 {
		fmt.Printf("RESULT\tmemory: entries in %s\t%.0f\t>= 40000 in 64MiB\t%v\n", maxBytes, n, n >= 40000)
		perResident := float64(afterKB-baseKB) * 1024 / n
		fmt.Printf("RESULT\tmemory: bytes per entry, resident growth / accounted (Entry.Cost)\t%.0f / %.0f\t<= 1700 resident\t%v\n", perResident, accounted/n, perResident <= 1700)
		off := (accounted/n - perResident) / perResident
		fmt.Printf("RESULT\tmemory: Entry.Cost against resident growth per entry\t%+.1f%%\twithin 15%%\t%v\n", 100*off, off >= -0.15 && off <= 0.15)
	}
	return nil
}

func parseSize(s string) int64 {
	var n int64
	var unit string
	fmt.Sscanf(s, "%d%s", &n, &unit)
	switch unit {
	case "KiB":
		return n << 10
	case "MiB":
		return n << 20
	case "GiB":
		return n << 30
	}
	return n
}

func rss(pid int) map[string]string {
	out := map[string]string{}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return out
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && (k == "VmRSS" || k == "VmHWM") {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

func scrape(url string) map[string]string {
	out := map[string]string{}
	resp, err := http.Get(url)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 2 && !strings.HasPrefix(f[0], "#") {
			out[f[0]] = f[1]
		}
	}
	return out
}
