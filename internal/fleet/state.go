package fleet

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/rueidis"
)

// The fleet's state in Redis is a few numbers: the epoch, the floor and
// one mark per scope. This file keeps replicas from trusting that state
// when it cannot be trusted (docs/fleet.md, "Faults"):
//
//   - Redis went backwards (restarted from an older snapshot, failed over
//     to a lagging replica, flushed): an epoch lower than one this replica
//     saw before, or none at all. The replica raises the epoch past what it
//     saw and the floor to it: entries shared before are misses fleet-wide.
//   - Garbage: an epoch, floor or mark that is not a number, or so large
//     that INCR would soon overflow. It is counted and reported
//     (ErrCorrupt), the replica drops its L1 and is unhealthy until the
//     state reads right again (Watch, every second).

// ErrCorrupt: Redis holds a fleet epoch, floor or mark that is not a
// valid number (written by something other than cacheproxy).
var ErrCorrupt = errors.New("fleet: Redis holds an epoch, floor or mark that is not a valid number; fix or delete the key (redis.key_prefix) to repair")

// maxEpoch is the largest epoch trusted: INCR is never near overflowing.
const maxEpoch = 1 << 62

func (f *Fleet) floorKey() string { return f.cfg.Prefix + "floor" }

// state is what keeps a replica from trusting Redis when it should not.
type state struct {
	seen      atomic.Uint64 // the highest epoch read or raised here
	floor     atomic.Uint64 // the highest floor read or raised here
	badUntil  atomic.Int64  // unix nanos: unhealthy until then (garbage seen)
	lastAlarm atomic.Int64
	// onReset drops this replica's L1 (the Invalidator's; nil: none).
	onReset atomic.Pointer[func()]
	// onError hears of garbage, at most once a second.
	onError atomic.Pointer[func(error)]

	Corrupt, Rewinds atomic.Int64
}

func (s *state) reset() {
	if fn := s.onReset.Load(); fn != nil {
		(*fn)()
	}
}

// CorruptReads counts reads of garbage; Rewinds, the times Redis was
// found gone backwards.
func (f *Fleet) CorruptReads() int64 { return f.st.Corrupt.Load() }

// Rewinds counts the times Redis's epoch was lower than one seen here.
func (f *Fleet) Rewinds() int64 { return f.st.Rewinds.Load() }

// Healthy reports whether Redis's state read right in the last two
// seconds (no garbage).
func (f *Fleet) Healthy() bool { return time.Now().UnixNano() >= f.st.badUntil.Load() }

// corrupt counts garbage, drops L1, and says so (at most once a second).
func (f *Fleet) corrupt() error {
	f.st.Corrupt.Add(1)
	now := time.Now()
	f.st.badUntil.Store(now.Add(2 * time.Second).UnixNano())
	f.st.reset()
	if last := f.st.lastAlarm.Load(); now.UnixNano()-last > int64(time.Second) && f.st.lastAlarm.CompareAndSwap(last, now.UnixNano()) {
		if fn := f.st.onError.Load(); fn != nil {
			(*fn)(ErrCorrupt)
		}
	}
	return ErrCorrupt
}

// garbage reports Redis's answer to INCR (or a script's) on a value that
// is not an integer, or that would overflow.
func garbage(err error) bool {
	re, ok := rueidis.IsRedisErr(err)
	return ok && (strings.Contains(re.Error(), "not an integer") || strings.Contains(re.Error(), "overflow"))
}

// number reads an epoch, floor or mark: 0 when absent.
func (f *Fleet) number(r rueidis.RedisResult) (uint64, error) {
	s, err := r.ToString()
	if rueidis.IsRedisNil(err) {
		return 0, f.result(nil)
	}
	if err := f.result(err); err != nil {
		return 0, err
	}
	n, perr := strconv.ParseUint(s, 10, 64)
	if perr != nil || n > maxEpoch {
		return 0, f.corrupt()
	}
	return n, nil
}

// checked returns an epoch read from Redis, or after a rewind the raised
// one, given the highest epoch this replica had seen when it asked
// (epochs only grow, so a lower one means Redis went backwards).
func (f *Fleet) checked(ctx context.Context, c rueidis.Client, epoch, seenBefore uint64) (uint64, error) {
	if epoch < seenBefore {
		return f.rewind(ctx, c, seenBefore)
	}
	for {
		s := f.st.seen.Load()
		if epoch <= s || f.st.seen.CompareAndSwap(s, epoch) {
			return epoch, nil
		}
	}
}

