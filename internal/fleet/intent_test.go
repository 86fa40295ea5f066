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
