package fleet

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/invalidation"

	"github.com/redis/rueidis"
)

// A write through a replica is announced before it is sent: its intent
// (docs/fleet.md, "Read-your-writes across replicas"). The intent raises the write's marks in Redis,
// is kept in Redis until the write ends (the intents set, for replicas that
// subscribe meanwhile) and is told to every replica, which keeps the
// write's scopes *pending*: nothing of them is valid there, in L1 or L2,
// until the write's completion is heard, or, failing that, until the
// intent's hold has passed (longer than the write may take), when the
// replica raises the marks itself. So a read that starts after a write's
// answer never returns data from before it, whatever happened to the
// writer's link after its intent was recorded; and an intent that cannot
// be recorded refuses the write before anything is sent upstream.

// ErrNotRecorded: a write's intent could not be recorded in Redis in time;
// the write must not be sent (it is safe to retry).
var ErrNotRecorded = errors.New("fleet: the write's intent could not be recorded in Redis in time (nothing was sent upstream)")

// Intent is a write announced to the fleet; End ends it.
type Intent struct {
	i      *Invalidator
	id     string // sender:seq, the pending's name everywhere
	seq    uint64
	tags   []string
	member string // as kept in the intents set (the message, sealed)
	acks   chan struct{}
	want   int64     // acknowledgements to wait for
	sent   time.Time // when Redis took it
	ended  atomic.Bool
}

// Deadline is when the write must have ended: past it, the replicas stop
// waiting for its completion and raise its marks themselves.
func (in *Intent) Deadline() time.Time { return in.sent.Add(in.i.writeHold) }

