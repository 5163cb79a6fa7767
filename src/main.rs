//! The `realign` command line: parses arguments and calls the library.

mod cli;

use clap::Parser;

fn main() {
    // Output piped into a reader that stops early (`realign inspect M | head -1`) ends the
    // process quietly, as for other command-line tools, instead of a panic in `println!`.
    #[cfg(unix)]
    // SAFETY: restores the default action of SIGPIPE before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    // Ctrl-C or `kill` leaves no half-written output folder or file behind.
    if let Err(e) = realign::fsutil::remove_partial_outputs_on_interrupt() {
        eprintln!("warning: no interrupt handler ({e}): an interrupted run may leave a hidden partial output");
    }
    if let Err(err) = cli::run(args) {
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
