/*
 * ptstore.c: the EPT part of vasengine's QEMU TCG backend, as a QEMU plugin
 * (plugin API version 1, QEMU 7.2 system emulation).
 *
 * Every guest page has a version word in a shared control file (the
 * layout of vasengine's guestmem.Versions): bit 0 says the page is
 * write-protected, bits 32-63 count its changes. For every guest store to
 * RAM whose page is protected, it pushes one record per 8-byte entry the
 * store touched into a shared ring: (vCPU, entry GPA, the whole entry as it
 * is in guest RAM after the store, the instruction's address, a
 * CLOCK_MONOTONIC time stamp, the store's stamp on the page's version word).
 * The Go backend (backends/qemu) sets and clears the protected bits as the
 * engine write-protects and releases page-table pages, drains the ring and
 * keeps all page-table semantics; this file knows nothing of paging levels
 * or trees, and of Linux only how its address spaces begin and end (below).
 *
 * Stamps. A memory callback runs after the store reached guest RAM, so a
 * store is counted as a trapped write begun and ended at once, after it
 * (guestmem.Versions.Trap): for each entry record, the page's change count
 * grows by 2 in one atomic step taken only while the page is protected, and
 * the record carries the count after the first of the two (what BeginWrite
 * would have returned; never 0). A reader of the page that loads a word
 * whose count is at least a record's stamp has the record's store in what
 * it reads. The plugin leaves no write in progress (bits 1-15); the Go side
 * sets one while it reverts a denied store (see "Holds").
 *
 * Roots. The Go side marks the top-level table pages of the address spaces
 * it monitors in a bitmap of root pages. A store to a protected root page
 * that writes its kernel half (bytes 2048-4095), or leaves its user half
 * (bytes 0-2047) without a present entry (bit 0), ends the root: Linux
 * x86-64 changes the kernel half of no live top-level table, and clears
 * the user half when the address space is torn down, before it frees the
 * page. The plugin then clears the page's root bit, write-unprotects the
 * page (as the Go side's Unprotect would) and flags the store's record
 * (ROOT_END_*), all before the vCPU goes on: the page may be reused at
 * once, and the engine, which runs behind the guest, must neither see nor
 * read through it as a root any more.
 *
 * Holds (synchronous delivery, SEMANTICS.md section 7). When the Go side
 * sets the header's sync word, a vCPU that pushed an entry record (or a
 * PGD record) does not go on until the Go side answers: it stores the
 * record's seq into the vCPU's ack word once the engine has done the
 * write's closure (and, if a callback denied the write, after it put the
 * entry's old bytes back in guest RAM, as a trapped write of its own:
 * BeginWrite, the store, EndWrite on the page's version word). The vCPU
 * rings the Go side's bell
 * (a futex word) after the push, polls its ack word for HOLD_SPIN_NS, then
 * sleeps on it (futex) in slices of HOLD_SLICE_NS, checking between slices
 * that the Go process is alive (go_pid): a dead Go side turns sync off for
 * good, and a hold longer than HOLD_LIMIT_NS is given up (give_ups), so
 * that QEMU never hangs on it. The store itself has already reached guest
 * RAM when the callback runs (QEMU 7.2 has no callback before a store):
 * other vCPUs may read and use the new entry while its writer is held.
 *
 * Windows. With a bitmap of linked pages (link_offset), the target frame of
 * every present, non-PS entry an entry record holds is marked linked, and
 * the first later store to a marked page that is not protected pushes a
 * window record (and clears the mark): a store into a table after it was
 * linked and before the engine hooked it, if the page turns out to be a
 * table the engine hooks (the Go side decides; a leaf's data page is
 * marked too, and its stores are no windows).
 *
 * It also reports stores that complete a page whose last 8 bytes then equal
 * a value the Go side publishes (pgd_sig: entry 511 of the guest's
 * reference top-level table): how a Linux guest's new address spaces are
 * found at birth. That is a comparison of bytes. pgd_alloc copies the
 * kernel half forwards or (Linux's memcpy, for some alignments) backwards,
 * entry 511 first: the root may be started while the copy goes on, so a
 * store to a root page's kernel half of the reference's value there
 * (ref_kernel) does not end the root.
 *
 * Arguments: ctl=PATH (the control file: header, version words, root bitmap,
 * ring; layout in backends/qemu/shm.go, which must agree with the constants
 * below) and ram=PATH (the guest RAM file of -object memory-backend-file,
 * mapped read-only to re-read entries).
 *
 * Ordering. The ring is multi-producer, single-consumer. A producer reserves
 * a slot (CAS on head) before it reads the entry from guest RAM, so for two
 * records of one entry the one with the higher slot number read guest RAM
 * later: the last record of an entry always holds its final value; the
 * stamp is taken before the slot is reserved. Between the store and the
 * load of the page's version word there is a full fence: with the Go side's
 * protect (a compare-and-swap of the word, then a read of the table) this
 * guarantees that a store is either seen by that read or reported here.
 *
 * QEMU ships no plugin header in Debian: the declarations below are our own,
 * of the documented API functions this file uses.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- The subset of QEMU's plugin API (version 1) used here. ---- */

typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
struct qemu_plugin_hwaddr;

typedef struct {
	const char *target_name;
	struct {
		int min;
		int cur;
	} version;
	bool system_emulation;
	union {
		struct {
			int smp_vcpus;
			int max_vcpus;
		} system;
	};
} qemu_info_t;

enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS = 0 };
enum qemu_plugin_mem_rw { QEMU_PLUGIN_MEM_R = 1, QEMU_PLUGIN_MEM_W = 2, QEMU_PLUGIN_MEM_RW = 3 };

typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_mem_cb_t)(unsigned int vcpu_index, qemu_plugin_meminfo_t info,
					  uint64_t vaddr, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_mem_cb_t cb,
				      enum qemu_plugin_cb_flags flags, enum qemu_plugin_mem_rw rw,
				      void *userdata);
bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t info);
unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t info);
struct qemu_plugin_hwaddr *qemu_plugin_get_hwaddr(qemu_plugin_meminfo_t info, uint64_t vaddr);
bool qemu_plugin_hwaddr_is_io(const struct qemu_plugin_hwaddr *haddr);
uint64_t qemu_plugin_hwaddr_phys_addr(const struct qemu_plugin_hwaddr *haddr);
void qemu_plugin_outs(const char *string);

#define EXPORT __attribute__((visibility("default")))
EXPORT int qemu_plugin_version = 1;

/* ---- Shared control file (see backends/qemu/shm.go). ---- */

#define CTL_MAGIC 0x3153545051534156ULL /* "VASQPTS1" */
#define CTL_VERSION 3 /* 1: a bitmap of protected pages, no stamps; 2: no holds */
#define MAX_VCPUS 64
#define HDR_BYTES 8192
#define WAIT_LIMIT_NS 10000000000LL /* a full ring for this long counts a drop */
#define HOLD_SPIN_NS 20000LL          /* a held vCPU polls its ack word this long, */
#define HOLD_SLICE_NS 50000000L       /* then sleeps on it in slices of this, */
#define HOLD_LIMIT_NS 10000000000LL   /* and gives the hold up after this long */

struct vcpu_counters {
	uint64_t stores;    /* store callbacks (RAM and io) */
	uint64_t io;        /* stores to io, skipped */
	uint64_t records;   /* records pushed */
	uint64_t waits;     /* pushes that found the ring full */
	uint64_t wait_ns;   /* time spent waiting for room */
	uint64_t crosspage; /* stores that crossed a page boundary */
	uint32_t ack;       /* the Go side: the seq of the last held record it answered */
	uint32_t waiting;   /* the vCPU sleeps on ack (futex) */
	uint64_t held_ns;   /* time the vCPU was held (see "Holds") */
};

