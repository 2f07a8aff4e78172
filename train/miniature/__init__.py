"""A miniature LLaVA trained here from nothing: the `demo` preset, and the proof that the recipe works.

  data.py      seeded scenes of coloured shapes: pictures, captions, conversations, LM text, eval questions
  vision.py    a small CLIP ViT, pre-trained on the pictures, then frozen
  language.py  a SentencePiece tokenizer and a small LLaMA, pre-trained on the text
  recipe.py    everything in order, stages 1 and 2 through train/, then `llava convert`
  answer.py    the held-out questions answered in transformers (the reference for llama.cpp's numbers)

`python -m train.miniature --out DIR` runs it all; `--quick` is the few-minute version the tests use.
"""
