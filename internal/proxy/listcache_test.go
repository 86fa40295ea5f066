package proxy

import (
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cacheproxy/internal/config"
	"cacheproxy/internal/redistest"
	"cacheproxy/internal/twiliofake"
)

// The participant lists and ParticipantConversations of issue 36.
var (
	listConv    = "/v1/Conversations/" + conv1 + "/Participants"
	listSvc     = "/v1/Services/" + isvc + "/Conversations/" + conv2 + "/Participants"
	listV2      = "/v2/Conversations/" + v2conv + "/Participants"
	listProxy   = "/v1/Services/" + ksvc + "/Sessions/" + sess1 + "/Participants"
	pcByID      = "/v1/ParticipantConversations?Identity=alice%40example.com"
	pcSvcByID   = "/v1/Services/" + isvc + "/ParticipantConversations?Identity=bob"
	pcByAddress = "/v1/ParticipantConversations?Address=%2B15005550009"
)

// pagePath is the path (no query) a list read reaches the upstream with.
func pagePath(read string) string { p, _, _ := strings.Cut(read, "?"); return p }

// Issue 36, point 1: each of the six list routes is cached per
// credential, a page per normalised query: the parameters' order does not
// matter, an unknown parameter is part of the key; HEAD is answered from
// the GET's entry.
func TestParticipantListsAreCached(t *testing.T) {
	for _, read := range []string{listConv + "?PageSize=1", listSvc, listV2, listProxy, pcByID, pcSvcByID} {
		t.Run(read, func(t *testing.T) {
			h := newHarness(t)
			fake := h.conv
			if read == listProxy {
				fake = h.prox
			}
			s, cs, body := h.get(read)
			if s != 200 || cs != "cacheproxy; fwd=uri-miss; stored" {
				t.Fatalf("first read: %d %q %s", s, cs, body)
			}
			h.settle()
			s, cs, body2 := h.get(read)
			if s != 200 || !strings.HasPrefix(cs, "cacheproxy; hit; ttl=") || body2 != body {
				t.Fatalf("second read: %d %q", s, cs)
			}
			if _, cs, _ := readResp(t, h.do(http.MethodHead, read, basic(acctA, tokenA))); !strings.HasPrefix(cs, "cacheproxy; hit") {
				t.Fatalf("HEAD: %q", cs)
			}
			if n := fake.Calls("GET", pagePath(read)); n != 1 {
				t.Fatalf("upstream calls %d, want 1", n)
			}
			// Another credential has its own entry.
			if _, cs, _ := readResp(t, h.do(http.MethodGet, read, basic(acctB, tokenB))); strings.Contains(cs, "hit") {
				t.Fatalf("another credential: %q", cs)
			}
		})
	}
	h := newHarness(t)
	for i, read := range []string{
		listConv + "?PageSize=1&Page=0",
		listConv + "?Page=0&PageSize=1",             // the same page: one entry
		listConv + "?Page=0&PageSize=1&Extra=x",     // an unknown parameter: another
		listConv + "?PageSize=1&Page=0&Extra=x",     // which is one entry too
		listConv + "?PageSize=1&Page=0&PageSize=1",  // a repeated one: another again
		listConv + "?PageSize=1&Page=0&Extra=%zz",   // one that does not parse: kept as it came
		listConv + "?Page=0&PageSize=1&Extra=%zz&A", // and so another
	} {
		h.get(read)
		h.settle()
		if want := []int{1, 1, 2, 2, 3, 4, 5}[i]; h.conv.Calls("GET", listConv) != want {
			t.Fatalf("%s: %d upstream calls, want %d", read, h.conv.Calls("GET", listConv), want)
		}
	}
}

// pageMeta reads a list answer's meta, checking Content-Length.
func pageMeta(t *testing.T, resp *http.Response) (string, map[string]any) {
	t.Helper()
	s, cs, body := readResp(t, resp)
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
	return cs, page.Meta
}

