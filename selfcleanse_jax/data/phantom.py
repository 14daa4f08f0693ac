"""Procedural cardiac short-axis MRI phantom with ACDC-style labels.

The phantom is the project's embedded default dataset: it lets the demo, the tests and the
benchmarks run without downloading anything, while still posing a segmentation problem that
needs spatial context (right and left ventricle have similar brightness, the myocardium is as
dark as some of the surrounding tissue, a bright aorta and bright fat look like blood pool).

Classes follow ACDC: 0 background, 1 right ventricle (RV), 2 myocardium, 3 left ventricle (LV).
Each case is a stack of short-axis slices running from the base (index 0) to the apex; the
heart shrinks towards the apex and the RV may vanish in apical slices. Every case is drawn from
``np.random.default_rng([seed, case_number])`` so it does not depend on how many cases are made.
Geometry is defined in normalised field-of-view coordinates in [-1, 1] (the FOV is 2 units
wide), which makes the anatomy independent of ``image_size``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from selfcleanse_jax.data import liver_phantom
from selfcleanse_jax.data.cases import Case
from selfcleanse_jax.data.msd import write_msd

LABELS: dict[int, str] = {
    0: "background",
    1: "right ventricle",
    2: "myocardium",
    3: "left ventricle",
}
"""ACDC class names, as written into the phantom's ``dataset.json``."""

_SUPERSAMPLE = 2
"""Images are rendered on a 2x finer grid and box-averaged, which gives partial-volume edges."""


@dataclasses.dataclass(frozen=True)
class _Heart:
    """Per-case anatomy; lengths in FOV units (FOV = 2)."""

    center: np.ndarray  # (2,) LV centre at the base, (x, y)
    drift: np.ndarray  # (2,) centre shift from base to apex
    theta: float  # direction of the RV from the LV centre
    lv_radius: float  # LV cavity radius at the base
    myo_thickness: float  # mean myocardial wall thickness
    lv_harmonics: np.ndarray  # (3, 2) amplitude and phase of the cos(2, 3, 4 phi) wobble
    wall_variation: np.ndarray  # (2,) amplitude and phase of the thickness variation
    rv_offset: float  # RV ellipse centre along theta, in epicardial radii
    rv_axes: np.ndarray  # (2,) RV ellipse semi-axes (along, across theta), in epicardial radii
    rv_extent: float  # apex fraction at which the RV has shrunk away
    rv_wall: float  # thickness of the unlabelled RV free wall
    fat: np.ndarray  # (3,) epicardial fat thickness, variation amplitude and phase
    papillary: np.ndarray  # (k, 2) papillary muscles: angle and radius


@dataclasses.dataclass(frozen=True)
class _Body:
    """Per-case surroundings and contrast."""

    body_axes: np.ndarray  # (2,) semi-axes of the body outline
    body_center: np.ndarray  # (2,)
    subcutaneous_fat: float  # thickness of the bright fat ring under the skin
    lungs: np.ndarray  # (2, 4) per lung: centre x, y and semi-axes
    liver: np.ndarray  # (4,) centre x, y and semi-axes at the apex
    aorta: np.ndarray  # (3,) centre x, y and radius of the descending aorta
    blobs: np.ndarray  # (k, 5) other tissue: centre x, y, semi-axes, intensity
    intensity: dict[str, float]
    bias: np.ndarray  # (5,) coefficients of u, v, uv, u^2, v^2 in the log bias field
    noise_sigma: float  # Rician noise level
    fov_mm: float
    slice_mm: float