struct ctl_header {
	uint64_t magic;
	uint32_t version;
	uint32_t max_vcpus;
	uint64_t ring_slots; /* power of two */
	uint64_t ver_pages;  /* version words: one per page of guest RAM */
	uint64_t ram_bytes;
	uint32_t attached; /* set to 1 by the plugin */
	uint32_t smp_vcpus;
	uint64_t ver_offset;  /* offset 48: byte offset of the version words in the file */
	uint64_t ring_offset; /* offset 56: byte offset of the ring */
	uint64_t head; /* offset 64: next slot to reserve (producers) */
	uint64_t pad1[7];
	uint64_t tail; /* offset 128: next slot to consume (the Go side) */
	uint64_t pad2[7];
	uint64_t drops;   /* offset 192 */
	uint64_t pgd_sig;     /* offset 200: entry 511 of the reference PGD, 0: unknown */
	uint64_t root_offset; /* offset 208: byte offset of the bitmap of root pages */
	uint32_t sync;        /* offset 216: hold vCPUs after their records (see "Holds") */
	uint32_t go_pid;      /* offset 220: the Go side's process, for the liveness check */
	uint32_t bell;        /* offset 224: counts held records pushed (futex of the Go side) */
	uint32_t bell_waiting; /* offset 228: the Go side sleeps on bell */
	uint64_t link_offset; /* offset 232: byte offset of the bitmap of linked pages, 0: no windows */
	uint64_t give_ups;    /* offset 240: holds given up (the Go side too slow or gone) */
	uint64_t windows;     /* offset 248: window records pushed */
	struct vcpu_counters vcpu[MAX_VCPUS]; /* offset 256 */
	uint64_t ref_kernel[256]; /* offset 4352: the reference kernel half (entries 256-511), valid once pgd_sig is set */
};

struct record {
	uint64_t seq;  /* slot number + 1 once the record is complete */
	uint64_t gpa;  /* the 8-byte aligned entry address */
	uint64_t val;  /* the entry in guest RAM after the store */
	uint64_t rip;  /* guest virtual address of the storing instruction */
	int64_t ts;    /* CLOCK_MONOTONIC ns after the store */
	uint32_t vcpu;
	uint32_t size;      /* bytes of the store */
	uint64_t store_gpa; /* first byte of the store */
	uint32_t kind;      /* REC_ENTRY or REC_PGD; ROOT_END_* << REC_ROOT_END */
	uint32_t ver;       /* the store's stamp on its page's version word (REC_ENTRY) */
};

enum { REC_ENTRY = 0, REC_PGD = 1, REC_WINDOW = 2 };
#define REC_ROOT_END 8    /* kind >> REC_ROOT_END: how the store ended a root, 0: it did not */
#define ROOT_END_KERNEL 1 /* a store to the kernel half (backends/qemu: whyKernel) */
#define ROOT_END_EMPTY 2  /* the user half left without a present entry (whyEmpty) */
#define USER_HALF_BYTES 2048

_Static_assert(sizeof(struct record) == 64, "record layout");
_Static_assert(__builtin_offsetof(struct ctl_header, head) == 64, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, tail) == 128, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, drops) == 192, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, vcpu) == 256, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, pgd_sig) == 200, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, root_offset) == 208, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, sync) == 216, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, bell) == 224, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, link_offset) == 232, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, windows) == 248, "header layout");
_Static_assert(__builtin_offsetof(struct vcpu_counters, ack) == 48, "counters layout");
_Static_assert(sizeof(struct vcpu_counters) == 64, "counters layout");
_Static_assert(__builtin_offsetof(struct ctl_header, ref_kernel) == 4352, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, ver_offset) == 48, "header layout");
_Static_assert(__builtin_offsetof(struct ctl_header, ring_offset) == 56, "header layout");
_Static_assert(__builtin_offsetof(struct record, kind) == 56, "record layout");
_Static_assert(__builtin_offsetof(struct record, ver) == 60, "record layout");
_Static_assert(sizeof(struct ctl_header) <= HDR_BYTES, "header size");

/* A page's version word (guestmem/versions.go): bit 0 protected, bits 1-15
 * writes in progress (never set here), bits 32-63 the change count. */
#define VER_PROTECTED 1ULL
#define VER_COUNT_SHIFT 32
#define VER_COUNT (1ULL << VER_COUNT_SHIFT)

