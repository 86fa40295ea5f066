package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"cacheproxy/internal/clock"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type result struct {
	turn Turn
	err  error
	at   time.Time
}

func acquire(l *Limiter, clk *clock.Fake, ctx context.Context, user, cred string) <-chan result {
	ch := make(chan result, 1)
	go func() {
		ls, err := l.Acquire(ctx, user, cred)
		ch <- result{ls, err, clk.Now()}
	}()
	return ch
}

// queued waits until user's account has n calls waiting.
func queued(t *testing.T, l *Limiter, user string, n int) {
	t.Helper()
	timeout := time.After(time.Minute)
	for {
		changed := l.Changed()
		if l.State(user).Queued == n {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("queue of %s: %+v, want %d waiting", user, l.State(user), n)
		}
	}
}

func newFake() *clock.Fake { return clock.NewFake(time.Unix(1_700_000_000, 0)) }

func TestRateWindowLetsBurstsThrough(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 100, Rate: 5, MaxWait: 10 * time.Second}, clk)
	steady(l, "AC1") // the cap is not what this test is about
	clk.Advance(time.Second)
	// A burst of 5 passes at once: the window has room.
	for i := range 5 {
		ls, err := l.Acquire(context.Background(), "AC1", "c")
		if err != nil || ls.Waited() != 0 {
			t.Fatalf("call %d of the burst: waited %v, %v", i, ls, err)
		}
		ls.Done(Served)
		clk.Advance(100 * time.Millisecond)
	}
	// The sixth waits until the first leaves the window: 1s after it.
	wait := clk.Expect(2) // its max-wait timer and the window's timer
	sixth := acquire(l, clk, context.Background(), "AC1", "c")
	wait()
	clk.Advance(499 * time.Millisecond)
	select {
	case r := <-sixth:
		t.Fatalf("sixth call within the window: %+v", r)
	default:
	}
	clk.Advance(time.Millisecond)
	r := <-sixth
	if r.err != nil || r.turn.Waited() != 500*time.Millisecond {
		t.Fatalf("sixth call: %+v, want a turn after 500ms", r)
	}
	r.turn.Done(Served)
	if err := l.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestWaitingIsBounded(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 1, Rate: 1, MaxWait: 2500 * time.Millisecond}, clk)
	held, _ := l.Acquire(context.Background(), "AC1", "c")
	// Rate 1/s, max wait 2.5s: two may queue; the third is refused at once.
	a := acquire(l, clk, context.Background(), "AC1", "c")
	queued(t, l, "AC1", 1)
	b := acquire(l, clk, context.Background(), "AC1", "c")
	queued(t, l, "AC1", 2)
	_, err := l.Acquire(context.Background(), "AC1", "c")
	var rej *RejectedError
	if !errors.As(err, &rej) || rej.RetryAfter != 3*time.Second || rej.Reason != "queue full" {
		t.Fatalf("third waiter: %v, want queue full with RetryAfter 3s", err)
	}
	wait := clk.Expect(1) // the window's timer
	held.Done(Served)
	wait()
	clk.Advance(time.Second) // the window frees one start
	r := <-a
	if r.err != nil {
		t.Fatalf("first queued: %v", r.err)
	}
	wait = clk.Expect(1)
	r.turn.Done(Served)
	wait()
	clk.Advance(time.Second)
	if r := <-b; r.err != nil {
		t.Fatalf("second queued: %v", r.err)
	} else {
		r.turn.Done(Served)
	}
	clk.Advance(time.Second)
	if err := l.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestMaxWaitRejects(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 1, MaxWait: time.Second}, clk)
	held, _ := l.Acquire(context.Background(), "AC1", "c") // holds the only turn
	wait := clk.Expect(1)
	ch := acquire(l, clk, context.Background(), "AC1", "c")
	wait()
	clk.Advance(time.Second)
	r := <-ch
	var rej *RejectedError
	if !errors.As(r.err, &rej) || rej.Reason != "waited max_wait" {
		t.Fatalf("waiter past max wait: %+v", r)
	}
	if st := l.State("AC1"); st.Queued != 0 || st.InFlight != 1 {
		t.Fatalf("after the rejection: %+v", st)
	}
	held.Done(Served)
}

