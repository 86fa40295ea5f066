package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"cacheproxy/bench/internal/run"
	"cacheproxy/internal/twiliofake"
)

// burst reads every path at once (suffix makes each read cold) and
// returns the statuses and how long it took.
func burst(lp *limitedProxy, paths []string, suffix string) (map[int]int, time.Duration) {
	statuses := map[int]int{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for _, path := range paths {
		wg.Go(func() {
			s, _ := get(lp.url+path+suffix, run.Account, run.Token)
			mu.Lock()
			statuses[s]++
			mu.Unlock()
		})
	}
	wg.Wait()
	return statuses, time.Since(start)
}

// others runs the "other clients on the account" scenario with and
// without Twilio's Twilio-Concurrent-Requests header, side by side: other
// clients hold 6 of the account's 10, 300 cold reads (max_concurrent 25);
// then the others leave and 300 more are read.
func others() []string {
	var results []string
	fmt.Println("other clients hold 6 of 10, then leave\tupstream 429s (share) while they hold\t300 reads after they left took\tcap after")
	paths := twiliofake.SeededPaths(burstReads / 3)
	for _, header := range []bool{false, true} {
		lp, err := startLimited(25)
		if err != nil {
			fmt.Fprintln(os.Stderr, "limits:", err)
			os.Exit(1)
		}
		lp.fake.ConcurrencyHeader = header
		lp.fake.SetOthers(run.Account, 6)
		burst(lp, paths, "")
		tooMany, calls := lp.fake.TooMany(), lp.fake.Total()
		lp.fake.SetOthers(run.Account, 0)
		_, took := burst(lp, paths, "?again=1")
		st := lp.lim.State(run.Account)
		lp.stop()
		name := "without the header (adaptive cap)"
		if header {
			name = "with Twilio-Concurrent-Requests"
		}
		share := 100 * float64(tooMany) / float64(calls)
		fmt.Printf("%s\t%d of %d (%.1f%%)\t%.2f s\t%d\n", name, tooMany, calls, share, took.Seconds(), st.Cap)
		if header {
			results = append(results,
				fmt.Sprintf("RESULT\tlimits others hold 6 of 10, with the header: upstream 429 share\t%.1f%%\t<= 1.5%%\t%v", share, share <= 1.5),
				fmt.Sprintf("RESULT\tlimits others left, with the header: 300 reads took\t%.2f s\t<= 3.8 s\t%v", took.Seconds(), took <= 3800*time.Millisecond))
		}
	}
	fmt.Println()
	return results
}

// writeDuringBacklog times a POST of a participant sent 50 ms into a
// backlog of 300 cold reads (max_concurrent 10), side by side: with writes
// first (today), and with one queue for every call (before).
func writeDuringBacklog() string {
	var out string
	for _, one := range []bool{false, true} {
		status, took := writeInBacklog(one)
		name := "writes first"
		if one {
			name = "one queue (before)"
		}
		fmt.Printf("a POST 50 ms into a backlog of 300 cold reads (max_concurrent 10), %s: %d in %.0f ms\n", name, status, run.Ms(took))
		if !one {
			out = fmt.Sprintf("RESULT\tlimits a write during a backlog of 300 reads: answered in\t%d in %.0f ms\t200 in <= 400 ms\t%v", status, run.Ms(took), status == 200 && took <= 400*time.Millisecond)
		}
	}
	fmt.Println()
	return out
}

// writeInBacklog is one run of writeDuringBacklog: the POST's status and time.
func writeInBacklog(one bool) (int, time.Duration) {
	lp, err := startLimitedQueue(twilioLimit, one)
	if err != nil {
		fmt.Fprintln(os.Stderr, "limits:", err)
		os.Exit(1)
	}
	defer lp.stop()
	paths := twiliofake.SeededPaths(burstReads / 3)
	done := make(chan struct{})
	go func() {
		burst(lp, paths, "")
		close(done)
	}()
	time.Sleep(50 * time.Millisecond)
	req, _ := http.NewRequest("POST", lp.url+paths[0], strings.NewReader("Attributes=%7B%7D"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(run.Account, run.Token)
	start := time.Now()
	resp, err := client.Do(req)
	took := time.Since(start)
	status := 0
	if err == nil {
		status = resp.StatusCode
		resp.Body.Close()
	}
	<-done
	return status, took
}

// writeFlood runs 60 writers POSTing one participant in a loop while 300
// cold reads of others run 20 at a time (max_concurrent 25, max_wait 2 s,
// Twilio allowing 10 in flight): the reads' 429s and p99, and the
// writes' p99, side by side with no writes.
func writeFlood() []string {
	var results []string
	fmt.Println("300 cold reads, 20 at a time (max_concurrent 25, max_wait 2 s)\tread 429s\tread p99\twrites answered\twrite p99")
	for _, flood := range []bool{false, true} {
		lp, err := startLimitedWait(25, false, 2*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, "limits:", err)
			os.Exit(1)
		}
		paths := twiliofake.SeededPaths(burstReads / 3)
		stop := make(chan struct{})
		var wmu sync.Mutex
		var writes []time.Duration
		var wg sync.WaitGroup
		if flood {
			for range 60 {
				wg.Go(func() {
					for {
						select {
						case <-stop:
							return
						default:
						}
						req, _ := http.NewRequest("POST", lp.url+paths[0], strings.NewReader("Attributes=%7B%7D"))
						req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
						req.SetBasicAuth(run.Account, run.Token)
						start := time.Now()
						if resp, err := client.Do(req); err == nil {
							_, _ = io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
						}
						wmu.Lock()
						writes = append(writes, time.Since(start))
						wmu.Unlock()
					}
				})
			}
			time.Sleep(500 * time.Millisecond) // the flood fills the cap first
		}
		var rmu sync.Mutex
		var reads []time.Duration
		tooMany := 0
		sem := make(chan struct{}, 20)
		var rg sync.WaitGroup
		for _, p := range paths[1:] {
			sem <- struct{}{}
			rg.Go(func() {
				defer func() { <-sem }()
				s, took := get(lp.url+p, run.Account, run.Token)
				rmu.Lock()
				reads = append(reads, took)
				if s == http.StatusTooManyRequests {
					tooMany++
				}
				rmu.Unlock()
			})
		}
		rg.Wait()
		close(stop)
		wg.Wait()
		lp.stop()
		name := "alone"
		wp99 := "-"
		if flood {
			name = "beside a flood of 60 writers"
			wp99 = fmt.Sprintf("%.0f ms", run.Ms(run.Pct(writes, 99)))
			results = append(results, fmt.Sprintf("RESULT\tlimits reads beside a write flood: client 429s, read p99\t%d, %.0f ms\t0\t%v", tooMany, run.Ms(run.Pct(reads, 99)), tooMany == 0))
		}
		fmt.Printf("%s\t%d of %d\t%.0f ms\t%d\t%s\n", name, tooMany, len(reads), run.Ms(run.Pct(reads, 99)), len(writes), wp99)
	}
	fmt.Println()
	return results
}
