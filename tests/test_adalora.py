"""AdaLoRA against peft: same init from the same seed, same loss with the orthogonality term, same training run
(importance scores, budget schedule, pruning), same files both ways; Trainer callback; bad input."""

import copy
import json
import warnings

import peft
import pytest
import torch
from helpers.models import tiny_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from deltatune import AdaLoraCallback, AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from deltatune.methods.adalora import SVDLayer, budget_schedule

warnings.filterwarnings("ignore", message=".*ranknum.*")
IDS = torch.arange(40).reshape(4, 10) % 100
TARGETS = ["q_proj", "v_proj", "down_proj"]  # 3 modules x 2 layers


def both(base, **kwargs):
    """(peft model, deltatune model) from the same base and the same seed for the adapter init."""
    kwargs.setdefault("task_type", "CAUSAL_LM")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**kwargs))
    torch.manual_seed(1)
    ours = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**kwargs))
    return theirs, ours


def train(model, steps: int, step_offset: int = 0) -> list[float]:
    """peft's documented loop: backward, step, update_and_allocate(step), zero_grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step + step_offset)
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_counts_logits_and_loss_equal_peft(arch):
    if arch == "llama":
        base, targets = tiny_model("llama"), TARGETS
    else:
        base, targets = tiny_model("gpt2", n_positions=32), ["c_attn", "c_fc"]
    base.eval()  # no dropout: both libraries see the same computation
    # init_lora_weights=False: Λ random too, so the update is non-zero and the comparison means something.
    theirs, ours = both(
        base, init_r=6, target_r=2, total_step=10, lora_alpha=16, target_modules=targets, init_lora_weights=False
    )
    n_modules = sum(isinstance(m, SVDLayer) for m in ours.modules())
    assert n_modules == 2 * len(targets)
    trainable, total = ours.get_nb_trainable_parameters()
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert trainable == peft_trainable
    assert total == peft_total  # both count each layer's frozen 1-element `ranknum` parameter
    out_theirs = theirs(input_ids=IDS, labels=IDS)
    out_ours = ours(input_ids=IDS, labels=IDS)
    assert torch.equal(out_ours.logits, out_theirs.logits)
    assert torch.equal(out_ours.loss, out_theirs.loss)  # includes the orthogonality penalty
    plain = ours.get_base_model()(input_ids=IDS, labels=IDS).loss  # the transformers model alone: no penalty
    norms = [
        torch.linalg.matrix_norm(m @ m.T - torch.eye(m.shape[0]))
        for layer in ours.modules()
        if isinstance(layer, SVDLayer)
        for m in (layer.adapters["default"].lora_A, layer.adapters["default"].lora_B.T)
    ]
    penalty = 0.5 * sum(norms) / len(norms)  # orth_reg_weight x mean Frobenius distance from orthogonal
    assert penalty > 1 and torch.allclose(out_ours.loss - plain, penalty, atol=1e-4)


def test_printed_counts_equal_peft_s_line(capsys):
    """`ranknum` is a frozen parameter in both libraries: "all params" counts it, "trainable params" does not."""
    theirs, ours = both(
        tiny_model("llama"), init_r=6, target_r=2, total_step=10, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    theirs.print_trainable_parameters()
    ours.print_trainable_parameters()
    peft_line, our_line = capsys.readouterr().out.strip().splitlines()
    assert our_line == peft_line
    ranknums = {n: p for n, p in ours.named_parameters() if "ranknum" in n}
    assert len(ranknums) == 6 and not any(p.requires_grad for p in ranknums.values())
    assert all(torch.equal(p, torch.tensor([6.0])) for p in ranknums.values())
    assert set(ranknums) == {n for n, _ in theirs.named_parameters() if "ranknum" in n}
    assert not any("ranknum" in key for key in ours.get_adapter_state_dict())  # not in the file, as peft


def test_bf16_base_rounds_once_like_peft():
    """An fp32 update on a bf16 base is added before rounding (peft's in-place `+=`), not rounded twice."""
    theirs, ours = both(
        tiny_model("llama").to(torch.bfloat16).eval(),
        init_r=6,
        target_r=2,
        total_step=10,
        lora_alpha=16,
        target_modules=TARGETS,
        init_lora_weights=False,
    )
    peft_layers = dict(theirs.get_base_model().named_modules())
    ours_layers = {n: m for n, m in ours.get_base_model().named_modules() if isinstance(m, SVDLayer)}
    with torch.no_grad():  # peft's random init passes through bf16 on such a base: give ours its exact values
        for name, layer in ours_layers.items():
            for factor in ("lora_A", "lora_B", "lora_E"):
                getattr(layer.adapters["default"], factor).copy_(getattr(peft_layers[name], factor)["default"])
    assert len(ours_layers) == 6 and layer.adapters["default"].lora_A.dtype == torch.float32
    assert torch.equal(logits(ours), logits(theirs))
    ours.merge_adapter()  # the merge too: the fp32 update is added to the bf16 weight and rounded once
    theirs.merge_adapter()
    for name, layer in ours_layers.items():
        assert torch.equal(layer.base_layer.weight, peft_layers[name].base_layer.weight), name


def test_default_init_starts_equal_to_base():
    base = tiny_model("llama")
    expected = logits(base)
    ours = get_peft_model(base, AdaLoraConfig(total_step=10, target_modules=TARGETS))
    assert torch.equal(logits(ours), expected)  # Λ = 0


def test_budget_schedule_equals_peft():
    kwargs = dict(init_r=6, target_r=2, tinit=3, tfinal=4, deltaT=2, total_step=20, target_modules=TARGETS)
    allocator = peft.tuners.adalora.layer.RankAllocator(
        peft.get_peft_model(tiny_model("llama"), peft.AdaLoraConfig(**kwargs)).base_model.model,
        peft.AdaLoraConfig(**kwargs),
        "default",
    )
    config = AdaLoraConfig(**kwargs)
    schedule = [budget_schedule(config, step, 6 * 6, 2 * 6) for step in range(22)]
    assert schedule == [allocator.budget_schedule(step) for step in range(22)]
    budgets = [b for b, _ in schedule]
    assert budgets[:4] == [36] * 4 and budgets[-5:] == [12] * 5  # warm-up at init_r, the end at target_r
    assert budgets[4] == int(24 * (1 - 1 / 13) ** 3 + 12) == 30  # the cubic, worked out by hand


def test_training_run_equals_peft_and_prunes_to_budget(tmp_path):
    base = tiny_model("llama")
    kwargs = dict(init_r=6, target_r=2, total_step=10, tinit=2, tfinal=3, lora_alpha=16, target_modules=TARGETS)
    theirs, ours = both(base, **kwargs)
    losses = train(ours, 10)
    assert train(theirs, 10) == losses
    assert losses[-1] < losses[0]

    pattern = ours.peft_config["default"].rank_pattern
    peft_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert pattern == peft_pattern
    assert len(pattern) == 6 and sum(sum(keep) for keep in pattern.values()) == 2 * 6  # the budget: target_r x modules
    for name, keep in pattern.items():  # pruned triplets are zero in Λ
        layer = ours.get_base_model().get_submodule(name.removesuffix(".lora_E"))
        assert torch.all(layer.adapters["default"].lora_E[~torch.tensor(keep)] == 0)
    trained = logits(ours)
    assert torch.equal(trained, logits(theirs))

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_tensors = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert tensors.keys() == peft_tensors.keys() and all(torch.equal(tensors[k], peft_tensors[k]) for k in tensors)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    kept = sum(pattern["model.layers.0.self_attn.q_proj.lora_E"])
    assert tensors[f"{key}.lora_A"].shape == (kept, 32) and tensors[f"{key}.lora_B"].shape == (32, kept)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"] == pattern

    for folder in ("ours", "theirs"):  # both files, both libraries
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / folder)
        peft_reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / folder)
        layer = reloaded.get_base_model().get_submodule("model.layers.0.self_attn.q_proj")
        assert layer.adapters["default"].lora_A.shape == (kept, 32)  # built at the pruned rank
        assert torch.equal(logits(reloaded), logits(peft_reloaded))
        assert torch.allclose(logits(reloaded), trained, atol=1e-5)  # same update, fewer zero terms in the sum


