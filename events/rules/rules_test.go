package rules

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/vasengine/vasengine/events"
	"github.com/vasengine/vasengine/vasmon"
)

const (
	p  = vasmon.BitP
	rw = vasmon.BitRW
	us = vasmon.BitUS
	nx = vasmon.BitNX
)

func rec(mode vasmon.Mode, va, old, new uint64, full bool) *events.Record {
	r := &events.Record{VA: va, Old: old, New: new, Size: 4096, Mode: mode, VM: 3, CR3: 0x5000, Seq: 9}
	r.Classify()
	if events.KernelHalf(mode, va) {
		r.Flags |= events.FlagKernel
	}
	if full {
		r.Flags |= events.FlagFullSpace
	}
	return r
}

func matches(t *testing.T, s *Set, r *events.Record) []string {
	t.Helper()
	root := &events.RootInfo{Name: "vm3/pid 41"}
	var names []string
	for _, h := range s.NewMatcher("h1").Match(r, root, nil) {
		names = append(names, s.Names()[h])
	}
	return names
}

func TestDefaultRules(t *testing.T) {
	s, err := Parse("watch.yaml", []byte("watch:\n  - {name: vdso, start: 0x7ff000, end: 0x800000}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Names(); !slices.Equal(got, []string{"wx-user-page", "kernel-mapping-changed", "watched-range-remapped", "new-executable-mapping"}) {
		t.Fatalf("names (priority order) %v", got)
	}
	const k = 0xffff888000001000
	for _, c := range []struct {
		name string
		r    *events.Record
		want []string
	}{
		{"rwx user map", rec(vasmon.Mode4, 0x1000, 0, 0x1000|p|rw|us, false), []string{"wx-user-page", "new-executable-mapping"}},
		{"mprotect +X of a RW page", rec(vasmon.Mode4, 0x1000, 0x1000|p|rw|us|nx, 0x1000|p|rw|us, false), []string{"wx-user-page", "new-executable-mapping"}},
		{"RWX page remapped: already W^X", rec(vasmon.Mode4, 0x1000, 0x1000|p|rw|us, 0x2000|p|rw|us, false), nil},
		{"RW data map", rec(vasmon.Mode4, 0x1000, 0, 0x1000|p|rw|us|nx, false), nil},
		{"RX code map", rec(vasmon.Mode4, 0x1000, 0, 0x1000|p|us, false), []string{"new-executable-mapping"}},
		{"RWX kernel page (not user)", rec(vasmon.Mode4, k, 0, 0x1000|p|rw, true), nil},
		{"kernel perm change, full-space root", rec(vasmon.Mode4, k, 0x1000|p|rw|nx, 0x1000|p|nx, true), []string{"kernel-mapping-changed"}},
		{"kernel perm change, user-half root", rec(vasmon.Mode4, k, 0x1000|p|rw|nx, 0x1000|p|nx, false), nil},
		{"kernel remap, 32-bit", rec(vasmon.Mode32, 0xc0001000, 0x1000|p|rw, 0x2000|p|rw, true), []string{"kernel-mapping-changed"}},
		{"kernel new map", rec(vasmon.Mode4, k, 0, 0x1000|p|rw|nx, true), nil},
		{"watched remap", rec(vasmon.Mode4, 0x7ff000, 0x1000|p|us|nx, 0x2000|p|us|nx, false), []string{"watched-range-remapped"}},
		{"remap next to the range", rec(vasmon.Mode4, 0x800000, 0x1000|p|us|nx, 0x2000|p|us|nx, false), nil},
		{"watched map", rec(vasmon.Mode4, 0x7ff000, 0, 0x2000|p|us|nx, false), nil},
	} {
		if got := matches(t, s, c.r); !slices.Equal(got, c.want) {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
	r := rec(vasmon.Mode4, 0x7ff000, 0x1000|p|us|nx, 0x2000|p|us|nx, false)
	i := uint16(slices.Index(s.Names(), "watched-range-remapped"))
	out := string(s.AppendOutput(nil, i, r, &events.RootInfo{Name: "vm3/pid 41"}, "h1"))
	if want := "watched range vdso remapped at 0x7ff000 (0x8000000000001005 -> 0x8000000000002005) in vm3/pid 41 of vm 3 on h1"; out != want {
		t.Errorf("output %q, want %q", out, want)
	}
}

func TestUserRules(t *testing.T) {
	s, err := Parse("r.yaml", []byte(`
version: 1
rules:
  - name: wx-user-page
    enabled: false
  - name: kernel-mapping-changed
    condition: kernel
    priority: debug
    output: "%%%rule %priority %va%%"
  - name: big-pages
    condition: size >= 0x200000u && root.startsWith("vm3/") && host == "h1"
    priority: ERROR
    output: "%size %root %changes %kind %gained %lost %perm %old_perm %w %mode %cr3 %seq"
`))
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Names(); !slices.Equal(got, []string{"big-pages", "watched-range-remapped", "new-executable-mapping", "kernel-mapping-changed"}) {
		t.Fatalf("names %v", got)
	}
	r := rec(vasmon.Mode4, 0x200000, 0, 0x200000|p|rw|vasmon.BitPS, false)
	r.Size = 2 << 20
	if got := matches(t, s, r); !slices.Equal(got, []string{"big-pages", "new-executable-mapping"}) {
		t.Errorf("matches %v", got)
	}
	out := string(s.AppendOutput(nil, 0, r, &events.RootInfo{Name: "vm3/pid 41"}, "h1"))
	if want := "2097152 vm3/pid 41 +W +X map WX  WX  true 4-level 0x5000 9"; out != want {
		t.Errorf("output %q, want %q", out, want)
	}
	out = string(s.AppendOutput(nil, 3, r, &events.RootInfo{}, "h1"))
	if want := "%kernel-mapping-changed debug 0x200000%"; out != want {
		t.Errorf("output %q, want %q", out, want)
	}
	if s, err = Parse("r.yaml", []byte("defaults: false\n")); err != nil || len(s.Names()) != 0 {
		t.Errorf("defaults: false: %v %v", s.Names(), err)
	}
}

func TestBadInput(t *testing.T) {
	many := "rules:\n"
	for i := range MaxRules + 1 {
		many += "  - {name: r" + strconv.Itoa(i) + ", condition: w, priority: info, output: x}\n"
	}
	bomb := "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n" +
		"d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n" +
		"g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\nrules: *h\n"
	for _, c := range []struct {
		name, data string
		want       []string // substrings of the one-line error
	}{
		{"syntax", "rules:\n  - name: r1\n    condition: w && (x ||\n    priority: info\n    output: x\n", []string{"bad.yaml:2:", `rule "r1"`, "column 11", "Syntax error"}},
		{"undeclared", "rules:\n  - name: r2\n    condition: w && bogus\n    priority: info\n    output: x\n", []string{"bad.yaml:2:", `rule "r2"`, "column 6", "undeclared reference to 'bogus'"}},
		{"type", "rules:\n  - name: r3\n    condition: va > 4096\n    priority: info\n    output: x\n", []string{`rule "r3"`, "column 4", "no matching overload"}},
		{"not bool", "rules:\n  - name: r4\n    condition: va + 1u\n    priority: info\n    output: x\n", []string{`rule "r4"`, "type uint, want bool"}},
		{"unknown field", "rules:\n  - name: r5\n    conditon: w\n    priority: info\n    output: x\n", []string{"bad.yaml:", "line 3", "field conditon not found"}},
		{"unknown top field", "rule:\n  - name: r5\n", []string{"line 1", "field rule not found"}},
		{"output field", "rules:\n  - name: r6\n    condition: w\n    priority: info\n    output: at %va in %proc\n", []string{`rule "r6"`, "output column 11", "unknown field %proc"}},
		{"priority", "rules:\n  - name: r7\n    condition: w\n    priority: urgent\n    output: x\n", []string{`rule "r7"`, `priority "urgent"`}},
		{"no condition", "rules:\n  - name: r8\n    priority: info\n    output: x\n", []string{`rule "r8"`, "no condition"}},
		{"twice", "rules:\n  - {name: r9, condition: w, priority: info, output: x}\n  - {name: r9, condition: w, priority: info, output: x}\n", []string{"bad.yaml:3:", `rule "r9"`, "defined twice (also line 2)"}},
		{"no name", "rules:\n  - {condition: w, priority: info, output: x}\n", []string{"bad.yaml:2:", "rule 1 has no name"}},
		{"yaml syntax", "rules:\n\t- name: x\n", []string{"bad.yaml:", "line 2"}},
		{"wrong type", "rules: 5\n", []string{"bad.yaml:", "cannot unmarshal"}},
		{"version", "version: 2\n", []string{"version 2"}},
		{"watch", "watch:\n  - {name: w, start: 0x2000, end: 0x1000}\n", []string{`watched range "w"`}},
		{"too many", many, []string{"1029 rules: at most 1024"}},
		{"huge", "rules: []\n#" + strings.Repeat("x", MaxFileBytes), []string{"larger than 1048576 bytes"}},
		{"long condition", "rules:\n  - {name: r10, priority: info, output: x, condition: " + strings.Repeat("w && ", 1000) + "w}\n", []string{`rule "r10"`, "at most 4096"}},
		// A billion laughs: refused before anything is expanded (no field
		// takes a sequence of sequences), with the first error only.
		{"alias bomb", bomb, []string{"bad.yaml: line 1: field a not found", "(and 16 more errors)"}},
	} {
		_, err := Parse("bad.yaml", []byte(c.data))
		if err == nil {
			t.Errorf("%s: no error", c.name)
			continue
		}
		msg := err.Error()
		if strings.Contains(msg, "\n") {
			t.Errorf("%s: error of several lines: %q", c.name, msg)
		}
		for _, w := range c.want {
			if !strings.Contains(msg, w) {
				t.Errorf("%s: error %q lacks %q", c.name, msg, w)
			}
		}
	}
	// Load reads at most MaxFileBytes+1 of a file.
	path := filepath.Join(t.TempDir(), "huge.yaml")
	if err := os.WriteFile(path, []byte("rules: []\n#"+strings.Repeat("x", 4*MaxFileBytes)), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), "huge.yaml: larger than") {
		t.Errorf("huge file: %v", err)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "none.yaml")); err == nil {
		t.Error("missing file: no error")
	}
}

func TestMatchAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocations are not measured under the race detector")
	}
	s, err := Parse("w.yaml", []byte("watch: [{name: a, start: 0x1000, end: 0x2000}]\nrules:\n  - {name: named, condition: 'root == \"vm3/pid 41\" && host != \"\"', priority: info, output: x}\n"))
	if err != nil {
		t.Fatal(err)
	}
	m := s.NewMatcher("h1")
	root := &events.RootInfo{Name: "vm3/pid 41"}
	recs := []*events.Record{
		rec(vasmon.Mode4, 0x1000, 0, 0x1000|p|rw|us, false),
		rec(vasmon.Mode4, 0xffff888000001000, 0x1000|p|rw|nx, 0x1000|p|nx, true),
		rec(vasmon.Mode4, 0x1000, 0x1000|p|us|nx, 0x2000|p|us|nx, false),
	}
	hits := make([]uint16, 0, 16)
	m.Match(recs[0], root, hits) // the root's name is boxed once
	i := 0
	if a := testing.AllocsPerRun(1000, func() {
		hits = m.Match(recs[i%len(recs)], root, hits[:0])
		i++
	}); a != 0 {
		t.Errorf("Match: %v allocations", a)
	}
}

