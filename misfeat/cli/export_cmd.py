"""``misfeat export``: write a model (e.g. a realigned checkpoint) as a Hugging Face directory."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_model_args, add_output_args, finish


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a model as a Hugging Face directory (config, weights, tokenizer)",
        description="Load a model (a misfeat checkpoint such as realign's output, or a local Hugging Face "
        "directory) and write it as a Hugging Face directory that transformers' from_pretrained loads, "
        "with logits equal to misfeat's. Works for models that came from a Hugging Face directory "
        "(Llama, Mistral, Qwen2, Gemma, Gemma 2, GPT-NeoX, GPT-2); the organism has no Hugging Face form.",
    )
    add_model_args(p)
    add_device_args(p)
    add_output_args(p, out_required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misfeat.io import format_table
    from misfeat.models import load_model, model_info, save_model

    model = load_model(args.model, device=args.device or "cpu", dtype=args.dtype)
    out = save_model(model, args.out, format="hf")
    config = model_info(model).meta["hf_config"]
    summary = {"model": args.model, "out": str(out), "architecture": config["architectures"][0],
               "dtype": str(model.cfg.dtype).removeprefix("torch."), "n_layers": model.cfg.n_layers}
    finish(args, summary, format_table([{"field": k, "value": v} for k, v in summary.items()], ["field", "value"]))
    return 0
