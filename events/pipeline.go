package events

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
)

// Policy is what a full buffer does (Config.OnFull).
type Policy uint8

// Policies.
const (
	Block Policy = iota // wait for room (holds back the engine)
	Drop                // drop and count
)

// ParsePolicy parses "block" or "drop".
func ParsePolicy(s string) (Policy, error) {
	switch s {
	case "block":
		return Block, nil
	case "drop":
		return Drop, nil
	}
	return 0, fmt.Errorf("on-full policy %q: want block or drop", s)
}

func (p Policy) String() string {
	if p == Drop {
		return "drop"
	}
	return "block"
}

// Rules is a compiled rule set (package events/rules implements it).
type Rules interface {
	// Names returns the rules' names; a rule's number is its index.
	Names() []string
	// NewMatcher returns a matcher for one goroutine (each lane has its
	// own), for the records of host.
	NewMatcher(host string) Matcher
	// Priority returns rule i's priority name ("critical", ...).
	Priority(i uint16) string
	// AppendOutput appends rule i's output text for r to dst.
	AppendOutput(dst []byte, i uint16, r *Record, root *RootInfo, host string) []byte
}

// Matcher evaluates rules for one goroutine.
type Matcher interface {
	// Match appends to hits the numbers of the rules r (of root) matches,
	// in order of priority, and returns the slice.
	Match(r *Record, root *RootInfo, hits []uint16) []uint16
}

// Match is a record that matched a rule, as sinks get it.
type Match struct {
	Record
	Rule uint16 // number of the rule (Rules.Names)
}

// Sink is an output of the pipeline. Its methods are called by one
// goroutine, the sink's own: Open once, Write for each batch, Close once.
type Sink interface {
	Name() string
	// Open prepares the sink; c is where it counts what it spools, what
	// is acknowledged and what it drops itself.
	Open(p *Pipeline, c *Counters) error
	// Write outputs ms, in order. An error drops the batch (counted) and
	// is reported by Pipeline.Err; the sink stays open.
	Write(ms []Match) error
	// Close flushes the sink within ctx and releases it.
	Close(ctx context.Context) error
}

// Config configures a Pipeline.
type Config struct {
	Host   string // host name in the records; "": os.Hostname
	Lanes  int    // rings (and lane goroutines); 0: min(GOMAXPROCS, 4)
	Ring   int    // records per lane; 0: 8192
	Buffer int    // matches per sink channel; 0: 4096
	OnFull Policy
	Rules  Rules // nil: no rule matches
	Sinks  []Sink
	// Callback, if set, is also called for every callback (before the
	// record is made), with the backend's callback context.
	Callback vasmon.Callback
}

// RootInfo is what the pipeline knows of a root (Record.Root indexes them).
type RootInfo struct {
	VM        vasmon.VMID
	CR3       uint64
	Mode      vasmon.Mode
	Name      string // the backend's name ("vm3/pid 41"); "" if none
	FullSpace bool
}

// Pipeline takes records from the engine's callbacks to the sinks.
type Pipeline struct {
	cfg   Config
	host  string
	run   string
	lanes []*lane
	sinks []*sinkRun
	names []string
	start time.Time

	rootMu sync.RWMutex
	roots  []RootInfo

	handoffDrops atomic.Uint64
	closing      atomic.Bool
	abort        chan struct{} // closed when Close gives up waiting
	lanesDone    sync.WaitGroup
	sinksDone    sync.WaitGroup
	closeOnce    sync.Once
	closeErr     error

	errMu sync.Mutex
	err   error
}

type lane struct {
	p      *Pipeline
	ring   *shard.Ring[Record]
	parked atomic.Bool
	wake   chan struct{}
	seq    map[vasmon.VMID]uint64
	roots  map[uint32]*RootInfo // the lane's cache of Pipeline.Root
	in     atomic.Uint64        // records dequeued
	// matched counts matches per rule (written by the lane goroutine).
	matched []atomic.Uint64
}

type sinkRun struct {
	s  Sink
	ch chan Match
	c  Counters
}

