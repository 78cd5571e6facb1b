"""The mechanics of weight restoration: candidates, the sign-consistent sparse restorer,
rollback, restoration masks and the resumable run (see :mod:`misfeat.recover`, the API).

A restored weight equals the aligned model's value and a put-back weight the fine-tuned
model's, so a run's whole state is one boolean mask per parameter tensor (plus, when
gradients accumulate across steps as in the authors' code, the gradient sums).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet
    from misfeat.recover import RestoreConfig

logger = logging.getLogger(__name__)

MASK_FILE = "mask.safetensors"
STATE_FILE = "restore_state.safetensors"
STATE_JSON = "restore_state.json"


def make_batches(prompts: PromptSet, model: HookedTransformer, batch_size: int) -> list[Any]:
    from misfeat.data import collate, encode, pad_id_of

    encoded = encode(prompts, model, with_response=False)
    pad = pad_id_of(model)
    return [collate(encoded[i:i + batch_size], pad, "right", device=model.cfg.device)
            for i in range(0, len(encoded), batch_size)]


def top_k(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Masks of the ``k`` largest non-negative scores over all tensors together (-1: not eligible)."""
    import torch

    flat = torch.cat([s.flatten() for s in scores.values()])
    k = min(k, int((flat >= 0).sum()))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        chosen[torch.topk(flat, k, sorted=False).indices] = True
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = chosen[offset:offset + s.numel()].view_as(s)
        offset += s.numel()
    return out


def _batch_state(model: HookedTransformer, batch: Any, layer: int) -> torch.Tensor:
    """``[d_model]``: the batch mean of ``blocks.{layer}.hook_resid_post`` at the last prompt token."""
    resid_BTD = model(batch.tokens, stop_at_layer=layer + 1)
    return resid_BTD[batch.last_mask].float().mean(0)


def direction_loss(model: HookedTransformer, batches: Sequence[Any], layer: int, direction: torch.Tensor,
                   backward: bool = False) -> float:
    """Mean over batches of ``-cos(batch-mean state, direction)``; with ``backward`` its gradient
    is added to the ``.grad`` of every parameter that requires one (the authors' per-batch backward)."""
    import torch
    import torch.nn.functional as F

    total = 0.0
    with torch.set_grad_enabled(backward):
        for batch in batches:
            loss = -F.cosine_similarity(_batch_state(model, batch, layer), direction, dim=0) / len(batches)
            if backward:
                loss.backward()
            total += loss.item()
    return total


# --- masks ---------------------------------------------------------------------------


def candidate_names(model: HookedTransformer, layer: int, mode: str = "below", norms: bool = False) -> list[str]:
    """Parameter names restoration may touch: block weights (blocks ``0..layer`` for ``below``),
    never embeddings or unembedding, norms only when asked."""
    top = layer if mode == "below" else model.cfg.n_layers - 1
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] != "blocks" or int(parts[1]) > top:
            continue
        if not norms and any(p.startswith("ln") for p in parts[2:]):
            continue
        names.append(name)
    return names


def apply_mask(model: HookedTransformer, aligned: HookedTransformer, mask: dict[str, torch.Tensor] | str | os.PathLike,
               ) -> int:
    """Set ``model``'s weights to ``aligned``'s where ``mask`` (name -> bool tensor, or a saved
    mask file) is true: replays a restoration on the fine-tuned model. Returns the count."""
    import torch

    if not isinstance(mask, dict):
        mask = load_mask(mask)
    params, ref = dict(model.named_parameters()), dict(aligned.named_parameters())
    count = 0
    with torch.no_grad():
        for name, m_ in mask.items():
            if name not in params or params[name].shape != m_.shape:
                raise MisfeatError(f"the mask's tensor {name} {tuple(m_.shape)} has no match in the model; was it "
                                   "saved for another architecture?")
            m_ = m_.to(params[name].device)
            params[name][m_] = ref[name][m_]
            count += int(m_.sum())
    return count


def save_mask(mask: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in mask.items()}, str(tmp),
              metadata={k: str(v) for k, v in (meta or {}).items()})
    os.replace(tmp, path)
    return path


