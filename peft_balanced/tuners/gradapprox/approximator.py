"""The learned gradient approximator of GradApprox (part 2): predicted output gradients instead of a backward pass.

For a targeted module with input ``x_t: (D_in,)`` and output ``y_t: (D_out,)`` at token ``t``, the adapter's
gradients follow from the loss gradient at the module output ``δ_t``::

    ∂L/∂B = s Σ_t δ_t (A x_t)ᵀ        ∂L/∂A = s Σ_t (Bᵀ δ_t) x_tᵀ

:class:`GradientApproximator` is one small network shared by every module. It predicts ``δ_t`` (in units of the
module's running gradient RMS) from the module output ``y_t``, the embedding of the token the model must predict at
``t`` (the only label information, available before the forward pass) and a learned module embedding::

    h = (W_in[D_out] · norm(y_t) + W_ctx · norm(e(label_{t+1}))) ⊙ (1 + gain[m]) + emb[m]
    h ← h + MLP_i(norm(h))   for i = 1..depth
    δ̂_t = W_out[D_out] · norm(h)

(``W_in`` / ``W_out`` are shared by modules of the same output width; ``gain`` and ``emb`` are the module
embeddings.) :class:`GradientApproximation` runs it:

* **exact steps** (the first ``approximator_warmup_steps`` steps, then every ``refresh_every``-th): normal
  forward + backward; hooks keep ``x``, ``y`` and the true ``δ`` of ``approximator_tokens`` sampled tokens per
  module; :meth:`GradientApproximation.fit` scores the current predictions on them (cosine of ``δ`` and of the
  adapter gradients, before the update: an out-of-sample score) and takes one AdamW step on the approximator.
* **approximated steps**: the forward pass only, under ``torch.no_grad``. In each targeted module a forward hook
  predicts ``δ̂`` for every token, clips each token's norm to ``approximator_clip · sqrt(D_out)`` (normalized
  units), rescales by the module's running RMS of true ``δ`` and adds the adapter gradients above to ``A.grad`` /
  ``B.grad``. No backward pass runs through the frozen backbone.

Limits: approximated steps update only the GradApprox ``A`` / ``B`` of the adapter (not ``modules_to_save``),
ignore adapter dropout, and run on one process (no data-parallel all-reduce of predicted gradients).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GradApproxConfig
from .layer import GradApproxLayer


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """RMS-normalize the last dim (no affine): scale-free inputs for the approximator."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-12)


class _ResidualMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(_normalize(h))))


class GradientApproximator(nn.Module):
    """Predicts normalized output gradients ``δ̂: (N, D_out)`` of module ``m`` from ``y: (N, D_out)`` and the label
    context ``c: (N, width)`` (see :meth:`context`).

    Args:
        out_features: output width of every module, in module order (index ``m``).
        context_features: width of the label-token embeddings (the model's hidden size).
        depth: residual MLP blocks, 1..5.
        width: hidden width.
    """

    def __init__(self, out_features: list[int], context_features: int, depth: int, width: int) -> None:
        super().__init__()
        self.out_features = list(out_features)
        widths = sorted(set(out_features))
        self.module_embedding = nn.Embedding(len(out_features), width)
        nn.init.normal_(self.module_embedding.weight, std=0.02)
        self.module_scale = nn.Embedding(len(out_features), width)  # per-module gain: 1 + scale
        nn.init.zeros_(self.module_scale.weight)
        self.inputs = nn.ModuleDict({str(d): nn.Linear(d, width) for d in widths})
        self.context_in = nn.Linear(context_features, width)
        self.no_label = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList([_ResidualMLP(width) for _ in range(depth)])
        self.outputs = nn.ModuleDict({str(d): nn.Linear(width, d) for d in widths})
        for head in self.outputs.values():  # predicts δ̂ = 0 until fitted
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def context(self, label_embeddings: torch.Tensor, has_label: torch.Tensor) -> torch.Tensor:
        """``(..., context_features), (...) bool -> (..., width)``: the per-token label context."""
        c = self.context_in(_normalize(label_embeddings.float()))
        return torch.where(has_label.unsqueeze(-1), c, self.no_label)

    def forward(self, module_index: int, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``y: (N, D_out)``, ``context: (N, width)`` -> ``δ̂: (N, D_out)`` in units of the module's gradient RMS."""
        key = str(self.out_features[module_index])
        gain = 1 + self.module_scale.weight[module_index]
        h = (self.inputs[key](_normalize(y.float())) + context) * gain + self.module_embedding.weight[module_index]
        for block in self.blocks:
            h = block(h)
        return self.outputs[key](_normalize(h))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0, eps=1e-30)


