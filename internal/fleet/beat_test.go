package fleet

import (
	"context"
	"strings"
	"testing"
	"time"

	"cacheproxy/internal/invalidation"
	"cacheproxy/internal/redistest"
)

// A replica's heartbeats go to its own channel, so none hears another's
// (each used to hear every replica's: 40·N messages a second per replica
// in a fleet of N); and a replica that reads nothing for restAfter sends
// none at all: an idle fleet costs Redis only its announcements. The
// next read serves nothing from L1 (not counted as a lapse) and wakes the
// heartbeats; the replica is current again within one of them, and what
// it held before its rest is served again (it heard every invalidation
// meanwhile).
func TestHeartbeatsAreOwnAndRestWhenIdle(t *testing.T) {
	old := restAfter
	restAfter = 400 * time.Millisecond
	t.Cleanup(func() { restAfter = old })
	srv := redistest.Start(t)
	var invs [3]*Invalidator
	for n := range invs {
		f := open(t, srv.URL())
		invs[n] = NewInvalidator(f, invalidation.New(time.Hour, nil), 100*time.Millisecond, func(error) {})
		t.Cleanup(invs[n].Close)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := invs[n].WaitTrusted(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	a := invs[0]
	// A reads; the others idle. Over a second, only A publishes
	// heartbeats, each on its own channel, none on the stream.
	stop := make(chan struct{})
	reading := make(chan struct{})
	go func() {
		defer close(reading)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			a.Epoch() // a read
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	time.Sleep(2 * restAfter) // the others come to rest: a time on the real clock, which their tickers run on
	m := srv.Monitor(t)
	time.Sleep(time.Second)
	close(stop)
	<-reading
	beats := m.Naming("SPUBLISH")
	total, _ := m.Stop()
	own, other := 0, 0
	for _, b := range beats {
		switch {
		case strings.Contains(b, "{inv}hb:"+a.id):
			own++
		case strings.Contains(b, "{inv}hb:"), strings.Contains(b, `"t:{inv}"`):
			other++
		}
	}
	if own < 10 || other != 0 {
		t.Fatalf("in one second: %d heartbeats of the reading replica, %d other publishes, want about 40 and none:\n%s", own, other, strings.Join(beats, ""))
	}
	if idle := total - own; idle > 3*15 {
		t.Errorf("the three replicas sent %d commands besides A's heartbeats in a second, want at most 15 each", idle)
	}
	// Every replica rests now; a read on one finds its L1 unservable (its
	// stream is not current) without a lapse, and is current again soon,
	// its L1 whole.
	b := invs[1]
	held := b.local.Epoch() // an entry fetched now, before the rest
	time.Sleep(2 * restAfter)
	if !b.resting.Load() {
		t.Fatal("an idle replica is not resting")
	}
	b.Epoch()
	if b.Valid(b.Epoch(), nil) {
		t.Fatal("a replica woken from rest trusts its L1 before its heartbeat came back")
	}
	deadline := time.Now().Add(10 * time.Second)
	for !b.Valid(b.Epoch(), nil) {
		if time.Now().After(deadline) {
			t.Fatal("the woken replica never became current")
		}
		time.Sleep(5 * time.Millisecond) // its heartbeat's round trip through Redis
	}
	if n := b.Stats().Lapses; n != 0 {
		t.Fatalf("%d lapses counted for rest", n)
	}
	if !b.Valid(held, []string{"participant"}) {
		t.Fatal("an entry held through the rest, which no write touched, is not served after it")
	}
}

// A replica that lost its stream tries again every 100 ms for two
// seconds (a reset link or a restarted Redis is back within them: the
// fault run's), then backs off to a try a second.
func TestResubscribeSoonThenBackOff(t *testing.T) {
	for _, c := range []struct{ last, since, want time.Duration }{
		{0, 0, 100 * time.Millisecond},
		{100 * time.Millisecond, 1900 * time.Millisecond, 100 * time.Millisecond},
		{100 * time.Millisecond, 2 * time.Second, 200 * time.Millisecond},
		{400 * time.Millisecond, 3 * time.Second, 800 * time.Millisecond},
		{800 * time.Millisecond, time.Minute, time.Second},
		{time.Second, time.Hour, time.Second},
	} {
		if got := resubscribe(c.last, c.since); got != c.want {
			t.Errorf("after waiting %s, down %s: %s, want %s", c.last, c.since, got, c.want)
		}
	}
}
