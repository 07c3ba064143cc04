//! Keeps tensor memory in the process between operations instead of handing it back to the kernel.
//!
//! The CPU backend allocates a fresh buffer for most operation results, megabytes each, thousands per
//! training step. With glibc's defaults, buffers above a (dynamic, at most 32 MiB) threshold are
//! `mmap`ed and `munmap`ed one by one and the top of the heap is trimmed when freed, so nearly every
//! result lands on pages the kernel has to fault in and zero again: on a 125M-parameter LoRA step that
//! was about a third of the wall time (`clear_page` in `perf`). Fixing the threshold at its maximum and
//! never trimming ([`tune_for_tensors`]) lets freed buffers below 32 MiB be reused as they are. One arena
//! for all threads: a buffer that a worker thread allocated and another freed otherwise sits in the
//! worker's arena, whose heaps glibc shrinks (and the kernel zeroes again) whatever the trim threshold
//! (4% of a 125M LoRA step in `clear_page`, 1% with one arena, most of it the model's load). Buffers
//! above it (attention scores, logits) glibc always maps afresh, so [`TensorAlloc`], the binary's global
//! allocator, keeps a bounded number of freed large blocks for the next request of the same size. The
//! resident set then stays near the process's peak, which a training or evaluation process reaches
//! every step anyway.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// glibc's largest `M_MMAP_THRESHOLD` on 64-bit targets (`DEFAULT_MMAP_THRESHOLD_MAX`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Tunes the process's allocator for tensor work. Call it once, early in `main`, before threads start.
/// Returns whether anything changed: only glibc on Linux is tuned, and `MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_` or `MALLOC_ARENA_MAX` set in the environment win over it.
pub fn tune_for_tensors() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str| std::env::var_os(var).is_some();
        let mut changed = false;
        #[allow(unsafe_code, reason = "mallopt has no safe wrapper; it only changes allocator settings")]
        // SAFETY: `mallopt` takes plain integers and is safe to call at any time; glibc serialises it
        // against allocations.
        unsafe {
            if !set("MALLOC_MMAP_THRESHOLD_") {
                changed |= libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1;
            }
            if !set("MALLOC_TRIM_THRESHOLD_") {
                changed |= libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1;
            }
            if !set("MALLOC_ARENA_MAX") {
                changed |= libc::mallopt(libc::M_ARENA_MAX, 1) == 1;
            }
        }
        changed
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Blocks of at least this many bytes are cached: glibc maps anything above 32 MiB afresh.
const LARGE: usize = 32 << 20;
/// Large sizes are rounded up to this, so that requests that differ by a few bytes share blocks.
const GRANULE: usize = 1 << 20;
/// What the system allocator guarantees every block on 64-bit targets.
const MIN_ALIGN: usize = 16;
/// Freed large blocks kept at most.
const SLOTS: usize = 64;

#[derive(Clone, Copy)]
struct Block {
    ptr: usize,
    size: usize,
    align: usize,
    /// When the block was freed into the cache (a counter): misses release the oldest first.
    stamp: u64,
}

struct Cache {
    blocks: [Option<Block>; SLOTS],
    bytes: usize,
    clock: u64,
    /// Large blocks handed out and not yet freed, in bytes, and the most there ever were.
    live: usize,
    peak: usize,
}

/// The global allocator of retort's binaries: the system allocator, plus, while caching is on, a cache
/// of freed blocks of 32 MiB and more (up to 64 blocks and a byte budget), reused for requests of the
/// same rounded size and alignment. A block that does not fit the cache goes back to the system at
/// once. A large request the cache cannot serve, where the new block would take the large blocks held
/// (live and cached) past the most that were ever live at once, first hands the oldest cached blocks
/// back to the system until it fits: the cache then never lifts the resident set above the peak an
/// uncached allocator would reach (plus a block). Without that bound, work whose large sizes keep
/// changing (long sequences in 16 bits) filled the cache with blocks no request matched: 1 x 4,096
/// tokens of the 125M model in bf16 peaked at 2.06 GiB, 0.85 GiB uncached. Releasing on every miss
/// instead cost checkpointed steps 6% (phases of the step evicted each other's blocks). Caching starts
/// off: work that streams tensors once (export) keeps its memory near the largest tensor; commands
/// that run a model step after step turn it on.
pub struct TensorAlloc {
    cache: Mutex<Cache>,
    budget: usize,
    caching: AtomicBool,
}

impl TensorAlloc {
    /// An allocator that, once caching is on, keeps at most `budget` bytes of freed large blocks.
    pub const fn new(budget: usize) -> TensorAlloc {
        TensorAlloc {
            cache: Mutex::new(Cache { blocks: [None; SLOTS], bytes: 0, clock: 0, live: 0, peak: 0 }),
            budget,
            caching: AtomicBool::new(false),
        }
    }

