"""qwen3_tts_edge.export."""
