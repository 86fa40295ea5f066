package ratelimit

import (
	"context"
	"math"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// acquireAs is acquire in priority p.
func acquireAs(l *Limiter, p Priority, user, cred string) <-chan result {
	ch := make(chan result, 1)
	go func() {
		ls, err := l.Acquire(WithPriority(context.Background(), p), user, cred)
		ch <- result{ls, err, time.Time{}}
	}()
	return ch
}

// One budget, one order: with the cap's turns held, waiting reads and
// refreshes queue first, and a write that comes last gets the next turn;
// a read goes before a refresh.
func TestWritesGoFirst(t *testing.T) {
	l := New(Config{MaxConcurrent: 4, MaxWait: time.Hour}, newFake()) // slow start: 1
	held, _ := l.Acquire(context.Background(), "AC1", "c")
	refresh := acquireAs(l, Background, "AC1", "c")
	queued(t, l, "AC1", 1)
	reads := make([]<-chan result, 3)
	for i := range reads {
		reads[i] = acquireAs(l, Read, "AC1", "c")
		queued(t, l, "AC1", 2+i)
	}
	write := acquireAs(l, Write, "AC1", "c")
	queued(t, l, "AC1", 5)
	held.Done(Unused)
	w := <-write
	if w.err != nil {
		t.Fatal(w.err)
	}
	if st := l.State("AC1"); st.Queued != 4 {
		t.Fatalf("after the write's turn: %+v, want the four others waiting", st)
	}
	next := w.turn
	for i := range reads {
		next.Done(Unused)
		r := <-reads[i]
		if r.err != nil {
			t.Fatalf("read %d: %v", i, r.err)
		}
		next = r.turn
	}
	select {
	case r := <-refresh:
		t.Fatalf("the refresh went before a read: %+v", r)
	default:
	}
	next.Done(Unused)
	r := <-refresh
	if r.err != nil {
		t.Fatal(r.err)
	}
	r.turn.Done(Unused)
}

// While a write is in flight, reads leave what is left of WriteShare of
// the cap free for the writes that follow it: a cap of 10 with a share of
// 0.2 (2) lets 8 reads beside the write, and a second write starts at
// once beside them.
func TestWriteShareIsKeptForWrites(t *testing.T) {
	l := New(Config{MaxConcurrent: 10, MaxWait: time.Hour, WriteShare: 0.2}, newFake())
	l.newAccountAt("AC1", 10)
	write, err := l.Acquire(WithPriority(context.Background(), Write), "AC1", "c")
	if err != nil {
		t.Fatal(err)
	}
	var turns []Turn
	for range 8 {
		ls, err := l.Acquire(context.Background(), "AC1", "c")
		if err != nil {
			t.Fatal(err)
		}
		turns = append(turns, ls)
	}
	ninth := acquireAs(l, Read, "AC1", "c")
	queued(t, l, "AC1", 1) // 1 write + 8 reads in flight: the rest is the writes'
	second, err := l.Acquire(WithPriority(context.Background(), Write), "AC1", "c")
	if err != nil {
		t.Fatal(err)
	}
	if st := l.State("AC1"); st.InFlight != 10 || st.Queued != 1 {
		t.Fatalf("%+v: want 2 writes and 8 reads in flight, 1 read waiting", st)
	}
	write.Done(Served)
	second.Done(Served)
	r := <-ninth // no write left: the reads have the whole cap
	if r.err != nil {
		t.Fatal(r.err)
	}
	r.turn.Done(Served)
	for _, ls := range turns {
		ls.Done(Served)
	}
}

// newAccountAt makes id's budget one past slow start at cap (a test's
// starting point).
func (l *Limiter) newAccountAt(id string, cap int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	a := l.accountLocked(id)
	a.slowStart, a.cap, a.lastUse = false, float64(cap), l.clock.Now()
}

// Twilio's header steers the cap: a 429's tells the limit (one less than
// the requests in flight it reports) and cuts as without the header; each
// other answer's tells the other clients' share (the most reported of the
// recent reports beyond ours in flight), taken off the limit; an answer with
// room, with no 429 for a while, lifts the cut at once, and the others'
// leaving shows once the reports of their time are old, without another
// 429.
func TestTwiliosHeaderSteersTheCap(t *testing.T) {
	clk := newFake()
	l := New(Config{MaxConcurrent: 25, MaxWait: time.Hour}, clk)
	if c := l.State("AC1").Cap; c != 7 {
		t.Fatalf("slow start at %d, want 7", c)
	}
	var ls []Turn
	for range 5 {
		x, err := l.Acquire(context.Background(), "AC1", "c")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, x)
	}
	ls[4].Saw(11) // others hold 6 of the account's 10: the 5th of ours is refused
	ls[4].Done(Throttled)
	if st := l.State("AC1"); st.Limit != 10 || st.Cap != 4 || st.SlowStart {
		t.Fatalf("after a 429 reporting 11 with 5 in flight: %+v, want limit 10 and the cap cut to 4", st)
	}
	ls[0].Saw(10) // 4 of ours in flight, 6 others'
	ls[0].Done(Served)
	if st := l.State("AC1"); st.Others != 6 || st.Cap != 4 {
		t.Fatalf("%+v: want others 6, cap 10-6 = 4", st)
	}
	clk.Advance(othersWindow / 2)
	ls[1].Saw(7) // 3 of ours in flight: it says 4 others, low by ours still on their way
	ls[1].Done(Served)
	if st := l.State("AC1"); st.Others != 6 || st.Cap != 4 {
		t.Fatalf("%+v: one low report within the window changed nothing: want others 6, cap 4", st)
	}
	clk.Advance(2 * othersWindow)
	ls[2].Saw(2) // the others left: 2 of ours, nobody else
	ls[2].Done(Served)
	if st := l.State("AC1"); st.Others != 0 || st.Cap != 10 {
		t.Fatalf("%+v: want others 0 and the cap at the limit at once, with no 429", st)
	}
	ls[3].Saw(16) // the account took more than the limit: it is at least that
	ls[3].Done(Served)
	if st := l.State("AC1"); st.Limit != 16 {
		t.Fatalf("%+v: want the limit raised to 16", st)
	}
	// Past Recover with no header, the others' report lapses; the limit stays.
	clk.Advance(time.Minute)
	if st := l.State("AC1"); st.Others != 0 || st.Limit != 16 || st.Cap != 16 {
		t.Fatalf("%+v", st)
	}
}

