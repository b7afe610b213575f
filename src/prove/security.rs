//! `orderbridge prove security`: the daemon as its container runs it. The
//! image's last `USER` must not be root; the daemon is started as that uid
//! (10001, `setpriv`) inside a mount namespace whose root filesystem is
//! read-only (`unshare -m`, `/` remounted read-only: what `docker run
//! --read-only` gives), and must do its whole job there (the suites' common
//! verdict), answer `/readyz` ready, and open no file for writing. The
//! configuration's `Debug` output must not show any configured secret.
//!
//! Where the machine cannot confine a process (no `unshare`/`setpriv`, or no
//! right to make a mount namespace), the confinement is skipped with the
//! reason printed and the rest still runs. The other security promises have
//! their tests: webhook secrets compared by digest (`http::hooks`), bodies
//! over the limit and wrong content types refused (tests/amocrm_webhooks.rs,
//! tests/partner.rs), the dashboard's token off loopback (tests/kpi.rs), no
//! secret or buyer phone in a full demo's logs (tests/demo.rs); `cargo deny`
//! runs in `scripts/deny.sh`.

use std::io::Write;
use std::time::{Duration, Instant};

use super::world::{World, AMO_TOKEN, HOOK_SECRET, KASPI_TOKEN};
use super::ProveError;
use crate::bench::{failed, BenchError};
use crate::config::Settings;
use crate::store::ScratchDatabase;

#[derive(Debug, Clone, clap::Args)]
pub struct SecurityArgs {
    /// Seconds of traffic the confined daemon handles.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// New Kaspi orders a second.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// The uid (and gid) the daemon runs as: the image's `orderbridge` user.
    #[arg(long, default_value_t = 10001)]
    pub uid: u32,
    /// The image's build file, whose last `USER` is checked.
    #[arg(long, default_value = "Dockerfile")]
    pub dockerfile: std::path::PathBuf,
    /// Seeds the managers' choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub async fn run(
    settings: &Settings,
    args: &SecurityArgs,
    out: &mut impl Write,
) -> Result<(), ProveError> {
    super::in_scratch_database(settings, out, async |admin, db| {
        exercise(admin, db, args).await
    })
    .await
}

/// The last `USER` of the build file's final stage.
fn image_user(dockerfile: &str) -> Option<String> {
    let final_stage = dockerfile
        .rsplit_once("\nFROM ")
        .map_or(dockerfile, |(_, stage)| stage);
    final_stage
        .lines()
        .filter_map(|line| line.trim().strip_prefix("USER "))
        .map(|user| user.trim().to_string())
        .next_back()
}

/// The wrapper that confines the daemon, or why this machine cannot.
fn confinement(uid: u32) -> Result<Vec<String>, String> {
    let script = format!(
        "mount -o remount,ro,bind / && exec setpriv --reuid {uid} --regid {uid} --clear-groups \"$0\" \"$@\""
    );
    let wrapper: Vec<String> = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
        .iter()
        .map(|s| s.to_string())
        .chain([script])
        .collect();
    let probe = std::process::Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg("true")
        .output()
        .map_err(|e| format!("unshare: {e}"))?;
    if probe.status.success() {
        Ok(wrapper)
    } else {
        Err(String::from_utf8_lossy(&probe.stderr).trim().to_string())
    }
}

/// (real uid, root mounted read-only, regular files open for writing).
fn inspect(pid: u32) -> Result<(u32, bool, Vec<String>), BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| failed("no Uid line"))?;
    // mountinfo: id parent major:minor root mount-point options …
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let root_read_only = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(4) == Some(&"/")
            && fields
                .get(5)
                .is_some_and(|options| options.split(',').any(|o| o == "ro"))
    });
    let mut writable = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        // Standard input, output and error are what it was given (its logs
        // go to standard output by design), not files it opened (CI's run
        // caught the harness's own redirected output here).
        let fd: u32 = entry
            .file_name()
            .to_string_lossy()
            .parse()
            .unwrap_or(u32::MAX);
        if fd <= 2 {
            continue;
        }
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.display().to_string();
        if !target.starts_with('/') || target.starts_with("/dev/") {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & 0o3 != 0 {
            writable.push(target);
        }
    }
    Ok((uid, root_read_only, writable))
}

