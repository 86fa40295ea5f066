package fleet

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cacheproxy/internal/invalidation"

	"github.com/redis/rueidis"
)

// Invalidator is the fleet's invalidator (it satisfies proxy.Invalidator).
// Reads check this replica's own marks, which L1 hits read without a Redis
// call. A write's invalidation goes, before the write's response is sent:
//
//  1. into Redis's marks (which shared entries are checked against);
//  2. into this replica's marks;
//  3. to every other replica, over Redis sharded pub/sub, sealed under a key
//     derived from cache.key_secret: each applies it to its own marks and
//     acknowledges; the writer waits for an acknowledgement from every
//     replica announced with a secret it has, at most InvalidationWait.
//
// A replica that does not acknowledge in time is counted and logged
// (OnError); one whose subscription has dropped is told nothing until it
// is back (docs/fleet.md says what that means for its L1).
//
// A writer's wait is tied to the readers' trust by heartbeats beside the
// stream: each replica publishes one every InvalidationWait/4 on a channel
// of its own in the stream's hash slot (hbChannel; while it reads) and
// trusts its marks only while the last of its own it has heard back was
// sent less than InvalidationWait ago. The stream and the heartbeats come
// on one connection in the order Redis took them, so a
// replica that heard a heartbeat sent after an invalidation went out has
// applied that invalidation; and a writer that did not get a replica's
// acknowledgement waited InvalidationWait after publishing: a replica that
// has not applied it by then has no recent heartbeat either, and serves
// nothing from L1 (docs/fleet.md, "Trust").
type Invalidator struct {
	local *invalidation.Local
	f     *Fleet
	wait  time.Duration
	// onError hears of a failed or unacknowledged fleet-wide invalidation
	// (the local one is applied regardless).
	onError func(error)

	id      string // this replica, in messages and its ack channel
	seq     atomic.Uint64
	mu      sync.Mutex
	waiters map[uint64]chan struct{}

	n      struct{ sent, received, acked, unacked, lapses, unopened, lifted, refused, queued atomic.Int64 } // for Stats
	born   time.Time                                                                                        // heartbeats carry monotonic time since
	heard  atomic.Int64                                                                                     // the sending time of the latest own heartbeat heard back
	lapsed atomic.Bool
	// used is when this replica last read (its time since born, updated
	// at most every useGrain); resting is set while it heartbeats not,
	// having read nothing for restAfter: its L1 is dropped at its next
	// read, which goes to L2 and wakes the heartbeats (beat).
	used       atomic.Int64
	resting    atomic.Bool
	beat       chan struct{}
	subscribed atomic.Bool
	// recalled: the intents sent before the current subscription are
	// pending here (recall); nothing is valid until they are.
	recalled atomic.Bool
	// trusted: subscribed, announced (so every intent recorded since
	// waits for this replica), and every message sent before that heard
	// (maybeTrust). Until then nothing is valid here (so nothing is kept
	// in or served from L1). trustFrom: when (since born) the current
	// announcement streak's first answer came back, 0 if none; trustMu
	// orders the two.
	trusted     atomic.Bool
	trustFrom   atomic.Int64
	trustMu     sync.Mutex
	announceNow chan struct{} // subscribed: announce at once
	peers       atomic.Int64  // other replicas sharing a secret with this one, subscribed
	lastAlarm   atomic.Int64
	kick        chan struct{} // unsent invalidations to retry
	firstTrust  chan struct{} // closed when first trusted
	trustOnce   sync.Once
	// writeHold is the longest a write may take (ratelimit.max_wait and
	// the upstream timeout); intentWait, the longest it waits for its
	// intent to be recorded (intent.go).
	writeHold, intentWait time.Duration
	expiring              chan struct{} // an intent added: its deadline may be the next

	stop context.CancelFunc
	done chan struct{}
}

// message is one invalidation on the wire (sealed; its sender and number
// are in its header). All: everything (invalidations that could not be
// kept while Redis was away). A heartbeat is a message numbered 0 that
// carries its sending time (Beat, nanoseconds since its sender started).
type message struct {
	Tags []string `json:"t,omitempty"`
	All  bool     `json:"a,omitempty"`
	Beat int64    `json:"h,omitempty"`
	// Hold: an intent (Intend), whose scopes are pending for this many
	// milliseconds unless its completion comes; Ends: the completion of
	// the sender's intent numbered Ends.
	Hold int64  `json:"i,omitempty"`
	Ends uint64 `json:"n,omitempty"`
	// E is the fleet epoch the invalidation marked its scopes with in
	// Redis (0: unknown, Redis's epoch was garbage).
	E uint64 `json:"e,omitempty"`
}

