"""Text generation: sampler, repetition penalties, stops, streaming, batches, chat.

Sampling follows the reference ``rwkv`` package (``rwkv.utils.PIPELINE``), so settings tuned
for it carry over:

* ``temperature == 0`` is greedy (top-p 0: every token tied at the maximum may be drawn);
* softmax in float32, then a top-p cut on the sorted probabilities (tokens whose probability
  is at least the cutoff survive), then top-k, and only then the temperature, applied to the
  surviving *probabilities* as ``p ** (1 / temperature)``;
* presence / frequency penalties with decay: before each draw, every token seen so far loses
  ``presence + occurrence * frequency`` from its logit; after each draw every occurrence is
  multiplied by ``penalty_decay`` and the drawn token's occurrence grows by 1, or by 0 when
  its text is a substring of ``" \\t0123456789"`` (spaces and digits stay "seen", so they
  still get the presence penalty, but do not accumulate);
* banned tokens get ``-inf``; a stop token ends generation and is not part of the output.

The main entry points::

    text = generate(model, "The capital of France is", max_new_tokens=20)   # -> str
    result = complete(model, prompt, params)        # -> GenerationResult (text, tokens, state)
    for piece in stream(model, prompt, params):     # text pieces as they become complete
        print(piece, end="", flush=True)
    results = generate_batch(model, [p1, p2, p3], params)  # one GenerationResult per prompt

Every function takes a :class:`SamplingParams` and/or keyword overrides of its fields
(``generate(model, p, temperature=0, stop_strings=["\\n\\n"])``).

**Reusing a prompt state.** ``model(tokens, state)`` never modifies ``state``, and neither
does anything here, so a prefilled prompt can be continued many times::

    _, system_state = prefill(model, tokenizer.encode(system_prompt))
    system_state.save("system.state")                  # optional: keep it on disk
    system_state = RecurrentState.load("system.state")
    for question in questions:
        answer = generate(model, question, state=system_state)   # same as system_prompt + question

``state.clone()`` makes an independent copy for code that does change tensors in place.

**The state after generation.** ``GenerationResult.state`` has consumed the prompt and every
token in ``GenerationResult.tokens`` (the tokens that completed a stop string included, a
stop token excluded), so ``complete(model, more, state=result.state)`` continues the text
``prompt + decode(result.tokens) + more``. :class:`ChatSession` builds a multi-turn chat on
this and keeps the state consistent with the conversation text.

Generation runs under ``torch.no_grad()`` (not ``inference_mode``), so the returned states
are ordinary tensors that may later be used where autograd is on (e.g. state tuning).
Decoding uses the model's in-place ``step_`` (one token per row, no new state per token) on
a state that belongs to the loop alone; the states handed back are copies. On a GPU the step
is replayed as a CUDA graph (:mod:`rwkvkit.cuda_graphs`: the same numbers, one launch instead
of hundreds of small ones), and so are the prompt's forward calls at batches up to 8 (see
:func:`prefill`); every function here takes ``cuda_graphs=False`` to run both eagerly
instead. On the CPU, and for models that cannot be graphed (GoldFinch and Llama, whose
caches grow; int8 layers), everything is eager.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Literal, Sequence

import torch

from .cuda_graphs import GraphDecoder, graphed_prefill
from .errors import GenerationError, RwkvkitError
from .state import ModelState, RecurrentState

__all__ = [
    "ChatSession",
    "GenerationResult",
    "RepetitionPenalty",
    "SamplingParams",
    "TextStream",
    "complete",
    "format_user_message",
    "generate",
    "generate_batch",
    "occurrence_weights",
    "prefill",
    "sample_logits",
    "sampling_probs",
    "stream",
]

EOT_ID = 0
"""Token 0: end of text (and the document separator of the training data)."""

DEFAULT_CHUNK_LEN = 512
"""Prompt tokens per forward call while prefilling on the CPU (bounds activation memory)."""

CUDA_CHUNK_LEN = 4096
"""The same on a GPU, where a forward call of a small model costs about the same time at 512
tokens as at several thousand (launching its kernels dominates), and memory is plentiful."""


def default_chunk_len(device: torch.device) -> int:
    """Prompt tokens per forward call when ``chunk_len`` is not given: :data:`CUDA_CHUNK_LEN`
    on a GPU, :data:`DEFAULT_CHUNK_LEN` elsewhere."""
    return CUDA_CHUNK_LEN if torch.device(device).type == "cuda" else DEFAULT_CHUNK_LEN

# A token whose text is a substring of this does not accumulate occurrences (reference rule).
_UNCOUNTED_TEXT = " \t0123456789"

StopReason = Literal["stop_token", "stop_string", "length"]


# -- settings ------------------------------------------------------------------------------------
def _fail(name: str, value: Any, why: str) -> GenerationError:
    return GenerationError(f"sampling setting {name}={value!r}: {why}")


def _real(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, value, "must be a number")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise _fail(name, value, "must be finite")
    if lo is not None and value < lo:
        raise _fail(name, value, f"must be >= {lo:g}")
    if hi is not None and value > hi:
        raise _fail(name, value, f"must be <= {hi:g}")
    return value


def _int(name: str, value: Any, lo: int | None = 0, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, value, "must be an integer")
    value = int(value)
    if lo is not None and value < lo:
        raise _fail(name, value, f"must be >= {lo}")
    if hi is not None and value > hi:
        raise _fail(name, value, f"must be <= {hi}")
    return value


def _ids(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, set, frozenset)):
        raise _fail(name, value, "must be a sequence of token ids")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise _fail(name, value, f"token ids must be integers >= 0 (not {v!r})")
    return tuple(int(v) for v in value)


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (Sequence, set, frozenset)):
        raise _fail(name, value, "must be a sequence of strings")
    for s in value:
        if not isinstance(s, str) or not s:
            raise _fail(name, value, f"stop strings must be non-empty str (not {s!r})")
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Immutable; values are checked on creation.

    Attributes:
        temperature: >= 0; 0 is greedy. Applied to the probabilities left after top-p/top-k.
        top_p: nucleus cut in [0, 1]; 1 keeps everything, 0 is greedy.
        top_k: keep the k most likely tokens (0: no limit).
        presence_penalty: subtracted once from the logit of every token seen so far
            (the reference's ``alpha_presence``).
        frequency_penalty: subtracted per (decayed) occurrence (``alpha_frequency``).
        penalty_decay: in [0, 1]; every occurrence count is multiplied by it after each
            token (``alpha_decay``).
        ban_tokens: token ids that are never drawn (logit -inf).
        stop_tokens: token ids that end generation without being emitted (default: 0,
            end of text).
        stop_strings: generation stops as soon as the generated text contains one of these;
            the stop string and anything after it are not part of the text.
        max_new_tokens: at most this many tokens are drawn (a stop token counts).
        seed: seed of the sampler's random generator (None: drawn from torch's global RNG,
            so ``torch.manual_seed`` also makes runs repeatable).
    """

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    presence_penalty: float = 0.2
    frequency_penalty: float = 0.2
    penalty_decay: float = 0.996
    ban_tokens: tuple[int, ...] = ()
    stop_tokens: tuple[int, ...] = (EOT_ID,)
    stop_strings: tuple[str, ...] = ()
    max_new_tokens: int = 100
    seed: int | None = None

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        put("temperature", _real("temperature", self.temperature, lo=0.0))
        put("top_p", _real("top_p", self.top_p, lo=0.0, hi=1.0))
        put("top_k", _int("top_k", self.top_k))
        put("presence_penalty", _real("presence_penalty", self.presence_penalty))
        put("frequency_penalty", _real("frequency_penalty", self.frequency_penalty))
        put("penalty_decay", _real("penalty_decay", self.penalty_decay, lo=0.0, hi=1.0))
        put("ban_tokens", _ids("ban_tokens", self.ban_tokens))
        put("stop_tokens", _ids("stop_tokens", self.stop_tokens))
        put("stop_strings", _strings("stop_strings", self.stop_strings))
        put("max_new_tokens", _int("max_new_tokens", self.max_new_tokens))
        if self.seed is not None:
            put("seed", _int("seed", self.seed, lo=-(2**63), hi=2**64 - 1))  # (what torch.Generator takes)

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with some fields changed (checked like the constructor)."""
        known = {f.name for f in dataclasses.fields(self)}
        for name in changes:
            if name not in known:
                raise GenerationError(
                    f"unknown sampling setting {name!r} (known: {', '.join(sorted(known))})"
                )
        return dataclasses.replace(self, **changes)

    @classmethod
    def chat(cls, **changes: Any) -> "SamplingParams":
        """The reference chat demo's settings: temperature 1, top-p 0.3, presence and
        frequency 0.5, decay 0.996, token 0 banned, stop at a blank line ("\\n\\n")."""
        base = cls(
            temperature=1.0, top_p=0.3, presence_penalty=0.5, frequency_penalty=0.5,
            penalty_decay=0.996, ban_tokens=(EOT_ID,), stop_tokens=(EOT_ID,),
            stop_strings=("\n\n",), max_new_tokens=500,
        )
        return base.replace(**changes)


def _resolve_params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    if params is None:
        params = SamplingParams()
    elif not isinstance(params, SamplingParams):
        raise GenerationError(f"params must be a SamplingParams, got {type(params).__name__}")
    return params.replace(**overrides) if overrides else params


# -- the sampler ---------------------------------------------------------------------------------
def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from: float32, same shape as ``logits`` ([V] or
    [B, V]), each row summing to 1. Uses ``temperature``, ``top_p`` and ``top_k``.

    Differences from the reference, both where it misbehaves: ``top_p == 1`` keeps every
    token (the reference's float32 cumulative sum can stay just below 1 and then keeps
    only the top token), and a very low temperature cannot underflow every probability to 0
    (the probabilities are divided by their maximum before the power, which leaves the
    normalised distribution unchanged).
    """
    if logits.dim() not in (1, 2):
        raise GenerationError(f"logits must have shape [V] or [B, V], got {tuple(logits.shape)}")
    temperature, top_p, top_k = params.temperature, params.top_p, params.top_k
    if temperature == 0:  # greedy, as the reference: temperature 1, top-p 0
        temperature, top_p = 1.0, 0.0
    probs = torch.softmax(logits.float(), dim=-1)
    V = probs.shape[-1]
    kept = probs
    if top_p <= 0.0:  # the cutoff is the largest probability: ties at the maximum survive
        kept = torch.where(probs < probs.amax(dim=-1, keepdim=True), 0.0, probs)
    elif top_p < 1.0:
        kept = torch.where(probs < _top_p_cutoff(probs, top_p), 0.0, probs)
    if 0 < top_k < V:
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, probs.topk(top_k, dim=-1).indices, True)
        kept = torch.where(keep, kept, 0.0)
    probs = kept
    if temperature != 1.0:
        probs = (probs / probs.amax(dim=-1, keepdim=True)) ** (1.0 / temperature)
    return probs / probs.sum(dim=-1, keepdim=True)


