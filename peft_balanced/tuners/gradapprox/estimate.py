"""Gradient-subspace initialization of GradApprox adapters from a streamed sketch of each module's gradient.

For a targeted module with base weight ``W: (D_out, D_in)`` the full gradient over the estimation batches is
``G = Σ_t δ_t x_tᵀ`` (``x``: module input, ``δ``: loss gradient at the module output). ``G`` is never formed. Each
pass over the batches gives, for test matrices ``M: (D_in, a)`` and ``N: (D_out, b)`` fixed during the pass::

    Y = G M      (D_out, a)      range sketch
    Z = Nᵀ G     (b, D_in)       co-range sketch

both linear in ``G``, so they are sums over batches; autograd computes them as the gradients of zero-valued probe
terms (:class:`~peft_balanced.tuners.gradapprox.layer.GradientProbe`). Memory per module is
``O((D_in + D_out)(k + l))``. Pass 1 uses Gaussian ``M = Ω`` (``a = k = 2r + oversampling``) and ``N = Ψ``
(``b = l = 2k + 1``); every later pass is a power-iteration step of two interleaved chains, ``M ← orth(Zᵀ)``,
``N ← orth(Y)``. At the end a stabilised generalized Nyström formula (Tropp, Yurtsever, Udell and Cevher 2017;
Nakatsukasa 2020) turns the last ``Y``, ``Z`` into ``G ≈ U S Vᵀ`` of rank ``min(a, b)``; the adapter is then
initialised as in LoRA-GA (Wang et al., 2024) from the top ``2r`` singular vectors.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import GradApproxConfig
from .layer import GradApproxLayer, GradientProbe


def sketch_sizes(r: int, oversampling: int, in_features: int, out_features: int) -> tuple[int, int]:
    """``(k, ell)``: range sketch width ``min(2r + oversampling, D_in, D_out)``, co-range ``min(2k + 1, D_out)``."""
    k = min(2 * r + oversampling, in_features, out_features)
    return k, min(2 * k + 1, out_features)


def _orth(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``(n, c)`` of the columns of ``matrix: (n, c)`` (Householder QR: orthonormal even if
    ``matrix`` is rank-deficient)."""
    return torch.linalg.qr(matrix.double())[0].to(matrix.dtype)


