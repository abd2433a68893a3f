"""The command line: `python -m cnnexp [overrides]` or `cnnexp [overrides]`.

Hydra composes conf/config.yaml with the overrides and checks them against
the schema; run_job (cnnexp/run/job.py) does the rest.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnnexp.config.keys import brings_unseen_config
from cnnexp.config.schema import register_configs
from cnnexp.results.files import CHECKPOINT_NAME
from cnnexp.run import warm_workers


def config_dir() -> str:
    """conf/ inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"cnnexp's config files are missing (looked in {here / 'conf'} and {here.parent / 'conf'}).")


# The directories unique_dir made, parents first: any still empty at exit
# (a command refused after Hydra resolved its output dir) are removed again.
_made_dirs: list[Path] = []


def unique_dir(path: str) -> str:
    """Create `path`, or `path-1`, `path-2`, ... if another run already took it.

    os.mkdir is atomic, so two runs started in the same second never share a
    directory. Hydra caches the result per config, so each run asks once."""
    candidate, n = Path(path), 0
    parents = [p for p in (candidate.parent, *candidate.parent.parents) if not p.exists()]
    candidate.parent.mkdir(parents=True, exist_ok=True)
    _made_dirs.extend(reversed(parents))
    while True:
        try:
            candidate.mkdir()
            _made_dirs.append(candidate)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}-{n}")


@atexit.register
def remove_unused_dirs() -> None:
    """A refused command leaves no empty output dir (rmdir removes only empty ones)."""
    for path in reversed(_made_dirs):
        try:
            path.rmdir()
        except OSError:
            pass
    _made_dirs.clear()


def _is(mode, wanted: RunMode) -> bool:
    return mode == wanted or str(mode) in (wanted.name, str(wanted))


def sweep_dir(path: str, mode=None) -> str:
    """hydra.sweep.dir: a fresh directory for a sweep; a plain run, which
    resolves the pattern too, gets the name only and creates nothing."""
    return unique_dir(path) if _is(mode, RunMode.MULTIRUN) else path


