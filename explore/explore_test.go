package explore

import (
	"flag"
	"fmt"
	"testing"

	"github.com/vasengine/vasengine/vasmon"
)

var (
	seeds = flag.Int("explore.seeds", 0, "schedules to explore per configuration (0: the default)")
	first = flag.Uint64("explore.seed", 1, "first seed")
)

// configOf derives a schedule's configuration from its seed, so that one
// number replays a failure: go test -run TestExplore -explore.seed=N -explore.seeds=1 -v
func configOf(seed uint64) Config {
	c := Config{Seed: seed, Shards: 1 + int(seed%4), Roots: 1 + int(seed/4%2), Writes: 30 + int(seed%17),
		Churn: seed%3 != 0, Reuse: seed%5 != 0, Sync: seed%2 == 0, Deny: seed%4 == 0, Flood: seed%7 < 3}
	for k := 0; k < 1+int(seed/8%2); k++ {
		c.Modes = append(c.Modes, vasmon.Modes[int(seed/16+uint64(k))%4])
	}
	return c
}

// TestExplore runs many schedules; a failure names its seed.
func TestExplore(t *testing.T) {
	n := 10000 // CI: at least 10^4 schedules
	if testing.Short() {
		n = 1000
	}
	if *seeds > 0 {
		n = *seeds
	}
	var total Stats
	for s := *first; s < *first+uint64(n); s++ {
		st, err := Run(configOf(s))
		if err != nil {
			t.Fatalf("%+v\n%v", configOf(s), err)
		}
		total.Steps += st.Steps
		total.Stores += st.Stores
		total.Traps += st.Traps
		total.Callbacks += st.Callbacks
		total.Checks += st.Checks
	}
	t.Logf("%d schedules: %d steps, %d stores, %d traps, %d callbacks, %d quiescent checks", n, total.Steps, total.Stores, total.Traps, total.Callbacks, total.Checks)
}

// FuzzExplore explores schedules from a seed and a program of guest stores.
func FuzzExplore(f *testing.F) {
	for s := uint64(1); s <= 8; s++ {
		f.Add(s, []byte(fmt.Sprintf("seed%d", s)))
	}
	f.Fuzz(func(t *testing.T, seed uint64, prog []byte) {
		c := configOf(seed)
		c.Program = prog
		if _, err := Run(c); err != nil {
			t.Fatal(err)
		}
	})
}
