// Package qemu is the QEMU TCG backend: it runs real Linux guests under
// qemu-system-x86_64 (software emulation, no KVM) and feeds their page-table
// writes to an engine.Host.
//
// # Contract
//
// Write protection is the protected bit of each guest page's version word
// (guestmem.Versions) in a shared-memory control file: the Protector sets
// and clears it exactly where an EPT write hook would be set and cleared. A
// QEMU plugin (plugin/ptstore.c, built into ptstore.so in the cache folder,
// DefaultDir) tests every guest store to RAM against its page's word and,
// for a store to a protected page, pushes one record per 8-byte entry the
// store touched: the entry's address, its whole value read from guest RAM
// after the store, and the store's stamp on the page's version word. The
// backend submits each record as a shard.Event of Size 8 at the aligned
// entry address with that value as Data (no HasOld: the engine's shadow
// gives the old value), the stamp as Ver and the plugin's time of the store
// (Trap, on shard.Now's clock). Stamped events go without the storing
// instruction's address (RIP): the engine's duplicate test on RIPs would
// drop a store repeated after its entry changed through a read; the stamps
// tell deliveries apart. Events of one VM are submitted in ring order, which for records of
// one entry is the order of their reads of guest RAM, so the last event of an
// entry always carries its current value. The plugin never drops a record
// unless the backend stops draining for 10 s (Counters.Drops, which must stay
// 0). Guest RAM is the memory-backend-file mapped read-only (vasmon.Memory):
// with the pc machine and at most 2 GiB (Config.MemMB) it is contiguous from
// GPA 0 at file offset == GPA, which is also what the plugin API's
// "physical address" of a RAM store is (larger guests get RAM above 4 GiB,
// where it is not). The legacy hole 0xA0000-0xFFFFF reads the file's bytes,
// not the VGA/ROM the guest sees there; no page table lives there.
//
// Versions. The guest's Memory is vasmon.Versioned: its version words are
// the control file's, which the plugin and the Protector share. Memory
// callbacks run after a store reached guest RAM, so the plugin counts each
// entry record as a trapped write begun and ended at once after the store
// (guestmem.Versions.Trap) and stamps the record with it; the Protector's
// protect and unprotect count as changes. With them the engine proves every
// read of guest RAM against the guest's concurrent stores: a record already
// in a read of its page (the page was unhooked while its records waited in
// the ring, then hooked again and read) is dropped as stale instead of
// moving the entry back in time, and a newly linked table read after the
// guest unlinked, freed and reused its page is not reported nor hooked
// (SEMANTICS.md section 6, "No phantoms"). Every callback's new entry is
// checked against what Linux can write (CheckEntry; GuestStats.Phantoms).
//
// Accessed/Dirty bits are set by QEMU's MMU without a store callback, so they
// must not be monitored (backends.DefaultMonitored leaves them out). Stores
// made by QEMU itself on the guest's behalf (device DMA) are not seen either;
// the test guests have no DMA-capable device.
//
// # Address spaces
//
// Linux copies the kernel half of its reference top-level table
// (swapper_pg_dir) into every new PGD (pgd_alloc), and never changes the
// kernel half of a live PGD afterwards (x86-64, 6.1, no memory hotplug).
// The backend learns that kernel half by sampling every vCPU's CR3 (QMP
// "info registers -a", every Config.SampleEvery): the first kernel half that
// two distinct sampled CR3 pages share is the reference. It then
//   - starts the roots of the sampled CR3s whose page holds the reference
//     kernel half and a present user entry (the processes that existed
//     before the reference was known: init and the workload's shells);
//   - publishes the reference kernel half to the plugin, which reports
//     every store into a page's kernel half that leaves it equal to the
//     reference: a new PGD, just filled by pgd_alloc (forwards or
//     backwards: Linux's memcpy copies backwards for some alignments, so
//     entry 511 is not always the last stored). The backend checks the
//     kernel half again and starts the root at once, before the kernel
//     links any user table into it, so every address space created after
//     boot is monitored from birth, however short its life.
//
// Roots are 4- or 5-level (from CR0, CR4 and EFER of the sampled vCPUs).
// A root is stopped when its page stops being a live PGD:
//   - a write to its kernel half (entries 256-511) of a value other than
//     the reference's: Linux never changes the kernel half of a live PGD on
//     x86-64 6.1 (absent memory hotplug), so the page was freed and is being
//     reused (zeroed, or re-initialised as a PGD);
//   - a write that leaves its user half without a present entry: exit_mmap
//     clears the user half when the process exits or execs;
//   - a periodic re-check (every 100 ms) finds its kernel half changed.
//
// The first two are decided by the plugin at the store itself (the backend
// marks root pages in the control file): it write-unprotects the page there
// and then, before the guest can free and reuse it, so that the engine,
// running behind the guest, neither reports nor hooks anything from what the
// page holds afterwards (its proofs go through no unprotected page); the
// backend then stops the root.
//
// # Synchronous delivery
//
// With Config.Sync (SEMANTICS.md section 7; issue 14) the plugin holds the
// vCPU that stored into a protected page, inside the store's memory
// callback, until the backend has submitted the record through an
// engine.Syncer and the engine has done the store's closure (every hook,
// unhook and callback it caused, on every shard); the backend then answers
// the plugin through the vCPU's ack word in the control file. The vCPU
// polls the word for 20 us, then sleeps on it (a futex shared by the two
// processes); the drainer likewise sleeps on the plugin's bell when the ring
// is empty. A hold ends without an answer after 10 s, and at once when the
// Go process is found gone (the plugin then turns holds off), so a dead
// backend never hangs QEMU; Counters.GiveUps counts such holds (0 in a
// healthy run). The vCPU that completes a new PGD is held too, until its
// root is started, so that no table linked into it goes unhooked; a root
// found by sampling a CR3 instead is started with the vCPUs stopped (QMP
// stop, cont), so that its Start reads and hooks the tables while no store
// can go unseen.
//
// If a callback denies the store (RootOptions.Verdict), the backend puts
// the entry's old value back in guest RAM before it answers, as a trapped
// write of its own (stamped on the page's version word), and submits that
// write synchronously: the engine's state and callback stream end as if
// the store had been made and reverted, with guest memory unchanged. The
// old value comes from the backend's copy of every protected page, taken
// when the page is protected and kept from the records (the plugin runs
// after the store and cannot see the old bytes); a store stamped within
// that copy, or an entry changed again before the revert, cannot be
// reverted (GuestStats.Unreverted).
//
// What the other vCPUs see. QEMU 7.2 calls the plugin after the store has
// reached guest RAM, so a held vCPU's store is already visible to the
// other vCPUs, which run on: they may read the new entry and translate
// through it (their page walks read guest RAM directly, without a
// callback), and they may store into a table the held store linked before
// the engine hooks it (such a store is not trapped, but the hook's read of
// the table includes it). Linux makes both rare: the writer of a link holds
// the page-table lock until it returns from the callback, so no other vCPU
// fills the new table meanwhile (GuestStats.Windows counts such stores;
// the tests find none with Sync). A denied store is visible to the others
// until it is reverted, and a translation they cached from it (QEMU's
// soft TLB) outlives the revert until the guest flushes it. Stores of other
// vCPUs to protected pages are held each in turn: the drainer submits the
// records one at a time, in ring order. Only the writing vCPU is held; the
// guest stays consistent as on hardware where one CPU stalls on a store.
//
// # Guests
//
// Each guest is its own QEMU process, VM ID, RAM file, control file and QMP
// socket (under /dev/shm), so several run at once. The guest is Debian's 6.1
// cloud kernel with a busybox initramfs whose /init runs the workload named
// on the kernel command line (guest/init; scripts/qemu-setup.sh builds all of
// it into the cache folder, DefaultDir: $XDG_CACHE_HOME/vasengine/qemu).
package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vasengine/vasengine/backends"
	"github.com/vasengine/vasengine/engine"
	"github.com/vasengine/vasengine/vasmon"
)

