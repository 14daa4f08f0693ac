"""Checkpoints of a run: everything that decides the rest of it.

This module alone talks to orbax (`CheckpointManager` with `args.Composite`), so that a move
to another checkpoint API touches one file. Checkpoints live in `WORKDIR/checkpoints/`,
numbered by the training step they were taken after (runs before step numbering numbered
them by epoch; `meta` says which epoch either way). Each holds these items:

- `state`: model, optimiser and teacher state;
- `bank`: the target bank and the LFM's loss history (per-sample arrays);
- `meta`: JSON: the epoch, whether it had finished, the warm-up's progress, the record of an
  unfinished epoch, the count of skipped non-finite steps;
- `data`: JSON: the input pipeline's position (epoch, step, grain iterator state);
- `partial`: per-sample arrays of an unfinished epoch (its training losses so far, the GMM
  input of its cleansing round).

Saves are asynchronous: `save` returns once the arrays are on the host and orbax writes them
in a background thread, into a temporary folder renamed into place when complete, so a kill
never leaves a half-written checkpoint that looks whole. `keep` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
UNREADABLE = "checkpoints_unreadable"
"""Where checkpoints that cannot be read back are moved (never deleted), for inspection."""


class CheckpointError(OSError):
    """A checkpoint could not be written or read back; the message says which and why."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def all_finite(tree: Any) -> bool:
    """Whether every floating-point value in the (host) pytree `tree` is finite."""
    return all(
        np.isfinite(leaf).all()
        for leaf in jax.tree.leaves(tree)
        if np.issubdtype(np.asarray(leaf).dtype, np.inexact)
    )


