package ratelimit

import (
	"context"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"cacheproxy/internal/clock"
)

// shape is a load's arrivals, offsets from its start.
type shape struct {
	name     string
	arrivals func(r *rand.Rand, rate int) []time.Duration
}

// shapes are the loads that broke the budget's promises (issue 35):
// bursts after an idle spell, a steady stream above the pace, and clumps
// at random gaps (what a Zipf load's cold keys look like to the budget).
var shapes = []shape{
	{"bursts after idle", func(r *rand.Rand, _ int) []time.Duration {
		var at []time.Duration
		t := time.Duration(0)
		for range 4 {
			for range 40 + r.IntN(160) {
				at = append(at, t)
			}
			t += 1500*time.Millisecond + time.Duration(r.IntN(1500))*time.Millisecond
		}
		return at
	}},
	{"a steady stream", func(r *rand.Rand, rate int) []time.Duration {
		n, every := 3*rate*(2+r.IntN(3)), time.Second/time.Duration(rate*(2+r.IntN(3)))
		at := make([]time.Duration, n)
		for i := range at {
			at[i] = time.Duration(i) * every
		}
		return at
	}},
	{"clumps", func(r *rand.Rand, rate int) []time.Duration {
		var at []time.Duration
		for t := time.Duration(0); t < 4*time.Second; t += time.Duration(r.ExpFloat64() * float64(time.Second) * 8 / float64(rate)) {
			for range 1 + r.IntN(16) {
				at = append(at, t)
			}
		}
		return at
	}},
}

// call is one call the budget let through: when it started and ended
// here (Twilio counts it once, somewhere in between).
type call struct{ start, end time.Time }

// latency is an upstream answer's time: mostly quick, sometimes slow,
// now and then very slow (a call that reaches Twilio late is what a
// window counted from the start let overlap with the next).
func latency(r *rand.Rand) time.Duration {
	switch x := r.IntN(20); {
	case x == 0:
		return time.Duration(500+r.IntN(900)) * time.Millisecond
	case x < 5:
		return time.Duration(100+r.IntN(300)) * time.Millisecond
	default:
		return time.Duration(10+r.IntN(60)) * time.Millisecond
	}
}

// driveShape drives a Limiter with cfg through shape s, seeded.
func driveShape(t *testing.T, cfg Config, seed uint64, s shape) (calls []call, waits []time.Duration, refused int) {
	r := rand.New(rand.NewPCG(seed, 35))
	arrivals := s.arrivals(r, cfg.Rate)
	lat := make([]time.Duration, len(arrivals))
	for i := range lat {
		lat[i] = latency(r)
	}
	return drive(t, cfg, arrivals, lat)
}

// drive sends arrivals through a Limiter with cfg in a synctest bubble
// (time moves only when every goroutine waits, so a run is exact and
// replays): the call of arrival i, once it gets a turn, takes lat[i] and
// ends Served. It returns the calls made and, per arrival, how long it
// waited for its turn or its refusal.
func drive(t *testing.T, cfg Config, arrivals, lat []time.Duration) (calls []call, waits []time.Duration, refused int) {
	synctest.Test(t, func(t *testing.T) {
		l := New(cfg, clock.Real{})
		begin := time.Now()
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i, at := range arrivals {
			wg.Go(func() {
				time.Sleep(at - time.Since(begin))
				asked := time.Now()
				turn, err := l.Acquire(context.Background(), "AC1", "c")
				waited := time.Since(asked)
				var rejected *RejectedError
				if err != nil && !errors.As(err, &rejected) {
					t.Errorf("arrival %d: %v", i, err)
				}
				mu.Lock()
				waits = append(waits, waited)
				if err != nil {
					refused++
				}
				mu.Unlock()
				if err != nil {
					return
				}
				start := time.Now()
				time.Sleep(lat[i])
				mu.Lock()
				calls = append(calls, call{start, time.Now()})
				mu.Unlock()
				turn.Done(Served)
			})
		}
		wg.Wait()
		if err := l.Wait(context.Background()); err != nil {
			t.Fatal(err)
		}
	})
	return calls, waits, refused
}

