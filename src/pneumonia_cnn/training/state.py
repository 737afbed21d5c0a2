"""What a run saves and resumes: weights, optimiser, EMA, random states, position, running sums, history."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, PneumoniaCNNError, one_line


@dataclass
class RunningSums:
    """The current epoch's training loss and accuracy so far (kept across a resume inside the epoch)."""
    loss: float = 0.0
    correct: float = 0.0
    count: int = 0

    @classmethod
    def from_saved(cls, saved) -> RunningSums:
        if isinstance(saved, dict):
            return cls(**saved)
        if saved:  # earlier versions saved [loss, correct, count]
            return cls(float(saved[0]), float(saved[1]), int(saved[2]))
        return cls()


@dataclass
class TrainingState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    ema_model: torch.nn.Module | None = None
    epoch: int = 0
    step_in_epoch: int = 0
    best_score: float | None = None
    epochs_without_improvement: int = 0
    sums: RunningSums = field(default_factory=RunningSums)
    history: list = field(default_factory=list)
    train_digest: str = ""  # the training images and labels (setup.train_images_digest)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated and saved: the average when there is one."""
        return self.ema_model if self.ema_model is not None else self.model

    def rank_state(self) -> dict:
        """What each rank holds of its own: the augmentation generator (seeded per rank), the torch RNG and the
        partial sums of the epoch (summed across ranks at its end)."""
        return {"generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "epoch_sums": vars(self.sums).copy()}

    def saved(self, ranks: list[dict] | None = None, world_size: int = 1) -> dict:
        """The ``training_state`` entry of last.pt; ``ranks``: every rank's ``rank_state()`` (rank 0's is also
        kept at the top level, as earlier versions read it; rank 0's alone after the last epoch)."""
        ranks = ranks or [self.rank_state()]
        return {"optimizer": self.optimizer.state_dict(), **ranks[0], "ranks": ranks, "world_size": world_size,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "best_score": self.best_score, "epochs_without_improvement": self.epochs_without_improvement,
                "ema_state_dict": cpu_state(self.ema_model) if self.ema_model is not None else None,
                "train_digest": self.train_digest}

    def restore(self, checkpoint: dict, path=None, rank: int = 0):
        """Continue exactly where ``checkpoint`` (a last.pt) stopped, with ``rank``'s own random states and sums;
        a last.pt without its training state, or with one of the wrong shape (a copied best.pt, a damaged file),
        is one line naming the file."""
        try:
            self._restore(checkpoint, rank)
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, IndexError) as error:
            reason = f"no {error}" if isinstance(error, KeyError) else one_line(error)
            raise PneumoniaCNNError(f"{path or 'last.pt'}: cannot resume from it ({reason}); it is not a last.pt "
                                    f"that training wrote") from None

    def _restore(self, checkpoint: dict, rank: int):
        saved = checkpoint["training_state"]
        ranks = saved.get("ranks") or [saved]  # earlier versions saved rank 0's only; so does the last epoch,
        mine = ranks[rank] if rank < len(ranks) else ranks[0]  # after which nothing is trained
        self.model.load_state_dict(checkpoint["state_dict"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.ema_model is not None and saved.get("ema_state_dict") is not None:
            self.ema_model.load_state_dict(saved["ema_state_dict"])
        self.generator.set_state(mine["generator"])
        torch.set_rng_state(mine["torch_rng"])
        self.epoch, self.step_in_epoch = saved["epoch"], saved.get("step_in_epoch", 0)
        self.best_score = saved.get("best_score")
        self.epochs_without_improvement = saved.get("epochs_without_improvement", 0)
        self.sums = RunningSums.from_saved(mine.get("epoch_sums")) if self.step_in_epoch else RunningSums()
        self.history = list(checkpoint.get("history", []))


def check_resumable(checkpoint: dict, path) -> None:
    """A last.pt whose training state is missing (a best.pt copied over it) or of the wrong shape: one line."""
    saved, problem = checkpoint.get("training_state"), None
    if not isinstance(saved, dict):
        problem = "it holds no training state: is it a best.pt?" if saved is None else \
            f"training_state is {type(saved).__name__}, not a dict"
    elif not isinstance(saved.get("optimizer"), dict):
        problem = "training_state.optimizer is missing"
    else:
        wrong = [n for n in ("epoch", "step_in_epoch") if not isinstance(saved.get(n, 0), int)
                 or isinstance(saved.get(n, 0), bool) or saved.get(n, 0) < 0]
        problem = f"training_state.{wrong[0]} is {saved[wrong[0]]!r}, not a whole number" if wrong else None
    if problem:
        raise PneumoniaCNNError(f"{path}: cannot resume from it ({problem})")


def check_world_size(checkpoint: dict, world_size: int, where) -> None:
    """A run resumed with another number of processes would change its global batch, and its saved position in
    the epoch and per-rank random states belong to the other layout: refused (earlier versions saved no size)."""
    saved = checkpoint.get("training_state")
    started = saved.get("world_size") if isinstance(saved, dict) else None
    if isinstance(started, int) and not isinstance(started, bool) and started != world_size:
        how = f"with {started} processes (torchrun --nproc-per-node {started})" if started > 1 else "without torchrun"
        raise ConfigError(f"{where}: started with {started} process{'es' if started > 1 else ''}, resumed with "
                          f"{world_size}; its global batch and saved position in the epoch belong to {started}: "
                          f"resume it {how}, or start a new run")


def cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def check_own_best(run_dir, last: dict) -> None:
    """Before any epoch is trained again: the run's best.pt is there (unless last.pt's epoch, an improvement,
    writes it again), readable, and of the run last.pt belongs to. A missing or damaged best.pt had been found
    only once the remaining epochs were trained, and then on every later resume; another run's last.pt had
    replaced the folder's best.pt and history with its own."""
    from pathlib import Path

    from ..checkpoint import load_checkpoint
    from ..fileio import display_path
    saved, best = last.get("training_state") or {}, Path(run_dir) / "best.pt"
    rewritten = saved.get("step_in_epoch", 0) == 0 and saved.get("epochs_without_improvement", 0) == 0
    if not best.exists():
        if saved.get("epoch", 0) > 0 and not rewritten:
            raise PneumoniaCNNError(f"{display_path(best)}: missing, though {saved['epoch']} epochs are trained: the "
                                    f"run's best weights so far are lost (restore the file, or start a new run)")
        return
    try:
        own = load_checkpoint(best)
    except PneumoniaCNNError as error:
        raise PneumoniaCNNError(f"{error}: the run resumes with its own best.pt (restore the file, or start a new "
                                f"run)") from None
    if own.get("run_id") and last.get("run_id") and own["run_id"] != last["run_id"]:
        raise PneumoniaCNNError(f"{display_path(Path(run_dir) / 'last.pt')}: of run {last['run_id']}, not of this "
                                f"folder's {own['run_id']} (its best.pt): resuming would replace the folder's best.pt "
                                f"and history with another run's; put back the run's own last.pt, or start a new run")
