package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/events"
	"github.com/vasengine/vasengine/pprof"
	"github.com/vasengine/vasengine/trace"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vmlimit"
)

// A run ends within one second of being asked to stop (SIGINT, SIGTERM,
// its -duration), whatever phase it is in. From the moment it is asked:
const (
	// graceBackend: the backend stops by itself (its vCPUs, its roots,
	// its VMs).
	graceBackend = 300 * time.Millisecond
	// abortBackend: after graceBackend the engine is closed under the
	// backend (its Submits and Starts fail) and the contexts of its host
	// calls in progress are cancelled; it has until then to return.
	abortBackend = 450 * time.Millisecond
	// drainBy: the engine processes what is queued.
	drainBy = 520 * time.Millisecond
	// finishBy: the trace and the profiles are written.
	finishBy = 600 * time.Millisecond
	// hardDeadline: whatever has not finished is abandoned, and the
	// summary printed says what. The rest of the second is for the summary
	// and the process's exit (freeing a large heap takes the kernel a
	// while, and a busy 2-CPU host delays everything).
	hardDeadline = 650 * time.Millisecond
)

// session is one run of the engine against a backend (run, record, replay).
// Its work runs on its own goroutine; runSession supervises it and returns
// within hardDeadline of the stop request whatever the work is doing.
type session struct {
	command        string
	cfg            engine.Config
	flags          *engineFlags
	duration       time.Duration
	tracePath      string
	force          bool
	b              backend
	stdout, stderr io.Writer

	start    time.Time
	deadline time.Time // start + duration
	reg      *prometheus.Registry
	traceOut *outFile
	profOuts []*outFile
	metrics  metricsSnap
	stopProf func() error

	mu        sync.Mutex
	phase     string
	cause     string    // what stopped the run: "SIGINT", "SIGTERM", "duration", "trace write error"
	stopAt    time.Time // when it was asked to stop (zero: not asked)
	abandoned bool      // the supervisor gave up on the work; it must not write any more
	e         *engine.Engine
	prog      *progress
	lim       *vmlimit.Host // the per-VM rate limit (nil: none)
	o         outcome
}

// outcome is what the work did, for the summary and the exit status.
type outcome struct {
	setupErr     error // before the backend ran (usage errors among them)
	backendStart time.Time
	backendEnd   time.Time // zero: the backend did not return
	backendErr   error
	aborted      bool // the engine was closed under the backend
	drainEnd     time.Time
	drained      bool
	traceErr     error
	eventsErr    error         // the event pipeline's outputs
	eventStats   *events.Stats // the event pipeline's totals once closed (nil: no pipeline)
	traceDone    bool          // the trace was written and renamed into place
	profErr      error
}

var errStopped = errors.New("stopped")

func (s *session) setPhase(p string) {
	s.mu.Lock()
	s.phase = p
	s.mu.Unlock()
}

// logf writes a line on stderr unless the supervisor abandoned the work.
func (s *session) logf(format string, a ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.abandoned {
		fmt.Fprintf(s.stderr, "vasengine: "+format+"\n", a...)
	}
}

func (s *session) update(f func(o *outcome)) {
	s.mu.Lock()
	f(&s.o)
	s.mu.Unlock()
}

// stopTime returns when the run was asked to stop, once its context ended:
// a signal or an error recorded it, else it is the -duration's end, now.
func (s *session) stopTime() time.Time {
	s.markStop("duration")
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopAt
}

func (s *session) markStop(cause string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopAt.IsZero() {
		s.stopAt = time.Now()
		if s.cause == "" {
			s.cause = cause
		}
	}
}

// await waits for ch to close; once the run is asked to stop, for at most
// d after that moment.
func (s *session) await(ctx context.Context, ch <-chan struct{}, d time.Duration) bool {
	select {
	case <-ch:
		return true
	case <-ctx.Done():
	}
	t := time.NewTimer(time.Until(s.stopTime().Add(d)))
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		return false
	}
}

