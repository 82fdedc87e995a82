"""Hyperparameter search campaigns: a space-filling design of trials, run by the job templates.

`exaforce jobs campaign --mode search --trials 8 --param optim.lr=log:1e-4:1e-2 --param
model.width=choice:32,64 …` renders one job per trial (the config with the trial's values as
`--set` overrides) under OUT/trials/tNNNN/, OUT/search.json (the trials and their parameters) and
OUT/submit.sh; `exaforce perf report OUT` ranks the trials (exaforce.perf.search).

The trials are chosen all at once, before any runs (batch jobs run independently), as a scrambled
Sobol sequence (scipy.stats.qmc, seeded): even coverage of the space, better than independent random
draws for a handful of trials. Not Optuna, which the issue suggested: its quasi-Monte-Carlo sampler
samples relative to finished trials and falls back to plain random draws for a batch asked up front,
and a sequential, model-based sampler (TPE) needs finished trials to improve on random draws.

A parameter is `KEY=KIND:ARGS`: `float:LOW:HIGH`, `log:LOW:HIGH` (log-uniform), `int:LOW:HIGH`,
`choice:A,B,C` (numbers, true/false, or strings).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exaforce import config as config_mod
from exaforce.jobs import JOB_MACHINES, JobError, JobRequest, write_job, write_manifest_and_submit
from exaforce.perf.search import SEARCH_FILE, SEARCH_SCHEMA


@dataclass(frozen=True)
class Param:
    """One dimension of the search space."""

    key: str                 # dotted config key, e.g. optim.lr
    kind: str                # float | log | int | choice
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def value(self, u: float) -> Any:
        """The point of this dimension at u ∈ [0, 1) (a coordinate of the Sobol sequence)."""
        if self.kind == "choice":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.kind == "int":
            return int(min(self.low + int(u * (self.high - self.low + 1)), self.high))
        if self.kind == "log":
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))


def _choice(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_param(spec: str) -> Param:
    """`KEY=KIND:ARGS` → Param; every error names the --param and says what is expected."""
    where = f"--param {spec!r}"
    key, sep, rest = spec.partition("=")
    kind, _, args = rest.partition(":")
    if not sep or "." not in key or not args:
        raise JobError(f"{where}: expected SECTION.KEY=KIND:ARGS, e.g. optim.lr=log:1e-4:1e-2 or model.width=choice:32,64")
    if kind == "choice":
        choices = tuple(_choice(c) for c in args.split(",") if c.strip())
        if len(choices) < 2:
            raise JobError(f"{where}: choice needs at least two values, comma-separated")
        return Param(key, kind, choices=choices)
    if kind not in ("float", "log", "int"):
        raise JobError(f"{where}: KIND must be float, log, int or choice")
    try:
        low, high = (float(v) for v in args.split(":"))
    except ValueError:
        raise JobError(f"{where}: {kind} needs LOW:HIGH numbers") from None
    if not low < high or (kind == "log" and low <= 0) or (kind == "int" and (low != int(low) or high != int(high))):
        raise JobError(f"{where}: need LOW < HIGH{' > 0' if kind == 'log' else ''}"
                       f"{' (integers)' if kind == 'int' else ''}")
    return Param(key, kind, low, high)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return str(value)


def sample_trials(params: list[Param], trials: int, seed: int) -> list[dict[str, Any]]:
    """`trials` points of the space: a scrambled Sobol sequence (deterministic for a seed)."""
    import warnings

    from scipy.stats import qmc

    with warnings.catch_warnings():  # scipy warns that a count other than a power of 2 is less balanced
        warnings.simplefilter("ignore", UserWarning)
        points = qmc.Sobol(d=len(params), scramble=True, seed=seed).random(trials)
    return [{p.key: p.value(float(u)) for p, u in zip(params, row)} for row in points]


def render_search(machine_name: str, request: JobRequest, out_dir: Path, params: list[Param], trials: int,
                  seed: int = 0) -> Path:
    """One job per trial under OUT/trials/tNNNN/, OUT/search.json and OUT/submit.sh."""
    if trials < 1:
        raise JobError(f"--trials {trials}: must be >= 1")
    if not params:
        raise JobError("--mode search needs at least one --param KEY=KIND:ARGS")
    if len({p.key for p in params}) != len(params):
        raise JobError(f"--param: a key appears twice ({[p.key for p in params]})")
    machine = JOB_MACHINES.get(machine_name)
    if machine is None:
        raise JobError(f"--machine {machine_name!r}: known machines are {sorted(JOB_MACHINES)}")
    out_dir = Path(out_dir).resolve()
    if (out_dir / SEARCH_FILE).exists():
        raise JobError(f"{out_dir} already holds a search ({SEARCH_FILE}); choose a new --out")
    sampled = sample_trials(params, trials, seed)
    overrides_of = [tuple(f"{key}={_toml_value(value)}" for key, value in values.items()) for values in sampled]
    for i, overrides in enumerate(overrides_of):  # every trial's config is checked before anything is written
        try:
            config_mod.validate(config_mod.load(request.config, (*request.overrides, *overrides)))
        except config_mod.ConfigError as err:
            raise JobError(f"trial t{i:04d} ({', '.join(overrides)}): {err}") from None
    entries = []
    for i, (values, overrides) in enumerate(zip(sampled, overrides_of)):
        name = f"t{i:04d}"
        job = dataclasses.replace(request, job_name=f"{request.job_name}-search-{name}",
                                  overrides=(*request.overrides, *overrides))
        entries.append({"name": name, "params": values, "overrides": list(overrides),
                        **write_job(machine_name, job, out_dir / "trials" / name, out_dir)})
    manifest = {"schema": SEARCH_SCHEMA, "machine": machine.name, "config": str(Path(request.config).resolve()),
                "overrides": list(request.overrides), "sampler": f"scrambled Sobol sequence (scipy.stats.qmc, seed {seed})",
                "space": [dataclasses.asdict(p) for p in params], "trials": entries}
    write_manifest_and_submit(out_dir, SEARCH_FILE, manifest, machine.scheduler, [e["job"] for e in entries])
    return out_dir
