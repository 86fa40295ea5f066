package fleet

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/ratelimit"

	"github.com/redis/rueidis"
)

// Slots are an account's places across the fleet (ratelimit.Slots): the
// Limiter of each replica grants turns (priority, fairness, the adaptive
// cap: docs/budget.md) and each turn takes one of the account's slots in
// Redis, a sorted set of slots scored by their expiry on Redis's
// clock (SlotLife, renewed while the call lasts), so a crashed replica's
// slots come back by themselves within a second. The fleet's rate window is a second sorted set
// beside it; both are evaluated in one script, once per call.
//
// Nothing polls. A call that finds the slots full queues in Redis (a
// sorted set of waiters in priority, then arrival, order) and waits; the
// release of a slot hands it to the first waiter in the same script and
// tells its replica on that replica's own channel. A replica that cannot
// reach Redis, or does not hear its channel, falls back to its share of
// the account's cap: the cap divided by the replicas last seen (each
// replica announces itself every second).
type Slots struct {
	f    *Fleet
	rate int // calls per second for the fleet; 0: none
	id   string

	replicas   atomic.Int64 // last seen, at least 1
	subscribed atomic.Bool  // this replica hears its channel

	mu         sync.Mutex
	fallback   map[string]int // calls in flight per account on the local share
	waiting    map[string]chan string
	lapseAsked map[string]time.Time // when a call last had an account's waiters served (lapseDue)

	n       struct{ waited, handed, fallbacks, sent, regiven atomic.Int64 } // for Stats
	ungiven chan ungiven

	stop context.CancelFunc
	wg   sync.WaitGroup
}

// SlotStats are a Slots' counts since it started.
type SlotStats struct {
	// Waited counts calls that waited for a slot; Handed the slots handed
	// to this replica's waiters by a release; Fallbacks the calls made on
	// the local share.
	Waited, Handed, Fallbacks int64
	// Sent counts the commands the slots sent to Redis (takes, gives,
	// cancellations; announcements left out).
	Sent int64
	// Regiven counts slots given back late: their release, or a take that
	// timed out after Redis may have run it, failed, and was retried.
	Regiven int64
}

// Stats returns the slots' counts.
func (s *Slots) Stats() SlotStats {
	return SlotStats{Waited: s.n.waited.Load(), Handed: s.n.handed.Load(), Fallbacks: s.n.fallbacks.Load(), Sent: s.n.sent.Load(), Regiven: s.n.regiven.Load()}
}

// ungiven is a slot Redis may still hold for this replica: its release
// failed, or a take of it failed after Redis may have run it. Until it is
// given back it counts against the fleet's cap (until it lapses).
type ungiven struct {
	tag, slot string
	until     time.Time
}

// NewSlots returns the fleet's slots, with, if rate > 0, rate calls
// started per second for each account. Close
// stops the replica's announcements and its channel.
func NewSlots(f *Fleet, rate int) *Slots {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Slots{f: f, rate: rate, id: newID(), fallback: map[string]int{},
		waiting: map[string]chan string{}, lapseAsked: map[string]time.Time{}, stop: cancel, ungiven: make(chan ungiven, 4096)}
	s.replicas.Store(1)
	s.wg.Go(func() { s.announce(ctx) })
	s.wg.Go(func() { s.regive(ctx) })
	s.wg.Go(func() { s.listen(ctx) })
	return s
}

// Close stops announcing this replica and listening on its channel.
func (s *Slots) Close() {
	s.stop()
	s.wg.Wait()
}

// unheardRetry is how soon a call asks again while no release can wake
// it: it found the slots full while this replica does not hear its
// channel (at start, or while it subscribes again), or Redis does not
// answer and this replica's share is full.
const unheardRetry = 50 * time.Millisecond

// Replicas is the number of replicas last seen.
func (s *Slots) Replicas() int { return int(s.replicas.Load()) }

// channel is where releases tell this replica of the slots they handed
// to its waiters.
func (s *Slots) channel() string { return s.f.cfg.Prefix + "slots:" + s.id }

// keys are the names of an account's slots, rate window, waiters (their
// order) and what each waits with (its cap, deadline and channel): one
// hash tag, so one Cluster slot.
func (s *Slots) keys(tag string) []string {
	return []string{tag + ":slots", tag + ":rate", tag + ":waiters", tag + ":waiting"}
}

