//! The face runtime: ONNX Runtime (loaded dynamically from the configured library) and the face
//! models of `models/manifest.toml`, checked before anything runs.
//!
//! A wrong install must give a clear error, never a panic (issue 7): the library's sha256 is
//! checked against the manifest *before* it is loaded (ort's `api-31` panics on an older library),
//! every model's sha256 is checked before a session is made, and each session's input must have
//! the name, layout and size the manifest says. `menshen doctor` runs the same check, and the
//! daemon runs it at start when `face.enabled` is set.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use crate::config::FaceConfig;

/// The exit code of a daemon that refuses to start on a bad face runtime.
pub const EXIT_RUNTIME: i32 = 6;

/// The manifest as shipped (also installed as `/usr/share/menshen/models/manifest.toml`).
pub const MANIFEST: &str = include_str!("../models/manifest.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub runtime: RuntimeEntry,
    #[serde(rename = "model")]
    pub models: Vec<ModelEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RuntimeEntry {
    pub version: String,
    pub library: String,
    pub x86_64: RuntimeArch,
    pub aarch64: RuntimeArch,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RuntimeArch {
    pub library_sha256: String,
}

/// One model: what the checks need (the manifest holds more, for people and the pipeline).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    pub role: String,
    pub file: String,
    pub sha256: String,
    pub input_name: String,
    pub layout: String,
    /// `[height, width]`, or a text for dynamic sizes.
    pub size: toml::Value,
    /// `RGB` or `BGR`: the channel order the model wants.
    pub colour: String,
    /// Input = (pixel − mean) × scale, per channel in the model's order.
    pub mean: [f32; 3],
    pub scale: f32,
    #[serde(default)]
    pub output_name: Option<String>,
    #[serde(default)]
    pub output_dim: Option<usize>,
    /// Liveness models: the face box is enlarged by this about its centre before the crop.
    #[serde(default)]
    pub crop_scale: Option<f32>,
}

impl ModelEntry {
    /// The fixed input size, if the manifest gives one.
    pub fn fixed_size(&self) -> Option<(i64, i64)> {
        let a = self.size.as_array()?;
        Some((a.first()?.as_integer()?, a.get(1)?.as_integer()?))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the model manifest is invalid: {0}")]
    Manifest(String),
    #[error("face.onnxruntime_library {path}: {why}")]
    Library { path: PathBuf, why: String },
    #[error("model {name} ({path}): {why}")]
    Model { name: String, path: PathBuf, why: String },
}

impl RuntimeError {
    /// What an installer should do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            RuntimeError::Manifest(_) => "reinstall the package (the manifest ships with it)",
            RuntimeError::Library { .. } => {
                "run scripts/setup-runtime.sh (it installs the pinned ONNX Runtime 1.31.1) and point face.onnxruntime_library at it"
            }
            RuntimeError::Model { .. } => {
                "run scripts/setup-runtime.sh to install the models with checked sha256, and point face.models_dir at them"
            }
        }
    }
}

pub fn manifest() -> Result<Manifest, RuntimeError> {
    toml::from_str(MANIFEST).map_err(|e| RuntimeError::Manifest(e.to_string()))
}

/// The SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::digest::hex(&h.finalize()))
}

/// The library's expected sha256 on this machine's architecture.
fn expected_library_sha(m: &Manifest) -> Option<&str> {
    match std::env::consts::ARCH {
        "x86_64" => Some(&m.runtime.x86_64.library_sha256),
        "aarch64" => Some(&m.runtime.aarch64.library_sha256),
        _ => None,
    }
}

