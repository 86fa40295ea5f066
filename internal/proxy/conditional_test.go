package proxy

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestConditionalRequestsOnCachedEntries: If-None-Match and
// If-Modified-Since are answered 304 from the entry (Cache-Status still
// set, no body); If-Match and If-Unmodified-Since that fail give 412.
func TestConditionalRequestsOnCachedEntries(t *testing.T) {
	h := newHarness(t)
	lastMod := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("ETag", `"v1"`)
		w.Header().Set("Last-Modified", lastMod.Format(http.TimeFormat))
		return false
	}
	// On the miss itself.
	resp := h.do("GET", pathConv, basic(acctA, tokenA), "If-None-Match", `"v1"`)
	status, cs, body := readResp(t, resp)
	if status != 304 || body != "" || cs != "cacheproxy; fwd=uri-miss; stored" || resp.Header.Get("ETag") != `"v1"` {
		t.Fatalf("miss with a matching If-None-Match: %d %q %q", status, cs, body)
	}
	h.settle()
	before := lastMod.Add(-time.Hour).Format(http.TimeFormat)
	after := lastMod.Add(time.Hour).Format(http.TimeFormat)
	for _, tc := range []struct {
		name   string
		hdr    []string
		status int
	}{
		{"if-none-match matches", []string{"If-None-Match", `"v0", W/"v1"`}, 304},
		{"if-none-match star", []string{"If-None-Match", `*`}, 304},
		{"if-none-match differs", []string{"If-None-Match", `"v0"`}, 200},
		{"if-modified-since not modified", []string{"If-Modified-Since", after}, 304},
		{"if-modified-since modified", []string{"If-Modified-Since", before}, 200},
		{"if-none-match wins over if-modified-since", []string{"If-None-Match", `"v0"`, "If-Modified-Since", after}, 200},
		{"if-match fails", []string{"If-Match", `"v0"`}, 412},
		{"if-match weak never matches", []string{"If-Match", `W/"v1"`}, 412},
		{"if-match matches", []string{"If-Match", `"v1"`}, 200},
		{"if-unmodified-since fails", []string{"If-Unmodified-Since", before}, 412},
		{"if-unmodified-since holds", []string{"If-Unmodified-Since", after}, 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, cs, body := readResp(t, h.do("GET", pathConv, basic(acctA, tokenA), tc.hdr...))
			if status != tc.status {
				t.Fatalf("status %d, want %d (%s)", status, tc.status, body)
			}
			switch status {
			case 304:
				if body != "" || !strings.HasPrefix(cs, "cacheproxy; hit") {
					t.Fatalf("304: %q %q", cs, body)
				}
			case 412:
				checkTwilioError(t, status, body, 412)
			case 200:
				if !strings.Contains(body, member1) || !strings.HasPrefix(cs, "cacheproxy; hit") {
					t.Fatalf("200: %q %q", cs, body)
				}
			}
		})
	}
	if n := h.conv.Calls("GET", pathConv); n != 1 {
		t.Fatalf("conditional reads reached the upstream: %d calls", n)
	}
}

// TestVaryAndContentCoding: a response that varies on a header the shared
// fetch cannot honour for everyone is not stored, and reads with another
// Accept-Language never share its fetch; an unsolicited content-coding is
// not stored, and not replayed to a client that did not accept it.
func TestVaryAndContentCoding(t *testing.T) {
	h := newHarness(t)
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Vary", "Accept-Encoding, Accept-Language")
		w.Header().Set("Content-Language", r.Header.Get("Accept-Language"))
		return false
	}
	for i, lang := range []string{"en", "fr", "en"} {
		resp := h.do("GET", pathConv, basic(acctA, tokenA), "Accept-Language", lang)
		status, cs, _ := readResp(t, resp)
		h.settle()
		if status != 200 || cs != "cacheproxy; fwd=uri-miss" || resp.Header.Get("Content-Language") != lang {
			t.Fatalf("read %d (%s): %d %q %q", i, lang, status, cs, resp.Header.Get("Content-Language"))
		}
	}
	// Reads with different Accept-Language do not share a fetch:
	// internal/load's TestVariantsShareNoFlight.

	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Content-Encoding", "br")
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte{0x0b, 0x02, 0x80}) // not JSON: compressed
		return true
	}
	status, _, body := readResp(t, h.do("GET", pathV2, basic(acctA, tokenA))) // Go's client asks for gzip only
	checkTwilioError(t, status, body, http.StatusBadGateway)
	resp := h.do("GET", pathV2, basic(acctA, tokenA), "Accept-Encoding", "br")
	status, cs, _ := readResp(t, resp)
	if status != 200 || cs != "cacheproxy; fwd=uri-miss" || resp.Header.Get("Content-Encoding") != "br" {
		t.Fatalf("a client that accepts br: %d %q %q", status, cs, resp.Header.Get("Content-Encoding"))
	}
}
