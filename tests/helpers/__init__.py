"""Shared test helpers: `models` (tiny random models, one builder per architecture), `peft_pairs` (a deltatune
model beside peft's on the same base), `prompts` (the prompt-method checks), `ops` (fast-path tests), `quant`
(4-bit / 8-bit loads), `chat_model` (a tiny chat model on disk for the command line), `peft_on_cpu` (peft's LoftQ
as a CPU oracle), `data` (small data files)."""
