"""Simulated label noise: corrupt a fraction of the training labels, reproducibly.

A noise model is a pure function ``fn(label, rng, **params) -> (noisy_label, drawn) | None``
of one (H, W) uint8 label, a numpy Generator and keyword parameters with defaults; it returns
the corrupted copy and a JSON-serialisable dict of what it drew, or None when this label cannot
be corrupted that way (e.g. it has no foreground). Models live in `NOISE_MODELS` and are added
with `@register("name")`.

`apply_noise` decides per sample: sample `id` draws from ``default_rng([seed, id])`` a
u ~ U(0, 1) first and is corrupted iff u < rate, then the model draws from the same generator.
So a sample's noise depends only on (seed, id, params), never on the order or the number of
samples, and raising the rate only adds noisy samples (the ones noisy at a lower rate keep
their exact corruption).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from selfcleanse_jax.data.cases import IGNORE_INDEX

NoiseResult = tuple[np.ndarray, dict[str, Any]] | None
"""A model's output: (noisy label, what was drawn), or None when it cannot corrupt the label."""
NoiseModel = Callable[..., NoiseResult]

NOISE_MODELS: dict[str, NoiseModel] = {}
"""Registered noise models by name; `apply_noise(kind=name)` looks them up here."""


def register(name: str) -> Callable[[NoiseModel], NoiseModel]:
    """Decorator adding a noise model to `NOISE_MODELS` under `name`."""

    def add(fn: NoiseModel) -> NoiseModel:
        if name in NOISE_MODELS or name == "none":
            raise ValueError(f"noise model {name!r} is already defined")
        NOISE_MODELS[name] = fn
        return fn

    return add


def default_params(kind: str) -> dict[str, Any]:
    """The keyword parameters of noise model `kind` with their defaults."""
    signature = inspect.signature(_model(kind))
    return {
        name: p.default
        for name, p in list(signature.parameters.items())[2:]
        if p.default is not inspect.Parameter.empty
    }


