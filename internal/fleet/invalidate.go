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
	subscribed                     atomic.Bool
	firstSub                       chan struct{} // closed at the first subscription
	firstOnce                      sync.Once

	stop context.CancelFunc
	done chan struct{}
}

// message is one invalidation on the wire (sealed).
type message struct {
	From string   `json:"f"`
	Seq  uint64   `json:"s"`
	Tags []string `json:"t"`
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
		waiters: map[uint64]chan struct{}{}, stop: cancel, done: make(chan struct{}), firstSub: make(chan struct{})}
	go i.subscribe(ctx)
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

// Subscribed reports whether this replica hears the fleet's invalidations.
func (i *Invalidator) Subscribed() bool { return i.subscribed.Load() }

// The fleet's channels are sharded (SPUBLISH, SSUBSCRIBE: Redis 7 and
// Valkey) and share one hash slot: on a Cluster every replica then
// listens on the node that owns it, and SPUBLISH counts all of them.
func (i *Invalidator) channel() string             { return i.f.cfg.Prefix + "{inv}" }
func (i *Invalidator) ackChannel(id string) string { return i.f.cfg.Prefix + "{inv}ack:" + id }

// Epoch is this replica's epoch.
func (i *Invalidator) Epoch() uint64 { return i.local.Epoch() }

// Valid checks this replica's marks.
func (i *Invalidator) Valid(epoch uint64, tags []string) bool { return i.local.Valid(epoch, tags) }

// Invalidate marks tags in Redis and here, tells the other replicas and
// waits for them (bounded); it returns this replica's new epoch.
func (i *Invalidator) Invalidate(ctx context.Context, tags []string) uint64 {
	err := i.f.Invalidate(ctx, tags)
	if err != nil {
		i.fail(err)
	}
	epoch := i.local.Invalidate(ctx, tags)
	if len(tags) > 0 && err == nil { // Redis just failed: a second wait for it would only delay the write
		i.broadcast(ctx, tags)
	}
	return epoch
}

func (i *Invalidator) fail(err error) {
	if i.onError != nil {
		i.onError(err)
	}
}

func (i *Invalidator) broadcast(ctx context.Context, tags []string) {
	c := i.f.c()
	if c == nil {
		i.fail(errNotConnected)
		return
	}
	seq := i.seq.Add(1)
	plain, _ := json.Marshal(message{From: i.id, Seq: seq, Tags: tags})
	nonce := make([]byte, i.seal.NonceSize(), i.seal.NonceSize()+len(plain)+i.seal.Overhead())
	_, _ = rand.Read(nonce)
	sealed := i.seal.Seal(nonce, nonce, plain, []byte(i.channel()))
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
	defer close(i.done)
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
// counts an acknowledgement of this replica's.
func (i *Invalidator) handle(ctx context.Context, m rueidis.PubSubMessage) {
	if m.Channel == i.ackChannel(i.id) {
		seq, err := strconv.ParseUint(m.Message, 10, 64)
		if err != nil {
			return
		}
		i.mu.Lock()
		ch := i.waiters[seq]
		i.mu.Unlock()
		if ch != nil {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
		return
	}
	raw := []byte(m.Message)
	if len(raw) < i.seal.NonceSize() {
		return
	}
	plain, err := i.seal.Open(nil, raw[:i.seal.NonceSize()], raw[i.seal.NonceSize():], []byte(i.channel()))
	if err != nil {
		return // not sealed with this fleet's secret
	}
	var msg message
	if json.Unmarshal(plain, &msg) != nil {
		return
	}
	if msg.From != i.id {
		i.local.Invalidate(ctx, msg.Tags)
		i.Received.Add(1)
	}
	c := i.f.c()
	if c == nil {
		return
	}
	actx, cancel := i.f.ctx(ctx)
	defer cancel()
	i.f.result(c.Do(actx, c.B().Spublish().Channel(i.ackChannel(msg.From)).Message(strconv.FormatUint(msg.Seq, 10)).Build()).Error())
}
