"""The CLI's data module: sources, checks, templates, response-only labels, truncation, padding, sample set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.data import write

from deltatune.cli import data as D

ROW = {"instruction": "Normalize the date to YYYY-MM-DD.", "input": "5 March 2024", "output": "2024-03-05"}


# ---- sources --------------------------------------------------------------------------------------------------
def test_alpaca_json_jsonl_chat_and_saved_datasets_read_the_same(tmp_path):
    import datasets

    messages = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    as_json = write(tmp_path / "a.json", json.dumps([ROW, messages]))
    as_jsonl = write(tmp_path / "a.jsonl", json.dumps(ROW) + "\n\n" + json.dumps(messages) + "\n")
    datasets.Dataset.from_list([ROW]).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([ROW]), "test": datasets.Dataset.from_list([ROW])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert D.load_rows(as_json) == D.load_rows(as_jsonl) == [ROW, messages]
    assert D.load_rows(str(tmp_path / "ds")) == [ROW] == D.load_rows(str(tmp_path / "dd"), split="test")
    with pytest.raises(D.DataError, match=r"splits \['train', 'test'\], not 'dev'; pass --split"):
        D.load_rows(str(tmp_path / "dd"), split="dev")


def test_missing_input_field_is_empty_and_null_is_empty(tmp_path):
    path = write(
        tmp_path / "a.jsonl",
        '{"instruction": "Say hi", "output": "hi"}\n{"instruction": "x", "input": null, "output": "y"}\n',
    )
    assert [r["input"] for r in D.load_rows(path)] == ["", ""]


def test_hub_dataset_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        D.DataError,
        match=r"--data shibing624/alpaca-zh: not a local file or folder, and the Hugging Face hub is not reachable "
        r".*save_to_disk",
    ):
        D.load_rows("shibing624/alpaca-zh")


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"bad.json, row 2: no 'output' field"),
        ('[{"instruction": "a", "output": "b"}, "text"]', r"bad.json, row 2: a row must be a JSON object, not str"),
        ('[{"instruction": "a", "output": 3}]', r"bad.json, row 1: 'output' must be a string, not int"),
        ('[{"instruction": "a", "output": "  "}]', r"bad.json, row 1: 'output' is empty"),
        ('[{"messages": [{"role": "user", "content": "hi"}]}]', r"bad.json, row 1: 'messages' has no assistant turn"),
        (
            '[{"messages": [{"role": "user"}]}]',
            r"bad.json, row 1: messages\[0\] needs a string 'role' and a string 'content'",
        ),
        ('[{"instruction": "a", "output": "b"},', r"bad.json: not valid JSON"),
        ("[]", r"bad.json holds no rows"),
        (
            '[{"messages": [{"role": "assistant", "content": "hi"}]}]',
            r"bad.json, row 1: 'messages' starts with an assistant turn",
        ),
    ],
)
def test_bad_rows_name_the_file_and_row(tmp_path, text, message):
    with pytest.raises(D.DataError, match=message):
        D.load_rows(write(tmp_path / "bad.json", text))


@pytest.mark.parametrize("text", ['[{"instruction": "a", "output": "b"}]', '{"instruction": "a", "output": "b"}\n'])
def test_a_file_saved_with_a_utf8_bom_reads(tmp_path, text):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # what Windows editors write as "UTF-8"
    assert D.load_rows(str(path)) == [{"instruction": "a", "input": "", "output": "b"}]


def test_a_folder_that_is_not_a_saved_dataset_is_named_with_its_option(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(
        D.DataError, match=r"--eval-data .*notes: the folder is not a dataset written by datasets' save_to_disk"
    ):
        D.load_rows(str(tmp_path / "notes"), flag="--eval-data")
    with pytest.raises(D.DataError, match=r"data file .*nope\.jsonl not found; pass --eval-data with an existing"):
        D.load_rows(str(tmp_path / "nope.jsonl"), flag="--eval-data")


# ---- templates and labels -------------------------------------------------------------------------------------
def test_human_assistant_template_is_the_tutorials_one(plain_tok):
    assert D.resolve_template("auto", plain_tok) == "human-assistant"
    (prompt, prompt_is_response), (answer, answer_is_response) = D.segments(
        D.to_messages(ROW), "human-assistant", plain_tok
    )
    assert prompt + answer == "Human: Normalize the date to YYYY-MM-DD.\n5 March 2024\n\nAssistant: 2024-03-05</s>"
    assert (prompt_is_response, answer_is_response) == (False, True)
    no_input = D.segments(D.to_messages({**ROW, "input": ""}), "human-assistant", plain_tok)
    assert no_input[0][0] == "Human: Normalize the date to YYYY-MM-DD.\n\nAssistant: "  # the tutorials' .strip()


def test_chat_template_is_used_when_the_tokenizer_has_one(chat_tok, plain_tok):
    assert D.resolve_template("auto", chat_tok) == "chat"
    prompt, answer = (text for text, _ in D.segments(D.to_messages(ROW), "chat", chat_tok))
    assert (
        prompt == "<|im_start|>user\nNormalize the date to YYYY-MM-DD.\n5 March 2024<|im_end|>\n<|im_start|>assistant\n"
    )
    assert answer == "2024-03-05<|im_end|>\n"
    with pytest.raises(ValueError, match="has no chat template; use --template human-assistant"):
        D.resolve_template("chat", plain_tok)
    with pytest.raises(ValueError, match="--template 'alpaca' is not known"):
        D.resolve_template("alpaca", chat_tok)


@pytest.mark.parametrize("template", ["chat", "human-assistant"])
def test_loss_counts_only_response_tokens(chat_tok, template):
    encoded = D.encode(D.to_messages(ROW), template, chat_tok, max_length=512)
    response = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != D.IGNORE_INDEX]
    assert response == encoded["input_ids"][-len(response) :]  # the response is the tail, labels == ids there
    assert chat_tok.decode(response).startswith("2024-03-05") and chat_tok.decode(response).rstrip().endswith(
        chat_tok.eos_token
    )
    prompt_ids = chat_tok(D.render_prompt(D.to_messages(ROW)[:1], template, chat_tok), add_special_tokens=False)[
        "input_ids"
    ]
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids  # training sees the same prompt as chat/eval


def test_multi_turn_trains_every_assistant_turn_and_no_user_turn(chat_tok):
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "AAA"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "BBB"},
    ]
    encoded = D.encode(messages, "chat", chat_tok, max_length=512)
    trained = chat_tok.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != D.IGNORE_INDEX]
    )
    assert trained == "AAA<|im_end|>\nBBB<|im_end|>\n"
    full = chat_tok.apply_chat_template(messages, tokenize=False)
    assert chat_tok.decode(encoded["input_ids"]) == full


def test_truncation_keeps_the_prompt_and_drops_rows_without_room(chat_tok, caplog):
    full = D.encode(D.to_messages(ROW), "chat", chat_tok, max_length=512)
    prompt_len = sum(1 for label in full["labels"] if label == D.IGNORE_INDEX)
    cut = D.encode(D.to_messages(ROW), "chat", chat_tok, max_length=prompt_len + 2)
    assert (
        cut["input_ids"] == full["input_ids"][: prompt_len + 2]
        and cut["labels"][-2:] == full["labels"][prompt_len : prompt_len + 2]
    )
    assert D.encode(D.to_messages(ROW), "chat", chat_tok, max_length=prompt_len) is None
    long_row = {**ROW, "input": ROW["input"] + " and more words" * 20}
    kept = D.tokenize_rows([ROW, long_row], chat_tok, "auto", prompt_len + 2)
    assert len(kept) == 1 and "1 of 2 rows dropped" in caplog.text
    with pytest.raises(
        D.DataError,
        match=rf"--max-length {prompt_len} is too small for any response in data: "
        rf"the shortest prompt is {prompt_len} tokens",
    ):
        D.tokenize_rows([ROW], chat_tok, "auto", prompt_len)


def test_collator_pads_right_with_masked_labels():
    batch = D.Collator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert D.Collator(0, pad_to_multiple_of=4)([{"input_ids": [1], "labels": [1]}])["input_ids"].shape == torch.Size(
        [1, 4]
    )


def test_prompts_and_answers_for_exact_match(chat_tok):
    [(prompt, reference)] = D.prompts_and_answers([ROW], chat_tok, "auto")
    assert prompt.endswith("<|im_start|>assistant\n") and reference == "2024-03-05"


# ---- the bundled sample set ----------------------------------------------------------------------------------
def test_bundled_sample_set_is_bilingual_with_a_disjoint_held_out_split():
    train, held_out = D.load_rows(None), D.load_rows(D.bundled_path(D.BUNDLED_EVAL))
    assert len(train) == 360 and len(held_out) == 60
    for rows in (train, held_out):
        chinese = [r for r in rows if "年" in r["input"]]
        assert len(chinese) == len(rows) // 3 and all("日期" in r["instruction"] for r in chinese)
    assert not {r["output"] for r in train} & {r["output"] for r in held_out}
    assert all(len(r["output"]) == 10 and r["output"][4] == r["output"][7] == "-" for r in train + held_out)


def test_sample_set_script_reproduces_the_bundled_files(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_sample_data.py")
    subprocess.run([sys.executable, script, "--out", str(tmp_path)], check=True, capture_output=True)
    for name in (D.BUNDLED_TRAIN, D.BUNDLED_EVAL):
        with open(D.bundled_path(name), encoding="utf-8") as bundled:
            assert (tmp_path / name).read_text(encoding="utf-8") == bundled.read()
