//! A tiny fork-join pool for the decode hot path.
//!
//! Decoding one token calls ~210 matrix-vector products of 0.4-3.5 MB each. rayon's fork/join
//! costs 10-20 us per call on this class of machine (its idle workers sleep on a futex), which
//! is a third of a small product's time. The workers here spin for a short while after each job
//! before parking, so back-to-back jobs are handed over in well under a microsecond.
//!
//! The caller never waits for a worker that has not joined the job: a worker joins through a
//! gate (one atomic word: epoch, open flag, count of joined workers) that the caller closes when
//! every part is claimed, and the caller then waits only for the joined workers to finish their
//! parts. On a machine shared with other processes a descheduled worker therefore costs
//! nothing (the caller does its parts), instead of stalling every product for a time slice.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(200);

/// Gate layout: epoch in the bits above [`OPEN`], the open flag, joined workers below.
const OPEN: u64 = 1 << 32;
const JOINED: u64 = OPEN - 1;
const EPOCH_SHIFT: u32 = 33;

type Task = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// `epoch << 33 | open << 32 | joined`; workers watch the epoch.
    gate: AtomicU64,
    /// The job: written by the caller before it opens the gate, read by workers only after
    /// joining through the open gate.
    task: UnsafeCell<(Task, usize)>,
    /// Next part to claim.
    next: AtomicUsize,
    /// Workers parked on the condvar.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `task` is written only by the caller holding `caller`, while the gate is closed and
// no worker is joined; workers read it only while joined to the open gate of its epoch, and the
// caller waits for every joined worker to leave before it returns (and before the borrowed
// closure can die) or writes the next task.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// The pool: the calling thread plus `workers` helper threads.
pub struct Pool {
    shared: &'static Shared,
    workers: usize,
    caller: Mutex<u64>,
}

impl Pool {
    /// The process-wide pool, sized to the rayon pool (`RAYON_NUM_THREADS`) or the CPU count.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(rayon::current_num_threads().saturating_sub(1)))
    }

    fn new(workers: usize) -> Self {
        let noop: &'static (dyn Fn(usize) + Sync) = &|_| {};
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            gate: AtomicU64::new(0),
            task: UnsafeCell::new((noop as Task, 0)),
            next: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let mut started = 0;
        for i in 0..workers {
            let ok = std::thread::Builder::new()
                .name(format!("realign-gemv-{i}"))
                .spawn(move || worker(shared))
                .is_ok();
            started += usize::from(ok);
        }
        Self {
            shared,
            workers: started,
            caller: Mutex::new(0),
        }
    }

    /// Number of threads that run a job (caller included).
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(0..parts)` across the pool and returns when all parts are done. Falls back to
    /// running every part on the calling thread when another job is in flight.
    pub fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        let Ok(mut epoch) = self.caller.try_lock() else {
            (0..parts).for_each(f);
            return;
        };
        if self.workers == 0 || parts <= 1 {
            (0..parts).for_each(f);
            return;
        }
        let s = self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: the gate is
        // closed and no worker is joined here (the previous call waited for that), and below
        // we close the gate and wait for every joined worker to leave before returning.
        let task: Task = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Task>(f) };
        unsafe { *s.task.get() = (task, parts) };
        s.next.store(0, SeqCst);
        *epoch = (*epoch + 1) & (u64::MAX >> EPOCH_SHIFT);
        s.gate.store((*epoch << EPOCH_SHIFT) | OPEN, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock();
            s.wake.notify_all();
        }
        claim(s, f, parts);
        // Every part is claimed: close the gate (late workers stay out), then wait for the
        // joined ones to finish the parts they hold.
        s.gate.fetch_and(!OPEN, SeqCst);
        let mut spins = 0u32;
        while s.gate.load(SeqCst) & JOINED != 0 {
            spins = spins.wrapping_add(1);
            if spins % 256 == 0 {
                // A joined worker was descheduled mid-part: let it run.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync), parts: usize) {
    loop {
        let i = s.next.fetch_add(1, SeqCst);
        if i >= parts {
            break;
        }
        f(i);
    }
}

/// Joins the open gate of `epoch`; false when it is closed or a later job began.
fn join(s: &Shared, epoch: u64) -> bool {
    let mut g = s.gate.load(SeqCst);
    loop {
        if g >> EPOCH_SHIFT != epoch || g & OPEN == 0 {
            return false;
        }
        match s.gate.compare_exchange_weak(g, g + 1, SeqCst, SeqCst) {
            Ok(_) => return true,
            Err(now) => g = now,
        }
    }
}

fn worker(s: &'static Shared) {
    let epoch_of = |g: u64| g >> EPOCH_SHIFT;
    let mut seen = epoch_of(s.gate.load(SeqCst));
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while epoch_of(s.gate.load(SeqCst)) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 && start.elapsed() > SPIN {
                s.sleepers.fetch_add(1, SeqCst);
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                while epoch_of(s.gate.load(SeqCst)) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                drop(g);
                s.sleepers.fetch_sub(1, SeqCst);
            }
        }
        seen = epoch_of(s.gate.load(SeqCst));
        if !join(s, seen) {
            continue;
        }
        // SAFETY: joined to the open gate of this epoch, so the task is this job's and the
        // caller keeps it alive until we leave.
        let (task, parts) = unsafe { *s.task.get() };
        claim(s, unsafe { &*task }, parts);
        s.gate.fetch_sub(1, SeqCst);
    }
}

/// Runs `f(0..parts)` for an elementwise op of `elements` elements that sits between matrix
/// products, on the pool those products use: [`super::gemm::run_parts`] (candle's barrier pool,
/// which the large products run on) from [`BESIDE_PRODUCTS_MIN`] elements up, this module's
/// [`Pool::global`] (the few-row products of decoding) below. A third pool's worker spinning
/// after its op while the products run costs them a core: a prefill of 8 x 128 tokens took
/// ~885 ms with SwiGLU, the softmax and RMSNorm on [`Pool::global`] and ~858 ms this way.
pub fn run_beside_products(elements: usize, parts: usize, f: &(dyn Fn(usize) + Sync)) {
    if elements >= BESIDE_PRODUCTS_MIN {
        super::gemm::run_parts(parts, f)
    } else {
        Pool::global().run(parts, f)
    }
}

/// Elements from which [`run_beside_products`] takes the large products' pool.
pub const BESIDE_PRODUCTS_MIN: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once() {
        let pool = Pool::new(1);
        for parts in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            pool.run(parts, &|i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "{parts}");
        }
        // After the workers have parked, a job still completes.
        std::thread::sleep(Duration::from_millis(5));
        let sum = AtomicUsize::new(0);
        pool.run(10, &|i| {
            sum.fetch_add(i, SeqCst);
        });
        assert_eq!(sum.load(SeqCst), 45);
    }
}
