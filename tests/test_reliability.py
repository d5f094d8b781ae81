"""A careless or unlucky user: an --out that is not the run's, two runs at once, a damaged checkpoint, a full
disk, a missing GPU, Ctrl-C and SIGTERM. Each case checks the command's exit code, its one-line message (no
traceback) and the files before and after (a user's file stays byte for byte).

Run: python -m pytest tests/test_reliability.py -q
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_run_inputs

from chatsmith.cli import main
from chatsmith.utils import read_metrics


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny chat model directory and an SFT data file."""
    return write_tiny_run_inputs(tmp_path_factory.mktemp("inputs"))


def sft_args(files: Path, out: Path, *extra: str, steps: int = 3) -> list[str]:
    return ["sft", "--model", str(files / "model"), "--data", str(files / "sft.jsonl"), "--template", "chatml",
            "--out", str(out), "--max-steps", str(steps), "--batch-size", "2", "--max-len", "64",
            "--warmup-steps", "1", "--log-every", "1", "--eval-fraction", "0", "--device", "cpu",
            "--no-progress", *extra]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


def assert_clean_failure(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    line = [x for x in err.splitlines() if ": error: " in x]
    assert len(line) == 1, err
    for word in words:
        assert word in line[0], (word, line[0])


def user_dir(path: Path) -> Path:
    """A directory of the user's that looks a bit like a run (config.json, a checkpoint/ with a file)."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "config.json").write_text('{"mine": true}\n')
    (path / "checkpoint" / "mine.txt").write_text("do not delete\n")
    return path


# ----------------------------------------------------------------------------- whose --out

def test_a_foreign_non_empty_out_is_refused_and_untouched(files, tmp_path, capsys):
    out = user_dir(tmp_path / "out")
    sibling = tmp_path / ".out.final"           # the old final-save staging place, outside --out
    sibling.mkdir()
    (sibling / "keep.txt").write_text("keep\n")
    before, around = snapshot(out), snapshot(tmp_path)
    rc, err = run_cli(sft_args(files, out), capsys)
    assert_clean_failure(rc, err, "not empty and not a chatsmith sft run", "--overwrite")
    assert snapshot(tmp_path) == around and sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint", "notes.txt", "config.json"])
    rc, err = run_cli(sft_args(files, out, "--resume"), capsys)
    assert_clean_failure(rc, err, "not a chatsmith sft run")
    assert snapshot(out) == before


def test_overwrite_keeps_the_users_files_and_refuses_to_replace_a_dir_holding_one(files, tmp_path, capsys):
    out = user_dir(tmp_path / "out")
    (tmp_path / ".out.final").mkdir()
    (tmp_path / ".out.final" / "keep.txt").write_text("keep\n")
    rc, err = run_cli(sft_args(files, out, "--overwrite"), capsys)
    assert_clean_failure(rc, err, "checkpoint/mine.txt", "not a file chatsmith wrote")
    assert (out / "checkpoint" / "mine.txt").read_text() == "do not delete\n"

    (out / "checkpoint" / "mine.txt").unlink()
    rc, err = run_cli(sft_args(files, out, "--overwrite"), capsys)
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "my notes\n"                # the user's other file
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"   # chatsmith's model file
    assert (tmp_path / ".out.final" / "keep.txt").read_text() == "keep\n"  # nothing outside --out touched
    assert not (out / ".final-tmp").exists() and not (out / ".lock").exists()   # the lock ends with the run
    assert json.loads((out / ".chatsmith-run.json").read_text())["stage"] == "sft"

    rc, err = run_cli(sft_args(files, out, "--overwrite", "--resume"), capsys)
    assert_clean_failure(rc, err, "--overwrite and --resume")


def test_out_equal_to_or_inside_the_input_model_is_refused(files, tmp_path, capsys):
    before = snapshot(files)
    for out, word in ((files / "model", "is the input model --model"),
                      (files / "model" / "run", "is inside the input model --model")):
        rc, err = run_cli(sft_args(files, out), capsys)
        assert_clean_failure(rc, err, word)
    assert snapshot(files) == before


def test_a_run_of_another_command_is_refused_and_the_same_command_may_rerun(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(sft_args(files, out), capsys)[0] == 0
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} says hello"}) + "\n" for i in range(20)))
    before = snapshot(out)
    rc, err = run_cli(["pretrain", "--data", str(corpus), "--preset", "tiny", "--vocab-size", "300",
                       "--out", str(out), "--max-steps", "1", "--device", "cpu", "--no-progress"], capsys)
    assert_clean_failure(rc, err, "holds a chatsmith sft run, not pretrain")
    assert snapshot(out) == before
    rc, err = run_cli(sft_args(files, out), capsys)                     # the same command: starts over
    assert rc == 0 and "starting over" in err, err


def test_out_that_is_a_file_or_unwritable(files, tmp_path, capsys, monkeypatch):
    target = tmp_path / "file"
    target.write_text("a file\n")
    rc, err = run_cli(sft_args(files, target), capsys)
    assert_clean_failure(rc, err, "exists and is not a directory")
    assert target.read_text() == "a file\n"

    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):      # root writes anywhere: make the directory refuse as a read-only one would
            real_open, real_mkdir = os.open, os.mkdir

            def refuse(path):
                if str(path).startswith(str(locked)):
                    raise OSError(errno.EROFS, "Read-only file system", str(path))

            def read_only_open(path, flags, *a, **k):
                if flags & os.O_CREAT:
                    refuse(path)
                return real_open(path, flags, *a, **k)

            def read_only_mkdir(path, *a, **k):
                refuse(path)
                return real_mkdir(path, *a, **k)

            monkeypatch.setattr(os, "open", read_only_open)
            monkeypatch.setattr(os, "mkdir", read_only_mkdir)
        rc, err = run_cli(sft_args(files, locked / "run"), capsys)
        assert_clean_failure(rc, err, "cannot write there")
        rc, err = run_cli(sft_args(files, locked), capsys)
        assert_clean_failure(rc, err, "cannot write there")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_every_input_model_flag_is_guarded_and_rlhf_claims_its_out_too(files, tmp_path, capsys):
    from types import SimpleNamespace

    from chatsmith.train.outdir import check_out_dir

    model = str(files / "model")
    for flag, cfg in (("--policy", SimpleNamespace(out=model, policy=model)),
                      ("--reward-model", SimpleNamespace(out=f"{model}/ppo", policy="x", reward_model=model)),
                      ("--reward", SimpleNamespace(out=f"{model}/grpo", model="x", reward=f"rm:{model}"))):
        with pytest.raises(Exception, match=f"the input model {flag} "):
            check_out_dir(cfg, "ppo")
    out = user_dir(tmp_path / "out")
    (out / "checkpoint" / "mine.txt").unlink()
    (out / "value").mkdir()
    (out / "value" / "config.json").write_text("{}\n")                  # ppo would replace OUT/value
    with pytest.raises(Exception, match="ppo writes its value model there"):
        check_out_dir(SimpleNamespace(out=str(out), policy="x", overwrite=True), "ppo")
    before = snapshot(out)
    rc, err = run_cli(["rlhf", "--policy", model, "--prompts", str(files / "sft.jsonl"), "--out", str(out),
                       "--device", "cpu"], capsys)
    assert_clean_failure(rc, err, "not a chatsmith rlhf run")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- one run at a time

def test_a_second_run_is_refused_with_the_first_ones_pid_and_a_stale_lock_is_taken_over(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(sft_args(files, out), capsys)[0] == 0
    before = snapshot(out)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{live.pid}\n")
        rc, err = run_cli(sft_args(files, out, "--resume", steps=5), capsys)
        assert_clean_failure(rc, err, f"in use by another chatsmith run (pid {live.pid}")
        assert snapshot(out) == {**before, ".lock": snapshot(out)[".lock"]}
    finally:
        live.kill()
        live.wait()
    rc, err = run_cli(sft_args(files, out, "--resume", steps=5), capsys)     # that pid is gone now
    assert rc == 0 and f"no longer running (pid {live.pid})" in err, err
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]


def test_stale_temp_dirs_of_a_dead_run_are_removed(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(sft_args(files, out), capsys)[0] == 0
    stale = out / ".checkpoint.x1y2.tmp"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"\0" * 1000)
    (out / ".final-tmp").mkdir()
    (out / "mine.checkpoint.tmp").write_text("user file\n")
    rc, err = run_cli(sft_args(files, out, "--resume", steps=4), capsys)
    assert rc == 0 and ".checkpoint.x1y2.tmp" in err, err
    assert not stale.exists() and not (out / ".final-tmp").exists()
    assert (out / "mine.checkpoint.tmp").read_text() == "user file\n"


# ----------------------------------------------------------------------------- known failures, one line

@pytest.mark.parametrize("damaged", ["state.pt", "model.safetensors"])
def test_a_truncated_checkpoint_on_resume_names_the_file(files, tmp_path, capsys, damaged):
    out = tmp_path / "run"
    assert run_cli(sft_args(files, out), capsys)[0] == 0
    path = out / "checkpoint" / damaged
    path.write_bytes(path.read_bytes()[:100])
    before = snapshot(out)
    rc, err = run_cli(sft_args(files, out, "--resume", steps=5), capsys)
    assert_clean_failure(rc, err, str(path), "damaged or truncated", "--overwrite")
    assert snapshot(out) == before
    rc, err = run_cli(["--debug", *sft_args(files, out, "--resume", steps=5)], capsys)
    assert rc == 2 and "Traceback" in err                                  # --debug shows where
    assert run_cli(sft_args(files, out, "--overwrite", steps=5), capsys)[0] == 0


@pytest.mark.parametrize("fail_at", [1, 2])
def test_disk_full_while_writing_a_checkpoint(files, tmp_path, capsys, monkeypatch, fail_at):
    out = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def save(*a, **k):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*a, **k)

    monkeypatch.setattr(torch, "save", save)
    rc, err = run_cli(sft_args(files, out, "--save-every", "1", steps=4), capsys)
    assert_clean_failure(rc, err, "disk full while writing the checkpoint")
    if fail_at == 1:
        assert "no earlier checkpoint exists" in err and not (out / "checkpoint").exists()
    else:
        assert "the previous checkpoint (step 1)" in err and "is intact" in err
        assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    assert not list(out.glob(".checkpoint.*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(files, tmp_path, capsys):
    rc, err = run_cli(sft_args(files, tmp_path / "run")[:-3] + ["--device", "cuda", "--no-progress"], capsys)
    assert_clean_failure(rc, err, "--device cuda", "CUDA is not available")


def test_interrupt_before_any_checkpoint_says_so(files, tmp_path, capsys, monkeypatch):
    from chatsmith.train.supervised import Trainer

    def ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", ctrl_c)
    out = tmp_path / "run"
    rc, err = run_cli(sft_args(files, out), capsys)
    assert rc == 130 and "no checkpoint was written yet" in err and "intact" not in err, err
    assert not (out / "checkpoint").exists()


# ----------------------------------------------------------------------------- signals on a real process

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_resume_continues(files, tmp_path, signum):
    out, steps = tmp_path / "run", 60
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "chatsmith", *sft_args(files, out, "--save-every", "0", steps=steps)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not read_metrics(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"{name}: stopped after step" in err and "--resume" in err and "Traceback" not in err, err
    stopped = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped < steps and f"stopped after step {stopped} of {steps}" in err
    assert not (out / ".lock").exists()                                   # released at exit
    if signum == signal.SIGINT:
        return                                                            # resuming is the same after either

    resumed = subprocess.run(args + ["--resume"], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming sft from {out / 'checkpoint'} at step {stopped}" in resumed.stderr
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, steps + 1))
