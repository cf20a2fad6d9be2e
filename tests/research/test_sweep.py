"""The sweep's plan, its reserved flags and its pairing of runs with their controls (the sweep end to end, on
Ray: test_sweep_ray.py)."""

import sys

import numpy as np
import pytest

from hf_mrp.errors import MRPUserError
from hf_mrp.research import cli
from hf_mrp.research.commands.sweep import parse_arguments as parse_sweep_arguments
from hf_mrp.research.sweep import SweepArguments, plan_runs
from hf_mrp.research.sweep.metrics import METRIC_KEYS
from hf_mrp.research.sweep.run_statistics import row_means, with_attributable


def test_plan_names_and_reserved_flags():
    args, rest = parse_sweep_arguments(
        [
            "--objectives",
            "fisher",
            "margin",
            "--lambdas",
            "0.3",
            "1.0",
            "0",
            "--seeds",
            "2",
            "--max_steps",
            "5",
            "--block_size",
            "64",
        ]
    )
    assert rest == ["--max_steps", "5", "--block_size", "64"] and args.lambdas == [0.3, 1.0]
    names = [spec.name for spec in plan_runs(args)]
    assert names == [
        "control_lam0_seed2",
        "fisher_lam0.3_seed2",
        "fisher_lam1_seed2",
        "margin_lam0.3_seed2",
        "margin_lam1_seed2",
    ]
    assert [spec.train_objective for spec in plan_runs(args)][0] == "fisher"
    for flag in ("--seed", "--mrp_lambda=0.1", "--mrp_objective", "--push_to_hub"):
        with pytest.raises(MRPUserError, match="set by the sweep"):
            parse_sweep_arguments([flag, "1"])
    with pytest.raises(MRPUserError, match="unknown objective"):
        SweepArguments(objectives=["nope"])


def test_attributable_and_row_means_pair_runs_with_their_controls():
    net = METRIC_KEYS.index("net")
    table = np.zeros((2, 4, len(METRIC_KEYS) - 1))  # [resamples, runs, per-run metrics]
    table[:, :, net] = [[10, 15, 4, 9], [11, 14, 5, 7]]  # runs: control s0, run s0, control s1, run s1
    full = with_attributable(table, np.array([-1, 0, -1, 2]))
    np.testing.assert_array_equal(full[..., -1], [[np.nan, 5, np.nan, 5], [np.nan, 3, np.nan, 2]])
    rows = row_means(full, [[0, 2], [1, 3]])
    np.testing.assert_array_equal(rows[..., net], [[7, 12], [8, 10.5]])
    np.testing.assert_array_equal(rows[..., -1], [[np.nan, 5], [np.nan, 2.5]])


def test_without_ray_the_sweep_says_in_one_line_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    out = tmp_path / "sweep"
    assert (
        cli.main(["sweep", "--output_dir", str(out), "--objectives", "margin", "--lambdas", "1", "--seeds", "0"]) == 2
    )
    err = capsys.readouterr().err
    assert err == (
        "hf-mrp sweep: error: the sweep runs on Ray, which is not installed here: "
        "pip install 'hf_mrp[sweep]'  (or: pip install 'ray[tune,train]==2.60.0')\n"
    ), err
    assert not out.exists()  # refused before any work


def test_resources_of_a_run_and_how_many_go_at_once(monkeypatch, tmp_path):
    """A run holds its CPUs and GPUs as its trial; on several processes its Train workers hold them and the trial
    only WAITING_CPU, so no more such runs go at once than the cluster holds whole (else each would hold part of
    what its workers wait for); a run larger than the cluster is refused in one line."""
    import ray

    from hf_mrp.research.sweep.engine import check_fits, concurrency, trial_resources
    from hf_mrp.research.sweep.trial import WAITING_CPU, TrialSetup

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 4.0})
    args = SweepArguments(objectives=["margin"], lambdas=[1.0], seeds=[0])
    setup = TrialSetup({}, tmp_path, tmp_path / "baseline", str(tmp_path), processes=1, cpus=2.0, gpus=1.0)
    assert trial_resources(setup) == {"cpu": 2.0, "gpu": 1.0} and concurrency(args, setup) is None
    several = setup._replace(processes=2, gpus=2.0)
    assert trial_resources(several) == {"cpu": WAITING_CPU, "gpu": 0}
    assert concurrency(args, several) == 2  # 4 GPUs // 2 (8 CPUs // 2 would allow 4)
    args.max_concurrent_runs = 1
    assert concurrency(args, several) == 1
    with pytest.raises(MRPUserError, match="a run asks for 16 CPUs .--cpus_per_run. but the Ray cluster has 8"):
        check_fits(setup._replace(cpus=16.0))


def test_a_stopped_sweep_names_its_unfinished_runs_and_ends_as_an_interrupt(capsys):
    """Ctrl-C reaches Ray Tune first, which ends its trials and returns: a run it stopped (no status) and the runs it
    never started (no config) are named in one line, then KeyboardInterrupt (hf-mrp's exit 130), not a traceback
    of the bookkeeping; finished and failed runs are what they were."""
    from types import SimpleNamespace

    from hf_mrp.research.sweep.engine import outcomes
    from hf_mrp.research.sweep.trial import FAILED, FINISHED

    args = SweepArguments(objectives=["margin"], lambdas=[0.5, 1.0, 2.0], seeds=[0, 1])
    todo = plan_runs(args)
    names = [spec.name for spec in todo]

    def result(config, metrics=None, error=None):
        return SimpleNamespace(config=config, metrics=metrics, error=error)

    done = [
        result({"run": names[0]}, {"status": FINISHED}),
        result({"run": names[1]}, {"status": FAILED, "reason": "training diverged at step 2"}),
    ]
    assert outcomes(done, todo[:2]) == ([names[0]], {names[1]: "training diverged at step 2"})
    stopped = [*done, result({"run": names[2]}, {"status": "RUNNING", "step": 3}), *[result({}) for _ in names[3:]]]
    with pytest.raises(KeyboardInterrupt):
        outcomes(stopped, todo)
    line = capsys.readouterr().out.strip()
    assert line == (
        f"the sweep was stopped before {len(names) - 2} runs finished ({', '.join(names[2:5])} and "
        f"{len(names) - 5} more); run the same command again to finish them (finished runs are kept)"
    )
