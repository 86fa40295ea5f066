// Command mix replays an application's mix of reads against the fake
// Twilio (internal/twiliofake) through cacheproxy, twice side by side in
// one run: with the participant lists cached (the default) and with them
// turned off ([cache.routes] ttl 0s for the four lists and both forms of
// ParticipantConversations), as before they were cached.
//
// The app renders conversations: it picks one by Zipf (s = 1.1) over
// -convs conversations of -members participants each and fetches a
// participant (50%), lists the conversation's participants (30%) or lists
// the conversations of one of its participants (20%); every -write-every
// requests it updates a participant of the conversation instead. Open
// loop, -rate requests a second for -duration, upstream latency -latency,
// Twilio allowing -limit calls in flight per account (429 above).
//
//	go run ./bench/mix [-rate 300] [-duration 10s] [-convs 200] [-members 5] [-write-every 20] [-latency 50ms] [-limit 25]
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"cacheproxy/bench/internal/run"
	"cacheproxy/internal/config"
	"cacheproxy/internal/twiliofake"
	"cacheproxy/internal/wire"
)

type options struct {
	rate, convs, members, writeEvery, limit int
	duration, latency                       time.Duration
}

// result is one run's figures.
type result struct {
	upstream, up429, hits, reads int64
	latencies                    []time.Duration
	errors                       int
}

func main() {
	var o options
	flag.IntVar(&o.rate, "rate", 300, "requests per second offered")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "load duration")
	flag.IntVar(&o.convs, "convs", 200, "conversations")
	flag.IntVar(&o.members, "members", 5, "participants per conversation")
	flag.IntVar(&o.writeEvery, "write-every", 20, "one write every this many requests")
	flag.DurationVar(&o.latency, "latency", 50*time.Millisecond, "upstream latency")
	flag.IntVar(&o.limit, "limit", 25, "Twilio's calls in flight per account (429 above)")
	flag.Parse()
	off := config.Routes{}
	for _, name := range []string{"conversations.v1.participants", "conversations.v1.service_participants", "conversations.v2.participants",
		"proxy.v1.participants", "conversations.v1.participant_conversations", "conversations.v1.service_participant_conversations"} {
		off[name] = config.RouteCache{TTL: 0}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "lists\trequests\tupstream calls\tupstream 429\thit ratio\tclient p50 ms\tp99 ms\terrors\t")
	var rows []*result
	for _, c := range []struct {
		name   string
		routes config.Routes
	}{{"cached", nil}, {"not cached", off}} {
		r, err := mix(o, c.routes)
		if err != nil {
			fmt.Fprintln(os.Stderr, "mix:", err)
			os.Exit(1)
		}
		rows = append(rows, r)
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.2f\t%.0f\t%.0f\t%d\t\n", c.name, len(r.latencies), r.upstream, r.up429,
			float64(r.hits)/float64(max(1, r.reads)), run.Ms(run.Pct(r.latencies, 50)), run.Ms(run.Pct(r.latencies, 99)), r.errors)
	}
	tw.Flush()
	fmt.Printf("(%d requests/s for %s, Zipf s=1.1 over %d conversations of %d participants, a write every %d requests, upstream %s, Twilio limit %d in flight)\n",
		o.rate, o.duration, o.convs, o.members, o.writeEvery, o.latency, o.limit)
	fmt.Printf("RESULT\tmix: upstream calls, lists cached / not\t%d / %d\t%.2fx fewer\n", rows[0].upstream, rows[1].upstream,
		float64(rows[1].upstream)/float64(max(1, rows[0].upstream)))
	fmt.Printf("RESULT\tmix: client p99, lists cached / not\t%.0f / %.0f ms\n", run.Ms(run.Pct(rows[0].latencies, 99)), run.Ms(run.Pct(rows[1].latencies, 99)))
}

// mix runs the load once through a cacheproxy with routes.
func mix(o options, routes config.Routes) (*result, error) {
	fake := twiliofake.New(map[string]string{run.Account: run.Token})
	fake.Latency, fake.MaxInFlight = o.latency, o.limit
	for c := range o.convs {
		conv := twiliofake.SID("CH", c+1)
		fake.AddConversation(conv, "", "")
		for m := range o.members {
			// Identities repeat across conversations, as users are in many.
			fake.AddParticipant(conv, twiliofake.Participant{Sid: twiliofake.SID("MB", c*o.members+m),
				Identity: fmt.Sprintf("user%d", (c*o.members+m)%(o.convs*o.members/4+1)), Attributes: "{}"})
		}
	}
	upURL, stopUp, err := run.Serve(fake)
	if err != nil {
		return nil, err
	}
	defer stopUp()
	cfg := config.Default()
	cfg.Upstreams.Conversations.URL, cfg.Upstreams.Proxy.URL = upURL, upURL
	cfg.Cache.Routes = routes
	g, err := wire.Build(cfg, wire.Deps{})
	if err != nil {
		return nil, err
	}
	defer g.Close()
	pURL, stopP, err := run.Serve(g.Proxy)
	if err != nil {
		return nil, err
	}
	defer stopP()

	r := rand.New(rand.NewPCG(36, 1))
	zipf := rand.NewZipf(r, 1.1, 1, uint64(o.convs-1))
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1024}}
	n := int(o.duration.Seconds() * float64(o.rate))
	res := &result{latencies: make([]time.Duration, 0, n)}
	var mu sync.Mutex
	var wg sync.WaitGroup
	tick := time.NewTicker(time.Second / time.Duration(o.rate))
	defer tick.Stop()
	for i := range n {
		<-tick.C
		c := int(zipf.Uint64())
		conv := twiliofake.SID("CH", c+1)
		m := c*o.members + r.IntN(o.members)
		member := twiliofake.SID("MB", m)
		method, path, body := "GET", "", ""
		switch x := r.IntN(100); {
		case o.writeEvery > 0 && i%o.writeEvery == o.writeEvery-1:
			method, path, body = "POST", "/v1/Conversations/"+conv+"/Participants/"+member, url.Values{"Attributes": {fmt.Sprintf(`{"n":%d}`, i)}}.Encode()
		case x < 50:
			path = "/v1/Conversations/" + conv + "/Participants/" + member
		case x < 80:
			path = "/v1/Conversations/" + conv + "/Participants"
		default:
			path = "/v1/ParticipantConversations?Identity=" + fmt.Sprintf("user%d", m%(o.convs*o.members/4+1))
		}
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(context.Background(), method, pURL+path, strings.NewReader(body))
			req.SetBasicAuth(run.Account, run.Token)
			if body != "" {
				req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			}
			start := time.Now()
			resp, err := client.Do(req)
			status, cs := 0, ""
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				status, cs = resp.StatusCode, resp.Header.Get("Cache-Status")
			}
			d := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			res.latencies = append(res.latencies, d)
			if status >= 300 || status == 0 {
				res.errors++
			}
			if method == "GET" {
				res.reads++
				if strings.Contains(cs, "; hit") {
					res.hits++
				}
			}
		})
	}
	wg.Wait()
	res.upstream, res.up429 = fake.Total(), fake.TooMany()
	return res, nil
}
