"""Data formats beyond alpaca JSON: ShareGPT rows, alpaca system/history, CSV/Parquet, --columns, the token cache."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers.data import write

from deltatune.cli import data as D
from deltatune.cli import train
from deltatune.cli.options import load_options

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
MULTI_TURN = {
    "system": "Answer in ISO dates.",
    "history": [["1 May 2020", "2020-05-01"]],
    "instruction": "Normalize the date.",
    "input": "5 March 2024",
    "output": "2024-03-05",
}


def trained_text(tokenizer, encoded) -> str:
    ids = [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label != D.IGNORE_INDEX]
    return tokenizer.decode(ids)


# ---- ShareGPT ---------------------------------------------------------------------------------------------------
def test_sharegpt_rows_become_the_chat_messages(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "user", "value": "again"},
            {"from": "assistant", "value": "hello again"},
        ]
    }
    path = write(tmp_path / "share.jsonl", json.dumps(row) + "\n")
    roles = ["system", "user", "assistant", "user", "assistant"]
    contents = [turn["value"] for turn in row["conversations"]]
    expected = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    assert D.load_rows(path) == [{"messages": expected}]


@pytest.mark.parametrize(
    "conversations, message",
    [
        ([], r"share.json, row 2: 'conversations' must be a non-empty list"),
        ([{"from": "bot", "value": "x"}], r"share.json, row 2: conversations\[0\] has 'from' 'bot'; use one of: human"),
        ([{"from": "human"}], r"share.json, row 2: conversations\[0\] needs a string 'from' and a string 'value'"),
        ([{"from": "human", "value": "hi"}], r"share.json, row 2: 'messages' has no assistant turn"),
    ],
)
def test_bad_sharegpt_rows_name_the_file_and_row(tmp_path, conversations, message):
    rows = [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]
    path = write(tmp_path / "share.json", json.dumps(rows + [{"conversations": conversations}]))
    with pytest.raises(D.DataError, match=message):
        D.load_rows(path)


# ---- alpaca system and history ----------------------------------------------------------------------------------
def test_alpaca_system_and_history_become_turns_before_the_current_one():
    row = D.check_row(MULTI_TURN, "a.json, row 1")
    assert D.to_messages(row) == [
        {"role": "system", "content": "Answer in ISO dates."},
        {"role": "user", "content": "1 May 2020"},
        {"role": "assistant", "content": "2020-05-01"},
        {"role": "user", "content": "Normalize the date.\n5 March 2024"},
        {"role": "assistant", "content": "2024-03-05"},
    ]
    with pytest.raises(D.DataError, match=r"a.json, row 1: 'history' must be a list of \[instruction, output\]"):
        D.check_row({**MULTI_TURN, "history": [["only one"]]}, "a.json, row 1")
    with pytest.raises(D.DataError, match=r"a.json, row 1: 'system' must be a string, not int"):
        D.check_row({**MULTI_TURN, "system": 3}, "a.json, row 1")


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_history_reaches_the_loss_mask_at_exact_positions(plain_tok, train_on):
    messages = D.to_messages(D.check_row(MULTI_TURN, "row"))
    eos = plain_tok.eos_token
    pieces = [  # the human-assistant template written out: (text, trained)
        ("Answer in ISO dates.\n\nHuman: 1 May 2020\n\nAssistant: ", False),
        ("2020-05-01" + eos, train_on == "all"),
        ("\n\nHuman: Normalize the date.\n5 March 2024\n\nAssistant: ", False),
        ("2024-03-05" + eos, True),
    ]
    ids, labels = [], []
    for text, trained in pieces:
        piece = plain_tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [D.IGNORE_INDEX] * len(piece)
    encoded = D.encode(messages, "human-assistant", plain_tok, max_length=512, train_on=train_on)
    assert encoded == {"input_ids": ids, "labels": labels}
    first_answer = len(plain_tok(pieces[0][0], add_special_tokens=False)["input_ids"])
    assert (encoded["labels"][first_answer] == D.IGNORE_INDEX) == (train_on == "last")


def test_history_with_the_chat_template_trains_every_answer_or_the_last(chat_tok):
    messages = D.to_messages(D.check_row(MULTI_TURN, "row"))
    every = D.encode(messages, "chat", chat_tok, max_length=512)
    last = D.encode(messages, "chat", chat_tok, max_length=512, train_on="last")
    assert chat_tok.decode(every["input_ids"]) == chat_tok.apply_chat_template(messages, tokenize=False)
    assert every["input_ids"] == last["input_ids"]
    assert trained_text(chat_tok, every) == "2020-05-01<|im_end|>\n2024-03-05<|im_end|>\n"
    assert trained_text(chat_tok, last) == "2024-03-05<|im_end|>\n"
    with pytest.raises(ValueError, match=r"--train-on 'first' is not known; use one of: all, last"):
        D.tokenize_rows([MULTI_TURN], chat_tok, "auto", 512, train_on="first")


# ---- CSV, Parquet and --columns ---------------------------------------------------------------------------------
def test_csv_and_parquet_read_like_json(tmp_path):
    import datasets

    rows = [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Normalize", "input": "5 March 2024", "output": "2024-03-05"},
    ]
    csv = write(tmp_path / "a.csv", 'instruction,input,output\nSay hi,,hi\nNormalize,"5 March 2024",2024-03-05\n')
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    assert D.load_rows(csv) == rows == D.load_rows(str(tmp_path / "a.parquet"))
    bad = write(tmp_path / "bad.csv", "instruction,output\nSay hi,\n")
    with pytest.raises(D.DataError, match=r"bad.csv, row 1: 'output' is null"):
        D.load_rows(bad)


def test_columns_map_the_files_names_to_deltatunes_fields(tmp_path):
    csv = write(tmp_path / "qa.csv", "question,answer,notes\nWhat is 2+2?,4,easy\n")
    assert D.load_rows(csv, columns="instruction=question, output=answer") == [
        {"instruction": "What is 2+2?", "input": "", "output": "4"}
    ]
    with pytest.raises(D.DataError, match=r"unknown field 'prompt'; deltatune's fields are: instruction, input"):
        D.load_rows(csv, columns="prompt=question")
    with pytest.raises(
        D.DataError, match=r"qa.csv has no column 'reply'; its columns are: 'question', 'answer', 'notes'"
    ):
        D.load_rows(csv, columns="instruction=question,output=reply")
    with pytest.raises(D.DataError, match=r"'output' is not FIELD=COLUMN"):
        D.load_rows(csv, columns="output")


def test_train_on_and_columns_are_options_and_flags():
    from deltatune.cli import build_parser

    args = build_parser().parse_args(["train", "--train-on", "last", "--columns", "instruction=q,output=a"])
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    options = load_options(None, flags)
    assert (options.train_on, options.columns) == ("last", "instruction=q,output=a")
    assert load_options(None, {"train-on": "last"}).train_on == "last"  # run.yaml spelling
    with pytest.raises(ValueError, match=r"--train-on 'some': use all"):
        load_options(None, {"train_on": "some"}).check()


# ---- the tokenization cache -------------------------------------------------------------------------------------
def test_a_second_tokenization_of_the_same_data_reads_the_cache(chat_tok, tmp_path, monkeypatch):
    rows = [D.check_row(MULTI_TURN, "row"), {"messages": CHAT}]
    uncached = D.tokenize_rows(rows, chat_tok, "auto", 512)
    calls = []
    real_encode = D.encode
    monkeypatch.setattr(D, "encode", lambda *args, **kwargs: calls.append(1) or real_encode(*args, **kwargs))
    cache = str(tmp_path / "tokenized")
    first = D.tokenize_rows(rows, chat_tok, "auto", 512, cache_dir=cache)
    assert len(calls) == 2
    second = D.tokenize_rows(rows, chat_tok, "auto", 512, cache_dir=cache)
    assert len(calls) == 2 and second == first == uncached
    D.tokenize_rows(rows, chat_tok, "auto", 511, cache_dir=cache)  # other settings: tokenized again
    D.tokenize_rows(rows, chat_tok, "auto", 512, train_on="last", cache_dir=cache)
    D.tokenize_rows(rows[:1], chat_tok, "auto", 512, cache_dir=cache)  # other data
    assert len(calls) == 2 + 2 + 2 + 1


def test_cached_rows_too_long_are_still_dropped(chat_tok, tmp_path, caplog):
    long_row = {"instruction": "x " * 300, "input": "", "output": "y"}
    rows = [D.check_row(MULTI_TURN, "row"), long_row]
    for _ in range(2):
        assert len(D.tokenize_rows(rows, chat_tok, "auto", 64, cache_dir=str(tmp_path))) == 1
    assert caplog.text.count("1 of 2 rows dropped") == 2


def test_train_on_a_csv_with_columns_tokenizes_once(tiny, tmp_path, run_options, monkeypatch):
    import csv

    path = tmp_path / "qa.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerows([[f"Normalize {d} May 2020", f"2020-05-{d:02d}"] for d in range(1, 9)])
    options = dict(data=str(path), eval_data=str(path), columns="instruction=question,output=answer", train_on="last")
    first = train(run_options(tiny, tmp_path / "run", cache_dir=str(tmp_path / "cache"), max_steps=2, **options))
    run = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert (run["columns"], run["train_on"]) == (options["columns"], "last")
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.arrow"))) == 1  # held-out = train data: one file
    calls = []
    real_encode = D.encode
    monkeypatch.setattr(D, "encode", lambda *args, **kwargs: calls.append(1) or real_encode(*args, **kwargs))
    again = train(run_options(tiny, tmp_path / "again", cache_dir=str(tmp_path / "cache"), max_steps=2, **options))
    assert calls == [] and again.eval_loss == first.eval_loss and again.train_loss == first.train_loss
    from deltatune.cli import evaluate  # the run's --columns and --train-on also apply to its held-out file

    scores = evaluate(adapter=str(tmp_path / "run"), write=False)
    assert scores.examples == 8 and scores.eval_loss == pytest.approx(first.eval_loss, rel=1e-5)
