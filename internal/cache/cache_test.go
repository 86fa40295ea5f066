package cache

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time          { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) advance(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

func newStore(t *testing.T) (*Store, *clock) {
	t.Helper()
	clk := &clock{t: time.Now()}
	s, err := New(8<<20, time.Minute, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s, clk
}

func entry(s *Store, clk *clock, key string, tags ...string) *Entry {
	now := clk.now()
	return &Entry{Key: key, Status: 200, Body: []byte("x"), Stored: now, Expires: now.Add(10 * time.Second), Keep: now.Add(10 * time.Second), Epoch: s.Epoch(), Tags: tags}
}

func TestSetGetExpire(t *testing.T) {
	s, clk := newStore(t)
	if !s.Set(entry(s, clk, "k", "conv:1")) {
		t.Fatal("Set refused")
	}
	s.Wait()
	if _, ok := s.Get("k", clk.now()); !ok {
		t.Fatal("miss after Set")
	}
	clk.advance(11 * time.Second)
	if _, ok := s.Get("k", clk.now()); ok {
		t.Fatal("hit after Keep")
	}
}

func TestInvalidateHidesOnlyOlderEntriesOfTheScope(t *testing.T) {
	s, clk := newStore(t)
	s.Set(entry(s, clk, "a", "conv:1"))
	s.Set(entry(s, clk, "b", "conv:2"))
	s.Wait()
	s.Invalidate("conv:1")
	if _, ok := s.Get("a", clk.now()); ok {
		t.Fatal("invalidated entry still served")
	}
	if _, ok := s.Get("b", clk.now()); !ok {
		t.Fatal("entry of another scope lost")
	}
	// Fetched after the invalidation: valid.
	s.Set(entry(s, clk, "a", "conv:1"))
	s.Wait()
	if _, ok := s.Get("a", clk.now()); !ok {
		t.Fatal("fresh entry hidden")
	}
}

func TestSetRefusesAnEntryInvalidatedDuringItsFetch(t *testing.T) {
	s, clk := newStore(t)
	e := entry(s, clk, "a", "conv:1") // fetch starts
	s.Invalidate("conv:1")            // a write lands meanwhile
	if s.Set(e) {
		t.Fatal("stale entry stored")
	}
}

func TestMarksArePrunedAfterRetention(t *testing.T) {
	s, clk := newStore(t)
	s.Invalidate("conv:1")
	clk.advance(2 * time.Minute)
	s.Invalidate("conv:2")
	if n := s.Stats().Scopes; n != 1 {
		t.Fatalf("scopes = %d, want 1 after pruning", n)
	}
}

func TestCollisionSafe(t *testing.T) {
	s, clk := newStore(t)
	e := entry(s, clk, "real-key")
	s.c.SetWithTTL("other-key", e, 1, time.Minute) // same value under another key
	s.Wait()
	if _, ok := s.Get("other-key", clk.now()); ok {
		t.Fatal("entry served under a key that is not its own")
	}
}

func TestSetAfterCloseIsDropped(t *testing.T) {
	s, clk := newStore(t)
	s.Close()
	if s.Set(entry(s, clk, "k")) {
		t.Fatal("Set after Close accepted")
	}
	s.Del("k")
	s.Wait()
}

func TestStatsCountEntriesBytesAndEvictions(t *testing.T) {
	clk := &clock{t: time.Now()}
	s, err := New(1<<20, time.Minute, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := 0; i < 200; i++ {
		e := entry(s, clk, string(rune('a'+i%26))+string(rune(i)))
		e.Body = make([]byte, 20<<10)
		s.Set(e)
		s.Wait()
	}
	st := s.Stats()
	if st.Entries <= 0 || st.Bytes <= 0 || st.Bytes > 1<<20 || st.Evictions+st.Rejections == 0 {
		t.Fatalf("stats after overfilling: %+v", st)
	}
}

func TestSetIsVisibleWhenItReturns(t *testing.T) {
	s, clk := newStore(t)
	for i := 0; i < 1000; i++ {
		key := fmt.Sprint("k", i)
		if !s.Set(entry(s, clk, key)) {
			continue // dropped by the admission policy: allowed
		}
		if _, ok := s.Get(key, clk.now()); !ok {
			t.Fatalf("entry %d accepted but not visible after Set returned", i)
		}
	}
}
