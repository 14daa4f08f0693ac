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

Models: `boundary`, `missing`, `markov` (Spatial Correction's boundary Markov process),
`affine` (label misregistration), `edge` (disks at edge points) and `mixed` (one of them per
sample). `PRESETS` name settings of a model and are accepted wherever a kind is.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from selfcleanse_jax import atomic
from selfcleanse_jax.data.cases import IGNORE_INDEX

NoiseResult = tuple[np.ndarray, dict[str, Any]] | None
"""A model's output: (noisy label, what was drawn), or None when it cannot corrupt the label."""
NoiseModel = Callable[..., NoiseResult]

NOISE_MODELS: dict[str, NoiseModel] = {}
"""Registered noise models by name; `apply_noise(kind=name)` looks them up here."""


def register(name: str) -> Callable[[NoiseModel], NoiseModel]:
    """Decorator adding a noise model to `NOISE_MODELS` under `name`."""

    def add(fn: NoiseModel) -> NoiseModel:
        if name in NOISE_MODELS or name in PRESETS or name == "none":
            raise ValueError(f"noise model {name!r} is already defined")
        NOISE_MODELS[name] = fn
        return fn

    return add


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "markov-expand": ("markov", {"theta1": 0.8}),
    "markov-shrink": ("markov", {"theta1": 0.2}),
    "boundary-dilate": ("boundary", {"p_dilate": 1.0}),
    "boundary-erode": ("boundary", {"p_dilate": 0.0}),
    "missing-component": ("missing", {"unit": "component"}),
    "affine-mild": ("affine", {"beta": 0.1}),
    "affine-severe": ("affine", {"beta": 0.4}),
    "edge-add": ("edge", {"p_add": 1.0}),
    "edge-remove": ("edge", {"p_add": 0.0}),
    **{
        f"sc-{data}-{effect}": (
            "markov",
            {
                "steps": steps,
                "theta1": theta1,
                "theta2": 0.05,
                "theta3": 0.2,
                "band": None,
                "sigma": 2.0,
                "truncate": 1.0,
                "reference_size": None,
            },
        )
        for data, steps in (("jsrt", 180), ("isic", 200))
        for effect, theta1 in (("expand", 0.8), ("shrink", 0.2))
    },
    "sc-de": ("boundary", {"radius": (7, 9), "p_dilate": 0.5, "reference_size": None}),
}
"""Named settings of a model, usable wherever a kind is: name -> (model, params). The `sc-*`
presets are Spatial Correction's published settings (Yao et al., ICLR 2023, the table of its
repository's README: JSRT lung/heart J1/J2, ISIC I2/I1, dilate/erode J3/I3), named by effect;
the others are named by effect with this project's numbers (see README). `PROTOCOLS` are
presets too."""

STRUCTURE = "structure"
"""`classes` value of the missing-structure protocols: resolved by `apply_noise` from the
dataset's class names to the class whose name is in `STRUCTURE_NAMES`."""

STRUCTURE_NAMES = ("tumour", "tumor", "lesion", "cancer", "right ventricle", "rv")
"""Class names (lower case) of the structure that annotators leave out, in order of
preference: lesions where the dataset has them (LiTS, MSD liver, the liver phantom), else the
right ventricle (ACDC, the cardiac phantom)."""

_LEFT_OUT = {"unit": "class", "classes": STRUCTURE, "fill": "surrounding"}
_BIASED_BOUNDARY = {"radius": (3, 5), "p_dilate": 0.8, "reference_size": 128}
_SWEEP_MIX = {
    "weights": {"boundary-dilate": 1.0, "boundary-erode": 1.0, "edge": 1.0},
    "model_params": {
        "boundary-dilate": {"radius": (3, 5)},
        "boundary-erode": {"radius": (3, 5)},
    },
}

