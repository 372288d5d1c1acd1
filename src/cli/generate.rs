//! `sitegate generate` (hidden): the files a package ships beside the binary,
//! rendered from this binary's own clap tree so they can never drift from it.
//! `scripts/build-deb.sh` runs it on the release binary it packages.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// The command tree a user sees: [`Cli`] without its hidden subcommands
/// (`generate` itself), which clap_complete would otherwise offer. clap cannot
/// remove a subcommand, so the root is rebuilt from the derived one.
pub(crate) fn public_command() -> clap::Command {
    let full = Cli::command();
    let mut cmd = clap::Command::new("sitegate")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
        .subcommand_required(full.is_subcommand_required_set())
        .arg_required_else_help(full.is_arg_required_else_help_set());
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    if let Some(about) = full.get_long_about() {
        cmd = cmd.long_about(about.clone());
    }
    cmd
}

/// `sitegate generate completions SHELL`: the completion script on stdout.
pub fn completions(shell: Shell) -> Result<()> {
    let mut cmd = public_command();
    let mut text = Vec::new();
    clap_complete::generate(shell, &mut cmd, "sitegate", &mut text);
    super::write_stdout(&String::from_utf8_lossy(&text))
}

/// `sitegate generate man [--out-dir DIR]`: `sitegate(1)` on stdout; with a
/// directory, that page and one per visible subcommand (`sitegate-peer-add.1`,
/// ...), which `sitegate(1)` refers to, each written file's path printed.
pub fn man(out_dir: Option<&Path>) -> Result<()> {
    // As clap_mangen::generate_to prepares it: built (so subcommands carry
    // their full `sitegate-peer-add` names) and without clap's `help` command.
    let mut cmd = public_command().disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = out_dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut page)
            .context("cannot render the man page")?;
        return super::write_stdout(&String::from_utf8_lossy(&page));
    };
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    write_pages(cmd, dir, &mut written)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    let list: String = written
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    super::write_stdout(&list)
}

/// One page for `cmd` and one for each visible subcommand, depth first.
fn write_pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, written)?;
    }
    written.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public tree is the derived one minus `generate`: same root
    /// settings, every other subcommand and global flag, and it is consistent.
    #[test]
    fn public_tree_hides_generate_only() {
        let full = Cli::command();
        let public = public_command();
        public.clone().debug_assert();
        let names = |c: &clap::Command| -> Vec<String> {
            c.get_subcommands()
                .map(|s| s.get_name().to_string())
                .collect()
        };
        let mut want = names(&full);
        want.retain(|n| n != "generate");
        assert_eq!(names(&public), want);
        assert_eq!(public.get_name(), full.get_name());
        assert_eq!(public.get_version(), full.get_version());
        assert_eq!(
            public.is_subcommand_required_set(),
            full.is_subcommand_required_set()
        );
        let args = |c: &clap::Command| -> Vec<String> {
            c.get_arguments().map(|a| a.get_id().to_string()).collect()
        };
        assert_eq!(args(&public), args(&full));
    }

    /// Completion scripts offer every public subcommand and never `generate`
    /// (each shell's way of listing a subcommand, checked on `genkey` too).
    #[test]
    fn completions_leave_out_generate() {
        for (shell, offered) in [
            (Shell::Bash, " genkey "),
            (Shell::Zsh, "'genkey:"),
            (Shell::Fish, "-a \"genkey\""),
        ] {
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut public_command(), "sitegate", &mut text);
            let text = String::from_utf8(text).unwrap();
            assert!(text.contains(offered), "{shell} lacks {offered}");
            let hidden = offered.replace("genkey", "generate");
            assert!(!text.contains(&hidden), "{shell} offers {hidden}");
            for sub in ["init", "run", "peer", "revoke", "audit", "verify"] {
                assert!(text.contains(sub), "{shell} lacks {sub}");
            }
        }
    }
}
