package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"cacheproxy/internal/route"
)

// forward streams a request through the upstream's ReverseProxy.
func (p *Proxy) forward(w http.ResponseWriter, r *http.Request, rec *record, up *upstream) {
	if r.ContentLength > p.maxBody {
		rec.errMsg = "request body too large"
		twilioError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", p.maxBody))
		return
	}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &clientBody{ReadCloser: http.MaxBytesReader(w, r.Body, p.maxBody), rec: rec}
	}
	p.c.passthrough.Add(1)
	rec.viaUpstream = true
	if rec.rt.Replaced && r.Method == http.MethodGet {
		rec.pageBase = p.clientBase(r, rec.rt.Base)
	}
	ctx := r.Context()
	if isWrite(r.Method) && rec.rt.Joins() {
		rec.extraTags = readFormTags(r, &rec.rt)
	}
	if isWrite(r.Method) && p.onRequest {
		rec.extraTags = append(rec.extraTags, rec.rt.TreeTags()...)
	}
	if p.intents != nil && isWrite(r.Method) {
		var cancel context.CancelFunc
		var ok bool
		if ctx, cancel, ok = p.announce(ctx, w, rec); !ok {
			return // refused: nothing was sent
		}
		defer cancel()
	}
	rec.calls.arrival = rec.start
	out := r.WithContext(withStats(context.WithValue(ctx, recordKey{}, rec), &rec.calls))
	if rec.rt.Path != escapedPath(r) { // a prefix removed, or escapes normalised
		u := *r.URL
		u.Path, u.RawPath = rec.rt.Unescaped(), rec.rt.Path
		out.URL = &u
	}
	up.rp.ServeHTTP(w, out)
}

// announce records a write's intent with the fleet before it is sent
// (docs/fleet.md, "Read-your-writes across replicas") and returns the
// context it must end within, and its cancel, which ends the intent too
// if neither the answer nor a failure did. !ok: it was refused (answered
// 503, nothing sent). A write whose path names no scope is not announced.
func (p *Proxy) announce(ctx context.Context, w http.ResponseWriter, rec *record) (context.Context, context.CancelFunc, bool) {
	tags := rec.writeTags()
	if len(tags) == 0 {
		return ctx, func() {}, true
	}
	in, err := p.intents.Intend(ctx, tags)
	if err != nil {
		rec.errMsg = err.Error()
		w.Header().Set("Retry-After", "1")
		twilioError(w, http.StatusServiceUnavailable, "cacheproxy could not record this write with the fleet's Redis in time; nothing was sent upstream: retry")
		return ctx, nil, false
	}
	rec.intent = in
	dctx, cancel := context.WithDeadline(ctx, in.Deadline()) // past it, the fleet stops waiting for its end
	return dctx, func() {
		cancel()
		in.End(context.WithoutCancel(ctx), true, nil)
	}, true
}

// maxFormBytes bounds the write forms read for the scopes they name
// (a participant's form is well under a kilobyte).
const maxFormBytes = 64 << 10

// readFormTags reads a write's form for the identity and address scopes
// it names (route.Match.FormTags) and puts the body back for the
// upstream. A body that is not a form of known length up to maxFormBytes
// is not read: it names every identity and address.
func readFormTags(r *http.Request, m *route.Match) []string {
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return m.FormTags(nil, false)
	}
	ct, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";")
	if r.ContentLength < 0 || r.ContentLength > maxFormBytes || !strings.EqualFold(strings.TrimSpace(ct), "application/x-www-form-urlencoded") {
		return m.FormTags(nil, true)
	}
	b, err := io.ReadAll(io.LimitReader(r.Body, r.ContentLength))
	r.Body = readCloser{io.MultiReader(bytes.NewReader(b), errReader(err), r.Body), r.Body}
	form, perr := url.ParseQuery(string(b))
	return m.FormTags(form, err != nil || perr != nil)
}

// writeTags are the scopes a write names before its answer: its path's
// and its extraTags.
func (rec *record) writeTags() []string { return append(rec.rt.WriteTags(), rec.extraTags...) }

func isWrite(method string) bool {
	return method != http.MethodGet && method != http.MethodHead && method != http.MethodOptions
}

