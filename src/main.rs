//! The `menshen` binary: parse the command line, load and validate the config (its own exit code
//! on a bad one), then hand over to the daemon or the tool asked for.
#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use menshen::cli::{self, AuditCmd, Cli, Command, SimCmd, TestCmd};
use menshen::config;

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
}

/// Load and validate a config, or say why on stderr and give the exit code for it.
fn load_config(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("{}: {e}", path.display());
        ExitCode::from(e.exit_code() as u8)
    })
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::PrintDefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match config::load(&file) {
            Ok(cfg) => {
                println!("{}: ok ({} door(s), {} reader(s))", file.display(), cfg.doors.len(), cfg.readers.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(e.exit_code() as u8)
            }
        },
        Command::Run { config: path } => {
            let cfg = match load_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            cli::init_logging(cfg.log.format, &cfg.log.level);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(e.into()),
            };
            match rt.block_on(cli::run_daemon(Arc::new(cfg), None)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "menshen failed");
                    if let Some(r) = e.downcast_ref::<menshen::runtime::RuntimeError>() {
                        eprintln!("menshen: {r}\n  fix: {}", r.hint());
                        return ExitCode::from(menshen::runtime::EXIT_RUNTIME as u8);
                    }
                    fail(e)
                }
            }
        }
        Command::Demo { no_script, exit_after_script } => match demo(no_script, exit_after_script) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Identity { config: path } => match cli::identity(&path) {
            Ok(v) => {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::VerifyReceipt { file, key, config: path } => match cli::verify_receipt(&file, key.as_deref(), &path) {
            Ok(Ok(msg)) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Ok(Err(why)) => {
                println!("NOT valid: {why}");
                ExitCode::from(1)
            }
            Err(e) => fail(e),
        },
        Command::Audit(AuditCmd::Verify { config: path, file, json }) => {
            match cli::audit_verify(&path, file.as_deref()) {
                Ok(v) => {
                    if json {
                        println!("{}", serde_json::to_string(&v).unwrap_or_default());
                    } else if let Some(b) = &v.broken {
                        let seq = b.seq.map_or("unreadable".to_string(), |s| s.to_string());
                        println!(
                            "BROKEN at record {seq} (line {}): {}; {} records before it verify",
                            b.line, b.why, v.records
                        );
                    } else {
                        println!(
                            "intact: {} records, seq {}..{}",
                            v.records,
                            v.first_seq.unwrap_or(0),
                            v.last_seq.unwrap_or(0)
                        );
                    }
                    if v.broken.is_some() {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => fail(e),
            }
        }
        Command::Resident(cmd) => match cli::resident_cmd(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Sim(SimCmd::Serve { config: path }) => {
            let cfg = match load_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            cli::init_logging(cfg.log.format, &cfg.log.level);
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(e.into()),
            };
            let res = rt.block_on(async move {
                let tok = tokio_util::sync::CancellationToken::new();
                let t2 = tok.clone();
                tokio::spawn(async move {
                    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                        Ok(t) => t,
                        Err(_) => return,
                    };
                    tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
                    t2.cancel();
                });
                menshen::hw::sim::serve(&cfg, &cfg.hardware.sim.socket, tok).await
            });
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Sim(cmd) => match cli::sim_cmd(cmd) {
            Ok(v) => {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Doctor { config: path, json, min_free_mb, units } => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(e.into()),
            };
            let mut opts = menshen::doctor::DoctorOpts { min_free_mb, ..Default::default() };
            if !units.is_empty() {
                opts.unit_paths = units;
            }
            let checks = rt.block_on(menshen::doctor::run(&path, &opts));
            if menshen::doctor::print(&checks, json) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Test(cmd) => {
            let path = match &cmd {
                TestCmd::Reader { config, .. } | TestCmd::Relay { config, .. } | TestCmd::Inputs { config, .. } => {
                    config.clone()
                }
            };
            let cfg = match load_config(&path) {
                Ok(c) => Arc::new(c),
                Err(code) => return code,
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(e.into()),
            };
            let res = rt.block_on(async move {
                match cmd {
                    TestCmd::Reader { reader, count, seconds, json, .. } => {
                        menshen::wiring::test_reader(cfg, &reader, count, seconds, json).await.map(|_| ())
                    }
                    TestCmd::Relay { door, .. } => menshen::wiring::test_relay(cfg, &door).await,
                    TestCmd::Inputs { seconds, json, .. } => {
                        menshen::wiring::test_inputs(cfg, seconds, json).await.map(|_| ())
                    }
                }
            });
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Eval(cmd) => match cli::eval_cmd(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::FaceProbe { images, ort_lib, models } => match cli::face_probe(images, ort_lib, models) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Status { config: path } => {
            let res = config::load(&path).map_err(anyhow::Error::from).and_then(|c| menshen::app::status(&c));
            match res {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

fn demo(no_script: bool, exit_after_script: bool) -> anyhow::Result<()> {
    let dir = std::path::Path::new(cli::DEMO_DIR);
    std::fs::create_dir_all(dir)?;
    let cfg_path = dir.join("menshen.toml");
    std::fs::write(&cfg_path, cli::demo_config(dir)?)?;
    let cfg = config::load(&cfg_path)?;
    cli::init_logging(cfg.log.format, &cfg.log.level);
    cli::seed_demo(&cfg)?;
    let face = cli::demo_face();
    let camera = dir.join("camera");
    if let Some(f) = &face {
        cli::demo_show(&camera, &[])?;
        cli::demo_enrol(&cfg_path, f)?;
    }
    println!("Menshen demo: simulated hardware, config {}", cfg_path.display());
    println!(
        "Residents: r-1001 card 7:12345 (card) · r-1002 card 7:22222 (face_and_card) · r-1003 card 7:33333 (expired)"
    );
    match &face {
        Some(_) => println!(
            "           r-1004 card 7:44444 (face_or_card; consented; face enrolled from two LFW photos, sealed in the store)"
        ),
        None => println!("Face part off: no ONNX Runtime/models/LFW found (scripts/setup-runtime.sh --dest target/menshen-runtime)"),
    }
    println!(
        "Events go to mqtt://{}:{} under {} (kept in the outbox while no broker is there).",
        cfg.mqtt.host,
        cfg.mqtt.port,
        cfg.topic_root()
    );
    let rt = runtime()?;
    rt.block_on(async move {
        let cfg = Arc::new(cfg);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let daemon = tokio::spawn(cli::run_daemon(cfg.clone(), Some(tx)));
        if rx.await.is_err() {
            return match daemon.await {
                Ok(r) => r,
                Err(e) => Err(e.into()),
            };
        }
        if !no_script {
            if let Some(f) = &face {
                println!("\n▶ r-1004 walks up to the camera (other LFW photos of the same person): face_or_card opens the door");
                let frames: Vec<_> =
                    cli::DEMO_FACE_SHOW.iter().map(|n| f.lfw.join("Colin_Powell").join(format!("{n}.jpg"))).collect();
                if let Err(e) = cli::demo_show(&camera, &frames) {
                    println!("  camera error: {e}");
                }
                tokio::time::sleep(Duration::from_millis(4_000)).await;
                let _ = cli::demo_show(&camera, &[]);
                tokio::time::sleep(Duration::from_millis(3_500)).await;
            }
            let socket = cfg.hardware.sim.socket.clone();
            for (what, op) in cli::demo_script() {
                println!("\n▶ {what}");
                let s = socket.clone();
                let r = tokio::task::spawn_blocking(move || menshen::hw::sim::request(&s, &op)).await?;
                if let Err(e) = r {
                    println!("  sim error: {e}");
                }
                // Let the 3 s unlock and the 2 s shunt grace after it run out before the forced-door step.
                let pause = if what.starts_with("the exit button") { 5_500 } else { 400 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            tokio::time::sleep(Duration::from_millis(3_200)).await;
        }
        // Name the binary as it was started (e.g. target/release/menshen from `cargo run`), so
        // the commands can be pasted as they are: a fresh clone has no `menshen` on its PATH.
        let me = std::env::args().next().unwrap_or_else(|| "menshen".into());
        println!("\nTry it yourself from another terminal in this directory:");
        println!("  {me} sim swipe --reader front --card 12345 --facility 7");
        println!("  {me} sim raw --reader front --bits 10000011100110000001110010");
        println!("  {me} sim door open ; {me} sim rex ; {me} sim state");
        println!("  {me} status --config {}/menshen.toml", cli::DEMO_DIR);
        if exit_after_script {
            // Stop the daemon the way systemd would.
            let pid = std::process::id();
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        } else {
            println!("Ctrl-C stops the demo.");
        }
        match daemon.await {
            Ok(r) => r,
            Err(e) => Err(e.into()),
        }
    })
}
