package route

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"cacheproxy/internal/twilioerr"
	"cacheproxy/internal/twiliofake"
)

var (
	conv1   = twiliofake.SID("CH", 1)
	member1 = twiliofake.SID("MB", 1)
	isvc    = twiliofake.SID("IS", 1)
	conv2   = twiliofake.SID("CH", 2)
	member2 = twiliofake.SID("MB", 2)
	ksvc    = twiliofake.SID("KS", 1)
	sess1   = twiliofake.SID("KC", 1)
	kp1     = twiliofake.SID("KP", 1)
	v2conv  = "conv_conversation_00000000000000000000000001"
	v2part  = "conv_participant_00000000000000000000000001"

	pathConv  = "/v1/Conversations/" + conv1 + "/Participants/" + member1
	pathSvc   = "/v1/Services/" + isvc + "/Conversations/" + conv2 + "/Participants/" + member2
	pathProxy = "/v1/Services/" + ksvc + "/Sessions/" + sess1 + "/Participants/" + kp1
	pathV2    = "/v2/Conversations/" + v2conv + "/Participants/" + v2part
)

// twilioRouter routes by Twilio's own host names, as the defaults do.
func twilioRouter(t testing.TB) *Router {
	t.Helper()
	r, err := NewRouter([NumUpstreams][]string{{"conversations.twilio.com"}, {"proxy.twilio.com"}})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestClassifyScopes(t *testing.T) {
	tests := []struct {
		up        Upstream
		path      string
		cacheable bool
		tags      string
	}{
		{Conversations, pathConv, true, "conversations|conv:" + conv1},
		{Conversations, pathSvc, true, "conversations|conv:" + conv2 + " conversations|svc:" + isvc},
		{Conversations, pathV2, true, "conversations|conv:" + v2conv},
		{Proxy, pathProxy, true, "proxy|sess:" + sess1 + " proxy|svc:" + ksvc},
		{Conversations, "/v1/Conversations/" + conv1, false, "conversations|conv:" + conv1},
		{Conversations, "/v1/Conversations/" + conv1 + "/Participants", true, "conversations|conv:" + conv1},
		// Under a service: its reads carry the service's scope, its writes
		// do not invalidate it.
		{Conversations, "/v1/Services/" + isvc + "/Conversations/" + conv2 + "/Participants", true, "conversations|conv:" + conv2},
		{Proxy, "/v1/Services/" + ksvc + "/Sessions/" + sess1 + "/Participants", true, "proxy|sess:" + sess1},
		{Conversations, "/v1/ParticipantConversations", true, ""},
		{Conversations, "/v1/Conversations/" + conv1 + "/Messages", false, ""},
		{Conversations, "/v1/Services/" + isvc, false, "conversations|svc:" + isvc},
		{Conversations, "/v1/Users/US1/Conversations/" + conv1, false, "conversations|conv:" + conv1},
		{Conversations, "/v1/Services/" + isvc + "/Users/US1/Conversations/" + conv2, false, "conversations|conv:" + conv2},
		{Conversations, "/v2/Conversations/" + v2conv, false, "conversations|conv:" + v2conv},
		{Conversations, "/v2/Conversations/" + v2conv + "/Actions", false, "conversations|conv:" + v2conv},
		{Proxy, "/v1/Services/" + ksvc + "/Sessions/" + sess1, false, "proxy|sess:" + sess1},
		{Proxy, "/v1/Services/" + ksvc, false, "proxy|svc:" + ksvc},
		{Proxy, "/v1/Services/" + ksvc + "/Sessions/" + sess1 + "/Interactions", false, ""},
		// Addressed by unique name: the kind's wildcard goes too.
		{Conversations, "/v1/Conversations/support-room", false, "conversations|conv:support-room conversations|conv:*"},
		{Proxy, "/v1/Services/" + ksvc + "/Sessions/my-session", false, "proxy|sess:my-session proxy|sess:*"},
	}
	for _, tc := range tests {
		var buf [maxSegments]string
		var rt Match
		classify(&rt, tc.up, splitPath(tc.path, &buf))
		rt.Path = tc.path
		if rt.Cacheable() != tc.cacheable || strings.Join(rt.WriteTags(), " ") != tc.tags {
			t.Errorf("%s %s: cacheable=%v writeTags=%q, want %v %q", tc.up, tc.path, rt.Cacheable(), strings.Join(rt.WriteTags(), " "), tc.cacheable, tc.tags)
		}
		// A read's entry carries its scopes and each kind's wildcard.
		var want []string
		if tc.cacheable {
			want = append(want, PathTag(tc.up, tc.path))
			for _, tag := range rt.WriteTags() {
				want = append(want, tag, tag[:strings.Index(tag, ":")+1]+"*")
			}
			if strings.Contains(tc.path, "/Services/") && strings.HasSuffix(tc.path, "/Participants") {
				svc := map[Upstream]string{Conversations: isvc, Proxy: ksvc}[tc.up]
				want = append(want, ScopeTag(tc.up, kindSvc, svc), ScopeTag(tc.up, kindSvc, "*"))
			}
			if rt.List() == Participants { // the members scope participant events name
				id := tc.path[strings.LastIndex(tc.path[:len(tc.path)-len("/Participants")], "/")+1 : len(tc.path)-len("/Participants")]
				want = append(want, ScopeTag(tc.up, kindMembers, id))
			}
		}
		if got := rt.ReadTags(); tc.cacheable && strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("%s: read tags %q, want %q", tc.path, got, want)
		}
	}
}

