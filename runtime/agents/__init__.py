"""Voice-agent framework plugins on ``AsyncTTS`` (``runtime/aio.py``), each behind its own extra.

- ``pipecat_tts``: ``Qwen3TTSService``, a pipecat ``TTSService`` (``pip install 'qwen3-tts-edge[pipecat]'``).
- ``livekit_tts``: a LiveKit Agents ``tts.TTS`` plugin (``pip install 'qwen3-tts-edge[livekit]'``).

Nothing is imported here: import the module of your framework, which imports the framework itself (and says
which extra to install when it is missing). The runtime core never imports this package.
"""
