"""CUDA-graph decoding (rwkvkit.cuda_graphs): replayed steps equal eager ``step_`` (logits and
state, bitwise), generation gives the same tokens with and without graphs, batches that shrink
move to smaller graphs; on the CPU (and for cache models, int8) everything runs eagerly."""

import pytest
import torch

from conftest import rel_err
from official_files import make_rwkv5_state_dict, make_rwkv6_state_dict, make_rwkv7_state_dict
from rwkvkit import ChatSession, ModelConfig, generate_batch, load_model
from rwkvkit import cuda_graphs
from rwkvkit.cuda_graphs import GraphDecoder, GraphedStep, graph_unsupported_reason, prefill_pieces
from rwkvkit.errors import CUDAGraphError, GenerationError, InputError, StateError
from rwkvkit.generation import complete, prefill
from rwkvkit.models import model_class

MAKERS = {"rwkv5": make_rwkv5_state_dict, "rwkv6": make_rwkv6_state_dict, "rwkv7": make_rwkv7_state_dict}
V = 97
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_model(tmp_path, arch="rwkv7", seed=0, device="cpu", dtype=torch.float32, **load_args):
    path = tmp_path / f"{arch}-{seed}.pth"
    if not path.exists():
        torch.save(MAKERS[arch](n_layer=3, n_embd=64, head_size=32, vocab_size=V, seed=seed), path)
    return load_model(path, device=device, dtype=dtype, **load_args)


def greedy(**changes):
    return {"temperature": 0, "presence_penalty": 0, "frequency_penalty": 0, "stop_tokens": (), **changes}


# -- CPU: the switch and the fallbacks ------------------------------------------------------------
def test_reasons_not_to_graph(tmp_path, seed):
    assert "not a CUDA device" in graph_unsupported_reason(small_model(tmp_path, seed=seed))
    assert "int8" in graph_unsupported_reason(small_model(tmp_path, seed=seed, quantize="int8"))
    for arch in ("goldfinch", "llama"):
        model = model_class(arch)(ModelConfig(arch=arch, n_layer=2, n_embd=64, head_size=32, vocab_size=V))
        assert "growing cache" in graph_unsupported_reason(model)
        assert not GraphDecoder(model).uses_graphs


def test_cpu_decoder_is_eager_and_capture_is_refused(tmp_path, seed):
    model = small_model(tmp_path, seed=seed)
    _, state = prefill(model, torch.randint(0, V, (2, 7)))
    with pytest.raises(CUDAGraphError, match="not a CUDA device"):
        GraphedStep(model, state)
    decoder = GraphDecoder(model)
    assert not decoder.uses_graphs
    eager = state.clone()
    for t in torch.randint(0, V, (4, 2)):
        logits, out = decoder.step(t.tolist(), state)
        assert out is state  # advanced in place, as model.step_ does
        assert torch.equal(logits, model.step_(t, eager))
    decoder.close()


def test_generation_switch_on_cpu(tmp_path, seed):
    """cuda_graphs is accepted everywhere; on the CPU both settings run the same eager step."""
    model = small_model(tmp_path, seed=seed)
    prompt = torch.randint(0, V, (9,)).tolist()
    a = complete(model, prompt, **greedy(max_new_tokens=6), cuda_graphs=True)
    b = complete(model, prompt, **greedy(max_new_tokens=6), cuda_graphs=False)
    assert a.tokens == b.tokens and torch.equal(a.state.wkv, b.state.wkv)
    rows = generate_batch(model, [prompt, prompt[:4]], **greedy(max_new_tokens=5), cuda_graphs=False)
    assert rows[0].tokens == a.tokens[:5]
    chat_model = small_model(tmp_path, seed=seed)
    with pytest.raises(GenerationError, match="tokenizer"):  # the keyword is accepted before this check
        ChatSession(chat_model, cuda_graphs=False)


