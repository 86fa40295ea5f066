package proxy

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"hash"
	"hash/maphash"
	"strings"
	"sync"
	"sync/atomic"
)

// fingerprinter computes what a request's credentials contribute to its
// handling: the keyed hash that goes into cache keys (HMAC-SHA256 under a
// per-process or configured secret, so keys, logs and memory never hold a
// usable token) and the account SID for logs (see accountOf).
//
// HMAC and base64 cost a cache hit about 0.7 µs, so results are memoised in
// a fixed-size, lock-free, direct-mapped table indexed by two independently
// seeded maphash digests of the header (128 bits: a false match is as
// unlikely as a collision of the truncated HMAC itself). The table holds
// only those digests, the fingerprint and the account SID, never the header.
type fingerprinter struct {
	pool         sync.Pool
	seed1, seed2 maphash.Seed
	memo         [fpMemoSize]atomic.Pointer[credential]
}

const fpMemoSize = 1024

// credential is what one Authorization value yields; immutable once made.
type credential struct {
	h1, h2 uint64
	hex    [32]byte // first 16 bytes of the HMAC, hex-encoded
	// account is the account or API-key SID (see accountOf) as a JSON
	// string: `"AC…"`, or `""`.
	account    [36]byte
	accountLen int
}

var noAccountJSON = []byte(`""`)

// Account is the account or API-key SID, or empty.
func (c *credential) Account() []byte {
	j := c.accountJSON()
	return j[1 : len(j)-1]
}

// accountJSON is Account as a JSON string (SIDs need no escaping).
func (c *credential) accountJSON() []byte {
	if c == nil {
		return noAccountJSON
	}
	return c.account[:c.accountLen]
}

// hmacState is one pooled HMAC with its scratch space, so hashing a header
// allocates nothing.
type hmacState struct {
	h   hash.Hash
	in  []byte
	sum [sha256.Size]byte
}

func newFingerprinter(secret []byte) *fingerprinter {
	f := &fingerprinter{seed1: maphash.MakeSeed(), seed2: maphash.MakeSeed()}
	f.pool.New = func() any { return &hmacState{h: hmac.New(sha256.New, secret)} }
	return f
}

// lookup returns the credential of an Authorization value.
func (f *fingerprinter) lookup(auth string) *credential {
	h1, h2 := maphash.String(f.seed1, auth), maphash.String(f.seed2, auth)
	slot := &f.memo[h1%fpMemoSize]
	if c := slot.Load(); c != nil && c.h1 == h1 && c.h2 == h2 {
		return c
	}
	st := f.pool.Get().(*hmacState)
	st.h.Reset()
	st.in = append(st.in[:0], auth...)
	st.h.Write(st.in)
	c := &credential{h1: h1, h2: h2}
	hex.Encode(c.hex[:], st.h.Sum(st.sum[:0])[:16])
	clear(st.in) // the pooled scratch must not keep a credential
	f.pool.Put(st)
	var sid [34]byte
	n := accountOf(auth, &sid)
	c.account[0] = '"'
	copy(c.account[1:], sid[:n])
	c.account[n+1] = '"'
	c.accountLen = n + 2
	slot.Store(c)
	return c
}

// accountOf copies into dst the Basic-auth user when it is a Twilio account
// or API key SID (AC… or SK… and 32 hex digits) and returns its length, else
// 0. Only the first 48 base64 characters are decoded (the user, the colon and
// one password byte, discarded), so the password cannot reach a log line or
// a metric label.
func accountOf(auth string, dst *[34]byte) int {
	const prefix = "Basic "
	if len(auth) < len(prefix)+48 || !strings.EqualFold(auth[:len(prefix)], prefix) {
		return 0
	}
	var enc [48]byte
	var dec [36]byte
	copy(enc[:], auth[len(prefix):])
	if _, err := base64.StdEncoding.Decode(dec[:], enc[:]); err != nil {
		return 0
	}
	if dec[34] != ':' || (string(dec[:2]) != "AC" && string(dec[:2]) != "SK") || !sidOf(string(dec[:34]), dst) {
		return 0
	}
	return 34
}

// sidOf copies s into dst if it is two letters and 32 hex digits.
func sidOf(s string, dst *[34]byte) bool {
	if len(s) != 34 {
		return false
	}
	for _, c := range []byte(s[2:]) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	copy(dst[:], s)
	return true
}

// learnKey tells the budget which account an API key belongs to, from the
// first successful answer the key gets: Twilio's resources name their
// account (account_sid in v1, accountId in v2). Until then the key has a
// budget of its own.
func (p *Proxy) learnKey(c *credential, status int, body []byte) {
	if c == nil || status < 200 || status > 299 || len(body) == 0 {
		return
	}
	user := c.Account()
	if len(user) != 34 || string(user[:2]) != "SK" || p.budget.Knows(string(user)) {
		return
	}
	var owner struct {
		V1 string `json:"account_sid"`
		V2 string `json:"accountId"`
	}
	if json.Unmarshal(body, &owner) != nil {
		return
	}
	for _, acct := range []string{owner.V1, owner.V2} {
		var sid [34]byte
		if len(acct) == 34 && strings.HasPrefix(acct, "AC") && sidOf(acct, &sid) {
			p.budget.Learn(string(user), acct)
			return
		}
	}
}
