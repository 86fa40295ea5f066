// Package cache stores immutable responses in memory, bounded in bytes
// (ristretto). It is storage only: whether an entry is still valid after
// writes is the invalidation package's business, read from the Epoch and
// Tags an entry carries.
//
// It knows nothing of HTTP: an Entry's header is a plain list of fields.
package cache

import (
	"encoding/binary"
	"fmt"
	"hash/maphash"
	"iter"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/intern"

	"github.com/dgraph-io/ristretto/v2"
)

// Entry is one stored response. It is a value shared by every reader and is
// never changed after Set: readers must not modify Body or Tags, or the
// values Fields yields.
//
// The fields with pointers come first: the GC scans an Entry only up to
// its last pointer.
type Entry struct {
	Key  string // the full cache key, checked on Get against hash collisions
	Body []byte
	// Tags are the scopes the entry belongs to. An invalidation of any tag
	// at an epoch later than Epoch makes the entry invalid (see the
	// invalidation package).
	Tags []string
	// header is the response's header fields (Compact), read through
	// Fields and Get: a shape shared by the entries whose fields and
	// shared values are the same, in which a field whose values are the
	// entry's own holds a mark (ownMark) for each, the values themselves
	// in Tags' array after the tags.
	header *shape
	Status int
	// Stored is when the response arrived; Expires ends its freshness;
	// Keep (>= Expires) is when it leaves the cache for good, so that a
	// stale copy can still be served on upstream errors. Each is a Stamp
	// (8 bytes, not a time.Time's 24).
	Stored, Expires, Keep Stamp
	// Epoch is the invalidation epoch when the fetch that produced this
	// entry started.
	Epoch uint64
	// ValidAt memoises the one fact about an entry that changes: the
	// latest invalidation epoch at which it was found still valid. While
	// the epoch has not moved past it, a hit need not read the scope
	// marks again. It is written atomically and only ever raised.
	ValidAt atomic.Uint64
	// block is the size of the allocation Compact put the key, the body
	// and the entry's own strings in; own is the number of own header
	// values, after the tags in their array.
	block, own uint32
}

// A Stamp is a time as a count of nanoseconds from the process's start (by
// the monotonic clock for times read from it), in 8 bytes; the zero Stamp
// is the zero time.
type Stamp int64

var base = time.Now()

// At is t as a Stamp.
func At(t time.Time) Stamp {
	if t.IsZero() {
		return 0
	}
	if d := t.Sub(base); d != 0 {
		return Stamp(d)
	}
	return 1 // the zero Stamp is the zero time: a nanosecond later
}

// Time is s as a time.Time.
func (s Stamp) Time() time.Time {
	if s == 0 {
		return time.Time{}
	}
	return base.Add(time.Duration(s))
}

// Sub is s - t.
func (s Stamp) Sub(t time.Time) time.Duration { return time.Duration(s) - t.Sub(base) }

// After reports whether s is after t (false for the zero Stamp).
func (s Stamp) After(t time.Time) bool { return s != 0 && s.Sub(t) > 0 }

