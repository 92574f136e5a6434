fn main() -> anyhow::Result<()> {
    lbctl::cli::main()
}
