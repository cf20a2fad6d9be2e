"""Hub pushes during training, against a local stand-in for the Hub API that records every upload:
what each hub_strategy pushes when, that the token never travels in a file, and that a failed push
mid-training neither stops training nor loses a local file."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from hf_mrp.research.reports.model_card import card_from_folder
from hf_mrp.training import MRPConfig, MRPTrainer
from hf_mrp.training.callbacks import MRPAuditCallback
from hf_mrp.training.hub import HubPushCallback, push_folder

from helpers import FAKE_TOKEN, CharTokenizer, tiny_llama

MODEL_FILES = {"adapter_config.json", "adapter_model.safetensors"}


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: keeps each upload's files (path -> sha256) as they were sent."""

    def __init__(self, fail_uploads: tuple[int, ...] = (), watch: Path | None = None):
        self.uploads: list[dict] = []
        self.repos: list[str] = []
        self.tokens: set = set()
        self.fail_uploads, self.watch = fail_uploads, watch
        self.local_at_failure: dict[str, bytes] = {}

    def __call__(self, token=None, **kwargs):  # HfApi(token=...)
        self.tokens.add(token)
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.repos.append(repo_id)
        return f"https://hub.local/{repo_id}"

    def upload_folder(self, folder_path, repo_id, commit_message="", ignore_patterns=None, **kwargs):
        index = len(self.uploads)
        folder = Path(folder_path)
        files = {}
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if path.is_file() and not any(
                Path(relative).match(p) or relative.startswith(p.rstrip("*")) for p in ignore_patterns or []
            ):
                data = path.read_bytes()
                assert FAKE_TOKEN.encode() not in data, relative  # the token never travels inside a file
                files[relative] = hashlib.sha256(data).hexdigest()
        card = folder / "README.md"
        self.uploads.append(
            {
                "message": commit_message,
                "files": files,
                "repo": repo_id,
                "card": card.read_text() if card.is_file() else None,
            }
        )
        if index in self.fail_uploads:
            self.local_at_failure = {
                p.relative_to(self.watch).as_posix(): p.read_bytes()
                for p in self.watch.rglob("*")
                if p.is_file() and "runs" not in p.parts
            }
            raise OSError("Connection reset by peer (simulated)")
        return f"https://hub.local/{repo_id}/commit/{index}"


def train_blocks(seed=1):
    ids = np.random.default_rng(seed).integers(0, 97, size=(8, 16))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def train_with_pushes(blocks, out: Path, strategy: str, hub: RecordingHub, monkeypatch) -> HubPushCallback:
    monkeypatch.setattr("huggingface_hub.HfApi", hub)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # event files in <output_dir>/runs
    config = MRPConfig(
        output_dir=str(out),
        report_to="tensorboard",
        use_cpu=True,
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
        seed=0,
        hub_token=FAKE_TOKEN,
        hub_strategy=strategy,
    )
    settings = config.to_dict()
    push = HubPushCallback(
        "someone/refined",
        out,
        config.hub_token,
        hub_strategy=config.hub_strategy,
        always_push=True,
        card=lambda folder, step: card_from_folder(folder, settings, step),
    )
    trainer = MRPTrainer(
        model=tiny_llama(),
        args=config,
        train_dataset=train_blocks(),
        eval_dataset=train_blocks(2),
        callbacks=[MRPAuditCallback(blocks, tokenizer=CharTokenizer()), push],
    )
    trainer.train()
    return push


def folders(files) -> set[str]:
    return {name.split("/", 1)[0] for name in files if "/" in name}


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "end"])
@pytest.mark.slow  # training runs with pushes
def test_each_hub_strategy_pushes_adapter_audits_and_event_files_at_each_save(blocks, tmp_path, monkeypatch, strategy):
    out, hub = tmp_path / "run", RecordingHub()
    push = train_with_pushes(blocks, out, strategy, hub, monkeypatch)
    assert push.failures == []
    if strategy == "end":
        assert hub.uploads == [] and hub.repos == []  # nothing during training
    else:
        assert [u["message"] for u in hub.uploads] == [
            "hf_mrp: training in progress, step 2",
            "hf_mrp: training in progress, step 4",
        ]
        assert hub.repos == ["someone/refined"] and hub.tokens == {FAKE_TOKEN}  # the token authenticates only
        for step, upload in zip((2, 4), hub.uploads):
            files = upload["files"]
            assert MODEL_FILES <= set(files) and "README.md" in files
            evaluated = {f"audit_step_{s}" for s in (2, 4) if s <= step} | {
                f"comparison_step_{s}" for s in (2, 4) if s <= step
            }
            expected = (
                {"audit_before", "runs"} | evaluated | ({"last-checkpoint"} if strategy == "checkpoint" else set())
            )
            assert folders(files) == expected, (step, folders(files))
            assert any("events.out.tfevents" in name for name in files if name.startswith("runs/"))
            assert f"comparison_step_{step}/flip_audit.json" in files and "audit_before/positions.parquet" in files
            assert not {"training_args.bin", "optimizer.pt", "trainer_state.json"} & set(files)
            local = out / f"checkpoint-{step}" / "adapter_model.safetensors"
            assert files["adapter_model.safetensors"] == hashlib.sha256(local.read_bytes()).hexdigest()
            card = upload["card"]  # the card of the run so far: its step, base model, each evaluation's flips
            assert f"Training in progress: step {step} of 4" in card and "Base model: not recorded" in card
            assert "## Flip audit at each evaluation step" in card and f"Step {step}: flips by token class" in card
            assert ("Step 4: flips" in card) == (step == 4)
            if strategy == "checkpoint":
                assert {
                    "last-checkpoint/optimizer.pt",
                    "last-checkpoint/trainer_state.json",
                    "last-checkpoint/adapter_model.safetensors",
                } <= set(files)
                assert "last-checkpoint/training_args.bin" not in files  # a pickle: never pushed
    # the final push of the finished folder carries the event files and every per-step comparison too
    commit = push_folder(out, "someone/refined", FAKE_TOKEN)
    final = hub.uploads[-1]["files"]
    assert commit.startswith("https://hub.local/") and {"comparison_step_2", "comparison_step_4", "runs"} <= folders(
        final
    )
    assert not any(name.startswith("checkpoint-") or name.endswith("training_args.bin") for name in final)


