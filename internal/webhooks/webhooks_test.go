package webhooks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"cacheproxy/internal/nodetest"
	"cacheproxy/internal/route"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
)

// The tests sign their requests with twilio-node (clients/node/sign.js):
// code nobody here wrote. `bash .ci/run` installs it.
func TestMain(m *testing.M) { nodetest.Main(m, "internal/webhooks") }

const (
	public   = "https://hooks.example.com/twilio"
	token    = "0123456789abcdef0123456789abcdef"
	other    = "fedcba9876543210fedcba9876543210"
	member   = "MB00000000000000000000000000000001"
	conv     = "CH00000000000000000000000000000001"
	account  = "AC00000000000000000000000000000001"
	identity = "alice@example.com"
	chatSvc  = "IS00000000000000000000000000000001"
	userSid  = "US00000000000000000000000000000001"
	v2part   = "conv_participant_1"
	v2conv   = "conv_conversation_1"
)

// recorder is an Invalidator that remembers what it was told.
type recorder struct {
	mu    sync.Mutex
	calls [][]string
}

func (r *recorder) Invalidate(_ context.Context, tags []string) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, tags)
	return uint64(len(r.calls))
}

func (r *recorder) all() [][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]string(nil), r.calls...)
}

type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) { l.mu.Lock(); defer l.mu.Unlock(); return l.b.Write(p) }
func (l *logBuf) String() string              { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

func newHandler(t *testing.T, forward string) (*Handler, *recorder, *logBuf) {
	t.Helper()
	rec, logs := &recorder{}, &logBuf{}
	h, err := New(Config{PublicURL: public, AuthTokens: []string{other, token}, ForwardTo: forward, Invalidator: rec,
		Logger: zerolog.New(logs).Level(zerolog.DebugLevel)})
	if err != nil {
		t.Fatal(err)
	}
	return h, rec, logs
}

// sign asks twilio-node for the signature of a request to path: form
// params, or a JSON body (then the URL gains bodySHA256).
func sign(t *testing.T, tok, path string, params map[string]string, body *string) (signedURL, sig string) {
	t.Helper()
	in := map[string]any{"token": tok, "url": public + path}
	if body != nil {
		in["body"] = *body
	} else {
		in["params"] = params
	}
	raw, _ := json.Marshal(in)
	cmd := exec.Command("node", "../../clients/node/sign.js")
	cmd.Stdin = bytes.NewReader(raw)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("sign.js: %v", err)
	}
	var res struct{ URL, Signature string }
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatal(err)
	}
	return res.URL, res.Signature
}