PROTOCOLS: dict[str, tuple[str, dict[str, Any], float]] = {
    "paper-b": ("boundary", _BIASED_BOUNDARY, 0.5),
    "paper-b-70": ("boundary", _BIASED_BOUNDARY, 0.7),
    "paper-l": ("missing", _LEFT_OUT, 0.5),
    "paper-l-70": ("missing", _LEFT_OUT, 0.7),
    **{f"sweep-{rate}": ("mixed", _SWEEP_MIX, rate) for rate in (0.3, 0.5, 0.7)},
}
"""Noise protocols that hurt, as published work uses them: name -> (model, params, rate).

- `paper-b`, `paper-b-70` (the paper's B-model, inaccurate boundaries): half (70%) of the
  slices have every structure dilated with probability 0.8, else eroded, by 3-5 px at 128 px;
- `paper-l`, `paper-l-70` (the paper's L-model, missing labels): half (70%) of the slices that
  show it lose one whole structure, the dataset's lesions or else its right ventricle
  (`STRUCTURE_NAMES`), labelled as what surrounds it (a left-out tumour becomes liver);
- `sweep-0.3`, `-0.5`, `-0.7` (confident learning's JSRT protocol, Zhang et al., MICCAI
  2020): that fraction of the slices noisy, each one dilated, eroded (3-5 px at 128 px) or
  given disks at edge points (`edge` defaults), with equal probability.

The rate is the default of `noise.rate` for a protocol (`default_rate`); a rate given
explicitly still applies."""

PRESETS.update({name: (model, params) for name, (model, params, _) in PROTOCOLS.items()})

DEFAULT_RATE = 0.5


def default_rate(kind: str) -> float:
    """The fraction of noisy slices `kind` stands for: a protocol's own, else `DEFAULT_RATE`."""
    return PROTOCOLS[kind][2] if kind in PROTOCOLS else DEFAULT_RATE


def resolve_rate(kind: str, rate: float) -> float:
    """`rate` when it is given (>= 0), else the default of `kind` (`default_rate`)."""
    return default_rate(kind) if rate is None or rate < 0 else float(rate)


def structure_classes(class_names: list[str] | tuple[str, ...] | None) -> list[int]:
    """The class a missing-structure protocol leaves out, from the dataset's class names."""
    names = [str(n).strip().lower() for n in class_names or ()]
    for wanted in STRUCTURE_NAMES:
        if wanted in names[1:]:
            return [names.index(wanted, 1)]
    raise ValueError(
        f"no class to leave out among the classes {list(class_names or ())}: name one with "
        "--config.noise.params.classes=[K] (or --param classes=[K])"
    )


def model_of(kind: str) -> str:
    """The registered model behind `kind` (a model name or a preset name)."""
    if kind in PRESETS:
        return PRESETS[kind][0]
    _model(kind)
    return kind


def default_params(kind: str) -> dict[str, Any]:
    """The keyword parameters of noise model (or preset) `kind` with their defaults."""
    base = model_of(kind)
    signature = inspect.signature(_model(base))
    defaults = {
        name: p.default
        for name, p in list(signature.parameters.items())[2:]
        if p.default is not inspect.Parameter.empty
    }
    if kind in PRESETS:
        defaults.update(PRESETS[kind][1])
    return defaults


