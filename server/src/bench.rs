//! Benchmarks: being written.
/// Flags of `anchorcoder bench`.
#[derive(clap::Args)]
pub struct BenchArgs {}
/// Run the benchmark.
pub fn run(_: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
