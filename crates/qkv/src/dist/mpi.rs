//! [`Collective`] over MPI (OpenMPI, MPICH), for processes started by `mpirun`.
//!
//! Every operation is non-blocking (`MPI_Iallreduce`, `MPI_Ibcast`) and polled against a
//! deadline, so a rank that died or hangs cannot stall the others forever: after `timeout`
//! the operation fails with an error naming the ranks that never arrived. To know who arrived,
//! each operation has every rank send a tiny "arrived" message to every other one (2(K − 1)
//! messages of 8 bytes, microseconds on any link). A rank that stops inside an operation,
//! after its arrival, is found one timeout later: the live ranks time out too and tell each
//! other so; the silent one is named. After such an error MPI's state
//! is unusable: the caller reports it and calls [`Mpi::abort`], which ends every rank.
//!
//! The `mpi` crate (rsmpi) initialises MPI and links it; the operations are its raw `ffi`
//! because its safe requests must complete before their scope ends, which is exactly what a
//! timed-out operation cannot do.

use super::Collective;
use crate::error::{Error, Result};
use mpi::ffi;
use mpi::traits::Communicator;
use std::cell::{Cell, RefCell};
use std::os::raw::{c_int, c_void};
use std::time::{Duration, Instant};

/// The tag of "arrived" messages (collectives have no tags; this one is for them alone).
const ARRIVED_TAG: c_int = 0x71_6b76;
/// The tag of "timed out" messages: a rank whose operation timed out after every rank arrived.
const TIMED_OUT_TAG: c_int = 0x71_6b77;
/// Largest element count of one MPI call (its counts are `int`); longer buffers go in buckets.
const BUCKET: usize = 1 << 22;

/// The "arrived" messages of one operation.
struct Arrival {
    seq: u64,
    peers: Vec<usize>,
    sent: Box<u64>,
    heard: Box<[u64]>,
    recvs: Vec<ffi::MPI_Request>,
    sends: Vec<ffi::MPI_Request>,
}

/// Bucketed sums in flight: one operation whose requests are started bucket by bucket. Its
/// arrival is announced when it is waited for: a rank that hangs after starting some buckets
/// (inside its backward) is then named as the one that did not arrive.
struct Sums {
    /// (offset, send buffer, receive buffer) per bucket; the buffers' heap addresses are what
    /// MPI holds, so moving these vectors is fine.
    buckets: Vec<(usize, Vec<f32>, Vec<f32>)>,
    requests: Vec<ffi::MPI_Request>,
}