def _hide_closed_loop_callbacks() -> None:
    """Keep quiet the reads that a failed orbax restore leaves running: when they finish,
    their callbacks find its event loop closed and would each print a traceback that says
    nothing to the user ("Event loop is closed"). Any other unraisable error still shows."""
    shown = sys.unraisablehook
    if getattr(shown, "hides_closed_loops", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            shown(unraisable)

    hook.hides_closed_loops = True
    sys.unraisablehook = hook


class Checkpointer:
    """Saves (asynchronously) and restores {state, bank, meta, data, partial} of a run.

    `every_steps` and `every_minutes` (0: off) set when `due` asks for a save between the
    saves the loop always makes (at the end of some epochs, on a stop signal). A `read_only`
    one (for evaluation and prediction) neither saves nor tidies the folder.
    """

    def __init__(
        self,
        workdir: str | Path,
        keep: int = 2,
        every_steps: int = 0,
        every_minutes: float = 0.0,
        read_only: bool = False,
    ):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINTS
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max(keep, 1),
                create=not read_only,
                read_only=read_only,
                enable_async_checkpointing=True,
                # The folders of saves that a kill interrupted; a reader (evaluate, predict)
                # leaves them, as they may be a running training's saves in progress.
                cleanup_tmp_directories=not read_only,
            ),
        )
        self.every_steps = every_steps
        self.every_seconds = 60.0 * every_minutes
        self.last_save = time.monotonic()
        self.pending: int | None = None  # the step of a save that may still be writing

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether an interval save is due after training step `step` (counted from 1)."""
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        # Several processes would each read their own clock and disagree: they save by steps.
        timed = self.every_seconds > 0 and jax.process_count() == 1
        by_time = timed and time.monotonic() - self.last_save >= self.every_seconds
        return by_steps or by_time

    def wait(self) -> None:
        """Block until the save in the background is written; a CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # orbax and tensorstore raise many types for I/O failures
            step, self.pending = self.pending, None
            raise CheckpointError(
                f"{self.directory}: the checkpoint of step {step} could not be written "
                f"({_one_line(error)}); the checkpoints before it are kept"
            ) from error
        self.pending = None

    def save(
        self,
        step: int,
        state: Any,
        bank: dict[str, np.ndarray],
        meta: dict,
        data: dict | None = None,
        partial: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Start writing a checkpoint of host copies after training step `step`; returns once
        the arrays are copied, while orbax writes them in the background.

        The previous save is waited for first (a CheckpointError if it failed). A state with
        a non-finite value is refused (ValueError), so it never replaces a good checkpoint.
        """
        state = jax.device_get(state)
        if not all_finite(state):
            raise ValueError(
                f"{self.directory}: the state after step {step} holds non-finite values; "
                "not saved, the checkpoints before it are kept"
            )
        self.wait()
        # Copies: the loop goes on changing the bank in place while the write runs.
        items = {
            "state": ocp.args.StandardSave(state),
            "bank": ocp.args.StandardSave({k: np.array(v) for k, v in bank.items()}),
            "meta": ocp.args.JsonSave(meta),
        }
        if data is not None:
            items["data"] = ocp.args.JsonSave(data)
        if partial is not None:
            items["partial"] = ocp.args.StandardSave({k: np.array(v) for k, v in partial.items()})
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # orbax and tensorstore raise many types for I/O failures
            raise CheckpointError(
                f"{self.directory}: the checkpoint of step {step} could not be written "
                f"({_one_line(error)}); the checkpoints before it are kept"
            ) from error
        self.pending = step
        self.last_save = time.monotonic()

    def _items(self, step: int) -> set[str]:
        """The items the checkpoint of `step` holds (each is a folder of its own)."""
        folder = self.directory / str(step)
        return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()

    def restore(
        self,
        step: int,
        state_template: Any,
        bank_template: dict[str, np.ndarray],
        partial_template: dict[str, np.ndarray] | None = None,
    ) -> tuple[Any, dict[str, np.ndarray], dict, dict | None, dict[str, np.ndarray] | None]:
        """Restore the checkpoint of `step` as host arrays shaped like the templates.

        Returns (state, bank, meta, data, partial); data and partial are None where the
        checkpoint has none (saved at the end of an epoch, or before they existed).
        """
        self.wait()
        saved = self._items(step)
        items = {
            "state": ocp.args.StandardRestore(jax.device_get(state_template)),
            "bank": ocp.args.StandardRestore(bank_template),
            "meta": ocp.args.JsonRestore(),
        }
        if "data" in saved:
            items["data"] = ocp.args.JsonRestore()
        if "partial" in saved and partial_template is not None:
            # As saved, not shaped like the template: older runs saved fewer arrays.
            items["partial"] = ocp.args.StandardRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        bank = {k: np.asarray(v) for k, v in restored["bank"].items()}
        partial = restored.get("partial")
        if partial is not None:
            partial = {k: np.asarray(v) for k, v in partial.items()}
        return restored["state"], bank, restored["meta"], restored.get("data"), partial

    def restore_latest(
        self,
        state_template: Any,
        bank_template: dict[str, np.ndarray],
        partial_template: dict[str, np.ndarray] | None = None,
    ) -> tuple[int, tuple] | None:
        """(step, `restore(step, ...)`) of the newest checkpoint that reads back whole, or
        None when there is no checkpoint.

        Newer checkpoints that cannot be read (truncated or damaged by hand) are moved to
        `WORKDIR/checkpoints_unreadable/` and named in the log. When none can be read,
        nothing is moved and a CheckpointError says why.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        _hide_closed_loop_callbacks()  # before a restore fails: its reads may finish at once
        failures = []
        for step in steps:
            try:
                restored = self.restore(step, state_template, bank_template, partial_template)
            except Exception as error:  # orbax, tensorstore and json raise many types
                failures.append((step, error))
                continue
            for bad, error in failures:
                moved = self._move_aside(bad)
                log.warning(
                    "the checkpoint of step %d cannot be read (%s); moved to %s, resuming from "
                    "the checkpoint of step %d",
                    bad,
                    _one_line(error),
                    moved,
                    step,
                )
            if failures:
                self.manager.reload()
            return step, restored
        if failures:
            bad, error = failures[0]
            raise CheckpointError(
                f"{self.directory}: no checkpoint can be read (step {bad}: {_one_line(error)}); "
                "move the folder away or pass --overwrite to start afresh"
            )
        return None

    def _move_aside(self, step: int) -> Path:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.workdir / UNREADABLE / f"{step}-{stamp}"
        target.parent.mkdir(exist_ok=True)
        shutil.move(self.directory / str(step), target)
        return target

    def read_meta(self, step: int) -> dict:
        """The JSON `meta` item of the checkpoint of `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore_bank(self, step: int) -> dict[str, np.ndarray]:
        """The target bank of `step` as saved (targets, weights, clean_prob, flagged, ...)."""
        raw = self.manager.restore(step, args=ocp.args.Composite(bank=ocp.args.StandardRestore()))
        return {name: np.asarray(array) for name, array in raw["bank"].items()}

    def restore_state(self, step: int, state_template: Any = None) -> Any:
        """Restore only the model/optimiser state of `step` (for evaluation and prediction);
        a CheckpointError when it cannot be read.

        With a template the result is host arrays shaped like it; without one, orbax's raw
        nested dicts (enough to read the saved parameter shapes).
        """
        _hide_closed_loop_callbacks()
        try:
            return self._restore_state(step, state_template)
        except Exception as error:  # orbax, tensorstore and json raise many types
            raise CheckpointError(
                f"{self.directory}: the checkpoint of step {step} cannot be read "
                f"({_one_line(error)})"
            ) from error

    def _restore_state(self, step: int, state_template: Any) -> Any:
        if state_template is None:
            args = ocp.args.Composite(state=ocp.args.StandardRestore())
            return self.manager.restore(step, args=args)["state"]
        template = jax.device_get(state_template)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template))
            )
        except (ValueError, KeyError):
            # An orbax version that refuses partial restores: read the bank too, as saved.
            raw = self.manager.restore(
                step, args=ocp.args.Composite(bank=ocp.args.StandardRestore())
            )
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(template),
                    bank=ocp.args.StandardRestore(raw["bank"]),
                ),
            )
        return restored["state"]

    def close(self) -> None:
        """Wait for the save in the background (a CheckpointError if it failed) and close."""
        try:
            self.wait()
        except CheckpointError:
            with contextlib.suppress(Exception):  # orbax raises the same failure again
                self.manager.close()
            raise
        self.manager.close()
