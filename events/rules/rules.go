// Package rules compiles the event rules of vasengine: named conditions
// over a change record (events.Record) in CEL, the Common Expression
// Language (github.com/google/cel-go), each with a priority and an output
// text, loaded from YAML; a default set is built in (default.yaml).
//
// # Contract
//
// Loading: Load and Parse read a whole file at once (at most MaxFileBytes,
// MaxRules rules) and compile and type-check every condition and output
// once; any error is one line naming the file, the YAML line, the rule and
// the column within the condition or output.
//
// Concurrency: a Set is immutable and safe for concurrent use; each
// goroutine that evaluates records takes its own Matcher (NewMatcher).
//
// Allocation: a Matcher evaluates a record without allocating (the
// variables are resolved from the record on demand, from tables of
// preallocated CEL values); AppendOutput allocates only when dst grows.
//
// Ownership: Match appends to the caller's slice and keeps no reference to
// the record.
package rules

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/common/types/ref"
	"github.com/google/cel-go/interpreter"
	"gopkg.in/yaml.v3"

	"github.com/vasengine/vasengine/events"
	"github.com/vasengine/vasengine/vasmon"
)

//go:embed default.yaml
var defaultYAML []byte

// Limits of a rules file.
const (
	MaxFileBytes  = 1 << 20
	MaxRules      = 1024
	MaxCondition  = 4096 // bytes of one condition
	MaxWatch      = 4096 // watched ranges
	maxOutputSize = 4096
)

// Priorities, highest first (Falco's, syslog's).
var Priorities = []string{"emergency", "alert", "critical", "error", "warning", "notice", "informational", "debug"}

// Variables are the names a condition can use, with their CEL types; the
// same names, with %, are the output text's fields (README "Events").
var Variables = []struct {
	Name string
	Type *cel.Type
	Doc  string
}{
	{"vm", cel.UintType, "the VM's id"},
	{"seq", cel.UintType, "the record's number among its VM's records"},
	{"cr3", cel.UintType, "the root's CR3"},
	{"va", cel.UintType, "first address of the mapping"},
	{"size", cel.UintType, "page size"},
	{"old", cel.UintType, "entry before"},
	{"new", cel.UintType, "entry after"},
	{"mode", cel.StringType, `paging mode: "32-bit", "pae", "4-level", "5-level"`},
	{"root", cel.StringType, `the backend's name for the root ("vm3/pid 41")`},
	{"host", cel.StringType, "the host's name"},
	{"kind", cel.StringType, `"map", "unmap", "remap", "perm", "split", "merge", "other"`},
	{"w", cel.BoolType, "writable after"},
	{"x", cel.BoolType, "executable after"},
	{"u", cel.BoolType, "user-accessible after"},
	{"old_w", cel.BoolType, "writable before"},
	{"old_x", cel.BoolType, "executable before"},
	{"old_u", cel.BoolType, "user-accessible before"},
	{"perm", cel.StringType, `permissions after, of "WXU"`},
	{"old_perm", cel.StringType, `permissions before, of "WXU"`},
	{"gained", cel.StringType, `permissions gained, of "WXU"`},
	{"lost", cel.StringType, `permissions lost, of "WXU"`},
	{"changes", cel.StringType, `gains and losses: "+W -X"`},
	{"kernel", cel.BoolType, "va is in the upper (kernel) half"},
	{"full_space", cel.BoolType, "the root monitors the kernel half too"},
	{"watched", cel.BoolType, "va is in a watched range (watch:)"},
}

// outputOnly are output fields that are not condition variables.
var outputOnly = []string{"rule", "priority", "time", "watch"}

// Rule is one compiled rule.
type Rule struct {
	Name      string
	Condition string
	Priority  string
	Output    string
	prio      int
	prog      cel.Program
	out       []segment
}

// segment is a piece of an output text: literal text or a field.
type segment struct {
	text  string
	field string
}

// Range is a watched VA range [Start, End).
type Range struct {
	Name       string
	Start, End uint64
}

