package qemu

import (
	"os"
	"regexp"
	"strconv"
	"testing"
	"unsafe"

	"github.com/vasengine/vasengine/guestmem"
)

// pluginDefines returns the integer #defines of plugin/ptstore.c.
func pluginDefines(t *testing.T) map[string]uint64 {
	t.Helper()
	src, err := os.ReadFile("plugin/ptstore.c")
	if err != nil {
		t.Fatal(err)
	}
	d := map[string]uint64{}
	for _, m := range regexp.MustCompile(`(?m)^#define (\w+) \(?(0x[0-9A-Fa-f]+|[0-9]+)(?:U?LL)?\b`).FindAllSubmatch(src, -1) {
		v, err := strconv.ParseUint(string(m[2]), 0, 64)
		if err != nil {
			t.Fatal(err)
		}
		d[string(m[1])] = v
	}
	return d
}

// TestPluginLayout checks that the plugin's constants are the control
// file's and guestmem's: the header, and the version word the plugin
// stamps (its step, mirrored here, must be guestmem.Versions.Trap's).
func TestPluginLayout(t *testing.T) {
	d := pluginDefines(t)
	for name, want := range map[string]uint64{"CTL_MAGIC": ctlMagic, "CTL_VERSION": ctlVersion,
		"MAX_VCPUS": maxVCPUs, "HDR_BYTES": ctlHdrBytes, "VER_PROTECTED": guestmem.VerProtected, "VER_COUNT_SHIFT": 32,
		"REC_ROOT_END": recRootEnd, "ROOT_END_KERNEL": whyKernel, "ROOT_END_EMPTY": whyEmpty, "USER_HALF_BYTES": userEntries * 8} {
		if got, ok := d[name]; !ok || got != want {
			t.Errorf("plugin/ptstore.c: %s = %#x (defined %v), want %#x", name, got, ok, want)
		}
	}
	if unsafe.Sizeof(ctlHeader{}) > ctlHdrBytes {
		t.Errorf("header of %d bytes does not fit in %d", unsafe.Sizeof(ctlHeader{}), ctlHdrBytes)
	}
	shift := d["VER_COUNT_SHIFT"]
	// The plugin's stamp of a store to a protected page (see stamp() in
	// ptstore.c): add 2 to the count in one step, stamp the count after
	// the first.
	plugin := func(w *uint64) uint32 {
		if *w&d["VER_PROTECTED"] == 0 {
			return 0
		}
		o := *w
		*w += 2 << shift
		if s := uint32(o>>shift) + 1; s != 0 {
			return s
		}
		return 1
	}
	for _, count := range []uint64{0, 1, 41, 1<<31 - 1, 1 << 31, 1<<32 - 2, 1<<32 - 1} {
		words := []uint64{count << 32, count << 32}
		v := guestmem.VersionsOver(words[:1])
		v.SetProtected(0, true)
		words[1] = (count+1)<<shift | d["VER_PROTECTED"] // SetProtected, as the plugin reads it
		if words[0] != words[1] || !v.Protected(0) {
			t.Fatalf("count %#x: protected word %#x, the plugin reads %#x", count, words[0], words[1])
		}
		want := v.Trap(0)
		got := plugin(&words[1])
		if got != want || got == 0 {
			t.Errorf("count %#x: the plugin stamps %d, Trap %d", count, got, want)
		}
		// Both leave the page protected, stable, and counted past the
		// stamp (Trap skips count 0 on wrap-around: one more).
		if guestmem.Count(words[1]) != want && guestmem.Count(words[1]) != want+1 ||
			!guestmem.Stable(words[1]) || words[1]&guestmem.VerProtected == 0 {
			t.Errorf("count %#x: after the plugin's stamp %#x, after Trap %#x", count, words[1], words[0])
		}
		if guestmem.Count(words[0])-guestmem.Count(words[1]) > 1 {
			t.Errorf("count %#x: the plugin counts %#x, Trap %#x", count, words[1], words[0])
		}
	}
}
