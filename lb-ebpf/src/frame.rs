//! What the packet parser needs of a program's context, for tc (an skb) and
//! XDP (a driver's buffer) alike: the linear data and the whole length.

use aya_ebpf::programs::{TcContext, XdpContext};

pub trait Frame {
    /// Start and end of the directly readable (linear) data.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length.
    fn len(&self) -> u32;
    /// Makes the first `len` bytes linear; false when it cannot (XDP
    /// buffers are linear already: nothing more to pull).
    fn pull(&self, len: u32) -> bool;

    /// A pointer to a `T` at `off` in the linear data, bounds-checked as
    /// the verifier requires.
    #[inline(always)]
    fn ptr_at<T>(&self, off: usize) -> Option<*mut T> {
        let start = self.data();
        if start + off + core::mem::size_of::<T>() > self.data_end() {
            return None;
        }
        Some((start + off) as *mut T)
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn pull(&self, len: u32) -> bool {
        self.pull_data(len).is_ok()
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    #[inline(always)]
    fn pull(&self, _len: u32) -> bool {
        false
    }
}
