//! The face path on real models and real faces: the Rust pipeline agrees with the Python
//! reference (`scripts/face_reference.py`, built on `../shared/models/reference/facelib.py`,
//! run here at test time), and liveness tells the Silent-Face samples apart.
//!
//! Needs the ONNX Runtime library (scripts/setup-runtime.sh), the models (`MENSHEN_MODELS_DIR` or
//! ../shared/models) and the reference venv (scripts/setup-pyref.sh); scripts/test.sh sets all up.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use menshen::config::FaceConfig;
use menshen::face::detect::primary;
use menshen::face::engine::{DetectorOptions, Engine};
use menshen::face::image::Rgb;
use menshen::face::matcher::cosine;
use menshen::face::tools;

fn engine() -> Engine {
    let cfg = tools::locate(&FaceConfig::default());
    tools::engine(&cfg, DetectorOptions::default())
        .expect("face runtime (run scripts/setup-runtime.sh --dest target/menshen-runtime)")
}

fn smoke_dir() -> PathBuf {
    let models = tools::locate(&FaceConfig::default()).models_dir;
    std::env::var_os("MENSHEN_DATA_DIR")
        .map(|d| PathBuf::from(d).join("smoke"))
        .unwrap_or_else(|| models.join("../data/smoke"))
}

fn smoke_images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(smoke_dir())
        .expect("smoke images (../shared/data/smoke)")
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("jpg" | "png")))
        .collect();
    v.sort();
    assert!(v.len() >= 5, "{v:?}");
    v
}

fn python() -> PathBuf {
    std::env::var_os("MENSHEN_PYREF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyref/bin/python"))
}

fn reference(images: &[PathBuf]) -> Vec<serde_json::Value> {
    let py = python();
    assert!(py.exists(), "{} missing: run scripts/setup-pyref.sh", py.display());
    let cfg = tools::locate(&FaceConfig::default());
    let out = Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/face_reference.py"))
        .arg("run")
        .args(images)
        .env("MENSHEN_MODELS_DIR", &cfg.models_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "reference failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn rust_pipeline_agrees_with_the_python_reference_on_the_smoke_images() {
    let images = smoke_images();
    let refs = reference(&images);
    let mut eng = engine();
    let mut compared = 0;
    for (path, r) in images.iter().zip(&refs) {
        let frame = Rgb::decode(&std::fs::read(path).unwrap()).unwrap();
        let faces = eng.detect(&frame).unwrap();
        let rboxes = r["boxes"].as_array().unwrap();
        assert_eq!(faces.len(), rboxes.len(), "{}: face count", path.display());
        for (f, rb) in faces.iter().zip(rboxes) {
            let rb = f32s(rb);
            for k in 0..4 {
                assert!((f.bbox[k] - rb[k]).abs() <= 2.0, "{}: box {:?} vs reference {rb:?}", path.display(), f.bbox);
            }
        }
        let face = primary(&faces, frame.width, frame.height).expect("a face in every smoke image");
        let aligned = eng.align(&frame, &face);
        let emb = eng.embed_aligned(&aligned).unwrap();
        let remb = f32s(&r["embedding"]);
        let cos = cosine(&emb, &remb);
        assert!(cos >= 0.999, "{}: embedding cosine {cos} < 0.999", path.display());
        let live = eng.liveness(&frame, &face).unwrap().unwrap();
        let rlive = r["real_probability"].as_f64().unwrap() as f32;
        assert!((live - rlive).abs() < 0.05, "{}: liveness {live} vs reference {rlive}", path.display());
        eprintln!("{}: cosine {cos:.5}, liveness {live:.3} (reference {rlive:.3})", path.display());
        compared += 1;
    }
    assert_eq!(compared, images.len());
}

#[test]
fn liveness_ensemble_refuses_the_spoof_samples() {
    let mut eng = engine();
    let dir = smoke_dir();
    let mut p = |name: &str| {
        let frame = Rgb::decode(&std::fs::read(dir.join(name)).unwrap()).unwrap();
        let faces = eng.detect(&frame).unwrap();
        let face = primary(&faces, frame.width, frame.height).unwrap();
        eng.liveness(&frame, &face).unwrap().unwrap()
    };
    let (t1, f1, f2) = (p("silentface_image_T1.jpg"), p("silentface_image_F1.jpg"), p("silentface_image_F2.jpg"));
    // Models README: T1 real 1.00, F1 0.23, F2 0.002. The default gate is 0.5.
    assert!(t1 > 0.9, "T1 (real) {t1}");
    assert!(f1 < 0.5, "F1 (spoof) {f1}");
    assert!(f2 < 0.1, "F2 (spoof) {f2}");
}

#[test]
fn the_same_person_matches_and_others_do_not() {
    // Two photos of one person (smoke and LFW) against the smoke faces of others.
    let mut eng = engine();
    let models = tools::locate(&FaceConfig::default()).models_dir;
    let lfw = std::env::var_os("MENSHEN_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| models.join("../data"))
        .join("lfw/images_deepfunneled");
    let mut e = |p: PathBuf| tools::embed_file(&mut eng, &p).unwrap().expect("a face").1;
    let a1 = e(smoke_dir().join("George_W_Bush_0001.jpg"));
    let a2 = e(lfw.join("George_W_Bush/George_W_Bush_0007.jpg"));
    let b = e(smoke_dir().join("astronaut.png"));
    let c = e(smoke_dir().join("silentface_image_T1.jpg"));
    let same = cosine(&a1, &a2);
    assert!(same > 0.53, "same person {same}");
    for other in [&b, &c] {
        let s = cosine(&a1, other);
        assert!(s < 0.53, "different people {s}");
    }
}

#[test]
fn corrupt_frames_are_errors_not_panics() {
    let jpeg = std::fs::read(smoke_dir().join("silentface_image_T1.jpg")).unwrap();
    for cut in [10, jpeg.len() / 3, jpeg.len() - 50, jpeg.len() - 1] {
        assert!(Rgb::decode(&jpeg[..cut]).is_err(), "a JPEG cut at {cut} of {} is refused", jpeg.len());
    }
    assert!(Rgb::decode(&jpeg).is_ok());
}
