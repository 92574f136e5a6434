//! `lbctl completions SHELL` and `lbctl man`: generated from the same clap
//! definitions as the commands themselves, so they never drift.

use anyhow::Result;
use clap::CommandFactory;

use super::Cli;

#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

pub fn completions(args: CompletionArgs) -> Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "lbctl", &mut std::io::stdout());
    Ok(())
}

/// The man page (roff) of lbctl and its subcommands.
pub fn man_page() -> Result<Vec<u8>> {
    let cmd = Cli::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("lbctl-{}", sub.get_name());
        let sub = sub.clone().name(name.clone()).display_name(name);
        out.extend_from_slice(b"\n");
        clap_mangen::Man::new(sub).render(&mut out)?;
    }
    Ok(out)
}

pub fn man() -> Result<()> {
    use std::io::Write;
    std::io::stdout().write_all(&man_page()?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn man_page_covers_every_subcommand() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        for sub in [
            "agent",
            "services",
            "conntrack",
            "counters",
            "status",
            "completions",
        ] {
            assert!(
                page.contains(&format!("lbctl\\-{sub}")),
                "man page lacks {sub}"
            );
        }
    }

    #[test]
    fn completions_name_the_subcommands() {
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "lbctl",
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("conntrack") && text.contains("--bpffs"));
    }
}
