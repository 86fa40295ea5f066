package route

import "strings"

// The reads cached on request ([cache.routes."<name>"]): their scopes
// follow the path. A read carries the scope of every resource its path
// names (each prefix of the path that ends in a variable segment:
// /v1/Conversations/{C}, then …/Messages/{M}), and a list read (a path
// that ends in a literal) its own list scope. A write to a resource
// invalidates every read under it and the list that contains it; a write
// to a list (a create) invalidates the list. The scopes are the path as
// sent upstream, so a resource addressed by another name (a conversation
// by unique name) is tied to its SID only through the conversation,
// service and session scopes the rows also carry (Within), which a write
// by unique name invalidates by wildcard.

// Scope kinds of the on-request reads.
const (
	kindTree = "tree" // a resource and everything under it
	kindList = "list" // a list
)

// OnRequest reports a route cached only when its [cache.routes] entry
// gives it a ttl (Row.OnRequest).
func (m *Match) OnRequest() bool { return m.row != nil && m.row.OnRequest }

// treeReadTags are the resource and list scopes of an on-request read.
func (m *Match) treeReadTags() []string {
	segs := strings.Split(m.Path, "/")
	pat := strings.Split(m.row.Pattern, "/")
	var out []string
	for i, p := range pat {
		if strings.HasPrefix(p, "{") {
			out = append(out, ScopeTag(m.Upstream, kindTree, strings.Join(segs[:i+1], "/")))
		}
	}
	if last := pat[len(pat)-1]; !strings.HasPrefix(last, "{") {
		out = append(out, ScopeTag(m.Upstream, kindList, m.Path))
	}
	return out
}

// TreeTags are the scopes a write invalidates among the on-request reads:
// a write to a resource, that resource (and everything under it) and the
// list it is in; a write to a list (a create, or a singleton such as a
// service's Configuration), that list. A path no row knows is taken both
// ways. An id of a conversation, service or session that is not a SID
// invalidates the kind's wildcard, as WriteTags does.
func (m *Match) TreeTags() []string {
	path := m.Path
	parent := path[:max(0, strings.LastIndexByte(path, '/'))]
	resource, list := m.row == nil, m.row == nil
	if m.row != nil {
		pat := strings.Split(m.row.Pattern, "/")
		resource = strings.HasPrefix(pat[len(pat)-1], "{")
		list = !resource
	}
	var out []string
	if resource {
		out = append(out, ScopeTag(m.Upstream, kindTree, path), ScopeTag(m.Upstream, kindList, parent))
	}
	if list {
		out = append(out, ScopeTag(m.Upstream, kindList, path))
	}
	for i, kv := range m.ids[:m.nids] {
		if m.within[i] && !SIDLike(kv[1]) {
			out = append(out, ScopeTag(m.Upstream, kv[0], "*"))
		}
	}
	return out
}

// Named are the rows with a name (every GET path of the three specs), in
// label order: what `cacheproxy -routes` lists and [cache.routes] may
// name.
func Named() []Row {
	var out []Row
	for _, r := range Table {
		if r.Name != "" {
			out = append(out, r)
		}
	}
	return out
}

// Known reports whether name is a named route's.
func Known(name string) bool {
	for _, r := range Table {
		if r.Name == name && name != "" {
			return true
		}
	}
	return false
}