def load_mask(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A saved restoration mask: parameter name -> bool tensor of that parameter's shape."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MisfeatError(f"{path}: no such mask file (restore writes {MASK_FILE} into --out)")
    return {k: v.bool() for k, v in load_file(str(path)).items()}


def mask_stats(mask: dict[str, torch.Tensor]) -> dict[str, int]:
    """Restored weights per parameter tensor (for inspecting a run)."""
    return {name: int(m.sum()) for name, m in mask.items() if int(m.sum())}



def choose_step(utilities: dict[int, float], before: float, tolerance: float, every: int, last: int) -> int:
    """The authors' walk: over checkpoints every ``every`` steps (and the last), the one before the
    first whose utility falls below ``(1 - tolerance) * before`` (0 if the first fails); else the last."""
    marks = sorted({s for s in utilities if s > 0 and (s % every == 0 or s == last)})
    previous = 0
    for s in marks:
        if utilities[s] < (1 - tolerance) * before:
            return previous
        previous = s
    return previous



# --- the run -------------------------------------------------------------------------


class Restorer:
    """One restoration run over ``model`` (modified in place) towards ``aligned``.

    ``measure(restorer, step, put_back)`` returns a row with a ``utility`` attribute (a
    dataclass: rows are saved with the state and rebuilt with ``row_type``).
    """

    def __init__(self, model: HookedTransformer, aligned: HookedTransformer, probe: PromptSet, task: PromptSet,
                 cfg: RestoreConfig, measure: Callable[..., Any], row_type: type, state_dir: Path | None = None):
        import torch

        from misfeat.steering import mean_activations

        self.model, self.cfg, self.measure, self.row_type, self.state_dir = model, cfg, measure, row_type, state_dir
        self.layer = cfg.layer
        self.params = dict(model.named_parameters())
        self.n_params = sum(p.numel() for p in self.params.values())
        candidates = candidate_names(model, self.layer, cfg.candidates, cfg.norms)
        self.n_candidates = sum(self.params[n].numel() for n in candidates)
        self.names = list(self.params) if cfg.mask == "full" else candidates
        ref = dict(aligned.named_parameters())
        self.ft = {n: self.params[n].detach().clone() for n in self.names}
        self.al = {n: ref[n].detach().to(self.params[n].device, self.params[n].dtype).clone() for n in self.names}
        self.k = math.ceil(cfg.fraction * self.n_params)
        self.restored = {n: torch.zeros_like(self.ft[n], dtype=torch.bool) for n in self.names}
        hook = f"blocks.{self.layer}.hook_resid_post"
        self.probe_b = make_batches(probe, model, cfg.batch_size)
        self.task_b = make_batches(task, model, cfg.batch_size)
        # the aligned model's state on the probe prompts; the fine-tuned model's on the task
        self.d_h = mean_activations(aligned, probe, [hook], "last")[hook].to(model.cfg.device)
        self.d_b = mean_activations(model, task, [hook], "last")[hook].to(model.cfg.device)

    # -- one step ------------------------------------------------------------------

    def restore_step(self, step: int, rollback: bool) -> dict[str, torch.Tensor]:
        """Restore ``k`` weights (by gradient, or at random for the ablation); returns their mask."""
        import torch

        scores = {}
        if self.cfg.mask == "random":
            gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + step)
            for n in self.names:
                pool = (self.params[n].detach() != self.al[n]) & ~self.restored[n]
                noise = torch.rand(pool.shape, generator=gen).to(pool.device)
                scores[n] = torch.where(pool, noise, -1.0)
        else:
            if rollback or not self.cfg.accumulate:
                self.zero_grad()
            self.backward(self.probe_b, self.d_h)
            for n in self.names:
                scores[n] = self.signed_scores(n, self.al[n], None)
        chosen = top_k(scores, self.k)
        with torch.no_grad():
            for n, m in chosen.items():
                self.params[n][m] = self.al[n][m]
                self.restored[n] |= m
        return chosen

    def rollback_step(self, restored_now: dict[str, torch.Tensor]) -> int:
        """Put back the ``rollback_fraction`` of this step's restorations whose return to the
        fine-tuned values most lowers ``-cos(state, task direction)``; returns how many."""
        import torch

        self.zero_grad()
        self.backward(self.task_b, self.d_b)
        scores = {n: self.signed_scores(n, self.ft[n], restored_now[n]) for n in self.names}
        n_sel = sum(int((s >= 0).sum()) for s in scores.values())
        chosen = top_k(scores, math.ceil(self.cfg.rollback_fraction * n_sel))
        with torch.no_grad():
            for n, m in chosen.items():
                self.params[n][m] = self.ft[n][m]
                self.restored[n] &= ~m
        self.zero_grad()
        return sum(int(m.sum()) for m in chosen.values())

    def signed_scores(self, name: str, target: torch.Tensor, pool: torch.Tensor | None) -> torch.Tensor:
        """|grad| where moving the weight to ``target`` lowers the loss to first order (any move
        when ``sign`` is off), -1 elsewhere."""
        import torch

        p = self.params[name]
        diff, grad = p.detach() - target, p.grad if p.grad is not None else torch.zeros_like(p)
        sel = (diff * grad > 0) if self.cfg.sign else (diff != 0)
        if pool is not None:
            sel &= pool
        return torch.where(sel, grad.abs(), -1.0)

    def backward(self, batches: Sequence[Any], direction: torch.Tensor) -> float:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for n in self.names:
            self.params[n].requires_grad_(True)
        try:
            return direction_loss(self.model, batches, self.layer, direction, backward=True)
        finally:
            for p in self.model.parameters():
                p.requires_grad_(True)

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def set_mask(self, mask: dict[str, torch.Tensor]) -> None:
        """W := W_ft, then W[mask] := W_aligned."""
        import torch

        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(torch.where(mask[n], self.al[n], self.ft[n]))
                self.restored[n] = mask[n].clone()

    # -- the loop ------------------------------------------------------------------

    def run(self, resume: bool = False):
        """-> (rows, warm-up rows, rolled back, chosen step, chosen mask)."""
        import torch

        cfg = self.cfg
        state = self.load_state() if resume else None
        if state is None:
            rows, warm, rollback, ckpts = [self.measure(self, 0, 0)], [], cfg.rollback == "always", {}
        else:
            rows, warm, rollback, ckpts = state
        before = rows[0].utility
        if cfg.mask == "full" and len(rows) == 1:
            self.set_mask({n: torch.ones_like(m) for n, m in self.restored.items()})
            rows.append(self.measure(self, 1, 0))
            ckpts[1] = {n: m.clone() for n, m in self.restored.items()}
        step = rows[-1].step
        while cfg.mask != "full" and step < cfg.steps:
            step += 1
            restored_now = self.restore_step(step, rollback)
            put_back = self.rollback_step(restored_now) if rollback else 0
            rows.append(self.measure(self, step, put_back))
            if step % cfg.select_every == 0 or step == cfg.steps:
                ckpts[step] = {n: m.clone() for n, m in self.restored.items()}
            if (cfg.rollback == "auto" and not rollback and step == cfg.warmup
                    and rows[-1].utility < (1 - cfg.tolerance) * before):
                logger.info("utility %.3f after %d warm-up steps is below %.3f: restarting with rollback",
                            rows[-1].utility, step, (1 - cfg.tolerance) * before)
                rollback, warm, rows, ckpts, step = True, rows, [rows[0]], {}, 0
                self.zero_grad()
                self.set_mask({n: torch.zeros_like(m) for n, m in self.restored.items()})
            self.save_state(rows, warm, rollback, ckpts)
        if cfg.mask == "full":  # the ablation is W := W_aligned itself: no checkpoint walk
            chosen = 1
        else:
            chosen = choose_step({r.step: r.utility for r in rows}, before, cfg.tolerance, cfg.select_every, cfg.steps)
        mask = ckpts.get(chosen) or {n: torch.zeros_like(m) for n, m in self.restored.items()}
        self.set_mask(mask)
        return rows, warm, rollback, chosen, mask

    # -- resumable state -----------------------------------------------------------

    def save_state(self, rows: list, warm: list, rollback: bool, ckpts: dict[int, dict[str, torch.Tensor]]) -> None:
        if self.state_dir is None:
            return
        tensors = {f"restored.{n}": m for n, m in self.restored.items()}
        tensors.update({f"ckpt.{s}.{n}": m for s, mask in ckpts.items() for n, m in mask.items()})
        if self.cfg.accumulate and not rollback:
            tensors.update({f"grad.{n}": self.params[n].grad for n in self.names if self.params[n].grad is not None})
        save_mask(tensors, self.state_dir / STATE_FILE)
        record = {"config": asdict(self.cfg), "rows": [asdict(r) for r in rows], "warmup": [asdict(r) for r in warm],
                  "rollback": rollback, "checkpoints": sorted(ckpts)}
        tmp = self.state_dir / (STATE_JSON + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.state_dir / STATE_JSON)

    def load_state(self):
        from safetensors.torch import load_file

        if self.state_dir is None or not (self.state_dir / STATE_JSON).is_file():
            return None
        record = json.loads((self.state_dir / STATE_JSON).read_text())
        if record["config"] != json.loads(json.dumps(asdict(self.cfg))):
            raise MisfeatError(f"{self.state_dir} holds a restoration run with another configuration; use another "
                               "--out or drop --resume")
        tensors = load_file(str(self.state_dir / STATE_FILE))
        dev = self.model.cfg.device
        self.set_mask({n: tensors[f"restored.{n}"].to(dev) for n in self.names})
        for n in self.names:
            if f"grad.{n}" in tensors:
                self.params[n].grad = tensors[f"grad.{n}"].to(dev)
        ckpts = {s: {n: tensors[f"ckpt.{s}.{n}"].to(dev) for n in self.names} for s in record["checkpoints"]}
        rows = [self.row_type(**r) for r in record["rows"]]
        logger.info("resuming the restoration at step %d", rows[-1].step)
        return rows, [self.row_type(**r) for r in record["warmup"]], record["rollback"], ckpts
