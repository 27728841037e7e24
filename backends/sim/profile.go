package sim

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
)

// Op is one step of the OS model, drawn by a vCPU from its profile's mix.
type Op uint8

// Operations. Every page-table store the simulator makes is counted under
// the operation that made it.
const (
	OpSetup    Op = iota // kernel template and initial processes, built before monitoring starts
	OpTouch              // a user access: A/D set by the CPU (no trap), or a fault: demand, swap-in, copy-on-write
	OpAD                 // a kernel Accessed-only update (working-set aging): irrelevant to the monitor
	OpMmap               // a new region, a few of its pages touched
	OpMunmap             // a region unmapped: entries cleared, emptied tables unlinked and freed
	OpMprotect           // a region's RW/NX changed on every present entry
	OpFork               // fork: tables copied, writable entries write-protected in parent and child
	OpExec               // exec: a new address space replaces the old one, which is torn down
	OpExit               // exit: monitoring stopped, the tree torn down, its pages freed
	OpCreate             // process creation from scratch (CreateProcess, posix_spawn): a new root, a new program
	OpCollapse           // THP collapse: a PTE table replaced by one large-page entry and freed
	OpSplit              // THP split: a large page replaced by a full PTE table
	OpSwapOut            // swap-out or working-set trim: P cleared, swap bits kept
	OpSwitch             // context switch: no table write, another process runs
	OpHalt               // the vCPU idles for Profile.Halt
	OpReuse              // a freed table page reused at once as data (not drawn: follows the operations that free tables)
	NumOps
)

var opNames = [NumOps]string{"setup", "touch", "ad", "mmap", "munmap", "mprotect", "fork", "exec",
	"exit", "create", "collapse", "split", "swapout", "switch", "halt", "reuse"}

