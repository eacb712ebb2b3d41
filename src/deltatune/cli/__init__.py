"""The `deltatune` command line: train, chat, eval, merge, compare.

Each subcommand is a plain function (`train(options)`, `chat(...)`, `evaluate(...)`, `merge(...)`,
`compare(...)`) that tests and scripts call directly; `main` only parses flags and prints.

    deltatune train --method lora --max-steps 60 --output runs/lora
    deltatune chat --adapter runs/lora --compare-base --prompt "把日期改写成 YYYY-MM-DD 格式。\\n2031年7月4日"
    deltatune eval --adapter runs/lora
    deltatune merge --adapter runs/lora --output runs/lora-merged
    deltatune compare --max-steps 40 --output runs/compare
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any

from deltatune.cli.methods import METHOD_OPTIONS, METHODS, OPTION_TYPES
from deltatune.cli.options import RUN_FILE, load_options

__all__ = ["main", "train", "chat", "evaluate", "merge", "compare", "setup_logging"]


def __getattr__(name: str) -> Any:
    """The subcommand functions, imported on first use (keeps `deltatune --help` fast)."""
    modules = {
        "train": "cmd_train",
        "chat": "cmd_chat",
        "evaluate": "cmd_eval",
        "merge": "cmd_merge",
        "compare": "cmd_compare",
    }
    if name in modules:
        import importlib

        return getattr(importlib.import_module(f"deltatune.cli.{modules[name]}"), name)
    raise AttributeError(name)


def setup_logging() -> None:
    """Readable logs: time, level, message; third-party chatter at warning level."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("bitsandbytes", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