def test_prefill_pieces():
    """Whole chunks first, then the rest as powers of two (largest first) or, past
    MAX_REMAINDER_PIECES of them, as one piece; the pieces always add up to the prompt."""
    most = cuda_graphs.MAX_REMAINDER_PIECES
    assert prefill_pieces(1000, 4096) == ([512, 256, 128, 64, 32, 8] if most >= 6 else [1000])
    assert prefill_pieces(100, 4096) == [64, 32, 4]
    assert prefill_pieces(8192 + 3, 4096) == [4096, 4096, 2, 1]
    assert prefill_pieces(127, 4096) == ([127] if most < 7 else [64, 32, 16, 8, 4, 2, 1])
    assert prefill_pieces(4096, 4096) == [4096] and prefill_pieces(1, 4096) == [1]
    for length in range(1, 300):
        for chunk in (1, 7, 16, 100):
            pieces = prefill_pieces(length, chunk)
            assert sum(pieces) == length and all(0 < n <= chunk for n in pieces)
            whole = length // chunk
            assert pieces[:whole] == [chunk] * whole
            rest = pieces[whole:]
            assert len(rest) == 1 or all(n & (n - 1) == 0 for n in rest) and rest == sorted(rest, reverse=True)
            assert len(rest) <= most


def test_prefill_plan_with_stand_in_graphs(tmp_path, seed, monkeypatch):
    """graphed_prefill's plan on the CPU, with a stand-in for GraphedForward that runs the
    forward eagerly: whole chunks through graphs from a length's second use (the second chunk
    of the first call), the tail in one eager call until all its pieces are captured (second
    call), then every piece replayed; the numbers are the forward's over those pieces."""
    captured = []

    class StandIn:
        def __init__(self, model, batch_size, length, *, pool=None):
            self.model, self.fingerprint = model, cuda_graphs._fingerprint(model)
            captured.append(length)

        def run(self, tokens, state):
            logits, new = self.model(tokens, state, last_only=True)
            return logits[:, -1], new

    monkeypatch.setattr(cuda_graphs, "GraphedForward", StandIn)
    monkeypatch.setattr(cuda_graphs, "graph_unsupported_reason", lambda model: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model = small_model(tmp_path, seed=seed)
    cuda_graphs.clear_cache(model)
    tokens = torch.randint(0, V, (2, 23))
    for call, pieces, new in ((0, [8, 8, 7], [8]), (1, [8, 8, 4, 2, 1], [4, 2, 1]), (2, [8, 8, 4, 2, 1], [])):
        before = len(captured)
        logits, state = cuda_graphs.graphed_prefill(model, tokens, None, 8)
        assert captured[before:] == new, f"call {call}"
        want_logits, want_state = forward_over(model, tokens, None, pieces)
        assert torch.equal(logits, want_logits) and torch.equal(state.wkv, want_state.wkv), f"call {call}"
    assert captured == [8, 4, 2, 1]
    logits, after = cuda_graphs.graphed_prefill(model, tokens[:, :5], state, 8)  # 4 + 1: both captured
    assert captured == [8, 4, 2, 1] and torch.equal(logits, forward_over(model, tokens[:, :5], state, [4, 1])[0])
    assert cuda_graphs.graphed_prefill(model, torch.randint(0, V, (9, 3)), None, 8) is None  # batch above 8


# -- GPU -----------------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("arch", ["rwkv7", "rwkv6", "rwkv5"])
@pytest.mark.parametrize("batch", [1, 3])
def test_replay_equals_eager_step(tmp_path, seed, arch, batch):
    model = small_model(tmp_path, arch, seed, device="cuda")
    _, state = prefill(model, torch.randint(0, V, (batch, 11)))
    eager = state.clone()
    graph = GraphedStep(model, state)
    assert torch.equal(state.wkv, eager.wkv), "capture must not advance the state"
    for t in torch.randint(0, V, (8, batch)):
        logits = graph.step_(t, state)
        assert logits is graph.logits and logits.shape == (batch, V)
        expected = model.step_(t.cuda(), eager)
        assert torch.equal(logits, expected), f"{arch} B={batch}, seed {seed}: {rel_err(logits, expected):.2e}"
    for name, t in eager.tensor_fields().items():
        assert torch.equal(getattr(state, name), t), f"{name}, seed {seed}"


@cuda
def test_replay_in_bfloat16(tmp_path, seed):
    model = small_model(tmp_path, "rwkv7", seed, device="cuda", dtype=torch.bfloat16)
    _, state = prefill(model, torch.randint(0, V, (3, 5)))
    eager = state.clone()
    graph = GraphedStep(model, state)
    for t in torch.randint(0, V, (6, 3)).cuda():
        assert torch.equal(graph.step_(t, state), model.step_(t, eager))
    assert torch.equal(state.att_shift, eager.att_shift) and torch.equal(state.wkv, eager.wkv)


@cuda
def test_graph_is_bound_to_its_state(tmp_path, seed):
    model = small_model(tmp_path, seed=seed, device="cuda")
    state = model.init_state(2)
    graph = GraphedStep(model, state)
    with pytest.raises(StateError, match="another state"):
        graph.step_(torch.tensor([1, 2]), state.clone())
    with pytest.raises(InputError, match=r"shape \[2\]"):
        graph.step_(torch.tensor([1, 2, 3]), state)
    state.wkv = state.wkv.clone()
    with pytest.raises(StateError, match="replaced"):
        graph.step_(torch.tensor([1, 2]), state)


@cuda
@pytest.mark.parametrize("arch", ["rwkv7", "rwkv6"])
def test_generation_with_graphs_gives_the_same_tokens(tmp_path, seed, arch):
    model = small_model(tmp_path, arch, seed, device="cuda")
    cuda_graphs.clear_cache(model)
    prompt = torch.randint(0, V, (13,)).tolist()
    eager = complete(model, prompt, **greedy(max_new_tokens=24), cuda_graphs=False)
    graphed = complete(model, prompt, **greedy(max_new_tokens=24))
    assert graphed.tokens == eager.tokens, f"seed {seed}"
    assert rel_err(graphed.state.wkv, eager.state.wkv) < 1e-6
    assert 1 in cuda_graphs._cache[model], "a batch-1 graph is kept for the next call"
    again = complete(model, prompt, **greedy(max_new_tokens=24))
    assert again.tokens == eager.tokens
    # A parameter replaced by a new tensor: the kept graph would read the old one, so a new
    # graph is captured (an in-place change is seen by the old one).
    model.head.weight = torch.nn.Parameter(model.head.weight.detach() * 2)
    eager2 = complete(model, prompt, **greedy(max_new_tokens=24), cuda_graphs=False)
    assert complete(model, prompt, **greedy(max_new_tokens=24)).tokens == eager2.tokens


@cuda
def test_batch_that_shrinks_gives_the_same_tokens(tmp_path, seed):
    """Rows stop at different steps (a third of the vocabulary are stop tokens), so the batch
    shrinks from 5 rows in a graph of 8 down to 4, 2 and 1."""
    model = small_model(tmp_path, "rwkv7", seed, device="cuda")
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 7)]
    settings = greedy(max_new_tokens=30, stop_tokens=tuple(range(0, V, 3)))
    eager = generate_batch(model, prompts, **settings, cuda_graphs=False)
    graphed = generate_batch(model, prompts, **settings)
    for e, gr in zip(eager, graphed):
        assert (gr.tokens, gr.stop_reason, gr.stop) == (e.tokens, e.stop_reason, e.stop), f"seed {seed}"
        assert rel_err(gr.state.wkv, e.state.wkv) < 1e-5 and gr.state.batch_size == 1


