"""Label cleansing module (LCM): pseudo low-noise labels from the model and the given label.

For one sample with softmax p (H, W, K), given label y (H, W) and clean probability w:

    q = w * onehot(y) + (1 - w) * p

The hard pseudo-label is argmax q where max q >= kappa, and elsewhere the given label
(`fallback="given"`), IGNORE_INDEX (`fallback="ignore"`, the loss skips it), or the given
label where the model's own argmax agrees with it and IGNORE_INDEX where it does not
(`fallback="disputed"`: unsure pixels that the model disputes teach nothing), or IGNORE_INDEX
within `band` pixels of an outline of the given label and the given label farther away
(`fallback="band"`: boundary noise lives along the drawn outlines, so an unsure pixel there
teaches nothing, while inside a structure and far outside it the drawing is right). With
`edge_ignore` > 0, every pixel within that many pixels of an outline of the given label or
of the pseudo-label is IGNORE_INDEX, however sure the model is: under biased boundary noise
the model's own outlines lean the way the noise does, so a flagged slice teaches the cores of
its structures and the background far from them, and leaves the outlines to the clean
slices. Pixels whose
given label is IGNORE_INDEX (or any value outside [0, K)) carry no label: onehot(y) is zero
there. Optional morphological clean-up (per foreground class opening then closing with a
square (2r+1)^2 window, then optional filling of background holes) acts on the argmax map
before the confidence fallback. The soft target is q renormalised (p where y carries no label),
optionally sharpened with a temperature T: q**(1/T) renormalised.

With class offsets b (K,) (`cleanse.calibrate`), p is first replaced by softmax(log p - b):
a model trained on labels that are drawn too wide (or too tight) leans the same way, and
`calibrated_offsets` chooses b so that on the slices the LFM trusts, its labels are as large
as the given ones wherever both draw the structure (`margin_areas` counts them on device).

Everything is jnp and jittable; `cleanse_batch` vmaps over a batch. `LCMSettings` holds the
options, checked when made.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from selfcleanse_jax.data.cases import IGNORE_INDEX

FALLBACKS = ("given", "ignore", "disputed", "band")


@dataclasses.dataclass(frozen=True)
class LCMSettings:
    """How the LCM makes a pseudo-label (module docstring); checked when made, hashable so
    that jit treats it as static (a new value compiles anew)."""

    kappa: float = 0.8  # the confidence max q from which the pseudo-label replaces the given
    fallback: str = "given"  # what an unsure pixel keeps: one of FALLBACKS
    band: int = 2  # pixels near a drawn outline that fallback "band" ignores
    edge_ignore: int = 0  # > 0: pixels this near any outline are ignored however sure
    temperature: float | None = None  # > 0: soft targets sharpened; None: left as q
    morph_radius: int = 0  # > 0: opening then closing of the argmax map
    fill_holes: bool = False  # background holes inside a structure filled

    def __post_init__(self):
        if self.fallback not in FALLBACKS:
            raise ValueError(f"unknown LCM fallback {self.fallback!r}; expected one of {FALLBACKS}")
        if self.fallback == "band" and self.band < 1:
            raise ValueError(f"LCM band must be >= 1 pixel with fallback 'band', got {self.band}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"LCM temperature must be > 0 or None, got {self.temperature}")
        if self.morph_radius < 0:
            raise ValueError(f"LCM morph_radius must be >= 0, got {self.morph_radius}")
        if not 0.0 <= self.kappa <= 1.0:
            raise ValueError(f"LCM kappa must be in [0, 1], got {self.kappa}")


def _pool(masks: jax.Array, radius: int, op: str) -> jax.Array:
    """Max (dilation) or min (erosion) over a (2r+1)^2 window of (H, W, K) {0,1} masks.

    Outside the image counts as 0 for dilation and 1 for erosion, so the border neither grows
    nor erodes structures.
    """
    window = (2 * radius + 1, 2 * radius + 1, 1)
    if op == "dilate":
        return jax.lax.reduce_window(masks, 0.0, jax.lax.max, window, (1, 1, 1), "SAME")
    return jax.lax.reduce_window(masks, 1.0, jax.lax.min, window, (1, 1, 1), "SAME")


def near_outline(onehot: jax.Array, band: int) -> jax.Array:
    """(H, W) bool: pixels with another label within `band` pixels (a (2b+1)^2 window) of a
    one-hot label map (H, W, K); the image edge is not an outline."""
    grown = _pool(onehot, band, "dilate")
    shrunk = _pool(onehot, band, "erode")
    return jnp.any(grown != shrunk, axis=-1)


def _fill_background_holes(labels: jax.Array, masks: jax.Array) -> jax.Array:
    """Give each background (0) pixel enclosed by foreground class c the label c.

    Flood fill from the image border through non-c pixels (8-connected), vectorised over
    classes with a `while_loop` of 3x3 dilations. Only background is filled, so a structure
    nested inside another keeps its label.
    """
    outside_c = masks < 0.5
    h, w = labels.shape
    border = jnp.zeros((h, w, 1), bool).at[0].set(True).at[-1].set(True)
    border = border.at[:, 0].set(True).at[:, -1].set(True)
    seed = (border & outside_c).astype(jnp.float32)

    def grow(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        reach, _ = state
        new = _pool(reach, 1, "dilate") * outside_c
        return new, jnp.any(new != reach)

    reach, _ = jax.lax.while_loop(lambda s: s[1], grow, (seed, jnp.bool_(True)))
    enclosed = outside_c & (reach < 0.5) & (labels == 0)[..., None]
    classes = jnp.arange(masks.shape[-1], dtype=jnp.int32)
    filled = jnp.max(jnp.where(enclosed, classes, 0), axis=-1)
    return jnp.where(filled > 0, filled, labels)


def _morph_clean(labels: jax.Array, num_classes: int, radius: int, fill_holes: bool) -> jax.Array:
    """Opening then closing of each foreground class mask; the higher class wins overlaps.

    Pixels removed from every foreground class become background (0).
    """
    masks = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32).at[..., 0].set(0.0)
    if radius > 0:
        masks = _pool(_pool(masks, radius, "erode"), radius, "dilate")
        masks = _pool(_pool(masks, radius, "dilate"), radius, "erode")
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    labels = jnp.max(jnp.where(masks > 0.5, classes, 0), axis=-1)
    if fill_holes:
        labels = _fill_background_holes(labels, masks)
    return labels


def _log(probs: jax.Array) -> jax.Array:
    """log p, finite where p underflowed to 0."""
    return jnp.log(jnp.maximum(probs, 1e-30))


def _sharpen(q: jax.Array, temperature: float) -> jax.Array:
    """q**(1/T) renormalised over the last axis; divides by max q first to avoid underflow."""
    s = jnp.power(q / jnp.max(q, axis=-1, keepdims=True), 1.0 / temperature)
    return s / jnp.sum(s, axis=-1, keepdims=True)


def cleanse_one(
    probs: jax.Array,
    given: jax.Array,
    clean_prob: jax.Array | float,
    settings: LCMSettings = LCMSettings(),
    class_offset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pseudo-label of one sample: hard (H, W) int32 and soft (H, W, K) float32 targets.

    `probs` (H, W, K) is the model's softmax, `given` (H, W) the given integer label,
    `clean_prob` the LFM's w for this sample (clipped to [0, 1]), `class_offset` (K,) the
    calibration subtracted from log p (none: p as it is).
    """
    kappa, fallback, band = settings.kappa, settings.fallback, settings.band
    probs = jnp.asarray(probs, jnp.float32)
    if class_offset is not None:
        probs = jax.nn.softmax(_log(probs) - class_offset, axis=-1)
    num_classes = probs.shape[-1]
    given = jnp.asarray(given).astype(jnp.int32)
    labelled = (given >= 0) & (given < num_classes)
    onehot = jax.nn.one_hot(jnp.where(labelled, given, 0), num_classes, dtype=jnp.float32)
    onehot = onehot * labelled[..., None]
    w = jnp.clip(jnp.asarray(clean_prob, jnp.float32), 0.0, 1.0)
    q = w * onehot + (1.0 - w) * probs

    pseudo = jnp.argmax(q, axis=-1).astype(jnp.int32)
    if settings.morph_radius > 0 or settings.fill_holes:
        pseudo = _morph_clean(pseudo, num_classes, settings.morph_radius, settings.fill_holes)
    ignored = jnp.full_like(given, IGNORE_INDEX)
    if fallback == "given":
        otherwise = given
    elif fallback == "ignore":
        otherwise = ignored
    elif fallback == "band":  # ignored near the drawn outlines, the given label elsewhere
        otherwise = jnp.where(near_outline(onehot, band), ignored, given)
    else:  # disputed: ignored only where the model's own choice differs from the given label
        otherwise = jnp.where(jnp.argmax(probs, axis=-1) == given, given, ignored)
    hard = jnp.where(jnp.max(q, axis=-1) >= kappa, pseudo, otherwise)
    if settings.edge_ignore > 0:
        drawn = near_outline(onehot, settings.edge_ignore)
        cleansed = near_outline(jax.nn.one_hot(pseudo, num_classes), settings.edge_ignore)
        hard = jnp.where(drawn | cleansed, IGNORE_INDEX, hard)

    soft = jnp.where(labelled[..., None], q, probs)
    if settings.temperature is not None:
        soft = _sharpen(soft, settings.temperature)
    return hard, soft