// Issue 36, point 2: a cached page's URLs point at the base URL of the
// client reading it, whatever base the read that filled it used; with
// Twilio's Host kept they stay Twilio's.
func TestCachedPagesPointAtTheReadersBase(t *testing.T) {
	h := newHarness(t)
	for i := range 3 {
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 600+i)})
	}
	read := listConv + "?PageSize=2&Page=1"
	listen := h.srv.Listener.Addr().String()
	h.p.AnswerOn(listen, []string{"sidecar.internal:8080"})
	if cs, _ := pageMeta(t, h.do("GET", "/conversations"+read, basic(acctA, tokenA), "Host", "sidecar.internal:8080")); !strings.Contains(cs, "stored") {
		t.Fatalf("the fill: %q", cs)
	}
	h.settle()
	for _, tc := range []struct{ prefix, host, base string }{
		{"", "", "http://" + listen},
		{"/conversations", "", "http://" + listen + "/conversations"},
		{"", "sidecar.internal:8080", "http://sidecar.internal:8080"},
		{"", "evil.example.com", "http://" + listen},
		{"", "conversations.twilio.com", "https://conversations.twilio.com"},
	} {
		var hdr []string
		if tc.host != "" {
			hdr = []string{"Host", tc.host}
		}
		cs, meta := pageMeta(t, h.do("GET", tc.prefix+read, basic(acctA, tokenA), hdr...))
		if !strings.Contains(cs, "hit") {
			t.Fatalf("%s %s: %q, want a hit", tc.prefix, tc.host, cs)
		}
		want := tc.base + listConv + "?PageSize=2&Page="
		if meta["url"] != want+"1" || meta["previous_page_url"] != want+"0" || meta["first_page_url"] != want+"0" {
			t.Errorf("prefix %q, Host %q: meta %v, want page URLs under %s", tc.prefix, tc.host, meta, tc.base)
		}
		// HEAD says the length of the rewritten body.
		resp := h.do("HEAD", tc.prefix+read, basic(acctA, tokenA), hdr...)
		resp.Body.Close()
		get := h.do("GET", tc.prefix+read, basic(acctA, tokenA), hdr...)
		_, _, body := readResp(t, get)
		if resp.Header.Get("Content-Length") != strconv.Itoa(len(body)) {
			t.Errorf("HEAD Content-Length %q, GET body %d bytes", resp.Header.Get("Content-Length"), len(body))
		}
	}
	if n := h.conv.Calls("GET", listConv); n != 1 {
		t.Fatalf("%d upstream calls, want 1", n)
	}
}

// cachedHit reads path twice and reports whether the second was a hit.
func (h *harness) hitAfter(path string) bool {
	h.t.Helper()
	h.get(path)
	h.settle()
	_, cs, _ := h.get(path)
	return strings.Contains(cs, "hit")
}

