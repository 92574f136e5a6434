//! `lbctl status`: what is attached where (from the pinned links) and how
//! many entries each map holds.

use anyhow::{Context, Result};
use serde::Serialize;

use super::{PinArgs, render};
use crate::{
    agent::apply::MapWriter,
    datapath::{attach, maps::ServiceMaps},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pins: PinArgs,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: render::Output,
}

/// Field names are part of the JSON/YAML contract.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatusView {
    pub bpffs: String,
    pub layout_version: u32,
    pub attachments: Vec<AttachmentView>,
    pub maps: Vec<MapView>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttachmentView {
    pub program: String,
    /// The device for tc hooks; empty for the cgroup hooks.
    pub device: String,
    pub link_id: u32,
    pub program_id: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MapView {
    pub map: String,
    pub entries: usize,
}

pub fn execute(args: Args) -> Result<()> {
    let pins = &args.pins.bpffs;
    let maps = ServiceMaps::open(pins)?;
    let mut attachments = Vec::new();
    for (file, program, device) in attach::pinned(pins) {
        let path = crate::datapath::pins::links_dir(pins).join(&file);
        let link: aya::programs::links::FdLink = aya::programs::links::PinnedLink::from_pin(&path)
            .with_context(|| format!("opening {}", path.display()))?
            .into();
        let info = link
            .info()
            .with_context(|| format!("reading {}", path.display()))?;
        attachments.push(AttachmentView {
            program,
            device: device.unwrap_or_default(),
            link_id: info.id(),
            program_id: info.program_id(),
        });
    }
    let st = maps.read()?;
    let ct = maps.conntrack.keys().filter_map(Result::ok).count();
    let view = StatusView {
        bpffs: pins.display().to_string(),
        layout_version: lb_common::LAYOUT_VERSION,
        attachments,
        maps: [
            (lb_common::maps::ADDRS4, st.addrs.len()),
            (lb_common::maps::FRONTENDS4, st.frontends.len()),
            (lb_common::maps::BACKEND_SLOTS, st.slots.len()),
            (lb_common::maps::BACKENDS4, st.backends.len()),
            (lb_common::maps::SERVICE_META, st.service_meta.len()),
            (lb_common::maps::BACKEND_META, st.backend_meta.len()),
            (lb_common::maps::CONNTRACK4, ct),
        ]
        .into_iter()
        .map(|(m, n)| MapView {
            map: m.into(),
            entries: n,
        })
        .collect(),
    };
    match render::structured(args.output, &view)? {
        Some(s) => print!("{s}"),
        None => {
            let rows = view
                .attachments
                .iter()
                .map(|a| {
                    let at = if a.device.is_empty() {
                        "cgroup".to_string()
                    } else {
                        a.device.clone()
                    };
                    vec![
                        a.program.clone(),
                        at,
                        a.link_id.to_string(),
                        a.program_id.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render::table(&["PROGRAM", "ATTACHED TO", "LINK", "PROGRAM ID"], rows)
            );
            println!();
            let rows = view
                .maps
                .iter()
                .map(|m| vec![m.map.clone(), m.entries.to_string()])
                .collect();
            print!("{}", render::table(&["MAP", "ENTRIES"], rows));
        }
    }
    Ok(())
}