def _top_p_cutoff(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per row, the probability of the first token (in descending order) at which the
    cumulative probability reaches ``top_p`` ([B, 1]); the smallest one if it never does.

    A full sort of a 65536-token row is slow on the CPU, and the nucleus is usually a few
    hundred tokens at most, so the largest ``k`` probabilities are sorted first and ``k``
    grows only when they do not reach ``top_p`` (the sorted prefix is the same either way).
    """
    V = probs.shape[-1]
    k = min(V, 256)
    while True:
        top = probs.topk(k, dim=-1, sorted=True).values
        reached = top.cumsum(dim=-1) >= top_p
        found = reached.any(dim=-1, keepdim=True)
        if k == V or bool(found.all()):
            first = torch.where(found, reached.to(torch.uint8).argmax(dim=-1, keepdim=True), k - 1)
            return top.gather(-1, first)
        k = min(V, k * 8)


def sample_logits(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row from ``logits`` ([V] or [B, V]) with the reference semantics
    (see :func:`sampling_probs`). Returns a LongTensor of shape [] or [B] (``int(...)`` /
    ``.tolist()`` for Python ints). The same ``generator`` state gives the same tokens."""
    probs = sampling_probs(logits, params)
    kept = (probs > 0).sum(dim=-1)
    greedy, drawable = torch.stack([(kept == 1).all(), (torch.isfinite(probs).all(dim=-1) & (kept > 0)).all()]).tolist()
    if not drawable:  # (one read of the device for both checks)
        raise GenerationError("no token can be drawn: a row of logits has no finite value (every token banned, "
                              "or NaN / inf logits)")
    if greedy:  # one candidate per row: no draw
        return probs.argmax(dim=-1)
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)
    rows = probs if probs.dim() == 2 else probs.unsqueeze(0)
    drawn = torch.multinomial(rows, 1, generator=generator).squeeze(-1)
    return drawn if probs.dim() == 2 else drawn[0]