@pytest.mark.slow  # training runs with pushes
def test_a_failed_push_mid_training_neither_stops_training_nor_loses_a_local_file(blocks, tmp_path, monkeypatch):
    out = tmp_path / "run"
    hub = RecordingHub(fail_uploads=(0,), watch=out)
    push = train_with_pushes(blocks, out, "every_save", hub, monkeypatch)
    assert len(push.failures) == 1 and "step 2" in push.failures[0] and "Connection reset" in push.failures[0]
    assert push.pushed == [4]  # training went on and the next save pushed again
    assert (out / "audit_after" / "audit.json").is_file() and (out / "checkpoint-4").is_dir()
    assert hub.local_at_failure and "comparison_step_2/flip_audit.json" in hub.local_at_failure
    for name, data in hub.local_at_failure.items():  # every local file at the failure is still there, unchanged
        assert (out / name).read_bytes() == data, name
    assert {"comparison_step_2", "comparison_step_4", "audit_step_2"} <= folders(hub.uploads[1]["files"])


def test_an_unknown_hub_strategy_is_one_clear_error():
    from hf_mrp.errors import MRPUserError

    with pytest.raises(MRPUserError, match="unknown hub_strategy 'sometimes'; choose one of every_save"):
        HubPushCallback("someone/refined", hub_strategy="sometimes")


def test_refine_pushes_at_each_save_then_the_finished_folder(tiny_model_dir, tmp_path, monkeypatch):
    from hf_mrp.research.arguments import DataArguments, ModelArguments
    from hf_mrp.research.commands.refine import parse_arguments
    from hf_mrp.research.refine import RefineArguments, refine

    assert parse_arguments([])[3].report_to == ["tensorboard"]  # examples/refine.py logs to TensorBoard by default
    tracked = parse_arguments(["--report_to", "trackio", "--trackio_space_id", "you/mrp-dashboard"])[3]
    assert tracked.report_to == ["trackio"] and tracked.trackio_space_id == "you/mrp-dashboard"
    assert parse_arguments(["--report_to", "tensorboard,trackio"])[3].report_to == ["tensorboard", "trackio"]
    from hf_mrp.errors import MRPUserError

    with pytest.raises(MRPUserError, match="unknown reporter 'tensorbord' in --report_to"):
        parse_arguments(["--report_to", "tensorbord"])
    out, hub = tmp_path / "run", RecordingHub()
    monkeypatch.setattr("huggingface_hub.HfApi", hub)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    config = MRPConfig(
        output_dir=str(out),
        report_to="tensorboard",
        use_cpu=True,
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=2,
        lora_layers="2",
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        hub_always_push=True,
        disable_tqdm=True,
        seed=0,
        push_to_hub=True,
        hub_model_id="someone/refined",
        hub_token=FAKE_TOKEN,
    )
    refine(
        ModelArguments(model=str(tiny_model_dir)),
        DataArguments(block_size=32, max_positions=248),
        RefineArguments(audit_positions=62),
        config,
    )
    assert [u["message"] for u in hub.uploads[:2]] == [
        "hf_mrp: training in progress, step 1",
        "hf_mrp: training in progress, step 2",
    ]
    assert len(hub.uploads) == 3 and hub.tokens == {FAKE_TOKEN}
    assert {"comparison_step_1", "audit_step_1", "runs"} <= folders(hub.uploads[0]["files"])
    final = hub.uploads[-1]
    assert {"comparison_step_1", "comparison_step_2", "comparison", "audit_after", "runs"} <= folders(final["files"])
    assert MODEL_FILES | {"README.md", "mrp_config.json", "training_log.json"} <= set(final["files"])
    assert "## Flip audit at each evaluation step" in final["card"] and "Step 2: flips by token class" in final["card"]
    assert "Training in progress" not in final["card"] and "no Hub id is known" in final["card"]


def test_a_save_during_a_running_push_is_skipped_unless_always_push(tmp_path, monkeypatch):
    import threading
    from types import SimpleNamespace

    release = threading.Event()

    class SlowHub(RecordingHub):
        def upload_folder(self, *args, **kwargs):
            release.wait(timeout=30)
            return super().upload_folder(*args, **kwargs)

    out = tmp_path / "run"
    for step in (1, 2, 3):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(bytes([step]))
    for always, expected in ((False, [1, 3]), (True, [1, 2, 3])):
        hub = SlowHub()
        monkeypatch.setattr("huggingface_hub.HfApi", hub)
        push = HubPushCallback("someone/refined", out, always_push=always)
        release.clear()
        for step in (1, 2):
            push.on_save(None, SimpleNamespace(is_world_process_zero=True, global_step=step), None)
        release.set()
        push.wait()
        push.on_save(None, SimpleNamespace(is_world_process_zero=True, global_step=3), None)
        push.on_train_end(None, None, None)
        assert push.pushed == expected and push.failures == []
        assert [u["message"][-1] for u in hub.uploads] == [str(step) for step in expected]