TRUST_HELP = "run Python code shipped in the model folder (auto_map in its config); only for code you trust"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _add_train_flags(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    """The flags of `train` (also used by `compare`); every default lives in TrainOptions / METHOD_OPTIONS."""
    S = argparse.SUPPRESS  # only flags given on the command line override --config
    add = parser.add_argument
    add("--config", help="run.yaml with the same keys as these flags (flags win)")
    add("--model", default=S, help="hub id, local folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    add("--method", default=S, help=f"one of: {', '.join(METHODS)} (default: lora)")
    add(
        "--data",
        default=S,
        help="alpaca/chat/ShareGPT .json/.jsonl, .csv, .parquet, a saved datasets folder, or a hub dataset "
        "(default: bundled sample set)",
    )
    add("--eval-data", default=S, help="held-out rows (default: the bundled held-out split with the bundled data)")
    add("--split", default=S, help="split of a dataset folder or hub dataset (default: train)")
    add("--template", default=S, help="auto (default), chat, or human-assistant (the tutorials' Human:/Assistant:)")
    add("--output", default=S, help="run folder (default: deltatune-run)")
    add("--max-steps", type=int, default=S, help="optimizer steps (default: --epochs)")
    add("--epochs", type=float, default=S, help="passes over the data when --max-steps is not given (default: 1)")
    add("--lr", type=float, default=S, help="learning rate (default: the method's, see docs)")
    add("--batch-size", type=int, default=S, help="examples per step per process (default: 8)")
    add("--grad-accum", type=int, default=S, help="gradient accumulation steps (default: 1)")
    add(
        "--max-length",
        type=int,
        default=S,
        help="tokens per example; longer ones are cut (default: the longest row, up to the model's context)",
    )
    add("--seed", type=int, default=S, help="random seed (default: 42)")
    add("--load-in-4bit", action="store_true", default=S, help="QLoRA: 4-bit NF4 base via bitsandbytes")
    add("--load-in-8bit", action="store_true", default=S, help="8-bit base via bitsandbytes")
    add("--logging-steps", type=int, default=S, help="log the loss every N steps (default: 5)")
    add("--save-steps", type=int, default=S, help="checkpoint every N steps (default: 50)")
    add(
        "--cache-dir",
        default=S,
        help="where the default model is converted (default: $DELTATUNE_CACHE or ~/.cache/deltatune)",
    )
    add("--trust-remote-code", action="store_true", default=S, help=TRUST_HELP)
    # data formats
    add(
        "--train-on", choices=("all", "last"), default=S, help="loss on every assistant turn or the last (default: all)"
    )
    add("--columns", default=S, help="the file's column names, as instruction=question,output=answer")
    if resume:
        add(
            "--resume",
            nargs="?",
            const=True,
            default=S,
            help="continue from the last checkpoint in --output (or this checkpoint)",
        )
        add("--overwrite", action="store_true", default=S, help="replace a run already in --output")
    _add_trainer_flags(parser)
    group = parser.add_argument_group("method options (each applies to the methods that read it)")
    for key, (default, text) in METHOD_OPTIONS.items():
        kind = OPTION_TYPES.get(key) or {bool: _bool, int: int, float: float}.get(type(default), str)
        switch = {"nargs": "?", "const": True} if type(default) is bool else {}  # `--dora` alone means true
        group.add_argument(
            "--" + key.replace("_", "-"), type=kind, default=S, help=f"{text} (default: {default})", **switch
        )


def _add_trainer_flags(parser: argparse.ArgumentParser) -> None:
    """Precision, device and Trainer options (cli/trainer_setup.py); other TrainingArguments: `trainer:` in YAML."""
    S = argparse.SUPPRESS
    add = parser.add_argument_group("precision, device and Trainer options").add_argument
    add("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default=S, help="base model dtype (default: auto)")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default=S, help="default: cuda, else mps, else cpu")
    add("--gradient-checkpointing", action="store_true", default=S, help="recompute activations: less memory")
    add("--lr-scheduler", default=S, help="linear (default), cosine, constant, constant_with_warmup, ...")
    add("--warmup-ratio", type=float, default=S, help="fraction of the steps spent warming up (default: 0)")
    add("--weight-decay", type=float, default=S, help="AdamW weight decay (default: 0)")
    add("--eval-steps", type=int, default=S, help="eval loss on --eval-data every N steps (default: at the end)")
    add("--keep-best", action="store_true", default=S, help="save the checkpoint with the lowest eval loss")
    add("--report-to", choices=("none", "tensorboard", "wandb", "mlflow"), default=S, help="default: none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune", description="Parameter-efficient fine-tuning from the command line.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_flags(sub.add_parser("train", help="fine-tune a model with one method", allow_abbrev=False))
    chat = sub.add_parser("chat", help="chat with a tuned model (or answer one --prompt)")
    chat.add_argument("--adapter", help="run folder from deltatune train (omit: the base model alone)")
    chat.add_argument("--prompt", help="answer this one message and exit")
    chat.add_argument("--compare-base", action="store_true", help="also print the base model's answer")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--template", help="override the run's prompt template")
    chat.add_argument("--system", help="system prompt every conversation starts with (/system in the chat)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0 samples")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this probability mass")
    chat.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 curbs repeats (default 1: off)")
    evaluate = sub.add_parser("eval", help="eval loss, perplexity and exact-match on held-out data")
    evaluate.add_argument("--adapter", help="run folder from deltatune train (omit: the base model alone)")
    evaluate.add_argument("--data", help="held-out rows (default: the run's held-out data)")
    evaluate.add_argument("--compare-base", action="store_true", help="also score the base model")
    evaluate.add_argument("--batch-size", type=int, default=16)
    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base and save a plain transformers model")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--overwrite", action="store_true")
    for command in (chat, evaluate, merge):
        command.add_argument("--model", help="base model (default: the one the adapter was trained on)")
        command.add_argument(
            "--dtype", default="auto", help="auto (the model's own where the device runs it), bf16, fp16, fp32"
        )
        command.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, mps")
        command.add_argument("--cache-dir")
        command.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    compare = sub.add_parser("compare", help="train every method on the same budget and tabulate them")
    _add_train_flags(compare, resume=False)
    compare.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)} (default: all)")
    compare.add_argument(
        "--overwrite",
        action="store_true",
        default=argparse.SUPPRESS,
        help="replace the runs of an earlier comparison in --output",
    )
    compare.add_argument(
        "--in-process", action="store_true", help="train all methods in this process (faster, peak memory less clean)"
    )
    return parser


SIGNAL_EXIT_CODES = {"Ctrl-C": 130, "SIGTERM": 143}  # 128 + the signal number, as shells report a killed job


def _report_train(result: Any) -> int:
    """Print what a train run made; a run a signal stopped early exits as that signal would (130, 143)."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun every process returns; one reports
        return 0
    print(
        f"adapter in {result.output}: {result.steps} steps, train loss {result.train_loss}, "
        f"eval loss {result.eval_loss}, {result.seconds_per_step or 0:.2f} s/step"
    )
    if not result.stopped_by:
        return 0
    print(f"stopped by {result.stopped_by}; continue with: deltatune train --output {result.output} --resume")
    return SIGNAL_EXIT_CODES[result.stopped_by]


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; returns its exit code."""
    import deltatune.cli as cli  # the subcommands through this package's lazy __getattr__ (see its docstring)

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "methods", "in_process")}
    if args.command == "train":
        config = args.config
        saved = os.path.join(flags.get("output", "deltatune-run"), RUN_FILE)
        if config is None and flags.get("resume") and os.path.isfile(saved):
            config = saved  # --resume continues the run as it was set up; flags given now still win
        return _report_train(cli.train(load_options(config, flags)))
    elif args.command == "chat":
        cli.chat(**flags)
    elif args.command == "eval":
        from deltatune.cli.cmd_eval import report, save_scores  # on first use, as the subcommands (see __getattr__)

        result = cli.evaluate(**flags, write=False)
        print(report(result), flush=True)  # the scores first: a folder that cannot take eval.json loses nothing
        if flags.get("adapter"):
            save_scores(result, flags["adapter"])
    elif args.command == "merge":
        print(f"merged model in {cli.merge(**flags)}")
    elif args.command == "compare":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        options = load_options(args.config, flags)
        cli.compare(options, methods, isolate=not args.in_process)
        with open(os.path.join(options.output, "comparison.md"), encoding="utf-8") as handle:
            print(handle.read())
    return 0