// Counters are a sink's counts, exported as metrics. Every method is safe
// for concurrent use and allocates nothing.
type Counters struct {
	emitted []atomic.Uint64 // per rule
	dropped []atomic.Uint64 // per rule
	spooled atomic.Uint64
	acked   atomic.Uint64
	errors  atomic.Uint64
}

// Drop counts a match the sink dropped.
func (c *Counters) Drop(rule uint16) { c.dropped[rule].Add(1) }

// Spool counts a match written to the sink's spool.
func (c *Counters) Spool(n int) { c.spooled.Add(uint64(n)) }

// Ack counts matches acknowledged by the sink's destination.
func (c *Counters) Ack(n int) { c.acked.Add(uint64(n)) }

// Dropped returns the matches of rule dropped by the sink so far.
func (c *Counters) Dropped(rule uint16) uint64 { return c.dropped[rule].Load() }

// Emitted returns the matches of rule the sink took so far.
func (c *Counters) Emitted(rule uint16) uint64 { return c.emitted[rule].Load() }

// Spooled returns the matches written to the spool so far.
func (c *Counters) Spooled() uint64 { return c.spooled.Load() }

// Acked returns the matches acknowledged so far.
func (c *Counters) Acked() uint64 { return c.acked.Load() }

// New starts a pipeline: its lane goroutines and its sinks' goroutines
// (each sink is opened first; an error closes the ones opened and is
// returned).
func New(cfg Config) (*Pipeline, error) {
	if cfg.Host == "" {
		cfg.Host = Hostname()
	}
	if cfg.Lanes <= 0 {
		cfg.Lanes = min(runtime.GOMAXPROCS(0), 4)
	}
	if cfg.Ring <= 0 {
		cfg.Ring = 8192
	}
	if cfg.Buffer <= 0 {
		cfg.Buffer = 4096
	}
	now := time.Now()
	p := &Pipeline{cfg: cfg, host: cfg.Host, run: fmt.Sprintf("%x", now.UnixNano()), start: now,
		abort: make(chan struct{})}
	if cfg.Rules != nil {
		p.names = cfg.Rules.Names()
	}
	if len(p.names) > 1<<16 {
		return nil, fmt.Errorf("events: %d rules: at most 65536", len(p.names))
	}
	for _, s := range cfg.Sinks {
		sr := &sinkRun{s: s, ch: make(chan Match, cfg.Buffer)}
		sr.c.emitted = make([]atomic.Uint64, len(p.names))
		sr.c.dropped = make([]atomic.Uint64, len(p.names))
		if err := s.Open(p, &sr.c); err != nil {
			for _, o := range p.sinks {
				o.s.Close(context.Background())
			}
			return nil, fmt.Errorf("events: sink %s: %w", s.Name(), err)
		}
		p.sinks = append(p.sinks, sr)
	}
	for range cfg.Lanes {
		l := &lane{p: p, ring: shard.NewRing[Record](cfg.Ring), wake: make(chan struct{}, 1),
			seq: map[vasmon.VMID]uint64{}, roots: map[uint32]*RootInfo{}, matched: make([]atomic.Uint64, len(p.names))}
		p.lanes = append(p.lanes, l)
	}
	for _, l := range p.lanes {
		p.lanesDone.Add(1)
		go l.loop()
	}
	for _, sr := range p.sinks {
		p.sinksDone.Add(1)
		go p.sinkLoop(sr)
	}
	return p, nil
}

// Host returns the pipeline's host name.
func (p *Pipeline) HostName() string { return p.host }

// Run returns the pipeline's run id (hex of its start in Unix nanoseconds),
// which makes message ids unique across runs of one host.
func (p *Pipeline) Run() string { return p.run }

// RuleNames returns the rules' names (index: rule number).
func (p *Pipeline) RuleNames() []string { return p.names }

// Rules returns the pipeline's rule set (nil if none).
func (p *Pipeline) Rules() Rules { return p.cfg.Rules }

// Root returns the root of index i (Record.Root).
func (p *Pipeline) Root(i uint32) RootInfo {
	p.rootMu.RLock()
	defer p.rootMu.RUnlock()
	if int(i) < len(p.roots) {
		return p.roots[i]
	}
	return RootInfo{}
}

