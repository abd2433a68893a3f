"""The command line: `python -m cnnexp [overrides]` or `cnnexp [overrides]`.

Hydra composes conf/config.yaml with the overrides and checks them against
the schema; run_job (cnnexp/run/job.py) does the rest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnnexp.config.help import config_groups_text
from cnnexp.config.schema import register_configs


def config_dir() -> str:
    """conf/ inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"cnnexp's config files are missing (looked in {here / 'conf'} and {here.parent / 'conf'}).")


def unique_dir(path: str) -> str:
    """Create `path`, or `path-1`, `path-2`, ... if another run already took it.

    os.mkdir is atomic, so two runs started in the same second never share a
    directory. Hydra caches the result per config, so each run asks once."""
    candidate, n = Path(path), 0
    candidate.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = Path(f"{path}-{n}")


OmegaConf.register_new_resolver("cnnexp_unique_dir", unique_dir, use_cache=True, replace=True)
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


def main() -> None:
    hydra_entry()
