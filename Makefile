# Qwen3-TTS Edge build glue. The README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Optional folder of prebuilt wheels (e.g. a portable llama-cpp-python build) to skip source builds.
WHEELHOUSE ?= $(QWEN3_TTS_EDGE_WHEELHOUSE)
PIP_FIND := $(if $(WHEELHOUSE),--find-links $(WHEELHOUSE),)
PIP := $(BIN)/python -m pip
MODEL ?= random:0.6b-custom_voice
BUNDLE ?= artifacts/demo
TALKER ?= q8_0
DECODER ?= fp32
# Per-model speak options: a preset speaker for CustomVoice, e.g. SPEAK_ARGS='--instruct "..."' for VoiceDesign.
SPEAK_ARGS ?= --speaker vivian --language english
TEXT ?= Hello! This is Qwen3-TTS Edge speaking on your own hardware.
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo test lint clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@# libportaudio2: sounddevice playback; sox: silences qwen-tts' import-time SoX warning. Best effort.
	@if ! ldconfig -p 2>/dev/null | grep -q libportaudio.so.2; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq libportaudio2 sox >/dev/null) || echo "warning: apt-get failed; --play needs libportaudio2"; \
	  else echo "note: install libportaudio2 (and sox) with your package manager for --play"; fi; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first and pinned: an unpinned resolve can pull a newer CUDA build (see README, Install).
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt $(PIP_FIND) -e ".[export,audio,plot,dev]"
	@# qwen-tts declares a CUDA-only torchaudio, gradio and exact pins it does not need for the 12 Hz
	@# models; its real imports are in the [export] extra, so install it without its declared deps.
	$(PIP) install -q --no-deps qwen-tts==0.1.1
	touch $(STAMP)

demo: setup
	$(BIN)/qwen3-tts-edge export $(MODEL) -o $(BUNDLE) --force --talker $(TALKER) --decoder $(DECODER)
	$(BIN)/qwen3-tts-edge info $(BUNDLE)
	$(BIN)/qwen3-tts-edge speak "$(TEXT)" -b $(BUNDLE) $(SPEAK_ARGS) -o demo.wav --stats

# pytest exits 5 when it collects no tests: treat that as a failure, never as a pass.
test: setup
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
