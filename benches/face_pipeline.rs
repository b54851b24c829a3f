//! Face path benchmark (a bench binary that prints figures; `cargo bench --bench face_pipeline`).
//!
//! - Per-stage times (decode, detect, align, embed, liveness, match) and frame → decision latency
//!   on 640×480 JPEG frames with one inference thread, and, in the same run on the same frames,
//!   the Python reference pipeline (numpy + OpenCV + onnxruntime from PyPI, same models;
//!   `scripts/face_reference.py bench`): the end-to-end ratio and the overhead over raw model
//!   inference.
//! - 1:N search at 50,000 templates: 4-bit scan + exact re-rank vs the exact f32 scan, with
//!   top-1 agreement.
//! - Memory: RSS with the models loaded and 50,000 templates enrolled.
//!
//! Frames: LFW faces (1.5×) on a 640×480 grey canvas, JPEG-encoded once into a temp dir that both
//! pipelines read. Environment: FACE_BENCH_FRAMES (200), MENSHEN_PYREF_PYTHON (target/pyref).

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a panic is a failed run

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use menshen::config::FaceConfig;
use menshen::face::detect::primary;
use menshen::face::engine::DetectorOptions;
use menshen::face::image::Rgb;
use menshen::face::matcher::{normalise, Gallery, SHORTLIST};
use menshen::face::tools;
use rand::{Rng, SeedableRng};

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn med(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
fn p95(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 95 / 100).min(v.len() - 1)]
}

fn make_frames(lfw: &Path, dir: &Path, n: usize) -> Vec<PathBuf> {
    let mut people: Vec<PathBuf> = std::fs::read_dir(lfw).unwrap().map(|e| e.unwrap().path()).collect();
    people.sort();
    let mut out = Vec::new();
    for (i, p) in people.iter().take(n).enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let face = image::open(&files[0]).unwrap().to_rgb8();
        let face = image::imageops::resize(&face, 375, 375, image::imageops::FilterType::Triangle);
        let mut canvas = image::RgbImage::from_pixel(640, 480, image::Rgb([118, 118, 118]));
        image::imageops::overlay(&mut canvas, &face, 132, 52);
        let path = dir.join(format!("frame{i:02}.jpg"));
        canvas.save(&path).unwrap();
        out.push(path);
    }
    out
}

