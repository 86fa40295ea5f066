package route

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

// Twilio's own OpenAPI descriptions of the three APIs (testdata/twilio-oai,
// MIT licensed): every path and method is walked, none is listed by hand.
var specs = []struct {
	file     string
	upstream Upstream
	host     string
}{
	{"twilio_conversations_v1.json", Conversations, "conversations.twilio.com"},
	{"twilio_conversations_v2.json", Conversations, "conversations.twilio.com"},
	{"twilio_proxy_v1.json", Proxy, "proxy.twilio.com"},
}

type specOp struct {
	spec     int
	method   string
	template string
	opID     string
}

func loadSpecOps(t *testing.T) []specOp {
	t.Helper()
	var ops []specOp
	for i, s := range specs {
		raw, err := os.ReadFile("../../testdata/twilio-oai/" + s.file)
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Paths map[string]map[string]json.RawMessage `json:"paths"`
		}
		if err := json.Unmarshal(raw, &doc); err != nil {
			t.Fatal(err)
		}
		for path, item := range doc.Paths {
			for method, op := range item {
				m := strings.ToUpper(method)
				switch m {
				case "GET", "POST", "PUT", "PATCH", "DELETE":
				default:
					continue
				}
				var o struct {
					OperationID string `json:"operationId"`
				}
				_ = json.Unmarshal(op, &o)
				ops = append(ops, specOp{i, m, path, o.OperationID})
			}
		}
	}
	sort.Slice(ops, func(a, b int) bool { return ops[a].template+ops[a].method < ops[b].template+ops[b].method })
	if len(ops) < 100 {
		t.Fatalf("only %d operations in the specs", len(ops))
	}
	return ops
}

var paramRE = regexp.MustCompile(`\{([A-Za-z]+)\}`)

// fill gives each path parameter a value of the shape Twilio uses.
func fill(spec int, template string) string {
	segs := strings.Split(template, "/")
	for i, seg := range segs {
		m := paramRE.FindStringSubmatch(seg)
		if m == nil {
			continue
		}
		var v string
		switch name := m[1]; {
		case name == "ChatServiceSid":
			v = "IS" + strings.Repeat("1", 32)
		case name == "ServiceSid":
			v = "KS" + strings.Repeat("2", 32)
		case name == "SessionSid":
			v = "KC" + strings.Repeat("3", 32)
		case name == "ConversationSid":
			v = "CH" + strings.Repeat("4", 32)
		case name == "ConversationId":
			v = "conv_conversation_0001"
		case name == "Sid" && segs[i-1] == "Services":
			v = map[bool]string{true: "KS", false: "IS"}[specs[spec].upstream == Proxy] + strings.Repeat("5", 32)
		case name == "Sid" && segs[i-1] == "Conversations":
			v = "CH" + strings.Repeat("6", 32)
		case name == "Sid" && segs[i-1] == "Sessions":
			v = "KC" + strings.Repeat("7", 32)
		case name == "id" || name == "ActionId":
			v = "conv_" + strings.ToLower(segs[i-1]) + "_0002"
		default:
			v = "XX" + strings.Repeat("8", 32)
		}
		segs[i] = v
	}
	return strings.Join(segs, "/")
}

// The participant reads the README caches by default, by operationId:
// the four fetches, the four participant lists and both forms of
// ParticipantConversations.
var cachedOps = map[string]bool{
	"twilio_conversations_v1.json FetchConversationParticipant":        true,
	"twilio_conversations_v1.json FetchServiceConversationParticipant": true,
	"twilio_proxy_v1.json FetchParticipant":                            true,
	"twilio_conversations_v2.json FetchParticipant":                    true,
	"twilio_conversations_v1.json ListConversationParticipant":         true,
	"twilio_conversations_v1.json ListServiceConversationParticipant":  true,
	"twilio_proxy_v1.json ListParticipant":                             true,
	"twilio_conversations_v2.json ListParticipantByConversation":       true,
	"twilio_conversations_v1.json ListParticipantConversation":         true,
	"twilio_conversations_v1.json ListServiceParticipantConversation":  true,
}

// The writes the README's "Invalidation and read-your-writes" says invalidate: a participant, its
// conversation or session, its service, /v1/Users/{U}/Conversations/{C}
// (and v2's conversation actions), as path templates.
var invalidatingWrites = []*regexp.Regexp{
	regexp.MustCompile(`^/v1/(Services/\{ChatServiceSid\}/)?Conversations/\{ConversationSid\}/Participants(/\{Sid\})?$`),
	regexp.MustCompile(`^/v1/(Services/\{ChatServiceSid\}/)?Conversations/\{Sid\}$`),
	regexp.MustCompile(`^/v1/(Services/\{ChatServiceSid\}/)?Users/\{UserSid\}/Conversations/\{ConversationSid\}$`),
	regexp.MustCompile(`^/v1/Services/\{Sid\}$`),
	// A user: reads keyed by its identity (README "Invalidation").
	regexp.MustCompile(`^/v1/(Services/\{ChatServiceSid\}/)?Users/\{Sid\}$`),
	regexp.MustCompile(`^/v1/Services/\{ServiceSid\}/Sessions/\{SessionSid\}/Participants(/\{Sid\})?$`),
	regexp.MustCompile(`^/v1/Services/\{ServiceSid\}/Sessions/\{Sid\}$`),
	regexp.MustCompile(`^/v2/Conversations/\{ConversationId\}/(Participants(/\{id\})?|Actions)$`),
	regexp.MustCompile(`^/v2/Conversations/\{id\}$`),
	// Creating a conversation or session invalidates by the new resource's
	// sid and unique name (from the response): a 404 remembered for a read
	// under that unique name must not outlive the create.
	regexp.MustCompile(`^/v1/(Services/\{ChatServiceSid\}/)?(Conversations|ConversationWithParticipants)$`),
	regexp.MustCompile(`^/v1/Services/\{ServiceSid\}/Sessions$`),
	regexp.MustCompile(`^/v2/Conversations$`),
}

