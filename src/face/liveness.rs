//! MiniFASNet anti-spoofing: the crop rule of Silent-Face-Anti-Spoofing (`CropImage._get_new_box`)
//! and the ensemble (softmax of each model, averaged; class 1 is real). Pure.

/// The crop for one model: the face box enlarged by `scale` about its centre (the scale is
/// reduced if the frame is too small), shifted back inside the frame. Inclusive pixel bounds.
pub fn crop_box(frame_w: u32, frame_h: u32, bbox: [f32; 4], scale: f32) -> (u32, u32, u32, u32) {
    let (x, y) = (bbox[0], bbox[1]);
    let (bw, bh) = ((bbox[2] - bbox[0]).max(1.0), (bbox[3] - bbox[1]).max(1.0));
    let (sw, sh) = (frame_w as f32, frame_h as f32);
    let scale = scale.min((sh - 1.0) / bh).min((sw - 1.0) / bw);
    let (nw, nh) = (bw * scale, bh * scale);
    let (cx, cy) = (bw / 2.0 + x, bh / 2.0 + y);
    let (mut x0, mut y0, mut x1, mut y1) = (cx - nw / 2.0, cy - nh / 2.0, cx + nw / 2.0, cy + nh / 2.0);
    if x0 < 0.0 {
        x1 -= x0;
        x0 = 0.0;
    }
    if y0 < 0.0 {
        y1 -= y0;
        y0 = 0.0;
    }
    if x1 > sw - 1.0 {
        x0 -= x1 - sw + 1.0;
        x1 = sw - 1.0;
    }
    if y1 > sh - 1.0 {
        y0 -= y1 - sh + 1.0;
        y1 = sh - 1.0;
    }
    let c = |v: f32, max: f32| v.clamp(0.0, max) as u32;
    (c(x0, sw - 1.0), c(y0, sh - 1.0), c(x1, sw - 1.0), c(y1, sh - 1.0))
}

/// Softmax of 3 logits; `None` if they are not finite.
pub fn softmax3(l: &[f32]) -> Option<[f32; 3]> {
    if l.len() != 3 || !l.iter().all(|v| v.is_finite()) {
        return None;
    }
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e = [(l[0] - m).exp(), (l[1] - m).exp(), (l[2] - m).exp()];
    let s = e[0] + e[1] + e[2];
    Some([e[0] / s, e[1] / s, e[2] / s])
}

/// The ensemble's probability that the face is real: the mean of each model's class-1 softmax.
pub fn real_probability(per_model_logits: &[Vec<f32>]) -> Option<f32> {
    let probs: Option<Vec<f32>> = per_model_logits.iter().map(|l| softmax3(l).map(|p| p[1])).collect();
    let probs = probs?;
    if probs.is_empty() {
        return None;
    }
    Some(probs.iter().sum::<f32>() / probs.len() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_is_centred_and_shifted_inside() {
        // A 100x100 face at the centre of 640x480, x2.7: 270x270 about (320, 240).
        assert_eq!(crop_box(640, 480, [270.0, 190.0, 370.0, 290.0], 2.7), (185, 105, 455, 375));
        // Near the left edge: shifted right, same size.
        let (x0, _, x1, _) = crop_box(640, 480, [0.0, 190.0, 100.0, 290.0], 2.7);
        assert_eq!((x0, x1), (0, 270));
        // Scale capped by the frame height: (480-1)/200 < 4.
        let (_, y0, _, y1) = crop_box(640, 480, [220.0, 140.0, 420.0, 340.0], 4.0);
        assert_eq!((y0, y1), (0, 479));
    }

    #[test]
    fn ensemble_averages_the_real_class() {
        let p = real_probability(&[vec![0.0, 10.0, 0.0], vec![0.0, 0.0, 0.0]]).unwrap();
        assert!((p - (0.99991 + 1.0 / 3.0) / 2.0).abs() < 1e-3, "{p}");
        assert_eq!(real_probability(&[vec![f32::NAN, 0.0, 0.0]]), None);
        assert_eq!(real_probability(&[]), None);
    }
}