// Set is a compiled rule set. It implements events.Rules.
type Set struct {
	rules []*Rule // in priority order, then file order
	names []string
	watch []Range // sorted by Start
}

var _ events.Rules = (*Set)(nil)

type fileRule struct {
	Name      string `yaml:"name"`
	Condition string `yaml:"condition"`
	Priority  string `yaml:"priority"`
	Output    string `yaml:"output"`
	Enabled   *bool  `yaml:"enabled"`
}

type fileRange struct {
	Name  string `yaml:"name"`
	Start uint64 `yaml:"start"`
	End   uint64 `yaml:"end"`
}

type file struct {
	Version  int         `yaml:"version"`
	Defaults *bool       `yaml:"defaults"`
	Watch    []fileRange `yaml:"watch"`
	Rules    []fileRule  `yaml:"rules"`
}

// Default returns the built-in rule set.
func Default() *Set {
	s, err := Parse("default.yaml", nil)
	if err != nil {
		panic(err)
	}
	return s
}

// Load reads and compiles a rules file, added to the built-in rules unless
// it says `defaults: false`.
func Load(path string) (*Set, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(data) > MaxFileBytes {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, MaxFileBytes)
	}
	return Parse(path, data)
}

// Parse compiles the rules file data (named name in errors) over the
// built-in rules; nil data: the built-in rules alone.
func Parse(name string, data []byte) (*Set, error) {
	def, _, err := decode("default.yaml", defaultYAML)
	if err != nil {
		return nil, err
	}
	var user file
	var lines []int
	if data != nil {
		if len(data) > MaxFileBytes {
			return nil, fmt.Errorf("%s: larger than %d bytes", name, MaxFileBytes)
		}
		if user, lines, err = decode(name, data); err != nil {
			return nil, err
		}
	}
	if user.Version != 0 && user.Version != 1 {
		return nil, fmt.Errorf("%s: version %d: this vasengine reads version 1", name, user.Version)
	}
	// Rules in order, a user rule replacing a built-in one of its name.
	type src struct {
		r    fileRule
		file string
		line int
	}
	var all []src
	if user.Defaults == nil || *user.Defaults {
		_, dlines, _ := decode("default.yaml", defaultYAML)
		for i, r := range def.Rules {
			all = append(all, src{r, "default.yaml", dlines[i]})
		}
	}
	for i, r := range user.Rules {
		s := src{r, name, lines[i]}
		if r.Name == "" {
			return nil, fmt.Errorf("%s:%d: rule %d has no name", name, s.line, i+1)
		}
		if j := slices.IndexFunc(all, func(a src) bool { return a.r.Name == r.Name }); j >= 0 {
			if all[j].file == name {
				return nil, fmt.Errorf("%s:%d: rule %q: defined twice (also line %d)", name, s.line, r.Name, all[j].line)
			}
			// Only enabled may be given to turn a built-in rule off or on.
			if r.Condition == "" && r.Output == "" && r.Priority == "" && r.Enabled != nil {
				all[j].r.Enabled = r.Enabled
				continue
			}
			all[j] = s
			continue
		}
		all = append(all, s)
	}
	if len(all) > MaxRules {
		return nil, fmt.Errorf("%s: %d rules: at most %d", name, len(all), MaxRules)
	}
	set := &Set{}
	if len(user.Watch) > MaxWatch {
		return nil, fmt.Errorf("%s: %d watched ranges: at most %d", name, len(user.Watch), MaxWatch)
	}
	for _, w := range user.Watch {
		if w.End <= w.Start {
			return nil, fmt.Errorf("%s: watched range %q: end %#x not after start %#x", name, w.Name, w.End, w.Start)
		}
		set.watch = append(set.watch, Range(w))
	}
	slices.SortFunc(set.watch, func(a, b Range) int { return cmpU(a.Start, b.Start) })
	env, err := newEnv()
	if err != nil {
		return nil, err
	}
	for _, s := range all {
		if s.r.Enabled != nil && !*s.r.Enabled {
			continue
		}
		r, err := compile(env, s.r)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: rule %q: %w", s.file, s.line, s.r.Name, err)
		}
		set.rules = append(set.rules, r)
	}
	slices.SortStableFunc(set.rules, func(a, b *Rule) int { return a.prio - b.prio })
	for _, r := range set.rules {
		set.names = append(set.names, r.Name)
	}
	return set, nil
}

