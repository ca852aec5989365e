"""qwen3_tts_edge.runtime."""