func (o Op) String() string {
	if o < NumOps {
		return opNames[o]
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// Mix is the relative weight of each operation in a profile.
type Mix struct {
	Touch, AD, Mmap, Munmap, Mprotect, Fork, Exec, Exit, Create, Collapse, Split, SwapOut, Switch, Halt int
}

func (m Mix) weights() [NumOps]int {
	return [NumOps]int{OpTouch: m.Touch, OpAD: m.AD, OpMmap: m.Mmap, OpMunmap: m.Munmap,
		OpMprotect: m.Mprotect, OpFork: m.Fork, OpExec: m.Exec, OpExit: m.Exit, OpCreate: m.Create, OpCollapse: m.Collapse,
		OpSplit: m.Split, OpSwapOut: m.SwapOut, OpSwitch: m.Switch, OpHalt: m.Halt}
}

// Profile is a named workload: the mix of operations a vCPU draws.
type Profile struct {
	Name     string
	Doc      string
	Mix      Mix
	WritePct int           // percentage of touches that are writes
	Halt     time.Duration // how long an OpHalt idles the vCPU
}

// profiles is the profile table. The events a profile produces follow from
// its mix and from how many stores each operation makes: a munmap or a fork
// writes one entry per mapped page, an A/D update exactly one, a touch of a
// present page none (the CPU sets A/D without a trap).
//
//   - idle: a guest with nothing to do. Half the draws halt the vCPU for a
//     millisecond (HLT until the next timer tick); the rest are context
//     switches, page-table aging and the odd fault. Far below the as-fast-
//     as-possible rate of the other profiles.
//   - web: a web server. Request buffers come and go: many mmap/munmap pairs
//     and demand faults, page-table aging (A/D-only writes), a few mprotects
//     (a JIT flipping W^X), THP collapses and splits, swap-outs, worker
//     processes forked and retired now and then.
//   - build: a compiler driver. fork/exec/exit storms of short-lived
//     processes, each demand-faulting its new address space, with mmap/
//     munmap of its buffers.
//   - forkstorm: fork and exit as fast as possible: copy-on-write
//     write-protection of the parent, tree copies and teardowns, and
//     copy-on-write breaks when the processes touch their pages.
//   - windows: Windows 10, where most page-table writes the hypervisor traps
//     (85%) change only Accessed/Dirty: working-set aging dominates; the rest
//     are demand faults, VirtualAlloc/VirtualFree, trims and a few process
//     creations (no fork: CreateProcess is an exec).
//   - linux: calibrated against a real Linux trace (Debian's 6.1 kernel
//     running the busybox fork workload under the QEMU backend; see
//     TestLinuxCalibration): its split of tracked writes into irrelevant
//     and relevant ones matches the replayed trace's, its untracked share
//     is within a few points of it and its callbacks per tracked event
//     about 10% higher, with operations chosen for what they produce, not
//     as a model of that workload. Real untracked writes are mostly (we
//     believe) stores to freed tables reused before their unhook lands;
//     here they are those of munmap/mmap churn (freed tables reused as data
//     and as tables), and writes already in a read of their page (an engine
//     behind the guest reads a newly linked table with the stores that
//     followed the link). The irrelevant ones are A/D-only updates here,
//     the relevant ones mostly faults, munmap and mprotect, one callback
//     each. Short halts (user code between the kernel's page-table work)
//     pace it to a few hundred thousand events per second, near the real
//     guest's 142 k/s: as fast as possible it runs 10 times faster than
//     the real guest, and how far the engine then lags (and so the
//     untracked share: writes found already in a read) depends on the
//     machine's load. THP collapse and split are left out: each reports a
//     whole table's mappings from one event. Fork, exec and exit are left out: the simulator stops a root before its teardown, so each
//     exit reports a whole address space through Stop with no event, where
//     a real Linux exit is seen store by store (the QEMU backend stops a
//     root once its user half is empty), which would put callbacks per
//     event far above the real figure. The simulator's 4-level kernels
//     write whole entries; the real guest's narrower stores (under 1%, bit
//     operations) are not modelled, and do not show in the real kinds
//     either: the QEMU backend submits the whole entry it re-reads after
//     each store.
var profiles = []Profile{
	{Name: "idle", WritePct: 30, Halt: time.Millisecond,
		Doc: "mostly halted: context switches, page aging, rare faults",
		Mix: Mix{Halt: 50, Switch: 25, AD: 10, Touch: 12, Mmap: 1, Munmap: 1, SwapOut: 1}},
	{Name: "web", WritePct: 40,
		Doc: "web server: mmap/munmap of buffers, demand faults, A/D aging, some mprotect, THP, worker forks",
		Mix: Mix{Touch: 40, AD: 25, Mmap: 8, Munmap: 8, Mprotect: 2, Fork: 1, Exit: 1, Collapse: 1,
			Split: 1, SwapOut: 3, Switch: 10}},
	{Name: "build", WritePct: 50,
		Doc: "compiler: fork/exec/exit storms of short-lived processes, demand faults, mmap/munmap",
		Mix: Mix{Touch: 50, AD: 8, Mmap: 6, Munmap: 5, Mprotect: 1, Fork: 5, Exec: 5, Exit: 5, Collapse: 1,
			Split: 1, SwapOut: 1, Switch: 10}},
	{Name: "forkstorm", WritePct: 60,
		Doc: "fork and exit as fast as possible; copy-on-write breaks on touch",
		Mix: Mix{Touch: 30, Fork: 20, Exit: 20, Exec: 2, AD: 3, Mmap: 2, Munmap: 2, Switch: 10}},
	{Name: "windows", WritePct: 30,
		Doc: "Windows 10: ~85% of trapped writes are A/D-only (working-set aging); faults, VirtualAlloc/Free, trims",
		Mix: Mix{AD: 2500, Touch: 100, Mmap: 6, Munmap: 6, Mprotect: 3, Create: 1, Exit: 1, SwapOut: 10, Switch: 50}},
	{Name: "linux", WritePct: 60, Halt: 20 * time.Microsecond,
		Doc: "calibrated on a real Linux 6.1 fork workload (QEMU backend): its mix of write kinds and callbacks per event",
		Mix: Mix{Touch: 120, AD: 220, Mmap: 16, Munmap: 16, Mprotect: 80, Switch: 40, Halt: 10}},
}

// Profiles returns the names of the workload profiles.
func Profiles() []string {
	names := make([]string, len(profiles))
	for i, p := range profiles {
		names[i] = p.Name
	}
	return names
}

// LookupProfile returns the profile named name.
func LookupProfile(name string) (Profile, error) {
	for _, p := range profiles {
		if p.Name == name {
			return p, nil
		}
	}
	return Profile{}, fmt.Errorf("sim: unknown profile %q (want one of %s)", name, strings.Join(Profiles(), ", "))
}

// drawer draws operations from a mix.
type drawer struct {
	cum   [NumOps]int
	total int
}

func newDrawer(m Mix) drawer {
	var d drawer
	for i, w := range m.weights() {
		d.total += max(w, 0)
		d.cum[i] = d.total
	}
	return d
}

func (d *drawer) draw(r *rand.Rand) Op {
	x := r.IntN(d.total)
	for i, c := range d.cum {
		if x < c {
			return Op(i)
		}
	}
	return OpSwitch
}
