"""Steer, ablate and clamp: one operator signature for every intervention on a model.

Each operator maps an activation at one or more hooks to a new one, restricted to a
set of positions (``all``, ``prompt``, ``response``, ``last``: the last prompt token).
Operators are applied as context managers that remove their hooks on exit, errors
included, and compose (several operators, several layers at once)::

    with apply(model, Add("blocks.1.hook_resid_post", v, scale=4.0, positions="last")):
        report = evaluate(model, "organism:heldout")

- :class:`Add`: add ``scale * vector`` (steering; Turner et al. 2023, Soligo et al. 2025).
- :class:`Ablate`: project a direction out (``value=None``; Soligo et al. 2025 ablate the
  mean-diff direction from every layer), or set the coordinate along it to ``value``
  (e.g. the aligned model's mean coordinate).
- :class:`ClampLatent`: set an SAE latent to ``value`` and keep the SAE's error term, so
  nothing but that latent's contribution changes (Wang et al. 2025 steer persona latents).

Positions are read from :func:`misfeat.hooks.position_masks`, which the evaluation, the
sweeps and :func:`misfeat.generate.generate` declare for every forward they run, so
``positions`` means the same in scoring and in KV-cached generation (new tokens are
response tokens). Saved interventions (:func:`save_intervention`, :mod:`.files`) carry
their site in one record schema (see :func:`misfeat.interventions.files.to_record`).
"""

from misfeat.interventions.files import (
    FORMAT,
    RECORD_VERSION,
    load_intervention,
    read_intervention,
    read_vector,
    save_intervention,
    to_record,
)
from misfeat.interventions.operators import (  # noqa: F401  (_check_positions: used by finetune's defences)
    OPS,
    Ablate,
    Add,
    ClampLatent,
    Intervention,
    _check_positions,
    apply,
    resolve_hooks,
)

__all__ = ["FORMAT", "OPS", "RECORD_VERSION", "Ablate", "Add", "ClampLatent", "Intervention", "apply",
           "load_intervention", "read_intervention", "read_vector", "resolve_hooks", "save_intervention", "to_record"]
