package invalidation

import (
	"testing"
	"time"

	"cacheproxy/internal/clock"
)

func newLocal() (*Local, *clock.Fake) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	return New(time.Minute, clk), clk
}

func TestInvalidateHidesOnlyOlderEntriesOfTheScope(t *testing.T) {
	l, _ := newLocal()
	fetched := l.Epoch()
	l.Invalidate(t.Context(), []string{"conv:1"})
	if l.Valid(fetched, []string{"conv:1"}) {
		t.Fatal("invalidated entry still served")
	}
	if !l.Valid(fetched, []string{"conv:2"}) {
		t.Fatal("entry of another scope lost")
	}
	// Fetched after the invalidation: valid.
	if !l.Valid(l.Epoch(), []string{"conv:1"}) {
		t.Fatal("fresh entry hidden")
	}
}

func TestAnEntryInvalidatedDuringItsFetchIsInvalid(t *testing.T) {
	l, _ := newLocal()
	fetched := l.Epoch()                          // fetch starts
	l.Invalidate(t.Context(), []string{"conv:1"}) // a write lands meanwhile
	if l.Valid(fetched, []string{"path:x", "conv:1"}) {
		t.Fatal("stale entry would be stored")
	}
}

func TestMarksArePrunedAfterRetention(t *testing.T) {
	l, clk := newLocal()
	l.Invalidate(t.Context(), []string{"conv:1"})
	clk.Advance(2 * time.Minute)
	l.Invalidate(t.Context(), []string{"conv:2"})
	if n := l.Scopes(); n != 1 {
		t.Fatalf("scopes = %d, want 1 after pruning", n)
	}
}

func TestInvalidateAllHidesEverythingFetchedBefore(t *testing.T) {
	l := New(time.Hour, nil)
	before := l.Epoch()
	l.Invalidate(t.Context(), []string{"other"})
	if !l.Valid(before, []string{"a"}) {
		t.Fatal("an unrelated invalidation hid the entry")
	}
	l.InvalidateAll()
	if l.Valid(before, []string{"a"}) || l.Valid(before, nil) {
		t.Fatal("InvalidateAll left an older entry valid")
	}
	after := l.Epoch()
	if !l.Valid(after, []string{"a"}) {
		t.Fatal("an entry fetched after InvalidateAll is invalid")
	}
}
