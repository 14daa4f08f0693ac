"""Several runs in one program: members that differ in their seeds, trained together.

`runs.seeds` and `runs.noise_seeds` (one per member, or one shared by all) make K members of
one config: member k trains with `seed` and `noise.seed` from them, on the images of the
config's own data seed (`data.seed`, else `seed`), so every member sees the same slices. Each
member is an ordinary `Trainer` in a thread of its own, with its own target bank, LFM fits,
LCM rounds, records and checkpoints in `WORKDIR/member_<k>/`, whose `config.json` replays it
as a single run. The members share the loaded data and the compiled steps. With
`runs.step="each"` (the default) each member runs the shared step from its own thread, and
the device interleaves them; with `runs.step="mapped"` their train steps meet in
`TrainTogether`: once each member still training has handed in its step, one call of
`Steps.train_members` (the step mapped over a member axis) runs them all. On a CPU the
mapped step is many times slower than the members' steps one after another (XLA runs the
mapped convolutions, whose kernels differ by member, as grouped convolutions). A member that
stops (an error, `train.nonfinite=stop`) leaves the others training.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from selfcleanse_jax import atomic, settings, train
from selfcleanse_jax.data.loading import data_seed, load_dataset
from selfcleanse_jax.steps import Steps, TrainState

MEMBERS_FILE = "members.json"
"""`WORKDIR/members.json`: every member's folder, seeds and summary (or error)."""