def resolve_params(kind: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults of `kind` (a model or a preset) updated with `params`; unknown names are an
    error."""
    resolved = default_params(kind)
    unknown = sorted(set(params or {}) - set(resolved))
    if unknown:
        raise ValueError(
            f"noise model {kind!r} has no parameter(s) {unknown}; known: {sorted(resolved)}"
        )
    resolved.update(params or {})
    return resolved


def _resolve(kind: str, params: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    return model_of(kind), resolve_params(kind, params)


def _model(kind: str) -> NoiseModel:
    if kind not in NOISE_MODELS:
        raise ValueError(
            f"unknown noise kind {kind!r}; known: {['none', *sorted(NOISE_MODELS)]}, "
            f"presets: {sorted(PRESETS)}"
        )
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
def missing(
    label: np.ndarray,
    rng: np.random.Generator,
    unit: str = "class",
    classes: list[int] | None = None,
    fill: str = "background",
) -> NoiseResult:
    """Missing label: one structure left out, chosen uniformly among the foreground classes
    present (`unit="class"`) or among their 8-connected components (`unit="component"`), of
    the classes in `classes` (None: every class). A label without any of them cannot be
    corrupted: e.g. `classes=[2]` with `unit="component"` on LiTS leaves out one tumour of
    the slices that have one (missing lesions).

    The left-out pixels become background (`fill="background"`) or, with
    `fill="surrounding"`, take the label that surrounds each left-out component most (its
    one-pixel outer rim): a tumour left out of a liver label becomes liver, as when an
    annotator outlines the organ and misses the lesion in it.
    """
    classes = _select_classes(label, classes)
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
    if fill not in ("background", "surrounding"):
        raise ValueError(f"missing: fill must be 'background' or 'surrounding', got {fill!r}")
    out = label.copy()
    out[remove] = 0
    if fill == "surrounding":
        parts, count = ndimage.label(remove, structure=np.ones((3, 3), bool))
        for k in range(1, count + 1):
            part = parts == k
            rim = ndimage.binary_dilation(part, structure=np.ones((3, 3), bool)) & ~remove
            around = label[rim]
            around = around[around != IGNORE_INDEX]
            out[part] = np.bincount(around).argmax() if around.size else 0
    return out, {"unit": unit, "class": cls, "size": int(remove.sum())}


def _scaled(value: float, shape: tuple[int, ...], reference_size: int | None) -> float:
    """A length given in pixels at `reference_size`, in pixels at `shape`."""
    return float(value) if reference_size is None else float(value) * min(shape) / reference_size


def _select_classes(label: np.ndarray, classes: Any) -> np.ndarray:
    """Foreground classes present in `label`, restricted to `classes` (None: all of them)."""
    present = foreground_classes(label)
    if classes is None:
        return present
    return present[np.isin(present, np.asarray(list(classes), dtype=np.int64))]


_CROSS = ndimage.generate_binary_structure(2, 1)


@register("markov")
def markov(
    label: np.ndarray,
    rng: np.random.Generator,
    steps: int = 8,
    theta1: float = 0.5,
    theta2: float = 0.5,
    theta3: float = 0.05,
    band: float | None = 2.0,
    sigma: float = 1.0,
    truncate: float = 4.0,
    classes: list[int] | None = None,
    reference_size: int | None = 128,
) -> NoiseResult:
    """Boundary Markov process of Spatial Correction (Yao et al., ICLR 2023, "Learning to
    segment from noisy annotations: a spatial correction approach").

    For each foreground class in `classes` (None: every class present), in random order:
    `steps` Markov steps (given at `reference_size` pixels and scaled to the image, at least 1);
    at each step the mask expands with probability `theta1`, else shrinks, and each pixel of
    the corresponding 4-connected boundary (the outer rim when expanding, the inner rim when
    shrinking) flips with probability `theta2`. Then i.i.d. flips with probability `theta3`,
    restricted (our default) to a band of `band` pixels around the resulting boundary or, with
    `band=None`, anywhere in the image as in the authors' code; then a Gaussian blur of width
    `sigma` (kernel radius `truncate * sigma`) re-thresholded at 0.5. Added pixels overwrite
    whatever was there, removed pixels become background. As in the authors' released
    `noise_generator.py`, theta1 is the probability of an *expansion* step (that code's
    comments say "erode" on both branches). Defaults are ours (unbiased, theta1 = 0.5); the
    `sc-*` presets are the authors' published settings.
    """
    selected = _select_classes(label, classes)
    if selected.size == 0:
        return None
    n_steps = max(1, int(round(_scaled(steps, label.shape, reference_size))))
    width = None if band is None else _scaled(band, label.shape, reference_size)
    out = label.copy()
    changes = []
    for cls in rng.permutation(selected):
        mask = out == cls
        if not mask.any():  # overwritten by a class corrupted before it
            continue
        before = mask.copy()
        expansions = 0
        for _ in range(n_steps):
            expand = rng.random() < theta1
            expansions += int(expand)
            if expand:
                rim = ndimage.binary_dilation(mask, _CROSS) & ~mask
            else:
                rim = mask & ~ndimage.binary_erosion(mask, _CROSS, border_value=1)
            flip = rim & (rng.random(mask.shape) < theta2)
            mask = mask ^ flip
        if theta3 > 0:
            flips = rng.random(mask.shape) < theta3
            if width is not None:
                flips &= (ndimage.distance_transform_edt(~mask) <= width) & (
                    ndimage.distance_transform_edt(mask) <= width
                )
            mask = mask ^ flips
        if sigma > 0:
            blurred = ndimage.gaussian_filter(mask.astype(np.float32), sigma, truncate=truncate)
            mask = blurred > 0.5
        out[before & ~mask] = 0
        out[mask & ~before] = cls
        changes.append(
            {
                "class": int(cls),
                "steps": n_steps,
                "expansions": expansions,
                "area_before": int(before.sum()),
                "area_after": int(mask.sum()),
            }
        )
    return out, {"changes": changes}


def _rigid(label: np.ndarray, angle_deg: float, shift: np.ndarray, centre: np.ndarray):
    """`label` rotated by `angle_deg` about `centre`, then translated by `shift` (pixels),
    nearest-neighbour resampled, background outside the field of view."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    inverse = rot.T  # output o comes from input R^-1 (o - c - t) + c
    offset = centre - inverse @ (centre + shift)
    return ndimage.affine_transform(label, inverse, offset=offset, order=0, mode="constant", cval=0)


def mismatch_fraction(noisy: np.ndarray, clean: np.ndarray) -> float:
    """Fraction of the clean foreground pixels whose label differs in `noisy` (affine's beta)."""
    fg = (clean > 0) & (clean != IGNORE_INDEX)
    return float(np.sum((noisy != clean) & fg) / max(1, fg.sum()))


@register("affine")
def affine(
    label: np.ndarray,
    rng: np.random.Generator,
    max_angle: float = 30.0,
    beta: float = 0.2,
    tolerance: float = 0.02,
) -> NoiseResult:
    """Misregistration of the label against the image, after Li et al. (MICCAI 2021): the
    whole label is rotated about its foreground centroid by an angle drawn uniformly in
    +-`max_angle` degrees and translated in a random direction by the distance at which the
    mismatch (`mismatch_fraction`: fraction of the clean foreground pixels that change label)
    reaches `beta`; if the rotation alone exceeds beta the angle is scaled down instead. Both
    searches are bisections to within `tolerance`; nearest-neighbour resampling
    (scipy.ndimage.affine_transform, order 0). Defaults beta = 0.2, 30 degrees.
    """
    fg = (label > 0) & (label != IGNORE_INDEX)
    if not fg.any():
        return None
    if not 0 < beta < 1:
        raise ValueError(f"affine: beta must lie in (0, 1), got {beta}")
    centre = np.array(ndimage.center_of_mass(fg))
    angle = float(rng.uniform(-max_angle, max_angle))
    direction_angle = float(rng.uniform(0, 2 * np.pi))
    direction = np.array([np.sin(direction_angle), np.cos(direction_angle)])

    def error(angle_deg: float, distance: float) -> tuple[float, np.ndarray]:
        moved = _rigid(label, angle_deg, distance * direction, centre)
        return mismatch_fraction(moved, label), moved

    err, moved = error(angle, 0.0)
    distance = 0.0
    if err > beta:  # shrink the angle
        lo, hi = 0.0, 1.0
        for _ in range(20):
            mid = (lo + hi) / 2
            err, moved = error(angle * mid, 0.0)
            if abs(err - beta) <= tolerance:
                break
            lo, hi = (mid, hi) if err < beta else (lo, mid)
        angle *= mid
    elif err < beta - tolerance:  # translate
        lo, hi = 0.0, float(max(label.shape))
        for _ in range(30):
            mid = (lo + hi) / 2
            err, moved = error(angle, mid)
            if abs(err - beta) <= tolerance:
                break
            lo, hi = (mid, hi) if err < beta else (lo, mid)
        distance = mid
    ignore = label == IGNORE_INDEX
    moved = np.where(ignore, IGNORE_INDEX, np.where(moved == IGNORE_INDEX, 0, moved))
    return moved.astype(np.uint8), {
        "angle": angle,
        "shift": (distance * direction).tolist(),
        "mismatch": mismatch_fraction(moved, label),
    }


@register("edge")
def edge(
    label: np.ndarray,
    rng: np.random.Generator,
    fraction: float = 0.05,
    radius: tuple[int, int] = (2, 5),
    p_add: float = 0.5,
    classes: list[int] | None = None,
    reference_size: int | None = 128,
) -> NoiseResult:
    """Disks added or removed at edge points, after the JSRT noise recipes of the
    confident-learning segmentation work (Zhang et al., MICCAI 2020) and PyMIC's noisy-label
    examples: for each class in `classes` (None: all present), a `fraction` of its edge pixels
    (inner 4-connected rim) become disk centres; each disk, of integer radius drawn in
    `radius` (pixels at `reference_size`), is added to the class (probability `p_add`,
    overwriting other labels) or removed from it (its pixels of this class become
    background). The default numbers are ours, not the papers'.
    """
    selected = _select_classes(label, classes)
    if selected.size == 0:
        return None
    lo, hi = scaled_radius_range(radius, label.shape, reference_size)
    out = label.copy()
    yy, xx = np.mgrid[: label.shape[0], : label.shape[1]]
    changes = []
    for cls in rng.permutation(selected):
        mask = out == cls
        rim = mask & ~ndimage.binary_erosion(mask, _CROSS, border_value=1)
        points = np.argwhere(rim)
        if len(points) == 0:
            continue
        count = max(1, int(round(fraction * len(points))))
        chosen = points[rng.choice(len(points), size=min(count, len(points)), replace=False)]
        added = removed = 0
        for y, x in chosen:
            r = int(rng.integers(lo, hi + 1))
            add = rng.random() < p_add
            y0, y1 = max(0, y - r), min(label.shape[0], y + r + 1)
            x0, x1 = max(0, x - r), min(label.shape[1], x + r + 1)
            disk = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= r * r
            window = out[y0:y1, x0:x1]
            if add:
                window[disk & (window != IGNORE_INDEX)] = cls
                added += 1
            else:
                window[disk & (window == cls)] = 0
                removed += 1
        changes.append({"class": int(cls), "disks_added": added, "disks_removed": removed})
    return out, {"changes": changes}


MIXED_DEFAULT = ("boundary", "missing", "markov", "affine", "edge")


@register("mixed")
def mixed(
    label: np.ndarray,
    rng: np.random.Generator,
    weights: Mapping[str, float] | None = None,
    model_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> NoiseResult:
    """One model per sample, drawn with `weights` (name -> weight; None: uniform over
    boundary, missing, markov, affine and edge; names may be presets), run with its defaults
    updated by `model_params[name]`. The record's params say which model was used ("model")
    and what it drew. Draws come from the sample's own generator, so the choice depends only
    on (seed, id, params).
    """
    weights = dict.fromkeys(MIXED_DEFAULT, 1.0) if weights is None else dict(weights)
    names = sorted(weights)
    if not names or "mixed" in names:
        raise ValueError(f"mixed: weights must name other models, got {names}")
    p = np.array([float(weights[n]) for n in names])
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"mixed: weights must be non-negative with a positive sum, got {weights}")
    name = names[int(rng.choice(len(names), p=p / p.sum()))]
    base, resolved = _resolve(name, (model_params or {}).get(name))
    result = NOISE_MODELS[base](label, rng, **resolved)
    if result is None:
        return None
    noisy, drawn = result
    return noisy, {"model": name, **drawn}


def present_class_dice(noisy: np.ndarray, clean: np.ndarray) -> dict[int, float]:
    """Dice of noisy vs clean for each foreground class present in either label."""
    classes = np.union1d(foreground_classes(noisy), foreground_classes(clean))
    scores = {}
    for c in classes:
        a, b = noisy == c, clean == c
        scores[int(c)] = float(2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b)))
    return scores