// mostInAnySecond is the most calls Twilio may count in one second,
// sliding: the calls whose time between start and end meets some window
// [x, x+1s), whichever moment of it each reached Twilio at.
func mostInAnySecond(calls []call) int {
	most := 0
	for _, c := range calls {
		for _, x := range []time.Time{c.end, c.start.Add(-time.Second + 1)} {
			n := 0
			for _, o := range calls {
				if o.start.Before(x.Add(time.Second)) && !o.end.Before(x) {
					n++
				}
			}
			most = max(most, n)
		}
	}
	return most
}

// mostInFlight is the most calls in flight at once.
func mostInFlight(calls []call) int {
	most := 0
	for _, c := range calls {
		n := 0
		for _, o := range calls {
			if !o.start.After(c.start) && o.end.After(c.start) {
				n++
			}
		}
		most = max(most, n)
	}
	return most
}

// Issue 35, point 1: whatever the load's shape, the calls Twilio may count
// in any one second (sliding, each counted anywhere between its start and
// its end) never exceed the pace, the calls in flight never exceed the
// cap, and no caller waits past max_wait. Twenty seeded rounds of each
// shape, with upstream latencies from 10 ms to 1.4 s; a failing round
// names its seed.
func TestTheBudgetKeepsItsLimitsWhateverTheShape(t *testing.T) {
	cfg := Config{MaxConcurrent: 10, Rate: 45, MaxWait: time.Second}
	var total, made, refusedAll int
	for _, s := range shapes {
		for seed := range uint64(20) {
			calls, waits, refused := driveShape(t, cfg, seed, s)
			total, made, refusedAll = total+len(waits), made+len(calls), refusedAll+refused
			if n := mostInAnySecond(calls); n > cfg.Rate {
				t.Errorf("%s, seed %d: %d calls in one second, pace %d", s.name, seed, n, cfg.Rate)
			}
			if n := mostInFlight(calls); n > cfg.MaxConcurrent {
				t.Errorf("%s, seed %d: %d calls in flight, cap %d", s.name, seed, n, cfg.MaxConcurrent)
			}
			if w := slices.Max(waits); w > cfg.MaxWait {
				t.Errorf("%s, seed %d: a caller waited %s, max_wait %s", s.name, seed, w, cfg.MaxWait)
			}
			if len(calls)+refused != len(waits) || len(calls) == 0 {
				t.Errorf("%s, seed %d: %d calls and %d refused of %d arrivals", s.name, seed, len(calls), refused, len(waits))
			}
		}
	}
	t.Logf("%d arrivals: %d calls made, %d refused", total, made, refusedAll)
}

// Issue 35, point 3: the paced scenario of bench/limits (300 reads/s for
// 10 s, Zipf s = 1.1 over 3,000 participants, seeded as the bench seeds
// it; 90 calls/s, max_wait 2 s, the upstream answering in 50 ms) sends the
// budget one call per participant, at its first read. Replayed here on
// synctest's clock, those cold keys fit the pace: nobody is refused and
// nobody waits a second, so the refusals the bench sees come from
// elsewhere (docs/budget.md, "The rate window").
func TestTheRateBenchsColdKeysFitThePace(t *testing.T) {
	const rate, reads, keys = 300, 3000, 3000
	zipf := rand.NewZipf(rand.New(rand.NewPCG(1, 2)), 1.1, 1, keys-1)
	seen := map[uint64]bool{}
	var arrivals, lat []time.Duration
	for i := range reads {
		if k := zipf.Uint64(); !seen[k] {
			seen[k] = true
			arrivals = append(arrivals, time.Duration(i)*time.Second/rate)
			lat = append(lat, 50*time.Millisecond)
		}
	}
	cfg := Config{MaxConcurrent: 25, Rate: 90, MaxWait: 2 * time.Second, WriteShare: 0.2}
	calls, waits, refused := drive(t, cfg, arrivals, lat)
	busiest := 0
	for i := range arrivals {
		j, _ := slices.BinarySearch(arrivals, arrivals[i]+time.Second)
		busiest = max(busiest, j-i)
	}
	slices.Sort(waits)
	t.Logf("%d cold keys (the busiest second %d), %d calls, %d refused, waits p50 %s p99 %s max %s",
		len(arrivals), busiest, len(calls), refused, waits[len(waits)/2], waits[len(waits)*99/100], waits[len(waits)-1])
	if refused != 0 || len(calls) != len(arrivals) || mostInAnySecond(calls) > cfg.Rate {
		t.Fatalf("%d refused, %d calls of %d cold keys", refused, len(calls), len(arrivals))
	}
}
