// Package twiliofake is a small stateful stand-in for Twilio's Conversations
// v1 and v2 and Proxy v1 APIs: it serves, updates and deletes participants,
// answers 401 and 404 the way Twilio does, counts calls, and lets a test
// add latency or take over a request. Other paths echo what they received.
package twiliofake

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// SID builds a Twilio-shaped SID: prefix plus 32 hex digits of n.
func SID(prefix string, n int) string { return fmt.Sprintf("%s%032x", prefix, n) }

// Participant is one stored participant, whichever API it belongs to.
type Participant struct {
	Sid        string // MB…, KP… or conv_participant_…
	Identity   string // Conversations v1 identity, Proxy identifier, v2 name
	Address    string // Conversations v1 messaging binding's address
	Attributes string
	Updated    int // bumped by every update
}

type conversation struct {
	uniqueName string
	service    string // IS… for v1, KS… for Proxy sessions
	parts      map[string]*Participant
}

// Fake is the upstream. Zero value is not usable: call New.
type Fake struct {
	// Accounts maps Basic-auth user to password. Requests with other
	// credentials get Twilio's 401.
	Accounts map[string]string
	// Latency is added to every request.
	Latency time.Duration
	// Before, if set, runs first for every request; returning true means it
	// wrote the response itself (to fail, hang, or rate-limit a request).
	Before func(w http.ResponseWriter, r *http.Request) bool
	// MaxInFlight, if > 0, is Twilio's concurrency limit: an account with
	// that many requests in flight gets 429 (20429) at once for another.
	// KeyOwner maps API key SIDs to the account they count against.
	MaxInFlight int
	KeyOwner    map[string]string
	// ConcurrencyHeader, while MaxInFlight is set, sends Twilio's
	// Twilio-Concurrent-Requests on every answer: the account's requests in
	// flight when this one arrived, this one and the others' included.
	ConcurrencyHeader bool

	mu       sync.Mutex
	inflight map[string]int // by account, while MaxInFlight > 0
	others   map[string]int // calls other clients of the account hold (SetOthers)
	peak     map[string]int
	tooMany  atomic.Int64
	convs    map[string]*conversation // by conversation or session id
	calls    map[string]int           // "METHOD path" -> count
	total    atomic.Int64
}

// New returns a fake with the given accounts and no data.
func New(accounts map[string]string) *Fake {
	return &Fake{Accounts: accounts, convs: map[string]*conversation{}, calls: map[string]int{}}
}

// AddConversation creates a conversation (v1 CH…, v2 conv_conversation_…)
// or Proxy session (KC…) under service (IS…/KS…, or "" for v1's default).
func (f *Fake) AddConversation(id, uniqueName, service string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.convs[id] = &conversation{uniqueName: uniqueName, service: service, parts: map[string]*Participant{}}
}

// AddParticipant adds a participant to an existing conversation or session.
func (f *Fake) AddParticipant(conv string, p Participant) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cp := p
	f.convs[conv].parts[p.Sid] = &cp
}

// SetAttributes changes a participant behind the proxy's back (a write
// made elsewhere).
func (f *Fake) SetAttributes(conv, sid, attrs string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.convs[conv].parts[sid]
	p.Attributes = attrs
	p.Updated++
}

// Calls returns how many requests reached the fake for method and path.
func (f *Fake) Calls(method, path string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[method+" "+path]
}

// Total returns how many requests reached the fake.
func (f *Fake) Total() int64 { return f.total.Load() }

// Error writes Twilio's JSON error body.
func Error(w http.ResponseWriter, status, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"code": code, "message": msg, "more_info": "https://www.twilio.com/docs/errors/" + strconv.Itoa(code), "status": status,
	})
}

