package vasmon_test

import (
	"runtime"
	"testing"

	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
)

// BenchmarkLeafWrite: one monitored leaf change (RW flipped) through
// Monitor.Write, with a no-op callback. 0 allocs/op.
func BenchmarkLeafWrite(b *testing.B) {
	for _, mode := range vasmon.Modes {
		b.Run(mode.String(), func(b *testing.B) {
			s := newSteady(b, mode)
			s.leafPair(b)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				s.write(b, &s.leaf[i&1], vasmon.WriteRelevant)
				i++
			}
		})
	}
}

// BenchmarkPartialWrite: one entry change written as two half-entry
// chunks (as PAE guests do): two Monitor.Write calls per op.
func BenchmarkPartialWrite(b *testing.B) {
	for _, mode := range vasmon.Modes {
		b.Run(mode.String(), func(b *testing.B) {
			s := newSteady(b, mode)
			s.halvesPair(b)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				k := 2 * (i & 1)
				s.write(b, &s.halves[k], vasmon.WritePartial)
				s.write(b, &s.halves[k+1], vasmon.WriteRelevant)
				i++
			}
		})
	}
}

// BenchmarkIrrelevantWrite: an A/D-only change of a leaf.
func BenchmarkIrrelevantWrite(b *testing.B) {
	for _, mode := range vasmon.Modes {
		b.Run(mode.String(), func(b *testing.B) {
			s := newSteady(b, mode)
			s.adPair(b)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				s.write(b, &s.ad[i&1], vasmon.WriteIrrelevant)
				i++
			}
		})
	}
}

// processTree builds a realistic 4-level user address space: 2 PML4Es, 256
// page directories (128 under each PDPT), 16 page tables under each (4096)
// with 64 mappings each. It returns the guest, the CR3 and the number of
// tables.
func processTree(tb testing.TB) (*vasmontest.Guest, uint64, int) {
	g := vasmontest.NewGuest(vasmon.Mode4, 64<<20, 1<<20)
	fl := pBit | rwBit | usBit
	cr3 := g.AllocTable()
	tables := 1
	for i4 := 0; i4 < 2; i4++ {
		t3 := g.AllocTable()
		g.SetEntry(cr3, i4, t3|fl)
		tables++
		for i3 := 0; i3 < 128; i3++ {
			t2 := g.AllocTable()
			g.SetEntry(t3, i3*4, t2|fl)
			tables++
			for i2 := 0; i2 < 16; i2++ {
				t1 := g.AllocTable()
				g.SetEntry(t2, i2*32, t1|fl)
				tables++
				for i1 := 0; i1 < 64; i1++ {
					g.SetEntry(t1, i1*8, uint64(tables*64+i1)<<12|fl)
				}
			}
		}
	}
	return g, cr3, tables
}

// startProcess monitors the tree in a fresh monitor.
func startProcess(tb testing.TB, g *vasmontest.Guest, cr3 uint64) (*vasmon.Monitor, *vasmon.Root) {
	mon := vasmon.NewMonitor()
	if err := mon.AddVM(1, g.Mem, &nopProt{}, 0); err != nil {
		tb.Fatal(err)
	}
	r, err := mon.Start(1, cr3, vasmon.Mode4, monAll, func(any, uint64, uint64, uint64, uint64) {}, nil, vasmon.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	return mon, r
}

// liveBytesPerTable returns the live heap a fresh monitor holds after
// starting the tree, per table.
func liveBytesPerTable(tb testing.TB, g *vasmontest.Guest, cr3 uint64, tables int) float64 {
	var a, b runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&a)
	mon, _ := startProcess(tb, g, cr3)
	runtime.GC()
	runtime.ReadMemStats(&b)
	runtime.KeepAlive(mon)
	return float64(int64(b.HeapAlloc)-int64(a.HeapAlloc)) / float64(tables)
}

// BenchmarkStartMonitor: Start on a realistic tree of 4355 tables (4096
// page tables). Reports tables/s, bytes/table (Store.HostBytes per hooked
// table) and heap-bytes/table (live heap growth per table).
func BenchmarkStartMonitor(b *testing.B) {
	g, cr3, tables := processTree(b)
	var mon *vasmon.Monitor
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		mon = vasmon.NewMonitor()
		if err := mon.AddVM(1, g.Mem, &nopProt{}, 0); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		r, err := mon.Start(1, cr3, vasmon.Mode4, monAll, func(any, uint64, uint64, uint64, uint64) {}, nil, vasmon.Options{})
		if err != nil || r.Tables() != int64(tables) {
			b.Fatalf("Start: %v, %d tables", err, r.Tables())
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(tables)*float64(b.N)/b.Elapsed().Seconds(), "tables/s")
	b.ReportMetric(float64(mon.Store().HostBytes())/float64(tables), "bytes/table")
	b.ReportMetric(liveBytesPerTable(b, g, cr3, tables), "heap-bytes/table")
}

// TestHostBytesPerTable: a hooked table costs at most 4.3 KB of host memory
// (the shadow page and its share of the node, page and index records, the
// node's proof of its place included), by Store.HostBytes and by the live
// heap.
func TestHostBytesPerTable(t *testing.T) {
	g, cr3, tables := processTree(t)
	if tables < 4000 {
		t.Fatalf("%d tables", tables)
	}
	mon, r := startProcess(t, g, cr3)
	if r.Tables() != int64(tables) || mon.Store().Stats().Pages != tables {
		t.Fatalf("%d tables hooked on %d pages, want %d", r.Tables(), mon.Store().Stats().Pages, tables)
	}
	per := float64(mon.Store().HostBytes()) / float64(tables)
	heap := liveBytesPerTable(t, g, cr3, tables)
	t.Logf("%d tables: %.0f host bytes/table, %.0f live heap bytes/table", tables, per, heap)
	if per > 4350 {
		t.Fatalf("HostBytes: %.0f bytes per table, want <= 4350", per)
	}
	// HostBytes must account for what the monitor really holds.
	if heap > 4500 {
		t.Fatalf("live heap: %.0f bytes per table", heap)
	}
}