// Calls that end together start together: in each round of four of ours
// (others holding 6), the first to reach Twilio reports 7 in flight (3
// others beyond our 4), the next 8, then 9, and only the last 10. The
// others counted stay 6 through rounds of such reports: a share taken from
// them would let a fifth call of ours through each second, into a 429 (the
// upper quartile counted 5). Once the others leave, the first of a round
// of ten, alone at Twilio, proves there are none for the whole round: a
// call of it that others of ours overtook reports 5 more than there are,
// and the share stays 0 (the most reported alone counted 6, the old
// share, for the window's half second, then the overtaken calls' 5).
func TestTheOthersCountedKeepToWhatAnswersProve(t *testing.T) {
	clk := newFake()
	a := &account{}
	step := othersWindow / othersSamples / 2
	for round := range 8 {
		began := clk.Now()
		for i := range 4 {
			clk.Advance(step)
			a.seeOthers(3+i, 6+i, began, clk.Now()) // 4 of ours in flight, the answer among them
			if round > 0 && a.others != 6 {
				t.Fatalf("round %d, answer %d: others %d, want 6", round+1, i+1, a.others)
			}
		}
	}
	began := clk.Now()
	clk.Advance(step)
	a.seeOthers(0, 0, began, clk.Now()) // the others left: the first of a round of ten, alone
	for range 9 {
		clk.Advance(step)
		a.seeOthers(5, 9, began, clk.Now()) // overtaken by others of ours
		if a.others != 0 {
			t.Fatalf("others %d in a round whose first answer was alone at Twilio, want 0", a.others)
		}
	}
}

