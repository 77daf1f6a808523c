//! Thread helpers shared by the kernels.

use rayon::prelude::*;

/// Parallelism for a `gemm` call made from outside any rayon task.
pub fn gemm_par() -> gemm::Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// Rows per task so that each task touches at least ~32 KB, amortising rayon's scheduling.
pub fn rows_per_task(rows: usize, row_len: usize) -> usize {
    let min_rows = (8192 / row_len.max(1)).max(1);
    let even = rows.div_ceil(4 * rayon::current_num_threads());
    even.max(min_rows).min(rows.max(1))
}

/// Sum column-wise over row chunks computed in parallel: `acc[j] += f(rows)[j]`.
/// `partial(chunk_start_row, chunk_rows, out)` adds its rows' contribution to `out` (len `width`).
pub fn reduce_rows<F>(acc: &mut [f32], rows: usize, row_len: usize, partial: F)
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    let width = acc.len();
    let chunk = rows_per_task(rows, row_len);
    let n_chunks = rows.div_ceil(chunk);
    if n_chunks <= 1 {
        partial(0, rows, acc);
        return;
    }
    let total = (0..n_chunks)
        .into_par_iter()
        .map(|c| {
            let start = c * chunk;
            let len = chunk.min(rows - start);
            let mut out = vec![0.0f32; width];
            partial(start, len, &mut out);
            out
        })
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        });
    if let Some(t) = total {
        acc.iter_mut().zip(&t).for_each(|(x, y)| *x += y);
    }
}

/// A raw pointer that may cross threads, for tasks that write disjoint parts of one buffer;
/// users guarantee that the parts they touch are disjoint.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
// SAFETY: the pointer gives access to `T`s from the thread it is sent to, which moving a `T`
// there would (`T: Send`); every dereference is `unsafe`, and its users keep accesses from
// different threads disjoint.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: sharing the wrapper hands the same pointer to several threads, which may then reach
// the `T`s from each, as `&mut T` and `&T` across threads would (`T: Send + Sync`); accesses
// stay disjoint as above.
unsafe impl<T: Send + Sync> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    pub fn get(self) -> *mut T {
        self.0
    }
}
