//! The face engine: ONNX sessions for the detector, the embedder and the liveness models, and
//! the tensor plumbing around the pure stages (letterbox → YuNet → decode; align → embed;
//! crop → MiniFASNet). Sessions are created once (in [`crate::runtime::load`]); one engine runs
//! on one thread at a time (`&mut self`).
//!
//! Pre-processing follows the manifest entry of each model (layout, colour order, mean, scale,
//! size), so another embedder is a manifest entry, not code.

use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::TensorRef;

use super::align::align;
use super::detect::{self, Face, StrideOut};
use super::image::{DecodeError, Rgb};
use super::liveness;
use super::matcher::normalise;
use crate::runtime::{ModelEntry, Runtime, RuntimeError};

#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    #[error("frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("inference ({model}): {why}")]
    Inference { model: String, why: String },
}

/// Detector settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorOptions {
    /// The frame's long side is scaled to this before detection (a multiple of 32 is best).
    pub long_side: u32,
    pub score_threshold: f32,
    pub nms_iou: f32,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        DetectorOptions { long_side: 640, score_threshold: 0.6, nms_iou: 0.3 }
    }
}

/// Time spent in each stage of the last frame (for the benchmark and `health`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub detect: Duration,
    pub align: Duration,
    pub embed: Duration,
    pub liveness: Duration,
    /// Time inside ONNX Runtime (`Session::run`) for this frame, all models: the floor the
    /// pipeline's own work is measured against.
    pub inference: Duration,
}

pub struct Engine {
    detector: (ModelEntry, Session),
    embedder: (ModelEntry, Session),
    liveness: Vec<(ModelEntry, Session)>,
    pub options: DetectorOptions,
    pub times: StageTimes,
    // Kept last so the sessions are dropped before the environment.
    _env: ort::environment::Environment,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("detector", &self.detector.0.name)
            .field("embedder", &self.embedder.0.name)
            .field("liveness", &self.liveness.iter().map(|(e, _)| &e.name).collect::<Vec<_>>())
            .finish()
    }
}

fn infer_err(model: &str) -> impl Fn(ort::Error) -> FaceError + '_ {
    move |e| FaceError::Inference { model: model.to_string(), why: e.to_string() }
}

/// The model's output as f32 values: the one its manifest names, else the first.
fn output_f32(outputs: &ort::session::SessionOutputs<'_>, e: &ModelEntry, what: &str) -> Result<Vec<f32>, FaceError> {
    let out = match &e.output_name {
        Some(n) => outputs.get(n),
        None if outputs.len() > 0 => Some(&outputs[0]),
        None => None,
    }
    .ok_or_else(|| FaceError::Inference { model: e.name.clone(), why: format!("no {what} output") })?;
    Ok(out.try_extract_tensor::<f32>().map_err(infer_err(&e.name))?.1.to_vec())
}

/// Pixels → the model's input tensor (NCHW or NHWC, RGB or BGR, (x − mean) × scale).
pub fn to_tensor(img: &Rgb, e: &ModelEntry) -> Vec<f32> {
    let (w, h) = (img.width as usize, img.height as usize);
    let bgr = e.colour.eq_ignore_ascii_case("BGR");
    let order: [usize; 3] = if bgr { [2, 1, 0] } else { [0, 1, 2] };
    let mut out = vec![0.0f32; w * h * 3];
    let nchw = e.layout == "NCHW";
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for (c, &src) in order.iter().enumerate() {
            let v = (px[src] as f32 - e.mean[c]) * e.scale;
            if nchw {
                out[c * w * h + i] = v;
            } else {
                out[i * 3 + c] = v;
            }
        }
    }
    out
}

impl Engine {
    /// Take the sessions of a loaded runtime: exactly one detector and one embedder, and any
    /// liveness models.
    pub fn new(rt: Runtime, options: DetectorOptions) -> Result<Engine, RuntimeError> {
        let mut det = None;
        let mut emb = None;
        let mut live = Vec::new();
        for (e, s) in rt.sessions {
            match e.role.as_str() {
                "detector" if det.is_none() => det = Some((e, s)),
                "embedder" if emb.is_none() => emb = Some((e, s)),
                "liveness" => live.push((e, s)),
                _ => {
                    return Err(RuntimeError::Manifest(format!(
                        "model {}: unexpected or repeated role {}",
                        e.name, e.role
                    )))
                }
            }
        }
        let missing = |r: &str| RuntimeError::Manifest(format!("no {r} model in the manifest"));
        let embedder = emb.ok_or_else(|| missing("embedder"))?;
        if embedder.0.output_dim.is_none() {
            return Err(RuntimeError::Manifest(format!("embedder {} has no output_dim", embedder.0.name)));
        }
        Ok(Engine {
            detector: det.ok_or_else(|| missing("detector"))?,
            embedder,
            liveness: live,
            options,
            times: StageTimes::default(),
            _env: rt.env,
        })
    }

    /// The embedding's dimension (from the manifest).
    pub fn dim(&self) -> usize {
        self.embedder.0.output_dim.unwrap_or(0)
    }

