"""LLaVA's two-stage training (haotian-liu/LLaVA scripts/v1_5), on transformers' LlavaForConditionalGeneration.

  config.py   the run's settings (TOML + key=value), checked before torch loads
  data.py     LLaVA JSON -> tokens, labels on assistant turns only, images as the runtime preprocesses them
  model.py    CLIP + LLaMA assembled into a llava-hf model; what each stage trains; LoRA; saving
  loop.py     the optimisation loop on Hugging Face accelerate (DDP, DeepSpeed ZeRO, FSDP)
  checkpoint.py  atomic, resumable checkpoints
  logs.py     progress bar, JSONL log, TensorBoard
  stages.py   one stage from config to saved model
  scienceqa.py   ScienceQA's own format -> LLaVA JSON, with the paper's prompt
  cli.py      `llava train ...` / `python -m train ...`

Importing this package imports nothing heavy: torch loads only when a run starts.
"""
