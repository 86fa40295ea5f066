package fleet

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
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
//     acknowledges; the writer waits for as many acknowledgements as
//     SPUBLISH reported receivers, at most InvalidationWait.
//
// A replica that does not acknowledge in time is counted and logged
// (OnError); one whose subscription has dropped is told nothing until it
// is back (docs/fleet.md says what that means for its L1).
type Invalidator struct {
	local *invalidation.Local
	f     *Fleet
	wait  time.Duration
	// onError hears of a failed or unacknowledged fleet-wide invalidation
	// (the local one is applied regardless).
	onError func(error)

	id      string // this replica, in messages and its ack channel
	seal    cipher.AEAD
	seq     atomic.Uint64
	mu      sync.Mutex
	waiters map[uint64]chan struct{}

	Sent, Received, Acked, Unacked atomic.Int64
	// Unopened counts invalidations this replica could not open (sealed
	// under another cache.key_secret): each dropped its whole L1.
	Unopened   atomic.Int64
	subscribed atomic.Bool
	// trusted: subscribed, and announced long enough that every writer
	// counts this replica among those it waits for. Until then nothing is
	// valid here (so nothing is kept in or served from L1).
	trusted    atomic.Bool
	peers      atomic.Int64 // other replicas with this secret, subscribed
	keyID      string       // names this fleet secret in announcements
	lastAlarm  atomic.Int64
	kick       chan struct{} // unsent invalidations to retry
	firstSub   chan struct{} // closed at the first subscription
	firstOnce  sync.Once
	firstTrust chan struct{} // closed when first trusted
	trustOnce  sync.Once

	stop context.CancelFunc
	done chan struct{}
}

// message is one invalidation on the wire (sealed). All: everything
// (invalidations that could not be kept while Redis was away).
type message struct {
	From string   `json:"f"`
	Seq  uint64   `json:"s"`
	Tags []string `json:"t"`
	All  bool     `json:"a,omitempty"`
}

// ack is an acknowledgement on the wire (sealed like the invalidations,
// so that nobody without the secret can forge one).
type ack struct {
	To  string `json:"t"`
	Seq uint64 `json:"s"`
	By  string `json:"b"`
}

// NewInvalidator starts this replica's subscription to the fleet's
// invalidations; Close ends it.
func NewInvalidator(f *Fleet, local *invalidation.Local, wait time.Duration, onError func(error)) *Invalidator {
	block, err := aes.NewCipher(derive(f.cfg.Secret, "cacheproxy invalidations v1", ""))
	if err != nil {
		panic(err) // a 32-byte key is always a valid AES key
	}
	seal, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	var id [12]byte
	_, _ = rand.Read(id[:])
	ctx, cancel := context.WithCancel(context.Background())
	i := &Invalidator{local: local, f: f, wait: wait, onError: onError, id: hex.EncodeToString(id[:]), seal: seal,
		waiters: map[uint64]chan struct{}{}, stop: cancel, done: make(chan struct{}), firstSub: make(chan struct{}), firstTrust: make(chan struct{}),
		keyID: hex.EncodeToString(derive(f.cfg.Secret, "cacheproxy key id v1", "")[:6]), kick: make(chan struct{}, 1)}
	reset := func() { i.local.InvalidateAll() }
	f.st.onReset.Store(&reset)
	report := i.fail
	f.st.onError.Store(&report)
	var wg sync.WaitGroup
	wg.Go(func() { i.subscribe(ctx) })
	wg.Go(func() { i.retry(ctx) })
	wg.Go(func() { i.announce(ctx) })
	go func() { wg.Wait(); close(i.done) }()
	return i
}

// Close ends the subscription.
func (i *Invalidator) Close() {
	i.stop()
	<-i.done
}

