// Package route knows Twilio's paths: which configured upstream a request
// goes to, which of its routes are cached, and which invalidation scopes a
// path (or a response body) names. It holds no HTTP state: the proxy, the
// purge endpoint and a webhook handler all call it with plain strings.
//
// Every route that is cached or names a scope is one row of Table; route
// names, metric labels and indexes derive from it (docs/architecture.md,
// "Routes").
package route

import (
	"fmt"
	"slices"
	"strings"
)

// Upstream is one of the Twilio APIs cacheproxy fronts.
type Upstream uint8

const (
	Conversations Upstream = iota // conversations.twilio.com (v1 and v2)
	Proxy                         // proxy.twilio.com
	NumUpstreams
)

// String is the upstream's name: its config key under [upstreams] and its
// metric label.
func (u Upstream) String() string {
	if u == Proxy {
		return "proxy"
	}
	return "conversations"
}

// Row is one route that is cached or names invalidation scopes.
type Row struct {
	// Name is a readable route's name in logs, metrics and
	// [cache.routes]: one for every GET path of the three specs. Rows
	// with none (write-only paths) are labelled "<upstream>.other".
	Name     string
	Upstream Upstream
	// Pattern is the path, with {kind} for a variable segment.
	Pattern string
	// Scopes are the variables of Pattern that are invalidation scopes
	// (at most two), in the order their tags are listed.
	Scopes []string
	// Cached: GET and HEAD of this route are answered from the cache (by
	// default: [cache.routes."<name>"] ttl = "0s" turns it off).
	Cached bool
	// OnRequest: GET and HEAD of this route are cached only when
	// [cache.routes."<name>"] gives it a ttl. Its reads carry the scopes
	// of every resource their path names (TreeTags).
	OnRequest bool
	// Resource: a write creates, updates or deletes a conversation or
	// session itself, whose response's sid and unique_name name further
	// scopes (see BodyTags).
	Resource bool
	// Identity is a variable that may hold a Conversations user's identity
	// instead of a SID: reads by identity carry its identity scope, and a
	// write invalidates it.
	Identity string
	// User: the row is a user itself. A write to a user addressed by SID
	// does not say which identity it changes, so it invalidates every
	// identity's reads.
	User bool
	// Within are variables of Pattern naming what the route is under (a
	// service): its reads carry their scopes, so a write to that resource
	// invalidates them, but a write to this route does not invalidate
	// them (adding a participant does not change its service).
	Within []string
	// List: the route is a list of participants or of a participant's
	// conversations; each page is an entry (ListTags).
	List ListKind
	// Joins: a write here may add a participant or change its identity or
	// address (Conversations v1); its form names them (FormTags).
	Joins bool
}

// ListKind says what a list route lists.
type ListKind uint8

const (
	NotAList ListKind = iota
	// Participants: a conversation's or session's participants. Its pages
	// carry the members scope of the conversation or session (the first
	// of Scopes), which participant events name.
	Participants
	// ParticipantConversations: the conversations of the participant its
	// query names (Identity, Address). Its pages carry the identity or
	// address scope the query names, and the scopes of every conversation
	// and participant they list (ListTags).
	ParticipantConversations
)

// Scope kinds.
const (
	kindConv = "conv"
	kindSvc  = "svc"
	kindSess = "sess"
	// kindIdentity scopes reads to the Conversations user they name.
	kindIdentity = "identity"
	// kindParticipant scopes an entry to the participant its body is.
	kindParticipant = "participant"
	// kindAddress scopes reads to the messaging address they name (a
	// participant's phone number or channel address).
	kindAddress = "address"
	// kindMembers scopes a conversation's or session's participant lists.
	kindMembers = "members"
)

