//! `qtrace generate completions SHELL | man DIR`: shell completions and the man pages, generated
//! from this binary's own command line (hidden; `cargo xtask dist` packs their output).

use std::io::Write;

use clap::{Args, Subcommand, ValueEnum};

#[derive(Args)]
pub struct GenerateOptions {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// A completion script for SHELL on standard output.
    Completions { shell: Shell },
    /// The man pages qtrace(1) and one per subcommand (qtrace-run(1), ...) into DIR.
    Man { dir: std::path::PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes what `opts` asks for about the command line `cli` on standard output.
pub fn generate(opts: GenerateOptions, mut cli: clap::Command) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match opts.what {
        What::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut cli, "qtrace", &mut out);
        }
        What::Man { dir } => clap_mangen::generate_to(cli.name("qtrace"), dir)?,
    }
    out.flush()?;
    Ok(())
}
