"""What a run saves and resumes: weights, optimiser, EMA, random states, position, running sums, history."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PneumoniaCNNError, one_line


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

    def saved(self) -> dict:
        """The ``training_state`` entry of last.pt."""
        return {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "best_score": self.best_score, "epochs_without_improvement": self.epochs_without_improvement,
                "ema_state_dict": cpu_state(self.ema_model) if self.ema_model is not None else None,
                "epoch_sums": vars(self.sums).copy(), "train_digest": self.train_digest}

    def restore(self, checkpoint: dict, path=None):
        """Continue exactly where ``checkpoint`` (a last.pt) stopped; a last.pt without its training state, or with
        one of the wrong shape (a copied best.pt, a damaged file), is one line naming the file."""
        try:
            self._restore(checkpoint)
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, IndexError) as error:
            reason = f"no {error}" if isinstance(error, KeyError) else one_line(error)
            raise PneumoniaCNNError(f"{path or 'last.pt'}: cannot resume from it ({reason}); it is not a last.pt "
                                    f"that training wrote") from None

    def _restore(self, checkpoint: dict):
        saved = checkpoint["training_state"]
        self.model.load_state_dict(checkpoint["state_dict"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.ema_model is not None and saved.get("ema_state_dict") is not None:
            self.ema_model.load_state_dict(saved["ema_state_dict"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.epoch, self.step_in_epoch = saved["epoch"], saved.get("step_in_epoch", 0)
        self.best_score = saved.get("best_score")
        self.epochs_without_improvement = saved.get("epochs_without_improvement", 0)
        self.sums = RunningSums.from_saved(saved.get("epoch_sums")) if self.step_in_epoch else RunningSums()
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


def cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
