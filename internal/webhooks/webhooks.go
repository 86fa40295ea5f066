// Package webhooks listens to Twilio's own events (docs/webhooks.md) and
// invalidates what they change: writes made anywhere else than through
// cacheproxy (the Console, the Conversations SDKs, Studio, another
// backend, Twilio itself).
//
//   - POST /webhooks/conversations: Conversations v1 post-event webhooks
//     (form-encoded, EventType onParticipantUpdated and friends).
//   - POST /webhooks/events: an Event Streams webhook sink (a JSON array of
//     CloudEvents, com.twilio.conversations.participant.updated and
//     friends; at least once, in any order).
//   - POST /webhooks/orchestrator: Conversations v2 status callbacks
//     (JSON, PARTICIPANT_UPDATED and friends).
//
// Only Twilio can invalidate: every request must carry a valid
// X-Twilio-Signature, checked (signature.go) against
// the public URL Twilio called and each configured auth token. Invalidation
// is idempotent, so duplicate and out-of-order deliveries are harmless;
// pre-event webhooks (onParticipantUpdate …) change nothing yet and
// invalidate nothing.
package webhooks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"cacheproxy/internal/clock"
	"cacheproxy/internal/route"
	"cacheproxy/internal/twilioerr"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/twilio/twilio-go/client"
)

// MaxBodyBytes bounds a JSON webhook's body (Event Streams batches);
// MaxFormBytes a form's (Conversations webhooks are small); MaxReadingBytes
// the bodies being read at once across requests: past it, a delivery gets
// 503 with Retry-After (Twilio retries), so a flood of slow bodies costs
// at most that much memory.
const (
	MaxBodyBytes    = 1 << 20
	MaxFormBytes    = 64 << 10
	MaxReadingBytes = 32 << 20
)

// retryAfter is the Retry-After of a 503: a delivery that could not be
// applied is retried by Twilio (Event Streams drops one answered with a
// 4xx other than 429).
const retryAfter = "5"

// Invalidator is what an event invalidates through (the proxy's, fleet-wide
// when Redis is configured).
type Invalidator interface {
	Invalidate(ctx context.Context, tags []string) uint64
}

// Confirmer is an Invalidator that can tell whether an invalidation reached
// the whole fleet (fleet.Invalidator): a delivery whose invalidation it
// could not confirm gets 503, and Twilio delivers it again.
type Confirmer interface {
	InvalidateConfirmed(ctx context.Context, tags []string) (uint64, error)
}

// Config sets up the handler.
type Config struct {
	// PublicURL is the base URL Twilio calls, as Twilio signs it.
	PublicURL string
	// AuthTokens may have signed a request.
	AuthTokens []string
	// ForwardTo, if set, is the app's own webhook base URL.
	ForwardTo string
	// Invalidator applies the events.
	Invalidator Invalidator
	// Logger gets a line per refusal (warn) and per event (debug).
	Logger zerolog.Logger
	// Client forwards requests; default: a client with a 10 s timeout.
	Client *http.Client
	// Registerer receives cacheproxy_webhooks_total; nil: none.
	Registerer prometheus.Registerer
	// Clock times requests and the replay window; nil: the real clock.
	Clock clock.Clock
}

// Handler serves the webhook endpoints.
type Handler struct {
	cfg        Config
	public     string
	forward    *url.URL
	validators []client.RequestValidator
	client     *http.Client
	total      *prometheus.CounterVec
	reading    atomic.Int64 // bytes of bodies being read (reserved)
	replays    replays      // deliveries forwarded lately
}

// Outcomes of a webhook request, the outcome label of
// cacheproxy_webhooks_total: accepted (it invalidated), ignored (valid,
// nothing cached to invalidate), forwarded (relayed to forward_to after
// invalidating), duplicate (a copy of a delivery forwarded within the
// replay window, answered as that one was), rejected (a bad signature or
// request, or one that could not be applied).
const (
	outcomeAccepted  = "accepted"
	outcomeIgnored   = "ignored"
	outcomeForwarded = "forwarded"
	outcomeDuplicate = "duplicate"
	outcomeRejected  = "rejected"
)

