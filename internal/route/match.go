package route

import (
	"encoding/json"
	"strings"
)

// Match is where one request goes and what it means for the cache. It is a
// value with its scopes inline, so routing a cache hit allocates nothing.
type Match struct {
	Upstream Upstream
	// Path is the request's path as it is sent upstream: escaped,
	// normalised, with any /proxy or /conversations prefix removed. Cache
	// keys and purge use it; scope ids are decoded.
	Path string
	// Replaced: the request came to the sidecar's own host (the client
	// replaced its base URL), not with a Twilio Host kept; Base is the
	// path prefix it used then ("/conversations", "/proxy" or "").
	Replaced bool
	Base     string

	row  *Row // nil: a pass-through route that names no scope
	id   int  // index in Labels
	ids  [maxScopes][2]string
	nids int
	// within: ids[i] is a Row.Within scope (read, not written).
	within [maxScopes]bool
	// identity is the segment of Row.Identity (decoded): a user's identity,
	// or a SID.
	identity string
}

// Unescaped is Path decoded (url.URL.Path to Path's url.URL.RawPath).
func (m *Match) Unescaped() string { return unescape(m.Path) }

// ID is the route's index in Labels.
func (m *Match) ID() int { return m.id }

// Name is the route's label in logs and metrics.
func (m *Match) Name() string { return compiledTable.labels[m.id] }

// Cacheable reports a cached route (for GET and HEAD).
func (m *Match) Cacheable() bool { return m.row != nil && m.row.Cached }

// Resource reports a route whose writes create, update or delete a
// conversation or session itself.
func (m *Match) Resource() bool { return m.row != nil && m.row.Resource }

func (m *Match) scope(kind, id string, within bool) {
	m.ids[m.nids] = [2]string{kind, id}
	m.within[m.nids] = within
	m.nids++
}

// List says what the route lists (NotAList for a fetch or a write).
func (m *Match) List() ListKind {
	if m.row == nil {
		return NotAList
	}
	return m.row.List
}

// ReadTags are the scopes a read's entry belongs to: its path (for purge),
// the ids in its path, and a wildcard per kind.
func (m *Match) ReadTags() []string {
	out := make([]string, 0, 2*m.nids+3)
	out = append(out, PathTag(m.Upstream, m.Path))
	for _, kv := range m.ids[:m.nids] {
		out = append(out, ScopeTag(m.Upstream, kv[0], kv[1]), ScopeTag(m.Upstream, kv[0], "*"))
	}
	if m.identity != "" && !SIDLike(m.identity) {
		out = append(out, ScopeTag(m.Upstream, kindIdentity, m.identity), ScopeTag(m.Upstream, kindIdentity, "*"))
	}
	if m.row != nil && m.row.List == Participants {
		out = append(out, ScopeTag(m.Upstream, kindMembers, m.ids[0][1]))
	}
	if m.OnRequest() {
		out = append(out, m.treeReadTags()...)
	}
	return out
}

// WriteTags are the scopes a write invalidates: the ids in its path, plus
// the kind's wildcard when an id is not a SID (a unique name may name what
// entries know only by SID).
func (m *Match) WriteTags() []string {
	var out []string
	for i, kv := range m.ids[:m.nids] {
		if m.within[i] {
			continue
		}
		out = append(out, ScopeTag(m.Upstream, kv[0], kv[1]))
		if !SIDLike(kv[1]) {
			out = append(out, ScopeTag(m.Upstream, kv[0], "*"))
		}
	}
	switch {
	case m.identity == "":
	case !SIDLike(m.identity):
		out = append(out, ScopeTag(m.Upstream, kindIdentity, m.identity))
	case m.row.User:
		// A user addressed by SID: which identity changed is unknown here
		// (a 200's body names it; a delete's 204 does not).
		out = append(out, ScopeTag(m.Upstream, kindIdentity, "*"))
	}
	return out
}

// ScopeTag is the tag of one scope: "<upstream>|<kind>:<id>".
func ScopeTag(up Upstream, kind, id string) string { return up.String() + "|" + kind + ":" + id }

// PathTag is the scope of one cached path, for every credential and query.
func PathTag(up Upstream, path string) string { return string(AppendPathTag(nil, up, path)) }