@dataclasses.dataclass
class NoiseRealisation:
    """One realisation of label noise over a set of samples, and its noise card.

    The summary's `label_damage` is what the noise does to the corrupted labels: their mean
    Dice to the clean ones, and their foreground area over the clean foreground area.
    """

    noisy_labels: np.ndarray  # (N, H, W) uint8
    is_noisy: np.ndarray  # (N,) bool, True where the label really differs from the clean one
    records: list[dict[str, Any]]  # per sample: id, noisy, kind, params, pixels_changed, dice
    kind: str = "none"
    rate: float = 0.0
    seed: int = 0
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: int = 2
    model: str | None = None  # the registered model behind `kind` when `kind` is a preset

    def summary(self) -> dict[str, Any]:
        """Aggregate: realised rate, samples the model could not corrupt, mean Dice per class
        (over noisy samples where the class is present in either label)."""
        noisy = [r for r in self.records if r["noisy"]]
        per_class = {}
        for c in range(1, self.num_classes):
            scores = [r["dice"][str(c)] for r in noisy if str(c) in r["dice"]]
            per_class[str(c)] = float(np.mean(scores)) if scores else None
        mean_dice = [r["dice_noisy_vs_clean"] for r in noisy]
        clean_area = sum(r["area_clean"] for r in noisy)
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
            "label_damage": {
                "dice": float(np.mean(mean_dice)) if mean_dice else None,
                "area_ratio": (
                    sum(r["area_noisy"] for r in noisy) / clean_area if clean_area else None
                ),
            },
        }

    def to_json(self) -> str:
        """The noise card: settings, summary and per-sample records, as JSON text."""
        card = {
            "kind": self.kind,
            "model": self.model or self.kind,
            "rate": self.rate,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "params": self.params,
            "summary": self.summary(),
            "records": self.records,
        }
        return json.dumps(card, indent=1)

    def save(self, path: Path) -> Path:
        """Write the noise card to `path` (JSON, replaced in one step) and return the path."""
        return atomic.write_text(path, self.to_json() + "\n")


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