def requested(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` asks for several runs in one program (`runs.seeds` or
    `runs.noise_seeds` set)."""
    return bool(len(config.runs.seeds) or len(config.runs.noise_seeds))


def member_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """One single-run config per member: `seed` and `noise.seed` from `runs`, the data seed
    of `config` fixed, `runs` emptied. Only member 0 shows a progress bar."""
    seeds, noise_seeds = tuple(config.runs.seeds), tuple(config.runs.noise_seeds)
    count = max(len(seeds), len(noise_seeds))

    def pick(values: tuple, default: int, k: int) -> int:
        return int(values[k] if len(values) > 1 else values[0] if values else default)

    members = []
    for k in range(count):
        member = ml_collections.ConfigDict(config.to_dict())
        member.seed = pick(seeds, config.seed, k)
        member.noise.seed = pick(noise_seeds, config.noise.seed, k)
        member.data.seed = data_seed(config)
        member.runs.seeds, member.runs.noise_seeds = (), ()
        member.progress = bool(config.progress and k == 0)
        members.append(member)
    return members


def member_folder(workdir: Path, k: int) -> Path:
    return workdir / f"member_{k}"


@jax.jit
def _stack_states(states: list[TrainState]) -> TrainState:
    """Members' states stacked on a leading member axis, as `Steps.train_members` takes them."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(states: TrainState, count: int) -> list[TrainState]:
    return [jax.tree.map(lambda leaf, k=k: leaf[k], states) for k in range(count)]


class TrainTogether:
    """Where the members' train steps meet: `train` waits until every member still
    training has handed in its step, runs them all in one `Steps.train_members` call and
    hands each member its own state, losses and finite flag back."""

    def __init__(self, steps: Steps, count: int):
        self.steps = steps
        self.training = set(range(count))
        self.handed_in: dict[int, tuple] = {}
        self.results: dict[int, tuple | BaseException] = {}
        self.ready = threading.Condition()

    def train(self, k: int, state: TrainState, batch: dict[str, np.ndarray], key: jax.Array):
        with self.ready:
            self.handed_in[k] = (state, batch, key)
            self._run_when_all_in()
            self.ready.wait_for(lambda: k in self.results)
            result = self.results.pop(k)
        if isinstance(result, BaseException):
            raise result
        return result

    def leave(self, k: int) -> None:
        """Member `k` trains no more: the others no longer wait for it."""
        with self.ready:
            self.training.discard(k)
            self._run_when_all_in()

    def _run_when_all_in(self) -> None:
        if not self.handed_in or set(self.handed_in) != self.training:
            return
        order = sorted(self.handed_in)
        states, batches, keys = zip(*(self.handed_in.pop(k) for k in order), strict=True)
        try:
            stacked = {name: np.stack([b[name] for b in batches]) for name in batches[0]}
            new, losses, finite = self.steps.train_members(
                _stack_states(list(states)), stacked, jnp.stack(keys)
            )
            for j, (k, state) in enumerate(zip(order, _unstack(new, len(order)), strict=True)):
                self.results[k] = (state, losses[j], finite[j])
        except Exception as error:  # every member of this step sees it
            for k in order:
                self.results[k] = error
        self.ready.notify_all()


class MemberSteps:
    """A member's `Steps`: its train steps go to `TrainTogether`, everything else as is."""

    def __init__(self, steps: Steps, together: TrainTogether, k: int):
        self._steps, self._together, self._k = steps, together, k

    def __getattr__(self, name: str):
        return getattr(self._steps, name)

    def train(self, state: TrainState, batch: dict[str, np.ndarray], key: jax.Array):
        return self._together.train(self._k, state, batch, key)


def run(config: ml_collections.ConfigDict, workdir: str | Path, overwrite: bool = False) -> dict:
    """Train every member of `config` into `WORKDIR/member_<k>/` (a finished member is
    reported from its records, an unfinished one resumes) and write `WORKDIR/members.json`.
    Returns {"members": [...], "seconds": ...}; raises RuntimeError naming the members that
    failed once the others have finished."""
    config = train.resolved_config(config)
    settings.check(config)
    if jax.process_count() > 1:
        raise ValueError("several runs in one program (runs.seeds) run in one process")
    workdir = Path(workdir)
    train.prepare_workdir(config, workdir, overwrite)  # refuses a folder of another config
    workdir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(workdir / "config.json", config.to_json(indent=1) + "\n")
    start = time.perf_counter()
    configs = [train.resolved_config(member) for member in member_configs(config)]
    folders = [member_folder(workdir, k) for k in range(len(configs))]
    outcomes: list[dict | BaseException | None] = [
        train.prepare_workdir(member, folder, overwrite)
        for member, folder in zip(configs, folders, strict=True)
    ]
    to_train = [k for k, outcome in enumerate(outcomes) if outcome is None]
    if to_train:
        dataset = load_dataset(configs[to_train[0]])
        trainers = {k: train.Trainer(configs[k], folders[k], dataset) for k in to_train}
        together = None
        if config.runs.step == "mapped":
            together = TrainTogether(trainers[to_train[0]].steps, len(configs))
            for k in set(range(len(configs))) - set(to_train):
                together.leave(k)
        stop_requested: list[str] = []  # one list: a signal stops every member
        save_lock = threading.Lock()
        for k, trainer in trainers.items():
            if together:
                trainer.steps = MemberSteps(trainer.steps, together, k)
            trainer.stop_requested = stop_requested
            trainer.save_lock = save_lock

        def train_member(k: int) -> dict:
            try:
                return trainers[k].run()
            finally:
                if together:
                    together.leave(k)

        catching = config.train.checkpoint
        signals = train.stop_signals(stop_requested) if catching else contextlib.nullcontext()
        with signals, concurrent.futures.ThreadPoolExecutor(len(to_train)) as pool:
            futures = {k: pool.submit(train_member, k) for k in to_train}
            for k, future in futures.items():
                error = future.exception()
                outcomes[k] = error if error is not None else future.result()
    result = _write_members(workdir, configs, folders, outcomes, time.perf_counter() - start)
    failed = {k: o for k, o in enumerate(outcomes) if isinstance(o, BaseException)}
    if failed and all(isinstance(o, train.Preempted) for o in failed.values()):
        raise next(iter(failed.values()))
    if failed:
        said = "; ".join(f"member {k}: {type(e).__name__}: {e}" for k, e in failed.items())
        raise RuntimeError(f"{len(failed)} of {len(configs)} members failed ({said})")
    return result


def _write_members(
    workdir: Path,
    configs: list[ml_collections.ConfigDict],
    folders: list[Path],
    outcomes: list,
    seconds: float,
) -> dict:
    members = []
    for member, folder, outcome in zip(configs, folders, outcomes, strict=True):
        entry = {"folder": folder.name, "seed": member.seed, "noise_seed": member.noise.seed}
        if isinstance(outcome, BaseException):
            entry["error"] = f"{type(outcome).__name__}: {outcome}"
        else:
            entry["summary"] = outcome
        members.append(entry)
    result = {"members": members, "seconds": seconds}
    atomic.write_text(workdir / MEMBERS_FILE, json.dumps(result, indent=1) + "\n")
    return result