def _draw_heart(rng: np.random.Generator) -> _Heart:
    lv_radius = rng.uniform(0.17, 0.27)
    num_papillary = int(rng.integers(1, 4))
    return _Heart(
        center=rng.uniform(-0.15, 0.15, size=2),
        drift=rng.uniform(-0.05, 0.05, size=2),
        theta=np.pi + rng.uniform(-np.pi / 3, np.pi / 3),
        lv_radius=lv_radius,
        myo_thickness=rng.uniform(0.08, 0.12),
        lv_harmonics=np.stack(
            [rng.uniform(0.0, [0.12, 0.04, 0.03]), rng.uniform(0.0, 2 * np.pi, 3)], axis=1
        ),
        wall_variation=np.array([rng.uniform(0.0, 0.3), rng.uniform(0.0, 2 * np.pi)]),
        rv_offset=rng.uniform(0.35, 0.6),
        rv_axes=np.array([rng.uniform(0.9, 1.15), rng.uniform(1.15, 1.45)]),
        rv_extent=rng.uniform(0.75, 1.15),
        rv_wall=rng.uniform(0.012, 0.02),
        fat=np.array([rng.uniform(0.0, 0.035), rng.uniform(0.8, 1.6), rng.uniform(0, 2 * np.pi)]),
        papillary=np.stack(
            [rng.uniform(0.0, 2 * np.pi, num_papillary), rng.uniform(0.12, 0.2, num_papillary)],
            axis=1,
        ),
    )


def _draw_body(rng: np.random.Generator, heart: _Heart) -> _Body:
    blood = rng.uniform(0.75, 1.0)
    side = np.array([np.cos(heart.theta), np.sin(heart.theta)])
    lungs = []
    for sign in (1.0, -1.0):
        offset = sign * side * rng.uniform(0.5, 0.62) + np.array([0.0, rng.uniform(0.0, 0.15)])
        lungs.append([*(heart.center + offset), rng.uniform(0.18, 0.26), rng.uniform(0.3, 0.42)])
    aorta_angle = heart.theta + np.pi + rng.uniform(-0.6, 0.6)
    aorta_distance = heart.lv_radius + heart.myo_thickness + rng.uniform(0.1, 0.2)
    aorta_center = heart.center + aorta_distance * np.array(
        [np.cos(aorta_angle), np.sin(aorta_angle)]
    )
    num_blobs = int(rng.integers(2, 5))
    blobs = np.stack(
        [
            rng.uniform(-0.6, 0.6, num_blobs),
            rng.uniform(-0.5, 0.5, num_blobs),
            rng.uniform(0.04, 0.12, num_blobs),
            rng.uniform(0.04, 0.12, num_blobs),
            rng.uniform(0.1, 0.95, num_blobs),
        ],
        axis=1,
    )
    return _Body(
        body_axes=np.array([rng.uniform(0.85, 0.95), rng.uniform(0.62, 0.78)]),
        body_center=np.array([rng.uniform(-0.05, 0.05), rng.uniform(0.0, 0.1)]),
        subcutaneous_fat=rng.uniform(0.03, 0.07),
        lungs=np.array(lungs),
        liver=np.array(
            [*(heart.center + [rng.uniform(-0.2, 0.2), 0.45]), rng.uniform(0.3, 0.45), 0.3]
        ),
        aorta=np.array([*aorta_center, rng.uniform(0.05, 0.08)]),
        blobs=blobs,
        intensity={
            "lv": blood,
            "rv": blood * rng.uniform(0.85, 1.05),
            "myo": rng.uniform(0.22, 0.36),
            "tissue": rng.uniform(0.22, 0.38),
            "fat": rng.uniform(0.65, 0.95),
            "lung": rng.uniform(0.03, 0.1),
            "liver": rng.uniform(0.3, 0.48),
        },
        bias=rng.uniform(-0.3, 0.3, size=5),
        noise_sigma=blood * rng.uniform(0.025, 0.06),
        fov_mm=rng.uniform(300.0, 380.0),
        slice_mm=rng.uniform(8.0, 10.0),
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) in [-1, 1] of a size x size image, rows along y."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float
) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _heart_regions(x: np.ndarray, y: np.ndarray, heart: _Heart, f: float) -> dict[str, np.ndarray]:
    """Boolean masks of the heart's parts at apex fraction f (0 base, 1 apex) on a grid."""
    center = heart.center + f * heart.drift
    dx, dy = x - center[0], y - center[1]
    rho = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx) - heart.theta
    wobble = 1.0 + sum(a * np.cos((k + 2) * phi + p) for k, (a, p) in enumerate(heart.lv_harmonics))
    lv_r = heart.lv_radius * (1.0 - 0.65 * f**1.3) * wobble
    amp, phase = heart.wall_variation
    wall = heart.myo_thickness * (1.0 + 0.15 * f) * (1.0 + amp * np.cos(phi + phase))
    epi_r = lv_r + wall
    lv = rho <= lv_r
    epi = rho <= epi_r

    # The RV is an ellipse beside the LV minus the LV and its wall: a crescent that wraps the
    # septum. It shrinks towards the apex and is gone past rv_extent.
    epi_mean = heart.lv_radius * (1.0 - 0.65 * f**1.3) + heart.myo_thickness
    rv_scale = max(0.0, 1.0 - (f / heart.rv_extent) ** 2)
    along = np.cos(heart.theta) * dx + np.sin(heart.theta) * dy
    across = -np.sin(heart.theta) * dx + np.cos(heart.theta) * dy
    rv = np.zeros_like(lv)
    rv_wall = np.zeros_like(lv)
    if rv_scale > 0.0:
        ax, ay = heart.rv_axes * epi_mean * rv_scale
        ac = heart.rv_offset * epi_mean
        rv_ellipse = ((along - ac) / ax) ** 2 + (across / ay) ** 2 <= 1.0
        w = heart.rv_wall
        rv_outer = ((along - ac) / (ax + w)) ** 2 + (across / (ay + w)) ** 2 <= 1.0
        rv = rv_ellipse & ~epi
        rv_wall = rv_outer & ~rv_ellipse & ~epi

    fat_thickness, fat_amp, fat_phase = heart.fat
    fat_r = epi_r + fat_thickness * np.clip(1.0 + fat_amp * np.cos(2 * phi + fat_phase), 0, None)
    fat = (rho <= fat_r) & ~epi & ~rv & ~rv_wall

    papillary = np.zeros_like(lv)
    if f < 0.8:
        for angle, radius in heart.papillary:
            px = center[0] + 0.7 * lv_r.mean() * np.cos(angle + heart.theta)
            py = center[1] + 0.7 * lv_r.mean() * np.sin(angle + heart.theta)
            papillary |= np.hypot(x - px, y - py) <= radius * heart.lv_radius * (1.0 - f)
        papillary &= lv
    return {
        "lv": lv,
        "myo": epi & ~lv,
        "rv": rv,
        "rv_wall": rv_wall,
        "fat": fat,
        "papillary": papillary,
    }


