"""Specification of the 2-D-tile INT4 format: tile_int4 functions, TileInt4Linear, quantize_model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_balanced.quant import (
    TileInt4Config,
    TileInt4Linear,
    TileInt4Spec,
    TileInt4Weight,
    dequantize_tiles,
    pack_int4,
    quantize_model,
    quantize_tiles,
    unpack_int4,
)

SCALE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TILES = [(4, 8), (8, 8), (2, 2), (1, 16), (16, 1)]


def _weight(d_out=64, d_in=128, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=gen) * scale


def _expand(grid: torch.Tensor, tile) -> torch.Tensor:
    """(D_out/l2, D_in/l1) -> (D_out, D_in), each entry repeated over its tile."""
    l1, l2 = tile
    return grid.repeat_interleave(l2, 0).repeat_interleave(l1, 1)


def test_pack_then_unpack_returns_the_codes():
    codes = torch.randint(0, 16, (7, 3, 32), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 3, 16)
    assert torch.equal(unpack_int4(packed), codes)


def test_unpack_then_pack_returns_every_byte():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_pack_puts_even_input_column_in_low_nibble():
    assert pack_int4(torch.tensor([[3, 10]])).tolist() == [[3 | (10 << 4)]]


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("tile", TILES)
def test_dequantized_error_is_at_most_half_a_step(tile, scale_dtype):
    weight = _weight()
    weight[5, :] += 3.0  # some tiles far from zero
    packed, scale, zero = quantize_tiles(weight, tile, scale_dtype)
    err = (dequantize_tiles(packed, scale, zero, tile) - weight).abs()
    half_step = _expand(scale.float(), tile) / 2
    assert bool((err <= half_step * (1 + 1e-5) + 1e-6 * weight.abs()).all())


@pytest.mark.parametrize("tile", TILES)
def test_codes_are_in_0_to_15_and_span_each_tile(tile):
    packed, scale, zero = quantize_tiles(_weight(), tile)
    l1, l2 = tile
    codes = unpack_int4(packed).reshape(64 // l2, l2, 128 // l1, l1)
    assert int(codes.max()) <= 15 and int(codes.min()) >= 0
    assert bool((codes.amin(dim=(1, 3)) == 0).all())  # each tile's minimum lands on code 0
    assert bool((codes.amax(dim=(1, 3)) >= 14).all())  # and its maximum near code 15


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_constant_tile_is_reconstructed_exactly_without_nan(scale_dtype):
    weight = _weight()
    weight[:8, :4] = 0.5
    weight[8:16, 4:8] = 0.0
    weight[16:24, 8:12] = -2.25
    packed, scale, zero = quantize_tiles(weight, (4, 8), scale_dtype)
    assert bool(torch.isfinite(scale).all()) and bool(torch.isfinite(zero).all())
    restored = dequantize_tiles(packed, scale, zero, (4, 8))
    assert torch.equal(restored[:8, :4], weight[:8, :4])
    assert torch.equal(restored[8:16, 4:8], weight[8:16, 4:8])
    assert torch.equal(restored[16:24, 8:12], weight[16:24, 8:12])
    assert scale[0, 0] == 0 and scale[1, 1] == 0


def test_constant_tile_not_representable_in_fp16_stays_within_its_tiny_step():
    weight = torch.full((8, 4), 0.1)
    packed, scale, zero = quantize_tiles(weight, (4, 8), torch.float16)
    err = (dequantize_tiles(packed, scale, zero, (4, 8)) - weight).abs().max()
    assert float(err) <= float(scale.float().max()) / 2 + 1e-9 and float(err) < 1e-5


@pytest.mark.parametrize("scale_dtype", ["float16", "bf16", torch.float32])
def test_scale_and_zero_have_tile_grid_shape_and_requested_dtype(scale_dtype):
    packed, scale, zero = quantize_tiles(_weight(), (4, 8), scale_dtype, zero_dtype=scale_dtype)
    expected = {"float16": torch.float16, "bf16": torch.bfloat16}.get(scale_dtype, scale_dtype)
    assert packed.shape == (64, 64) and packed.dtype == torch.uint8
    assert scale.shape == zero.shape == (64 // 8, 128 // 4)
    assert scale.dtype == zero.dtype == expected


def test_constant_added_to_one_tile_zero_shifts_only_that_tile():
    tile = (4, 8)
    packed, scale, zero = quantize_tiles(_weight(), tile, torch.float32)
    before = dequantize_tiles(packed, scale, zero, tile)
    shifted = zero.clone()
    shifted[2, 5] += 0.25
    after = dequantize_tiles(packed, scale, shifted, tile)
    delta = after - before
    block = delta[2 * 8 : 3 * 8, 5 * 4 : 6 * 4]
    torch.testing.assert_close(block, torch.full_like(block, 0.25), rtol=0, atol=1e-6)
    delta[2 * 8 : 3 * 8, 5 * 4 : 6 * 4] = 0
    assert torch.equal(delta, torch.zeros_like(delta))


@pytest.mark.parametrize(
    ("tile", "match"),
    [
        ((0, 8), "l1 .*positive int"),
        ((4, -8), "l2 .*positive int"),
        ((4.0, 8), "l1 .*positive int"),
        ((True, 8), "l1 .*positive int"),
        ((4,), "pair"),
        (4, "pair"),
        (None, "pair"),
    ],
)
def test_bad_tile_values_raise_clear_errors(tile, match):
    with pytest.raises(ValueError, match=match):
        quantize_tiles(_weight(), tile)
    with pytest.raises(ValueError, match=match):
        TileInt4Linear(128, 64, tile=tile)


def test_indivisible_dims_raise_error_naming_layer_and_dims():
    with pytest.raises(
        ValueError, match=r"'blk.fc'.*D_in=130 is not divisible by l1=4.*D_out=60 is not divisible by l2=8"
    ):
        quantize_tiles(torch.randn(60, 130), (4, 8), name="blk.fc")


def test_bad_scale_dtype_raises():
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize_tiles(_weight(), (4, 8), torch.int8)


def test_bad_zero_dtype_raises_naming_zero_dtype():
    with pytest.raises(ValueError, match=r"zero_dtype must be float16, bfloat16 or float32.*int8"):
        quantize_tiles(_weight(), (4, 8), torch.float16, zero_dtype=torch.int8)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_zero_points_in_fp32_with_16_bit_scales_stay_within_half_a_step(scale_dtype):
    weight = _weight()
    weight[5, :] += 3.0
    packed, scale, zero = quantize_tiles(weight, (4, 8), scale_dtype, zero_dtype="float32")
    assert scale.dtype == scale_dtype and zero.dtype == torch.float32
    assert torch.equal(zero, weight.reshape(8, 8, 32, 4).amin(dim=(1, 3)))  # fp32 beta is the exact tile minimum
    err = (dequantize_tiles(packed, scale, zero, (4, 8)) - weight).abs()
    assert bool((err <= _expand(scale.float(), (4, 8)) / 2 * (1 + 1e-5) + 1e-6 * weight.abs()).all())


def test_zero_points_default_to_float32_in_every_entry_point():
    assert quantize_tiles(_weight(), (4, 8), torch.bfloat16)[2].dtype == torch.float32
    assert TileInt4Linear(128, 64, scale_dtype=torch.float16).zero.dtype == torch.float32
    assert TileInt4Linear.from_linear(nn.Linear(128, 64), (4, 8)).zero.dtype == torch.float32
    assert TileInt4Spec((4, 8)).zero_dtype == torch.float32
    assert TileInt4Config().torch_zero_dtype == torch.float32


def test_zero_dtype_none_means_the_scale_dtype():
    assert quantize_tiles(_weight(), (4, 8), torch.bfloat16, zero_dtype=None)[2].dtype == torch.bfloat16
    assert TileInt4Linear(128, 64, scale_dtype=torch.float16, zero_dtype=None).zero.dtype == torch.float16


# ---------------------------------------------------------------- TileInt4Linear


def _layer(bias=True, tile=(4, 8), scale_dtype=torch.float16, zero_dtype=None):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=bias)
    return linear, TileInt4Linear.from_linear(linear, tile, scale_dtype, zero_dtype=zero_dtype)


def test_forward_equals_f_linear_with_dequantized_weight():
    _, layer = _layer()
    x = torch.randn(2, 5, 128)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(torch.float32), layer.bias))


def test_forward_is_close_to_the_original_linear():
    linear, layer = _layer()
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = linear(x)
        assert float((layer(x) - expected).norm() / expected.norm()) < 0.1


def test_forward_runs_in_the_input_dtype():
    _, layer = _layer()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x, layer.dequantize(torch.bfloat16), layer.bias.to(torch.bfloat16)))


def test_input_gradient_flows_and_nothing_in_the_layer_requires_grad():
    _, layer = _layer()
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    assert list(layer.parameters()) == []
    assert not any(b.requires_grad for b in layer.buffers())


def test_buffers_are_persistent_with_documented_shapes():
    _, layer = _layer()
    state = layer.state_dict()
    assert set(state) == {"qweight", "scale", "zero", "bias"}
    assert state["qweight"].dtype == torch.uint8 and state["qweight"].shape == (64, 64)
    assert state["scale"].shape == state["zero"].shape == (8, 32)
    assert layer.in_features == 128 and layer.out_features == 64 and layer.tile == (4, 8)
    assert layer.compute_dtype == torch.float32


@pytest.mark.parametrize(
    ("tile", "scale_dtype", "zero_dtype", "bits"),
    [
        ((4, 8), torch.float16, None, 5.0),
        ((8, 8), torch.float16, None, 4.5),
        ((4, 8), torch.bfloat16, None, 5.0),
        ((4, 8), torch.float32, None, 6.0),
        ((4, 8), torch.float16, torch.float32, 5.5),
        ((8, 8), torch.float16, torch.float32, 4.75),
        ((32, 1), torch.float16, torch.float16, 5.0),
    ],
)
def test_bits_per_weight(tile, scale_dtype, zero_dtype, bits):
    _, layer = _layer(tile=tile, scale_dtype=scale_dtype, zero_dtype=zero_dtype)
    assert layer.bits_per_weight() == bits


def test_add_to_zero_shifts_each_tile_by_its_delta():
    _, layer = _layer(scale_dtype=torch.float32)
    before = layer.dequantize()
    delta = torch.randn(8, 32) * 0.01
    layer.add_to_zero(delta)
    torch.testing.assert_close(layer.dequantize() - before, _expand(delta, (4, 8)), rtol=0, atol=1e-6)


def test_add_to_zero_rounds_once_into_zero_dtype():
    _, layer = _layer(scale_dtype=torch.float16)
    zero = layer.zero.clone()
    delta = torch.randn(8, 32) * 0.01
    layer.add_to_zero(delta)
    assert layer.zero.dtype == torch.float16
    assert torch.equal(layer.zero, (zero.float() + delta).to(torch.float16))


def test_add_to_zero_rejects_wrong_shape_with_expected_shape_in_message():
    _, layer = _layer()
    with pytest.raises(ValueError, match=r"\(8, 32\).*got \(32, 8\)"):
        layer.add_to_zero(torch.zeros(32, 8))


def test_dtype_cast_of_the_module_keeps_quantized_state_bit_exact():
    _, layer = _layer()
    qweight, scale, zero = layer.qweight.clone(), layer.scale.clone(), layer.zero.clone()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.qweight, qweight) and layer.scale.dtype == torch.float16
    assert torch.equal(layer.scale, scale) and torch.equal(layer.zero, zero)
    assert layer.bias.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16
    assert list(layer.state_dict()) == ["qweight", "scale", "zero", "bias"]


def test_dtype_cast_keeps_fp32_zero_points_fp32():
    _, layer = _layer(zero_dtype=torch.float32)
    zero = layer.zero.clone()
    layer.half()
    assert layer.zero.dtype == torch.float32 and torch.equal(layer.zero, zero)


# ---------------------------------------------------------------- quantize_model


class _Block(nn.Module):
    def __init__(self, d_out_odd: int = 64):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, d_out_odd, bias=False)
        self.lm_head = nn.Linear(64, 100)


def test_quantize_model_replaces_linears_in_place_and_skips_lm_head():
    model = _Block()
    assert quantize_model(model) is model
    assert isinstance(model.up, TileInt4Linear) and isinstance(model.down, TileInt4Linear)
    assert type(model.lm_head) is nn.Linear


def test_quantize_model_defaults_to_fp16_scales_and_fp32_zero_points():
    model = quantize_model(_Block())
    assert model.up.scale.dtype == torch.float16 and model.up.zero.dtype == torch.float32
    assert model.up.bits_per_weight() == 5.5
    kept = quantize_model(_Block(), scale_dtype="bfloat16", zero_dtype=None)
    assert kept.up.scale.dtype == kept.up.zero.dtype == torch.bfloat16


def test_quantize_model_skip_modules_match_by_name_suffix():
    model = nn.Sequential()
    model.add_module("block", _Block())
    quantize_model(model, skip_modules=("lm_head", "block.down"))
    assert isinstance(model.block.up, TileInt4Linear)
    assert type(model.block.down) is nn.Linear and type(model.block.lm_head) is nn.Linear


def test_quantize_model_error_names_the_indivisible_module():
    with pytest.raises(ValueError, match=r"'down'.*D_out=60 is not divisible by l2=8"):
        quantize_model(_Block(d_out_odd=60))


def test_quantize_model_skip_indivisible_keeps_that_linear():
    model = quantize_model(_Block(d_out_odd=60), skip_indivisible=True)
    assert isinstance(model.up, TileInt4Linear) and type(model.down) is nn.Linear


def test_forward_under_autocast_matches_autocast_linear_on_dequantized_weight():
    _, layer = _layer()
    x = torch.randn(3, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected = F.linear(x, layer.dequantize(torch.float32), layer.bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


# ---------------------------------------------------------------- CUDA (skipped on CPU-only machines)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_cuda_quantization_is_bit_identical_to_cpu(scale_dtype):
    weight = _weight(d_out=1024, d_in=2048)
    cpu = quantize_tiles(weight, (4, 8), scale_dtype)
    cuda = quantize_tiles(weight.cuda(), (4, 8), scale_dtype)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, cuda, strict=True))


@needs_cuda
@pytest.mark.parametrize("out_dtype", SCALE_DTYPES)
@pytest.mark.parametrize(("shape", "tile"), [((72, 200), (4, 8)), ((64, 96), (3, 8)), ((1024, 2048), (8, 8))])
def test_cuda_triton_dequantize_is_bit_identical_to_torch_reference(shape, tile, out_dtype):
    from peft_balanced.quant.kernels import triton_available, triton_dequantize_tiles

    if not triton_available():
        pytest.skip("needs Triton")
    packed, scale, zero = quantize_tiles(_weight(*shape).cuda(), tile, torch.float16)
    expected = dequantize_tiles(packed, scale, zero, tile, out_dtype)
    weight = TileInt4Weight(packed, scale, zero, tile)
    assert torch.equal(triton_dequantize_tiles(weight, out_dtype), expected)
