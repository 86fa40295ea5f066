package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"cacheproxy/internal/clock"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type result struct {
	release func()
	waited  time.Duration
	err     error
	at      time.Time
}

func acquire(l *Limiter, clk *clock.Fake, ctx context.Context, acct string) <-chan result {
	ch := make(chan result, 1)
	go func() {
		rel, w, err := l.Acquire(ctx, acct)
		ch <- result{rel, w, err, clk.Now()}
	}()
	return ch
}

func TestPacesCallsPerAccount(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Config{Rate: 10, MaxWait: 10 * time.Second}, clk)
	first := <-acquire(l, clk, context.Background(), "AC1")
	if first.err != nil || first.waited != 0 {
		t.Fatalf("first call waited: %+v", first)
	}
	first.release()
	var got []result
	for i := 0; i < 3; i++ {
		wait := clk.Expect(2) // the waiter's max-wait timer and the dispatcher's sleep
		ch := acquire(l, clk, context.Background(), "AC1")
		wait()
		select {
		case r := <-ch:
			t.Fatalf("granted before its slot: %+v", r)
		default:
		}
		clk.Advance(100 * time.Millisecond)
		r := <-ch
		if r.err != nil {
			t.Fatal(r.err)
		}
		r.release()
		got = append(got, r)
	}
	for i, r := range got {
		if r.waited != 100*time.Millisecond {
			t.Fatalf("call %d waited %s, want 100ms (10/s)", i, r.waited)
		}
	}
	// Another account has its own budget: no wait.
	if r := <-acquire(l, clk, context.Background(), "AC2"); r.err != nil || r.waited != 0 {
		t.Fatalf("other account waited: %+v", r)
	} else {
		r.release()
	}
	clk.Advance(time.Second) // let the dispatchers finish
}

func TestWaitingIsBounded(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Config{Rate: 1, MaxWait: 2500 * time.Millisecond}, clk)
	r := <-acquire(l, clk, context.Background(), "AC1")
	r.release()
	// Rate 1/s, max wait 2.5s: two may queue; the third is refused at once.
	wait := clk.Expect(2) // a's max-wait timer, the dispatcher's sleep
	a := acquire(l, clk, context.Background(), "AC1")
	wait()
	wait = clk.Expect(1) // b's max-wait timer: b queues behind a
	b := acquire(l, clk, context.Background(), "AC1")
	wait()
	_, _, err := l.Acquire(context.Background(), "AC1")
	var rej *RejectedError
	if !errors.As(err, &rej) || rej.RetryAfter != 3*time.Second {
		t.Fatalf("third waiter: %v, want rejection with RetryAfter 3s", err)
	}
	wait = clk.Expect(1) // the dispatcher's sleep for b
	clk.Advance(time.Second)
	if r := <-a; r.err != nil || r.waited != time.Second {
		t.Fatalf("first queued: %+v", r)
	} else {
		r.release()
	}
	l.Report("AC1", Throttled) // 1/s is the floor: a cut cannot slow it further
	if l.Rate("AC1") != 1 {
		t.Fatalf("rate below the floor: %v", l.Rate("AC1"))
	}
	wait()
	clk.Advance(time.Second)
	if r := <-b; r.err != nil {
		t.Fatalf("second queued: %v", r.err)
	} else {
		r.release()
	}
	clk.Advance(time.Second)
}

func TestMaxWaitRejects(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Config{Rate: 1, MaxConcurrent: 1, MaxWait: time.Second}, clk)
	held := <-acquire(l, clk, context.Background(), "AC1") // holds the only call slot
	wait := clk.Expect(1)
	ch := acquire(l, clk, context.Background(), "AC1")
	wait()
	clk.Advance(time.Second)
	r := <-ch
	var rej *RejectedError
	if !errors.As(r.err, &rej) || r.waited != time.Second {
		t.Fatalf("waiter past max wait: %+v", r)
	}
	held.release()
	clk.Advance(time.Second)
}

