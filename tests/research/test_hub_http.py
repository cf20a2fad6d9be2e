"""Hub pushes over real HTTP: the installed huggingface_hub client against the loopback Hub (tests/hub_server.py).

What a push uploads is compared byte for byte with the files on disk that README.md promises to push; the token
may only authenticate; a Hub that answers 500 or drops the connection mid-upload costs a warning during training
and one line at the end that names the command pushing exactly what the run would have. The checks themselves are
tested: against a Hub that drops a file, or a token sent in a url, they fail.
"""

import os
import re
import shlex
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest

from hf_mrp.errors import MRPUserError
from hf_mrp.research import cli
from hf_mrp.training.hub import push_folder

from helpers import FAKE_TOKEN, ROOT, launched, tiny_refine_flags
from hub_server import LoopbackHub, assert_holds_exactly, assert_token_only_authenticates, promised_files

DATA_FILE_QUESTION = "It seems that you are about to commit a data file"
FINAL_MESSAGE = "hf_mrp: margin-refined adapter with geometry audits"


def run_folder(folder: Path) -> Path:
    """A finished run's files as refine leaves them, with what must never be pushed beside them."""
    files = {
        "adapter_config.json": b'{"peft_type": "LORA"}',
        "adapter_model.safetensors": os.urandom(4096),  # binary: the client uploads it through LFS
        "README.md": b"---\nlibrary_name: peft\n---\n# card\n",
        "mrp_config.json": b'{"hub_model_id": null}',
        "training_log.json": b"[]",
        "audit_before/positions.parquet": b"PAR1" + os.urandom(256),
        "audit_before/audit.json": b"{}",
        "comparison/flip_audit.json": b"{}",
        "runs/Dec06/events.out.tfevents.1.host.1.0": b"\0\x01events",
        ".hf_mrp.lock": b'{"pid": 1, "host": "h", "command": "hf-mrp refine"}',  # never pushed
        "checkpoint-2/optimizer.pt": os.urandom(64),  # never pushed
        "checkpoint-2/rng_state.pth": os.urandom(64),
        "audit_before/.staging-1/positions.parquet": b"half",  # a killed save's staging folder: never pushed
        "training_args.bin": b"pickle",  # never pushed
        "downstream/downstream.json": b"{}",
        "downstream/offline_tasks/mmlu/items.jsonl": b"{}",  # third-party items: never pushed
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_a_push_uploads_exactly_the_promised_files_into_the_tokens_namespace(loopback_hub, tmp_path):
    folder = run_folder(tmp_path / "tiny-run")
    (folder / "notes").mkdir()
    (folder / "notes" / "table.parquet").write_bytes(b"PAR1 not an audit table")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        url = push_folder(folder, "tiny-run")  # a bare name, no token argument: HF_TOKEN logs in
    assert url.startswith(f"{loopback_hub.endpoint}/someone/tiny-run/commit/")
    assert list(loopback_hub.state.repos) == ["someone/tiny-run"]
    expected = promised_files(folder)
    assert {"audit_before/positions.parquet", "adapter_model.safetensors", "README.md"} <= set(expected)
    assert_holds_exactly(loopback_hub, "someone/tiny-run", expected)
    questions = [str(w.message) for w in caught if DATA_FILE_QUESTION in str(w.message)]
    assert len(questions) == 1 and "(notes/table.parquet)" in questions[0]  # answered for the audit tables only
    lfs = [r.path for r in loopback_hub.state.requests if r.method == "PUT"]
    assert len(lfs) >= 2  # the adapter and the audit table went through LFS, the json files inline
    assert_token_only_authenticates(loopback_hub, FAKE_TOKEN)


def test_the_byte_check_fails_against_a_hub_that_drops_a_file(loopback_hub, tmp_path):
    """The test of the test: a Hub that acknowledges a commit but loses one file is caught."""
    folder = run_folder(tmp_path / "run")
    loopback_hub.state.drop_file = "audit_before/positions.parquet"
    push_folder(folder, "someone/run")  # the server acknowledges the commit
    with pytest.raises(AssertionError, match="audit_before/positions.parquet"):
        assert_holds_exactly(loopback_hub, "someone/run", promised_files(folder))
    loopback_hub.state.repos["someone/run"]["README.md"] += b"x"  # and one changed byte
    loopback_hub.state.repos["someone/run"]["audit_before/positions.parquet"] = b""
    with pytest.raises(AssertionError, match="README.md"):
        assert_holds_exactly(loopback_hub, "someone/run", promised_files(folder))


@pytest.mark.parametrize("where", ["url", "body", "header"])
def test_the_token_check_fails_when_the_token_travels_anywhere_else(loopback_hub, where):
    """The test of the test: the token in a url, a body or another header than Authorization is caught."""
    url = f"{loopback_hub.endpoint}/api/whoami-v2" + (f"?token={FAKE_TOKEN}" if where == "url" else "")
    headers = {"Authorization": f"Bearer {FAKE_TOKEN}"}
    headers |= {"X-Debug": FAKE_TOKEN} if where == "header" else {}
    body = FAKE_TOKEN.encode() if where == "body" else b"{}"
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=10) as answer:
        assert answer.status == 200
    with pytest.raises(AssertionError, match="token in the url|token in the body|X-Debug"):
        assert_token_only_authenticates(loopback_hub, FAKE_TOKEN)


