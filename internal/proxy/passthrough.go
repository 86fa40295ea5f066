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
		r.Body = http.MaxBytesReader(w, r.Body, p.maxBody)
	}
	p.c.passthrough.Add(1)
	rec.viaUpstream = true
	out := r.WithContext(withStats(context.WithValue(r.Context(), recordKey{}, rec), &rec.calls))
	if rec.rt.Path != r.URL.Path {
		u := *r.URL
		u.Path, u.RawPath = rec.rt.Path, rec.rt.RawPath
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
	if isWrite(resp.Request.Method) {
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
		rec.errMsg = err.Error()
		rec.upstreamDur = p.clock.Since(rec.start)
		if tags := rec.rt.WriteTags(); isWrite(r.Method) && len(tags) > 0 {
			// The write may have been applied before the failure.
			p.inv.Invalidate(context.WithoutCancel(r.Context()), tags)
		}
	}
	p.fail(w, r, err)
}