/// This process's place among the ranks of `mpirun`, and MPI itself (finalised on drop).
pub struct Mpi {
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Operations started so far (the "arrived" messages carry it).
    seq: Cell<u64>,
    sums: RefCell<Option<Sums>>,
    /// Bucket buffers of earlier updates, reused.
    spare: RefCell<Vec<Vec<f32>>>,
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// Initialise MPI; `timeout` bounds how long any operation waits for the other ranks.
    /// Only the calling thread may use MPI (rayon's workers never do).
    pub fn init(timeout: Duration) -> Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Distributed("MPI was already initialised".into()))?;
        let world = universe.world();
        Ok(Self {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            timeout,
            seq: Cell::new(0),
            sums: RefCell::new(None),
            spare: RefCell::new(Vec::new()),
            _universe: universe,
        })
    }

    /// End every rank of the job (after an error that left operations pending).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn comm(&self) -> ffi::MPI_Comm {
        // SAFETY: reading an extern constant the MPI library defines.
        unsafe { ffi::RSMPI_COMM_WORLD }
    }

    /// Start one operation: announce arrival to every other rank (and listen for theirs).
    fn arrive(&self, what: &str) -> Result<Arrival> {
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        let peers: Vec<usize> = (0..self.size).filter(|&r| r != self.rank).collect();
        let mut a = Arrival {
            seq,
            // Boxed so the addresses stay put while the requests are pending (and past an
            // error: then they are leaked on purpose, as MPI may still write into them).
            sent: Box::new(seq),
            heard: vec![0u64; peers.len()].into_boxed_slice(),
            recvs: vec![null_request(); peers.len()],
            sends: vec![null_request(); peers.len()],
            peers,
        };
        for i in 0..a.peers.len() {
            let p = a.peers[i] as c_int;
            // SAFETY: the buffers are heap allocations that outlive the requests (completed in
            // `complete`, or leaked on a timeout); counts and types match them.
            check(
                unsafe {
                    ffi::MPI_Irecv(
                        (&mut a.heard[i]) as *mut u64 as *mut c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p,
                        ARRIVED_TAG,
                        self.comm(),
                        &mut a.recvs[i],
                    )
                },
                what,
            )?;
            // SAFETY: as above.
            check(
                unsafe {
                    ffi::MPI_Isend(
                        (&*a.sent) as *const u64 as *const c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p,
                        ARRIVED_TAG,
                        self.comm(),
                        &mut a.sends[i],
                    )
                },
                what,
            )?;
        }
        Ok(a)
    }

    /// Finish an operation: poll its requests `ops` until done or the deadline; on a
    /// timeout, name the ranks whose arrival never came.
    fn complete(&self, mut a: Arrival, ops: &mut [ffi::MPI_Request], what: &str) -> Result<()> {
        // One deadline for the operation and every rank's arrival: a broadcast's root, or a
        // sum whose data went out eagerly, can finish its side while a peer never arrives.
        let deadline = Instant::now() + self.timeout;
        let done = self.poll(ops, deadline, what)?;
        let mut missing = Vec::new();
        for i in 0..a.peers.len() {
            if !self.poll(std::slice::from_mut(&mut a.recvs[i]), deadline, what)? {
                missing.push(a.peers[i].to_string());
            }
        }
        let sent = missing.is_empty() && self.poll(&mut a.sends, deadline, what)?;
        if !(done && sent) {
            if missing.is_empty() {
                // Every rank arrived, so one stopped inside the operation: the live ones time
                // out too, within one timeout of this one, and say so; the silent are named.
                missing = self.silent_after_timeout(&a.peers, what)?;
            }
            // MPI may still write into the arrival buffers.
            std::mem::forget(a);
            let who = match missing.len() {
                0 => "every rank arrived and timed out too (a transport failure)".to_string(),
                1 => format!(
                    "rank {} did not arrive or stopped inside it: it died or hangs",
                    missing[0]
                ),
                _ => format!(
                    "ranks {} did not arrive or stopped inside it: they died or hang",
                    missing.join(", ")
                ),
            };
            return Err(Error::Distributed(format!(
                "{what} did not complete within {} s; {who}",
                self.timeout.as_secs_f64()
            )));
        }
        if let Some((i, &s)) = a.heard.iter().enumerate().find(|&(_, &s)| s != a.seq) {
            return Err(Error::Distributed(format!(
                "{what} (operation {}) met rank {} at its operation {s}: the ranks ran \
                 different programs or configurations",
                a.seq, a.peers[i]
            )));
        }
        Ok(())
    }

    /// Tell every peer this rank timed out, and return the peers that do not say the same
    /// within one more timeout.
    fn silent_after_timeout(&self, peers: &[usize], what: &str) -> Result<Vec<String>> {
        let (sent, mut heard) = (Box::new(self.seq.get()), vec![0u64; peers.len()]);
        let mut recvs = vec![null_request(); peers.len()];
        let mut sends = vec![null_request(); peers.len()];
        for (i, &p) in peers.iter().enumerate() {
            // SAFETY: the buffers are leaked below (the process aborts after this error), so
            // they outlive the requests; counts and types match them.
            unsafe {
                check(
                    ffi::MPI_Irecv(
                        (&mut heard[i]) as *mut u64 as *mut c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p as c_int,
                        TIMED_OUT_TAG,
                        self.comm(),
                        &mut recvs[i],
                    ),
                    what,
                )?;
                check(
                    ffi::MPI_Isend(
                        (&*sent) as *const u64 as *const c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p as c_int,
                        TIMED_OUT_TAG,
                        self.comm(),
                        &mut sends[i],
                    ),
                    what,
                )?;
            }
        }
        let deadline = Instant::now() + self.timeout;
        let mut silent = Vec::new();
        for (i, &p) in peers.iter().enumerate() {
            if !self.poll(std::slice::from_mut(&mut recvs[i]), deadline, what)? {
                silent.push(p.to_string());
            }
        }
        std::mem::forget((sent, heard, recvs, sends));
        Ok(silent)
    }

    /// One blocking operation: arrive, start the requests with `start`, complete.
    fn operation(
        &self,
        what: &str,
        start: impl FnOnce(&mut Vec<ffi::MPI_Request>) -> Result<()>,
    ) -> Result<()> {
        let a = self.arrive(what)?;
        let mut ops = Vec::new();
        start(&mut ops)?;
        self.complete(a, &mut ops, what)
    }

    /// Test `reqs` until all are done (`true`) or `deadline` passes (`false`).
    fn poll(&self, reqs: &mut [ffi::MPI_Request], deadline: Instant, what: &str) -> Result<bool> {
        let mut spins = 0u32;
        loop {
            let mut done: c_int = 0;
            // SAFETY: `reqs` are requests this module started (or null ones).
            check(
                unsafe {
                    ffi::MPI_Testall(
                        reqs.len() as c_int,
                        reqs.as_mut_ptr(),
                        &mut done,
                        ffi::RSMPI_STATUSES_IGNORE,
                    )
                },
                what,
            )?;
            if done != 0 {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            // Each test also drives MPI's progress, so spin while the wait is short; past a
            // second (another rank validating or saving), stop burning its core.
            spins = spins.saturating_add(1);
            if spins < 100_000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Start summing `send` into `recv` across the ranks, in requests of at most `BUCKET`
    /// elements pushed onto `ops`.
    ///
    /// # Safety
    /// Both buffers must stay where they are, untouched, until those requests complete (or
    /// the process ends).
    unsafe fn start_all_reduce<T: Copy>(
        &self,
        send: &[T],
        recv: &mut [T],
        dtype: ffi::MPI_Datatype,
        ops: &mut Vec<ffi::MPI_Request>,
        what: &str,
    ) -> Result<()> {
        for (inp, out) in send.chunks(BUCKET).zip(recv.chunks_mut(BUCKET)) {
            ops.push(null_request());
            let req = ops.last_mut().expect("pushed above");
            // SAFETY: the caller keeps the buffers alive and in place until the request
            // completes; counts fit an int (BUCKET) and match the datatype's element type.
            check(
                unsafe {
                    ffi::MPI_Iallreduce(
                        inp.as_ptr() as *const c_void,
                        out.as_mut_ptr() as *mut c_void,
                        out.len() as c_int,
                        dtype,
                        ffi::RSMPI_SUM,
                        self.comm(),
                        req,
                    )
                },
                what,
            )?;
        }
        Ok(())
    }

    fn all_reduce<T: Copy>(
        &self,
        buf: &mut [T],
        send: &[T],
        dtype: ffi::MPI_Datatype,
        what: &str,
    ) -> Result<()> {
        // SAFETY: `send` and `buf` outlive the requests: `operation` polls them to completion
        // before it returns, or the process aborts.
        self.operation(what, |ops| unsafe {
            self.start_all_reduce(send, buf, dtype, ops, what)
        })
    }

    fn broadcast<T: Copy>(
        &self,
        buf: &mut [T],
        dtype: ffi::MPI_Datatype,
        what: &str,
    ) -> Result<()> {
        self.operation(what, |ops| {
            for (i, part) in buf.chunks_mut(BUCKET).enumerate() {
                ops.push(null_request());
                // SAFETY: as in `all_reduce`.
                check(
                    unsafe {
                        ffi::MPI_Ibcast(
                            part.as_mut_ptr() as *mut c_void,
                            part.len() as c_int,
                            dtype,
                            0,
                            self.comm(),
                            &mut ops[i],
                        )
                    },
                    what,
                )?;
            }
            Ok(())
        })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn start_sum(&self, offset: usize, data: &[f32], what: &str) -> Result<()> {
        let mut sums = self.sums.borrow_mut();
        if sums.is_none() {
            *sums = Some(Sums {
                buckets: Vec::new(),
                requests: Vec::new(),
            });
        }
        let sums = sums.as_mut().expect("set above");
        let mut spare = self.spare.borrow_mut();
        let mut take = || spare.pop().unwrap_or_default();
        let (mut send, mut recv) = (take(), take());
        send.clear();
        send.extend_from_slice(data);
        recv.clear();
        recv.resize(data.len(), 0.0);
        // SAFETY: `send` and `recv` move into `sums.buckets` below without moving their heap
        // buffers, and stay there until `finish_sums` has completed the requests (or leaks
        // them after a timeout, before the process aborts).
        unsafe {
            self.start_all_reduce(&send, &mut recv, ffi::RSMPI_FLOAT, &mut sums.requests, what)?
        };
        sums.buckets.push((offset, send, recv));
        Ok(())
    }

    fn progress(&self) -> Result<()> {
        if let Some(sums) = self.sums.borrow_mut().as_mut() {
            self.poll(&mut sums.requests, Instant::now(), "summing gradients")?;
        }
        Ok(())
    }

    fn finish_sums(&self, out: &mut [f32], what: &str) -> Result<()> {
        let Some(mut sums) = self.sums.borrow_mut().take() else {
            return Ok(());
        };
        let arrival = self.arrive(what)?;
        if let Err(e) = self.complete(arrival, &mut sums.requests, what) {
            // MPI may still write into the buffers.
            std::mem::forget(sums.buckets);
            return Err(e);
        }
        let mut spare = self.spare.borrow_mut();
        for (offset, send, recv) in sums.buckets {
            out[offset..offset + recv.len()].copy_from_slice(&recv);
            spare.extend([send, recv]);
        }
        Ok(())
    }
    fn sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()> {
        let send = buf.to_vec();
        // SAFETY: as above.
        self.all_reduce(buf, &send, unsafe { ffi::RSMPI_DOUBLE }, what)
    }
    fn broadcast_f32(&self, buf: &mut [f32], what: &str) -> Result<()> {
        // SAFETY: as above.
        self.broadcast(buf, unsafe { ffi::RSMPI_FLOAT }, what)
    }
    fn broadcast_f64(&self, buf: &mut [f64], what: &str) -> Result<()> {
        // SAFETY: as above.
        self.broadcast(buf, unsafe { ffi::RSMPI_DOUBLE }, what)
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, what: &str) -> Result<()> {
        let mut len = [bytes.len() as f64];
        self.broadcast_f64(&mut len, what)?;
        bytes.resize(len[0] as usize, 0);
        // SAFETY: as above.
        self.broadcast(bytes, unsafe { ffi::RSMPI_UINT8_T }, what)
    }
}

fn null_request() -> ffi::MPI_Request {
    // SAFETY: reading an extern constant the MPI library defines.
    unsafe { ffi::RSMPI_REQUEST_NULL }
}

/// MPI's default error handler aborts on failure; this catches a library set to return.
fn check(code: c_int, what: &str) -> Result<()> {
    if code == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        Err(Error::Distributed(format!("{what}: MPI error code {code}")))
    }
}
