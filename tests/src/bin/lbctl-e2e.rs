//! lbctl, built as part of this package so that `cargo test` always runs
//! end-to-end tests against the current code (cargo builds a package's
//! binaries before its integration tests; another package's it does not).
fn main() -> anyhow::Result<()> {
    lbctl::cli::main()
}
