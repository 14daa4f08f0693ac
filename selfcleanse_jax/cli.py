"""The `selfcleanse` command: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

EPILOG = """commands:
  train    train one model:  selfcleanse train --config configs/phantom.py --workdir runs/x \\
             [--config.method=filter --config.train.epochs=5 ...]
  demo     baseline vs filter vs selfcleanse vs oracle on the phantom
             [--quick] [--output DIR] [--config.KEY=VALUE ...]
  study    methods x noise protocols x phantoms x seeds: --output DIR [--quick]
             [--datasets cardiac liver] [--protocols paper-b paper-l|all] [--seeds 0 1 2]
  bench    throughput figures as JSON
  phantom  write a synthetic phantom (--kind cardiac|liver) as an MSD-layout dataset
  noise    corrupted copy of an MSD dataset: --input D --output D2 --kind K --rate R [--param K=V]
  gallery  PNG of the label-noise models on the phantom: --output PNG
  predict  segment volumes: --workdir RUN --input FILE_OR_DIR --output DIR [--tta]
  evaluate Dice, IoU, HD95, ASSD: --workdir RUN [--split val|test] -> RUN/eval/metrics.json
  report   plots of a run's training, LFM rounds and per-slice losses: --workdir RUN [--output D]
"""


JOBS_HELP = (
    "runs trained at once, each on a core of its own (default: one per core on a CPU, one on "
    "an accelerator)"
)


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


NOISE_PARAM_PREFIX = "--config.noise.params."


def _preempted(error: BaseException) -> bool:
    """Whether `error` is a run stopped by a signal after saving (`train.Preempted`; only a
    command that trains raises it, and it has imported train)."""
    train = sys.modules.get("selfcleanse_jax.train")
    return train is not None and isinstance(error, train.Preempted)


def _one_line(error: Exception) -> str:
    """An exception's message on one line (KeyError quotes and splits its own)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(text).split())


def _split_noise_params(argv: list[str]) -> tuple[list[str], dict]:
    """Take out `--config.noise.params.KEY=VALUE`: the noise model's own parameters, which
    the config file cannot list in advance (they depend on `noise.kind`)."""
    rest, params = [], {}
    for arg in argv:
        if arg.startswith(NOISE_PARAM_PREFIX):
            key, value = _parse_noise_param(arg.removeprefix(NOISE_PARAM_PREFIX))
            params[key] = value
        else:
            rest.append(arg)
    return rest, params


def _with_noise_params(config, params: dict):
    with config.unlocked():
        config.noise.params.update(params)
    return config


def load_config_file(spec: str):
    """The ConfigDict of `--config`: `FILE.py` (its `get_config()`), `FILE.py:ARG` (its
    `get_config(ARG)`), or a run folder's `config.json` (that run's settings, the keys it
    lacks at their defaults), so that a run can be replayed from its own record."""
    import inspect
    import runpy

    from selfcleanse_jax.config import with_defaults

    path, sep, arg = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        path, arg = spec, ""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file}: config file not found")
    if file.suffix == ".json":
        try:
            return with_defaults(json.loads(file.read_text()))
        except json.JSONDecodeError as error:
            raise UsageError(f"{file}: invalid JSON ({_one_line(error)})") from None
    if file.suffix != ".py":
        raise UsageError(f"{file}: --config takes a .py file with get_config() or a config.json")
    get_config = runpy.run_path(str(file)).get("get_config")
    if get_config is None:
        raise UsageError(f"{file}: defines no get_config()")
    if arg and not inspect.signature(get_config).parameters:
        raise UsageError(f"{file}: get_config() takes no argument, got {arg!r}")
    return get_config(arg) if arg else get_config()


TRAIN_DESCRIPTION = """\
Train one model. FILE is a Python file whose get_config() returns an ml_collections
ConfigDict (configs/phantom.py, configs/msd.py; FILE.py:ARG calls get_config(ARG)), or a run
folder's config.json, which replays that run. Every key of selfcleanse_jax/config.py can
be overridden, e.g. --config.method=baseline --config.noise.kind=paper-l
--config.train.epochs=20. Writes DIR/config.json, DIR/model.json, DIR/metrics.jsonl,
DIR/noise_card.json, DIR/checkpoints/ and, when done, DIR/summary.json. Rerunning the same
command resumes an unfinished run and reports a finished one; a DIR holding another config
is refused unless --overwrite. SIGTERM or Ctrl-C finishes the step under way, saves a
checkpoint there and exits 0. With --config.runs.seeds="(0,1,2)" (and/or runs.noise_seeds)
the members train together in one program, each into DIR/member_K/, and DIR/members.json
lists them."""


