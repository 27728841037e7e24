package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

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
}

func (f *engineFlags) register(fs *flag.FlagSet) {
	allowed, _ := shard.AllowedCPUs()
	fs.IntVar(&f.shards, "shards", max(1, len(allowed)), "number of shards (default: one per CPU this process may use)")
	fs.StringVar(&f.cpus, "cpus", "", "host CPUs to pin shard workers to, e.g. 0-3,6 (default: the allowed set)")
	fs.IntVar(&f.batch, "batch", 256, "most events a worker drains per batch")
	fs.IntVar(&f.queue, "queue-depth", 1<<14, "events per shard ingest queue")
	fs.DurationVar(&f.budget, "budget", 20*time.Microsecond, "trap-to-callback latency budget")
	fs.BoolVar(&f.nonblocking, "nonblocking", false, "reject events when a shard queue is full instead of waiting")
	fs.DurationVar(&f.spin, "spin", 50*time.Microsecond, "how long an idle worker polls before it parks (longer: lower latency at a steady rate, busier CPUs)")
	fs.StringVar(&f.listen, "listen", "", "address serving /metrics and /debug/pprof/ (e.g. 127.0.0.1:9100)")
	fs.StringVar(&f.prof.CPU, "cpuprofile", "", "write a CPU profile to this file")
	fs.StringVar(&f.prof.Mem, "memprofile", "", "write a heap profile to this file at exit")
	fs.StringVar(&f.prof.Mutex, "mutexprofile", "", "write a mutex contention profile to this file")
	fs.StringVar(&f.prof.Block, "blockprofile", "", "write a blocking profile to this file")
}

func (f *engineFlags) config() (engine.Config, error) {
	c := engine.Config{Shards: f.shards, MaxBatch: f.batch, QueueDepth: f.queue, Budget: f.budget, NonBlocking: f.nonblocking, Spin: f.spin}
	if f.shards < 1 {
		return c, usagef("-shards %d: need at least one shard", f.shards)
	}
	if f.spin < 0 {
		return c, usagef("-spin %v: must not be negative", f.spin)
	}
	if f.batch < 1 {
		return c, usagef("-batch %d: must be at least 1", f.batch)
	}
	if f.queue < 2 || f.queue > 1<<24 {
		return c, usagef("-queue-depth %d: must be between 2 and 16777216", f.queue)
	}
	if f.budget <= 0 {
		return c, usagef("-budget %v: must be positive", f.budget)
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
		c.CPUs = cpus
	}
	return c, nil
}

// runFlags are run's and record's own flags.
type runFlags struct {
	engineFlags
	backend  string
	duration time.Duration
	out      string
	sim      simFlags
	kvm      kvmFlags
	qemu     qemuFlags
	replay   replayFlags
}

func parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return usagef("%v", err)
	}
	return nil
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
	fs.DurationVar(&f.duration, "duration", 10*time.Second, "how long to run (SIGINT or SIGTERM stop earlier, after a drain)")
	if record {
		fs.StringVar(&f.out, "o", "", "trace file to write (required)")
	}
	f.sim.register(fs)
	f.kvm.sim, f.kvm.out = &f.sim, stderr
	f.replay.out = stderr
	f.kvm.register(fs)
	f.qemu.register(fs)
	f.replay.register(fs)
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if fs.Parsed() && len(args) > 0 && (args[len(args)-1] == "-h" || args[len(args)-1] == "--help") {
		return nil
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
	b, err := f.pickBackend()
	if err != nil {
		return err
	}
	err = runEngine(cfg, &f.engineFlags, f.duration, f.out, b, stdout, stderr)
	if f.backend == "kvm" {
		f.kvm.printSummary(stdout)
	}
	if f.backend == "qemu" {
		f.qemu.printSummary(stdout)
	}
	return err
}

// backendRun runs a backend against host until ctx ends.
type backendRun func(ctx context.Context, host engine.Host, req backends.Request) error

func (f *runFlags) pickBackend() (backendRun, error) {
	switch f.backend {
	case "sim":
		return f.sim.backend()
	case "kvm":
		return f.kvm.backend()
	case "qemu":
		return f.qemu.backend()
	case "replay":
		return f.replay.backend()
	}
	return nil, usagef("-backend %q: want sim, kvm, qemu or replay", f.backend)
}

// runEngine starts the engine, the metrics endpoint and the profiles, runs
// the backend for at most d (or until SIGINT/SIGTERM), drains, and prints the
// summary.
func runEngine(cfg engine.Config, ef *engineFlags, d time.Duration, tracePath string, run backendRun, stdout, stderr io.Writer) error {
	e, err := engine.New(cfg)
	if err != nil {
		return usagef("%v", err)
	}
	defer e.Close()
	for _, perr := range e.PinErrors() {
		fmt.Fprintf(stderr, "vasengine: warning: %v\n", perr)
	}
	reg := prometheus.NewRegistry()
	if err := e.Register(reg); err != nil {
		return err
	}
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if ef.listen != "" {
		ln, err := net.Listen("tcp", ef.listen)
		if err != nil {
			return usagef("-listen: %v", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		pprof.Register(mux)
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(ln)
		defer srv.Close()
		fmt.Fprintf(stderr, "vasengine: serving /metrics and /debug/pprof/ on http://%s\n", ln.Addr())
	}
	stopProf, err := pprof.Start(ef.prof)
	if err != nil {
		return usagef("%v", err)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, d)
	defer cancelT()

	var host engine.Host = e
	var closeTrace func() error
	if tracePath != "" {
		h, c, err := newTraceRecorder(tracePath, e)
		if err != nil {
			return err
		}
		host, closeTrace = h, c
	}
	start := time.Now()
	prog := newProgress(e, stderr, isTerminal(stderr))
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, host, backends.Request{Monitored: backends.DefaultMonitored, Callback: func(any, uint64, uint64, uint64, uint64) {}})
	}()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	var runErr error
loop:
	for {
		select {
		case runErr = <-done:
			break loop
		case <-tick.C:
			prog.sample()
		}
	}
	prog.sample()
	e.Close() // drains every queued event
	elapsed := time.Since(start)
	prog.finish()
	if closeTrace != nil {
		if err := closeTrace(); err != nil && runErr == nil {
			runErr = err
		}
	}
	if err := stopProf(); err != nil && runErr == nil {
		runErr = err
	}
	printSummary(stdout, e, prog, elapsed)
	if runErr != nil && !errors.Is(runErr, context.Canceled) && !errors.Is(runErr, context.DeadlineExceeded) {
		return runErr
	}
	return nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