// modifyResponse records the upstream's answer and, for a write, invalidates
// its scopes before the client sees the response (read-your-writes).
func (p *Proxy) modifyResponse(resp *http.Response) error {
	rec, ok := resp.Request.Context().Value(recordKey{}).(*record)
	if !ok {
		return nil
	}
	rec.upstreamStatus = resp.StatusCode
	rec.upstreamDur = p.clock.Since(rec.start)
	body, err := bufferSmall(resp, rec)
	if err != nil {
		return err
	}
	if rec.pageBase != "" && resp.StatusCode == http.StatusOK && strings.Contains(resp.Header.Get("Content-Type"), "json") {
		p.keepPagesBehind(resp, rec, body)
	}
	p.learnKey(rec.cred, resp.StatusCode, body)
	if isWrite(resp.Request.Method) {
		p.endWrite(resp.Request.Context(), rec, mayHaveApplied(resp.StatusCode), func() []string {
			if resp.StatusCode < 300 {
				return writeBodyTags(&rec.rt, resp)
			}
			return nil
		})
	}
	return nil
}

// endWrite invalidates what a write may have changed (applied), before
// its client is answered: the scopes its path names and those its answer
// names (bodyTags, read only when applied), and ends its intent, if any.
func (p *Proxy) endWrite(ctx context.Context, rec *record, applied bool, bodyTags func() []string) {
	ctx = context.WithoutCancel(ctx)
	var extra []string
	if applied && bodyTags != nil {
		extra = bodyTags()
	}
	if rec.intent != nil {
		rec.intent.End(ctx, applied, extra)
		return
	}
	if tags := append(rec.writeTags(), extra...); applied && len(tags) > 0 {
		p.inv.Invalidate(ctx, tags)
	}
}

// mayHaveApplied reports whether a write answered with status may have
// changed something, and so invalidates: a 2xx; a 404 (what it named is
// gone); a 5xx (it may have been applied before the failure). Twilio
// applies none of 400, 401, 403, 409, 429 or any other answer: a refused
// write, by anyone, flushes nobody's entries.
func mayHaveApplied(status int) bool {
	return status >= 200 && status < 300 || status == http.StatusNotFound || status >= 500
}

// bufferedResponseBytes: a pass-through response up to this size is read
// from the upstream in full before the client gets a byte, so the
// account's upstream slot (held until the upstream body is closed) is given
// back at once however slowly the client reads. A larger one streams and
// holds its slot at most until the client's write deadline.
const bufferedResponseBytes = 1 << 20

// bufferSmall reads a response of up to bufferedResponseBytes from the
// upstream, closes the upstream body and returns the bytes; a larger one
// streams on (nil bytes), its read errors recorded in rec. An upstream
// failure while buffering is an error before anything was sent: the client
// gets a 502.
func bufferSmall(resp *http.Response, rec *record) ([]byte, error) {
	if resp.Body == nil || resp.Body == http.NoBody || resp.ContentLength > bufferedResponseBytes {
		if resp.Body != nil && resp.Body != http.NoBody {
			resp.Body = &cutBody{ReadCloser: resp.Body, rec: rec}
		}
		return nil, nil
	}
	head, err := io.ReadAll(io.LimitReader(resp.Body, bufferedResponseBytes+1))
	if err != nil {
		resp.Body.Close()
		return nil, fmt.Errorf("%w: %w", errUpstreamCut, err)
	}
	if len(head) <= bufferedResponseBytes {
		resp.Body.Close() // the upstream exchange is over: its slot goes back
		resp.Body = io.NopCloser(bytes.NewReader(head))
		return head, nil
	}
	resp.Body = &cutBody{ReadCloser: readCloser{io.MultiReader(bytes.NewReader(head), resp.Body), resp.Body}, rec: rec}
	return nil, nil
}

// cutBody records an upstream body that fails while it streams to the
// client: the answer has begun, so the reverse proxy can only cut the
// connection; the access line then says what happened.
type cutBody struct {
	io.ReadCloser
	rec *record
}

func (b *cutBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF && !b.rec.upstreamCut {
		b.rec.upstreamCut = true
		b.rec.errMsg = "upstream response cut off mid-body: " + err.Error()
	}
	return n, err
}

// clientBody records a failure reading the client's request body, so that
// a body that trickles past server.read_timeout is the client's fault
// (408), not an upstream failure, whatever error the transport reports
// (net/http cancels the request's context on a read error, so the
// transport may well say "context canceled").
type clientBody struct {
	io.ReadCloser
	rec *record
}

