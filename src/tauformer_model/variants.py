"""The research variants, defined once: each a dict of config overrides (TauGPTConfig or TrainConfig field ->
value) on top of a base. compare (language-model comparisons) applies them over a training preset as train's
flags; tasks (synthetic recall) over its own small model. bench/README.md says which home is for what."""

from __future__ import annotations

# The tiny preset gives taumode 8 heads of 16 and dot product 4 of 32 (its "model_taumode"); "-4x32" / "-8x16"
# pin the other shape, for the same-shape comparisons.
FOUR = dict(n_head=4, n_kv_head=4)
EIGHT = dict(n_head=8, n_kv_head=8)
TAUMODE_RECENCY = dict(attention="taumode", recency="learned")
VARIANTS: dict[str, dict] = {
    "dot": dict(attention="dot", recency="none"),
    "dot-8x16": dict(attention="dot", recency="none", **EIGHT),
    "dot+recency": dict(attention="dot", recency="learned"),
    # taumode as the reference crate defines it (no recency term), at the dot baseline's shape
    "taumode": dict(attention="taumode", recency="none", **FOUR),
    # the control: λ term removed, the recency term alone (what the λ term adds is the difference)
    "recency-only": dict(TAUMODE_RECENCY, lambda_term=False, **FOUR),
    "taumode+recency-4x32": dict(TAUMODE_RECENCY, **FOUR),
    "taumode+recency": dict(TAUMODE_RECENCY),
    "taumode+fixed-recency": dict(attention="taumode", recency="fixed"),
    "taumode+recency+lambda-before-rope": dict(TAUMODE_RECENCY, lambda_before_rope=True),
    "taumode+recency+learn-tau": dict(TAUMODE_RECENCY, learn_tau=True),
    "taumode+recency+learn-laplacian": dict(TAUMODE_RECENCY, learn_laplacian=True),
    # adaptive tau (the reference crate's announced next step): tau recalibrated to the keys' median E every 20
    # steps of training instead of once at the start (a training option: train's --recalibrate-tau-every); 20 is
    # often enough to follow the keys through the tiny-512 preset's 120 steps (5 recalibrations)
    "taumode+recency+adaptive-tau": dict(TAUMODE_RECENCY, recalibrate_tau_every=20),
    # ideas that could close the gap to dot: a sigmoid gate per head on the attention output; a hybrid
    # stack whose last layer (of the tiny preset's 4) is dot product, with learned recency like the others
    "taumode+recency+gate": dict(TAUMODE_RECENCY, output_gate=True),
    "hybrid-dot-every-4": dict(TAUMODE_RECENCY, dot_every=4),
    # two λ per head (two slices of 8 of the preset's heads of 16), logits summed over the slices
    "taumode+recency+2-lambdas": dict(TAUMODE_RECENCY, lambda_slices=2),
}


def as_flags(overrides: dict) -> list[str]:
    """The train flags that set `overrides`: --name value, or --name / --no-name for a boolean."""
    flags = []
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags
