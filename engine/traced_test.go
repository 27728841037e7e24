package engine_test

import (
	"context"
	"sync"
	"testing"

	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// RootOptions.Traced is called instead of the callback, with the trap time
// of the event that caused each change.
func TestTracedCallback(t *testing.T) {
	for _, serialize := range []bool{false, true} {
		e, err := engine.New(engine.Config{Shards: 2})
		if err != nil {
			t.Fatal(err)
		}
		g := vasmontest.NewGuest(vasmon.Mode4, 16<<20, 1<<20)
		if err := e.AddVM(1, g.Memory(), g.NewProtections(), 0); err != nil {
			t.Fatal(err)
		}
		cr3 := g.AllocTable()
		g.Map(cr3, 0x400000, 1, 0x200000, vasmon.BitRW|vasmon.BitUS)
		var mu sync.Mutex
		traps := map[uint64]int64{}
		plain := 0
		traced := func(_ any, va, old, new, size uint64, trap int64) {
			mu.Lock()
			traps[va] = trap
			mu.Unlock()
		}
		cb := func(any, uint64, uint64, uint64, uint64) { plain++ }
		ctx := context.Background()
		if _, err := e.Start(ctx, 1, cr3, vasmon.Mode4, vasmon.BitRW|vasmon.BitUS, cb, nil,
			engine.RootOptions{Traced: traced, SerializeCallbacks: serialize}); err != nil {
			t.Fatal(err)
		}
		t1 := vasmon.Mode4.TableAddr(g.Entry(vasmon.Mode4.TableAddr(g.Entry(vasmon.Mode4.TableAddr(g.Entry(cr3, 0)), 0)), 2))
		w := g.SetEntry(t1, 1, 0x300000|vasmon.BitP|vasmon.BitRW|vasmon.BitUS)
		const trap = 987654321
		ev := shard.Event{GPA: w.GPA, Data: w.Data, Old: w.Old, HasOld: true, Size: w.Size, Ver: w.Ver, Stamped: w.Stamped, Trap: trap}
		if _, err := e.Submit(1, []shard.Event{ev}); err != nil {
			t.Fatal(err)
		}
		if err := e.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		got, ok := traps[0x401000]
		mu.Unlock()
		if !ok || got != trap || plain != 0 {
			t.Errorf("serialize %v: traced callback for 0x401000: %v, trap %d (want %d); plain callback called %d times",
				serialize, ok, got, int64(trap), plain)
		}
		e.Close()
	}
}