def _make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    try:
        gen = torch.Generator(device=device)
    except RuntimeError:  # a device without its own generator: sample on the CPU
        gen = torch.Generator()
    return gen.manual_seed(seed)


class RepetitionPenalty:
    """Presence / frequency penalties with decay, one row per sequence of a batch.

    Occurrence counts are kept in float64 and the penalty is rounded to float32 before it
    is subtracted, which reproduces the reference's arithmetic (Python floats subtracted
    from a float32 tensor) exactly.

    ``counts(token)`` is the amount a drawn token adds to its occurrence: 1, or 0 for tokens
    whose text is a substring of ``" \\t0123456789"`` (see :func:`occurrence_weights`).
    """

    def __init__(
        self,
        batch_size: int,
        vocab_size: int,
        params: SamplingParams,
        counts: Callable[[int], float] = lambda token: 1.0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.decay = params.penalty_decay
        self.counts = counts
        self.occurrence = torch.zeros(batch_size, vocab_size, dtype=torch.float64, device=device)
        self.seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)

    @property
    def active(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, V] with the penalties subtracted (a new tensor)."""
        if not self.active:
            return logits
        penalty = (self.presence + self.occurrence * self.frequency).to(logits.dtype)
        return torch.where(self.seen, logits - penalty, logits)

    def update(self, tokens: Sequence[int]) -> None:
        """Record one drawn token per row."""
        rows = torch.arange(len(tokens), device=self.occurrence.device)
        index = torch.as_tensor(list(tokens), dtype=torch.long, device=self.occurrence.device)
        weights = torch.tensor([float(self.counts(t)) for t in tokens], dtype=torch.float64)
        self.occurrence.mul_(self.decay)
        self.occurrence[rows, index] += weights.to(self.occurrence.device)
        self.seen[rows, index] = True

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows (in this order)."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.occurrence.device)
        self.occurrence = self.occurrence.index_select(0, index)
        self.seen = self.seen.index_select(0, index)


def occurrence_weights(tokenizer: Any) -> Callable[[int], float]:
    """The reference rule for what a drawn token adds to its occurrence count: 0 when
    ``tokenizer.decode([token])`` is a substring of ``" \\t0123456789"`` (a space, a tab,
    digits, or an empty text), else 1. Without a tokenizer every token counts 1."""
    cache: dict[int, float] = {}

    def weight(token: int) -> float:
        if tokenizer is None:
            return 1.0
        found = cache.get(token)
        if found is None:
            try:
                text = tokenizer.decode([token])
            except Exception:  # noqa: BLE001 - undecodable id: counts like invalid UTF-8 text
                text = "\ufffd"
            found = cache[token] = 0.0 if text in _UNCOUNTED_TEXT else 1.0
        return found

    return weight


# -- prefill -------------------------------------------------------------------------------------
def _as_batch(tokens: Any) -> torch.Tensor:
    """Token ids [T] or [B, T] (a tensor or a sequence of ints) as a [B, T] tensor."""
    if not isinstance(tokens, torch.Tensor):
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
            raise GenerationError(f"prefill: tokens must be token ids (a tensor or a sequence of ints), got "
                                  f"{type(tokens).__name__}; encode text with the model's tokenizer first")
        try:
            tokens = torch.as_tensor(tokens if hasattr(tokens, "__len__") else list(tokens))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise GenerationError(f"prefill: tokens are not token ids ({exc})") from None
    if tokens.dim() not in (1, 2):
        raise GenerationError(f"prefill: tokens must be [T] or [B, T] token ids, got shape {list(tokens.shape)}")
    t = tokens if tokens.dim() == 2 else tokens[None]
    if t.shape[-1] == 0:
        raise GenerationError("prefill: no tokens given")
    return t


def prefill(
    model: Any,
    tokens: torch.Tensor | Sequence[int],
    state: RecurrentState | None = None,
    *,
    chunk_len: int | None = None,
    cuda_graphs: bool = True,
) -> tuple[torch.Tensor, RecurrentState]:
    """Feed ``tokens`` ([B, T], [T] or a list of ids) after ``state`` (None: the model's
    initial state), ``chunk_len`` tokens per forward call (None: :func:`default_chunk_len`
    of the model's device), keeping only the last logits.

    Returns ``(logits [B, V] float32 after the last token, new state)``; ``state`` itself is
    not changed. Memory is bounded by ``chunk_len``, whatever the prompt length.

    On a GPU, RWKV models at batches up to 8 replay the forward calls as CUDA graphs
    (:func:`rwkvkit.cuda_graphs.graphed_prefill`: whole chunks, and the rest in power-of-two
    pieces once each of their lengths has been captured, on its second use; until then the rest
    goes in one eager call); ``cuda_graphs=False`` feeds every chunk eagerly. The two agree to
    float rounding (the pieces differ).
    """
    if chunk_len is None:
        chunk_len = default_chunk_len(model.device)
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise GenerationError(f"chunk_len={chunk_len!r}: must be a positive integer")
    batch = _as_batch(tokens)
    if cuda_graphs and getattr(model, "device", torch.device("cpu")).type == "cuda":
        out = graphed_prefill(model, batch, state, chunk_len)
        if out is not None:
            return out
    logits = None
    with torch.no_grad():
        for start in range(0, batch.shape[1], chunk_len):
            logits, state = model(batch[:, start : start + chunk_len], state, last_only=True)
    assert logits is not None and state is not None
    return logits[:, -1], state


# -- results and streams -------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """What one generated sequence produced.

    Attributes:
        text: the generated text, without a stop string (nor what followed it) and without an
            incomplete UTF-8 character at the very end ("" when there is no tokenizer).
        tokens: every drawn token except a stop token; tokens that completed a stop string
            are included (the text may therefore be shorter than ``decode(tokens)``).
        state: the state after the prompt and all of ``tokens``.
        stop_reason: "stop_token", "stop_string" or "length" (``max_new_tokens`` reached).
        stop: the stop token id or stop string that ended generation (None for "length").
        prompt_tokens: number of prompt tokens fed.
    """

    text: str
    tokens: list[int]
    state: RecurrentState
    stop_reason: StopReason
    stop: int | str | None = None
    prompt_tokens: int = 0


class TextStream(Iterator[str]):
    """An iterator over text pieces; once it is exhausted, ``result`` holds the
    :class:`GenerationResult` (None before that)."""

    def __init__(self, pieces: Generator[str, None, GenerationResult]) -> None:
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as done:
            if self.result is None:
                self.result = done.value
            raise

    def close(self) -> None:
        """Stop generating (``result`` stays None)."""
        self._pieces.close()

    def finish(self) -> GenerationResult:
        """Run to the end (discarding pieces not yet read) and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


def _feed(decoder: Any, token: int) -> str:
    """Text completed by ``token``; an id the tokenizer has no text for (an unused id of a
    padded vocabulary) adds nothing."""
    try:
        return decoder.feed(token)
    except RwkvkitError:
        return ""


def _decode_lenient(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of ``ids`` as a stream shows it (ids without text skipped)."""
    decoder = tokenizer.decoder()
    return "".join(_feed(decoder, t) for t in ids) + decoder.flush()


class _TextTracker:
    """Incremental text of one sequence: complete characters only, stop strings held back.

    Text that could be the start of a stop string is held until it is known not to be one;
    since the held suffix is the longest suffix that is a prefix of a stop string, a stop
    string can never begin inside text that was already emitted.
    """

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...]) -> None:
        self.decoder = tokenizer.decoder() if tokenizer is not None else None
        self.stop_strings = stop_strings
        self.pending = ""
        self.parts: list[str] = []
        self.stop: str | None = None

    def _held(self) -> int:
        longest = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def feed(self, token: int) -> str:
        """Add a token; returns the text that can be emitted now. Sets ``stop`` on a stop string."""
        if self.decoder is None:
            return ""
        self.pending += _feed(self.decoder, token)
        if not self.stop_strings:
            out, self.pending = self.pending, ""
        else:
            hits = [(i, s) for s in self.stop_strings if (i := self.pending.find(s)) >= 0]
            if hits:
                i, self.stop = min(hits)
                out, self.pending = self.pending[:i], ""
            else:
                cut = len(self.pending) - self._held()
                out, self.pending = self.pending[:cut], self.pending[cut:]
        if out:
            self.parts.append(out)
        return out

    def finish(self) -> str:
        """Release held text at the end (an incomplete trailing character is dropped)."""
        out, self.pending = self.pending, ""
        if out:
            self.parts.append(out)
        return out

    @property
    def text(self) -> str:
        return "".join(self.parts)


# -- the decoding loop ---------------------------------------------------------------------------
def _prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError(
                "a text prompt needs a tokenizer: the model has none; pass tokenizer=... "
                "or give the prompt as a list of token ids"
            )
        ids = list(tokenizer.encode(prompt))
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype not in (torch.int64, torch.int32):
            raise GenerationError(f"a tensor prompt must be 1-D token ids, got {prompt.dtype} {tuple(prompt.shape)}")
        ids = prompt.tolist()
    elif isinstance(prompt, (Sequence,)) and not isinstance(prompt, (bytes, bytearray)):
        ids = list(prompt)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise GenerationError(f"prompt token {t!r} is not an integer id")
        ids = [int(t) for t in ids]
    else:
        raise GenerationError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise GenerationError("the prompt is empty: give at least one token (e.g. [0], end of text)")
    return ids


def _check_ids_in_vocab(params: SamplingParams, vocab_size: int) -> None:
    for name in ("ban_tokens", "stop_tokens"):
        for t in getattr(params, name):
            if t >= vocab_size:
                raise _fail(name, t, f"token id outside the vocabulary [0, {vocab_size})")


def _run(
    model: Any,
    prompts: list[list[int]],
    states: list[RecurrentState | None],
    params: SamplingParams,
    tokenizer: Any,
    chunk_len: int | None,
    cuda_graphs: bool = True,
) -> Generator[tuple[int, str], None, list[GenerationResult]]:
    """Generate for every prompt together; yields ``(row, text piece)``, returns the results."""
    vocab = model.config.vocab_size
    _check_ids_in_vocab(params, vocab)
    if params.stop_strings and tokenizer is None:
        raise GenerationError("stop_strings need a tokenizer to decode the generated text")
    n = len(prompts)
    logits_rows, row_states = [], []
    for ids, st in zip(prompts, states):
        lg, st = prefill(model, ids, st, chunk_len=chunk_len, cuda_graphs=cuda_graphs)
        logits_rows.append(lg)
        row_states.append(st)
    logits = torch.cat(logits_rows) if n > 1 else logits_rows[0]
    state = RecurrentState.cat(row_states) if n > 1 else row_states[0]

    trackers = [_TextTracker(tokenizer, params.stop_strings) for _ in range(n)]
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    finals: list[tuple[RecurrentState, StopReason, int | str | None] | None] = [None] * n
    if params.max_new_tokens == 0:
        for r in range(n):
            finals[r] = (row_states[r], "length", None)

    device = logits.device
    generator = _make_generator(device, params.seed)
    penalty = RepetitionPenalty(n, vocab, params, occurrence_weights(tokenizer), device)
    ban = torch.tensor(params.ban_tokens, dtype=torch.long, device=device) if params.ban_tokens else None
    stop_tokens = set(params.stop_tokens)
    active = list(range(n))  # batch position -> row
    # With CUDA graphs the decoder's state and logits live in the graph's buffers and change
    # at its next step: what is kept from them below is copied first (select, indexing).
    decoder = GraphDecoder(model, cuda_graphs=cuda_graphs)

    step = 0
    while active and step < params.max_new_tokens:
        step += 1
        if ban is not None:
            logits = logits.index_fill(-1, ban, float("-inf"))
        drawn = sample_logits(penalty.apply(logits), params, generator).tolist()

        keep: list[int] = []  # batch positions that go on
        feed: list[int] = []  # batch positions whose token must be fed to the model
        ended: list[tuple[int, StopReason, int | str | None]] = []  # (position, reason, stop)
        for pos, (row, tok) in enumerate(zip(active, drawn)):
            if tok in stop_tokens:
                finals[row] = (state.select(pos), "stop_token", tok)
                continue
            out_tokens[row].append(tok)
            piece = trackers[row].feed(tok)
            if piece:
                yield row, piece
            feed.append(pos)
            if trackers[row].stop is not None:
                ended.append((pos, "stop_string", trackers[row].stop))
            elif step == params.max_new_tokens:
                ended.append((pos, "length", None))
            else:
                keep.append(pos)
        if not feed:
            break
        penalty.update(drawn)
        if len(feed) != len(active):
            state = state.select(feed)
        logits, state = decoder.step([drawn[p] for p in feed], state)
        where = {pos: i for i, pos in enumerate(feed)}  # batch position -> row of the fed batch
        for pos, reason, stop in ended:
            finals[active[pos]] = (state.select(where[pos]), reason, stop)
        if len(keep) != len(feed):
            kept = [where[p] for p in keep]
            if kept:
                state, logits = state.select(kept), logits[kept]
        if len(keep) != len(active):
            penalty.select(keep)
        active = [active[p] for p in keep]
    decoder.close()  # (a generator abandoned early just drops its graph)

    results = []
    for row in range(n):
        final = finals[row]
        assert final is not None
        piece = trackers[row].finish()
        if piece:
            yield row, piece
        st, reason, stop = final
        results.append(
            GenerationResult(
                text=trackers[row].text, tokens=out_tokens[row], state=st,
                stop_reason=reason, stop=stop, prompt_tokens=len(prompts[row]),
            )
        )
    return results


def _tokenizer_of(model: Any, tokenizer: Any) -> Any:
    if tokenizer is not None and not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
        raise GenerationError(f"tokenizer must be a tokenizer object (with encode and decode, e.g. "
                              f"WorldTokenizer()), got {type(tokenizer).__name__}")
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)


def _check_state_arg(state: Any) -> None:
    if state is not None and not isinstance(state, ModelState):
        raise GenerationError(f"state must be a model state (from model.init_state, forward or prefill), "
                              f"got {type(state).__name__}")


def stream(
    model: Any,
    prompt: str | Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    *,
    state: RecurrentState | None = None,
    tokenizer: Any = None,
    chunk_len: int | None = None,
    cuda_graphs: bool = True,
    **overrides: Any,
) -> TextStream:
    """Generate lazily: iterate to get text pieces as they become complete characters
    (never half a UTF-8 character, never part of a stop string). After the loop,
    ``.result`` is the :class:`GenerationResult`.

    ``prompt`` is text (encoded with ``tokenizer`` or ``model.tokenizer``) or token ids;
    ``state`` (batch 1, not modified) is what the prompt continues (None: the initial state).
    ``cuda_graphs``: on a GPU, decode through a CUDA graph (default; the same numbers) or,
    with False, eagerly. Settings errors are raised here, before any token is generated.
    """
    params = _resolve_params(params, overrides)
    tokenizer = _tokenizer_of(model, tokenizer)
    ids = _prompt_ids(prompt, tokenizer)
    _check_ids_in_vocab(params, model.config.vocab_size)
    if params.stop_strings and tokenizer is None:
        raise GenerationError("stop_strings need a tokenizer to decode the generated text")
    _check_state_arg(state)
    if state is not None and state.batch_size != 1:
        raise GenerationError(f"state has batch size {state.batch_size}; a single prompt needs a batch-1 state")

    def pieces() -> Generator[str, None, GenerationResult]:
        results = yield from _strip_rows(_run(model, [ids], [state], params, tokenizer, chunk_len, cuda_graphs))
        return results[0]

    return TextStream(pieces())


def _strip_rows(
    events: Generator[tuple[int, str], None, list[GenerationResult]],
) -> Generator[str, None, list[GenerationResult]]:
    """Drop the row index of a single-row event stream, passing its results through."""
    while True:
        try:
            _, piece = next(events)
        except StopIteration as done:
            return done.value
        yield piece


def complete(
    model: Any,
    prompt: str | Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    *,
    state: RecurrentState | None = None,
    tokenizer: Any = None,
    callback: Callable[[str], None] | None = None,
    chunk_len: int | None = None,
    cuda_graphs: bool = True,
    **overrides: Any,
) -> GenerationResult:
    """Generate and return the full :class:`GenerationResult` (text, tokens, state, why it
    stopped). ``callback`` gets each text piece as it becomes available (as :func:`stream`)."""
    s = stream(model, prompt, params, state=state, tokenizer=tokenizer, chunk_len=chunk_len,
               cuda_graphs=cuda_graphs, **overrides)
    for piece in s:
        if callback is not None:
            callback(piece)
    assert s.result is not None
    return s.result


def generate(
    model: Any,
    prompt: str | Sequence[int] | torch.Tensor,
    params: SamplingParams | None = None,
    *,
    state: RecurrentState | None = None,
    tokenizer: Any = None,
    callback: Callable[[str], None] | None = None,
    chunk_len: int | None = None,
    cuda_graphs: bool = True,
    **overrides: Any,
) -> str:
    """Generate a continuation of ``prompt`` and return its text (see :func:`complete`
    for the tokens and final state, :func:`stream` for an iterator)."""
    return complete(
        model, prompt, params, state=state, tokenizer=tokenizer, callback=callback,
        chunk_len=chunk_len, cuda_graphs=cuda_graphs, **overrides,
    ).text


def generate_batch(
    model: Any,
    prompts: Sequence[str | Sequence[int] | torch.Tensor],
    params: SamplingParams | None = None,
    *,
    states: ModelState | Sequence[ModelState | None] | None = None,
    tokenizer: Any = None,
    callback: Callable[[int, str], None] | None = None,
    chunk_len: int | None = None,
    cuda_graphs: bool = True,
    **overrides: Any,
) -> list[GenerationResult]:
    """Generate for several prompts at once; one :class:`GenerationResult` per prompt, in order.

    There is no attention mask in a recurrent model (padding would change the state), so
    each prompt is prefilled alone, the states are joined with :meth:`ModelState.cat`,
    and all rows then decode together one token per step. Each row has its own penalties
    and stops; a finished row leaves the batch. Greedy output of each row equals that
    prompt run alone (in float32; with bf16/fp16 weights the batch shape can change the
    rounding of matrix products and so flip near-tied choices); sampled output is reproducible for the same batch and seed, but is
    not the same draw as running the prompt alone (the rows share one random generator).

    Models with a cache (GoldFinch, Llama) keep one cache length per batch, so their rows
    are decoded in groups of equal length (start state's cache + prompt), one group after
    the other, each with its own random generator (seeded alike); RWKV rows are one group.

    ``states``: None, one batch-1 state shared by every prompt (e.g. a system prompt), a
    state with one row per prompt, or a list of per-prompt states (None entries allowed):
    the model's own state type (``RecurrentState``, ``GoldFinchState``, ``KVCacheState``).
    ``callback(row, piece)`` receives text pieces as they become available. ``cuda_graphs``
    as in :func:`stream` (a batch decodes in a graph of the next power-of-two size, padded;
    it moves to a smaller one when finished rows halve the batch).
    """
    params = _resolve_params(params, overrides)
    tokenizer = _tokenizer_of(model, tokenizer)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise GenerationError("generate_batch: prompts must be a list of prompts")
    if not prompts:
        return []
    ids = [_prompt_ids(p, tokenizer) for p in prompts]
    n = len(ids)
    if states is None:
        per_row: list[ModelState | None] = [None] * n
    elif isinstance(states, ModelState):
        if states.batch_size == 1:
            per_row = [states] * n
        elif states.batch_size == n:
            per_row = [states.select(i) for i in range(n)]
        else:
            raise GenerationError(f"states has batch size {states.batch_size}; expected 1 or {n} (one per prompt)")
    elif isinstance(states, Sequence):
        per_row = list(states)
        if len(per_row) != n:
            raise GenerationError(f"got {len(per_row)} states for {n} prompts")
        for i, st in enumerate(per_row):
            if st is not None and not isinstance(st, ModelState):
                raise GenerationError(f"states[{i}] is a {type(st).__name__}, not a model state (or None)")
            if st is not None and st.batch_size != 1:
                raise GenerationError(f"states[{i}] has batch size {st.batch_size}; expected 1")
    else:
        raise GenerationError(f"states must be a model state or a list of them, got {type(states).__name__}")
    events = _run_groups(model, ids, per_row, params, tokenizer, chunk_len, cuda_graphs)
    while True:
        try:
            row, piece = next(events)
        except StopIteration as done:
            return done.value
        if callback is not None:
            callback(row, piece)


def _run_groups(
    model: Any,
    prompts: list[list[int]],
    states: list[ModelState | None],
    params: SamplingParams,
    tokenizer: Any,
    chunk_len: int | None,
    cuda_graphs: bool = True,
) -> Generator[tuple[int, str], None, list[GenerationResult]]:
    """:func:`_run` over the rows grouped by the cache length they will have after their
    prompt (rows of one batch share a cache length; states without a cache are all 0)."""
    cached = _has_cache(model)
    groups: dict[int, list[int]] = {}
    for row, (ids, st) in enumerate(zip(prompts, states)):
        length = len(ids) + (st.cache_length if st is not None else 0) if cached else 0
        groups.setdefault(length, []).append(row)
    if len(groups) == 1:
        return (yield from _run(model, prompts, states, params, tokenizer, chunk_len, cuda_graphs))
    results: list[GenerationResult | None] = [None] * len(prompts)
    for rows in groups.values():
        events = _run(model, [prompts[r] for r in rows], [states[r] for r in rows], params, tokenizer, chunk_len,
                      cuda_graphs)
        while True:
            try:
                i, piece = next(events)
            except StopIteration as done:
                for r, res in zip(rows, done.value):
                    results[r] = res
                break
            yield rows[i], piece
    return results  # type: ignore[return-value]


def _has_cache(model: Any) -> bool:
    """Whether the model's state grows with the context (GoldFinch, Llama)."""
    template = getattr(model, "state_template", None)
    return template is not None and bool(type(template()).LENGTH_AXIS)


# -- chat ----------------------------------------------------------------------------------------
def format_user_message(message: str) -> str:
    """A user message as one chat turn's text: line ends normalised, surrounding whitespace
    removed, and blank lines collapsed ("\\n\\n" -> "\\n"), because a blank line ends a
    turn in the RWKV World chat format (as the RWKV-7 model card recommends)."""
    if not isinstance(message, str):
        raise GenerationError(f"a chat message must be a str, got {type(message).__name__}")
    text = message.replace("\r\n", "\n").replace("\r", "\n").strip()
    while "\n\n" in text:
        text = text.replace("\n\n", "\n")
    return text


class ChatSession:
    """A multi-turn chat in the RWKV World format, with the state kept between turns::

        [system text + "\\n\\n"]User: {message}\\n\\nAssistant:{reply}\\n\\nUser: ...

    Each turn feeds ``"User: {message}\\n\\nAssistant:"``, generates the reply (by default
    with :meth:`SamplingParams.chat`: stop at "\\n\\n", token 0 banned) and then makes the
    state hold exactly ``"Assistant:" + reply + "\\n\\n"`` as the conversation's text,
    whatever tokens the model drew: when the drawn tokens decode to a prefix of that text
    (the usual case, e.g. the reply ended with the token "\\n\\n") the rest is fed after
    them; when a token ran past the blank line (e.g. "\\n\\nUser") the turn is re-fed from
    the state before it, keeping the drawn tokens up to the last one that fits. So the state
    equals the conversation text, and a reply cut by ``max_new_tokens`` is closed with a
    blank line too.

    ``system``: text prefilled once at the start (followed by a blank line); :meth:`reset`
    goes back to the state right after it. ``cuda_graphs`` as in :func:`stream`.
    """

    def __init__(
        self,
        model: Any,
        params: SamplingParams | None = None,
        *,
        system: str | None = None,
        tokenizer: Any = None,
        state: RecurrentState | None = None,
        chunk_len: int | None = None,
        cuda_graphs: bool = True,
        **overrides: Any,
    ) -> None:
        self.model = model
        self.params = _resolve_params(params or SamplingParams.chat(), overrides)
        self.tokenizer = _tokenizer_of(model, tokenizer)
        if self.tokenizer is None:
            raise GenerationError("chat needs a tokenizer: the model has none; pass tokenizer=...")
        self.chunk_len = chunk_len
        self.cuda_graphs = cuda_graphs
        _check_state_arg(state)
        if system is not None and not isinstance(system, str):
            raise GenerationError(f"system must be a str, got {type(system).__name__}")
        self.initial_state = state
        if system:
            text = system.rstrip("\n") + "\n\n"
            _, self.initial_state = prefill(model, self.tokenizer.encode(text), state, chunk_len=chunk_len,
                                            cuda_graphs=cuda_graphs)
        self.state = self.initial_state
        self.history: list[tuple[str, str]] = []

    def reset(self) -> None:
        """Forget the conversation (keep the system prompt)."""
        self.state = self.initial_state
        self.history = []

    def stream(self, message: str) -> TextStream:
        """Send a user message; iterate for the reply's text pieces. The session's state and
        history advance when the stream is exhausted (a stream abandoned early leaves the
        session as it was)."""
        user = format_user_message(message)
        prompt_ids = list(self.tokenizer.encode(f"User: {user}\n\nAssistant:"))
        before = self.state
        inner = stream(
            self.model, prompt_ids, self.params, state=before, tokenizer=self.tokenizer,
            chunk_len=self.chunk_len, cuda_graphs=self.cuda_graphs,
        )

        def pieces() -> Generator[str, None, GenerationResult]:
            yield from inner
            result = inner.result
            assert result is not None
            self.state = self._close_turn(before, prompt_ids, result)
            self.history.append((user, result.text))
            return result

        return TextStream(pieces())

    def send(self, message: str, callback: Callable[[str], None] | None = None) -> GenerationResult:
        """Send a user message and return the reply (``.text``); ``callback`` gets pieces."""
        s = self.stream(message)
        for piece in s:
            if callback is not None:
                callback(piece)
        assert s.result is not None
        return s.result

    def _close_turn(
        self, before: RecurrentState | None, prompt_ids: list[int], result: GenerationResult
    ) -> RecurrentState:
        """The state after the prompt, the reply text and a blank line (see the class doc)."""
        tok = self.tokenizer
        target = result.text + "\n\n"
        drawn = result.tokens
        decoded = _decode_lenient(tok, drawn)
        if target.startswith(decoded):
            rest = target[len(decoded):]
            if not rest:
                return result.state
            return prefill(self.model, tok.encode(rest), result.state, chunk_len=self.chunk_len,
                           cuda_graphs=self.cuda_graphs)[1]
        k = len(drawn) - 1
        while k > 0 and not target.startswith(_decode_lenient(tok, drawn[:k])):
            k -= 1
        head = _decode_lenient(tok, drawn[:k])
        ids = prompt_ids + drawn[:k] + list(tok.encode(target[len(head):]))
        return prefill(self.model, ids, before, chunk_len=self.chunk_len, cuda_graphs=self.cuda_graphs)[1]