// ServeHTTP serves the fake API.
func (f *Fake) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.total.Add(1)
	f.mu.Lock()
	f.calls[r.Method+" "+r.URL.Path]++
	f.mu.Unlock()
	if f.MaxInFlight > 0 {
		acct, n, ok := f.enter(r)
		if f.ConcurrencyHeader {
			w.Header().Set("Twilio-Concurrent-Requests", strconv.Itoa(n))
			w.Header().Set("Twilio-Request-Duration", "0.1")
		}
		if !ok {
			f.tooMany.Add(1)
			Error(w, http.StatusTooManyRequests, 20429, "Too many requests")
			return
		}
		defer f.leave(acct)
	}
	if f.Before != nil && f.Before(w, r) {
		return
	}
	if f.Latency > 0 {
		select {
		case <-time.After(f.Latency):
		case <-r.Context().Done():
			return
		}
	}
	user, pass, ok := r.BasicAuth()
	if want, known := f.Accounts[user]; !ok || !known || want != pass {
		w.Header().Set("WWW-Authenticate", `Basic realm="Twilio API"`)
		Error(w, http.StatusUnauthorized, 20003, "Authenticate")
		return
	}
	account := user // an API key's resources belong to its account
	if owner, ok := f.KeyOwner[user]; ok {
		account = owner
	}
	w.Header().Set("Twilio-Request-Id", "RQ"+strconv.FormatInt(f.total.Load(), 16))
	// Split as sent, then decode each segment: an escaped "/" is part of
	// an identity, as on Twilio.
	s := strings.Split(strings.TrimPrefix(r.URL.EscapedPath(), "/"), "/")
	for i, seg := range s {
		if u, err := url.PathUnescape(seg); err == nil {
			s[i] = u
		}
	}
	switch {
	case len(s) >= 4 && s[0] == "v1" && s[1] == "Conversations" && s[3] == "Participants":
		f.participant(w, r, account, "", s[2], s[4:], v1JSON)
	case len(s) >= 6 && s[0] == "v1" && s[1] == "Services" && s[3] == "Conversations" && s[5] == "Participants":
		f.participant(w, r, account, s[2], s[4], s[6:], v1JSON)
	case len(s) >= 6 && s[0] == "v1" && s[1] == "Services" && s[3] == "Sessions" && s[5] == "Participants":
		f.participant(w, r, account, s[2], s[4], s[6:], proxyJSON)
	case len(s) >= 4 && s[0] == "v2" && s[1] == "Conversations" && s[3] == "Participants":
		f.participant(w, r, account, "", s[2], s[4:], v2JSON)
	case len(s) == 2 && s[0] == "v1" && s[1] == "ParticipantConversations" && r.Method == http.MethodGet:
		f.participantConversations(w, r, account, "")
	case len(s) == 4 && s[0] == "v1" && s[1] == "Services" && s[3] == "ParticipantConversations" && r.Method == http.MethodGet:
		f.participantConversations(w, r, account, s[2])
	case len(s) == 3 && s[0] == "v1" && s[1] == "Conversations" && r.Method == http.MethodDelete:
		f.mu.Lock()
		delete(f.convs, f.resolveConv(s[2]))
		f.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	default:
		f.echo(w, r)
	}
}

// resolveConv maps a unique name to its id; callers hold f.mu.
func (f *Fake) resolveConv(id string) string {
	if _, ok := f.convs[id]; ok {
		return id
	}
	for cid, c := range f.convs {
		if c.uniqueName != "" && c.uniqueName == id {
			return cid
		}
	}
	return id
}

type render func(account, service, conv string, p *Participant, url string) any

func (f *Fake) participant(w http.ResponseWriter, r *http.Request, account, service, convID string, rest []string, view render) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cid := f.resolveConv(convID)
	c, ok := f.convs[cid]
	if !ok || (service != "" && c.service != "" && c.service != service) || len(rest) > 1 {
		f.notFound(w, r)
		return
	}
	var p *Participant
	if len(rest) == 1 {
		p = c.parts[rest[0]] // by SID; else by identity
		for _, q := range c.parts {
			if p != nil {
				break
			}
			if q.Identity != "" && q.Identity == rest[0] {
				p = q
			}
		}
	}
	switch {
	case len(rest) == 0 && r.Method == http.MethodPost:
		if err := r.ParseForm(); err != nil {
			Error(w, http.StatusBadRequest, 20001, "bad form")
			return
		}
		p = &Participant{Sid: SID("MB", len(c.parts)+1000), Identity: r.PostForm.Get("Identity"), Attributes: r.PostForm.Get("Attributes"),
			Address: r.PostForm.Get("MessagingBinding.Address")}
		c.parts[p.Sid] = p
		writeJSON(w, http.StatusCreated, view(account, service, cid, p, r.URL.Path+"/"+p.Sid))
	case len(rest) == 0 && r.Method == http.MethodGet:
		sids := make([]string, 0, len(c.parts))
		for sid := range c.parts {
			sids = append(sids, sid)
		}
		slices.Sort(sids)
		host := "conversations.twilio.com"
		if strings.HasPrefix(cid, "KC") {
			host = "proxy.twilio.com"
		}
		page(w, r, host, "participants", len(sids), func(i int) any {
			return view(account, service, cid, c.parts[sids[i]], r.URL.Path+"/"+sids[i])
		})
	case p == nil:
		f.notFound(w, r)
	case r.Method == http.MethodGet:
		writeJSON(w, http.StatusOK, view(account, service, cid, p, r.URL.Path))
	case r.Method == http.MethodPost || r.Method == http.MethodPut:
		attrs, err := readAttributes(r)
		if err != nil {
			Error(w, http.StatusBadRequest, 20001, err.Error())
			return
		}
		p.Attributes = attrs
		if id := r.PostForm.Get("Identity"); id != "" {
			p.Identity = id
		}
		p.Updated++
		writeJSON(w, http.StatusOK, view(account, service, cid, p, r.URL.Path))
	case r.Method == http.MethodDelete:
		delete(c.parts, p.Sid)
		w.WriteHeader(http.StatusNoContent)
	default:
		Error(w, http.StatusMethodNotAllowed, 20004, "Method not allowed")
	}
}

