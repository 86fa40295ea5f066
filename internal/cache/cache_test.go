package cache

import (
	"bytes"
	"fmt"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/intern"
)

func newStore(t *testing.T) (*Store, *clock.Fake) {
	t.Helper()
	clk := clock.NewFake(time.Now())
	s, err := New(8<<20, clk)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s, clk
}

func entry(clk *clock.Fake, key string, tags ...string) *Entry {
	now := clk.Now()
	return &Entry{Key: key, Status: 200, Body: []byte("x"), Stored: At(now), Expires: At(now.Add(10 * time.Second)), Keep: At(now.Add(10 * time.Second)), Tags: tags}
}

func TestSetGetExpire(t *testing.T) {
	s, clk := newStore(t)
	if !s.Set(entry(clk, "k", "conv:1")) {
		t.Fatal("Set refused")
	}
	s.Wait()
	if _, ok := s.Get("k", clk.Now()); !ok {
		t.Fatal("miss after Set")
	}
	clk.Advance(11 * time.Second)
	if _, ok := s.Get("k", clk.Now()); ok {
		t.Fatal("hit after Keep")
	}
}

func TestCollisionSafe(t *testing.T) {
	s, clk := newStore(t)
	e := entry(clk, "real-key")
	s.c.SetWithTTL("other-key", e, 1, time.Minute) // same value under another key
	s.Wait()
	if _, ok := s.Get("other-key", clk.Now()); ok {
		t.Fatal("entry served under a key that is not its own")
	}
}

// TestKeysOfOneHashNeverAnswerForEachOther: ristretto keeps one hash per
// key and no second one, so two keys of one hash share its slot; a read of
// either gets its own entry or a miss, never the other's.
func TestKeysOfOneHashNeverAnswerForEachOther(t *testing.T) {
	clk := clock.NewFake(time.Unix(1_700_000_000, 0))
	s, err := newWithHash(1<<20, clk, func(string) (uint64, uint64) { return 7, 0 })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if !s.Set(entry(clk, "tenant-a")) {
		t.Fatal("Set refused")
	}
	if e, ok := s.Get("tenant-a", clk.Now()); !ok || e.Key != "tenant-a" {
		t.Fatalf("tenant-a: %v %v", e, ok)
	}
	if e, ok := s.Get("tenant-b", clk.Now()); ok {
		t.Fatalf("tenant-b was answered with %q's entry", e.Key)
	}
	if !s.Set(entry(clk, "tenant-b")) {
		t.Fatal("Set refused")
	}
	if e, ok := s.Get("tenant-a", clk.Now()); ok {
		t.Fatalf("tenant-a was answered with %q's entry", e.Key)
	}
	if e, ok := s.Get("tenant-b", clk.Now()); !ok || e.Key != "tenant-b" {
		t.Fatalf("tenant-b: %v %v", e, ok)
	}
}

func TestSetAfterCloseIsDropped(t *testing.T) {
	s, clk := newStore(t)
	s.Close()
	if s.Set(entry(clk, "k")) {
		t.Fatal("Set after Close accepted")
	}
	s.Del("k")
	s.Wait()
}

func TestStatsCountEntriesBytesAndEvictions(t *testing.T) {
	clk := clock.NewFake(time.Now())
	s, err := New(1<<20, clk)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := 0; i < 200; i++ {
		e := entry(clk, string(rune('a'+i%26))+string(rune(i)))
		e.Body = make([]byte, 20<<10)
		s.Set(e)
		s.Wait()
	}
	st := s.Stats()
	if st.Entries <= 0 || st.Bytes <= 0 || st.Bytes > 1<<20 || st.Evictions+st.Rejections == 0 || st.Expiries != 0 {
		t.Fatalf("stats after overfilling: %+v", st)
	}
}

func TestSetIsVisibleWhenItReturns(t *testing.T) {
	s, clk := newStore(t)
	for i := 0; i < 1000; i++ {
		key := fmt.Sprint("k", i)
		if !s.Set(entry(clk, key)) {
			continue // dropped by the admission policy: allowed
		}
		if _, ok := s.Get(key, clk.Now()); !ok {
			t.Fatalf("entry %d accepted but not visible after Set returned", i)
		}
	}
}

