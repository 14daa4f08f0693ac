"""Procedural abdominal CT phantom with LiTS-style labels: liver and liver tumours.

The second embedded dataset, modelled on the clinical liver-tumour CT of the self-cleansing
paper: axial slices in Hounsfield units (windowed like any CT, `data.ct_window`), a liver with
a smooth irregular outline and bright vessels among organs of similar density (spleen,
kidneys, bowel, a hypodense gallbladder beside it), spine and ribs, and zero to several
tumours per case, hypo- or hyperdense with blurred margins. Tumours are spheres in the volume,
so a slice shows each as a disk whose size depends on where the slice cuts it.

Classes follow LiTS: 0 background, 1 liver, 2 tumour. A case's slices run through the liver
from its dome (index 0) to its lower tip; every case is drawn from
``np.random.default_rng([seed, case_number])``. Geometry is defined in normalised
field-of-view coordinates in [-1, 1], x to the patient's left, y to the back (the image is in
the radiological view: the liver on the image's left).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage, special

from selfcleanse_jax.data.cases import Case

LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "tumour"}
"""LiTS class names, as written into the phantom's ``dataset.json``."""

_SUPERSAMPLE = 2
AIR_HU = -1000.0


@dataclasses.dataclass(frozen=True)
class _Tumour:
    centre: np.ndarray  # (3,) x, y in FOV units and z in mm from the liver's dome
    radius_mm: float
    contrast_hu: float  # relative to the liver: negative hypodense, positive hyperdense
    margin_mm: float  # width of the blurred edge


@dataclasses.dataclass(frozen=True)
class _Abdomen:
    """Per-case anatomy and contrast; lengths in FOV units unless named _mm."""

    fov_mm: float
    height_mm: float  # the liver's extent from dome to tip
    body_axes: np.ndarray  # (2,)
    body_centre: np.ndarray  # (2,)
    fat: float  # subcutaneous fat thickness
    wall: float  # abdominal wall muscle thickness
    liver_centre: np.ndarray  # (2,)
    liver_axes: np.ndarray  # (2,)
    liver_harmonics: np.ndarray  # (4, 2) amplitude and phase of cos(2..5 phi)
    left_lobe: np.ndarray  # (3,) reach to the patient's left, width, apex fraction it fades at
    vessels: np.ndarray  # (k, 4) angle, length, width, z phase of branches from the hilum
    gallbladder: np.ndarray | None  # (4,) angle on the liver edge, size, f-centre, f-extent
    spleen: np.ndarray  # (4,) centre x, y, semi-axes scale, f at which it fades
    kidneys: np.ndarray  # (2,) f where they appear, size
    stomach: np.ndarray  # (4,) centre x, y, radius, air fraction
    bowel: np.ndarray  # (k, 4) centre x, y, radius, air
    ribs: np.ndarray  # (k,) angles of the ribs on the body wall
    hu: dict[str, float]
    noise_hu: float
    tumours: tuple[_Tumour, ...]


def _draw_tumours(rng: np.random.Generator, height_mm: float, levels: np.ndarray) -> list[_Tumour]:
    """None in one case of ten, else two to ten, each centred near one of the slice `levels`
    (fractions of the height) so that the stack shows it."""
    count = 0 if rng.random() < 0.1 else int(rng.integers(2, 11))
    tumours = []
    for _ in range(count):
        radius = rng.uniform(3.0, 20.0)
        z = rng.choice(levels) * height_mm + rng.uniform(-0.5, 0.5) * radius
        # A point well inside the liver's outline at that level: angle, then a radius fraction.
        phi = rng.uniform(0.0, 2 * np.pi)
        reach = rng.uniform(0.0, 0.7)
        hypo = rng.random() < 0.7
        tumours.append(
            _Tumour(
                centre=np.array([phi, reach, z]),
                radius_mm=float(radius),
                contrast_hu=float(-rng.uniform(30, 70) if hypo else rng.uniform(25, 50)),
                margin_mm=float(rng.uniform(0.5, 2.5)),
            )
        )
    return tumours