// page answers one page of a list of n items as Twilio does: PageSize
// (default 50) and Page (from 0), and a meta whose page URLs are
// absolute, on Twilio's public host whatever host the request came to,
// with the list's other parameters kept.
func page(w http.ResponseWriter, r *http.Request, host, key string, n int, item func(int) any) {
	q := r.URL.Query()
	size, _ := strconv.Atoi(q.Get("PageSize"))
	if size <= 0 {
		size = 50
	}
	pg, _ := strconv.Atoi(q.Get("Page"))
	items := []any{}
	for i := min(pg*size, n); i < min((pg+1)*size, n); i++ {
		items = append(items, item(i))
	}
	q.Del("PageSize")
	q.Del("Page")
	q.Del("PageToken")
	others := q.Encode() // Twilio's order: the list's own parameters, then the page's
	if others != "" {
		others += "&"
	}
	at := func(k int) string {
		return fmt.Sprintf("https://%s%s?%sPageSize=%d&Page=%d", host, r.URL.Path, others, size, k)
	}
	meta := map[string]any{"page": pg, "page_size": size, "first_page_url": at(0), "url": at(pg),
		"previous_page_url": nil, "next_page_url": nil, "key": key}
	if pg > 0 {
		meta["previous_page_url"] = at(pg - 1)
	}
	if (pg+1)*size < n {
		meta["next_page_url"] = at(pg + 1)
	}
	writeJSON(w, http.StatusOK, map[string]any{key: items, "meta": meta})
}

// participantConversations lists the v1 conversations (under service,
// or any) that have a participant with the Identity or Address the query
// names, in conversation order.
func (f *Fake) participantConversations(w http.ResponseWriter, r *http.Request, account, service string) {
	identity, address := r.URL.Query().Get("Identity"), r.URL.Query().Get("Address")
	if identity == "" && address == "" {
		Error(w, http.StatusBadRequest, 20001, "Identity or Address is required")
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	type found struct {
		cid string
		c   *conversation
		p   *Participant
	}
	var items []found
	for cid, c := range f.convs {
		if !strings.HasPrefix(cid, "CH") || service != "" && c.service != service {
			continue
		}
		for _, p := range c.parts {
			if identity != "" && p.Identity == identity || address != "" && p.Address == address {
				items = append(items, found{cid, c, p})
			}
		}
	}
	slices.SortFunc(items, func(a, b found) int { return strings.Compare(a.cid+a.p.Sid, b.cid+b.p.Sid) })
	page(w, r, "conversations.twilio.com", "conversations", len(items), func(i int) any {
		it := items[i]
		var binding any
		if it.p.Address != "" {
			binding = map[string]any{"type": "sms", "address": it.p.Address}
		}
		return map[string]any{"account_sid": account, "chat_service_sid": it.c.service, "participant_sid": it.p.Sid,
			"participant_identity": it.p.Identity, "participant_messaging_binding": binding, "conversation_sid": it.cid,
			"conversation_unique_name": it.c.uniqueName, "conversation_state": "active"}
	})
}

// readAttributes takes Attributes from a form (v1, Proxy) or "name" from
// JSON (v2).
func readAttributes(r *http.Request) (string, error) {
	if strings.Contains(r.Header.Get("Content-Type"), "json") {
		var body struct {
			Name string `json:"name"`
		}
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&body); err != nil {
			return "", fmt.Errorf("bad JSON: %w", err)
		}
		return body.Name, nil
	}
	if err := r.ParseForm(); err != nil {
		return "", err
	}
	return r.PostForm.Get("Attributes"), nil
}

func (f *Fake) notFound(w http.ResponseWriter, r *http.Request) {
	Error(w, http.StatusNotFound, 20404, "The requested resource "+r.URL.Path+" was not found")
}

