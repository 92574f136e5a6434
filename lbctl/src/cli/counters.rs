//! `lbctl counters`: the datapath's verdict counters, summed over CPUs.

use anyhow::Result;
use lb_common::counters::VERDICTS;
use serde::Serialize;

use super::{PinArgs, render};
use crate::datapath::maps::ServiceMaps;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: render::Output,
}

/// One verdict. Field names are part of the JSON/YAML contract.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerdictView {
    /// Number in the append-only verdict list (lb-common counters.rs).
    pub number: u32,
    pub verdict: String,
    pub count: u64,
}

pub fn view(counts: &[u64]) -> Vec<VerdictView> {
    VERDICTS
        .iter()
        .map(|(n, label)| VerdictView {
            number: *n,
            verdict: (*label).into(),
            count: counts.get(*n as usize).copied().unwrap_or(0),
        })
        .collect()
}

pub fn table(v: &[VerdictView]) -> String {
    render::table(
        &["VERDICT", "COUNT"],
        v.iter()
            .map(|x| vec![x.verdict.clone(), x.count.to_string()])
            .collect(),
    )
}

pub fn execute(args: Args) -> Result<()> {
    let maps = ServiceMaps::open(&args.pins.bpffs)?;
    let v = view(&maps.verdicts());
    match render::structured(args.output, &v)? {
        Some(s) => print!("{s}"),
        None => print!("{}", table(&v)),
    }
    Ok(())
}
