"""Adversarial training with FGM (Miyato et al., 2017) on the input embeddings.

After the normal backward pass, each batch is run once more with its word embeddings pushed
``epsilon`` along the normalised gradient of the loss (the direction that hurts most), and that
loss is backpropagated too, so the model learns to be robust to small perturbations of its
inputs. The perturbation is added to the embedding layer's *output*, not its weights, so it works
when the embeddings are frozen (LoRA, IA3, prompt learning) as well as in full fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class FGM:
    def __init__(self, model: Any, epsilon: float) -> None:
        self.epsilon = epsilon
        self._captured: torch.Tensor | None = None
        self._delta: torch.Tensor | None = None
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self._delta is not None:
            return output + self._delta
        if torch.is_grad_enabled():  # a training step: keep the output's gradient for the attack
            if not output.requires_grad:
                output = output.detach().requires_grad_()
            output.retain_grad()
            self._captured = output
        return output

    def attack(self, loss_of_batch: Callable[[], torch.Tensor]) -> None:
        """After the batch's own backward: backpropagate its loss under the perturbation."""
        captured, self._captured = self._captured, None
        if captured is None or captured.grad is None:
            return
        grad = captured.grad.detach()
        norm = torch.linalg.vector_norm(grad)
        if not torch.isfinite(norm) or norm == 0:
            return
        self._delta = (self.epsilon * grad / norm).to(captured.dtype)
        try:
            loss_of_batch().backward()
        finally:
            self._delta = None
            self._captured = None

    def remove(self) -> None:
        self._handle.remove()