func cmpU(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// decode reads a rules file strictly (unknown fields are errors) and
// returns the YAML line of each rule.
func decode(name string, data []byte) (file, []int, error) {
	var f file
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		var te *yaml.TypeError
		if errors.As(err, &te) && len(te.Errors) > 0 {
			more := ""
			if len(te.Errors) > 1 {
				more = fmt.Sprintf(" (and %d more errors)", len(te.Errors)-1)
			}
			return f, nil, fmt.Errorf("%s: %s%s", name, oneLine(te.Errors[0]), more)
		}
		return f, nil, fmt.Errorf("%s: %s", name, oneLine(strings.TrimPrefix(err.Error(), "yaml: ")))
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return f, nil, fmt.Errorf("%s: %s", name, oneLine(err.Error()))
	}
	lines := make([]int, len(f.Rules))
	if len(doc.Content) == 1 && doc.Content[0].Kind == yaml.MappingNode {
		m := doc.Content[0]
		for i := 0; i+1 < len(m.Content); i += 2 {
			if m.Content[i].Value == "rules" && m.Content[i+1].Kind == yaml.SequenceNode {
				for j, n := range m.Content[i+1].Content {
					if j < len(lines) {
						lines[j] = n.Line
					}
				}
			}
		}
	}
	return f, lines, nil
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

func newEnv() (*cel.Env, error) {
	var opts []cel.EnvOption
	for _, v := range Variables {
		opts = append(opts, cel.Variable(v.Name, v.Type))
	}
	return cel.NewEnv(opts...)
}

func compile(env *cel.Env, fr fileRule) (*Rule, error) {
	r := &Rule{Name: fr.Name, Condition: fr.Condition, Priority: fr.Priority, Output: fr.Output}
	if r.Priority == "" {
		return nil, errors.New("no priority (want one of " + strings.Join(Priorities, ", ") + ")")
	}
	r.prio = slices.Index(Priorities, strings.ToLower(r.Priority))
	if r.prio < 0 && strings.EqualFold(r.Priority, "info") {
		r.prio = slices.Index(Priorities, "informational")
	}
	if r.prio < 0 {
		return nil, fmt.Errorf("priority %q: want one of %s", r.Priority, strings.Join(Priorities, ", "))
	}
	r.Priority = Priorities[r.prio]
	if strings.TrimSpace(r.Condition) == "" {
		return nil, errors.New("no condition")
	}
	if len(r.Condition) > MaxCondition {
		return nil, fmt.Errorf("condition of %d bytes: at most %d", len(r.Condition), MaxCondition)
	}
	ast, iss := env.Compile(r.Condition)
	if iss != nil && iss.Err() != nil {
		e := iss.Errors()[0]
		loc := e.Location
		return nil, fmt.Errorf("condition line %d column %d: %s", loc.Line(), loc.Column()+1, oneLine(e.Message))
	}
	if !ast.OutputType().IsExactType(cel.BoolType) {
		return nil, fmt.Errorf("condition column 1: is of type %s, want bool", ast.OutputType())
	}
	prog, err := env.Program(ast, cel.EvalOptions(cel.OptOptimize))
	if err != nil {
		return nil, fmt.Errorf("condition: %s", oneLine(err.Error()))
	}
	r.prog = prog
	if r.out, err = parseOutput(r.Output); err != nil {
		return nil, err
	}
	return r, nil
}

// parseOutput splits an output text into literals and %fields ("%%" is a
// percent sign).
func parseOutput(s string) ([]segment, error) {
	if s == "" {
		return nil, errors.New("no output")
	}
	if len(s) > maxOutputSize {
		return nil, fmt.Errorf("output of %d bytes: at most %d", len(s), maxOutputSize)
	}
	var segs []segment
	lit := 0
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			continue
		}
		if i+1 < len(s) && s[i+1] == '%' {
			segs = append(segs, segment{text: s[lit : i+1]})
			i++
			lit = i + 1
			continue
		}
		j := i + 1
		for j < len(s) && (s[j] >= 'a' && s[j] <= 'z' || s[j] == '_' || s[j] >= '0' && s[j] <= '9') {
			j++
		}
		f := s[i+1 : j]
		if !isField(f) {
			return nil, fmt.Errorf("output column %d: unknown field %%%s", i+1, f)
		}
		if lit < i {
			segs = append(segs, segment{text: s[lit:i]})
		}
		segs = append(segs, segment{field: f})
		i, lit = j-1, j
	}
	if lit < len(s) {
		segs = append(segs, segment{text: s[lit:]})
	}
	return segs, nil
}

