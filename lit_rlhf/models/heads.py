"""Scalar heads on a transformer backbone: the reward score and per-token values.

Both read a ``*ForSequenceClassification`` model (one label) through its backbone and its
``score`` head, with position ids from the attention mask, so left/right padding and
batch composition do not change a sequence's score. The reward is read at the last *real*
token, found from the attention mask (never by searching for the pad id).

The head is the model's own linear layer, or an :class:`MLPScoreHead` put in its place
(:func:`install_score_head`; the rm stage's ``rm.head: mlp``). A linear head can only add
up features of the last hidden state; a reward that depends on a *product* of two of them
(the embedded world's "is the requested sentiment expressed": the cue's sign times the
review's sentiment) needs the backbone to build the product itself, which the MLP head can
form from the two features (docs/results.md, "the RM plateau", measures what it helps).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from lit_rlhf.ops.masking import last_true_index, position_ids_from_mask

#: Config attribute holding a reward bias that could not be folded into the weights.
BIAS_ATTR = "lit_rlhf_reward_bias"
#: Config attribute recording a bias that was folded into the weights (for information).
FOLDED_BIAS_ATTR = "lit_rlhf_reward_bias_folded"
#: Config attribute describing a replaced score head, e.g. ``{"kind": "mlp", "hidden": 256}``;
#: :func:`~lit_rlhf.models.loading.load_sequence_classifier` rebuilds the head from it.
HEAD_ATTR = "lit_rlhf_score_head"
#: Score-head kinds :func:`install_score_head` knows.
HEAD_KINDS = ("linear", "mlp")

_HEAD_NAMES = ("score", "classifier")

_FINAL_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "ln_final")


class MLPScoreHead(nn.Module):
    """``Linear(d, hidden) -> ReLU -> Linear(hidden, 1)``: a scalar head that can multiply features.

    Applied to (..., d) hidden states it returns (..., 1), like the linear head it replaces.
    The output layer has a bias (zero at init) so a reward shift folds into it exactly.
    """

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.bias)

    @property
    def in_features(self) -> int:
        """Width of the hidden states the head reads."""
        return self.proj.in_features

    @property
    def out_features(self) -> int:
        """Always 1 (one scalar per position)."""
        return self.out.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.proj(x)))


def _head_name(model: nn.Module) -> str | None:
    for name in _HEAD_NAMES:
        if isinstance(getattr(model, name, None), (nn.Linear, MLPScoreHead)):
            return name
    return None


def has_score_head(model: nn.Module) -> bool:
    """True when ``model`` has a scalar head this module reads (a sequence classifier)."""
    return _head_name(model) is not None


def score_head(model: nn.Module) -> nn.Linear | MLPScoreHead:
    """Return the scalar head (``score`` or ``classifier``) of a sequence classifier."""
    name = _head_name(model)
    if name is None:
        raise ValueError(
            f"{type(model).__name__} has no linear or MLP 'score'/'classifier' head; reward and "
            "value models must be *ForSequenceClassification models with num_labels=1"
        )
    return getattr(model, name)


def check_head_spec(kind: str, hidden: object = 256) -> None:
    """Raise ``ValueError`` unless ``kind`` is a known head and an MLP's ``hidden`` is >= 1."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown score head {kind!r}; use one of {list(HEAD_KINDS)}")
    if kind == "mlp" and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f"the MLP score head needs an integer width >= 1, got {hidden!r}")


def install_score_head(model: PreTrainedModel, kind: str, hidden: int = 256) -> nn.Module:
    """Give a fresh sequence classifier the score head ``kind``, recorded in its config.

    Args:
        model: A one-label sequence classifier (its head is replaced, not trained further).
        kind: ``"linear"`` keeps the model's own head (plain ``transformers`` loads the
            export); ``"mlp"`` puts an :class:`MLPScoreHead` in its place.
        hidden: Width of the MLP head's hidden layer.

    Returns:
        The head now in use (an MLP head of the same width is kept as it is).

    Raises:
        ValueError: On a bad ``kind``/``hidden`` (:func:`check_head_spec`), or an MLP head
            already in place with another width (or where ``kind`` is ``"linear"``).
    """
    check_head_spec(kind, hidden)
    head = score_head(model)
    if isinstance(head, MLPScoreHead):  # e.g. a reward model trained further
        if kind == "mlp" and head.proj.out_features == hidden:
            return head
        raise ValueError(
            f"the model already has an MLP score head of width {head.proj.out_features}; "
            f"it cannot become a {kind!r} head of width {hidden}"
        )
    if kind == "linear":
        return head
    ref = next(head.parameters())
    new = MLPScoreHead(head.in_features, hidden).to(device=ref.device, dtype=ref.dtype)
    setattr(model, _head_name(model), new)
    setattr(model.config, HEAD_ATTR, {"kind": "mlp", "hidden": hidden})
    return new