fn main() {
    let frames_n: usize = std::env::var("FACE_BENCH_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let cfg = tools::locate(&FaceConfig::default());
    let data =
        std::env::var_os("MENSHEN_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| cfg.models_dir.join("../data"));
    let tmp = tempfile::tempdir().unwrap();
    let files = make_frames(&data.join("lfw/images_deepfunneled"), tmp.path(), 20);
    let blobs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();

    let rss0 = rss_mib();
    let mut eng = tools::engine(&cfg, DetectorOptions::default()).expect("face runtime");
    let rss_models = rss_mib();
    let dim = eng.dim();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut gallery = Gallery::new(dim);
    let mut kept = Vec::new();
    for i in 0..50_000 {
        let mut t: Vec<f32> = (0..dim).map(|_| rng.gen::<f32>() - 0.5).collect();
        normalise(&mut t);
        gallery.add(&format!("resident-{i:05}"), &t).unwrap();
        if i % 250 == 0 {
            kept.push(t);
        }
    }
    let rss_gallery = rss_mib();

    // Warm-up, then timed frames.
    let names = ["decode", "detect", "align", "embed", "liveness", "match", "total", "inference"];
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for n in 0..frames_n + 10 {
        let t0 = Instant::now();
        let frame = Rgb::decode(&blobs[n % blobs.len()]).unwrap();
        let t1 = Instant::now();
        let faces = eng.detect(&frame).unwrap();
        let t2 = Instant::now();
        let Some(face) = primary(&faces, frame.width, frame.height) else { panic!("no face in bench frame {n}") };
        let aligned = eng.align(&frame, &face);
        let t3 = Instant::now();
        let emb = eng.embed_aligned(&aligned).unwrap();
        let t4 = Instant::now();
        let _live = eng.liveness(&frame, &face).unwrap();
        let t5 = Instant::now();
        let _hit = gallery.identify(&emb, 0.53, 0.05, SHORTLIST);
        let t6 = Instant::now();
        if n >= 10 {
            for (k, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0, eng.times.inference]
                .into_iter()
                .enumerate()
            {
                t[k].push(ms(d));
            }
        }
    }
    let rust: Vec<(f64, f64)> = t.iter_mut().map(|v| (med(v), p95(v))).collect();

    // The Python reference on the same frames, same models, one thread.
    let py = std::env::var_os("MENSHEN_PYREF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyref/bin/python"));
    let out = std::process::Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/face_reference.py"))
        .args(["bench", "--frames", &frames_n.to_string()])
        .args(&files)
        .env("MENSHEN_MODELS_DIR", &cfg.models_dir)
        .env("OMP_NUM_THREADS", "1")
        .output();
    let pyj: Option<serde_json::Value> = match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
        Ok(o) => {
            eprintln!("python reference failed: {}", String::from_utf8_lossy(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("python reference not run ({}): {e}; run scripts/setup-pyref.sh", py.display());
            None
        }
    };

    println!("face pipeline, 640x480 JPEG frames, one inference thread, {frames_n} frames (median / p95 ms)");
    println!("{:<10} {:>16} {:>16} {:>8}", "stage", "rust", "python", "speed-up");
    for (k, name) in names.iter().enumerate().take(7) {
        let p = pyj
            .as_ref()
            .and_then(|j| j.get(*name))
            .map(|s| (s["median_ms"].as_f64().unwrap_or(0.0), s["p95_ms"].as_f64().unwrap_or(0.0)));
        let (rm, rp) = rust[k];
        match p {
            Some((pm, pp)) => println!("{name:<10} {rm:>7.2} / {rp:>6.2} {pm:>7.2} / {pp:>6.2} {:>7.2}x", pm / rm),
            None => println!("{name:<10} {rm:>7.2} / {rp:>6.2} {:>16}", "-"),
        }
    }
    let (total, inference) = (rust[6].0, rust[7].0);
    println!(
        "rust: frame -> decision {total:.2} ms, of which ONNX Runtime {inference:.2} ms: overhead over raw inference {:.1} %",
        (total - inference) / inference * 100.0
    );
    if let Some(pm) = pyj.as_ref().and_then(|j| j["total"]["median_ms"].as_f64()) {
        println!("end to end: python {pm:.2} ms / rust {total:.2} ms = {:.2}x", pm / total);
    }

    // 1:N search at 50,000 templates.
    let mut probes: Vec<Vec<f32>> = Vec::new();
    for b in &kept {
        let mut p: Vec<f32> = b.iter().map(|x| x + 0.06 * (rng.gen::<f32>() - 0.5)).collect();
        normalise(&mut p);
        probes.push(p);
    }
    for _ in 0..100 {
        let mut p: Vec<f32> = (0..dim).map(|_| rng.gen::<f32>() - 0.5).collect();
        normalise(&mut p);
        probes.push(p);
    }
    let (mut fast, mut exact, mut agree) = (Vec::new(), Vec::new(), 0);
    for p in &probes {
        let a = Instant::now();
        let f = gallery.search(p, SHORTLIST).unwrap();
        let b = Instant::now();
        let e = gallery.search_exact(p).unwrap();
        let c = Instant::now();
        fast.push(ms(b - a));
        exact.push(ms(c - b));
        agree += usize::from(f.best.owner == e.best.owner);
    }
    println!(
        "1:N at {} templates (dim {dim}): 4-bit scan + re-rank of {SHORTLIST} {:.3} ms median ({:.3} p95), exact f32 scan {:.3} ms; same top-1 on {agree}/{} probes",
        gallery.len(),
        med(&mut fast),
        p95(&mut fast),
        med(&mut exact),
        probes.len()
    );
    println!(
        "memory: RSS {rss0:.0} MiB at start, {rss_models:.0} MiB with the models, {rss_gallery:.0} MiB with 50,000 templates (gallery {:.1} MiB)",
        gallery.bytes() as f64 / (1 << 20) as f64
    );
}
