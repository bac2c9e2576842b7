"""The frozen base models (UNet, VAE, text encoder, tokenizer, CLIP image encoder, scheduler).

Both profiles load through the same code: ``load_backbone(base_dir, image_encoder_dir)``
with ``from_pretrained(..., local_files_only=True)``. The tiny profile first *writes* a
base in diffusers layout from small configs (seeded random weights, or the output of the
tiny ``base`` training stage), so tests drive the real loading path with models built in
code and nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import TinyProfileParams

log = logging.getLogger(__name__)

TEXT_MAX_LENGTH = 77

# Words that get whole-word BPE tokens in the tiny tokenizer (anything else falls back to
# byte-level characters, so every prompt still tokenizes). Covers the synthetic
# test-bed's captions and face prompts plus common prompt words.
TINY_WORDS = """
a an the of with and in on at to from by for is are photo portrait picture image person man woman people two three
face faces head hair short long curly straight bald red blonde brown black white grey gray blue green yellow purple
orange pink dark light skin pale tan glasses sunglasses beard moustache hat cap earrings smiling smile happy sad
angry surprised neutral disgusted fearful expression laughing frowning serious calm open mouth eyes closed looking
left right up down turned slightly strongly facing camera front profile tilted background outdoors indoors studio
park street beach city room office garden forest sky night day sunny wearing shirt jacket suit dress close-up
closeup high quality detailed realistic painting drawing cartoon standing sitting together friends family side
""".split()


@dataclass
class Backbone:
    """Frozen base models; the pipeline and the trainers take their dims from here."""

    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    image_encoder: "torch.nn.Module"
    scheduler: object
    base_dir: Path

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def clip_dim(self) -> int:
        return int(self.image_encoder.config.hidden_size)

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of the face crop the CLIP image encoder expects."""
        return int(self.image_encoder.config.image_size)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Backbone":
        for m in (self.unet, self.vae, self.text_encoder, self.image_encoder):
            m.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> "Backbone":
        for m in (self.unet, self.vae, self.text_encoder, self.image_encoder):
            m.requires_grad_(False)
            m.eval()
        return self


# --------------------------------------------------------------------------- tiny profile