// ack is an acknowledgement on the wire, of invalidation Seq of replica To
// (sealed like the invalidations, so that nobody without a secret can
// forge one; its header names the acknowledging replica).
type ack struct {
	To  string `json:"t"`
	Seq uint64 `json:"s"`
}

// NewInvalidator starts this replica's subscription to the fleet's
// invalidations; Close ends it.
func NewInvalidator(f *Fleet, local *invalidation.Local, wait time.Duration, onError func(error)) *Invalidator {
	ctx, cancel := context.WithCancel(context.Background())
	i := &Invalidator{local: local, f: f, wait: wait, onError: onError, id: newID(), born: time.Now(),
		waiters: map[uint64]chan struct{}{}, stop: cancel, done: make(chan struct{}), firstTrust: make(chan struct{}), announceNow: make(chan struct{}, 1),
		kick: make(chan struct{}, 1), beat: make(chan struct{}, 1), expiring: make(chan struct{}, 1),
		writeHold: cmpOr(f.cfg.WriteHold, ClaimHold), intentWait: cmpOr(f.cfg.IntentWait, time.Second)}
	reset := func() { i.local.InvalidateAll() }
	f.st.onReset.Store(&reset)
	report := i.fail
	f.st.onError.Store(&report)
	var wg sync.WaitGroup
	wg.Go(func() { i.subscribe(ctx) })
	wg.Go(func() { i.retry(ctx) })
	wg.Go(func() { i.announce(ctx) })
	wg.Go(func() { i.heartbeat(ctx) })
	wg.Go(func() { i.expire(ctx) })
	go func() { wg.Wait(); close(i.done) }()
	return i
}

// InvalidatorStats are an Invalidator's counts since it started.
type InvalidatorStats struct {
	// Sent counts this replica's invalidations sent to the fleet;
	// Received, other replicas' applied here.
	Sent, Received int64
	// Acked counts acknowledgements of this replica's invalidations;
	// Unacked, replicas that did not acknowledge within the wait.
	Acked, Unacked int64
	// Lapses counts the times this replica's stream fell more than the
	// wait behind (its L1 was dropped).
	Lapses int64
	// Unopened counts invalidations this replica could not open (sealed
	// under another cache.key_secret): each dropped its whole L1.
	Unopened int64
	// Lifted counts intents whose completion never came here: their
	// marks were raised by this replica once their hold had passed.
	Lifted int64
	// Refused counts writes whose intent could not be recorded: they were
	// answered 503, nothing sent upstream.
	Refused int64
	// Queued counts invalidations and completions Redis did not take in
	// time: kept and retried (Unsent says how many wait now).
	Queued int64
}

// Stats returns the invalidator's counts.
func (i *Invalidator) Stats() InvalidatorStats {
	return InvalidatorStats{Sent: i.n.sent.Load(), Received: i.n.received.Load(), Acked: i.n.acked.Load(), Unacked: i.n.unacked.Load(),
		Lapses: i.n.lapses.Load(), Unopened: i.n.unopened.Load(), Lifted: i.n.lifted.Load(), Refused: i.n.refused.Load(), Queued: i.n.queued.Load()}
}

// Close ends the subscription.
func (i *Invalidator) Close() {
	i.stop()
	<-i.done
}