// post sends a form webhook signed with tok to path.
func postForm(t *testing.T, h http.Handler, tok, path string, params map[string]string) *httptest.ResponseRecorder {
	t.Helper()
	_, sig := sign(t, tok, path, params, nil)
	form := url.Values{}
	for k, v := range params {
		form.Set(k, v)
	}
	req := httptest.NewRequest("POST", path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("X-Twilio-Signature", sig)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w
}

// postJSON sends a JSON webhook (bodySHA256) signed with tok to path.
func postJSON(t *testing.T, h http.Handler, tok, path, body string) *httptest.ResponseRecorder {
	t.Helper()
	signed, sig := sign(t, tok, path, nil, &body)
	u, _ := url.Parse(signed)
	req := httptest.NewRequest("POST", path+"?"+u.RawQuery, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Twilio-Signature", sig)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w
}

func TestConversationsWebhooksInvalidateWhatTheyChange(t *testing.T) {
	base := map[string]string{"AccountSid": account, "ConversationSid": conv, "ParticipantSid": member, "Identity": identity,
		"ChatServiceSid": chatSvc, "UserSid": userSid, "Source": "SDK", "MessagingBinding.Address": "+15005550001"}
	// A participant event names the participant, its conversation's
	// participant lists, and the reads by its identity and address (the
	// ParticipantConversations pages that list it, or should).
	participant := []string{route.ParticipantTag(member), route.MembersTag(route.Conversations, conv), route.IdentityTag(identity),
		route.AddressTag("+15005550001")}
	for _, tc := range []struct {
		event string
		want  []string
	}{
		{"onParticipantUpdated", participant},
		{"onParticipantAdded", participant},
		{"onParticipantRemoved", participant},
		{"onConversationUpdated", []string{route.ConversationTag(conv)}},
		{"onConversationRemoved", []string{route.ConversationTag(conv)}},
		{"onConversationStateUpdated", []string{route.ConversationTag(conv)}},
		{"onUserUpdated", []string{route.IdentityTag(identity)}},
		{"onParticipantUpdate", nil}, // a pre-event: nothing has changed yet
		{"onMessageAdded", nil},      // not cached: accepted, costs nothing
	} {
		t.Run(tc.event, func(t *testing.T) {
			h, rec, _ := newHandler(t, "")
			params := map[string]string{"EventType": tc.event}
			for k, v := range base {
				params[k] = v
			}
			w := postForm(t, h, token, "/webhooks/conversations", params)
			if w.Code != http.StatusNoContent {
				t.Fatalf("status %d: %s", w.Code, w.Body)
			}
			got := rec.all()
			if tc.want == nil {
				if len(got) != 0 {
					t.Fatalf("invalidated %v", got)
				}
				return
			}
			if len(got) != 1 || !reflect.DeepEqual(got[0], tc.want) {
				t.Fatalf("invalidated %v, want %v", got, tc.want)
			}
		})
	}
}

func TestEventStreamsSinkInvalidatesEachEvent(t *testing.T) {
	h, rec, _ := newHandler(t, "")
	body := `[
 {"specversion":"1.0","type":"com.twilio.conversations.participant.updated","source":"x","id":"EV1",
  "data":{"AccountSid":"` + account + `","ParticipantSid":"` + member + `","Identity":"` + identity + `","ConversationSid":"` + conv + `","MessagingBinding":{"Address":"+15005550001"}}},
 {"specversion":"1.0","type":"com.twilio.conversations.conversation.updated","source":"x","id":"EV2",
  "data":{"AccountSid":"` + account + `","ConversationSid":"` + conv + `","State":"active"}},
 {"specversion":"1.0","type":"com.twilio.conversations.user.updated","source":"x","id":"EV3",
  "data":{"AccountSid":"` + account + `","UserSid":"` + userSid + `","Identity":"` + identity + `"}},
 {"specversion":"1.0","type":"com.twilio.conversations.message.added","source":"x","id":"EV4","data":{"ConversationSid":"` + conv + `"}}
]`
	for range 2 { // delivered twice (at least once): harmless
		if w := postJSON(t, h, token, "/webhooks/events", body); w.Code != http.StatusNoContent {
			t.Fatalf("status %d: %s", w.Code, w.Body)
		}
	}
	want := []string{route.ParticipantTag(member), route.MembersTag(route.Conversations, conv), route.IdentityTag(identity),
		route.AddressTag("+15005550001"), route.ConversationTag(conv), route.IdentityTag(identity)}
	got := rec.all()
	if len(got) != 2 || !reflect.DeepEqual(got[0], want) || !reflect.DeepEqual(got[1], want) {
		t.Fatalf("invalidated %v, want %v twice", got, want)
	}
}

func TestOrchestratorCallbacksInvalidateV2Reads(t *testing.T) {
	h, rec, _ := newHandler(t, "")
	for body, want := range map[string][]string{
		`{"eventType":"PARTICIPANT_UPDATED","timestamp":"2026-01-01T00:00:00Z","data":{"id":"` + v2part + `","conversationId":"` + v2conv + `"}}`: {
			route.ParticipantTag(v2part), route.MembersTag(route.Conversations, v2conv)},
		`{"eventType":"CONVERSATION_UPDATED","timestamp":"2026-01-01T00:00:00Z","data":{"id":"` + v2conv + `"}}`: {route.ConversationTag(v2conv)},
	} {
		before := len(rec.all())
		if w := postJSON(t, h, token, "/webhooks/orchestrator", body); w.Code != http.StatusNoContent {
			t.Fatalf("status %d: %s", w.Code, w.Body)
		}
		got := rec.all()
		if len(got) != before+1 || !reflect.DeepEqual(got[before], want) {
			t.Fatalf("%s: invalidated %v, want [%s]", body, got[before:], want)
		}
	}
}

// Only Twilio can invalidate: a missing or wrong signature, another
// token, a changed body or another URL get 403 in Twilio's error shape,
// invalidate nothing, are not forwarded, and are logged without the
// signature or the body.
func TestOnlyTwilioCanInvalidate(t *testing.T) {
	forwarded := 0
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { forwarded++ }))
	defer app.Close()
	h, rec, logs := newHandler(t, app.URL)
	params := map[string]string{"EventType": "onParticipantUpdated", "ConversationSid": conv, "ParticipantSid": member, "Identity": identity}
	_, good := sign(t, token, "/webhooks/conversations", params, nil)
	_, wrongToken := sign(t, "not-a-configured-token-000000000", "/webhooks/conversations", params, nil)
	_, otherPath := sign(t, token, "/webhooks/events", params, nil)
	form := url.Values{}
	for k, v := range params {
		form.Set(k, v)
	}
	tampered := url.Values{}
	for k, v := range params {
		tampered.Set(k, v)
	}
	tampered.Set("ParticipantSid", "MB00000000000000000000000000000009")
	for name, tc := range map[string]struct{ body, sig string }{
		"missing":     {form.Encode(), ""},
		"wrong token": {form.Encode(), wrongToken},
		"other URL":   {form.Encode(), otherPath},
		"tampered":    {tampered.Encode(), good},
		"garbage":     {form.Encode(), "not base64 at all"},
	} {
		req := httptest.NewRequest("POST", "/webhooks/conversations", strings.NewReader(tc.body))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		if tc.sig != "" {
			req.Header.Set("X-Twilio-Signature", tc.sig)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		var e struct {
			Code   int `json:"code"`
			Status int `json:"status"`
		}
		if w.Code != http.StatusForbidden || json.Unmarshal(w.Body.Bytes(), &e) != nil || e.Code != 20403 || e.Status != 403 {
			t.Fatalf("%s: %d %s", name, w.Code, w.Body)
		}
	}
	if got := rec.all(); len(got) != 0 || forwarded != 0 {
		t.Fatalf("refused requests invalidated %v, forwarded %d", got, forwarded)
	}
	if l := logs.String(); strings.Count(l, `"outcome":"rejected"`) != 5 || strings.Contains(l, good) || strings.Contains(l, identity) || strings.Contains(l, member) {
		t.Fatalf("refusal log lines: %s", l)
	}
}

func TestBadRequestsGetClearAnswers(t *testing.T) {
	h, rec, _ := newHandler(t, "")
	for _, tc := range []struct {
		method, path string
		body         io.Reader
		status       int
	}{
		{"GET", "/webhooks/conversations", nil, http.StatusMethodNotAllowed},
		{"POST", "/webhooks/other", strings.NewReader(""), http.StatusNotFound},
		{"POST", "/v1/Conversations", strings.NewReader(""), http.StatusNotFound},
		{"POST", "/webhooks/events", strings.NewReader(strings.Repeat("x", MaxBodyBytes+1)), http.StatusRequestEntityTooLarge},
	} {
		req := httptest.NewRequest(tc.method, tc.path, tc.body)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != tc.status || !json.Valid(w.Body.Bytes()) {
			t.Fatalf("%s %s: %d %s, want %d", tc.method, tc.path, w.Code, w.Body, tc.status)
		}
	}
	if len(rec.all()) != 0 {
		t.Fatal("a bad request invalidated something")
	}
}

// With forward_to, the request goes on to the app unchanged (after the
// invalidation) and the app's answer comes back as it is: pre-event
// webhooks keep working with cacheproxy in front.
func TestForwardToRelaysTheAppsAnswer(t *testing.T) {
	type seen struct {
		path, query, sig, body string
	}
	got := make(chan seen, 2)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- seen{r.URL.Path, r.URL.RawQuery, r.Header.Get("X-Twilio-Signature"), string(b)}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, `{"friendly_name":"changed by the app"}`) // a pre-event's answer
	}))
	defer app.Close()
	h, rec, _ := newHandler(t, app.URL+"/app/hooks")
	params := map[string]string{"EventType": "onConversationUpdate", "ConversationSid": conv}
	w := postForm(t, h, token, "/webhooks/conversations", params)
	if w.Code != 200 || w.Body.String() != `{"friendly_name":"changed by the app"}` {
		t.Fatalf("relayed answer: %d %s", w.Code, w.Body)
	}
	s := <-got
	form := url.Values{}
	for k, v := range params {
		form.Set(k, v)
	}
	if s.path != "/app/hooks/conversations" || s.sig == "" || s.body != form.Encode() {
		t.Fatalf("forwarded: %+v", s)
	}
	if len(rec.all()) != 0 {
		t.Fatal("a pre-event invalidated something")
	}
	body := `[{"type":"com.twilio.conversations.participant.updated","data":{"ParticipantSid":"` + member + `"}}]`
	if w := postJSON(t, h, token, "/webhooks/events", body); w.Code != 200 {
		t.Fatalf("events relayed: %d", w.Code)
	}
	if s := <-got; s.path != "/app/hooks/events" || !strings.HasPrefix(s.query, "bodySHA256=") || s.body != body {
		t.Fatalf("forwarded: %+v", s)
	}
	if len(rec.all()) != 1 {
		t.Fatal("the forwarded event did not invalidate first")
	}
}

