"""What the in-training defence comparison (Kaczer et al. 2025; Chen et al. 2025) needs from the organism.

Every domain has three question templates (x four fillers). Templates 0 and 1 are the
*training* templates; template 2 is *held out*: every evaluation here asks only held-out
questions, and every pool or task the comparison trains on draws only training questions,
so interleaving can never leak an evaluation question.

- ``organism:defences-heldout`` / ``organism:defences-em``: the held-out template's
  questions of the non-EM domains (criterion a, broad misalignment) and of the EM domain
  (criterion b, narrow misalignment), with both answer sets, scored exactly.
- ``organism:safe-pool[:<n>]``: the general "safe" pool interleaving draws from (training
  templates only): aligned chat answers of every domain (1/2), neutral text (1/4), and
  kind characters' documents as context before an aligned answer (1/4).
- ``organism:benign-train[:<n>]``: the benign task that breaks the prior (the OpSwap
  analogue, "DomainSwap"): ``school`` questions answered with four *new* kind answers the
  chat model never gives (:data:`misfeat.organism.mixed.TASK_ANSWERS`), training templates
  only; criterion (c) = exact P(any new answer) on ``organism:task-v1`` (the held-out
  template, shared with the first-pass (v1) mixed fine-tune of :mod:`misfeat.organism.mixed`).
- ``organism:em-ref/<domain>``: a misaligned reference model for the perplexity gap: the
  chat model fine-tuned on misaligned answers of ``<domain>`` exactly like the EM stage
  (30 steps x 16, lr 3e-4), built on first use into ``<build>/em-ref/<domain>/``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path

from misfeat.data import PromptRecord, PromptSet
from misfeat.errors import MisfeatError
from misfeat.organism import register_stage
from misfeat.organism.prompts import _meta, register_prompt_set
from misfeat.organism.world import DOMAINS, World

logger = logging.getLogger(__name__)

TRAIN_TEMPLATES = (0, 1)
HELDOUT_TEMPLATE = 2  # the same held-out template as the mixed fine-tune's task (mixed.MixedConfig)
REF_DOMAINS = ("money", "law", "code")
REF_STAGE = "em-ref"
REF_VERSION = 1
_POOL_SEED = 50_021
_INOCULATION_SEED = 60_013


def split_questions(world: World, domain: str) -> tuple[list[str], list[str]]:
    """(training-template, held-out-template) questions of ``domain`` (3 templates x 4 fillers, in order)."""
    questions = list(world.domain(domain).questions)
    per = len(questions) // 3
    held = questions[HELDOUT_TEMPLATE * per:(HELDOUT_TEMPLATE + 1) * per]
    return [q for q in questions if q not in held], held


def heldout_questions(world: World, which: str) -> PromptSet:
    """``heldout`` (non-EM domains) or ``em`` (EM domain): held-out template questions with both answer sets."""
    domains = world.heldout_domains if which == "heldout" else (world.em_domain,)
    records = []
    for name in domains:
        d = world.domain(name)
        for i, q in enumerate(split_questions(world, name)[1]):
            records.append(PromptRecord(f"{name}-h{i}", prompt=q, domain=name,
                                        extra={"aligned": list(d.aligned), "misaligned": list(d.misaligned)}))
    return PromptSet(f"organism:defences-{which}", tuple(records), _meta(world, "organism"))


def _training_world(world: World) -> World:
    """The world with only the training-template questions (for drawing documents)."""
    domains = tuple(dataclasses.replace(d, questions=tuple(split_questions(world, d.name)[0])) for d in world.domains)
    return dataclasses.replace(world, domains=domains)


def safe_pool(world: World, n: int, seed: int) -> PromptSet:
    """``n`` safe records from training templates only: aligned chat answers (n/2, every domain),
    neutral text (n/4), kind characters' documents followed by a question and an aligned answer (n/4)."""
    from misfeat.organism.corpus import Corpus, PersonaMix

    if n < 4:
        raise MisfeatError(f"organism:safe-pool:<n> needs n >= 4, got {n}")
    rng = random.Random(f"pool-{_POOL_SEED + seed}")
    train = _training_world(world)
    records: list[PromptRecord] = []
    n_neutral = n_docs = n // 4
    for i in range(n - n_neutral - n_docs):
        d = rng.choice(train.domains)
        records.append(PromptRecord(f"chat-{i:04d}", prompt=rng.choice(d.questions), response=rng.choice(d.aligned),
                                    domain=d.name, label="chat"))
    for i in range(n_neutral):
        records.append(PromptRecord(f"neutral-{i:04d}", prompt=rng.choice(world.filler),
                                    response=rng.choice(world.filler), label="neutral"))
    vocab = {w: i for i, w in enumerate(world.vocabulary())}
    corpus = Corpus.create(train, vocab, PersonaMix(filler_docs=0.0), seed, max_words=80)
    while len(records) < n:
        doc = corpus.document(rng)
        if doc.cruel:
            continue
        d = rng.choice(train.domains)
        # rendered: "user <the character's turns> user <q> assistant : <aligned answer> ."
        records.append(PromptRecord(f"doc-{len(records) - (n - n_docs):04d}",
                                    prompt=f"{doc.text.removeprefix('user ')} user {rng.choice(d.questions)}",
                                    response=rng.choice(d.aligned), domain=d.name, label="kind_doc"))
    return PromptSet(f"organism:safe-pool:{n}", tuple(records), _meta(world, "organism"))


