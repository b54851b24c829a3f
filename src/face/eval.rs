//! The LFW protocol (pure): `pairs.txt`, 10-fold verification accuracy, and TAR at a given FAR
//! over every genuine and impostor pair of a set of images.

use std::collections::BTreeSet;

/// One pair of `pairs.txt`: two image keys (`Name/Name_0001`) and whether they are the same person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub a: String,
    pub b: String,
    pub same: bool,
    pub fold: usize,
}

pub fn image_key(name: &str, n: u32) -> String {
    format!("{name}/{name}_{n:04}")
}

/// Parse the standard `pairs.txt` (first line: folds and pairs per class per fold).
pub fn parse_pairs(text: &str) -> Result<Vec<Pair>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let head: Vec<usize> = lines
        .next()
        .ok_or("empty pairs file")?
        .split_whitespace()
        .map(|t| t.parse().map_err(|_| format!("bad header field `{t}`")))
        .collect::<Result<_, _>>()?;
    let (folds, per) = match head[..] {
        [f, p] => (f, p),
        _ => return Err("header must be `folds pairs`".into()),
    };
    let mut out = Vec::with_capacity(folds * per * 2);
    for fold in 0..folds {
        for k in 0..2 * per {
            let l = lines.next().ok_or(format!("pairs file ends in fold {fold}"))?;
            let t: Vec<&str> = l.split_whitespace().collect();
            let num = |s: &str| s.parse::<u32>().map_err(|_| format!("bad image number `{s}` in `{l}`"));
            let p = match (k < per, t.len()) {
                (true, 3) => Pair { a: image_key(t[0], num(t[1])?), b: image_key(t[0], num(t[2])?), same: true, fold },
                (false, 4) => {
                    Pair { a: image_key(t[0], num(t[1])?), b: image_key(t[2], num(t[3])?), same: false, fold }
                }
                _ => return Err(format!("unexpected line `{l}` in fold {fold}")),
            };
            out.push(p);
        }
    }
    Ok(out)
}

/// Every image the pairs use, sorted.
pub fn images(pairs: &[Pair]) -> Vec<String> {
    let set: BTreeSet<&str> = pairs.iter().flat_map(|p| [p.a.as_str(), p.b.as_str()]).collect();
    set.into_iter().map(str::to_string).collect()
}

fn accuracy(scores: &[(f32, bool)], thr: f32) -> f64 {
    let ok = scores.iter().filter(|(s, same)| (*s > thr) == *same).count();
    ok as f64 / scores.len().max(1) as f64
}

/// The threshold that maximises accuracy on `scores` (candidates: midpoints of sorted scores).
fn best_threshold(scores: &[(f32, bool)]) -> f32 {
    let mut best = (f64::MIN, 0.0f32);
    // Sweep: count correct decisions as the threshold passes each score.
    let mut sorted: Vec<(f32, bool)> = scores.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total_same = sorted.iter().filter(|x| x.1).count() as i64;
    // Threshold below everything: all "same".
    let mut correct = total_same;
    let n = sorted.len();
    let cand = |i: usize| if i + 1 < n { (sorted[i].0 + sorted[i + 1].0) / 2.0 } else { sorted[i].0 + 1e-3 };
    if n > 0 {
        best = (correct as f64, sorted[0].0 - 1e-3);
    }
    for i in 0..n {
        // sorted[i] moves to the "different" side.
        correct += if sorted[i].1 { -1 } else { 1 };
        if i + 1 < n && sorted[i].0 == sorted[i + 1].0 {
            continue;
        }
        if correct as f64 > best.0 {
            best = (correct as f64, cand(i));
        }
    }
    best.1
}

