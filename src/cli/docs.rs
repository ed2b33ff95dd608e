//! Man pages and shell completions, both generated from the one clap definition.

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use clap_complete::Shell;

use super::Args;

#[derive(Parser, Debug)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: Shell,
}

pub fn completions(a: CompletionsArgs) -> anyhow::Result<()> {
    clap_complete::generate(a.shell, &mut Args::command(), "capsulefs", &mut std::io::stdout());
    Ok(())
}

#[derive(Parser, Debug)]
pub struct ManArgs {
    /// Folder to write capsulefs.1, capsulefs-<command>.1, ... into.
    pub dir: PathBuf,
}

pub fn man(a: ManArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir)?;
    let mut root = Args::command();
    root.build();
    write_pages(&a.dir, &root, "capsulefs")
}

fn write_pages(dir: &std::path::Path, cmd: &clap::Command, name: &str) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut file = std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
    clap_mangen::Man::new(page).render(&mut file)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_pages(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(())
}