class _Samples:
    """Sampled rows of one module on an exact step: ``x: (n, D_in)``, ``y: (n, D_out)``, true ``δ: (n, D_out)``."""

    __slots__ = ("x", "y", "delta")

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None


class GradientApproximation:
    """Exact and approximated training steps of one GradApprox adapter with a learned gradient approximator.

    Plain loop::

        approx = GradientApproximation(peft_model)
        for step, batch in enumerate(loader):
            loss = approx.step(step, batch)   # exact (forward + backward + fit) or approximated (forward only)
            optimizer.step(); optimizer.zero_grad()

    Inside ``transformers.Trainer`` / TRL's ``SFTTrainer`` use :class:`~peft_balanced.experimental.GradApproxTrainer`
    or :func:`~peft_balanced.experimental.with_gradient_approximator`. Batches need ``labels`` (``-100`` = no loss).
    Experimental: import it from :mod:`peft_balanced.experimental` (the package root does not export it).
    """

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        peft_config = getattr(model, "peft_config", None)
        if not peft_config:
            raise TypeError("GradientApproximation needs a PeftModel with a GradApprox adapter (get_peft_model).")
        adapter_name = adapter_name or model.active_adapter
        config = peft_config.get(adapter_name)
        if not isinstance(config, GradApproxConfig):
            raise ValueError(
                f"GradientApproximation: adapter {adapter_name!r} is a {type(config).__name__}, not a GradApproxConfig."
            )
        if config.approximator_depth == 0:
            raise ValueError(
                f"GradientApproximation: adapter {adapter_name!r} has approximator_depth=0 (approximator off); "
                "set GradApproxConfig(approximator_depth=1..5) to use it."
            )
        self.model, self.adapter_name, self.config = model, adapter_name, config
        self.layers: list[tuple[str, GradApproxLayer]] = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, GradApproxLayer) and adapter_name in module.gax_A
        ]
        if not self.layers:
            raise ValueError(f"GradientApproximation: no module carries the GradApprox adapter {adapter_name!r}.")
        embedding = model.get_input_embeddings()
        self.label_embedding = embedding.weight
        device = self.layers[0][1].gax_A[adapter_name].weight.device
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
            torch.manual_seed(config.sketch_seed)
            self.network = GradientApproximator(
                [layer.out_features for _, layer in self.layers],
                embedding.embedding_dim,
                config.approximator_depth,
                config.approximator_width,
            ).to(device)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.approximator_lr, weight_decay=0.0)
        self.grad_rms = torch.zeros(len(self.layers), device=device)  # on the device: no host syncs in hooks
        self.fitted_steps = 0
        self._exact_batches = 0
        self.metrics: list[dict[str, float]] = []  # since the last pop_metrics()
        self.history: list[dict[str, float]] = []  # every fit
        self._mode: str | None = None
        self._context: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None  # (B*T,) bool: attended tokens
        self._rows: torch.Tensor | None = None  # sampled flat token indices on exact steps
        self._samples = [_Samples() for _ in self.layers]
        self._handles = [layer.register_forward_hook(self._make_hook(i)) for i, (_, layer) in enumerate(self.layers)]

    # ------------------------------------------------------------------------------------------------ schedule

    def is_exact_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) runs full backprop: warm-up steps and every K-th after."""
        return (
            step < self.config.approximator_warmup_steps
            or step % self.config.refresh_every == 0
            or not self.fitted_steps
        )

    def step(
        self, step: int, batch: Mapping[str, Any], loss_fn: Callable[[], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """One step's gradients (exact or approximated, by :meth:`is_exact_step`); returns the detached loss.

        ``loss_fn`` computes the loss from ``batch`` (default: ``model(**batch).loss``).
        """
        loss_fn = loss_fn or (lambda: self.model(**batch).loss)
        if self.is_exact_step(step):
            with self.exact(batch):
                loss = loss_fn()
                loss.backward()
            self.fit()
            return loss.detach()
        with torch.no_grad(), self.approximate(batch):
            return loss_fn().detach()

    # ------------------------------------------------------------------------------------------------ contexts

    @contextmanager
    def exact(self, batch: Mapping[str, Any]) -> Iterator[None]:
        """Capture sampled ``x``, ``y`` and true ``δ`` of every module during a normal forward + backward."""
        self._prepare(batch)
        keep = self._keep.nonzero().squeeze(1)
        self._exact_batches += 1
        generator = torch.Generator().manual_seed(self.config.sketch_seed * 7919 + self._exact_batches)
        order = torch.randperm(keep.numel(), generator=generator)[: self.config.approximator_tokens]
        self._rows = keep[order.to(keep.device)]
        self._samples = [_Samples() for _ in self.layers]
        self._mode = "exact"
        try:
            yield
        finally:
            self._mode = None

    @contextmanager
    def approximate(self, batch: Mapping[str, Any]) -> Iterator[None]:
        """Add predicted adapter gradients to ``A.grad`` / ``B.grad`` during a forward pass (run it under
        ``torch.no_grad()``; no backward is needed)."""
        if not self.fitted_steps:
            raise RuntimeError("GradientApproximation: call exact steps (and fit) before an approximated step.")
        self._prepare(batch)
        self._mode = "approximate"
        try:
            with torch.no_grad():
                self._context = self.network.context(*self._label_inputs)
            yield
        finally:
            self._mode = None
            self._context = None

    def _prepare(self, batch: Mapping[str, Any]) -> None:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if labels is None:
            raise ValueError(
                "GradientApproximation needs batches with 'labels' (token ids, -100 where there is no loss); got "
                f"keys {sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}."
            )
        device = self.label_embedding.device
        labels = labels.to(device)
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]  # position t predicts token t+1
        has_label = targets != -100
        label_embeddings = self.label_embedding.detach()[targets.clamp(min=0)]
        self._label_inputs = (label_embeddings.flatten(0, 1), has_label.flatten())
        mask = batch.get("attention_mask")
        keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.to(device).bool()
        self._keep = keep.flatten()

    # ------------------------------------------------------------------------------------------------ hooks

    def _make_hook(self, index: int) -> Callable:
        def hook(module: GradApproxLayer, args: tuple, output: torch.Tensor) -> None:
            if self._mode is None or not module.active_adapters or self.adapter_name not in module.active_adapters:
                return
            if module.merged or module.disable_adapters:
                return
            x, y = args[0].flatten(0, -2), output.flatten(0, -2)
            if y.shape[0] != self._keep.numel():
                raise ValueError(
                    f"GradientApproximation: module {self.layers[index][0]!r} saw {y.shape[0]} tokens but the batch "
                    f"has {self._keep.numel()} (labels must have the shape of input_ids)."
                )
            if self._mode == "exact":
                self._capture(index, x, y, output)
            else:
                self._add_predicted_gradient(index, module, x, y)

        return hook

    def _capture(self, index: int, x: torch.Tensor, y: torch.Tensor, output: torch.Tensor) -> None:
        samples, rows = self._samples[index], self._rows
        samples.x = x.detach()[rows].float()
        samples.y = y.detach()[rows].float()
        if output.requires_grad:  # under reentrant checkpointing only the recomputed output is in the graph

            def keep_delta(grad: torch.Tensor) -> None:
                samples.delta = grad.detach().flatten(0, -2)[rows].float()

            output.register_hook(keep_delta)

    def _adapter_grads(self, layer: GradApproxLayer, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(∂L/∂A: (r, D_in), ∂L/∂B: (D_out, r))`` from ``x: (N, D_in)`` and ``δ: (N, D_out)``."""
        a, b = layer.gax_A[self.adapter_name].weight, layer.gax_B[self.adapter_name].weight
        s = layer.scaling[self.adapter_name]
        x, delta = x.to(a.dtype), delta.to(a.dtype)
        grad_b = s * delta.T @ (x @ a.T)
        grad_a = s * (delta @ b).T @ x
        return grad_a, grad_b

    def _predict(self, index: int, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Clipped prediction ``δ̂`` in the units of true gradients."""
        return self._clip_and_scale(index, self.network(index, y, context))

    def _clip_and_scale(self, index: int, pred: torch.Tensor) -> torch.Tensor:
        """Cap each token's norm of a normalized prediction, then scale it by the module's gradient RMS."""
        limit = self.config.approximator_clip * math.sqrt(pred.shape[-1])
        norms = pred.norm(dim=-1, keepdim=True)
        pred = pred * torch.clamp(limit / (norms + 1e-12), max=1.0)
        return pred * self.grad_rms[index]

    def _add_predicted_gradient(self, index: int, layer: GradApproxLayer, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            delta = self._predict(index, y, self._context) * self._keep.unsqueeze(1)
            grads = self._adapter_grads(layer, x, delta)
            for param, grad in zip(
                (layer.gax_A[self.adapter_name].weight, layer.gax_B[self.adapter_name].weight), grads, strict=True
            ):
                grad = grad.to(param.dtype)
                param.grad = grad if param.grad is None else param.grad + grad

    # ------------------------------------------------------------------------------------------------ fitting

    def fit(self) -> dict[str, float]:
        """Score, then train the approximator on the last exact step's samples; returns (and keeps) the metrics.

        ``delta_cosine``: mean over modules of the cosine between predicted and true ``δ`` on the sampled tokens;
        ``grad_cosine``: cosine between the adapter gradients those give (all modules concatenated). Both are
        measured before this update, on tokens the approximator has not been trained on.
        """
        missing = [self.layers[i][0] for i, s in enumerate(self._samples) if s.delta is None or s.y is None]
        if missing:
            raise RuntimeError(
                "GradientApproximation.fit: no output gradient was captured for "
                f"{missing[:3]}{'...' if len(missing) > 3 else ''}; run the forward and backward inside exact()."
            )
        with torch.no_grad():
            context_inputs = tuple(t[self._rows] for t in self._label_inputs)
        self.optimizer.zero_grad(set_to_none=True)
        context = self.network.context(*context_inputs)
        losses, rms_values, delta_cosines, true_grads, pred_grads = [], [], [], [], []
        for index, ((_, layer), samples) in enumerate(zip(self.layers, self._samples, strict=True)):
            rms = samples.delta.pow(2).mean().sqrt().clamp(min=1e-30)
            normalized = self.network(index, samples.y, context)
            if self.fitted_steps:  # score before this step's update (with last step's RMS)
                with torch.no_grad():
                    pred = self._clip_and_scale(index, normalized.detach())
                    delta_cosines.append(_cosine(pred, samples.delta))
                    true_grads += self._adapter_grads(layer, samples.x, samples.delta)
                    pred_grads += self._adapter_grads(layer, samples.x, pred)
            rms_values.append(rms)
            losses.append(F.mse_loss(normalized, samples.delta / rms))
        momentum = 0.9 if self.fitted_steps else 0.0
        self.grad_rms.mul_(momentum).add_(torch.stack(rms_values), alpha=1 - momentum)
        loss = torch.stack(losses).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.fitted_steps += 1
        metrics = {"approximator_loss": loss.item()}
        if delta_cosines:  # one host transfer for all modules
            grad_cosine = _cosine(
                torch.cat([g.flatten() for g in pred_grads]), torch.cat([g.flatten() for g in true_grads])
            )
            metrics["delta_cosine"] = torch.stack(delta_cosines).mean().item()
            metrics["grad_cosine"] = grad_cosine.item()
        self.metrics.append(metrics)
        self.history.append({"exact_batch": self._exact_batches, **metrics})
        self._samples = [_Samples() for _ in self.layers]
        return metrics

    def pop_metrics(self) -> dict[str, float]:
        """Means of the metrics since the last call (prefixed ``gradapprox/``), then forget them."""
        if not self.metrics:
            return {}
        keys = {key for entry in self.metrics for key in entry}
        out = {}
        for key in sorted(keys):
            values = [entry[key] for entry in self.metrics if key in entry]
            out[f"gradapprox/{key}"] = sum(values) / len(values)
        self.metrics = []
        return out

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
