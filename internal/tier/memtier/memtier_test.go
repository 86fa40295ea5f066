package memtier

import (
	"context"
	"testing"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/clock"
	"cacheproxy/internal/invalidation"
)

func entry(c clock.Clock, tags ...string) *cache.Entry {
	now := c.Now()
	return &cache.Entry{Key: "k", Status: 200, Body: []byte("{}"), Stored: cache.At(now), Expires: cache.At(now.Add(30 * time.Second)), Keep: cache.At(now.Add(90 * time.Second)), Tags: tags}
}

// The hub's rules, on its clock: a claim is its holder's while it lives,
// and lapses ClaimTTL after it died; a shared entry is valid until a mark
// of its scopes is raised, and ages on the hub's clock whatever the
// readers' clocks say.
func TestHubRules(t *testing.T) {
	ctx := context.Background()
	hc := clock.NewFake(time.Unix(1000, 0))
	hub := New(hc, time.Second)
	ac, bc := clock.NewFake(time.Unix(5000, 0)), clock.NewFake(time.Unix(5000, 0).Add(time.Hour)) // B an hour ahead
	a, b := hub.Replica(ac, invalidation.New(time.Hour, ac)), hub.Replica(bc, invalidation.New(time.Hour, bc))
	ca, _ := a.Claim(ctx, "k", "auth")
	if cb, _ := b.Claim(ctx, "k", "auth"); !ca.Won() || cb.Won() {
		t.Fatalf("claims: A won %v, B won %v", ca.Won(), cb.Won())
	}
	a.Kill()
	hub.Advance(999 * time.Millisecond)
	if cb, _ := b.Claim(ctx, "k", "auth"); cb.Won() {
		t.Fatal("B took a dead replica's claim before ClaimTTL passed")
	}
	hub.Advance(time.Millisecond)
	cb, _ := b.Claim(ctx, "k", "auth")
	if !cb.Won() {
		t.Fatal("B could not take a dead replica's claim ClaimTTL after")
	}
	if err := cb.Share(ctx, entry(bc, "scope")); err != nil {
		t.Fatal(err)
	}
	hub.Advance(10 * time.Second)
	got, _, _ := a.Get(ctx, "k", "auth")
	if got == nil || got.Expires.Time().Sub(ac.Now()) != 20*time.Second || ac.Now().Sub(got.Stored.Time()) != 10*time.Second {
		t.Fatalf("A reads B's entry (B an hour ahead, 10 s later on the hub): %+v, want 20 s fresh, 10 s old", got)
	}
	if got, _, _ := a.Get(ctx, "k", "other"); got != nil {
		t.Fatal("opened for another credential")
	}
	a.Invalidate(ctx, []string{"scope"})
	if got, _, _ := a.Get(ctx, "k", "auth"); got != nil {
		t.Fatal("an entry invalidated after its claim is still served")
	}
}
