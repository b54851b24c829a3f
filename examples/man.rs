//! Write the man pages from the command line's definition: `menshen.1` and one page per
//! subcommand (`menshen-resident.1`, `menshen-resident-add.1`, …), uncompressed, into the
//! directory given (default `target/man`). `scripts/package.sh` gzips them into the packages.
//!
//! `cargo run --example man -- target/man`

use clap::CommandFactory;
use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/man".into()));
    std::fs::create_dir_all(&out)?;
    let n = write(&out, &menshen::cli::Cli::command(), "menshen")?;
    println!("{n} man pages in {}", out.display());
    Ok(())
}

/// Render `cmd` as `name.1`, then each of its subcommands as `name-sub.1`; returns how many.
fn write(out: &Path, cmd: &clap::Command, name: &str) -> anyhow::Result<usize> {
    // clap names are `&'static str` (no `string` feature): a few dozen short names, leaked once
    // by a program that ends right after.
    let static_name: &'static str = Box::leak(name.to_string().into_boxed_str());
    let page = cmd.clone().name(static_name).bin_name(name.replace('-', " "));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page.clone()).render(&mut buf)?;
    std::fs::write(out.join(format!("{name}.1")), buf)?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        n += write(out, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(n)
}
