"""qwen3_tts_edge.quant."""
