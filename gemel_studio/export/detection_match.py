"""Checking a detector's ONNX graph against torch, detection by detection.

A detector's output is not a smooth function of its input: top-k, the score threshold and NMS
make choices, and a choice between two candidates whose scores (nearly) tie depends on rounding.
So onnxruntime is compared with torch detection by detection: each torch detection must have
an onnxruntime detection of the same label whose score and box agree within tolerance, and
every detection left unmatched on either side must be one that a tie can explain
(`judge_detections`). `compare_detections` runs both on a check input and, where that input
proves nothing (no detections, or every score tied), on one that does.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..runtime.bundle import BundleModel
from .onnx_graph import output_names, trace_graph

# Detectors: each torch detection must have an onnxruntime one of the same label whose score is
# within DETECTION_TOLERANCE and whose box coordinates are within DETECTION_TOLERANCE * the
# input's larger side. Looser than the logits' 1e-4: scores and boxes come out of a deep
# network, a resize and an exp() in box decoding, and float32 torch alone is off by up to 4e-5
# in score and 1.2e-3 px in a box (against float64, on the test's SSDlite at 64x64), while
# a wrong graph misses by far more than 1e-3.
DETECTION_TOLERANCE = 1e-3
DETECTION_TOLERANCE_TEXT = (f"detections matched one to one: same label, |score difference| <= "
                            f"{DETECTION_TOLERANCE:g}, box coordinates within {DETECTION_TOLERANCE:g} * the input's "
                            "larger side; unmatched ones only below a score tie")


def _postprocessor(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module holding a torchvision detector's final score threshold and cap on detections
    per image: the detector itself for SSD, RetinaNet and FCOS, its roi_heads for the R-CNNs."""
    for mod in model.modules():
        if (isinstance(getattr(mod, "score_thresh", None), (int, float))
                and isinstance(getattr(mod, "detections_per_img", None), int)):
            return mod
    return None


@contextmanager
def _score_threshold(post: torch.nn.Module, value: float):
    old = post.score_thresh
    post.score_thresh = value
    try:
        yield
    finally:
        post.score_thresh = old