def _foreground_area(label: np.ndarray) -> int:
    return int(np.sum((label > 0) & (label != IGNORE_INDEX)))


def _corrupt_one(
    label: np.ndarray,
    sample_id: int,
    *,
    kind: str,
    base: str,
    rate: float,
    seed: int,
    params: dict[str, Any],
) -> tuple[float, np.ndarray, dict[str, Any]]:
    """One sample's draw u and realisation, from (seed, sample_id, params) alone:
    (u, label, record). It is corrupted when u < rate (rate None: whenever it can be)."""
    record = _clean_record(sample_id, kind)
    if kind == "none":
        return 1.0, label, record
    rng = np.random.default_rng([seed, sample_id])
    u = float(rng.random())
    if rate is not None and u >= rate:
        return u, label, record
    result = NOISE_MODELS[base](label, rng, **params)
    if result is None:
        record["uncorruptible"] = "nothing to corrupt (no foreground of the selected classes)"
        return u, label, record
    noisy, drawn = result
    changed = int(np.sum(noisy != label))
    record["model"] = str(drawn.get("model", base)) if base == "mixed" else base
    record["params"] = _jsonable(drawn)
    record["pixels_changed"] = changed
    if changed == 0:
        record["uncorruptible"] = "corruption changed no pixel"
        return u, label, record
    dice = present_class_dice(noisy, label)
    record.update(
        noisy=True,
        area_clean=_foreground_area(label),
        area_noisy=_foreground_area(noisy),
        dice={str(c): d for c, d in dice.items()},
        dice_noisy_vs_clean=float(np.mean(list(dice.values()))),
    )
    return u, noisy.astype(np.uint8), record