static struct ctl_header *hdr;
static uint64_t *vers;  /* hdr->ver_pages words */
static uint64_t *roots; /* bitmap of root pages, hdr->ver_pages bits */
static uint64_t *links; /* bitmap of pages an entry record linked (windows), or NULL */
static struct record *ring;
static uint64_t ring_mask;
static const uint8_t *ram;
static uint64_t ram_bytes;

#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define BUMP(p, n) __atomic_store_n((p), LOAD(p) + (n), __ATOMIC_RELAXED) /* single writer */

static int64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/*
 * stamp counts a store that reached the page at gpa as a trapped write
 * begun and ended (see "Stamps") if the page is protected, and returns its
 * stamp; 0 if the page is not protected.
 */
static inline uint32_t stamp(uint64_t gpa)
{
	uint64_t pfn = gpa >> 12;
	if (pfn >= hdr->ver_pages)
		return 0;
	uint64_t *w = &vers[pfn];
	uint64_t o = __atomic_load_n(w, __ATOMIC_RELAXED);
	do {
		if (!(o & VER_PROTECTED))
			return 0;
	} while (!__atomic_compare_exchange_n(w, &o, o + 2 * VER_COUNT, false, __ATOMIC_SEQ_CST,
					      __ATOMIC_RELAXED));
	uint32_t s = (uint32_t)(o >> VER_COUNT_SHIFT) + 1;
	/* 0 means "no stamp": on wrap-around the count after both steps (1)
	 * stamps it, as BeginWrite skips 0. */
	return s ? s : 1;
}

/* unprotect clears the protected bit of the page at pfn, counting a change
 * (guestmem.Versions.SetProtected(false)). */
