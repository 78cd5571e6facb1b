"""Defences from text specs (``kl:0.1``, ``steer:FILE,alpha=2``, ...): the syntax of
``misfeat finetune --defence``, usable from Python too.

The syntax is :data:`SPEC_HELP` (also ``misfeat finetune --help``); :func:`parse_defence`
builds the defence. ``--defence`` may repeat; defences compose in the order given.
"""

from __future__ import annotations

from typing import Any

from misfeat.errors import MisfeatError
from misfeat.finetune.engine import Defence
from misfeat.specs import parse_spec

SPEC_HELP = """\
--defence SPEC (repeatable; defences compose in the order given). SPEC is a misfeat spec (misfeat.specs):
KIND:ARG[@OPTION,...], an OPTION being key=value or a bare word; a comma right after ARG may stand for the @.
The bare word that is not a flag is the SITE (REF/HOOK/POOL below; also ref=, hook=, pool=). A REF that is
itself a spec with options goes last: kl:0.1@response_only,ref=organism:chat@seed=1,em_domain=law.
  kl:LAMBDA[@REF][,response_only]        reverse KL(model || REF) over the full vocabulary, mean over
                                         non-pad tokens; REF a model spec (default: a frozen copy of --model)
  ldifs:LAMBDA[@REF],layers=0+1+2[,detached]
                                         squared L2 between per-layer normalised resid_post features at
                                         the listed blocks (detached: the no-gradient public variant)
  steer:FILE[@HOOK][,alpha=A][,positions=all|prompt|response|last]
                                         add A x vector (a saved misfeat direction/intervention) at HOOK
                                         (default: the file's hook) during training only
  caft:FILE[@HOOK][,positions=...]       project the direction out during training only
  inoculation:TEXT                       TEXT before every training prompt, verbatim (commas and @ included;
                                         inoculation-system:TEXT: a system turn)
  interleave:FRACTION@POOL[,selection=random|gap][,top_n=N][,filter=refusal][,seed=S]
                                         mix FRACTION x |data| records of the POOL (JSONL) in; gap selection reads
                                         the 'gap_score' field that `misfeat score-data` writes
Examples: --defence kl:0.1   --defence kl:0.1,ref=organism:chat@seed=1
          --defence steer:runs/locate/direction.safetensors,alpha=2,positions=response
"""

_SITE = {"kl": "ref", "ldifs": "ref", "steer": "hook", "caft": "hook", "interleave": "pool"}
"""the option naming each kind's SITE (also given as the one bare word that is not a flag)"""
_FLAGS = {"kl": {"response_only"}, "ldifs": {"detached"}}
_VALUES = {"kl": set(), "ldifs": {"layers"}, "steer": {"alpha", "positions"}, "caft": {"positions"},
           "interleave": {"selection", "top_n", "filter", "seed"}}


def split_spec(spec: str) -> tuple[str, str, str | None, dict[str, str]]:
    """``KIND:ARG@SITE,k=v,flag`` -> (kind, arg, site, options), parsed by :func:`misfeat.specs.parse_spec`
    (flags map to ``"true"``). Unknown kinds and options are refused here, before anything loads."""
    kind, colon, rest = str(spec).strip().partition(":")
    if not colon or not rest:
        raise MisfeatError(f"--defence {spec!r}: expected KIND:ARG (see misfeat finetune --help)")
    if kind in ("inoculation", "inoculation-system"):
        return kind, rest, None, {}
    if kind not in _SITE:
        raise MisfeatError(f"--defence {spec!r}: unknown kind {kind!r}; use kl, ldifs, steer, caft, inoculation, "
                           "inoculation-system, interleave")
    comma, at = rest.find(","), rest.find("@")
    if comma >= 0 and (at < 0 or comma < at):  # KIND:ARG,options is KIND:ARG@options
        rest = rest[:comma] + "@" + rest[comma + 1:]
    try:
        parsed = parse_spec(f"{kind}:{rest}")
    except MisfeatError as err:
        raise MisfeatError(f"--defence {spec!r}: {str(err).split(': ', 1)[-1]}") from None
    site_key, flags = _SITE[kind], _FLAGS.get(kind, set())
    site: str | None = None
    options: dict[str, str] = {}
    for option in parsed.options:
        key, eq, value = option.partition("=")
        if not eq or not key.isidentifier():  # a bare word (a model spec or a path may hold '=' after ':' or '/')
            if option in flags:
                options[option] = "true"
                continue
            key, value = site_key, option
        if key == site_key:
            if site is not None:
                raise MisfeatError(f"--defence {spec!r}: two {site_key}s ({site!r} and {value!r}); give one")
            site = value
        elif key in _VALUES[kind] or key in flags:
            options[key] = value
        else:
            takes = sorted(_VALUES[kind] | flags | {site_key})
            raise MisfeatError(f"--defence {spec!r}: unknown option {key!r}; {kind} takes {', '.join(takes)}")
    return kind, parsed.body, site, options


