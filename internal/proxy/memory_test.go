package proxy

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"testing"
	"unsafe"

	"cacheproxy/internal/cache"
)

// Header values that repeat across entries (Content-Type, Date, a
// Content-Length) are one copy shared by the entries; a value of one
// entry's own (Twilio-Request-Id) is its own, and equal either way.
func TestStoredHeadersShareRepeatedValues(t *testing.T) {
	mk := func(id string) cache.Header {
		h := http.Header{"Content-Type": {"application/" + "json"}, "Date": {"Tue, 01 Dec 2026 22:14:46 " + "GMT"}, "Twilio-Request-Id": {id}}
		e := &cache.Entry{Key: "k" + id}
		e.Compact(storedHeader(h, 232))
		return e.Header()
	}
	_, a, b := mk("RQ0"), mk("RQ1"), mk("RQ2")
	for _, k := range []string{"Content-Type", "Date", "Content-Length"} {
		if unsafe.SliceData(a.Get(k)) != unsafe.SliceData(b.Get(k)) || a.Get(k)[0] != b.Get(k)[0] {
			t.Errorf("%s: %q and %q are two copies, want one shared", k, a.Get(k), b.Get(k))
		}
	}
	if a.Get("Twilio-Request-Id")[0] != "RQ1" || b.Get("Twilio-Request-Id")[0] != "RQ2" || a.Get("Content-Length")[0] != "232" {
		t.Fatalf("values changed: %v %v", a, b)
	}
}

// An entry's tags other than its own path are shared with the entries
// that hold them too, in an array of their number; its body keeps only
// its bytes.
func TestEntriesShareTagsAndKeepOnlyTheirBody(t *testing.T) {
	conv := func() string { return "conversations|conv:" + "CH00000000000000000000000000000002" }
	body, _ := io.ReadAll(io.LimitReader(bytes.NewReader(bytes.Repeat([]byte("x"), 600)), 1<<20))
	mk := func(tags ...string) *cache.Entry {
		e := &cache.Entry{Key: tags[0] + "?", Body: body, Tags: append(make([]string, 0, 16), tags...)}
		e.Compact(nil)
		return e
	}
	mk("conversations|path:/z", conv())
	a := mk("conversations|path:/a", conv(), "conversations|conv:*")
	b := mk("conversations|path:/b", conv(), "conversations|conv:*")
	if unsafe.StringData(a.Tags[1]) != unsafe.StringData(b.Tags[1]) || a.Tags[1] != conv() || cap(a.Tags) != len(a.Tags) {
		t.Fatalf("the conversation's tag: two copies (or the slice not clipped): %q %q", a.Tags, b.Tags)
	}
	if cap(a.Body) != len(a.Body) || !bytes.Equal(a.Body, body) {
		t.Fatalf("kept body: len %d cap %d (io.ReadAll's: cap %d)", len(a.Body), cap(a.Body), cap(body))
	}
}

// The cache key begins with the path's scope tag, so an entry's own tag
// can be a view of its key (cache.Entry.Compact) instead of a copy.
func TestTheKeyBeginsWithThePathsTag(t *testing.T) {
	h := newHarness(t)
	m, rerr := h.p.router.Resolve(http.MethodGet, "", "", pathConv)
	if rerr != nil {
		t.Fatal(rerr)
	}
	key := string(appendKey(nil, &m, "PageSize=5", &credential{}))
	if tag := m.ReadTags()[0]; !strings.HasPrefix(key, tag+"?PageSize=5 ") {
		t.Fatalf("key %q does not begin with the path's tag %q and the query", key, tag)
	}
}

// Bodies are read into a reused buffer: each entry keeps its own copy,
// whatever the fetches after it read.
func TestFetchedBodiesDoNotShareTheReadBuffer(t *testing.T) {
	h := newHarness(t)
	first := map[string]string{}
	for _, p := range []string{pathConv, pathSvc, pathProxy, pathV2} {
		_, _, body := h.get(p)
		first[p] = body
	}
	h.settle()
	for _, p := range []string{pathConv, pathSvc, pathProxy, pathV2} {
		if _, cs, body := h.get(p); !strings.HasPrefix(cs, "cacheproxy; hit;") || body != first[p] {
			t.Fatalf("%s: %q, body %s\nwant the first answer's %s", p, cs, body, first[p])
		}
	}
}
