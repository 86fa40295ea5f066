package proxy

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"reflect"
	"testing"

	"cacheproxy/internal/twiliofake"

	"github.com/twilio/twilio-go"
	twclient "github.com/twilio/twilio-go/client"
	conversationsv1 "github.com/twilio/twilio-go/rest/conversations/v1"
)

// rewrite sends twilio-go's requests to addr over plain HTTP. keepHost
// keeps Twilio's Host header (a client that rewrites only scheme and host);
// otherwise the Host is addr's, as when a base URL is replaced.
type rewrite struct {
	addr     string
	keepHost bool
}

func (t rewrite) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.URL.Scheme, r.URL.Host = "http", t.addr
	if !t.keepHost {
		r.Host = ""
	}
	return http.DefaultTransport.RoundTrip(r)
}

func twilioClient(user, pass string, rt http.RoundTripper) *twilio.RestClient {
	c := &twclient.Client{Credentials: twclient.NewCredentials(user, pass), HTTPClient: &http.Client{Transport: rt}}
	c.SetAccountSid(user)
	return twilio.NewRestClientWithParams(twilio.ClientParams{Client: c})
}

func hostOf(u string) string { p, _ := url.Parse(u); return p.Host }

func TestTwilioGoThroughTheProxy(t *testing.T) {
	for _, mode := range []struct {
		name     string
		keepHost bool
	}{{"host kept", true}, {"base url", false}} {
		t.Run(mode.name, func(t *testing.T) {
			h := newHarness(t)
			via := twilioClient(acctA, tokenA, rewrite{hostOf(h.srv.URL), mode.keepHost})
			directConv := twilioClient(acctA, tokenA, rewrite{hostOf(h.convSrv.URL), true})
			directProx := twilioClient(acctA, tokenA, rewrite{hostOf(h.proxSrv.URL), true})

			// fetchTwice checks the decoded struct against the upstream's and
			// that the second fetch is served from cache.
			fetchTwice := func(name string, fake interface{ Total() int64 }, viaProxy, direct func() (any, error)) {
				t.Helper()
				want, err := direct()
				if err != nil {
					t.Fatalf("%s direct: %v", name, err)
				}
				for i := 0; i < 2; i++ {
					before := fake.Total()
					got, err := viaProxy()
					if err != nil {
						t.Fatalf("%s through the proxy: %v", name, err)
					}
					if !reflect.DeepEqual(got, want) {
						t.Fatalf("%s: decoded %+v, upstream sent %+v", name, got, want)
					}
					h.settle()
					if calls := fake.Total() - before; (i == 0) != (calls == 1) || calls > 1 {
						t.Fatalf("%s fetch %d made %d upstream calls", name, i+1, calls)
					}
				}
			}
			fetchTwice("ConversationsV1.FetchConversationParticipant", h.conv,
				func() (any, error) { return via.ConversationsV1.FetchConversationParticipant(conv1, member1) },
				func() (any, error) { return directConv.ConversationsV1.FetchConversationParticipant(conv1, member1) })
			fetchTwice("ConversationsV1.FetchServiceConversationParticipant", h.conv,
				func() (any, error) {
					return via.ConversationsV1.FetchServiceConversationParticipant(isvc, conv2, member2)
				},
				func() (any, error) {
					return directConv.ConversationsV1.FetchServiceConversationParticipant(isvc, conv2, member2)
				})
			fetchTwice("ProxyV1.FetchParticipant", h.prox,
				func() (any, error) { return via.ProxyV1.FetchParticipant(ksvc, sess1, kp1) },
				func() (any, error) { return directProx.ProxyV1.FetchParticipant(ksvc, sess1, kp1) })
			fetchTwice("ConversationsV2.FetchParticipant", h.conv,
				func() (any, error) { return via.ConversationsV2.FetchParticipant(v2conv, v2part) },
				func() (any, error) { return directConv.ConversationsV2.FetchParticipant(v2conv, v2part) })

			// An update through the proxy is seen by the next fetch.
			params := (&conversationsv1.UpdateConversationParticipantParams{}).SetAttributes(`{"v":"updated"}`)
			if _, err := via.ConversationsV1.UpdateConversationParticipant(conv1, member1, params); err != nil {
				t.Fatal(err)
			}
			p, err := via.ConversationsV1.FetchConversationParticipant(conv1, member1)
			if err != nil || p.Attributes == nil || *p.Attributes != `{"v":"updated"}` {
				t.Fatalf("fetch after update: %+v %v", p, err)
			}
			// Deletes through the proxy: the next fetch is Twilio's 404.
			if err := via.ConversationsV1.DeleteConversationParticipant(conv1, member1, nil); err != nil {
				t.Fatal(err)
			}
			if err := via.ProxyV1.DeleteParticipant(ksvc, sess1, kp1); err != nil {
				t.Fatal(err)
			}
			for name, fetch := range map[string]func() error{
				"conversations v1": func() error { _, err := via.ConversationsV1.FetchConversationParticipant(conv1, member1); return err },
				"proxy v1":         func() error { _, err := via.ProxyV1.FetchParticipant(ksvc, sess1, kp1); return err },
			} {
				var te *twclient.TwilioRestError
				if err := fetch(); !errors.As(err, &te) || te.Status != 404 || te.Code != 20404 {
					t.Fatalf("%s fetch after delete: %v", name, err)
				}
			}
		})
	}
}

