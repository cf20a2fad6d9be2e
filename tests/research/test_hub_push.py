"""Hub pushes during training, through the real huggingface_hub client and the loopback Hub (tests/hub_server.py):
what each hub_strategy pushes when, that the token only authenticates, and that a failed push mid-training neither
stops training nor loses a local file. The recording stand-in for HfApi is left only where a push's timing is the
point (a save while a push is still running)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset

from hf_mrp.research.reports.model_card import card_from_folder
from hf_mrp.training import MRPConfig, MRPTrainer
from hf_mrp.training.callbacks import MRPAuditCallback
from hf_mrp.training.hub import HubPushCallback, push_folder

from helpers import FAKE_TOKEN, CharTokenizer, tiny_llama
from hub_server import assert_token_only_authenticates

MODEL_FILES = {"adapter_config.json", "adapter_model.safetensors"}


class RecordingHub:
    """Stands in for huggingface_hub.HfApi where only the timing of pushes matters: records each upload's message."""

    def __init__(self):
        self.uploads: list[dict] = []

    def __call__(self, token=None, **kwargs):  # HfApi(token=...)
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, folder_path, repo_id, commit_message="", **kwargs):
        self.uploads.append({"message": commit_message, "repo": repo_id})
        return f"https://hub.local/{repo_id}/commit/{len(self.uploads)}"


def train_blocks(seed=1):
    ids = np.random.default_rng(seed).integers(0, 97, size=(8, 16))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def train_with_pushes(blocks, out: Path, strategy: str, monkeypatch) -> HubPushCallback:
    """Four steps with a save, an evaluation and a push every two, to the loopback Hub (fixture loopback_hub)."""
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
def test_each_hub_strategy_pushes_adapter_audits_and_event_files_at_each_save(
    blocks, tmp_path, monkeypatch, loopback_hub, strategy
):
    out, hub = tmp_path / "run", loopback_hub
    push = train_with_pushes(blocks, out, strategy, monkeypatch)
    assert push.failures == []
    if strategy == "end":
        assert hub.state.commits == [] and hub.state.repos == {}  # nothing during training
    else:
        assert [c.summary for c in hub.state.commits] == [
            "hf_mrp: training in progress, step 2",
            "hf_mrp: training in progress, step 4",
        ]
        assert list(hub.state.repos) == ["someone/refined"]
        for step, commit in zip((2, 4), hub.state.commits):
            files = commit.files
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
            assert files["audit_before/positions.parquet"] == (out / "audit_before" / "positions.parquet").read_bytes()
            assert not {"training_args.bin", "optimizer.pt", "trainer_state.json"} & set(files)
            local = out / f"checkpoint-{step}" / "adapter_model.safetensors"
            assert files["adapter_model.safetensors"] == local.read_bytes()
            card = files["README.md"].decode()  # the card of the run so far: its step, base model, each evaluation
            assert f"Training in progress: step {step} of 4" in card and "Base model: not recorded" in card
            assert "## Flip audit at each evaluation step" in card and f"Step {step}: flips by token class" in card
            assert ("Step 4: flips" in card) == (step == 4)
            if strategy == "checkpoint":
                assert {
                    "last-checkpoint/optimizer.pt",
                    "last-checkpoint/trainer_state.json",
                    "last-checkpoint/adapter_model.safetensors",
                } <= set(files)
                optimizer = (out / f"checkpoint-{step}" / "optimizer.pt").read_bytes()
                assert files["last-checkpoint/optimizer.pt"] == optimizer  # the checkpoint of that save
                assert "last-checkpoint/training_args.bin" not in files  # a pickle: never pushed
    # the final push of the finished folder carries the event files and every per-step comparison too
    commit = push_folder(out, "someone/refined", FAKE_TOKEN)
    final = hub.state.commits[-1].files
    assert commit.startswith(f"{hub.endpoint}/someone/refined/commit/")
    assert {"comparison_step_2", "comparison_step_4", "runs"} <= folders(final)
    assert not any(name.startswith("checkpoint-") or name.endswith("training_args.bin") for name in final)
    assert_token_only_authenticates(hub, FAKE_TOKEN)


@pytest.mark.slow  # training runs with pushes
def test_a_failed_push_mid_training_neither_stops_training_nor_loses_a_local_file(
    blocks, tmp_path, monkeypatch, loopback_hub
):
    out, hub = tmp_path / "run", loopback_hub
    at_failure: dict[str, bytes] = {}

    def snapshot():  # what the step-2 push read, as it is when the Hub fails (later saves may be mid-write now)
        for folder in ("audit_before", "audit_step_2", "comparison_step_2", "checkpoint-2"):
            files = [path for path in (out / folder).rglob("*") if path.is_file()]
            at_failure.update({path.relative_to(out).as_posix(): path.read_bytes() for path in files})

    hub.state.drop_commits, hub.state.faults_left, hub.state.on_fault = True, 1, snapshot  # the first commit is cut
    push = train_with_pushes(blocks, out, "every_save", monkeypatch)
    assert len(push.failures) == 1 and "step 2" in push.failures[0], push.failures
    assert "RemoteProtocolError" in push.failures[0]
    assert push.pushed == [4]  # training went on and the next save pushed again
    assert (out / "audit_after" / "audit.json").is_file() and (out / "checkpoint-4").is_dir()
    assert at_failure and "comparison_step_2/flip_audit.json" in at_failure
    for name, data in at_failure.items():  # every local file at the failure is still there, unchanged
        assert (out / name).read_bytes() == data, name
    assert [c.summary for c in hub.state.commits] == ["hf_mrp: training in progress, step 4"]
    assert {"comparison_step_2", "comparison_step_4", "audit_step_2"} <= folders(hub.state.commits[0].files)


def test_an_unknown_hub_strategy_is_one_clear_error():
    from hf_mrp.errors import MRPUserError

    with pytest.raises(MRPUserError, match="unknown hub_strategy 'sometimes'; choose one of every_save"):
        HubPushCallback("someone/refined", hub_strategy="sometimes")


def test_refine_pushes_at_each_save_then_the_finished_folder(tiny_model_dir, tmp_path, monkeypatch, loopback_hub):
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
    out, hub = tmp_path / "run", loopback_hub
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
    assert [c.summary for c in hub.state.commits[:2]] == [
        "hf_mrp: training in progress, step 1",
        "hf_mrp: training in progress, step 2",
    ]
    assert len(hub.state.commits) == 3 and config.push_to_hub and config.hub_model_id == "someone/refined"
    assert {"comparison_step_1", "audit_step_1", "runs"} <= folders(hub.state.commits[0].files)
    final = hub.state.commits[-1].files
    assert {"comparison_step_1", "comparison_step_2", "comparison", "audit_after", "runs"} <= folders(final)
    assert MODEL_FILES | {"README.md", "mrp_config.json", "training_log.json"} <= set(final)
    card = final["README.md"].decode()
    assert "## Flip audit at each evaluation step" in card and "Step 2: flips by token class" in card
    assert "Training in progress" not in card and "no Hub id is known" in card
    assert "PeftModel.from_pretrained(base_model, 'someone/refined')" in card
    assert_token_only_authenticates(hub, FAKE_TOKEN)


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
