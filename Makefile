# Qwen3-TTS Edge build glue. The README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# llama-cpp-python compiles from source for this CPU. runtime/backends/llama_cpp/build_flags.py picks the CMake
# flags from /proc/cpuinfo: native, except on AMX CPUs where the pinned llama.cpp crashes (every other extension
# is named explicitly there). Override with `make setup LLAMA_CMAKE_ARGS="..."` or CMAKE_ARGS in the environment.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS ?= $(or $(CMAKE_ARGS),$(shell $(PYTHON) runtime/backends/llama_cpp/build_flags.py cmake-args))
# Built wheels are kept per flag set (pip's own cache keys on the sdist only and would reuse other flags).
LLAMA_KEY := $(shell $(PYTHON) runtime/backends/llama_cpp/build_flags.py key "$(LLAMA_CMAKE_ARGS)")
LLAMA_WHEELS := .cache/llama-cpp-python/$(LLAMA_KEY)
LLAMA_STAMP := $(VENV)/.llama-$(LLAMA_KEY)
MODEL ?= random:0.6b-custom_voice
BUNDLE ?= artifacts/demo
# Precisions for the demo export; empty = the export defaults (talker q8_0, decoder fp32).
TALKER ?=
DECODER ?=
# Per-model speak options: a preset speaker for CustomVoice, e.g. SPEAK_ARGS='--instruct "..."' for VoiceDesign.
SPEAK_ARGS ?= --speaker vivian --language english
TEXT ?= Hello! This is Qwen3-TTS Edge speaking on your own hardware.
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo test lint clean-venv

setup: $(STAMP)
	@$(BIN)/python -c "import llama_cpp; print('llama.cpp system info:', llama_cpp.llama_print_system_info().decode().strip())"

$(VENV)/.venv-stamp:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

# A change of flags gives a new key, so a new stamp: the wheel is rebuilt (or taken from its own folder).
$(LLAMA_STAMP): $(VENV)/.venv-stamp
	@echo "llama-cpp-python $(LLAMA_VERSION) with CMAKE_ARGS=\"$(LLAMA_CMAKE_ARGS)\" (build key $(LLAMA_KEY))"
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "compiling llama-cpp-python from source (6-12 min on 2 cores) ..."; \
	  rm -rf $(LLAMA_WHEELS).tmp && mkdir -p $(LLAMA_WHEELS).tmp && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
	    llama-cpp-python==$(LLAMA_VERSION) -w $(LLAMA_WHEELS).tmp && \
	  rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); fi
	@# Replace whatever llama-cpp-python is installed (same version, other flags) by this build, with its deps.
	$(PIP) uninstall -q -y llama-cpp-python 2>/dev/null || true
	$(PIP) install -q -c constraints.txt $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	rm -f $(VENV)/.llama-*
	touch $@

$(STAMP): pyproject.toml constraints.txt Makefile $(LLAMA_STAMP)
	@# libportaudio2: sounddevice playback; sox: silences qwen-tts' import-time SoX warning; espeak-ng: the
	@# tests' spoken reference clips for voice cloning. Best effort (tests that need espeak-ng say so).
	@if ! ldconfig -p 2>/dev/null | grep -q libportaudio.so.2 || ! command -v espeak-ng >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq libportaudio2 sox espeak-ng >/dev/null) || echo "warning: apt-get failed; --play needs libportaudio2, the voice tests espeak-ng"; \
	  else echo "note: install libportaudio2, sox and espeak-ng with your package manager (--play, voice tests)"; fi; fi
	@# torch first and pinned: an unpinned resolve can pull a newer CUDA build (see README, Install).
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[export,audio,plot,dev,server,ray,pipecat,livekit]"
	@# qwen-tts declares a CUDA-only torchaudio, gradio and exact pins it does not need for the 12 Hz
	@# models; its real imports are in the [export] extra, so install it without its declared deps.
	$(PIP) install -q --no-deps qwen-tts==0.1.1
	touch $(STAMP)

demo: setup
	$(BIN)/qwen3-tts-edge export $(MODEL) -o $(BUNDLE) --force $(if $(TALKER),--talker $(TALKER)) $(if $(DECODER),--decoder $(DECODER))
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