@pytest.mark.parametrize("fault", ["500", "dropped connection"])
def test_a_failed_push_names_the_command_that_pushes_exactly_what_the_run_would(loopback_hub, tmp_path, fault):
    folder = run_folder(tmp_path / "run")
    if fault == "500":
        loopback_hub.state.answer_500 = ("/",)  # the Hub is down: create_repo fails first
    else:
        loopback_hub.state.drop_commits = True  # the repo exists, the LFS objects upload, the commit is cut
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    with pytest.raises(MRPUserError) as failure:
        push_folder(folder, "someone/run")
    line = str(failure.value)
    assert "\n" not in line and "push to the Hub repo 'someone/run' failed" in line and "nothing is lost" in line
    assert ("500" in line) if fault == "500" else ("RemoteProtocolError" in line)
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    assert loopback_hub.files("someone/run") == {}
    command = shlex.split(re.findall(r"`([^`]+)`", line)[-1])
    assert command == ["hf-mrp", "push", str(folder), "--repo_id", "someone/run"]
    loopback_hub.heal()
    assert cli.main(command[1:]) == 0  # the printed retry, as a user runs it
    assert_holds_exactly(loopback_hub, "someone/run", promised_files(folder))  # no lock, checkpoint or pickle
    assert_token_only_authenticates(loopback_hub, FAKE_TOKEN)


