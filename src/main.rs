//! Entry point: parse the command line, load the configuration, start
//! telemetry, hand over to [`orderbridge::cli::execute`].

use clap::Parser;
use orderbridge::cli::{Cli, EXIT_CONFIG};
use orderbridge::config::Settings;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let mut settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("orderbridge: {error}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    if matches!(cli.command, orderbridge::cli::Command::Demo { .. })
        && settings.telemetry.log_file.is_none()
    {
        // The demo's terminal shows its status; the logs go to a file.
        settings.telemetry.log_file = Some("orderbridge-demo.log".into());
        eprintln!("orderbridge demo: logs go to orderbridge-demo.log");
    }
    if let Err(error) = orderbridge::telemetry::init_logging(&settings.telemetry) {
        eprintln!("orderbridge: {error}");
        std::process::exit(EXIT_CONFIG);
    }
    if let Err(error) = orderbridge::cli::execute(cli, settings).await {
        tracing::error!(error = %format!("{error:#}"), "orderbridge failed.");
        eprintln!("orderbridge: {error:#}");
        std::process::exit(1);
    }
}
