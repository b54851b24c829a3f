//! YuNet post-processing: letterbox geometry, decoding of the per-stride outputs, NMS.
//! Pure: exactly the decoding of `../shared/models/README.md` (and `facelib.py`), no I/O.

/// A detected face in frame coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Face {
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Right eye (image left), left eye, nose tip, right mouth corner, left mouth corner.
    pub landmarks: [[f32; 2]; 5],
}

impl Face {
    pub fn width(&self) -> f32 {
        self.bbox[2] - self.bbox[0]
    }
    pub fn height(&self) -> f32 {
        self.bbox[3] - self.bbox[1]
    }
    pub fn area(&self) -> f32 {
        self.width().max(0.0) * self.height().max(0.0)
    }
    pub fn contains(&self, x: f32, y: f32) -> bool {
        x >= self.bbox[0] && x <= self.bbox[2] && y >= self.bbox[1] && y <= self.bbox[3]
    }
}

/// Where a frame goes in the detector's input: resized by `scale` to `resized`, top-left
/// anchored in a zero canvas of `input` (both multiples of 32).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    pub input: (u32, u32),
    pub resized: (u32, u32),
    pub scale: f32,
}

fn up32(v: u32) -> u32 {
    v.div_ceil(32).max(1) * 32
}

/// The letterbox for a `w`×`h` frame whose long side becomes `long_side` (e.g. 640×480 with 320
/// becomes 320×240 in a 320×256 input).
pub fn letterbox(w: u32, h: u32, long_side: u32) -> Letterbox {
    let s = long_side as f32 / w.max(h).max(1) as f32;
    let resized = (((w as f32 * s).round() as u32).max(1), ((h as f32 * s).round() as u32).max(1));
    Letterbox { input: (up32(resized.0), up32(resized.1)), resized, scale: s }
}

/// The four outputs of one stride, as flat slices of `N` anchors (row-major over the cells).
#[derive(Debug, Clone, Copy)]
pub struct StrideOut<'a> {
    pub stride: u32,
    pub cls: &'a [f32],
    pub obj: &'a [f32],
    pub bbox: &'a [f32],
    pub kps: &'a [f32],
}

/// Decode all strides (input width `input_w`), keep score > `score_thr`, map back to the frame
/// through `scale`, then NMS at `nms_iou`. Malformed outputs (lengths that do not agree) give no
/// faces rather than a panic.
pub fn decode(outs: &[StrideOut<'_>], input_w: u32, scale: f32, score_thr: f32, nms_iou: f32) -> Vec<Face> {
    let mut faces = Vec::new();
    for o in outs {
        let n = o.cls.len();
        if o.obj.len() != n || o.bbox.len() != n * 4 || o.kps.len() != n * 10 || o.stride == 0 {
            continue;
        }
        let cols = (input_w / o.stride).max(1) as usize;
        let st = o.stride as f32;
        for i in 0..n {
            let score = (o.cls[i].clamp(0.0, 1.0) * o.obj[i].clamp(0.0, 1.0)).sqrt();
            if score <= score_thr || !score.is_finite() {
                continue;
            }
            let (r, c) = ((i / cols) as f32, (i % cols) as f32);
            let b = &o.bbox[i * 4..i * 4 + 4];
            let (cx, cy) = ((c + b[0]) * st, (r + b[1]) * st);
            let (w, h) = (b[2].exp() * st, b[3].exp() * st);
            let k = &o.kps[i * 10..i * 10 + 10];
            let mut landmarks = [[0.0f32; 2]; 5];
            for (j, l) in landmarks.iter_mut().enumerate() {
                *l = [(k[2 * j] + c) * st / scale, (k[2 * j + 1] + r) * st / scale];
            }
            let bbox = [(cx - w / 2.0) / scale, (cy - h / 2.0) / scale, (cx + w / 2.0) / scale, (cy + h / 2.0) / scale];
            if bbox.iter().all(|v| v.is_finite()) {
                faces.push(Face { bbox, score, landmarks });
            }
        }
    }
    nms(faces, nms_iou)
}

fn iou(a: &Face, b: &Face) -> f32 {
    let w = (a.bbox[2].min(b.bbox[2]) - a.bbox[0].max(b.bbox[0])).max(0.0);
    let h = (a.bbox[3].min(b.bbox[3]) - a.bbox[1].max(b.bbox[1])).max(0.0);
    let inter = w * h;
    inter / (a.area() + b.area() - inter + 1e-9)
}

/// Greedy NMS by descending score, as `facelib.nms`.
pub fn nms(mut faces: Vec<Face>, thr: f32) -> Vec<Face> {
    faces.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut keep: Vec<Face> = Vec::new();
    for f in faces {
        if keep.iter().all(|k| iou(k, &f) <= thr) {
            keep.push(f);
        }
    }
    keep
}

/// The face to use in a frame: the largest of those whose box holds the frame centre, else the
/// largest. (A gate camera sees the person at the door in the middle; passers-by are smaller.)
pub fn primary(faces: &[Face], w: u32, h: u32) -> Option<Face> {
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let by_area = |a: &&Face, b: &&Face| a.area().total_cmp(&b.area());
    faces.iter().filter(|f| f.contains(cx, cy)).max_by(by_area).or_else(|| faces.iter().max_by(by_area)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_of_a_vga_frame() {
        let l = letterbox(640, 480, 320);
        assert_eq!(l.resized, (320, 240));
        assert_eq!(l.input, (320, 256));
        assert!((l.scale - 0.5).abs() < 1e-6);
        let sq = letterbox(250, 250, 320);
        assert_eq!(sq.input, (320, 320));
    }

    #[test]
    fn one_anchor_decodes_to_the_documented_box_and_landmarks() {
        // Input 64 wide, stride 8: 8 columns; anchor 10 is row 1, col 2.
        let n = 64;
        let mut cls = vec![0.0; n];
        let mut obj = vec![0.0; n];
        let mut bbox = vec![0.0; n * 4];
        let kps = vec![0.5; n * 10];
        cls[10] = 0.81;
        obj[10] = 1.0;
        bbox[40..44].copy_from_slice(&[0.5, 0.25, 0.0, 1.0f32.ln()]);
        let out = StrideOut { stride: 8, cls: &cls, obj: &obj, bbox: &bbox, kps: &kps };
        let faces = decode(&[out], 64, 0.5, 0.6, 0.3);
        assert_eq!(faces.len(), 1);
        let f = faces[0];
        assert!((f.score - 0.9).abs() < 1e-6);
        // centre ((2+0.5)*8, (1+0.25)*8) = (20, 10), size 8x8, then /0.5
        assert_eq!(f.bbox, [32.0, 12.0, 48.0, 28.0]);
        assert_eq!(f.landmarks[0], [(2.5 * 8.0) / 0.5, (1.5 * 8.0) / 0.5]);
        // Malformed lengths: nothing, no panic.
        let bad = StrideOut { stride: 8, cls: &cls, obj: &obj[..3], bbox: &bbox, kps: &kps };
        assert!(decode(&[bad], 64, 1.0, 0.6, 0.3).is_empty());
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let f = |x: f32, s: f32| Face { bbox: [x, 0.0, x + 10.0, 10.0], score: s, landmarks: [[0.0; 2]; 5] };
        let kept = nms(vec![f(0.0, 0.7), f(1.0, 0.9), f(50.0, 0.65)], 0.3);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].score, 0.9);
        assert_eq!(kept[1].score, 0.65);
        let p = primary(&kept, 20, 20).unwrap();
        assert_eq!(p.score, 0.9, "the box holding the centre");
    }
}