// rewind: Redis went backwards. Raise the epoch past every epoch this
// replica saw and the floor to it, so that nothing shared before (entries
// and marks restored from an older state) is trusted; drop L1 too.
func (f *Fleet) rewind(ctx context.Context, c rueidis.Client, seen uint64) (uint64, error) {
	f.st.Rewinds.Add(1)
	f.st.reset()
	return f.raiseFloor(ctx, c, seen+1)
}

// raiseFloor raises the epoch to at least min, then the floor to the
// epoch: every entry shared at an earlier epoch is a miss from then on.
func (f *Fleet) raiseFloor(ctx context.Context, c rueidis.Client, min uint64) (uint64, error) {
	epoch, err := raiseEpoch.Exec(ctx, c, []string{f.epochKey()}, []string{strconv.FormatUint(min, 10)}).AsUint64()
	if err := f.result(err); err != nil {
		if garbage(err) {
			return 0, f.corrupt()
		}
		return 0, err
	}
	if _, err := raiseEpoch.Exec(ctx, c, []string{f.floorKey()}, []string{strconv.FormatUint(epoch, 10)}).AsUint64(); f.result(err) != nil {
		if garbage(err) {
			return 0, f.corrupt()
		}
		return 0, err
	}
	f.observeFloor(epoch)
	_, _ = f.checked(ctx, c, epoch, 0)
	return epoch, nil
}

func (f *Fleet) observeFloor(n uint64) {
	for {
		s := f.st.floor.Load()
		if n <= s || f.st.floor.CompareAndSwap(s, n) {
			return
		}
	}
}

// InvalidateAll makes every shared entry a miss (a floor at a new epoch):
// for invalidations that could not be kept while Redis was away.
func (f *Fleet) InvalidateAll(ctx context.Context) error {
	c, ctx, cancel, err := f.conn(ctx)
	defer cancel()
	if err != nil {
		return err
	}
	_, err = f.raiseFloor(ctx, c, f.st.seen.Load()+1)
	return err
}

// watch reads the epoch and floor every second until stop: garbage keeps
// the replica unhealthy (and its L1 dropped), and a Redis that went
// backwards is noticed even while nobody reads.
func (f *Fleet) watch() {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-f.stop:
			return
		case <-tick.C:
		}
		if c := f.c(); c != nil {
			ctx, cancel := f.ctx(context.Background())
			_, _ = f.Epoch(ctx)
			cancel()
		}
	}
}

// unsent holds the invalidations this replica applied locally but could
// not put into Redis yet (bounded: past maxUnsent batches they become one
// "everything"). While it covers a scope, this replica trusts no shared
// entry of that scope.
type unsent struct {
	mu      sync.Mutex
	batches []batch
	all     bool
	n       atomic.Int64 // batches held (or 1 for all), read without the lock
}

// batch is one unsent invalidation; or, with ends, the completion of this
// replica's write numbered ends (its intent kept as member, its pending
// named pending).
type batch struct {
	tags            []string
	ends            uint64
	member, pending string
}

const maxUnsent = 1024

func (u *unsent) add(b batch) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if !u.all && len(u.batches) < maxUnsent {
		u.batches = append(u.batches, b)
	} else {
		// Past the bound, everything: completions dropped here end by
		// their intents' hold, on every replica.
		u.all, u.batches = true, nil
	}
	u.n.Store(int64(len(u.batches)) + b2i(u.all))
}

func b2i(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// covers reports whether a shared entry of tags may be hidden by an
// invalidation not yet in Redis.
func (u *unsent) covers(tags []string) bool {
	if u.n.Load() == 0 {
		return false
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.all {
		return true
	}
	for _, b := range u.batches {
		for _, t := range b.tags {
			for _, x := range tags {
				if t == x {
					return true
				}
			}
		}
	}
	return false
}

// head is the oldest unsent batch (all: everything), if any.
func (u *unsent) head() (b batch, all, ok bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.all {
		return batch{}, true, true
	}
	if len(u.batches) == 0 {
		return batch{}, false, false
	}
	return u.batches[0], false, true
}

// done drops the head once Redis took it.
func (u *unsent) done(all bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if all {
		u.all = false
	} else if len(u.batches) > 0 {
		u.batches = u.batches[1:]
	}
	u.n.Store(int64(len(u.batches)) + b2i(u.all))
}