// A 429 for another limit (a per-endpoint rate, not 20429) backs its call
// off and leaves the cap as it was; Twilio's 20429 cuts it.
func TestOtherLimitsDoNotCutTheCap(t *testing.T) {
	l := New(Config{MaxConcurrent: 8, MaxWait: time.Hour}, newFake())
	l.newAccountAt("AC1", 8)
	var ls []Turn
	for range 4 {
		x, _ := l.Acquire(context.Background(), "AC1", "c")
		ls = append(ls, x)
	}
	ls[0].Done(Limited)
	if c := l.State("AC1").Cap; c != 8 {
		t.Fatalf("cap after a 429 of another limit: %d, want 8", c)
	}
	ls[1].Done(Throttled)
	if c := l.State("AC1").Cap; c >= 8 {
		t.Fatalf("cap after a 20429: %d, want cut", c)
	}
	for _, x := range ls[2:] {
		x.Done(Served)
	}
}

// blockingSlots hold every call until let go, counting their places.
type blockingSlots struct {
	mu   sync.Mutex
	held int
	go_  chan struct{}
}

type countedPlace struct{ s *blockingSlots }

func (p countedPlace) Held() int { return 0 }
func (p countedPlace) Release() {
	p.s.mu.Lock()
	p.s.held--
	p.s.mu.Unlock()
}

func (s *blockingSlots) Take(ctx context.Context, t Ticket) (Place, time.Duration, error) {
	select {
	case <-s.go_:
	case <-ctx.Done():
		return nil, 0, ctx.Err()
	}
	s.mu.Lock()
	s.held++
	s.mu.Unlock()
	return countedPlace{s}, 0, nil
}

// The Slots are part of the one waiting: a call taking its place counts
// against the cap but not as in flight (a 429 meanwhile cuts to what is
// at the upstream), its wait is in Waited, and its place goes back with
// the turn.
func TestTheSlotsWaitIsPartOfTheTurn(t *testing.T) {
	clk := newFake()
	s := &blockingSlots{go_: make(chan struct{})}
	l := New(Config{MaxConcurrent: 4, MaxWait: time.Hour, Slots: s}, clk) // slow start: 1
	r := acquire(l, clk, context.Background(), "AC1", "c")
	ratelimitWait(t, l, func(st State) bool { return st.Taking == 1 })
	second := acquire(l, clk, context.Background(), "AC1", "c")
	queued(t, l, "AC1", 1) // the cap of 1 is taken by the call taking its place
	if st := l.State("AC1"); st.InFlight != 0 {
		t.Fatalf("%+v: a call taking its place is not in flight", st)
	}
	clk.Advance(3 * time.Second)
	s.go_ <- struct{}{}
	g := <-r
	if g.err != nil || g.turn.Waited() != 3*time.Second {
		t.Fatalf("%v, waited %v; want the 3 s of the Slots' wait", g.err, g.turn.Waited())
	}
	g.turn.Done(Served)
	s.go_ <- struct{}{}
	g = <-second
	g.turn.Done(Served)
	if s.held != 0 {
		t.Fatalf("%d places not given back", s.held)
	}
}

func ratelimitWait(t *testing.T, l *Limiter, cond func(State) bool) {
	t.Helper()
	timeout := time.After(time.Minute)
	for {
		changed := l.Changed()
		if cond(l.State("AC1")) {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("never: %+v", l.State("AC1"))
		}
	}
}

// memBook is a KeyBook in memory: the fleet's, for one test.
type memBook struct {
	mu sync.Mutex
	m  map[string]string
}

func (b *memBook) Lookup(_ context.Context, key string) (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	a, ok := b.m[key]
	return a, ok
}

