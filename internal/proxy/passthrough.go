package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
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
	out := r.WithContext(withStats(context.WithValue(r.Context(), recordKey{}, rec), &rec.calls))
	if rec.rt.Path != escapedPath(r) { // a prefix removed, or escapes normalised
		u := *r.URL
		u.Path, u.RawPath = rec.rt.Unescaped(), rec.rt.Path
		out.URL = &u
	}
	up.rp.ServeHTTP(w, out)
}

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
	p.learnKey(rec.cred, resp.StatusCode, body)
	if isWrite(resp.Request.Method) && mayHaveApplied(resp.StatusCode) {
		tags := rec.rt.WriteTags()
		if resp.StatusCode < 300 {
			tags = append(tags, writeBodyTags(&rec.rt, resp)...)
		}
		if len(tags) > 0 {
			p.inv.Invalidate(context.WithoutCancel(resp.Request.Context()), tags)
		}
	}
	return nil
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
		if tags := rec.rt.WriteTags(); isWrite(r.Method) && len(tags) > 0 {
			// The write may have been applied before the failure.
			p.inv.Invalidate(context.WithoutCancel(r.Context()), tags)
		}
	}
	p.fail(w, r, err)
}
