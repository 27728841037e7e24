// Package langbench measures the per-record cost of the built-in rules'
// conditions in the two expression languages considered for vasengine's
// rules, CEL (github.com/google/cel-go) and expr (github.com/expr-lang/expr),
// each with its fastest variable binding found: CEL with an Activation that
// resolves names from the record into preallocated values, expr with a
// struct environment (its fields read by reflection).
//
//	cd events/rules/langbench && go test -bench . -benchmem
package langbench

import (
	"testing"

	"github.com/expr-lang/expr"
	"github.com/expr-lang/expr/vm"
	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/common/types/ref"
	"github.com/google/cel-go/interpreter"
)

// The built-in rules' conditions (events/rules/default.yaml); expr writes
// unsigned literals without CEL's u suffix.
var celConds = []string{
	`w && x && u && !(old_w && old_x) && kind in ["map", "perm", "remap"]`,
	`kernel && full_space && kind in ["remap", "perm"]`,
	`x && !old_x && !kernel && kind in ["map", "perm", "remap"]`,
	`watched && kind == "remap" && va >= 0x400000u`,
}

var exprConds = []string{
	`w && x && u && !(old_w && old_x) && kind in ["map", "perm", "remap"]`,
	`kernel && full_space && kind in ["remap", "perm"]`,
	`x && !old_x && !kernel && kind in ["map", "perm", "remap"]`,
	`watched && kind == "remap" && va >= 0x400000`,
}

type rec struct {
	va                          uint64
	kind                        int
	w, x, u, ow, ox, kernel, fs bool
	watched                     bool
}

func recs() []rec {
	return []rec{
		{va: 0x1000, kind: 0, w: true, x: true, u: true},
		{va: 0xffff888000001000, kind: 1, x: true, ow: true, ox: true, kernel: true, fs: true},
		{va: 0x401000, kind: 2, u: true, watched: true},
		{va: 0x7f0000001000, kind: 0, w: true, u: true},
	}
}

var kinds = []string{"map", "perm", "remap", "unmap"}

type Env struct {
	VA      uint64 `expr:"va"`
	Kind    string `expr:"kind"`
	W       bool   `expr:"w"`
	X       bool   `expr:"x"`
	U       bool   `expr:"u"`
	OldW    bool   `expr:"old_w"`
	OldX    bool   `expr:"old_x"`
	Kernel  bool   `expr:"kernel"`
	Full    bool   `expr:"full_space"`
	Watched bool   `expr:"watched"`
}

func BenchmarkExpr(b *testing.B) {
	var progs []*vm.Program
	for _, c := range exprConds {
		p, err := expr.Compile(c, expr.Env(Env{}), expr.AsBool())
		if err != nil {
			b.Fatal(err)
		}
		progs = append(progs, p)
	}
	rs := recs()
	var env Env
	var m vm.VM
	b.ReportAllocs()
	n := 0
	for i := 0; b.Loop(); i++ {
		r := &rs[i&3]
		env = Env{VA: r.va, Kind: kinds[r.kind], W: r.w, X: r.x, U: r.u, OldW: r.ow, OldX: r.ox, Kernel: r.kernel, Full: r.fs, Watched: r.watched}
		for _, p := range progs {
			out, err := m.Run(p, &env)
			if err != nil {
				b.Fatal(err)
			}
			if out.(bool) {
				n++
			}
		}
	}
	if n == 0 {
		b.Fatal("nothing matched")
	}
}

type act struct{ r *rec }

var kindVals = []ref.Val{types.String("map"), types.String("perm"), types.String("remap"), types.String("unmap")}

func (a *act) ResolveName(name string) (any, bool) {
	r := a.r
	switch name {
	case "va":
		return types.Uint(r.va), true
	case "kind":
		return kindVals[r.kind], true
	case "w":
		return types.Bool(r.w), true
	case "x":
		return types.Bool(r.x), true
	case "u":
		return types.Bool(r.u), true
	case "old_w":
		return types.Bool(r.ow), true
	case "old_x":
		return types.Bool(r.ox), true
	case "kernel":
		return types.Bool(r.kernel), true
	case "full_space":
		return types.Bool(r.fs), true
	case "watched":
		return types.Bool(r.watched), true
	}
	return nil, false
}
func (a *act) Parent() interpreter.Activation { return nil }

func BenchmarkCEL(b *testing.B) {
	var opts []cel.EnvOption
	opts = append(opts, cel.Variable("va", cel.UintType), cel.Variable("kind", cel.StringType))
	for _, v := range []string{"w", "x", "u", "old_w", "old_x", "kernel", "full_space", "watched"} {
		opts = append(opts, cel.Variable(v, cel.BoolType))
	}
	env, err := cel.NewEnv(opts...)
	if err != nil {
		b.Fatal(err)
	}
	var progs []cel.Program
	for _, c := range celConds {
		ast, iss := env.Compile(c)
		if iss.Err() != nil {
			b.Fatal(iss.Err())
		}
		p, err := env.Program(ast, cel.EvalOptions(cel.OptOptimize))
		if err != nil {
			b.Fatal(err)
		}
		progs = append(progs, p)
	}
	rs := recs()
	a := &act{}
	b.ReportAllocs()
	n := 0
	for i := 0; b.Loop(); i++ {
		a.r = &rs[i&3]
		for _, p := range progs {
			out, _, err := p.Eval(a)
			if err != nil {
				b.Fatal(err)
			}
			if out == types.True {
				n++
			}
		}
	}
	if n == 0 {
		b.Fatal("nothing matched")
	}
}
