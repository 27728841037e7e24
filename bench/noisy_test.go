package bench_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/guestmem"
	"github.com/vasengine/vasengine/shard"
	"github.com/vasengine/vasengine/vasmon"
	"github.com/vasengine/vasengine/vasmon/vasmontest"
	"github.com/vasengine/vasengine/vmlimit"
)

var (
	noisyRounds  = flag.Int("noisy.rounds", 3, "BenchmarkNoisyNeighbor: paired rounds per case (each runs the victims without and with the flooder)")
	noisyTime    = flag.Duration("noisy.time", time.Second, "BenchmarkNoisyNeighbor: measured time of each half round")
	noisyVictims = flag.Int("noisy.victims", 7, "BenchmarkNoisyNeighbor: victim VMs")
	noisyRate    = flag.Float64("noisy.rate", 20000, "BenchmarkNoisyNeighbor: trapped events/s of each victim VM")
	noisyVCPUs   = flag.Int("noisy.vcpus", 2, "BenchmarkNoisyNeighbor: vCPUs per VM (victims and profile flooder)")
	noisyFilter  = flag.String("noisy.flooders", "page,profile,busy", "BenchmarkNoisyNeighbor: flooders to run (page, profile, busy)")
	noisyLimit   = flag.Float64("noisy.limit", 0, "BenchmarkNoisyNeighbor: events/s limit of every VM (package vmlimit, as run -vm-max-rate); 0: none")
)

// BenchmarkNoisyNeighbor: one VM must not slow the others (issue 19).
// Victims: -noisy.victims simulated VMs of the web profile (4-level,
// -noisy.vcpus vCPUs each) at -noisy.rate trapped events/s each, paced by
// the simulator. Flooders, one more VM on the same engine:
//
//   - page: a vCPU that rewrites the entries of one page-table page (a
//     level-1 table: Accessed-bit flips, irrelevant, no callback) in a
//     tight loop, its writes trapped while the page is write-protected
//     (stamped on the page's version word, submitted 64 at a time);
//   - profile: a VM of the same web profile as fast as it goes;
//   - busy (a control, not a flooder): a vCPU that spins writing its own
//     data pages, never a page table: no event, only the CPU it takes. A
//     simulated vCPU is a goroutine holding one of the process's Ps (here
//     two) until the Go scheduler preempts it, where a real vCPU thread
//     runs the guest inside KVM_RUN without one; busy measures what that
//     alone costs the victims.
//
// With -noisy.limit every VM (victims and flooder) goes through package
// vmlimit at that many events/s, as run -vm-max-rate does.
//
// Each case runs -noisy.rounds paired rounds in one process, each round a
// half without the flooder and a half with it (without first in even
// rounds, with first in odd ones), each half on a fresh engine and fresh
// VMs, measured for -noisy.time after the VMs booted and 100 ms of warm-up.
// Cases: blocking and non-blocking submission, 1 and 2 shards, the engine's
// write-flood policy on (its defaults) and off.
//
// Reported, over the victims only (the median over rounds, the with half
// and the without half): p50/p99/p99.9 trap-to-callback (the engine's
// per-VM histograms, power-of-two buckets, interpolated geometrically
// within the bucket: an estimate, exact to the bucket), the share of the
// victims' vCPU time spent inside Submit (blocked-%: the time in Submit over
// vCPUs x time, the limit's waits included), events rejected by the engine
// and, with -noisy.limit, held or refused by the limit (summed over
// rounds), events/s submitted;
// the with/without p99 ratio (median over rounds, min and max); the
// flooder's events/s, rejected events and flooded pages at the end.
// b.N is ignored: run it with -benchtime 1x, e.g.
//
//	go test -run XXX -bench BenchmarkNoisyNeighbor -benchtime 1x ./bench/ -args -noisy.rounds 3 -noisy.time 1s
func BenchmarkNoisyNeighbor(b *testing.B) {
	for _, flooder := range []string{"page", "profile", "busy"} {
		if !slices.Contains(splitComma(*noisyFilter), flooder) {
			continue
		}
		for _, nb := range []bool{false, true} {
			for _, shards := range []int{1, 2} {
				for _, policy := range []bool{true, false} {
					if flooder == "busy" && !policy {
						continue // no event: the policy changes nothing
					}
					submit := "blocking"
					if nb {
						submit = "nonblocking"
					}
					pol := "on"
					flood := vasmon.FloodPolicy{}
					if !policy {
						pol, flood.Writes = "off", -1
					}
					cfg := engine.Config{Shards: shards, NonBlocking: nb, Flood: flood}
					b.Run(fmt.Sprintf("flooder=%s/%s/shards=%d/policy=%s", flooder, submit, shards, pol), func(b *testing.B) {
						noisyCase(b, cfg, flooder)
					})
				}
			}
		}
	}
}