func isField(f string) bool {
	if slices.Contains(outputOnly, f) {
		return true
	}
	for _, v := range Variables {
		if v.Name == f {
			return true
		}
	}
	return false
}

// Rules returns the compiled rules in priority order.
func (s *Set) Rules() []*Rule { return s.rules }

// Watch returns the watched ranges.
func (s *Set) Watch() []Range { return s.watch }

// Names implements events.Rules.
func (s *Set) Names() []string { return s.names }

// Priority implements events.Rules.
func (s *Set) Priority(i uint16) string { return s.rules[i].Priority }

// watchOf returns the watched range holding va, or nil.
func (s *Set) watchOf(va uint64) *Range {
	i, _ := slices.BinarySearchFunc(s.watch, va, func(r Range, v uint64) int {
		if r.Start > v {
			return 1
		}
		return -1
	})
	// s.watch[:i] start at or before va; ranges may overlap: look back.
	for j := i - 1; j >= 0; j-- {
		if va < s.watch[j].End {
			return &s.watch[j]
		}
	}
	return nil
}

// AppendOutput implements events.Rules.
func (s *Set) AppendOutput(dst []byte, i uint16, r *events.Record, root *events.RootInfo, host string) []byte {
	rule := s.rules[i]
	for _, seg := range rule.out {
		if seg.field == "" {
			dst = append(dst, seg.text...)
			continue
		}
		switch seg.field {
		case "rule":
			dst = append(dst, rule.Name...)
		case "priority":
			dst = append(dst, rule.Priority...)
		case "time":
			dst = strconv.AppendInt(dst, r.Time, 10)
		case "watch":
			if w := s.watchOf(r.VA); w != nil {
				dst = append(dst, w.Name...)
			}
		case "root":
			if root.Name != "" {
				dst = append(dst, root.Name...)
			} else {
				dst = append(dst, "cr3 0x"...)
				dst = strconv.AppendUint(dst, r.CR3, 16)
			}
		default:
			a := activation{r: r, root: root, host: host, set: s}
			switch v := a.value(seg.field).(type) {
			case types.Uint:
				if seg.field == "vm" || seg.field == "seq" || seg.field == "size" {
					dst = strconv.AppendUint(dst, uint64(v), 10)
				} else {
					dst = append(dst, "0x"...)
					dst = strconv.AppendUint(dst, uint64(v), 16)
				}
			case types.String:
				dst = append(dst, string(v)...)
			case types.Bool:
				dst = strconv.AppendBool(dst, bool(v))
			}
		}
	}
	return dst
}

// NewMatcher implements events.Rules.
func (s *Set) NewMatcher(host string) events.Matcher {
	return &matcher{s: s, host: types.String(host), names: map[*events.RootInfo]ref.Val{}}
}

type matcher struct {
	s     *Set
	a     activation
	host  ref.Val
	names map[*events.RootInfo]ref.Val // boxed root names
}