// New checks cfg and returns the handler.
func New(cfg Config) (*Handler, error) {
	if _, err := url.Parse(cfg.PublicURL); err != nil || cfg.PublicURL == "" {
		return nil, errors.New("webhooks: public_url is required")
	}
	if len(cfg.AuthTokens) == 0 {
		return nil, errors.New("webhooks: at least one auth token is required")
	}
	h := &Handler{cfg: cfg, public: strings.TrimSuffix(cfg.PublicURL, "/"), client: cfg.Client,
		total: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cacheproxy_webhooks_total",
			Help: "Webhook requests by source (conversations, events, orchestrator, unknown) and outcome (accepted, ignored, forwarded, duplicate, rejected)."},
			[]string{"source", "outcome"})}
	cfg.Clock = clock.Or(cfg.Clock)
	h.cfg.Clock = cfg.Clock
	// Every series exists from the start at 0: a dashboard shows 0, not
	// "no data", and an absent-series alert tells a dead listener from a
	// quiet one.
	for _, src := range sourceNames {
		for _, o := range []string{outcomeAccepted, outcomeIgnored, outcomeForwarded, outcomeDuplicate, outcomeRejected} {
			h.total.WithLabelValues(src, o)
		}
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(h.total); err != nil {
			return nil, err
		}
	}
	if h.client == nil {
		h.client = &http.Client{Timeout: 10 * time.Second}
	}
	// forward_to is the only place a webhook goes: a redirect is the app's
	// answer, relayed to Twilio as it is, never followed (with the body
	// and its signature).
	c := *h.client
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	h.client = &c
	for _, t := range cfg.AuthTokens {
		h.validators = append(h.validators, client.NewRequestValidator(t))
	}
	if cfg.ForwardTo != "" {
		u, err := url.Parse(cfg.ForwardTo)
		if err != nil || u.Host == "" {
			return nil, errors.New("webhooks: forward_to is not an absolute URL")
		}
		h.forward = u
	}
	return h, nil
}

// source is which of Twilio's event sources a path serves.
type source int

const (
	unknownSource source = iota
	conversationsV1
	eventStreams
	orchestrator
)

var sourceNames = [...]string{"unknown", "conversations", "events", "orchestrator"}

var sources = map[string]source{
	"/webhooks/conversations": conversationsV1,
	"/webhooks/events":        eventStreams,
	"/webhooks/orchestrator":  orchestrator,
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := h.cfg.Clock.Now()
	src := sources[r.URL.Path]
	var kinds []string
	outcome, status, reason := outcomeRejected, 0, ""
	defer func() {
		h.total.WithLabelValues(sourceNames[src], outcome).Inc()
		// The webhook's line: what came, and what it did (never the body).
		ev := h.cfg.Logger.Info()
		if outcome == outcomeRejected {
			ev = h.cfg.Logger.Warn()
		}
		// Neither the signature nor the body: the body may hold personal data.
		ev = ev.Str("component", "webhooks").Str("source", sourceNames[src]).Str("method", r.Method).Str("path", r.URL.Path).
			Strs("events", kinds).Str("outcome", outcome).Int("status", status).Int64("duration_us", h.cfg.Clock.Since(start).Microseconds())
		if reason != "" {
			ev = ev.Str("error", reason)
		}
		ev.Msg("webhook")
	}()
	fail := func(code int, msg string) {
		status, reason = code, msg
		twilioerr.Write(w, code, msg)
	}
	if src == unknownSource {
		fail(http.StatusNotFound, "not a webhook endpoint: POST /webhooks/conversations, /webhooks/events or /webhooks/orchestrator")
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		fail(http.StatusMethodNotAllowed, "webhooks are POSTed")
		return
	}
	signed, sum, isJSON := h.signedURL(r)
	sig := r.Header.Get("X-Twilio-Signature")
	// A JSON delivery's signature covers the URL with its body's hash: it
	// is checked before a byte of the body is read.
	if sum != "" && !h.validURL(signed, sig) {
		fail(http.StatusForbidden, "invalid or missing X-Twilio-Signature (for webhooks.public_url and webhooks.auth_tokens)")
		return
	}
	body, code, msg := h.read(r, sum != "")
	if code != 0 {
		if code == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", retryAfter)
		}
		fail(code, msg)
		return
	}
	if !h.valid(signed, sig, body, isJSON) {
		fail(http.StatusForbidden, "invalid or missing X-Twilio-Signature (for webhooks.public_url and webhooks.auth_tokens)")
		return
	}
	var tags []string
	tags, kinds = eventTags(src, body, isJSON)
	outcome = outcomeIgnored
	if len(tags) > 0 {
		if err := h.invalidate(r.Context(), tags); err != nil {
			w.Header().Set("Retry-After", retryAfter)
			fail(http.StatusServiceUnavailable, "the invalidation could not be confirmed fleet-wide; Twilio will deliver this again")
			return
		}
		outcome = outcomeAccepted
	}
	if h.forward == nil {
		status = http.StatusNoContent
		w.WriteHeader(status)
		return
	}
	outcome, status = h.forwardOnce(w, r, covered(signed, body, isJSON), body)
}