@cuda
def test_decoder_moves_between_graph_sizes(tmp_path, seed):
    model = small_model(tmp_path, "rwkv7", seed, device="cuda")
    cuda_graphs.clear_cache(model)
    _, state = prefill(model, torch.randint(0, V, (5, 6)))
    eager = state.clone()
    with GraphDecoder(model) as decoder:
        assert decoder.uses_graphs
        for step, rows in enumerate([5, 5, 3, 3, 2, 1]):
            if rows != state.batch_size:
                keep = list(range(rows))
                state, eager = state.select(keep), eager.select(keep)
            tokens = torch.randint(0, V, (rows,))
            logits, state = decoder.step(tokens.tolist(), state)
            assert decoder._graph.batch_size == 1 << (rows - 1).bit_length()
            expected = model.step_(tokens.cuda(), eager)
            assert rel_err(logits, expected) < 1e-6, f"step {step}, {rows} rows, seed {seed}"
    assert set(cuda_graphs._cache[model]) <= {1, 2, 4, 8}


def forward_over(model, tokens, state, pieces):
    """model.forward chained over ``pieces`` (what graphed prefill replays)."""
    start = 0
    with torch.no_grad():
        for n in pieces:
            logits, state = model(tokens[:, start : start + n], state, last_only=True)
            start += n
    return logits[:, -1], state


