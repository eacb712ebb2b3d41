"""`deltatune train`'s precision, device and Trainer options on a tiny random chat model: each flag reaching
`TrainingArguments`, eval loss during training, --keep-best, the `trainer:` block, --report-to, loss.png,
the dtype/device choice and the defaults that scale (max length, learning-rate warning)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os

import pytest
import torch
import yaml
from helpers.chat_model import make_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, SchedulerType, TrainerCallback

from deltatune.cli import build_parser, precision, train
from deltatune.cli import data as data_mod
from deltatune.cli import trainer_setup as setup
from deltatune.cli.models import load_tokenizer
from deltatune.cli.options import load_options, make_options


class Capture(TrainerCallback):
    """Keeps the Trainer's arguments and model as training starts."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.args, self.model = args, model


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_trainer_flags_and_block_reach_training_arguments(tiny, tmp_path, run_options):
    out, capture = tmp_path / "run", Capture()
    options = run_options(
        tiny,
        out,
        lr_scheduler="cosine",
        warmup_ratio=0.25,
        weight_decay=0.1,
        grad_accum=2,
        eval_steps=2,
        trainer={"adam_beta2": 0.95, "max_grad_norm": 0.5},
    )
    result = train(options, callbacks=[capture])
    args = capture.args
    assert args.lr_scheduler_type == SchedulerType.COSINE and args.get_warmup_steps(4) == 1
    assert (args.weight_decay, args.gradient_accumulation_steps) == (0.1, 2)
    assert (args.adam_beta2, args.max_grad_norm) == (0.95, 0.5)
    assert (args.eval_strategy, args.eval_steps, args.report_to) == ("steps", 2, [])
    assert not args.load_best_model_at_end and not args.bf16 and not args.fp16
    history = json.loads((out / "loss_history.json").read_text())
    assert [e["step"] for e in history["eval"]] == [2, 4] and all(e["eval_loss"] > 0 for e in history["eval"])
    assert result.steps == 4
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert saved["trainer"] == {"adam_beta2": 0.95, "max_grad_norm": 0.5} and saved["lr_scheduler"] == "cosine"


def test_trainer_block_from_yaml_and_flags_from_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr_scheduler: constant\ntrainer:\n  adam_epsilon: 1.0e-6\n", encoding="utf-8")
    flags = vars(build_parser().parse_args(["train", "--warmup-ratio", "0.1", "--keep-best", "--dtype", "bf16"]))
    options = load_options(str(config), {k: v for k, v in flags.items() if k not in ("command", "config")})
    assert (options.lr_scheduler, options.warmup_ratio, options.keep_best, options.dtype) == (
        "constant",
        0.1,
        True,
        "bf16",
    )
    assert options.trainer == {"adam_epsilon": 1.0e-6}
    with pytest.raises(ValueError, match=r"option 'trainer' must be a mapping of TrainingArguments fields"):
        make_options({"trainer": [1, 2]})


@pytest.mark.parametrize(
    "block, message",
    [
        ({"adam_beta3": 0.9}, r"trainer: 'adam_beta3' is not a TrainingArguments field \(did you mean adam_beta"),
        ({"learning_rate": 1.0}, r"trainer: 'learning_rate' is set by --lr; give that option instead"),
    ],
)
def test_trainer_block_refuses_unknown_fields_before_writing(tiny, tmp_path, run_options, block, message):
    with pytest.raises(ValueError, match=message):
        train(run_options(tiny, tmp_path / "run", trainer=block))
    assert not (tmp_path / "run" / "run.yaml").exists()


@pytest.mark.parametrize("options, message", [
    ({"lr_scheduler": "sawtooth"}, r"--lr-scheduler 'sawtooth': choose one of linear, cosine"),
    ({"warmup_ratio": 1.5}, r"--warmup-ratio 1.5: give a fraction"),
    ({"eval_steps": 0}, r"--eval-steps 0: must be at least 1"),
    ({"keep_best": True, "save_steps": 3, "eval_steps": 2}, r"--save-steps 3 must be a multiple of --eval-steps 2"),
    ({"eval_steps": 2, "eval_data": None, "data": "ROWS"}, r"--eval-steps needs held-out data"),
])  # fmt: skip
def test_bad_trainer_options_are_refused(tiny, held_out, tmp_path, run_options, options, message):
    if options.get("data") == "ROWS":
        options = {**options, "data": held_out}
    with pytest.raises(ValueError, match=message):
        train(run_options(tiny, tmp_path / "run", **options))


