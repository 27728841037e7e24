package main

import (
	"bytes"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vasengine/vasengine/backends/kvm"
	"github.com/vasengine/vasengine/vasmon"
)

// injectProbe makes kvm.Probe answer: modes in runs run, the others fail
// with ErrModeUnsupported and why; noKVM: no mode runs, no /dev/kvm.
func injectProbe(t *testing.T, noKVM bool, why string, runs ...vasmon.Mode) {
	t.Helper()
	t.Cleanup(kvm.SetProbe(func(m vasmon.Mode) error {
		switch {
		case noKVM:
			return fmt.Errorf("%w: %s: open %s: no such file or directory", kvm.ErrNoKVM, kvm.Device, kvm.Device)
		case slices.Contains(runs, m):
			return nil
		}
		return fmt.Errorf("%w: %v guests: %s", kvm.ErrModeUnsupported, m, why)
	}))
}

// TestKVMRefusals: with the probe's answers injected, a run the host
// cannot do ends at once with a usage error (one line and the hint, exit
// 2), and prints no summary.
func TestKVMRefusals(t *testing.T) {
	const why = "CR0.PG dropped (injected)"
	for _, tc := range []struct {
		noKVM bool
		runs  []vasmon.Mode
		args  []string
		want  string
	}{
		{false, []vasmon.Mode{vasmon.Mode4}, []string{"-mode", "pae"}, "-backend kvm -mode pae: " + kvm.ErrModeUnsupported.Error() + ": pae guests: " + why},
		{false, []vasmon.Mode{vasmon.Mode4}, []string{"-mode", "32-bit"}, "-backend kvm -mode 32-bit: "},
		{false, []vasmon.Mode{vasmon.Mode4, vasmon.ModePAE, vasmon.Mode32}, []string{"-mode", "5-level"}, "no 5-level mode"},
		{false, nil, []string{"-mode", "mixed"}, "runs none of the guest's paging modes: not 4-level guests: " + why + "; not pae guests: "},
		{false, nil, []string{"-mode", "4-level"}, "-backend kvm -mode 4-level: "},
		{true, nil, nil, "-backend kvm: " + kvm.ErrNoKVM.Error()},
		{true, nil, []string{"-mode", "4-level"}, kvm.ErrNoKVM.Error()},
		{false, []vasmon.Mode{vasmon.Mode4}, []string{"-mode", "4-level", "-vcpus", "17"}, "-vcpus 17: must be within 1..16 for kvm"},
		{false, []vasmon.Mode{vasmon.Mode4}, []string{"-mode", "4-level", "-kvm-mode", "lazy"}, "-kvm-mode"},
	} {
		injectProbe(t, tc.noKVM, why, tc.runs...)
		args := append([]string{"run", "-backend", "kvm", "-duration", "1m"}, tc.args...)
		t0 := time.Now()
		code, stdout, stderr := runMain(args...)
		usageFailure(t, args, code, stderr)
		if first, _, _ := strings.Cut(stderr, "\n"); stdout != "" || !strings.Contains(first, tc.want) {
			t.Errorf("%v (host runs %v, no /dev/kvm %v): exit %d, stdout %q, stderr %q; want exit 2, no summary, a usage error with %q",
				tc.args, tc.runs, tc.noKVM, code, stdout, stderr, tc.want)
		}
		if d := time.Since(t0); d > 10*time.Second {
			t.Errorf("%v: refused after %v, not at once", tc.args, d)
		}
	}
}

// TestKVMMixedModes: -mode mixed runs the modes the host runs, in turn,
// and says which (the probe's answers injected).
func TestKVMMixedModes(t *testing.T) {
	for _, runs := range [][]vasmon.Mode{
		{vasmon.Mode4},
		{vasmon.Mode4, vasmon.Mode32},
		kvm.GuestModes(),
	} {
		injectProbe(t, false, "injected reason", runs...)
		var note bytes.Buffer
		f := kvmFlags{sim: &simFlags{vms: 5, vcpus: 1, mode: "mixed"}, trapMode: "trap"}
		b, err := f.backend(&note)
		if err != nil {
			t.Fatalf("host runs %v: %v", runs, err)
		}
		cfg := b.(*kvmBackend).cfg
		if !slices.Equal(cfg.Modes, runs) || cfg.VMs != 5 {
			t.Fatalf("host runs %v: the guests would run %v (%d VMs)", runs, cfg.Modes, cfg.VMs)
		}
		var names []string
		for _, m := range runs {
			names = append(names, m.String())
		}
		n := note.String()
		if strings.Count(n, "\n") != 1 || !strings.Contains(n, strings.Join(names, ", ")) {
			t.Fatalf("host runs %v: note %q", runs, n)
		}
		for _, m := range kvm.GuestModes() {
			if !slices.Contains(runs, m) && !strings.Contains(n, "not "+m.String()+" guests: injected reason") {
				t.Fatalf("host runs %v: the note does not say why %v is left out: %q", runs, m, n)
			}
		}
	}
}

