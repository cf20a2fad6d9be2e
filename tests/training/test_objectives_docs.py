"""docs/objectives.md as written: the user's file of objectives, trained through MRPTrainer, `hf-mrp refine
--objectives_module` and the sweep's flags; and its table of objectives, equal to the registry's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_mrp.ops.objectives import objectives_table, registry

from helpers import ROOT, dataset, tiny_llama, tiny_refine_flags

DOC = ROOT / "docs" / "objectives.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def user_file(folder: Path) -> Path:
    """The docs' `my_objectives.py`, written where the user keeps it."""
    (block,) = [text for text in code_blocks("python") if text.startswith("# my_objectives.py")]
    path = folder / "my_objectives.py"
    path.write_text(block, encoding="utf-8")
    return path


@pytest.fixture
def restore_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_the_docs_table_is_the_registrys(restore_registry):
    registry._REGISTRY = {name: record for name, record in registry._REGISTRY.items() if record.builtin}
    text = DOC.read_text(encoding="utf-8")
    table = text.split("<!-- objectives table: generated -->\n")[1].split("\n<!-- end of the objectives table -->")[0]
    assert table == objectives_table()


def test_the_docs_example_trains_through_mrp_trainer(tmp_path, monkeypatch, restore_registry):
    """The file and the Python block run as written (``model`` and ``train`` given, in a scratch folder); then the
    trained model's loss is CE + 0.5 x the mean hinge over the valid positions: the user's function."""
    monkeypatch.chdir(tmp_path)
    user_file(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_objectives", raising=False)
    (usage,) = [text for text in code_blocks("python") if text.startswith("import my_objectives")]
    namespace = {"model": tiny_llama(), "train": dataset()}
    exec(usage, namespace)
    trainer = namespace["trainer"]
    assert trainer.args.mrp_settings.record.penalty is sys.modules["my_objectives"].hinge
    assert trainer.state.global_step > 0 and (tmp_path / "out").is_dir()
    ids, labels = (torch.tensor(namespace["train"][key]) for key in ("input_ids", "labels"))
    loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": labels})
    with torch.no_grad():
        z = trainer.model(input_ids=ids).logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != -100
    top = z[valid].topk(2, -1).values
    want = F.cross_entropy(z[valid], targets[valid]) + 0.5 * torch.relu(1.0 - (top[:, 0] - top[:, 1])).mean()
    # the same float32 model and logits; the fused loss sums in float32 chunks: ~1e-6 relative
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-5)


def test_the_docs_example_trains_through_hf_mrp_refine(tiny_model_dir, tmp_path):
    """`hf-mrp refine --objectives_module my_objectives.py --mrp_objective hinge` in a fresh process: the file is
    imported before the flags are checked, the run trains the hinge, and --help lists it."""
    path = user_file(tmp_path)
    (command,) = [line for line in code_blocks("bash")[0].splitlines() if line.startswith("hf-mrp refine")]
    argv = command.split()[1:]
    assert argv[:4] == ["refine", "--objectives_module", "my_objectives.py", "--mrp_objective"]
    argv[2] = str(path)
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "hf_mrp.research.cli"]
    flags = tiny_refine_flags(tiny_model_dir, out, use_cpu="true", report_to="none")
    run = subprocess.run([*cli, *argv, *flags], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((out / "mrp_config.json").read_text())["mrp_objective"] == "hinge"
    log = json.loads((out / "training_log.json").read_text())
    assert any("loss_mrp" in json.dumps(row) for row in (log if isinstance(log, list) else [log]))
    help_text = subprocess.run(
        [*cli, "refine", "--objectives_module", str(path), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    ).stdout
    assert "'hinge'" in help_text
    unknown = subprocess.run(
        [*cli, "refine", "--mrp_objective", "hinge", "--output_dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert unknown.returncode == 2 and "unknown mrp_objective 'hinge'" in unknown.stderr.strip().splitlines()[-1]


def test_the_sweep_accepts_the_users_objectives(tmp_path, restore_registry):
    """`hf-mrp sweep --objectives_module F --objectives hinge ...`: the file is imported first (cli.run_command),
    then --objectives and the flag passed through to every run are accepted."""
    from hf_mrp.research.cli import _flag_value
    from hf_mrp.research.commands.sweep import parse_arguments

    argv = ["--objectives_module", str(user_file(tmp_path)), "--objectives", "hinge", "fisher", "--seeds", "0"]
    registry.load_objectives_module(_flag_value(argv, "--objectives_module"))
    args, rest = parse_arguments(argv)
    assert args.objectives == ["hinge", "fisher"] and rest == argv[:2]