// Take takes one of t.Account's slots, or waits, up to t.Wait, to be
// handed one (ratelimit.Slots).
func (s *Slots) Take(ctx context.Context, t ratelimit.Ticket) (ratelimit.Place, time.Duration, error) {
	tag := accountName(s.f.cfg.Prefix, t.Account)
	slot := newID()
	var handed chan string
	wait := time.Duration(0)
	if s.subscribed.Load() && t.Wait > 0 {
		wait, handed = t.Wait, make(chan string, 1)
		s.mu.Lock()
		s.waiting[slot] = handed
		s.mu.Unlock()
	}
	args := []string{strconv.Itoa(t.Limit), strconv.FormatInt(SlotLife.Milliseconds(), 10), slot, strconv.Itoa(s.rate),
		strconv.FormatInt(wait.Milliseconds(), 10), s.channel(), strconv.Itoa(int(t.Priority))}
	got, held, err := s.take(ctx, tag, args)
	if err != nil || got != 0 {
		s.unwait(slot)
	}
	switch {
	case err != nil:
		// Redis may have run it after the timeout: as a slot, or as a
		// place among the waiters, which a release may hand a slot to
		// until its wait ends. (Given back for a slot's life only, the
		// places of takes sent to a paused Redis outlived it when Redis
		// was killed and restarted from an AOF written before they were
		// given back, and the slots they were handed, told to nobody, held
		// up the calls behind them.)
		s.laterFor(tag, slot, wait+SlotLife)
		return s.share(t)
	case got > 0:
		return s.place(tag, slot, int(held)), 0, nil
	case got < 0:
		return nil, time.Duration(-got) * time.Millisecond, nil
	case handed == nil: // not heard (yet): no release would say when a slot is free
		return nil, unheardRetry, nil
	}
	s.n.waited.Add(1)
	return s.await(ctx, t, tag, slot, handed)
}

// await waits for slot to be handed over, for t.Wait at most. Its
// channel stays registered until then (the listener has removed it when
// it delivered a message), or, for a slot it found without one, until the
// place is released: a message that comes late then is not taken for a
// waiter that had left.
func (s *Slots) await(ctx context.Context, t ratelimit.Ticket, tag, slot string, handed chan string) (ratelimit.Place, time.Duration, error) {
	found := false
	defer func() {
		if !found {
			s.unwait(slot)
		}
	}()
	deadline := time.NewTimer(t.Wait)
	defer deadline.Stop()
	// Pub/sub delivers at most once: a slot handed while this replica's
	// subscription was being restored is told to nobody. Once a second the
	// call looks for its slot in the set itself. And a slot that lapsed
	// (its replica died, or its call's release was lost with a Redis
	// restart) is handed by no release: every lapseCheck, the replica has
	// the waiters served (lapseDue). (Once was not enough: slots
	// renewed just before Redis restarted lapsed after it, and calls waited
	// out max_wait with the slots free, 2 to 36 client 429s in a fault run.)
	check := time.NewTicker(handCheck)
	defer check.Stop()
	lapsed := time.NewTicker(lapseCheck)
	defer lapsed.Stop()
	for {
		select {
		case <-check.C:
			switch n, err := s.held(ctx, tag, slot); {
			case err != nil:
				// Redis cannot be asked (a message handing the slot over
				// may be lost with it): the call goes on with this
				// replica's share, as a take would, and its place (or the
				// slot handed to it) is given back once Redis answers.
				s.later(tag, slot)
				return s.share(t)
			case n > 0:
				found = true
				s.n.handed.Add(1)
				return s.renewed(&fleetPlace{held: n, release: func() { s.unwait(slot); s.giveLater(tag, slot) }}, tag, slot), 0, nil
			case n < 0:
				return nil, time.Millisecond, nil // its place is gone: the Limiter has it take again
			}
			continue
		case <-lapsed.C:
			if s.lapseDue(tag) {
				go s.give(tag, "")
			}
			continue
		case msg := <-handed:
			return s.handed(tag, slot, msg)
		case <-ctx.Done():
			go s.give(tag, slot) // out of the waiters; a slot handed meanwhile goes back
			return nil, 0, ctx.Err()
		case <-deadline.C:
			// Its place in the queue lapses by itself; a slot handed to it
			// as the wait ended is given back (unwait, then listen).
			return nil, 0, &ratelimit.RejectedError{RetryAfter: time.Second, Reason: "fleet-wide max_concurrent reached for max_wait"}
		}
	}
}

// handed is the place a release handed over (msg: the slots held), or,
// with msg negative, how long until the rate window opens.
func (s *Slots) handed(tag, slot, msg string) (ratelimit.Place, time.Duration, error) {
	n, _ := strconv.ParseInt(msg, 10, 64)
	if n < 0 {
		return nil, time.Duration(-n) * time.Millisecond, nil
	}
	s.n.handed.Add(1)
	return s.place(tag, slot, int(n)), 0, nil
}

// handCheck is how often a waiting call looks for a slot handed to it
// whose message was lost.
const handCheck = time.Second

// lapseCheck is how often a replica with calls waiting for an account's
// slots has the waiters served, for slots that lapsed (one call of the
// replica's asks, for all of them). Every slot's life, a slot that lapsed
// just after a look held its waiters up for a second more: after Redis
// was killed and restarted, calls waited out max_wait with slots free in
// 1 of 10 fault runs.
const lapseCheck = SlotLife / 4

