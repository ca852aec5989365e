"""Voices for Base models: reference audio in, what the speaker and codec encoders need out (torch-free).

``audio_in`` loads and resamples a reference clip exactly as the official loader does; ``mel`` is the speaker
encoder's log-mel front end on the host (the STFT is not exportable into the encoder graph). The encoders
themselves, voice files and ``voice create`` arrive with the export stage of the speaker and codec encoders.
``voice_pack`` holds fine-tuned voices as LoRA adapters (any model type) applied by the llama.cpp engine.
"""
