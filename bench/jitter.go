package bench

import (
	"runtime"
	"slices"
	"time"
)

// Jitter is what MeasureJitter saw.
type Jitter struct {
	P99, P999 time.Duration // of the wait of an event arriving at a random moment
	Stolen    float64       // fraction of the time lost in gaps over 1 us
}

// MeasureJitter spins for d on a locked thread reading the clock and
// records the gaps over 1 us between consecutive reads. An event arriving
// uniformly at random inside a gap of length g waits g/2 on average and at
// most g; the quantiles are of that wait over the whole run (time outside
// gaps counts as no wait).
func MeasureJitter(d time.Duration) Jitter {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var gaps []time.Duration
	start := time.Now()
	last := start
	for {
		now := time.Now()
		if g := now.Sub(last); g > time.Microsecond {
			gaps = append(gaps, g)
		}
		last = now
		if now.Sub(start) >= d {
			break
		}
	}
	total := last.Sub(start)
	var j Jitter
	if total <= 0 {
		return j
	}
	var lost time.Duration
	for _, g := range gaps {
		lost += g
	}
	j.Stolen = float64(lost) / float64(total)
	// The wait w exceeds x for an arrival in the first g-x of each gap
	// longer than x: P(w > x) = sum(max(0, g-x)) / total. Find the x where
	// that falls to 1% and 0.1%.
	slices.Sort(gaps)
	quantile := func(q float64) time.Duration {
		lo, hi := time.Duration(0), time.Duration(0)
		if len(gaps) > 0 {
			hi = gaps[len(gaps)-1]
		}
		for hi-lo > 10*time.Nanosecond {
			x := (lo + hi) / 2
			var over time.Duration
			for _, g := range gaps {
				if g > x {
					over += g - x
				}
			}
			if float64(over)/float64(total) > 1-q {
				lo = x
			} else {
				hi = x
			}
		}
		return hi
	}
	j.P99, j.P999 = quantile(0.99), quantile(0.999)
	return j
}
