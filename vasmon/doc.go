// Package vasmon is the virtual-address-space monitor's semantics
// (SEMANTICS.md): the paging modes as one table of parameters (Mode), the
// per-table state and steps of a set of guest pages (Store), and the
// single-threaded monitor built on one Store (Monitor), the reference every
// executor is checked against.
//
// # Contract
//
// Ownership: a Store is owned by one goroutine at a time (the Monitor, or
// whoever holds the engine shard that owns its pages); nothing in it is
// safe for concurrent use. The records it shares with other stores (VM and
// Root: their table counts, budgets and statistics) are atomic. A Memory
// and a Protector are shared by every store of their VM and must be safe
// for concurrent use.
//
// Executors: a Store's operations (Write, Hook, Unhook, the drop notice
// OpDropped, Flush, Retry) append their effects to an Output: callbacks to
// invoke, in order, and structural requests (Request) to execute on the
// store that owns the request's page (Request.Page). The Monitor executes
// them at once, in FIFO order; the sharded engine routes them between its
// shards. An executor must let a hook request leave the store that emitted
// it only while that store still links it (Store.Linked), keep the order of
// requests between two stores, and run Unsure hooks again later.
//
// Allocation: after warm-up (arenas, indexes and outputs grown to their
// working size) Write, Hook, Unhook and the reads of guest memory allocate
// nothing. Host memory is in proportion to the tables hooked (a shadow per
// page, a node per table), bounded by the per-root and per-VM table
// budgets, plus a constant per store.
//
// # Entry writes (SEMANTICS.md section 3)
//
// A write is split per page and per entry. A chunk that covers its entry,
// or a narrow one (1 or 2 bytes), completes the entry at once; any other
// chunk starts or extends a partial write, which ends when every byte of
// the entry is written, when a whole or narrow chunk of the entry comes,
// when a later event of the store was trapped PendingTimeout after its
// first chunk (trap times only: Write.Trap), when its table is unhooked or
// its page read again, and at Flush. A chunk equal to the last chunk
// applied to its entry (same RIP, offset, size and bytes; a small window
// per store) is a duplicate delivery and is ignored, and so is a write
// whose version stamp equals the last one applied to its page.
//
// # No phantoms (SEMANTICS.md section 6)
//
// Every callback is true at some instant, and a page is hooked only if it
// was a table of the root at some instant, however far the executor runs
// behind the guest: the Store proves, on guest memory, the value of every
// entry it reports and the place (the chain of links from the root) of
// every table it reads, before it acts on either (see proof.go). With
// versioned memory (Versioned: guestmem.Versions kept by the backend) the
// proofs are exact: sequence locks on the pages' version words. A value
// that cannot be proven is not applied; the page is read again and the
// difference reported. Links are level-triggered: a table whose hook was
// dropped because guest memory no longer linked it is hooked again by the
// next read of its parent's page if guest memory links it again. Without
// versions the proofs read guest memory without sequence locks: exact for
// the Monitor called after each write, a best effort for an asynchronous
// executor.
package vasmon
