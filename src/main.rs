//! The `capsulefs` binary: parse arguments, start logging, run the command, map errors to exit codes.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match cli::parse() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    // A server's log is its record of who connected and what was refused: info by default.
    let serving = matches!(args.command, cli::Command::Serve(_));
    cli::init_tracing(args.verbose.max(u8::from(serving)));
    let Err(e) = cli::run(args) else { return ExitCode::SUCCESS };
    if cli::reader_went_away(&e) {
        return ExitCode::SUCCESS; // `capsulefs log | head`: the reader has what it wanted
    }
    eprintln!("capsulefs: {e:#}");
    ExitCode::from(cli::exit_code(&e))
}