// runSession runs s: it opens the outputs, starts the work and waits for it,
// at most hardDeadline after a stop request; then it prints the summary and
// writes the final metrics.
func runSession(s *session) error {
	if err := s.applyLimits(); err != nil {
		return err
	}
	s.start = time.Now()
	s.deadline = s.start.Add(s.duration)
	base, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	ctx, cancelT := context.WithDeadline(base, s.deadline)
	defer cancelT()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		select {
		case sig := <-sigs:
			name := "SIGINT"
			if sig == syscall.SIGTERM {
				name = "SIGTERM"
			}
			s.markStop(name)
			cancel(errStopped)
		case <-base.Done():
		}
	}()
	defer context.AfterFunc(ctx, func() { s.markStop("duration") })()

	if err := s.openOutputs(); err != nil {
		return err
	}
	if s.flags.listen != "" {
		stop, err := startServer(s.flags.listen, s.reg, s.stderr)
		if err != nil {
			s.abortOutputs()
			return err
		}
		defer stop()
	}
	s.logf("%s: %s; %d shards; for %v (SIGINT, SIGTERM or -duration end it within 1s)", s.command, s.b.describe(), s.cfg.Shards, s.duration)

	done := make(chan struct{})
	go func() {
		defer close(done)
		s.work(ctx, cancel)
	}()
	finished := true
	select {
	case <-done:
	case <-ctx.Done():
		t := time.NewTimer(time.Until(s.stopTime().Add(hardDeadline)))
		select {
		case <-done:
		case <-t.C:
			finished = false
		}
		t.Stop()
	}
	s.mu.Lock()
	s.abandoned = !finished
	phase, o, e, prog := s.phase, s.o, s.e, s.prog
	s.mu.Unlock()
	if o.setupErr != nil && (e == nil || errors.As(o.setupErr, new(usageError))) {
		return o.setupErr
	}
	sum := s.summarize(e, prog, o, finished, phase)
	var errs []error
	out := s.stdout
	if s.flags.ev.out == "-" {
		out = s.stderr // standard output carries the events
	}
	if s.flags.json {
		errs = append(errs, sum.writeJSON(out))
	} else {
		errs = append(errs, sum.writeText(out, s.flags.top))
	}
	for _, w := range sum.Warnings {
		fmt.Fprintf(s.stderr, "vasengine: warning: %s\n", w)
	}
	if s.flags.metricsOut != "" && e != nil {
		if !s.metrics.taken() {
			s.metrics.sample(s.reg, e, true)
		}
		errs = append(errs, s.metrics.write(s.flags.metricsOut))
	}
	errs = append(errs, sum.failure())
	return errors.Join(errs...)
}

// openOutputs creates the trace and profile files (under temporary names)
// and starts the profiles.
func (s *session) openOutputs() error {
	s.reg = newRegistry()
	if s.tracePath != "" {
		o, err := createOutput("-o", s.tracePath, !s.force)
		if err != nil {
			return err
		}
		s.traceOut = o
	}
	var w pprof.Writers
	p := s.flags.prof
	for _, x := range []struct {
		flag, path string
		dst        *io.Writer
	}{{"-cpuprofile", p.CPU, &w.CPU}, {"-memprofile", p.Mem, &w.Mem}, {"-mutexprofile", p.Mutex, &w.Mutex}, {"-blockprofile", p.Block, &w.Block}} {
		if x.path == "" {
			continue
		}
		o, err := createOutput(x.flag, x.path, false)
		if err != nil {
			s.abortOutputs()
			return err
		}
		s.profOuts = append(s.profOuts, o)
		*x.dst = o
	}
	stop, err := pprof.StartTo(w)
	if err != nil {
		s.abortOutputs()
		return err
	}
	s.stopProf = stop
	return nil
}

func (s *session) abortOutputs() {
	if s.traceOut != nil {
		s.traceOut.Abort()
	}
	for _, o := range s.profOuts {
		o.Abort()
	}
	if s.stopProf != nil {
		s.stopProf()
	}
}