// rootCtx is the callback context the pipeline gives the engine.
type rootCtx struct {
	cb    vasmon.Callback
	ctx   any
	lane  *lane
	vm    vasmon.VMID
	idx   uint32
	cr3   uint64
	mode  vasmon.Mode
	flags Flags
}

// AddRoot registers a root and returns the callback and context to start
// it with: the callback enqueues a record and calls cb (if not nil) with
// cbctx. A *backends.RootInfo context names the root.
func (p *Pipeline) AddRoot(vm vasmon.VMID, cr3 uint64, mode vasmon.Mode, fullSpace bool,
	cb vasmon.Callback, cbctx any) (vasmon.Callback, any) {
	info := RootInfo{VM: vm, CR3: cr3, Mode: mode, FullSpace: fullSpace}
	if ri, ok := cbctx.(*backends.RootInfo); ok && ri != nil {
		info.Name = ri.Name
	}
	p.rootMu.Lock()
	idx := uint32(len(p.roots))
	p.roots = append(p.roots, info)
	p.rootMu.Unlock()
	rc := &rootCtx{cb: cb, ctx: cbctx, lane: p.lanes[int(vm)%len(p.lanes)], vm: vm, idx: idx, cr3: cr3, mode: mode}
	if fullSpace {
		rc.flags |= FlagFullSpace
	}
	return p.callback, rc
}

// callback is every root's callback: it runs on a shard worker.
func (p *Pipeline) callback(ctx any, va, old, new, size uint64) { p.traced(ctx, va, old, new, size, 0) }

// traced is callback with the trap time of the write that caused the
// change (shard.Now nanoseconds; 0: unknown), the engine's
// shard.TracedCallback (host.Start asks for it).
func (p *Pipeline) traced(ctx any, va, old, new, size uint64, trap int64) {
	rc := ctx.(*rootCtx)
	if rc.cb != nil {
		rc.cb(rc.ctx, va, old, new, size)
	}
	if p.cfg.Callback != nil {
		p.cfg.Callback(rc.ctx, va, old, new, size)
	}
	var t int64
	if trap != 0 {
		t = shard.UnixNano(trap)
	}
	p.push(rc.lane, Record{VA: va, Old: old, New: new, Size: size, CR3: rc.cr3, Trap: t, Time: time.Now().UnixNano(),
		VM: rc.vm, Root: rc.idx, Mode: rc.mode, Flags: rc.flags})
}

// Push hands r to the pipeline as a callback would (its Root must be an
// index AddRoot returned, or the record has no root names).
func (p *Pipeline) Push(r Record) {
	p.push(p.lanes[int(r.VM)%len(p.lanes)], r)
}

func (p *Pipeline) push(l *lane, r Record) {
	if !l.ring.TryEnqueue(r) {
		if p.cfg.OnFull == Drop || p.closing.Load() {
			p.handoffDrops.Add(1)
			return
		}
		for !l.ring.TryEnqueue(r) {
			if p.closing.Load() {
				p.handoffDrops.Add(1)
				return
			}
			l.signal()
			runtime.Gosched()
		}
	}
	if l.parked.Load() {
		l.signal()
	}
}

func (l *lane) signal() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// spinBeforePark is how many empty polls a lane makes before it parks.
const spinBeforePark = 64