/// Check the library file against the manifest (exists, pinned sha256), without loading it.
pub fn check_library(path: &Path, m: &Manifest) -> Result<(), RuntimeError> {
    let err = |why: String| RuntimeError::Library { path: path.to_path_buf(), why };
    let sha = sha256_file(path).map_err(|e| err(e.to_string()))?;
    match expected_library_sha(m) {
        Some(want) if want == sha => Ok(()),
        Some(want) => Err(err(format!(
            "sha256 {sha} is not the pinned ONNX Runtime {} ({want}); another version could crash the daemon",
            m.runtime.version
        ))),
        None => Err(err(format!("no pinned ONNX Runtime for {}", std::env::consts::ARCH))),
    }
}

/// Check every model file's sha256.
pub fn check_models(dir: &Path, m: &Manifest) -> Result<Vec<(ModelEntry, PathBuf)>, RuntimeError> {
    let mut out = Vec::new();
    for e in &m.models {
        let path = dir.join(&e.file);
        let err = |why: String| RuntimeError::Model { name: e.name.clone(), path: path.clone(), why };
        let sha = sha256_file(&path).map_err(|x| err(x.to_string()))?;
        if sha != e.sha256 {
            return Err(err(format!("sha256 {sha} differs from the manifest's {}", e.sha256)));
        }
        out.push((e.clone(), path));
    }
    Ok(out)
}

/// Check a session's first input against the manifest: name, rank 4, 3 channels where the layout
/// puts them, and the fixed size if there is one (-1 in the model means dynamic).
pub fn check_input(e: &ModelEntry, name: &str, shape: &[i64]) -> Result<(), String> {
    if name != e.input_name {
        return Err(format!("input is `{name}`, the manifest says `{}`", e.input_name));
    }
    if shape.len() != 4 {
        return Err(format!("input has rank {}, expected 4 ({})", shape.len(), e.layout));
    }
    let (c, h, w) = match e.layout.as_str() {
        "NCHW" => (shape[1], shape[2], shape[3]),
        "NHWC" => (shape[3], shape[1], shape[2]),
        other => return Err(format!("unknown layout `{other}` in the manifest")),
    };
    if c != 3 {
        return Err(format!("input {shape:?} has {c} channels where {} puts them; expected 3", e.layout));
    }
    if let Some((fh, fw)) = e.fixed_size() {
        let ok = |d: i64, f: i64| d == -1 || d == f;
        if !ok(h, fh) || !ok(w, fw) {
            return Err(format!("input {shape:?} is not {fh}x{fw} ({})", e.layout));
        }
    }
    Ok(())
}

/// A loaded runtime: the environment and one session per model.
pub struct Runtime {
    pub env: ort::environment::Environment,
    pub sessions: Vec<(ModelEntry, ort::session::Session)>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("models", &self.sessions.iter().map(|(e, _)| &e.name).collect::<Vec<_>>())
            .finish()
    }
}

/// ONNX Runtime allows one environment per process, for the life of the process: the first load
/// makes it, later loads (several engines, a reload) share it. A second library path is refused.
static ENV: std::sync::Mutex<Option<(PathBuf, ort::environment::Environment)>> = std::sync::Mutex::new(None);

fn environment(lib: &Path) -> Result<ort::environment::Environment, RuntimeError> {
    let lib_err = |why: String| RuntimeError::Library { path: lib.to_path_buf(), why };
    let mut slot = ENV.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((path, env)) = slot.as_ref() {
        if path.as_path() == lib {
            return Ok(env.clone());
        }
        return Err(lib_err(format!("ONNX Runtime is already loaded from {} in this process", path.display())));
    }
    let env = ort::init_from(lib)
        .map_err(|e| lib_err(e.to_string()))?
        .with_name("menshen")
        .build()
        .map_err(|e| lib_err(e.to_string()))?;
    *slot = Some((lib.to_path_buf(), env.clone()));
    Ok(env)
}