// work starts the engine, prepares and runs the backend, stops it when ctx
// ends, drains the engine and writes the trace and the profiles, within the
// deadlines above once the run is asked to stop.
func (s *session) work(ctx context.Context, cancel context.CancelCauseFunc) {
	s.setPhase("starting the engine")
	e, err := engine.New(s.cfg)
	if err != nil {
		s.update(func(o *outcome) { o.setupErr = usagef("%v", err) })
		s.abortOutputs()
		return
	}
	prog := newProgress(e, s, isTerminal(s.stderr))
	s.mu.Lock()
	s.e, s.prog = e, prog
	s.mu.Unlock()
	for _, perr := range e.PinErrors() {
		s.logf("warning: %v", perr)
	}
	if err := e.Register(s.reg); err != nil {
		s.update(func(o *outcome) { o.setupErr = err })
		e.Close()
		s.abortOutputs()
		return
	}
	s.reg.MustRegister(newVMCollector(e))
	var pl *events.Pipeline
	if s.flags.ev.enabled() {
		if pl, err = s.flags.ev.start(s.reg, s.stdout); err != nil {
			s.update(func(o *outcome) { o.setupErr = err })
			e.Close()
			s.abortOutputs()
			return
		}
	}

	s.setPhase("setting up the backend")
	if err := s.b.prepare(ctx); err != nil {
		s.update(func(o *outcome) {
			if !isInterrupt(err) || ctx.Err() == nil {
				o.setupErr = err
			}
		})
		e.Close()
		s.abortOutputs()
		return
	}

	host := withEvents(pl, e)
	var rec *trace.Recorder
	var bw *bufio.Writer
	if s.traceOut != nil {
		bw = bufio.NewWriterSize(s.traceOut, 1<<20)
		rec = trace.NewRecorder(bw, host)
		host = rec
	}
	ah := newAbortHost(s.limitHost(ctx, host), e)
	s.setPhase("running")
	s.update(func(o *outcome) { o.backendStart = time.Now() })
	bdone := make(chan struct{})
	var berr error
	go func() {
		defer close(bdone)
		berr = s.b.run(ctx, ah, backends.Request{Monitored: backends.DefaultMonitored, Callback: func(any, uint64, uint64, uint64, uint64) {}})
	}()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	finished := false
loop:
	for {
		select {
		case <-bdone:
			finished = true
			break loop
		case <-ctx.Done():
			if s.flags.metricsOut != "" {
				s.metrics.sample(s.reg, e, false)
			}
			break loop
		case <-tick.C:
			prog.sample()
			if s.flags.metricsOut != "" {
				s.metrics.sample(s.reg, e, false)
			}
			if rec != nil {
				if err := rec.Err(); err != nil {
					s.markStop("trace write error")
					s.logf("%v: stopping the run", err)
					cancel(err)
				}
			}
		}
	}
	closed := make(chan struct{})
	closing := false
	closeEngine := func() {
		if !closing {
			closing = true
			go func() {
				e.Close() // drains every queued event
				close(closed)
			}()
		}
	}
	if !finished {
		s.setPhase("stopping the backend")
		finished = s.await(ctx, bdone, graceBackend)
		if !finished {
			s.setPhase("stopping the backend (aborted: engine closed, host calls cancelled)")
			s.update(func(o *outcome) { o.aborted = true })
			ah.abort()
			closeEngine()
			finished = s.await(ctx, bdone, abortBackend)
		}
	}
	s.update(func(o *outcome) {
		if finished {
			o.backendEnd, o.backendErr = time.Now(), berr
		}
	})
	if !finished {
		s.setPhase("stopping the backend (abandoned)")
	}
	prog.sample()
	s.setPhase("draining the engine")
	closeEngine()
	drained := s.await(ctx, closed, drainBy)
	s.update(func(o *outcome) {
		o.drained = drained
		if drained {
			o.drainEnd = time.Now()
		}
	})
	prog.sample()
	prog.finish()
	if pl != nil {
		s.closeEvents(ctx, pl)
	}

	if rec != nil {
		s.setPhase("writing the trace")
		tdone := make(chan struct{})
		var terr error
		go func() {
			defer close(tdone)
			terr = rec.Close()
			if err := bw.Flush(); terr == nil {
				terr = err
			}
			if terr != nil {
				s.traceOut.Abort()
				return
			}
			terr = s.traceOut.Commit()
		}()
		if s.await(ctx, tdone, finishBy) {
			s.update(func(o *outcome) { o.traceErr, o.traceDone = terr, terr == nil })
		}
	}
	s.setPhase("writing the profiles")
	perr := s.stopProf()
	for _, o := range s.profOuts {
		if err := o.Commit(); err != nil {
			perr = errors.Join(perr, err)
		}
	}
	s.update(func(o *outcome) { o.profErr = perr })
	s.setPhase("done")
}

