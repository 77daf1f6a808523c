//! Borrowed views of device memory: an address and a length, as `&[T]` and `&mut [T]` are on
//! the host. Every launcher takes them (a whole `CudaSlice` converts into one), so a layer can
//! hand a kernel part of a buffer: one parameter of the flat parameter buffer, the first rows
//! of a buffer grown for a longer batch.
//!
//! cudarc's own views (`CudaView`) cannot be copied or built from an address; these can,
//! because qkv runs everything on one stream, where launches are ordered and cudarc's
//! cross-stream events are not needed. The lifetime ties a view to the buffer it was taken
//! from, so the allocation outlives every launch recorded with it (a buffer's free is
//! itself ordered on the stream after them).

use std::marker::PhantomData;
use std::ops::Range;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchArgs, PushKernelArg};

/// `&'a [T]` on the device.
#[derive(Debug)]
pub struct DevRef<'a, T = f32> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a [T]>,
}

impl<T> Clone for DevRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevRef<'_, T> {}

/// `&'a mut [T]` on the device.
#[derive(Debug)]
pub struct DevMut<'a, T = f32> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T> DevRef<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address of the first element.
    pub fn addr(&self) -> u64 {
        self.ptr
    }
    /// Elements `r` (panics outside the view, as slicing does).
    pub fn slice(self, r: Range<usize>) -> Self {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "{r:?} of {}",
            self.len
        );
        Self {
            ptr: self.ptr + (r.start * size_of::<T>()) as u64,
            len: r.len(),
            _borrow: PhantomData,
        }
    }
}

impl<'a, T> DevMut<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Elements `r`, for as long as this view lives.
    pub fn slice(self, r: Range<usize>) -> Self {
        Self::from_ref(DevRef::from_raw(self.ptr, self.len).slice(r))
    }
    /// The same elements for a shorter borrow, so this view can be used again after.
    pub fn reborrow(&mut self) -> DevMut<'_, T> {
        DevMut {
            ptr: self.ptr,
            len: self.len,
            _borrow: PhantomData,
        }
    }
    /// The same elements, read-only, while this view is not written.
    pub fn shared(&self) -> DevRef<'_, T> {
        DevRef::from_raw(self.ptr, self.len)
    }
    /// Two disjoint parts: elements `a` and `b` (`a` before `b`), as `split_at_mut`.
    pub fn split(self, a: Range<usize>, b: Range<usize>) -> (Self, Self) {
        assert!(
            a.end <= b.start,
            "{a:?} and {b:?} must be disjoint and in order"
        );
        let whole = DevRef::<T>::from_raw(self.ptr, self.len);
        (
            Self::from_ref(whole.slice(a)),
            Self::from_ref(whole.slice(b)),
        )
    }

    /// As [`DevRef::unbacked`].
    pub(crate) fn unbacked(len: usize) -> Self {
        Self::from_ref(DevRef::unbacked(len))
    }

    fn from_ref(r: DevRef<'_, T>) -> Self {
        Self {
            ptr: r.ptr,
            len: r.len,
            _borrow: PhantomData,
        }
    }
}

impl<T> DevRef<'_, T> {
    /// A view of `len` elements at address 0, standing in for an allocation that failed: the
    /// backend that made it is failed and launches nothing with it.
    pub(crate) fn unbacked(len: usize) -> Self {
        Self::from_raw(0, len)
    }

    fn from_raw(ptr: u64, len: usize) -> Self {
        Self {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }
}

impl<'a, T> From<&'a CudaSlice<T>> for DevRef<'a, T> {
    fn from(s: &'a CudaSlice<T>) -> Self {
        // The returned guard records a read event only when cudarc manages several streams'
        // ordering; qkv's one stream orders every launch.
        let (ptr, _record) = s.device_ptr(s.stream());
        DevRef::from_raw(ptr, s.len())
    }
}

impl<'a, T> From<&'a mut CudaSlice<T>> for DevMut<'a, T> {
    fn from(s: &'a mut CudaSlice<T>) -> Self {
        let len = s.len();
        let stream = s.stream().clone();
        let (ptr, _record) = s.device_ptr_mut(&stream);
        DevMut {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }
}

impl<'a, T> From<DevMut<'a, T>> for DevRef<'a, T> {
    fn from(m: DevMut<'a, T>) -> Self {
        DevRef::from_raw(m.ptr, m.len)
    }
}

impl<'a, T> From<&'a DevMut<'_, T>> for DevRef<'a, T> {
    fn from(m: &'a DevMut<'_, T>) -> Self {
        m.shared()
    }
}

impl<'a, T> From<&'a mut DevMut<'_, T>> for DevMut<'a, T> {
    fn from(m: &'a mut DevMut<'_, T>) -> Self {
        m.reborrow()
    }
}

// SAFETY: a kernel's pointer argument is the device address itself; `arg` keeps a pointer to
// the view's `ptr` field, which outlives the launch builder ('b: 'a).
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b DevRef<'_, T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b DevRef<'_, T>) -> &mut Self {
        self.arg(&arg.ptr)
    }
}

// SAFETY: as for `DevRef`.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b DevMut<'_, T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b DevMut<'_, T>) -> &mut Self {
        self.arg(&arg.ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address arithmetic every launch relies on, checked without a GPU: a slice starts
    /// `start` elements (of its type's size) further, and splits are the parts asked for.
    #[test]
    fn views_address_their_elements_and_split_into_the_parts_asked_for() {
        let base = DevRef::<f32>::from_raw(0x1000, 10);
        let s = base.slice(2..7);
        assert_eq!((s.addr(), s.len()), (0x1000 + 2 * 4, 5));
        assert_eq!(s.slice(1..2).addr(), 0x1000 + 3 * 4);
        let bits = DevRef::<u16>::from_raw(0x2000, 8).slice(3..8);
        assert_eq!((bits.addr(), bits.len()), (0x2000 + 3 * 2, 5));

        let mut m = DevMut::<f32>::from_ref(base);
        let again = m.reborrow();
        assert_eq!((again.shared().addr(), again.len()), (0x1000, 10));
        let (a, b) = m.split(0..3, 5..10);
        assert_eq!((a.shared().addr(), a.len()), (0x1000, 3));
        assert_eq!((b.shared().addr(), b.len()), (0x1000 + 5 * 4, 5));
        assert_eq!(DevRef::from(b).slice(4..5).addr(), 0x1000 + 9 * 4);
    }

    #[test]
    #[should_panic(expected = "2..5 of 4")]
    fn a_slice_past_the_view_panics_as_slicing_does() {
        DevRef::<f32>::from_raw(0, 4).slice(2..5);
    }

    #[test]
    #[should_panic(expected = "must be disjoint")]
    fn overlapping_parts_are_refused() {
        DevMut::<f32>::unbacked(8).split(0..4, 3..8);
    }
}
