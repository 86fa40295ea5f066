// Package intern shares equal strings (and single-string slices) between
// cache entries: header values such as Content-Type and Date, and scope
// tags such as a conversation's, repeat across entries, and a copy per
// entry costs what the cache could hold instead (docs/performance.md,
// "Memory"). The table is bounded: two generations of at most genSize
// values each; a value seen again while in either is shared, and one not
// seen for two generations is forgotten (its copies stay where they are).
package intern

import "sync"

// genSize bounds each generation of the table.
const genSize = 4096

// MaxLen is the longest value interned: longer ones are rarely equal.
const MaxLen = 128

type table struct {
	mu        sync.Mutex
	cur, prev map[string][]string
}

var tab = table{cur: make(map[string][]string, genSize)}

// SharedValues returns v, or an equal slice shared with earlier callers
// when v holds one string of at most MaxLen bytes (read-only), and whether
// the result is an earlier caller's: false when v is long, holds more
// than one string, or was not in the table (the table now holds v, and
// the caller may keep its own copy).
func SharedValues(v []string) ([]string, bool) {
	if len(v) != 1 || len(v[0]) > MaxLen {
		return v, false
	}
	return tab.get(v[0], v)
}

// String returns s, or an equal string shared with earlier callers.
func String(s string) string {
	s, _ = SharedString(s)
	return s
}

// SharedString is String, and whether the result is an earlier caller's,
// as for SharedValues.
func SharedString(s string) (string, bool) {
	if len(s) > MaxLen {
		return s, false
	}
	v, shared := tab.get(s, nil)
	return v[0], shared
}

// get returns the shared slice for s and true, or makes v (or a new slice
// of s) the shared one when s is not in the table and returns it and
// false.
func (t *table) get(s string, v []string) ([]string, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if got, ok := t.cur[s]; ok {
		return got, true
	}
	if got, ok := t.prev[s]; ok {
		t.put(got)
		return got, true
	}
	if v == nil {
		v = []string{s}
	}
	t.put(v[:1:1])
	return v[:1:1], false
}

// put makes v the shared slice of v[0], starting a generation when the
// current one is full.
func (t *table) put(v []string) {
	if len(t.cur) >= genSize {
		t.prev, t.cur = t.cur, make(map[string][]string, genSize)
	}
	t.cur[v[0]] = v
}
