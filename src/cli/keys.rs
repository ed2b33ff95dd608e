//! `capsulefs key`: make, list and show writer identities.

use clap::Subcommand;

use capsulefs::crypto::keys::Identity;

use super::home::Home;

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Make a new ed25519 identity (file mode 0600) and print its writer id.
    New {
        /// Name of the identity.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// List identities: name and writer id.
    List,
    /// Print an identity's public key (its writer id), to give to a capsule's admin.
    Show {
        /// Name of the identity (default: 'default', or the only one).
        name: Option<String>,
    },
}

pub fn run(home: &Home, cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::New { name } => println!("{}", home.keyring()?.add(Identity::generate(&name)?)?.writer()),
        KeyCommand::List => home.keyring()?.identities().iter().for_each(|i| println!("{}\t{}", i.name(), i.writer())),
        KeyCommand::Show { name } => println!("{}", home.identity(name.as_deref(), false)?.writer()),
    }
    Ok(())
}
