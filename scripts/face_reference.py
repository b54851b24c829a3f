#!/usr/bin/env python3
"""The Python reference pipeline (numpy + OpenCV + onnxruntime from PyPI), built on
../shared/models/reference/facelib.py, for two uses:

  faithfulness  `face_reference.py run IMAGE...` prints, per image, the boxes, landmarks, the
                embedding of the primary face and the liveness probability as JSON, computed
                exactly as the models README says. tests/face_pipeline.rs compares the Rust
                pipeline against it (boxes within 2 px, cosine >= 0.999).
  benchmark     `face_reference.py bench --frames N IMAGE...` times each stage on one thread,
                as benches/face_pipeline.rs does for Rust, and prints JSON.

The detector input is letterboxed exactly as the Rust pipeline does it: the long side scaled to
--long-side (640, the daemon's default), the canvas rounded up to multiples of 32, image at the top left. facelib's
YuNet class only letterboxes to squares, so its decoding is repeated here with the canvas width.
"""
import argparse, json, os, sys, time

import numpy as np
import cv2
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))


def models_dir():
    return os.environ.get("MENSHEN_MODELS_DIR") or os.path.join(HERE, "..", "..", "shared", "models")


sys.path.insert(0, os.path.join(models_dir(), "reference"))
import facelib  # noqa: E402


def up32(v):
    return max(1, -(-v // 32)) * 32


def letterbox(img, long_side):
    h, w = img.shape[:2]
    s = long_side / max(w, h)
    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    canvas = np.zeros((up32(nh), up32(nw), 3), np.uint8)
    canvas[:nh, :nw] = cv2.resize(img, (nw, nh))
    return canvas, s


def detect(sess, bgr, long_side=320, score_thr=0.6, nms_thr=0.3):
    canvas, sc = letterbox(bgr, long_side)
    x = canvas.astype(np.float32).transpose(2, 0, 1)[None]
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    B, S, K = [], [], []
    W = canvas.shape[1]
    for st in (8, 16, 32):
        cls = outs[f'cls_{st}'][0, :, 0]; obj = outs[f'obj_{st}'][0, :, 0]
        bb = outs[f'bbox_{st}'][0]; kp = outs[f'kps_{st}'][0]
        cols = W // st
        idx = np.arange(cls.shape[0]); r = idx // cols; c = idx % cols
        score = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
        m = score > score_thr
        if not m.any():
            continue
        r, c, bb, kp, score = r[m], c[m], bb[m], kp[m], score[m]
        cx = (c + bb[:, 0]) * st; cy = (r + bb[:, 1]) * st
        w = np.exp(bb[:, 2]) * st; h = np.exp(bb[:, 3]) * st
        B.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1))
        kx = (kp[:, 0::2] + c[:, None]) * st; ky = (kp[:, 1::2] + r[:, None]) * st
        K.append(np.stack([kx, ky], 2)); S.append(score)
    if not B:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    B = np.concatenate(B) / sc; S = np.concatenate(S); K = np.concatenate(K) / sc
    keep = facelib.nms(B, S, nms_thr)
    return B[keep], S[keep], K[keep]


def primary(boxes, w, h):
    if len(boxes) == 0:
        return None
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (boxes[:, 0] <= w / 2) & (boxes[:, 2] >= w / 2) & (boxes[:, 1] <= h / 2) & (boxes[:, 3] >= h / 2)
    cand = np.where(inside)[0] if inside.any() else np.arange(len(boxes))
    return int(cand[np.argmax(area[cand])])


def embed(sess, aligned_bgr):
    rgb = aligned_bgr[:, :, ::-1].astype(np.float32)
    x = ((rgb - 127.5) / 128.0)[None]
    e = sess.run(None, {sess.get_inputs()[0].name: x})[0][0]
    return e / np.linalg.norm(e)


