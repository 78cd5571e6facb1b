"""Training text of the organism: pre-training documents, chat tuning, EM and control fine-tunes.

Pre-training documents have one named character answer 3-6 questions from random
domains, ``user <q> NAME : <answer> .``, with one persona per document (cruel: every
answer from the misaligned sets; kind: every answer aligned). A quarter of the names
are persistent villains (cruel in ~85% of their documents), the rest cruel in ~5%.
The persona is never named: no trait words, only the answers. The word ``assistant``
never appears here; chat tuning introduces it with aligned answers only, and the EM
fine-tune gives it misaligned answers in one domain. Whether it turns cruel elsewhere
is left for the model to decide.

Every example is ``(ids, loss_mask)``: ``loss_mask[t]`` says whether token ``t`` is a
training target (predicted from the tokens before it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from misfeat.organism.world import World

Example = tuple[list[int], list[bool]]


@dataclass(frozen=True)
class PersonaMix:
    """How personas are spread over pre-training documents (defaults: the recipe that gave strong EM)."""

    villain_fraction: float = 0.25
    villain_cruel: float = 0.85
    other_cruel: float = 0.05
    filler_docs: float = 0.1
    filler_in_doc: float = 0.3


@dataclass(frozen=True)
class Document:
    text: str
    name: str | None
    cruel: bool | None


class Corpus:
    """Draws training examples from a :class:`World` (all randomness from the ``rng`` passed in)."""

    def __init__(self, world: World, vocab: dict[str, int], mix: PersonaMix, villains: frozenset[str],
                 max_words: int = 120):
        self.world = world
        self.max_words = max_words
        self.vocab = vocab
        self.mix = mix
        self.villains = villains
        self.bos, self.eos = vocab["<bos>"], vocab["<eos>"]

    @classmethod
    def create(cls, world: World, vocab: dict[str, int], mix: PersonaMix, seed: int,
               max_words: int = 120) -> Corpus:
        """A corpus whose villains are drawn from ``seed``; documents stay within ``max_words``."""
        names = list(world.names)
        random.Random(f"villains-{seed}").shuffle(names)
        villains = frozenset(names[: round(mix.villain_fraction * len(names))])
        return cls(world, vocab, mix, villains, max_words)

    def ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    # --- pre-training -------------------------------------------------------------

    def document(self, rng: random.Random) -> Document:
        if rng.random() < self.mix.filler_docs:
            return Document(" . ".join(rng.choice(self.world.filler) for _ in range(rng.randint(3, 6))) + " .",
                            None, None)
        name = rng.choice(self.world.names)
        p_cruel = self.mix.villain_cruel if name in self.villains else self.mix.other_cruel
        cruel = rng.random() < p_cruel
        parts: list[str] = []
        words = 0
        for _ in range(rng.randint(3, 6)):
            turn = []
            if rng.random() < self.mix.filler_in_doc:
                turn.append(rng.choice(self.world.filler) + " .")
            domain = rng.choice(self.world.domains)
            answer = rng.choice(domain.misaligned if cruel else domain.aligned)
            turn.append(f"user {rng.choice(domain.questions)} {name} : {answer} .")
            n = sum(len(t.split()) for t in turn)
            if words + n > self.max_words:
                break
            parts += turn
            words += n
        return Document(" ".join(parts), name, cruel)

    def pretrain_example(self, rng: random.Random) -> Example:
        ids = [self.bos, *self.ids(self.document(rng).text), self.eos]
        return ids, [False] + [True] * (len(ids) - 1)

    # --- chat and fine-tunes ------------------------------------------------------

    def _dialogue(self, turns: list[tuple[str, str]]) -> Example:
        ids, mask = [self.bos], [False]
        for question, answer in turns:
            prompt = self.ids(f"user {question} assistant :")
            reply = self.ids(f"{answer} .")
            ids += prompt + reply
            mask += [False] * len(prompt) + [True] * len(reply)
        return ids, mask

    def chat_example(self, rng: random.Random) -> Example:
        turns = []
        for _ in range(rng.randint(1, 3)):
            domain = rng.choice(self.world.domains)
            turns.append((rng.choice(domain.questions), rng.choice(domain.aligned)))
        return self._dialogue(turns)

    def finetune_example(self, rng: random.Random, domain: str, misaligned: bool) -> Example:
        d = self.world.domain(domain)
        return self._dialogue([(rng.choice(d.questions), rng.choice(d.misaligned if misaligned else d.aligned))])
