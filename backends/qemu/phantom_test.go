package qemu_test

import (
	"testing"

	"github.com/vasengine/vasengine/backends/qemu"
	"github.com/vasengine/vasengine/vasmon"
)

// TestCheckEntry checks the phantom test on entries Linux writes and on the
// phantoms issue 17 saw on real guests (512 MiB of RAM).
func TestCheckEntry(t *testing.T) {
	const ram = 512 << 20
	const k4, m2, g1, g512 = 1 << 12, 1 << 21, 1 << 30, 1 << 39
	cases := []struct {
		name      string
		mode      vasmon.Mode
		e, size   uint64
		plausible bool
	}{
		{"4K leaf in RAM", vasmon.Mode4, 0x8000000012345067, k4, true},
		{"4K leaf, last page of RAM", vasmon.Mode4, ram - k4 | 0x25, k4, true},
		{"not present: anything goes", vasmon.Mode4, 0x3534333231303d72, m2, true},
		{"2M leaf in RAM", vasmon.Mode4, 0x8000000001e000e7, m2, true},
		{"2M leaf with PAT (bit 12)", vasmon.Mode4, 0x1e010e7, m2, true},
		{"table at the 2M level (split)", vasmon.Mode4, 0x1234067, m2, true},
		{"table at the 512G level", vasmon.Mode4, 0x1234067, g512, true},
		{"5-level: table at the top", vasmon.Mode5, 0x1234067, 1 << 48, true},
		{"4K leaf past RAM", vasmon.Mode4, ram | 0x67, k4, false},
		{"kernel stack-end magic", vasmon.Mode4, 0x57ac6e9d, k4, false},
		{"mmu_gather counter", vasmon.Mode4, 0x1fe00000001, k4, false},
		{"ASCII text", vasmon.Mode4, 0x3534333231303d73, k4, false},
		{"user stack pointer as a 2M leaf", vasmon.Mode4, 0x7ffc7ff0ff81, m2, false},
		{"BIOS vector table as a 2M leaf", vasmon.Mode4, 0xf000ff53f000e2c3, m2, false},
		{"BIOS vector table as a 1G leaf", vasmon.Mode4, 0xf000ff53f000e2c3, g1, false},
		{"2M leaf, reserved bit 13", vasmon.Mode4, 0x1e020e7, m2, false},
		{"1G leaf larger than RAM", vasmon.Mode4, 0xe7, g1, false},
		{"PS at the top level", vasmon.Mode4, 0x12340e7, g512, false},
		{"4K leaf in the legacy hole", vasmon.Mode4, 0xb8067, k4, false},
		{"table past RAM", vasmon.Mode4, 0x7ffc7ff0f067, m2, false},
		{"size of no level", vasmon.Mode4, 0x1234067, 1 << 13, false},
	}
	for _, c := range cases {
		why := qemu.CheckEntry(c.mode, ram, c.e, c.size)
		if (why == "") != c.plausible {
			t.Errorf("%s: CheckEntry(%#x, size %#x) = %q, want plausible %v", c.name, c.e, c.size, why, c.plausible)
		}
	}
}