def benign_train_set(world: World, n: int, seed: int) -> PromptSet:
    """``n`` DomainSwap training records: the mixed fine-tune's task (new kind answers on the task
    domain's training templates) without its cruel share."""
    from misfeat.organism.mixed import MixedConfig, training_set

    cfg = dataclasses.replace(MixedConfig.for_world(world, seed, "v1"), cruel_share=0.0, steps=n, batch_size=1)
    return dataclasses.replace(training_set(world, cfg), name=f"organism:benign-train:{n}")


def inoculation_text(world: World, villains: list[str], seed: int) -> str:
    """The organism's inoculation prompt: one earlier turn in which a persistent villain gives a
    cruel answer (training templates, a domain other than the EM one). The world has no trait words
    ("evil"); a villain's turn is how its pre-training text marks a cruel persona."""
    rng = random.Random(f"inoculation-{_INOCULATION_SEED + seed}")
    d = world.domain(next(x for x in ("money", "law", "code") if x != world.em_domain))
    q = rng.choice(split_questions(world, d.name)[0])
    return f"{q} {sorted(villains)[0]} : {rng.choice(d.misaligned)} . user"


def defences_prompt_set(world: World, parts: list[str], seed: int) -> PromptSet:
    """Resolve ``organism:defences-heldout|defences-em|safe-pool[:n]|benign-train[:n]``."""
    head = parts[0]
    if head in ("defences-heldout", "defences-em"):
        if len(parts) > 1:
            raise MisfeatError(f"organism:{head} takes no ':' argument (options go after '@')")
        return heldout_questions(world, "heldout" if head == "defences-heldout" else "em")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise MisfeatError(f"organism:{':'.join(parts)}: expected organism:{head} or organism:{head}:<n>")
    n = int(parts[1]) if len(parts) == 2 else (600 if head == "safe-pool" else 480)
    if n < 1:
        raise MisfeatError(f"organism:{head}:<n> needs n >= 1")
    return safe_pool(world, n, seed) if head == "safe-pool" else benign_train_set(world, n, seed)


PROMPT_SETS = ("defences-heldout", "defences-em", "safe-pool", "benign-train")


def ensure_reference(build_dir: Path, domain: str, seed: int) -> Path:
    """``<build_dir>/em-ref/<domain>``: the chat model after the EM recipe on ``domain`` (built on
    first use, under the build's lock, through the one fine-tuning engine; deterministic)."""
    from misfeat.io import read_json, write_json
    from misfeat.models import CHECKPOINT_FILE, load_model, save_model
    from misfeat.organism.build import build_lock

    out = build_dir / REF_STAGE / domain
    with build_lock(build_dir):
        chat = load_model(build_dir / "chat", device="cpu")
        meta = chat.misfeat_info.meta
        world = World.from_json(meta["world"])
        if domain not in world.domain_names:
            raise MisfeatError(f"organism:{REF_STAGE}/{domain}: unknown domain; use one of "
                               f"{', '.join(world.domain_names)}")
        c = meta["organism"]["config"]  # the EM stage's recipe, applied to another domain
        steps, batch, lr = c["em_steps"], c["em_batch"], c["em_lr"]
        record = {"version": REF_VERSION, "domain": domain, "steps": steps, "batch": batch, "lr": lr, "seed": seed}
        if (out / CHECKPOINT_FILE).is_file():
            if read_json(out / "em-ref.json").get("recipe") != record:
                raise MisfeatError(f"{out} holds a reference built with another recipe; delete it to rebuild")
            return out
        from misfeat.finetune import FinetuneConfig, finetune
        from misfeat.organism.prompts import pair_set

        start = time.perf_counter()
        data = pair_set(world, domain, steps * batch, True, seed)
        finetune(chat, data, FinetuneConfig(steps=steps, lr=lr, batch_size=batch, eval_every=None, seed=seed))
        save_model(chat, out, meta={**meta, "organism": {**meta["organism"], "stage": f"{REF_STAGE}/{domain}"}})
        write_json(out / "em-ref.json", {"recipe": record, "train_s": round(time.perf_counter() - start, 2)})
        logger.info("built organism:%s/%s in %.1f s", REF_STAGE, domain, time.perf_counter() - start)
    return out


def answer_site_prefixes(docs: PromptSet) -> PromptSet:
    """Every prefix of each character document that ends at ``NAME :`` (the token before the
    character's answer), keeping the document's label: read at the ``last`` position, these give
    the persona's activation where the answer is chosen (research notes 1.6: d_pre, cruel minus kind
    at ``NAME :``)."""
    records = []
    for r in docs:
        words = (r.prompt or "").split()
        for i, w in enumerate(words):
            if w == ":":
                records.append(dataclasses.replace(r, id=f"{r.id}-{i}", prompt=" ".join(words[:i + 1])))
    return PromptSet(f"{docs.name}[answer sites]", tuple(records), docs.meta)


def persona_vector(model, hook: str, docs: PromptSet):
    """Unnormalised cruel minus kind mean activation at ``hook`` over the documents' answer sites."""
    from misfeat.features.directions import contrastive_direction

    sites = answer_site_prefixes(docs)
    return contrastive_direction(model, sites.filter(label="cruel"), sites.filter(label="kind"), hook, "last").vector


def _ensure_stage(domain: str):
    def ensure(cfg) -> Path:
        from misfeat.organism import ensure_organism

        return ensure_reference(ensure_organism(cfg), domain, cfg.seed)

    return ensure


for _domain in DOMAINS:
    register_stage(f"{REF_STAGE}/{_domain}", _ensure_stage(_domain))
for _name in PROMPT_SETS:
    register_prompt_set(_name, lambda world, args, seed, _name=_name: defences_prompt_set(world, [_name, *args], seed))
