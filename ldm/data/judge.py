"""The attribute classifier ("judge") that grades images of :mod:`ldm.data.shapes` scenes.

A small CNN reads a 64x64 RGB image and predicts, in one forward pass:

* ``background``: the background colour (4 classes);
* ``layout``: which position cells are occupied, one of the 7 layouts a scene
  can have (:data:`ldm.data.shapes.LAYOUTS`: a lone object in one of the five
  cells, or left + right, or top + bottom);
* for each of the 5 cells: the shape, colour and size of the object there
  (trained only on occupied cells; ignored for empty ones).

Decoding takes the most likely layout and, for each of its cells, the most
likely attributes, which yields a :class:`~ldm.data.shapes.SceneSpec` (two
objects come out as "left of" / "above", in reading order). Predicting per cell
makes one- and two-object scenes the same problem and lets
:func:`~ldm.data.shapes.scene_matches` compare prompt and image cell by cell.

The penultimate 256-d activation is the feature space of
:func:`frechet_distance` (an FID-like score between two image sets).

The shipped weights live in ``tools/judge/judge.safetensors`` (training
command in ``tools/judge/README.md``; trainer: ``tools/attribute_classifier.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    LAYOUTS,
    POSITIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    sample_scene,
    scene_matches,
    scene_rng,
)
from ldm_serve.errors import CheckpointError, ConfigError, InvalidInput

__all__ = [
    "DEFAULT_WEIGHTS",
    "IGNORE",
    "JudgeConfig",
    "SceneJudge",
    "accuracy_report",
    "decode",
    "encode_labels",
    "frechet_distance",
    "frechet_distance_from_stats",
    "images_to_tensor",
    "judge_features",
    "judge_scene",
    "judge_scenes",
    "load_judge",
    "save_judge",
    "scene_batch",
    "scene_matches",
    "split_logits",
]

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "tools" / "judge" / "judge.safetensors"
"""Where the shipped judge weights are (repository checkout)."""

_NUM_CELLS = len(POSITIONS)
_HEADS: tuple[tuple[str, int], ...] = (
    ("background", len(BACKGROUNDS)),
    ("layout", len(LAYOUTS)),
    ("shape", _NUM_CELLS * len(SHAPES)),
    ("colour", _NUM_CELLS * len(COLOURS)),
    ("size", _NUM_CELLS * len(SIZES)),
)
# Class lists the weights were trained for; stored in the file and checked at load time.
_CLASSES: dict[str, list[str]] = {
    "background": list(BACKGROUNDS),
    "layout": ["+".join(cells) for cells in LAYOUTS],
    "position": list(POSITIONS),
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "size": list(SIZES),
}
IGNORE = -100  # label of an attribute in an empty cell (cross-entropy ignore_index)


@dataclass(frozen=True)
class JudgeConfig:
    """Widths of the judge CNN: conv stages (each halves the resolution) and the feature size."""

    widths: tuple[int, int, int] = (32, 64, 128)
    reduce_channels: int = 32
    features: int = 256


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SceneJudge(nn.Module):
    """CNN: three stages (stride-2 conv + conv) 64 -> 8 px, 1x1 reduce, flatten, MLP, linear heads.

    Position matters, so the 8x8 map is flattened rather than pooled.
    """

    def __init__(self, config: JudgeConfig | None = None) -> None:
        super().__init__()
        self.config = config or JudgeConfig()
        c = self.config
        layers: list[nn.Module] = []
        cin = 3
        for width in c.widths:
            layers += [_conv_bn(cin, width, 2), _conv_bn(width, width, 1)]
            cin = width
        layers += [nn.Conv2d(cin, c.reduce_channels, 1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(c.widths)
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(c.reduce_channels * side * side, c.features), nn.ReLU(inplace=True)
        )
        self.heads = nn.Linear(c.features, sum(n for _, n in _HEADS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, 3, 64, 64] in [-1, 1] -> features [B, F] (the Frechet-distance space)."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, 3, 64, 64] in [-1, 1] -> all logits [B, 4 + 7 + 5 * (4 + 6 + 2)]; see :func:`split_logits`."""
        return self.heads(self.features(x))