@cuda
@pytest.mark.parametrize("arch", ["rwkv7", "rwkv6", "rwkv5"])
@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_graphs_equal_forward_over_the_same_pieces(tmp_path, seed, arch, batch):
    """Prefill through graphs (captured on a length's second use) gives bitwise the numbers
    of the eager forward calls over the same pieces, from the initial state and from a
    given one, which is left as it was."""
    model = small_model(tmp_path, arch, seed, device="cuda")
    cuda_graphs.clear_cache(model)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (batch, 23), generator=g)
    pieces = prefill_pieces(23, 8)
    assert pieces == [8, 8, 4, 2, 1]
    first = forward_over(model, tokens.cuda(), None, [8, 8, 7])  # the tail's lengths not captured yet
    expected = forward_over(model, tokens.cuda(), None, pieces)
    for call in range(3):  # the tail eagerly in one call, then captured, then replayed
        logits, state = prefill(model, tokens, chunk_len=8)
        want = first if call == 0 else expected
        assert torch.equal(logits, want[0]), f"call {call}, seed {seed}: {rel_err(logits, want[0]):.2e}"
        for name, t in want[1].tensor_fields().items():
            assert torch.equal(getattr(state, name), t), f"{name}, call {call}, seed {seed}"
    assert set(cuda_graphs._prefill_cache[model].graphs) == {(batch, n) for n in (8, 4, 2, 1)}
    before = state.clone()
    more = torch.randint(0, V, (batch, 13), generator=g)
    expected = forward_over(model, more.cuda(), state, prefill_pieces(13, 8))
    for _ in range(2):
        logits, after = prefill(model, more, state, chunk_len=8)
        assert torch.equal(logits, expected[0]) and torch.equal(after.wkv, expected[1].wkv)
    assert torch.equal(state.wkv, before.wkv) and torch.equal(state.att_shift, before.att_shift)
    # The logits and state handed back are the caller's: later prefills do not change them.
    kept = logits.clone()
    prefill(model, more, chunk_len=8)
    assert torch.equal(logits, kept)


@cuda
def test_prefill_graphs_in_bfloat16_and_after_new_weights(tmp_path, seed):
    model = small_model(tmp_path, "rwkv7", seed, device="cuda", dtype=torch.bfloat16)
    cuda_graphs.clear_cache(model)
    tokens = torch.randint(0, V, (2, 100))
    whole = model(tokens.cuda(), None, last_only=True)
    eager = prefill(model, tokens, cuda_graphs=False)
    for _ in range(3):
        logits, state = prefill(model, tokens, chunk_len=32)
    assert rel_err(logits, whole[0][:, -1]) < 2e-2 and rel_err(state.wkv, eager[1].wkv) < 2e-2
    # A parameter replaced by a new tensor: the kept graphs would read the old one.
    model.head.weight = torch.nn.Parameter(model.head.weight.detach() * 2)
    again = prefill(model, tokens, chunk_len=32)[0]
    assert torch.equal(again, forward_over(model, tokens.cuda(), None, prefill_pieces(100, 32))[0])
    # Out-of-range ids are refused before anything is replayed.
    with pytest.raises(InputError, match="outside the vocabulary"):
        prefill(model, torch.full((2, 100), V), chunk_len=32)
