package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"cacheproxy/internal/cache"
	"cacheproxy/internal/redistest"
)

// participantEntry is an entry shaped as the proxy shares a participant:
// a 750-byte JSON body, four headers, five tags.
func participantEntry(now time.Time) *cache.Entry {
	body := `{"account_sid":"AC00000000000000000000000000000001","attributes":"{}","identity":"alice",` + strings.Repeat(`"x":"y",`, 80) + `"sid":"MB00000000000000000000000000000001"}`
	e := &cache.Entry{Key: "c|conversations|/v1/Conversations/CH1/Participants/MB1", Status: 200, Body: []byte(body[:750]),
		Stored: cache.At(now), Expires: cache.At(now.Add(time.Minute)), Keep: cache.At(now.Add(time.Minute)),
		Tags: []string{"conversations|path:/v1/Conversations/CH1/Participants/MB1", "conversations|conv:CH1", "conversations|conv:*",
			"conversations|part:MB1", "conversations|part:*"}}
	e.Compact(cache.HeaderOf(map[string][]string{"Content-Type": {"application/json"}, "Date": {now.UTC().Format(time.RFC1123)},
		"Content-Length": {"750"}, "Twilio-Request-Id": {"RQ00000000000000000000000000000001"}}))
	return e
}

// A shared entry's value in Redis is its data (body, header fields, tags)
// plus the AEAD's nonce and tag and a small fixed part: the body is not
// base64 inside JSON (a third more). MEMORY USAGE of the key is logged for
// the README.
func TestL2EntryValueIsItsDataAndLittleMore(t *testing.T) {
	srv := redistest.Start(t)
	f := open(t, srv.URL())
	ctx := context.Background()
	now := time.Now()
	e := participantEntry(now)
	epoch, _ := f.Epoch(ctx)
	if err := f.Set(ctx, e, "Basic x", epoch, now); err != nil {
		t.Fatal(err)
	}
	name, _ := f.keys[0].entryNames(f.cfg.Prefix, entryID(e.Key, "Basic x"))
	n, _ := strconv.Atoi(strings.TrimSpace(srv.CLI(t, "STRLEN", name)))
	data := len(e.Body)
	for name, values := range e.Fields() {
		data += len(name)
		for _, v := range values {
			data += len(v)
		}
	}
	for _, tag := range e.Tags {
		data += len(tag)
	}
	usage := strings.TrimSpace(srv.CLI(t, "MEMORY", "USAGE", name))
	t.Logf("value %d bytes for %d bytes of data (body %d); MEMORY USAGE %s", n, data, len(e.Body), usage)
	if n > data+28+160 {
		t.Fatalf("value %d bytes, want at most the data (%d) + the AEAD's 28 + 160", n, data)
	}
	got, err := get(f, ctx, e.Key, "Basic x")
	if err != nil || got == nil || !bytes.Equal(got.Body, e.Body) || got.Get("Twilio-Request-Id")[0] != "RQ00000000000000000000000000000001" {
		t.Fatalf("read back: %v %v", got, err)
	}
}

// An entry a replica of the previous format shared (the whole entry as
// JSON, the body base64 inside it) still opens.
func TestAnEntryOfThePreviousFormatOpens(t *testing.T) {
	srv := redistest.Start(t)
	f := open(t, srv.URL())
	now := time.Now()
	e := participantEntry(now)
	plain, err := json.Marshal(sealed{Status: 200, Header: e.Header().Map(), Body: e.Body, Fresh: 60000, Life: 60000, Tags: e.Tags})
	if err != nil {
		t.Fatal(err)
	}
	name, _ := f.keys[0].entryNames(f.cfg.Prefix, entryID(e.Key, "Basic x"))
	a, _ := f.keys[0].aead("Basic x")
	nonce := make([]byte, a.NonceSize())
	s := f.open(&f.keys[0], name, "Basic x", a.Seal(nonce, nonce, plain, []byte(name)), 60000)
	if s == nil || !bytes.Equal(s.Body, e.Body) || s.Header["Content-Type"][0] != "application/json" || len(s.Tags) != 5 {
		t.Fatalf("an entry of the previous format: %+v", s)
	}
}

// A damaged entry of the new format is a miss, never a panic.
func TestADamagedEntryIsAMiss(t *testing.T) {
	for _, plain := range [][]byte{{rawBody}, {rawBody, 0xff}, {rawBody, 0x7f, '{'}, {rawBody, 0x02, 'x', 'y'}, {}} {
		if s := unseal(plain); s != nil {
			t.Errorf("unseal(% x) = %+v, want nil", plain, s)
		}
	}
}