// Issue 36, point 3: a write that can change a list invalidates every
// cached page of it before its answer, and the next read sees the write.
func TestWritesInvalidateTheListsTheyChange(t *testing.T) {
	form := func(kv ...string) (string, []string) {
		v := url.Values{}
		for i := 0; i < len(kv); i += 2 {
			v.Set(kv[i], kv[i+1])
		}
		return v.Encode(), []string{"Content-Type", "application/x-www-form-urlencoded"}
	}
	write := func(h *harness, method, path string, kv ...string) {
		t.Helper()
		body, hdr := form(kv...)
		if s, _, b := readResp(t, h.doBody(method, path, basic(acctA, tokenA), strings.NewReader(body), hdr...)); s >= 300 {
			t.Fatalf("%s %s: %d %s", method, path, s, b)
		}
	}
	lists := func(h *harness, reads ...string) {
		t.Helper()
		for _, r := range reads {
			if !h.hitAfter(r) {
				t.Fatalf("%s is not cached", r)
			}
		}
	}
	fresh := func(h *harness, reads ...string) {
		t.Helper()
		for _, r := range reads {
			if _, cs, _ := h.get(r); strings.Contains(cs, "hit") {
				t.Errorf("%s after the write: %q, want it fetched again", r, cs)
			}
		}
	}
	conv3 := twiliofake.SID("CH", 3)

	t.Run("a participant added", func(t *testing.T) {
		h := newHarness(t)
		h.conv.AddConversation(conv3, "", "")
		carol := "/v1/ParticipantConversations?Identity=carol"
		lists(h, listConv, listConv+"?PageSize=1&Page=1", carol, pcByAddress)
		write(h, "POST", "/v1/Conversations/"+conv1+"/Participants", "Identity", "carol", "MessagingBinding.Address", "+15005550009")
		fresh(h, listConv, listConv+"?PageSize=1&Page=1", carol, pcByAddress)
		if _, _, body := h.get(carol); !strings.Contains(body, conv1) {
			t.Fatalf("carol's conversations after she joined %s: %s", conv1, body)
		}
	})
	t.Run("a participant removed by SID", func(t *testing.T) {
		h := newHarness(t)
		lists(h, listConv, pcByID)
		write(h, "DELETE", "/v1/Conversations/"+conv1+"/Participants/"+member1)
		fresh(h, listConv, pcByID)
		if _, _, body := h.get(pcByID); strings.Contains(body, conv1) {
			t.Fatalf("alice's conversations after she left: %s", body)
		}
	})
	t.Run("a participant's identity changed by SID", func(t *testing.T) {
		h := newHarness(t)
		dave := "/v1/ParticipantConversations?Identity=dave"
		lists(h, pcByID, dave)
		write(h, "POST", "/v1/Conversations/"+conv1+"/Participants/"+member1, "Identity", "dave")
		fresh(h, pcByID, dave)
	})
	t.Run("a conversation updated", func(t *testing.T) {
		h := newHarness(t)
		lists(h, listConv, pcByID)
		write(h, "POST", "/v1/Conversations/"+conv1, "FriendlyName", "renamed")
		fresh(h, listConv, pcByID)
	})
	t.Run("a service removed", func(t *testing.T) {
		h := newHarness(t)
		lists(h, listSvc, pcSvcByID, listConv)
		write(h, "DELETE", "/v1/Services/"+isvc)
		fresh(h, listSvc, pcSvcByID)
		if !strings.Contains(func() string { _, cs, _ := h.get(listConv); return cs }(), "hit") {
			t.Fatal("a list outside the service was invalidated")
		}
	})
	t.Run("a session removed", func(t *testing.T) {
		h := newHarness(t)
		lists(h, listProxy)
		write(h, "DELETE", "/v1/Services/"+ksvc+"/Sessions/"+sess1)
		fresh(h, listProxy)
	})
	t.Run("a conversation created with participants", func(t *testing.T) {
		h := newHarness(t)
		carol := "/v1/ParticipantConversations?Identity=carol"
		lists(h, carol, pcByID, listConv)
		write(h, "POST", "/v1/ConversationWithParticipants", "Participant", `{"identity":"carol"}`)
		fresh(h, carol)
		if !h.hitAfter(pcByID) || !strings.Contains(func() string { _, cs, _ := h.get(listConv); return cs }(), "hit") {
			t.Fatal("pages of other identities, or lists of other conversations, were invalidated")
		}
	})
	t.Run("a form that cannot be read", func(t *testing.T) {
		h := newHarness(t)
		lists(h, pcByID, pcByAddress)
		resp := h.doBody("POST", "/v1/Conversations/"+conv1+"/Participants", basic(acctA, tokenA),
			strings.NewReader(`{"identity":"carol"}`), "Content-Type", "application/json")
		resp.Body.Close()
		fresh(h, pcByID, pcByAddress) // every identity's and address's pages
		// A form of unknown length (chunked), and one over 64 KiB: not read
		// here, every identity's and address's pages go, and the upstream
		// gets the whole form.
		for _, body := range []io.Reader{io.MultiReader(strings.NewReader("Identity=erin")),
			strings.NewReader("Identity=frank&Attributes=" + strings.Repeat("x", 70<<10))} {
			lists(h, pcByID, pcByAddress)
			s, _, b := readResp(t, h.doBody("POST", "/v1/Conversations/"+conv1+"/Participants", basic(acctA, tokenA), body,
				"Content-Type", "application/x-www-form-urlencoded"))
			if s != 201 || !strings.Contains(b, `"identity":"`) {
				t.Fatalf("the write: %d %s", s, b)
			}
			fresh(h, pcByID, pcByAddress)
		}
	})
}

// Issue 36, point 1: a stampede on a list's first page is one upstream
// call.
func TestAStampedeOnAListIsOneCall(t *testing.T) {
	h := newHarness(t)
	release := make(chan struct{})
	h.conv.Before = func(http.ResponseWriter, *http.Request) bool { <-release; return false }
	var wg sync.WaitGroup
	statuses := make(chan int, 50)
	for range 50 {
		wg.Go(func() { s, _, _ := h.get(listConv); statuses <- s })
	}
	waitUntil(t, "the first read's fetch is upstream", func() bool { return h.conv.Total() == 1 })
	close(release)
	wg.Wait()
	close(statuses)
	for s := range statuses {
		if s != 200 {
			t.Fatalf("status %d", s)
		}
	}
	if n := h.conv.Calls("GET", listConv); n != 1 {
		t.Fatalf("%d upstream calls for 50 reads, want 1", n)
	}
}

