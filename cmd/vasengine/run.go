package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/pprof"
	"github.com/vasengine/vasengine/shard"
)

// engineFlags are the flags every command that runs the engine takes.
type engineFlags struct {
	shards      int
	cpus        string
	batch       int
	queue       int
	budget      time.Duration
	nonblocking bool
	spin        time.Duration
	listen      string
	prof        pprof.Files
	json        bool
	metricsOut  string
	top         int
	limits      vmLimitFlags
	// sync submits every trapped write synchronously (-sync; SEMANTICS.md
	// section 7): each backend that supports it holds the writing vCPU
	// until the write's closure is done (backends set it through
	// syncBackend).
	sync bool
}

func (f *engineFlags) register(fs *flag.FlagSet) {
	allowed, _ := shard.AllowedCPUs()
	fs.IntVar(&f.shards, "shards", max(1, len(allowed)), fmt.Sprintf("number of shards (default: one per CPU this process may use; at most %d per CPU and %d)", shardsPerCPU, maxShards))
	fs.StringVar(&f.cpus, "cpus", "", "host CPUs to pin shard workers to, round robin, e.g. 0-3,6 (default: unpinned; pinning pays only on CPUs kept free for the engine)")
	fs.IntVar(&f.batch, "batch", 256, "most events a worker drains per batch (at most -queue-depth)")
	fs.IntVar(&f.queue, "queue-depth", 1<<14, "events per shard ingest queue (2..16777216; all queues within half the memory available)")
	fs.DurationVar(&f.budget, "budget", 20*time.Microsecond, "trap-to-callback latency budget")
	fs.BoolVar(&f.nonblocking, "nonblocking", false, "reject events when a shard queue is full instead of waiting")
	fs.DurationVar(&f.spin, "spin", 50*time.Microsecond, "how long an idle worker polls before it parks, at most 1s (longer: lower latency at a steady rate, busier CPUs)")
	fs.StringVar(&f.listen, "listen", "", "address serving /metrics and /debug/pprof/ (e.g. 127.0.0.1:9100)")
	fs.StringVar(&f.prof.CPU, "cpuprofile", "", "write a CPU profile to this file")
	fs.StringVar(&f.prof.Mem, "memprofile", "", "write a heap profile to this file at exit")
	fs.StringVar(&f.prof.Mutex, "mutexprofile", "", "write a mutex contention profile to this file")
	fs.StringVar(&f.prof.Block, "blockprofile", "", "write a blocking profile to this file")
	fs.BoolVar(&f.json, "json", false, "print the summary as one JSON document (schema vasengine-summary, version 1: see README) instead of the table")
	fs.StringVar(&f.metricsOut, "metrics-out", "", "write the final Prometheus text exposition of /metrics to this file at exit")
	fs.BoolVar(&f.sync, "sync", false, "synchronous delivery: every trapped write holds its vCPU until the engine has hooked, unhooked and called back for it (backends sim, kvm, qemu and replay; the summary shows the stall)")
	fs.IntVar(&f.top, "top", 20, "summary table: the N VMs with the most events, then one row for the others (0: every VM)")
	f.limits.register(fs)
}

func (f *engineFlags) config() (engine.Config, error) {
	c := engine.Config{Shards: f.shards, MaxBatch: f.batch, QueueDepth: f.queue, Budget: f.budget, NonBlocking: f.nonblocking,
		Spin: f.spin, MaxVMs: maxVMs}
	if f.shards < 1 {
		return c, usagef("-shards %d: need at least one shard", f.shards)
	}
	if lim := shardLimit(); f.shards > lim {
		return c, usagef("-shards %d: at most %d on this host (%d per CPU this process may use, %d in all)", f.shards, lim, shardsPerCPU, maxShards)
	}
	if f.spin < 0 || f.spin > time.Second {
		return c, usagef("-spin %v: must be within 0..1s", f.spin)
	}
	if f.queue < 2 || f.queue > 1<<24 {
		return c, usagef("-queue-depth %d: must be between 2 and 16777216", f.queue)
	}
	if f.batch < 1 || f.batch > f.queue {
		return c, usagef("-batch %d: must be within 1..-queue-depth (%d)", f.batch, f.queue)
	}
	if err := checkMemory(fmt.Sprintf("-shards %d x -queue-depth %d", f.shards, f.queue), queueBytes(f.shards, f.queue)); err != nil {
		return c, err
	}
	if f.budget <= 0 {
		return c, usagef("-budget %v: must be positive", f.budget)
	}
	if f.top < 0 {
		return c, usagef("-top %d: must not be negative", f.top)
	}
	if f.cpus != "" {
		cpus, err := shard.ParseCPUList(f.cpus)
		if err != nil {
			return c, usagef("-cpus: %v", err)
		}
		allowed, _ := shard.AllowedCPUs()
		in := map[int]bool{}
		for _, a := range allowed {
			in[a] = true
		}
		for _, cpu := range cpus {
			if !in[cpu] {
				return c, usagef("-cpus: CPU %d is not in the set this process may use (%v)", cpu, allowed)
			}
		}
		c.CPUs, c.Pin = cpus, true
	}
	return c, nil
}