    /// Detect faces (boxes and landmarks in frame coordinates), best first.
    pub fn detect(&mut self, frame: &Rgb) -> Result<Vec<Face>, FaceError> {
        let t0 = Instant::now();
        let lb = detect::letterbox(frame.width, frame.height, self.options.long_side);
        let resized = frame.resize(lb.resized.0, lb.resized.1);
        let (iw, ih) = (lb.input.0 as usize, lb.input.1 as usize);
        let (rw, rh) = (lb.resized.0 as usize, lb.resized.1 as usize);
        let (e, session) = &mut self.detector;
        let bgr = e.colour.eq_ignore_ascii_case("BGR");
        let mut input = vec![0.0f32; 3 * iw * ih];
        let (plane, rest) = input.split_at_mut(iw * ih);
        let (plane1, plane2) = rest.split_at_mut(iw * ih);
        let order: [usize; 3] = if bgr { [2, 1, 0] } else { [0, 1, 2] };
        let (m, sc) = (e.mean, e.scale);
        for y in 0..rh.min(ih) {
            let src = &resized.data[y * rw * 3..(y + 1) * rw * 3];
            let o = y * iw;
            for (x, p) in src.chunks_exact(3).take(iw).enumerate() {
                plane[o + x] = (p[order[0]] as f32 - m[0]) * sc;
                plane1[o + x] = (p[order[1]] as f32 - m[1]) * sc;
                plane2[o + x] = (p[order[2]] as f32 - m[2]) * sc;
            }
        }
        let name = e.name.clone();
        let tensor = TensorRef::from_array_view(([1usize, 3, ih, iw], &*input)).map_err(infer_err(&name))?;
        let ti = Instant::now();
        let outputs = session.run(ort::inputs![tensor]).map_err(infer_err(&name))?;
        self.times.inference = ti.elapsed();
        let get = |k: String| -> Result<&[f32], FaceError> {
            let v = outputs
                .get(&k)
                .ok_or_else(|| FaceError::Inference { model: name.clone(), why: format!("no output {k}") })?;
            v.try_extract_tensor::<f32>().map(|(_, d)| d).map_err(infer_err(&name))
        };
        let mut strides = Vec::new();
        for s in [8u32, 16, 32] {
            strides.push(StrideOut {
                stride: s,
                cls: get(format!("cls_{s}"))?,
                obj: get(format!("obj_{s}"))?,
                bbox: get(format!("bbox_{s}"))?,
                kps: get(format!("kps_{s}"))?,
            });
        }
        let faces = detect::decode(&strides, lb.input.0, lb.scale, self.options.score_threshold, self.options.nms_iou);
        self.times.detect = t0.elapsed();
        Ok(faces)
    }

    /// Align a detected face onto the embedder's template size.
    pub fn align(&mut self, frame: &Rgb, face: &Face) -> Rgb {
        let t0 = Instant::now();
        let size = self.embedder.0.fixed_size().map_or(112, |(h, _)| h as u32);
        let out = align(frame, &face.landmarks, size);
        self.times.align = t0.elapsed();
        out
    }

    /// The L2-normalised embedding of an aligned face.
    pub fn embed_aligned(&mut self, aligned: &Rgb) -> Result<Vec<f32>, FaceError> {
        let t0 = Instant::now();
        let (e, session) = &mut self.embedder;
        let name = e.name.clone();
        let input = to_tensor(aligned, e);
        let (w, h) = (aligned.width as usize, aligned.height as usize);
        let shape = if e.layout == "NCHW" { [1usize, 3, h, w] } else { [1usize, h, w, 3] };
        let tensor = TensorRef::from_array_view((shape, &*input)).map_err(infer_err(&name))?;
        let ti = Instant::now();
        let outputs = session.run(ort::inputs![tensor]).map_err(infer_err(&name))?;
        self.times.inference += ti.elapsed();
        let mut v = output_f32(&outputs, e, "embedding")?;
        if Some(v.len()) != e.output_dim || !normalise(&mut v) {
            return Err(FaceError::Inference {
                model: name,
                why: format!("embedding of {} values is unusable", v.len()),
            });
        }
        self.times.embed = t0.elapsed();
        Ok(v)
    }

    /// The ensemble's probability that this face is real (`None` without liveness models).
    pub fn liveness(&mut self, frame: &Rgb, face: &Face) -> Result<Option<f32>, FaceError> {
        if self.liveness.is_empty() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let mut logits = Vec::new();
        for (e, session) in &mut self.liveness {
            let name = e.name.clone();
            let (h, w) = e.fixed_size().unwrap_or((80, 80));
            let (x0, y0, x1, y1) =
                liveness::crop_box(frame.width, frame.height, face.bbox, e.crop_scale.unwrap_or(1.0));
            let crop = frame.crop(x0, y0, x1, y1).resize(w as u32, h as u32);
            let input = to_tensor(&crop, e);
            let tensor =
                TensorRef::from_array_view(([1usize, 3, h as usize, w as usize], &*input)).map_err(infer_err(&name))?;
            let ti = Instant::now();
            let outputs = session.run(ort::inputs![tensor]).map_err(infer_err(&name))?;
            self.times.inference += ti.elapsed();
            logits.push(output_f32(&outputs, e, "logits")?);
        }
        self.times.liveness = t0.elapsed();
        Ok(liveness::real_probability(&logits))
    }
}