// Table lists every route cacheproxy treats specially; anything else under
// a configured upstream passes through as "<upstream>.other" and names no
// scope. Adding a cached route is one row here (and its test).
var Table = []Row{
	// The cached participant reads.
	{Name: "conversations.v1.participant", Upstream: Conversations, Cached: true,
		Pattern: "/v1/Conversations/{conv}/Participants/{participant}", Scopes: []string{kindConv}, Identity: "participant", Joins: true},
	{Name: "conversations.v1.service_participant", Upstream: Conversations, Cached: true,
		Pattern: "/v1/Services/{svc}/Conversations/{conv}/Participants/{participant}", Scopes: []string{kindConv, kindSvc}, Identity: "participant", Joins: true},
	{Name: "conversations.v2.participant", Upstream: Conversations, Cached: true,
		Pattern: "/v2/Conversations/{conv}/Participants/{participant}", Scopes: []string{kindConv}},
	{Name: "proxy.v1.participant", Upstream: Proxy, Cached: true,
		Pattern: "/v1/Services/{svc}/Sessions/{sess}/Participants/{participant}", Scopes: []string{kindSess, kindSvc}},

	// The cached participant lists (a write to one creates a participant).
	{Name: "conversations.v1.participants", Upstream: Conversations, Cached: true, List: Participants,
		Pattern: "/v1/Conversations/{conv}/Participants", Scopes: []string{kindConv}, Joins: true},
	{Name: "conversations.v1.service_participants", Upstream: Conversations, Cached: true, List: Participants,
		Pattern: "/v1/Services/{svc}/Conversations/{conv}/Participants", Scopes: []string{kindConv}, Within: []string{kindSvc}, Joins: true},
	{Name: "conversations.v2.participants", Upstream: Conversations, Cached: true, List: Participants,
		Pattern: "/v2/Conversations/{conv}/Participants", Scopes: []string{kindConv}},
	{Name: "proxy.v1.participants", Upstream: Proxy, Cached: true, List: Participants,
		Pattern: "/v1/Services/{svc}/Sessions/{sess}/Participants", Scopes: []string{kindSess}, Within: []string{kindSvc}},
	{Name: "conversations.v1.participant_conversations", Upstream: Conversations, Cached: true, List: ParticipantConversations,
		Pattern: "/v1/ParticipantConversations"},
	{Name: "conversations.v1.service_participant_conversations", Upstream: Conversations, Cached: true, List: ParticipantConversations,
		Pattern: "/v1/Services/{svc}/ParticipantConversations", Within: []string{kindSvc}},

	// Writes to these invalidate the scopes they name.
	{Name: "conversations.v1.service", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}", Scopes: []string{kindSvc}},
	{Name: "conversations.v1.conversations", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Conversations", Resource: true},
	{Upstream: Conversations, Pattern: "/v1/ConversationWithParticipants", Resource: true, Joins: true},
	{Name: "conversations.v1.service_conversations", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Conversations", Resource: true},
	{Upstream: Conversations, Pattern: "/v1/Services/{svc}/ConversationWithParticipants", Resource: true, Joins: true},
	{Name: "conversations.v1.conversation", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Conversations/{conv}", Scopes: []string{kindConv}, Resource: true},
	{Name: "conversations.v1.service_conversation", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Conversations/{conv}", Scopes: []string{kindConv}, Resource: true},
	{Name: "conversations.v1.user_conversation", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Users/{user}/Conversations/{conv}", Scopes: []string{kindConv}},
	{Name: "conversations.v1.service_user_conversation", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Users/{user}/Conversations/{conv}", Scopes: []string{kindConv}},
	{Name: "conversations.v1.user", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Users/{user}", Identity: "user", User: true},
	{Name: "conversations.v1.service_user", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Users/{user}", Identity: "user", User: true},
	{Name: "conversations.v2.conversations", OnRequest: true, Upstream: Conversations, Pattern: "/v2/Conversations", Resource: true},
	{Name: "conversations.v2.conversation", OnRequest: true, Upstream: Conversations, Pattern: "/v2/Conversations/{conv}", Scopes: []string{kindConv}, Resource: true},
	{Upstream: Conversations, Pattern: "/v2/Conversations/{conv}/Actions", Scopes: []string{kindConv}},
	{Name: "proxy.v1.service", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services/{svc}", Scopes: []string{kindSvc}},
	{Name: "proxy.v1.sessions", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services/{svc}/Sessions", Resource: true},
	{Name: "proxy.v1.session", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services/{svc}/Sessions/{sess}", Scopes: []string{kindSess}, Resource: true},

	// The other GETs of the three APIs: cached only when [cache.routes."<name>"]
	// gives one a ttl (docs/reads.md, "Any other read, on request").
	{Name: "conversations.v1.configuration", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Configuration"},
	{Name: "conversations.v1.configuration_addresses", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Configuration/Addresses"},
	{Name: "conversations.v1.configuration_address", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Configuration/Addresses/{v0}"},
	{Name: "conversations.v1.configuration_webhooks", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Configuration/Webhooks"},
	{Name: "conversations.v1.messages", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Conversations/{conv}/Messages", Within: []string{kindConv}},
	{Name: "conversations.v1.message_receipts", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Conversations/{conv}/Messages/{v0}/Receipts", Within: []string{kindConv}},
	{Name: "conversations.v1.message_receipt", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Conversations/{conv}/Messages/{v0}/Receipts/{v1}", Within: []string{kindConv}},
	{Name: "conversations.v1.message", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Conversations/{conv}/Messages/{v0}", Within: []string{kindConv}},
	{Name: "conversations.v1.webhooks", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Conversations/{conv}/Webhooks", Within: []string{kindConv}},
	{Name: "conversations.v1.webhook", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Conversations/{conv}/Webhooks/{v0}", Within: []string{kindConv}},
	{Name: "conversations.v1.credentials", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Credentials"},
	{Name: "conversations.v1.credential", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Credentials/{v0}"},
	{Name: "conversations.v1.roles", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Roles"},
	{Name: "conversations.v1.role", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Roles/{v0}"},
	{Name: "conversations.v1.services", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services"},
	{Name: "conversations.v1.service_bindings", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Bindings", Within: []string{kindSvc}},
	{Name: "conversations.v1.service_binding", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Bindings/{v0}", Within: []string{kindSvc}},
	{Name: "conversations.v1.service_configuration", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Configuration", Within: []string{kindSvc}},
	{Name: "conversations.v1.service_configuration_notifications", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Configuration/Notifications", Within: []string{kindSvc}},
	{Name: "conversations.v1.service_configuration_webhooks", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Configuration/Webhooks", Within: []string{kindSvc}},
	{Name: "conversations.v1.service_messages", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Conversations/{conv}/Messages", Within: []string{kindSvc, kindConv}},
	{Name: "conversations.v1.service_message_receipts", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Conversations/{conv}/Messages/{v0}/Receipts", Within: []string{kindSvc, kindConv}},
	{Name: "conversations.v1.service_message_receipt", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Conversations/{conv}/Messages/{v0}/Receipts/{v1}", Within: []string{kindSvc, kindConv}},
	{Name: "conversations.v1.service_message", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Conversations/{conv}/Messages/{v0}", Within: []string{kindSvc, kindConv}},
	{Name: "conversations.v1.service_webhooks", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Conversations/{conv}/Webhooks", Within: []string{kindSvc, kindConv}},
	{Name: "conversations.v1.service_webhook", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Conversations/{conv}/Webhooks/{v0}", Within: []string{kindSvc, kindConv}},
	{Name: "conversations.v1.service_roles", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Roles", Within: []string{kindSvc}},
	{Name: "conversations.v1.service_role", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Roles/{v0}", Within: []string{kindSvc}},
	{Name: "conversations.v1.service_users", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Users", Within: []string{kindSvc}},
	{Name: "conversations.v1.service_user_conversations", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Services/{svc}/Users/{v0}/Conversations", Within: []string{kindSvc}},
	{Name: "conversations.v1.users", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Users"},
	{Name: "conversations.v1.user_conversations", OnRequest: true, Upstream: Conversations, Pattern: "/v1/Users/{v0}/Conversations"},
	{Name: "conversations.v2.control_plane_configurations", OnRequest: true, Upstream: Conversations, Pattern: "/v2/ControlPlane/Configurations"},
	{Name: "conversations.v2.control_plane_configuration", OnRequest: true, Upstream: Conversations, Pattern: "/v2/ControlPlane/Configurations/{v0}"},
	{Name: "conversations.v2.control_plane_operation", OnRequest: true, Upstream: Conversations, Pattern: "/v2/ControlPlane/Operations/{v0}"},
	{Name: "conversations.v2.action", OnRequest: true, Upstream: Conversations, Pattern: "/v2/Conversations/{conv}/Actions/{v0}", Within: []string{kindConv}},
	{Name: "conversations.v2.communications", OnRequest: true, Upstream: Conversations, Pattern: "/v2/Conversations/{conv}/Communications", Within: []string{kindConv}},
	{Name: "conversations.v2.communication", OnRequest: true, Upstream: Conversations, Pattern: "/v2/Conversations/{conv}/Communications/{v0}", Within: []string{kindConv}},
	{Name: "proxy.v1.services", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services"},
	{Name: "proxy.v1.phone_numbers", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services/{svc}/PhoneNumbers", Within: []string{kindSvc}},
	{Name: "proxy.v1.phone_number", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services/{svc}/PhoneNumbers/{v0}", Within: []string{kindSvc}},
	{Name: "proxy.v1.interactions", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services/{svc}/Sessions/{sess}/Interactions", Within: []string{kindSvc, kindSess}},
	{Name: "proxy.v1.interaction", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services/{svc}/Sessions/{sess}/Interactions/{v0}", Within: []string{kindSvc, kindSess}},
	{Name: "proxy.v1.participant_message_interactions", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services/{svc}/Sessions/{sess}/Participants/{v0}/MessageInteractions", Within: []string{kindSvc, kindSess}},
	{Name: "proxy.v1.participant_message_interaction", OnRequest: true, Upstream: Proxy, Pattern: "/v1/Services/{svc}/Sessions/{sess}/Participants/{v0}/MessageInteractions/{v1}", Within: []string{kindSvc, kindSess}},
}

// maxScopes is how many scopes one path can name (Match keeps them inline).
const maxScopes = 2

// compiled is a Row split for matching: the literal segments to compare
// and where the scopes stand.
type compiled struct {
	row    *Row
	id     int   // label index
	lits   []lit // literal segments
	scopes [maxScopes]struct {
		kind   string
		pos    int
		within bool // Row.Within: read, not written
	}
	nscopes  int
	identity int // position of Row.Identity, or -1
}

type lit struct {
	pos  int
	text string
}

// rules is Table compiled: the rows of each upstream by segment count, so
// classify compares a path with one or two rows.
type rules struct {
	labels []string
	byLen  [NumUpstreams][maxSegments + 1][]compiled
}

var compiledTable = compile(Table)

// Labels are the route labels of logs and metrics, in index order: each
// cached row's name in Table order, then "<upstream>.other" for each
// upstream, then "unrouted".
func Labels() []string { return compiledTable.labels }

// Unrouted is the label index of a request that maps to no upstream.
func Unrouted() int { return len(compiledTable.labels) - 1 }

// OtherID is the label index of an upstream's pass-through routes.
func OtherID(up Upstream) int { return otherID(up) }

// otherID is the label index of an upstream's pass-through routes.
func otherID(up Upstream) int { return len(compiledTable.labels) - 1 - int(NumUpstreams) + int(up) }

// compile checks and indexes a table; a malformed row is a programming
// error caught by the package's tests.
func compile(table []Row) *rules {
	r := &rules{}
	for i := range table {
		if table[i].Name != "" {
			r.labels = append(r.labels, table[i].Name)
		}
	}
	ncached, cachedIDs := len(r.labels), 0
	for i := range table {
		row := &table[i]
		segs := strings.Split(strings.TrimPrefix(row.Pattern, "/"), "/")
		if malformed(row, segs) || slices.Contains(r.labels[:cachedIDs], row.Name) && row.Name != "" {
			panic(fmt.Sprintf("route: malformed row %+v", *row))
		}
		c := compiled{row: row, id: ncached + int(row.Upstream)} // "<upstream>.other"
		if row.Name != "" {
			c.id = cachedIDs
			cachedIDs++
		}
		vars := map[string]int{}
		for pos, s := range segs {
			if strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}") {
				vars[s[1:len(s)-1]] = pos
			} else {
				c.lits = append(c.lits, lit{pos, s})
			}
		}
		c.identity = -1
		if row.Identity != "" {
			pos, ok := vars[row.Identity]
			if !ok {
				panic(fmt.Sprintf("route: identity %q is not a variable of %s", row.Identity, row.Pattern))
			}
			c.identity = pos
		}
		for i, kind := range append(row.Scopes[:len(row.Scopes):len(row.Scopes)], row.Within...) {
			pos, ok := vars[kind]
			if !ok {
				panic(fmt.Sprintf("route: scope %q is not a variable of %s", kind, row.Pattern))
			}
			c.scopes[c.nscopes].kind, c.scopes[c.nscopes].pos, c.scopes[c.nscopes].within = kind, pos, i >= len(row.Scopes)
			c.nscopes++
		}
		for _, other := range r.byLen[row.Upstream][len(segs)] {
			if overlap(other, c, len(segs)) {
				panic(fmt.Sprintf("route: %s and %s overlap", other.row.Pattern, row.Pattern))
			}
		}
		r.byLen[row.Upstream][len(segs)] = append(r.byLen[row.Upstream][len(segs)], c)
	}
	for up := range NumUpstreams {
		r.labels = append(r.labels, up.String()+".other")
	}
	r.labels = append(r.labels, "unrouted")
	return r
}

// malformed reports a row that cannot be compiled as it is: a pattern
// that is no absolute path or too long, too many scopes, a name without
// caching or caching without a name, or a participant list of nothing.
func malformed(row *Row, segs []string) bool {
	return !strings.HasPrefix(row.Pattern, "/") || len(segs) > maxSegments || len(row.Scopes)+len(row.Within) > maxScopes ||
		(row.Cached || row.OnRequest) != (row.Name != "") || row.Cached && row.OnRequest || row.List == Participants && len(row.Scopes) == 0
}

// overlap reports two rows of n segments that some path matches both:
// at no position do both have different literals.
func overlap(a, b compiled, n int) bool {
	la, lb := make([]string, n), make([]string, n)
	for _, l := range a.lits {
		la[l.pos] = l.text
	}
	for _, l := range b.lits {
		lb[l.pos] = l.text
	}
	for i := range n {
		if la[i] != "" && lb[i] != "" && la[i] != lb[i] {
			return false
		}
	}
	return true
}

// classify fills m (a zero Match) with the row of a path's segments under
// an upstream; segs is nil for a path longer than any row.
func classify(m *Match, up Upstream, segs []string) {
	m.Upstream, m.id = up, otherID(up)
	if len(segs) > maxSegments {
		return
	}
rows:
	for i := range compiledTable.byLen[up][len(segs)] {
		c := &compiledTable.byLen[up][len(segs)][i]
		for _, l := range c.lits {
			if segs[l.pos] != l.text {
				continue rows
			}
		}
		m.row, m.id = c.row, c.id
		for _, s := range c.scopes[:c.nscopes] {
			m.scope(s.kind, unescape(segs[s.pos]), s.within)
		}
		if c.identity >= 0 {
			m.identity = unescape(segs[c.identity])
		}
		return
	}
}
