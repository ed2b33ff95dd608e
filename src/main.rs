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
    cli::init_tracing(args.verbose);
    let Err(e) = cli::run(args) else { return ExitCode::SUCCESS };
    if cli::reader_went_away(&e) {
        return ExitCode::SUCCESS; // `capsulefs log | head`: the reader has what it wanted
    }
    eprintln!("capsulefs: {e:#}");
    ExitCode::from(cli::exit_code(&e))
}
