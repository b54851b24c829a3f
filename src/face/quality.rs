//! Quality gates for a face before it is matched or enrolled: size, frontal pose (from the
//! landmarks), sharpness (of the aligned face). Pure.

use super::detect::Face;
use super::image::{laplacian_variance, Rgb};

pub use crate::config::QualityGate;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QualityIssue {
    TooSmall,
    NotFrontal,
    Blurred,
}

impl QualityIssue {
    pub fn code(self) -> &'static str {
        match self {
            QualityIssue::TooSmall => "face_too_small",
            QualityIssue::NotFrontal => "face_not_frontal",
            QualityIssue::Blurred => "face_blurred",
        }
    }
}

/// Yaw proxy and roll (degrees) from the 5 landmarks.
pub fn pose(f: &Face) -> (f32, f32) {
    let [re, le, nose, ..] = f.landmarks;
    let (dx, dy) = (le[0] - re[0], le[1] - re[1]);
    let d = (dx * dx + dy * dy).sqrt().max(1e-3);
    let roll = dy.atan2(dx).to_degrees();
    // Nose offset from the eye midpoint, along the eye line, in eye distances.
    let (mx, my) = ((re[0] + le[0]) / 2.0, (re[1] + le[1]) / 2.0);
    let yaw = ((nose[0] - mx) * dx + (nose[1] - my) * dy) / (d * d);
    (yaw, roll)
}

impl QualityGate {
    /// Size and pose (before alignment).
    pub fn check_geometry(&self, f: &Face) -> Result<(), QualityIssue> {
        if f.width() < self.min_face_px {
            return Err(QualityIssue::TooSmall);
        }
        let (yaw, roll) = pose(f);
        if yaw.abs() > self.max_yaw || roll.abs() > self.max_roll_deg {
            return Err(QualityIssue::NotFrontal);
        }
        Ok(())
    }

    /// Sharpness of the aligned face.
    pub fn check_sharpness(&self, aligned: &Rgb) -> Result<f32, QualityIssue> {
        let s = laplacian_variance(&aligned.grey(), aligned.width as usize, aligned.height as usize);
        if s < self.min_sharpness {
            Err(QualityIssue::Blurred)
        } else {
            Ok(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(width: f32, nose_dx: f32, tilt: f32) -> Face {
        Face {
            bbox: [0.0, 0.0, width, width],
            score: 0.9,
            landmarks: [[30.0, 40.0], [70.0, 40.0 + tilt], [50.0 + nose_dx, 60.0], [35.0, 80.0], [65.0, 80.0]],
        }
    }

    #[test]
    fn geometry_gates() {
        let g = QualityGate::default();
        assert_eq!(g.check_geometry(&face(100.0, 0.0, 0.0)), Ok(()));
        assert_eq!(g.check_geometry(&face(40.0, 0.0, 0.0)), Err(QualityIssue::TooSmall));
        assert_eq!(g.check_geometry(&face(100.0, 18.0, 0.0)), Err(QualityIssue::NotFrontal), "turned away");
        assert_eq!(g.check_geometry(&face(100.0, 0.0, 30.0)), Err(QualityIssue::NotFrontal), "head tilted");
        let (yaw, roll) = pose(&face(100.0, 4.0, 0.0));
        assert!((yaw - 0.1).abs() < 1e-5 && roll.abs() < 1e-5);
    }

    #[test]
    fn a_flat_face_is_blurred() {
        let flat = Rgb { width: 112, height: 112, data: vec![128; 112 * 112 * 3] };
        assert_eq!(QualityGate::default().check_sharpness(&flat), Err(QualityIssue::Blurred));
    }
}