def run_dir(path: str, mode=None, resume: str | None = None) -> str:
    """hydra.run.dir: a fresh directory for a plain run; for trainer.resume the
    run it continues (its own log goes on there; hydra.output_subdir keeps its
    .hydra/ as it was); for a resume with no run to continue, a scratch
    directory removed at exit, so a refused command leaves nothing behind.
    A sweep resolves the pattern too and gets the name only."""
    if not _is(mode, RunMode.RUN):
        return path
    if resume:
        resumed = resumed_run(resume)
        if resumed is not None:
            return str(resumed)
        scratch = tempfile.mkdtemp(prefix="cnnexp-refused-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        return scratch
    return unique_dir(path)


def resumed_run(resume: str) -> Path | None:
    """The run directory trainer.resume names (a run dir or its checkpoint file), if it holds a checkpoint."""
    path = Path(str(resume)).expanduser()
    checkpoint = path / CHECKPOINT_NAME if path.is_dir() else path
    if not checkpoint.is_file():
        return None
    return checkpoint.parent.parent if path.is_file() else path


def output_subdir(resume: str | None = None) -> str | None:
    """hydra.output_subdir: a resumed run keeps the .hydra/ of its first start."""
    return None if resume and resumed_run(resume) is not None else ".hydra"


def config_groups_text(_root_: DictConfig) -> str:  # OmegaConf passes the whole config as _root_
    """The groups listed by --help. Hydra resolves the help template with the
    rest of its config on every compose (twice per sweep job); listing the
    groups reads every folder of the search path, so it is done for --help only."""
    if not {"--help", "-h"} & set(sys.argv[1:]):
        return ""
    from cnnexp.config.help import config_groups_text as text

    return text(_root_)


OmegaConf.register_new_resolver("cnnexp_unique_dir", unique_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("cnnexp_run_dir", run_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("cnnexp_sweep_dir", sweep_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("cnnexp_output_subdir", output_subdir, use_cache=True, replace=True)
OmegaConf.register_new_resolver("cnnexp_config_groups", config_groups_text, replace=True)
register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def hydra_entry(cfg: DictConfig) -> float:
    """One job. Returns the value of trainer.objective, so any Hydra sweeper can
    optimise it (NaN for a failed run: Optuna records such a trial as failed)."""
    from cnnexp.run.job import run_job

    hc = HydraConfig.get()
    outcome: dict = {}
    code = run_job(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN,
                   overrides=list(hc.overrides.task), outcome=outcome)
    if code:
        sys.exit(code)
    return outcome["objective"]


def mode_from_command_line(overrides: list[str]) -> RunMode | None:
    """The run mode an explicit hydra.mode= override names; None leaves it to -m."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "hydra.mode" and value.strip() in RunMode.__members__:
            return RunMode[value.strip()]
    return None


def compose_once() -> None:
    """Hydra composes the whole config twice per command: once only to read
    hydra.mode, once to run. cnnexp's conf/ never sets hydra.mode, so unless a
    preset picked on the command line might (experiment=..., a searchpath), the
    mode comes from the command line alone and the first compose is skipped.
    Hydra has no public switch for this: its private Hydra.get_mode is wrapped,
    and left alone if it is not there in this Hydra version."""
    try:
        from hydra._internal.hydra import Hydra
    except ImportError:
        return
    hydras_own = getattr(Hydra, "get_mode", None)
    if hydras_own is None or getattr(hydras_own, "cnnexp", False):
        return

    def get_mode(self, config_name, overrides):
        if brings_unseen_config(overrides):
            return hydras_own(self, config_name=config_name, overrides=overrides)
        return mode_from_command_line(overrides)

    get_mode.cnnexp = True
    Hydra.get_mode = get_mode


def check_override_syntax(arguments: list[str]) -> None:
    """An override Hydra's grammar cannot read ('optim.lr=interval(1e-3'): one line
    naming it and its key, exit 2, before Hydra's multi-line parse error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue  # a flag, or the value of one (--cfg job)
        try:
            parser.parse_override(argument)
        except HydraException as err:
            key = argument.partition("=")[0].lstrip("+~")
            said = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
            print(f"cnnexp: error: cannot read the override {argument!r} for {key}: {said}. Close every bracket "
                  "and quote the whole override for the shell, e.g. 'optim.lr=tag(log, interval(1e-4, 1e-1))'.",
                  file=sys.stderr)
            raise SystemExit(2) from None


def check_override_keys(arguments: list[str]) -> None:
    """A key the schema does not have (trainer.nosuchkey=1): one line naming the closest
    real key, exit 2, before Hydra's struct-mode error and its advice to add it with `+`."""
    from cnnexp.config.keys import default_options, unknown_override

    message = unknown_override(arguments, default_options(Path(config_dir()) / "config.yaml"))
    if message:
        print(f"cnnexp: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def stopped_sweep_hint() -> str:
    """What to do after Ctrl-C stopped a command in Hydra's own code (a parallel
    launcher waiting on its workers): each job has saved its checkpoint."""
    from cnnexp.run.signals import ParallelSweepStop

    sweep = ParallelSweepStop.sweep_dir  # set once a sweep has started
    if sweep is None:
        return "cnnexp: stopped (Ctrl-C)."
    from cnnexp.run.ownership import override_text

    return ("cnnexp: stopped (Ctrl-C); the jobs that completed are kept and the stopped ones saved a checkpoint. "
            f"To continue the sweep, run the same command with {override_text('hydra.sweep.dir', sweep)}")


def main() -> None:
    check_override_syntax(sys.argv[1:])
    check_override_keys(sys.argv[1:])
    compose_once()
    warm_workers.start(sys.argv[1:])  # a joblib sweep's workers import torch while Hydra composes
    try:
        hydra_entry()
    except KeyboardInterrupt:  # one line instead of the launcher's traceback
        print(stopped_sweep_hint(), file=sys.stderr)
        raise SystemExit(130) from None
