//! [`Collective`] over MPI (OpenMPI, MPICH), for processes started by `mpirun`.
//!
//! Every operation is non-blocking (`MPI_Iallreduce`, `MPI_Ibcast`) and polled against a
//! deadline, so a rank that died or hangs cannot stall the others forever: after `timeout`
//! the operation fails with an error naming the ranks that never arrived. To know who arrived,
//! each operation starts with a tiny "arrived" message from every rank to every other one
//! (2(K − 1) messages of 8 bytes, microseconds on any link). After such an error MPI's state
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
/// Largest element count of one MPI call (its counts are `int`); longer buffers go in buckets.
const BUCKET: usize = 1 << 22;

/// This process's place among the ranks of `mpirun`, and MPI itself (finalised on drop).
pub struct Mpi {
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Operations started so far (the "arrived" messages carry it).
    seq: Cell<u64>,
    send: RefCell<Vec<f32>>,
    _universe: mpi::environment::Universe,
}

/// Whether this process was started by an MPI launcher (`mpirun`, `srun`, hydra).
pub fn launched() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
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
            send: RefCell::new(Vec::new()),
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

    /// Run one operation: announce arrival to every other rank, start the operation's
    /// requests with `start`, and poll them all until done or the deadline.
    fn operation(
        &self,
        what: &str,
        start: impl FnOnce(&mut Vec<ffi::MPI_Request>) -> Result<()>,
    ) -> Result<()> {
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        let peers: Vec<usize> = (0..self.size).filter(|&r| r != self.rank).collect();
        // Boxed so the addresses stay put while the requests are pending (and past an error:
        // then they are leaked on purpose, as MPI may still write into them).
        let sent = Box::new(seq);
        let mut heard = vec![0u64; peers.len()].into_boxed_slice();
        let mut recvs = vec![null_request(); peers.len()];
        let mut sends = vec![null_request(); peers.len()];
        for (i, &p) in peers.iter().enumerate() {
            // SAFETY: the buffers are heap allocations that outlive the requests (waited for
            // below, or leaked on a timeout); counts and types match them.
            check(
                unsafe {
                    ffi::MPI_Irecv(
                        (&mut heard[i]) as *mut u64 as *mut c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p as c_int,
                        ARRIVED_TAG,
                        self.comm(),
                        &mut recvs[i],
                    )
                },
                what,
            )?;
            // SAFETY: as above.
            check(
                unsafe {
                    ffi::MPI_Isend(
                        (&*sent) as *const u64 as *const c_void,
                        1,
                        ffi::RSMPI_UINT64_T,
                        p as c_int,
                        ARRIVED_TAG,
                        self.comm(),
                        &mut sends[i],
                    )
                },
                what,
            )?;
        }
        let mut ops = Vec::new();
        start(&mut ops)?;
        let deadline = Instant::now() + self.timeout;
        if !self.poll(&mut ops, deadline, what)? {
            let mut missing = Vec::new();
            for (i, &p) in peers.iter().enumerate() {
                if !self.poll(std::slice::from_mut(&mut recvs[i]), Instant::now(), what)? {
                    missing.push(p.to_string());
                }
            }
            std::mem::forget((sent, heard));
            let who = match missing.len() {
                0 => {
                    "every rank arrived but the operation did not finish (a rank stopped inside it)"
                        .to_string()
                }
                1 => format!("rank {} did not arrive: it died or hangs", missing[0]),
                _ => format!(
                    "ranks {} did not arrive: they died or hang",
                    missing.join(", ")
                ),
            };
            return Err(Error::Distributed(format!(
                "{what} did not complete within {} s; {who}",
                self.timeout.as_secs_f64()
            )));
        }
        recvs.append(&mut sends);
        if !self.poll(&mut recvs, Instant::now() + self.timeout, what)? {
            std::mem::forget((sent, heard));
            return Err(Error::Distributed(format!(
                "{what}: the arrival messages did not complete within {} s",
                self.timeout.as_secs_f64()
            )));
        }
        if let Some((i, &s)) = heard.iter().enumerate().find(|&(_, &s)| s != seq) {
            return Err(Error::Distributed(format!(
                "{what} (operation {seq}) met rank {} at its operation {s}: the ranks ran \
                 different programs or configurations",
                peers[i]
            )));
        }
        Ok(())
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

    fn all_reduce<T: Copy>(
        &self,
        buf: &mut [T],
        send: &[T],
        dtype: ffi::MPI_Datatype,
        what: &str,
    ) -> Result<()> {
        self.operation(what, |ops| {
            for (i, (out, inp)) in buf.chunks_mut(BUCKET).zip(send.chunks(BUCKET)).enumerate() {
                ops.push(null_request());
                // SAFETY: `send` and `buf` outlive the requests (polled to completion before
                // `operation` returns, or the process aborts); counts fit an int (BUCKET).
                check(
                    unsafe {
                        ffi::MPI_Iallreduce(
                            inp.as_ptr() as *const c_void,
                            out.as_mut_ptr() as *mut c_void,
                            out.len() as c_int,
                            dtype,
                            ffi::RSMPI_SUM,
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
    fn sum_f32(&self, buf: &mut [f32], what: &str) -> Result<()> {
        let mut send = self.send.borrow_mut();
        send.clear();
        send.extend_from_slice(buf);
        // SAFETY: reading an extern constant the MPI library defines.
        self.all_reduce(buf, &send, unsafe { ffi::RSMPI_FLOAT }, what)
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