func splitComma(s string) []string {
	var out []string
	for len(s) > 0 {
		i := 0
		for i < len(s) && s[i] != ',' {
			i++
		}
		out = append(out, s[:i])
		if i < len(s) {
			i++
		}
		s = s[i:]
	}
	return out
}

// noisyHalf is what one half round measured.
type noisyHalf struct {
	p50, p99, p999 float64 // victims, ns
	blocked        float64 // victims' share of vCPU time in Submit
	rejected       uint64  // victims' events rejected by the engine
	throttled      uint64  // victims' events held or refused by -noisy.limit
	victimRate     float64 // victims' events/s submitted (all of them)
	flooderRate    float64 // flooder's events/s submitted
	flooderRej     uint64
	flooded        int64 // flooder's pages flooded at the end
}

func noisyCase(b *testing.B, cfg engine.Config, flooder string) {
	rounds := max(*noisyRounds, 1)
	var with, without []noisyHalf
	var ratios []float64
	for r := 0; r < rounds; r++ {
		order := []bool{false, true}
		if r%2 == 1 {
			order = []bool{true, false}
		}
		var h [2]noisyHalf
		for _, on := range order {
			res, err := runNoisyHalf(cfg, flooder, on, *noisyTime, uint64(r+1))
			if err != nil {
				b.Fatal(err)
			}
			if on {
				h[1] = res
			} else {
				h[0] = res
			}
		}
		without, with = append(without, h[0]), append(with, h[1])
		ratios = append(ratios, h[1].p99/math.Max(h[0].p99, 1))
	}
	med := func(hs []noisyHalf, f func(noisyHalf) float64) float64 {
		v := make([]float64, len(hs))
		for i, h := range hs {
			v[i] = f(h)
		}
		return median(v)
	}
	for _, x := range []struct {
		name string
		hs   []noisyHalf
	}{{"with", with}, {"without", without}} {
		b.ReportMetric(med(x.hs, func(h noisyHalf) float64 { return h.p50 }), "p50-"+x.name+"-ns")
		b.ReportMetric(med(x.hs, func(h noisyHalf) float64 { return h.p99 }), "p99-"+x.name+"-ns")
		b.ReportMetric(med(x.hs, func(h noisyHalf) float64 { return h.p999 }), "p999-"+x.name+"-ns")
		b.ReportMetric(100*med(x.hs, func(h noisyHalf) float64 { return h.blocked }), "blocked-"+x.name+"-%")
		b.ReportMetric(med(x.hs, func(h noisyHalf) float64 { return h.victimRate }), "victims-"+x.name+"-events/s")
		var rej, thr uint64
		for _, h := range x.hs {
			rej += h.rejected
			thr += h.throttled
		}
		b.ReportMetric(float64(rej), "victim-rejected-"+x.name)
		if *noisyLimit > 0 {
			b.ReportMetric(float64(thr), "victim-throttled-"+x.name)
		}
	}
	b.ReportMetric(median(ratios), "p99-ratio")
	b.ReportMetric(slices.Min(ratios), "p99-ratio-min")
	b.ReportMetric(slices.Max(ratios), "p99-ratio-max")
	b.ReportMetric(med(with, func(h noisyHalf) float64 { return h.flooderRate }), "flooder-events/s")
	var frej uint64
	var flooded int64
	for _, h := range with {
		frej += h.flooderRej
		flooded = max(flooded, h.flooded)
	}
	b.ReportMetric(float64(frej), "flooder-rejected")
	b.ReportMetric(float64(flooded), "flooded-pages")
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// timedHost passes everything to the engine and adds up the time each of
// the victims (VM IDs 1..n) spends in Submit.
type timedHost struct {
	engine.Host
	n       int
	blocked []atomic.Int64
}

func (h *timedHost) Submit(vm vasmon.VMID, evs []shard.Event) (int, error) {
	if int(vm) < 1 || int(vm) > h.n {
		return h.Host.Submit(vm, evs)
	}
	t := shard.Now()
	k, err := h.Host.Submit(vm, evs)
	h.blocked[vm-1].Add(shard.Now() - t)
	return k, err
}

func (h *timedHost) total() int64 {
	var n int64
	for i := range h.blocked {
		n += h.blocked[i].Load()
	}
	return n
}

// waitBoot waits until s has started the roots of its initial processes
// (or its run ended).
func waitBoot(s *sim.Sim, roots int, done <-chan error) error {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	deadline := time.Now().Add(20 * time.Second)
	for st := s.Stats(); st.RootsStarted+st.StartErrors < uint64(roots); st = s.Stats() {
		if time.Now().After(deadline) {
			return fmt.Errorf("the simulator did not boot within 20s")
		}
		select {
		case err := <-done:
			return fmt.Errorf("the simulation ended early: %v", err)
		case <-tick.C:
		}
	}
	return nil
}

// runNoisyHalf runs the victims on a fresh engine, with the flooder or not,
// and measures them.
func runNoisyHalf(cfg engine.Config, flooder string, withFlooder bool, d time.Duration, seed uint64) (noisyHalf, error) {
	var res noisyHalf
	e, err := engine.New(cfg)
	if err != nil {
		return res, err
	}
	defer e.Close()
	nv, vcpus := *noisyVictims, *noisyVCPUs
	var inner engine.Host = e
	var lim *vmlimit.Host
	if *noisyLimit > 0 {
		lim, err = vmlimit.New(e, vmlimit.Config{Rate: *noisyLimit, NonBlocking: cfg.NonBlocking})
		if err != nil {
			return res, err
		}
		inner = lim
	}
	host := &timedHost{Host: inner, n: nv, blocked: make([]atomic.Int64, nv)}
	req := backends.Request{Monitored: backends.DefaultMonitored}
	victims, err := sim.New(sim.Config{VMs: nv, VCPUs: vcpus, Mode: vasmon.Mode4, Profile: "web", Rate: *noisyRate, Seed: seed})
	if err != nil {
		return res, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	vdone := make(chan error, 1)
	go func() { vdone <- victims.Run(ctx, host, req) }()
	if err := waitBoot(victims, nv*4, vdone); err != nil {
		return res, err
	}
	floodID := vasmon.VMID(nv + 1)
	var stopFlood func() error
	if withFlooder {
		switch flooder {
		case "page":
			pf, err := startPageFlood(e, inner, floodID)
			if err != nil {
				return res, err
			}
			stopFlood = pf.stop
		case "profile":
			fs, err := sim.New(sim.Config{VMs: 1, VCPUs: vcpus, Mode: vasmon.Mode4, Profile: "web", Seed: seed + 100, FirstVM: floodID})
			if err != nil {
				return res, err
			}
			fctx, fcancel := context.WithCancel(context.Background())
			fdone := make(chan error, 1)
			go func() { fdone <- fs.Run(fctx, inner, req) }()
			if err := waitBoot(fs, 4, fdone); err != nil {
				fcancel()
				return res, err
			}
			stopFlood = func() error {
				fcancel()
				if err := <-fdone; err != nil && ctx.Err() == nil && err != context.Canceled {
					return err
				}
				return nil
			}
		case "busy":
			var quit atomic.Bool
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]uint64, 4096)
				for i := uint64(0); !quit.Load(); i++ {
					buf[i%4096] += i
				}
			}()
			stopFlood = func() error { quit.Store(true); wg.Wait(); return nil }
		default:
			return res, fmt.Errorf("unknown flooder %q", flooder)
		}
	}
	time.Sleep(100 * time.Millisecond) // warm-up
	victimThrottled := func() uint64 {
		var n uint64
		if lim != nil {
			for _, v := range lim.Stats() {
				if int(v.VM) <= nv {
					n += v.Throttled()
				}
			}
		}
		return n
	}
	a, ba, ta, tha := e.Stats(), host.total(), time.Now(), victimThrottled()
	time.Sleep(d)
	z, bz, tz, thz := e.Stats(), host.total(), time.Now(), victimThrottled()
	res.throttled = thz - tha
	if stopFlood != nil {
		if err := stopFlood(); err != nil {
			return res, err
		}
	}
	cancel()
	if err := <-vdone; err != nil && err != context.Canceled {
		return res, err
	}
	el := tz.Sub(ta).Seconds()
	var lat [shard.VMLatencyBuckets]uint64
	var vsub uint64
	find := func(st engine.Stats, id vasmon.VMID) engine.VMStats {
		for _, v := range st.PerVM {
			if v.ID == id && !v.Removed {
				return v
			}
		}
		return engine.VMStats{}
	}
	for id := vasmon.VMID(1); id <= vasmon.VMID(nv); id++ {
		va, vz := find(a, id), find(z, id)
		for k := range lat {
			lat[k] += vz.Latency[k] - va.Latency[k]
		}
		vsub += vz.Submitted - va.Submitted
		res.rejected += vz.Rejected - va.Rejected
	}
	res.p50, res.p99, res.p999 = bucketQuantile(&lat, 0.5), bucketQuantile(&lat, 0.99), bucketQuantile(&lat, 0.999)
	res.blocked = float64(bz-ba) / (float64(nv*vcpus) * el * 1e9)
	res.victimRate = float64(vsub) / el
	if withFlooder {
		fa, fz := find(a, floodID), find(z, floodID)
		res.flooderRate = float64(fz.Submitted-fa.Submitted) / el
		res.flooderRej = fz.Rejected - fa.Rejected
		res.flooded = fz.Flooded
	}
	return res, nil
}

