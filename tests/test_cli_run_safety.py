"""A run folder under attack: two runs at once, Ctrl-C and SIGTERM at chosen moments, kills after the last step,
nested runs, a merge over its own base, a folder that refuses eval.json, the umask, diverging training, a full
disk, leftovers of killed saves, and how `main` reports errors. Signals go to real child processes where the case
is a signal; the tiny model and run options are fixtures in conftest.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

import deltatune.cli as cli
from deltatune.cli import chat, cmd_train, evaluate, main, merge, train
from deltatune.training.lean_loss_trainer import LeanLossTrainer


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltatune.cli", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def wait_for(path, process: subprocess.Popen, seconds: float = 120) -> None:
    """Poll (bounded) until `path` exists; fail if the child ended first."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ---- 1. one process per run folder ----------------------------------------------------------------------------
HOLD_LOCK = """import sys, time
from deltatune.cli.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_held_folder_is_refused_and_a_dead_holder_frees_it(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            FileExistsError, match=rf"--output .*run is in use by another deltatune run \(pid {holder.pid}"
        ):
            train(run_options(tiny, out, max_steps=1))
        assert os.listdir(out) == [".deltatune.lock"]  # the refused run wrote nothing
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    assert train(run_options(tiny, out, max_steps=1)).steps == 1


def test_two_cli_runs_started_together_one_is_refused(tiny, tmp_path, held_out):
    out = str(tmp_path / "run")
    args = ["train", "--model", tiny, "--output", out, "--max-steps", "30", "--batch-size", "2", "--save-steps", "10"]
    runs = [
        subprocess.Popen(
            cli_command(*args, "--seed", str(seed)),
            env=child_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed in (1, 2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 1], outputs
    refused = outputs[[run.returncode for run in runs].index(1)][1]
    assert "is in use by another deltatune run" in refused and "Traceback" not in refused
    winner = [run.returncode for run in runs].index(0) + 1  # seeds 1 and 2: run.yaml belongs to the run that trained
    assert f"seed: {winner}\n" in open(os.path.join(out, "run.yaml"), encoding="utf-8").read()


def test_a_run_that_cannot_start_leaves_no_folder_and_no_lock(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--data"):
        train(run_options(tiny, out, data=str(tmp_path / "missing.jsonl")))
    assert not out.exists()


# ---- 2-5. signals and kills at chosen moments --------------------------------------------------------------------
class SignalAt(TrainerCallback):
    """Sends `signum` to this process as step `step` begins (what a Ctrl-C in the terminal does)."""

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def ctrl_c_while_saving_the_optimizer(monkeypatch, times: int) -> None:
    """The next `times` optimizer saves are hit by a Ctrl-C halfway through a checkpoint."""
    original, calls = LeanLossTrainer._save_optimizer_and_scheduler, []

    def save(self, output_dir):
        if len(calls) < times:
            calls.append(output_dir)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, output_dir)

    monkeypatch.setattr(LeanLossTrainer, "_save_optimizer_and_scheduler", save)


def test_a_second_ctrl_c_during_the_checkpoint_still_leaves_a_resumable_run(
    tiny, tmp_path, run_options, monkeypatch, caplog
):
    out = tmp_path / "run"
    ctrl_c_while_saving_the_optimizer(monkeypatch, times=1)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(run_options(tiny, out, max_steps=8, save_steps=100), callbacks=[SignalAt(2)])
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()  # written again after the cut
    assert f"continue from {out / 'checkpoint-3'} with --resume" in caplog.text
    monkeypatch.undo()
    assert train(run_options(tiny, out, max_steps=8, save_steps=100, resume=True)).steps == 8


def test_a_third_ctrl_c_gives_up_the_save_and_the_log_says_so(tiny, tmp_path, run_options, monkeypatch, caplog):
    out = tmp_path / "run"
    ctrl_c_while_saving_the_optimizer(monkeypatch, times=2)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(run_options(tiny, out, max_steps=8, save_steps=100), callbacks=[SignalAt(2)])
    assert "before any checkpoint was complete; train again with --overwrite" in caplog.text
    assert "continue from" not in caplog.text


@pytest.mark.parametrize("damage", ["", '{"global_step": 4, "log_hist'])
def test_a_damaged_trainer_state_makes_resume_fall_back(tiny, tmp_path, run_options, caplog, damage):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=4, save_steps=2))
    (out / "checkpoint-4" / "trainer_state.json").write_text(damage)
    with caplog.at_level(logging.WARNING):
        resumed = train(run_options(tiny, out, max_steps=6, save_steps=2, resume=True))
    assert "checkpoint-4 is incomplete (trainer_state.json is damaged); continuing from" in caplog.text
    assert resumed.steps == 6 and resumed.history[0]["step"] == 1  # the log came from checkpoint-2's state


def test_a_run_cut_after_its_last_step_is_finished_by_resume(tiny, tmp_path, run_options, monkeypatch):
    out = tmp_path / "run"

    def ctrl_c_in_the_final_eval(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("deltatune.cli.cmd_train.eval_loss", ctrl_c_in_the_final_eval)
    with pytest.raises(KeyboardInterrupt):
        train(run_options(tiny, out, max_steps=4, save_steps=2))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "loss_history.json").exists()
    monkeypatch.undo()
    (out / "adapter_model.safetensors").unlink()  # as after a kill -9 before the adapter was written
    finished = train(run_options(tiny, out, max_steps=4, save_steps=2, resume=True))
    assert finished.steps == 4 and finished.eval_loss is not None
    summary = json.loads((out / "loss_history.json").read_text())["summary"]
    assert summary["steps"] == 4 and not summary["interrupted"]
    final, checkpoint = adapter_tensors(out), adapter_tensors(out / "checkpoint-4")
    assert all(torch.equal(final[k], checkpoint[k]) for k in checkpoint)
    with pytest.raises(ValueError, match="nothing is left to train"):  # now it is finished
        train(run_options(tiny, out, max_steps=4, save_steps=2, resume=True))


@pytest.mark.parametrize(("signum", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_sigterm_and_ctrl_c_to_a_cli_run_save_a_checkpoint_and_stop(tiny, tmp_path, held_out, signum, code, name):
    out = tmp_path / "run"
    args = ["train", "--model", tiny, "--output", str(out), "--max-steps", "5000", "--batch-size", "2"]
    run = subprocess.Popen(
        cli_command(*args, "--save-steps", "4000", "--eval-data", held_out),
        env=child_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(out / "run.yaml", run)  # written once training has begun
    time.sleep(0.5)
    run.send_signal(signum)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == code, stderr[-3000:]
    assert f"{name}: stopping after this step" in stderr and "Traceback" not in stderr
    [checkpoint] = [name for name in os.listdir(out) if name.startswith("checkpoint-")]
    step = int(checkpoint.split("-")[1])
    assert 0 < step < 5000 and (out / checkpoint / "trainer_state.json").is_file()
    assert f"stopped by {name}; continue with: deltatune train --output {out} --resume" in stdout
    summary = json.loads((out / "loss_history.json").read_text())["summary"]
    assert summary["steps"] == step and summary["stopped_by"] == name


# ---- 6-8. folders that belong to someone else ---------------------------------------------------------------------
def test_a_run_inside_another_run_is_refused_and_overwrite_keeps_the_users_files(tiny, tmp_path, run_options, caplog):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=2))
    with pytest.raises(FileExistsError, match=r"checkpoint-9 lies inside the run folder .*run, whose checkpoint"):
        train(run_options(tiny, out / "checkpoint-9", max_steps=2))
    assert not (out / "checkpoint-9").exists()
    (out / "NOTES.md").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "data.jsonl").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert train(run_options(tiny, out, max_steps=3, overwrite=True)).steps == 3
    assert (out / "NOTES.md").read_text() == "mine" and (out / "mine" / "data.jsonl").read_text() == "{}"
    assert "kept what the run did not write: NOTES.md, mine" in caplog.text


def test_merge_into_the_base_models_own_folder_is_refused(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=1))
    config_before = open(os.path.join(tiny, "config.json"), encoding="utf-8").read()
    with pytest.raises(ValueError, match=r"--output .* is the adapter's base model; merging into it would replace"):
        merge(adapter=str(out), output=tiny, overwrite=True)
    assert open(os.path.join(tiny, "config.json"), encoding="utf-8").read() == config_before


def test_eval_prints_the_scores_before_failing_to_write_them(
    tiny, tmp_path, run_options, held_out, capsys, monkeypatch
):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=1))

    def read_only_folder(path, text):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("deltatune.cli.cmd_eval.atomic_write_text", read_only_folder)
    assert main(["eval", "--adapter", str(out), "--data", held_out]) == 1
    printed = capsys.readouterr()
    assert "eval loss" in printed.out and "exact-match" in printed.out
    assert f"the scores could not be written to {out / 'eval.json'} (Permission denied); they are printed above" in (
        printed.err
    )


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tiny, tmp_path, run_options, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "run"
        train(run_options(tiny, out, max_steps=2))
        merged = merge(adapter=str(out), output=str(tmp_path / "merged"))
    finally:
        os.umask(previous)
    for path in (out / "run.yaml", out / "adapter_model.safetensors", out / "loss_history.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert os.stat(merged).st_mode & 0o777 == 0o777 & ~umask


# ---- 11-12. silent wrong results ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"lr": float("inf")}, "--lr inf: must be a finite number"),
        ({"lr": float("nan")}, "--lr nan: must be a finite number"),
        ({"epochs": float("inf"), "max_steps": None}, "--epochs inf: must be a finite number"),
        ({"dropout": float("nan")}, "--dropout nan: must be a finite number"),
        ({"alpha": 0}, "--alpha 0: the update is scaled by alpha / r, so the adapter would change nothing"),
        ({"resume": True, "overwrite": True}, "--resume and --overwrite exclude each other"),
        ({"target_modules": "q_proj,qq_proj"}, r"--target-modules: 'qq_proj' matched no module \(q_proj did\)"),
    ],
)
def test_options_that_would_train_nothing_or_nan_are_refused(tiny, tmp_path, run_options, extra, message):
    with pytest.raises(ValueError, match=message):
        train(run_options(tiny, tmp_path / "run", **extra))
    assert not (tmp_path / "run").exists()


def test_main_refuses_an_infinite_epoch_count_in_one_line(tiny, tmp_path, capsys):
    assert main(["train", "--model", tiny, "--epochs", "inf", "--output", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == "deltatune train: error: --epochs inf: must be a finite number"


def test_a_rank_above_the_layer_size_is_warned(tiny, tmp_path, run_options, caplog):
    with caplog.at_level(logging.WARNING):
        train(run_options(tiny, tmp_path / "run", max_steps=1, r=512))
    assert "--r 512 is above the smallest side of the adapted layer" in caplog.text


def test_a_diverging_run_stops_before_saving_nan(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"training diverged at step \d+: .*\(--lr 1e\+30\).*no checkpoint was saved"):
        train(run_options(tiny, out, max_steps=6, save_steps=100, lr=1e30))
    assert not (out / "adapter_model.safetensors").exists()
    assert not [name for name in os.listdir(out) if name.startswith("checkpoint-")]


def test_a_diverging_run_keeps_its_last_good_checkpoint(tiny, tmp_path, run_options, monkeypatch):
    out = tmp_path / "run"

    class PoisonAt(TrainerCallback):  # step 3 goes wrong (as an fp16 overflow would)
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                next(p for p in model.parameters() if p.requires_grad).data[0] = float("nan")

    with pytest.raises(ValueError, match=r"diverged at step 3: the trained weights became NaN .*checkpoint-2"):
        train(run_options(tiny, out, max_steps=6, save_steps=2), callbacks=[PoisonAt()])
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert all(t.isfinite().all() for t in adapter_tensors(out / "checkpoint-2").values())


@pytest.mark.parametrize("damage", ["nan", "int64"])
def test_an_adapter_with_nan_or_integer_tensors_is_refused_on_load(tiny, tmp_path, run_options, damage):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=1))
    tensors = adapter_tensors(out)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].fill_(float("nan")) if damage == "nan" else tensors[key].to(torch.int64)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    message = "hold NaN or infinite values" if damage == "nan" else f"{key} is torch.int64 in the adapter file"
    with pytest.raises(ValueError, match=message):
        chat(adapter=str(out), prompt="hi", max_new_tokens=2, out=None)


def test_an_adapter_with_missing_tensors_loads_with_a_count(tiny, tmp_path, run_options, caplog):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=1))
    tensors = adapter_tensors(out)
    save_file({k: v for k, v in tensors.items() if ".layers.0." not in k}, str(out / "adapter_model.safetensors"))
    with caplog.at_level(logging.WARNING):
        chat(adapter=str(out), prompt="hi", max_new_tokens=2, out=None)
    gone = sum(".layers.0." in k for k in tensors)
    assert gone and f"no values for {gone} adapter tensors (kept at init)" in caplog.text


# ---- 14. a full disk ---------------------------------------------------------------------------------------------
def test_a_full_disk_at_the_final_save_names_the_path_and_how_to_resume(tiny, tmp_path, run_options, monkeypatch):
    out = tmp_path / "run"

    write = cmd_train.atomic_write_text

    def disk_full(path, text):
        if path.endswith("loss_history.json"):
            raise OSError(28, "No space left on device")
        write(path, text)

    monkeypatch.setattr(cmd_train, "atomic_write_text", disk_full)
    with pytest.raises(OSError, match=rf"no space left on {out} while saving loss_history.json; the last complete "):
        train(run_options(tiny, out, max_steps=4, save_steps=2))
    monkeypatch.undo()
    assert train(run_options(tiny, out, max_steps=4, save_steps=2, resume=True)).steps == 4


def _can_mount_a_small_disk() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_a_small_disk(), reason="needs unshare to mount a small tmpfs as a full disk")
def test_a_really_full_disk_during_a_checkpoint_is_one_line(tiny, tmp_path, held_out):
    out = tmp_path / "run"
    out.mkdir()
    train_args = ["train", "--model", tiny, "--output", str(out), "--max-steps", "8", "--save-steps", "2"]
    train_args += ["--batch-size", "2", "--eval-data", held_out]
    command = " ".join(map(str, cli_command(*train_args)))
    # 112 KiB: run.yaml, the lock and one checkpoint (about 80 KiB in 4 KiB pages) fit, a second does not
    script = f"mount -t tmpfs -o size=112k tmpfs {out} && exec {command}"
    run = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    [last] = [line[line.index("deltatune train:") :] for line in run.stderr.splitlines() if "train: error:" in line]
    assert last.startswith(f"deltatune train: error: no space left on {out} while saving the checkpoint of step 4")
    assert last.endswith(
        f"the last complete checkpoint is {out}/checkpoint-2: free some space, then continue with --resume"
    )


# ---- 16. leftovers of killed saves -------------------------------------------------------------------------------
def test_staged_files_of_a_killed_save_are_removed_by_the_next_run(tiny, tmp_path, run_options):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=2, save_steps=2))
    leftovers = [out / ".tmp-abc123adapter_model.safetensors", out / "checkpoint-2" / ".tmp-x1loss_history.json"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    train(run_options(tiny, out, max_steps=4, save_steps=2, resume=True))
    assert not any(path.exists() for path in leftovers)


# ---- errors from `main` --------------------------------------------------------------------------------------------
def test_main_names_an_internal_error_and_shows_its_traceback_only_when_asked(tmp_path, capsys, monkeypatch):
    def bug(*args, **kwargs):
        return [][1]

    monkeypatch.setattr(cli, "evaluate", bug, raising=False)
    monkeypatch.delenv("DELTATUNE_DEBUG", raising=False)
    assert main(["eval"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("deltatune eval: internal error at test_cli_run_safety.py:")
    assert "IndexError: list index out of range (run again with DELTATUNE_DEBUG=1 for the traceback" in err
    monkeypatch.setenv("DELTATUNE_DEBUG", "1")
    assert main(["eval"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "return [][1]" in err
    assert err.strip().splitlines()[-1].startswith("deltatune eval: internal error")


def test_main_shows_the_traceback_of_a_user_error_under_debug(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DELTATUNE_DEBUG", "1")
    assert main(["train", "--model", tiny, "--data", str(tmp_path / "nope.json"), "--output", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        "deltatune train: error: data file"
    )


def test_evaluate_writes_its_scores_beside_the_adapter(tiny, tmp_path, run_options, held_out):
    out = tmp_path / "run"
    train(run_options(tiny, out, max_steps=1))
    result = evaluate(adapter=str(out), data=held_out)
    assert json.loads((out / "eval.json").read_text())["eval_loss"] == pytest.approx(result.eval_loss)
