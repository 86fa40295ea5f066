// Command stampede measures coalescing: N concurrent cold reads of one
// participant through the real cacheproxy, the upstream answering in 100 ms.
// It reports the upstream calls (target 1) and the waiters' p50/p99 (target
// p99 <= upstream latency + 20 ms; nginx's cache lock polls every 500 ms).
//
//	go run ./bench/stampede [-n 500] [-latency 100ms]
package main

import (
	"bufio"
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
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

	// Each reader has a connection of its own, opened (and used once, for
	// an unrouted path the proxy answers itself) before the stampede, and
	// sends a prepared request and parses the answer on its own goroutine:
	// a load generator as light as wrk's, so the figures are the proxy's
	// wait, not TCP set-up or the generator's scheduling.
	auth := base64.StdEncoding.EncodeToString([]byte(run.Account + ":" + run.Token))
	request := func(path string) []byte {
		return []byte("GET " + path + " HTTP/1.1\r\nHost: " + p.Addr + "\r\nAuthorization: Basic " + auth + "\r\n\r\n")
	}
	conns := make([]*conn, n)
	for i := range conns {
		c, err := dial(p.Addr)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, status, err := c.roundTrip(request("/warm-up")); err != nil || status != 404 {
			return fmt.Errorf("warm-up: %d %v", status, err)
		}
		conns[i] = c
	}
	// A running sidecar keeps warm upstream connections: read another
	// participant first so the stampede's fetch does not pay for a dial.
	paths := twiliofake.SeededPaths(1)
	if _, status, err := conns[0].roundTrip(request(paths[1])); err != nil || status != 200 {
		return fmt.Errorf("warm-up read: %d %v", status, err)
	}
	req := request(paths[0])
	before, err := up.Calls()
	if err != nil {
		return err
	}
	start := make(chan struct{})
	lat := make([]time.Duration, n)
	var failed atomic.Int64
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			d, status, err := c.roundTrip(req)
			lat[i] = d
			if err != nil || status != 200 {
				failed.Add(1)
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
		n, latency, calls, failed.Load(), p50.Round(time.Millisecond/10), p99.Round(time.Millisecond/10), lat[n-1].Round(time.Millisecond/10))
	fmt.Printf("RESULT\tstampede: upstream calls for %d cold reads\t%d\t1\t%v\n", n, calls, calls == 1)
	fmt.Printf("RESULT\tstampede: waiters p50 / p99\t%s / %s\tp99 <= %s\t%v\n", p50.Round(time.Millisecond/10), p99.Round(time.Millisecond/10), latency+20*time.Millisecond, p99 <= latency+20*time.Millisecond)
	return nil
}

// conn is one client connection with its reader.
type conn struct {
	net.Conn
	br *bufio.Reader
}

func dial(addr string) (*conn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return &conn{Conn: c, br: bufio.NewReader(c)}, nil
}

// roundTrip writes a prepared request and reads the whole response,
// timing both.
func (c *conn) roundTrip(req []byte) (time.Duration, int, error) {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	if _, err := c.Write(req); err != nil {
		return 0, 0, err
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return 0, 0, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return time.Since(start), resp.StatusCode, err
}