// forwardOnce relays a delivery to forward_to, or answers a copy of one
// relayed within the replay window (one whose signature covers signed, or
// with its idempotency token) as that one was answered; it returns the
// outcome and the status sent.
func (h *Handler) forwardOnce(w http.ResponseWriter, r *http.Request, signed string, body []byte) (string, int) {
	keys := deliveryKeys(r, signed)
	a, first := h.replays.remember(keys, h.cfg.Clock.Now())
	if !first {
		return outcomeDuplicate, h.answerDuplicate(w, r, a)
	}
	status := h.relay(&recordedAnswer{ResponseWriter: w, a: a}, r, body)
	a.status, a.keep = status, status < 500
	if !a.keep {
		h.replays.forget(keys, a)
	}
	close(a.done)
	return outcomeForwarded, status
}

// answerDuplicate answers a copy of a delivery as its first was answered,
// once it was; it returns the status sent.
func (h *Handler) answerDuplicate(w http.ResponseWriter, r *http.Request, a *answer) int {
	select {
	case <-a.done:
	case <-r.Context().Done():
		return 0
	}
	if !a.keep {
		w.Header().Set("Retry-After", retryAfter)
		twilioerr.Write(w, http.StatusServiceUnavailable, "this delivery's first copy was not answered by webhooks.forward_to; Twilio will deliver it again")
		return http.StatusServiceUnavailable
	}
	for k, v := range a.header {
		w.Header()[k] = v
	}
	w.WriteHeader(a.status)
	_, _ = w.Write(a.body)
	return a.status
}

// recordedAnswer keeps what relay sends, for the delivery's duplicates
// (a body over replayAnswerBytes is not kept: duplicates get its status).
type recordedAnswer struct {
	http.ResponseWriter
	a   *answer
	big bool
}

func (r *recordedAnswer) WriteHeader(code int) {
	r.a.header = r.ResponseWriter.Header().Clone()
	r.ResponseWriter.WriteHeader(code)
}

func (r *recordedAnswer) Write(b []byte) (int, error) {
	switch {
	case r.big:
	case len(r.a.body)+len(b) > replayAnswerBytes:
		r.a.body, r.big = nil, true
	default:
		r.a.body = append(r.a.body, b...)
	}
	return r.ResponseWriter.Write(b)
}

// signedURL is the URL Twilio signed the request's signature for, the
// body hash it names (a JSON delivery), and whether the body is JSON.
func (h *Handler) signedURL(r *http.Request) (signed, sum string, isJSON bool) {
	signed = h.public + r.URL.Path
	if r.URL.RawQuery != "" {
		signed += "?" + r.URL.RawQuery
	}
	sum = r.URL.Query().Get("bodySHA256")
	isJSON = sum != ""
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err == nil && mt == "application/json" {
		isJSON = true
	}
	return signed, sum, isJSON
}

// read reads a delivery's body within its bound (MaxBodyBytes for a JSON
// delivery whose URL signature was checked, MaxFormBytes else) and within
// MaxReadingBytes across requests; a code (413, 503, 400) if it cannot.
func (h *Handler) read(r *http.Request, preChecked bool) ([]byte, int, string) {
	limit := int64(MaxFormBytes)
	if preChecked {
		limit = MaxBodyBytes
	}
	if r.ContentLength > limit {
		return nil, http.StatusRequestEntityTooLarge, fmt.Sprintf("a webhook body is at most %d bytes here", limit)
	}
	want := limit
	if r.ContentLength >= 0 {
		want = r.ContentLength
	}
	if h.reading.Add(want) > MaxReadingBytes {
		h.reading.Add(-want)
		return nil, http.StatusServiceUnavailable, "the webhook listener is at its limit of bodies being read; Twilio will deliver this again"
	}
	defer h.reading.Add(-want)
	body, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return nil, http.StatusBadRequest, "the request body could not be read"
	}
	if int64(len(body)) > limit {
		return nil, http.StatusRequestEntityTooLarge, fmt.Sprintf("a webhook body is at most %d bytes here", limit)
	}
	return body, 0, ""
}

