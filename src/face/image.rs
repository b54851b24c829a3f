//! Frames as the face path sees them: 8-bit RGB, row-major, and the few pixel operations the
//! models need (decode, OpenCV-compatible bilinear resize, affine warp, crop). Pure: no I/O.
//!
//! The resize and warp follow OpenCV's `INTER_LINEAR` conventions (pixel centres at +0.5,
//! edge clamping for resize, a black border for the warp), so the Rust pipeline agrees with the
//! Python reference (`facelib.py`, which uses `cv2.resize`/`cv2.warpAffine`).

/// An RGB image, 3 bytes a pixel, row-major.
#[derive(Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Rgb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rgb({}x{})", self.width, self.height)
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JPEG or PNG image")]
    UnknownFormat,
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("image {width}x{height} is outside 16x16..=8192x8192")]
    BadSize { width: u32, height: u32 },
}

/// The largest frame accepted (a bound on memory for hostile or broken input).
pub const MAX_SIDE: u32 = 8192;

impl Rgb {
    pub fn new(width: u32, height: u32) -> Rgb {
        Rgb { width, height, data: vec![0; width as usize * height as usize * 3] }
    }

    /// Decode JPEG or PNG bytes. Truncated or corrupt data is an error, never a partial frame.
    pub fn decode(bytes: &[u8]) -> Result<Rgb, DecodeError> {
        let format = image::guess_format(bytes).map_err(|_| DecodeError::UnknownFormat)?;
        if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
            return Err(DecodeError::UnknownFormat);
        }
        // A JPEG must end with its EOI marker (perhaps followed by padding): decoders fill a
        // truncated frame with grey and call it good, so a cut-off camera frame is refused here.
        // In entropy-coded data 0xFF is always stuffed, so FF D9 only appears as the marker.
        if format == image::ImageFormat::Jpeg && !bytes.windows(2).rev().take(1024).any(|w| w == [0xFF, 0xD9]) {
            return Err(DecodeError::Corrupt("truncated JPEG (no end-of-image marker)".into()));
        }
        let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(512 << 20);
        reader.limits(limits);
        // Photos (enrolment) carry an EXIF orientation; OpenCV applies it, so do we.
        use image::ImageDecoder;
        let corrupt = |e: image::ImageError| DecodeError::Corrupt(e.to_string());
        let mut decoder = reader.into_decoder().map_err(corrupt)?;
        let orientation = decoder.orientation().map_err(corrupt)?;
        let mut img = image::DynamicImage::from_decoder(decoder).map_err(corrupt)?;
        img.apply_orientation(orientation);
        let rgb = img.into_rgb8();
        let (width, height) = rgb.dimensions();
        if !(16..=MAX_SIDE).contains(&width) || !(16..=MAX_SIDE).contains(&height) {
            return Err(DecodeError::BadSize { width, height });
        }
        Ok(Rgb { width, height, data: rgb.into_raw() })
    }

    /// Raw YUYV (YUV 4:2:2, as V4L2 cameras give it) to RGB, BT.601 limited range.
    pub fn from_yuyv(width: u32, height: u32, yuyv: &[u8]) -> Result<Rgb, DecodeError> {
        let need = width as usize * height as usize * 2;
        if width % 2 != 0 || yuyv.len() < need || width < 16 || height < 16 {
            return Err(DecodeError::Corrupt(format!(
                "YUYV frame of {} bytes does not fill {width}x{height}",
                yuyv.len()
            )));
        }
        let mut out = Rgb::new(width, height);
        for (i, px) in yuyv[..need].chunks_exact(4).enumerate() {
            let (u, v) = (px[1] as f32 - 128.0, px[3] as f32 - 128.0);
            for (k, y) in [px[0], px[2]].into_iter().enumerate() {
                let c = 1.164 * (y as f32 - 16.0);
                let o = (i * 2 + k) * 3;
                out.data[o] = sat(c + 1.596 * v);
                out.data[o + 1] = sat(c - 0.392 * u - 0.813 * v);
                out.data[o + 2] = sat(c + 2.017 * u);
            }
        }
        Ok(out)
    }

    #[inline]
    fn px(&self, x: usize, y: usize, c: usize) -> f32 {
        self.data[(y * self.width as usize + x) * 3 + c] as f32
    }

    /// Bilinear resize as OpenCV's `INTER_LINEAR` (half-pixel centres, edges clamped).
    pub fn resize(&self, width: u32, height: u32) -> Rgb {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        let mut out = Rgb::new(width, height);
        if self.width == 0 || self.height == 0 || width == 0 || height == 0 {
            return out;
        }
        let taps = |d: u32, scale: f64, n: u32| -> (usize, usize, f32) {
            let f = (d as f64 + 0.5) * scale - 0.5;
            let mut i = f.floor();
            let mut w = (f - i) as f32;
            if i < 0.0 {
                i = 0.0;
                w = 0.0;
            }
            let i = i as usize;
            if i >= n as usize - 1 {
                return (n as usize - 1, n as usize - 1, 0.0);
            }
            (i, i + 1, w)
        };
        let sx = self.width as f64 / width as f64;
        let sy = self.height as f64 / height as f64;
        // Byte offsets of the two source columns and the weight, per output column.
        let xs: Vec<(usize, usize, f32)> = (0..width)
            .map(|x| {
                let (a, b, w) = taps(x, sx, self.width);
                (a * 3, b * 3, w)
            })
            .collect();
        let row = self.width as usize * 3;
        let mut top = vec![0.0f32; width as usize * 3];
        let mut bot = vec![0.0f32; width as usize * 3];
        let hinterp = |src: &[u8], dst: &mut [f32]| {
            for (d, &(a, b, w)) in dst.chunks_exact_mut(3).zip(&xs) {
                for c in 0..3 {
                    let (pa, pb) = (src[a + c] as f32, src[b + c] as f32);
                    d[c] = pa + (pb - pa) * w;
                }
            }
        };
        let mut cached = (usize::MAX, usize::MAX);
        for (y, dst) in out.data.chunks_exact_mut(width as usize * 3).enumerate() {
            let (y0, y1, wy) = taps(y as u32, sy, self.height);
            if cached != (y0, y1) {
                if cached.1 == y0 {
                    std::mem::swap(&mut top, &mut bot);
                } else {
                    hinterp(&self.data[y0 * row..(y0 + 1) * row], &mut top);
                }
                hinterp(&self.data[y1 * row..(y1 + 1) * row], &mut bot);
                cached = (y0, y1);
            }
            for ((d, &t), &b) in dst.iter_mut().zip(&top).zip(&bot) {
                *d = sat(t + (b - t) * wy);
            }
        }
        out
    }

    /// `cv2.warpAffine(img, m, (w, h), borderValue=0)`: `m` maps this image's coordinates to the
    /// output's; each output pixel samples the inverse map bilinearly, outside pixels count as black.
    pub fn warp_affine(&self, m: &[[f64; 3]; 2], width: u32, height: u32) -> Rgb {
        let mut out = Rgb::new(width, height);
        let (a, b, c, d) = (m[0][0], m[0][1], m[1][0], m[1][1]);
        let det = a * d - b * c;
        if det.abs() < 1e-12 {
            return out;
        }
        // Inverse of [[a b][c d]] and its translation.
        let (ia, ib, ic, id) = (d / det, -b / det, -c / det, a / det);
        let (tx, ty) = (m[0][2], m[1][2]);
        let (w, h) = (self.width as i64, self.height as i64);
        let stride = self.width as usize * 3;
        // Per pixel: the source point, then either the fast path (all four taps inside, read
        // straight from the row slices) or the border path (taps outside are black). Same
        // arithmetic as the border path everywhere, so the result does not depend on the path;
        // see docs/performance.md for the time of a 112×112 warp before and after.
        for y in 0..height {
            let dy = y as f64 - ty;
            let row = &mut out.data[y as usize * width as usize * 3..(y as usize + 1) * width as usize * 3];
            for (x, o) in row.chunks_exact_mut(3).enumerate() {
                let dx = x as f64 - tx;
                let sx = ia * dx + ib * dy;
                let sy = ic * dx + id * dy;
                let (x0, y0) = (sx.floor() as i64, sy.floor() as i64);
                let (fx, fy) = ((sx - x0 as f64) as f32, (sy - y0 as f64) as f32);
                if x0 >= 0 && y0 >= 0 && x0 + 1 < w && y0 + 1 < h {
                    let i = y0 as usize * stride + x0 as usize * 3;
                    let (t, b) = (&self.data[i..i + 6], &self.data[i + stride..i + stride + 6]);
                    for ch in 0..3 {
                        let top = t[ch] as f32 * (1.0 - fx) + t[3 + ch] as f32 * fx;
                        let bot = b[ch] as f32 * (1.0 - fx) + b[3 + ch] as f32 * fx;
                        o[ch] = sat(top * (1.0 - fy) + bot * fy);
                    }
                } else {
                    let get = |xx: i64, yy: i64, ch: usize| -> f32 {
                        if xx < 0 || yy < 0 || xx >= w || yy >= h {
                            0.0
                        } else {
                            self.px(xx as usize, yy as usize, ch)
                        }
                    };
                    for (ch, v) in o.iter_mut().enumerate() {
                        let top = get(x0, y0, ch) * (1.0 - fx) + get(x0 + 1, y0, ch) * fx;
                        let bot = get(x0, y0 + 1, ch) * (1.0 - fx) + get(x0 + 1, y0 + 1, ch) * fx;
                        *v = sat(top * (1.0 - fy) + bot * fy);
                    }
                }
            }
        }
        out
    }

    /// The rectangle `[x0, x1] x [y0, y1]` (inclusive, clamped to the image).
    pub fn crop(&self, x0: u32, y0: u32, x1: u32, y1: u32) -> Rgb {
        let x1 = x1.min(self.width.saturating_sub(1));
        let y1 = y1.min(self.height.saturating_sub(1));
        let (x0, y0) = (x0.min(x1), y0.min(y1));
        let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
        let mut out = Rgb::new(w, h);
        for y in 0..h {
            let s = ((y0 + y) as usize * self.width as usize + x0 as usize) * 3;
            let d = y as usize * w as usize * 3;
            out.data[d..d + w as usize * 3].copy_from_slice(&self.data[s..s + w as usize * 3]);
        }
        out
    }

    /// Grey level (BT.601 luma) at every pixel.
    pub fn grey(&self) -> Vec<f32> {
        self.data.chunks_exact(3).map(|p| 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32).collect()
    }
}

