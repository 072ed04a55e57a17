"""int8 weights (``load_model(quantize="int8")``): the layer against float32, rows that do not
depend on their batch, official state dicts, and the logits tolerance of whole models."""

import pytest
import torch

from conftest import rel_err
from official_files import make_rwkv7_state_dict
from rwkvkit import load_default_model, load_model, quantize
from rwkvkit.errors import ConfigError
from rwkvkit.models.rwkv7 import TimeMix
from rwkvkit.quantize import Int8Linear, Int8Rows, int8_rows_supported, quantize_int8_per_channel

# A few sentences of plain English for the bundled model (trained on stories and books).
TEXT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. "
    "Every morning he went down to the water with his net, and every evening he came home with "
    "a basket of fish. One day the net came up empty, and the next day too. The fisherman sat on "
    "the rocks and looked at the grey waves. \"What shall we eat?\" said his wife when he came home. "
    "\"I do not know,\" he said, \"but tomorrow I will go out further than I have ever gone.\" "
    "So the next morning, before the sun was up, he pushed his little boat into the water."
)


def linear(out_features, in_features, seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=False)
    lin.weight.data = torch.randn(out_features, in_features, generator=g) * in_features**-0.5
    return lin


def int8_tol(base: float) -> float:
    """An int8 tolerance set on CPUs with 8-bit activations, for this CPU: x86 without VNNI
    quantizes the activations to 7 bits (quantize.py), whose steps are twice as large (AMD EPYC,
    AVX2: the errors of these tests doubled, and the 8-bit bounds failed on about half the seeds)."""
    levels = quantize._fbgemm_activation_levels()
    return base * (127 / levels if levels else 1.0)


def test_int8_linear_is_close_to_float(seed):
    lin = linear(96, 200, seed)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(5, 7, 200)
    assert q(x).shape == (5, 7, 96)
    assert rel_err(q(x), lin(x)) < int8_tol(1.5e-2), f"seed {seed}"  # 7 bits: at most 1.66e-2 in 300 seeds
    w, scale = quantize_int8_per_channel(lin.weight)
    assert w.dtype == torch.int8 and w.abs().max() <= 127 and scale.shape == (96,)
    assert rel_err(w.float() * scale[:, None], lin.weight) < 1e-2  # ~6.5e-3 for Gaussian rows


def test_int8_rows_do_not_depend_on_the_batch(seed):
    """Rows are quantized on their own scale: a row's result is the same in any batch of two
    or more rows (a single row takes the kernel's direct path: within int8 rounding)."""
    lin = linear(64, 128, seed)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(6, 128)
    x[2] *= 1000.0  # a row of much larger values must not coarsen the others
    together = q(x)
    for rows in ([0, 1], [3, 2], [5, 4, 0]):
        alone = q(x[rows])
        for i, row in enumerate(rows):
            tol = 1e-6 * together[row].abs().max()
            assert torch.allclose(alone[i], together[row], rtol=1e-6, atol=tol), (rows, row)
    for row in range(6):
        assert rel_err(q(x[row : row + 1])[0], lin(x[row])) < int8_tol(2e-2)  # 7 bits: at most 2.11e-2


needs_fbgemm = pytest.mark.skipif(not int8_rows_supported(), reason="no fbgemm int8 kernels in this PyTorch")


@needs_fbgemm
@pytest.mark.parametrize("B", [1, 4])
def test_int8_rows_are_the_separate_products(seed, B):
    """Int8Rows: row block i times matrix i, one kernel call for all. Against the float
    products (int8 tolerance), and for several rows per block against one Int8Linear per
    matrix (each row on its own scale: the same int8 arithmetic). One row per block shares
    the kernel's range: rows of similar ranges, as one token's mixes are."""
    g = torch.Generator().manual_seed(seed)
    sizes = (32, 64, 16)
    weights = [torch.randn(n, 96, generator=g) * 96**-0.5 for n in sizes]
    rows = torch.randn(3, B, 96, generator=g)
    if B > 1:  # rows of very different sizes: none may coarsen another
        rows = rows * torch.tensor([1.0, 0.01, 100.0])[:, None, None]
    y = Int8Rows(weights)(rows)  # [3, B, sum(sizes)]: row block i keeps block i
    out = [y[i].split(sizes, dim=-1)[i] for i in range(len(sizes))]
    assert [tuple(o.shape) for o in out] == [(B, n) for n in sizes]
    # 7 bits, 3000 seeds: B=1 at most 3.88e-2 (one range for the three rows), B=4 2.02e-2 in 300
    tol = int8_tol(2.5e-2 if B == 1 else 2e-2)
    for w, x, y in zip(weights, rows, out):
        assert rel_err(y, x @ w.T) < tol, f"seed {seed}"
        if B > 1:
            lin = torch.nn.Linear(96, w.shape[0], bias=False)
            lin.weight.data = w
            assert rel_err(y, Int8Linear.from_linear(lin)(x)) < 1e-6, f"seed {seed}"