def _draw_abdomen(rng: np.random.Generator, levels: np.ndarray) -> _Abdomen:
    liver_hu = rng.uniform(90.0, 130.0)
    num_vessels = int(rng.integers(3, 7))
    num_bowel = int(rng.integers(3, 7))
    height_mm = rng.uniform(140.0, 190.0)
    has_gallbladder = rng.random() < 0.6
    abdomen = dict(
        fov_mm=rng.uniform(330.0, 400.0),
        height_mm=height_mm,
        body_axes=np.array([rng.uniform(0.82, 0.94), rng.uniform(0.6, 0.74)]),
        body_centre=np.array([rng.uniform(-0.03, 0.03), rng.uniform(0.0, 0.08)]),
        fat=rng.uniform(0.03, 0.09),
        wall=rng.uniform(0.025, 0.045),
        liver_centre=np.array([rng.uniform(-0.42, -0.3), rng.uniform(-0.08, 0.04)]),
        liver_axes=np.array([rng.uniform(0.3, 0.38), rng.uniform(0.36, 0.46)]),
        liver_harmonics=np.stack(
            [rng.uniform(0.0, [0.08, 0.06, 0.04, 0.03]), rng.uniform(0.0, 2 * np.pi, 4)], axis=1
        ),
        left_lobe=np.array(
            [rng.uniform(0.25, 0.55), rng.uniform(0.12, 0.2), rng.uniform(0.4, 0.8)]
        ),
        vessels=np.stack(
            [
                rng.uniform(0.0, 2 * np.pi, num_vessels),
                rng.uniform(0.15, 0.35, num_vessels),
                rng.uniform(0.008, 0.02, num_vessels),
                rng.uniform(0.0, 2 * np.pi, num_vessels),
            ],
            axis=1,
        ),
        gallbladder=(
            np.array(
                [
                    rng.uniform(0.1, 0.9) * np.pi / 2 - np.pi / 2,
                    rng.uniform(0.06, 0.1),
                    rng.uniform(0.55, 0.85),
                    rng.uniform(0.15, 0.3),
                ]
            )
            if has_gallbladder
            else None
        ),
        spleen=np.array(
            [
                rng.uniform(0.45, 0.6),
                rng.uniform(0.2, 0.35),
                rng.uniform(0.16, 0.24),
                rng.uniform(0.45, 0.75),
            ]
        ),
        kidneys=np.array([rng.uniform(0.45, 0.7), rng.uniform(0.1, 0.14)]),
        stomach=np.array(
            [
                rng.uniform(0.15, 0.35),
                rng.uniform(-0.3, -0.1),
                rng.uniform(0.12, 0.2),
                rng.uniform(0.0, 0.6),
            ]
        ),
        bowel=np.stack(
            [
                rng.uniform(-0.2, 0.6, num_bowel),
                rng.uniform(-0.45, 0.1, num_bowel),
                rng.uniform(0.04, 0.09, num_bowel),
                rng.random(num_bowel) < 0.4,
            ],
            axis=1,
        ),
        ribs=np.sort(
            np.concatenate([rng.uniform(0.6, 2.2, int(rng.integers(3, 6))) * s for s in (-1, 1)])
            + np.pi / 2
        ),
        hu={
            "fat": rng.uniform(-120.0, -80.0),
            "muscle": rng.uniform(40.0, 60.0),
            "liver": liver_hu,
            "vessel": liver_hu + rng.uniform(30.0, 60.0),
            "spleen": liver_hu + rng.uniform(-10.0, 15.0),
            "kidney": rng.uniform(150.0, 200.0),
            "aorta": rng.uniform(140.0, 200.0),
            "bowel": rng.uniform(20.0, 45.0),
            "fluid": rng.uniform(0.0, 20.0),
            "bone": rng.uniform(350.0, 700.0),
            "marrow": rng.uniform(180.0, 280.0),
            "lung": rng.uniform(-880.0, -820.0),
        },
        noise_hu=rng.uniform(8.0, 18.0),
    )
    tumours = _draw_tumours(rng, height_mm, levels)
    return _Abdomen(**abdomen, tumours=tuple(tumours))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) in [-1, 1] of a size x size image, rows along y."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


def _ellipse(x, y, cx, cy, ax, ay) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _liver_scale(f: float) -> float:
    """The liver's in-plane size along its height: a dome above, a tapering tip below."""
    return float(np.clip(np.sin(np.pi * (0.15 + 0.85 * f)) ** 0.6 * (1.15 - 0.45 * f), 0.05, 1.0))


def _liver_radius(abdomen: _Abdomen, phi: np.ndarray, f: float) -> np.ndarray:
    """Outline of the right lobe: an ellipse's radius with a few smooth harmonics."""
    ax, ay = abdomen.liver_axes * _liver_scale(f)
    base = ax * ay / np.sqrt((ay * np.cos(phi)) ** 2 + (ax * np.sin(phi)) ** 2)
    wobble = 1.0 + sum(
        a * np.cos((k + 2) * phi + p) for k, (a, p) in enumerate(abdomen.liver_harmonics)
    )
    return base * wobble