func TestClientThatLeavesFreesItsPlace(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 1, MaxWait: time.Minute}, clk)
	held, _ := l.Acquire(context.Background(), "AC1", "c")
	ctx, cancel := context.WithCancel(context.Background())
	leaving := acquire(l, clk, ctx, "AC1", "c")
	queued(t, l, "AC1", 1)
	next := acquire(l, clk, context.Background(), "AC1", "c")
	queued(t, l, "AC1", 2)
	cancel()
	if r := <-leaving; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("leaving waiter: %v", r.err)
	}
	queued(t, l, "AC1", 1)
	held.Done(Served)
	r := <-next
	if r.err != nil {
		t.Fatalf("next waiter: %v", r.err)
	}
	r.turn.Done(Served)
	r.turn.Done(Throttled) // a second Done does nothing
	if st := l.State("AC1"); st.InFlight != 0 || st.Cap != 1 || st.Queued != 0 {
		t.Fatalf("after all calls: %+v", st)
	}
}

func TestConcurrencyCap(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 8, MaxWait: 10 * time.Second}, clk) // slow start at 2
	a, _ := l.Acquire(context.Background(), "AC1", "c")
	b, _ := l.Acquire(context.Background(), "AC1", "c")
	c := acquire(l, clk, context.Background(), "AC1", "c")
	queued(t, l, "AC1", 1)
	clk.Advance(time.Second) // time alone does not help: two calls are in flight
	select {
	case r := <-c:
		t.Fatalf("third call started with two in flight: %+v", r)
	default:
	}
	a.Done(Served)
	r := <-c
	if r.err != nil {
		t.Fatal(r.err)
	}
	b.Done(Served)
	r.turn.Done(Served)
}

// granted is one call's answer, tagged with its credential.
type granted struct {
	cred string
	result
}

func acquireTagged(l *Limiter, clk *clock.Fake, out chan<- granted, cred string) {
	go func() {
		ls, err := l.Acquire(context.Background(), "AC1", cred)
		out <- granted{cred, result{ls, err, clk.Now()}}
	}()
}

// turnOf serves turns (each call is done at once) until cred's call is
// granted, and returns which turn it was.
func turnOf(t *testing.T, answers <-chan granted, cred string) int {
	t.Helper()
	for turn := 1; ; turn++ {
		g := <-answers
		if g.err != nil {
			t.Fatalf("%s: %v", g.cred, g.err)
		}
		g.turn.Done(Served)
		if g.cred == cred {
			return turn
		}
	}
}

// A full queue makes room by taking the newest place of the longest
// credential queue, not the newcomer's.
func TestFullQueueEvictsTheLongestCredential(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 1, Rate: 100, MaxWait: 30 * time.Millisecond}, clk) // 3 may wait
	held, _ := l.Acquire(context.Background(), "AC1", "wrong")
	answers := make(chan granted, 10)
	for i := range 3 {
		acquireTagged(l, clk, answers, "wrong")
		queued(t, l, "AC1", i+1)
	}
	// (A context already ended: were the call admitted, it would leave at
	// once with the context's error rather than block the test.)
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	var rej *RejectedError
	if _, err := l.Acquire(ended, "AC1", "wrong"); !errors.As(err, &rej) {
		t.Fatalf("a fourth wrong call to a full queue: %v, want queue full", err)
	}
	acquireTagged(l, clk, answers, "right")
	g := <-answers
	if g.cred != "wrong" || !errors.As(g.err, &rej) || rej.Reason != "queue full" {
		t.Fatalf("want a wrong waiter evicted, got %+v", g)
	}
	queued(t, l, "AC1", 3)
	held.Done(Served)
	if turn := turnOf(t, answers, "right"); turn > 2 {
		t.Fatalf("right credential served at turn %d, want 1 or 2", turn)
	}
	turnOf(t, answers, "wrong")
}

// Turns go round-robin across credentials: 50 calls of one credential
// waiting ahead of one call of another do not make it wait for them.
func TestTurnsAreFairAcrossCredentials(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 1, MaxWait: time.Minute}, clk)
	held, _ := l.Acquire(context.Background(), "AC1", "wrong")
	answers := make(chan granted, 60)
	for range 50 {
		acquireTagged(l, clk, answers, "wrong")
	}
	queued(t, l, "AC1", 50)
	acquireTagged(l, clk, answers, "right")
	queued(t, l, "AC1", 51)
	held.Done(Served)
	// One turn for a wrong call at most, then the right one.
	if turn := turnOf(t, answers, "right"); turn > 2 {
		t.Fatalf("right credential served at turn %d, want 1 or 2", turn)
	}
	for range 49 {
		g := <-answers
		g.turn.Done(Served)
	}
}

