package sim_test

import (
	"context"
	"math"
	"slices"
	"testing"

	"github.com/vasengine/vasengine/backends/sim"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

// linuxReal is what the linux profile is calibrated against: a real trace of
// Debian's 6.1 cloud kernel running the fork workload under the QEMU backend
// (20 s, 2.84 M events), recorded and replayed at its recorded pace by
//
//	vasengine record -backend qemu -workload fork -duration 20s -o build/linux-fork.trace
//	vasengine replay -speed recorded build/linux-fork.trace
//
// Events by kind, in vasmon.WriteKind order, and callbacks, from the
// replay's summary (the README shows them next to the simulator's).
var linuxReal = struct {
	kinds     [5]uint64 // untracked, irrelevant, partial, duplicate, relevant
	callbacks uint64
}{kinds: [5]uint64{1671524, 365192, 0, 0, 817071}, callbacks: 1184220}

// Tolerances of the calibration. The untracked share of a run depends on
// how far the engine lags behind the guest (a freed table reused before its
// unhook lands traps as untracked), in the real run as here: it moves with
// the machine's load (51% to 74% for the real trace: live, replayed at the
// recorded pace, replayed as fast as possible; here several points between
// an idle machine and one running other tests), hence its wider tolerance.
// The other kinds are compared as shares of the tracked events (those that
// found a hooked table), which load hardly moves, and so are callbacks per
// tracked event.
const (
	untrackedTolerance = 10.0 // percentage points of all events
	kindTolerance      = 5.0  // percentage points of the tracked events
	callbackTolerance  = 0.30 // relative, callbacks per tracked event
)

// TestLinuxCalibration keeps the linux profile calibrated: one 4-level VM
// with one vCPU through a two-shard engine must show the real trace's mix of
// write kinds, and its callbacks per tracked event, within the tolerances.
// It runs three fixed seeds and checks the median of each figure, so that
// one run slowed by other work on the machine does not decide.
func TestLinuxCalibration(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector slows the simulator's stores more than the engine: fewer freed tables are reused before their unhook, so the untracked share is not the profile's")
	}
	events := uint64(1000000)
	if testing.Short() {
		events = 300000
	}
	type figures struct {
		untracked float64    // share of all events, %
		tracked   [5]float64 // shares of the tracked events by kind, %
		callbacks float64    // per tracked event
	}
	figs := func(kinds [5]uint64, callbacks uint64) figures {
		var n uint64
		for _, k := range kinds {
			n += k
		}
		tracked := n - kinds[vasmon.WriteUntracked]
		f := figures{untracked: 100 * float64(kinds[vasmon.WriteUntracked]) / float64(n),
			callbacks: float64(callbacks) / float64(tracked)}
		for k := range kinds {
			if vasmon.WriteKind(k) != vasmon.WriteUntracked {
				f.tracked[k] = 100 * float64(kinds[k]) / float64(tracked)
			}
		}
		return f
	}
	want := figs(linuxReal.kinds, linuxReal.callbacks)
	var runs []figures
	for seed := uint64(1); seed <= 3; seed++ {
		kinds, callbacks := runLinux(t, seed, events)
		runs = append(runs, figs(kinds, callbacks))
		t.Logf("seed %d: kinds %v, %d callbacks", seed, kinds, callbacks)
	}
	med := func(f func(figures) float64) (float64, []float64) {
		var xs []float64
		for _, r := range runs {
			xs = append(xs, f(r))
		}
		return median(xs), xs
	}
	got, all := med(func(f figures) float64 { return f.untracked })
	t.Logf("untracked: sim %.1f%% of all events (median of %.1f), real %.1f%%", got, all, want.untracked)
	if math.Abs(got-want.untracked) > untrackedTolerance {
		t.Errorf("untracked: %.1f%% of the simulated events (median), %.1f%% of the real ones (tolerance %.0f points)",
			got, want.untracked, untrackedTolerance)
	}
	for _, k := range vasmon.WriteKinds[1:] {
		got, all := med(func(f figures) float64 { return f.tracked[k] })
		t.Logf("%-10s sim %5.1f%% of tracked events (median of %.1f), real %5.1f%%", k, got, all, want.tracked[k])
		if math.Abs(got-want.tracked[k]) > kindTolerance {
			t.Errorf("%s: %.1f%% of the simulated tracked events (median), %.1f%% of the real ones (tolerance %.0f points)",
				k, got, want.tracked[k], kindTolerance)
		}
	}
	got, all = med(func(f figures) float64 { return f.callbacks })
	t.Logf("callbacks per tracked event: sim %.3f (median of %.3f), real %.3f", got, all, want.callbacks)
	if math.Abs(got/want.callbacks-1) > callbackTolerance {
		t.Errorf("callbacks per tracked event: %.3f simulated (median), %.3f real (tolerance %.0f%%)",
			got, want.callbacks, 100*callbackTolerance)
	}
}

// runLinux runs the linux profile for at least events events and returns
// the engine's events by kind and its callbacks.
func runLinux(t *testing.T, seed, events uint64) ([5]uint64, uint64) {
	e, err := engine.New(engine.Config{Shards: 2, NoPin: true})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	s, err := sim.New(sim.Config{VMs: 1, VCPUs: 1, Mode: vasmon.Mode4, Profile: "linux", Seed: seed, RAM: 256 << 20,
		MaxEvents: events})
	if err != nil {
		t.Fatal(err)
	}
	req := request
	req.Callback = func(any, uint64, uint64, uint64, uint64) {}
	if err := s.Run(context.Background(), e, req); err != nil {
		t.Fatal(err)
	}
	if err := e.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := e.Stats()
	if st.Processed < events {
		t.Fatalf("seed %d: %d events, want at least %d", seed, st.Processed, events)
	}
	return st.Kinds, st.Callbacks
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