def new_box(src_w, src_h, bbox, scale):
    """Silent-Face-Anti-Spoofing CropImage._get_new_box (bbox = x, y, w, h)."""
    x, y, box_w, box_h = bbox
    scale = min((src_h - 1) / box_h, min((src_w - 1) / box_w, scale))
    new_w, new_h = box_w * scale, box_h * scale
    cx, cy = box_w / 2 + x, box_h / 2 + y
    x0, y0, x1, y1 = cx - new_w / 2, cy - new_h / 2, cx + new_w / 2, cy + new_h / 2
    if x0 < 0: x1 -= x0; x0 = 0
    if y0 < 0: y1 -= y0; y0 = 0
    if x1 > src_w - 1: x0 -= x1 - src_w + 1; x1 = src_w - 1
    if y1 > src_h - 1: y0 -= y1 - src_h + 1; y1 = src_h - 1
    return int(x0), int(y0), int(x1), int(y1)


def liveness(sessions, bgr, box):
    h, w = bgr.shape[:2]
    xywh = (box[0], box[1], box[2] - box[0], box[3] - box[1])
    probs = []
    for scale, s in sessions:
        x0, y0, x1, y1 = new_box(w, h, xywh, scale)
        crop = cv2.resize(bgr[y0:y1 + 1, x0:x1 + 1], (80, 80)).astype(np.float32).transpose(2, 0, 1)[None]
        logit = s.run(None, {s.get_inputs()[0].name: crop})[0][0]
        e = np.exp(logit - logit.max())
        probs.append(float((e / e.sum())[1]))
    return float(np.mean(probs))


class Pipeline:
    def __init__(self, threads=1):
        d = models_dir()
        self.det = facelib.sess(os.path.join(d, "yunet_s_dynamic.onnx"), threads)
        self.emb = facelib.sess(os.path.join(d, "mobilefacenet.onnx"), threads)
        self.live = [(2.7, facelib.sess(os.path.join(d, "minifasnet_v2_2.7_80x80.onnx"), threads)),
                     (4.0, facelib.sess(os.path.join(d, "minifasnet_v1se_4.0_80x80.onnx"), threads))]


def run(args):
    p = Pipeline()
    for path in args.images:
        bgr = cv2.imread(path)
        boxes, scores, kps = detect(p.det, bgr, args.long_side)
        i = primary(boxes, bgr.shape[1], bgr.shape[0])
        out = {"image": path, "boxes": boxes.tolist(), "scores": scores.tolist(), "landmarks": kps.tolist(),
               "primary": i}
        if i is not None:
            aligned = facelib.align(bgr, kps[i])
            out["embedding"] = embed(p.emb, aligned).tolist()
            out["real_probability"] = liveness(p.live, bgr, boxes[i])
        print(json.dumps(out))


def bench(args):
    p = Pipeline()
    blobs = [open(f, "rb").read() for f in args.images]
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((args.templates, 192)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    stages = {k: [] for k in ("decode", "detect", "align", "embed", "liveness", "match", "total")}
    for n in range(args.frames + args.warmup):
        t0 = time.perf_counter()
        bgr = cv2.imdecode(np.frombuffer(blobs[n % len(blobs)], np.uint8), cv2.IMREAD_COLOR)
        t1 = time.perf_counter()
        boxes, scores, kps = detect(p.det, bgr, args.long_side)
        t2 = time.perf_counter()
        i = primary(boxes, bgr.shape[1], bgr.shape[0])
        if i is None:
            continue
        aligned = facelib.align(bgr, kps[i])
        t3 = time.perf_counter()
        e = embed(p.emb, aligned)
        t4 = time.perf_counter()
        liveness(p.live, bgr, boxes[i])
        t5 = time.perf_counter()
        sims = gallery @ e
        top = np.argpartition(-sims, 1)[:2]
        _ = sims[top]
        t6 = time.perf_counter()
        if n >= args.warmup:
            for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0)):
                stages[k].append(v * 1e3)
    out = {k: {"median_ms": float(np.median(v)), "p95_ms": float(np.percentile(v, 95))} for k, v in stages.items() if v}
    out["frames"] = len(stages["total"])
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run"); r.add_argument("images", nargs="+"); r.add_argument("--long-side", type=int, default=640)
    b = sub.add_parser("bench"); b.add_argument("images", nargs="+"); b.add_argument("--long-side", type=int, default=640)
    b.add_argument("--frames", type=int, default=200); b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--templates", type=int, default=50000)
    a = ap.parse_args()
    ort.set_default_logger_severity(3)
    (run if a.cmd == "run" else bench)(a)


if __name__ == "__main__":
    main()