// maxNames bounds a matcher's cache of boxed root names.
const maxNames = 1 << 14

// Match implements events.Matcher.
func (m *matcher) Match(r *events.Record, root *events.RootInfo, hits []uint16) []uint16 {
	name := m.names[root]
	if name == nil {
		if len(m.names) >= maxNames {
			clear(m.names)
		}
		name = types.String(root.Name)
		m.names[root] = name
	}
	m.a = activation{r: r, root: root, set: m.s, hostVal: m.host, nameVal: name}
	for i, rule := range m.s.rules {
		out, _, err := rule.prog.Eval(&m.a)
		if err == nil && out == types.True {
			hits = append(hits, uint16(i))
		}
	}
	m.a = activation{}
	return hits
}

// activation resolves a condition's variables from a record.
type activation struct {
	r    *events.Record
	root *events.RootInfo
	host string
	set  *Set
	// hostVal and nameVal are host and root.Name boxed (nil: box them).
	hostVal, nameVal ref.Val
}

var (
	kindVals [8]ref.Val
	permVals [8]ref.Val
	chgVals  [64]ref.Val
	modeVals [8]ref.Val
)

func init() {
	for k := range kindVals {
		kindVals[k] = types.String(events.Kind(k).String())
	}
	for p := range permVals {
		permVals[p] = types.String(events.Perm(p).String())
	}
	for g := range 8 {
		for l := range 8 {
			chgVals[g<<3|l] = types.String(events.Changes(events.Perm(g), events.Perm(l)))
		}
	}
	for m := range modeVals {
		modeVals[m] = types.String(modeName(m))
	}
}

func modeName(m int) string {
	if slices.Contains(vasmon.Modes, vasmon.Mode(m)) {
		return vasmon.Mode(m).String()
	}
	return "unknown"
}

func (a *activation) ResolveName(name string) (any, bool) {
	v := a.value(name)
	return v, v != nil
}

func (a *activation) Parent() interpreter.Activation { return nil }

func (a *activation) value(name string) ref.Val {
	r := a.r
	switch name {
	case "vm":
		return types.Uint(r.VM)
	case "seq":
		return types.Uint(r.Seq)
	case "cr3":
		return types.Uint(r.CR3)
	case "va":
		return types.Uint(r.VA)
	case "size":
		return types.Uint(r.Size)
	case "old":
		return types.Uint(r.Old)
	case "new":
		return types.Uint(r.New)
	case "mode":
		return modeVals[r.Mode&7]
	case "root":
		if a.nameVal != nil {
			return a.nameVal
		}
		return types.String(a.root.Name)
	case "host":
		if a.hostVal != nil {
			return a.hostVal
		}
		return types.String(a.host)
	case "kind":
		return kindVals[r.Kind&7]
	case "w":
		return types.Bool(events.PermOf(r.New)&events.PermW != 0)
	case "x":
		return types.Bool(events.PermOf(r.New)&events.PermX != 0)
	case "u":
		return types.Bool(events.PermOf(r.New)&events.PermU != 0)
	case "old_w":
		return types.Bool(events.PermOf(r.Old)&events.PermW != 0)
	case "old_x":
		return types.Bool(events.PermOf(r.Old)&events.PermX != 0)
	case "old_u":
		return types.Bool(events.PermOf(r.Old)&events.PermU != 0)
	case "perm":
		return permVals[events.PermOf(r.New)&7]
	case "old_perm":
		return permVals[events.PermOf(r.Old)&7]
	case "gained":
		return permVals[r.Gained&7]
	case "lost":
		return permVals[r.Lost&7]
	case "changes":
		return chgVals[(r.Gained&7)<<3|r.Lost&7]
	case "kernel":
		return types.Bool(r.Flags&events.FlagKernel != 0)
	case "full_space":
		return types.Bool(r.Flags&events.FlagFullSpace != 0)
	case "watched":
		return types.Bool(a.set.watchOf(r.VA) != nil)
	}
	return nil
}
