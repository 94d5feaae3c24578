//! `pulse-schema-registry`: parses config and runs [`pulse_schema_registry::run`] until
//! SIGTERM/SIGINT; `pulse-schema-registry hash-password --user NAME --role read|write` prints
//! a credentials-file line for the password read from stdin.

use clap::Parser as _;
use pulse_schema_registry::auth::HashPassword;

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    if std::env::args().nth(1).as_deref() == Some("hash-password") {
        let cmd = HashPassword::parse_from(std::env::args().skip(1));
        match cmd.run(&mut std::io::stdin().lock()) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
        return Ok(());
    }
    pulse_platform::service::main::<pulse_schema_registry::Config, _, _, _>(
        pulse_schema_registry::SERVICE,
        pulse_schema_registry::run,
    )
    .await
}