def resolve_params(kind: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults of `kind` updated with `params`; unknown names are an error."""
    resolved = default_params(kind)
    unknown = sorted(set(params or {}) - set(resolved))
    if unknown:
        raise ValueError(
            f"noise model {kind!r} has no parameter(s) {unknown}; known: {sorted(resolved)}"
        )
    resolved.update(params or {})
    return resolved


def _model(kind: str) -> NoiseModel:
    if kind not in NOISE_MODELS:
        raise ValueError(f"unknown noise kind {kind!r}; known: {['none', *sorted(NOISE_MODELS)]}")
    return NOISE_MODELS[kind]


def foreground_classes(label: np.ndarray) -> np.ndarray:
    """Sorted foreground class values present in a label (0 and IGNORE_INDEX excluded)."""
    values = np.unique(label)
    return values[(values != 0) & (values != IGNORE_INDEX)]


def scaled_radius_range(
    radius: tuple[int, int], shape: tuple[int, ...], reference_size: int | None
) -> tuple[int, int]:
    """Integer radius range (lo, hi) given at `reference_size` pixels, scaled to `shape`.

    Keeps the severity a fixed fraction of the field of view across image sizes; each end is
    rounded half up and at least 1 pixel.
    """
    lo, hi = (float(r) for r in radius)
    if not 0 < lo <= hi:
        raise ValueError(f"radius range must satisfy 0 < lo <= hi, got {radius}")
    scale = 1.0 if reference_size is None else min(shape) / reference_size
    lo_px = max(1, int(np.floor(lo * scale + 0.5)))
    return lo_px, max(lo_px, int(np.floor(hi * scale + 0.5)))


def dilate_class(label: np.ndarray, cls: int, radius: float) -> np.ndarray:
    """Copy of `label` where class `cls` grows by `radius` pixels over its neighbours."""
    mask = label == cls
    out = label.copy()
    if mask.any():
        out[ndimage.distance_transform_edt(~mask) <= radius] = cls
    return out


def erode_class(label: np.ndarray, cls: int, radius: float) -> np.ndarray:
    """Copy of `label` where class `cls` loses its pixels within `radius` of its edge to 0."""
    mask = label == cls
    out = label.copy()
    if mask.any() and not mask.all():
        out[mask & (ndimage.distance_transform_edt(mask) <= radius)] = 0
    return out


@register("boundary")
def boundary(
    label: np.ndarray,
    rng: np.random.Generator,
    radius: tuple[int, int] = (1, 3),
    p_dilate: float = 0.5,
    reference_size: int | None = 128,
) -> NoiseResult:
    """Inaccurate boundary delineation: each foreground class, in random order, is dilated
    (probability `p_dilate`) or eroded by a radius drawn uniformly from the integer range
    `radius`, given in pixels at `reference_size` (None: use it as is).

    Dilation overwrites the neighbouring classes, erosion turns the removed rim into
    background. The default, 1-3 px at 128 px (about 1-2% of the field of view, 3-8 mm at
    cardiac MRI spacing), is the size of inter-observer contour disagreement; at 64 px it
    becomes 1-2 px, since a radius under one pixel would change nothing.
    """
    classes = foreground_classes(label)
    if classes.size == 0:
        return None
    lo, hi = scaled_radius_range(radius, label.shape, reference_size)
    out = label
    changes = []
    for cls in rng.permutation(classes):
        r = int(rng.integers(lo, hi + 1))
        op = "dilate" if rng.random() < p_dilate else "erode"
        out = dilate_class(out, cls, r) if op == "dilate" else erode_class(out, cls, r)
        changes.append({"class": int(cls), "op": op, "radius": r})
    return out, {"changes": changes}


@register("missing")
def missing(label: np.ndarray, rng: np.random.Generator, unit: str = "class") -> NoiseResult:
    """Missing label: one structure set to background, chosen uniformly among the foreground
    classes present (`unit="class"`) or among their 8-connected components
    (`unit="component"`).
    """
    classes = foreground_classes(label)
    if classes.size == 0:
        return None
    if unit == "class":
        cls = int(rng.choice(classes))
        remove = label == cls
    elif unit == "component":
        components = []
        for c in classes:
            parts, count = ndimage.label(label == c, structure=np.ones((3, 3), bool))
            components += [(int(c), parts, k) for k in range(1, count + 1)]
        cls, parts, k = components[int(rng.integers(len(components)))]
        remove = parts == k
    else:
        raise ValueError(f"missing: unit must be 'class' or 'component', got {unit!r}")
    out = label.copy()
    out[remove] = 0
    return out, {"unit": unit, "class": cls, "size": int(remove.sum())}


def dice_per_class(noisy: np.ndarray, clean: np.ndarray) -> dict[int, float]:
    """Dice of noisy vs clean for each foreground class present in either label."""
    classes = np.union1d(foreground_classes(noisy), foreground_classes(clean))
    scores = {}
    for c in classes:
        a, b = noisy == c, clean == c
        scores[int(c)] = float(2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b)))
    return scores


@dataclasses.dataclass
class NoiseRealisation:
    """One realisation of label noise over a set of samples, and its noise card."""

    noisy_labels: np.ndarray  # (N, H, W) uint8
    is_noisy: np.ndarray  # (N,) bool, True where the label really differs from the clean one
    records: list[dict[str, Any]]  # per sample: id, noisy, kind, params, pixels_changed, dice
    kind: str = "none"
    rate: float = 0.0
    seed: int = 0
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: int = 2

    def summary(self) -> dict[str, Any]:
        """Aggregate: realised rate, samples the model could not corrupt, mean Dice per class
        (over noisy samples where the class is present in either label)."""
        noisy = [r for r in self.records if r["noisy"]]
        per_class = {}
        for c in range(1, self.num_classes):
            scores = [r["dice"][str(c)] for r in noisy if str(c) in r["dice"]]
            per_class[str(c)] = float(np.mean(scores)) if scores else None
        mean_dice = [r["dice_noisy_vs_clean"] for r in noisy]
        return {
            "num_samples": len(self.records),
            "num_noisy": len(noisy),
            "realised_rate": len(noisy) / len(self.records) if self.records else 0.0,
            "num_uncorruptible": sum(1 for r in self.records if "uncorruptible" in r),
            "mean_dice_noisy_vs_clean": float(np.mean(mean_dice)) if mean_dice else None,
            "mean_dice_per_class": per_class,
            "mean_pixels_changed": (
                float(np.mean([r["pixels_changed"] for r in noisy])) if noisy else 0.0
            ),
        }

    def to_json(self) -> str:
        """The noise card: settings, summary and per-sample records, as JSON text."""
        card = {
            "kind": self.kind,
            "rate": self.rate,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "params": self.params,
            "summary": self.summary(),
            "records": self.records,
        }
        return json.dumps(card, indent=1)

    def save(self, path: Path) -> Path:
        """Write the noise card to `path` (JSON) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path


def _clean_record(sample_id: int, kind: str) -> dict[str, Any]:
    return {
        "id": sample_id,
        "noisy": False,
        "kind": kind,
        "params": None,
        "pixels_changed": 0,
        "dice": {},
        "dice_noisy_vs_clean": 1.0,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def apply_noise(
    labels: np.ndarray,
    kind: str,
    rate: float,
    seed: int,
    num_classes: int,
    params: Mapping[str, Any] | None = None,
    ids: np.ndarray | None = None,
) -> NoiseRealisation:
    """Corrupt about `rate` of the (N, H, W) labels with noise model `kind` ("none": no-op).

    Sample i uses ``default_rng([seed, ids[i]])`` (ids default to 0..N-1): it is corrupted iff
    its first draw u < rate and the model can corrupt it; labels without foreground stay clean
    and their record says so ("uncorruptible").
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (N, H, W), got shape {labels.shape}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")
    bad = (labels < 0) | ((labels >= num_classes) & (labels != IGNORE_INDEX))
    if bad.any():
        raise ValueError(
            f"labels hold values outside 0..{num_classes - 1}: {np.unique(labels[bad])}"
        )
    labels = labels.astype(np.uint8)
    ids = np.arange(len(labels)) if ids is None else np.asarray(ids)
    if ids.shape != (len(labels),) or (ids < 0).any():
        raise ValueError(f"ids must be {len(labels)} non-negative integers, got shape {ids.shape}")
    resolved = {} if kind == "none" else resolve_params(kind, params)
    if kind == "none" and params:
        raise ValueError(f"noise kind 'none' takes no params, got {dict(params)}")
    noisy_labels = labels.copy()
    is_noisy = np.zeros(len(labels), bool)
    records = []
    for i, sample_id in enumerate(int(s) for s in ids):
        record = _clean_record(sample_id, kind)
        records.append(record)
        if kind == "none":
            continue
        rng = np.random.default_rng([seed, sample_id])
        if rng.random() >= rate:
            continue
        result = NOISE_MODELS[kind](labels[i], rng, **resolved)
        if result is None:
            record["uncorruptible"] = "no foreground"
            continue
        noisy, drawn = result
        changed = int(np.sum(noisy != labels[i]))
        record["params"] = _jsonable(drawn)
        record["pixels_changed"] = changed
        if changed == 0:
            record["uncorruptible"] = "corruption changed no pixel"
            continue
        dice = dice_per_class(noisy, labels[i])
        record.update(
            noisy=True,
            dice={str(c): d for c, d in dice.items()},
            dice_noisy_vs_clean=float(np.mean(list(dice.values()))),
        )
        noisy_labels[i] = noisy
        is_noisy[i] = True
    return NoiseRealisation(
        noisy_labels=noisy_labels,
        is_noisy=is_noisy,
        records=records,
        kind=kind,
        rate=float(rate),
        seed=int(seed),
        params=_jsonable(resolved),
        num_classes=int(num_classes),
    )