// Compact lays e out as it is stored, with h as its header fields (sorted
// by name): its key, its body and the header values and tags that are its
// own in one block of their size, with no pointers for the GC to follow
// (the key and own strings are views of it); its tags and own values in
// one array; the strings that repeat across entries shared through
// intern, and the fields themselves a shape shared by the entries whose
// fields differ only in their own values (a Date and a Twilio-Request-Id,
// say). A tag the key begins with (its own path's scope) becomes a view of
// the key. Compact copies what it keeps: h and e's old slices are not
// changed. Call it once, before e is shared.
//
// An entry's parts as separate allocations mixed long-lived bytes with a
// fetch's short-lived ones in the same size classes, spans half full of
// old entries stayed resident, and each field cost its slot in every
// entry (docs/performance.md, "Memory").
func (e *Entry) Compact(h Header) {
	// Which strings are the entry's own, and the bytes they take.
	header := slices.Clone(h)
	own := make([]bool, len(header)+len(e.Tags))
	size, values := len(e.Key)+len(e.Body), 0
	for i := range header {
		f := &header[i]
		f.Name = intern.String(f.Name)
		if v, shared := intern.SharedValues(f.Values); shared || len(f.Values) == 0 {
			f.Values = v
			continue
		}
		own[i], values = true, values+len(f.Values)
		for _, s := range f.Values {
			size += len(s)
		}
	}
	strs := make([]string, len(e.Tags)+values)
	for i, t := range e.Tags {
		if e.viewOfKey(t) {
			continue
		}
		if shared, ok := intern.SharedString(t); ok {
			strs[i] = shared
			continue
		}
		own[len(header)+i], size = true, size+len(t)
	}
	// The block: key, own strings, body.
	blk := make([]byte, 0, size)
	put := func(s string) string {
		if s == "" {
			return ""
		}
		o := len(blk)
		blk = append(blk, s...)
		return unsafe.String(&blk[o], len(s))
	}
	key := put(e.Key)
	for i, t := range e.Tags {
		switch {
		case e.viewOfKey(t):
			strs[i] = key[:len(t)]
		case own[len(header)+i]:
			strs[i] = put(t)
		}
	}
	n := len(e.Tags)
	for i, f := range header {
		if own[i] {
			for j, v := range f.Values {
				strs[n+j] = put(v)
			}
			n += len(f.Values)
			header[i].Values = marks(len(f.Values))
		}
	}
	o := len(blk)
	blk = append(blk, e.Body...)
	e.Key, e.Tags = key, strs[:len(e.Tags):len(e.Tags)]
	e.Body, e.block, e.own = blk[o:len(blk):len(blk)], uint32(cap(blk)), uint32(values)
	e.header = shapes.get(header)
}

// A shape is an entry's header fields, shared by the entries whose fields
// differ only in their own values.
type shape struct{ fields Header }

// ownMark stands in a shape for a value that is an entry's own: its
// bytes, not its text, mark it (a copy made here, equal to no value an
// entry holds). ownMarks are marks for the fields of up to 16 own values.
var (
	ownMark  = strings.Clone("own value")
	ownMarks = slices.Repeat([]string{ownMark}, 16)
)

// marks is n marks, read-only.
func marks(n int) []string {
	if n <= len(ownMarks) {
		return ownMarks[:n:n]
	}
	return slices.Repeat([]string{ownMark}, n)
}

func isOwn(v []string) bool {
	return len(v) > 0 && unsafe.StringData(v[0]) == unsafe.StringData(ownMark)
}

// Fields yields e's header fields, sorted by name, with their values
// (read-only).
func (e *Entry) Fields() iter.Seq2[string, []string] {
	return func(yield func(string, []string) bool) {
		if e.header == nil {
			return
		}
		own, j := e.ownValues(), 0
		for _, f := range e.header.fields {
			v := f.Values
			if isOwn(v) {
				v, j = own[j:j+len(v):j+len(v)], j+len(v)
			}
			if !yield(f.Name, v) {
				return
			}
		}
	}
}

// ownValues are the entry's own header values, after its tags in their
// array.
func (e *Entry) ownValues() []string {
	if e.own == 0 {
		return nil
	}
	return unsafe.Slice((*string)(unsafe.Add(unsafe.Pointer(unsafe.SliceData(e.Tags)), uintptr(len(e.Tags))*unsafe.Sizeof(""))), e.own)
}

// Get is the values of the header field name (canonical), or nil.
func (e *Entry) Get(name string) []string {
	for k, v := range e.Fields() {
		if k == name {
			return v
		}
	}
	return nil
}

// Header is a copy of e's header fields.
func (e *Entry) Header() Header {
	var h Header
	for k, v := range e.Fields() {
		h = append(h, HeaderField{Name: k, Values: v})
	}
	return h
}

// Restamp is a copy of e with other times (the same key, body, header and
// tags, shared), as a reader of another tier sees it: its Epoch and
// ValidAt are zero, as for any entry read from L2.
func (e *Entry) Restamp(stored, expires, keep Stamp) *Entry {
	return &Entry{Key: e.Key, Body: e.Body, Tags: e.Tags, header: e.header, Status: e.Status,
		Stored: stored, Expires: expires, Keep: keep, block: e.block, own: e.own}
}

// viewOfKey reports whether the key begins with t.
func (e *Entry) viewOfKey(t string) bool { return len(t) <= len(e.Key) && e.Key[:len(t)] == t }