func TestClientThatLeavesFreesItsPlace(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Config{Rate: 1, MaxWait: 1500 * time.Millisecond}, clk)
	r := <-acquire(l, clk, context.Background(), "AC1")
	r.release()
	ctx, cancel := context.WithCancel(context.Background())
	wait := clk.Expect(2)
	leaving := acquire(l, clk, ctx, "AC1") // fills the queue (bound 1)
	wait()
	if _, _, err := l.Acquire(context.Background(), "AC1"); err == nil {
		t.Fatal("queue bound not enforced")
	}
	cancel()
	if r := <-leaving; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("leaving waiter: %v", r.err)
	}
	// Its place is free: a new waiter is admitted and gets the slot.
	wait = clk.Expect(1)
	next := acquire(l, clk, context.Background(), "AC1")
	wait() // its max-wait timer; the dispatcher still sleeps for the slot
	clk.Advance(time.Second)
	if r := <-next; r.err != nil {
		t.Fatalf("next waiter: %v", r.err)
	} else {
		r.release()
	}
	clk.Advance(time.Second)
}

func TestConcurrencyCap(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Config{Rate: 1000, MaxConcurrent: 2, MaxWait: 10 * time.Second}, clk)
	a := <-acquire(l, clk, context.Background(), "AC1")
	clk.Advance(time.Millisecond)
	b := <-acquire(l, clk, context.Background(), "AC1")
	wait := clk.Expect(1)
	c := acquire(l, clk, context.Background(), "AC1")
	wait()
	clk.Advance(time.Second) // time alone does not help: two calls are in flight
	select {
	case r := <-c:
		t.Fatalf("third call started with two in flight: %+v", r)
	default:
	}
	a.release()
	a.release() // idempotent
	r := <-c
	if r.err != nil {
		t.Fatal(r.err)
	}
	b.release()
	r.release()
	clk.Advance(time.Second)
}

func TestThrottledCutsAndRecovers(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Config{Rate: 40, MaxWait: time.Second, Recover: 10 * time.Second}, clk)
	r := <-acquire(l, clk, context.Background(), "AC1")
	r.release()
	l.Report("AC1", Throttled)
	if got := l.Rate("AC1"); got != 20 {
		t.Fatalf("after one 429: %v/s, want 20", got)
	}
	l.Report("AC1", Throttled)
	if got := l.Rate("AC1"); got != 10 {
		t.Fatalf("after two: %v/s, want 10", got)
	}
	clk.Advance(5 * time.Second)
	if got := l.Rate("AC1"); got != 25 {
		t.Fatalf("half way back: %v/s, want 25", got)
	}
	clk.Advance(5 * time.Second)
	if got := l.Rate("AC1"); got != 40 {
		t.Fatalf("recovered: %v/s, want 40", got)
	}
	// The queue bound follows the cut rate: 10/s x 1s = 10 waiters.
	l.Report("AC1", Throttled)
	l.Report("AC1", Throttled)
	if got := l.Rate("AC1"); got != 10 {
		t.Fatalf("rate %v", got)
	}
}

func TestIdleAccountsAreForgotten(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	l := New(Config{Rate: 10, MaxWait: time.Second}, clk)
	for i := 0; i < 100; i++ {
		r := <-acquire(l, clk, context.Background(), fmt.Sprint("AC", i))
		r.release()
	}
	if n := l.Accounts(); n != 100 {
		t.Fatalf("accounts = %d, want 100", n)
	}
	held := <-acquire(l, clk, context.Background(), "busy") // in flight: kept
	l.Report("AC1", Throttled)                              // cut: kept until recovered
	clk.Advance(3 * time.Second)
	r := <-acquire(l, clk, context.Background(), "new") // prunes
	r.release()
	if n := l.Accounts(); n != 3 {
		t.Fatalf("accounts after pruning = %d, want 3 (busy, cut, new)", n)
	}
	held.release()
	clk.Advance(time.Minute)
}
