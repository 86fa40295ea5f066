package intern

import (
	"strconv"
	"strings"
	"testing"
	"unsafe"
)

// Equal values come back as one copy while either generation holds them;
// the table never holds more than two generations; long values and
// slices of several values are not interned.
func TestSharedWhileRecentAndBounded(t *testing.T) {
	table := &tab
	fresh := func(s string) string { return strings.Clone(s) }
	first := String(fresh("application/json"))
	if again := String(fresh("application/json")); unsafe.StringData(again) != unsafe.StringData(first) {
		t.Fatal("an equal value was not shared")
	}
	for i := range genSize + 10 { // a generation of others: first moves to prev, still shared
		String("v" + strconv.Itoa(i))
	}
	if again := String(fresh("application/json")); unsafe.StringData(again) != unsafe.StringData(first) {
		t.Fatal("a value of the previous generation was not shared")
	}
	for i := range 3 * genSize { // long unseen: forgotten
		String("w" + strconv.Itoa(i))
	}
	if again := String(fresh("application/json")); unsafe.StringData(again) == unsafe.StringData(first) {
		t.Fatal("a value unseen for two generations is still held")
	}
	table.mu.Lock()
	n := len(table.cur) + len(table.prev)
	table.mu.Unlock()
	if n > 2*genSize {
		t.Fatalf("the table holds %d values, want at most %d", n, 2*genSize)
	}
	long := strings.Repeat("x", MaxLen+1)
	if got := String(long); unsafe.StringData(got) != unsafe.StringData(long) {
		t.Fatal("a long value was copied")
	}
	two := []string{"a", "b"}
	if got, shared := SharedValues(two); unsafe.SliceData(got) != unsafe.SliceData(two) || shared {
		t.Fatal("a slice of two values was interned")
	}
}