// shapes shares header shapes between entries, bounded as intern's table:
// two generations of at most shapesGen shapes each.
var shapes = shapeTable{cur: make(map[string]*shape, shapesGen)}

const shapesGen = 1024

type shapeTable struct {
	mu        sync.Mutex
	cur, prev map[string]*shape
	sig       []byte
}

// get returns h's shape, shared with earlier callers whose fields were
// equal. Names and shared values are compared by their bytes, marks by
// their number.
func (t *shapeTable) get(h Header) *shape {
	t.mu.Lock()
	defer t.mu.Unlock()
	sig := t.sig[:0]
	for _, f := range h {
		sig = binary.AppendUvarint(append(binary.AppendUvarint(sig, uint64(len(f.Name))), f.Name...), uint64(len(f.Values)))
		if isOwn(f.Values) {
			sig = append(sig, 0)
			continue
		}
		sig = append(sig, 1)
		for _, v := range f.Values {
			sig = append(binary.AppendUvarint(sig, uint64(len(v))), v...)
		}
	}
	t.sig = sig
	if got, ok := t.cur[string(sig)]; ok {
		return got
	}
	sh, ok := t.prev[string(sig)]
	if !ok {
		sh = &shape{h}
	}
	if len(t.cur) >= shapesGen {
		t.prev, t.cur = t.cur, make(map[string]*shape, shapesGen)
	}
	t.cur[string(sig)] = sh
	return sh
}

// Approximate bytes of an Entry beyond its block, measured (live heap per
// entry after a GC, a participant read through the proxy): the struct,
// ristretto's item and slots, and on average what an entry owns in the
// shared tables (its participant's tag's slot: internal/intern; its share
// of a header shape); a string's slot in the tags' array (a tag's or an
// own value's). An entry's own bytes are within 15% of its live heap
// (TestCostIsWhatAnEntryTakes).
const (
	entryOverhead = 370
	tagOverhead   = 16
)

// heapShare is what an entry costs the process beyond its live bytes, as
// a fraction of them (1/heapShare): the free slots of the spans it shares
// with entries evicted before it (the Go heap does not move objects), and
// the GC's metadata. Measured at a full cache under eviction
// (bench/memory): 84 MB of spans in use for 73 MB of objects, and 4 MB of
// metadata, a fifth more. Charged, it makes max_bytes bound what the
// entries take in resident memory, not only on the heap
// (docs/performance.md, "Memory").
const heapShare = 5

// Cost is the entry's memory in bytes, as ristretto accounts it: its own
// bytes and its share of the heap's overhead (heapShare).
func (e *Entry) Cost() int64 {
	n := e.ownBytes()
	return n + n/heapShare
}

// ownBytes is the entry's live heap: its block (Compact), or before
// Compact its key, its body and in full a tag too long to be shared
// (intern.MaxLen); the fixed part; a slot per tag and own value. A tag
// that is a view of the key costs its slot only.
func (e *Entry) ownBytes() int64 {
	n := entryOverhead + (len(e.Tags)+int(e.own))*tagOverhead
	if e.block > 0 {
		return int64(n + int(e.block))
	}
	n += len(e.Key) + cap(e.Body)
	for _, t := range e.Tags {
		if unsafe.StringData(t) != unsafe.StringData(e.Key) {
			n += unshared(t)
		}
	}
	return int64(n)
}

// unshared is what s costs an entry beyond its slot: nothing if it is
// short enough to be one copy shared by every entry that holds it.
func unshared(s string) int {
	if len(s) > intern.MaxLen {
		return len(s)
	}
	return 0
}

// Store is a byte-bounded cache of entries.
type Store struct {
	c     *ristretto.Cache[string, *Entry]
	clock clock.Clock
	// life guards Set and Del against Close: a detached fetch may finish
	// after shutdown closed the store, and ristretto must not be written then.
	life   sync.RWMutex
	closed bool

	evictions, expiries, rejections atomic.Uint64
}

// New returns a store holding at most maxBytes of entries, on clk (the
// real clock if nil).
func New(maxBytes int64, clk clock.Clock) (*Store, error) {
	return newWithHash(maxBytes, clk, keyHash)
}

// keySeed seeds keyHash, once per process.
var keySeed = maphash.MakeSeed()

