"""qwen3_tts_edge.bench."""