func (b *memBook) Store(key, acct string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.m[key] = acct
}

// A key learned on one replica counts against its account on another
// from that replica's first call with it.
func TestKeysLearnedElsewhereCount(t *testing.T) {
	book := &memBook{m: map[string]string{}}
	one := New(Config{MaxConcurrent: 4, MaxWait: time.Hour, Keys: book}, newFake())
	two := New(Config{MaxConcurrent: 4, MaxWait: time.Hour, Keys: book}, newFake())
	one.Learn("SK1", "AC1")
	ls, err := two.Acquire(context.Background(), "SK1", "key")
	if err != nil {
		t.Fatal(err)
	}
	if st := two.State("AC1"); st.InFlight != 1 {
		t.Fatalf("the key's call on replica two: %+v, want it in AC1's budget", st)
	}
	ls.Done(Served)
}

// ticketSlots records the tickets of the places it gives at once.
type ticketSlots struct {
	mu      sync.Mutex
	tickets []Ticket
}

func (s *ticketSlots) Take(_ context.Context, t Ticket) (Place, time.Duration, error) {
	s.mu.Lock()
	s.tickets = append(s.tickets, t)
	s.mu.Unlock()
	return noPlace{}, 0, nil
}

func (s *ticketSlots) last() Ticket {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tickets[len(s.tickets)-1]
}

// Slow start paces this replica's own calls, not the fleet's slots: in
// slow start a ticket's limit is what the cap can reach (MaxConcurrent,
// less the other clients' share the header reports), so three replicas
// starting together are not bound by one replica's first cap; after a
// cut, it is the cut cap, for the whole fleet.
func TestSlowStartDoesNotBoundTheFleetsSlots(t *testing.T) {
	s := &ticketSlots{}
	l := New(Config{MaxConcurrent: 10, MaxWait: time.Hour, Slots: s}, newFake())
	first, err := l.Acquire(context.Background(), "AC1", "c")
	if err != nil {
		t.Fatal(err)
	}
	if st, tk := l.State("AC1"), s.last(); !st.SlowStart || st.Cap != 3 || tk.Limit != 10 {
		t.Fatalf("slow start: %+v, ticket limit %d; want cap 3 here and 10 for the slots", st, tk.Limit)
	}
	first.Saw(6) // others hold 5 of the account's calls; its limit is not known
	first.Done(Served)
	second, _ := l.Acquire(context.Background(), "AC1", "c")
	if st, tk := l.State("AC1"), s.last(); tk.Limit != 5 || st.Limit != 0 {
		t.Fatalf("slow start with others holding 5: %+v, ticket limit %d; want 10-5, and no limit taken from an answer that was not a 429", st, tk.Limit)
	}
	second.Done(Throttled) // without the header: a cut
	third, _ := l.Acquire(context.Background(), "AC1", "c")
	defer third.Done(Served)
	if st, tk := l.State("AC1"), s.last(); st.SlowStart || tk.Limit != st.Cap {
		t.Fatalf("after a cut: %+v, ticket limit %d; want the cut cap", st, tk.Limit)
	}
}

