package sim

import "github.com/vasengine/vasengine/backends"

// WithTruth returns cfg with the ground truth kept (Existed, BadHooks).
func WithTruth(cfg Config) Config {
	cfg.truth = true
	return cfg
}

// Unversioned returns cfg with the guest memory given to the host without
// its version words: the engine then cannot prove its reads (a best
// effort).
func Unversioned(cfg Config) Config {
	cfg.unversioned = true
	return cfg
}

// Existed reports whether the root of info held the leaf entry e at va, of
// size bytes, at some instant (masked by the monitored bits). Runs made
// WithTruth only.
func (s *Sim) Existed(info *backends.RootInfo, va, size, e uint64) bool {
	return s.vms[info.VM-s.cfg.FirstVM].truth.existed(info, va, size, e)
}

// BadHooks returns the pages the host protected that never were tables of
// a root. Runs made WithTruth only.
func (s *Sim) BadHooks() []uint64 {
	var out []uint64
	for _, v := range s.vms {
		v.truth.mu.Lock()
		out = append(out, v.truth.bad...)
		v.truth.mu.Unlock()
	}
	return out
}

// Windows returns, per VM (in order), how many stores the guest made into
// tables of monitored roots without a trap (the host had not yet hooked the
// table), and the first such store of the run. Runs made WithTruth only.
func (s *Sim) Windows() ([]uint64, string) {
	var n []uint64
	first := ""
	for _, v := range s.vms {
		v.truth.mu.Lock()
		n = append(n, v.truth.windows)
		if first == "" {
			first = v.truth.window
		}
		v.truth.mu.Unlock()
	}
	return n, first
}