def _liver(x: np.ndarray, y: np.ndarray, abdomen: _Abdomen, f: float) -> np.ndarray:
    cx, cy = abdomen.liver_centre
    dx, dy = x - cx, y - cy
    right = np.hypot(dx, dy) <= _liver_radius(abdomen, np.arctan2(dy, dx), f)
    reach, width, fade = abdomen.left_lobe
    lobe = np.zeros_like(right)
    scale = _liver_scale(f) * (1.0 - f / fade)
    if scale > 0.3:  # the left lobe crosses the midline anteriorly in the upper slices
        lobe = _ellipse(x, y, cx + 0.5 * reach, cy - 0.12, 0.5 * reach + 0.15, width * scale)
    return right | lobe


def _tumour_fields(
    x: np.ndarray, y: np.ndarray, abdomen: _Abdomen, f: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tumour label (bool) and the HU offset over the liver of the tumours at level f."""
    mm = abdomen.fov_mm / 2.0  # mm per FOV unit
    label = np.zeros(x.shape, bool)
    offset = np.zeros(x.shape)
    z = f * abdomen.height_mm
    for t in abdomen.tumours:
        phi, reach, z0 = t.centre
        f0 = z0 / abdomen.height_mm
        cx, cy = abdomen.liver_centre
        r0 = reach * float(_liver_radius(abdomen, np.asarray(phi), f0))
        px, py = cx + r0 * np.cos(phi), cy + r0 * np.sin(phi)
        dz = abs(z - z0)
        if dz >= t.radius_mm + 2 * t.margin_mm:
            continue
        distance = np.sqrt((np.hypot(x - px, y - py) * mm) ** 2 + dz**2)
        label |= distance <= t.radius_mm
        profile = special.expit((t.radius_mm - distance) / (0.4 * t.margin_mm))
        offset += t.contrast_hu * profile
    return label, offset


def _render_slice(
    rng: np.random.Generator, abdomen: _Abdomen, f: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One axial slice: (image in HU, float32; label uint8), both (size, size)."""
    fine = size * _SUPERSAMPLE
    x, y = _grid(fine)
    hu = abdomen.hu
    texture = ndimage.gaussian_filter(rng.standard_normal((fine, fine)), 0.02 * fine, mode="wrap")
    texture /= texture.std() + 1e-8

    image = np.full((fine, fine), AIR_HU)
    bx, by = abdomen.body_centre
    ax, ay = abdomen.body_axes
    body = _ellipse(x, y, bx, by, ax, ay)
    image[body] = hu["fat"]
    inner_a = (ax - abdomen.fat, ay - abdomen.fat)
    wall = _ellipse(x, y, bx, by, *inner_a)
    image[wall] = hu["muscle"]
    cavity = _ellipse(x, y, bx, by, inner_a[0] - abdomen.wall, inner_a[1] - abdomen.wall)
    image[cavity] = hu["fat"] + 40.0 * (1.0 + 0.5 * texture[cavity])

    for angle in abdomen.ribs:  # ribs in the wall, where the liver sits high under them
        rx = bx + (inner_a[0] - 0.5 * abdomen.wall) * np.cos(angle)
        ry = by + (inner_a[1] - 0.5 * abdomen.wall) * np.sin(angle)
        if f < 0.75:
            image[_ellipse(x, y, rx, ry, 0.025, 0.02)] = hu["bone"]

    spine_y = by + 0.55 * ay
    image[_ellipse(x, y, -0.12, spine_y + 0.05, 0.08, 0.1)] = hu["muscle"]  # paraspinal
    image[_ellipse(x, y, 0.12, spine_y + 0.05, 0.08, 0.1)] = hu["muscle"]
    image[_ellipse(x, y, 0.0, spine_y, 0.075, 0.065)] = hu["bone"]
    image[_ellipse(x, y, 0.0, spine_y, 0.06, 0.05)] = hu["marrow"]
    image[_ellipse(x, y, 0.0, spine_y + 0.1, 0.03, 0.03)] = hu["fluid"]  # spinal canal
    image[_ellipse(x, y, 0.0, spine_y + 0.16, 0.02, 0.04)] = hu["bone"]
    image[_ellipse(x, y, 0.06, spine_y - 0.13, 0.045, 0.045)] = hu["aorta"]
    image[_ellipse(x, y, -0.1, spine_y - 0.15, 0.05, 0.04)] = hu["aorta"] - 40.0  # IVC

    if f < 0.25:  # lung bases behind the liver's dome
        for side in (-1.0, 1.0):
            lung = _ellipse(x, y, side * 0.45, spine_y - 0.05, 0.2 * (1 - 3 * f), 0.15) & cavity
            image[lung] = hu["lung"]
    sx, sy, s_size, s_fade = abdomen.spleen
    if f < s_fade:
        spleen = _ellipse(x, y, sx, sy, 0.6 * s_size, s_size) & cavity
        image[spleen] = hu["spleen"] * (1.0 + 0.05 * texture[spleen])
    k_start, k_size = abdomen.kidneys
    if f > k_start:
        for side in (-1.0, 1.0):
            kidney = _ellipse(x, y, side * 0.3, spine_y - 0.02, 0.7 * k_size, k_size) & cavity
            image[kidney] = hu["kidney"]
    gx, gy, g_radius, g_air = abdomen.stomach
    stomach = _ellipse(x, y, gx, gy, g_radius, g_radius * 1.2) & cavity
    if f < 0.7:
        image[stomach] = hu["fluid"]
        image[stomach & (y < gy - g_radius * (1.0 - 2.0 * g_air))] = AIR_HU
    for cx, cy, radius, air in abdomen.bowel:
        if f > 0.4:
            loop = _ellipse(x, y, cx, cy, radius, radius) & cavity
            image[loop] = hu["bowel"]
            if air:
                image[_ellipse(x, y, cx, cy - 0.3 * radius, 0.5 * radius, 0.4 * radius)] = AIR_HU

    liver = _liver(x, y, abdomen, f) & cavity
    image[liver] = hu["liver"] + 6.0 * texture[liver]
    lx, ly = abdomen.liver_centre
    hilum = np.array([lx + 0.15, ly + 0.1])
    for angle, length, width, phase in abdomen.vessels:
        direction = np.array([np.cos(angle + 0.3 * np.sin(phase + 4 * f)), np.sin(angle)])
        along = (x - hilum[0]) * direction[0] + (y - hilum[1]) * direction[1]
        across = np.abs(-(x - hilum[0]) * direction[1] + (y - hilum[1]) * direction[0])
        vessel = liver & (along > 0) & (along < length) & (across < width)
        image[vessel] = hu["vessel"]
    if abdomen.gallbladder is not None:
        g_angle, g_size, g_f, g_extent = abdomen.gallbladder
        if abs(f - g_f) < g_extent:
            edge = float(_liver_radius(abdomen, np.asarray(g_angle), f))
            gx0, gy0 = lx + edge * np.cos(g_angle), ly + edge * np.sin(g_angle)
            bladder = _ellipse(x, y, gx0, gy0, g_size, 0.7 * g_size) & cavity
            image[bladder] = hu["fluid"]
            liver &= ~bladder
    tumour, offset = _tumour_fields(x, y, abdomen, f)
    tumour &= liver
    image[liver] += offset[liver]

    image = image.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    image += rng.normal(0.0, abdomen.noise_hu, size=(size, size))

    x, y = _grid(size)
    coarse = _liver(x, y, abdomen, f) & _ellipse(
        x, y, *abdomen.body_centre, *(abdomen.body_axes - abdomen.fat - abdomen.wall)
    )
    if abdomen.gallbladder is not None and abs(f - g_f) < g_extent:
        coarse &= ~_ellipse(x, y, gx0, gy0, g_size, 0.7 * g_size)
    lesion, _ = _tumour_fields(x, y, abdomen, f)
    label = np.zeros((size, size), np.uint8)
    label[coarse] = 1
    label[coarse & lesion] = 2
    return image.astype(np.float32), label


def make_case(seed: int, case_number: int, image_size: int = 128, num_slices: int = 8) -> Case:
    """One phantom CT volume (image_size, image_size, num_slices) in HU; slice 0 is the
    highest, under the liver's dome. Reproducible from (seed, case_number, num_slices)."""
    if image_size < 16 or num_slices < 1:
        raise ValueError(
            f"need image_size >= 16 and num_slices >= 1, got {image_size}, {num_slices}"
        )
    rng = np.random.default_rng([seed, case_number])
    fractions = np.linspace(0.08, 0.92, num_slices)
    abdomen = _draw_abdomen(rng, fractions)
    slices = [_render_slice(rng, abdomen, float(f), image_size) for f in fractions]
    step = fractions[1] - fractions[0] if num_slices > 1 else 0.1
    spacing = (
        abdomen.fov_mm / image_size,
        abdomen.fov_mm / image_size,
        float(step * abdomen.height_mm),
    )
    return Case.from_slices(f"liver_{case_number:03d}", slices, spacing)