// Issue 36, point 5: right after a write through this replica, a 404 to a
// read of its scopes is answered but not kept (Twilio's read-after-create
// lag); later, and for scopes nobody wrote, a 404 is kept as before.
func TestA404RightAfterAWriteIsNotKept(t *testing.T) {
	h := newHarness(t)
	lagging := true
	var mu sync.Mutex
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		mu.Lock()
		defer mu.Unlock()
		if r.Method == "GET" && strings.HasSuffix(r.URL.Path, "/carol") && lagging {
			lagging = false // Twilio has caught up after this answer
			twiliofake.Error(w, 404, 20404, "not found")
			return true
		}
		return false
	}
	resp := h.doBody("POST", listConv, basic(acctA, tokenA), strings.NewReader("Identity=carol"), "Content-Type", "application/x-www-form-urlencoded")
	resp.Body.Close()
	byIdentity := listConv + "/carol"
	if s, cs, _ := h.get(byIdentity); s != 404 || strings.Contains(cs, "stored") {
		t.Fatalf("read right after the create: %d %q, want a 404 not stored", s, cs)
	}
	h.settle()
	if s, cs, _ := h.get(byIdentity); s != 200 || strings.Contains(cs, "hit") {
		t.Fatalf("read again: %d %q, want Twilio's 200", s, cs)
	}
	// Past write_lag a 404 is kept.
	h.clk.Advance(6 * 1e9)
	gone := "/v1/Conversations/" + conv1 + "/Participants/nobody"
	if s, cs, _ := h.get(gone); s != 404 || !strings.Contains(cs, "stored") {
		t.Fatalf("a 404 long after any write: %d %q, want it stored", s, cs)
	}
}

// Issue 36, points 1 and 3, on a real redis-server: a list page read
// through one replica is the others' (one upstream call, L2 then L1; a
// stampede across the fleet is one call too); a participant added through
// another replica invalidates every replica's pages of its
// conversation's list and of its identity's conversations before the
// write is answered.
func TestFleetSharesAndInvalidatesLists(t *testing.T) {
	r := replicas(t, 3, redistest.Start(t))
	a, b, c := r[0], r[1], r[2]
	release := make(chan struct{})
	var held atomic.Bool
	a.conv.Before = func(http.ResponseWriter, *http.Request) bool {
		if !held.Swap(true) {
			<-release
		}
		return false
	}
	var wg sync.WaitGroup
	for _, h := range r {
		for range 20 {
			wg.Go(func() {
				if s, cs, _ := h.get(listConv); s != 200 {
					t.Errorf("stampede: %d %q", s, cs)
				}
			})
		}
	}
	waitUntil(t, "the other replicas wait on the first page's claim", func() bool {
		return b.p.Summary().ClaimsWaited+c.p.Summary().ClaimsWaited+a.p.Summary().ClaimsWaited >= 2
	})
	close(release)
	wg.Wait()
	if n := a.conv.Calls("GET", listConv); n != 1 {
		t.Fatalf("%d upstream calls for 60 reads through 3 replicas, want 1", n)
	}
	carol := "/v1/ParticipantConversations?Identity=carol"
	for _, h := range r {
		h.get(carol)
		h.settle()
		if !h.hitAfter(listConv) || !h.hitAfter(carol) {
			t.Fatal("the lists are not cached")
		}
	}
	resp := b.doBody("POST", listConv, basic(acctA, tokenA), strings.NewReader("Identity=carol"), "Content-Type", "application/x-www-form-urlencoded")
	resp.Body.Close()
	for name, h := range map[string]*harness{"A": a, "B": b, "C": c} {
		if _, cs, body := h.get(listConv); strings.Contains(cs, "hit; ttl") && !strings.Contains(cs, "l2") || !strings.Contains(body, `"carol"`) {
			t.Fatalf("%s: the list after carol joined through B: %q %s", name, cs, body)
		}
		if _, cs, body := h.get(carol); !strings.Contains(body, conv1) {
			t.Fatalf("%s: carol's conversations after she joined through B: %q %s", name, cs, body)
		}
	}
}

