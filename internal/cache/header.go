package cache

import (
	"slices"
	"strings"
)

// Header is a stored response's header fields, compact: a field per
// name (canonical), sorted by name, with its values; read-only once
// stored, like the rest of an Entry. A map of the same fields took about
// 300 bytes more per entry (its table), and a hit writes the fields in
// one pass over a slice.
type Header []HeaderField

// HeaderField is one header name with its values.
type HeaderField struct {
	Name   string
	Values []string
}

// HeaderOf is h's fields as a Header, sorted by name (the values shared
// with h, not copied).
func HeaderOf(h map[string][]string) Header {
	out := make(Header, 0, len(h))
	for k, v := range h {
		out = append(out, HeaderField{Name: k, Values: v})
	}
	return out.Sorted()
}

// Sorted sorts h by name, in place, and returns it.
func (h Header) Sorted() Header {
	slices.SortFunc(h, func(a, b HeaderField) int { return strings.Compare(a.Name, b.Name) })
	return h
}

// Get is name's values (name canonical), or nil.
func (h Header) Get(name string) []string {
	for i := range h {
		if h[i].Name == name {
			return h[i].Values
		}
	}
	return nil
}

// Map is h as a map (the values shared, not copied).
func (h Header) Map() map[string][]string {
	m := make(map[string][]string, len(h))
	for _, f := range h {
		m[f.Name] = f.Values
	}
	return m
}