func TestAPIKeysShareTheirAccountsBudget(t *testing.T) {
	const acct, key1, key2 = "AC00000000000000000000000000000001", "SK00000000000000000000000000000001", "SK00000000000000000000000000000002"
	clk := newFake()
	var events []Event
	l := New(Config{MaxConcurrent: 1, MaxWait: time.Minute, KeyAccounts: map[string]string{key1: acct},
		OnEvent: func(e Event) { events = append(events, e) }}, clk)
	held, _ := l.Acquire(context.Background(), acct, "account's own")
	// key1 is configured: it waits for the account's one turn.
	viaKey1 := acquire(l, clk, context.Background(), key1, "key 1")
	queued(t, l, acct, 1)
	// key2 is not known yet: its own budget, no wait.
	ls2, err := l.Acquire(context.Background(), key2, "key 2")
	if err != nil || ls2.Waited() != 0 {
		t.Fatalf("unknown key waited: %v", err)
	}
	ls2.Done(Served)
	l.Learn(key2, acct)
	if !l.Knows(key2) || len(events) != 1 || events[0].Kind != KeyLearned || events[0].Key != key2 || events[0].Account != acct {
		t.Fatalf("learning: knows %v, events %+v", l.Knows(key2), events)
	}
	viaKey2 := acquire(l, clk, context.Background(), key2, "key 2")
	queued(t, l, acct, 2)
	if st := l.State(key2); st.Account != acct || st.Keys != 2 || st.InFlight != 1 || st.Queued != 2 {
		t.Fatalf("key 2's budget: %+v, want the account's, with two keys", st)
	}
	l.Learn(key1, "AC00000000000000000000000000000009") // configured: stands
	l.Learn("AC00000000000000000000000000000003", acct) // not a key
	if st := l.State(key1); st.Account != acct {
		t.Fatalf("configured key moved: %+v", st)
	}
	held.Done(Served)
	r := <-viaKey1
	r.turn.Done(Served)
	r = <-viaKey2
	r.turn.Done(Served)
}

// Requests without credentials have a budget of their own, never an
// account's.
func TestNoCredentialIsNotAnAccount(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 1, MaxWait: time.Minute}, clk)
	anon, _ := l.Acquire(context.Background(), "", "")
	ls, err := l.Acquire(context.Background(), "AC1", "c")
	if err != nil || ls.Waited() != 0 {
		t.Fatalf("account waited behind an anonymous call: %v", err)
	}
	ls.Done(Served)
	anon.Done(Served)
}

func TestIdleAccountsAreForgotten(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 10, MaxWait: time.Second, Recover: 10 * time.Second}, clk)
	for i := 0; i < 100; i++ {
		ls, _ := l.Acquire(context.Background(), fmt.Sprint("AC", i), "c")
		ls.Done(Served)
	}
	if n := len(l.Accounts()); n != 100 {
		t.Fatalf("accounts = %d, want 100", n)
	}
	held, _ := l.Acquire(context.Background(), "busy", "c") // in flight: kept
	clk.Advance(13 * time.Second)
	ls, _ := l.Acquire(context.Background(), "new", "c") // prunes
	ls.Done(Served)
	if n := len(l.Accounts()); n != 2 {
		t.Fatalf("accounts after pruning = %d, want 2 (busy, new)", n)
	}
	held.Done(Served)
}

// Hostile input, point 3: once the upstream accepted a credential of an
// account, the account's credentials it never accepted share one turn and
// one call in flight between them: 50 made-up tokens get one call at a
// time, and the accepted credential gets its turns at once beside them.
func TestUnverifiedCredentialsShareOneTurn(t *testing.T) {
	l := New(Config{MaxConcurrent: 10, MaxWait: time.Hour}, clock.NewFake(time.Unix(0, 0)))
	l.Verify("AC1", "real")
	ctx, cancel := context.WithCancel(context.Background())
	granted := make(chan Turn, 50)
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			ls, err := l.Acquire(ctx, "AC1", fmt.Sprint("made-up-", i))
			if err == nil {
				granted <- ls
			}
		})
	}
	for st := l.State("AC1"); st.Queued+st.InFlight < 50; st = l.State("AC1") {
		time.Sleep(time.Millisecond) // the other goroutines' progress
	}
	if st := l.State("AC1"); st.InFlight != 1 {
		cancel()
		wg.Wait()
		for range st.InFlight {
			(<-granted).Done(Served)
		}
		t.Fatalf("%d made-up tokens' calls in flight, want 1", st.InFlight)
	}
	real, err := l.Acquire(context.Background(), "AC1", "real")
	if err != nil || l.State("AC1").InFlight != 2 {
		t.Fatalf("the accepted credential: %v, %d in flight; want its turn at once", err, l.State("AC1").InFlight)
	}
	real.Done(Served)
	(<-granted).Done(Served)
	next := <-granted // the next made-up one, and only it
	if st := l.State("AC1"); st.InFlight != 1 || st.Queued != 48 {
		t.Fatalf("after one made-up call ended: %d in flight, %d queued; want 1 and 48", st.InFlight, st.Queued)
	}
	cancel()
	wg.Wait()
	next.Done(Served)
}

