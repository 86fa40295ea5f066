package webhooks

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"sync"
	"time"
)

// Twilio's signatures carry no timestamp: a signed delivery can be sent
// again by whoever captured it. Invalidating twice is harmless, but each
// copy would reach the app behind forward_to again, so deliveries are
// deduplicated over a bounded window before they are forwarded: a
// duplicate is answered as the first was. A delivery is a duplicate when
// its I-Twilio-Idempotency-Token (the same on Twilio's retries of one
// delivery; it is not signed) or what its signature covers (the URL and
// the parameters in the one form Twilio signs them: reordered, re-encoded
// or with a trailing '&', a body is still the same delivery, and a value
// added makes the signature wrong) was seen within the window.
const (
	replayWindow  = 10 * time.Minute
	replayEntries = 10_000
	// answers up to this size are kept to answer duplicates with; larger
	// ones are answered by status alone.
	replayAnswerBytes = 64 << 10
)

// answer is the app's answer to a delivery, kept for its duplicates.
type answer struct {
	done   chan struct{} // closed once the first is answered
	status int
	header http.Header
	body   []byte
	keep   bool // false: not kept (the app failed), the next copy is forwarded
	at     time.Time
}

type replays struct {
	mu    sync.Mutex
	seen  map[string]*answer
	order []string // keys in arrival order, for the bound
}

// deliveryKeys are a delivery's keys: its idempotency token's, if any,
// and that of what its signature covers (covered).
func deliveryKeys(r *http.Request, signed string) []string {
	sum := sha256.Sum256([]byte(signed))
	keys := []string{"s:" + hex.EncodeToString(sum[:])}
	if t := r.Header.Get("I-Twilio-Idempotency-Token"); t != "" && len(t) <= 256 {
		keys = append(keys, "t:"+t)
	}
	return keys
}

// remember returns the answer of a delivery seen before under any of keys (to
// wait on), or registers a new one under all of them (first true).
func (rs *replays) remember(keys []string, now time.Time) (a *answer, first bool) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if rs.seen == nil {
		rs.seen = map[string]*answer{}
	}
	for _, k := range keys {
		if a, ok := rs.seen[k]; ok && now.Sub(a.at) < replayWindow {
			return a, false
		}
	}
	a = &answer{done: make(chan struct{}), at: now}
	for _, k := range keys {
		rs.seen[k] = a
		rs.order = append(rs.order, k)
	}
	for len(rs.order) > replayEntries {
		old := rs.order[0]
		rs.order = rs.order[1:]
		if b, ok := rs.seen[old]; ok && b.at.Before(now.Add(-time.Second)) {
			delete(rs.seen, old)
		}
	}
	return a, true
}

// forget drops an answer the app failed to give (5xx, no answer): Twilio's
// retry of it must reach the app.
func (rs *replays) forget(keys []string, a *answer) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for _, k := range keys {
		if rs.seen[k] == a {
			delete(rs.seen, k)
		}
	}
}
