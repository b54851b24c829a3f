//! Enrolment: from N good frames (camera) or photos (JPEG/PNG bytes) to one template.
//!
//! Every frame passes the quality gates; the embeddings of the good frames must agree with each
//! other (one person, not a mix); their normalised mean is the template; and it is refused if it
//! already matches another resident. Storing it is the caller's, through
//! the store's `put_template`, which refuses without the resident's face consent or
//! with mode `card`, and only ever receives the sealed template (sealed by the privacy module).

use super::detect::primary;
use super::engine::Engine;
use super::image::Rgb;
use super::matcher::{cosine, normalise, Gallery, Identity};
use super::quality::{QualityGate, QualityIssue};

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("{good} good frame(s), {need} needed ({rejected})")]
    TooFewGoodFrames { good: usize, need: usize, rejected: String },
    #[error("the frames do not show one person (cosine {0:.2} between two of them)")]
    Inconsistent(f32),
    #[error("this face already matches resident `{0}` (cosine {1:.2}): one face, one resident")]
    MatchesOther(String, f32),
    #[error("frame {index}: {why}")]
    Frame { index: usize, why: String },
    #[error(transparent)]
    Face(#[from] super::engine::FaceError),
}

/// Enrolment settings.
#[derive(Debug, Clone, Copy)]
pub struct EnrolRules {
    pub min_good: usize,
    /// Two frames of one person agree at least this much.
    pub min_agreement: f32,
    pub quality: QualityGate,
    pub match_threshold: f32,
}

/// Build a template for `resident` from frames; `gallery` holds everyone already enrolled.
pub fn enrol(
    engine: &mut Engine,
    frames: &[Rgb],
    resident: &str,
    gallery: &Gallery,
    rules: &EnrolRules,
) -> Result<Vec<f32>, EnrolError> {
    let mut good: Vec<Vec<f32>> = Vec::new();
    let mut rejected: Vec<(usize, String)> = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let faces = engine.detect(f)?;
        let Some(face) = primary(&faces, f.width, f.height) else {
            rejected.push((i, "no face".to_string()));
            continue;
        };
        if let Err(q) = rules.quality.check_geometry(&face) {
            rejected.push((i, q.code().to_string()));
            continue;
        }
        let aligned = engine.align(f, &face);
        if let Err(q @ QualityIssue::Blurred) = rules.quality.check_sharpness(&aligned) {
            rejected.push((i, q.code().to_string()));
            continue;
        }
        good.push(engine.embed_aligned(&aligned)?);
    }
    if good.len() < rules.min_good.max(1) {
        return Err(EnrolError::TooFewGoodFrames {
            good: good.len(),
            need: rules.min_good.max(1),
            rejected: summarise(&rejected),
        });
    }
    for i in 0..good.len() {
        for j in i + 1..good.len() {
            let c = cosine(&good[i], &good[j]);
            if c < rules.min_agreement {
                return Err(EnrolError::Inconsistent(c));
            }
        }
    }
    let dim = good[0].len();
    let mut mean = vec![0.0f32; dim];
    for g in &good {
        mean.iter_mut().zip(g).for_each(|(m, v)| *m += v);
    }
    normalise(&mut mean);
    if let Some(s) = gallery.search_exact(&mean) {
        // Someone else's template close enough to match: refuse (re-enrolling oneself is fine).
        let other = if s.best.owner != resident { Some(s.best) } else { s.runner_up };
        if let Some(o) = other.filter(|o| o.score >= rules.match_threshold) {
            return Err(EnrolError::MatchesOther(o.owner, o.score));
        }
    }
    if let Identity::Match(h) = gallery.identify(&mean, rules.match_threshold, 0.0, super::matcher::SHORTLIST) {
        if h.owner != resident {
            return Err(EnrolError::MatchesOther(h.owner, h.score));
        }
    }
    Ok(mean)
}

/// Why frames were rejected: each frame when there are a few (photos: the index is the photo's
/// place on the command line), counts by reason when there are many (camera frames).
fn summarise(rejected: &[(usize, String)]) -> String {
    if rejected.is_empty() {
        return "none rejected".into();
    }
    if rejected.len() <= 4 {
        return rejected.iter().map(|(i, why)| format!("frame {i}: {why}")).collect::<Vec<_>>().join("; ");
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for (_, why) in rejected {
        *counts.entry(why.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(why, n)| format!("{why} in {n}")).collect();
    format!("{} frames rejected: {}", rejected.len(), parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::summarise;

    #[test]
    fn rejections_are_listed_when_few_and_counted_when_many() {
        assert_eq!(summarise(&[]), "none rejected");
        assert_eq!(summarise(&[(1, "no face".into())]), "frame 1: no face");
        let many: Vec<(usize, String)> =
            (0..9).map(|i| (i, if i % 3 == 0 { "too_small" } else { "no face" }.to_string())).collect();
        assert_eq!(summarise(&many), "9 frames rejected: no face in 6, too_small in 3");
    }
}
