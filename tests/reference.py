"""What transformers computes for a LLaVA checkpoint: the yardstick for everything convert/ writes.

The reference reads the checkpoint with transformers and torch alone, never through convert/, so a
mistake in the converter cannot hide in the yardstick too. Prompts are tokenised the way LLaVA's own
`tokenizer_image_token` does: the text split at `<image>`, each piece SentencePiece-encoded on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from llavacli.images import preprocess
from llavacli.prompts import IMAGE


@dataclass
class Reference:
    """A LLaVA as transformers runs it: image features, then the LLM over embeddings."""

    features: callable  # pixel_values -> [n_tokens, hidden]
    llm: torch.nn.Module  # a LlamaForCausalLM (or LLaVA's language model + lm_head)
    embed: torch.nn.Module
    image_size: int
    image_mode: str
    spm_path: Path
    llava: LlavaForConditionalGeneration | None = None  # set for llava-hf checkpoints
    image_token_id: int | None = None

    def pixel_values(self, img) -> torch.Tensor:
        proc = CLIPImageProcessor(
            size={"shortest_edge": self.image_size},
            crop_size={"height": self.image_size, "width": self.image_size},
        )
        return proc(preprocess(img, self.image_size, self.image_mode), return_tensors="pt")["pixel_values"]

    def image_features(self, img) -> np.ndarray:
        with torch.no_grad():
            return self.features(self.pixel_values(img)).numpy()

    def token_pieces(self, prompt: str) -> list[list[int]]:
        """Token ids of each text piece between images, BOS first, as LLaVA tokenises a prompt."""
        sp = spm.SentencePieceProcessor(model_file=str(self.spm_path))
        pieces = prompt.split(IMAGE)
        out = [[sp.bos_id()] + (sp.encode(pieces[0]) if pieces[0] else [])]
        out += [sp.encode(p) if p else [] for p in pieces[1:]]
        return out

    def _embeddings(self, prompt: str, img) -> torch.Tensor:
        feats = torch.from_numpy(self.image_features(img)) if img is not None else None
        parts = []
        for i, ids in enumerate(self.token_pieces(prompt)):
            if i:
                parts.append(feats)
            if ids:
                parts.append(self.embed(torch.tensor(ids)))
        return torch.cat(parts)[None]

    def next_logits(self, prompt: str, img) -> np.ndarray:
        with torch.no_grad():
            if self.llava is not None:  # LlavaForConditionalGeneration itself, given LLaVA's token layout
                ids = self.input_ids(prompt, img)
                out = self.llava(input_ids=ids, pixel_values=self.pixel_values(img))
                return out.logits[0, -1].numpy()
            return self.llm(inputs_embeds=self._embeddings(prompt, img)).logits[0, -1].numpy()

    def input_ids(self, prompt: str, img) -> torch.Tensor:
        n_image = self.image_features(img).shape[0]
        ids = []
        for i, piece in enumerate(self.token_pieces(prompt)):
            if i:
                ids += [self.image_token_id] * n_image
            ids += piece
        return torch.tensor([ids])

    def logits_after(self, prompt: str, img, tokens: list[int]) -> np.ndarray:
        """The next-token logits once `tokens` follow the prompt."""
        with torch.no_grad():
            embeds = torch.cat([self._embeddings(prompt, img), self.embed(torch.tensor([tokens]))], dim=1)
            return self.llm(inputs_embeds=embeds).logits[0, -1].numpy()

    def greedy(self, prompt: str, img, n: int) -> list[int]:
        with torch.no_grad():
            embeds = self._embeddings(prompt, img)
            out = []
            for _ in range(n):
                token = int(self.llm(inputs_embeds=embeds).logits[0, -1].argmax())
                out.append(token)
                embeds = torch.cat([embeds, self.embed(torch.tensor([[token]]))], dim=1)
            return out


def load_llava_hf(directory: Path) -> Reference:
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    cfg = model.config

    def features(pix):
        out = model.get_image_features(
            pixel_values=pix,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        out = getattr(out, "pooler_output", out)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.reshape(-1, cfg.text_config.hidden_size)

    lm = _LanguageModel(model.model.language_model, model.lm_head)
    return Reference(
        features, lm, model.get_input_embeddings(), cfg.vision_config.image_size, "pad",
        directory / "tokenizer.model", llava=model, image_token_id=cfg.image_token_id,
    )


class _LanguageModel(torch.nn.Module):
    def __init__(self, body, head):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, inputs_embeds):
        hidden = self.body(inputs_embeds=inputs_embeds).last_hidden_state
        return type("Out", (), {"logits": self.head(hidden)})


def load_original(directory: Path, tower_dir: Path) -> Reference:
    config = json.loads((directory / "config.json").read_text())
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state |= load_file(f)
    for f in sorted(directory.glob("pytorch_model*.bin")):
        state |= torch.load(f, map_location="cpu", weights_only=True)
    text_cfg = LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("mm_") and k not in ("architectures", "model_type")})
    llm = LlamaForCausalLM(text_cfg).eval()
    llm.load_state_dict({k: v for k, v in state.items() if not k.startswith("model.mm_projector")}, strict=True)
    tower = CLIPVisionModel.from_pretrained(tower_dir, dtype=torch.float32).eval()
    layer = config["mm_vision_select_layer"]
    prefix = "model.mm_projector."
    proj_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if config.get("mm_projector_type") == "mlp2x_gelu":  # LLaVA's build_vision_projector: Linear, GELU, Linear
        out0, in0 = proj_state["0.weight"].shape
        proj = torch.nn.Sequential(torch.nn.Linear(in0, out0), torch.nn.GELU(), torch.nn.Linear(out0, out0))
    else:
        proj = torch.nn.Linear(proj_state["weight"].shape[1], proj_state["weight"].shape[0])
    proj.load_state_dict(proj_state)

    def features(pix):
        hidden = tower(pix, output_hidden_states=True).hidden_states[layer][0, 1:]
        return proj(hidden)

    mode = "pad" if config.get("image_aspect_ratio") == "pad" else "crop"
    return Reference(features, llm, llm.get_input_embeddings(), tower.config.image_size, mode, directory / "tokenizer.model")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
