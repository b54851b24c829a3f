//! Face tools outside the daemon: finding the runtime and models, embedding image files, and the
//! LFW evaluation (`menshen eval lfw`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::detect::{primary, Face};
use super::engine::{DetectorOptions, Engine};
use super::eval;
use super::image::Rgb;
use crate::config::FaceConfig;

/// The runtime for tools and tests: `MENSHEN_ORT_LIB` / `MENSHEN_MODELS_DIR` if set, else the
/// configured paths if they exist, else the development locations (`target/menshen-runtime`,
/// `../shared/models`).
pub fn locate(base: &FaceConfig) -> FaceConfig {
    let mut cfg = base.clone();
    let pick = |var: &str, configured: &Path, dev: &[&str]| -> PathBuf {
        if let Some(v) = std::env::var_os(var) {
            return PathBuf::from(v);
        }
        if configured.exists() {
            return configured.to_path_buf();
        }
        dev.iter().map(PathBuf::from).find(|p| p.exists()).unwrap_or_else(|| configured.to_path_buf())
    };
    cfg.onnxruntime_library =
        pick("MENSHEN_ORT_LIB", &base.onnxruntime_library, &["target/menshen-runtime/lib/libonnxruntime.so.1.31.1"]);
    cfg.models_dir =
        pick("MENSHEN_MODELS_DIR", &base.models_dir, &["../shared/models", "target/menshen-runtime/models"]);
    cfg
}

/// Load an engine for these paths.
pub fn engine(cfg: &FaceConfig, options: DetectorOptions) -> anyhow::Result<Engine> {
    let rt = crate::runtime::load(cfg).map_err(|e| anyhow::anyhow!("{e} ({})", e.hint()))?;
    Ok(Engine::new(rt, options)?)
}

/// Detect, pick the primary face, align, embed.
pub fn embed_frame(engine: &mut Engine, frame: &Rgb) -> anyhow::Result<Option<(Face, Vec<f32>)>> {
    let faces = engine.detect(frame)?;
    let Some(face) = primary(&faces, frame.width, frame.height) else { return Ok(None) };
    let aligned = engine.align(frame, &face);
    Ok(Some((face, engine.embed_aligned(&aligned)?)))
}

pub fn embed_file(engine: &mut Engine, path: &Path) -> anyhow::Result<Option<(Face, Vec<f32>)>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let frame = Rgb::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    embed_frame(engine, &frame)
}

/// A one-line progress bar on stderr (only when it is a terminal, or when asked).
struct Progress {
    total: usize,
    start: Instant,
    show: bool,
}

impl Progress {
    fn tick(&self, done: usize) {
        if !self.show || (done % 25 != 0 && done != self.total) {
            return;
        }
        let w = 30;
        let filled = done * w / self.total.max(1);
        let rate = done as f64 / self.start.elapsed().as_secs_f64().max(1e-3);
        let left = (self.total - done) as f64 / rate.max(1e-3);
        eprint!(
            "\r[{}{}] {done}/{} images, {rate:.0}/s, {left:.0} s left ",
            "#".repeat(filled),
            " ".repeat(w - filled),
            self.total
        );
        let _ = std::io::stderr().flush();
        if done == self.total {
            eprintln!();
        }
    }
}

/// The LFW report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LfwReport {
    pub images: usize,
    pub no_face: usize,
    pub pairs: usize,
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    pub fold_accuracy: Vec<f64>,
    pub all_pairs_genuine: usize,
    pub all_pairs_impostor: usize,
    pub tar_at_far_1e3: f64,
    pub threshold_far_1e3: f32,
    pub tar_at_far_1e4: f64,
    pub threshold_far_1e4: f32,
    /// 1:N on real embeddings: a gallery of each person's first image, every other image a probe.
    pub one_to_n: OneToN,
    pub seconds: f64,
    pub jobs: usize,
}

/// The fast 1:N search checked against the exact scan on real embeddings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OneToN {
    pub gallery: usize,
    pub probes: usize,
    /// Probes whose fast top-1 is the exact scan's.
    pub same_top1: usize,
    /// Probes whose decision (threshold and margin) is the one the exact scan gives.
    pub same_decision: usize,
    /// Probes whose exact runner-up (the best *other* person) is within the margin of the best,
    /// the only case where the runner-up can change a decision ...
    pub runner_up_in_margin: usize,
    /// ... and of those, the ones where the fast search found that same runner-up.
    pub same_runner_up_in_margin: usize,
    /// Closed-set rank-1 rate: the probe's own person is the best match.
    pub rank1: f64,
}

