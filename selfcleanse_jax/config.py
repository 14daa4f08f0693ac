"""The default configuration: every key the library reads, with its default.

`configs/*.py` start from `default_config()` and change what they need; the command line
overrides any key with `--config.KEY=VALUE`.
"""

from __future__ import annotations

import ml_collections

METHODS = ("baseline", "filter", "selfcleanse", "oracle")


def default_config() -> ml_collections.ConfigDict:
    """Self-cleansing on the embedded cardiac phantom under the paper-b noise protocol."""
    c = ml_collections.ConfigDict()
    c.method = "selfcleanse"
    c.seed = 0  # the model's initialisation, shuffling and augmentation; and the data's
    c.parallel = "auto"
    c.progress = True

    c.data = ml_collections.ConfigDict()
    c.data.seed = -1  # the phantom and the train/test split; < 0: `seed`
    c.data.root = ""  # a dataset folder; empty: the phantom, generated in memory
    c.data.layout = ""  # msd | acdc | lits; empty: detected from the folder's contents
    c.data.modality = ""  # mri | ct; empty: from dataset.json or the layout (ACDC mri, LiTS ct)
    c.data.ct_window = (-200.0, 250.0)  # Hounsfield window for CT (a liver window)
    c.data.canonical = True  # reorient volumes to RAS+ for training; outputs keep the input's
    c.data.slice_axis = "auto"  # with canonical: R | A | S, or auto (thick-slice axis, else S)
    c.data.target_spacing = 0.0  # in-plane mm; 0: resize slices to image_size instead
    c.data.image_size = 128  # slices are (image_size, image_size) after resizing or crop/pad
    c.data.cache_dir = ""  # preprocessed slices; empty: $XDG_CACHE_HOME/selfcleanse_jax
    c.data.lits_classes = "liver_tumour"  # liver_tumour | tumour
    c.data.test_fraction = 0.2  # held-out cases when the dataset has no labelled test split
    c.data.folds = 0  # k > 1: k-fold split of the training cases, fold `data.fold` validates
    c.data.fold = 0
    c.data.phantom = "cardiac"  # without data.root: cardiac (MRI) or liver (CT) phantom
    c.data.phantom_train_cases = 40
    c.data.phantom_test_cases = 10
    c.data.phantom_slices = 8

    c.noise = ml_collections.ConfigDict()
    c.noise.kind = "paper-b"  # none, a model of selfcleanse_jax.noise, a preset or a protocol
    c.noise.rate = -1.0  # fraction of noisy slices; < 0: a protocol's own rate, else 0.5
    c.noise.seed = 0
    c.noise.params = ml_collections.ConfigDict()  # the noise model's parameters, e.g. radius

    c.model = ml_collections.ConfigDict()
    c.model.depth = 4
    c.model.base_width = 32
    c.model.max_width = 512
    c.model.norm = "instance"
    c.model.compute_dtype = "float32"
    c.model.weight_grad_parts = 1  # 3x3 weight grads over parts of a batch; 0: 8 on CPU, else 1
    c.model.cpu_conv_library = "eigen"  # runs convolutions on the CPU backend: eigen, ynnpack
    c.model.cpu_reduce_library = "ynnpack"  # runs reductions on the CPU backend: ynnpack, xla

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 50
    c.train.batch_size = 8
    c.train.eval_batch_size = 32
    c.train.learning_rate = 1e-3
    c.train.weight_decay = 1e-4
    c.train.warmup_steps = 50
    c.train.dice_weight = 1.0
    c.train.eval_every = 5
    c.train.checkpoint = True  # save to WORKDIR/checkpoints and resume from there
    c.train.checkpoint_every = 5  # epochs; the last epoch is always saved
    c.train.checkpoint_every_steps = 0  # also every this many training steps; 0: off
    c.train.checkpoint_every_minutes = 5.0  # also after a step this long since the last; 0: off
    c.train.checkpoint_keep = 2  # checkpoints kept (the newest)
    c.train.record_dynamics = True  # per-slice losses, w and flags: WORKDIR/dynamics/*.npz
    c.train.tensorboard = False  # TensorBoard event files in WORKDIR/tensorboard (tensorboardX)
    c.train.data_workers = 0  # grain read threads for the training batches; 0: in the loop
    c.train.nonfinite = "skip"  # a non-finite loss or gradient: skip the step, or stop the run
    c.train.nonfinite_limit = 10  # skip: the run stops after more skipped steps than this

    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True
    c.augment.flip = True
    c.augment.rot90 = True
    c.augment.max_rotation_deg = 15.0
    c.augment.max_scale = 0.1
    c.augment.max_translate = 0.05
    c.augment.intensity_scale = 0.1
    c.augment.intensity_shift = 0.1

    c.cleanse = ml_collections.ConfigDict()
    c.cleanse.warmup_epochs = -1  # -1: 10% of the epochs, at least 1 (adaptive: the least)
    c.cleanse.adaptive_warmup = False  # also wait until every class's training Dice saturates
    c.cleanse.warmup_max_fraction = 0.5  # an adaptive warm-up's longest, as share of the epochs
    c.cleanse.saturation = 0.9  # saturated: the fitted slope has fallen by this share (ADELE)
    c.cleanse.gmm_backend = "jax"  # jax | sklearn
    c.cleanse.tau = 0.5
    c.cleanse.reg_covar = 5e-4
    c.cleanse.lfm_dice_weight = 0.0  # Dice weight in the LFM's loss; < 0: train.dice_weight
    c.cleanse.lfm_loss = "ce"  # ce (mean cross-entropy) | boundary (disagreement per outline px)
    c.cleanse.warmup_dice_weight = -1.0  # Dice weight while warming up; < 0: train.dice_weight
    c.cleanse.lfm_normalise = "minmax"  # minmax | quantile (robust to a few extreme losses)
    c.cleanse.min_separation = 0.0  # flag nothing when the mixture's Ashman D is below this
    c.cleanse.loss_window = 1  # mean of the per-sample loss over the last k rounds
    c.cleanse.sticky = False  # keep each sample's lowest clean probability across rounds
    c.cleanse.kappa = 0.8
    c.cleanse.fallback = "given"  # given | ignore | disputed | band
    c.cleanse.band = 2  # fallback=band: unsure pixels this near a drawn outline (px) are ignored
    c.cleanse.edge_ignore = 0  # > 0: pseudo-labels teach no pixel this near (px) an outline
    c.cleanse.calibrate = True  # LCM softmax shifted per class: trusted slices' areas as given
    c.cleanse.calibrate_lfm = True  # the LFM's losses too, from the last round's trusted slices
    c.cleanse.calibrate_estimate = "median"  # pooled (total area) | median (of per-slice ratios)
    c.cleanse.calibrate_min_share = 0.0122  # classes given smaller (median, share of H*W) keep 0
    c.cleanse.soft_targets = False
    c.cleanse.temperature = 1.0
    c.cleanse.morph_radius = 0
    c.cleanse.unlearnt_below = 0.1  # > 0: a slice whose drawn class the model predicts on less
    c.cleanse.unlearnt_weight = 3.0  # than this share of is not flagged, and has this weight
    c.cleanse.flip_average = False  # average the model's softmax with a mirrored pass
    c.cleanse.teacher_decay = 0.0  # > 0: LFM losses and LCM softmax from an EMA of the weights
    c.cleanse.round_logits_gb = 4.0  # a round keeps its logits on device up to this; then reruns
    c.cleanse.lfm_oracle = False  # diagnostic: the LFM flags exactly the truly noisy slices
    c.cleanse.weight = 1.0  # lambda, the weight of the pseudo-labelled samples
    c.cleanse.ramp_epochs = 3

    # Several runs in one program, trained together (`selfcleanse_jax.members`): one member
    # per seed; a tuple of length 1 is shared by every member; both empty: one plain run.
    c.runs = ml_collections.ConfigDict()
    c.runs.seeds = ()  # each member's `seed`
    c.runs.noise_seeds = ()  # each member's `noise.seed`
    c.runs.step = "each"  # each: every member's own step, side by side | mapped: one vmapped step

    # Several processes (hosts) on jax.distributed; every process runs the same command.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # auto (when SLURM/TPU/JAX env says so) | yes | no
    c.distributed.coordinator = ""  # HOST:PORT of process 0; empty: detected by JAX
    c.distributed.num_processes = 0  # with a coordinator: how many processes
    c.distributed.process_id = -1  # with a coordinator: this process's index
    return c