// WaitTrusted blocks until this replica is first trusted (it hears the
// stream and writers count it), or ctx ends.
func (i *Invalidator) WaitTrusted(ctx context.Context) error {
	select {
	case <-i.firstTrust:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Subscribed reports whether this replica hears the fleet's invalidations.
func (i *Invalidator) Subscribed() bool { return i.subscribed.Load() }

// The fleet's channels are sharded (SPUBLISH, SSUBSCRIBE: Redis 7 and
// Valkey) and share one hash slot: on a Cluster every replica then
// listens on the node that owns it, and SPUBLISH counts all of them.
func (i *Invalidator) channel() string             { return i.f.cfg.Prefix + "{inv}" }
func (i *Invalidator) ackChannel(id string) string { return i.f.cfg.Prefix + "{inv}ack:" + id }

// hbChannel is this replica's heartbeats' channel: in the stream's hash
// slot, heard on the same connection, so a heartbeat comes back after
// every invalidation published before it; and its own, so no replica
// hears another's (each used to hear every replica's: N² messages).
func (i *Invalidator) hbChannel() string { return i.f.cfg.Prefix + "{inv}hb:" + i.id }

// Epoch is this replica's epoch. A stream found more than
// InvalidationWait behind raises it first (once per lapse), so that no
// entry is served on an earlier check (load's local): what L1 holds may
// have been invalidated by a write whose writer stopped waiting, and is
// served again only once the stream is current. Nothing is dropped: the
// stream is one connection, delivered in order, so the replica hears
// every invalidation published before the heartbeat that makes it
// current again; one that loses messages loses its subscription, and
// that drops L1 (subscribe). (Dropping L1 at each lapse cost the fault
// run's hit ratio: docs/fleet.md, "A reader whose stream lags".)
//
// Epoch is called once per read: it also keeps the heartbeats going,
// which stop after restAfter without a read (an idle replica costs Redis
// and its peers nothing); the read that finds them stopped wakes them,
// and is a lapse not counted as one.
func (i *Invalidator) Epoch() uint64 {
	now := time.Since(i.born).Nanoseconds()
	if now-i.used.Load() >= useGrain.Nanoseconds() {
		i.used.Store(now)
	}
	switch {
	case i.currentAt(now):
		if i.lapsed.Load() {
			i.lapsed.Store(false)
		}
	case i.trusted.Load() && i.lapsed.CompareAndSwap(false, true):
		i.local.Invalidate(context.Background(), nil)
		if !i.resting.Load() {
			i.n.lapses.Add(1)
		}
	}
	if i.resting.Load() {
		select {
		case i.beat <- struct{}{}:
		default:
		}
	}
	return i.local.Epoch()
}

// useGrain is how often a read updates when this replica last read.
const useGrain = 100 * time.Millisecond

// restAfter is how long without a read a replica's heartbeats go on (a
// variable only so that a test need not wait ten seconds).
var restAfter = 10 * time.Second

// current reports whether this replica heard back one of its own
// heartbeats sent less than InvalidationWait ago.
func (i *Invalidator) current() bool { return i.currentAt(time.Since(i.born).Nanoseconds()) }

func (i *Invalidator) currentAt(now int64) bool {
	return now-i.heard.Load() < i.wait.Nanoseconds()
}

// WrittenWithin reports whether this replica heard of a write to any of
// tags, its own or another replica's, less than d ago.
func (i *Invalidator) WrittenWithin(tags []string, d time.Duration) bool {
	return i.local.WrittenWithin(tags, d)
}

// Valid checks this replica's marks; nothing is valid while the replica is
// not trusted (not hearing the stream, or not yet counted by writers) or
// its stream is behind.
func (i *Invalidator) Valid(epoch uint64, tags []string) bool {
	return i.trusted.Load() && i.recalled.Load() && i.current() && !i.f.pend.covers(tags) && i.local.Valid(epoch, tags)
}

// Trusted reports whether this replica hears the fleet's invalidations
// and every writer waits for it: only then is its L1 served (/readyz).
func (i *Invalidator) Trusted() bool { return i.trusted.Load() }

// Pending is the number of other replicas' writes this replica holds
// pending: their intent heard, their completion not yet. A read it covers
// is fetched and not kept.
func (i *Invalidator) Pending() int64 { return i.f.pend.n.Load() }

// Unsent is the number of invalidations applied here but not yet in
// Redis (1 for "everything").
func (i *Invalidator) Unsent() int64 { return i.f.unsent.n.Load() }

// Invalidate marks tags in Redis and here, tells the other replicas and
// waits for them (bounded); it returns this replica's new epoch. An
// invalidation Redis did not take in time is kept (bounded) and retried
// until Redis takes it, then told to the others; meanwhile this replica
// trusts no shared entry it covers.
func (i *Invalidator) Invalidate(ctx context.Context, tags []string) uint64 {
	epoch, _ := i.InvalidateConfirmed(ctx, tags)
	return epoch
}

// ErrQueued: an invalidation is applied here but not in Redis yet (it is
// retried until Redis takes it).
var ErrQueued = errors.New("fleet: the invalidation is not in Redis yet (queued, retried)")

// InvalidateConfirmed is Invalidate, and says whether the invalidation
// reached the fleet: nil once it is in Redis and every replica counted
// acknowledged it; else why not (ErrQueued, or the replicas that did not
// acknowledge). It is applied here either way.
func (i *Invalidator) InvalidateConfirmed(ctx context.Context, tags []string) (uint64, error) {
	if len(tags) == 0 {
		return i.local.Invalidate(ctx, tags), nil
	}
	if i.f.unsent.n.Load() > 0 {
		i.queue(batch{tags: tags}) // after those before it, in order
		return i.local.Invalidate(ctx, tags), ErrQueued
	}
	e, err := i.f.Invalidate(ctx, tags)
	if err != nil {
		i.queue(batch{tags: tags})
		i.fail(err)
	}
	epoch := i.local.Invalidate(ctx, tags)
	if err != nil && !errors.Is(err, ErrCorrupt) {
		return epoch, ErrQueued
	}
	// Redis answers: the others can be told at once.
	berr := i.broadcast(ctx, message{Tags: tags, E: e})
	if errors.Is(berr, errUnpublished) {
		// Redis took the marks but not the message (or its answer came too
		// late): the others may not have been told, and would keep what
		// they hold. Kept, and told again until Redis takes it.
		if err == nil {
			i.queue(batch{tags: tags})
		}
		return epoch, ErrQueued
	}
	if err == nil {
		err = berr
	}
	return epoch, err
}

// queue keeps b, which Redis did not take in time, to be retried in order.
func (i *Invalidator) queue(b batch) {
	i.f.unsent.add(b)
	i.n.queued.Add(1)
	i.retryNow()
}

func (i *Invalidator) retryNow() {
	select {
	case i.kick <- struct{}{}:
	default:
	}
}

// retry puts unsent invalidations into Redis, oldest first, every 50 ms
// while there are any (and at once when one is added: kick), and tells
// the other replicas of each once it is in. With none, it sleeps.
func (i *Invalidator) retry(ctx context.Context) {
	var again <-chan time.Time // armed only while invalidations are unsent
	for {
		select {
		case <-ctx.Done():
			return
		case <-i.kick:
		case <-again:
		}
		again = nil
		i.sendUnsent(ctx)
		if _, _, left := i.f.unsent.head(); left {
			again = time.After(50 * time.Millisecond)
		}
	}
}

// sendUnsent puts the unsent invalidations into Redis, oldest first, until
// one fails.
func (i *Invalidator) sendUnsent(ctx context.Context) {
	for {
		b, all, ok := i.f.unsent.head()
		if !ok {
			return
		}
		if b.pending != "" { // a write's completion
			if i.complete(ctx, b, i.intentWait) != nil {
				return
			}
			i.f.unsent.done(false)
			continue
		}
		tags := b.tags
		var err error
		var e uint64
		if all {
			err = i.f.InvalidateAll(ctx)
		} else {
			e, err = i.f.Invalidate(ctx, tags)
		}
		if err != nil {
			return
		}
		if errors.Is(i.broadcast(ctx, message{Tags: tags, All: all, E: e}), errUnpublished) {
			return // nobody was surely told: again, marks and all
		}
		i.f.unsent.done(all) // after the broadcast: none left means every replica was told
	}
}

func (i *Invalidator) fail(err error) {
	if i.onError != nil {
		i.onError(err)
	}
}

// A message on the fleet's channels is a short header in clear (who sent
// it and its number: a replica that cannot open it still acknowledges it)
// and the rest sealed under a secret, with the channel and the header as
// additional data: nobody without a secret can forge or alter one.
func header(from string, seq uint64) string { return from + ":" + strconv.FormatUint(seq, 10) + ":" }

// parseHeader splits raw into its header's sender and number and the sealed
// rest; ok is false for what no replica sent.
func parseHeader(raw []byte) (from string, seq uint64, sealed []byte, ok bool) {
	from, rest, ok1 := strings.Cut(string(raw), ":")
	n, _, ok2 := strings.Cut(rest, ":")
	seq, err := strconv.ParseUint(n, 10, 64)
	if !ok1 || !ok2 || err != nil || len(from) != 24 || strings.Trim(from, "0123456789abcdef") != "" {
		return "", 0, nil, false
	}
	return from, seq, raw[len(from)+len(n)+2:], true
}

// sealMsg seals v (JSON) for channel ch under secret k.
func (i *Invalidator) sealMsg(k *secret, from string, seq uint64, v any, ch string) []byte {
	plain, _ := json.Marshal(v)
	h := header(from, seq)
	nonce := make([]byte, k.inv.NonceSize(), len(h)+k.inv.NonceSize()+len(plain)+k.inv.Overhead())
	_, _ = rand.Read(nonce)
	return append([]byte(h), k.inv.Seal(nonce, nonce, plain, []byte(ch+h))...)
}

// openMsg opens what sealMsg sealed for ch into v, under any of this
// replica's secrets; it returns the secret's index, or -1.
func (i *Invalidator) openMsg(raw []byte, ch string, v any) int {
	from, seq, sealed, ok := parseHeader(raw)
	if !ok {
		return -1
	}
	h := header(from, seq)
	for k := range i.f.keys {
		a := i.f.keys[k].inv
		if len(sealed) < a.NonceSize() {
			return -1
		}
		plain, err := a.Open(nil, sealed[:a.NonceSize()], sealed[a.NonceSize():], []byte(ch+h))
		if err == nil && json.Unmarshal(plain, v) == nil {
			return k
		}
	}
	return -1
}

// errUnpublished: Redis did not answer a broadcast's SPUBLISH, so the
// other replicas may not have been told.
var errUnpublished = errors.New("invalidation not published")

// broadcast tells the other replicas of msg and waits for their
// acknowledgements (bounded); its error says why not all came.
func (i *Invalidator) broadcast(ctx context.Context, msg message) error {
	c := i.f.c()
	if c == nil {
		i.fail(errNotConnected)
		return fmt.Errorf("%w: %w", errUnpublished, errNotConnected)
	}
	seq := i.seq.Add(1)
	sealed := i.sealMsg(&i.f.keys[0], i.id, seq, msg, i.channel())
	acks := i.register(seq)
	defer i.unregister(seq)
	pctx, cancel := i.f.ctx(ctx)
	count := i.countRun()
	rs := c.DoMulti(pctx, c.B().Spublish().Channel(i.channel()).Message(rueidis.BinaryString(sealed)).Build(), count.cmd(c))
	want := i.counted(pctx, c, count, rs[1])
	cancel()
	if err := i.f.result(rs[0].Error()); err != nil {
		i.fail(err)
		return fmt.Errorf("%w: %w", errUnpublished, err)
	}
	i.n.sent.Add(1)
	// Every replica that announced itself with a secret this one has is
	// waited for, and only those: a stray subscriber (a redis-cli left
	// open, a replica with an unrelated secret) costs nothing, and a
	// replica Redis no longer counts among the receivers, whose
	// subscription ended without its knowing (a link gone dark), is waited
	// for until its own heartbeats are too old for it to trust its L1.
	// Redis's count of receivers is no guide either way.
	return i.awaitAcks(ctx, seq, acks, want, time.Now().Add(i.wait))
}

// receivers are the replicas a message waits for: the others announced
// with a secret this one has, and this one while it hears its own.
func (i *Invalidator) receivers() int64 {
	n := i.peers.Load()
	if i.subscribed.Load() {
		n++
	}
	return n
}

// subscribe listens to the fleet's invalidations and this replica's
// acknowledgements until ctx ends, subscribing again after a drop.
func (i *Invalidator) subscribe(ctx context.Context) {
	work := make(chan rueidis.PubSubMessage, 1024)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // messages are handled off rueidis's reading goroutine, which a Do inside its callback would block
		defer wg.Done()
		for m := range work {
			i.handle(ctx, m)
		}
	}()
	defer func() { close(work); wg.Wait() }()
	var retry time.Duration
	lost := time.Now()
	for ctx.Err() == nil {
		// Not hearing the fleet (yet, or any more): what this replica
		// holds may have been written elsewhere meanwhile. Trust none of it
		// now and again at each try until the stream is back (at once,
		// then every 100 ms, then less often: resubscribe); the first
		// subscription also drops what was fetched before it.
		i.local.InvalidateAll()
		var upAt atomic.Int64 // when the three channels were confirmed (UnixNano), 0: never
		if c := i.f.c(); c != nil {
			cmd := c.B().Ssubscribe().Channel(i.channel(), i.ackChannel(i.id), i.hbChannel()).Build()
			hooked := rueidis.WithOnSubscriptionHook(ctx, func(sub rueidis.PubSubSubscription) {
				// The three channels confirmed: this replica hears the fleet.
				up := sub.Kind == "ssubscribe" && sub.Count == 3
				i.subscribed.Store(up)
				if up {
					upAt.Store(time.Now().UnixNano())
					i.local.InvalidateAll() // invalidations sent while it was not listening
					go i.since(ctx, i.f.heard.subscribed())
					select {
					case i.announceNow <- struct{}{}:
					default:
					}
				}
			})
			err := c.Receive(hooked, cmd, func(m rueidis.PubSubMessage) {
				// Never dropped: a replica that falls behind slows its own
				// stream (Redis ends it past its pub/sub buffer limit, and
				// it subscribes again), and the senders' waits count it.
				select {
				case work <- m:
				case <-ctx.Done():
				}
			})
			i.distrust()
			i.recalled.Store(false)
			i.local.InvalidateAll() // before anyone can see it is not subscribed
			i.f.heard.subscribed()
			i.subscribed.Store(false)
			if ctx.Err() == nil {
				i.fail(errors.New("invalidation stream lost: " + errString(err)))
			}
		}
		if up := upAt.Load(); up != 0 {
			// Lost after a second up: again at once (one that keeps
			// failing as soon as it is up waits like any other).
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

// resubscribe is the wait before the next try to subscribe, after one
// that waited last and failed, down for since: every 100 ms for the
// first two seconds (a reset link or a restarted Redis is back within
// them), then doubling up to a second (a long outage costs Redis ten
// connections a second per replica at most). Waiting a second, then up
// to 400 ms, each loss cost the fault run's hit ratio up to that much
// more than the loss itself (docs/performance.md).
func resubscribe(last, since time.Duration) time.Duration {
	if since < 2*time.Second {
		return retryEvery
	}
	return min(max(2*last, retryEvery), time.Second)
}

// retryEvery is how soon a replica tries again to subscribe, or to
// announce itself once subscribed, after a try failed.
const retryEvery = 100 * time.Millisecond

// since reads the fleet's epoch once subscription gen is confirmed: every
// invalidation that raises the epoch past it is heard from then on.
func (i *Invalidator) since(ctx context.Context, gen uint64) {
	for ctx.Err() == nil && i.f.heard.is(gen) {
		if i.recall(ctx) != nil {
		} else if epoch, err := i.f.Epoch(ctx); err == nil {
			i.f.heard.start(gen, epoch)
			i.recalled.Store(true)
			i.maybeTrust()
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func errString(err error) string {
	if err == nil {
		return "unsubscribed"
	}
	return err.Error()
}

// handle applies another replica's invalidation and acknowledges it, or
// counts an acknowledgement of this replica's. One it cannot open (sealed
// under a secret this replica lacks, as during a rotation) might cover
// anything: it drops the whole L1 and is acknowledged all the same, under
// this replica's secret (the writer may have it among its previous ones).
func (i *Invalidator) handle(ctx context.Context, m rueidis.PubSubMessage) {
	if m.Channel == i.ackChannel(i.id) {
		var a ack
		if i.openMsg([]byte(m.Message), m.Channel, &a) < 0 || a.To != i.id {
			return // forged, or not for this replica
		}
		i.mu.Lock()
		ch := i.waiters[a.Seq]
		i.mu.Unlock()
		if ch != nil {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
		return
	}
	from, seq, _, ok := parseHeader([]byte(m.Message))
	if !ok {
		return // no replica's
	}
	var msg message
	k := i.openMsg([]byte(m.Message), m.Channel, &msg) // sealed for its channel: the stream's, or this replica's heartbeats'
	if seq == 0 {                                      // a heartbeat: only this replica's own count
		if k >= 0 && from == i.id && msg.Beat > i.heard.Load() {
			i.heard.Store(msg.Beat)
			i.maybeTrust()
		}
		return
	}
	switch {
	case k < 0:
		i.unopened(ctx)
		k = 0
	case from == i.id:
	case msg.All:
		i.local.InvalidateAll()
		i.n.received.Add(1)
	default:
		if msg.E > 0 {
			i.f.heard.add(msg.Tags, msg.E) // before the acknowledgement
		}
		if msg.Hold > 0 { // an intent: pending until its completion, or its hold has passed
			i.f.pend.add(from+":"+strconv.FormatUint(seq, 10), msg.Tags, time.Now().Add(time.Duration(msg.Hold)*time.Millisecond), m.Message)
			i.expireNow()
		}
		i.local.Invalidate(ctx, msg.Tags)
		if msg.Ends > 0 { // a completion: its write was counted by its intent
			i.f.pend.end(from + ":" + strconv.FormatUint(msg.Ends, 10))
		} else {
			i.n.received.Add(1)
		}
	}
	c := i.f.c()
	if c == nil || msg.Ends > 0 { // a completion is not acknowledged: nobody waits for it
		return
	}
	actx, cancel := i.f.ctx(ctx)
	defer cancel()
	ch := i.ackChannel(from)
	i.f.result(c.Do(actx, c.B().Spublish().Channel(ch).Message(rueidis.BinaryString(i.sealMsg(&i.f.keys[k], i.id, 0, ack{To: from, Seq: seq}, ch))).Build()).Error())
}

// ErrOtherSecret: an invalidation on the fleet's channel was sealed under
// another cache.key_secret than this replica's.
var ErrOtherSecret = errors.New("fleet: an invalidation could not be opened: another replica uses another cache.key_secret (or cache.previous_key_secrets lacks it); this replica drops its whole cache on each")

// unopened drops everything (the invalidation could cover anything): L1,
// and, for this replica, every shared entry fetched before the fleet's
// current epoch (the writer raised it before it sent; its marks are under
// names this replica cannot compute). It says so at most once a minute.
func (i *Invalidator) unopened(ctx context.Context) {
	i.local.InvalidateAll()
	if epoch, err := i.f.Epoch(ctx); err == nil {
		i.f.observeFloor(epoch)
	}
	i.n.unopened.Add(1)
	now := time.Now().UnixNano()
	if last := i.lastAlarm.Load(); now-last > int64(time.Minute) && i.lastAlarm.CompareAndSwap(last, now) {
		i.fail(ErrOtherSecret)
	}
}

// announce tells the fleet every second that this replica hears the
// stream (and at once when it subscribed), and counts the others that
// share a secret with it (those a broadcast waits for: they can open its
// invalidations, or it their acknowledgements). A write's intent counts
// the replicas announced when Redis records it, so once a replica's first
// announcement while subscribed is answered, every later intent waits for
// it; it trusts its L1 once it also heard back a heartbeat it sent after
// that answer (every message sent before is then heard, in order) and
// recalled the intents from before its subscription (maybeTrust). (It
// trusted a second and a half after, by when every writer's own
// announcement counted it: the fault run's hit ratio was 0.14. Every half
// second, the announcements were 12 of an idle replica's 20 Redis
// commands a second, its scripts' own counted: "At scale", docs/fleet.md.)
func (i *Invalidator) announce(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	// lastOK: the last announcement Redis took while subscribed, sent
	// then. The streak of announcements while subscribed began at
	// trustFrom (0: none; a lost subscription ends it too).
	var lastOK time.Time
	args := []string{"0"}
	for _, k := range i.f.keys {
		args = append(args, k.id+":"+i.id)
	}
	for {
		sub := i.subscribed.Load()
		if c := i.f.c(); c != nil {
			sent := time.Now()
			actx, cancel := i.f.ctx(ctx)
			args[0] = "0"
			if sub {
				args[0] = "1"
			}
			members, err := announcePeer.Exec(actx, c, []string{i.peersKey()}, args).AsStrSlice()
			cancel()
			if i.f.result(err) == nil {
				i.peers.Store(int64(len(i.sharing(members))))
				if sub {
					lastOK = sent
				}
			}
		}
		switch {
		// Writers count an announcement for three seconds (on Redis's
		// clock): one that failed (Redis slow for a moment) costs nothing
		// while the last one Redis took is under two seconds old.
		case !sub || !i.subscribed.Load() || time.Since(lastOK) >= 2*time.Second:
			i.distrust()
		case i.trustFrom.Load() == 0:
			i.trustFrom.Store(time.Since(i.born).Nanoseconds())
			select { // a heartbeat now, not at the next tick
			case i.beat <- struct{}{}:
			default:
			}
			i.maybeTrust()
		}
		// Subscribed but not announced (Redis did not take it): again
		// soon, not at the next tick.
		var again <-chan time.Time
		if i.trustFrom.Load() == 0 && i.subscribed.Load() {
			again = time.After(retryEvery)
		}
		for waiting := true; waiting; {
			select {
			case <-again:
				waiting = false
			case <-ctx.Done():
				// Leaving (a rolling restart): writers stop waiting for it
				// now, not once its announcement is three seconds old.
				if c := i.f.c(); c != nil {
					args[0] = "0"
					actx, cancel := i.f.ctx(context.Background())
					_ = announcePeer.Exec(actx, c, []string{i.peersKey()}, args).Error()
					cancel()
				}
				return
			case <-tick.C:
				waiting = false
			case <-i.announceNow:
				waiting = false
			}
		}
	}
}

// peersKey is where replicas announce themselves (in the stream's slot).
func (i *Invalidator) peersKey() string { return i.channel() + "peers" }

// countRun counts the replicas a message waits for, run in the pipeline
// right after its SPUBLISH: a replica announced later hears the message
// before a heartbeat it sends after its announcement, so before it trusts.
func (i *Invalidator) countRun() scriptRun {
	args := []string{i.id}
	for _, k := range i.f.keys {
		args = append(args, k.id)
	}
	return countPeers.with([]string{i.peersKey()}, args...)
}

// counted is how many acknowledgements a message waits for: the replicas
// counted in Redis (itself included while subscribed), or, if Redis did
// not answer the count, those its last announcement saw.
func (i *Invalidator) counted(ctx context.Context, c rueidis.Client, count scriptRun, r rueidis.RedisResult) int64 {
	n, err := count.again(ctx, c, r).AsInt64()
	if err != nil {
		return i.receivers()
	}
	return n + b2i(i.subscribed.Load())
}

// maybeTrust trusts this replica once its announcement streak's first
// answer came back, a heartbeat sent after it was heard, and the intents
// from before its subscription are recalled.
func (i *Invalidator) maybeTrust() {
	i.trustMu.Lock()
	defer i.trustMu.Unlock()
	if tf := i.trustFrom.Load(); tf > 0 && i.heard.Load() >= tf && i.recalled.Load() && i.subscribed.Load() {
		i.trust()
	}
}

// distrust ends this replica's trust (and its announcement streak).
func (i *Invalidator) distrust() {
	i.trustMu.Lock()
	defer i.trustMu.Unlock()
	i.trustFrom.Store(0)
	if i.trusted.Swap(false) {
		// A hit that finds its entry valid at the current epoch asks no
		// more (load's local): a new epoch makes every entry ask, and an
		// untrusted replica finds none valid.
		i.local.InvalidateAll()
	}
}

// trust makes this replica trusted, if it is not yet: nothing from
// before is kept.
func (i *Invalidator) trust() {
	if i.trusted.Load() {
		return
	}
	i.local.InvalidateAll()
	i.trusted.Store(true)
	i.trustOnce.Do(func() { close(i.firstTrust) })
}

// sharing are the other replicas among announced members (secret id and
// replica id) that share a secret with this one.
func (i *Invalidator) sharing(members []string) map[string]bool {
	out := map[string]bool{}
	for _, m := range members {
		kid, id, _ := strings.Cut(m, ":")
		if id == i.id {
			continue
		}
		for _, k := range i.f.keys {
			if k.id == kid {
				out[id] = true
			}
		}
	}
	return out
}

// heartbeat publishes a heartbeat on this replica's own channel every
// InvalidationWait/4 while it is subscribed and has read within
// restAfter; a read wakes it from rest (beat).
func (i *Invalidator) heartbeat(ctx context.Context) {
	tick := time.NewTicker(max(i.wait/4, time.Millisecond))
	defer tick.Stop()
	for {
		if c := i.f.c(); c != nil && i.subscribed.Load() {
			sent := time.Since(i.born).Nanoseconds()
			if rest := sent-i.used.Load() >= restAfter.Nanoseconds(); rest {
				i.resting.Store(true)
			} else {
				raw := i.sealMsg(&i.f.keys[0], i.id, 0, message{Beat: sent}, i.hbChannel())
				pctx, cancel := i.f.ctx(ctx)
				err := i.f.result(c.Do(pctx, c.B().Spublish().Channel(i.hbChannel()).Message(rueidis.BinaryString(raw)).Build()).Error())
				cancel()
				if err == nil {
					i.resting.Store(false)
				}
			}
		}
		if i.resting.Load() { // no ticks at rest: a read wakes it
			select {
			case <-ctx.Done():
				return
			case <-i.beat:
			}
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-i.beat:
		}
	}
}
