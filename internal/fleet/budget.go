package fleet

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/ratelimit"

	"github.com/redis/rueidis"
)

// Budget makes an account's ratelimit.max_concurrent and
// ratelimit.requests_per_second totals for the whole fleet (it satisfies
// proxy.Budget). A call first gets its turn from this
// replica's Limiter (fair turns across credentials, bounded waiting, the
// adaptive cap: ratelimit's rules, docs/budget.md), then one of the
// account's slots in Redis: a sorted set of slot leases scored by their
// expiry on Redis's clock, so a crashed replica's slots come back after
// the upstream timeout by themselves. A replica that cannot reach Redis
// falls back to its share of the account's cap: the cap divided by the
// replicas last seen (each replica announces itself every second).
type Budget struct {
	local   *ratelimit.Limiter
	f       *Fleet
	cap     int
	rate    int           // calls per second for the fleet; 0: none
	ttl     time.Duration // a slot's lease: the upstream timeout
	maxWait time.Duration
	id      string

	replicas atomic.Int64 // last seen, at least 1
	mu       sync.Mutex
	fallback map[string]int // calls in flight per account on the local share

	Waited, Fallbacks atomic.Int64
	// Regiven counts slots given back late: their release, or a take that
	// timed out after Redis may have run it, failed, and was retried.
	Regiven atomic.Int64
	ungiven chan ungiven

	stop context.CancelFunc
	done chan struct{}
	wg   sync.WaitGroup
}

// ungiven is a slot Redis may still hold for this replica: its ZREM
// failed, or a take of it failed after Redis may have run it. Until it is
// given back it counts against the fleet's cap (until it lapses).
type ungiven struct {
	key, slot string
	until     time.Time
}

// budgetPoll is how often a call waiting for a fleet slot asks again (a
// wait on other processes, on the real clock).
const budgetPoll = 5 * time.Millisecond

// NewBudget wraps local with the fleet's account-wide cap of maxConcurrent
// calls in flight and, if rate > 0, rate calls started per second; a slot
// lapses after ttl. Close stops the replica's announcements.
func NewBudget(local *ratelimit.Limiter, f *Fleet, maxConcurrent, rate int, ttl, maxWait time.Duration) *Budget {
	ctx, cancel := context.WithCancel(context.Background())
	b := &Budget{local: local, f: f, cap: maxConcurrent, rate: rate, ttl: ttl, maxWait: maxWait, id: newID(),
		fallback: map[string]int{}, stop: cancel, done: make(chan struct{}), ungiven: make(chan ungiven, 4096)}
	b.replicas.Store(1)
	go b.announce(ctx)
	b.wg.Go(func() { b.regive(ctx) })
	return b
}

// Close stops announcing this replica.
func (b *Budget) Close() {
	b.stop()
	<-b.done
	b.wg.Wait()
}

// regive gives back, every 50 ms until Redis answers, the slots whose
// release failed (until they would have lapsed anyway).
func (b *Budget) regive(ctx context.Context) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var pending []ungiven
	for {
		select {
		case <-ctx.Done():
			return
		case u := <-b.ungiven:
			pending = append(pending, u)
			continue
		case <-tick.C:
		}
		kept := pending[:0]
		for _, u := range pending {
			switch {
			case time.Now().After(u.until):
			case b.release(u.key, u.slot) == nil:
				b.Regiven.Add(1)
			default:
				kept = append(kept, u)
			}
		}
		pending = kept
	}
}

// later queues a slot to be given back by regive (dropped if the queue is
// full: it lapses by itself).
func (b *Budget) later(key, slot string) {
	select {
	case b.ungiven <- ungiven{key: key, slot: slot, until: time.Now().Add(b.ttl)}:
	default:
	}
}

// Replicas is the number of replicas last seen.
func (b *Budget) Replicas() int { return int(b.replicas.Load()) }

// announce records this replica in Redis every second and counts the
// replicas seen in the last five.
var announce = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 5000)
redis.call('PEXPIRE', KEYS[1], 10000)
return redis.call('ZCARD', KEYS[1])`)

func (b *Budget) announce(ctx context.Context) {
	defer close(b.done)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		if c := b.f.c(); c != nil {
			actx, cancel := b.f.ctx(ctx)
			n, err := announce.Exec(actx, c, []string{b.f.cfg.Prefix + "replicas"}, []string{b.id}).AsInt64()
			cancel()
			if b.f.result(err) == nil && n > 0 {
				b.replicas.Store(n)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// takeSlot leases one of the account's slots (KEYS[1]) until it is given
// back or lapses, if fewer than ARGV[1] are held and, with a rate (ARGV[4]
// > 0), fewer than ARGV[4] calls started in the last second (KEYS[2], a
// sliding window of start times, as on one replica: docs/budget.md). Both
// on Redis's clock. It returns 1 when taken, 0 when the slots are full,
// and -ms when only the rate window is: how long until it opens.
var takeSlot = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local rate = tonumber(ARGV[4])
if rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 1000)
  if redis.call('ZCARD', KEYS[2]) >= rate then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return -math.max(1, tonumber(oldest[2]) + 1000 - now)
  end
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], 2000)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1`)

