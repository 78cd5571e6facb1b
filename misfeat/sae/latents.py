"""The one seam between misfeat and a ``sae_lens.SAE``: where it reads, where it was loaded
from, and its latents computed from activations of any dtype and device.

Every part of misfeat that uses an SAE (features/, interventions, steering) goes through
these helpers instead of reaching into ``sae.cfg`` or casting by hand. The hook and the
directory are SAE metadata (``sae.cfg.metadata.hook_name`` and ``sae.cfg.metadata.misfeat_path``,
both carried by sae-lens's own metadata object), so nothing is patched onto the SAE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE

PATH_KEY = "misfeat_path"
"""the metadata key of the directory an SAE was loaded from or saved to"""


def hook_of(sae: SAE) -> str:
    """The hook an SAE reads, from its metadata (raises if it was saved without one)."""
    hook = sae.cfg.metadata.get("hook_name")
    if not hook:
        raise MisfeatError("the SAE's metadata has no hook_name; set sae.cfg.metadata.hook_name to the hook "
                           "its activations come from (e.g. blocks.1.hook_resid_post)")
    return hook


def path_of(sae: SAE) -> str | None:
    """The directory the SAE was loaded from or saved to (None for an SAE built in memory)."""
    return sae.cfg.metadata.get(PATH_KEY)


def set_path(sae: SAE, path: str | None) -> SAE:
    """Record ``path`` as the SAE's directory in its metadata (None: forget it); returns the SAE."""
    if path is None:
        vars(sae.cfg.metadata).pop(PATH_KEY, None)
    else:
        sae.cfg.metadata[PATH_KEY] = str(path)
    return sae


def encode(sae: SAE, acts: torch.Tensor) -> torch.Tensor:
    """The SAE's latents of ``acts`` ``[..., d_in]`` -> ``[..., d_sae]``, computed in the SAE's
    dtype on the SAE's device (the input is cast and moved; the output stays there)."""
    return sae.encode(acts.to(sae.W_dec.device, sae.W_dec.dtype))


def decode(sae: SAE, latents: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction of ``latents`` ``[..., d_sae]`` -> ``[..., d_in]``, in its dtype."""
    return sae.decode(latents.to(sae.W_dec.device, sae.W_dec.dtype))


def latent_delta(sae: SAE, acts: torch.Tensor, latent: int, value: float) -> torch.Tensor:
    """``decode(z') - decode(z)`` where ``z'`` is ``z = encode(acts)`` with ``latent`` set to
    ``value``: what clamping the latent adds to ``acts`` (SAE error term kept), in ``acts``'s dtype."""
    import torch

    with torch.no_grad():
        z = encode(sae, acts)
        z_new = z.clone()
        z_new[..., latent] = value
        return (decode(sae, z_new) - decode(sae, z)).to(acts.device, acts.dtype)
