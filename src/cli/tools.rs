//! The tools: identity, receipts, the audit trail, face evaluation. Development fallbacks for the
//! runtime (`MENSHEN_ORT_LIB`, `target/menshen-runtime`, `../shared/models`) are for these tools
//! only (`face::tools::locate`); the daemon reads the configured paths.

use std::path::{Path, PathBuf};

use super::EvalCmd;
use crate::config;

/// `menshen identity`.
pub fn identity(config_path: &Path) -> anyhow::Result<serde_json::Value> {
    let cfg = config::load(config_path)?;
    let signer = crate::privacy::Signer::load(&cfg.signing_key_path())?;
    Ok(signer.identity(&cfg.gate.site, &cfg.gate.gate))
}

/// `menshen verify-receipt`: Ok(message) if it verifies, Err(why) if not.
pub fn verify_receipt(file: &Path, key: Option<&str>, config_path: &Path) -> anyhow::Result<Result<String, String>> {
    use crate::privacy::receipt::{parse_public_key, Receipt};
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let public = match key {
        Some(k) => parse_public_key(k).ok_or_else(|| anyhow::anyhow!("--key: expected ed25519:<64 hex digits>"))?,
        None => {
            let cfg = config::load(config_path)?;
            crate::privacy::Signer::load(&cfg.signing_key_path())?.public_key()
        }
    };
    let r = match Receipt::from_json(&text) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e.to_string())),
    };
    Ok(r.verify(&public)
        .map(|()| {
            format!(
                "valid: gate {}/{} destroyed the face template of {} ({}) at {} ms; receipt {}",
                r.site, r.gate, r.resident, r.why, r.deleted_at_ms, r.receipt_id
            )
        })
        .map_err(|e| e.to_string()))
}

/// `menshen audit verify`.
pub fn audit_verify(config_path: &Path, file: Option<&Path>) -> anyhow::Result<crate::privacy::audit::Verdict> {
    let path = match file {
        Some(f) => f.to_path_buf(),
        None => config::load(config_path)?.store_path().with_file_name("audit.jsonl"),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    Ok(crate::privacy::audit::verify_text(&text))
}

/// The face runtime paths for a tool: flags, then the environment and development locations.
pub fn tool_face_config(ort_lib: Option<PathBuf>, models: Option<PathBuf>) -> crate::config::FaceConfig {
    let mut f = crate::face::tools::locate(&crate::config::FaceConfig::default());
    if let Some(l) = ort_lib {
        f.onnxruntime_library = l;
    }
    if let Some(m) = models {
        f.models_dir = m;
    }
    f
}

pub fn eval_cmd(cmd: EvalCmd) -> anyhow::Result<()> {
    match cmd {
        EvalCmd::Lfw { data, jobs, long_side, ort_lib, models, json, quiet } => {
            let cfg = tool_face_config(ort_lib, models);
            let opts = crate::face::engine::DetectorOptions { long_side, ..Default::default() };
            let r = crate::face::tools::eval_lfw(&data, &cfg, opts, jobs, !quiet)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "LFW through the Rust pipeline ({} images, {} without a face, detector long side {}, {} jobs, {:.1} s)",
                    r.images, r.no_face, long_side, r.jobs, r.seconds
                );
                println!(
                    "  10-fold accuracy on {} pairs: {:.2} % ± {:.2}",
                    r.pairs,
                    r.accuracy_mean * 100.0,
                    r.accuracy_std * 100.0
                );
                println!("  all pairs: {} genuine, {} impostor", r.all_pairs_genuine, r.all_pairs_impostor);
                println!("  TAR at FAR 1e-3: {:.2} % (cosine > {:.3})", r.tar_at_far_1e3 * 100.0, r.threshold_far_1e3);
                println!("  TAR at FAR 1e-4: {:.2} % (cosine > {:.3})", r.tar_at_far_1e4 * 100.0, r.threshold_far_1e4);
                let o = &r.one_to_n;
                println!(
                    "  1:N ({} people enrolled, {} probes): rank-1 {:.2} %; fast search = exact scan on top-1 {}/{}, decision {}/{}, runner-up within the margin {}/{}",
                    o.gallery,
                    o.probes,
                    o.rank1 * 100.0,
                    o.same_top1,
                    o.probes,
                    o.same_decision,
                    o.probes,
                    o.same_runner_up_in_margin,
                    o.runner_up_in_margin
                );
            }
            Ok(())
        }
    }
}

pub fn face_probe(images: Vec<PathBuf>, ort_lib: Option<PathBuf>, models: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = tool_face_config(ort_lib, models);
    let mut eng = crate::face::tools::engine(&cfg, crate::face::engine::DetectorOptions::default())?;
    for path in images {
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let frame = crate::face::image::Rgb::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let faces = eng.detect(&frame)?;
        let mut out = Vec::new();
        for f in &faces {
            let live = eng.liveness(&frame, f)?;
            let (yaw, roll) = crate::face::quality::pose(f);
            out.push(serde_json::json!({
                "box": f.bbox, "score": f.score, "landmarks": f.landmarks,
                "real_probability": live, "yaw": yaw, "roll_deg": roll,
            }));
        }
        println!("{}", serde_json::json!({"image": path, "width": frame.width, "height": frame.height, "faces": out}));
    }
    Ok(())
}