def backbone_hidden(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states of the backbone, shape (B, T, H).

    Positions come from the mask unless given; packed rows pass ``attention_mask=None`` and
    their restarting ``position_ids``.
    """
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


def apply_score_head(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The scalar head on hidden states (..., H) -> (...) float32, plus any unfolded bias.

    Computed in float32 even under bf16 autocast: the ranking loss and PPO's advantages live
    on small differences between scores, which a bf16 result (8 mantissa bits: steps of
    ~0.008 near 1) would round away.
    """
    head = score_head(model)
    dtype = next(head.parameters()).dtype
    # Called as a module (not F.linear on .weight): FSDP2 unshards the head in its hooks.
    with torch.autocast(hidden.device.type, enabled=False):
        out = head(hidden.to(dtype)).squeeze(-1).float()
    return out + float(getattr(model.config, BIAS_ATTR, 0.0) or 0.0)


class Float32Linear(nn.Linear):
    """An ``nn.Linear`` whose output is float32 under autocast (same parameters and keys).

    With float32 weights (``bf16-mixed``) the product is computed in float32; with bf16
    weights (``bf16-true``) there is no float32 copy to use and it computes as before.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) and self.weight.dtype == torch.float32:
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def fp32_output_head(model: PreTrainedModel) -> PreTrainedModel:
    """Make the LM head (``get_output_embeddings()``) compute float32 logits under autocast.

    Log-probs are differences of logits of magnitude ~10, where bf16 steps are ~0.06 nats:
    PPO ratios and the KL penalty would be mostly rounding noise. The head becomes a
    :class:`Float32Linear` in place (same parameters, state-dict keys and exports; picklable
    for spawned processes); without autocast it computes what it computed before.

    Returns:
        ``model`` itself.
    """
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        head.__class__ = Float32Linear
    return model


def sequence_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Reward of each sequence read at its last real token.

    Args:
        model: One-label sequence classifier.
        input_ids: (B, T) token ids, left or right padded.
        attention_mask: (B, T) 1 for real tokens.

    Returns:
        (B,) float32 scores, including any unfolded reward bias stored in the config.
    """
    hidden = backbone_hidden(model, input_ids, attention_mask)
    last = last_true_index(attention_mask.bool()).clamp(min=0)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return apply_score_head(model, pooled)


def packed_sequence_scores(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    ends: torch.Tensor,
) -> torch.Tensor:
    """Rewards of sequences packed into rows, read at each one's last token.

    Args:
        model: One-label sequence classifier whose attention follows restarting positions
            (:func:`~lit_rlhf.models.packing.require_packed_attention`).
        input_ids: (R, W) packed rows.
        position_ids: (R, W) positions restarting at 0 at each sequence's start.
        ends: (N,) flat index ``row * W + column`` of each sequence's last token.

    Returns:
        (N,) float32 scores, equal to :func:`sequence_scores` on the padded sequences.
    """
    hidden = backbone_hidden(model, input_ids, None, position_ids)
    return apply_score_head(model, hidden.flatten(0, 1)[ends])


def token_values(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Value estimate at every position, shape (B, T) float32 (the head applied per token)."""
    hidden = backbone_hidden(model, input_ids, attention_mask)
    return apply_score_head(model, hidden)


def _final_norm_with_bias(model: PreTrainedModel) -> nn.Module | None:
    base = model.base_model
    for name in _FINAL_NORM_NAMES:
        norm = getattr(base, name, None)
        if norm is not None and isinstance(getattr(norm, "bias", None), nn.Parameter):
            return norm
    return None


@torch.no_grad()
def fold_reward_bias(model: PreTrainedModel, bias: float) -> str:
    """Add a constant ``bias`` to every score the model produces, inside its weights.

    InstructGPT shifts the RM so labeler demonstrations score mean 0. A plain
    ``AutoModelForSequenceClassification`` must reproduce the shifted score, so the bias is
    put where the architecture has room for it:

    1. the head's own (output) bias, when it has one (always, for an :class:`MLPScoreHead`);
    2. else the final norm's bias ``beta``: the head sees ``h = g*x + beta`` and computes
       ``w.h``, so ``beta += bias * w / |w|^2`` adds exactly ``bias`` (GPT-2's ``ln_f``);
    3. else (e.g. Llama's bias-free RMSNorm) it is stored as ``config.lit_rlhf_reward_bias``,
       which this kit's scoring functions add; plain transformers users must add it by hand.

    Returns:
        Where the bias went: ``"head"``, ``"final_norm"`` or ``"config"``.
    """
    head = score_head(model)
    output = head.out if isinstance(head, MLPScoreHead) else head
    prior = float(getattr(model.config, FOLDED_BIAS_ATTR, 0.0) or 0.0)
    if output.bias is not None:
        output.bias.add_(bias)
        where = "head"
    elif (norm := _final_norm_with_bias(model)) is not None:
        w = head.weight[0].to(torch.float64)
        delta = bias * w / w.dot(w)
        norm.bias.add_(delta.to(norm.bias.dtype))
        where = "final_norm"
    else:
        current = float(getattr(model.config, BIAS_ATTR, 0.0) or 0.0)
        setattr(model.config, BIAS_ATTR, current + bias)
        return "config"
    setattr(model.config, FOLDED_BIAS_ATTR, prior + bias)
    return where