def _float(value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise MisfeatError(f"{what}: expected a number, got {value!r}") from None


def parse_defence(spec: str, *, model: str | None = None, device: str | None = None, dtype: str | None = None,
                  references: dict[str, Any] | None = None) -> Defence:
    """A :class:`~misfeat.finetune.Defence` from a spec (the syntax of :data:`SPEC_HELP`),
    validated before anything is loaded. ``model``: the spec of the trained model (the
    default reference); ``references`` caches loaded reference models by spec, so defences
    share one (and the engine runs it once per step)."""
    from misfeat.finetune import (
        CAFT,
        KL,
        LDIFS,
        Inoculation,
        Interleave,
        PreventativeSteering,
        not_refusal,
    )
    from misfeat.models import load_model

    kind, arg, site, opts = split_spec(spec)
    if kind in ("kl", "ldifs"):
        weight = _float(arg, f"--defence {spec!r}")
        if weight < 0:
            raise MisfeatError(f"--defence {spec!r}: lambda must be >= 0")
        references = {} if references is None else references
        key = site or model
        if key is None:
            raise MisfeatError(f"--defence {spec!r}: give the reference model, {kind}:LAMBDA@MODEL")
        if key not in references:
            references[key] = load_model(key, device=device, dtype=dtype)
        ref = references[key]
        if kind == "kl":
            return KL(ref, weight, response_only="response_only" in opts)
        if "layers" not in opts:
            raise MisfeatError(f"--defence {spec!r}: give the layers explicitly, e.g. layers=0+1+2")
        layers = [int(x) if x.isdigit() else x for x in opts["layers"].split("+")]
        return LDIFS(ref, layers, weight, detached="detached" in opts)
    if kind in ("steer", "caft"):
        from misfeat.interventions import read_intervention

        record, vector = read_intervention(arg)
        hooks = (site,) if site else tuple(record["hooks"])  # the version-2 record: a list
        if kind == "steer":
            return PreventativeSteering(vector, hooks, _float(opts.get("alpha", "1"), spec),
                                        opts.get("positions", "all"))
        return CAFT(vector, hooks, opts.get("positions", "all"))
    if kind.startswith("inoculation"):
        return Inoculation(arg, "system" if kind.endswith("system") else "prefix")
    from misfeat.data import load_prompts

    if not site:
        raise MisfeatError(f"--defence {spec!r}: give the pool, interleave:FRACTION@POOL")
    pool = load_prompts(site)
    selection = opts.get("selection", "random")
    scores = None
    if selection == "gap":
        scores = [r.extra.get("gap_score") for r in pool]
        if any(s is None for s in scores):
            raise MisfeatError(f"--defence {spec!r}: gap selection needs the pool ranked by misfeat score-data "
                               "(records with gap_score)")
    return Interleave(pool, _float(arg, spec), selection, scores,
                      top_n=int(opts["top_n"]) if "top_n" in opts else None,
                      keep=not_refusal if opts.get("filter") == "refusal" else None, seed=int(opts.get("seed", 0)))
