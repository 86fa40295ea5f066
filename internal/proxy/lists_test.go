package proxy

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"cacheproxy/internal/twiliofake"
)

// A list answer's page URLs point back at the base URL the client used
// when it replaced its base URL (scheme, Host and prefix), with
// Content-Length right; with Twilio's Host kept they stay Twilio's.
func TestListPagesStayBehindTheSidecar(t *testing.T) {
	h := newHarness(t)
	for i := range 3 {
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 600+i)})
	}
	list := "/v1/Conversations/" + conv1 + "/Participants?PageSize=2"
	meta := func(resp *http.Response) map[string]any {
		t.Helper()
		s, _, body := readResp(t, resp)
		if s != 200 {
			t.Fatalf("list: %d %s", s, body)
		}
		if n, _ := strconv.Atoi(resp.Header.Get("Content-Length")); n != len(body) {
			t.Fatalf("Content-Length %q for %d bytes", resp.Header.Get("Content-Length"), len(body))
		}
		var page struct {
			Meta map[string]any `json:"meta"`
		}
		if err := json.Unmarshal([]byte(body), &page); err != nil {
			t.Fatal(err)
		}
		return page.Meta
	}
	m := meta(h.do("GET", "/conversations"+list, basic(acctA, tokenA)))
	want := h.srv.URL + "/conversations/v1/Conversations/" + conv1 + "/Participants?PageSize=2&Page="
	if m["next_page_url"] != want+"1" || m["first_page_url"] != want+"0" || m["url"] != want+"0" {
		t.Fatalf("meta through the /conversations prefix: %v, want page URLs under %s", m, want)
	}
	m = meta(h.do("GET", list, basic(acctA, tokenA))) // routed by its path: no prefix
	if next, _ := m["next_page_url"].(string); next != h.srv.URL+"/v1/Conversations/"+conv1+"/Participants?PageSize=2&Page=1" {
		t.Fatalf("meta routed by path: %v", m)
	}
	m = meta(h.do("GET", list, basic(acctA, tokenA), "Host", "conversations.twilio.com"))
	if next, _ := m["next_page_url"].(string); !strings.HasPrefix(next, "https://conversations.twilio.com/v1/") {
		t.Fatalf("meta with Twilio's Host kept: %v, want Twilio's URLs", m)
	}
}

// A list answer too large to buffer (over 1 MiB) streams unchanged, and
// is counted.
func TestALargeListStreamsUnchangedAndIsCounted(t *testing.T) {
	h := newHarness(t)
	long := strings.Repeat("x", 1000)
	for i := range 1200 {
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 2000+i), Identity: long})
	}
	s, _, body := readResp(t, h.do("GET", "/conversations/v1/Conversations/"+conv1+"/Participants?PageSize=1000", basic(acctA, tokenA)))
	if s != 200 || len(body) <= bufferedResponseBytes {
		t.Fatalf("status %d, %d bytes: want a 200 over %d bytes", s, len(body), bufferedResponseBytes)
	}
	if !strings.Contains(body, `"next_page_url":"https://conversations.twilio.com/`) {
		t.Fatal("the large page's URLs were changed")
	}
	if n := h.p.c.pagesUnrewritten.Load(); n != 1 {
		t.Fatalf("unrewritten pages counted: %d, want 1", n)
	}
}
