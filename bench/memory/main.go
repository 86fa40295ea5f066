// Command memory measures cacheproxy's resident memory after it has read
// 100,000 distinct participants through a fake upstream on loopback, against
// cache.max_bytes. It builds and runs the real binary.
//
//	go run ./bench/memory [-entries 100000] [-max-bytes 64MiB]
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/twiliofake"
)

const (
	account = "AC00000000000000000000000000000001"
	token   = "benchtoken"
)

func main() {
	entries := flag.Int("entries", 100_000, "distinct participants to read")
	maxBytes := flag.String("max-bytes", "64MiB", "cache.max_bytes")
	flag.Parse()
	if err := run(*entries, *maxBytes); err != nil {
		fmt.Fprintln(os.Stderr, "memory:", err)
		os.Exit(1)
	}
}

func run(entries int, maxBytes string) error {
	dir, err := os.MkdirTemp("", "cacheproxy-mem")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "cacheproxy")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/cacheproxy").CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}

	perAPI := (entries + 2) / 3
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	up := &http.Server{Handler: twiliofake.Seeded(account, token, perAPI), ReadHeaderTimeout: 10 * time.Second}
	go up.Serve(ln)
	defer up.Close()

	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(),
		"CACHEPROXY_LISTEN=127.0.0.1:0", "CACHEPROXY_ADMIN_LISTEN=127.0.0.1:0",
		"CACHEPROXY_UPSTREAMS_CONVERSATIONS_URL=http://"+ln.Addr().String(),
		"CACHEPROXY_UPSTREAMS_PROXY_URL=http://"+ln.Addr().String(),
		"CACHEPROXY_CACHE_TTL=1h", "CACHEPROXY_CACHE_MAX_BYTES="+maxBytes,
		"CACHEPROXY_RATELIMIT_REQUESTS_PER_SECOND=1000000", "CACHEPROXY_RATELIMIT_MAX_CONCURRENT=100000")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	defer cmd.Process.Kill()
	var addr, admin string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["listen"] != nil {
			addr, admin = m["listen"].(string), m["admin_listen"].(string)
			break
		}
	}
	go io.Copy(io.Discard, stdout)
	if addr == "" {
		return fmt.Errorf("no start line")
	}
	baseRSS := rss(cmd.Process.Pid)

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
				req.SetBasicAuth(account, token)
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
	after := rss(cmd.Process.Pid)
	fmt.Printf("reads: %d distinct participants in %s (%d failed)\n", len(paths), elapsed.Round(time.Millisecond), failed.Load())
	fmt.Printf("cache.max_bytes: %s; cache holds %s entries, %s bytes\n", maxBytes, metrics["cacheproxy_cache_entries"], metrics["cacheproxy_cache_bytes"])
	fmt.Printf("resident memory: %s at start, %s after (VmHWM %s); Go heap in use %s bytes\n",
		baseRSS["VmRSS"], after["VmRSS"], after["VmHWM"], metrics["go_memstats_heap_inuse_bytes"])
	return nil
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