def train_config(args: argparse.Namespace, overrides: list[str]):
    """The config that `selfcleanse train` ARGS asks for: its --config with the overrides."""
    if args.config is None:
        raise UsageError("--config is required, e.g. --config configs/phantom.py")
    if not args.workdir:
        raise UsageError("--workdir is required")
    return _apply_overrides(load_config_file(args.config), overrides)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    config = train_config(args, overrides)
    from selfcleanse_jax import distributed, members, train

    if members.requested(config):
        result = members.run(config, args.workdir, overwrite=args.overwrite)
        print(json.dumps(result, indent=1))
        return 0
    summary = train.run(config, args.workdir, overwrite=args.overwrite)
    if distributed.is_main():
        print(json.dumps({k: v for k, v in summary.items() if k != "cleanse"}, indent=1))
    return 0


def _check_key(config, key: str) -> None:
    """A UsageError naming `key` (dotted) when the config has no such key, with the nearest
    existing one when there is a close match."""
    import difflib

    node, path = config, []
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            known = list(node.keys()) if hasattr(node, "keys") else []
            near = difflib.get_close_matches(part, known, n=1)
            hint = f" (did you mean --config.{'.'.join([*path, near[0]])}?)" if near else ""
            raise UsageError(f"--config.{key}: the config has no such key{hint}")
        node, path = node[part], [*path, part]


def _apply_overrides(config, overrides: list[str]):
    """Apply `--config.KEY=VALUE` overrides to a ConfigDict, typed as ml_collections does."""
    from absl import flags
    from ml_collections import config_flags

    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise UsageError(f"unrecognised arguments: {' '.join(bad)}")
    overrides, noise_params = _split_noise_params(overrides)
    for override in overrides:
        _check_key(config, override.removeprefix("--config.").partition("=")[0])
    flag_values = flags.FlagValues()
    argv = ["selfcleanse", *overrides]
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
    except (flags.Error, KeyError, AttributeError) as e:
        raise UsageError(_one_line(e)) from None
    return _with_noise_params(flag_values.config, noise_params)


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from selfcleanse_jax import demo, runs

    config = _apply_overrides(demo.demo_config(args.quick), overrides)
    demo.main(
        Path(args.output),
        config=config,
        noise_kinds=tuple(args.noise) if args.noise else demo.NOISE_KINDS,
        overwrite=args.overwrite,
        jobs=args.jobs or runs.default_jobs(),
    )
    return 0