def build_tiny_tokenizer():
    """A CLIP BPE tokenizer built offline: byte-level alphabet + whole-word merges for TINY_WORDS."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            current += piece
            vocab.setdefault(current, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = TEXT_MAX_LENGTH
    return tok


def tiny_fingerprint(tiny: TinyProfileParams) -> str:
    """Hash of everything that defines a freshly built tiny base (so its cache is never stale)."""
    keys = ("seed", "cross_attention_dim", "unet", "vae", "text", "vision", "face_crop_size", "resolution")
    blob = json.dumps(tiny.model_dump(include=set(keys), mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def write_tiny_base(tiny: TinyProfileParams, out_dir: Path) -> Path:
    """Build the tiny base from its configs with seeded weights and save it in diffusers layout."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    torch.manual_seed(tiny.seed)
    tokenizer = build_tiny_tokenizer()
    n_levels = len(tiny.unet.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=tiny.resolution // 2 ** (len(tiny.vae.block_out_channels) - 1),
        in_channels=tiny.vae.latent_channels,
        out_channels=tiny.vae.latent_channels,
        block_out_channels=tuple(tiny.unet.block_out_channels),
        layers_per_block=tiny.unet.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n_levels,
        up_block_types=("CrossAttnUpBlock2D",) * n_levels,
        cross_attention_dim=tiny.cross_attention_dim,
        attention_head_dim=tiny.unet.attention_head_dim,
        norm_num_groups=tiny.unet.norm_num_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(tiny.vae.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(tiny.vae.block_out_channels),
        block_out_channels=tuple(tiny.vae.block_out_channels),
        latent_channels=tiny.vae.latent_channels,
        norm_num_groups=tiny.vae.norm_num_groups,
        sample_size=tiny.resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.text.hidden_size,
            intermediate_size=tiny.text.intermediate_size,
            num_hidden_layers=tiny.text.num_hidden_layers,
            num_attention_heads=tiny.text.num_attention_heads,
            max_position_embeddings=TEXT_MAX_LENGTH,
            projection_dim=tiny.text.hidden_size,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=tiny.vision.hidden_size,
            intermediate_size=tiny.vision.intermediate_size,
            num_hidden_layers=tiny.vision.num_hidden_layers,
            num_attention_heads=tiny.vision.num_attention_heads,
            image_size=tiny.face_crop_size,
            patch_size=tiny.vision.patch_size,
            projection_dim=tiny.vision.hidden_size,
        )
    )
    # SD1.5's training schedule, so the tiny profile exercises the same noise schedule.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )
    save_base(tmp, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
              image_encoder=image_encoder, scheduler=scheduler)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def save_base(out_dir: Path, *, unet, vae, text_encoder, tokenizer, image_encoder, scheduler,
              profile: str = "tiny", source: str | None = None) -> Path:
    """Write a base in diffusers layout (also used by the tiny ``base`` training stage, and for a converted
    single-file SD1.5 checkpoint, whose image encoder is the separate ViT-H/14: ``image_encoder=None``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out_dir / "unet")
    vae.save_pretrained(out_dir / "vae")
    text_encoder.save_pretrained(out_dir / "text_encoder")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    if image_encoder is not None:
        image_encoder.save_pretrained(out_dir / "image_encoder")
    scheduler.save_pretrained(out_dir / "scheduler")
    index = {"_class_name": "DynamicIDBase", "profile": profile, **({"source": source} if source else {})}
    (out_dir / "model_index.json").write_text(json.dumps(index))
    return out_dir


def tiny_base_dir(tiny: TinyProfileParams, cache_dir: str | Path) -> Path:
    """The tiny base to load: ``tiny.base`` if set, else a seeded build cached under cache_dir."""
    if tiny.base:
        path = Path(tiny.base).expanduser()
        if not (path / "unet" / "config.json").exists():
            raise FileNotFoundError(
                f"model.tiny.base = {tiny.base}: no base in diffusers layout there "
                "(run `dynamicid train --stage base`, or set model.tiny.base: null for a seeded random base)"
            )
        return path
    path = Path(cache_dir).expanduser() / f"tiny-base-{tiny_fingerprint(tiny)}"
    if not (path / "model_index.json").exists():
        log.info("building the tiny base in %s", path)
        write_tiny_base(tiny, path)
    return path


# --------------------------------------------------------------------------- loading (both profiles)


def load_backbone(base_dir: str | Path, image_encoder_dir: str | Path | None = None) -> Backbone:
    """Load a base in diffusers layout from local files only.

    ``image_encoder_dir`` defaults to ``base_dir/image_encoder`` (the tiny layout); for SD1.5
    it is the separate ViT-H/14 directory.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    base = Path(base_dir).expanduser()
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (base / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"base {base}: missing {', '.join(missing)} (expected a diffusers-layout directory)")
    enc_dir = Path(image_encoder_dir).expanduser() if image_encoder_dir else base / "image_encoder"
    if not enc_dir.is_dir():
        raise FileNotFoundError(f"CLIP image encoder not found at {enc_dir}")
    kw = {"local_files_only": True}
    # accelerate is not in the stack: say so, instead of letting diffusers warn on every load that it is missing
    dkw = {**kw, "low_cpu_mem_usage": False}
    unet = UNet2DConditionModel.from_pretrained(base / "unet", **dkw)
    vae = AutoencoderKL.from_pretrained(base / "vae", **dkw)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", **kw)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", **kw)
    tokenizer.model_max_length = min(int(tokenizer.model_max_length), TEXT_MAX_LENGTH)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(enc_dir, **kw)
    scheduler = DDPMScheduler.from_pretrained(base / "scheduler", **kw)
    return Backbone(unet, vae, text_encoder, tokenizer, image_encoder, scheduler, base).freeze()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
