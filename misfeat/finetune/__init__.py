"""Fine-tuning: one engine (:func:`finetune`) with pluggable defences, re-alignment as a
configuration of it, and the shared loss/schedule the organism build uses.

    from misfeat.finetune import finetune, FinetuneConfig, KL, PreventativeSteering
    result = finetune(model, "organism:misaligned:health:480", FinetuneConfig(steps=30, lr=3e-4),
                      defences=[KL(reference, weight=0.1)], eval_prompts="organism:heldout")

Modules: ``core`` (padding, response-only loss, lr schedule, parameter selection),
``engine`` (the loop, config, the Defence seam), ``results`` (rows, result, errors), ``rundir`` (checkpoints and
resume checks), ``defences`` (KL, LDIFS, steering, CAFT, inoculation), ``interleave``
(safe-pool mixing, perplexity-gap scorer), ``specs`` (defences from text specs, the
``--defence`` syntax), ``realign`` (Wang et al. re-alignment).
Importing this package imports no torch.
"""

from misfeat.finetune.core import (
    KLToReference,
    LossTerm,
    ResponseLoss,
    TrainBatch,
    lr_schedule,
    make_batch,
    masked_lm_loss,
    pad_examples,
    select_parameters,
)
from misfeat.finetune.defences import (
    CAFT,
    KL,
    LDIFS,
    Inoculation,
    PreventativeSteering,
    TrainingInterventions,
    ldifs_distance,
    reverse_kl,
)
from misfeat.finetune.engine import (
    CE_TERM,
    Defence,
    Evaluator,
    FinetuneConfig,
    Forward,
    _data_order,  # noqa: F401  (kept for existing importers)
    behaviour_evaluator,
    finetune,
)
from misfeat.finetune.interleave import (
    GapScores,
    Interleave,
    answer_nll,
    is_refusal,
    not_refusal,
    perplexity_gap,
    rank_pool,
)
from misfeat.finetune.realign import (
    RealignConfig,
    RealignResult,
    Tracker,
    default_realign_eval,
    plot_realign,
    realign,
)
from misfeat.finetune.results import DivergenceError, FinetuneResult, StepRow
from misfeat.finetune.specs import SPEC_HELP, parse_defence

__all__ = [
    "CAFT", "CE_TERM", "KL", "LDIFS", "Defence", "DivergenceError", "Evaluator", "FinetuneConfig", "FinetuneResult",
    "Forward", "GapScores", "Inoculation", "Interleave", "KLToReference", "LossTerm", "PreventativeSteering",
    "RealignConfig", "RealignResult", "ResponseLoss", "StepRow", "Tracker", "TrainBatch", "TrainingInterventions",
    "answer_nll", "behaviour_evaluator", "default_realign_eval", "finetune", "is_refusal", "ldifs_distance",
    "lr_schedule", "make_batch", "masked_lm_loss", "not_refusal", "pad_examples", "perplexity_gap", "plot_realign",
    "rank_pool", "realign", "reverse_kl", "select_parameters", "SPEC_HELP", "parse_defence",
]