func (l *lane) loop() {
	defer l.p.lanesDone.Done()
	buf := make([]Record, 256)
	hits := make([]uint16, 0, 16)
	var m Matcher
	if l.p.cfg.Rules != nil {
		m = l.p.cfg.Rules.NewMatcher(l.p.host)
	}
	empty := 0
	for {
		n := l.ring.DequeueBatch(buf)
		if n == 0 {
			if l.p.closing.Load() {
				// Producers stopped before Close (the engine was
				// closed): one more look, then done.
				if n = l.ring.DequeueBatch(buf); n == 0 {
					return
				}
			} else if empty++; empty < spinBeforePark {
				runtime.Gosched()
				continue
			} else {
				l.parked.Store(true)
				if n = l.ring.DequeueBatch(buf); n == 0 {
					select {
					case <-l.wake:
					case <-l.p.abort:
					}
					l.parked.Store(false)
					if l.p.isAborted() {
						return
					}
					continue
				}
				l.parked.Store(false)
			}
		}
		empty = 0
		l.in.Add(uint64(n))
		for i := range buf[:n] {
			r := &buf[i]
			s := l.seq[r.VM] + 1
			l.seq[r.VM] = s
			r.Seq = s
			r.Classify()
			if KernelHalf(r.Mode, r.VA) {
				r.Flags |= FlagKernel
			}
			if m == nil {
				continue
			}
			root := l.roots[r.Root]
			if root == nil {
				ri := l.p.Root(r.Root)
				root = &ri
				l.roots[r.Root] = root
			}
			hits = m.Match(r, root, hits[:0])
			for _, h := range hits {
				l.matched[h].Add(1)
				for _, sr := range l.p.sinks {
					l.p.offer(sr, Match{Record: *r, Rule: h})
				}
			}
		}
	}
}

func (p *Pipeline) isAborted() bool {
	select {
	case <-p.abort:
		return true
	default:
		return false
	}
}

// offer hands m to a sink's channel under the policy.
func (p *Pipeline) offer(sr *sinkRun, m Match) {
	select {
	case sr.ch <- m:
		return
	default:
	}
	if p.cfg.OnFull == Drop {
		sr.c.Drop(m.Rule)
		return
	}
	select {
	case sr.ch <- m:
	case <-p.abort:
		sr.c.Drop(m.Rule)
	}
}

// maxWrite is the most matches a sink gets in one Write.
const maxWrite = 512

func (p *Pipeline) sinkLoop(sr *sinkRun) {
	defer p.sinksDone.Done()
	batch := make([]Match, 0, maxWrite)
	for {
		m, ok := <-sr.ch
		if !ok {
			return
		}
		batch = append(batch[:0], m)
	fill:
		for len(batch) < maxWrite {
			select {
			case m, ok := <-sr.ch:
				if !ok {
					break fill
				}
				batch = append(batch, m)
			default:
				break fill
			}
		}
		if p.isAborted() {
			for _, m := range batch {
				sr.c.Drop(m.Rule)
			}
			continue
		}
		if err := sr.s.Write(batch); err != nil {
			sr.c.errors.Add(1)
			for _, m := range batch {
				sr.c.Drop(m.Rule)
			}
			p.setErr(fmt.Errorf("events: sink %s: %w", sr.s.Name(), err))
			continue
		}
		for _, m := range batch {
			sr.c.emitted[m.Rule].Add(1)
		}
	}
}

func (p *Pipeline) setErr(err error) {
	p.errMu.Lock()
	if p.err == nil {
		p.err = err
	}
	p.errMu.Unlock()
}

// Err returns the first error a sink's Write returned, if any.
func (p *Pipeline) Err() error {
	p.errMu.Lock()
	defer p.errMu.Unlock()
	return p.err
}

// Close drains the lanes and the sinks and closes the sinks, within ctx:
// when ctx ends, what is still buffered is dropped (counted) and the sinks
// are closed with an ended context. Call it once the engine delivers no
// more callbacks (engine.Close returned); callbacks still running are
// dropped. It returns the sinks' close errors and the first Write error.
func (p *Pipeline) Close(ctx context.Context) error {
	p.closeOnce.Do(func() {
		p.closing.Store(true)
		for _, l := range p.lanes {
			l.signal()
		}
		stop := context.AfterFunc(ctx, func() { close(p.abort) })
		p.lanesDone.Wait()
		for _, sr := range p.sinks {
			close(sr.ch)
		}
		p.sinksDone.Wait()
		if !stop() {
			// Aborted: count what the lanes and channels still held.
			for _, l := range p.lanes {
				for {
					if _, ok := l.ring.TryDequeue(); !ok {
						break
					}
					p.handoffDrops.Add(1)
				}
			}
		}
		var errs []error
		for _, sr := range p.sinks {
			for m := range sr.ch {
				sr.c.Drop(m.Rule)
			}
			if err := sr.s.Close(ctx); err != nil {
				errs = append(errs, fmt.Errorf("events: sink %s: %w", sr.s.Name(), err))
			}
		}
		errs = append(errs, p.Err())
		p.closeErr = errors.Join(errs...)
	})
	return p.closeErr
}

