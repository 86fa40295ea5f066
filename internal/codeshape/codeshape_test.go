package codeshape

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// exempt are the packages whose long functions are lists, not logic.
var exempt = []string{"config", "twiliofake"}

func TestNoFunctionIsLong(t *testing.T) {
	fset := token.NewFileSet()
	checked := 0
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			for _, e := range exempt {
				if d.Name() == e {
					return filepath.SkipDir
				}
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		for _, decl := range f.Decls {
			fd, ok := decl.(*ast.FuncDecl)
			if !ok {
				continue
			}
			checked++
			if n := fset.Position(fd.End()).Line - fset.Position(fd.Pos()).Line + 1; n > MaxLines {
				t.Errorf("%s: %s is %d lines, more than %d", path, fd.Name.Name, n, MaxLines)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 100 {
		t.Fatalf("checked only %d functions: the walk missed internal/", checked)
	}
}

// main only wires: each of cmd/cacheproxy's functions fits on a screen.
func TestMainFitsOnAScreen(t *testing.T) {
	fset := token.NewFileSet()
	files, err := filepath.Glob(filepath.Join("..", "..", "cmd", "cacheproxy", "*.go"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no files in cmd/cacheproxy: %v", err)
	}
	checked := 0
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			if fd, ok := decl.(*ast.FuncDecl); ok {
				checked++
				if n := fset.Position(fd.End()).Line - fset.Position(fd.Pos()).Line + 1; n > MainMaxLines {
					t.Errorf("%s: %s is %d lines, more than %d", path, fd.Name.Name, n, MainMaxLines)
				}
			}
		}
	}
	if checked < 10 {
		t.Fatalf("checked only %d functions", checked)
	}
}

// The proxy's main file stays readable: the seams, New and ServeHTTP, at
// most 350 lines (its options and each part of a request are files of
// their own).
func TestProxyGoIsShort(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "proxy", "proxy.go"))
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "\n"); n > 350 {
		t.Fatalf("internal/proxy/proxy.go is %d lines, want at most 350", n)
	}
}