def test_trainer_callback_reaches_budget(tmp_path):
    model = get_peft_model(
        tiny_model("llama"),
        AdaLoraConfig(init_r=4, target_r=1, total_step=6, tinit=1, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    rows = [{"input_ids": list(range(i, i + 10)), "labels": list(range(i, i + 10))} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=100,
    )
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[AdaLoraCallback()]).train()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(sum(keep) for keep in pattern.values()) == 1 * 6
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-5)
    ranks = [m.adapters["default"].lora_A.shape[0] for m in reloaded.modules() if isinstance(m, SVDLayer)]
    assert sum(ranks) == 6 and ranks == [sum(pattern[k]) for k in pattern]


def test_merge_and_unload_matches_adapter():
    ours = get_peft_model(
        tiny_model("llama"), AdaLoraConfig(total_step=10, target_modules=TARGETS, init_lora_weights=False)
    )
    ours.eval()
    adapted = logits(ours)
    merged = ours.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, SVDLayer) for m in merged.modules())
    assert torch.allclose(logits(merged), adapted, atol=1e-5)


def test_safe_merge_refuses_an_update_with_nan_and_merges_nothing_there():
    ours = get_peft_model(
        tiny_model("llama"), AdaLoraConfig(total_step=10, target_modules=TARGETS, init_lora_weights=False)
    )
    layer = ours.get_base_model().model.layers[1].self_attn.v_proj
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.adapters["default"].lora_E[0] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"^model.layers.1.self_attn.v_proj: safe_merge: NaNs detected in the merged weights: "
        r"adapter 'default' would put NaN",
    ):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == []


