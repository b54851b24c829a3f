//! Face alignment: the 5-point similarity transform (Umeyama least squares, no reflection) onto
//! the ArcFace 112×112 template, as `facelib.align`. Pure.

use super::image::Rgb;

/// The ArcFace 112×112 landmark template (insightface `norm_crop`).
pub const ARCFACE_112: [[f64; 2]; 5] =
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]];

/// The least-squares similarity transform (rotation, uniform scale, translation) taking `src` to
/// `dst`, as a 2×3 matrix. In 2-D Umeyama's solution without reflection has this closed form:
/// with centred points, `a = Σ(x·u + y·v)/Σ|p|²`, `b = Σ(x·v − y·u)/Σ|p|²`, `M = [[a, −b], [b, a]]`.
pub fn similarity(src: &[[f64; 2]; 5], dst: &[[f64; 2]; 5]) -> [[f64; 3]; 2] {
    let n = src.len() as f64;
    let mean = |p: &[[f64; 2]; 5]| {
        let (x, y) = p.iter().fold((0.0, 0.0), |(x, y), q| (x + q[0], y + q[1]));
        (x / n, y / n)
    };
    let (msx, msy) = mean(src);
    let (mdx, mdy) = mean(dst);
    let (mut num_a, mut num_b, mut den) = (0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(dst) {
        let (x, y) = (s[0] - msx, s[1] - msy);
        let (u, v) = (d[0] - mdx, d[1] - mdy);
        num_a += x * u + y * v;
        num_b += x * v - y * u;
        den += x * x + y * y;
    }
    if den < 1e-12 {
        return [[1.0, 0.0, mdx - msx], [0.0, 1.0, mdy - msy]];
    }
    let (a, b) = (num_a / den, num_b / den);
    [[a, -b, mdx - (a * msx - b * msy)], [b, a, mdy - (b * msx + a * msy)]]
}

/// Warp the face with these landmarks onto the `size`×`size` template (bilinear, black border).
pub fn align(frame: &Rgb, landmarks: &[[f32; 2]; 5], size: u32) -> Rgb {
    let k = size as f64 / 112.0;
    let dst = ARCFACE_112.map(|p| [p[0] * k, p[1] * k]);
    let src = landmarks.map(|p| [p[0] as f64, p[1] as f64]);
    frame.warp_affine(&similarity(&src, &dst), size, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(m: &[[f64; 3]; 2], p: [f64; 2]) -> [f64; 2] {
        [m[0][0] * p[0] + m[0][1] * p[1] + m[0][2], m[1][0] * p[0] + m[1][1] * p[1] + m[1][2]]
    }

    #[test]
    fn recovers_a_known_similarity_exactly() {
        let (s, th, tx, ty) = (1.7f64, 0.3f64, 12.0, -4.0);
        let m = [[s * th.cos(), -s * th.sin(), tx], [s * th.sin(), s * th.cos(), ty]];
        let src = ARCFACE_112;
        let dst = src.map(|p| apply(&m, p));
        let got = similarity(&src, &dst);
        for r in 0..2 {
            for c in 0..3 {
                assert!((got[r][c] - m[r][c]).abs() < 1e-9, "{got:?} vs {m:?}");
            }
        }
    }

    #[test]
    fn never_reflects() {
        // A mirrored set: the best proper similarity has a positive determinant.
        let src = ARCFACE_112;
        let dst = src.map(|p| [112.0 - p[0], p[1]]);
        let m = similarity(&src, &dst);
        assert!(m[0][0] * m[1][1] - m[0][1] * m[1][0] >= 0.0);
    }
}