def test_int8_state_dict_is_official_and_loads_back(seed):
    lin = linear(32, 64, seed)
    q = Int8Linear.from_linear(lin)
    sd = q.state_dict()
    assert list(sd) == ["weight"] and sd["weight"].shape == (32, 64) and sd["weight"].dtype == torch.float32
    other = Int8Linear.from_linear(linear(32, 64, seed + 1))
    other.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(other(x), q(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict({"weight": torch.zeros(8, 8)})


def test_quantized_model_layers_save_and_bad_mode(tmp_path, seed):
    sd = make_rwkv7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=97, seed=seed)
    torch.save(sd, tmp_path / "m.pth")
    model = load_model(tmp_path / "m.pth", quantize="int8")
    assert model.quantization == "int8"
    assert isinstance(model.head, Int8Linear) and isinstance(model.blocks[1].ffn.value, Int8Linear)
    assert model.blocks[0].att.w1.dtype == torch.float32 and model.blocks[0].ln1.weight.dtype == torch.float32
    assert set(model.state_dict()) == set(load_model(tmp_path / "m.pth").state_dict())
    model.save(tmp_path / "saved")  # float32 weights (the int8 values dequantized)
    again = load_model(tmp_path / "saved", quantize="int8")
    tokens = torch.randint(0, 97, (1, 9))
    assert rel_err(again(tokens)[0], model(tokens)[0]) < 1e-5  # scales may move by an ulp
    with pytest.raises(ConfigError, match="quantize='int4'"):
        load_model(tmp_path / "m.pth", quantize="int4")


@pytest.mark.parametrize("setting, max_rel_err, min_top1", [
    # int8 measured 7.4e-3, 98.5% (decoding 6.6e-3, 99.2%); with 7-bit activations 1.27e-2, 98.5%
    (dict(quantize="int8"), 2e-2, 0.97),
    (dict(dtype=torch.bfloat16), 1e-2, 0.97),  # measured 3.6e-3 and 98.5%
])
def test_logits_tolerance_against_float32(setting, max_rel_err, min_top1):
    """The bundled model (trained weights) on a text, against float32: the logits of the
    whole sequence (prefill) and of decoding it token by token with ``step_``, and how often
    the most likely next token is the same."""
    ref_model = load_default_model()
    ids = torch.tensor([ref_model.tokenizer.encode(TEXT)])
    ref, _ = ref_model(ids)
    model = load_default_model(**setting)
    prefilled, _ = model(ids)
    state = model.init_state(1)
    decoded = torch.stack([model.step_(t, state) for t in ids.T], dim=1)
    for out in (prefilled, decoded):
        assert rel_err(out, ref) < max_rel_err
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= min_top1


def _unfused(monkeypatch):
    """The int8 decoding step without its fused products: the low-rank maps in float32."""
    monkeypatch.setattr(TimeMix, "int8_products", lambda self: None)


@needs_fbgemm
def test_int8_fused_step_follows_the_unfused_step(monkeypatch):
    """step_ of an int8 model (the bundled one, on a text) with its low-rank maps as two int8
    products against the same step with the float32 maps, and against the text decoded in a
    batch of two (each row on its own scale): the differences are of the int8 rounding's
    size."""
    model = load_default_model(quantize="int8")
    ids = torch.tensor(model.tokenizer.encode(TEXT))

    def decode(rows):
        state = model.init_state(rows.shape[0])
        return torch.stack([model.step_(t, state) for t in rows.T], dim=1)

    fused = decode(ids[None])[0]
    assert model.blocks[1].att.int8_products() is not None
    with monkeypatch.context() as m:
        _unfused(m)
        separate = decode(ids[None])[0]
    in_batch = decode(torch.stack([ids, ids.flip(0)]))[0]
    # Measured with 8-bit activations: 5.8e-3 and 7.6e-3 (each 6.6e-3 from float32); with 7 bits
    # (int8_tol): 1.18e-2 and 1.50e-2 (1.06e-2 and 1.29e-2 from float32).
    assert rel_err(fused, separate) < int8_tol(1.5e-2)
    assert rel_err(fused, in_batch) < int8_tol(1.5e-2)


@needs_fbgemm
def test_int8_fused_products_follow_the_weights(tmp_path, seed):
    """The int8 low-rank maps are derived from the weights: loading other weights, or changing
    a low-rank matrix or bias in place, is seen by the next step."""
    paths = []
    for i in range(2):
        sd = make_rwkv7_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=97, seed=seed + i)
        paths.append(tmp_path / f"m{i}.pth")
        torch.save(sd, paths[-1])
    model, other = load_model(paths[0], quantize="int8"), load_model(paths[1], quantize="int8")
    token = torch.randint(0, 97, (1,))

    def step(m):
        return m.step_(token, m.init_state(1))

    step(model)
    model.load_state_dict(other.state_dict())  # (int8 scales re-derived: they may move by an ulp)
    assert rel_err(step(model), step(other)) < 1e-5
    for name in ("w1", "g2", "v0"):
        with torch.no_grad():
            getattr(model.blocks[1].att, name).mul_(3.0)
            getattr(other.blocks[1].att, name).mul_(3.0)
        assert rel_err(step(model), step(other)) < 1e-5, name
