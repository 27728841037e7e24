package qemu

import (
	"testing"

	"github.com/vasengine/vasengine/vasmon"
)

// Two vCPUs as QEMU 7.2 prints them for "info registers -a" (trimmed).
const infoRegisters = `
CPU#0
RAX=000000000001ad40 RBX=0000000000000000 RCX=0000000000000000 RDX=4000000000000000
RIP=ffffffffb7c17a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CR0=80050033 CR2=00000000005794a9 CR3=00000000027a6000 CR4=000006b0
DR6=00000000ffff0ff0 DR7=0000000000000400
EFER=0000000000000d01
CPU#1
CR0=80050033 CR2=0000000000000000 CR3=8000000012345001 CR4=000016b0
EFER=0000000000000d01
`

func TestParseRegisters(t *testing.T) {
	regs, err := parseRegisters(infoRegisters)
	if err != nil {
		t.Fatal(err)
	}
	want := []cpuRegs{
		{CPU: 0, CR0: 0x80050033, CR3: 0x27a6000, CR4: 0x6b0, EFER: 0xd01},
		{CPU: 1, CR0: 0x80050033, CR3: 0x8000000012345001, CR4: 0x16b0, EFER: 0xd01},
	}
	if len(regs) != len(want) {
		t.Fatalf("got %d CPUs", len(regs))
	}
	for i := range want {
		if regs[i] != want[i] {
			t.Errorf("CPU %d: got %+v, want %+v", i, regs[i], want[i])
		}
	}
	if m, ok := modeOf(regs[0]); !ok || m != vasmon.Mode4 {
		t.Errorf("CPU 0: mode %v %v, want 4-level", m, ok)
	}
	if m, ok := modeOf(regs[1]); !ok || m != vasmon.Mode5 || m.RootGPA(regs[1].CR3) != 0x12345000 {
		t.Errorf("CPU 1: mode %v %v root %#x, want 5-level at 0x12345000", m, ok, m.RootGPA(regs[1].CR3))
	}
	if _, err := parseRegisters("no cpu here"); err == nil {
		t.Error("no error for output without a CPU")
	}
	if _, ok := modeOf(cpuRegs{CR0: 0x11}); ok {
		t.Error("paging off accepted")
	}
}