// TestLabelsDeriveFromTheTable: every cached row is a label of its own, in
// table order; pass-through routes are labelled per upstream; "unrouted" is
// last; a Match's ID indexes its label.
func TestLabelsDeriveFromTheTable(t *testing.T) {
	want := []string{"conversations.v1.participant", "conversations.v1.service_participant", "conversations.v2.participant",
		"proxy.v1.participant", "conversations.v1.participants", "conversations.v1.service_participants", "conversations.v2.participants",
		"proxy.v1.participants", "conversations.v1.participant_conversations", "conversations.v1.service_participant_conversations"}
	got := Labels()
	if strings.Join(got[:len(want)], " ") != strings.Join(want, " ") ||
		strings.Join(got[len(got)-3:], " ") != "conversations.other proxy.other unrouted" {
		t.Fatalf("labels %q, want %q first (the rows cached by default), then the other reads, then the others", got, want)
	}
	for i, l := range got {
		if slices.Contains(got[:i], l) {
			t.Fatalf("label %q twice", l)
		}
	}
	if Labels()[Unrouted()] != "unrouted" {
		t.Fatalf("Unrouted() = %d", Unrouted())
	}
	r := twilioRouter(t)
	for path, label := range map[string]string{pathConv: "conversations.v1.participant", pathSvc: "conversations.v1.service_participant",
		pathV2: "conversations.v2.participant", "/proxy" + pathProxy: "proxy.v1.participant",
		"/v1/Conversations": "conversations.v1.conversations", "/proxy/v1/Services/" + ksvc: "proxy.v1.service",
		"/v1/ConversationWithParticipants": "conversations.other", "/proxy/v1/Services/" + ksvc + "/Sessions/" + sess1 + "/Participants/" + kp1 + "/X": "proxy.other",
		"/v1/ParticipantConversations": "conversations.v1.participant_conversations"} {
		m, err := r.Resolve("GET", "localhost", "", path)
		if err != nil || m.Name() != label || Labels()[m.ID()] != label {
			t.Errorf("%s: %q (id %d) %v, want %q", path, m.Name(), m.ID(), err, label)
		}
	}
}

// TestANewCachedRouteIsOneRow: a table with a fifth cached row routes,
// labels and scopes it with no other change.
func TestANewCachedRouteIsOneRow(t *testing.T) {
	table := append(append([]Row(nil), Table...), Row{Name: "conversations.v1.example", Upstream: Conversations, Cached: true,
		Pattern: "/v1/Examples/{role}", Scopes: []string{"role"}})
	r := compile(table)
	n := len(Labels()) - int(NumUpstreams) - 1 // the cached rows before it
	if got := r.labels[n]; got != "conversations.v1.example" || r.labels[len(r.labels)-1] != "unrouted" {
		t.Fatalf("labels %q", r.labels)
	}
	rows := r.byLen[Conversations][3]
	var found bool
	for _, c := range rows {
		if c.row.Name == "conversations.v1.example" && c.id == n && c.nscopes == 1 && c.scopes[0].pos == 2 {
			found = true
		}
	}
	if !found {
		t.Fatalf("the new row is not indexed: %+v", rows)
	}
}

