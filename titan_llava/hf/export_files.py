"""The non-weight files of a Hugging Face LLaVA-NeXT export: config.json (LlavaNextConfig), the
generation config, the slow Llama tokenizer with `<image>` / `<pad>` and a vicuna_v1 chat template,
and the LlavaNextProcessor / image-processor configs. Written as plain JSON (no transformers import).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import sentencepiece as spm

from titan_llava.constants import IGNORE_INDEX
from titan_llava.data.anyres import CLIP_MEAN, CLIP_STD
from titan_llava.data.conversation import VICUNA_SYSTEM
from titan_llava.hf.export_tokenizer import tokenizer_json
from titan_llava.models.args import LlavaNextArgs

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = (
    64  # llava-hf pads the vocabulary rows to a multiple of 64 (32000 + 2 -> 32064)
)

# vicuna_v1 as a chat template (what titan_llava.data.conversation trains on): system + " ", then
# "USER: " + one "<image>\n" per image + text + " " and "ASSISTANT: " + text + "</s>" per turn. The
# generation prompt ends with "ASSISTANT:" (the model continues with " answer</s>").
# It starts with the BOS token, as every training sample does: vLLM's chat endpoint and
# `tokenizer.apply_chat_template(tokenize=True)` add no special tokens of their own.
VICUNA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='" + VICUNA_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- if m['content'] is string -%}{%- set ns.system = m['content'] -%}"
    "{%- else -%}{%- set ns.system = m['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}{%- set n_img = 0 -%}"
    "{%- else -%}{%- set text = m['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}"
    "{%- set n_img = m['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + '<image>\\n' * n_img + text + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + text + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TokenizerInfo:
    """Ids of the exported vocabulary: the SentencePiece pieces, then `<image>`, `<pad>`."""

    sp_size: int
    bos_id: int
    eos_id: int
    unk_id: int

    @property
    def image_token_id(self) -> int:
        return self.sp_size

    @property
    def pad_token_id(self) -> int:
        return self.sp_size + 1

    def padded_vocab(self, model_vocab: int) -> int:
        """Rows of the exported embedding / LM head: every model row and both added tokens,
        rounded up to VOCAB_MULTIPLE."""
        need = max(model_vocab, self.sp_size + 2)
        return -(-need // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def tokenizer_info(tokenizer_path: str) -> TokenizerInfo:
    if not os.path.isfile(tokenizer_path):
        raise ValueError(
            f"tokenizer {tokenizer_path!r} does not exist (model.tokenizer_path)"
        )
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    return TokenizerInfo(sp.get_piece_size(), sp.bos_id(), sp.eos_id(), sp.unk_id())


def llava_next_config(args: LlavaNextArgs, tok: TokenizerInfo, dtype_name: str) -> dict:
    """LlavaNextConfig as a dict (text: Llama, vision: the FULL pretrained CLIP tower)."""
    llm, vis = args.llm, args.vision
    text_config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": llm.dim,
        "intermediate_size": llm.hidden_dim,
        "num_hidden_layers": llm.n_layers,
        "num_attention_heads": llm.n_heads,
        "num_key_value_heads": llm.kv_heads,
        "head_dim": llm.head_dim,
        "vocab_size": tok.padded_vocab(llm.vocab_size),
        "max_position_embeddings": llm.max_seq_len,
        "rms_norm_eps": llm.norm_eps,
        # Both spellings: older releases read rope_theta, transformers >= 5 rope_parameters.
        "rope_theta": llm.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": llm.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_token_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,  # transformers < 4.56 (and vLLM on it) read only this name
    }
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": vis.dim,
        "intermediate_size": vis.hidden_dim,
        "num_hidden_layers": vis.n_layers,
        "num_attention_heads": vis.n_heads,
        "image_size": vis.image_size,
        "patch_size": vis.patch_size,
        "hidden_act": vis.hidden_act,
        "layer_norm_eps": vis.norm_eps,
        "num_channels": 3,
        "projection_dim": 768,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "text_config": text_config,
        "vision_config": vision_config,
        "ignore_index": IGNORE_INDEX,
        "image_token_index": tok.image_token_id,
        "projector_hidden_act": args.projector_hidden_act,
        "multimodal_projector_bias": True,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": vis.select_layer,
        "image_grid_pinpoints": [
            [h, w] for w, h in args.grid_pinpoints
        ],  # HF: [height, width]
        "use_image_newline_parameter": True,
        "image_seq_length": vis.num_patches,
        "tie_word_embeddings": False,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def _added(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_config(tok: TokenizerInfo, model_max_length: int) -> dict:
    """Slow, legacy Llama tokenizer (as LLaVA trained with) plus `<image>` and `<pad>`."""
    return {
        "tokenizer_class": "LlamaTokenizer",
        "processor_class": "LlavaNextProcessor",
        "legacy": True,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": PAD_TOKEN,
        "image_token": IMAGE_TOKEN,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "added_tokens_decoder": {
            str(tok.unk_id): _added("<unk>"),
            str(tok.bos_id): _added("<s>"),
            str(tok.eos_id): _added("</s>"),
            str(tok.image_token_id): _added(IMAGE_TOKEN),
            str(tok.pad_token_id): _added(PAD_TOKEN),
        },
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched generation continues from the right end of each row
        "sp_model_kwargs": {},
        "use_default_system_prompt": False,
        "chat_template": VICUNA_CHAT_TEMPLATE,
    }


def preprocessor_config(args: LlavaNextArgs) -> dict:
    """LlavaNextImageProcessor settings that reproduce titan_llava's AnyRes tiles."""
    t = args.vision.image_size
    return {
        "image_processor_type": "LlavaNextImageProcessor",
        "processor_class": "LlavaNextProcessor",
        "image_grid_pinpoints": [[h, w] for w, h in args.grid_pinpoints],
        "size": {"shortest_edge": t},
        "crop_size": {"height": t, "width": t},
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_pad": True,
        "do_convert_rgb": True,
        "resample": 3,  # PIL bicubic, PIL's default for Image.resize
    }


def processor_config(args: LlavaNextArgs) -> dict:
    return {
        "processor_class": "LlavaNextProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": args.vision.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,  # the CLS token, dropped by the "default" strategy
    }


def generation_config(tok: TokenizerInfo) -> dict:
    return {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_token_id,
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_metadata_files(
    out_dir: str, args: LlavaNextArgs, tokenizer_path: str, dtype_name: str
) -> TokenizerInfo:
    """Write every non-weight file of the export into `out_dir`; returns the vocabulary ids."""
    tok = tokenizer_info(tokenizer_path)
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
    _write_json(
        os.path.join(out_dir, "config.json"), llava_next_config(args, tok, dtype_name)
    )
    _write_json(os.path.join(out_dir, "generation_config.json"), generation_config(tok))
    _write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        tokenizer_config(tok, args.llm.max_seq_len),
    )
    _write_json(
        os.path.join(out_dir, "tokenizer.json"),
        tokenizer_json(
            tokenizer_path,
            {tok.image_token_id: IMAGE_TOKEN, tok.pad_token_id: PAD_TOKEN},
        ),
    )
    _write_json(
        os.path.join(out_dir, "special_tokens_map.json"),
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": PAD_TOKEN,
        },
    )
    _write_json(
        os.path.join(out_dir, "preprocessor_config.json"), preprocessor_config(args)
    )
    _write_json(os.path.join(out_dir, "processor_config.json"), processor_config(args))
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(VICUNA_CHAT_TEMPLATE)
    return tok
