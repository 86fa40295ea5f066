package fleet

import (
	"context"
	"crypto/rand"
	"strings"
	"time"
)

// KeyBook is where the fleet knows API keys' accounts
// (ratelimit.KeyBook): once any replica learned a key's account (from an
// answer, or ratelimit.key_accounts), every replica counts the key's
// calls against that account's budget. Each is stored under a keyed hash
// of the key SID, its value (the account SID) sealed, so Redis holds
// neither in clear.
type KeyBook struct{ f *Fleet }

// NewKeyBook returns the fleet's book of API keys.
func NewKeyBook(f *Fleet) *KeyBook { return &KeyBook{f: f} }

// keyLife is how long a stored key's account is kept (each store renews
// it).
const keyLife = 24 * time.Hour

// keyAuth derives the key that seals key accounts; the name a value is
// stored under is its additional data, so it cannot be moved to another.
const keyAuth = "cacheproxy key account"

// Lookup returns key's account, if a replica stored it (under any secret).
func (b *KeyBook) Lookup(ctx context.Context, key string) (string, bool) {
	c, ctx, cancel, err := b.f.conn(ctx)
	defer cancel()
	if err != nil {
		return "", false
	}
	for i := range b.f.keys {
		name := b.f.keys[i].name(b.f.cfg.Prefix, "k", key)
		trip(ctx)
		val, err := c.Do(ctx, c.B().Get().Key(name).Build()).AsBytes()
		if b.f.result(err) != nil || val == nil {
			continue
		}
		if acct, ok := b.open(i, name, val); ok {
			return acct, true
		}
	}
	return "", false
}

func (b *KeyBook) open(i int, name string, val []byte) (string, bool) {
	a, err := b.f.keys[i].aead(keyAuth)
	if err != nil || len(val) < a.NonceSize() {
		return "", false
	}
	plain, err := a.Open(nil, val[:a.NonceSize()], val[a.NonceSize():], []byte(name))
	if err != nil || !strings.HasPrefix(string(plain), "AC") {
		return "", false
	}
	return string(plain), true
}

// Store records key's account for the fleet, off the caller's path.
func (b *KeyBook) Store(key, acct string) {
	go func() {
		c, ctx, cancel, err := b.f.conn(context.Background())
		defer cancel()
		if err != nil {
			return
		}
		a, err := b.f.keys[0].aead(keyAuth)
		if err != nil {
			return
		}
		name := b.f.keys[0].name(b.f.cfg.Prefix, "k", key)
		nonce := make([]byte, a.NonceSize(), a.NonceSize()+len(acct)+a.Overhead())
		if _, err := rand.Read(nonce); err != nil {
			return
		}
		val := a.Seal(nonce, nonce, []byte(acct), []byte(name))
		trip(ctx)
		b.f.result(c.Do(ctx, c.B().Set().Key(name).Value(string(val)).Px(keyLife).Build()).Error())
	}()
}