func TestMalformedTablesAreRefused(t *testing.T) {
	for name, table := range map[string][]Row{
		"scope that is no variable": {{Upstream: Conversations, Pattern: "/v1/Conversations/{conv}", Scopes: []string{"svc"}}},
		"cached row without a name": {{Upstream: Conversations, Pattern: "/v1/X/{conv}", Cached: true}},
		"overlapping rows": {{Upstream: Proxy, Pattern: "/v1/Services/{svc}"},
			{Upstream: Proxy, Pattern: "/v1/{x}/KS1"}},
		"too many scopes":               {{Upstream: Proxy, Pattern: "/v1/{a}/{b}/{c}", Scopes: []string{"a", "b", "c"}}},
		"too many scopes within":        {{Upstream: Proxy, Pattern: "/v1/{a}/{b}/{c}", Scopes: []string{"a", "b"}, Within: []string{"c"}}},
		"a participant list of nothing": {{Name: "x", Upstream: Proxy, Pattern: "/v1/X/{a}", Cached: true, List: Participants}},
		"one name twice": {{Name: "x", Upstream: Proxy, Pattern: "/v1/X/{a}", Cached: true},
			{Name: "x", Upstream: Proxy, Pattern: "/v1/Y/{a}", OnRequest: true}},
		"cached and on request": {{Name: "x", Upstream: Proxy, Pattern: "/v1/X/{a}", Cached: true, OnRequest: true}},
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("compiled without complaint")
				}
			}()
			compile(table)
		})
	}
}

func TestDuplicateHostsAreRefused(t *testing.T) {
	_, err := NewRouter([NumUpstreams][]string{{"x.twilio.com"}, {"X.twilio.com"}})
	if err == nil || !strings.Contains(err.Error(), "upstreams.conversations.hosts and upstreams.proxy.hosts") {
		t.Fatalf("err = %v", err)
	}
}

func TestBodyTags(t *testing.T) {
	var ids BodyIDs
	if err := json.Unmarshal([]byte(`{"sid":"`+conv1+`","unique_name":"room","chat_service_sid":"`+isvc+`"}`), &ids); err != nil {
		t.Fatal(err)
	}
	got := strings.Join(BodyTags(Conversations, &ids, true), " ")
	want := "conversations|svc:" + isvc + " conversations|conv:" + conv1 + " conversations|conv:room"
	if got != want {
		t.Fatalf("body tags %q, want %q", got, want)
	}
}

