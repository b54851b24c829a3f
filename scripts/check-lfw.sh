#!/usr/bin/env bash
# The face path's accuracy gate: the standard LFW protocol through the Rust pipeline
# (`menshen eval lfw`) must reach 10-fold accuracy >= 99.2 % on the 6,000 pairs and TAR >= 94.5 %
# at FAR 1e-4 over all pairs of the 7,701 images (the Python reference: 99.25 % and 94.88 %).
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
bad = []
if acc < 99.2: bad.append(f"accuracy {acc:.2f} % < 99.2 %")
if tar < 94.5: bad.append(f"TAR at FAR 1e-4 {tar:.2f} % < 94.5 %")
if r["images"] != 7701: bad.append(f"{r['images']} images, expected 7701")
if bad: sys.exit("LFW check failed: " + "; ".join(bad))
PY