// AppendPathTag appends PathTag(up, path) to b.
func AppendPathTag(b []byte, up Upstream, path string) []byte {
	b = append(b, up.String()...)
	b = append(b, "|path:"...)
	return append(b, path...)
}

// ConversationTag and SessionTag are the scopes purge and webhooks name.
func ConversationTag(id string) string { return ScopeTag(Conversations, kindConv, id) }

// SessionTag is a Proxy session's scope.
func SessionTag(id string) string { return ScopeTag(Proxy, kindSess, id) }

// SIDLike reports an id Twilio assigned (two capital letters and 32 hex
// digits, or a v2 conv_… id) rather than a unique name.
func SIDLike(id string) bool {
	if strings.HasPrefix(id, "conv_") {
		return true
	}
	if len(id) != 34 || id[0] < 'A' || id[0] > 'Z' || id[1] < 'A' || id[1] > 'Z' {
		return false
	}
	for i := 2; i < 34; i++ {
		c := id[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// EntryBodyTags are the scopes a cached response's body adds to its entry:
// BodyTags, the identity wildcard when it names an identity (a write to a
// user addressed by SID invalidates every identity's reads), and for a
// Conversations participant its own scope (ParticipantTag), whatever path
// it was read by (SID or identity, conversation SID or unique name,
// service form or not).
func EntryBodyTags(up Upstream, b *BodyIDs) []string {
	out := BodyTags(up, b, false)
	if up == Conversations {
		if b.Identity != "" {
			out = append(out, ScopeTag(up, kindIdentity, "*"))
		}
		for _, id := range []string{b.Sid, b.ID} {
			if id != "" {
				out = append(out, ParticipantTag(id))
			}
		}
	}
	return out
}

// ParticipantTag is one Conversations participant's scope (v1 MB… SID or
// v2 conv_participant_… id), which webhooks name.
func ParticipantTag(id string) string { return ScopeTag(Conversations, kindParticipant, id) }

// IdentityTag is the scope of the reads that name a Conversations identity.
func IdentityTag(identity string) string { return ScopeTag(Conversations, kindIdentity, identity) }

// BodyIDs are the fields of Twilio resources that name scopes.
type BodyIDs struct {
	Sid             string `json:"sid"`
	ID              string `json:"id"`
	UniqueName      string `json:"unique_name"`
	ConversationSid string `json:"conversation_sid"`
	ConversationID  string `json:"conversationId"`
	ChatServiceSid  string `json:"chat_service_sid"`
	SessionSid      string `json:"session_sid"`
	ServiceSid      string `json:"service_sid"`
	Identity        string `json:"identity"`
	// MessagingBinding is a v1 participant's channel: its address names
	// the ParticipantConversations pages read by address.
	MessagingBinding json.RawMessage `json:"messaging_binding"`
}

// bindingAddress is a messaging binding's address ("" if it has none or
// is not an object).
func bindingAddress(raw json.RawMessage) string {
	var b struct {
		Address string `json:"address"`
	}
	if len(raw) == 0 || json.Unmarshal(raw, &b) != nil {
		return ""
	}
	return b.Address
}

// BodyTags returns the scopes named inside a JSON response of upstream up:
// the conversation or session a participant belongs to, and for writes to a
// conversation or session resource, its sid and unique name (a client may
// address it by either).
func BodyTags(up Upstream, b *BodyIDs, resource bool) []string {
	var out []string
	add := func(kind, id string) {
		if id != "" {
			out = append(out, ScopeTag(up, kind, id))
		}
	}
	if up == Conversations {
		add(kindConv, b.ConversationSid)
		add(kindConv, b.ConversationID)
		add(kindSvc, b.ChatServiceSid)
		add(kindIdentity, b.Identity) // a participant's or user's identity
		add(kindAddress, bindingAddress(b.MessagingBinding))
	} else {
		add(kindSess, b.SessionSid)
		add(kindSvc, b.ServiceSid)
	}
	if resource {
		kind := kindConv
		if up == Proxy {
			kind = kindSess
		}
		add(kind, b.Sid)
		add(kind, b.ID)
		add(kind, b.UniqueName)
	}
	return out
}