static void unprotect(uint64_t pfn)
{
	uint64_t *w = &vers[pfn];
	uint64_t o = __atomic_load_n(w, __ATOMIC_RELAXED);
	do {
		if (!(o & VER_PROTECTED))
			return;
	} while (!__atomic_compare_exchange_n(w, &o, (o & ~VER_PROTECTED) + VER_COUNT, false,
					      __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
}

static inline bool present(uint64_t gpa) { return LOAD((const uint64_t *)(ram + gpa)) & 1; }

/*
 * root_end returns how the store to the entry at gpa (8-byte aligned, on a
 * protected page) ended the root whose top-level table the page is
 * (ROOT_END_*), or 0 if the page is no root page or the root lives on. A
 * root is ended once: the first store to end it clears its root bit,
 * unprotects its page (see "Roots") and gets the flag.
 */
static uint32_t root_end(uint64_t gpa)
{
	uint64_t pfn = gpa >> 12, page = gpa & ~4095ULL;
	uint64_t bit = 1ULL << (pfn & 63);
	if (!(LOAD(&roots[pfn >> 6]) & bit) || page + 4096 > ram_bytes)
		return 0;
	uint32_t why = ROOT_END_KERNEL;
	if ((gpa & 4095) >= USER_HALF_BYTES) {
		/* The reference's value written again is no reuse. */
		if (LOAD(&hdr->pgd_sig) != 0 &&
		    LOAD((const uint64_t *)(ram + gpa)) == LOAD(&hdr->ref_kernel[((gpa & 4095) - USER_HALF_BYTES) / 8]))
			return 0;
	} else {
		if (present(gpa))
			return 0;
		for (uint64_t e = page; e < page + USER_HALF_BYTES; e += 8)
			if (present(e))
				return 0;
		why = ROOT_END_EMPTY;
	}
	if (!(__atomic_fetch_and(&roots[pfn >> 6], ~bit, __ATOMIC_SEQ_CST) & bit))
		return 0; /* another vCPU ended it */
	unprotect(pfn);
	return why;
}

static struct vcpu_counters *counters(unsigned int vcpu)
{
	return &hdr->vcpu[vcpu < MAX_VCPUS ? vcpu : MAX_VCPUS - 1];
}

/*
 * push records the entry at gpa (8-byte aligned) after a store and returns
 * the record's seq (0 if it was dropped); *val gets the entry's value.
 */
static uint64_t push(unsigned int vcpu, uint64_t gpa, uint64_t store_gpa, unsigned size, uint64_t rip,
		     uint32_t kind, uint32_t ver, uint64_t *val)
{
	struct vcpu_counters *c = counters(vcpu);
	uint64_t h = __atomic_load_n(&hdr->head, __ATOMIC_RELAXED);
	int64_t waited = 0;
	for (;;) {
		uint64_t t = __atomic_load_n(&hdr->tail, __ATOMIC_ACQUIRE);
		if (h - t < ring_mask + 1) {
			if (__atomic_compare_exchange_n(&hdr->head, &h, h + 1, true, __ATOMIC_SEQ_CST,
							__ATOMIC_RELAXED))
				break;
			continue; /* h was reloaded */
		}
		/* Full: wait for the consumer rather than drop. */
		if (waited == 0) {
			waited = now_ns();
			BUMP(&c->waits, 1);
		}
		int64_t d = now_ns() - waited;
		if (d > WAIT_LIMIT_NS) {
			__atomic_fetch_add(&hdr->drops, 1, __ATOMIC_RELAXED);
			BUMP(&c->wait_ns, d);
			return 0;
		}
		if (d < 20000) {
			__builtin_ia32_pause();
		} else {
			struct timespec ts = {0, 50000};
			nanosleep(&ts, NULL);
		}
		h = __atomic_load_n(&hdr->head, __ATOMIC_RELAXED);
	}
	if (waited)
		BUMP(&c->wait_ns, now_ns() - waited);
	struct record *r = &ring[h & ring_mask];
	r->gpa = gpa;
	/* Read after the reservation: see "Ordering" above. */
	r->val = kind != REC_WINDOW && gpa + 8 <= ram_bytes ? __atomic_load_n((const uint64_t *)(ram + gpa), __ATOMIC_RELAXED) : 0;
	if (val)
		*val = r->val;
	r->rip = rip;
	r->ts = now_ns();
	r->vcpu = vcpu;
	r->size = size;
	r->store_gpa = store_gpa;
	r->kind = kind;
	r->ver = ver;
	__atomic_store_n(&r->seq, h + 1, __ATOMIC_RELEASE);
	BUMP(&c->records, 1);
	return h + 1;
}

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
	return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/* go_alive reports whether the Go process is still there. */
static bool go_alive(void)
{
	pid_t pid = (pid_t)LOAD(&hdr->go_pid);
	return pid <= 0 || kill(pid, 0) == 0 || errno != ESRCH;
}

/*
 * hold keeps the vCPU until the Go side answers the record of seq (see
 * "Holds"). The file is shared between processes: the futex operations
 * are the shared (not private) ones.
 */
static void hold(unsigned int vcpu, uint64_t seq)
{
	struct vcpu_counters *c = counters(vcpu);
	uint32_t want = (uint32_t)seq;
	int64_t t0 = now_ns();
	__atomic_add_fetch(&hdr->bell, 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&hdr->bell_waiting, __ATOMIC_SEQ_CST))
		futex(&hdr->bell, FUTEX_WAKE, INT32_MAX, NULL);
	while (__atomic_load_n(&c->ack, __ATOMIC_ACQUIRE) != want) {
		int64_t d = now_ns() - t0;
		if (d < HOLD_SPIN_NS) {
			__builtin_ia32_pause();
			continue;
		}
		if (d > HOLD_LIMIT_NS || !LOAD(&hdr->sync)) {
			__atomic_fetch_add(&hdr->give_ups, 1, __ATOMIC_RELAXED);
			break;
		}
		__atomic_store_n(&c->waiting, 1, __ATOMIC_SEQ_CST);
		uint32_t a = __atomic_load_n(&c->ack, __ATOMIC_SEQ_CST);
		if (a != want) {
			struct timespec ts = {0, HOLD_SLICE_NS};
			if (futex(&c->ack, FUTEX_WAIT, a, &ts) != 0 && errno == ETIMEDOUT && !go_alive()) {
				/* The Go side is gone: hold nobody any more. */
				__atomic_store_n(&hdr->sync, 0, __ATOMIC_SEQ_CST);
			}
		}
		__atomic_store_n(&c->waiting, 0, __ATOMIC_RELAXED);
	}
	BUMP(&c->held_ns, now_ns() - t0);
}

/* mark_link marks the frame an entry of value v points to, if it may be a table. */
static inline void mark_link(uint64_t v)
{
	if (!links || !(v & 1) || (v & (1 << 7)))
		return;
	uint64_t pfn = (v & 0x000FFFFFFFFFF000ULL) >> 12;
	if (pfn >= hdr->ver_pages)
		return;
	uint64_t bit = 1ULL << (pfn & 63);
	if (!(LOAD(&links[pfn >> 6]) & bit))
		__atomic_fetch_or(&links[pfn >> 6], bit, __ATOMIC_RELAXED);
}

/*
 * window pushes a window record for a store to the unprotected page at gpa
 * if the page was marked linked (see "Windows"): kind REC_WINDOW, the
 * page's change count at the store as ver.
 */
static inline void window(unsigned int vcpu, uint64_t gpa, uint64_t store_gpa, unsigned size, uint64_t rip)
{
	uint64_t pfn = gpa >> 12;
	uint64_t bit = 1ULL << (pfn & 63);
	if (!links || pfn >= hdr->ver_pages || !(LOAD(&links[pfn >> 6]) & bit))
		return;
	if (!(__atomic_fetch_and(&links[pfn >> 6], ~bit, __ATOMIC_SEQ_CST) & bit))
		return;
	uint32_t count = (uint32_t)(__atomic_load_n(&vers[pfn], __ATOMIC_SEQ_CST) >> VER_COUNT_SHIFT);
	__atomic_fetch_add(&hdr->windows, 1, __ATOMIC_RELAXED);
	push(vcpu, gpa & ~4095ULL, store_gpa, size, rip, REC_WINDOW, count, NULL);
}

static void mem_cb(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr, void *userdata)
{
	if (!qemu_plugin_mem_is_store(info))
		return;
	struct vcpu_counters *c = counters(vcpu);
	BUMP(&c->stores, 1);
	unsigned size = 1u << qemu_plugin_mem_size_shift(info);
	uint64_t end = vaddr + size; /* exclusive */
	/* Order the store before the version word loads (see "Ordering"). */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	/* One step per guest page the store touched (two at most). */
	for (uint64_t va = vaddr; va < end;) {
		uint64_t pend = (va | 4095) + 1;
		if (pend > end)
			pend = end;
		if (va != vaddr)
			BUMP(&c->crosspage, 1);
		struct qemu_plugin_hwaddr *hw = qemu_plugin_get_hwaddr(info, va);
		if (!hw || qemu_plugin_hwaddr_is_io(hw)) {
			BUMP(&c->io, 1);
			va = pend;
			continue;
		}
		uint64_t gpa = qemu_plugin_hwaddr_phys_addr(hw);
		uint64_t last = gpa + (pend - va) - 1;
		uint64_t rip = (uint64_t)(uintptr_t)userdata;
		/*
		 * Each entry's record is its own trapped write, with its own
		 * stamp, and its own hold.
		 */
		for (uint64_t e = gpa & ~7ULL; e <= last; e += 8) {
			uint32_t ver = stamp(gpa);
			if (!ver) {
				/* The page is not protected. */
				if (e == (gpa & ~7ULL))
					window(vcpu, gpa, gpa, size, rip);
				break;
			}
			uint32_t end = root_end(e);
			uint64_t v = 0;
			uint64_t seq = push(vcpu, e, gpa, size, rip, REC_ENTRY | end << REC_ROOT_END, ver, &v);
			mark_link(v);
			if (seq && LOAD(&hdr->sync))
				hold(vcpu, seq);
			if (end)
				break; /* the page is no longer protected */
		}
		/*
		 * A store that completes the last entry of a page with the
		 * reference PGD's entry 511: the kernel is copying the kernel
		 * half into a new top-level table (pgd_alloc), and has done so
		 * or, copying backwards, has just begun.
		 */
		uint64_t sig = LOAD(&hdr->pgd_sig);
		if ((last & 4095) == 4095 && sig != 0 && (last | 7) < ram_bytes &&
		    LOAD((const uint64_t *)(ram + (last & ~7ULL))) == sig) {
			/* Held too: the Go side starts the root before any user
			 * table is linked into it. */
			uint64_t seq = push(vcpu, last & ~4095ULL, gpa, size, rip, REC_PGD, 0, NULL);
			if (seq && LOAD(&hdr->sync))
				hold(vcpu, seq);
		}
		va = pend;
	}
}

static void tb_trans_cb(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
	(void)id;
	size_t n = qemu_plugin_tb_n_insns(tb);
	for (size_t i = 0; i < n; i++) {
		struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
		/* The rw filter is ignored by QEMU 7.2: mem_cb checks is_store. */
		qemu_plugin_register_vcpu_mem_cb(insn, mem_cb, QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_W,
						 (void *)(uintptr_t)qemu_plugin_insn_vaddr(insn));
	}
}

static void fail(const char *what, const char *path)
{
	char buf[512];
	snprintf(buf, sizeof buf, "ptstore: %s %s: %s\n", what, path ? path : "", strerror(errno));
	qemu_plugin_outs(buf);
	fputs(buf, stderr);
}

static void *map_file(const char *path, int prot, uint64_t *size)
{
	int fd = open(path, (prot & PROT_WRITE) ? O_RDWR : O_RDONLY);
	if (fd < 0) {
		fail("open", path);
		return NULL;
	}
	struct stat st;
	if (fstat(fd, &st) < 0) {
		fail("stat", path);
		close(fd);
		return NULL;
	}
	void *p = mmap(NULL, st.st_size, prot, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED) {
		fail("mmap", path);
		return NULL;
	}
	*size = st.st_size;
	return p;
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
	const char *ctl = NULL, *ramp = NULL;
	for (int i = 0; i < argc; i++) {
		if (strncmp(argv[i], "ctl=", 4) == 0)
			ctl = argv[i] + 4;
		else if (strncmp(argv[i], "ram=", 4) == 0)
			ramp = argv[i] + 4;
	}
	if (!info->system_emulation || !ctl || !ramp) {
		errno = EINVAL;
		fail("needs system emulation and arguments ctl=PATH,ram=PATH", NULL);
		return -1;
	}
	uint64_t ctl_bytes;
	void *c = map_file(ctl, PROT_READ | PROT_WRITE, &ctl_bytes);
	if (!c)
		return -1;
	hdr = c;
	uint64_t slots = hdr->ring_slots;
	uint64_t ver_bytes = (hdr->ver_pages * 8 + 4095) & ~4095ULL;
	uint64_t root_bytes = ((hdr->ver_pages + 63) / 64 * 8 + 4095) & ~4095ULL;
	if (hdr->magic != CTL_MAGIC || hdr->version != CTL_VERSION || hdr->max_vcpus != MAX_VCPUS ||
	    slots == 0 || (slots & (slots - 1)) != 0 || hdr->ver_offset != HDR_BYTES ||
	    hdr->root_offset != HDR_BYTES + ver_bytes ||
	    (hdr->link_offset != 0 && hdr->link_offset != hdr->root_offset + root_bytes) ||
	    hdr->ring_offset != hdr->root_offset + (hdr->link_offset ? 2 : 1) * root_bytes ||
	    ctl_bytes < hdr->ring_offset + slots * sizeof(struct record)) {
		errno = EINVAL;
		fail("bad control file", ctl);
		return -1;
	}
	vers = (uint64_t *)((char *)c + hdr->ver_offset);
	roots = (uint64_t *)((char *)c + hdr->root_offset);
	links = hdr->link_offset ? (uint64_t *)((char *)c + hdr->link_offset) : NULL;
	ring = (struct record *)((char *)c + hdr->ring_offset);
	ring_mask = slots - 1;
	ram = map_file(ramp, PROT_READ, &ram_bytes);
	if (!ram)
		return -1;
	hdr->smp_vcpus = info->system.smp_vcpus;
	__atomic_store_n(&hdr->attached, 1, __ATOMIC_RELEASE);
	qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans_cb);
	return 0;
}