/// Gallery: the first embedding of each person; probes: every other embedding.
pub fn one_to_n(all: &[Vec<f32>], labels: &[u32], threshold: f32, margin: f32) -> OneToN {
    use super::matcher::{Identity, Search, SHORTLIST};
    let dim = all.first().map_or(0, Vec::len);
    let mut g = super::matcher::Gallery::new(dim);
    let mut seen = std::collections::HashSet::new();
    let mut probes = Vec::new();
    for (e, &l) in all.iter().zip(labels) {
        if seen.insert(l) {
            // Embeddings are already unit vectors; a failed add would only shrink the gallery.
            let _ = g.add(&l.to_string(), e);
        } else {
            probes.push((e, l));
        }
    }
    let mut o = OneToN {
        gallery: g.len(),
        probes: probes.len(),
        same_top1: 0,
        same_decision: 0,
        runner_up_in_margin: 0,
        same_runner_up_in_margin: 0,
        rank1: 0.0,
    };
    let mut right = 0;
    for (p, l) in &probes {
        let (Some(f), Some(x)) = (g.search(p, SHORTLIST), g.search_exact(p)) else { continue };
        o.same_top1 += usize::from(f.best.owner == x.best.owner);
        right += usize::from(x.best.owner == l.to_string());
        if let Some(r) = x.runner_up.as_ref().filter(|r| x.best.score - r.score < margin) {
            o.runner_up_in_margin += 1;
            o.same_runner_up_in_margin += usize::from(f.runner_up.as_ref().map(|h| &h.owner) == Some(&r.owner));
        }
        let same = match (Search::decide(Some(f), threshold, margin), Search::decide(Some(x), threshold, margin)) {
            (Identity::Match(a), Identity::Match(b)) => a.owner == b.owner,
            (Identity::Unknown { .. }, Identity::Unknown { .. }) => true,
            _ => false,
        };
        o.same_decision += usize::from(same);
    }
    o.rank1 = right as f64 / probes.len().max(1) as f64;
    o
}

/// Run the standard LFW protocol through the Rust pipeline. `data` holds `pairs.txt` and
/// `images_deepfunneled/`. Images are spread over `jobs` engines (one thread each).
pub fn eval_lfw(
    data: &Path,
    cfg: &FaceConfig,
    options: DetectorOptions,
    jobs: usize,
    progress: bool,
) -> anyhow::Result<LfwReport> {
    let t0 = Instant::now();
    let text = std::fs::read_to_string(data.join("pairs.txt"))
        .map_err(|e| anyhow::anyhow!("{}/pairs.txt: {e}", data.display()))?;
    let pairs = eval::parse_pairs(&text).map_err(|e| anyhow::anyhow!("pairs.txt: {e}"))?;
    let images = eval::images(&pairs);
    let root = data.join("images_deepfunneled");
    let jobs = jobs.clamp(1, 16);
    let bar = Progress { total: images.len(), start: Instant::now(), show: progress };
    let done = std::sync::atomic::AtomicUsize::new(0);
    let chunk = images.len().div_ceil(jobs);
    let results: Vec<anyhow::Result<Vec<Option<Vec<f32>>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = images
            .chunks(chunk.max(1))
            .map(|part| {
                let (bar, done, root) = (&bar, &done, &root);
                s.spawn(move || -> anyhow::Result<Vec<Option<Vec<f32>>>> {
                    let mut eng = engine(cfg, options)?;
                    let mut out = Vec::with_capacity(part.len());
                    for key in part {
                        let r = embed_file(&mut eng, &root.join(format!("{key}.jpg")))?;
                        out.push(r.map(|(_, e)| e));
                        bar.tick(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))).collect()
    });
    let mut embs: Vec<Option<Vec<f32>>> = Vec::with_capacity(images.len());
    for r in results {
        embs.extend(r?);
    }
    let no_face = embs.iter().filter(|e| e.is_none()).count();
    let index: std::collections::HashMap<&str, usize> =
        images.iter().enumerate().map(|(i, k)| (k.as_str(), i)).collect();
    // A pair with an image where no face was found counts as a wrong answer (score -1 for a
    // genuine pair, +1 for an impostor pair), so a detector miss cannot flatter the figure.
    let scored: Vec<(usize, f32, bool)> = pairs
        .iter()
        .map(|p| {
            let s = match (&embs[index[p.a.as_str()]], &embs[index[p.b.as_str()]]) {
                (Some(a), Some(b)) => super::matcher::cosine(a, b),
                _ if p.same => -1.0,
                _ => 1.0,
            };
            (p.fold, s, p.same)
        })
        .collect();
    let (mean, sd, folds) = eval::kfold_accuracy(&scored, 10);
    let mut ids = std::collections::HashMap::new();
    let (mut all, mut labels) = (Vec::new(), Vec::new());
    for (k, e) in images.iter().zip(&embs) {
        if let Some(e) = e {
            let person = k.split('/').next().unwrap_or(k);
            let n = ids.len() as u32;
            labels.push(*ids.entry(person.to_string()).or_insert(n));
            all.push(e.clone());
        }
    }
    let (tar3, thr3, g, imp) = eval::tar_at_far(&all, &labels, 1e-3);
    let (tar4, thr4, _, _) = eval::tar_at_far(&all, &labels, 1e-4);
    let one_to_n = one_to_n(&all, &labels, cfg.match_threshold, cfg.match_margin);
    Ok(LfwReport {
        images: images.len(),
        no_face,
        pairs: pairs.len(),
        accuracy_mean: mean,
        accuracy_std: sd,
        fold_accuracy: folds,
        all_pairs_genuine: g,
        all_pairs_impostor: imp,
        tar_at_far_1e3: tar3,
        threshold_far_1e3: thr3,
        tar_at_far_1e4: tar4,
        threshold_far_1e4: thr4,
        one_to_n,
        seconds: t0.elapsed().as_secs_f64(),
        jobs,
    })
}