def _merged(defaults: dict, saved: dict) -> dict:
    merged = dict(defaults)
    for key, value in saved.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_dicts else value
    return merged


LEGACY_VALUES = {
    "data": {"canonical": False, "slice_axis": "S"},
    "model": {"cpu_conv_library": "ynnpack", "cpu_reduce_library": "xla"},
    "cleanse": {
        "calibrate": False,
        "calibrate_lfm": False,
        "calibrate_estimate": "pooled",
        "calibrate_min_share": 0.0,
    },
}
"""Keys whose default is not what runs from before the key trained with: those runs did not
reorient their volumes, nor calibrate the LFM and LCM, their CPU convolutions ran on XLA's
default, YNNPACK, and their CPU reductions on XLA's own loops. A saved config that lacks one
of these reads back with this value."""


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config (its `config.json`) with every key it lacks at the value a run
    from before that key existed trained with: its default, or its `LEGACY_VALUES` entry."""
    legacy = {
        section: {key: value for key, value in keys.items() if key not in saved.get(section, {})}
        for section, keys in LEGACY_VALUES.items()
    }
    return ml_collections.ConfigDict(_merged(_merged(default_config().to_dict(), legacy), saved))


def warmup_epochs(config: ml_collections.ConfigDict) -> int:
    """Epochs of plain training before the first filtering round."""
    if config.cleanse.warmup_epochs >= 0:
        return int(config.cleanse.warmup_epochs)
    return max(1, round(0.1 * config.train.epochs))