@dataclass
class ModuleSketch:
    """Sketches of one module's gradient ``G: (D_out, D_in)`` for the current test matrices ``M``, ``N``.

    ``range_test = M: (D_in, a)``, ``corange_test = N: (D_out, b)``, ``range_sketch = G M: (D_out, a)``,
    ``corange_sketch = Nᵀ G: (b, D_in)``; all float32 on the adapter's device.
    """

    name: str
    layer: GradApproxLayer
    range_test: torch.Tensor
    corange_test: torch.Tensor
    range_sketch: torch.Tensor = field(init=False)
    corange_sketch: torch.Tensor = field(init=False)

    @classmethod
    def gaussian(cls, layer: GradApproxLayer, k: int, ell: int, seed: int, device: torch.device) -> ModuleSketch:
        """First-pass sketch with Gaussian ``Ω: (D_in, k)``, ``Ψ: (D_out, ell)`` fixed by ``seed`` and the module name
        (so data-parallel ranks agree)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(layer.module_name.encode()))
        omega = torch.randn(layer.in_features, k, generator=generator)
        psi = torch.randn(layer.out_features, ell, generator=generator)
        return cls(layer.module_name, layer, omega.to(device), psi.to(device))

    def __post_init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        device = self.range_test.device
        self.range_sketch = torch.zeros(self.corange_test.shape[0], self.range_test.shape[1], device=device)
        self.corange_sketch = torch.zeros(self.corange_test.shape[1], self.range_test.shape[0], device=device)

    def probe(self, dtype: torch.dtype) -> GradientProbe:
        """The probe whose gradients are this pass's sketches."""
        return GradientProbe(self.range_test.T, self.corange_test, dtype)

    def collect(self) -> None:
        """Add the probe gradients of the last backward pass to the sketches, then clear them."""
        probe = self.layer.probe
        for grad, sketch in ((probe.range_b.grad, self.range_sketch), (probe.corange_a.grad, self.corange_sketch)):
            if grad is not None:
                sketch += grad.float()
        probe.range_b.grad = probe.corange_a.grad = None

    def power_step(self) -> None:
        """Next pass: ``M ← orth(Zᵀ)``, ``N ← orth(Y)``, sketches reset."""
        self.range_test, self.corange_test = _orth(self.corange_sketch.T), _orth(self.range_sketch)
        self._reset()

    @torch.no_grad()
    def top_singular_vectors(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-``n`` ``(U: (D_out, n), S: (n,), Vh: (n, D_in))`` of ``G ≈ G M (Nᵀ G M)⁺ Nᵀ G``.

        Evaluated through orthonormal bases so that only a product of two orthonormal matrices (singular values:
        cosines of principal angles, independent of ``G``'s conditioning) is pseudo-inverted.
        """
        y, z = self.range_sketch.double(), self.corange_sketch.double()
        m_test, n_test = self.range_test.double(), self.corange_test.double()
        if m_test.shape[1] >= n_test.shape[1]:  # G ≈ W Pᵀ with P = orth(Zᵀ), W = Y (Pᵀ M)⁺
            p = torch.linalg.qr(z.T)[0]
            w = y @ torch.linalg.pinv(p.T @ m_test, rtol=1e-6)
            u, s, vh_small = torch.linalg.svd(w, full_matrices=False)
            vh = vh_small @ p.T
        else:  # G ≈ Q X with Q = orth(Y), X = (Nᵀ Q)⁺ Z
            q = torch.linalg.qr(y)[0]
            x = torch.linalg.pinv(n_test.T @ q, rtol=1e-6) @ z
            u_small, s, vh = torch.linalg.svd(x, full_matrices=False)
            u = q @ u_small
        return u[:, :n].float(), s[:n].float(), vh[:n].float()


def lora_ga_factors(
    u: torch.Tensor, vh: torch.Tensor, config: GradApproxConfig, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A: (r, D_in)`` and ``B: (D_out, r)`` from the top ``2r`` singular vectors ``u: (D_out, 2r)``, ``vh: (2r, D_in)``.

    With ``A = c·Â``, ``B = c·B̂`` (``Â``, ``B̂``: orthonormal singular vectors, ``c``: the ``config.init_scale``
    factor) one SGD step changes ``s·B A`` by ``−lr·s²·c²·(B̂ B̂ᵀ G + G Âᵀ Â)`` to first order: along the best
    rank-``2r`` approximation of ``G``. ``"gd"`` (``c = 1/s``) makes it exactly full fine-tuning's step projected.
    """
    r = config.r
    if config.direction == "ArB2r":
        a, b = vh[:r], u[:, r : 2 * r]
    elif config.direction == "A2rBr":
        a, b = vh[r : 2 * r], u[:, :r]
    else:  # "ArBr"
        a, b = vh[1 : 2 * r : 2], u[:, 0 : 2 * r : 2]
    if config.init_scale == "stable":
        scale = out_features**0.25 / config.stable_gamma**0.5
    elif config.init_scale == "gd":
        scale = r / config.lora_alpha
    else:
        scale = 1.0
    return a * scale, b * scale


@dataclass
class GradApproxInitReport:
    """What :func:`init_gradapprox` did: batches and label tokens used, estimated top-``2r`` singular values of each
    module's summed gradient ``G`` (keyed by module name)."""

    num_batches: int
    num_tokens: int
    singular_values: dict[str, torch.Tensor]


def _resolve_adapter(model: nn.Module, adapter_name: str | None) -> tuple[str, GradApproxConfig]:
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict):
        raise TypeError(f"init_gradapprox expects a PeftModel with a GradApprox adapter, got {type(model).__name__}.")
    if adapter_name is None:
        active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", None)]
        active = [active] if isinstance(active, str) else list(active)
        if len(active) != 1:
            raise ValueError(f"Several adapters are active ({active}); pass adapter_name=... to init_gradapprox.")
        adapter_name = active[0]
    config = peft_config.get(adapter_name)
    if not isinstance(config, GradApproxConfig):
        raise ValueError(
            f"Adapter {adapter_name!r} is not a GradApprox adapter (its config is {type(config).__name__}); "
            f"available adapters: {sorted(peft_config)}."
        )
    if config.init != "gradient":
        raise ValueError(
            f"Adapter {adapter_name!r} has init={config.init!r}; gradient initialization needs init='gradient'."
        )
    return adapter_name, config


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _check_batch(batch: Any, index: int) -> Mapping:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"init_gradapprox: batch {index} is a {type(batch).__name__}; expected a dict of model inputs with "
            "'labels' (e.g. from a DataLoader with DataCollatorForLanguageModeling(tokenizer, mlm=False))."
        )
    if batch.get("labels") is None:
        raise ValueError(
            f"init_gradapprox: batch {index} has no 'labels' (keys: {sorted(batch)}); the gradient of the training "
            "loss is needed. Use a collator that adds labels, e.g. DataCollatorForLanguageModeling(tokenizer, "
            "mlm=False), or set batch['labels'] = batch['input_ids'] for causal LM."
        )
    return batch