// TestKVMSummary: the run summary's KVM lines carry the backend's own
// figures: traps/s, slot flips with mean and max, shadow zaps and
// self-checks in trap mode; dirty pages/s, and no trap rate, in dirty mode.
func TestKVMSummary(t *testing.T) {
	vm := func(id vasmon.VMID, m vasmon.Mode) kvm.VMStats { return kvm.VMStats{ID: id, Paging: m} }
	trap := kvm.Summary{Mode: kvm.Trap, Elapsed: 2 * time.Second,
		VMs:   []kvm.VMStats{vm(1, vasmon.Mode4), vm(2, vasmon.ModePAE), vm(3, vasmon.Mode4)},
		Total: kvm.VMStats{Traps: 30000, Submitted: 30000, Zaps: 29000, Flips: 400, FlipTime: 400 * 300 * time.Microsecond, FlipMax: 12 * time.Millisecond, Checks: 777, Ops: 900, RootsStarted: 9, RootsStopped: 4}}
	out := strings.Join(kvmSummaryLines(trap), "\n")
	for _, want := range []string{"3 guests (4-level, pae), trap mode", "777 guest self-checks passed", "30000 trapped writes (15.0k/s)",
		"29000 shadow zaps", "400 slot flips (mean 300µs, max 12ms)", "9 address spaces started, 4 stopped"} {
		if !strings.Contains(out, want) {
			t.Fatalf("trap-mode summary lacks %q:\n%s", want, out)
		}
	}
	dirty := kvm.Summary{Mode: kvm.Dirty, Elapsed: 4 * time.Second, VMs: []kvm.VMStats{vm(1, vasmon.Mode4)},
		Total: kvm.VMStats{DirtyPages: 8000, Harvests: 3000, Submitted: 500, Checks: 5}}
	out = strings.Join(kvmSummaryLines(dirty), "\n")
	if !strings.Contains(out, "8000 dirty pages (2.0k/s) in 3000 harvests") || !strings.Contains(out, "dirty mode") ||
		strings.Contains(out, "trapped writes") {
		t.Fatalf("dirty-mode summary:\n%s", out)
	}
}

// requireKVMHost skips loudly (or fails with VASENGINE_REQUIRE_KVM set)
// when this host's KVM cannot run 4-level guests.
func requireKVMHost(t *testing.T) {
	t.Helper()
	if err := kvm.Probe(vasmon.Mode4); err != nil {
		msg := fmt.Sprintf("\n*** SKIPPED: the KVM backend cannot run here: %s\n*** `vasengine run -backend kvm` was NOT run by this test.", oneLine(err.Error()))
		if os.Getenv("VASENGINE_REQUIRE_KVM") != "" {
			t.Fatal(msg)
		}
		fmt.Fprintln(os.Stderr, msg)
		t.Skip(msg)
	}
}

// TestRunKVM runs real guests through the command line, in trap and in
// dirty mode, and checks the KVM lines of the summary against the
// engine's accounting.
func TestRunKVM(t *testing.T) {
	requireKVMHost(t)
	for _, mode := range []string{"trap", "dirty"} {
		if mode == "dirty" && kvm.DirtyRingSupported() != nil {
			t.Logf("dirty mode: %v", kvm.DirtyRingSupported())
			continue
		}
		code, out, stderr := runMain("run", "-backend", "kvm", "-kvm-mode", mode, "-vms", "2", "-vcpus", "1", "-iterations", "60",
			"-duration", "2m", "-shards", "1")
		if code != 0 {
			t.Fatalf("%s: exit %d: %s", mode, code, stderr)
		}
		if !strings.Contains(stderr, "kvm: -mode mixed") {
			t.Fatalf("%s: -mode mixed (the default) does not say which modes run: %q", mode, stderr)
		}
		var sub, proc, rej uint64
		if i := strings.Index(out, "; submitted "); i >= 0 {
			fmt.Sscanf(out[i:], "; submitted %d = processed %d + rejected %d", &sub, &proc, &rej)
		}
		var runs []string
		for _, m := range kvm.GuestModes() {
			if kvm.Probe(m) == nil && len(runs) < 2 {
				runs = append(runs, m.String())
			}
		}
		head := regexp.MustCompile(`kvm: (\d+) guests \(` + strings.Join(runs, ", ") + `\), ` + mode + ` mode, \S+ of guest run time: (\d+) guest iterations, (\d+) guest self-checks passed`).FindStringSubmatch(out)
		what := map[string]string{"trap": "trapped writes", "dirty": "dirty pages"}[mode]
		figs := regexp.MustCompile(`kvm: (\d+) ` + what + ` \(([0-9.]+k?)/s\).*; (\d+) events submitted, (\d+) rejected`).FindStringSubmatch(out)
		if head == nil || figs == nil || head[1] != "2" || head[2] != "120" || head[3] == "0" || figs[1] == "0" || figs[2] == "0" ||
			figs[3] != fmt.Sprint(sub) || sub == 0 || figs[4] != fmt.Sprint(rej) {
			t.Fatalf("%s: KVM lines disagree with the run (2 guests, 120 iterations, engine submitted %d rejected %d):\n%s",
				mode, sub, rej, out)
		}
		if mode == "trap" && (!strings.Contains(out, "slot flips (mean ") || !strings.Contains(out, "shadow zaps")) {
			t.Fatalf("trap-mode summary lacks slot flips or shadow zaps:\n%s", out)
		}
	}
}
