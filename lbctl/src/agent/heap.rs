//! The C allocator's settings for the agent, made before any thread
//! starts.
//!
//! glibc gives each thread that contends for the heap an arena of its own
//! (up to 8 per core), and memory freed in one arena is reused only by
//! the threads that allocate there. The agent builds its model on the
//! runtime's workers and parses manifests on threads of its own, so every
//! arena grew to a part of the model and stayed that size. Two arenas
//! (`bench --only agent`, this machine): a 10,000-Service start peaks at
//! 60.4 MiB instead of 62.9, a 100,000-Service restart at 504 MiB instead
//! of 519, in the same time. One arena saves a little more (59.8 and 491
//! MiB) but the manifest parser's threads then queue on its lock: a
//! 100,000-Service start took 9.7 s instead of 4.9.

/// Arenas the agent's allocator may use.
const ARENAS: i32 = 2;

/// Caps glibc's arenas (`M_ARENA_MAX`), unless the operator set a cap with
/// `GLIBC_TUNABLES` (`glibc.malloc.arena_max`), which wins.
pub fn cap_arenas() {
    let set_by_operator = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    if set_by_operator {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a parameter of the allocator; called
    // before any thread of ours exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}
