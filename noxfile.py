"""Sessions: `nox -s tests` (the suite), `nox -s lint` (ruff), `nox -s bench` (timings, not tests)."""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    session.install(".[test,all]")  # the trackers' tests read back what TensorBoard and MLflow stored
    # Most tests wait on a CLI subprocess of their own: one worker per core halves the
    # suite's wall time. A file's tests share a worker, so its shared runs and the
    # SLURM cluster's jobs are not split across workers.
    session.run("pytest", "-n", "auto", "--dist", "loadfile", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "cnnexp", "hydra_plugins", "tests", "benchmarks", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side timings of the engine: nox -s bench [-- --steps 3000 --repeats 5]."""
    session.install(".")
    session.run("python", "benchmarks/bench_engine.py", *session.posargs)


@nox.session
def bench_sweep(session: nox.Session) -> None:
    """Sweep throughput, basic against joblib launcher: nox -s bench_sweep [-- --repeats 5]."""
    session.install(".")
    session.run("python", "benchmarks/bench_sweep.py", *session.posargs)


@nox.session
def bench_recipe(session: nox.Session) -> None:
    """The fast94 step against a plain PyTorch loop: nox -s bench_recipe [-- --batch 1024 --repeats 5]."""
    session.install(".")
    session.run("python", "benchmarks/bench_recipe.py", *session.posargs)


@nox.session
def bench_startup(session: nox.Session) -> None:
    """Start-up and per-job overhead of a run, a sweep and a search: nox -s bench_startup [-- --repeats 5]."""
    session.install(".[search]")  # the 4-trial search needs Optuna
    session.run("python", "benchmarks/bench_startup.py", *session.posargs)
