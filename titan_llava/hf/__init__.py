"""Hugging Face interop: explicit key maps, safetensors loading, export to LlavaNextForConditionalGeneration."""