def split_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of the flat logits: background [B, 4], layout [B, 7], shape [B, 5, 4], colour [B, 5, 6], size [B, 5, 2]."""
    out: dict[str, torch.Tensor] = {}
    start = 0
    for name, n in _HEADS:
        part = logits[:, start : start + n]
        out[name] = (
            part if name in ("background", "layout") else part.reshape(logits.shape[0], _NUM_CELLS, -1)
        )
        start += n
    return out


def encode_labels(specs: Sequence[SceneSpec]) -> dict[str, torch.Tensor]:
    """Class-index targets: background [B], layout [B], shape / colour / size [B, 5] (``IGNORE`` if empty)."""
    layout_index = {cells: i for i, cells in enumerate(LAYOUTS)}
    n = len(specs)
    labels = {
        "background": torch.empty(n, dtype=torch.long),
        "layout": torch.empty(n, dtype=torch.long),
        **{
            name: torch.full((n, _NUM_CELLS), IGNORE, dtype=torch.long)
            for name in ("shape", "colour", "size")
        },
    }
    for row, spec in enumerate(specs):
        labels["background"][row] = BACKGROUNDS.index(spec.background)
        cells = spec.cells()
        labels["layout"][row] = layout_index[tuple(p for p in POSITIONS if p in cells)]
        for cell, obj in cells.items():
            col = POSITIONS.index(cell)
            labels["shape"][row, col] = SHAPES.index(obj.shape)
            labels["colour"][row, col] = COLOURS.index(obj.colour)
            labels["size"][row, col] = SIZES.index(obj.size)
    return labels


def decode(logits: torch.Tensor) -> list[SceneSpec]:
    """Most likely scene per row: argmax layout, then argmax attributes in its cells."""
    parts = {name: t.argmax(dim=-1).tolist() for name, t in split_logits(logits.detach()).items()}
    specs: list[SceneSpec] = []
    for row in range(logits.shape[0]):
        cells = LAYOUTS[parts["layout"][row]]
        objects = tuple(
            ObjectSpec(
                shape=SHAPES[parts["shape"][row][POSITIONS.index(cell)]],
                colour=COLOURS[parts["colour"][row][POSITIONS.index(cell)]],
                size=SIZES[parts["size"][row][POSITIONS.index(cell)]],
                position=cell,
            )
            for cell in cells
        )
        # LAYOUTS lists two-object cells in reading order: (left, right) or (top, bottom).
        relation = None if len(cells) == 1 else ("left of" if cells[0] == "left" else "above")
        specs.append(SceneSpec(objects, BACKGROUNDS[parts["background"][row]], relation))
    return specs


ImageInput = Image.Image | np.ndarray | torch.Tensor


def images_to_tensor(images: ImageInput | Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """Convert images to the judge's input ``[B, 3, 64, 64]`` float in [-1, 1].

    Accepts a PIL image or a list of them, uint8 arrays ``[H, W, 3]`` / ``[B, H, W, 3]``
    (or a list of ``[H, W, 3]``), or a float tensor ``[B, 3, H, W]`` / ``[3, H, W]``
    in [-1, 1] (what the pipeline decodes). Other sizes are resized to 64x64 (antialiased).
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float()
        if x.ndim == 3:
            x = x[None]
    else:
        if isinstance(images, Image.Image | np.ndarray):
            images = [images] if isinstance(images, Image.Image) or images.ndim == 3 else list(images)
        arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
        if not arrays:
            raise InvalidInput("images", "no images given")
        batch = np.stack(arrays)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise InvalidInput(
                "images", f"expected uint8 RGB images [H, W, 3], got {batch.dtype} {batch.shape}"
            )
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.ndim != 4 or x.shape[1] != 3:
        raise InvalidInput("images", f"expected a [B, 3, H, W] tensor, got shape {tuple(x.shape)}")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(
            x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return x.contiguous()


def save_judge(model: SceneJudge, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write the weights (fp16) with the config and class lists as safetensors metadata."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()
    }
    config = asdict(model.config)
    metadata = {"config": json.dumps(config), "classes": json.dumps(_CLASSES), **(extra or {})}
    save_file(tensors, str(out), metadata=metadata)
    return out


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_judge(path: str | Path | None = None) -> SceneJudge:
    """Load judge weights (default: :data:`DEFAULT_WEIGHTS`) into an eval-mode CPU model.

    Raises:
        CheckpointError: the file is absent or its tensors do not fit the model.
        ConfigError: it was trained for other class lists than this module's.
    """
    return _load_judge_cached(str(Path(path or DEFAULT_WEIGHTS).resolve()))


@lru_cache(maxsize=4)
def _load_judge_cached(path: str) -> SceneJudge:
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(
            f"judge weights {file} not found (train them with tools/attribute_classifier.py)"
        )
    metadata = _read_metadata(file)
    try:
        classes = json.loads(metadata["classes"])
        raw = json.loads(metadata["config"])
        config = JudgeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"judge weights {file} lack a readable config / class list: {exc}") from exc
    if classes != _CLASSES:
        raise ConfigError(
            f"judge weights {file} were trained for classes {classes}, this code has {_CLASSES}"
        )
    model = SceneJudge(config)
    state = load_file(str(file))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"judge weights {file} do not fit the judge",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def judge_scenes(
    images: ImageInput | Sequence[Image.Image | np.ndarray],
    judge: SceneJudge | None = None,
    batch_size: int = 256,
) -> list[SceneSpec]:
    """What the judge sees in each image (see :func:`images_to_tensor` for accepted inputs)."""
    model = judge or load_judge()
    x = images_to_tensor(images)
    return [spec for chunk in x.split(batch_size) for spec in decode(model(chunk))]


