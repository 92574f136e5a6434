//! Output formats: a table for people, JSON and YAML for scripts. Commands
//! build a typed view first and render it last.

use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

pub fn structured<T: Serialize>(out: Output, view: &T) -> Result<Option<String>> {
    Ok(match out {
        Output::Table => None,
        Output::Json => Some(serde_json::to_string_pretty(view)? + "\n"),
        Output::Yaml => Some(serde_yaml::to_string(view)?),
    })
}

pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(header.iter().copied());
    for r in rows {
        t.add_row(r);
    }
    // No trailing spaces: golden files stay stable.
    let s: Vec<String> = t
        .to_string()
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect();
    s.join("\n") + "\n"
}