def cmd_study(args: argparse.Namespace, overrides: list[str]) -> int:
    from selfcleanse_jax import demo, runs, study
    from selfcleanse_jax.config import METHODS

    config = _apply_overrides(demo.demo_config(args.quick), overrides)
    protocols = study.ALL_PROTOCOLS if args.protocols == ["all"] else tuple(args.protocols)
    study.main(
        Path(args.output),
        quick=args.quick,
        config=config,
        datasets=tuple(args.datasets),
        protocols=protocols,
        seeds=tuple(args.seeds),
        methods=tuple(args.methods or (study.QUICK_METHODS if args.quick else METHODS)),
        jobs=args.jobs or runs.default_jobs(),
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from selfcleanse_jax import bench

    if args.scaling:
        figures = {"scaling": bench.scaling(quick=args.quick)}
    elif args.device_report:
        figures = bench.device_report(
            batch_sizes=(8, 32) if args.quick else (8, 32, 128),
            image_size=64 if args.quick else 128,
            repeats=1 if args.quick else 3,
        )
    else:
        figures = bench.run(quick=args.quick)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from selfcleanse_jax.data import phantom

    root = phantom.write_phantom_dataset(
        Path(args.output),
        num_train=args.cases,
        num_test=args.test_cases,
        seed=args.seed,
        image_size=args.image_size,
        num_slices=args.slices,
        kind=args.kind,
    )
    print(f"wrote {args.cases} training and {args.test_cases} {args.kind} test cases to {root}")
    if args.preview:
        from selfcleanse_jax.noise_tools import phantom_preview

        png = phantom_preview(
            Path(args.preview), args.kind, args.seed, args.image_size, args.slices
        )
        print(f"drew slices of its first cases in {png}")
    return 0


def _parse_noise_param(text: str) -> tuple[str, object]:
    """`KEY=VALUE` of `--param`: VALUE read as a Python literal, else kept as a string."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def cmd_noise(args: argparse.Namespace) -> int:
    from selfcleanse_jax import noise_tools

    root = noise_tools.corrupt_dataset(
        Path(args.input), Path(args.output), args.kind, args.rate, args.seed, dict(args.param)
    )
    card = json.loads((root / "noise_card.json").read_text())
    print(json.dumps({"output": str(root), **card["summary"]}, indent=1))
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from selfcleanse_jax import noise_tools

    path = noise_tools.gallery(Path(args.output), seed=args.seed, image_size=args.image_size)
    print(f"wrote {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from selfcleanse_jax import predict

    written = predict.predict(
        Path(args.workdir), Path(args.input), Path(args.output), flip_tta=args.tta
    )
    print(f"wrote {len(written)} label volume(s) to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from selfcleanse_jax import evaluate

    result = evaluate.evaluate(Path(args.workdir), split=args.split)
    print(json.dumps(result, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from selfcleanse_jax import report

    result = report.make_report(Path(args.workdir), Path(args.output) if args.output else None)
    for path in result["files"]:
        print(f"wrote {path}")
    for reason in result["summary"].get("skipped", []):
        print(f"skipped {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfcleanse",
        description="Deep self-cleansing segmentation with noisy labels.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser(
        "train",
        help="train one model (any --config.KEY=VALUE applies)",
        usage="selfcleanse train --config FILE --workdir DIR [--config.KEY=VALUE ...] "
        "[--overwrite]",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("--config", metavar="FILE", help="a .py config or a run's config.json")
    tr.add_argument("--workdir", metavar="DIR", help="directory for the run's records")
    tr.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a workdir that holds a run of another config",
    )

    demo = sub.add_parser(
        "demo", help="the four methods on the noisy phantom (any --config.KEY=VALUE applies)"
    )
    demo.add_argument("--quick", action="store_true", help="small model and data: minutes on a CPU")
    demo.add_argument("--output", default="demo_out", help="directory for results and runs")
    demo.add_argument(
        "--noise",
        nargs="+",
        metavar="KIND",
        help="noise models, presets or protocols to compare under (default: paper-b paper-l)",
    )
    demo.add_argument("--jobs", type=int, default=0, help=JOBS_HELP)
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain run folders that hold runs of another config (default: refuse)",
    )

    st = sub.add_parser(
        "study",
        help="methods x noise protocols x datasets x seeds, mean ± sd and paired differences "
        "(any --config.KEY=VALUE applies)",
    )
    st.add_argument("--quick", action="store_true", help="small model and data: CPU-sized")
    st.add_argument("--output", required=True, help="directory for study.json, study.md, runs/")
    st.add_argument(
        "--datasets",
        nargs="+",
        default=["cardiac", "liver"],
        metavar="D",
        help="phantoms (cardiac, liver) or dataset folders (default: both phantoms)",
    )
    st.add_argument(
        "--protocols",
        nargs="+",
        default=["paper-b", "paper-l"],
        metavar="P",
        help="noise protocols or kinds; 'all' for every protocol (default: paper-b paper-l)",
    )
    st.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S")
    st.add_argument("--jobs", type=int, default=0, help=JOBS_HELP)
    st.add_argument(
        "--methods",
        nargs="+",
        choices=["baseline", "filter", "selfcleanse", "oracle"],
        metavar="M",
        help="default: all four; with --quick baseline, selfcleanse and oracle",
    )

    bench = sub.add_parser("bench", help="throughput figures")
    bench.add_argument("--json", help="also write the figures to this file")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    what = bench.add_mutually_exclusive_group()
    what.add_argument(
        "--scaling",
        action="store_true",
        help="time a training step and an LFM sweep on 1, 2, 4 simulated devices and on 2 "
        "processes of 2, with the bytes each moves between devices",
    )
    what.add_argument(
        "--device-report",
        action="store_true",
        help="the device, its memory in use, and bfloat16 train throughput at batch 8, 32 "
        "and 128 against the device's bfloat16 peak",
    )
    bench.set_defaults(func=cmd_bench)

    ph = sub.add_parser("phantom", help="write a phantom as an MSD-layout dataset")
    ph.add_argument("--output", required=True)
    ph.add_argument(
        "--kind", default="cardiac", choices=["cardiac", "liver"], help="cardiac MRI or liver CT"
    )
    ph.add_argument("--cases", type=int, default=40, help="training cases")
    ph.add_argument("--test-cases", type=int, default=10)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--image-size", type=int, default=128)
    ph.add_argument("--slices", type=int, default=8, help="slices per case")
    ph.add_argument("--preview", help="also draw slices of the first cases with their labels")
    ph.set_defaults(func=cmd_phantom)

    nz = sub.add_parser("noise", help="write a copy of an MSD dataset with noisy training labels")
    nz.add_argument("--input", required=True, help="MSD dataset to corrupt")
    nz.add_argument("--output", required=True, help="new directory for the corrupted copy")
    nz.add_argument(
        "--kind", required=True, help="noise model or preset, e.g. boundary, markov-expand"
    )
    nz.add_argument(
        "--rate",
        type=float,
        default=None,
        help="fraction of slices made noisy (default: a protocol's own rate, else 0.5)",
    )
    nz.add_argument("--seed", type=int, default=0)
    nz.add_argument(
        "--param",
        type=_parse_noise_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model parameter (Python literal, else string); repeatable, e.g. radius=(1,4)",
    )
    nz.set_defaults(func=cmd_noise)

    gal = sub.add_parser("gallery", help="PNG gallery of the label-noise models on the phantom")
    gal.add_argument("--output", required=True, help="PNG file to write")
    gal.add_argument("--seed", type=int, default=0)
    gal.add_argument("--image-size", type=int, default=128)
    gal.set_defaults(func=cmd_gallery)

    pr = sub.add_parser("predict", help="segment NIfTI volumes with a trained run")
    pr.add_argument("--workdir", required=True, help="workdir of a training run")
    pr.add_argument("--input", required=True, help="a .nii/.nii.gz file or a directory of them")
    pr.add_argument("--output", required=True, help="directory for the label volumes")
    pr.add_argument("--tta", action="store_true", help="average with the mirrored image")
    pr.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="Dice, IoU, HD95, ASSD of a run's latest checkpoint")
    ev.add_argument("--workdir", required=True, help="workdir of a training run")
    ev.add_argument(
        "--split",
        default="test",
        choices=["val", "test"],
        help="test cases, or the validation fold of a run trained with data.folds > 1",
    )
    ev.set_defaults(func=cmd_evaluate)

    rep = sub.add_parser("report", help="plots of how a run's labels and LFM rounds evolved")
    rep.add_argument("--workdir", required=True, help="workdir of a training run")
    rep.add_argument("--output", help="directory for the plots (default: RUN/report)")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("selfcleanse_jax").setLevel(logging.INFO)
    debug = "--debug" in argv
    if not debug:  # orbax logs its failures with tracebacks; they are reported in one line
        for noisy in ("absl", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the command
    parser = build_parser()
    try:
        args, overrides = parser.parse_known_args(argv)
        with_overrides = {"train": cmd_train, "demo": cmd_demo, "study": cmd_study}
        if args.command in with_overrides:
            return with_overrides[args.command](args, overrides)
        if overrides:
            parser.error(f"unrecognised arguments: {' '.join(overrides)}")
        return args.func(args)
    except UsageError as e:
        print(f"selfcleanse: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as e:
        if debug:
            raise
        print(f"selfcleanse: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print("selfcleanse: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _preempted(e):
            raise
        command = shlex.join(["selfcleanse", *argv])
        print(f"selfcleanse: {e}; to resume, run the same command: {command}", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