// Workloads the guest's /init knows.
var Workloads = []string{"fork", "mmap", "grow", "idle", "mixed", "rwx"}

// Config configures a run. The zero value is valid: one guest running the
// fork workload until Duration (0: until every guest powers off).
type Config struct {
	Guests   int           // guests run at once; 0: 1
	Workload string        // one of Workloads; "": fork
	Rounds   int           // workload rounds before the guest powers off; 0: forever
	Jobs     int           // concurrent copies of the workload in a guest; 0: 1
	Duration time.Duration // stop the guests after this long; 0: when they power off (never with Rounds 0: end ctx)
	MemMB    int           // guest RAM in MiB; 0: 512, at most 2048
	VCPUs    int           // vCPUs per guest; 0: 1
	FirstVM  vasmon.VMID   // VM IDs are FirstVM, FirstVM+1, ...; 0: 1

	// Dir holds vmlinuz, initrd.gz and ptstore.so; "": DefaultDir(), the
	// user's cache folder.
	Dir  string
	QEMU string // the emulator binary; "": qemu-system-x86_64
	// SampleEvery is the CR3 sampling period; 0: 20 ms.
	SampleEvery time.Duration
	// RingSlots is the record ring's capacity (a power of two); 0: 1<<18.
	RingSlots int

	// Sync delivers every page-table store synchronously (SEMANTICS.md
	// section 7; see "Synchronous delivery" above): the plugin holds the
	// storing vCPU until the engine has done the store's closure, and a
	// store a callback denies (RootOptions.Verdict) is reverted.
	Sync bool
	// NewSyncer returns the synchronous submitter of a VM's writes for
	// Sync; nil: the host's own (an *engine.Engine; another host is an
	// error, ErrNoSync).
	NewSyncer func(vm vasmon.VMID) (Syncer, error)
	// Windows counts the stores into a page after it was linked and before
	// the engine hooked it (GuestStats.Windows), at the cost of a bitmap
	// test per store to an unprotected page.
	Windows bool

	// NullConsumer drains the ring but submits nothing and starts no root:
	// the plugin-only baseline. host may then be nil.
	NullConsumer bool
	// NoPlugin runs QEMU without the plugin (a baseline; nothing is monitored).
	NoPlugin bool
	// Console receives the guests' serial console; nil discards it.
	Console io.Writer
}

