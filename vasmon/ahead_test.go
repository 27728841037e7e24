package vasmon_test

import (
	"fmt"
	"testing"

	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// aheadRun drives a Store the way an asynchronous executor does: guest
// memory runs `lag` events ahead of the events the store processes (so
// hooks read the future), and half-done entry writes older than `expire`
// events are completed from memory (Store.ExpirePending). After draining,
// every root must satisfy the oracle.
func aheadRun(t *testing.T, mode vasmon.Mode, seed uint64, lag, expire, steps int) {
	g := vasmontest.NewGuest(mode, 64<<20, 1<<20)
	w := vasmontest.NewRandomWriter(g, seed, 12)
	for k := 0; k < 10; k++ {
		w.Next()
	}
	vm := vasmon.NewVM(1, g.Mem, vasmontest.NewProtections(), 0)
	st := vasmon.NewStore()
	rec := vasmontest.NewRecorder()
	var out vasmon.Output
	run := func() {
		for i := 0; i < len(out.Reqs); i++ {
			req := out.Reqs[i]
			st.Exec(&req, &out)
		}
		for _, c := range out.Calls {
			c.Root.Callback(c.Root.Ctx, c.VA, c.Old, c.New, c.Size)
		}
		out.Reset()
	}
	var roots []*vasmon.Root
	var maps []vasmontest.Map
	for r := 0; r < 2; r++ {
		cr3 := w.Tables[r]
		if mode == vasmon.ModePAE {
			cr3 += uint64(32 * r)
		}
		root, err := vasmon.NewRoot(uint32(r+1), vm, cr3, mode, vasmon.BitRW|vasmon.BitUS|vasmon.BitNX|0xFFFFFFFFFF000, rec.Callback, r, vasmon.Options{})
		if err != nil {
			t.Fatal(err)
		}
		st.Hook(&vasmon.Request{Root: root, GPA: root.RootGPA(), Level: uint8(mode.Levels()), Op: vasmon.OpHook}, &out)
		run()
		m, err := vasmontest.WalkRoot(g.Mem, root)
		if err != nil {
			t.Fatal(err)
		}
		roots, maps = append(roots, root), append(maps, m)
	}
	var queue []vasmon.Write
	clock := int64(0)
	feed := func() {
		ev := queue[0]
		queue = queue[1:]
		clock++
		st.Write(1, &ev, &out)
		run()
		st.ExpirePending(clock-int64(expire), &out)
		run()
	}
	for k := 0; k < steps; k++ {
		for _, ev := range w.Next() {
			ev.Trap = clock + int64(len(queue)) + 1
			queue = append(queue, ev)
		}
		for len(queue) > lag {
			feed()
		}
	}
	for len(queue) > 0 {
		feed()
	}
	st.ExpirePending(1<<62, &out)
	run()
	for r, root := range roots {
		vasmontest.Apply(maps[r], mode, root.Monitored, rec.Take(r))
		want, err := vasmontest.WalkRoot(g.Mem, root)
		if err != nil {
			t.Fatal(err)
		}
		if d := vasmontest.Diff(want, maps[r], 10); d != "" {
			t.Fatalf("root %d: oracle violated: %s", r, d)
		}
	}
}

// TestAheadOracle: the store keeps the oracle when guest memory runs ahead
// of the events it processes, as it does under the sharded engine.
func TestAheadOracle(t *testing.T) {
	steps := 3000
	if testing.Short() {
		steps = 600
	}
	for _, mode := range vasmon.Modes {
		for _, lag := range []int{1, 3, 20} {
			for _, expire := range []int{2, 50} {
				for seed := uint64(1); seed <= 4; seed++ {
					t.Run(fmt.Sprintf("%v/lag=%d/expire=%d/seed=%d", mode, lag, expire, seed), func(t *testing.T) {
						aheadRun(t, mode, seed, lag, expire, steps)
					})
				}
			}
		}
	}
}