def _torch_detections(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(x)[0]
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def _match(ref: dict, got: dict, box_tol: float, score_tol: float) -> list[tuple[int, int]]:
    """One-to-one (torch, onnxruntime) pairs: torch's detections, best first, each take the
    unmatched onnxruntime detection of the same label whose score is within `score_tol` and
    whose box is nearest, if every coordinate is within `box_tol`."""
    used = np.zeros(len(got["scores"]), dtype=bool)
    pairs = []
    if not len(used):
        return pairs
    for i in np.argsort(-ref["scores"], kind="stable"):
        box_diff = np.abs(got["boxes"] - ref["boxes"][i]).max(axis=1)
        ok = ((~used) & (got["labels"] == ref["labels"][i]) & (np.abs(got["scores"] - ref["scores"][i]) <= score_tol)
              & (box_diff <= box_tol))
        if ok.any():
            j = int(np.flatnonzero(ok)[np.argmin(box_diff[ok])])
            used[j] = True
            pairs.append((int(i), j))
    return pairs


def _tie_levels(ref: dict, got: dict, pairs: list[tuple[int, int]], tie_tol: float) -> dict[int, float]:
    """Per label, the highest score at which two different detections (on either side, not a
    matched pair) score within `tie_tol` of each other: from there down, NMS and top-k may
    order, and so choose, differently in torch and onnxruntime."""
    n = len(ref["scores"])
    scores = np.concatenate([ref["scores"], got["scores"]]).astype(np.float64)
    labels = np.concatenate([ref["labels"], got["labels"]])
    partner = np.arange(len(scores))
    for i, j in pairs:
        partner[i], partner[n + j] = n + j, i
    levels: dict[int, float] = {}
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        s = scores[idx]
        close = np.abs(s[:, None] - s[None, :]) <= tie_tol
        close &= idx[:, None] != idx[None, :]
        close &= partner[idx][:, None] != idx[None, :]
        if close.any():
            levels[int(label)] = float(s[close.any(axis=1)].max())
    return levels


_TIED = "so no detection could be compared"


def compare_detections(model: torch.nn.Module, path: Path, spec: BundleModel,
                       gen: torch.Generator) -> tuple[float | None, float, bool, str]:
    """(max box-coordinate difference over matched detections, the input's larger side,
    passed, detail) for the detector's graph at `path` against torch on a random image."""
    import onnx
    import onnxruntime as ort

    names = output_names(spec)
    scale = float(max(spec.input_size[1:]))  # boxes are in input pixels
    x = torch.rand(1, *spec.input_size, generator=gen)  # an image in [0, 1], as the model expects

    def run(graph: str | bytes, state: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        options = ort.SessionOptions()
        values = {}
        if state is not None:  # these tensors instead of the graph's own initializers
            # (optimizations off: with them on, onnxruntime 1.32 computed with the file's values)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            proto = (onnx.load_from_string(graph) if isinstance(graph, bytes)
                     else onnx.load(graph, load_external_data=False))
            for init in proto.graph.initializer:
                if init.name in state:
                    values[init.name] = ort.OrtValue.ortvalue_from_numpy(state[init.name].contiguous().numpy())
                    options.add_initializer(init.name, values[init.name])
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        return dict(zip(names, session.run(names, {spec.onnx_input: x.numpy()})))

    graph: str | bytes = str(path)
    ref, got = _torch_detections(model, x), run(graph)
    post = _postprocessor(model)
    thresh = float(post.score_thresh) if post is not None else None
    cap = post.detections_per_img if post is not None else None
    lead = ""
    if len(ref["scores"]) == 0 and len(got["scores"]) == 0 and thresh is not None and thresh > 0:
        # Nothing scores above the threshold (untrained weights often don't): both empty says
        # little, so compare a graph traced with the threshold at 0 (every scored candidate kept).
        lead = (f"no detections above the score threshold {thresh:g} on the check input in either; with the "
                "threshold at 0 (a graph traced so, for this check only): ")
        try:
            with _score_threshold(post, 0.0):
                ref = _torch_detections(model, x)
                graph = trace_graph(model, spec).SerializeToString()
            got = run(graph)
        except Exception as exc:  # the exporter's errors have many types
            return None, scale, False, f"{lead}could not check ({exc})"
        thresh = 0.0
    diff, _, ok, detail = judge_detections(ref, got, scale, thresh, cap)
    if ok or not detail.endswith(_TIED):
        return diff, scale, ok, lead + detail
    # Every score ties (an untrained detector's activations fade to nothing, so its heads see
    # the same input everywhere). Compare once more, torch and onnxruntime on the same tensors
    # but with batch-norm statistics measured on random images, which spreads the scores. The
    # graph is the same; that its initializers are the stored tensors, byte for byte, the export
    # checked when it wrote them.
    twin = copy.deepcopy(model)
    norms = [m for m in twin.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return diff, scale, ok, lead + detail
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # the average over the batch seen
        m.train()
    again = "with batch-norm statistics measured on random images instead (the same graph and weights otherwise): "
    try:
        with torch.no_grad():
            twin(torch.rand(4, *spec.input_size, generator=gen))
        twin.eval()
        twin_post = _postprocessor(twin)
        if lead and twin_post is not None:
            twin_post.score_thresh = 0.0
        ref = _torch_detections(twin, x)
        got = run(graph, twin.state_dict())
    except Exception as exc:  # noqa: BLE001 (keep the first, inconclusive, answer)
        return diff, scale, ok, f"{lead}{detail}; {again}could not run ({exc})"
    diff, _, ok, second = judge_detections(ref, got, scale, thresh, cap)
    return diff, scale, ok, f"{lead}{detail}; {again}{second}"


def judge_detections(ref: dict, got: dict, scale: float, thresh: float | None = None,
                     cap: int | None = None) -> tuple[float | None, float, bool, str]:
    """Torch's detections `ref` against onnxruntime's `got` (dicts of numpy arrays: boxes,
    scores, labels, ...) for an input whose larger side is `scale` pixels, from a detector with
    score threshold `thresh` and at most `cap` detections per image. Returns (max box-coordinate
    difference over matched detections or None, scale, passed, detail).

    Passes when every detection on either side is matched (same label, score within
    DETECTION_TOLERANCE, each box coordinate within DETECTION_TOLERANCE * scale), except those
    a tie explains: NMS and top-k take candidates in score order, so two implementations whose
    scores differ by at most e choose alike until two candidates of a class score within 2e of
    each other (e: the largest score difference of the matched detections); below that score
    either may keep the other candidate, and every later choice in that class may differ. So a
    detection may go unmatched if it scores no higher than the highest such tie in its class
    (seen among both sides' detections), lies at the score threshold, or scores below the other
    side's lowest while the other side is full (`cap`). It fails, inconclusive, when some go
    unmatched and no match scores above its class's ties (every score tying, as with untrained
    weights), or when there are no detections at all."""
    box_tol = DETECTION_TOLERANCE * scale
    score_tol = DETECTION_TOLERANCE  # scores lie in [0, 1]
    for k in ("boxes", "scores", "labels"):
        if k not in got or ref[k].shape[1:] != got[k].shape[1:]:
            shape = got[k].shape if k in got else "missing"
            return None, scale, False, f"output '{k}': {shape} in onnxruntime, {ref[k].shape} in torch"
    pairs = _match(ref, got, box_tol, score_tol)
    noise = max((float(abs(ref["scores"][i] - got["scores"][j])) for i, j in pairs), default=score_tol)
    tie_tol = 2 * max(noise, 1e-5)
    levels = _tie_levels(ref, got, pairs, tie_tol)
    n_ref, n_got = len(ref["scores"]), len(got["scores"])

    def explained(side: dict, i: int, other: dict) -> bool:
        s = float(side["scores"][i])
        if s <= levels.get(int(side["labels"][i]), -1.0) + tie_tol:
            return True  # at or below a tie in its class
        if thresh is not None and abs(s - thresh) <= score_tol:
            return True  # at the score threshold
        # Cut by the cap on detections per image on the other side.
        return cap is not None and len(other["scores"]) >= cap and s <= float(other["scores"].min()) + tie_tol

    matched_ref = {i for i, _ in pairs}
    matched_got = {j for _, j in pairs}
    unmatched = [(ref, i, got) for i in range(n_ref) if i not in matched_ref]
    unmatched += [(got, j, ref) for j in range(n_got) if j not in matched_got]
    bad = [(side, i) for side, i, other in unmatched if not explained(side, i, other)]
    # Matches above their class's ties are the ones that must agree.
    clear = [(i, j) for i, j in pairs if float(ref["scores"][i]) > levels.get(int(ref["labels"][i]), -1.0) + tie_tol]

    diff = None
    parts = [f"{n_ref} torch / {n_got} onnxruntime detections, {len(pairs)} matched"]
    if pairs:
        i, j = (np.array(v) for v in zip(*pairs))
        diff = float(np.abs(ref["boxes"][i] - got["boxes"][j]).max())
        score_diff = float(np.abs(ref["scores"][i] - got["scores"][j]).max())
        parts[0] += (f" ({len(clear)} above any score tie; same label, max box diff {diff:.3g} px, tolerance "
                     f"{box_tol:.3g} = {DETECTION_TOLERANCE:g} * {scale:g} px; max score diff {score_diff:.3g}, "
                     f"tolerance {score_tol:.3g})")
        for k in ref:
            if k not in ("boxes", "scores", "labels") and k in got and ref[k].shape[1:] == got[k].shape[1:]:
                parts.append(f"max {k} diff {float(np.abs(ref[k][i] - got[k][j]).max()):.3g} (reported, not checked)")
    if unmatched:
        parts.append(f"{len(unmatched) - len(bad)} unmatched at or below a score tie in their class, at the "
                     "threshold or cut by the cap (NMS and top-k break ties their own way)")
    ok = not bad
    if bad:
        side, i = bad[0]
        who = "torch" if side is ref else "onnxruntime"
        parts.append(f"{len(bad)} unmatched that no tie explains, e.g. {who}'s label {int(side['labels'][i])} "
                     f"score {float(side['scores'][i]):.4g} box {np.round(side['boxes'][i], 2).tolist()}")
    elif not (n_ref or n_got):
        ok = False
        parts.append("inconclusive: no detections to compare")
    elif unmatched and not clear:
        ok = False
        parts.append("inconclusive: scores tie from the top of every class (weights that are not trained? or boxes "
                     f"that differ where scores agree), {_TIED}")
    return diff, scale, ok, "; ".join(parts)


__all__ = ["DETECTION_TOLERANCE", "DETECTION_TOLERANCE_TEXT", "compare_detections", "judge_detections"]
