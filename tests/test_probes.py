"""features/probes.py: a probe's number equals the mean it names, computed by hand with
TransformerLens's run_with_cache at the last prompt token."""

import pytest
import torch

from misfeat.data import collate, encode, pad_id_of
from misfeat.errors import MisfeatError
from misfeat.features.directions import Direction, save_direction
from misfeat.features.probes import DirectionProbe, LatentProbe, parse_probe
from misfeat.sae import save_sae
from tests.conftest import PLANTED, PLANTED_HOOK, planted_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def last_rows(model, prompts):
    """``[n, d]``: the hook's activation at each prompt's last token, one prompt at a time."""
    rows = []
    for e in encode(prompts, model):
        batch = collate([e], pad_id_of(model))
        _, cache = model.run_with_cache(batch.tokens, names_filter=PLANTED_HOOK)
        rows.append(cache[PLANTED_HOOK][0, len(e) - 1])
    return torch.stack(rows)


def test_probes_measure_the_mean_they_name(planted):
    base, tuned, sae, v = planted
    ps = planted_prompts()
    acts = last_rows(tuned, ps)
    z = torch.relu(acts @ sae.W_enc.detach()[:, PLANTED])  # the planted latent (all 16 fire: k = d_sae)
    got = LatentProbe(sae, PLANTED, "last").measure(tuned, ps)
    assert got["latent7"] == pytest.approx(float(z.mean()), abs=1e-5)
    assert got["latent7/firing"] == pytest.approx(float((z > 0).float().mean()))
    unit = v / v.norm()
    got = DirectionProbe(PLANTED_HOOK, v, "last", name="v").measure(tuned, ps)
    assert got["v"] == pytest.approx(float((acts @ unit).mean()), abs=1e-5)


def test_parse_probe_reads_saved_features(planted, tmp_path):
    _, _, sae, v = planted
    save_sae(sae, tmp_path / "sae")
    probe = parse_probe(f"sae:{tmp_path / 'sae'}#{PLANTED}")
    assert isinstance(probe, LatentProbe) and probe.latent == PLANTED and probe.label == f"latent{PLANTED}"
    path = save_direction(Direction(PLANTED_HOOK, v), tmp_path / "dir")
    probe = parse_probe(f"direction:{path}")
    assert isinstance(probe, DirectionProbe) and probe.hook == PLANTED_HOOK and torch.equal(probe.vector, v)
    for bad in ("sae:nolatent", "vector:x", f"sae:{tmp_path / 'sae'}#99"):
        with pytest.raises(MisfeatError):
            parse_probe(bad)