def judge_scene(image: ImageInput, judge: SceneJudge | None = None) -> SceneSpec:
    """What the judge sees in one image."""
    (spec,) = judge_scenes(image, judge)
    return spec


@torch.no_grad()
def judge_features(
    images: ImageInput | Sequence[Image.Image | np.ndarray],
    judge: SceneJudge | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Penultimate-layer features ``[B, F]`` (float64) for :func:`frechet_distance`."""
    model = judge or load_judge()
    x = images_to_tensor(images)
    return torch.cat([model.features(chunk) for chunk in x.split(batch_size)]).double().numpy()


def frechet_distance_from_stats(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    ``|mu_a - mu_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^{1/2})``. The
    trace of the square root is taken as ``tr((A^{1/2} B A^{1/2})^{1/2})`` (the
    same eigenvalues, but of a symmetric PSD matrix, so ``eigh`` is exact and stable).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.size, mu_a.size):
        raise InvalidInput(
            "stats", f"shapes differ: {mu_a.shape}, {cov_a.shape} vs {mu_b.shape}, {cov_b.shape}"
        )
    eigvals, eigvecs = np.linalg.eigh((cov_a + cov_a.T) / 2)
    sqrt_a = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, F]`` (e.g. from :func:`judge_features`)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InvalidInput("features", f"need two [N>=2, F] arrays of equal F, got {a.shape} and {b.shape}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def scene_batch(seed: int, start: int, count: int) -> tuple[np.ndarray, list[SceneSpec]]:
    """Scenes ``start .. start+count-1`` of stream ``seed``: uint8 images [count, 64, 64, 3] and their specs."""
    scenes = [sample_scene(scene_rng(seed, i)) for i in range(start, start + count)]
    return np.stack([np.asarray(s.image) for s in scenes]), [s.spec for s in scenes]


def accuracy_report(specs: Sequence[SceneSpec], judged: Sequence[SceneSpec]) -> dict[str, float]:
    """Fraction of scenes on which each :func:`scene_matches` criterion holds, plus counts.

    Also splits ``objects`` by object count (``objects_1``, ``objects_2``).
    """
    rows = [scene_matches(want, got) for want, got in zip(specs, judged, strict=True)]
    report = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    for n in (1, 2):
        subset = [r["objects"] for r, s in zip(rows, specs, strict=True) if len(s.objects) == n]
        if subset:
            report[f"objects_{n}"] = float(np.mean(subset))
    report["scenes"] = float(len(rows))
    return report