// lapseDue reports whether it is this call's turn to have tag's waiters
// served (at most once per lapseCheck for the replica).
func (s *Slots) lapseDue(tag string) bool {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if now.Sub(s.lapseAsked[tag]) < lapseCheck*9/10 {
		return false
	}
	if len(s.lapseAsked) >= 1024 {
		clear(s.lapseAsked)
	}
	s.lapseAsked[tag] = now
	return true
}

// held reports the slots held if slot is among them (handed to this call
// without a message); 0 if the call still waits; -1 if it neither holds
// its slot nor waits (handed while unheard, the slot lapsed, or Redis
// lost both: it takes again); an error if Redis could not be asked.
func (s *Slots) held(ctx context.Context, tag, slot string) (int, error) {
	n, err := s.run(ctx, heldSlot, s.keys(tag)[:3], slot).AsInt64()
	return int(n), s.f.result(err)
}

// run sends one of the slots' scripts to Redis (counted in Sent),
// bounded by redis.timeout.
func (s *Slots) run(ctx context.Context, script *script, keys []string, args ...string) rueidis.RedisResult {
	c, ctx, cancel, err := s.f.conn(ctx)
	defer cancel()
	if err != nil {
		return rueidis.NewErrorResult(err)
	}
	trip(ctx)
	s.n.sent.Add(1)
	return script.Exec(ctx, c, keys, args)
}

func (s *Slots) unwait(slot string) {
	s.mu.Lock()
	delete(s.waiting, slot)
	s.mu.Unlock()
}

// take runs takeSlot: what it returned and the slots held.
func (s *Slots) take(ctx context.Context, tag string, args []string) (int64, int64, error) {
	r, err := s.run(ctx, takeSlot, s.keys(tag), args...).ToArray()
	if err := s.f.result(err); err != nil {
		return 0, 0, err
	}
	if len(r) != 2 {
		return 0, 0, errors.New("fleet: take slot: unexpected reply")
	}
	got, err1 := r[0].AsInt64()
	held, err2 := r[1].AsInt64()
	if err1 != nil || err2 != nil {
		return 0, 0, errors.New("fleet: take slot: unexpected reply")
	}
	return got, held, nil
}

// SlotLife is how long a slot is held without being renewed: a call
// that lasts longer renews its slot every third of it. A slot nobody
// holds (its replica died, its take timed out after Redis ran it, the
// message handing it over was lost) lapses within a slot's life.
const SlotLife = time.Second

// place is a slot held, renewed while held; its release runs off the
// answer's path.
func (s *Slots) place(tag, slot string, held int) ratelimit.Place {
	return s.renewed(&fleetPlace{held: held, release: func() { s.giveLater(tag, slot) }}, tag, slot)
}

// renewed starts p's renewals, every third of a slot's life until released.
func (s *Slots) renewed(p *fleetPlace, tag, slot string) *fleetPlace {
	var renew func()
	renew = func() {
		if s.renew(tag, slot) {
			p.mu.Lock()
			if !p.released {
				p.timer = time.AfterFunc(SlotLife/3, renew)
			}
			p.mu.Unlock()
		}
	}
	p.mu.Lock()
	p.timer = time.AfterFunc(SlotLife/3, renew)
	p.mu.Unlock()
	return p
}

// renew extends slot's life; false when it was not held any more (or
// Redis did not answer: the next renewal is not tried, the slot lapses).
func (s *Slots) renew(tag, slot string) bool {
	n, err := s.run(context.Background(), renewSlot, s.keys(tag)[:2], slot, strconv.FormatInt(SlotLife.Milliseconds(), 10)).AsInt64()
	return s.f.result(err) == nil && n > 0
}

type fleetPlace struct {
	held    int
	once    sync.Once
	release func()

	mu       sync.Mutex
	timer    *time.Timer // the next renewal, if any
	released bool
}

func (p *fleetPlace) Held() int { return p.held }
func (p *fleetPlace) Release() {
	p.once.Do(func() {
		p.mu.Lock()
		p.released = true
		if p.timer != nil {
			p.timer.Stop()
		}
		p.mu.Unlock()
		p.release()
	})
}

// giveLater gives a slot back off the caller's path.
func (s *Slots) giveLater(tag, slot string) {
	go s.give(tag, slot)
}

// give gives a slot back, or has regive do it if Redis does not answer.
func (s *Slots) give(tag, slot string) {
	if s.release(tag, slot) != nil {
		s.later(tag, slot)
	}
}