// Hostile input, round three, point 1: a Twilio-Concurrent-Requests that
// no account can have (99999, 10^12, 2^63-1) is ignored, as if the answer
// had none: the cap is what it would be without it, neither the others
// nor the limit move, a 429 carrying one cuts as a 429 without the header,
// each is counted, and one event a minute says so.
func TestImpossibleReportsAreIgnored(t *testing.T) {
	clk := newFake()
	var events []Event
	l := New(Config{MaxConcurrent: 25, MaxWait: time.Hour, OnEvent: func(e Event) { events = append(events, e) }}, clk)
	plain := New(Config{MaxConcurrent: 25, MaxWait: time.Hour}, clk)
	run := func(l *Limiter, report int, o Outcome) {
		x, err := l.Acquire(context.Background(), "AC1", "c")
		if err != nil {
			t.Fatal(err)
		}
		if report > 0 {
			x.Saw(report)
		}
		x.Done(o)
	}
	for i, n := range []int{99999, 999999999999, math.MaxInt64, MaxReported + 1} {
		run(l, n, Served)
		run(plain, 0, Served)
		if st, want := l.State("AC1"), plain.State("AC1"); st.Cap != want.Cap || st.Others != 0 || st.Limit != 0 {
			t.Fatalf("after report %d (%d): %+v, want the cap of a budget without the header, %d", i, n, st, want.Cap)
		}
	}
	run(l, MaxReported, Served) // the most believed: 1000 in flight, 1 of them ours
	if st := l.State("AC1"); st.Others != MaxReported-1 || st.Cap != 1 {
		t.Fatalf("a report of %d: %+v, want others %d and the cap at 1", MaxReported, st, MaxReported-1)
	}
	clk.Advance(time.Hour)
	run(l, math.MaxInt64, Throttled)
	run(plain, 0, Throttled)
	if st, want := l.State("AC1"), plain.State("AC1"); st.Cap != want.Cap || st.Limit != 0 {
		t.Fatalf("a 429 reporting 2^63-1: %+v, want the cut of a 429 without the header (cap %d), no limit", st, want.Cap)
	}
	if n := l.IgnoredReports(); n != 5 {
		t.Fatalf("%d reports counted as ignored, want 5", n)
	}
	var told []Event
	for _, e := range events {
		if e.Kind == ReportIgnored {
			told = append(told, e)
		}
	}
	if len(told) != 2 || told[0].InFlight != 99999 || told[0].To != 1 || told[1].InFlight != math.MaxInt64 || told[1].To != 4 {
		t.Fatalf("events %+v, want two, a minute apart: the first report, then the four since", told)
	}
}

// Hostile input, round three, point 2: writes first does not mean writes
// only. With the cap (10) held by writes and 40 more writes and 20 reads
// waiting, each turn freed goes to a write once in five (WriteShare 0.2)
// and to a read otherwise, the first to a write; once the reads are
// served the writes have every turn again.
func TestAFloodOfWritesLeavesReadsTheirShare(t *testing.T) {
	l := New(Config{MaxConcurrent: 10, MaxWait: time.Hour, WriteShare: 0.2}, newFake())
	l.newAccountAt("AC1", 10)
	var held []Turn
	for range 10 {
		w, err := l.Acquire(WithPriority(context.Background(), Write), "AC1", "c")
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, w)
	}
	type pending struct {
		ch    <-chan result
		write bool
	}
	var waiting []pending
	for i := range 60 {
		write := i%3 != 2 // 40 writes, 20 reads, interleaved in arrival
		p := Read
		if write {
			p = Write
		}
		waiting = append(waiting, pending{acquireAs(l, p, "AC1", "c"), write})
		queued(t, l, "AC1", i+1)
	}
	var got strings.Builder
	for len(waiting) > 0 {
		held[0].Done(Served)
		held = held[1:]
		cases := make([]reflect.SelectCase, len(waiting))
		for i, w := range waiting {
			cases[i] = reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(w.ch)}
		}
		cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(time.After(time.Minute))})
		i, v, _ := reflect.Select(cases)
		if i == len(waiting) {
			t.Fatalf("turns went %s, then a turn freed went to nobody", got.String())
		}
		r := v.Interface().(result)
		if r.err != nil {
			t.Fatal(r.err)
		}
		held = append(held, r.turn)
		if waiting[i].write {
			got.WriteByte('W')
		} else {
			got.WriteByte('R')
		}
		waiting = append(waiting[:i], waiting[i+1:]...)
	}
	for _, h := range held {
		h.Done(Served)
	}
	want := "WRRRWRRRRWRRRRWRRRRWRRRRWR" + strings.Repeat("W", 34)
	if got.String() != want {
		t.Fatalf("turns went %s, want %s", got.String(), want)
	}
}