def unlearnt_structures(
    predictions: np.ndarray, given: np.ndarray, num_classes: int, fraction: float
) -> np.ndarray:
    """Which foreground classes 1..K-1 of each given label (N, H, W) the model's predictions
    (N, H, W) all but miss: they keep less than `fraction` of the drawn pixels. (N, K-1)
    bool; all False with `fraction` 0.

    Annotators leave structures out, they do not draw ones that are not there: a model that
    misses a drawn structure has not learnt it (or has unlearnt it under missing-structure
    noise), so the small-loss view is no guide to such a slice, and a pseudo-label from the
    model would delete the structure rather than correct it.
    """
    classes = np.arange(1, num_classes)
    drawn = np.asarray(given)[..., None] == classes
    area = drawn.sum(axis=(1, 2))
    kept = (drawn & (np.asarray(predictions)[..., None] == classes)).sum(axis=(1, 2))
    return (area > 0) & (kept < fraction * area)


@functools.partial(jax.jit, static_argnames="settings")
def cleanse_batch(
    probs: jax.Array,
    given: jax.Array,
    clean_prob: jax.Array,
    settings: LCMSettings = LCMSettings(),
    class_offset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`cleanse_one` vmapped over a batch: probs (B, H, W, K), given (B, H, W), w (B,),
    class_offset (B, K) or None.

    Returns hard (B, H, W) int32 and soft (B, H, W, K) float32.
    """
    one = functools.partial(cleanse_one, settings=settings)
    return jax.vmap(one)(probs, given, clean_prob, class_offset=class_offset)


OFFSET_GRID = np.round(np.arange(-2.0, 4.0001, 0.1), 1).astype(np.float32)
"""The class offsets `calibrated_offsets` chooses from (log-probability units)."""


def margin_areas(probs: jax.Array) -> jax.Array:
    """Per sample and offset b of `OFFSET_GRID`, each foreground class's area once its
    log-probability is lowered by b: pixels where log p_c - b beats every other class.
    probs (B, H, W, K) -> (B, len(OFFSET_GRID), K-1) int32."""
    log_p = _log(probs)
    classes = jnp.arange(1, probs.shape[-1])
    others = jnp.where(jnp.eye(probs.shape[-1], dtype=bool)[classes], -jnp.inf, log_p[..., None, :])
    margin = log_p[..., 1:] - jnp.max(others, axis=-1)  # (B, H, W, K-1)
    above = margin[:, None] > jnp.asarray(OFFSET_GRID)[None, :, None, None, None]
    return jnp.sum(above, axis=(2, 3), dtype=jnp.int32)


CALIBRATION_ESTIMATES = ("pooled", "median")
"""How `calibrated_offsets` matches sizes: the class's total area over the trusted slices,
or the median over those slices of each one's predicted-to-given area ratio."""


def calibrated_classes(given: np.ndarray, num_classes: int, min_share: float) -> np.ndarray:
    """Which foreground classes (K-1,) bool the calibration may shift: those whose median
    area over all the given labels (N, H, W) that draw them is at least `min_share` of the
    slice's H x W pixels. A structure a few pixels across is mostly outline, and its area
    tells a missed or extra structure apart from a moved outline no better than chance.
    Decided once from every given label, so that a round whose trusted slices happen to hold
    the larger lesions cannot let a class of small ones in; a share of the slice, so that
    the same structures pass at every image size."""
    given = np.asarray(given)
    min_area = min_share * given.shape[1] * given.shape[2]
    calibrated = np.zeros(num_classes - 1, dtype=bool)
    for c in range(1, num_classes):
        areas = (given == c).sum(axis=(1, 2))
        drawn = areas[areas > 0]
        calibrated[c - 1] = drawn.size > 0 and np.median(drawn) >= min_area
    return calibrated


def calibrated_offsets(
    areas: np.ndarray,
    given: np.ndarray,
    num_classes: int,
    estimate: str = "pooled",
    calibrated: np.ndarray | None = None,
) -> np.ndarray:
    """Class offsets (K,) (background 0) under which the trusted slices' predicted area of
    each class is nearest its given area. areas: `margin_areas` of those slices
    (N, len(OFFSET_GRID), K-1); given: their given labels (N, H, W).

    `estimate="pooled"` matches the class's total area over the slices, so the largest
    structures decide; `"median"` brings the median over the slices of log(predicted /
    given area) nearest 0, so every slice counts once and fewer than half of them (a missed
    or extra lesion, a noisy label the LFM trusted) cannot move the offset far.

    A class counts only in the slices where both the given label and the model's own label
    (offset 0) hold it: the offsets move outlines, and a structure left out of a label (or
    one the model has not learnt) says nothing of where an outline lies. A class with no
    such slice keeps offset 0, and so does one that `calibrated` (K-1,) bool, from
    `calibrated_classes`, leaves out (None: every class counts)."""
    if estimate not in CALIBRATION_ESTIMATES:
        raise ValueError(
            f"unknown calibration estimate {estimate!r}; expected one of {CALIBRATION_ESTIMATES}"
        )
    classes = np.arange(1, num_classes)
    drawn = (np.asarray(given)[..., None] == classes).sum(axis=(1, 2))  # (N, K-1)
    predicted = areas[:, int(np.flatnonzero(OFFSET_GRID == 0.0)[0]), :]
    both = (drawn > 0) & (predicted > 0)
    offsets = np.zeros(len(classes), np.float32)
    for c in range(len(classes)):
        rows = both[:, c]
        if not rows.any() or (calibrated is not None and not calibrated[c]):
            continue
        if estimate == "pooled":
            mismatch = np.abs(areas[rows, :, c].sum(axis=0) - drawn[rows, c].sum())
        else:
            ratios = np.log(np.maximum(areas[rows, :, c], 0.5) / drawn[rows, c][:, None])
            mismatch = np.abs(np.median(ratios, axis=0))
        offsets[c] = OFFSET_GRID[np.argmin(mismatch)]
    return np.concatenate([[0.0], offsets]).astype(np.float32)