// checkOutputs checks the output files of the flags before anything runs.
func (f *engineFlags) checkOutputs(inputs ...string) error {
	for _, o := range []struct{ flag, path string }{{"-cpuprofile", f.prof.CPU}, {"-memprofile", f.prof.Mem},
		{"-mutexprofile", f.prof.Mutex}, {"-blockprofile", f.prof.Block}, {"-metrics-out", f.metricsOut}} {
		if o.path == "" {
			continue
		}
		if err := checkOutput(o.flag, o.path, false, inputs...); err != nil {
			return err
		}
	}
	return nil
}

// runFlags are run's and record's own flags.
type runFlags struct {
	engineFlags
	backend  string
	duration time.Duration
	out      string
	force    bool
	sim      simFlags
	kvm      kvmFlags
	qemu     qemuFlags
	replay   replayFlags
}

func cmdRun(args []string, stdout, stderr io.Writer, record bool) error {
	name := "run"
	if record {
		name = "record"
	}
	var f runFlags
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	f.engineFlags.register(fs)
	fs.StringVar(&f.backend, "backend", "sim", "where the guests come from: sim, kvm, qemu or replay")
	fs.DurationVar(&f.duration, "duration", 10*time.Second, "how long to run; SIGINT, SIGTERM or this end the run within one second, with a summary")
	if record {
		fs.StringVar(&f.out, "o", "", "trace file to write (required); written under a temporary name and renamed when complete")
		fs.BoolVar(&f.force, "force", false, "replace the -o file if it exists")
	}
	f.sim.register(fs)
	f.kvm.sim = &f.sim
	f.kvm.register(fs)
	f.qemu.register(fs)
	f.replay.register(fs)
	if err := parse(fs, args, stdout); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("%s: unexpected argument %q", name, fs.Arg(0))
	}
	if f.duration <= 0 {
		return usagef("-duration %v: must be positive", f.duration)
	}
	if record && f.out == "" {
		return usagef("record: -o FILE is required")
	}
	cfg, err := f.engineFlags.config()
	if err != nil {
		return err
	}
	b, err := f.pickBackend(stderr)
	if err != nil {
		return err
	}
	if f.sync {
		if record {
			return usagef("record -sync: not supported (the trace recorder submits asynchronously)")
		}
		if err := setSync(b, f.backend); err != nil {
			return err
		}
	}
	var inputs []string
	if f.backend == "replay" {
		inputs = append(inputs, f.replay.file)
	}
	if record {
		if err := checkOutput("-o", f.out, !f.force, inputs...); err != nil {
			return err
		}
		inputs = append(inputs, f.out)
	}
	if err := f.engineFlags.checkOutputs(inputs...); err != nil {
		return err
	}
	return runSession(&session{command: name, cfg: cfg, flags: &f.engineFlags, duration: f.duration,
		tracePath: f.out, force: f.force, b: b, stdout: stdout, stderr: stderr})
}

func (f *runFlags) pickBackend(stderr io.Writer) (backend, error) {
	switch f.backend {
	case "sim":
		return f.sim.backend()
	case "kvm":
		return f.kvm.backend(stderr)
	case "qemu":
		return f.qemu.backend()
	case "replay":
		return f.replay.backend()
	}
	return nil, usagef("-backend %q: want sim, kvm, qemu or replay", f.backend)
}

// syncBackend is a backend that can submit synchronously (-sync).
type syncBackend interface {
	setSync() error
}

// setSync turns on b's synchronous delivery, or says it has none.
func setSync(b backend, name string) error {
	sb, ok := b.(syncBackend)
	if !ok {
		return usagef("-sync: -backend %s does not submit synchronously", name)
	}
	return sb.setSync()
}

// backend is where a run's guests come from.
type backend interface {
	// describe says what runs, for the start line.
	describe() string
	// prepare does the set-up that may take long (building simulated VMs,
	// reading a trace's header). An interrupted run abandons it.
	prepare(ctx context.Context) error
	// run runs the guests against host until ctx ends or they end.
	run(ctx context.Context, host engine.Host, req backends.Request) error
	// report is the backend's part of the summary, ran the time since the
	// backend started. It may be called while run has not returned.
	report(ran time.Duration) backendReport
}

// backendReport is a backend's part of the summary.
type backendReport struct {
	Lines    []string // for the text summary
	Stats    any      // the JSON summary's backend_stats
	Warnings []string // also printed on stderr
}

// startServer serves /metrics and /debug/pprof/ on addr.
func startServer(addr string, reg *prometheus.Registry, stderr io.Writer) (func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, usagef("-listen: %v", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	pprof.Register(mux)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	fmt.Fprintf(stderr, "vasengine: serving /metrics and /debug/pprof/ on http://%s\n", ln.Addr())
	return func() { srv.Close() }, nil
}

func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// isInterrupt reports whether err only says the run's context ended.
func isInterrupt(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