// BenchmarkMatch is the rules' cost per record: the built-in set (four
// rules, one watched range) over a mix of records.
func BenchmarkMatch(b *testing.B) {
	s, err := Parse("w.yaml", []byte("watch: [{name: a, start: 0x1000, end: 0x2000}]\n"))
	if err != nil {
		b.Fatal(err)
	}
	benchMatch(b, s)
}

// BenchmarkMatchOneRule is the cost of one rule per record.
func BenchmarkMatchOneRule(b *testing.B) {
	s, err := Parse("one.yaml", []byte("defaults: false\nrules:\n  - {name: wx, condition: 'w && x && u && !(old_w && old_x) && kind in [\"map\", \"perm\", \"remap\"]', priority: critical, output: x}\n"))
	if err != nil {
		b.Fatal(err)
	}
	benchMatch(b, s)
}

func benchMatch(b *testing.B, s *Set) {
	m := s.NewMatcher("h1")
	root := &events.RootInfo{Name: "vm3/pid 41"}
	recs := []*events.Record{
		rec(vasmon.Mode4, 0x1000, 0, 0x1000|p|rw|us, false),
		rec(vasmon.Mode4, 0xffff888000001000, 0x1000|p|rw|nx, 0x1000|p|nx, true),
		rec(vasmon.Mode4, 0x1000, 0x1000|p|us|nx, 0x2000|p|us|nx, false),
		rec(vasmon.Mode4, 0x7f0000001000, 0, 0x2000|p|rw|us|nx, false),
	}
	hits := make([]uint16, 0, 16)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		hits = m.Match(recs[i&3], root, hits[:0])
		i++
	}
}
