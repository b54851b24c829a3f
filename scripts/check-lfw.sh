#!/usr/bin/env bash
# The face path's accuracy gate: the standard LFW protocol through the Rust pipeline
# (`menshen eval lfw`) must reach 10-fold accuracy >= 99.2 % on the 6,000 pairs and TAR >= 94.5 %
# at FAR 1e-4 over all pairs of the 7,701 images (the Python reference: 99.25 % and 94.88 %), and
# the fast 1:N search (4-bit scan + exact re-rank) must give the exact scan's top-1, decision
# and (where it can matter: within the margin) runner-up for every probe on these real embeddings.
# Data: $MENSHEN_DATA_DIR/lfw or ../shared/data/lfw. About 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${MENSHEN_DATA_DIR:-../shared/data}/lfw"
cargo build --release --quiet --bin menshen
OUT=target/lfw-report.json
target/release/menshen eval lfw --data "$DATA" --jobs "${LFW_JOBS:-2}" --json --quiet > "$OUT"
python3 - "$OUT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
acc, tar = r["accuracy_mean"] * 100, r["tar_at_far_1e4"] * 100
print(f"LFW: {r['images']} images ({r['no_face']} without a face), 10-fold accuracy {acc:.2f} % ± {r['accuracy_std']*100:.2f}, "
      f"TAR {r['tar_at_far_1e3']*100:.2f} % at FAR 1e-3, {tar:.2f} % at FAR 1e-4 (cosine > {r['threshold_far_1e4']:.3f}), {r['seconds']:.0f} s")
o = r["one_to_n"]
print(f"1:N on real embeddings: {o['gallery']} people enrolled, {o['probes']} probes, rank-1 {o['rank1']*100:.2f} %, "
      f"fast search = exact scan on top-1 {o['same_top1']}/{o['probes']}, decision {o['same_decision']}/{o['probes']}, "
      f"runner-up within the margin {o['same_runner_up_in_margin']}/{o['runner_up_in_margin']}")
bad = []
if acc < 99.2: bad.append(f"accuracy {acc:.2f} % < 99.2 %")
if tar < 94.5: bad.append(f"TAR at FAR 1e-4 {tar:.2f} % < 94.5 %")
if o["probes"] < 1000: bad.append(f"only {o['probes']} 1:N probes")
if o["same_top1"] != o["probes"]: bad.append(f"fast 1:N top-1 differs from the exact scan on {o['probes'] - o['same_top1']} probes")
if o["same_decision"] != o["probes"]: bad.append(f"fast 1:N decision differs from the exact scan's on {o['probes'] - o['same_decision']} probes")
if o["same_runner_up_in_margin"] != o["runner_up_in_margin"]: bad.append("fast 1:N missed a runner-up within the margin")
if r["images"] != 7701: bad.append(f"{r['images']} images, expected 7701")
if bad: sys.exit("LFW check failed: " + "; ".join(bad))
PY