// Hostile input, point 5: forward_to is the only place a webhook goes. An
// app that answers 307 to another address gets its redirect relayed to
// Twilio as it is; the body and its signature go nowhere else.
func TestForwardToNeverFollowsRedirects(t *testing.T) {
	var elsewhere atomic.Int64
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { elsewhere.Add(1) }))
	defer other.Close()
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/steal", http.StatusTemporaryRedirect)
	}))
	defer app.Close()
	h, _, _ := newHandler(t, app.URL)
	w := postForm(t, h, token, "/webhooks/conversations", map[string]string{"EventType": "onConversationUpdated", "ConversationSid": conv})
	if w.Code != http.StatusTemporaryRedirect || w.Header().Get("Location") != other.URL+"/steal" {
		t.Fatalf("relayed: %d %v, want the app's 307 as it is", w.Code, w.Header())
	}
	if n := elsewhere.Load(); n != 0 {
		t.Fatalf("the webhook was sent to the redirect's target %d times", n)
	}
}

// Each request counts in cacheproxy_webhooks_total{source,outcome} and has
// a log line with its event types.
func TestWebhooksAreCountedAndLogged(t *testing.T) {
	reg := prometheus.NewRegistry()
	rec, logs := &recorder{}, &logBuf{}
	h, err := New(Config{PublicURL: public, AuthTokens: []string{token}, Invalidator: rec, Logger: zerolog.New(logs), Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	postForm(t, h, token, "/webhooks/conversations", map[string]string{"EventType": "onParticipantUpdated", "ParticipantSid": member})
	postForm(t, h, token, "/webhooks/conversations", map[string]string{"EventType": "onMessageAdded"})
	postForm(t, h, other, "/webhooks/conversations", map[string]string{"EventType": "onParticipantUpdated", "ParticipantSid": member})
	postJSON(t, h, token, "/webhooks/events", `[{"type":"com.twilio.conversations.conversation.updated","data":{"ConversationSid":"`+conv+`"}}]`)
	for labels, want := range map[[2]string]float64{
		{"conversations", "accepted"}: 1, {"conversations", "ignored"}: 1, {"conversations", "rejected"}: 1, {"events", "accepted"}: 1,
	} {
		if got := testutil.ToFloat64(h.total.WithLabelValues(labels[0], labels[1])); got != want {
			t.Errorf("cacheproxy_webhooks_total%v = %v, want %v", labels, got, want)
		}
	}
	l := logs.String()
	for _, want := range []string{`"events":["onParticipantUpdated"]`, `"events":["onMessageAdded"]`, `"events":["com.twilio.conversations.conversation.updated"]`, `"outcome":"ignored"`} {
		if !strings.Contains(l, want) {
			t.Errorf("log lacks %s:\n%s", want, l)
		}
	}
}

// confirmer is an Invalidator that cannot confirm its invalidations
// fleet-wide (Redis away, a replica silent).
type confirmer struct{ recorder }

func (c *confirmer) InvalidateConfirmed(ctx context.Context, tags []string) (uint64, error) {
	return c.Invalidate(ctx, tags), errors.New("2 of 3 replicas did not acknowledge")
}

// countingBody counts the bytes read from it.
type countingBody struct {
	io.Reader
	n *atomic.Int64
}

func (b countingBody) Read(p []byte) (int, error) {
	n, err := b.Reader.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// Hostile input, points 1 and 6: what a delivery costs before its
// signature is known is bounded, and a correctly signed delivery that
// cannot be applied gets 503 with Retry-After (Twilio delivers it again;
// Event Streams drops one answered with another 4xx):
//   - a JSON delivery (bodySHA256) with a bad signature is refused before a
//     byte of its body is read;
//   - a form body over MaxFormBytes is refused by its Content-Length, unread;
//   - with MaxReadingBytes of bodies being read, a delivery gets 503;
//   - a delivery whose invalidation the fleet could not confirm gets 503.
func TestDeliveriesAreBoundedAndRetriedWhenNotApplied(t *testing.T) {
	h, _, _ := newHandler(t, "")
	var read atomic.Int64
	req := httptest.NewRequest("POST", "/webhooks/events?bodySHA256=00", countingBody{strings.NewReader(strings.Repeat("x", 1000)), &read})
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Twilio-Signature", "forged")
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	if w.Code != http.StatusForbidden || read.Load() != 0 {
		t.Fatalf("a forged JSON delivery: %d after reading %d bytes, want 403 after none", w.Code, read.Load())
	}
	big := httptest.NewRequest("POST", "/webhooks/conversations", countingBody{strings.NewReader(strings.Repeat("x", MaxFormBytes+1)), &read})
	big.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	big.ContentLength = MaxFormBytes + 1
	w = httptest.NewRecorder()
	h.ServeHTTP(w, big)
	if w.Code != http.StatusRequestEntityTooLarge || read.Load() != 0 {
		t.Fatalf("a form body over %d bytes: %d after reading %d bytes, want 413 after none", MaxFormBytes, w.Code, read.Load())
	}
	params := map[string]string{"EventType": "onParticipantUpdated", "ConversationSid": conv, "ParticipantSid": member}
	h.reading.Store(MaxReadingBytes)
	if w := postForm(t, h, token, "/webhooks/conversations", params); w.Code != http.StatusServiceUnavailable || w.Header().Get("Retry-After") == "" {
		t.Fatalf("at the listener's limit: %d %v, want 503 with Retry-After", w.Code, w.Header())
	}
	h.reading.Store(0)
	if w := postForm(t, h, token, "/webhooks/conversations", params); w.Code != http.StatusNoContent {
		t.Fatalf("below it: %d", w.Code)
	}
	c := &confirmer{}
	hc, err := New(Config{PublicURL: public, AuthTokens: []string{token}, Invalidator: c, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	if w := postForm(t, hc, token, "/webhooks/conversations", params); w.Code != http.StatusServiceUnavailable || w.Header().Get("Retry-After") == "" {
		t.Fatalf("an invalidation not confirmed fleet-wide: %d %v, want 503 with Retry-After", w.Code, w.Header())
	}
	if len(c.all()) != 1 {
		t.Fatal("the invalidation was not applied here meanwhile")
	}
}

// Hostile input, point 7: a signed delivery sent again (a replay, or
// Twilio's retry with the same I-Twilio-Idempotency-Token) within the
// window is not forwarded again; it is answered as the first was. A copy
// whose first the app failed to answer (5xx) is forwarded: Twilio's retry
// must reach the app.
func TestReplaysAreForwardedOnce(t *testing.T) {
	var calls atomic.Int64
	fail := atomic.Bool{}
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if fail.Load() {
			w.WriteHeader(http.StatusBadGateway)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"answer":1}`)
	}))
	defer app.Close()
	h, _, _ := newHandler(t, app.URL)
	params := map[string]string{"EventType": "onParticipantUpdated", "ConversationSid": conv, "ParticipantSid": member}
	for i := range 3 {
		if w := postForm(t, h, token, "/webhooks/conversations", params); w.Code != 200 || w.Body.String() != `{"answer":1}` {
			t.Fatalf("copy %d: %d %q, want the first's answer", i, w.Code, w.Body)
		}
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("the app got %d copies of one delivery, want 1", n)
	}
	other := map[string]string{"EventType": "onParticipantUpdated", "ConversationSid": conv, "ParticipantSid": member, "Index": "2"}
	fail.Store(true)
	postForm(t, h, token, "/webhooks/conversations", other)
	fail.Store(false)
	if w := postForm(t, h, token, "/webhooks/conversations", other); w.Code != 200 || calls.Load() != 3 {
		t.Fatalf("a retry of a delivery the app failed: %d, app calls %d, want 200 and 3", w.Code, calls.Load())
	}
	// Twilio's retry names its delivery by I-Twilio-Idempotency-Token.
	for i, p := range []map[string]string{{"EventType": "onConversationUpdated", "ConversationSid": conv}, {"EventType": "onConversationUpdated", "ConversationSid": conv, "RetryCount": "1"}} {
		_, sig := sign(t, token, "/webhooks/conversations", p, nil)
		form := url.Values{}
		for k, v := range p {
			form.Set(k, v)
		}
		req := httptest.NewRequest("POST", "/webhooks/conversations", strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("X-Twilio-Signature", sig)
		req.Header.Set("I-Twilio-Idempotency-Token", "delivery-1")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != 200 || calls.Load() != 4 {
			t.Fatalf("copy %d of one idempotency token: %d, app calls %d, want 200 and 4", i, w.Code, calls.Load())
		}
	}
}

// Every source and outcome is a series at 0 before the first webhook: a
// dashboard shows 0, and an absent-series alert tells a dead listener
// from a quiet one.
func TestWebhookSeriesExistFromTheStart(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(Config{PublicURL: "https://hooks.example.com", AuthTokens: []string{"t"}, Registerer: reg}); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(reg, "cacheproxy_webhooks_total"); n != 4*5 {
		t.Fatalf("%d series before any webhook, want 20 (4 sources × 5 outcomes)", n)
	}
}

// sendForm posts a raw form body with sig to /webhooks/conversations.
func sendForm(h http.Handler, body, sig string) *httptest.ResponseRecorder {
	req := httptest.NewRequest("POST", "/webhooks/conversations", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("X-Twilio-Signature", sig)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w
}

// Hostile input, round three, point 3: the signature covers every value
// of a form, so a value added to a captured delivery (after the signed
// one, before it, or under a new name) is refused, never invalidated nor
// forwarded; a repeated name Twilio signed (each value, sorted) is valid.
func TestSignatureCoversEveryValue(t *testing.T) {
	var forwarded atomic.Int64
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { forwarded.Add(1) }))
	defer app.Close()
	h, rec, _ := newHandler(t, app.URL)
	params := map[string]string{"EventType": "onParticipantUpdated", "ConversationSid": conv, "ParticipantSid": member}
	_, sig := sign(t, token, "/webhooks/conversations", params, nil)
	body := "ConversationSid=" + conv + "&EventType=onParticipantUpdated&ParticipantSid=" + member
	for name, b := range map[string]string{
		"appended":       body + "&ParticipantSid=MB00000000000000000000000000000009",
		"prepended":      "ParticipantSid=MB00000000000000000000000000000009&" + body,
		"other event":    body + "&EventType=onConversationRemoved",
		"new name":       body + "&Identity=mallory",
		"empty appended": body + "&EventType=",
	} {
		if w := sendForm(h, b, sig); w.Code != http.StatusForbidden {
			t.Errorf("%s: %d %s, want 403", name, w.Code, w.Body)
		}
	}
	if got := rec.all(); len(got) != 0 || forwarded.Load() != 0 {
		t.Fatalf("refused deliveries invalidated %v, forwarded %d", got, forwarded.Load())
	}
	// A name Twilio sent twice, signed by twilio-node (values sorted).
	in, _ := json.Marshal(map[string]any{"token": token, "url": public + "/webhooks/conversations",
		"params": map[string]any{"EventType": "onParticipantUpdated", "ConversationSid": conv, "ParticipantSid": []string{member, "MB00000000000000000000000000000002"}}})
	cmd := exec.Command("node", "../../clients/node/sign.js")
	cmd.Stdin = bytes.NewReader(in)
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	var res struct{ Signature string }
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatal(err)
	}
	twice := body + "&ParticipantSid=MB00000000000000000000000000000002"
	if w := sendForm(h, twice, res.Signature); w.Code != http.StatusOK {
		t.Fatalf("a repeated name signed with each value: %d %s, want 200", w.Code, w.Body)
	}
	if w := sendForm(h, twice, sig); w.Code != http.StatusForbidden {
		t.Fatalf("the same body under the first value's signature: %d, want 403", w.Code)
	}
}

// Hostile input, round three, point 4: a delivery is recognised by what
// its signature covers, so no rewriting of its body that still validates
// (parameters reordered, re-encoded, a trailing '&', a value repeated)
// reaches the app a second time.
func TestRewrittenReplaysAreForwardedOnce(t *testing.T) {
	var forwarded atomic.Int64
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { forwarded.Add(1) }))
	defer app.Close()
	h, _, _ := newHandler(t, app.URL)
	params := map[string]string{"EventType": "onParticipantUpdated", "ConversationSid": conv, "ParticipantSid": member, "Identity": identity}
	_, sig := sign(t, token, "/webhooks/conversations", params, nil)
	body := "ConversationSid=" + conv + "&EventType=onParticipantUpdated&Identity=alice%40example.com&ParticipantSid=" + member
	for name, b := range map[string]string{
		"as sent":     body,
		"reordered":   "ParticipantSid=" + member + "&Identity=alice%40example.com&EventType=onParticipantUpdated&ConversationSid=" + conv,
		"trailing &":  body + "&",
		"leading &":   "&" + body,
		"re-encoded":  strings.Replace(body, "onParticipantUpdated", "%6fnParticipantUpdated", 1),
		"plain @":     strings.Replace(body, "%40", "@", 1),
		"value twice": body + "&ParticipantSid=" + member,
	} {
		if w := sendForm(h, b, sig); w.Code != http.StatusOK {
			t.Fatalf("%s: %d %s, want 200 (the first's answer)", name, w.Code, w.Body)
		}
	}
	if n := forwarded.Load(); n != 1 {
		t.Fatalf("the app got %d copies of one delivery, want 1", n)
	}
}