/// 10-fold accuracy: for each fold, the threshold is chosen on the other folds. Returns the
/// mean, the standard deviation and the per-fold figures.
pub fn kfold_accuracy(scored: &[(usize, f32, bool)], folds: usize) -> (f64, f64, Vec<f64>) {
    let mut accs = Vec::new();
    for f in 0..folds {
        let train: Vec<(f32, bool)> = scored.iter().filter(|x| x.0 != f).map(|x| (x.1, x.2)).collect();
        let test: Vec<(f32, bool)> = scored.iter().filter(|x| x.0 == f).map(|x| (x.1, x.2)).collect();
        let thr = best_threshold(&train);
        accs.push(accuracy(&test, thr));
    }
    let mean = accs.iter().sum::<f64>() / accs.len().max(1) as f64;
    let var = accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / accs.len().max(1) as f64;
    (mean, var.sqrt(), accs)
}

/// TAR at `far` over all pairs: `labels[i]` is the identity of embedding `i`. Returns
/// (TAR, threshold, genuine pairs, impostor pairs).
pub fn tar_at_far(embs: &[Vec<f32>], labels: &[u32], far: f64) -> (f64, f32, usize, usize) {
    let n = embs.len();
    let mut genuine = Vec::new();
    let mut impostor: Vec<f32> = Vec::with_capacity(n * n / 2);
    for i in 0..n {
        for j in i + 1..n {
            let s = super::matcher::cosine(&embs[i], &embs[j]);
            if labels[i] == labels[j] {
                genuine.push(s);
            } else {
                impostor.push(s);
            }
        }
    }
    let k = ((impostor.len() as f64 * far).floor() as usize).min(impostor.len().saturating_sub(1));
    if impostor.is_empty() {
        return (0.0, 0.0, genuine.len(), 0);
    }
    // The k-th largest impostor score is the threshold: exactly k impostor pairs lie above it.
    let idx = impostor.len() - 1 - k;
    let (_, thr, _) = impostor.select_nth_unstable_by(idx, f32::total_cmp);
    let thr = *thr;
    let tar = genuine.iter().filter(|&&s| s > thr).count() as f64 / genuine.len().max(1) as f64;
    (tar, thr, genuine.len(), impostor.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_standard_layout() {
        let text = "2\t1\nA\t1\t2\nA\t1\tB\t3\nC\t2\t4\nC\t1\tD\t1\n";
        let p = parse_pairs(text).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(p[0], Pair { a: "A/A_0001".into(), b: "A/A_0002".into(), same: true, fold: 0 });
        assert_eq!(p[3].fold, 1);
        assert!(!p[3].same);
        assert_eq!(images(&p).len(), 7);
        assert!(parse_pairs("2\t1\nA\t1\t2\n").is_err(), "truncated");
        assert!(parse_pairs("1\t1\nA\t1\nB\t1\tC\t1\n").is_err(), "malformed line");
    }

    #[test]
    fn kfold_on_separable_scores_is_perfect_and_noise_is_not() {
        let mut s = Vec::new();
        for f in 0..10 {
            for i in 0..30 {
                s.push((f, 0.6 + i as f32 * 0.001, true));
                s.push((f, 0.1 + i as f32 * 0.001, false));
            }
        }
        let (mean, sd, _) = kfold_accuracy(&s, 10);
        assert_eq!(mean, 1.0);
        assert_eq!(sd, 0.0);
        // One impostor above every genuine score costs exactly that pair.
        s.push((0, 0.99, false));
        let (_, _, folds) = kfold_accuracy(&s, 10);
        assert!((folds[0] - 60.0 / 61.0).abs() < 1e-9, "{folds:?}");
    }

    #[test]
    fn tar_at_far_counts_pairs() {
        // 3 ids x 2 images: 3 genuine pairs, 12 impostor pairs.
        let e = |a: f32| vec![a.cos(), a.sin()];
        let embs = vec![e(0.0), e(0.1), e(1.5), e(1.6), e(3.0), e(3.05)];
        let (tar, thr, g, i) = tar_at_far(&embs, &[0, 0, 1, 1, 2, 2], 0.0);
        assert_eq!((g, i), (3, 12));
        assert_eq!(tar, 1.0, "genuine pairs all above the best impostor (thr {thr})");
    }
}
