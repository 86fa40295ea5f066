package proxy

import (
	"context"
	"net/http"
	"strings"

	"cacheproxy/internal/ratelimit"
	"cacheproxy/internal/route"
	"cacheproxy/internal/tier"
	"cacheproxy/internal/tracing"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// tracer is the proxy's tracing (docs/tracing.md): nil when it is off, and
// then nothing of it runs on any path.
type tracer struct {
	t trace.Tracer
	p propagation.TextMapPropagator
}

func newTracer(t *tracing.Tracing) *tracer {
	if t == nil {
		return nil
	}
	return &tracer{t: t.Provider.Tracer("cacheproxy"), p: t.Propagator}
}

// tracedTransport makes each upstream call a client span, child of the
// request's, and sends the span's traceparent upstream in place of the
// client's: the upstream sees the client's trace, with the sidecar's
// span as parent. Without tracing, next as it is. Its attributes are the
// method, the SIDs of the path (sids), the upstream's host and the status
// (the route is its parent's), never the path itself: a participant may be addressed by
// identity, often an e-mail address (otelhttp's transport exported it in
// url.full).
func tracedTransport(next http.RoundTripper, t *tracing.Tracing) http.RoundTripper {
	if t == nil {
		return next
	}
	return &spanTransport{next: next, t: t.Provider.Tracer("cacheproxy"), p: t.Propagator}
}

type spanTransport struct {
	next http.RoundTripper
	t    trace.Tracer
	p    propagation.TextMapPropagator
}

func (st *spanTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	ctx, span := st.t.Start(r.Context(), "upstream "+r.Method, trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(
		attribute.String("http.request.method", r.Method), attribute.String("server.address", r.URL.Hostname()),
		attribute.StringSlice("cacheproxy.sids", sids(r.URL.Path))))
	defer span.End()
	r = r.Clone(ctx)
	st.p.Inject(ctx, propagation.HeaderCarrier(r.Header))
	resp, err := st.next.RoundTrip(r)
	if err != nil {
		span.SetStatus(codes.Error, "the upstream call failed")
		return nil, err
	}
	span.SetAttributes(attribute.Int("http.response.status_code", resp.StatusCode))
	if resp.StatusCode >= 500 {
		span.SetStatus(codes.Error, http.StatusText(resp.StatusCode))
	}
	return resp, nil
}

// sids are the segments of path that are Twilio SIDs (two letters and 32
// hex digits): what a span may say of a path. A participant addressed by
// identity leaves its identity out.
func sids(path string) []string {
	var out []string
	for seg := range strings.SplitSeq(path, "/") {
		if route.IsSID(seg) {
			out = append(out, seg)
		}
	}
	return out
}

// serverSpan starts the request's span, continuing the client's trace
// (traceparent), and returns r with it. Of the path it says the SIDs only
// (sids), as the access log leaves the path out.
func (tr *tracer) serverSpan(r *http.Request) (*http.Request, trace.Span) {
	ctx := tr.p.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
	ctx, span := tr.t.Start(ctx, "cacheproxy "+r.Method, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("http.request.method", r.Method), attribute.StringSlice("cacheproxy.sids", sids(r.URL.Path))))
	return r.WithContext(ctx), span
}

// endServerSpan ends the request's span with what the access line says:
// the route, the cache's outcome in RFC 9211's words (the Cache-Status
// answered, without its "cacheproxy; "), the status and the account SID,
// never a credential.
func endServerSpan(span trace.Span, rec *record, w *recordWriter) {
	status := w.status
	if status == 0 {
		status = 499
	}
	attrs := []attribute.KeyValue{
		attribute.String("http.route", route.Labels()[rec.routeID]),
		attribute.Int("http.response.status_code", status),
	}
	if cs := w.Header().Get("Cache-Status"); cs != "" {
		attrs = append(attrs, attribute.String("cacheproxy.cache_status", strings.TrimPrefix(cs, "cacheproxy; ")))
	}
	if acct := rec.cred.Account(); len(acct) > 0 {
		attrs = append(attrs, attribute.String("cacheproxy.account", string(acct)))
	}
	span.SetAttributes(attrs...)
	if status >= 500 {
		span.SetStatus(codes.Error, http.StatusText(status))
	}
	span.End()
}

// acquire is budget.Acquire inside a "budget.wait" span when tracing.
func (tr *tracer) acquire(ctx context.Context, b Budget, user, fingerprint string) (ratelimit.Turn, error) {
	if tr == nil {
		return b.Acquire(ctx, user, fingerprint)
	}
	ctx, span := tr.t.Start(ctx, "budget.wait", trace.WithAttributes(attribute.String("cacheproxy.account", user)))
	defer span.End()
	turn, err := b.Acquire(ctx, user, fingerprint)
	if err != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	if turn != nil {
		span.SetAttributes(attribute.Int64("cacheproxy.waited_us", turn.Waited().Microseconds()))
	}
	return turn, err
}

// claim is a fill's L2 lookup, claim and wait for a peer's fill, inside
// a "fleet.claim" span when tracing; end it with the claim's outcome.
func (tr *tracer) claim(ctx context.Context) (context.Context, func(cl tier.Claim, filled bool)) {
	if tr == nil {
		return ctx, func(tier.Claim, bool) {}
	}
	ctx, span := tr.t.Start(ctx, "fleet.claim")
	return ctx, func(cl tier.Claim, filled bool) {
		span.SetAttributes(attribute.Bool("cacheproxy.claim_won", cl != nil && cl.Won()), attribute.Bool("cacheproxy.fill_shared", filled))
		span.End()
	}
}
