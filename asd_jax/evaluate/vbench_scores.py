"""VBench scores: VBench's own evaluation of the video folders, then the Total / Quality / Semantic
scores with VBench's published weighting, as JSON and Markdown beside the paper's rows.

The weighting is VBench's (github.com/Vchitect/VBench, scripts/constant.py and
scripts/cal_final_score.py, the leaderboard's): every dimension is min-max normalised with the
published bounds and weighted (dynamic degree 0.5, the others 1); Quality is the weighted mean of
the 7 quality dimensions, Semantic of the 9 semantic ones, Total = (4 Quality + Semantic) / 5.

VBench itself runs in a Python that has it (`--vbench_python`, default this one): `vbench` 0.1.5
pins transformers==4.33.2 and numpy<2, which asd_jax's own environment does not hold, so a separate
virtual environment is the usual place. Its model weights are looked up in VBench's cache
(`$VBENCH_CACHE_DIR`, else ~/.cache/vbench) before anything runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from asd_jax.evaluate import videos as vid

# VBench's 16 dimensions (vbench.VBench.build_full_dimension_list's names).
QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering",
           "motion_smoothness", "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship",
            "scene", "appearance_style", "temporal_style", "overall_consistency")
DIMENSIONS = QUALITY + SEMANTIC
# (min, max) of the normalisation and the weight of each dimension: VBench scripts/constant.py.
NORMALIZE = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0), "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0), "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0),
    "color": (0.0, 1.0), "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855), "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
DIM_WEIGHT = {d: (0.5 if d == "dynamic_degree" else 1.0) for d in DIMENSIONS}
QUALITY_WEIGHT = 4.0
SEMANTIC_WEIGHT = 1.0

# Model weights VBench 0.1.5 reads in local mode (vbench/utils.py init_submodules), relative to
# its cache folder, and where VBench itself fetches them.
WEIGHTS = {
    "subject_consistency": [("dino_model/dino_vitbase16_pretrain.pth",
                             "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
                             "dino_vitbase16_pretrain.pth"),
                            ("dino_model/facebookresearch_dino_main",
                             "git clone https://github.com/facebookresearch/dino")],
    "background_consistency": [("clip_model/ViT-B-32.pt", "openaipublic CLIP ViT-B/32")],
    "aesthetic_quality": [("clip_model/ViT-L-14.pt", "openaipublic CLIP ViT-L/14")],
    "imaging_quality": [("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                         "github.com/chaofengc/IQA-PyTorch releases v0.1-weights")],
    "motion_smoothness": [("amt_model/amt-s.pth", "huggingface.co/lalala125/AMT")],
    "dynamic_degree": [("raft_model/models/raft-things.pth", "RAFT models.zip (dropbox)")],
    "human_action": [("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                      "huggingface.co/OpenGVLab/VBench_Used_Models")],
    "object_class": [("grit_model/grit_b_densecap_objectdet.pth", "GRiT (datarelease.blob)")],
    "multiple_objects": [("grit_model/grit_b_densecap_objectdet.pth", "GRiT (datarelease.blob)")],
    "color": [("grit_model/grit_b_densecap_objectdet.pth", "GRiT (datarelease.blob)")],
    "spatial_relationship": [("grit_model/grit_b_densecap_objectdet.pth",
                              "GRiT (datarelease.blob)")],
    "scene": [("caption_model/tag2text_swin_14m.pth", "huggingface.co/spaces/xinyu1205/"
               "recognize-anything")],
    "appearance_style": [("clip_model/ViT-B-32.pt", "openaipublic CLIP ViT-B/32")],
    "temporal_style": [("ViCLIP/ViClip-InternVid-10M-FLT.pth",
                        "huggingface.co/OpenGVLab/VBench_Used_Models")],
    "overall_consistency": [("ViCLIP/ViClip-InternVid-10M-FLT.pth",
                             "huggingface.co/OpenGVLab/VBench_Used_Models")],
    "temporal_flickering": [],
}

# The paper's rows (percent): Table 1 (VBench), Table 2 (ablation), Table 4 (20-second videos).
PAPER_ROWS = {
    "4": [("ASD (ours), Table 1", 84.38, 85.16, 81.25),
          ("Self Forcing, Table 1", 84.31, 85.07, 81.28)],
    "2*": [("ASD (ours), Table 1", 84.32, 85.15, 81.02),
           ("no ASD, FFE, Table 2", 83.80, 84.65, 80.40)],
    "2": [("Self Forcing (retrained), Table 1", 83.49, 84.20, 80.62),
          ("ASD, no FFE, Table 2", 83.28, 84.17, 79.69),
          ("no ASD, no FFE, Table 2", 82.61, 83.84, 77.68)],
    "1*": [("ASD (ours), Table 1", 83.89, 84.55, 81.24),
           ("no ASD, FFE, Table 2", 83.04, 83.81, 79.95)],
    "1": [("Self Forcing (retrained), Table 1", 80.62, 81.19, 78.35),
          ("ASD, no FFE, Table 2", 80.65, 81.77, 76.15),
          ("no ASD, no FFE, Table 2", 78.13, 80.33, 69.31)],
}
PAPER_ROWS_LONG = {
    "2*": [("ASD (ours) 20 s, Table 4", 82.63, 83.29, 79.98)],
    "2": [("Self Forcing 20 s, Table 4", 82.50, 82.93, 80.76)],
    "1*": [("ASD (ours) 20 s, Table 4", 82.00, 82.48, 80.11)],
    "1": [("Self Forcing 20 s, Table 4", 80.66, 81.01, 79.23)],
}


def weighted_scores(raw: dict[str, float]) -> dict[str, Any]:
  """Raw VBench dimension scores (fractions in [0, 1], VBench's `*_eval_results.json` values) ->
  {"total", "quality", "semantic"} (fractions; None when a dimension of the group is missing),
  "normalized" per dimension and "missing" dimensions."""
  unknown = sorted(set(raw) - set(DIMENSIONS))
  if unknown:
    raise ValueError(f"unknown VBench dimensions {unknown}; known: {list(DIMENSIONS)}.")
  norm = {d: (raw[d] - NORMALIZE[d][0]) / (NORMALIZE[d][1] - NORMALIZE[d][0]) * DIM_WEIGHT[d]
          for d in DIMENSIONS if d in raw}

  def group(dims):
    if any(d not in norm for d in dims):
      return None
    return sum(norm[d] for d in dims) / sum(DIM_WEIGHT[d] for d in dims)

  quality, semantic = group(QUALITY), group(SEMANTIC)
  total = (None if quality is None or semantic is None else
           (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic)
           / (QUALITY_WEIGHT + SEMANTIC_WEIGHT))
  return {"total": total, "quality": quality, "semantic": semantic, "normalized": norm,
          "missing": [d for d in DIMENSIONS if d not in raw]}


def cache_dir() -> Path:
  return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")


def missing_weights(dimensions: Sequence[str], root: Path | None = None) -> list[str]:
  """'path (dimension; source)' of every weight file VBench would need and is not in its cache."""
  root = cache_dir() if root is None else root
  out = []
  for d in dimensions:
    for rel, source in WEIGHTS[d]:
      if not (root / rel).exists():
        out.append(f"{root / rel} ({d}; {source})")
  return out


def check_vbench(python: str) -> str | None:
  """None when `python` imports vbench, else the reason."""
  r = subprocess.run([python, "-c", "import vbench, vbench2_beta_long; print(vbench.__file__)"],
                     capture_output=True, text=True, check=False)
  if r.returncode:
    tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    return tail
  return None


_RUNNER = textwrap.dedent("""
    import json, sys
    videos, name, out, dims, suite = sys.argv[1:6]
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if suite == "long":
        from vbench2_beta_long import VBenchLong as Bench
    else:
        from vbench import VBench as Bench
    import vbench, os
    info = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    Bench(device, info, out).evaluate(videos_path=videos, name=name,
                                      dimension_list=dims.split(","), local=True,
                                      mode="vbench_standard")
""")


def results_path(out: Path, folder: str) -> Path:
  return Path(out) / f"{folder}_eval_results.json"


def run_vbench(python: str, videos: Path, folder: str, out: Path, dimensions: Sequence[str],
               suite: str) -> Path:
  """Runs VBench's own evaluation of one setting's folder; returns its results JSON."""
  r = subprocess.run([python, "-c", _RUNNER, str(videos / folder), folder, str(out),
                      ",".join(dimensions), suite], check=False)
  path = results_path(out, folder)
  if r.returncode or not path.is_file():
    raise RuntimeError(f"VBench's evaluation of {videos / folder} failed (exit {r.returncode}); "
                       f"its output is above.")
  return path


def read_results(path: Path) -> dict[str, float]:
  """VBench's `{name}_eval_results.json`: {dimension: [mean, per-video list]} -> {dim: mean}."""
  data = json.loads(Path(path).read_text(encoding="utf-8"))
  return {d: float(v[0] if isinstance(v, (list, tuple)) else v) for d, v in data.items()}


def table(setting: str, raw: dict[str, float], long: bool = False) -> dict[str, Any]:
  scores = weighted_scores(raw)
  rows = (PAPER_ROWS_LONG if long else PAPER_ROWS).get(setting, [])
  return {"setting": setting, "dimensions": {d: raw.get(d) for d in DIMENSIONS}, **scores,
          "paper": [{"row": r, "total": round(t / 100, 6), "quality": round(q / 100, 6),
                     "semantic": round(s / 100, 6)}
                    for r, t, q, s in rows]}


def _pct(v):
  return "-" if v is None else f"{100 * v:.2f}"


def markdown(tables: Sequence[dict[str, Any]]) -> str:
  lines = ["| setting | row | Total | Quality | Semantic |", "|---|---|---|---|---|"]
  for t in tables:
    lines.append(f"| {t['setting']} | this model | {_pct(t['total'])} | {_pct(t['quality'])} | "
                 f"{_pct(t['semantic'])} |")
    for p in t["paper"]:
      lines.append(f"| {t['setting']} | paper: {p['row']} | {_pct(p['total'])} | "
                   f"{_pct(p['quality'])} | {_pct(p['semantic'])} |")
  lines += ["", "| dimension | " + " | ".join(t["setting"] for t in tables) + " |",
            "|---|" + "---|" * len(tables)]
  for d in DIMENSIONS:
    lines.append(f"| {d} | " + " | ".join(_pct(t["dimensions"][d]) for t in tables) + " |")
  missing = sorted({d for t in tables for d in t["missing"]})
  if missing:
    lines += ["", f"Not evaluated (Total/Quality/Semantic left out where needed): {missing}."]
  return "\n".join(lines) + "\n"


def score(args) -> dict[str, Any]:
  """`vbench-score`: checks, runs VBench where a setting has no results yet, writes the tables."""
  videos = Path(args.videos)
  manifest = vid.read_manifest(videos)
  out = Path(args.out) if args.out else videos / "vbench"
  dims = [d.strip() for d in args.dimensions.split(",") if d.strip()] if args.dimensions else list(
      DIMENSIONS)
  bad = [d for d in dims if d not in DIMENSIONS]
  if bad:
    raise ValueError(f"--dimensions has unknown names {bad}; known: {list(DIMENSIONS)}.")
  settings = manifest["run"]["settings"]
  long = args.suite == "long"
  todo = [n for n, info in settings.items() if not results_path(out, info["folder"]).is_file()]
  if todo:
    missing = {n: v for n, v in vid.missing_videos(videos, manifest).items() if v and n in todo}
    if missing:
      n, names = next(iter(missing.items()))
      raise ValueError(f"setting {n} lacks {len(names)} videos (e.g. {names[0]!r}): finish "
                       f"`python -m asd_jax.evaluate vbench` with the same flags first.")
    python = args.vbench_python or sys.executable
    why = check_vbench(python)
    if why is not None:
      raise FileNotFoundError(
          f"VBench is not importable by {python} ({why}). Install it in its own environment "
          f"(it pins transformers==4.33.2 and numpy<2): `python -m venv vbench-env && "
          f"vbench-env/bin/pip install vbench torch torchvision` (+ detectron2 for object_class, "
          f"multiple_objects, color, spatial_relationship), then pass "
          f"--vbench_python=vbench-env/bin/python.")
    weights = missing_weights(dims)
    if weights:
      raise FileNotFoundError(
          "VBench's model weights are missing from its cache (set VBENCH_CACHE_DIR to use "
          "another folder; VBench fetches each from the source named):\n  "
          + "\n  ".join(weights))
    out.mkdir(parents=True, exist_ok=True)
    for n in todo:
      run_vbench(python, videos, settings[n]["folder"], out, dims, args.suite)
  tables = [table(n, {d: v for d, v in read_results(results_path(out, info["folder"])).items()
                      if d in dims}, long)
            for n, info in settings.items()]
  vid.atomic_write_bytes(out / "scores.json", json.dumps(tables, indent=1).encode())
  vid.atomic_write_bytes(out / "scores.md", markdown(tables).encode())
  return {"tables": tables, "json": str(out / "scores.json"), "markdown": str(out / "scores.md")}
