"""The CUDA int4 layout's learning and decoding, run on the CPU against a stand-in converter with a known
tile order (torch's own converter needs a GPU: tests/test_cuda.py checks it there). What is checked here
is autoqra's side: the digit-plane probe recovers any tile order, and decode inverts encode for every
width the converter accepts, whole or by rows."""

from __future__ import annotations

import pytest
import torch

from autoqra.quant import int4_cuda


def _clear_caches() -> None:
    for fn in (int4_cuda._tile_order, int4_cuda._check):
        fn.cache_clear()
    int4_cuda._INVERSE_ORDERS.clear()


def _stand_in(order: dict[int, torch.Tensor]):
    """A converter placing code position ``order[t][j]`` of each 8 × 16t tile in nibble slot ``j``
    (slot j of word w at bits 4(j mod 8) ..), with torch's output shape ``[N/8, K/(16t), 32, t/2]``."""

    def convert(codes: torch.Tensor, t: int) -> torch.Tensor:
        n, k = codes.shape
        cols = int4_cuda.TILE_K * t
        tiles = codes.to(torch.int64).view(n // 8, 8, k // cols, cols).permute(0, 2, 1, 3)
        slots = tiles.reshape(n // 8, k // cols, 8 * cols)[..., order[t]].view(n // 8, k // cols, -1, 8)
        words = sum(slots[..., j] << (4 * j) for j in range(8))
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
        return words.view(n // 8, k // cols, 32, t // 2)

    return convert


@pytest.fixture
def stand_in(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    order = {t: torch.randperm(8 * int4_cuda.TILE_K * t, generator=gen) for t in (2, 4, 8)}
    monkeypatch.setattr(int4_cuda, "_convert", _stand_in(order))
    monkeypatch.setattr(int4_cuda, "_learning_device", lambda: "cpu")
    _clear_caches()
    yield order
    _clear_caches()


@pytest.mark.parametrize("t", [2, 4, 8])
def test_the_probe_recovers_the_converters_tile_order(stand_in, t) -> None:
    assert torch.equal(int4_cuda._tile_order(t, "cpu"), stand_in[t])


@pytest.mark.parametrize(("n", "k", "t"), [(8, 32, 2), (16, 64, 4), (24, 576, 4), (40, 1536, 8), (64, 96, 2)])
def test_decode_inverts_encode(stand_in, n, k, t) -> None:
    assert int4_cuda.inner_k_tiles(k) == t
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n * k))
    layout = int4_cuda.encode(codes)
    assert layout.shape == (n // 8, k // (16 * t), 32, t // 2) and layout.numel() * 4 == n * k // 2
    assert torch.equal(int4_cuda.decode(layout, k), codes)
    assert torch.equal(int4_cuda.decode(layout, k, 8, n), codes[8:])


@pytest.mark.parametrize(("shape", "rows"), [((12, 32), None), ((8, 48), None), ((16, 64), (4, 12))])
def test_bad_shapes_and_rows_are_refused(stand_in, shape, rows) -> None:
    codes = torch.zeros(shape, dtype=torch.uint8)
    with pytest.raises(ValueError, match="8"):
        if rows is None:
            int4_cuda.encode(codes)
        else:
            int4_cuda.decode(int4_cuda.encode(codes), shape[1], *rows)


def test_nibbles_follow_the_words_bits() -> None:
    words = torch.tensor([[0x76543210, -1, 0x0000000F]], dtype=torch.int32)
    assert int4_cuda._nibbles(words).tolist() == [[list(range(8)), [15] * 8, [15] + [0] * 7]]


def test_rows_of_a_layer_holding_the_cuda_layout(stand_in) -> None:
    """`QuantLoRALinear.rows` (a shared tied embedding's lookup) reads the CUDA layout's rows exactly."""
    from autoqra.modules.quant_lora_linear import QuantLoRALinear

    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(128, 64, bias=False), 4, 0)
    layer.fast_path = False  # packed on the CPU; then laid out as on a GPU
    reference = layer.dequantized_weight()
    codes = layer._codes(0, layer.out_features)
    layer._buffers["qweight"] = int4_cuda.encode(codes)
    layer.layout = "int4_cuda"
    for ids in (torch.tensor([5]), torch.tensor([[63, 0, 17], [9, 9, 40]]), torch.tensor([], dtype=torch.long)):
        assert torch.equal(layer.rows(ids), reference[ids.reshape(-1)])


def test_compiled_dequantization_of_the_cuda_layout_traces_in_one_graph(stand_in) -> None:
    """Under ``torch.compile`` the learned order is read as a constant, not learned again inside the graph
    (``fullgraph=True`` fails on any break), and the dequantized weight is the eager one."""
    from autoqra.modules.quant_lora_linear import QuantLoRALinear

    torch.manual_seed(0)
    layer = QuantLoRALinear.from_linear(torch.nn.Linear(128, 64, bias=False), 4, 0)
    layer.fast_path = False
    reference = layer.dequantized_weight()
    layer._buffers["qweight"] = int4_cuda.encode(layer._codes(0, layer.out_features))
    layer.layout = "int4_cuda"
    layer.dequantized_weight()  # fills the memo, as placing a layer on a GPU does
    torch._dynamo.reset()
    compiled = torch.compile(layer.dequantized_weight, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(), reference)