// Intend records the intent of a write that changes tags: marks raised in
// Redis, kept in the intents set, told to every replica (their
// acknowledgements are awaited by End, while the write runs). It waits at
// most the intent bound (ratelimit.max_wait), trying again every 50 ms; an
// error means nothing may be sent (ErrNotRecorded).
func (i *Invalidator) Intend(ctx context.Context, tags []string) (invalidation.Intent, error) {
	bound := time.Now().Add(i.intentWait)
	for {
		in, err := i.intend(ctx, tags, bound)
		if err == nil || ctx.Err() != nil || time.Until(bound) < 50*time.Millisecond {
			if err != nil {
				i.fail(err)
				i.n.refused.Add(1)
				return nil, ErrNotRecorded
			}
			return in, nil
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (i *Invalidator) intend(ctx context.Context, tags []string, bound time.Time) (*Intent, error) {
	c := i.f.c()
	if c == nil {
		return nil, errNotConnected
	}
	ctx, cancel := context.WithDeadline(ctx, bound)
	defer cancel()
	// Garbage in the epoch (an error, reported) leaves the marks unraised:
	// the intent still goes out, and the replicas keep its scopes pending
	// until somebody can raise them.
	epoch, err := i.f.raiseEpoch(ctx, c)
	if err != nil && !errors.Is(err, ErrCorrupt) {
		return nil, err
	}
	seq := i.seq.Add(1)
	in := &Intent{i: i, seq: seq, id: i.id + ":" + strconv.FormatUint(seq, 10), tags: tags, acks: i.register(seq)}
	in.member = string(i.sealMsg(&i.f.keys[0], i.id, seq, message{Tags: tags, E: epoch, Hold: i.holdMs()}, i.channel()))
	var runs []scriptRun
	if epoch > 0 {
		runs = i.f.markRuns(tags, epoch)
	}
	runs = append(runs, addIntent.with([]string{i.intentsKey()}, strconv.FormatInt(i.holdMs(), 10),
		strconv.FormatInt(i.f.cfg.Retention.Milliseconds(), 10), in.member))
	cmds := make(rueidis.Commands, 0, len(runs)+1)
	for _, r := range runs {
		cmds = append(cmds, r.cmd(c))
	}
	cmds = append(cmds, c.B().Spublish().Channel(i.channel()).Message(in.member).Build())
	count := i.countRun()
	cmds = append(cmds, count.cmd(c))
	trip(ctx)
	rs := c.DoMulti(ctx, cmds...)
	for k, r := range runs {
		if err := i.f.result(r.again(ctx, c, rs[k]).Error()); err != nil {
			i.unregister(seq)
			return nil, err
		}
	}
	if err := i.f.result(rs[len(runs)].Error()); err != nil {
		i.unregister(seq)
		return nil, err
	}
	in.want = i.counted(ctx, c, count, rs[len(runs)+1])
	in.sent = time.Now()
	i.n.sent.Add(1)
	if epoch > 0 {
		i.f.heard.add(tags, epoch)
	}
	i.f.pend.add(in.id, tags, in.sent.Add(i.writeHold+intentMargin), in.member)
	i.local.Invalidate(ctx, tags)
	i.expireNow()
	return in, nil
}

// intentMargin is how much longer than the write may take its intent is
// kept pending: the time a write's message may take to arrive.
const intentMargin = time.Second

// holdMs is how long a replica keeps an intent's scopes pending without
// its completion, in milliseconds.
func (i *Invalidator) holdMs() int64 { return (i.writeHold + intentMargin).Milliseconds() }

// intentsKey is the set of intents not yet ended (in the stream's slot).
func (i *Invalidator) intentsKey() string { return i.f.cfg.Prefix + "{inv}intents" }

// End ends the write (applied: it may have changed something; extra are
// scopes only its answer named): it waits for the intent's
// acknowledgements (at most InvalidationWait since it was recorded),
// invalidates tags and extra here and returns the new epoch, then sends
// the completion, which lifts the pending everywhere: at once if Redis
// takes it within redis.timeout, else from the queue of unsent
// invalidations. Ending twice does nothing.
func (in *Intent) End(ctx context.Context, applied bool, extra []string) uint64 {
	i := in.i
	if !in.ended.CompareAndSwap(false, true) {
		return i.local.Epoch()
	}
	i.awaitAcks(ctx, in.seq, in.acks, in.want, in.sent.Add(i.wait))
	i.unregister(in.seq)
	var tags []string // not applied: nothing changed, the completion only lifts the pending
	if applied {
		tags = append(append([]string(nil), in.tags...), extra...)
	}
	epoch := i.local.Invalidate(ctx, tags)
	b := batch{tags: tags, ends: in.seq, member: in.member, pending: in.id}
	if i.f.unsent.n.Load() > 0 || i.complete(ctx, b, i.f.cfg.Timeout) != nil {
		i.queue(b) // after those before it, in order
	}
	return epoch
}

// complete puts an ended write's completion into Redis (its marks raised
// again, its intent removed from the set) and tells the fleet, within d;
// the replicas lift its pending on hearing it (they do not acknowledge).
func (i *Invalidator) complete(ctx context.Context, b batch, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	c := i.f.c()
	if c == nil {
		return errNotConnected
	}
	var e uint64
	if len(b.tags) > 0 {
		var err error
		if e, err = i.f.raiseEpoch(ctx, c); err != nil {
			return err
		}
		for _, r := range raiseMark.ExecMulti(ctx, c, i.f.markExecs(b.tags, e)...) {
			if err := i.f.result(r.Error()); err != nil {
				return err
			}
		}
		i.f.heard.add(b.tags, e)
	}
	msg := i.sealMsg(&i.f.keys[0], i.id, i.seq.Add(1), message{Tags: b.tags, E: e, Ends: b.ends}, i.channel())
	trip(ctx)
	rs := c.DoMulti(ctx, c.B().Zrem().Key(i.intentsKey()).Member(b.member).Build(),
		c.B().Spublish().Channel(i.channel()).Message(rueidis.BinaryString(msg)).Build())
	for _, r := range rs {
		if err := i.f.result(r.Error()); err != nil {
			return err
		}
	}
	i.f.pend.end(b.pending) // (not counted as sent: a write counts once, by its intent)
	i.local.Invalidate(ctx, b.tags)
	return nil
}

// register makes the channel seq's acknowledgements arrive on.
func (i *Invalidator) register(seq uint64) chan struct{} {
	acks := make(chan struct{}, 64)
	i.mu.Lock()
	i.waiters[seq] = acks
	i.mu.Unlock()
	return acks
}

func (i *Invalidator) unregister(seq uint64) {
	i.mu.Lock()
	delete(i.waiters, seq)
	i.mu.Unlock()
}

// awaitAcks waits for want acknowledgements on acks until deadline; its
// error says how many did not come.
func (i *Invalidator) awaitAcks(ctx context.Context, seq uint64, acks chan struct{}, want int64, deadline time.Time) error {
	timeout := time.NewTimer(time.Until(deadline))
	defer timeout.Stop()
	for got := int64(0); got < want; got++ {
		select {
		case <-acks:
			i.n.acked.Add(1)
		case <-timeout.C:
			i.n.unacked.Add(want - got)
			err := errors.New("invalidation: " + strconv.FormatInt(want-got, 10) + " of " +
				strconv.FormatInt(want, 10) + " replicas did not acknowledge within redis.invalidation_wait")
			i.fail(err)
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (i *Invalidator) expireNow() {
	select {
	case i.expiring <- struct{}{}:
	default:
	}
}

// expire raises the marks of every intent whose hold has passed without
// its completion (its writer lost Redis, or died), in Redis and here, and
// lifts its pending; one Redis did not take is tried again every 50 ms.
func (i *Invalidator) expire(ctx context.Context) {
	var checked time.Time
	for {
		var wake <-chan time.Time
		var t *time.Timer
		if next, ok := i.f.pend.next(); ok {
			if old, ok := i.f.pend.oldest(); ok {
				next = minTime(next, maxTime(old.Add(checkAfter), checked.Add(checkAfter)))
			}
			t = time.NewTimer(max(time.Until(next), 50*time.Millisecond))
			wake = t.C
		}
		select {
		case <-ctx.Done():
		case <-i.expiring:
		case <-wake:
		}
		if t != nil {
			t.Stop()
		}
		if ctx.Err() != nil {
			return
		}
		for _, p := range i.f.pend.due(time.Now()) {
			if i.lift(ctx, p) != nil {
				break
			}
		}
		// A completion not heard for checkAfter: its writer's link may
		// have failed after Redis took it. The intents set says which
		// ended (recall), so a lost completion holds its scopes for about
		// checkAfter, not the whole hold.
		if old, ok := i.f.pend.oldest(); ok && time.Since(old) >= checkAfter && time.Since(checked) >= checkAfter &&
			i.subscribed.Load() && i.recalled.Load() {
			checked = time.Now()
			_ = i.recall(ctx)
		}
	}
}

// checkAfter is how long a write stays pending here before this replica
// asks Redis whether it ended (and, while any does, how often). In the
// fault run, lost completions held their scopes for the hold, 16 s: 40%
// of the reads that found nothing valid.
const checkAfter = 250 * time.Millisecond

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// lift raises an expired intent's marks in Redis and here and removes it
// from the intents set; its pending ends once Redis took the marks.
func (i *Invalidator) lift(ctx context.Context, p *pendingWrite) error {
	ctx, cancel := context.WithTimeout(ctx, i.intentWait)
	defer cancel()
	if p.all {
		if err := i.f.InvalidateAll(ctx); err != nil {
			return err
		}
		i.local.InvalidateAll()
		i.f.pend.end(p.id)
		return nil
	}
	if _, err := i.f.raise(ctx, p.tags); err != nil {
		return err
	}
	if c := i.f.c(); c != nil && p.member != "" {
		_ = c.Do(ctx, c.B().Zrem().Key(i.intentsKey()).Member(p.member).Build()).Error()
	}
	i.n.lifted.Add(1)
	i.local.Invalidate(ctx, p.tags)
	i.f.pend.end(p.id)
	return nil
}

// recall reads the intents not yet ended, once a subscription is
// confirmed (those sent before it were not heard): each still within its
// hold is pending here for what is left of it; one past it is lifted. A
// write pending here whose intent has left the set ended (its completion
// or its lifting raised its marks first) while this replica did not hear:
// its pending ends, unless Redis went backwards (it may have lost the
// intent, not ended it).
func (i *Invalidator) recall(ctx context.Context) error {
	c, cctx, cancel, err := i.f.conn(ctx)
	defer cancel()
	if err != nil {
		return err
	}
	started, seen := time.Now(), i.f.st.seen.Load()
	trip(cctx)
	all, err := readIntents.Exec(cctx, c, []string{i.intentsKey()}, nil).ToArray()
	if err := i.f.result(err); err != nil {
		return err
	}
	if len(all)%2 != 1 {
		return errors.New("fleet: the intents set reads wrong")
	}
	now, err := all[0].AsInt64()
	if err != nil {
		return err
	}
	type member struct {
		Member string
		Score  float64
	}
	var members []member
	for k := 1; k+1 < len(all); k += 2 {
		m, err1 := all[k].ToString()
		sc, err2 := all[k+1].AsFloat64()
		if err1 != nil || err2 != nil {
			return errors.New("fleet: the intents set reads wrong")
		}
		members = append(members, member{m, sc})
	}
	epoch, err := i.f.number(c.Do(cctx, c.B().Get().Key(i.f.epochKey()).Build()))
	if err != nil {
		return err
	}
	kept := map[string]bool{}
	for _, m := range members {
		left := time.Duration(max(0, int64(m.Score)-now)) * time.Millisecond
		var msg message
		from, seq, _, ok := parseHeader([]byte(m.Member))
		if !ok || i.openMsg([]byte(m.Member), i.channel(), &msg) < 0 {
			// Not one this replica can read: it might cover anything.
			i.f.pend.add(m.Member, nil, time.Now().Add(left), m.Member)
			kept[m.Member] = true
			continue
		}
		id := from + ":" + strconv.FormatUint(seq, 10)
		kept[id] = true
		i.f.pend.add(id, msg.Tags, time.Now().Add(left), m.Member)
		i.local.Invalidate(ctx, msg.Tags)
	}
	if epoch >= seen {
		// Ended in Redis: the completion (or a lift) raised the epoch and
		// the marks before it took the intent out. Those marks are at
		// most epoch: taken here at epoch, they hide no less.
		for _, w := range i.f.pend.keepOnly(kept, started) {
			if w.all {
				i.local.InvalidateAll()
				continue
			}
			i.f.heard.add(w.tags, epoch)
			i.local.Invalidate(ctx, w.tags)
		}
	}
	i.expireNow()
	return nil
}

// pendingWrite is an intent heard and not yet ended.
type pendingWrite struct {
	id       string
	tags     []string
	all      bool // an intent this replica could not open
	deadline time.Time
	member   string
	added    time.Time
}

// pending are the intents this replica heard (or recalled) and whose
// completion it has not: their scopes are valid nowhere here.
type pending struct {
	mu     sync.Mutex
	writes map[string]*pendingWrite
	count  map[string]int // pending writes per scope
	all    int            // pending writes that cover everything
	n      atomic.Int64   // len(writes), read without the lock
}

// maxPending bounds the intents kept one by one; past it, an intent
// covers everything until its hold passes.
const maxPending = 1 << 16

// add makes tags pending until deadline (nil tags: everything).
func (p *pending) add(id string, tags []string, deadline time.Time, member string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.writes == nil {
		p.writes, p.count = map[string]*pendingWrite{}, map[string]int{}
	}
	if _, ok := p.writes[id]; ok {
		return
	}
	w := &pendingWrite{id: id, tags: tags, all: tags == nil, deadline: deadline, member: member, added: time.Now()}
	if len(p.writes) >= maxPending {
		w.tags, w.all = nil, true
	}
	p.writes[id] = w
	if w.all {
		p.all++
	}
	for _, t := range w.tags {
		p.count[t]++
	}
	p.n.Store(int64(len(p.writes)))
}

// keepOnly ends the writes added before t that are not in kept, and
// returns them.
func (p *pending) keepOnly(kept map[string]bool, t time.Time) []*pendingWrite {
	p.mu.Lock()
	defer p.mu.Unlock()
	var ended []*pendingWrite
	for id, w := range p.writes {
		if !kept[id] && w.added.Before(t) {
			ended = append(ended, w)
			p.endLocked(id)
		}
	}
	return ended
}

// end lifts a pending write.
func (p *pending) end(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.endLocked(id)
}

func (p *pending) endLocked(id string) {
	w, ok := p.writes[id]
	if !ok {
		return
	}
	delete(p.writes, id)
	if w.all {
		p.all--
	}
	for _, t := range w.tags {
		if p.count[t]--; p.count[t] <= 0 {
			delete(p.count, t)
		}
	}
	p.n.Store(int64(len(p.writes)))
}

// covers reports whether any of tags is pending.
func (p *pending) covers(tags []string) bool {
	if p.n.Load() == 0 {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.all > 0 {
		return true
	}
	for _, t := range tags {
		if p.count[t] > 0 {
			return true
		}
	}
	return false
}

// next is the earliest deadline.
func (p *pending) next() (time.Time, bool) {
	return p.earliest(func(w *pendingWrite) time.Time { return w.deadline })
}

// oldest is when the longest pending write was added (false: none).
func (p *pending) oldest() (time.Time, bool) {
	return p.earliest(func(w *pendingWrite) time.Time { return w.added })
}

// earliest is the earliest of(w) over the pending writes (false: none).
func (p *pending) earliest(of func(*pendingWrite) time.Time) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var at time.Time
	for _, w := range p.writes {
		if t := of(w); at.IsZero() || t.Before(at) {
			at = t
		}
	}
	return at, !at.IsZero()
}

// due are the writes whose deadline has passed by now.
func (p *pending) due(now time.Time) []*pendingWrite {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []*pendingWrite
	for _, w := range p.writes {
		if !w.deadline.After(now) {
			out = append(out, w)
		}
	}
	return out
}

// cmpOr is d, or def if d is not positive.
func cmpOr(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}
