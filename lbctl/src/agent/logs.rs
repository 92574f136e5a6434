//! The datapath's own log records (aya-log, debug level only, and only with
//! `--datapath-logs`) into the agent's log. They arrive through a ring
//! buffer; a task reads it whenever the kernel says it is readable.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

pub fn start(ebpf: &mut Ebpf) {
    let logger = match EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!("datapath logs unavailable: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, which stays open and
    // the same for as long as the logger lives, i.e. inside the AsyncFd.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("datapath logs unavailable: {e}");
            return;
        }
    };
    info!("forwarding datapath log records (target lb_ebpf)");
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