// invalidate applies the delivery's invalidation, confirmed fleet-wide
// when the invalidator can say.
func (h *Handler) invalidate(ctx context.Context, tags []string) error {
	if c, ok := h.cfg.Invalidator.(Confirmer); ok {
		_, err := c.InvalidateConfirmed(ctx, tags)
		return err
	}
	h.cfg.Invalidator.Invalidate(ctx, tags)
	return nil
}

// validURL reports whether sig is Twilio's signature of the URL alone (a
// JSON delivery's: its body's hash is in the URL).
func (h *Handler) validURL(signed, sig string) bool {
	for _, v := range h.validators {
		if sig != "" && v.Validate(signed, map[string]string{}, sig) {
			return true
		}
	}
	return false
}

// valid reports whether sig is Twilio's signature of the request with one
// of the tokens: over the URL and every value of the form's parameters
// (signature.go), or, for a JSON body, over the URL (with its bodySHA256)
// and the body's hash.
func (h *Handler) valid(signed, sig string, body []byte, isJSON bool) bool {
	if sig == "" {
		return false
	}
	if !isJSON {
		form, err := url.ParseQuery(string(body))
		return err == nil && validForm(h.cfg.AuthTokens, signed, form, sig)
	}
	for _, v := range h.validators {
		if v.ValidateBody(signed, body, sig) {
			return true
		}
	}
	return false
}

// covered is what a valid delivery's signature covers, in the one form
// every body it validates has: the URL, then, for a form, its parameters
// as signed (names and values sorted); a JSON body is named by the hash in
// its URL.
func covered(signed string, body []byte, isJSON bool) string {
	if isJSON {
		return signed
	}
	form, _ := url.ParseQuery(string(body))
	return signed + "\x00" + formSigned(form, true)
}

// relay forwards the request unchanged to forward_to (the path after
// /webhooks appended) and relays the app's answer; it returns the status
// sent.
func (h *Handler) relay(w http.ResponseWriter, r *http.Request, body []byte) int {
	u := *h.forward
	u.Path = strings.TrimSuffix(u.Path, "/") + strings.TrimPrefix(r.URL.Path, "/webhooks")
	u.RawQuery = r.URL.RawQuery
	out, err := http.NewRequestWithContext(r.Context(), r.Method, u.String(), bytes.NewReader(body))
	if err != nil {
		twilioerr.Write(w, http.StatusBadGateway, "webhooks.forward_to: the request could not be built")
		return http.StatusBadGateway
	}
	for k, v := range r.Header {
		if k != "Connection" && k != "Keep-Alive" && k != "Te" && k != "Trailer" && k != "Transfer-Encoding" && k != "Upgrade" {
			out.Header[k] = v
		}
	}
	resp, err := h.client.Do(out)
	if err != nil {
		h.cfg.Logger.Warn().Str("component", "webhooks").Str("error", err.Error()).Msg("webhook forward failed")
		twilioerr.Write(w, http.StatusBadGateway, "webhooks.forward_to did not answer")
		return http.StatusBadGateway
	}
	defer resp.Body.Close()
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, io.LimitReader(resp.Body, MaxBodyBytes))
	return resp.StatusCode
}

