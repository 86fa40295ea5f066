package codeshape

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"unicode"
)

// architecture is docs/architecture.md, and its section under heading.
func architecture(t *testing.T, heading string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "architecture.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	i := strings.Index(doc, "\n"+heading+"\n")
	if i < 0 {
		t.Fatalf("docs/architecture.md has no %q", heading)
	}
	rest := doc[i+len(heading)+2:]
	if j := strings.Index(rest, "\n## "); j >= 0 {
		rest = rest[:j]
	}
	return rest
}

// goFiles calls f with each Go file under the repository's internal/ and
// cmd/ folders, parsed with its comments, and the package's folder.
func goFiles(t *testing.T, f func(dir string, file *ast.File)) {
	t.Helper()
	for _, root := range []string{filepath.Join("..", "..", "internal"), filepath.Join("..", "..", "cmd")} {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") {
				return err
			}
			file, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ParseComments)
			if err != nil {
				return err
			}
			f(filepath.Dir(path), file)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// words splits an identifier into its lower-case words (camelCase,
// snake_case).
func words(id string) []string {
	var out []string
	cur := []rune{}
	flush := func() {
		if len(cur) > 0 {
			out = append(out, strings.ToLower(string(cur)))
			cur = cur[:0]
		}
	}
	rs := []rune(id)
	for i, r := range rs {
		switch {
		case r == '_':
			flush()
			continue
		case unicode.IsUpper(r) && i > 0 && (unicode.IsLower(rs[i-1]) || i+1 < len(rs) && unicode.IsLower(rs[i+1])):
			flush()
		}
		cur = append(cur, r)
	}
	flush()
	return out
}

// The glossary of docs/architecture.md is honest: every word it defines
// is used in the code (an identifier or a comment), and no retired word
// names an identifier: *lease* (a turn, a slot's life or a claim), and
// *shared* for L2 (internal/intern's and internal/cache's "shared" is a
// string's one copy, another thing).
func TestGlossary(t *testing.T) {
	glossary := architecture(t, "## Glossary")
	var defined []string
	for _, m := range regexp.MustCompile(`\*\*([A-Za-z0-9]+)\*\*`).FindAllStringSubmatch(glossary, -1) {
		defined = append(defined, strings.ToLower(m[1]))
	}
	if len(defined) < 15 {
		t.Fatalf("the glossary defines %d words: %v", len(defined), defined)
	}
	used := map[string]bool{}
	goFiles(t, func(dir string, file *ast.File) {
		interning := strings.HasSuffix(dir, "intern") || strings.HasSuffix(dir, "cache")
		ast.Inspect(file, func(n ast.Node) bool {
			id, ok := n.(*ast.Ident)
			if !ok {
				return true
			}
			for _, w := range words(id.Name) {
				used[w] = true
				if w == "lease" || w == "leases" || w == "shared" && !interning {
					t.Errorf("%s: the identifier %s uses the retired word %q", dir, id.Name, w)
				}
			}
			return true
		})
		for _, c := range file.Comments {
			for _, w := range regexp.MustCompile(`[A-Za-z0-9]+`).FindAllString(c.Text(), -1) {
				used[strings.ToLower(w)] = true
			}
		}
	})
	for _, w := range defined {
		if !used[w] {
			t.Errorf("the glossary's %q is nowhere in the code", w)
		}
	}
}

// Every package under internal/ is in docs/architecture.md's table of
// packages.
func TestEveryPackageIsInTheArchitecture(t *testing.T) {
	table := architecture(t, "## Packages")
	pkgs := map[string]bool{}
	goFiles(t, func(dir string, _ *ast.File) {
		rel, _ := filepath.Rel(filepath.Join("..", ".."), dir)
		if strings.HasPrefix(rel, "internal") {
			pkgs[filepath.ToSlash(rel)] = true
		}
	})
	if len(pkgs) < 20 {
		t.Fatalf("found %d packages under internal/", len(pkgs))
	}
	for p := range pkgs {
		if !strings.Contains(table, "`"+p+"`") {
			t.Errorf("%s is not in docs/architecture.md's table of packages", p)
		}
	}
}
