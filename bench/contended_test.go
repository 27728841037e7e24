package bench_test

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/vasengine/vasengine/bench"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// busyEnv makes the test binary a busy process (see TestMain).
const busyEnv = "VASENGINE_BENCH_BUSY"

func TestMain(m *testing.M) {
	if os.Getenv(busyEnv) == "1" {
		// A busy thread in another process, as a vCPU or QEMU is: spin
		// until the parent goes away.
		ppid := os.Getppid()
		for i := 0; ; i++ {
			if i%(1<<24) == 0 && os.Getppid() != ppid {
				os.Exit(0)
			}
		}
	}
	os.Exit(m.Run())
}

// busy starts n busy processes and returns a function that stops them.
func busy(b *testing.B, n int) func() {
	var cmds []*exec.Cmd
	for range n {
		c := exec.Command(os.Args[0], "-test.run=^$")
		c.Env = append(os.Environ(), busyEnv+"=1")
		if err := c.Start(); err != nil {
			b.Fatal(err)
		}
		cmds = append(cmds, c)
	}
	return func() {
		for _, c := range cmds {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
	}
}

// cpuTime returns the process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkEngineContended: the engine's workload while other processes
// keep the cores busy (0, 1 and 2 busy threads per core, started by the
// benchmark itself, as vCPU threads and QEMU are), for 1 and 2 shards,
// pinned (one worker per core) and not, and the naive engine under the same
// load, in one run. Closed loop: events/s and the engine's CPU time per
// event (the whole process, producers included); then open loop at half the
// rate just measured: p99 and p99.9 trap-to-callback.
func BenchmarkEngineContended(b *testing.B) {
	cores := runtime.NumCPU()
	for _, per := range []int{0, 1, 2} {
		configs := []struct {
			name string
			cfg  engine.Config
		}{
			{"shards=1", engine.Config{Shards: 1}},
			{"shards=2", engine.Config{Shards: 2}},
			{"shards=2/pinned", engine.Config{Shards: 2, Pin: true}},
		}
		for _, c := range configs {
			b.Run(fmt.Sprintf("busy=%d/%s", per, c.name), func(b *testing.B) {
				stop := busy(b, per*cores)
				defer stop()
				e := newEngine(b, c.cfg)
				defer e.Close()
				cpu0 := cpuTime()
				rate := closedLoop(b, e, 256)
				b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/event")
				if rate == 0 || b.N < 1000 {
					return // (the harness's probe run)
				}
				// Open loop at half that rate, for as long as the closed
				// loop took (at least 0.2 s).
				before := e.Stats()
				d := max(time.Duration(float64(b.N)/rate*1e9), 200*time.Millisecond)
				pace := workload().Paced(func(vm vasmon.VMID, evs []shard.Event) { e.Submit(vm, evs) }, rate/2, d, 32)
				bench.WaitProcessed(e, before.Processed+uint64(pace.Sent))
				st := e.Stats()
				h := st.Latency
				h.Sub(&before.Latency)
				b.ReportMetric(float64(h.Quantile(0.99)), "half-load-p99-ns")
				b.ReportMetric(float64(h.Quantile(0.999)), "half-load-p999-ns")
				b.ReportMetric(float64(pace.LagP99), "pacer-lag-p99-ns")
			})
		}
		b.Run(fmt.Sprintf("busy=%d/naive", per), func(b *testing.B) {
			stop := busy(b, per*cores)
			defer stop()
			w := workload()
			n := bench.NewNaive(w, bench.Nop)
			defer n.Close()
			cpu0 := cpuTime()
			b.ResetTimer()
			start := time.Now()
			total := w.Drive(n.Submit, b.N, 256)
			n.Wait(uint64(total))
			b.ReportMetric(float64(total)/time.Since(start).Seconds(), "events/s")
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/event")
		})
	}
}