// echo answers any other path with what it received (never the credentials).
func (f *Fake) echo(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	hdr := map[string]string{}
	for k := range r.Header {
		if k != "Authorization" {
			hdr[k] = r.Header.Get(k)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"method": r.Method, "path": r.URL.Path, "query": r.URL.RawQuery, "host": r.Host,
		"headers": hdr, "body_bytes": len(body),
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

const stamp = "2026-01-01T00:00:00Z"

func v1JSON(account, service, conv string, p *Participant, url string) any {
	m := map[string]any{
		"account_sid": account, "conversation_sid": conv, "sid": p.Sid, "identity": p.Identity,
		"attributes": p.Attributes, "messaging_binding": binding(p), "role_sid": nil,
		"date_created": stamp, "date_updated": stamp, "url": "https://conversations.twilio.com" + url,
		"last_read_message_index": p.Updated, "last_read_timestamp": nil,
	}
	if service != "" {
		m["chat_service_sid"] = service
	}
	return m
}

// binding is a v1 participant's messaging binding (nil: chat only).
func binding(p *Participant) any {
	if p.Address == "" {
		return nil
	}
	return map[string]any{"type": "sms", "address": p.Address, "proxy_address": "+15005550006"}
}

func proxyJSON(account, service, sess string, p *Participant, url string) any {
	return map[string]any{
		"sid": p.Sid, "session_sid": sess, "service_sid": service, "account_sid": account,
		"friendly_name": p.Attributes, "identifier": p.Identity, "proxy_identifier": "+15005550006",
		"proxy_identifier_sid": SID("PN", 1), "date_deleted": nil, "date_created": stamp, "date_updated": stamp,
		"url": "https://proxy.twilio.com" + url, "links": map[string]string{},
	}
}

func v2JSON(account, _ string, conv string, p *Participant, _ string) any {
	return map[string]any{
		"id": p.Sid, "conversationId": conv, "accountId": account, "name": p.Attributes,
		"type": "CUSTOMER", "addresses": []any{}, "createdAt": stamp, "updatedAt": stamp,
	}
}

// Seeded returns a fake with one account and n participants in one
// conversation of each API: Conversations v1 (CH…1, MB…0 … MB…n-1), Proxy
// (service KS…1, session KC…1, KP…i) and Conversations v2
// (conv_conversation_1, conv_participant_i). Demo mode and the benchmarks
// use it.
func Seeded(account, token string, n int) *Fake {
	f := New(map[string]string{account: token})
	conv, sess, v2 := SID("CH", 1), SID("KC", 1), "conv_conversation_1"
	f.AddConversation(conv, "", "")
	f.AddConversation(sess, "", SID("KS", 1))
	f.AddConversation(v2, "", "")
	for i := range n {
		f.AddParticipant(conv, Participant{Sid: SID("MB", i), Identity: fmt.Sprint("user", i), Attributes: "{}"})
		f.AddParticipant(sess, Participant{Sid: SID("KP", i), Identity: fmt.Sprintf("+1500555%04d", i%10000)})
		f.AddParticipant(v2, Participant{Sid: fmt.Sprintf("conv_participant_%d", i), Attributes: "name"})
	}
	return f
}

// SeededPaths lists the read paths of the participants Seeded made.
func SeededPaths(n int) []string {
	out := make([]string, 0, 3*n)
	for i := range n {
		out = append(out,
			"/v1/Conversations/"+SID("CH", 1)+"/Participants/"+SID("MB", i),
			"/v1/Services/"+SID("KS", 1)+"/Sessions/"+SID("KC", 1)+"/Participants/"+SID("KP", i),
			fmt.Sprintf("/v2/Conversations/conv_conversation_1/Participants/conv_participant_%d", i))
	}
	return out
}

// enter counts a request against its account's concurrency limit (the
// other clients' calls included); false if the account is at MaxInFlight.
// n is the account's requests in flight with this one.
func (f *Fake) enter(r *http.Request) (acct string, n int, ok bool) {
	acct, _, _ = r.BasicAuth()
	if owner, ok := f.KeyOwner[acct]; ok {
		acct = owner
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.inflight == nil {
		f.inflight, f.peak = map[string]int{}, map[string]int{}
	}
	n = f.inflight[acct] + f.others[acct] + 1
	if n > f.MaxInFlight {
		return acct, n, false
	}
	f.inflight[acct]++
	f.peak[acct] = max(f.peak[acct], f.inflight[acct])
	return acct, n, true
}

// SetOthers makes n of account's MaxInFlight taken by its other clients
// (another app, a cron job) from now on.
func (f *Fake) SetOthers(account string, n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.others == nil {
		f.others = map[string]int{}
	}
	f.others[account] = n
}

func (f *Fake) leave(acct string) {
	f.mu.Lock()
	f.inflight[acct]--
	f.mu.Unlock()
}

// Peak is the most requests account (or its keys) had in flight at once,
// while MaxInFlight is set.
func (f *Fake) Peak(account string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.peak[account]
}

// TooMany counts the 429s of MaxInFlight.
func (f *Fake) TooMany() int64 { return f.tooMany.Load() }
