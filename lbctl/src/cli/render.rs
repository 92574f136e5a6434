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
    render(Some(header), rows)
}

/// A table without a header: one "what  value" line per row, for a
/// single object (`lbctl explain`, the agent part of `lbctl status`).
pub fn pairs(rows: Vec<Vec<String>>) -> String {
    render(None, rows)
}

fn render(header: Option<&[&str]>, rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    if let Some(h) = header {
        t.set_header(h.iter().copied());
    }
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