// keyHash is ristretto's hash of a key: one pass of the runtime's string
// hash, where ristretto's own makes two (the runtime's and xxhash, a
// "conflict" hash to tell apart keys of one hash). Get compares the
// entry's own key instead, so two keys of one hash miss; they never
// answer for each other.
func keyHash(key string) (uint64, uint64) { return maphash.String(keySeed, key), 0 }

func newWithHash(maxBytes int64, clk clock.Clock, hash func(string) (uint64, uint64)) (*Store, error) {
	// A participant costs about 1.4 KB (Cost): ten counters per expected
	// entry.
	counters := max(maxBytes/1400*10, 1000)
	s := &Store{clock: clock.Or(clk)}
	c, err := ristretto.NewCache(&ristretto.Config[string, *Entry]{
		NumCounters: counters,
		MaxCost:     maxBytes,
		BufferItems: 64,
		KeyToHash:   hash,
		// ristretto's own metrics put shared counters on every Get (3% of
		// a hit served over loopback); the callbacks below run in its
		// background goroutine instead.
		Metrics:  false,
		OnEvict:  func(it *ristretto.Item[*Entry]) { s.removed(it.Expiration, time.Now()) },
		OnReject: func(*ristretto.Item[*Entry]) { s.rejections.Add(1) },
	})
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	s.c = c
	return s, nil
}

// removed counts an entry ristretto removed by itself: an expiry when its
// TTL had passed (ristretto's sweep, on the real clock), else an eviction
// to make room within max_bytes. (Replacements and Dels are neither.)
func (s *Store) removed(expiration, now time.Time) {
	if !expiration.IsZero() && !expiration.After(now) {
		s.expiries.Add(1)
		return
	}
	s.evictions.Add(1)
}

// Close stops the store's background goroutines. Later Sets are dropped.
func (s *Store) Close() {
	s.life.Lock()
	defer s.life.Unlock()
	if !s.closed {
		s.closed = true
		s.c.Close()
	}
}

// Wait blocks until pending Sets are applied (ristretto applies them
// asynchronously); tests and purges use it.
func (s *Store) Wait() {
	s.life.RLock()
	defer s.life.RUnlock()
	if !s.closed {
		s.c.Wait()
	}
}

// Get returns the entry under key unless it is absent or past its Keep
// time at now. The caller passes now (the time its request arrived) to save
// a clock read on the hit path.
func (s *Store) Get(key string, now time.Time) (*Entry, bool) {
	e, ok := s.c.Get(key)
	if !ok || e.Key != key || !e.Keep.After(now) {
		return nil, false
	}
	return e, true
}

// Set stores e until e.Keep and returns once ristretto has applied it (its
// Sets are asynchronous): a read that starts after Set returns finds the
// entry, unless the admission policy dropped it, which is not an error. It
// reports whether ristretto accepted the item.
func (s *Store) Set(e *Entry) bool {
	ttl := e.Keep.Sub(s.clock.Now())
	if ttl <= 0 {
		return false
	}
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed || !s.c.SetWithTTL(e.Key, e, e.Cost(), ttl) {
		return false
	}
	s.c.Wait()
	return true
}

// Del removes one key.
func (s *Store) Del(key string) {
	s.life.RLock()
	defer s.life.RUnlock()
	if !s.closed {
		s.c.Del(key)
	}
}

// Stats is a snapshot for logs and metrics.
type Stats struct {
	// Entries and Bytes are what the cache holds (Entries counts expired
	// entries not yet swept).
	Entries, Bytes int64
	// Evictions count entries evicted to make room within max_bytes,
	// Expiries those removed once their time in memory ended, Rejections
	// those the admission policy refused: totals since the store began.
	Evictions, Expiries, Rejections uint64
}

// Stats reports the store's state. It walks the entries: for periodic
// summaries and metric scrapes, not for the request path.
func (s *Store) Stats() Stats {
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closed {
		return Stats{}
	}
	var n int64
	s.c.IterValues(func(*Entry) bool { n++; return false })
	return Stats{
		Entries: n, Bytes: s.c.MaxCost() - s.c.RemainingCost(),
		Evictions: s.evictions.Load(), Expiries: s.expiries.Load(), Rejections: s.rejections.Load(),
	}
}