// Stats are the pipeline's totals.
type Stats struct {
	Records      uint64 // records the lanes took
	HandoffDrops uint64 // records dropped before the rules (full lane)
	Matched      uint64 // matches (a record matching two rules counts two)
	Sinks        []SinkStats
}

// SinkStats are one sink's totals.
type SinkStats struct {
	Name                             string
	Emitted, Dropped, Spooled, Acked uint64
	// Errors counts failed Write calls: one per batch, and a batch holds
	// as many matches as were waiting, so Errors is at most Dropped.
	Errors uint64
}

// Stats returns the pipeline's totals so far.
func (p *Pipeline) Stats() Stats {
	var st Stats
	for _, l := range p.lanes {
		st.Records += l.in.Load()
		for i := range l.matched {
			st.Matched += l.matched[i].Load()
		}
	}
	st.HandoffDrops = p.handoffDrops.Load()
	for _, sr := range p.sinks {
		ss := SinkStats{Name: sr.s.Name(), Spooled: sr.c.spooled.Load(), Acked: sr.c.acked.Load(), Errors: sr.c.errors.Load()}
		for i := range sr.c.emitted {
			ss.Emitted += sr.c.emitted[i].Load()
			ss.Dropped += sr.c.dropped[i].Load()
		}
		st.Sinks = append(st.Sinks, ss)
	}
	return st
}

// Summary is Stats as one line for a run's summary.
func (st Stats) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "events: %d records, %d matches, %d dropped at the handoff", st.Records, st.Matched, st.HandoffDrops)
	for _, s := range st.Sinks {
		fmt.Fprintf(&b, "; %s: %d emitted, %d dropped", s.Name, s.Emitted, s.Dropped)
		if s.Spooled > 0 || s.Acked > 0 {
			fmt.Fprintf(&b, ", %d spooled, %d acked", s.Spooled, s.Acked)
		}
		if s.Errors > 0 {
			fmt.Fprintf(&b, ", %d write errors", s.Errors)
		}
	}
	return b.String()
}

// Wrap returns h with every Start going through AddRoot: the engine calls
// the pipeline's callback, which calls the backend's own.
func (p *Pipeline) Wrap(h engine.Host) engine.Host { return &host{Host: h, p: p} }

type host struct {
	engine.Host
	p *Pipeline
}

func (h *host) Start(ctx context.Context, vm vasmon.VMID, cr3 uint64, mode vasmon.Mode, monitored uint64,
	cb vasmon.Callback, cbctx any, opts engine.RootOptions) (*vasmon.Root, error) {
	pcb, pctx := h.p.AddRoot(vm, cr3, mode, opts.FullSpace, cb, cbctx)
	switch {
	case opts.Verdict != nil:
	case opts.Traced == nil:
		// The record carries the trap time (the engine passes it to a
		// traced callback).
		opts.Traced = h.p.traced
	default:
		// The engine calls the caller's traced callback instead of the
		// callback: call it with the caller's context, and make the
		// record.
		inner := opts.Traced
		rc := *pctx.(*rootCtx)
		rc.cb = nil
		opts.Traced = func(_ any, va, old, new, size uint64, trap int64) {
			inner(rc.ctx, va, old, new, size, trap)
			h.p.traced(&rc, va, old, new, size, trap)
		}
	}
	if opts.Verdict != nil {
		// The engine calls the verdict instead of the callback, with the
		// pipeline's context: unwrap it, and make the record.
		inner := opts.Verdict
		rc := *pctx.(*rootCtx)
		rc.cb = nil // the engine does not call the callback of a verdict root
		opts.Verdict = func(c any, va, old, new, size uint64) shard.Verdict {
			v := inner(rc.ctx, va, old, new, size)
			h.p.callback(&rc, va, old, new, size)
			return v
		}
	}
	return h.Host.Start(ctx, vm, cr3, mode, monitored, pcb, pctx, opts)
}