// Hostile input, point 4: the state kept for idle accounts is bounded,
// not only by time: 20,000 made-up accounts, each with one call that
// ended, leave at most 2,000 remembered (past maxIdleAccounts, 1,000, the
// idle unverified ones go, once a second on the limiter's clock), and a
// verified one stays.
func TestIdleMadeUpAccountsAreForgotten(t *testing.T) {
	clk := clock.NewFake(time.Unix(0, 0))
	l := New(Config{MaxConcurrent: 10, MaxWait: time.Second}, clk)
	l.Verify("AC-real", "c")
	for i := range 20_000 {
		if i%1000 == 0 {
			clk.Advance(time.Second)
		}
		ls, err := l.Acquire(context.Background(), fmt.Sprint("AC-made-up-", i), "c")
		if err != nil {
			t.Fatal(err)
		}
		ls.Done(Served)
	}
	n, real := len(l.Accounts()), false
	for _, st := range l.Accounts() {
		real = real || st.Account == "AC-real"
	}
	if n > 2000 || !real {
		t.Fatalf("%d accounts remembered (the verified one: %v), want at most 2,000 and it", n, real)
	}
}

// Issue 35, point 2: MaxWait counts from the request's arrival
// (WithWaited): a request that already waited all of it is refused at
// once when it would have to wait, one that waited half waits the other
// half, and one that finds room goes at once whatever it waited.
func TestMaxWaitCountsFromArrival(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 4, MaxWait: time.Second}, clk) // slow start: 1
	held, err := l.Acquire(WithWaited(context.Background(), time.Hour), "AC1", "c")
	if err != nil {
		t.Fatalf("a turn with room, after a long wait elsewhere: %v", err)
	}
	var rej *RejectedError
	if _, err := l.Acquire(WithWaited(context.Background(), time.Second), "AC1", "c"); !errors.As(err, &rej) {
		t.Fatalf("no room, max_wait already spent: %v, want a refusal at once", err)
	}
	half := make(chan error, 1)
	go func() {
		_, err := l.Acquire(WithWaited(context.Background(), 500*time.Millisecond), "AC1", "c")
		half <- err
	}()
	queued(t, l, "AC1", 1)
	clk.Advance(499 * time.Millisecond)
	select {
	case err := <-half:
		t.Fatalf("refused %v before the rest of its max_wait", err)
	default:
	}
	clk.Advance(time.Millisecond)
	if err := <-half; !errors.As(err, &rej) {
		t.Fatalf("after the rest of its max_wait: %v, want a refusal", err)
	}
	held.Done(Served)
}

// Issue 35, point 1: a place in the rate window is held by its call until
// it ends and for a second after, not a second from its start: Twilio
// counts a call when it reaches it, between its start and its end, so the
// call after it, starting a second after its end, reaches Twilio more than
// a second later however long either took on the way.
func TestARatePlaceLastsASecondPastItsCallsEnd(t *testing.T) {
	clk := newFake()
	s := newLocalSlots(2, clk)
	tk := Ticket{Account: "AC1", Limit: 10, Priority: Read}
	var places []Place
	for range 2 {
		p, wait, err := s.Take(context.Background(), tk)
		if p == nil || wait != 0 || err != nil {
			t.Fatalf("a place of an empty window: %v %s %v", p, wait, err)
		}
		places = append(places, p)
	}
	clk.Advance(1500 * time.Millisecond) // both calls still in flight
	if p, _, _ := s.Take(context.Background(), tk); p != nil {
		t.Fatal("a third call started while the window's two were in flight (a second from their start had passed)")
	}
	places[0].Release()
	clk.Advance(999 * time.Millisecond)
	if p, wait, _ := s.Take(context.Background(), tk); p != nil || wait != time.Millisecond {
		t.Fatalf("999 ms after the first call ended: %v, wait %s; want to wait 1 ms more", p, wait)
	}
	clk.Advance(time.Millisecond)
	p, _, _ := s.Take(context.Background(), tk)
	if p == nil {
		t.Fatal("a second after the first call ended, no place")
	}
	p.Release()
	places[1].Release()
}