// bucketQuantile is the q-quantile of a per-VM latency histogram (bucket k
// holds [2^(k-1), 2^k) ns), interpolated geometrically within its bucket.
func bucketQuantile(h *[shard.VMLatencyBuckets]uint64, q float64) float64 {
	var n uint64
	for _, c := range h {
		n += c
	}
	if n == 0 {
		return 0
	}
	rank := q * float64(n)
	var seen float64
	for k, c := range h {
		if c == 0 {
			continue
		}
		if seen+float64(c) >= rank {
			if k == 0 {
				return 0
			}
			f := (rank - seen) / float64(c)
			return math.Ldexp(1, k-1) * math.Pow(2, f)
		}
		seen += float64(c)
	}
	return math.Ldexp(1, len(h)-1)
}

// pageFlood is the one-page flooder: a vCPU rewriting the entries of one
// level-1 table in a tight loop.
type pageFlood struct {
	e    engine.Host
	g    *vasmontest.Guest
	l1   uint64
	quit atomic.Bool
	wg   sync.WaitGroup
	err  error
}

func startPageFlood(e *engine.Engine, host engine.Host, id vasmon.VMID) (*pageFlood, error) {
	m := vasmon.Mode4
	g := vasmontest.NewGuest(m, 1<<30, 1<<20)
	root := g.AllocTable()
	g.Map(root, 0, 1, 0x40000000, vasmon.BitRW|vasmon.BitUS)
	l3 := m.TableAddr(g.Entry(root, 0))
	l2 := m.TableAddr(g.Entry(l3, 0))
	l1 := m.TableAddr(g.Entry(l2, 0))
	for i := 0; i < 512; i++ {
		g.SetEntry(l1, i, uint64(0x40000000+uint64(i)<<12)|vasmon.BitP|vasmon.BitRW|vasmon.BitUS)
	}
	if err := e.AddVM(id, g.Memory(), g.NewProtections(), 0); err != nil {
		return nil, err
	}
	if _, err := e.Start(context.Background(), id, root, m, backends.DefaultMonitored, bench0, nil, engine.RootOptions{}); err != nil {
		return nil, err
	}
	f := &pageFlood{e: host, g: g, l1: l1}
	f.wg.Add(1)
	go f.run(id)
	return f, nil
}

