"""The training step as one CUDA graph (``--cuda-graph``): forward, loss, backward and the optimiser step of a
batch, captured once and replayed, so that a step costs the host one launch instead of a few hundred.

At the speeds of one GPU and the seed model a step is a few milliseconds of GPU work, and launching its
kernels one by one from Python takes as long: the step is bound by the host. A replay runs the same kernels
on the same memory, so the batch goes into fixed input buffers, the optimiser reads its learning rate from a
device tensor refreshed before each replay (the schedule keeps working), and autocast's weight cache is off.
Capture needs warm-up steps first (they also create the optimiser's state, whose initialisation must not be
captured); they are undone in place (weights, buffers, optimiser state), so a graphed run takes the same
steps as an eager one. A batch of another size (an epoch's last) takes the eager step. Off CUDA the same
object replays by running the step again, so its logic is tested on a CPU; the speed exists only on CUDA.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..device import autocast

WARMUP_STEPS = 3  # before capture, on a side stream: cuDNN picks its kernels, the allocator its pools


class GraphedStep:
    def __init__(self, model, forward, optimizer, amp_dtype, pos_weight, batch_shape, device: torch.device):
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.amp_dtype, self.pos_weight, self.device = amp_dtype, pos_weight, torch.device(device)
        self.batch_size = batch_shape[0]
        self.x = torch.zeros(batch_shape, device=self.device).contiguous(memory_format=torch.channels_last)
        self.target = torch.zeros(self.batch_size, device=self.device)
        self.learning_rates = [torch.tensor(float(g["lr"]), device=self.device) for g in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["capturable"] = True  # optimiser state (step counts) lives on the device
        self.graph = None
        self.loss = self.logits = None

    def _step(self):
        """What the graph holds; gradients set to None before capture make backward write them, not add."""
        with autocast(self.device, self.amp_dtype, cache_enabled=self.device.type != "cuda"):
            self.logits = self.forward(self.x).float()
        self.loss = F.binary_cross_entropy_with_logits(self.logits, self.target, pos_weight=self.pos_weight)
        self.loss.backward()
        self.optimizer.step()

    @contextlib.contextmanager
    def _tensor_learning_rates(self):
        """Inside: the groups' learning rates are the device tensors; outside (the schedule, the history,
        checkpoints) plain numbers."""
        floats = [float(g["lr"]) for g in self.optimizer.param_groups]
        for group, lr, value in zip(self.optimizer.param_groups, self.learning_rates, floats):
            lr.fill_(value)
            group["lr"] = lr
        try:
            yield
        finally:
            for group, value in zip(self.optimizer.param_groups, floats):
                group["lr"] = value

    def _warm_up_and_restore(self):
        """Run the warm-up steps, then put weights, buffers and optimiser state back, in the same tensors."""
        weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in self.optimizer.state.items()}
        side = torch.cuda.Stream() if self.device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                value.copy_(weights[name])
            for parameter, entries in self.optimizer.state.items():
                before = state.get(parameter)
                for key, value in entries.items():
                    if torch.is_tensor(value):  # a state that did not exist before starts at zero
                        value.copy_(before[key]) if before else value.zero_()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on ``x`` (the model's input) and ``target``; returns (logits, mean loss)."""
        self.x.copy_(x)
        self.target.copy_(target)
        with self._tensor_learning_rates():
            if self.graph is None:
                self._warm_up_and_restore()
                if self.device.type == "cuda":
                    self.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self.graph):
                        self._step()
                else:
                    self.graph = "eager"
            if self.device.type == "cuda":
                self.graph.replay()
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        return self.logits.detach().clone(), self.loss.detach().clone()
