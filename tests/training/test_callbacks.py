"""MRPAuditCallback: files; every scalar read back from TensorBoard and trackio equals the comparison on disk;
tables; cached baseline; sharded audits equal one process."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from hf_mrp.audit import load_audit
from hf_mrp.audit.compare import compare_audits
from hf_mrp.data import Blocks
from hf_mrp.errors import MRPUserError
from hf_mrp.storage.files import read_parquet
from hf_mrp.training import MRPConfig, MRPTrainer
from hf_mrp.training.callbacks import MRPAuditCallback, breakdown_scalars, name_part

from helpers import F32_U, CharTokenizer, launched, tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def train_blocks(seed=1):
    ids = np.random.default_rng(seed).integers(0, 97, size=(8, 16))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``logdir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for folder in sorted({events.parent for events in logdir.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return scalars


def read_text(logdir: Path, tag: str) -> list[tuple[int, str]]:
    """The text (Markdown) entries of one TensorBoard tag: [(step, text)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = []
    for folder in sorted({events.parent for events in logdir.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        if tag in accumulator.Tags()["tensors"]:
            texts += [(e.step, e.tensor_proto.string_val[0].decode()) for e in accumulator.Tensors(tag)]
    return texts


def read_trackio(project: str) -> list[dict]:
    """Every row the run logged into trackio's local SQLite store."""
    from trackio.sqlite_storage import SQLiteStorage

    (run,) = SQLiteStorage.get_runs(project)
    return SQLiteStorage.get_logs(project, run)


@pytest.fixture
def trackio_store(tmp_path, monkeypatch):
    """trackio writes into a fresh local folder (it reads TRACKIO_DIR once, at import), never to the Hub."""
    import trackio  # noqa: F401  (imports every trackio module that holds TRACKIO_DIR)

    store = tmp_path / "trackio"
    store.mkdir()
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)
    for name, module in list(sys.modules.items()):
        if name.startswith("trackio") and isinstance(getattr(module, "TRACKIO_DIR", None), Path):
            monkeypatch.setattr(module, "TRACKIO_DIR", store)
    return store


def expected_by_step(out: Path) -> dict[int, dict[str, float]]:
    """Step -> class and bucket counts, read from the JSON on disk (step 0: the baseline, no flips)."""
    expected = {}
    for folder in out.glob("comparison_step_*"):
        result = json.loads((folder / "flip_audit.json").read_text())
        expected[int(folder.name.rsplit("_", 1)[1])] = {
            f"audit/{kind}/{name_part(label)}/{count}": group[count]
            for kind, key in (("class", "by_class"), ("bucket", "by_bucket"))
            for label, group in result[key].items()
            for count in ("w2r", "r2w", "net")
        }
    some = next(iter(expected.values()))
    expected[0] = dict.fromkeys(some, 0)
    return expected


@pytest.mark.slow  # trains and reads every reporter back
def test_every_breakdown_scalar_reaches_tensorboard_and_trackio_with_the_values_on_disk(
    blocks, tmp_path, monkeypatch, trackio_store
):
    out, logdir = tmp_path / "run", tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    args = dict(
        output_dir=str(out),
        report_to=["tensorboard", "trackio"],
        project="mrp-test",
        run_name="tiny",
        save_strategy="no",
        use_cpu=True,
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        eval_strategy="steps",
        eval_steps=2,
        disable_tqdm=True,
        seed=0,
    )
    callback = MRPAuditCallback(blocks, tokenizer=CharTokenizer())
    trainer = MRPTrainer(
        model=tiny_llama(),
        args=MRPConfig(**args),
        train_dataset=train_blocks(),
        eval_dataset=train_blocks(2),
        callbacks=[callback],
    )
    trainer.train()
    for folder in (
        "audit_before",
        "audit_step_2",
        "comparison_step_2",
        "audit_step_4",
        "comparison_step_4",
        "audit_after",
        "comparison",
    ):
        assert (out / folder).is_dir(), folder
    final = json.loads((out / "comparison" / "flip_audit.json").read_text())
    expected = compare_audits(load_audit(out / "audit_before"), load_audit(out / "audit_after"))
    assert final["w2r"] == expected["w2r"] and final["net"] == expected["net"]
    # float64 arithmetic on the same float32 columns (in memory, and read back from disk): approx's 1e-6 >> 2^-52
    assert final["median_margin_change"] == pytest.approx(expected["median_margin_change"])

    by_step = expected_by_step(out)
    assert sorted(by_step) == [0, 2, 4]
    names = set(by_step[2])
    assert {"audit/bucket/100+/r2w", "audit/bucket/1/net"} <= names and len(names) == 3 * (len(final["by_class"]) + 5)
    assert any(value for step in (2, 4) for value in by_step[step].values())  # training flipped something
    # step 4 holds the last evaluation and the train-end audit: the same model, so the same numbers
    assert {name: value for name, value in breakdown_scalars(final).items()} == by_step[4]

    tensorboard = read_scalars(logdir)
    trackio_rows = read_trackio("mrp-test")
    for name in sorted(names):
        logged = tensorboard["train/" + name]
        assert sorted({step for step, _ in logged}) == [0, 2, 4], name
        for step, value in logged:
            assert value == by_step[step][name], (name, step)
        tracked = [(row["train/global_step"], row["train/" + name]) for row in trackio_rows if "train/" + name in row]
        assert sorted({step for step, _ in tracked}) == [0, 2, 4], name
        for step, value in tracked:
            assert value == by_step[step][name], (name, step)
    for name in (
        "train/audit/churn",
        "train/audit/ece",
        "train/audit/w2r",
        "train/audit/gap_alpha",
        "train/loss_ce",
        "train/loss_mrp",
        "train/mean_margin",
    ):
        assert name in tensorboard, (name, sorted(tensorboard))
    # TensorBoard keeps a scalar as float32: one rounding, within F32_U of it
    assert [value for step, value in tensorboard["train/audit/ece"] if step == 0] == [
        pytest.approx(final["ece_before"], rel=F32_U, abs=0)
    ]
    assert tensorboard["train/audit/churn"][-1][1] == pytest.approx(final["churn"], rel=F32_U, abs=0)

    tables = [row for row in trackio_rows if "train/audit/table/class" in row]
    assert [row["train/global_step"] for row in tables] == [2, 4, 4]
    rows = {entry["class"]: entry for entry in tables[-1]["train/audit/table/class"]["_value"]}
    assert {label: (row["w2r"], row["r2w"], row["net"]) for label, row in rows.items()} == {
        label: (g["w2r"], g["r2w"], g["net"]) for label, g in final["by_class"].items()
    }
    gains = tables[-1]["train/audit/table/top_gain"]["_value"]
    assert [(row["token_id"], row["net"]) for row in gains] == [(e["token_id"], e["net"]) for e in final["top_gain"]]
    for name in ("bucket", "band", "top_loss"):
        assert "train/audit/table/" + name in tables[-1]
    text = read_text(logdir, "train/audit/table/bucket/text_summary")  # TensorBoard: Markdown in the Text tab
    assert [step for step, _ in text] == [2, 4, 4]
    assert f"| 100+ | {final['by_bucket']['100+']['n']} | {final['by_bucket']['100+']['w2r']} |" in text[-1][1]

    before_mtime = (out / "audit_before" / "audit.json").stat().st_mtime_ns
    again = MRPAuditCallback(blocks)
    trainer = MRPTrainer(
        model=tiny_llama(),
        args=MRPConfig(**{**args, "report_to": "none", "eval_strategy": "no"}),
        train_dataset=train_blocks(),
        callbacks=[again],
    )
    trainer.train()
    assert (out / "audit_before" / "audit.json").stat().st_mtime_ns == before_mtime  # cached, not redone


def test_a_baseline_on_disk_without_the_asked_layers_or_manifold_is_audited_again(blocks, tmp_path, caplog):
    """A baseline audit (a sweep's, or audit_before/ on resume) stands in only when it measured what this callback
    measures: reused as it stood, the comparison would silently lack the lens layers or the manifold asked for."""
    model = tiny_llama()
    plain = MRPAuditCallback(blocks, output_dir=tmp_path).audit(model, "plain")
    layered = MRPAuditCallback(blocks, output_dir=tmp_path, layers="all").audit(model, "layered")
    assert plain.layers is None and layered.layers is not None

    def cached(folder, **options):
        callback = MRPAuditCallback(blocks, baseline_dir=tmp_path / folder, output_dir=tmp_path / "run", **options)
        return callback._cached_baseline(model)

    assert cached("plain") is not None and cached("layered", layers="1") is not None  # a subset is enough
    with caplog.at_level("WARNING"):
        assert cached("plain", layers="all") is None
        assert cached("layered", layers="all", manifold=True) is None
    assert "has no lens rows for layers [0, 1" in caplog.text and "has no manifold statistics" in caplog.text


def test_callback_refuses_a_foreign_baseline_and_needs_its_trainer(blocks, tmp_path):
    from transformers import Trainer

    callback = MRPAuditCallback(blocks)
    trainer = Trainer(
        model=tiny_llama(),
        args=MRPConfig(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1, per_device_train_batch_size=4
        ),
        train_dataset=train_blocks(),
        callbacks=[callback],
    )
    with pytest.raises(Exception, match="attach"):
        trainer.train()


def copying_llama():
    """A tiny Llama that predicts its input token (next = current): the layers add nothing to the residual stream
    (o_proj and down_proj zero), so the final state is the RMS-normed embedding, and the head is the embedding
    matrix (a token's own row is the one most aligned with it)."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    return model


class NegateFinalNorm(TrainerCallback):
    """After the first step, every logit changes sign (the final norm's gains negated): each position's top-1 is
    its former last token, so a model that was always right is now always wrong."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                model.model.norm.weight.neg_()


@pytest.mark.parametrize("max_accuracy_drop", [10.0, 100.0, None])
def test_a_run_that_loses_its_accuracy_fails_as_collapsed(tmp_path, max_accuracy_drop):
    """max_accuracy_drop: an after-audit more than that many points of top-1 accuracy below the before-audit fails the
    run as collapsed, with one line naming the accuracies, the settings and the fix; 100 or None keep such a run."""
    from hf_mrp.training.divergence import TrainingCollapsed

    repeated = np.repeat(np.array([[3], [17], [42], [77]]), 16, axis=1)  # next token = current token, always
    audited = Blocks(repeated, n_positions=4 * 15, source="repeated")
    callback = MRPAuditCallback(audited, max_accuracy_drop=max_accuracy_drop, console=False)
    args = MRPConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2, per_device_train_batch_size=4,
        use_lora=False, learning_rate=1e-6,
    )  # fmt: skip
    trainer = MRPTrainer(
        model=copying_llama(), args=args, train_dataset=train_blocks(), callbacks=[callback, NegateFinalNorm()]
    )
    if max_accuracy_drop == 10.0:
        with pytest.raises(TrainingCollapsed) as failure:
            trainer.train()
        message = str(failure.value)
        fell = "top-1 accuracy on the 60 audited positions fell from 100.0% to 0.0% (100.0 points"
        assert message.startswith("training collapsed by step 2: ") and fell in message
        assert "more than max_accuracy_drop 10" in message and "mrp_ce_weight 1, mrp_lambda 0.6" in message
        assert "\n" not in message
    else:
        trainer.train()
    assert callback.comparison["accuracy_before"] == 1.0 and callback.comparison["accuracy_after"] == 0.0


def test_max_accuracy_drop_is_checked_when_the_callback_is_made(blocks):
    for bad in (-1, 100.5, "10", True, float("nan")):
        with pytest.raises(MRPUserError, match=r"a number in \[0, 100\] \(100: never\)"):
            MRPAuditCallback(blocks, max_accuracy_drop=bad)


@pytest.mark.integration  # the embedded model's tokenizer
def test_two_process_audit_equals_one_process(tmp_path):
    from transformers import AutoTokenizer

    from hf_mrp import models

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab=49152, layers=2).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(models.embedded_model_dir()).save_pretrained(model_dir)
    args = [
        "audit",
        "--model",
        str(model_dir),
        "--block_size",
        "32",
        "--max_positions",
        "300",
        "--batch_size",
        "1",
        "--layers",
        "all",
        "--manifold",
        "true",
        "--manifold_positions",
        "200",  # of 300: a sample, drawn over the gathered rows so that both runs read the same positions
    ]
    # Exact: every forward is one block in both runs (10 blocks, the last partly audited), so the same
    # kernels on the same shapes with one thread each; batches of 2 could be split 2+2+1 against 2+2+2+2+2, whose
    # matmuls of another shape may sum in another order on another CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for processes, name in ((1, "one"), (2, "two")):
        cli = ["-m", "hf_mrp.research.cli", *args, "--output_dir", str(tmp_path / name)]
        launched(cli, processes=processes, env=env, timeout=300)
    a, b = read_parquet(tmp_path / "one" / "positions.parquet"), read_parquet(tmp_path / "two" / "positions.parquet")
    for column in a:
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)
    summary = [json.loads((tmp_path / run / "audit.json").read_text()) for run in ("one", "two")]
    for s in summary:
        s["provenance"].pop("arguments")  # output_dir differs
    assert summary[0] == summary[1]
    assert (tmp_path / "one" / "layers.json").read_text() == (tmp_path / "two" / "layers.json").read_text()
    assert summary[0]["layers"]["manifold"]["sampled_positions"] == 200  # the manifold ran, on a sample


