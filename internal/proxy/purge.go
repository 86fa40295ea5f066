package proxy

import (
	"crypto/subtle"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"

	"cacheproxy/internal/route"
)

// PurgeHandler serves POST /purge on the admin listener:
//
//	/purge?path=/v1/Conversations/CH…/Participants/MB…   one read, every credential and query
//	/purge?conversation=CH…                              a Conversations v1/v2 conversation
//	/purge?session=KC…                                   a Proxy session
//
// path is routed like a client request with the sidecar's own Host (the
// /proxy/ and /conversations/ prefixes work). With a token, requests must
// carry "Authorization: Bearer <token>"; without one, purge is refused
// unless the admin listener is on loopback.
func (p *Proxy) PurgeHandler(token string, adminLoopback bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", "POST")
			twilioError(w, http.StatusMethodNotAllowed, "purge takes POST")
			return
		}
		if token == "" && !adminLoopback {
			twilioError(w, http.StatusForbidden, "purge is disabled: admin_listen is not loopback and admin.purge_token is not set")
			return
		}
		if token != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(token)) != 1 {
				twilioError(w, http.StatusUnauthorized, "purge needs Authorization: Bearer <admin.purge_token>")
				return
			}
		}
		q := r.URL.Query()
		var tags []string
		switch {
		case q.Get("path") != "":
			u, err := url.Parse(q.Get("path"))
			if err != nil || !strings.HasPrefix(u.Path, "/") {
				twilioError(w, http.StatusBadRequest, "path must be an absolute path")
				return
			}
			m, rerr := p.router.Resolve(http.MethodGet, "cacheproxy.purge", "", u.EscapedPath())
			if rerr != nil {
				twilioError(w, rerr.Status, rerr.Msg)
				return
			}
			if p.ttls[m.ID()] == 0 {
				twilioError(w, http.StatusBadRequest, "not a cached route: "+m.Path)
				return
			}
			tags = []string{route.PathTag(m.Upstream, m.Path)}
		case q.Get("conversation") != "":
			tags = []string{route.ConversationTag(q.Get("conversation"))}
		case q.Get("session") != "":
			tags = []string{route.SessionTag(q.Get("session"))}
		default:
			twilioError(w, http.StatusBadRequest, "give one of path, conversation or session")
			return
		}
		epoch := p.inv.Invalidate(r.Context(), tags)
		p.events.Info().Strs("scopes", tags).Uint64("epoch", epoch).Msg("purge")
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"purged": tags, "epoch": epoch})
	})
}