// TestTwilioGoIdentitiesWithReservedCharacters: identities with "/", "?",
// "%", spaces or non-ASCII, passed to twilio-go escaped (it puts path
// parameters into the URL as given), are fetched through the proxy as
// Twilio sends them, and each keeps an entry of its own.
func TestTwilioGoIdentitiesWithReservedCharacters(t *testing.T) {
	h := newHarness(t)
	identities := []string{"team/alice", "team", "q?x=1", "q", "100%", "Bob Smith", "zoë", "a%2Fb"}
	for i, id := range identities {
		h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 500+i), Identity: id})
	}
	via := twilioClient(acctA, tokenA, rewrite{hostOf(h.srv.URL), false})
	direct := twilioClient(acctA, tokenA, rewrite{hostOf(h.convSrv.URL), true})
	for round := 0; round < 2; round++ {
		for _, id := range identities {
			before := h.conv.Total()
			want, err := direct.ConversationsV1.FetchConversationParticipant(conv1, url.PathEscape(id))
			if err != nil || want.Identity == nil || *want.Identity != id {
				t.Fatalf("%q straight from the upstream: %+v %v", id, want, err)
			}
			got, err := via.ConversationsV1.FetchConversationParticipant(conv1, url.PathEscape(id))
			if err != nil || !reflect.DeepEqual(got, want) {
				t.Fatalf("%q through the proxy: %+v %v, want %+v", id, got, err, want)
			}
			h.settle()
			// The direct fetch is one call; the proxy's first read another,
			// its second a hit.
			if calls, wantCalls := h.conv.Total()-before, int64(2-round); calls != wantCalls {
				t.Fatalf("%q round %d: %d upstream calls, want %d", id, round, calls, wantCalls)
			}
		}
	}
}

// Issue 36, point 6: twilio-go lists a conversation's participants (three
// pages of two) and a participant's conversations through the sidecar,
// twice: the second pass is answered from the cache, every page; an
// update between passes is seen by the next one.
func TestTwilioGoListsThroughTheProxy(t *testing.T) {
	for _, keepHost := range []bool{true, false} {
		h := newHarness(t)
		for i := range 5 {
			h.conv.AddParticipant(conv1, twiliofake.Participant{Sid: twiliofake.SID("MB", 500+i), Identity: fmt.Sprint("lister", i)})
		}
		via := twilioClient(acctA, tokenA, rewrite{hostOf(h.srv.URL), keepHost})
		list := func() []conversationsv1.ConversationsV1ConversationParticipant {
			t.Helper()
			got, err := via.ConversationsV1.ListConversationParticipant(conv1, (&conversationsv1.ListConversationParticipantParams{}).SetPageSize(2))
			if err != nil || len(got) != 6 {
				t.Fatalf("host kept %v: listed %d, %v; want 6", keepHost, len(got), err)
			}
			h.settle()
			return got
		}
		pages := func() int { return h.conv.Calls("GET", "/v1/Conversations/"+conv1+"/Participants") }
		first := list()
		if pages() != 3 {
			t.Fatalf("host kept %v: the first pass made %d upstream calls, want 3 (its pages)", keepHost, pages())
		}
		if second := list(); !reflect.DeepEqual(second, first) || pages() != 3 {
			t.Fatalf("host kept %v: the second pass made %d upstream calls in all, want 3 (every page a hit)", keepHost, pages())
		}
		params := (&conversationsv1.UpdateConversationParticipantParams{}).SetAttributes(`{"v":"listed"}`)
		if _, err := via.ConversationsV1.UpdateConversationParticipant(conv1, member1, params); err != nil {
			t.Fatal(err)
		}
		seen := false
		for _, p := range list() {
			seen = seen || p.Sid != nil && *p.Sid == member1 && p.Attributes != nil && *p.Attributes == `{"v":"listed"}`
		}
		if !seen || pages() != 6 {
			t.Fatalf("host kept %v: the pass after an update: seen %v, %d upstream calls in all, want 6", keepHost, seen, pages())
		}
		// A participant's conversations, twice: one upstream call.
		for range 2 {
			got, err := via.ConversationsV1.ListParticipantConversation((&conversationsv1.ListParticipantConversationParams{}).SetIdentity("alice@example.com"))
			if err != nil || len(got) != 1 || got[0].ConversationSid == nil || *got[0].ConversationSid != conv1 {
				t.Fatalf("host kept %v: alice's conversations: %+v %v", keepHost, got, err)
			}
			h.settle()
		}
		if n := h.conv.Calls("GET", "/v1/ParticipantConversations"); n != 1 {
			t.Fatalf("host kept %v: %d upstream calls for alice's conversations read twice, want 1", keepHost, n)
		}
	}
}