def _labels(regions: dict[str, np.ndarray]) -> np.ndarray:
    label = np.zeros(regions["lv"].shape, np.uint8)
    label[regions["rv"]] = 1
    label[regions["myo"]] = 2
    label[regions["lv"]] = 3
    return label


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length sigma (pixels)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _render_slice(
    rng: np.random.Generator, heart: _Heart, body: _Body, f: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One slice: (image float32, label uint8), both (size, size)."""
    fine = size * _SUPERSAMPLE
    x, y = _grid(fine)
    tone = body.intensity

    texture = 0.25 * _smooth_noise(rng, fine, 0.06 * fine) + 0.08 * _smooth_noise(
        rng, fine, 0.01 * fine
    )
    image = np.zeros((fine, fine))
    bx, by = body.body_center
    ax, ay = body.body_axes
    inside = _ellipse(x, y, bx, by, ax, ay)
    image[inside] = tone["fat"]
    s = body.subcutaneous_fat
    muscle = _ellipse(x, y, bx, by, ax - s, ay - s)
    image[muscle] = tone["tissue"] * (1.0 + texture[muscle])
    for cx, cy, lx, ly, value in body.blobs:
        blob = _ellipse(x, y, cx, cy, lx, ly) & muscle
        image[blob] = value * (1.0 + 0.3 * texture[blob])
    if f > 0:  # the liver comes into view towards the apex
        liver_x, liver_y, liver_ax, liver_ay = body.liver
        liver = _ellipse(x, y, liver_x, liver_y, liver_ax * f, liver_ay * f) & muscle
        image[liver] = tone["liver"] * (1.0 + 0.4 * texture[liver])
    for cx, cy, lx, ly in body.lungs:
        lung = _ellipse(x, y, cx, cy, lx, ly) & muscle
        image[lung] = tone["lung"] * (1.0 + texture[lung])
    aorta = _ellipse(x, y, body.aorta[0], body.aorta[1], body.aorta[2], body.aorta[2])
    image[aorta] = tone["lv"]

    regions = _heart_regions(x, y, heart, f)
    flow = 1.0 + 0.3 * texture
    image[regions["fat"]] = tone["fat"] * flow[regions["fat"]]
    image[regions["rv_wall"]] = tone["myo"]
    image[regions["rv"]] = tone["rv"] * flow[regions["rv"]]
    image[regions["myo"]] = tone["myo"] * (1.0 + 0.3 * texture[regions["myo"]])
    image[regions["lv"]] = tone["lv"] * flow[regions["lv"]]
    image[regions["papillary"]] = tone["myo"]

    c = body.bias
    image *= np.exp(c[0] * x + c[1] * y + c[2] * x * y + c[3] * x**2 + c[4] * y**2)
    image = image.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    noise = rng.normal(0.0, body.noise_sigma, size=(2, size, size))
    image = np.hypot(image + noise[0], noise[1])

    label = _labels(_heart_regions(*_grid(size), heart, f))
    return image.astype(np.float32), label


def make_case(seed: int, case_number: int, image_size: int = 128, num_slices: int = 8) -> Case:
    """One phantom volume (image_size, image_size, num_slices); slice 0 is the base.

    Reproducible from (seed, case_number) alone; the anatomy is the same at every image_size
    (texture and noise are drawn per pixel, so they differ).
    """
    if image_size < 16 or num_slices < 1:
        raise ValueError(
            f"need image_size >= 16 and num_slices >= 1, got {image_size}, {num_slices}"
        )
    rng = np.random.default_rng([seed, case_number])
    heart = _draw_heart(rng)
    body = _draw_body(rng, heart)
    fractions = np.linspace(0.0, 1.0, num_slices)
    slices = [_render_slice(rng, heart, body, float(f), image_size) for f in fractions]
    spacing = (body.fov_mm / image_size, body.fov_mm / image_size, body.slice_mm)
    return Case.from_slices(f"phantom_{case_number:03d}", slices, spacing)


def make_cases(
    num_cases: int, seed: int = 0, image_size: int = 128, num_slices: int = 8
) -> list[Case]:
    """Cases 0 .. num_cases-1 of the phantom."""
    return [make_case(seed, i, image_size, num_slices) for i in range(num_cases)]


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One embedded dataset: how to draw a case, its class names and its modality."""

    make_case: Callable[[int, int, int, int], Case]  # (seed, case_number, size, slices)
    labels: dict[int, str]
    modality: str  # as dataset.json's modality: MRI | CT


PHANTOMS: dict[str, Phantom] = {
    "cardiac": Phantom(make_case, LABELS, "MRI"),
    "liver": Phantom(liver_phantom.make_case, liver_phantom.LABELS, "CT"),
}
"""The embedded phantoms by name (`data.phantom`, `selfcleanse phantom --kind`)."""


def get_phantom(kind: str) -> Phantom:
    if kind not in PHANTOMS:
        raise ValueError(f"unknown phantom {kind!r}; expected one of {sorted(PHANTOMS)}")
    return PHANTOMS[kind]


def write_phantom_dataset(
    output: Path,
    num_train: int,
    num_test: int,
    seed: int = 0,
    image_size: int = 128,
    num_slices: int = 8,
    kind: str = "cardiac",
) -> Path:
    """Write phantom `kind` as an MSD-layout dataset at `output` and return that path.

    Training cases are numbers 0 .. num_train-1, test cases follow them, so adding test cases
    never changes the training set.
    """
    phantom = get_phantom(kind)
    cases = [
        phantom.make_case(seed, n, image_size, num_slices) for n in range(num_train + num_test)
    ]
    return write_msd(
        Path(output),
        cases[:num_train],
        cases[num_train:],
        labels=phantom.labels,
        modality=phantom.modality,
        name="selfcleanse_phantom" if kind == "cardiac" else f"selfcleanse_{kind}_phantom",
    )