def test_update_and_allocate_entry_points_and_errors():
    model = get_peft_model(tiny_model("llama"), AdaLoraConfig(total_step=10, target_modules=TARGETS))
    with pytest.raises(
        RuntimeError, match=r"q_proj\.lora_A has no gradient: call update_and_allocate\(step\) after loss\.backward\(\)"
    ):
        model.base_model.update_and_allocate(0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert model.update_and_allocate(0) == 12 * 6  # PeftModel passes the call to base_model, as peft users expect
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=TARGETS))
    with pytest.raises(
        ValueError, match="update_and_allocate is AdaLoRA's rank budget step, but this model holds no AdaLoRA"
    ):
        lora.base_model.update_and_allocate(0)


def test_bad_input():
    # Each message starts with peft's words (peft's tests match them), then says what to do.
    with pytest.raises(
        ValueError,
        match=r"^AdaLoRA does not work when `total_step` is None, supply a value > 0\. It is the number of optimizer",
    ):
        AdaLoraConfig(target_modules=TARGETS)
    with pytest.raises(ValueError, match=r"when `total_step` is 0, supply a value > 0"):
        AdaLoraConfig(total_step=0)
    with pytest.raises(
        ValueError,
        match=r"^The supplied schedule values don't allow for a budgeting phase\. .*"
        r"\(tinit=5, tfinal=5 and total_step=10 leave no step between them",
    ):
        AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(
        ValueError, match=r"^`orth_reg_weight` should be greater than or equal to 0, but the value passed is -0\.5"
    ):
        AdaLoraConfig(total_step=10, orth_reg_weight=-0.5)
    with pytest.raises(ValueError, match=r"^ADALORA does not support LOFTQ .*LoraConfig\(init_lora_weights='loftq'"):
        AdaLoraConfig(total_step=10, init_lora_weights="loftq", loftq_config={"loftq": "config"})
    with pytest.raises(ValueError, match=r"^ADALORA does not support LOFTQ"):
        AdaLoraConfig(total_step=10, loftq_config={"loftq_bits": 4})
    with pytest.warns(UserWarning, match=r"^Note that `r` is not used in AdaLora and will be ignored\. .* `init_r`"):
        AdaLoraConfig(total_step=10, r=4)
    with pytest.raises(ValueError, match=r"need 0 <= target_r <= init_r and init_r > 0; got target_r=16, init_r=12"):
        AdaLoraConfig(total_step=10, target_r=16)
    with pytest.raises(ValueError, match=r"beta1=1.5 is outside"):
        AdaLoraConfig(total_step=10, beta1=1.5)


def test_one_trainable_adapter_like_peft(tmp_path):
    # The rank allocator budgets one adapter; peft refuses a second trainable one with the same words.
    config = AdaLoraConfig(target_modules=TARGETS, total_step=10)
    model = get_peft_model(tiny_model("llama"), config)
    with pytest.raises(ValueError, match=r"^AdaLoraModel supports only 1 trainable adapter\. .*'default' trains"):
        model.add_adapter("second", AdaLoraConfig(target_modules=TARGETS, total_step=10))
    assert list(model.peft_config) == ["default"]
    assert not any("second" in name for name, _ in model.named_parameters())  # nothing left half-added
    model.add_adapter("frozen", AdaLoraConfig(target_modules=TARGETS, total_step=10, inference_mode=True))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="AdaLoraModel supports only 1 trainable adapter"):
        model.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=False)
    assert set(model.peft_config) == {"default", "frozen", "other"}
    theirs = peft.get_peft_model(tiny_model("llama"), peft.AdaLoraConfig(target_modules=TARGETS, total_step=10))
    with pytest.raises(ValueError, match="AdaLoraModel supports only 1 trainable adapter"):
        theirs.add_adapter("second", peft.AdaLoraConfig(target_modules=TARGETS, total_step=10))


def test_module_lists_are_sets_and_files_list_them_like_peft(tmp_path):
    config = AdaLoraConfig(
        target_modules=["v_proj", "q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"], total_step=10
    )
    theirs = peft.AdaLoraConfig(
        target_modules=["v_proj", "q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"], total_step=10
    )
    assert config.target_modules == theirs.target_modules == {"q_proj", "v_proj"}
    assert config.exclude_modules == theirs.exclude_modules
    model = get_peft_model(tiny_model("llama"), config)
    wrapped = sorted(name for name, m in model.get_base_model().named_modules() if isinstance(m, SVDLayer))
    assert wrapped == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["q_proj", "v_proj"]
    assert peft.PeftConfig.from_pretrained(tmp_path).target_modules == {"q_proj", "v_proj"}
    assert AdaLoraConfig.from_pretrained(tmp_path).target_modules == {"q_proj", "v_proj"}
