package proxy

import (
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/redistest"
)

// Read-your-writes with no writer-side excuse (docs/fleet.md, "Read-your-writes across replicas"):
// a write is announced to the fleet before it is sent (its intent), and
// refused when it cannot be; once announced, whatever happens to the
// writer's Redis link, no replica serves data from before it after its
// answer.

// refused writes attrs to path through h and checks that the write was
// refused before anything was sent: a 503 in Twilio's error shape with
// Retry-After, and no write reached the upstream (up, the fleet's one
// fake Twilio).
func refused(t *testing.T, h, up *harness, path, attrs string) {
	t.Helper()
	var sent atomic.Int64
	up.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPost {
			sent.Add(1)
		}
		return false
	}
	defer func() { up.conv.Before = nil }()
	resp := h.doBody("POST", path, basic(acctB, tokenB), strings.NewReader(url.Values{"Attributes": {attrs}}.Encode()),
		"Content-Type", "application/x-www-form-urlencoded")
	retry := resp.Header.Get("Retry-After")
	s, _, body := readResp(t, resp)
	if s != 503 || retry != "1" || !strings.Contains(body, `"code":20503`) || !strings.Contains(body, "nothing was sent upstream") {
		t.Fatalf("write whose intent cannot be recorded: %d (Retry-After %q) %s; want a 503 with Retry-After 1 saying nothing was sent", s, retry, body)
	}
	if n := sent.Load(); n != 0 {
		t.Fatalf("a refused write reached the upstream %d times", n)
	}
}

// A's link to Redis is down: its write is refused, nothing sent upstream;
// B goes on serving what Twilio holds. Once the link is back, A's write
// goes through and B reads it.
func TestFleetWriteRefusedWhenItsIntentCannotBeRecorded(t *testing.T) {
	srv := redistest.Start(t)
	link := redistest.NewLink(t, srv.Addr)
	wait := invalidationWait(100 * time.Millisecond)
	r := replicasEach(t, srv, []harnessOpt{wait, redisTimeout(50 * time.Millisecond), through(link),
		func(s *setup) { s.cfg.RateLimit.MaxWait = config.Duration(300 * time.Millisecond) }}, []harnessOpt{wait})
	a, b := r[0], r[1]
	before := attrs(t, b)
	link.Down()
	refused(t, a, a, pathConv, `{"v":1}`)
	if a.inv.Stats().Refused != 1 {
		t.Fatalf("refused writes counted: %d, want 1", a.inv.Stats().Refused)
	}
	if got := attrs(t, b); got != before {
		t.Fatalf("B after A's refused write: %s, want %s (nothing was written)", got, before)
	}
	link.Up(t)
	waitUntil(t, "A trusts the stream again", a.inv.Trusted)
	a.update("POST", pathConv, `{"v":2}`)
	if got := attrs(t, b); !strings.Contains(got, `\"v\":2`) {
		t.Fatalf("B after A's write: %s", got)
	}
}

// A's link fails while its write is upstream, after its intent was
// recorded: cut, slowed past redis.timeout, or reset; meanwhile B reads
// the participant, before Twilio applied the write. A answers the write
// (its completion is queued); B never serves the data from before it
// after that answer (it kept nothing it fetched while the write was
// pending), and caches again once the completion is in.
func TestFleetReadYourWritesWhenTheWritersLinkFailsMidWrite(t *testing.T) {
	faults := map[string]func(t *testing.T, l *redistest.Link) (recover func()){
		"cut":    func(t *testing.T, l *redistest.Link) func() { l.Down(); return func() { l.Up(t) } },
		"slowed": func(t *testing.T, l *redistest.Link) func() { l.Latency(t, 300); return l.Clear },
		"reset":  func(t *testing.T, l *redistest.Link) func() { l.Reset(t); return l.Clear },
	}
	for name, fault := range faults {
		t.Run(name, func(t *testing.T) {
			srv := redistest.Start(t)
			link := redistest.NewLink(t, srv.Addr)
			wait := invalidationWait(100 * time.Millisecond)
			r := replicasEach(t, srv, []harnessOpt{wait, redisTimeout(50 * time.Millisecond), through(link)}, []harnessOpt{wait})
			a, b := r[0], r[1]
			attrs(t, b)
			if _, cs, _ := b.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") {
				t.Fatalf("B's own copy before: %q", cs)
			}
			var recover func()
			a.conv.Before = func(w http.ResponseWriter, req *http.Request) bool {
				if req.Method == http.MethodPost && recover == nil {
					recover = fault(t, link) // the intent is recorded: the write is on its way
					b.get(pathConv)          // B fetches the data from before the write, while it runs
				}
				return false
			}
			a.update("POST", pathConv, `{"v":1}`)
			a.conv.Before = nil
			if a.inv.Stats().Queued == 0 {
				t.Fatal("A's completion reached Redis: the fault did not bite")
			}
			for i := range 20 {
				if got := attrs(t, b); !strings.Contains(got, `\"v\":1`) {
					t.Fatalf("B's read %d after A's answer: %s, the data from before the write", i, got)
				}
			}
			recover()
			waitUntil(t, "A's completion is in Redis", func() bool { return a.inv.Unsent() == 0 })
			waitUntil(t, "B caches the participant again", func() bool {
				_, cs, body := b.get(pathConv)
				if !strings.Contains(body, `\"v\":1`) {
					t.Fatalf("B after the completion: %s", body)
				}
				return strings.HasPrefix(cs, "cacheproxy; hit")
			})
		})
	}
}

