"""Token-level preparation of language-modelling examples: masking, truncation, packing.

An example is ``{"input_ids": list[int], "loss_mask": list[int]}`` where ``loss_mask[t]``
is 1 when token ``t`` is a *target* of the loss (response tokens for SFT, every token for
pretraining text). The mask is built from token spans (prompt ids, then completion ids), never
by searching strings, so the first response token is always a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class TruncationStats:
    """What the truncation policy cut, so that nothing is dropped silently."""

    examples: int = 0
    """Examples tokenized."""
    prompts_cut: int = 0
    """Examples whose prompt lost tokens on the left."""
    prompt_tokens_cut: int = 0
    """Prompt tokens removed in total."""
    responses_cut: int = 0
    """Examples whose response alone exceeded ``max_length`` and lost its end (EOS included)."""
    response_tokens_cut: int = 0
    """Response tokens removed in total."""
    chunks: int = 0
    """Pretraining texts longer than ``max_length`` are split into this many extra chunks."""
    chars_cut: int = 0
    """Prompts/responses cut by characters before tokenization (see :func:`tokenize_capped`)."""
    texts_split: int = 0
    """Pretraining texts tokenized in pieces of :data:`TEXT_PIECE_CHARS` characters."""

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat ``{"data/prompts_cut": n, ...}`` for metrics.json."""
        return {f"{prefix}{k}": float(v) for k, v in vars(self).items()}


#: An over-long prompt or response is cut to ``max_tokens * CHARS_PER_TOKEN`` characters before
#: tokenization: a 48 MB record would otherwise cost gigabytes and minutes to tokenize only to
#: be cut to ``max_length`` tokens. Real tokens are far shorter, so the tokens kept are the
#: ones token-level truncation keeps; a cut text that then tokenizes short is redone whole.
CHARS_PER_TOKEN = 64
#: Pretraining texts are chunked, never cut; longer ones are tokenized in pieces of this size.
TEXT_PIECE_CHARS = 1 << 20


def tokenize_capped(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int, keep: str = "start"
) -> tuple[list[list[int]], int]:
    """Token ids of ``texts`` (no special tokens), over-long texts cut by characters first.

    Args:
        tokenizer: Any HF tokenizer.
        texts: ``n`` strings.
        max_tokens: The most tokens the caller keeps of each text.
        keep: ``"start"`` (responses: the end is cut) or ``"end"`` (prompts: the start is).

    Returns:
        ``(ids, n_cut)``: ``n`` id lists, each beginning (``keep="start"``) or ending with at
        least the ``max_tokens`` ids the whole text would give, and how many texts were cut.
    """
    if keep not in ("start", "end"):
        raise ValueError(f"keep must be 'start' or 'end', got {keep!r}")
    limit = max(1, max_tokens) * CHARS_PER_TOKEN
    cut = [i for i, t in enumerate(texts) if len(t) > limit]
    short = list(texts)
    for i in cut:
        short[i] = texts[i][:limit] if keep == "start" else texts[i][-limit:]
    ids = tokenizer(short, add_special_tokens=False)["input_ids"] if short else []
    for i in cut:
        # Tokens next to the cut may differ from the whole text's; demand a wide margin.
        if len(ids[i]) <= max_tokens + 16:
            ids[i] = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
    return [list(x) for x in ids], len(cut)