/// Round and saturate to u8 as OpenCV's `saturate_cast<uchar>` does.
#[inline]
fn sat(v: f32) -> u8 {
    // Clamp, then add a half and truncate: round half up, which for 0..=255 is what `round` gives
    // (half away from zero) without a libm call per channel (x86_64's baseline has no SSE4.1
    // rounding instruction). NaN saturates to 0.
    (v.clamp(0.0, 255.0) + 0.5) as u8
}

/// Variance of the Laplacian of a grey image (a standard sharpness measure: low means blurred).
pub fn laplacian_variance(grey: &[f32], width: usize, height: usize) -> f32 {
    if width < 3 || height < 3 || grey.len() < width * height {
        return 0.0;
    }
    let mut sum = 0.0f64;
    let mut sq = 0.0f64;
    let mut n = 0.0f64;
    for y in 1..height - 1 {
        for x in 1..width - 1 {
            let i = y * width + x;
            let l = (grey[i - 1] + grey[i + 1] + grey[i - width] + grey[i + width] - 4.0 * grey[i]) as f64;
            sum += l;
            sq += l * l;
            n += 1.0;
        }
    }
    let mean = sum / n;
    (sq / n - mean * mean) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32) -> Rgb {
        let mut img = Rgb::new(w, h);
        for y in 0..h {
            for x in 0..w {
                let o = ((y * w + x) * 3) as usize;
                img.data[o] = (x * 255 / (w - 1)) as u8;
                img.data[o + 1] = (y * 255 / (h - 1)) as u8;
                img.data[o + 2] = 77;
            }
        }
        img
    }

    #[test]
    fn resize_to_the_same_size_is_the_identity_and_halving_averages() {
        let img = ramp(40, 30);
        assert_eq!(img.resize(40, 30), img);
        let mut two = Rgb::new(2, 1);
        two.data = vec![0, 0, 0, 200, 100, 50];
        let one = two.resize(1, 1);
        assert_eq!(one.data, vec![100, 50, 25]);
    }

    #[test]
    fn warp_by_the_identity_keeps_the_image_and_a_shift_brings_black_in() {
        let img = ramp(20, 20);
        let id = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        assert_eq!(img.warp_affine(&id, 20, 20), img);
        let shift = [[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]];
        let out = img.warp_affine(&shift, 20, 20);
        assert_eq!(&out.data[0..3], &[0, 0, 0], "left columns come from outside: black");
        assert_eq!(out.data[(5 * 3) as usize], img.data[0]);
    }

    /// The warp written plainly (every tap through the border check): the fast path must give
    /// the same bytes.
    fn warp_plain(img: &Rgb, m: &[[f64; 3]; 2], width: u32, height: u32) -> Rgb {
        let mut out = Rgb::new(width, height);
        let (a, b, c, d) = (m[0][0], m[0][1], m[1][0], m[1][1]);
        let det = a * d - b * c;
        let (ia, ib, ic, id) = (d / det, -b / det, -c / det, a / det);
        let (w, h) = (img.width as i64, img.height as i64);
        for y in 0..height {
            for x in 0..width {
                let (dx, dy) = (x as f64 - m[0][2], y as f64 - m[1][2]);
                let (sx, sy) = (ia * dx + ib * dy, ic * dx + id * dy);
                let (x0, y0) = (sx.floor() as i64, sy.floor() as i64);
                let (fx, fy) = ((sx - x0 as f64) as f32, (sy - y0 as f64) as f32);
                for ch in 0..3 {
                    let get = |xx: i64, yy: i64| {
                        if xx < 0 || yy < 0 || xx >= w || yy >= h {
                            0.0
                        } else {
                            img.px(xx as usize, yy as usize, ch)
                        }
                    };
                    let top = get(x0, y0) * (1.0 - fx) + get(x0 + 1, y0) * fx;
                    let bot = get(x0, y0 + 1) * (1.0 - fx) + get(x0 + 1, y0 + 1) * fx;
                    out.data[(y as usize * width as usize + x as usize) * 3 + ch] = sat(top * (1.0 - fy) + bot * fy);
                }
            }
        }
        out
    }

    #[test]
    fn the_fast_warp_matches_the_plain_one_inside_and_across_the_border() {
        let mut img = ramp(97, 83);
        for (i, v) in img.data.iter_mut().enumerate() {
            *v = v.wrapping_mul(7).wrapping_add((i % 251) as u8);
        }
        // Rotations, scales and shifts that put part of the output outside the source.
        for (k, (s, th, tx, ty)) in
            [(1.0, 0.0, 0.0, 0.0), (0.8, 0.3, 10.0, -5.0), (1.6, -0.7, -30.0, 40.0), (0.45, 2.0, 60.0, 90.0)]
                .into_iter()
                .enumerate()
        {
            let m = [[s * f64::cos(th), -s * f64::sin(th), tx], [s * f64::sin(th), s * f64::cos(th), ty]];
            assert_eq!(img.warp_affine(&m, 112, 112), warp_plain(&img, &m, 112, 112), "case {k}");
        }
    }

    #[test]
    fn corrupt_and_truncated_frames_are_errors() {
        assert!(matches!(Rgb::decode(b"hello"), Err(DecodeError::UnknownFormat)));
        let mut jpeg = Vec::new();
        let img = image::RgbImage::from_raw(32, 32, ramp(32, 32).data).unwrap();
        img.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        let ok = Rgb::decode(&jpeg).unwrap();
        assert_eq!((ok.width, ok.height), (32, 32));
        assert!(Rgb::decode(&jpeg[..jpeg.len() / 2]).is_err(), "a truncated JPEG is refused");
        assert!(Rgb::decode(&jpeg[..jpeg.len() - 2]).is_err(), "even by two bytes");
        let mut padded = jpeg.clone();
        padded.extend_from_slice(&[0; 100]);
        assert!(Rgb::decode(&padded).is_ok(), "padding after the end marker is fine");
        let mut flipped = jpeg.clone();
        for b in flipped.iter_mut().skip(200).take(40) {
            *b = 0xFF;
        }
        // Either refused or decoded to a full-size frame: never a panic or a partial frame.
        if let Ok(f) = Rgb::decode(&flipped) {
            assert_eq!(f.data.len(), 32 * 32 * 3);
        }
    }

    #[test]
    fn yuyv_grey_and_blur_measure() {
        let yuyv: Vec<u8> = (0..16 * 16).flat_map(|_| [126u8, 128]).collect();
        let rgb = Rgb::from_yuyv(16, 16, &yuyv).unwrap();
        assert!(rgb.data.iter().all(|&v| (v as i32 - 128).abs() <= 2), "mid grey");
        assert!(Rgb::from_yuyv(16, 16, &yuyv[..100]).is_err());
        let sharp = ramp(32, 32);
        let mut checker = Rgb::new(32, 32);
        for (i, p) in checker.data.chunks_exact_mut(3).enumerate() {
            let v = if (i % 32 + i / 32) % 2 == 0 { 255 } else { 0 };
            p.copy_from_slice(&[v, v, v]);
        }
        let g = laplacian_variance(&checker.grey(), 32, 32);
        let s = laplacian_variance(&sharp.grey(), 32, 32);
        assert!(g > 1000.0 * (s + 1.0), "edges everywhere ({g}) vs a smooth ramp ({s})");
    }
}