// eventTags are the scopes the events in body invalidate, and the event
// types seen (for the log).
func eventTags(src source, body []byte, isJSON bool) (tags, kinds []string) {
	add := func(kind string, t ...string) {
		kinds = append(kinds, kind)
		for _, x := range t {
			if !strings.HasSuffix(x, ":") { // an empty id names nothing
				tags = append(tags, x)
			}
		}
	}
	switch src {
	case conversationsV1:
		f := fields{}
		if isJSON {
			_ = json.Unmarshal(body, &f)
		} else if form, err := url.ParseQuery(string(body)); err == nil {
			for k, v := range form {
				f[k] = v[0]
			}
		}
		add(f["EventType"], conversationsV1Tags(f["EventType"], f)...)
	case eventStreams:
		var events []struct {
			Type string `json:"type"`
			Data fields `json:"data"`
		}
		if err := json.Unmarshal(body, &events); err != nil {
			var one struct {
				Type string `json:"type"`
				Data fields `json:"data"`
			}
			if json.Unmarshal(body, &one) == nil {
				events = append(events, one)
			}
		}
		for _, e := range events {
			add(e.Type, eventStreamsTags(e.Type, e.Data)...)
		}
	case orchestrator:
		var e struct {
			EventType string `json:"eventType"`
			Type      string `json:"type"`
			Data      fields `json:"data"`
			Resource  fields `json:"resource"`
		}
		_ = json.Unmarshal(body, &e)
		f := fields{}
		_ = json.Unmarshal(body, &f)
		for _, more := range []fields{e.Resource, e.Data} { // the resource's own fields win
			for k, v := range more {
				f[k] = v
			}
		}
		kind := e.EventType
		if kind == "" {
			kind = e.Type
		}
		add(kind, orchestratorTags(kind, f)...)
	}
	return tags, kinds
}

// fields are an event's string fields, and those of the objects in it
// one level down under their dotted names ("MessagingBinding.Address",
// as a form names them); others are ignored.
type fields map[string]string

func (f *fields) UnmarshalJSON(b []byte) error {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	*f = fields{}
	for k, v := range raw {
		var s string
		var inner map[string]json.RawMessage
		switch {
		case json.Unmarshal(v, &s) == nil:
			(*f)[k] = s
		case json.Unmarshal(v, &inner) == nil:
			for ik, iv := range inner {
				if json.Unmarshal(iv, &s) == nil {
					(*f)[k+"."+ik] = s
				}
			}
		}
	}
	return nil
}

// participantTags: the participant's reads, whatever path they used; its
// conversation's participant lists; and the reads that name its identity
// or address (a "not found" remembered before it joined, the
// ParticipantConversations pages that do not list its conversation yet,
// or list it under an identity it no longer has).
func participantTags(f fields) []string {
	out := []string{route.ParticipantTag(f["ParticipantSid"])}
	if c := f["ConversationSid"]; c != "" {
		out = append(out, route.MembersTag(route.Conversations, c))
	}
	if id := f["Identity"]; id != "" {
		out = append(out, route.IdentityTag(id))
	}
	if a := f["MessagingBinding.Address"]; a != "" {
		out = append(out, route.AddressTag(a))
	}
	return out
}

func conversationsV1Tags(eventType string, f fields) []string {
	switch eventType {
	case "onParticipantAdded", "onParticipantRemoved", "onParticipantUpdated":
		return participantTags(f)
	case "onConversationUpdated", "onConversationRemoved", "onConversationStateUpdated":
		return []string{route.ConversationTag(f["ConversationSid"])}
	case "onUserUpdated", "onUserRemoved":
		return []string{route.IdentityTag(f["Identity"])}
	}
	return nil // pre-events, messages, and what is not cached
}

func eventStreamsTags(typ string, f fields) []string {
	switch typ {
	case "com.twilio.conversations.participant.added", "com.twilio.conversations.participant.removed",
		"com.twilio.conversations.participant.updated":
		return participantTags(f)
	case "com.twilio.conversations.conversation.updated", "com.twilio.conversations.conversation.removed",
		"com.twilio.conversations.conversation-state.updated":
		return []string{route.ConversationTag(f["ConversationSid"])}
	case "com.twilio.conversations.user.updated", "com.twilio.conversations.user.removed":
		return []string{route.IdentityTag(f["Identity"])}
	}
	return nil
}

func orchestratorTags(typ string, f fields) []string {
	conv := f["conversationId"]
	switch typ {
	case "PARTICIPANT_ADDED", "PARTICIPANT_UPDATED", "PARTICIPANT_REMOVED":
		id := f["participantId"]
		if id == "" {
			id = f["id"]
		}
		out := []string{route.ParticipantTag(id)}
		if conv != "" {
			out = append(out, route.MembersTag(route.Conversations, conv))
		}
		return out
	case "CONVERSATION_UPDATED", "CONVERSATION_DELETED", "CONVERSATION_REMOVED", "CONVERSATION_CLOSED":
		if conv == "" {
			conv = f["id"]
		}
		return []string{route.ConversationTag(conv)}
	}
	return nil
}
