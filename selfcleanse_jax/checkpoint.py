"""Checkpoints of a run: model and optimiser state, the target bank and loss history, and
the input iterator's position.

This module alone talks to orbax (`CheckpointManager` with `args.Composite`), so that a move
to another checkpoint API touches one file. Checkpoints are numbered by epoch and live in
`WORKDIR/checkpoints/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores {state, bank, meta, data} at epoch boundaries.

    `data` is the input pipeline's position (JSON: the epoch, step and grain iterator state);
    checkpoints written before it existed restore with `data` None.
    """

    def __init__(self, workdir: str | Path, max_to_keep: int = 2):
        self.manager = ocp.CheckpointManager(
            Path(workdir).absolute() / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        epoch: int,
        state: Any,
        bank: dict[str, np.ndarray],
        meta: dict,
        data: dict | None = None,
    ) -> None:
        """Save host copies after `epoch` finished; returns when the write is complete."""
        items = {
            "state": ocp.args.StandardSave(state),
            "bank": ocp.args.StandardSave(bank),
            "meta": ocp.args.JsonSave(meta),
        }
        if data is not None:
            items["data"] = ocp.args.JsonSave(data)
        self.manager.save(epoch, args=ocp.args.Composite(**items))
        self.manager.wait_until_finished()

    def restore(
        self, epoch: int, state_template: Any, bank_template: dict[str, np.ndarray]
    ) -> tuple[Any, dict[str, np.ndarray], dict, dict | None]:
        """Restore the checkpoint of `epoch` as host arrays shaped like the templates.

        Returns (state, bank, meta, data); data is None where the checkpoint has none.
        """
        items = {
            "state": ocp.args.StandardRestore(jax.device_get(state_template)),
            "bank": ocp.args.StandardRestore(bank_template),
            "meta": ocp.args.JsonRestore(),
        }
        try:
            restored = self.manager.restore(
                epoch, args=ocp.args.Composite(**items, data=ocp.args.JsonRestore())
            )
        except KeyError:
            # A checkpoint without the iterator state (saved without it, or before it existed).
            restored = self.manager.restore(epoch, args=ocp.args.Composite(**items))
        bank = {k: np.asarray(v) for k, v in restored["bank"].items()}
        return restored["state"], bank, restored["meta"], restored.get("data")

    def restore_state(self, epoch: int, state_template: Any = None) -> Any:
        """Restore only the model/optimiser state of `epoch` (for evaluation and prediction).

        With a template the result is host arrays shaped like it; without one, orbax's raw
        nested dicts (enough to read the saved parameter shapes).
        """
        if state_template is None:
            args = ocp.args.Composite(state=ocp.args.StandardRestore())
            return self.manager.restore(epoch, args=args)["state"]
        template = jax.device_get(state_template)
        try:
            restored = self.manager.restore(
                epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(template))
            )
        except (ValueError, KeyError):
            # An orbax version that refuses partial restores: read the bank too, as saved.
            raw = self.manager.restore(
                epoch, args=ocp.args.Composite(bank=ocp.args.StandardRestore())
            )
            restored = self.manager.restore(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(template),
                    bank=ocp.args.StandardRestore(raw["bank"]),
                ),
            )
        return restored["state"]

    def close(self) -> None:
        self.manager.close()
