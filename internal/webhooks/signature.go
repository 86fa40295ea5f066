package webhooks

import (
	"crypto/hmac"
	"crypto/sha1"
	"crypto/subtle"
	"encoding/base64"
	"net"
	"net/url"
	"slices"
	"strings"
)

// A form delivery's signature covers the URL Twilio called followed by
// each parameter's name and value, names sorted, and a name that comes
// more than once followed by each of its values, sorted (twilio-node drops
// repeated values first; twilio-python keeps them: both are accepted).
// Every value the body carries is covered: a value appended to a signed
// body, prepended, or under a new name makes the signature wrong.
// twilio-go's RequestValidator checks only the first value of each name,
// so forms are checked here.

// formSigned is what a form delivery's signature covers after its URL,
// with repeated values dropped (dedup) or kept.
func formSigned(form url.Values, dedup bool) string {
	var b strings.Builder
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range form {
			if !yield(k) {
				return
			}
		}
	}) {
		vs := slices.Clone(form[k])
		slices.Sort(vs)
		if dedup {
			vs = slices.Compact(vs)
		}
		for _, v := range vs {
			b.WriteString(k)
			b.WriteString(v)
		}
	}
	return b.String()
}

// signature is Twilio's signature of data with token: HMAC-SHA1, base64.
func signature(token, data string) string {
	m := hmac.New(sha1.New, []byte(token))
	m.Write([]byte(data))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// urlForms are the forms of signed Twilio may have signed: as it is, and
// with its port made explicit or left out (Twilio's signing is not
// consistent about a default port, nor are its helpers).
func urlForms(signed string) []string {
	u, err := url.Parse(signed)
	if err != nil {
		return []string{signed}
	}
	other := *u
	switch port := u.Port(); {
	case port != "":
		other.Host = u.Hostname()
		if strings.Contains(other.Host, ":") {
			other.Host = "[" + other.Host + "]"
		}
	case u.Scheme == "https":
		other.Host = net.JoinHostPort(u.Hostname(), "443")
	default:
		other.Host = net.JoinHostPort(u.Hostname(), "80")
	}
	return []string{signed, other.String()}
}

// validForm reports whether sig is one of tokens' signatures of a form
// delivery to signed with form's parameters, every value of each.
func validForm(tokens []string, signed string, form url.Values, sig string) bool {
	if sig == "" {
		return false
	}
	params := []string{formSigned(form, true)}
	if kept := formSigned(form, false); kept != params[0] {
		params = append(params, kept)
	}
	for _, t := range tokens {
		for _, u := range urlForms(signed) {
			for _, p := range params {
				if subtle.ConstantTimeCompare([]byte(signature(t, u+p)), []byte(sig)) == 1 {
					return true
				}
			}
		}
	}
	return false
}