// Entries whose time in memory ended are expiries, not evictions:
// cacheproxy_cache_evictions_total counts only room made within
// max_bytes (it read 229 while a 64 MiB cache held 100 KB, each expiry
// counted as one). ristretto sweeps expired entries on the real clock,
// within about ten seconds.
func TestExpiriesAreNotEvictions(t *testing.T) {
	s, err := New(8<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Now()
	for i := range 20 {
		e := &Entry{Key: fmt.Sprint("k", i), Status: 200, Body: []byte("x"), Stored: At(now), Expires: At(now.Add(50 * time.Millisecond)), Keep: At(now.Add(50 * time.Millisecond))}
		if !s.Set(e) {
			t.Fatal("Set refused")
		}
	}
	for deadline := time.Now().Add(30 * time.Second); s.Stats().Expiries < 20; time.Sleep(50 * time.Millisecond) { // ristretto's sweep runs on its own ticker
		if time.Now().After(deadline) {
			t.Fatalf("expired entries never swept: %+v", s.Stats())
		}
	}
	if st := s.Stats(); st.Evictions != 0 || st.Expiries != 20 {
		t.Fatalf("%+v: want 20 expiries and no eviction", st)
	}
}

// The classification itself: a removal past its expiration is an expiry;
// one before it, or of an entry without one, is an eviction.
func TestRemovedClassifies(t *testing.T) {
	var s Store
	now := time.Now()
	s.removed(now.Add(-time.Second), now)
	s.removed(now, now)
	s.removed(now.Add(time.Second), now)
	s.removed(time.Time{}, now)
	if s.expiries.Load() != 2 || s.evictions.Load() != 2 {
		t.Fatalf("expiries %d, evictions %d; want 2 and 2", s.expiries.Load(), s.evictions.Load())
	}
}

// An entry's own bytes are within 15% of what it takes on the heap (the
// live heap after a GC, per entry), for entries shaped as the proxy stores
// them: a participant's body, its key, five headers (the values that
// repeat shared, as internal/intern shares them) and five tags. Its Cost
// adds its share of the heap's overhead (heapShare), which shows only in
// resident memory at a full cache under eviction: bench/memory checks
// that Cost is within 15% of the resident growth per entry.
func TestCostIsWhatAnEntryTakes(t *testing.T) {
	if size := unsafe.Sizeof(Entry{}); size > 128 {
		t.Fatalf("an Entry is %d bytes: more than its 128-byte size class", size)
	}
	s, err := New(1<<30, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const n = 20000
	now := time.Now()
	date := now.UTC().Format(http.TimeFormat)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	var cost int64
	for i := range n {
		// As the proxy stores a participant: the response's own copies of
		// its header values and tags, laid out by Compact.
		sid := fmt.Sprintf("%032x", i)
		path := "conversations|path:/v1/Conversations/CH00000000000000000000000000000001/Participants/MB" + sid
		e := &Entry{
			Key:    path + "? " + sid,
			Status: 200, Body: bytes.Repeat([]byte("x"), 400+i%100),
			Stored: At(now), Expires: At(now.Add(time.Hour)), Keep: At(now.Add(time.Hour)),
			Tags: []string{strings.Clone(path), "conversations|conv:CH00000000000000000000000000000001", "conversations|conv:*",
				"conversations|part:MB" + sid, "conversations|part:*"},
		}
		e.Compact(HeaderOf(map[string][]string{"Content-Type": {"application/json"}, "Date": {date}, "Content-Length": {strconv.Itoa(450)},
			"Twilio-Request-Id": {"RQ" + sid}, "X-Home-Region": {"us1"}}))
		cost += e.ownBytes()
		if !s.Set(e) {
			t.Fatal("Set refused")
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	live := float64(after.HeapAlloc-before.HeapAlloc) / n
	per := float64(cost) / n
	t.Logf("live %.0f B per entry, own bytes %.0f B (%.1f%%)", live, per, 100*(per-live)/live)
	if per < 0.85*live || per > 1.15*live {
		t.Fatalf("own bytes %.0f B per entry, live %.0f B: want within 15%%", per, live)
	}
}

// A Stamp is the time it was made from, to the nanosecond, whether read
// from the real clock (monotonic) or a fake one; the zero time stays zero.
func TestStampsKeepTheirTime(t *testing.T) {
	real := time.Now()
	for _, tm := range []time.Time{real, real.Add(-time.Hour), time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} {
		if got := At(tm).Time(); !got.Equal(tm) {
			t.Fatalf("At(%v).Time() = %v", tm, got)
		}
	}
	if got := At(base).Time(); got.IsZero() || got.Sub(base) != time.Nanosecond {
		t.Fatalf("the process's start: %v, want a nanosecond after it (the zero Stamp is the zero time)", got)
	}
	if s := At(time.Time{}); s != 0 || !s.Time().IsZero() {
		t.Fatalf("the zero time: %d, %v", s, s.Time())
	}
	if later := At(real.Add(time.Second)).Time(); !later.After(real) || later.Sub(real) != time.Second {
		t.Fatalf("a second later: %v after %v", later, real)
	}
	if s := At(real.Add(time.Second)); s.Sub(real) != time.Second || !s.After(real) || s.After(real.Add(time.Second)) || Stamp(0).After(real) {
		t.Fatalf("Sub and After: %v, %v", s.Sub(real), s.After(real))
	}
}

// compacted is three entries of one shape, compacted in turn, and the
// header and tags the second was built from; their ids (request ids,
// participants) begin with p, so that no other test has seen them.
func compacted(p string) (first, second, third *Entry, h Header, tags []string) {
	header := func(id string) Header {
		return Header{{Name: "Content-Type", Values: []string{strings.Clone("application/json")}}, {Name: "Twilio-Request-Id", Values: []string{"RQ" + id}}}
	}
	mk := func(id string) *Entry {
		return &Entry{Key: comPath + "? " + id, Status: 200, Body: []byte(`{"sid":"MB1"}`),
			Tags: []string{strings.Clone(comPath), strings.Clone(comConv), "conversations|part:" + id}}
	}
	first, second, third = mk(p+"1"), mk(p+"2"), mk(p+"3")
	h, tags = header(p+"2"), second.Tags
	first.Compact(header(p + "1"))
	second.Compact(h)
	third.Compact(header(p + "3"))
	return first, second, third, h, tags
}

const (
	comPath = "conversations|path:/v1/Conversations/CH1/Participants/MB1"
	comConv = "conversations|conv:CH77777777777777777777777777777777"
)

// inBlock reports whether p points into e's block.
func inBlock(e *Entry, p *byte) bool {
	start, a := uintptr(unsafe.Pointer(unsafe.StringData(e.Key))), uintptr(unsafe.Pointer(p))
	return a >= start && a < start+uintptr(e.block)
}

// Compact puts an entry's key, body and own strings in one block of their
// size, makes the path tag a view of the key, and leaves the slices it
// was given as they were; Cost is the block and the slots.
func TestCompactLaysAnEntryOutInOneBlock(t *testing.T) {
	_, e, _, h, tags := compacted("lay")
	if h[0].Values[0] != "application/json" || h[1].Values[0] != "RQlay2" || tags[2] != "conversations|part:lay2" || unsafe.StringData(tags[0]) == unsafe.StringData(e.Tags[0]) {
		t.Fatal("Compact changed the slices it was given")
	}
	if e.Key != comPath+"? lay2" || string(e.Body) != `{"sid":"MB1"}` || e.Get("Twilio-Request-Id")[0] != "RQlay2" ||
		e.Get("Content-Type")[0] != "application/json" || e.Tags[0] != comPath || e.Tags[1] != comConv || e.Tags[2] != "conversations|part:lay2" {
		t.Fatalf("Compact changed the entry: %q %q %v %q", e.Key, e.Body, e.Header(), e.Tags)
	}
	// One block: the key, the own strings and the body, nothing more.
	if int(e.block) != len(e.Key)+len("RQlay2")+len("conversations|part:lay2")+len(e.Body) || cap(e.Body) != len(e.Body) ||
		!inBlock(e, unsafe.SliceData(e.Body)) || !inBlock(e, unsafe.StringData(e.Get("Twilio-Request-Id")[0])) || !inBlock(e, unsafe.StringData(e.Tags[2])) {
		t.Fatalf("block of %d bytes for key %d, body %d (cap %d): not one block of their size", e.block, len(e.Key), len(e.Body), cap(e.Body))
	}
	if unsafe.StringData(e.Tags[0]) != unsafe.StringData(e.Key) {
		t.Fatalf("the path tag %q is its own copy", e.Tags[0])
	}
	if own := int64(entryOverhead + (3+1)*tagOverhead + int(e.block)); e.Cost() != own+own/heapShare {
		t.Fatalf("Cost %d, want %d (the block and the slots) and its share of the heap", e.Cost(), own+own/heapShare)
	}
	// A value or tag too long to be shared is the entry's own, in the block.
	long := &Entry{Key: "k", Tags: []string{"t|" + strings.Repeat("x", intern.MaxLen)}}
	long.Compact(Header{{Name: "Link", Values: []string{strings.Repeat("l", intern.MaxLen+1)}}})
	if long.block != 1+2*(intern.MaxLen+1)+1 || long.Get("Link")[0] != strings.Repeat("l", intern.MaxLen+1) {
		t.Fatalf("block %d: the long value and tag are not in it", long.block)
	}
}

// What repeats across entries is one copy, shared by the entries after
// the first, and their fields are one shape, each entry's own values its
// own.
func TestCompactSharesWhatRepeats(t *testing.T) {
	first, second, third, _, _ := compacted("share")
	if unsafe.StringData(second.Get("Content-Type")[0]) != unsafe.StringData(third.Get("Content-Type")[0]) ||
		unsafe.StringData(second.Tags[1]) != unsafe.StringData(third.Tags[1]) || inBlock(second, unsafe.StringData(second.Tags[1])) {
		t.Fatal("Content-Type or the conversation's tag: a copy per entry, want one shared")
	}
	if second.header != third.header { // the first's Content-Type may have been its own
		t.Fatal("entries with the same fields and shared values: a shape each, want one shared")
	}
	if first.Get("Twilio-Request-Id")[0] != "RQshare1" || second.Get("Twilio-Request-Id")[0] != "RQshare2" || third.Get("Twilio-Request-Id")[0] != "RQshare3" {
		t.Fatal("a shared shape mixed up the entries' own values")
	}
}

// Fields yields an entry's fields in order with their values, own and
// shared alike, through a shared shape, also for a field with more own
// values than the shared marks; Header copies them, Restamp keeps them.
func TestFieldsAreTheHeaderGiven(t *testing.T) {
	many := make([]string, len(ownMarks)+1)
	for i := range many {
		many[i] = "v" + strconv.Itoa(i) + "-" + strconv.Itoa(len(many))
	}
	for _, h := range []Header{
		{{Name: "A", Values: []string{"x-1"}}, {Name: "B", Values: []string{"shared", "y-2"}}, {Name: "C", Values: []string{"z-3"}}},
		{{Name: "A", Values: []string{"x-1"}}, {Name: "Link", Values: many}, {Name: "Z", Values: []string{"z-4"}}},
		{{Name: "Empty"}},
		nil,
	} {
		e := &Entry{Key: "k", Tags: []string{"k", "t|1"}}
		e.Compact(h)
		var got Header
		for k, v := range e.Fields() {
			got = append(got, HeaderField{Name: k, Values: v})
		}
		if fmt.Sprint(got) != fmt.Sprint(h) || fmt.Sprint(e.Header()) != fmt.Sprint(h) || e.Tags[1] != "t|1" || len(e.Tags) != 2 {
			t.Fatalf("fields %v, Header %v, tags %q: want %v", got, e.Header(), e.Tags, h)
		}
		if r := e.Restamp(1, 2, 3); fmt.Sprint(r.Header()) != fmt.Sprint(h) || r.Keep != 3 || r.Cost() != e.Cost() {
			t.Fatalf("restamped: %v, Cost %d (was %d)", r.Header(), r.Cost(), e.Cost())
		}
	}
}

// Compact keeps an entry's key, body, header and tags as they were, in a
// block of exactly the bytes that are the entry's own, whatever the
// strings (empty, repeated, long, many values in a field), and Restamp
// keeps them too.
func FuzzCompact(f *testing.F) {
	f.Add("k|path:/a? fp", []byte(`{"a":1}`), "application/json", "RQ1", "k|path:/a", "t|conv:1", uint8(1))
	f.Add("", []byte{}, "", "", "", "", uint8(0))
	f.Add("key", []byte("b"), strings.Repeat("v", intern.MaxLen+1), "v", "key", "key", uint8(20))
	f.Fuzz(func(t *testing.T, key string, body []byte, shared, own, tag1, tag2 string, many uint8) {
		values := make([]string, int(many)%(len(ownMarks)+3))
		for i := range values {
			values[i] = own + strconv.Itoa(i)
		}
		h := Header{{Name: "A", Values: []string{shared}}, {Name: "B", Values: values}, {Name: "C", Values: []string{own}}}
		tags := []string{tag1, tag2, "t|*"}
		e := &Entry{Key: key, Body: body, Tags: slices.Clone(tags)}
		e.Compact(h)
		if e.Key != key || !bytes.Equal(e.Body, body) || cap(e.Body) != len(e.Body) || !slices.Equal(e.Tags, tags) || cap(e.Tags) != len(tags) {
			t.Fatalf("key %q body %q tags %q: want %q %q %q", e.Key, e.Body, e.Tags, key, body, tags)
		}
		var got Header
		for k, v := range e.Fields() {
			got = append(got, HeaderField{Name: k, Values: v})
		}
		if fmt.Sprintf("%q", got) != fmt.Sprintf("%q", h) || fmt.Sprintf("%q", e.Restamp(1, 2, 3).Header()) != fmt.Sprintf("%q", h) {
			t.Fatalf("fields %q, want %q", got, h)
		}
		if b := int(e.block); b < len(key)+len(body) || e.Cost() < int64(b) {
			t.Fatalf("block %d for key %d and body %d, Cost %d", b, len(key), len(body), e.Cost())
		}
	})
}