// Issue 36, point 4: [cache.routes."<name>"] turns caching on for any GET
// of the three APIs, with its own ttl; "0s" turns a default route off.
// Its invalidation follows the path: a write to a resource invalidates
// every cached read under it and the list it is in; a create, the list.
func TestAnyReadOnRequest(t *testing.T) {
	msgs := "/v1/Conversations/" + conv1 + "/Messages"
	im1, im2 := msgs+"/"+twiliofake.SID("IM", 1), msgs+"/"+twiliofake.SID("IM", 2)
	convPath := "/v1/Conversations/" + conv1
	h := newHarness(t, func(s *setup) {
		s.cfg.Cache.Routes = config.Routes{"conversations.v1.conversation": {TTL: config.Duration(10 * time.Second)},
			"conversations.v1.messages": {TTL: config.Duration(10 * time.Second)}, "conversations.v1.message": {TTL: config.Duration(10 * time.Second)},
			"conversations.v1.participant": {TTL: config.Duration(5 * time.Second)}, "conversations.v1.participants": {TTL: 0}}
	})
	cached := func(reads ...string) {
		t.Helper()
		for _, r := range reads {
			if !h.hitAfter(r) {
				t.Fatalf("%s is not cached", r)
			}
		}
	}
	fresh := func(reads ...string) {
		t.Helper()
		for _, r := range reads {
			if _, cs, _ := h.get(r); strings.Contains(cs, "hit") {
				t.Fatalf("%s: %q, want it fetched again", r, cs)
			}
		}
	}
	cached(convPath, msgs, im1, im2)
	if _, cs, _ := h.get(convPath); cs != "cacheproxy; hit; ttl=10" {
		t.Fatalf("a route's own ttl: %q", cs)
	}
	h.get(pathConv)
	h.settle()
	if _, cs, _ := h.get(pathConv); cs != "cacheproxy; hit; ttl=5" {
		t.Fatalf("a default route's ttl set: %q", cs)
	}
	h.get(listConv)
	h.settle()
	if _, cs, _ := h.get(listConv); cs != "" {
		t.Fatalf("a default route turned off: %q, want a pass-through", cs)
	}
	if _, cs, _ := h.get("/v1/Roles"); cs != "" {
		t.Fatalf("a route not turned on: %q, want a pass-through", cs)
	}
	post := func(path string) {
		t.Helper()
		resp := h.doBody("POST", path, basic(acctA, tokenA), strings.NewReader("Body=hi"), "Content-Type", "application/x-www-form-urlencoded")
		resp.Body.Close()
	}
	post(msgs) // a create: the list, nothing else
	fresh(msgs)
	cached(im1, convPath)
	resp := h.do("DELETE", im1, basic(acctA, tokenA)) // a resource: it and its list
	resp.Body.Close()
	fresh(im1, msgs)
	cached(im2, convPath)
	post(convPath) // the conversation: everything under it
	fresh(convPath, msgs, im2)
	cached(convPath, msgs, im2)
	post("/v1/Conversations/support-room") // by unique name: every conversation's
	fresh(convPath, msgs, im2)
}

// Issue 36, point 1: a list page over max_entry_bytes is served, not
// stored; an expired page is served stale when the upstream fails
// (stale-if-error), with its page URLs still pointing at its reader's
// base.
func TestListPagesKeepTheByteBudgetAndServeStale(t *testing.T) {
	h := newHarness(t, func(s *setup) { s.cfg.Cache.MaxEntryBytes = 200 })
	for i := range 2 {
		if s, cs, _ := h.get(listConv); s != 200 || cs != "cacheproxy; fwd=uri-miss" {
			t.Fatalf("read %d of a page over max_entry_bytes: %d %q", i, s, cs)
		}
		h.settle()
	}
	h = newHarness(t, func(s *setup) { s.cfg.Cache.StaleIfError = config.Duration(time.Minute) })
	_, _, fresh := h.get(listConv)
	h.settle()
	h.conv.Before = func(w http.ResponseWriter, r *http.Request) bool {
		twiliofake.Error(w, 500, 20500, "Internal Server Error")
		return true
	}
	h.clk.Advance(45 * time.Second)
	s, cs, body := h.get(listConv)
	if s != 200 || cs != "cacheproxy; fwd=stale; fwd-status=500" || body != fresh || !strings.Contains(body, h.srv.URL+listConv) {
		t.Fatalf("an expired page while the upstream fails: %d %q %s", s, cs, body)
	}
}