/// The runtime paths a command-line tool uses: `MENSHEN_ORT_LIB` and `MENSHEN_MODELS_DIR` when
/// set, else the configured `face.onnxruntime_library` and `face.models_dir` (never a path
/// relative to the working directory). Also returns a line saying which paths and why, for
/// error messages.
pub fn configured_paths(cfg: &crate::config::FaceConfig) -> (crate::config::FaceConfig, String) {
    let mut out = cfg.clone();
    let mut said = Vec::new();
    for (var, key, slot) in [
        ("MENSHEN_ORT_LIB", "face.onnxruntime_library", &mut out.onnxruntime_library),
        ("MENSHEN_MODELS_DIR", "face.models_dir", &mut out.models_dir),
    ] {
        match std::env::var_os(var) {
            Some(v) => {
                *slot = std::path::PathBuf::from(v);
                said.push(format!("{} (from {var}, which overrides {key})", slot.display()));
            }
            None => said.push(format!("{} (from {key}; {var} overrides it)", slot.display())),
        }
    }
    (out, format!("tried {}", said.join(" and ")))
}

/// Check and load everything: the library (sha256, then `ort::init_from`), each model (sha256,
/// session with the configured threads, input shape).
pub fn load(cfg: &FaceConfig) -> Result<Runtime, RuntimeError> {
    let m = manifest()?;
    let lib = &cfg.onnxruntime_library;
    check_library(lib, &m)?;
    let models = check_models(&cfg.models_dir, &m)?;
    let env = environment(lib)?;
    let mut sessions = Vec::new();
    for (e, path) in models {
        let err = |why: String| RuntimeError::Model { name: e.name.clone(), path: path.clone(), why };
        let session = ort::session::Session::builder(&env)
            .map_err(|x| err(x.to_string()))?
            .with_intra_threads(cfg.threads)
            .map_err(|x| err(x.to_string()))?
            .with_inter_threads(1)
            .map_err(|x| err(x.to_string()))?
            .commit_from_file(&path)
            .map_err(|x| err(x.to_string()))?;
        let input = session.inputs().first().ok_or_else(|| err("the model has no input".into()))?;
        let shape: Vec<i64> = input.dtype().tensor_shape().map(|s| s.iter().copied().collect()).unwrap_or_default();
        check_input(&e, input.name(), &shape).map_err(err)?;
        sessions.push((e, session));
    }
    Ok(Runtime { env, sessions })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_manifest_parses_and_names_every_role() {
        let m = manifest().unwrap();
        let roles: Vec<&str> = m.models.iter().map(|e| e.role.as_str()).collect();
        for r in ["detector", "embedder", "liveness"] {
            assert!(roles.contains(&r), "{roles:?}");
        }
        assert_eq!(m.runtime.version, "1.31.1");
        assert!(m.models.iter().all(|e| e.sha256.len() == 64));
    }

    #[test]
    fn input_checks_follow_the_layout() {
        let m = manifest().unwrap();
        let emb = m.models.iter().find(|e| e.role == "embedder").unwrap();
        assert!(check_input(emb, "input", &[-1, 112, 112, 3]).is_ok());
        assert!(check_input(emb, "input", &[-1, 3, 112, 112]).is_err(), "NCHW where NHWC is expected");
        assert!(check_input(emb, "data", &[-1, 112, 112, 3]).is_err());
        assert!(check_input(emb, "input", &[-1, 96, 112, 3]).is_err());
        let det = m.models.iter().find(|e| e.role == "detector").unwrap();
        assert!(check_input(det, "input", &[1, 3, -1, -1]).is_ok(), "dynamic size");
    }

    #[test]
    fn a_wrong_library_is_refused_before_it_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libonnxruntime.so.1.31.1");
        std::fs::write(&fake, b"not a library").unwrap();
        let m = manifest().unwrap();
        let e = check_library(&fake, &m).unwrap_err();
        assert!(e.to_string().contains("not the pinned ONNX Runtime"), "{e}");
        let missing = check_library(&dir.path().join("nope.so"), &m).unwrap_err();
        assert!(missing.to_string().contains("face.onnxruntime_library"), "{missing}");
    }
}
