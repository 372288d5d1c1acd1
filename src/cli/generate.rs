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

/// What sitegate(1) says beyond the clap tree: where things live.
const MAN_ROOT_EXTRA: &str = r#".SH ENVIRONMENT
.TP
\fBSITEGATE_CONFIG\fR
The config file when \fB\-\-config\fR is not given.
.SH FILES
.TP
\fI/etc/sitegate/sitegate.toml\fR
The config that \fBsitegate init\fR writes, beside the server key, the API token and the seal key (each mode 0600).
.TP
\fI/var/lib/sitegate/sitegate.db\fR
The peer store (SQLite).
.TP
\fI/var/log/sitegate/audit.jsonl\fR
The hash\-chained audit log, checked by \fBsitegate audit verify\fR.
.TP
\fI/run/sitegate/NAME.sock\fR
The daemon's control socket (mode 0600), through which admin commands reach it.
.TP
\fI/run/wireguard/NAME.sock\fR
The WireGuard userspace API socket that \fBwg show\fR reads.
.TP
\fI/usr/lib/systemd/system/sitegate.service\fR
The hardened unit: \fBsystemctl enable \-\-now sitegate\fR once \fBsitegate init\fR has written the config.
.SH SEE ALSO
\fBwg\fR(8), \fBwg\-quick\fR(8), \fBsystemd.exec\fR(5)
"#;

/// What every subcommand's page adds.
const MAN_SUB_EXTRA: &str = ".SH SEE ALSO\n\\fBsitegate\\fR(1)\n";

/// `sitegate generate man [--out-dir DIR]`: `sitegate(1)` on stdout; with a
/// directory, that page and one per visible subcommand (`sitegate-peer-add.1`,
/// ...), which `sitegate(1)` refers to, each written file's path printed.
pub fn man(out_dir: Option<&Path>) -> Result<()> {
    // As clap_mangen::generate_to prepares it: built (so subcommands carry
    // their full `sitegate-peer-add` names) and without clap's `help` command.
    let mut cmd = public_command().disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = out_dir else {
        let page = render_page(cmd, MAN_ROOT_EXTRA).context("cannot render the man page")?;
        return super::write_stdout(&page);
    };
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    write_pages(cmd, MAN_ROOT_EXTRA, dir, &mut written)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    let list: String = written
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    super::write_stdout(&list)
}

/// clap_mangen's page for `cmd` with `extra` (roff sections) before its
/// VERSION section, or at the end.
fn render_page(cmd: clap::Command, extra: &str) -> io::Result<String> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page)?;
    let mut page = String::from_utf8(page).map_err(io::Error::other)?;
    let at = page.find("\n.SH VERSION").map_or(page.len(), |i| i + 1);
    page.insert_str(at, extra);
    Ok(page)
}

/// One page for `cmd` and one for each visible subcommand, depth first.
fn write_pages(
    cmd: clap::Command,
    extra: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), MAN_SUB_EXTRA, dir, written)?;
    }
    let path = dir.join(clap_mangen::Man::new(cmd.clone()).get_filename());
    fs::write(&path, render_page(cmd, extra)?)?;
    written.push(path);
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

    /// sitegate(1) gains ENVIRONMENT, FILES and SEE ALSO before its VERSION;
    /// a subcommand's page points back to sitegate(1).
    #[test]
    fn man_pages_gain_their_sections() {
        let mut cmd = public_command().disable_help_subcommand(true);
        cmd.build();
        let root = render_page(cmd.clone(), MAN_ROOT_EXTRA).unwrap();
        let at = |s: &str| root.find(s).unwrap_or_else(|| panic!("no {s}:\n{root}"));
        assert!(at(".SH SUBCOMMANDS") < at(".SH FILES"));
        assert!(at(".SH FILES") < at(".SH SEE ALSO"));
        assert!(at(".SH SEE ALSO") < at(".SH VERSION"));
        assert!(root.contains("/var/log/sitegate/audit.jsonl"));
        let peer = cmd.find_subcommand("peer").unwrap().clone();
        let page = render_page(peer, MAN_SUB_EXTRA).unwrap();
        assert!(page.contains("\n.TH sitegate-peer 1 "), "{page}");
        assert!(page.contains(".SH SEE ALSO\n\\fBsitegate\\fR(1)"), "{page}");
    }
}