def _text_pieces(text: str, size: int) -> list[str]:
    # Split before a space where one is near, so that no word is broken in two.
    pieces, start = [], 0
    while len(text) - start > size:
        end = text.rfind(" ", start + size // 2, start + size)
        end = end if end > start else start + size
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def encode_demonstrations(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    max_length: int,
    append_eos: bool = True,
) -> tuple[list[dict], TruncationStats]:
    """Tokenize prompt/completion pairs with the loss on completion tokens only.

    Truncation policy: the response is kept whole and the prompt is cut from the *left*
    (its start is least informative for the reply); only when the response alone is longer
    than ``max_length`` is the response cut on the right (losing EOS). Both are counted.

    Args:
        tokenizer: Any HF tokenizer; special tokens are not added (no BOS), EOS is appended.
        prompts: Prompt strings.
        completions: Completion strings (same length as ``prompts``).
        max_length: Longest allowed sequence, in tokens.
        append_eos: Append ``tokenizer.eos_token_id`` to each completion.

    Returns:
        ``(examples, stats)``.
    """
    stats = TruncationStats()
    p_ids, p_cut = tokenize_capped(tokenizer, prompts, max_length, keep="end")
    c_ids, c_cut = tokenize_capped(tokenizer, completions, max_length, keep="start")
    stats.chars_cut = p_cut + c_cut
    eos = [tokenizer.eos_token_id] if append_eos else []
    out = []
    for p, c in zip(p_ids, c_ids):
        c = list(c) + eos
        stats.examples += 1
        if len(c) > max_length:
            stats.responses_cut += 1
            stats.response_tokens_cut += len(c) - max_length
            c = c[:max_length]
        room = max_length - len(c)
        if len(p) > room:
            stats.prompts_cut += 1
            stats.prompt_tokens_cut += len(p) - room
            p = p[len(p) - room :] if room > 0 else []
        out.append({"input_ids": list(p) + c, "loss_mask": [0] * len(p) + [1] * len(c)})
    return out, stats


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, append_eos: bool = True
) -> tuple[list[dict], TruncationStats]:
    """Tokenize pretraining texts with the loss on every token.

    A text longer than ``max_length`` is split into consecutive chunks (never dropped). A text
    longer than :data:`TEXT_PIECE_CHARS` characters is tokenized piece by piece (split before a
    space), which bounds the tokenizer's memory; its ids are joined before chunking.
    """
    stats = TruncationStats()
    eos = [tokenizer.eos_token_id] if append_eos else []
    out = []
    normal = [t for t in texts if len(t) <= TEXT_PIECE_CHARS]
    normal_ids = iter(tokenizer(normal, add_special_tokens=False)["input_ids"] if normal else [])
    for text in texts:
        if len(text) <= TEXT_PIECE_CHARS:
            ids = list(next(normal_ids)) + eos
        else:
            stats.texts_split += 1
            ids = []
            for piece in _text_pieces(text, TEXT_PIECE_CHARS):
                ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            ids += eos
        stats.examples += 1
        for start in range(0, len(ids), max_length):
            piece = ids[start : start + max_length]
            out.append({"input_ids": piece, "loss_mask": [1] * len(piece)})
        stats.chunks += max(0, (len(ids) - 1) // max_length)
    return out, stats


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Greedily concatenate examples into rows of at most ``max_length`` tokens.

    Each row keeps per-example ``position_ids`` that restart at 0; models that support it
    (transformers' packed-sequence detection, used when ``attention_mask`` is None) then
    attend only within an example.
    """
    rows: list[dict] = []
    cur: list[dict] = []
    used = 0
    for ex in examples:
        n = len(ex["input_ids"])
        if cur and used + n > max_length:
            rows.append(concat_examples(cur))
            cur, used = [], 0
        cur.append(ex)
        used += n
    if cur:
        rows.append(concat_examples(cur))
    return rows


def concat_examples(examples: list[dict]) -> dict:
    """One packed row from examples: their per-token lists end to end, positions restarting.

    Naive equivalent: ``{k: sum((ex[k] for ex in examples), []) for k in per-token keys}``
    with ``position_ids = [0..n1-1, 0..n2-1, ...]`` (existing position ids are kept), except
    that each example's first token is not a loss target: in a row of its own nothing
    predicts it, and packed after another example it would be predicted from that one.
    """
    row: dict = {"input_ids": [], "position_ids": []}
    keys = [k for k in examples[0] if k not in ("input_ids", "position_ids")]
    for key in keys:
        row[key] = []
    for ex in examples:
        row["input_ids"] += ex["input_ids"]
        row["position_ids"] += ex.get("position_ids") or list(range(len(ex["input_ids"])))
        for key in keys:
            row[key] += [0] + ex[key][1:] if key == "loss_mask" and ex[key] else ex[key]
    return row


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group sequence indices into bins whose total length fits ``capacity``.

    Longest first, each into the first bin with room, a new bin when none has: at most
    11/9 of the optimal number of bins plus one, in O(N * bins) time.

    Args:
        lengths: (N) sequence lengths, each at most ``capacity``.
        capacity: Tokens per bin (row).

    Returns:
        Bins of indices into ``lengths``; every index appears exactly once.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the capacity {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


#: Rows twice as wide as the longest example are used only when they save at least this share
#: of the computed token slots (wider rows cost attention quadratic in their width).
WIDE_ROWS_MIN_SAVING = 0.1


def pack_batch(
    examples: list[dict], capacity: int | None = None
) -> tuple[list[dict], list[list[int]]]:
    """Pack one batch's examples into few rows (padding-free batches).

    The batch keeps its examples (what a step trains on does not change), only the layout:
    the forward computes no padding except the tails of some rows. With the default
    capacity, rows are as wide as the longest example, so the packed batch never computes
    more than the padded one (fewer rows, the same width); rows twice as wide are taken
    instead when they save at least :data:`WIDE_ROWS_MIN_SAVING` of the computed slots,
    which happens when most examples are longer than half the longest (rows exactly as
    wide as the longest then hold one example each).

    Args:
        examples: Per-token dicts (``input_ids`` and any other per-token lists).
        capacity: Tokens per row; None: chosen per batch as above.

    Returns:
        ``(rows, bins)``: rows as in :func:`concat_examples`; ``bins[r]`` lists the indices
        of the examples in row ``r``, in their order within the row.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    bins = first_fit_decreasing(lengths, capacity) if capacity else choose_bins(lengths)
    return [concat_examples([examples[i] for i in b]) for b in bins], bins


def choose_bins(lengths: list[int]) -> list[list[int]]:
    """Bins (lists of indices into ``lengths``) for the rows of a padding-free batch.

    Rows as wide as the longest sequence, or twice as wide when that saves at least
    :data:`WIDE_ROWS_MIN_SAVING` of the computed slots (see :func:`pack_batch`).
    """
    bins = first_fit_decreasing(lengths, max(lengths))
    wide = first_fit_decreasing(lengths, 2 * max(lengths))
    if packed_slots(wide, lengths) <= (1 - WIDE_ROWS_MIN_SAVING) * packed_slots(bins, lengths):
        return wide
    return bins


def packed_slots(bins: list[list[int]], lengths: list[int]) -> int:
    """Rows x width of a packed batch: the token slots its forward computes."""
    return len(bins) * max(sum(lengths[i] for i in b) for b in bins)


def left_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a left-padded batch, the layout generation and rollouts use.

    Args:
        ids: B token lists (longest Q).
        pad_id: Fills the left of shorter rows.

    Returns:
        ``(input_ids, attention_mask)``, both (B, Q) long, the mask 1 on real tokens.
    """
    q = max(len(p) for p in ids)
    out = torch.full((len(ids), q), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), q), dtype=torch.long)
    for r, p in enumerate(ids):
        out[r, q - len(p) :] = torch.tensor(p)
        mask[r, q - len(p) :] = 1
    return out, mask


@dataclass
class LMCollator:
    """Pad a list of examples (packed or not) to the longest one, on the right.

    Output tensors are (B, T): ``input_ids``, ``loss_mask``, ``position_ids`` and, for
    unpacked batches, ``attention_mask``. Packed batches carry ``attention_mask=None`` so the
    model derives a block-diagonal causal mask from the restarting position ids.

    Args:
        pad_token_id: Id of padding positions in unpacked batches.
        packed: The examples are already packed rows (``position_ids`` restart inside).
        padding_free: Pack each batch's own examples into rows (:func:`pack_batch`): the
            same examples per step, without the compute spent on padding.
        pad_to_multiple_of: Round the padded length up to a multiple of this.
    """

    pad_token_id: int
    packed: bool = False
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor | None]:
        packed = self.packed or self.padding_free
        if self.padding_free:
            examples, _ = pack_batch(examples)
        longest = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        b = len(examples)
        ids = torch.full((b, longest), self.pad_token_id, dtype=torch.long)
        loss_mask = torch.zeros((b, longest), dtype=torch.bool)
        attn = torch.zeros((b, longest), dtype=torch.long)
        pos = torch.zeros((b, longest), dtype=torch.long)
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            ids[i, :n] = torch.tensor(ex["input_ids"])
            loss_mask[i, :n] = torch.tensor(ex["loss_mask"], dtype=torch.bool)
            attn[i, :n] = 1
            if "position_ids" in ex:
                pos[i, :n] = torch.tensor(ex["position_ids"])
            else:
                pos[i, :n] = torch.arange(n)
            if packed:
                # The tail is never read: position 0 makes every tail token a sequence of
                # its own for packed-sequence detection (never merged with the last real
                # example, never past the position table however wide the row), and its
                # ids are not the pad id, which transformers warns about without a mask.
                ids[i, n:] = ids[i, 0]
            else:
                pos[i, n:] = torch.arange(longest - n)
        return {
            "input_ids": ids,
            "attention_mask": None if packed else attn,
            "loss_mask": loss_mask,
            "position_ids": pos,
        }
