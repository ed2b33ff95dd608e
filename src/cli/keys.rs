//! `capsulefs key`: make and list writer identities.

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
}

pub fn run(home: &Home, cmd: KeyCommand) -> anyhow::Result<()> {
    let mut ring = home.keyring()?;
    match cmd {
        KeyCommand::New { name } => println!("{}", ring.add(Identity::generate(&name)?)?.writer()),
        KeyCommand::List => ring.identities().iter().for_each(|i| println!("{}\t{}", i.name(), i.writer())),
    }
    Ok(())
}