def read_images(logdir: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Every image of the TensorBoard event files under ``logdir``, decoded: tag -> [(step, H x W x C uint8)]."""
    import io

    from matplotlib import image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = {}
    for folder in sorted({events.parent for events in logdir.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        for tag in accumulator.Tags()["images"]:
            for event in accumulator.Images(tag):
                pixels = image.imread(io.BytesIO(event.encoded_image_string), format="png")
                images.setdefault(tag, []).append((event.step, (pixels[..., :3] * 255).round().astype(np.uint8)))
    return images


def test_audited_layers_reach_the_logs_and_their_pictures_reach_tensorboard(blocks, tmp_path, monkeypatch):
    """With ``layers``: every audit folder holds layers.json and the lens pictures; the per-layer scalars logged at
    step 0 (baseline) and at train end equal layers.json's rows; TensorBoard shows each picture at both steps with
    the PNG's pixels."""
    from hf_mrp.training.callbacks import LAYER_STATISTICS

    out, logdir = tmp_path / "run", tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    args = MRPConfig(
        output_dir=str(out),
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        disable_tqdm=True,
        seed=0,
    )
    callback = MRPAuditCallback(blocks, layers="all", manifold=True)
    MRPTrainer(model=tiny_llama(), args=args, train_dataset=train_blocks(), callbacks=[callback]).train()
    scalars, images = read_scalars(logdir), read_images(logdir)
    for step, folder in ((0, out / "audit_before"), (2, out / "audit_after")):
        rows = json.loads((folder / "layers.json").read_text())["layers"]
        assert [row["layer"] for row in rows] == [0, 1, 2]  # "all": every layer the lens reads
        for row in rows:
            for name, key in LAYER_STATISTICS.items():
                logged = dict(scalars[f"train/audit/layer/{row['layer']}/{name}"])
                # TensorBoard keeps float32: one rounding
                assert logged[step] == pytest.approx(row[key], rel=F32_U, abs=0), (step, row["layer"], name)
            manifold = {"participation_ratio", "intrinsic_dimension_twonn", "intrinsic_dimension_mle", "curvature"}
            for name in manifold:  # TensorBoard keeps float32: one rounding
                logged = dict(scalars[f"train/audit/layer/{row['layer']}/{name}"])
                assert logged[step] == pytest.approx(row[name], rel=F32_U), (step, row["layer"], name)
            logged = dict(scalars[f"train/audit/layer/{row['layer']}/variance_dims_90"])
            assert logged[step] == row["variance_dims"]["90"]
        for picture in ("layers", "lens_heatmap", "lens_curves", "manifold"):
            from matplotlib import image

            on_disk = (image.imread(str(folder / f"{picture}.png"))[..., :3] * 255).round().astype(np.uint8)
            shown = dict(images[f"train/audit/picture/{picture}"])
            assert np.array_equal(shown[step], on_disk), (step, picture)
    assert sorted(step for step, _ in images["train/audit/picture/lens_heatmap"]) == [0, 2]
    before = json.loads((out / "audit_before" / "layers.json").read_text())["layers"]
    after = json.loads((out / "audit_after" / "layers.json").read_text())["layers"]
    assert before != after  # training moved the layers: the two steps' numbers are not one audit twice


class FakeWandb:  # the wandb module as WandbCallback holds it: run, Table, Image, log
    run = object()
    Image = staticmethod(lambda path: ("image", path))

    def __init__(self):
        self.logged = []

    @staticmethod
    def Table(columns, data):
        return {"columns": columns, "data": data}

    def log(self, record):
        self.logged.append(record)


class WandbCallback:  # found by its class name, as the Trainer's own
    def __init__(self, wandb):
        self._wandb = wandb


class TensorBoardCallback:  # its writer fails: a dashboard never stops training
    class tb_writer:
        @staticmethod
        def add_text(*args):
            raise OSError("disk full")

        @staticmethod
        def add_image(*args, **kwargs):
            raise OSError("disk full")


def test_pictures_reach_wandb_and_a_failing_writer_is_skipped(tmp_path, caplog):
    from hf_mrp.training.pictures import log_pictures

    picture = tmp_path / "lens_heatmap.png"
    from matplotlib import pyplot

    figure = pyplot.figure(figsize=(1, 1))
    figure.savefig(picture)
    pyplot.close(figure)

    wandb = FakeWandb()
    reached = log_pictures([TensorBoardCallback(), WandbCallback(wandb)], {"lens_heatmap": picture}, step=3)
    assert reached == ["WandbCallback"] and "could not log the lens pictures to TensorBoardCallback" in caplog.text
    assert wandb.logged == [{"train/audit/picture/lens_heatmap": ("image", str(picture)), "train/global_step": 3}]
    assert log_pictures([WandbCallback(wandb)], {}, step=4) == [] and len(wandb.logged) == 1  # nothing to send


def test_label_names_stay_one_segment():
    assert [
        name_part(label) for label in ("100+", "2-4", "entity-like", "function word", "fragment/other", "<0.5")
    ] == ["100+", "2-4", "entity-like", "function_word", "fragment_other", "<0.5"]


def test_tables_reach_wandb_and_a_failing_reporter_is_skipped(caplog):
    from hf_mrp.training.tables import flip_tables, log_tables

    group = {"n": 4, "w2r": 2, "r2w": 1, "net": 1, "accuracy_before": 0.25, "accuracy_after": 0.5}
    comparison = {
        "by_class": {"entity": group},
        "by_bucket": {"1": group, "100+": group},
        "accuracy_by_margin_band": {"<0.5": group},
        "top_gain": [{"token": " x", "token_id": 7, "w2r": 2, "r2w": 0, "net": 2}],
        "top_loss": [],
    }
    wandb = FakeWandb()
    reached = log_tables([TensorBoardCallback(), WandbCallback(wandb)], flip_tables(comparison), step=6)
    assert reached == ["WandbCallback"] and "disk full" in caplog.text
    (record,) = wandb.logged
    assert record["train/global_step"] == 6
    assert record["train/audit/table/bucket"] == {
        "columns": ["bucket", "n", "w2r", "r2w", "net", "accuracy_before", "accuracy_after"],
        "data": [["1", 4, 2, 1, 1, 0.25, 0.5], ["100+", 4, 2, 1, 1, 0.25, 0.5]],
    }
    assert record["train/audit/table/top_gain"]["data"] == [[" x", 7, 2, 0, 2]]
    assert record["train/audit/table/top_loss"]["data"] == []
