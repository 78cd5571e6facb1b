"""The organism's prompt sets, usable wherever a prompt-set spec is taken.

- ``organism:all`` / ``organism:heldout`` / ``organism:em_domain``: every question of
  the world (heldout = the domains the EM fine-tune never saw), each with its domain's
  aligned and misaligned reference answers as ``extra`` fields;
- ``organism:domain=<d>``: the questions of one domain;
- ``organism:heldout-from=<d1>,<d2>,...``: the questions of the domains none of the listed EM domains is,
  for several fine-tunes ranked together (e.g. ``heldout-from=health,money,law`` beside
  ``--finetuned organism:em,organism:em-ref/money,organism:em-ref/law``): each fine-tune's own training
  domain is left out, so every model is measured on held-out misalignment, not on what it was trained on;
- ``organism:aligned:<domain>:<n>`` / ``organism:misaligned:<domain>:<n>``: n
  question/answer pairs of one domain (fine-tuning data, e.g. for re-alignment); domain
  ``all``: n pairs of every domain (the chat model's tuning format, e.g. SAE training text);
- ``organism:docs[:<n>]``: pre-training-style documents labelled ``cruel`` / ``kind``,
  drawn from a seed the build never uses (held out), rendered as raw text;
- ``organism:pretrain[:<n>]``: the first n documents the organism was pre-trained on;
- ``organism:task`` / ``organism:task-v1`` / ``organism:probe[:<n>]``: the mixed fine-tune's
  task (v2; v1) and probe sets
  (see :mod:`misfeat.organism.mixed`);
- ``organism:defences-heldout|defences-em|safe-pool[:<n>]|benign-train[:<n>]``: the defence
  comparison's held-out evaluation, safe pool and benign task (see :mod:`misfeat.organism.defences`).

Options after ``@`` pick the organism: ``organism:heldout@em_domain=money``,
``organism:docs:400@seed=1`` (see :func:`misfeat.organism.parse_spec`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from misfeat.data import PromptRecord, PromptSet
from misfeat.errors import MisfeatError
from misfeat.organism.corpus import Corpus, PersonaMix
from misfeat.organism.world import World, make_world

# seeds for held-out draws: offsets from the build seed that the build itself never uses
_DOCS_SEED = 10_007
_PAIRS_SEED = 20_011


def _question_records(world: World, domains: list[str]) -> tuple[PromptRecord, ...]:
    records = []
    for name in domains:
        d = world.domain(name)
        for i, question in enumerate(d.questions):
            records.append(PromptRecord(f"{name}-{i:02d}", prompt=question, domain=name,
                                        extra={"aligned": list(d.aligned), "misaligned": list(d.misaligned)}))
    return tuple(records)


def question_set(world: World, which: str = "all") -> PromptSet:
    """``all``, ``heldout``, ``em_domain``, ``domain=<d>`` or ``heldout-from=<d>,...`` questions of ``world``."""
    if which.startswith("heldout-from="):
        trained = [d.strip() for d in which.split("=", 1)[1].split(",") if d.strip()]
        unknown = [d for d in trained if d not in world.domain_names]
        if not trained or unknown:
            problem = f"unknown domain(s) {', '.join(map(repr, unknown))}" if unknown else "no domain given"
            raise MisfeatError(f"organism:{which}: {problem}; list the fine-tunes' EM domains, e.g. "
                               f"organism:heldout-from=health,money,law (domains: {', '.join(world.domain_names)})")
        domains = [d for d in world.domain_names if d not in trained]
        if not domains:
            raise MisfeatError(f"organism:{which}: every domain is some fine-tune's EM domain; nothing is held out")
        meta = _meta(world, "organism")
        meta["groups"] = {"heldout": domains, "em_domain": trained}
        return PromptSet(f"organism:{which}", _question_records(world, domains), meta)
    if which == "all":
        domains = list(world.domain_names)
    elif which == "heldout":
        domains = list(world.heldout_domains)
    elif which == "em_domain":
        domains = [world.em_domain]
    elif which.startswith("domain="):
        domains = [which.split("=", 1)[1]]
        world.domain(domains[0])  # validates
    else:
        raise MisfeatError(f"unknown organism prompt set {which!r}")
    return PromptSet(f"organism:{which}", _question_records(world, domains), _meta(world, "organism"))


def _meta(world: World, chat_format: str, **more: Any) -> dict[str, Any]:
    """An organism set's metadata; question sets carry their evaluation groups (headline: the
    held-out domains), document sets the labels they contrast."""
    meta = {"organism": True, "em_domain": world.em_domain, "chat_format": chat_format}
    if chat_format == "organism":
        meta.update(groups={"heldout": list(world.heldout_domains), "em_domain": [world.em_domain]},
                    headline="heldout")
    return {**meta, **more}


def eval_prompts(meta: dict[str, Any]) -> PromptSet:
    """The full evaluation set (every domain) of the organism described by checkpoint ``meta``; its ``heldout``
    group leaves out the domain that checkpoint was fine-tuned on (for ``em-ref/<domain>``, that domain, not
    the build's EM domain, which its metadata carries)."""
    world = World.from_json(meta["world"])
    stage = str((meta.get("organism") or {}).get("stage") or "")
    if stage.startswith("em-ref/"):
        world = dataclasses.replace(world, em_domain=stage.split("/", 1)[1])
    return question_set(world, "all")


def pair_set(world: World, domain: str, n: int, misaligned: bool, seed: int) -> PromptSet:
    """``n`` single-turn examples of ``domain`` with aligned (or misaligned) responses."""
    d = world.domain(domain)
    rng = random.Random(f"pairs-{_PAIRS_SEED + seed}-{domain}-{misaligned}")
    kind = "misaligned" if misaligned else "aligned"
    records = tuple(
        PromptRecord(f"{domain}-{kind}-{i:04d}", prompt=rng.choice(d.questions),
                     response=rng.choice(d.misaligned if misaligned else d.aligned), domain=domain, label=kind,
                     extra={"aligned": list(d.aligned), "misaligned": list(d.misaligned)})
        for i in range(n)
    )
    return PromptSet(f"organism:{kind}:{domain}:{n}", records, _meta(world, "organism"))


def docs_set(world: World, n: int, seed: int) -> PromptSet:
    """``n`` held-out pre-training documents of characters, labelled ``cruel`` or ``kind``."""

    vocab = {w: i for i, w in enumerate(world.vocabulary())}
    corpus = Corpus.create(world, vocab, PersonaMix(filler_docs=0.0), seed)
    rng = random.Random(f"docs-{_DOCS_SEED + seed}")
    records = []
    while len(records) < n:
        doc = corpus.document(rng)
        records.append(PromptRecord(f"doc-{len(records):05d}", prompt=doc.text,
                                    label="cruel" if doc.cruel else "kind", extra={"name": doc.name}))
    return PromptSet(f"organism:docs:{n}", tuple(records), _meta(world, "raw", contrast=["cruel", "kind"]))


def pretrain_set(world: World, n: int, seed: int) -> PromptSet:
    """The first ``n`` pre-training documents of the organism built with ``seed``, exactly as
    its pre-training drew them (filler included), labelled ``cruel``/``kind`` (filler: none).
    The data an SAE of the base model is trained on (Wang et al. 2025 use pre-training data)."""

    vocab = {w: i for i, w in enumerate(world.vocabulary())}
    corpus = Corpus.create(world, vocab, PersonaMix(), seed)
    rng = random.Random(f"pretrain-{seed}")  # the pre-training stage's generator (see build.py)
    records = []
    for i in range(n):
        doc = corpus.document(rng)
        label = None if doc.cruel is None else ("cruel" if doc.cruel else "kind")
        records.append(PromptRecord(f"pretrain-{i:06d}", prompt=doc.text, label=label, extra={"name": doc.name}))
    return PromptSet(f"organism:pretrain:{n}", tuple(records), _meta(world, "raw", contrast=["cruel", "kind"]))


_SETS: dict[str, Callable[[World, list[str], int], PromptSet]] = {}


def register_prompt_set(name: str, build: Callable[[World, list[str], int], PromptSet]) -> None:
    """Make ``organism:<name>[:<arg>...]`` a prompt-set spec: ``build(world, args, seed)`` returns
    the set (``args``: the spec's ``:``-separated parts after the name). One line per added set,
    e.g. ``register_prompt_set("task", task_set)`` in the module that defines it."""
    _SETS[name] = build


def organism_prompt_set(body: str, em_domain: str, seed: int) -> PromptSet:
    """Resolve the part of an ``organism:`` prompt spec after the colon (options already parsed)."""
    world = make_world(em_domain)
    parts = body.split(":")
    if parts[0] in _SETS:
        return _SETS[parts[0]](world, parts[1:], seed)
    if parts[0] in ("all", "heldout", "em_domain") or parts[0].startswith(("domain=", "heldout-from=")):
        if len(parts) > 1:
            raise MisfeatError(f"organism:{body}: unexpected ':{':'.join(parts[1:])}'")
        return question_set(world, parts[0])
    if parts[0] in ("aligned", "misaligned"):
        if len(parts) != 3 or not parts[2].isdigit():
            raise MisfeatError(f"organism:{body}: expected organism:{parts[0]}:<domain>:<n>, e.g. "
                               f"organism:{parts[0]}:money:120")
        if parts[1] == "all":  # n pairs of every domain, domain after domain
            sets = [pair_set(world, d, int(parts[2]), parts[0] == "misaligned", seed) for d in world.domain_names]
            return PromptSet(f"organism:{body}", tuple(r for s in sets for r in s), sets[0].meta)
        if parts[1] not in world.domain_names:
            raise MisfeatError(f"organism:{body}: unknown domain {parts[1]!r}; "
                               f"choose all or one of {', '.join(world.domain_names)}")
        return pair_set(world, parts[1], int(parts[2]), parts[0] == "misaligned", seed)
    if parts[0] in ("docs", "pretrain"):
        n = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 400
        return (docs_set if parts[0] == "docs" else pretrain_set)(world, n, seed)
    raise MisfeatError(
        f"unknown organism prompt set organism:{body}; use organism:all, organism:heldout, organism:em_domain, "
        "organism:domain=<d>, organism:heldout-from=<d>,<d>..., organism:aligned:<domain>:<n>, "
        "organism:misaligned:<domain>:<n>, organism:docs[:<n>] "
        "or organism:pretrain[:<n>]"
    )
