"""misfeat: mechanistic interpretability of misalignment features.

The flow, one module per stage::

    models / data -> activations -> sae -> features -> interventions
                                                    -> finetune -> evaluate

Importing misfeat is cheap: torch, transformer_lens and sae_lens are imported inside the
functions that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
