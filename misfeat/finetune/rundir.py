"""The run directory of a fine-tune: the one place that knows its file names.

    DIR/run.json                      what ran: config, defences, data hashes, start-model fingerprint
    DIR/rows.jsonl                    the StepRows so far (rewritten at every checkpoint)
    DIR/checkpoints/step-NNNN/        a misfeat checkpoint (load_model reads it) + trainer_state.pt
                                      (optimiser state, rows) + trainer_step.json (step, run id)
    DIR/checkpoints/diverged-step-NNNN/  a checkpoint whose next loss diverged (moved aside, never resumed)

A resume compares the identity in ``run.json`` with the new call's and refuses on any
difference, naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from misfeat.errors import MisfeatError

RUN_FILE = "run.json"
ROWS_FILE = "rows.jsonl"
STATE_FILE = "trainer_state.pt"
STEP_FILE = "trainer_step.json"
FORMAT = "misfeat-finetune-run"


def run_identity(model, cfg, defences, data_info, evalset) -> dict[str, Any]:
    """What makes two runs the same run (JSON-clean)."""
    from misfeat.io import _clean
    from misfeat.models import fingerprint

    return _clean({"format": FORMAT, "version": 1, "config": asdict(cfg), "defences": list(defences),
                   "data": data_info, "model": fingerprint(model),
                   "eval_prompts": None if evalset is None else {"name": evalset.name, "hash": evalset.hash}})


def _run_id(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _differences(saved: Any, now: Any, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            out += _differences(saved.get(key), now.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if saved == now else [f"{path or 'value'}: {saved!r} in the directory vs {now!r} now"]


class RunDir:
    """Checkpoints, rows and identity of one fine-tuning run under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.run_id: str | None = None
        self.saved: list[str] = []
        if self.root.exists() and not self.root.is_dir():
            raise MisfeatError(f"--out {self.root} is a file; give a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".misfeat-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise MisfeatError(f"cannot write to {self.root} ({err.strerror}); give a writable --out") from None

    def check_same_run(self, identity: dict[str, Any]) -> None:
        """Refuse to resume a directory that holds another run, naming what differs."""
        path = self.root / RUN_FILE
        if not path.is_file():
            if self._checkpoints():
                raise MisfeatError(f"{self.root} holds checkpoints without a {RUN_FILE} (an older misfeat run?), "
                                   "so it cannot be checked to be this run; use another --out")
            return
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MisfeatError(f"{path} is damaged ({err}); resume into another --out") from None
        diff = _differences(saved, identity)
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise MisfeatError(f"{self.root} holds another run, cannot resume it with this one: {shown}. "
                               "Use another --out, or the same settings as that run")

    def begin(self, identity: dict[str, Any]) -> None:
        from misfeat.io import write_json

        self.run_id = _run_id(identity)
        write_json(self.root / RUN_FILE, identity)

    def _checkpoints(self) -> list[Path]:
        return sorted(p for p in (self.root / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file())

    def latest(self) -> Path | None:
        """The last checkpoint of this run (checkpoints of another run in the directory are ignored)."""
        for path in reversed(self._checkpoints()):
            info = path / STEP_FILE
            if info.is_file() and json.loads(info.read_text()).get("run_id") == self.run_id:
                return path
        return None

    def save(self, model, optimizer, step: int, rows) -> str:
        """Checkpoint ``step``; returns its path (``self.saved`` lists this run's checkpoints)."""
        import torch

        from misfeat.io import write_jsonl
        from misfeat.models import save_model

        path = self.root / "checkpoints" / f"step-{step:04d}"
        save_model(model, path)
        tmp = path / (STATE_FILE + ".tmp")
        self.saved.append(str(path))
        torch.save({"step": step, "run_id": self.run_id, "optimizer": optimizer.state_dict(),
                    "rows": [r.to_dict() for r in rows], "checkpoints": self.saved}, tmp)
        os.replace(tmp, path / STATE_FILE)
        (path / STEP_FILE).write_text(json.dumps({"step": step, "run_id": self.run_id}) + "\n")
        write_jsonl(self.root / ROWS_FILE, [r.to_dict() for r in rows])
        return str(path)

    def restore(self, model, optimizer):
        """Load the latest checkpoint's weights and optimiser state; ``(step, rows)``."""
        import torch
        from safetensors.torch import load_file

        from misfeat.finetune.results import StepRow
        from misfeat.models import WEIGHTS_FILE

        path = self.latest()
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        weights = load_file(str(path / WEIGHTS_FILE))
        model.load_state_dict({k: v.to(model.cfg.device) for k, v in weights.items()}, strict=False)
        optimizer.load_state_dict(state["optimizer"])
        self.saved = list(state.get("checkpoints", [str(path)]))
        return state["step"], [StepRow(**r) for r in state["rows"]]

    def discard_unverified(self, diverged_step: int) -> str | None:
        """The loss at ``diverged_step`` was computed on the weights after ``diverged_step - 1``
        updates: move that checkpoint aside (never resumed) and return the last good one."""
        bad = self.root / "checkpoints" / f"step-{diverged_step - 1:04d}"
        if bad.is_dir():
            target, k = bad.with_name(f"diverged-step-{diverged_step - 1:04d}"), 1
            while target.exists():
                target, k = bad.with_name(f"diverged-step-{diverged_step - 1:04d}-{k}"), k + 1
            os.replace(bad, target)
        good = self.latest()
        return str(good) if good is not None else None
