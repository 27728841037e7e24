package qemu_test

import (
	"cmp"
	"context"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/qemu"
	"github.com/vasengine/vasengine/engine"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func cpuSelf() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type figure struct {
	mode                       string
	workload, wall             time.Duration
	qemuCPU, goCPU             time.Duration
	stores, records, submitted uint64
	tableStores, narrow        uint64
	roots                      qemu.RootStats
	callbacks                  uint64
	p50, p99, p999, max        time.Duration
	stall50, stall99, held     time.Duration // sync: the engine's stall (Syncer.Submit), the plugin's mean hold
	giveUps                    uint64
	drops                      uint64
}

// TestFigures measures the README's figures; it runs only with
// VASENGINE_QEMU_FIGURES=1 (about a minute). The same fixed workload
// (FIG_WORKLOAD rounds FIG_ROUNDS, FIG_JOBS copies; default fork, 150, 1) runs
// four times: without the plugin, with the plugin and a null consumer
// (records drained and discarded, nothing protected beyond the sampling:
// the plugin alone), with the engine (FIG_SHARDS shards, unpinned; default
// 2), and with the engine and synchronous delivery (Config.Sync). With
// FIG_REPEAT=n (default 1) the runs are repeated n times, in turn, and the
// engine runs are compared with the null consumer on each mode's median
// run (by workload time), which a shared machine's changing load moves less.
func TestFigures(t *testing.T) {
	if os.Getenv("VASENGINE_QEMU_FIGURES") == "" {
		t.Skip("set VASENGINE_QEMU_FIGURES=1 to measure the figures")
	}
	needQEMU(t)
	base := qemu.Config{Workload: os.Getenv("FIG_WORKLOAD"), Rounds: envInt("FIG_ROUNDS", 150), Jobs: envInt("FIG_JOBS", 1)}
	shards := envInt("FIG_SHARDS", 2)
	var figs []figure
	modes := []string{"no plugin", "null consumer", "engine", "sync"}
	if m := os.Getenv("FIG_MODES"); m != "" { // for profiling one mode
		modes = strings.Split(m, ",")
	}
	runs := make([]string, 0, len(modes)*envInt("FIG_REPEAT", 1))
	for range envInt("FIG_REPEAT", 1) {
		runs = append(runs, modes...)
	}
	for _, mode := range runs {
		cfg := base
		cfg.NoPlugin = mode == "no plugin"
		cfg.NullConsumer = mode == "null consumer"
		cfg.Sync = mode == "sync"
		var e *engine.Engine
		var host engine.Host
		var calls atomic.Uint64
		req := backends.Request{Monitored: backends.DefaultMonitored,
			Callback: func(any, uint64, uint64, uint64, uint64) { calls.Add(1) }}
		if mode == "engine" || mode == "sync" {
			var err error
			if e, err = engine.New(engine.Config{Shards: shards, NoPin: true}); err != nil {
				t.Fatal(err)
			}
			host = e
		}
		f := measure(t, host, cfg, req)
		f.mode = mode
		if e != nil {
			st := e.Stats()
			f.callbacks = calls.Load()
			f.p50, f.p99 = time.Duration(st.Latency.Quantile(0.5)), time.Duration(st.Latency.Quantile(0.99))
			f.p999, f.max = time.Duration(st.Latency.Quantile(0.999)), time.Duration(st.Latency.Max())
			f.stall50, f.stall99 = time.Duration(st.SyncStall.Quantile(0.5)), time.Duration(st.SyncStall.Quantile(0.99))
			e.Close()
		}
		figs = append(figs, f)
	}
	med := map[string]figure{} // each mode's median run
	for _, mode := range modes {
		var fs []figure
		for _, f := range figs {
			if f.mode == mode {
				fs = append(fs, f)
			}
		}
		slices.SortFunc(fs, func(a, b figure) int { return cmp.Compare(a.workload, b.workload) })
		med[mode] = fs[len(fs)/2]
	}
	null, hasNull := med["null consumer"]
	for _, f := range figs {
		sec := f.workload.Seconds()
		t.Logf("%-13s workload %6.2fs  QEMU CPU %6.2fs  Go CPU %5.2fs  guest stores %6.1f M/s  page-table stores %7.0f /s (%.1f%% narrower than 8 bytes)  records %7.0f /s (%7.0f per QEMU CPU s)  roots %d  drops %d",
			f.mode, sec, f.qemuCPU.Seconds(), f.goCPU.Seconds(), float64(f.stores)/sec/1e6, float64(f.tableStores)/sec,
			100*float64(f.narrow)/max(float64(f.tableStores), 1), float64(f.records)/sec,
			float64(f.records)/f.qemuCPU.Seconds(), f.roots.Started, f.drops)
		if f.mode == "engine" || f.mode == "sync" {
			t.Logf("%s: %d events submitted, %d callbacks; callback latency p50 %v p99 %v p99.9 %v max %v",
				f.mode, f.submitted, f.callbacks, f.p50, f.p99, f.p999, f.max)
		}
		if f.mode == "sync" {
			t.Logf("sync: engine stall p50 %v p99 %v; vCPU held %v per store on average; %d holds given up", f.stall50, f.stall99, f.held, f.giveUps)
			if f.giveUps != 0 {
				t.Errorf("sync: %d holds given up", f.giveUps)
			}
		}
		if f.drops != 0 {
			t.Errorf("%s: %d drops", f.mode, f.drops)
		}
	}
	if f, ok := med["sync"]; ok && hasNull {
		e := med["engine"]
		t.Logf("sync run vs null consumer: workload time %+.1f%%, QEMU CPU %+.1f%%; vs the engine run: workload time %+.1f%% (medians %.2fs, %.2fs, %.2fs)",
			100*(f.workload.Seconds()/null.workload.Seconds()-1), 100*(f.qemuCPU.Seconds()/null.qemuCPU.Seconds()-1),
			100*(f.workload.Seconds()/e.workload.Seconds()-1), null.workload.Seconds(), e.workload.Seconds(), f.workload.Seconds())
	}
	if f, ok := med["engine"]; ok && hasNull {
		if len(figs) > len(modes) {
			t.Logf("median runs: null consumer workload %.2fs, engine workload %.2fs (p99 %v)", null.workload.Seconds(), f.workload.Seconds(), f.p99)
		}
		t.Logf("engine run vs null consumer: workload time %+.1f%%, QEMU CPU %+.1f%%, Go CPU %+.2fs = %.1f%% of the engine run's QEMU+Go CPU",
			100*(f.workload.Seconds()/null.workload.Seconds()-1), 100*(f.qemuCPU.Seconds()/null.qemuCPU.Seconds()-1),
			(f.goCPU - null.goCPU).Seconds(), 100*(f.goCPU-null.goCPU).Seconds()/(f.qemuCPU+f.goCPU).Seconds())
	}
}

// measure runs one guest to the end of its workload. Times and counters are
// taken between the workload's start and end (CPU times too), so boot is
// left out.
// A guest that has not finished its workload within figureTimeout fails
// the test with the end of its console.
func measure(t *testing.T, host engine.Host, cfg qemu.Config, req backends.Request) figure {
	ctx, cancel := context.WithTimeout(context.Background(), figureTimeout)
	defer cancel()
	con := &consoleTail{}
	cfg.Console = con
	g, err := qemu.StartGuest(ctx, host, 1, cfg, req)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close(context.Background())
	waitWorkload(ctx, t, g, con)
	c0, cpu0, q0, s0 := g.Counters(), cpuSelf(), g.QEMUCPU(), g.Stats()
	for !g.WorkloadDone() {
		select {
		case <-g.Exited():
			if !g.WorkloadDone() {
				t.Fatalf("guest exited before its workload ended: %v", g.Stats().Exit)
			}
		case <-ctx.Done():
			t.Fatalf("workload did not end; console ends:\n%s", con)
		case <-time.After(10 * time.Millisecond):
		}
	}
	c1, cpu1, q1, s1 := g.Counters(), cpuSelf(), g.QEMUCPU(), g.Stats()
	select {
	case <-g.Exited():
	case <-time.After(30 * time.Second):
		t.Logf("guest did not power off 30 s after its workload (Close stops it); console ends:\n%s", con)
	}
	if err := g.Close(ctx); err != nil {
		t.Fatal(err)
	}
	s := g.Stats()
	return figure{workload: s.Workload, wall: s.Wall, qemuCPU: q1 - q0, goCPU: cpu1 - cpu0,
		stores: c1.Stores - c0.Stores, records: c1.Records - c0.Records, submitted: s.Submitted,
		tableStores: s1.TableStores - s0.TableStores, narrow: s1.NarrowStores - s0.NarrowStores,
		roots: s.Roots, drops: s.Plugin.Drops, held: time.Duration(s.Plugin.HeldNs / max(s.Synced, 1)), giveUps: s.Plugin.GiveUps}
}

const figureTimeout = 3 * time.Minute

// consoleTail keeps the end of a guest's console.
type consoleTail struct {
	mu  sync.Mutex
	buf []byte
}

func (c *consoleTail) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf = append(c.buf, p...)
	if len(c.buf) > 4096 {
		c.buf = append(c.buf[:0], c.buf[len(c.buf)-4096:]...)
	}
	return len(p), nil
}

func (c *consoleTail) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return string(c.buf)
}