class SpoilAdapterAfter(TrainerCallback):
    """Overwrites lora_B with noise after `step`, so every later eval is worse than the one at `step - 1`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.copy_(torch.randn(param.shape, generator=generator))


def test_keep_best_saves_the_checkpoint_with_the_lowest_eval_loss(tiny, held_out, tmp_path, run_options):
    out = tmp_path / "run"
    options = run_options(tiny, out, data=held_out, max_steps=6, eval_steps=2, save_steps=2, keep_best=True)
    train(options, callbacks=[SpoilAdapterAfter(3)])
    history = json.loads((out / "loss_history.json").read_text())
    losses = {e["step"]: e["eval_loss"] for e in history["eval"]}
    assert sorted(losses) == [2, 4, 6] and min(losses, key=losses.get) == 2
    assert history["summary"]["best_checkpoint"] == "checkpoint-2"
    best, final = adapter(out / "checkpoint-2"), adapter(out)
    assert best.keys() == final.keys()
    for key in best:
        torch.testing.assert_close(final[key], best[key], rtol=0, atol=0)


def test_report_to_a_missing_integration_names_the_package(tiny, tmp_path, run_options):
    missing = [name for name in ("wandb", "mlflow", "tensorboard") if importlib.util.find_spec(name) is None]
    if not missing:
        pytest.skip("every integration is installed here")
    with pytest.raises(ImportError, match=rf"--report-to {missing[0]} needs the {missing[0]} package: pip install"):
        train(run_options(tiny, tmp_path / "run", report_to=missing[0]))
    assert not (tmp_path / "run" / "run.yaml").exists()


def test_report_to_tensorboard_writes_event_files(tiny, tmp_path, run_options):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(run_options(tiny, out, report_to="tensorboard", trainer={"logging_dir": str(tmp_path / "tb")}))
    events = [name for _, _, names in os.walk(tmp_path / "tb") for name in names if "tfevents" in name]
    assert events


def test_gradient_checkpointing_trains_the_same_adapter(tiny, tmp_path, run_options):
    capture = Capture()
    train(run_options(tiny, tmp_path / "plain"))
    train(run_options(tiny, tmp_path / "checkpointed", gradient_checkpointing=True), callbacks=[capture])
    base = capture.model.get_base_model()
    assert base.is_gradient_checkpointing and not base.config.use_cache
    plain, checkpointed = adapter(tmp_path / "plain"), adapter(tmp_path / "checkpointed")
    assert any(value.abs().sum() > 0 for key, value in checkpointed.items() if "lora_B" in key)  # gradients arrived
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory) -> str:
    folder = make_tiny_model(str(tmp_path_factory.mktemp("tiny_bf16") / "model"))
    AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_dtype_on_cpu_follows_the_cpus_bf16_support(
    tiny_bf16, tmp_path, run_options, monkeypatch, caplog, native_bf16
):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native_bf16)
    capture = Capture()
    with caplog.at_level(logging.INFO, logger="deltatune.cli.precision"):
        train(run_options(tiny_bf16, tmp_path / "run", device="cpu"), callbacks=[capture])
    expected = torch.bfloat16 if native_bf16 else torch.float32
    base_dtypes = {p.dtype for n, p in capture.model.named_parameters() if "lora_" not in n}
    adapter_dtypes = {p.dtype for n, p in capture.model.named_parameters() if "lora_" in n}
    assert base_dtypes == {expected} and adapter_dtypes == {torch.float32}
    assert not capture.args.bf16 and capture.args.use_cpu  # no autocast on a CPU: the adapters compute in fp32
    reason = "the model's own dtype (bf16), which cpu runs natively" if native_bf16 else "the model is bf16"
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("device cpu")]
    assert len(line) == 1 and f"base model in {'bf16' if native_bf16 else 'fp32'} ({reason}" in line[0]


def test_precision_choice():
    fp32, bf16 = type("C", (), {"dtype": "float32"})(), type("C", (), {"torch_dtype": torch.bfloat16})()
    assert precision.choose_precision("auto", "cpu", fp32).dtype == torch.float32
    assert precision.choose_precision("auto", "cpu", None).dtype == torch.float32
    chosen = precision.choose_precision("bf16", "cpu", fp32)
    assert (chosen.dtype, chosen.reason, chosen.mixed_precision) == (torch.bfloat16, "--dtype bf16", None)
    assert precision.Precision("cuda", torch.bfloat16, "").mixed_precision == "bf16"
    assert precision.Precision("cuda", torch.float32, "").mixed_precision is None
    assert precision.model_dtype(bf16) == torch.bfloat16
    if not torch.cuda.is_available():
        assert precision.choose_device("auto") in ("cpu", "mps")
        with pytest.raises(ValueError, match="--device cuda: no cuda device here; use --device auto or cpu"):
            precision.choose_device("cuda")


def test_max_length_defaults_to_the_longest_row(tiny, held_out, tmp_path, run_options):
    out = tmp_path / "run"
    options = run_options(tiny, out, data=held_out)
    train(options)
    rows = data_mod.load_rows(held_out, "train")
    encoded = data_mod.tokenize_rows(rows, load_tokenizer(tiny), "auto", 512)
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert saved["max_length"] == max(len(e["input_ids"]) for e in encoded) < 512


def test_large_model_at_the_sample_learning_rate_is_warned():
    message = setup.warn_large_model_lr(1_500_000_000, 2e-3, lr_given=False)
    assert message is not None and "1.5B parameters" in message and "1e-4 to 2e-4" in message
    assert setup.warn_large_model_lr(1_500_000_000, 2e-3, lr_given=True) is None
    assert setup.warn_large_model_lr(135_000_000, 2e-3, lr_given=False) is None
    assert setup.warn_large_model_lr(1_500_000_000, 1e-4, lr_given=False) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_base_on_a_gpu_trains_fp32_adapters_under_autocast(tiny_bf16, tmp_path, run_options):
    capture = Capture()
    result = train(run_options(tiny_bf16, tmp_path / "run", gradient_checkpointing=True), callbacks=[capture])
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert capture.args.bf16 == (expected == torch.bfloat16) and capture.args.fp16 == (expected == torch.float16)
    base_dtypes = {p.dtype for n, p in capture.model.named_parameters() if "lora_" not in n}
    adapter_dtypes = {p.dtype for n, p in capture.model.named_parameters() if "lora_" in n}
    assert base_dtypes == {expected} and adapter_dtypes == {torch.float32}
    assert capture.model.get_base_model().is_gradient_checkpointing
    assert result.train_loss is not None and math.isfinite(result.train_loss)
