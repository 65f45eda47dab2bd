"""GradApprox layers: ``y = base(x) + s·(B A − B0 A0) x`` on every linear base a backend exists for."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._compat import BufferDict
from ..layer import AdapterLayer, AdapterLinear, dropout_module
from ..merging import DeltaWeightMerge
from .config import GradApproxConfig


class GradientProbe:
    """Zero-valued rank-``k`` / rank-``l`` terms whose gradients are sketches of the base weight's gradient.

    With ``G = Σ_t δ_t x_tᵀ: (D_out, D_in)`` the gradient of the base weight (``x``: module input, ``δ``: gradient at
    the module output), the term ``range_b · (omega_t · x)`` with ``range_b = 0`` has
    ``∂L/∂range_b = G · omega_tᵀ: (D_out, k)``, and ``psi · (corange_a · x)`` with ``corange_a = 0`` has
    ``∂L/∂corange_a = psiᵀ · G: (l, D_in)``. Both terms are exactly zero, so outputs do not change, and autograd
    computes the sketches (also under gradient checkpointing) without ever forming ``G``.
    """

    def __init__(self, omega_t: torch.Tensor, psi: torch.Tensor, dtype: torch.dtype) -> None:
        self.omega_t = omega_t.to(dtype)  # (k, D_in)
        self.psi = psi.to(dtype)  # (D_out, l)
        self.range_b = torch.zeros(psi.shape[0], omega_t.shape[0], dtype=dtype, device=psi.device, requires_grad=True)
        self.corange_a = torch.zeros(
            psi.shape[1], omega_t.shape[1], dtype=dtype, device=psi.device, requires_grad=True
        )

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The zero-valued probe output: ``(..., D_in) -> (..., D_out)``."""
        x = x.to(self.omega_t.dtype)
        return F.linear(F.linear(x, self.omega_t), self.range_b) + F.linear(F.linear(x, self.corange_a), self.psi)


