package fleet

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"strings"
)

// secret is one fleet secret (cache.key_secret, or one of
// cache.previous_key_secrets) and what is derived from it.
//
// A replica writes under its current secret only, and reads under every
// one it has: during a rolling change of the secret (docs/fleet.md,
// "Rotating the secret") replicas on the old secret and on the new one
// still read each other's entries, marks and invalidations.
type secret struct {
	raw   []byte
	names []byte      // keys key names
	inv   cipher.AEAD // seals invalidations and acknowledgements
	id    string      // names the secret in announcements (not the secret)
}

func newSecret(raw []byte) secret {
	block, err := aes.NewCipher(derive(raw, "cacheproxy invalidations v1", ""))
	if err != nil {
		panic(err) // a 32-byte key is always a valid AES key
	}
	inv, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return secret{raw: raw, names: derive(raw, "cacheproxy key names v1", ""), inv: inv,
		id: hex.EncodeToString(derive(raw, "cacheproxy key id v1", "")[:6])}
}

// secrets are the current secret first, then the previous ones (each
// once).
func secrets(cfg Config) []secret {
	out := []secret{newSecret(cfg.Secret)}
	for _, p := range cfg.Previous {
		if len(p) == 0 || string(p) == string(cfg.Secret) {
			continue
		}
		dup := false
		for _, s := range out {
			dup = dup || string(s.raw) == string(p)
		}
		if !dup {
			out = append(out, newSecret(p))
		}
	}
	return out
}

// derive is HKDF-SHA256 of secret for info and salt, 32 bytes.
func derive(secret []byte, info, salt string) []byte {
	k, err := hkdf.Key(sha256.New, secret, []byte(salt), info, 32)
	if err != nil {
		panic(err) // only for a length HKDF cannot give; 32 it always can
	}
	return k
}

// name is a key name under s: the prefix, a kind and a keyed hash of what
// it names.
func (s *secret) name(prefix, kind, what string) string {
	m := hmac.New(sha256.New, s.names)
	m.Write([]byte(kind))
	m.Write([]byte{0})
	m.Write([]byte(what))
	return prefix + kind + ":" + hex.EncodeToString(m.Sum(nil)[:20])
}

// entryNames are the names of an entry (by its entryID) and of its claim:
// one keyed hash in a hash tag, so that both are in one Cluster slot (a
// script reads the one and takes the other).
func (s *secret) entryNames(prefix, id string) (entry, claim string) {
	m := hmac.New(sha256.New, s.names)
	m.Write([]byte("e\x00"))
	m.Write([]byte(id))
	h := hex.EncodeToString(m.Sum(nil)[:20])
	return prefix + "e:{" + h + "}", prefix + "l:{" + h + "}"
}

// aead is AES-256-GCM under s's key for the credential auth.
func (s *secret) aead(auth string) (cipher.AEAD, error) {
	block, err := aes.NewCipher(derive(s.raw, "cacheproxy entries v1", auth))
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// entryID is what an entry's name hashes: the cache key without its last
// field (the credential's fingerprint, keyed by this replica's secret, so
// different on each side of a rotation) and the credential itself.
func entryID(key, auth string) string {
	if i := strings.LastIndexByte(key, ' '); i >= 0 {
		key = key[:i]
	}
	return key + "\x00" + auth
}

// accountName is the name of an account's budget keys. It is not keyed by
// a secret (replicas on either side of a rotation share one budget): a
// hash of the account SID, which is no credential, in a hash tag of its
// own (one Cluster slot).
func accountName(prefix, acct string) string {
	sum := sha256.Sum256([]byte("cacheproxy budget v1\x00" + acct))
	return prefix + "{a:" + hex.EncodeToString(sum[:20]) + "}"
}