func (s *Slots) release(tag, slot string) error {
	exact := "0" // PUBLISH counts every subscriber only on one Redis
	if c := s.f.c(); c != nil && c.Mode() != rueidis.ClientModeCluster {
		exact = "1"
	}
	return s.f.result(s.run(context.Background(), giveSlot, s.keys(tag), slot, strconv.FormatInt(SlotLife.Milliseconds(), 10), strconv.Itoa(s.rate), tag, exact).Error())
}

// listen hears, on this replica's channel, the slots releases handed to
// its waiters; one whose waiter has left is given back at once.
func (s *Slots) listen(ctx context.Context) {
	retry, lost := retryEvery, time.Now()
	for ctx.Err() == nil {
		var upAt atomic.Int64 // when it subscribed (UnixNano), 0: never
		if c := s.f.c(); c != nil {
			hooked := rueidis.WithOnSubscriptionHook(ctx, func(sub rueidis.PubSubSubscription) {
				up := sub.Kind == "subscribe"
				if up {
					upAt.Store(time.Now().UnixNano())
				}
				s.subscribed.Store(up)
			})
			_ = c.Receive(hooked, c.B().Subscribe().Channel(s.channel()).Build(), func(m rueidis.PubSubMessage) {
				// "slot held tag", or "slot -ms tag" (the rate window).
				f := strings.Fields(m.Message)
				if len(f) != 3 {
					return
				}
				s.mu.Lock()
				ch := s.waiting[f[0]]
				delete(s.waiting, f[0])
				s.mu.Unlock()
				if ch != nil {
					ch <- f[1]
				} else if !strings.HasPrefix(f[1], "-") {
					go s.give(f[2], f[0]) // its waiter had left
				}
			})
			s.subscribed.Store(false)
		}
		// As the invalidation stream does (resubscribe): a slot handed to
		// this replica while it does not hear its channel is held for a
		// slot's life by nobody. (Waiting a second each time, a Redis
		// killed and restarted left the fleet's slots with no waiter to
		// take them, and calls waited out max_wait: 1 fault run in 25.)
		if up := upAt.Load(); up != 0 {
			retry, lost = retryEvery, time.Now()
			if time.Since(time.Unix(0, up)) >= time.Second {
				retry = 0
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(retry):
		}
		retry = resubscribe(retry, time.Since(lost))
	}
}

// later queues a slot to be given back by regive (dropped if the queue is
// full: it lapses by itself).
func (s *Slots) later(tag, slot string) { s.laterFor(tag, slot, SlotLife) }

// laterFor queues a slot, or a place among the waiters, to be given back
// by regive for up to life (the place's, or the wait's and then the
// slot's that a release may hand it).
func (s *Slots) laterFor(tag, slot string, life time.Duration) {
	select {
	case s.ungiven <- ungiven{tag: tag, slot: slot, until: time.Now().Add(life)}:
	default:
	}
}

// regive gives back, every 50 ms until Redis answers, the slots whose
// release failed (until they would have lapsed anyway).
func (s *Slots) regive(ctx context.Context) {
	var pending []ungiven
	var again <-chan time.Time // armed only while slots are pending
	for {
		select {
		case <-ctx.Done():
			return
		case u := <-s.ungiven:
			pending = append(pending, u)
			if again == nil {
				again = time.After(50 * time.Millisecond)
			}
			continue
		case <-again:
			again = nil
		}
		kept := pending[:0]
		for _, u := range pending {
			switch {
			case time.Now().After(u.until):
			case s.release(u.tag, u.slot) == nil:
				s.n.regiven.Add(1)
			default:
				kept = append(kept, u)
			}
		}
		pending = kept
		if len(pending) > 0 {
			again = time.After(50 * time.Millisecond)
		}
	}
}

func (s *Slots) announce(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		if c := s.f.c(); c != nil {
			actx, cancel := s.f.ctx(ctx)
			n, err := announce.Exec(actx, c, []string{s.f.cfg.Prefix + "replicas"}, []string{s.id}).AsInt64()
			cancel()
			if s.f.result(err) == nil && n > 0 {
				s.replicas.Store(n)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// share takes one of this replica's share of the account's cap, for when
// Redis cannot be asked: the cap divided by the replicas last seen. With
// none free, the call asks again (Redis first) after unheardRetry: while
// Redis does not answer, no release can say when a slot is free.
func (s *Slots) share(t ratelimit.Ticket) (ratelimit.Place, time.Duration, error) {
	limit := max(1, t.Limit/max(1, int(s.replicas.Load())))
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fallback[t.Account] >= limit {
		return nil, unheardRetry, nil
	}
	s.fallback[t.Account]++
	s.n.fallbacks.Add(1)
	return &fleetPlace{release: func() { s.unshare(t.Account) }}, 0, nil
}

func (s *Slots) unshare(acct string) {
	s.mu.Lock()
	if s.fallback[acct]--; s.fallback[acct] == 0 {
		delete(s.fallback, acct)
	}
	s.mu.Unlock()
}