async fn exercise(
    admin: &str,
    db: &ScratchDatabase,
    args: &SecurityArgs,
) -> Result<super::world::Outcome, BenchError> {
    let mut figures: Vec<(&'static str, String)> = Vec::new();
    let mut broken = Vec::new();

    let dockerfile = std::fs::read_to_string(&args.dockerfile)?;
    match image_user(&dockerfile) {
        Some(user) if user != "root" && user != "0" && !user.starts_with("0:") => {
            figures.push(("image_user", user));
        }
        other => broken.push(format!(
            "the image's final stage runs as {}",
            other.unwrap_or_else(|| "root (no USER)".into())
        )),
    }

    let wrapper = match confinement(args.uid) {
        Ok(wrapper) => wrapper,
        Err(why) => {
            eprintln!(
                "prove security: cannot confine the daemon here, so it runs unconfined: {why}"
            );
            figures.push(("confinement", format!("skipped: {why}")));
            Vec::new()
        }
    };
    let confined = !wrapper.is_empty();
    let mut world = World::start_wrapped(admin, db, 1, args.seed, &[], &wrapper).await?;

    // The configuration's Debug output holds none of its secrets.
    let loaded =
        Settings::load_from(Some(&world.config), Vec::<(String, String)>::new()).map_err(failed)?;
    let debug = format!("{loaded:?}");
    let avito_secret = crate::sim::avito::AvitoSimConfig::default().client_secret;
    let leaked: Vec<&str> = [AMO_TOKEN, HOOK_SECRET, KASPI_TOKEN, avito_secret.as_str()]
        .into_iter()
        .filter(|secret| debug.contains(secret))
        .collect();
    if !(debug.contains("kaspi_prove") && debug.contains("avito_prove")) {
        broken.push("the configuration's Debug output does not even name its shops".into());
    }
    if !leaked.is_empty() {
        broken.push(format!(
            "{} configured secrets in the configuration's Debug output",
            leaked.len()
        ));
    }
    figures.push(("secrets_in_config_debug", leaked.len().to_string()));

    // The confined daemon does its job.
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut inspected = None;
    while Instant::now() < until {
        world.pump(args.rate);
        world.check_daemons()?;
        if inspected.is_none() && world.linked().await? > 0 {
            inspected = Some(inspect(world.daemons[0].pid())?);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = reqwest::get(world.readyz_url(0))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    if let Some((uid, root_read_only, writable)) = &inspected {
        figures.extend([
            ("daemon_uid", uid.to_string()),
            (
                "root_fs",
                if *root_read_only {
                    "read-only"
                } else {
                    "writable"
                }
                .to_string(),
            ),
            ("files_open_for_writing", writable.len().to_string()),
        ]);
        if confined && *uid != args.uid {
            broken.push(format!("the daemon runs as uid {uid}, not {}", args.uid));
        }
        if confined && !root_read_only {
            broken.push("the daemon's root filesystem is writable".into());
        }
        if !writable.is_empty() {
            broken.push(format!("files open for writing: {}", writable.join(", ")));
        }
    } else {
        broken.push("no lead was made: the confined daemon did not work".into());
    }
    figures.push(("readyz_status", ready.to_string()));
    if ready != 200 {
        broken.push(format!("/readyz answered {ready} in the confined daemon"));
    }
    let converge_s = world.settle(Duration::from_secs(120)).await?;
    let (mut common, mut promises) = world.verdict().await?;
    common.push(("converge_s", format!("{converge_s:.1}")));
    common.append(&mut figures);
    promises.append(&mut broken);
    Ok((common, promises))
}

#[cfg(test)]
mod tests {
    use super::image_user;

    #[test]
    fn the_final_stages_last_user_is_read() {
        let file =
            "FROM rust AS b\nUSER root\nRUN x\nFROM debian\nUSER app\nRUN y\nUSER orderbridge\n";
        assert_eq!(image_user(file).as_deref(), Some("orderbridge"));
        assert_eq!(
            image_user("FROM rust AS b\nUSER app\nFROM debian\nRUN y\n"),
            None
        );
    }
}
