package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"cacheproxy/bench/internal/run"
	"cacheproxy/internal/redistest"
	"cacheproxy/internal/twiliofake"
)

// keysResult is one run of the keys scenario.
type keysResult struct {
	upCalls, up429 int64
	notOK          int
	commands       int
}

// keysScenario is the fleet issue's burst: after one read with an API
// key through replica 1, 100 cold reads with the account's own
// credentials on replica 1 and 100 each with the key on replicas 2 and 3,
// all at once, against a fake Twilio that refuses more than 10 of the
// account's calls in flight (100 ms each). With book, the replicas share
// the fleet's key book (today); without, each learns the key's account by
// itself (the behaviour before). Redis's commands are counted with
// MONITOR (a script counts once) during the burst.
func keysScenario(redisURL string, book bool) (*keysResult, error) {
	key, secret := twiliofake.SID("SK", 11), "keysecretxxxxxxxxxxxxxxxxxxxxxxx"
	fake := twiliofake.Seeded(run.Account, run.Token, perAPI)
	fake.Latency, fake.MaxInFlight = 100*time.Millisecond, twilioLimit
	fake.Accounts[key], fake.KeyOwner = secret, map[string]string{key: run.Account}
	upURL, stopUp, err := run.Serve(fake)
	if err != nil {
		return nil, err
	}
	defer stopUp()
	urls, stop, err := replicas(upURL, redisURL, book)
	if err != nil {
		return nil, err
	}
	defer stop()
	paths := twiliofake.SeededPaths(perAPI)
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1024}}
	get := func(url, user, pass string) int {
		req, _ := http.NewRequestWithContext(context.Background(), "GET", url, nil)
		req.SetBasicAuth(user, pass)
		resp, err := client.Do(req)
		if err != nil {
			return 0
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if s := get(urls[0]+paths[300], key, secret); s != 200 {
		return nil, fmt.Errorf("the key's first read: %d", s)
	}
	time.Sleep(time.Second) // replica 1 stores the key's account off the answer's path
	mon := (&redistest.Server{Addr: strings.TrimPrefix(redisURL, "redis://")}).Monitor(benchT{})
	calls, tooMany := fake.Total(), fake.TooMany()
	res := &keysResult{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, u := range urls {
		user, pass := key, secret
		if i == 0 {
			user, pass = run.Account, run.Token
		}
		for _, p := range paths[i*100 : (i+1)*100] {
			wg.Go(func() {
				if get(u+p, user, pass) != 200 {
					mu.Lock()
					res.notOK++
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	time.Sleep(200 * time.Millisecond) // slots and claims go back off the answers' path
	res.commands, _ = mon.Stop()
	res.upCalls, res.up429 = fake.Total()-calls, fake.TooMany()-tooMany
	return res, nil
}

// benchT is the redistest.T of a benchmark: a failure ends the run.
type benchT struct{}

func (benchT) Helper()         {}
func (benchT) Cleanup(func())  {}
func (benchT) TempDir() string { d, _ := os.MkdirTemp("", "fleet"); return d }
func (benchT) Fatal(args ...any) {
	fmt.Fprintln(os.Stderr, append([]any{"fleet:"}, args...)...)
	os.Exit(1)
}
func (benchT) Fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "fleet: "+format+"\n", args...)
	os.Exit(1)
}

// keys runs the keys scenario with the key book and without, and prints
// them side by side; it returns the RESULT lines.
func keys(redisURL string) []string {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "API key across replicas\tclient non-200\tupstream calls\tupstream 429\tRedis commands\tper upstream call\t")
	var out []string
	for _, book := range []bool{true, false} {
		name := "fleet key book"
		if !book {
			name = "each replica alone"
		}
		r, err := keysScenario(redisURL, book)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fleet:", err)
			os.Exit(1)
		}
		per := float64(r.commands) / float64(max(r.upCalls, 1))
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%.1f\t\n", name, r.notOK, r.upCalls, r.up429, r.commands, per)
		if book {
			out = append(out, fmt.Sprintf("RESULT\tfleet: an API key across replicas, upstream 429s\t%d\t0\t%v", r.up429, r.up429 == 0),
				fmt.Sprintf("RESULT\tfleet: the same burst, Redis commands per upstream call\t%.1f\t<= 8\t%v", per, per <= 8))
		}
	}
	tw.Flush()
	fmt.Println("(after one read with an API key through replica 1: 100 cold reads with the account's credentials on replica 1 and 100 each with the key on replicas 2 and 3, at once; Twilio fake: 100 ms, 429 above 10 in flight)")
	return out
}
