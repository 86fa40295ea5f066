package route

import (
	"encoding/json"
	"net/url"
	"slices"
	"strings"
)

// NormalQuery is a cached read's query as its key holds it: its
// parameters sorted by name (each name's values in the order given), so
// that ?PageSize=2&Identity=a and ?Identity=a&PageSize=2 are one entry.
// Every parameter stays part of it, known to Twilio's spec or not; a
// query that does not parse is kept as it came.
func NormalQuery(raw string) string {
	if raw == "" || !strings.Contains(raw, "&") {
		return raw
	}
	v, err := url.ParseQuery(raw)
	if err != nil {
		return raw
	}
	return v.Encode()
}

// MembersTag is the scope of a conversation's or session's participant
// lists, which participant events name.
func MembersTag(up Upstream, id string) string { return ScopeTag(up, kindMembers, id) }

// AddressTag is the scope of the reads that name a messaging address.
func AddressTag(address string) string { return ScopeTag(Conversations, kindAddress, address) }

// pcItem is what a ParticipantConversations page says of each item.
type pcItem struct {
	ConversationSid  string          `json:"conversation_sid"`
	ChatServiceSid   string          `json:"chat_service_sid"`
	ParticipantSid   string          `json:"participant_sid"`
	Identity         string          `json:"participant_identity"`
	MessagingBinding json.RawMessage `json:"participant_messaging_binding"`
}

// ListTags are the scopes a list page adds to its entry beyond ReadTags,
// from the query that asked for it and the page's body. A
// ParticipantConversations page carries the identity (with the identity
// wildcard) or address its query names (with the address wildcard), and
// the scopes of every conversation, service, participant, identity and
// address it lists: a write to any of them may change the page. A
// participant list needs nothing more: its path names its conversation or
// session (ReadTags), and its members scope is among ReadTags.
func (m *Match) ListTags(query url.Values, body []byte) []string {
	if m.List() != ParticipantConversations {
		return nil
	}
	var out []string
	if id := query.Get("Identity"); id != "" {
		out = append(out, IdentityTag(id), IdentityTag("*"))
	}
	if a := query.Get("Address"); a != "" {
		out = append(out, AddressTag(a), AddressTag("*"))
	}
	var page struct {
		Conversations []pcItem `json:"conversations"`
	}
	if json.Unmarshal(body, &page) != nil {
		return out
	}
	for _, it := range page.Conversations {
		for kind, id := range map[string]string{kindConv: it.ConversationSid, kindSvc: it.ChatServiceSid,
			kindParticipant: it.ParticipantSid, kindIdentity: it.Identity, kindAddress: bindingAddress(it.MessagingBinding)} {
			if id != "" {
				out = append(out, ScopeTag(Conversations, kind, id))
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Joins reports a route whose writes may add a participant or change its
// identity or address (Row.Joins): their form names scopes (FormTags).
func (m *Match) Joins() bool { return m.row != nil && m.row.Joins }

// FormTags are the scopes a write's form names beyond its path: the
// identity (Identity) and address (MessagingBinding.Address) of a
// participant it adds or changes, and those of each participant a
// conversation is created with (Participant, JSON). A write whose form
// could not be read (unread: too large, not a form) names every
// identity's and every address's reads. Only writes that may add a
// participant or change its identity or address (Row.Joins) name any.
func (m *Match) FormTags(form url.Values, unread bool) []string {
	if !m.Joins() {
		return nil
	}
	if unread {
		return []string{IdentityTag("*"), AddressTag("*")}
	}
	var out []string
	add := func(identity, address string) {
		if identity != "" {
			out = append(out, IdentityTag(identity))
		}
		if address != "" {
			out = append(out, AddressTag(address))
		}
	}
	add(form.Get("Identity"), form.Get("MessagingBinding.Address"))
	for _, p := range form["Participant"] {
		var v BodyIDs
		if json.Unmarshal([]byte(p), &v) != nil {
			return []string{IdentityTag("*"), AddressTag("*")}
		}
		add(v.Identity, bindingAddress(v.MessagingBinding))
	}
	return out
}