func bench0(any, uint64, uint64, uint64, uint64) {}

// run flips the Accessed bit of each entry in turn; a store to the page
// while it is write-protected traps (it is stamped and submitted, 64 at a
// time), as a guest's would.
func (f *pageFlood) run(id vasmon.VMID) {
	defer f.wg.Done()
	g := f.g
	word := g.Ver.Word(f.l1)
	vals := make([]uint64, 512)
	for i := range vals {
		vals[i] = g.Entry(f.l1, i)
	}
	batch := make([]shard.Event, 0, 64)
	for i := 0; !f.quit.Load(); i = (i + 1) % 512 {
		gpa := f.l1 + uint64(8*i)
		old := vals[i]
		nw := old ^ vasmon.BitA
		vals[i] = nw
		var ver uint32
		trapped := word.Load()&guestmem.VerProtected != 0
		if trapped {
			ver = g.Ver.BeginWrite(gpa)
		}
		_, _ = g.Mem.WriteUint(gpa, 8, nw)
		if trapped {
			g.Ver.EndWrite(gpa)
		} else if word.Load()&guestmem.VerProtected != 0 {
			ver, trapped = g.Ver.Trap(gpa), true
		}
		if trapped {
			batch = append(batch, shard.Event{GPA: gpa, Data: nw, Old: old, HasOld: true, Size: 8, Ver: ver, Trap: shard.Now()})
		}
		if len(batch) == cap(batch) || (!trapped && len(batch) > 0) {
			if _, err := f.e.Submit(id, batch); err != nil && !errors.Is(err, engine.ErrOverload) && f.err == nil {
				f.err = err
			}
			batch = batch[:0]
		}
	}
	if len(batch) > 0 {
		f.e.Submit(id, batch)
	}
}

func (f *pageFlood) stop() error {
	f.quit.Store(true)
	f.wg.Wait()
	return f.err
}