class GradApproxLayer(DeltaWeightMerge, AdapterLayer):
    """State of GradApprox layers: per adapter ``gax_A: (r, D_in)``, ``gax_B: (D_out, r)`` and frozen persistent
    buffers ``gax_A0``, ``gax_B0`` with the same shapes (their values at initialization)."""

    adapter_layer_names: tuple[str, ...] = ("gax_A", "gax_B")
    other_param_names: tuple[str, ...] = ("gax_A0", "gax_B0", "r", "lora_alpha", "scaling", "gax_dropout")
    method_name = "GradApprox"

    def _init_adapter_state(self) -> None:
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.gax_dropout = nn.ModuleDict({})
        self.gax_A = nn.ModuleDict({})
        self.gax_B = nn.ModuleDict({})
        self.gax_A0 = BufferDict({}, persistent=True)
        self.gax_B0 = BufferDict({}, persistent=True)
        self.probe: GradientProbe | None = None
        self.pending_gradient_init: set[str] = set()  # adapters with init="gradient" whose init has not run

    def update_layer(self, adapter_name: str, config: GradApproxConfig, inference_mode: bool = False) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer."""
        r = config.r
        if config.init == "gradient" and 2 * r > min(self.in_features, self.out_features):
            raise ValueError(
                f"GradApprox cannot adapt module {self.module_name!r} with r={r} and init='gradient': the "
                f"initialization uses 2*r={2 * r} singular vectors but the layer has in_features={self.in_features}, "
                f"out_features={self.out_features}. Use r <= {min(self.in_features, self.out_features) // 2}, "
                "exclude the module, or init='lora'."
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha / r
        self.gax_dropout[adapter_name] = dropout_module(config.lora_dropout)
        self.gax_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.gax_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self.gax_A0[adapter_name] = torch.zeros(r, self.in_features)
        self.gax_B0[adapter_name] = torch.zeros(self.out_features, r)
        self._finish_update(adapter_name, config.init_weights, inference_mode)
        if config.init == "gradient" and config.init_weights:  # after reset_parameters, which sets A0 / B0
            self.pending_gradient_init.add(adapter_name)
        else:
            self.pending_gradient_init.discard(adapter_name)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """LoRA's initialization with ``A0 = A``, ``B0 = B`` (no change), or a random non-zero update (tests).

        ``init_weights=True``: Kaiming-uniform ``A``, zero ``B``. ``False``: random ``A`` and ``B`` with
        ``A0 = B0 = 0``, so that the adapter changes the model (for tests of merging and checkpoints).
        """
        a, b = self.gax_A[adapter_name].weight, self.gax_B[adapter_name].weight
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(b)
            self.set_initial_weights(adapter_name, a, b)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            self.gax_A0[adapter_name].zero_()
            self.gax_B0[adapter_name].zero_()

    @torch.no_grad()
    def set_initial_weights(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Set ``A = A0 = a: (r, D_in)`` and ``B = B0 = b: (D_out, r)`` in place (the optimizer keeps its params).

        The buffers receive the parameters' values after rounding to the parameters' dtype, so ``B A − B0 A0`` is
        exactly zero and the model's output does not change.
        """
        param_a, param_b = self.gax_A[adapter_name].weight, self.gax_B[adapter_name].weight
        for param, value, buffer in ((param_a, a, self.gax_A0), (param_b, b, self.gax_B0)):
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{self.module_name}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}.")
            param.copy_(value.to(param.dtype))
            buffer[adapter_name] = param.detach().to(buffer[adapter_name].dtype).clone()
        self.pending_gradient_init.discard(adapter_name)

    def check_gradient_init_ran(self) -> None:
        """Raise before training an active ``init="gradient"`` adapter whose gradient initialization never ran.

        Without it training would silently start from LoRA's initialization while the saved config says
        ``init: "gradient"``. A non-zero ``B0`` means the adapter was initialised elsewhere (a reloaded checkpoint);
        it is checked once per adapter.
        """
        for name in [n for n in self.active_adapters if n in self.pending_gradient_init and n in self.gax_B0]:
            if torch.any(self.gax_B0[name] != 0):
                self.pending_gradient_init.discard(name)
                continue
            raise RuntimeError(
                f"GradApprox adapter {name!r} has init='gradient' but its gradient initialization has not run "
                f"(module {self.module_name!r}): training now would start from LoRA's initialization while "
                "adapter_config.json says init='gradient'. Pass callbacks=[GradApproxInitCallback()] to the Trainer "
                "/ SFTTrainer, or call peft_balanced.init_gradapprox(model, batches) before training; for LoRA's "
                "initialization use GradApproxConfig(init='lora')."
            )

    def is_at_initial_weights(self, adapter_name: str) -> bool:
        """``True`` if ``A == A0`` and ``B == B0`` (the adapter adds nothing yet)."""
        a, b = self.gax_A[adapter_name].weight, self.gax_B[adapter_name].weight
        return bool(
            torch.equal(a, self.gax_A0[adapter_name].to(a.dtype))
            and torch.equal(b, self.gax_B0[adapter_name].to(b.dtype))
        )

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s · (B A − B0 A0) dropout(x)``: ``(..., D_in) -> (..., D_out)`` in the adapter's dtype.

        The two products are computed separately with the same kernels, so at initialization they cancel exactly.
        """
        a, b = self.gax_A[adapter_name].weight, self.gax_B[adapter_name].weight
        x = self.gax_dropout[adapter_name](self._cast_input_dtype(x, a.dtype))
        a0, b0 = self.gax_A0[adapter_name].to(a.dtype), self.gax_B0[adapter_name].to(b.dtype)
        delta = F.linear(F.linear(x, a), b) - F.linear(F.linear(x, a0), b0)
        return delta * self.scaling[adapter_name]

    def add_adapter_output(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``result + adapter_output(adapter_name, x)`` in ``result``'s dtype."""
        return result + self.adapter_output(adapter_name, x).to(result.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Full update ``ΔW = s · (B A − B0 A0)`` of shape ``(D_out, D_in)``, in float32."""
        a, b = self.gax_A[adapter_name].weight.detach().float(), self.gax_B[adapter_name].weight.detach().float()
        a0, b0 = self.gax_A0[adapter_name].float(), self.gax_B0[adapter_name].float()
        return (b @ a - b0 @ a0) * self.scaling[adapter_name]


class GradApproxLinear(AdapterLinear, GradApproxLayer):
    """A linear layer (dense or quantized) with GradApprox adapters: ``y = base(x) + Σ_active s·(B A − B0 A0) x``."""

    repr_prefix = "gradapprox"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.pending_gradient_init and self.training and torch.is_grad_enabled() and self.probe is None:
            if not (self.disable_adapters or self.merged):  # init_gradapprox's own forwards carry a probe
                self.check_gradient_init_ran()
        result = super().forward(x, *args, **kwargs)
        if self.probe is not None:  # zero-valued gradient sketch, present only during init_gradapprox
            result = result + self.probe.output(x).to(result.dtype)
        return result