// Acquire waits for this replica's turn, then for a slot of the account's
// fleet-wide cap (within ratelimit.max_wait in all).
func (b *Budget) Acquire(ctx context.Context, user, credential string) (ratelimit.Lease, error) {
	start := time.Now()
	ls, err := b.local.Acquire(ctx, user, credential)
	if err != nil {
		return nil, err
	}
	acct := b.local.AccountOf(user)
	// The account's keys share a hash tag: one Cluster slot.
	tag := accountName(b.f.cfg.Prefix, acct)
	key, window := tag+":slots", tag+":rate"
	slot := newID()
	args := []string{strconv.Itoa(b.cap), strconv.FormatInt(b.ttl.Milliseconds(), 10), slot, strconv.Itoa(b.rate)}
	deadline := time.NewTimer(max(0, b.maxWait-time.Since(start)))
	defer deadline.Stop()
	tick := time.NewTicker(budgetPoll)
	defer tick.Stop()
	waited := false
	for {
		got, err := b.take(ctx, []string{key, window}, args)
		if err != nil {
			b.later(key, slot) // Redis may have run it after the timeout
			if release, ok := b.share(acct); ok {
				b.Fallbacks.Add(1)
				return &fleetLease{Lease: ls, release: release}, nil
			}
		} else if got {
			return &fleetLease{Lease: ls, release: func() { go b.give(key, slot) }}, nil // off the answer's path
		}
		if !waited {
			waited = true
			b.Waited.Add(1)
		}
		select {
		case <-ctx.Done():
			ls.Done(ratelimit.Unused)
			return nil, ctx.Err()
		case <-deadline.C:
			ls.Done(ratelimit.Unused)
			return nil, &ratelimit.RejectedError{RetryAfter: time.Second, Reason: "fleet-wide max_concurrent reached for max_wait"}
		case <-tick.C:
		}
	}
}

func (b *Budget) take(ctx context.Context, keys []string, args []string) (bool, error) {
	c, ctx, cancel, err := b.f.conn(ctx)
	defer cancel()
	if err != nil {
		return false, err
	}
	trip(ctx)
	n, err := takeSlot.Exec(ctx, c, keys, args).AsInt64()
	if err := b.f.result(err); err != nil {
		return false, err
	}
	return n == 1, nil
}

// give gives a slot back, or has regive do it if Redis does not answer.
func (b *Budget) give(key, slot string) {
	if b.release(key, slot) != nil {
		b.later(key, slot)
	}
}

func (b *Budget) release(key, slot string) error {
	c, ctx, cancel, err := b.f.conn(context.Background())
	defer cancel()
	if err != nil {
		return err
	}
	trip(ctx)
	return b.f.result(c.Do(ctx, c.B().Zrem().Key(key).Member(slot).Build()).Error())
}

// share takes one of this replica's share of the account's cap, for when
// Redis cannot be asked: the cap divided by the replicas last seen.
func (b *Budget) share(acct string) (func(), bool) {
	limit := max(1, b.cap/max(1, int(b.replicas.Load())))
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fallback[acct] >= limit {
		return nil, false
	}
	b.fallback[acct]++
	return func() {
		b.mu.Lock()
		if b.fallback[acct]--; b.fallback[acct] == 0 {
			delete(b.fallback, acct)
		}
		b.mu.Unlock()
	}, true
}

// fleetLease gives the fleet slot back with the local turn.
type fleetLease struct {
	ratelimit.Lease
	once    sync.Once
	release func()
}

func (l *fleetLease) Done(o ratelimit.Outcome) {
	l.once.Do(l.release)
	l.Lease.Done(o)
}

// Learn, Verify, Knows and Accounts are the local Limiter's.
func (b *Budget) Learn(key, acct string)         { b.local.Learn(key, acct) }
func (b *Budget) Verify(user, credential string) { b.local.Verify(user, credential) }
func (b *Budget) Knows(key string) bool          { return b.local.Knows(key) }
func (b *Budget) Accounts() []ratelimit.State    { return b.local.Accounts() }