// TestRoutingAHitAllocatesNothing: the hit path routes without allocating.
func TestRoutingAHitAllocatesNothing(t *testing.T) {
	r := twilioRouter(t)
	if n := testing.AllocsPerRun(100, func() {
		if _, err := r.Resolve("GET", "127.0.0.1:8080", "", pathConv); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("Resolve allocates %v times", n)
	}
}

func FuzzResolve(f *testing.F) {
	for _, s := range []string{pathConv, pathSvc, pathProxy, pathV2, "/proxy/v1/Services", "/v1/Services//x", "/%2e%2e/", "/v1", "/conversations/"} {
		f.Add(s, "localhost")
	}
	f.Add("/v1/Services", "proxy.twilio.com")
	f.Add("0", "proXY.twilio.Com") // an empty path on a Host-kept request (found by the fuzzer)
	f.Add("/nope\x00", "localhost")
	f.Add("/v1/Services/\x01x", "localhost")
	f.Add("/nope\xff", "\x00.twilio.com")
	r := twilioRouter(f)
	f.Fuzz(func(t *testing.T, path, host string) {
		m, rerr := r.Resolve("GET", host, "", path)
		if rerr == nil && (m.Upstream >= NumUpstreams || !strings.HasPrefix(m.Path, "/") || m.ID() < 0 || m.ID() >= Unrouted()) {
			t.Fatalf("resolved without an upstream, path or label: %q %q -> %+v", host, path, m)
		}
		if rerr != nil && (rerr.Status < 400 || rerr.Msg == "") {
			t.Fatalf("bad route error %+v", rerr)
		}
		if rerr != nil && (!json.Valid(twilioerr.Body(rerr.Status, rerr.Msg)) || !json.Valid(twilioerr.Body(rerr.Status, rerr.LogText()))) {
			t.Fatalf("error body is not JSON: %s", twilioerr.Body(rerr.Status, rerr.Msg))
		}
		if m.Cacheable() && len(m.ReadTags()) == 0 {
			t.Fatalf("cacheable route without scopes: %q", path)
		}
	})
}

// TestRoutingSeesThePathAsSentUpstream: an escaped "/" or "?" stays inside
// its segment (it is what the upstream sees), escaped unreserved
// characters are one spelling, and scope ids are decoded.
func TestRoutingSeesThePathAsSentUpstream(t *testing.T) {
	r := twilioRouter(t)
	for _, tc := range []struct {
		name, path, wantPath, wantLabel string
		wantErr                         int
	}{
		{"escaped slash is one segment", "/v1/Conversations/" + conv1 + "%2FParticipants%2F" + member1,
			"/v1/Conversations/" + conv1 + "%2FParticipants%2F" + member1, "conversations.v1.conversation", 0},
		{"escaped prefix slash is no prefix", "/proxy%2Fv1/Services/" + ksvc, "", "", 404},
		{"escaped question mark stays in the path", "/v1/Conversations/" + conv1 + "/Participants/q%3fx=1",
			"/v1/Conversations/" + conv1 + "/Participants/q%3Fx=1", "conversations.v1.participant", 0},
		{"unreserved escapes are decoded", "/v1/%43onversations/" + conv1 + "/Participants/b%6Fb",
			"/v1/Conversations/" + conv1 + "/Participants/bob", "conversations.v1.participant", 0},
		{"escaped dot segments are dot segments", "/v1/Conversations/%2e%2E/x", "", "", 400},
		{"malformed escape", "/v1/Conversations/%zz", "", "", 400},
	} {
		m, err := r.Resolve("GET", "localhost", "", tc.path)
		switch {
		case tc.wantErr != 0:
			if err == nil || err.Status != tc.wantErr {
				t.Errorf("%s: %+v %v, want %d", tc.name, m, err, tc.wantErr)
			}
		case err != nil || m.Path != tc.wantPath || m.Name() != tc.wantLabel:
			t.Errorf("%s: path %q label %q %v, want %q %q", tc.name, m.Path, m.Name(), err, tc.wantPath, tc.wantLabel)
		}
	}
	m, _ := r.Resolve("GET", "localhost", "", "/v1/Conversations/"+conv1+"/Participants/alice%2Fsmith%20%C3%A9")
	if got := strings.Join(m.ReadTags(), " "); !strings.Contains(got, "conversations|identity:alice/smith é") {
		t.Errorf("identity scope not decoded: %s", got)
	}
	if m.Unescaped() != "/v1/Conversations/"+conv1+"/Participants/alice/smith é" {
		t.Errorf("Unescaped = %q", m.Unescaped())
	}
}

// TestListedHostsOfAnyLength: a host is looked up only when its length is
// within the listed hosts'; the shortest (1), the longest (300) and those
// between are found as given, in capitals and with a final dot, and a host
// one byte off is not.
func TestListedHostsOfAnyLength(t *testing.T) {
	var hosts [NumUpstreams][]string
	for _, n := range []int{1, 63, 64, 127, 255, 256, 300} {
		hosts[Proxy] = append(hosts[Proxy], strings.Repeat("p", n-1)+"x")
	}
	r, err := NewRouter(hosts)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts[Proxy] {
		for _, host := range []string{h, strings.ToUpper(h) + ".", h + ":443"} {
			if m, err := r.Resolve("GET", host, "", "/v1/Services"); err != nil || m.Upstream != Proxy || m.Replaced {
				t.Fatalf("listed host of %d bytes as %.20q…: %+v %v", len(h), host, m, err)
			}
		}
		if m, err := r.Resolve("GET", "q"+h, "", "/v1/Services/KS1"); err != nil || !m.Replaced {
			t.Fatalf("a host of %d bytes that is not listed: %+v %v", len(h)+1, m, err)
		}
	}
}

func TestHostWithATrailingDotAndLongPaths(t *testing.T) {
	r := twilioRouter(t)
	for _, host := range []string{"proxy.twilio.com.", "Proxy.Twilio.COM:443", "PROXY.TWILIO.COM."} {
		if m, err := r.Resolve("GET", host, "", "/v1/Services"); err != nil || m.Upstream != Proxy || m.Replaced {
			t.Fatalf("%s: %+v %v", host, m, err)
		}
	}
	if _, err := r.Resolve("GET", "Api.Twilio.COM", "", "/v1/Services"); err == nil || err.Status != 421 || !strings.Contains(err.Msg, `"api.twilio.com"`) {
		t.Fatalf("an unlisted Twilio host in capitals: %v", err)
	}
	long := "/v1/Conversations/" + conv1 + "/Messages/IM1/Receipts/DY1/a/b/c/d"
	if m, err := r.Resolve("POST", "localhost", "", long); err != nil || m.Upstream != Conversations || m.Name() != "conversations.other" {
		t.Fatalf("a path of many segments under the sidecar's Host: %+v %v", m, err)
	}
}

// TestIdentityScopes: reads by identity carry the identity's scope (and
// its wildcard); a write to a user by identity invalidates that identity,
// by SID every identity; a participant write by SID names no identity.
func TestIdentityScopes(t *testing.T) {
	r := twilioRouter(t)
	tags := func(method, path string, read bool) string {
		m, err := r.Resolve(method, "localhost", "", path)
		if err != nil {
			t.Fatal(err)
		}
		if read {
			return strings.Join(m.ReadTags(), " ")
		}
		return strings.Join(m.WriteTags(), " ")
	}
	if got := tags("GET", "/v1/Conversations/"+conv1+"/Participants/alice", true); !strings.Contains(got, "conversations|identity:alice conversations|identity:*") {
		t.Errorf("read by identity: %s", got)
	}
	if got := tags("GET", pathConv, true); strings.Contains(got, "identity") {
		t.Errorf("read by SID names an identity in its path tags: %s", got)
	}
	for path, want := range map[string]string{
		"/v1/Users/alice":                                         "conversations|identity:alice",
		"/v1/Users/" + twiliofake.SID("US", 1):                    "conversations|identity:*",
		"/v1/Services/" + isvc + "/Users/bob":                     "conversations|identity:bob",
		"/v1/Conversations/" + conv1 + "/Participants/" + member1: "conversations|conv:" + conv1,
	} {
		if got := tags("DELETE", path, false); got != want {
			t.Errorf("DELETE %s: %q, want %q", path, got, want)
		}
	}
	ids := BodyIDs{Identity: "alice", ConversationSid: conv1}
	if got := strings.Join(EntryBodyTags(Conversations, &ids), " "); got != "conversations|conv:"+conv1+" conversations|identity:alice conversations|identity:*" {
		t.Errorf("entry body tags: %s", got)
	}
}

// TestHostsFoldedOnlyWhenTheyMayDiffer: a host is lowered (and its final
// dot dropped) only when that may change it; one whose lower case is a
// listed host still routes there, capitals and non-ASCII letters
// (U+0130 lowers to "i") alike, and an unlisted Twilio host is named in
// lower case.
func TestHostsFoldedOnlyWhenTheyMayDiffer(t *testing.T) {
	for host, want := range map[string]bool{
		"proxy.twilio.com": false, "127.0.0.1": false, "localhost": false, "@[`{": false,
		"Proxy.twilio.com": true, "proxy.twilio.coM": true, "localhost.": true, "h\u00e9": true, "Z": true, "A": true,
	} {
		if got := needsFold(host); got != want {
			t.Errorf("needsFold(%q) = %v, want %v", host, got, want)
		}
	}
	r := twilioRouter(t)
	for _, host := range []string{"proxy.tw\u0130lio.com", "PROXY.TW\u0130LIO.COM."} {
		if m, err := r.Resolve("GET", host, "", "/v1/Services"); err != nil || m.Upstream != Proxy {
			t.Fatalf("%q: %+v %v", host, m, err)
		}
	}
	if _, err := r.Resolve("GET", "api.tw\u0130lio.com", "", "/v1/Services"); err == nil || err.Status != 421 || !strings.Contains(err.Msg, `"api.twilio.com"`) {
		t.Fatalf("an unlisted Twilio host with a non-ASCII capital: %v", err)
	}
}

// An unknown path's 404 lists every prefix the sidecar's Host accepts,
// Conversations v2's under /conversations/ included.
func TestUnknownPathListsEveryPrefix(t *testing.T) {
	_, err := twilioRouter(t).Resolve("GET", "localhost", "", "/v3/Nowhere")
	if err == nil || err.Status != 404 {
		t.Fatalf("%v", err)
	}
	for _, p := range []string{"/v1/...", "/v2/...", "/proxy/v1/...", "/conversations/v1/...", "/conversations/v2/..."} {
		if !strings.Contains(err.Msg, p) || !strings.Contains(err.LogMsg, p) {
			t.Errorf("the 404 does not list %s: %q / %q", p, err.Msg, err.LogMsg)
		}
	}
}