    /// Turns caching on or off; off hands every cached block back to the system.
    pub fn set_caching(&self, on: bool) {
        self.caching.store(on, Ordering::Relaxed);
        if !on && let Ok(mut c) = self.cache.lock() {
            c.blocks.iter_mut().filter_map(Option::take).for_each(release);
            c.bytes = 0;
        }
    }

    /// Bytes held in freed blocks now.
    pub fn cached_bytes(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.bytes)
    }

    fn rounded(layout: Layout) -> Option<Layout> {
        if layout.size() < LARGE {
            return None;
        }
        // Alignments up to 16 are one class: the system allocator serves them all with 16-aligned
        // blocks, and tensor buffers are asked for with 1 (`vec![0u8; n]`) and 16 by turns.
        let align = layout.align().max(MIN_ALIGN);
        Layout::from_size_align(layout.size().div_ceil(GRANULE) * GRANULE, align).ok()
    }

    /// A cached block for `layout`, or, on a miss, `None` after the oldest cached blocks went back to the
    /// system until the new block keeps the large blocks held within the peak of live ones. Counts the
    /// block as live either way (the caller allocates it on a miss).
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        // Filled under the lock, freed after it; a fixed array, since an allocator must not allocate.
        let mut released: [Option<Block>; SLOTS] = [None; SLOTS];
        {
            let mut c = self.cache.lock().ok()?;
            let hit = c
                .blocks
                .iter_mut()
                .find(|b| b.is_some_and(|b| b.size == layout.size() && b.align == layout.align()))
                .and_then(Option::take);
            c.live += layout.size();
            c.peak = c.peak.max(c.live);
            if let Some(block) = hit {
                c.bytes -= block.size;
                return Some(block.ptr as *mut u8);
            }
            for out in &mut released {
                if c.live + c.bytes <= c.peak {
                    break;
                }
                let oldest = c
                    .blocks
                    .iter_mut()
                    .filter(|b| b.is_some())
                    .min_by_key(|b| b.map_or(u64::MAX, |b| b.stamp));
                let Some(block) = oldest.and_then(Option::take) else { break };
                c.bytes -= block.size;
                *out = Some(block);
            }
        }
        released.into_iter().flatten().for_each(release);
        None
    }

    /// Keeps the block if caching is on and there is room; false when the caller must free it.
    fn keep(&self, ptr: *mut u8, layout: Layout) -> bool {
        let Ok(mut c) = self.cache.lock() else { return false };
        c.live = c.live.saturating_sub(layout.size());
        if !self.caching.load(Ordering::Relaxed) || c.bytes + layout.size() > self.budget {
            return false;
        }
        let stamp = c.clock;
        let Some(slot) = c.blocks.iter_mut().find(|b| b.is_none()) else { return false };
        *slot = Some(Block { ptr: ptr as usize, size: layout.size(), align: layout.align(), stamp });
        c.bytes += layout.size();
        c.clock += 1;
        true
    }
}

/// Hands a block that has left the cache back to the system.
fn release(block: Block) {
    if let Ok(layout) = Layout::from_size_align(block.size, block.align) {
        #[allow(unsafe_code, reason = "returns a block this allocator took from the system")]
        // SAFETY: the block came from `System.alloc` with this layout, and the cache no longer holds it.
        unsafe {
            System.dealloc(block.ptr as *mut u8, layout)
        };
    }
}

/// 4 GiB of freed large blocks: a few steps' worth of attention scores and logits of a model that
/// trains on a CPU.
pub const DEFAULT_BUDGET: usize = 4 << 30;