// WaitSubscribed blocks until this replica first hears the fleet's
// invalidations, or ctx ends.
func (i *Invalidator) WaitSubscribed(ctx context.Context) error {
	select {
	case <-i.firstSub:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
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

// Epoch is this replica's epoch.
func (i *Invalidator) Epoch() uint64 { return i.local.Epoch() }

// Valid checks this replica's marks; nothing is valid while the replica is
// not trusted (not hearing the stream, or not yet counted by writers).
func (i *Invalidator) Valid(epoch uint64, tags []string) bool {
	return i.trusted.Load() && i.local.Valid(epoch, tags)
}

// Trusted reports whether this replica hears the fleet's invalidations
// and every writer waits for it: only then is its L1 served (/readyz).
func (i *Invalidator) Trusted() bool { return i.trusted.Load() }

// Unsent is the number of invalidations applied here but not yet in
// Redis (1 for "everything").
func (i *Invalidator) Unsent() int64 { return i.f.unsent.n.Load() }

// Invalidate marks tags in Redis and here, tells the other replicas and
// waits for them (bounded); it returns this replica's new epoch. An
// invalidation Redis did not take in time is kept (bounded) and retried
// until Redis takes it, then told to the others; meanwhile this replica
// trusts no shared entry it covers.
func (i *Invalidator) Invalidate(ctx context.Context, tags []string) uint64 {
	if len(tags) == 0 {
		return i.local.Invalidate(ctx, tags)
	}
	if i.f.unsent.n.Load() > 0 {
		i.f.unsent.add(tags) // after those before it, in order
		i.retryNow()
		return i.local.Invalidate(ctx, tags)
	}
	err := i.f.Invalidate(ctx, tags)
	if err != nil {
		i.f.unsent.add(tags)
		i.retryNow()
		i.fail(err)
	}
	epoch := i.local.Invalidate(ctx, tags)
	if err == nil || errors.Is(err, ErrCorrupt) { // Redis answers: the others can be told at once
		i.broadcast(ctx, message{Tags: tags})
	}
	return epoch
}

func (i *Invalidator) retryNow() {
	select {
	case i.kick <- struct{}{}:
	default:
	}
}

// retry puts unsent invalidations into Redis, oldest first, every 50 ms
// while there are any, and tells the other replicas of each once it is in.
func (i *Invalidator) retry(ctx context.Context) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-i.kick:
		case <-tick.C:
		}
		for {
			tags, all, ok := i.f.unsent.head()
			if !ok {
				break
			}
			var err error
			if all {
				err = i.f.InvalidateAll(ctx)
			} else {
				err = i.f.Invalidate(ctx, tags)
			}
			if err != nil {
				break
			}
			i.broadcast(ctx, message{Tags: tags, All: all})
			i.f.unsent.done(all) // after the broadcast: none left means every replica was told
		}
	}
}

func (i *Invalidator) fail(err error) {
	if i.onError != nil {
		i.onError(err)
	}
}

// sealMsg seals v (JSON) for channel ch.
func (i *Invalidator) sealMsg(v any, ch string) []byte {
	plain, _ := json.Marshal(v)
	nonce := make([]byte, i.seal.NonceSize(), i.seal.NonceSize()+len(plain)+i.seal.Overhead())
	_, _ = rand.Read(nonce)
	return i.seal.Seal(nonce, nonce, plain, []byte(ch))
}

// openMsg opens what sealMsg sealed for ch into v.
func (i *Invalidator) openMsg(raw []byte, ch string, v any) bool {
	if len(raw) < i.seal.NonceSize() {
		return false
	}
	plain, err := i.seal.Open(nil, raw[:i.seal.NonceSize()], raw[i.seal.NonceSize():], []byte(ch))
	return err == nil && json.Unmarshal(plain, v) == nil
}