def _take_batches(batches: Iterable[Mapping[str, Any]], num_batches: int, device: torch.device) -> list[dict]:
    """Up to ``num_batches`` checked batches on ``device`` (kept: every pass must see the same data)."""
    if isinstance(batches, Mapping):
        raise TypeError("init_gradapprox: `batches` is a single dict; pass a list of batches or a DataLoader.")
    taken = []
    for index, batch in enumerate(batches):
        if index == num_batches:
            break
        taken.append(_to_device(_check_batch(batch, index), device))
    if not taken:
        raise ValueError("init_gradapprox: `batches` yielded no batch; pass at least one batch of inputs with labels.")
    if len(taken) < num_batches:
        warnings.warn(
            f"init_gradapprox: only {len(taken)} of the {num_batches} requested batches were available.", stacklevel=3
        )
    return taken


@contextmanager
def _frozen_train_mode(model: nn.Module, layers: list[GradApproxLayer]):
    """Train mode with every parameter frozen (no gradient lands on any parameter); restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        model.train()
        with torch.enable_grad():
            yield
    finally:
        for layer in layers:
            layer.probe = None
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


def _all_reduce(sketches: list[ModuleSketch]) -> None:
    """Sum the sketches over data-parallel ranks (the test matrices are equal on all ranks)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for sketch in sketches:
        torch.distributed.all_reduce(sketch.range_sketch)
        torch.distributed.all_reduce(sketch.corange_sketch)


def init_gradapprox(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    num_batches: int | None = None,
    progress: bool = True,
    adapter_name: str | None = None,
) -> GradApproxInitReport:
    """Initialise a GradApprox adapter from a streamed sketch of the full fine-tuning gradient (LoRA-GA style).

    Takes up to ``num_batches`` batches (default ``config.estimation_batches``), then runs ``config.sketch_passes``
    passes of forward + backward over them in train mode with every parameter frozen, sketching each targeted
    module's weight gradient ``G: (D_out, D_in)``. Finally sets ``A``, ``B`` (in place, so an optimizer that already
    holds them keeps working) and the frozen ``A0 = A``, ``B0 = B``: the model's outputs are unchanged. No gradient is
    left on any parameter.

    Args:
        model: a ``PeftModel`` (or ``GradApproxModel``) holding the adapter; its ``init`` must be ``"gradient"``.
        batches: an iterable (e.g. a ``DataLoader``) of dicts of model inputs that include ``labels``.
        num_batches: how many batches to use; fewer are used if ``batches`` runs out first.
        progress: show a tqdm progress bar.
        adapter_name: the adapter to initialise (default: the active adapter).
    """
    adapter_name, config = _resolve_adapter(model, adapter_name)
    num_batches = config.estimation_batches if num_batches is None else num_batches
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
        raise ValueError(f"init_gradapprox: num_batches must be a positive integer, got {num_batches!r}.")
    layers = [m for m in model.modules() if isinstance(m, GradApproxLayer) and adapter_name in m.gax_A]
    if not layers:
        raise ValueError(f"init_gradapprox: the model has no GradApprox layer with adapter {adapter_name!r}.")
    trained = [layer.module_name for layer in layers if not layer.is_at_initial_weights(adapter_name)]
    if trained:
        raise ValueError(
            f"init_gradapprox: adapter {adapter_name!r} has changed since its initialization in {len(trained)} "
            f"module(s), e.g. {trained[0]!r}; re-initialising would discard that. Initialise before training."
        )
    taken = _take_batches(batches, num_batches, next(model.parameters()).device)
    sketches = []
    for layer in layers:
        k, ell = sketch_sizes(config.r, config.oversampling, layer.in_features, layer.out_features)
        device = layer.gax_A[adapter_name].weight.device
        sketches.append(ModuleSketch.gaussian(layer, k, ell, config.sketch_seed, device))
    tokens = sum(int((batch["labels"] != -100).sum()) for batch in taken)
    total = config.sketch_passes * len(taken)
    with _frozen_train_mode(model, layers), tqdm(total=total, desc="GradApprox init", disable=not progress) as bar:
        for pass_index in range(config.sketch_passes):
            if pass_index:
                _all_reduce(sketches)
                for sketch in sketches:
                    sketch.power_step()
            for sketch in sketches:
                sketch.layer.probe = sketch.probe(sketch.layer.gax_A[adapter_name].weight.dtype)
            for index, batch in enumerate(taken):
                loss = model(**batch).loss
                if loss is None:
                    raise ValueError(f"init_gradapprox: the model returned no loss for batch {index}.")
                loss.backward()
                for sketch in sketches:
                    sketch.collect()
                bar.update(1)
    _all_reduce(sketches)
    singular_values = {}
    for sketch in sketches:
        if not torch.any(sketch.range_sketch):
            warnings.warn(
                f"init_gradapprox: module {sketch.name!r} got no gradient; its init is arbitrary.", stacklevel=2
            )
        u, s, vh = sketch.top_singular_vectors(2 * config.r)
        a, b = lora_ga_factors(u, vh, config, sketch.layer.out_features)
        sketch.layer.set_initial_weights(adapter_name, a, b)
        singular_values[sketch.name] = s.cpu()
    return GradApproxInitReport(len(taken), tokens, singular_values)