#[allow(unsafe_code, reason = "a global allocator is unsafe by contract; it forwards to the system's")]
// SAFETY: every block handed out comes from `System` with the (rounded) layout it is later freed or
// cached with; a cached block is handed out again only for a request of that same rounded size and
// alignment, and only once (it leaves the cache under the lock).
unsafe impl GlobalAlloc for TensorAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match TensorAlloc::rounded(layout) {
            None => unsafe { System.alloc(layout) },
            Some(big) => match self.take(big) {
                Some(p) => p,
                None => unsafe { System.alloc(big) },
            },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match TensorAlloc::rounded(layout) {
            None => unsafe { System.alloc_zeroed(layout) },
            Some(big) => match self.take(big) {
                Some(p) => {
                    unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                    p
                }
                None => unsafe { System.alloc_zeroed(big) },
            },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match TensorAlloc::rounded(layout) {
            None => unsafe { System.dealloc(ptr, layout) },
            Some(big) => {
                if !self.keep(ptr, big) {
                    unsafe { System.dealloc(ptr, big) }
                }
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < LARGE && new_size < LARGE {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // Into, out of or between large blocks: a fresh block, the bytes that fit, the old one freed.
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
#[allow(unsafe_code, reason = "exercises the allocator directly")]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        // mallopt returns 0 for a value glibc refuses (a threshold above its maximum, for one).
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
            && std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none()
        {
            assert!(tune_for_tensors());
        }
    }

    #[test]
    fn large_blocks_are_reused_zeroed_on_request_and_bounded() {
        let a = TensorAlloc::new(70 << 20); // two 33 MiB blocks
        a.set_caching(true);
        let big = Layout::from_size_align(LARGE + 5, 8).unwrap();
        let near = Layout::from_size_align(LARGE + 1000, 16).unwrap();
        unsafe {
            let p = a.alloc(big);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 0xAB, big.size());
            a.dealloc(p, big);
            assert_eq!(a.cached_bytes(), LARGE + GRANULE);
            // Same rounded size: the same block, zeroed when asked.
            let q = a.alloc_zeroed(near);
            assert_eq!(q, p);
            assert_eq!(a.cached_bytes(), 0);
            assert!(std::slice::from_raw_parts(q, near.size()).iter().all(|&b| b == 0));
            // Alignments up to 16 share blocks; a larger one is not served from the cache.
            a.dealloc(q, near);
            let q = a.alloc(Layout::from_size_align(LARGE + 5, 1).unwrap());
            assert_eq!(q, p);
            a.dealloc(q, near);
            let other = Layout::from_size_align(LARGE + 5, 4096).unwrap();
            let r = a.alloc(other);
            assert_eq!(r as usize % 4096, 0);
            // That miss would have held two blocks where one was ever live: the cached one went back.
            assert_eq!(a.cached_bytes(), 0);
            // Over the budget: the third block goes back to the system.
            let s = a.alloc(big);
            let t = a.alloc(big);
            a.dealloc(r, other);
            a.dealloc(s, big);
            assert_eq!(a.cached_bytes(), 2 * (LARGE + GRANULE));
            a.dealloc(t, big);
            assert_eq!(a.cached_bytes(), 2 * (LARGE + GRANULE));
            // Growing a small buffer into a large one keeps its bytes.
            let small = Layout::from_size_align(16, 8).unwrap();
            let u = a.alloc(small);
            std::ptr::copy_nonoverlapping(b"0123456789abcdef".as_ptr(), u, 16);
            let v = a.realloc(u, small, LARGE + 5);
            assert_eq!(std::slice::from_raw_parts(v, 16), b"0123456789abcdef");
            a.dealloc(v, Layout::from_size_align(LARGE + 5, 8).unwrap());
            // Off: the cache is emptied and nothing more is kept.
            assert!(a.cached_bytes() > 0);
            a.set_caching(false);
            assert_eq!(a.cached_bytes(), 0);
            let w = a.alloc(big);
            a.dealloc(w, big);
            assert_eq!(a.cached_bytes(), 0);
        }
    }

    #[test]
    fn a_miss_releases_the_oldest_blocks_until_the_live_peak_holds() {
        let a = TensorAlloc::new(1 << 30);
        a.set_caching(true);
        let big = Layout::from_size_align(LARGE, 16).unwrap();
        let bigger = Layout::from_size_align(LARGE + 3 * GRANULE, 16).unwrap();
        unsafe {
            let (p, q, r) = (a.alloc(big), a.alloc(big), a.alloc(big));
            a.dealloc(p, big);
            a.dealloc(q, big);
            a.dealloc(r, big);
            assert_eq!(a.cached_bytes(), 3 * LARGE);
            // 35 MiB that no cached block serves would hold 131 MiB of large blocks where at most 96 MiB
            // were ever live: the two oldest (p, then q) make room for it.
            let s = a.alloc(bigger);
            assert_eq!(a.cached_bytes(), LARGE);
            // r, the newest, is still there for the next request of its size.
            assert_eq!(a.alloc(big), r);
            a.dealloc(r, big);
            a.dealloc(s, bigger);
            a.set_caching(false);
        }
    }

    #[test]
    fn small_blocks_pass_through() {
        let a = TensorAlloc::new(1 << 30);
        a.set_caching(true);
        let l = Layout::from_size_align(4096, 8).unwrap();
        unsafe {
            let p = a.alloc(l);
            a.dealloc(p, l);
        }
        assert_eq!(a.cached_bytes(), 0);
    }
}