func TestEverySpecOperationIsRoutedCachedAndInvalidatedAsDesigned(t *testing.T) {
	router := twilioRouter(t)
	resolve := func(method, host, path string) (Match, *Error) {
		return router.Resolve(method, host, "", path)
	}
	cached := 0
	for _, op := range loadSpecOps(t) {
		s := specs[op.spec]
		path := fill(op.spec, op.template)
		name := fmt.Sprintf("%s %s %s", s.file, op.method, op.template)

		// Host kept: the spec's own host.
		rt, rerr := resolve(op.method, s.host, path)
		if rerr != nil || rt.Upstream != s.upstream || rt.Path != path {
			t.Errorf("%s with Host %s: %+v %v", name, s.host, rt, rerr)
			continue
		}
		// Base URL replaced, with the upstream's prefix: always right.
		if rt2, rerr := resolve(op.method, "127.0.0.1:8080", "/"+s.upstream.String()+path); rerr != nil || rt2.Upstream != s.upstream || rt2.Path != path {
			t.Errorf("%s with the /%s prefix: %v", name, s.upstream, rerr)
		}
		// Base URL replaced, no prefix: the path decides, except the one
		// template both APIs share without a SID (/v1/Services).
		rt3, rerr := resolve(op.method, "127.0.0.1:8080", path)
		if op.template == "/v1/Services" {
			if rerr == nil || rerr.Status != http.StatusNotFound {
				t.Errorf("%s: ambiguous, want a 404 that says so, got %+v", name, rt3)
			}
		} else if rerr != nil || rt3.Upstream != s.upstream {
			t.Errorf("%s by path: %+v %v", name, rt3, rerr)
		}

		// Only the participant reads are cached.
		wantCached := op.method == "GET" && cachedOps[s.file+" "+op.opID]
		if got := rt.Cacheable() && op.method == "GET"; got != wantCached {
			t.Errorf("%s (%s): cached=%v, want %v", name, op.opID, got, wantCached)
		}
		if wantCached {
			cached++
		}
		// Writes invalidate what the README says, and nothing else does.
		if op.method != "GET" {
			want := false
			for _, re := range invalidatingWrites {
				want = want || re.MatchString(op.template)
			}
			if got := len(rt.WriteTags()) > 0 || rt.Resource(); got != want {
				t.Errorf("%s: invalidates=%v (tags %v), want %v", name, got, rt.WriteTags(), want)
			}
		}
	}
	if cached != len(cachedOps) {
		t.Fatalf("found %d cached operations in the specs, want %d", cached, len(cachedOps))
	}
}

// Issue 36, points 4 and 6: every GET of the three specs has a name
// [cache.routes] takes: cached by default for the participant reads, on
// request for the others. With routes cached on request, a write to a
// resource invalidates every read under it (the resource itself, and its
// sub-resources and lists) and the list it is in; a write to a list
// invalidates that list; and no write invalidates a read that is neither
// under it nor its list (a message's write leaves another message).
func TestEverySpecReadHasANameAndItsWritesFollowThePath(t *testing.T) {
	router := twilioRouter(t)
	ops := loadSpecOps(t)
	type read struct {
		name, path string
		tags       []string
	}
	var reads []read
	names := map[string]bool{}
	for _, op := range ops {
		if op.method != "GET" {
			continue
		}
		s := specs[op.spec]
		m, err := router.Resolve("GET", s.host, "", fill(op.spec, op.template))
		name := fmt.Sprintf("%s GET %s", s.file, op.template)
		if err != nil || m.row == nil || m.row.Name == "" || names[m.Name()] {
			t.Errorf("%s: no name of its own (%q)", name, m.Name())
			continue
		}
		names[m.Name()] = true
		if m.row.Cached != cachedOps[s.file+" "+op.opID] || m.row.Cached == m.OnRequest() {
			t.Errorf("%s (%s): cached by default %v, on request %v", name, m.Name(), m.row.Cached, m.OnRequest())
		}
		if m.OnRequest() {
			reads = append(reads, read{s.host + " " + op.template, s.host + m.Path, m.ReadTags()})
		}
	}
	if len(names) != len(Named()) {
		t.Fatalf("%d GET paths in the specs, %d named routes", len(names), len(Named()))
	}
	for _, op := range ops {
		if op.method == "GET" {
			continue
		}
		s := specs[op.spec]
		m, err := router.Resolve(op.method, s.host, "", fill(op.spec, op.template))
		if err != nil {
			t.Fatal(err)
		}
		w := s.host + m.Path
		tags := m.TreeTags()
		resource := strings.HasSuffix(op.template, "}")
		for _, r := range reads {
			under := strings.HasPrefix(r.path+"/", w+"/") && (resource || r.path == w)
			list := resource && r.path == w[:strings.LastIndex(w, "/")]
			hit := false
			for _, tag := range tags {
				hit = hit || slices.Contains(r.tags, tag)
			}
			if hit != (under || list) {
				t.Errorf("%s %s and the read of %s: invalidates %v, want %v", op.method, op.template, r.name, hit, under || list)
			}
		}
	}
}