func (c *Config) defaults() error {
	if c.Guests == 0 {
		c.Guests = 1
	}
	if c.Workload == "" {
		c.Workload = "fork"
	}
	known := false
	for _, w := range Workloads {
		known = known || w == c.Workload
	}
	if !known {
		return fmt.Errorf("qemu: unknown workload %q (have %v)", c.Workload, Workloads)
	}
	if c.Jobs == 0 {
		c.Jobs = 1
	}
	if c.MemMB == 0 {
		c.MemMB = 512
	}
	if c.MemMB < 64 || c.MemMB > 2048 {
		// Above ~2.75 GiB the pc machine puts RAM above 4 GiB, where the
		// plugin's physical addresses are not GPAs (see ram).
		return fmt.Errorf("qemu: %d MiB of guest RAM: must be 64..2048", c.MemMB)
	}
	if c.VCPUs == 0 {
		c.VCPUs = 1
	}
	if c.VCPUs < 1 || c.VCPUs > maxVCPUs || c.Guests < 1 || c.Rounds < 0 || c.Jobs < 1 {
		return fmt.Errorf("qemu: bad guest count, vCPUs, rounds or jobs")
	}
	if c.FirstVM == 0 {
		c.FirstVM = 1
	}
	if c.Dir == "" {
		d, err := DefaultDir()
		if err != nil {
			return err
		}
		c.Dir = d
	}
	if c.QEMU == "" {
		c.QEMU = "qemu-system-x86_64"
	}
	if c.SampleEvery == 0 {
		c.SampleEvery = 20 * time.Millisecond
	}
	if c.RingSlots == 0 {
		c.RingSlots = 1 << 18
	}
	return nil
}

// DefaultDir returns the folder of the kernel, initramfs and plugin:
// $VASENGINE_QEMU_DIR if set, else vasengine/qemu in the user's cache
// folder ($XDG_CACHE_HOME, else $HOME/.cache), where scripts/qemu-setup.sh
// puts them. It does not depend on the working directory.
func DefaultDir() (string, error) {
	if d := os.Getenv("VASENGINE_QEMU_DIR"); d != "" {
		return d, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("qemu: no cache folder (%v): set Config.Dir or VASENGINE_QEMU_DIR", err)
	}
	return filepath.Join(d, "vasengine", "qemu"), nil
}

// Artifacts returns the paths of the kernel, initramfs and plugin in dir, or
// an error naming what is missing (scripts/qemu-setup.sh builds them).
func Artifacts(dir string) (kernel, initrd, plugin string, err error) {
	kernel, initrd, plugin = filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.gz"), filepath.Join(dir, "ptstore.so")
	for _, p := range []string{kernel, initrd, plugin} {
		if _, e := os.Stat(p); e != nil {
			err = errors.Join(err, fmt.Errorf("qemu: %s missing (scripts/qemu-setup.sh or `make qemu` puts it in %s)", p, dir))
		}
	}
	return
}

// Summary is what a run did.
type Summary struct {
	Wall   time.Duration
	Guests []GuestStats
}

// Run runs cfg.Guests guests, monitors their address spaces on host with
// req, and stops them after cfg.Duration, when every guest has powered off,
// or when ctx ends. Each guest's roots are stopped (their mappings reported
// removed) and its VM removed from host before Run returns.
func Run(ctx context.Context, host engine.Host, cfg Config, req backends.Request) (Summary, error) {
	if err := cfg.defaults(); err != nil {
		return Summary{}, err
	}
	start := time.Now()
	var gs []*Guest
	var errs []error
	for i := 0; i < cfg.Guests; i++ {
		g, err := StartGuest(ctx, host, cfg.FirstVM+vasmon.VMID(i), cfg, req)
		if err != nil {
			errs = append(errs, err)
			break
		}
		gs = append(gs, g)
	}
	if len(errs) == 0 {
		var timeout <-chan time.Time
		if cfg.Duration > 0 {
			t := time.NewTimer(cfg.Duration)
			defer t.Stop()
			timeout = t.C
		}
	wait:
		for _, g := range gs {
			select {
			case <-g.Exited():
			case <-timeout:
				break wait
			case <-ctx.Done():
				break wait
			}
		}
	}
	sum := Summary{Guests: make([]GuestStats, len(gs))}
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i, g := range gs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := g.Close(cctx); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
			sum.Guests[i] = g.Stats()
		}()
	}
	wg.Wait()
	sum.Wall = time.Since(start)
	for _, s := range sum.Guests {
		if s.Plugin.Drops != 0 {
			errs = append(errs, fmt.Errorf("qemu: VM %d: the plugin dropped %d records", s.VM, s.Plugin.Drops))
		}
	}
	return sum, errors.Join(errs...)
}
