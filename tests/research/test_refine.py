"""examples/refine.py end to end on a tiny model: files, model card, failed push that loses nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import FAKE_TOKEN, flags

ROOT = Path(__file__).resolve().parents[2]


def test_refine_saves_everything_then_reports_a_failed_push(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN}
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "refine.py"),
            *flags(
                model=tiny_model_dir,
                output_dir=out,
                block_size=32,
                max_positions=248,
                audit_positions=62,
                audit_layers="0-1",
                manifold="true",
                manifold_positions=40,
                max_steps=2,
                lora_layers=2,
                use_cpu="true",
                disable_tqdm="true",
                push_to_hub="true",
                hub_model_id="someone/refined",
                hub_token=FAKE_TOKEN,
            ),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "push to the Hub repo 'someone/refined' failed" in last and "nothing is lost" in last
    assert "Traceback" not in run.stderr
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "mrp_config.json",
        "training_log.json",
        "audit_before/audit.json",
        "audit_after/positions.parquet",
        "comparison/flip_audit.json",
        "comparison/flip_audit.md",
        "comparison/net_by_class.png",
        "audit_before/layers.json",
        "audit_after/lens_heatmap.png",
    ):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "| mrp_objective | fisher |" in card and "median margin" in card
    assert "W->R" in card and "comparison/gap_curves.png" in card
    for audit in ("audit_before", "audit_after"):  # --audit_layers: the lens pictures of both audits
        for picture in ("layers", "lens_heatmap", "lens_curves", "manifold"):
            assert f"![{audit} {picture}]({audit}/{picture}.png)" in card, (audit, picture)
    # --manifold: 40 of the 62 audited positions, the comparison's picture and the card's table before -> after
    assert "comparison/manifold.png" in card and "(40 of 62 audited positions" in card
    assert [row["layer"] for row in json.loads((out / "audit_after" / "layers.json").read_text())["layers"]] == [0, 1]
    for path in out.rglob("*"):  # the token never reaches a written file
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    assert FAKE_TOKEN not in run.stdout + run.stderr

    from peft import PeftModel

    from helpers import tiny_llama

    model = PeftModel.from_pretrained(tiny_llama(vocab=49152), out).eval()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert json.loads((out / "audit_after" / "audit.json").read_text())["n_positions"] == 62