def _keep_exact_share(
    results: list[tuple[float, np.ndarray, dict[str, Any]]],
    labels: np.ndarray,
    rate: float,
    kind: str,
) -> list[tuple[float, np.ndarray, dict[str, Any]]]:
    """Of the samples that could be corrupted, keep the round(rate * count) with the
    smallest draws u corrupted and give the others back their clean label."""
    eligible = [i for i, (_, _, record) in enumerate(results) if record["noisy"]]
    count = int(np.floor(rate * len(eligible) + 0.5))
    keep = set(sorted(eligible, key=lambda i: results[i][0])[:count])
    return [
        (u, noisy, record)
        if i in keep or not record["noisy"]
        else (u, labels[i], _clean_record(record["id"], kind))
        for i, (u, noisy, record) in enumerate(results)
    ]


def apply_noise(
    labels: np.ndarray,
    kind: str,
    rate: float,
    seed: int,
    num_classes: int,
    params: Mapping[str, Any] | None = None,
    ids: np.ndarray | None = None,
    workers: int = 1,
    class_names: list[str] | tuple[str, ...] | None = None,
) -> NoiseRealisation:
    """Corrupt about `rate` of the (N, H, W) labels with noise model or preset `kind`
    ("none": no-op); `params` override the model's (or preset's) defaults. `workers` threads
    share the samples; the result does not depend on their number. `class_names` (index 0
    the background) resolve `classes="structure"` (`structure_classes`).

    Sample i uses ``default_rng([seed, ids[i]])`` (ids default to 0..N-1): it is corrupted iff
    its first draw u < rate and the model can corrupt it; labels without foreground stay clean
    and their record says so ("uncorruptible"). A protocol (`PROTOCOLS`) corrupts exactly
    round(rate * M) of the M samples the model can corrupt, those with the smallest u: its
    fraction is the published one on any number of samples, while each sample's corruption
    still depends only on (seed, id, params) and a higher rate only adds noisy samples.
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
    base, resolved = ("none", {}) if kind == "none" else _resolve(kind, params)
    if kind == "none" and params:
        raise ValueError(f"noise kind 'none' takes no params, got {dict(params)}")
    if resolved.get("classes") == STRUCTURE:
        resolved["classes"] = structure_classes(class_names)
    exact = kind in PROTOCOLS
    corrupt = functools.partial(
        _corrupt_one,
        kind=kind,
        base=base,
        rate=None if exact else rate,
        seed=seed,
        params=resolved,
    )
    pairs = zip(labels, (int(s) for s in ids), strict=True)
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda pair: corrupt(*pair), pairs))
    else:
        results = [corrupt(*pair) for pair in pairs]
    if exact:
        results = _keep_exact_share(results, labels, rate, kind)
    records = [record for _, _, record in results]
    noisy_labels = np.stack([noisy for _, noisy, _ in results]) if results else labels.copy()
    is_noisy = np.array([record["noisy"] for record in records], bool)
    return NoiseRealisation(
        noisy_labels=noisy_labels,
        is_noisy=is_noisy,
        records=records,
        kind=kind,
        rate=float(rate),
        seed=int(seed),
        params=_jsonable(resolved),
        num_classes=int(num_classes),
        model=base,
    )
