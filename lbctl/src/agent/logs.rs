//! The datapath's own log records (aya-log, debug level only, and only with
//! `--datapath-logs`) into the agent's log. They arrive through a ring
//! buffer; a task reads it whenever the kernel says it is readable.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

/// Re-emits the programs' records as tracing events with the target
/// `datapath` (enable with `RUST_LOG=info,datapath=debug`), the program's
/// module in a field.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, r: &log::Record) {
        let (module, msg) = (r.target(), r.args());
        match r.level() {
            log::Level::Error => tracing::error!(target: "datapath", module, "{msg}"),
            log::Level::Warn => tracing::warn!(target: "datapath", module, "{msg}"),
            log::Level::Info => tracing::info!(target: "datapath", module, "{msg}"),
            log::Level::Debug => tracing::debug!(target: "datapath", module, "{msg}"),
            log::Level::Trace => tracing::trace!(target: "datapath", module, "{msg}"),
        }
    }

    fn flush(&self) {}
}

pub fn start(ebpf: &mut Ebpf) {
    let logger = match EbpfLogger::init_with_logger(ebpf, ToTracing) {
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
    info!("forwarding the datapath's log records (tracing target `datapath`, debug level)");
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
