package proxy

import (
	"context"
	"net/http"
	"net/http/httptest"
)

// trackingWriter records whether anything was written at all.
type trackingWriter struct {
	h     http.Header
	wrote bool
	code  int
}

func newTrackingWriter() *trackingWriter { return &trackingWriter{h: http.Header{}} }

func (w *trackingWriter) Header() http.Header { return w.h }
func (w *trackingWriter) WriteHeader(c int)   { w.wrote, w.code = true, c }
func (w *trackingWriter) Write(b []byte) (int, error) {
	if !w.wrote {
		w.WriteHeader(200)
	}
	return len(b), nil
}

func httptestRequest(ctx context.Context, path, auth string) *http.Request {
	r := httptest.NewRequest("GET", path, nil).WithContext(ctx)
	r.Header.Set("Authorization", auth)
	return r
}
