//! Carrying out a command line: load the config (exit codes 3-5), then the daemon, the demo or
//! a tool.

use std::process::ExitCode;
use std::sync::Arc;

use super::*;

pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
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

/// What a long-running command needs: its config (a bad one exits 3-5), logging, a runtime.
fn start(path: &std::path::Path) -> Result<(config::Config, tokio::runtime::Runtime), ExitCode> {
    let cfg = load_config(path)?;
    init_logging(cfg.log.format, &cfg.log.level);
    let rt = runtime().map_err(|e| fail(e.into()))?;
    Ok((cfg, rt))
}

/// Carry out one command line: the daemon, the demo or a tool. The exit code says how it went.
pub fn run(cli: Cli) -> ExitCode {
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
            let (cfg, rt) = match start(&path) {
                Ok(x) => x,
                Err(code) => return code,
            };
            match rt.block_on(crate::daemon::run(Arc::new(cfg), None, None)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "menshen failed");
                    if let Some(r) = e.downcast_ref::<crate::runtime::RuntimeError>() {
                        eprintln!("menshen: {r}\n  fix: {}", r.hint());
                        return ExitCode::from(crate::runtime::EXIT_RUNTIME as u8);
                    }
                    fail(e)
                }
            }
        }
        Command::Demo { no_script, once } => match demo::demo(no_script, once) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Identity { config: path } => match identity(&path) {
            Ok(v) => {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::VerifyReceipt { file, key, config: path } => match verify_receipt(&file, key.as_deref(), &path) {
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
        Command::Audit(AuditCmd::Verify { config: path, file, json }) => match audit_verify(&path, file.as_deref()) {
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
        },
        Command::Resident(cmd) => match resident_cmd(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Sim(SimCmd::Serve { config: path, on_release }) => {
            let (cfg, rt) = match start(&path) {
                Ok(x) => x,
                Err(code) => return code,
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
                let keep = on_release == "keep";
                crate::hw::sim::SimChip::new(&cfg)
                    .keep_released_outputs(keep)
                    .serve(&cfg.hardware.sim.socket, tok)
                    .await
            });
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Sim(cmd) => match sim_cmd(cmd) {
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
            let mut opts = crate::doctor::DoctorOpts { min_free_mb, ..Default::default() };
            if !units.is_empty() {
                opts.unit_paths = units;
            }
            let checks = rt.block_on(crate::doctor::run(&path, &opts));
            if crate::doctor::print(&checks, json) {
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
                        crate::wiring::test_reader(cfg, &reader, count, seconds, json).await.map(|_| ())
                    }
                    TestCmd::Relay { door, .. } => crate::wiring::test_relay(cfg, &door).await,
                    TestCmd::Inputs { seconds, json, .. } => {
                        crate::wiring::test_inputs(cfg, seconds, json).await.map(|_| ())
                    }
                }
            });
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        #[cfg(feature = "osdp")]
        Command::Osdp(super::OsdpCmd::Install { reader, config: path, timeout_secs }) => {
            let cfg = match load_config(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match super::osdp::install(&cfg, &reader, std::time::Duration::from_secs(timeout_secs)) {
                Ok(msg) => {
                    println!("{msg}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Site(cmd) => match super::site_cmd(cmd) {
            Ok(code) => ExitCode::from(code),
            Err(e) => fail(e),
        },
        Command::Eval(cmd) => match eval_cmd(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::FaceProbe { images, ort_lib, models } => match face_probe(images, ort_lib, models) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Status { config: path } => {
            let res = config::load(&path).map_err(anyhow::Error::from).and_then(|c| crate::daemon::status_query(&c));
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
