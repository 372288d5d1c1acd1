//! `sitegate`: parse the command line, dispatch, and turn any error into one
//! `error: ...` line on stderr with exit code 1 (clap's usage errors exit 2).

use std::process::ExitCode;

use clap::Parser;
use sitegate::cli::{self, AuditCommand, Cli, Command, GenerateCommand, PeerCommand};

fn main() -> ExitCode {
    let args = Cli::parse();
    let config = args.config.as_path();
    let result = match &args.command {
        Command::Init(a) => cli::init(config, a),
        Command::Run => cli::run(config),
        Command::Peer(PeerCommand::Add(a)) => cli::peer_add(config, a),
        Command::Peer(PeerCommand::List { json }) => cli::peer_list(config, *json),
        Command::Peer(PeerCommand::Revoke { name, reason }) => {
            cli::peer_revoke(config, name, reason.as_deref())
        }
        Command::Peer(PeerCommand::Rotate(a)) => cli::peer_rotate(config, a),
        Command::Peer(PeerCommand::Show { name, json }) => cli::peer_show(config, name, *json),
        Command::Status { json } => cli::status(config, *json),
        Command::Check => cli::check(config),
        Command::Audit(AuditCommand::Verify { file }) => cli::audit_verify(config, file.as_deref()),
        Command::Genkey => cli::genkey(),
        Command::Pubkey => cli::pubkey(),
        Command::Generate(GenerateCommand::Completions { shell }) => cli::completions(*shell),
        Command::Generate(GenerateCommand::Man { out_dir }) => cli::man(out_dir.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