// A's link is cut mid-write and stays cut: B keeps the write's scopes
// pending until the write's hold has passed, then raises its marks
// itself and caches again, the write's data.
func TestFleetIntentWithoutItsEndIsLiftedAfterItsHold(t *testing.T) {
	srv := redistest.Start(t)
	link := redistest.NewLink(t, srv.Addr)
	wait, hold := invalidationWait(100*time.Millisecond), func(s *setup) { s.writeHold = 500 * time.Millisecond }
	r := replicasEach(t, srv, []harnessOpt{wait, hold, redisTimeout(50 * time.Millisecond), through(link)}, []harnessOpt{wait, hold})
	a, b := r[0], r[1]
	attrs(t, b)
	a.conv.Before = func(w http.ResponseWriter, req *http.Request) bool {
		if req.Method == http.MethodPost {
			link.Down()
			b.get(pathConv) // B fetches the data from before the write, while it runs
		}
		return false
	}
	start := time.Now()
	a.update("POST", pathConv, `{"v":1}`)
	a.conv.Before = nil
	if _, cs, body := b.get(pathConv); strings.HasPrefix(cs, "cacheproxy; hit") || !strings.Contains(body, `\"v\":1`) {
		t.Fatalf("B during the write's hold: %q %s, want a miss with the write's data", cs, body)
	}
	waitUntil(t, "B lifts the intent", func() bool { return b.inv.Stats().Lifted == 1 })
	if held := time.Since(start); held < 1500*time.Millisecond {
		t.Fatalf("B lifted the intent after %s, before its hold (0.5 s) and a second had passed", held)
	}
	b.get(pathConv)
	if _, cs, body := b.get(pathConv); !strings.HasPrefix(cs, "cacheproxy; hit") || !strings.Contains(body, `\"v\":1`) {
		t.Fatalf("B after the hold: %q %s, want a hit with the write's data", cs, body)
	}
}

// A replica that held nothing fetches while a write runs (before Twilio
// applied it): what it fetched is not kept, so its reads after the
// write's answer are the write's data, though the writer's completion
// never reached Redis.
func TestFleetFillDuringAWriteIsNotKept(t *testing.T) {
	srv := redistest.Start(t)
	link := redistest.NewLink(t, srv.Addr)
	wait := invalidationWait(100 * time.Millisecond)
	r := replicasEach(t, srv, []harnessOpt{wait, redisTimeout(50 * time.Millisecond), through(link)}, []harnessOpt{wait})
	a, b := r[0], r[1]
	var during string
	a.conv.Before = func(w http.ResponseWriter, req *http.Request) bool {
		if req.Method == http.MethodPost && during == "" {
			link.Down()
			_, during, _ = b.get(pathConv) // a miss: the data from before the write
		}
		return false
	}
	a.update("POST", pathConv, `{"v":1}`)
	a.conv.Before = nil
	if !strings.Contains(during, "fwd=uri-miss") || strings.Contains(during, "stored") {
		t.Fatalf("B's read while the write ran: %q, want a miss whose answer is not kept", during)
	}
	for i := range 10 {
		if got := attrs(t, b); !strings.Contains(got, `\"v\":1`) {
			t.Fatalf("B's read %d after A's answer: %s, the data from before the write", i, got)
		}
	}
	link.Up(t)
}