def test_hf_mrp_push_goes_to_the_runs_repo_and_refuses_a_folder_without_a_model(loopback_hub, tmp_path, capsys):
    folder = run_folder(tmp_path / "run")
    (folder / "mrp_config.json").write_text('{"hub_model_id": "team/named"}')  # the repo the run pushed to
    assert cli.main(["push", str(folder)]) == 0
    assert f"pushed {folder} -> {loopback_hub.endpoint}/team/named/commit/" in capsys.readouterr().out
    assert_holds_exactly(loopback_hub, "team/named", promised_files(folder))
    (tmp_path / "empty").mkdir()
    assert cli.main(["push", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "holds no adapter or model to push" in error
    assert list(loopback_hub.state.repos) == ["team/named"]  # the refusal asked the Hub nothing


def refine_env(hub: LoopbackHub) -> dict[str, str]:
    """A refine process that pushes to ``hub``: online for the Hub only (datasets stay offline), one torch thread."""
    return {**hub.env(dict(os.environ), FAKE_TOKEN), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def refine_with_pushes(out: Path, model_dir: Path, hub: LoopbackHub, **overrides) -> list[str]:
    return [
        str(ROOT / "examples" / "refine.py"),
        *tiny_refine_flags(
            model_dir,
            out,
            push_to_hub="true",
            hub_strategy="every_save",
            hub_always_push="true",  # every save pushes, even while the last push runs: the count is exact
            save_strategy="steps",
            save_steps=1,
            eval_strategy="steps",
            eval_steps=1,
            use_cpu="true",
            **overrides,
        ),
    ]


@pytest.mark.slow  # a whole refine run in a new process
def test_refine_pushes_at_each_save_then_exactly_the_finished_run_into_the_users_namespace(tiny_model_dir, tmp_path):
    out = tmp_path / "tiny-run"
    with LoopbackHub() as hub:
        run = launched(refine_with_pushes(out, tiny_model_dir, hub), env=refine_env(hub))
        repo = "someone/tiny-run"  # no --hub_model_id: the folder's name in the token's namespace
        assert list(hub.state.repos) == [repo]
        assert [c.summary for c in hub.state.commits] == [
            "hf_mrp: training in progress, step 1",
            "hf_mrp: training in progress, step 2",
            FINAL_MESSAGE,
        ]
        for step, commit in zip((1, 2), hub.state.commits):  # each save: that checkpoint's adapter, the audits so far
            adapter = (out / f"checkpoint-{step}" / "adapter_model.safetensors").read_bytes()
            assert commit.files["adapter_model.safetensors"] == adapter
            assert {f"comparison_step_{step}/flip_audit.json", "audit_before/audit.json"} <= set(commit.files)
            assert any(name.startswith("runs/") and "tfevents" in name for name in commit.files)
        assert (out / "checkpoint-2" / "optimizer.pt").is_file()  # on disk, never on the Hub
        expected = promised_files(out)
        assert {"audit_after/positions.parquet", "comparison/flip_audit.json", "training_log.json"} <= set(expected)
        assert_holds_exactly(hub, repo, expected)
        assert f"PeftModel.from_pretrained(base_model, '{repo}')" in expected["README.md"].decode()
        assert f'"hub_model_id": "{repo}"' in expected["mrp_config.json"].decode()
        assert run.stdout.strip().splitlines()[-1] == f"pushed -> {hub.endpoint}/{repo}"
        assert DATA_FILE_QUESTION not in run.stderr and "Traceback" not in run.stderr
        assert FAKE_TOKEN not in run.stdout + run.stderr
        assert_token_only_authenticates(hub, FAKE_TOKEN)


@pytest.mark.slow  # a whole refine run in a new process, then the retry in another
@pytest.mark.parametrize("fault", ["500", "dropped connection"])
def test_refine_against_a_failing_hub_warns_ends_with_one_line_and_its_retry_pushes_the_run(
    tiny_model_dir, tmp_path, fault
):
    out = tmp_path / "run"
    with LoopbackHub() as hub:
        if fault == "500":
            hub.state.answer_500 = ("/",)
        else:
            hub.state.drop_commits = True
        arguments = refine_with_pushes(out, tiny_model_dir, hub, hub_model_id="someone/refined")
        run = launched_failing(arguments, refine_env(hub))
        assert run.returncode == 2  # an MRPUserError: `hf-mrp`'s documented exit code for one-line failures
        warnings_during = [line for line in run.stderr.splitlines() if line.startswith("WARNING") and "step" in line]
        assert any("step 1: push to 'someone/refined' failed" in line for line in warnings_during), run.stderr[-3000:]
        assert any("training goes on" in line for line in warnings_during)
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("hf-mrp refine: error: push to the Hub repo 'someone/refined' failed"), last
        assert "Traceback" not in run.stderr and FAKE_TOKEN not in run.stdout + run.stderr
        assert hub.files("someone/refined") == {}  # nothing reached the repo
        for name in ("adapter_model.safetensors", "README.md", "training_log.json", "audit_after/positions.parquet"):
            assert (out / name).is_file(), name  # everything is on disk
        command = shlex.split(re.findall(r"`([^`]+)`", last)[-1])
        assert command == ["hf-mrp", "push", str(out), "--repo_id", "someone/refined"]
        hub.heal()
        launched(["-m", "hf_mrp.research.cli", *command[1:]], env=refine_env(hub))
        assert (out / "checkpoint-2" / "optimizer.pt").is_file()  # on disk, left out of the retry as of the run
        assert_holds_exactly(hub, "someone/refined", promised_files(out))
        assert_token_only_authenticates(hub, FAKE_TOKEN)


def launched_failing(arguments: list[str], env: dict[str, str]):
    """The process, run to its end whatever its exit code (helpers.launched asserts success)."""
    import subprocess

    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