USER_ERRORS = (ValueError, OSError, ImportError)  # bad input or environment: the message is meant for the user
DEBUG_ENV = "DELTATUNE_DEBUG"


def _raised_in_deltatune(err: BaseException) -> bool:
    """Whether `err` was raised by deltatune's own code (its TypeErrors name a wrong argument for the user)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and os.path.dirname(__file__).rsplit(os.sep, 1)[0] in frames[-1].filename


def error_line(command: str, err: BaseException) -> str:
    """One line for the terminal: the message of a user error, or where an unexpected error came from."""
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, USER_ERRORS) or isinstance(err, TypeError) and _raised_in_deltatune(err):
        return f"deltatune {command}: error: {message}"
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return (
        f"deltatune {command}: internal error{where}: {type(err).__name__}: {message} "
        f"(run again with {DEBUG_ENV}=1 for the traceback, and report it)"
    )


# What the command line needs beyond the library (`pip install 'deltatune[cli]'`): module -> PyPI package.
CLI_EXTRAS = {"datasets": "datasets", "gguf": "gguf", "matplotlib": "matplotlib", "yaml": "pyyaml"}


def check_cli_extras() -> None:
    """Refuse with one line when the command line's own packages are missing (a library-only install)."""
    import importlib.util

    missing = [package for module, package in CLI_EXTRAS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"the command line needs {', '.join(missing)}, which `pip install deltatune` (the library) leaves out; "
            "install them with: pip install 'deltatune[cli]'"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deltatune` script; returns the exit code (1: an error, 130: interrupted).

    Every error is one line on stderr; with DELTATUNE_DEBUG=1 the traceback comes first."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        check_cli_extras()
        return _run(args)
    except KeyboardInterrupt:
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every error becomes a line for the user
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print(error_line(args.command, err), file=sys.stderr)
        return 1