// closeEvents drains the event pipeline into its outputs, until finishBy
// once the run is asked to stop (what is left then is dropped, counted).
func (s *session) closeEvents(ctx context.Context, pl *events.Pipeline) {
	s.setPhase("writing the events")
	cctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	var err error
	go func() {
		defer close(done)
		err = pl.Close(cctx)
	}()
	if !s.await(ctx, done, finishBy) {
		cancel()
		<-done
	}
	st := pl.Stats()
	s.logf("%v", st)
	s.update(func(o *outcome) { o.eventsErr, o.eventStats = err, &st })
}

// abortHost passes a backend's calls to the host until abort; then the
// contexts of the calls in progress are cancelled and later Start, Stop and
// RemoveVM calls fail at once with engine.ErrClosed (the engine is being
// closed then). Sync is the engine's.
type abortHost struct {
	engine.Host
	e      *engine.Engine
	ctx    context.Context
	cancel context.CancelFunc
}

func newAbortHost(h engine.Host, e *engine.Engine) *abortHost {
	ctx, cancel := context.WithCancel(context.Background())
	return &abortHost{Host: h, e: e, ctx: ctx, cancel: cancel}
}

func (h *abortHost) abort() { h.cancel() }

// bind returns ctx, also cancelled by abort.
func (h *abortHost) bind(ctx context.Context) (context.Context, context.CancelFunc) {
	c, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(h.ctx, cancel)
	return c, func() { stop(); cancel() }
}

func (h *abortHost) Start(ctx context.Context, vm vasmon.VMID, cr3 uint64, mode vasmon.Mode, monitored uint64,
	cb vasmon.Callback, cbctx any, opts engine.RootOptions) (*vasmon.Root, error) {
	if h.ctx.Err() != nil {
		return nil, engine.ErrClosed
	}
	c, done := h.bind(ctx)
	defer done()
	return h.Host.Start(c, vm, cr3, mode, monitored, cb, cbctx, opts)
}

func (h *abortHost) Stop(ctx context.Context, r *vasmon.Root) error {
	if h.ctx.Err() != nil {
		return engine.ErrClosed
	}
	c, done := h.bind(ctx)
	defer done()
	return h.Host.Stop(c, r)
}

func (h *abortHost) RemoveVM(ctx context.Context, id vasmon.VMID) error {
	if h.ctx.Err() != nil {
		return engine.ErrClosed
	}
	c, done := h.bind(ctx)
	defer done()
	return h.Host.RemoveVM(c, id)
}

// Sync waits until the engine is quiescent (backends that have it use it
// before starting a root).
func (h *abortHost) Sync(ctx context.Context) error {
	if h.ctx.Err() != nil {
		return engine.ErrClosed
	}
	c, done := h.bind(ctx)
	defer done()
	return h.e.Sync(c)
}

// SyncSubmitter implements backends.SyncHost: the engine's Syncers, until
// abort.
func (h *abortHost) SyncSubmitter(vm vasmon.VMID) (backends.Syncer, error) {
	if h.ctx.Err() != nil {
		return nil, engine.ErrClosed
	}
	return backends.NewSyncer(h.Host, vm)
}
