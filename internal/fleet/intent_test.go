package fleet

import (
	"context"
	"testing"
	"time"

	"cacheproxy/internal/invalidation"
	"cacheproxy/internal/redistest"
)

// invalidator starts a replica's invalidator on its own connection to
// url, trusted, with writes held for hold; closed with the test.
func invalidator(t *testing.T, url string, hold time.Duration) *Invalidator {
	t.Helper()
	f := openConfig(t, Config{URL: url, Prefix: "t:", Timeout: time.Second, Secret: []byte("secret"), Retention: time.Hour, WriteHold: hold})
	i := NewInvalidator(f, invalidation.New(time.Hour, nil), 100*time.Millisecond, func(err error) { t.Log(err) })
	t.Cleanup(i.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := i.WaitTrusted(ctx); err != nil {
		t.Fatal(err)
	}
	return i
}

// A replica that subscribes while a write is under way (its intent sent
// before it listened) keeps the write's scopes pending all the same,
// from the intents set, until the write ends.
func TestAnIntentSentBeforeAReplicaSubscribedIsRecalled(t *testing.T) {
	url := redistest.Start(t).URL()
	a := invalidator(t, url, time.Minute)
	tags := []string{"scope"}
	in, err := a.Intend(context.Background(), tags)
	if err != nil {
		t.Fatal(err)
	}
	late := invalidator(t, url, time.Minute)
	if late.Valid(late.Epoch(), tags) {
		t.Fatal("a replica that subscribed during the write finds its scope valid")
	}
	if !late.Valid(late.Epoch(), []string{"other"}) {
		t.Fatal("another scope is pending too")
	}
	in.End(context.Background(), true, nil)
	waitFor(t, "the write's end lifts its pending", func() bool { return late.Valid(late.Epoch(), tags) })
}

// A write whose writer died before ending it (its intent in the set, its
// hold passed) is lifted by the next replica to subscribe: the marks are
// raised, and the scope is valid again for what is fetched after.
func TestAnIntentPastItsHoldIsLiftedByWhoeverFindsIt(t *testing.T) {
	url := redistest.Start(t).URL()
	a := invalidator(t, url, 100*time.Millisecond)
	tags := []string{"scope"}
	if _, err := a.Intend(context.Background(), tags); err != nil {
		t.Fatal(err)
	}
	a.Close() // dies mid-write: never ended
	epoch, err := a.f.Epoch(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	late := invalidator(t, url, time.Minute)
	waitFor(t, "the intent is lifted", func() bool { return late.Stats().Lifted == 1 })
	if after, _ := late.f.Epoch(context.Background()); after <= epoch {
		t.Fatalf("epoch %d after lifting, %d before: the marks were not raised", after, epoch)
	}
	if !late.Valid(late.Epoch(), tags) {
		t.Fatal("the scope is still pending after the lift")
	}
}

// waitFor polls cond (another goroutine's or process's progress) for up
// to 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// A write whose completion a peer never heard (the writer's link failed
// after Redis took it) ends there once the intents set says so, within
// about checkAfter, not at the end of its hold (a minute here); and what
// was fetched during the write is not valid there after it (the marks are
// taken at the epoch read then, no older).
func TestALostCompletionEndsWhenTheIntentLeavesTheSet(t *testing.T) {
	url := redistest.Start(t).URL()
	a := invalidator(t, url, time.Minute)
	b := invalidator(t, url, time.Minute)
	tags := []string{"scope"}
	ctx := context.Background()
	x, err := a.Intend(ctx, tags)
	if err != nil {
		t.Fatal(err)
	}
	in := x.(*Intent)
	waitFor(t, "the peer holds the write pending", func() bool { return !b.Valid(b.Epoch(), tags) })
	during, err := a.f.Epoch(ctx) // a peer's fill during the write carries this epoch
	if err != nil {
		t.Fatal(err)
	}
	// The completion, all but its message: the marks raised, then the
	// intent out of the set.
	if _, err := a.f.raise(ctx, tags); err != nil {
		t.Fatal(err)
	}
	c := a.f.c()
	if err := c.Do(ctx, c.B().Zrem().Key(a.intentsKey()).Member(in.member).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the peer ends the write (30 s: half its hold)", func() bool { return b.Valid(b.Epoch(), tags) })
	if valid, _ := b.f.heard.check(during, tags); valid {
		t.Fatal("a shared entry fetched during the write is valid at the peer after it")
	}
}

// A replica that trusts its L1 is waited for by the next write's intent
// at once: the intent counts the replicas announced in Redis when it is
// recorded, not those the writer's last announcement (a second ago) saw.
func TestAnIntentWaitsForAReplicaThatJustTrusted(t *testing.T) {
	url := redistest.Start(t).URL()
	a := invalidator(t, url, time.Minute)
	invalidator(t, url, time.Minute) // trusted: it announced itself
	x, err := a.Intend(context.Background(), []string{"scope"})
	if err != nil {
		t.Fatal(err)
	}
	if in := x.(*Intent); in.want != 2 {
		t.Fatalf("the intent waits for %d replicas (the writer's count: %d others), want 2: itself and the one that just trusted", in.want, a.peers.Load())
	}
}