func (i *Invalidator) broadcast(ctx context.Context, msg message) {
	c := i.f.c()
	if c == nil {
		i.fail(errNotConnected)
		return
	}
	seq := i.seq.Add(1)
	msg.From, msg.Seq = i.id, seq
	sealed := i.sealMsg(msg, i.channel())
	acks := make(chan struct{}, 64)
	i.mu.Lock()
	i.waiters[seq] = acks
	i.mu.Unlock()
	defer func() {
		i.mu.Lock()
		delete(i.waiters, seq)
		i.mu.Unlock()
	}()
	pctx, cancel := i.f.ctx(ctx)
	receivers, err := c.Do(pctx, c.B().Spublish().Channel(i.channel()).Message(rueidis.BinaryString(sealed)).Build()).AsInt64()
	cancel()
	if err := i.f.result(err); err != nil {
		i.fail(err)
		return
	}
	i.Sent.Add(1)
	// Only replicas that announced themselves with this secret are
	// waited for: a stray subscriber (a redis-cli left open, a replica
	// with another secret) costs nothing.
	receivers = min(receivers, i.peers.Load()+1) // +1: this replica hears (and acknowledges) its own
	timeout := time.NewTimer(i.wait)
	defer timeout.Stop()
	for got := int64(0); got < receivers; got++ {
		select {
		case <-acks:
			i.Acked.Add(1)
		case <-timeout.C:
			i.Unacked.Add(receivers - got)
			i.fail(errors.New("invalidation: " + strconv.FormatInt(receivers-got, 10) + " of " +
				strconv.FormatInt(receivers, 10) + " replicas did not acknowledge within redis.invalidation_wait"))
			return
		case <-ctx.Done():
			return
		}
	}
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
	for ctx.Err() == nil {
		// Not hearing the fleet (yet, or any more): what this replica
		// holds may have been written elsewhere meanwhile. Trust none of it
		// now and again each second until the stream is back; the first
		// subscription also drops what was fetched before it.
		i.local.InvalidateAll()
		if c := i.f.c(); c != nil {
			cmd := c.B().Ssubscribe().Channel(i.channel(), i.ackChannel(i.id)).Build()
			hooked := rueidis.WithOnSubscriptionHook(ctx, func(sub rueidis.PubSubSubscription) {
				// Both channels confirmed: this replica hears the fleet.
				up := sub.Kind == "ssubscribe" && sub.Count == 2
				i.subscribed.Store(up)
				if up {
					i.local.InvalidateAll() // invalidations sent while it was not listening
					i.firstOnce.Do(func() { close(i.firstSub) })
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
			i.trusted.Store(false)
			i.local.InvalidateAll() // before anyone can see it is not subscribed
			i.subscribed.Store(false)
			if ctx.Err() == nil {
				i.fail(errors.New("invalidation stream lost: " + errString(err)))
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
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
// under another cache.key_secret, as during a rotation) might cover
// anything: it drops the whole L1 and is acknowledged all the same.
func (i *Invalidator) handle(ctx context.Context, m rueidis.PubSubMessage) {
	if m.Channel == i.ackChannel(i.id) {
		var a ack
		if !i.openMsg([]byte(m.Message), m.Channel, &a) || a.To != i.id {
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
	var msg message
	if !i.openMsg([]byte(m.Message), i.channel(), &msg) {
		i.unopened(ctx)
		return
	}
	switch {
	case msg.From == i.id:
	case msg.All:
		i.local.InvalidateAll()
		i.Received.Add(1)
	default:
		i.local.Invalidate(ctx, msg.Tags)
		i.Received.Add(1)
	}
	c := i.f.c()
	if c == nil {
		return
	}
	actx, cancel := i.f.ctx(ctx)
	defer cancel()
	ch := i.ackChannel(msg.From)
	i.f.result(c.Do(actx, c.B().Spublish().Channel(ch).Message(rueidis.BinaryString(i.sealMsg(ack{To: msg.From, Seq: msg.Seq, By: i.id}, ch))).Build()).Error())
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
	i.Unopened.Add(1)
	now := time.Now().UnixNano()
	if last := i.lastAlarm.Load(); now-last > int64(time.Minute) && i.lastAlarm.CompareAndSwap(last, now) {
		i.fail(ErrOtherSecret)
	}
}

// announcePeer records a subscribed replica (ARGV[2] == "1") under its
// key id and returns the replicas announced in the last three seconds.
var announcePeer = rueidis.NewLuaScript(`
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[2] == '1' then redis.call('ZADD', KEYS[1], now, ARGV[1]) else redis.call('ZREM', KEYS[1], ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3000)
redis.call('PEXPIRE', KEYS[1], 10000)
return redis.call('ZRANGE', KEYS[1], 0, -1)`)

// announce tells the fleet every half second that this replica hears the
// stream, and counts the others with this secret (those a write waits
// for). A replica becomes trusted a second and a half after it first
// announced itself while subscribed: by then every writer counts it.
func (i *Invalidator) announce(ctx context.Context) {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	var since time.Time // announced while subscribed, without a gap, since
	me := i.keyID + ":" + i.id
	for {
		sub := i.subscribed.Load()
		if c := i.f.c(); c != nil {
			actx, cancel := i.f.ctx(ctx)
			arg := "0"
			if sub {
				arg = "1"
			}
			members, err := announcePeer.Exec(actx, c, []string{i.channel() + "peers"}, []string{me, arg}).AsStrSlice()
			cancel()
			if i.f.result(err) == nil {
				n := int64(0)
				for _, m := range members {
					if m != me && strings.HasPrefix(m, i.keyID+":") {
						n++
					}
				}
				i.peers.Store(n)
			} else {
				sub = false
			}
		}
		switch {
		case !sub || !i.subscribed.Load():
			since = time.Time{}
			i.trusted.Store(false)
		case since.IsZero():
			since = time.Now()
		case time.Since(since) >= 1500*time.Millisecond && !i.trusted.Load():
			i.local.InvalidateAll() // nothing from before is kept
			i.trusted.Store(true)
			i.trustOnce.Do(func() { close(i.firstTrust) })
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