func (b *clientBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		err = &clientBodyError{err}
		if b.rec.bodyErr == nil {
			b.rec.bodyErr = err
		}
	}
	return n, err
}

// maxWriteBodyPeek bounds how much of a write's response is read to learn
// the scopes it names; larger bodies stream on untouched.
const maxWriteBodyPeek = 64 << 10

// writeBodyTags reads (up to maxWriteBodyPeek of) a write's JSON response
// for the ids it names, and puts the bytes back for the client.
func writeBodyTags(m *route.Match, resp *http.Response) []string {
	if resp.Body == nil || resp.Body == http.NoBody || !strings.Contains(resp.Header.Get("Content-Type"), "json") {
		return nil
	}
	head, err := io.ReadAll(io.LimitReader(resp.Body, maxWriteBodyPeek+1))
	resp.Body = readCloser{io.MultiReader(bytes.NewReader(head), errReader(err), resp.Body), resp.Body}
	if err != nil || len(head) > maxWriteBodyPeek {
		return nil
	}
	var ids route.BodyIDs
	if json.Unmarshal(head, &ids) != nil {
		return nil
	}
	return route.BodyTags(m.Upstream, &ids, m.Resource())
}

// errorHandler answers upstream failures of pass-through requests.
func (p *Proxy) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	rec, ok := r.Context().Value(recordKey{}).(*record)
	if ok {
		if rec.bodyErr != nil {
			err = rec.bodyErr // the cause, whatever the transport made of it
		}
		rec.errMsg = err.Error()
		rec.upstreamDur = p.clock.Since(rec.start)
		if isWrite(r.Method) {
			p.endWrite(r.Context(), rec, true, nil) // it may have been applied before the failure
		}
	}
	p.fail(w, r, err)
}

// clientBase is the base URL a client that replaced its base URL used:
// the scheme and Host it reached the sidecar with, and its path prefix.
// The Host is one of the sidecar's own addresses (AnswerOn), never one a
// client made up: any other gets the listen address.
func (p *Proxy) clientBase(r *http.Request, prefix string) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + p.hosts.Load().pick(r.Host) + prefix
}

// keepPagesBehind rewrites a list answer's absolute page URLs (meta's url
// and *_url, on one of the upstream's public hosts) to the base URL the
// client used, so that clients that follow next_page_url as given
// (twilio-node, twilio-python) stay behind the sidecar. An answer larger
// than the buffered size streams unchanged and is counted.
func (p *Proxy) keepPagesBehind(resp *http.Response, rec *record, body []byte) {
	if body == nil {
		p.c.pagesUnrewritten.Add(1)
		return
	}
	out, ok := rewritePages(body, p.ups[rec.rt.Upstream].hosts, rec.pageBase)
	if !ok {
		return
	}
	resp.Body = io.NopCloser(bytes.NewReader(out))
	resp.ContentLength = int64(len(out))
	resp.Header.Set("Content-Length", strconv.Itoa(len(out)))
}

// rewritePages is body with its meta's page URLs on hosts moved to base;
// false if it has none (or is not a JSON object).
func rewritePages(body []byte, hosts []string, base string) ([]byte, bool) {
	var top map[string]json.RawMessage
	if !bytes.Contains(body, []byte(`"meta"`)) || json.Unmarshal(body, &top) != nil {
		return nil, false
	}
	var meta map[string]json.RawMessage
	if json.Unmarshal(top["meta"], &meta) != nil {
		return nil, false
	}
	changed := false
	for k, v := range meta {
		var s string
		if k != "url" && !strings.HasSuffix(k, "_url") || json.Unmarshal(v, &s) != nil {
			continue
		}
		u, err := url.Parse(s)
		if err != nil || u.Scheme != "https" || !slices.Contains(hosts, strings.ToLower(u.Host)) {
			continue
		}
		rewritten := base + u.EscapedPath()
		if u.RawQuery != "" {
			rewritten += "?" + u.RawQuery
		}
		meta[k], _ = json.Marshal(rewritten)
		changed = true
	}
	if !changed {
		return nil, false
	}
	top["meta"], _ = json.Marshal(meta)
	out, err := json.Marshal(top)
	return out, err == nil
}
